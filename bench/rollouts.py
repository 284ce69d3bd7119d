"""Generation as the pipeline runs it, with and without dropping finished rows from the batch.

    python bench/rollouts.py                                   # checkpoints/sft_final, data/, 2 threads
    python bench/rollouts.py --checkpoint CK/sft_final.safetensors --repeats 3

A batch of replies decodes until its longest reply stops; generate() drops the rows that have
finished from its batch and KV cache once no more than model.COMPACT_BELOW of the rows still in
it are decoding (0 = never). Three workloads of a trained model, each timed whole:
- rollouts: four RLVF iterations' samples, 16 training tasks x 8 replies at temperature 1, 80
  tokens at most (stages/policy.rollout, one RNG per row, as the stage draws them);
- task eval: the RLVF stage's evaluation of the held-out tasks, greedy + 4 samples each;
- chat eval: greedy replies to every chat_eval.json prompt (batches of 32, 96 tokens).
Each setting runs in its own process, the settings alternating, `--repeats` rounds; medians.
Every process also reports what it generated (task accuracy, pass@4, chat acceptable share),
which must be equal across settings: dropping rows changes no row. Writes runs/bench/rollouts.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common as C


def worker(args):
    import numpy as np

    import tinygrad_llm.model as M
    from tinygrad_llm import chat_eval
    from tinygrad_llm.checkpoint import load_gpt
    from tinygrad_llm.data import load_split
    from tinygrad_llm.stages.policy import rollout, row_rngs
    from tinygrad_llm.stages.task_eval import evaluate_tasks

    M.COMPACT_BELOW = args.compact_below
    C.setup_threads(args.threads)
    model, tok = load_gpt(args.checkpoint)
    train, val = load_split(args.data_dir, "rlvf", seed=1337)
    out = {"compact_below": args.compact_below}
    t = time.perf_counter()
    for i in range(4):
        tasks = train[16 * i:16 * (i + 1)]
        rollout(model, tok, [x["prompt"] for x in tasks], samples=8, temperature=1.0, max_new_tokens=80,
                rng=row_rngs(1234 + i, range(len(tasks)), 8))
    out["rollouts_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate_tasks(model, tok, val, 4, max_new_tokens=80, batch=128, seed=7)
    out["task_eval_s"], out["task_acc"], out["pass@4"] = time.perf_counter() - t, ev["accuracy"], ev["pass@4"]
    items = chat_eval.load_chat_eval(args.data_dir)
    t = time.perf_counter()
    res = chat_eval.evaluate_chat(model, tok, items, max_new_tokens=96, batch=32)
    out["chat_eval_s"] = time.perf_counter() - t
    out["chat_acceptable"] = float(np.mean([r["acceptable"] for r in res["replies"]]))
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(C.ROOT, "checkpoints", "sft_final.safetensors"))
    ap.add_argument("--data-dir", default=os.path.join(C.ROOT, "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", default="0,0.75", help="COMPACT_BELOW values, comma list")
    ap.add_argument("--compact-below", type=float, help=argparse.SUPPRESS)     # worker mode
    args = ap.parse_args()
    if args.compact_below is not None:
        return worker(args)
    import numpy  # noqa: F401  (loaded here too, so that the BLAS line below names the workers' BLAS)
    settings = [float(x) for x in args.settings.split(",")]
    runs = {s: [] for s in settings}
    for r in range(args.repeats):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            cmd = [sys.executable, __file__, "--compact-below", str(s), "--checkpoint", args.checkpoint,
                   "--data-dir", args.data_dir, "--threads", str(args.threads)]
            runs[s].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print(C.blas_line())
    keys = ("rollouts_s", "task_eval_s", "chat_eval_s")
    rows = [[f"COMPACT_BELOW={s}"] + [C.median([x[k] for x in runs[s]]) for k in keys]
            + [runs[s][0]["task_acc"], runs[s][0]["pass@4"], runs[s][0]["chat_acceptable"]] for s in settings]
    print(C.table(["setting", "rollouts s", "task eval s", "chat eval s", "task acc", "pass@4", "chat acc"], rows,
                  [None, ".2f", ".2f", ".2f", ".3f", ".3f", ".3f"]))
    figures = {json.dumps([x[k] for k in ("task_acc", "pass@4", "chat_acceptable")]) for v in runs.values() for x in v}
    print("every run generated the same replies' figures:", len(figures) == 1)
    print("wrote", C.write_json("rollouts", {"meta": C.meta(args.threads), "runs": {str(s): v for s, v in runs.items()}}))


if __name__ == "__main__":
    main()
