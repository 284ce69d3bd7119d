"""Data parallel on this machine: one process with 2 threads against `mpiexec -n 2` with one
thread per rank, training the mini model at B x T = 16 x 256 through loop.train (what train.py
runs: forward, backward, the Allreduce, clip, AdamW).

    python bench/data_parallel.py               # 3 rounds x 8 timed steps per variant
    python bench/data_parallel.py --quick       # 2 rounds x 4 steps

Each variant is its own launch (a process, or mpiexec and its 2 ranks); the rounds alternate
which runs first (bench/common.py's rule, at the granularity of a launch). Per launch: the
median step time after `--warmup` steps, tokens/s of the global batch, the median time of the
step's Allreduce (under MPI; it includes waiting for the slower rank) and its share of the step,
and, after training, the Allreduce of a buffer the size of the gradients timed alone (the
transport's own cost). Reported: the medians over rounds, the BLAS kernel and load average.
Writes runs/bench/data_parallel.json. Needs the extra `mpi` (mpi4py + mpiexec).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import common as C

B, T = 16, 256
VOCAB = 2724                 # the reference run's vocabulary (README): 3.86M parameters, ~15 MB of float32


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per launch")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (Numba, allocator)")
    ap.add_argument("--quick", action="store_true", help="2 rounds x 4 steps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 4
    return args


def blas_kernels() -> list:
    """(library, version, kernel, threads) of each BLAS loaded (threadpoolctl; the kernel OpenBLAS
    picked for this CPU, which OPENBLAS_CORETYPE can hold back: DESIGN.md section 4)."""
    from threadpoolctl import threadpool_info
    return [(i.get("internal_api"), i.get("version"), i.get("architecture"), i.get("num_threads"))
            for i in threadpool_info() if i.get("user_api") == "blas"]


def worker(args) -> None:
    """One launch: train warmup + steps steps; rank 0 prints one JSON line."""
    import numpy as np
    from tinygrad_llm.config import LoopConfig, get_mini_config
    from tinygrad_llm.distributed import shard_rows, world
    from tinygrad_llm.loop import train
    from tinygrad_llm.model import GPT

    C.setup_threads(args.threads)
    dist = world()
    model = GPT(get_mini_config(vocab_size=VOCAB), seed=0)
    stamps = []

    def get_batch(rng):                      # called once per step: its time stamps delimit the steps
        stamps.append(time.perf_counter())
        x = rng.integers(0, VOCAB, (B, T))
        return x, np.roll(x, -1, axis=1)

    steps = args.warmup + args.steps
    cfg = LoopConfig(max_steps=steps, batch_size=B, eval_every=0, log_every=steps, warmup_steps=1)
    out = train(model, cfg, get_batch, lambda m, b: (m(*b)[1], {"tokens": b[0].size}), stage="bench",
                rng=np.random.default_rng(0), shard=shard_rows, show_progress=False)
    stamps.append(time.perf_counter())
    step_s = np.diff(stamps)[args.warmup:]
    res = {"ranks": dist.size, "threads": args.threads, "step_s": C.median(step_s.tolist()),
           "params": model.num_parameters(), "blas": blas_kernels()}
    if dist.size > 1:
        res["allreduce_s"] = C.median(out["allreduce_s"][args.warmup:])
        # the same Allreduce alone, ranks already in step (no waiting for a slower one)
        buf = np.ones(sum(p.data.size for p in model.parameters()) + 64, np.float32)
        alone = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.comm.Allreduce(dist.MPI.IN_PLACE, buf, op=dist.MPI.SUM)
            alone.append(time.perf_counter() - t0)
        res.update(allreduce_alone_s=C.median(alone), buffer_mb=buf.nbytes / 1e6)
    if dist.is_main:
        print(json.dumps(res), flush=True)


def launch(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": C.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("error: mpiexec not found: pip install -e '.[mpi]'")
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    variants = {"1 process x 2 threads": me + ["--threads", "2"],
                "mpiexec -n 2 x 1 thread": [mpiexec, "-n", "2", *me, "--threads", "1"]}
    names, runs, loads = list(variants), {n: [] for n in variants}, []
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            runs[n].append(launch(variants[n]))
            loads.append(C.loadavg())
            print(f"round {r + 1}/{args.rounds}  {n}: step {runs[n][-1]['step_s']:.3f} s", flush=True)
    rows, summary = [], {}
    for n in names:
        step = C.median([x["step_s"] for x in runs[n]])
        ar = C.median([x.get("allreduce_s", 0.0) for x in runs[n]])
        alone = C.median([x.get("allreduce_alone_s", 0.0) for x in runs[n]])
        summary[n] = {"step_s": step, "tokens_per_s": B * T / step, "allreduce_s": ar, "allreduce_alone_s": alone,
                      "steps": [x["step_s"] for x in runs[n]]}
        rows.append((n, step * 1e3, B * T / step, ar * 1e3, 100 * ar / step, alone * 1e3))
    base, dp = (summary[n]["tokens_per_s"] for n in names)
    print(f"\nmini model ({runs[names[0]][0]['params']:,} parameters, vocabulary {VOCAB}), B x T = {B} x {T}, "
          f"{args.rounds} rounds x {args.steps} steps (medians); load average during the runs "
          f"{min(l[0] for l in loads):.2f}-{max(l[0] for l in loads):.2f}")
    print(C.table(["variant", "step ms", "tokens/s", "allreduce ms", "share %", "alone ms"], rows,
                  [None, ".0f", ".0f", ".1f", ".1f", ".1f"]))
    print(f"mpiexec -n 2 / 1 process: {dp / base:.2f}x tokens/s; buffer "
          f"{runs[names[1]][0].get('buffer_mb', 0):.1f} MB float32")
    print(f"BLAS: {runs[names[0]][0]['blas']}  (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    path = C.write_json("data_parallel", {"meta": C.meta(None, loadavg=loads), "B": B, "T": T, "vocab": VOCAB,
                                          "rounds": args.rounds, "steps": args.steps, "summary": summary,
                                          "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
