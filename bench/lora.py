"""SFT with LoRA adapters (r = 4, 8, 16) vs full SFT, from the same pretrain checkpoint, the same
steps, batches and learning rate: held-out assistant loss, the share of replies to held-out
prompts that close with <|im_end|>, trainable parameters, seconds per step and peak memory.

    python bench/lora.py --pretrain REF/pretrain_final.safetensors --steps 200
    python bench/lora.py --ranks 8 --targets c_attn,c_proj,c_fc --lr 3e-3
    python bench/lora.py --no-timing --memory-steps 20        # only the memory runs

Each variant also runs --memory-steps steps in another process with tracemalloc on (`traced`):
the peak of live memory while training, which RSS does not show here (runtime.py keeps freed
memory in the process, so RSS is a high-water mark that depends on fragmentation).

Each variant runs the real SFT stage (stages/sft.py; --lora.r=N for the adapters) in its own
process, so its peak resident memory (ru_maxrss) is its own. The data directory holds only the
SFT files, so the stage skips the chat and task evaluations (too slow for four variants).
Writes runs/bench/lora.json."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import common as C


def traced(train, peak: dict):
    """loop.train with tracemalloc on: peak["mb"] is the peak of live NumPy + Python memory while
    training. (Not RSS: this project keeps freed memory in the process, runtime.py, so RSS is
    the heap's high-water mark and depends on fragmentation.) Slows Python: memory runs only."""
    def wrapped(*a, **k):
        tracemalloc.start()
        try:
            return train(*a, **k)
        finally:
            peak["mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    return wrapped


def one(args) -> dict:
    """Run the SFT stage once (args.rank 0 = full SFT) -> its figures; with args.memory,
    args.memory_steps steps under tracemalloc (`traced`)."""
    import types

    from tinygrad_llm.checkpoint import config_from_meta, read_metadata
    from tinygrad_llm.data import data_file
    from tinygrad_llm.lora import LoRAConfig
    from tinygrad_llm.loop import RunLogger
    from tinygrad_llm.stages import sft as sft_stage
    from tinygrad_llm.stages.common import StageContext
    from tinygrad_llm.stages.sft import STAGE, SFTConfig
    from tinygrad_llm.tokenizer import MyLLMTokenizer

    peak = {}
    steps = args.memory_steps if args.memory else args.steps
    if args.memory:
        sft_stage.train = traced(sft_stage.train, peak)

    threads = C.setup_threads(args.threads)
    pre = Path(args.pretrain).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        (tmp / "ckpt").mkdir()
        for name in ("sft_data.json", "sft_val.json"):
            (tmp / "data" / name).symlink_to(data_file(args.data_dir, name).resolve())
        (tmp / "ckpt" / "pretrain_final.safetensors").symlink_to(pre)
        tok = MyLLMTokenizer().load(Path(args.vocab) if args.vocab else pre.parent / "vocab.json")
        sft = SFTConfig(max_steps=steps, eval_every=steps, lr=args.lr, ckpt_every=0)
        cfg = types.SimpleNamespace(model=config_from_meta(read_metadata(pre), pre), sft=sft,
                                    lora=LoRAConfig(r=args.rank, alpha=args.alpha, targets=args.targets))
        ctx = StageContext(cfg, tok, tmp / "data", tmp / "ckpt", RunLogger(tmp / "run"), seed=args.seed,
                           show_progress=False)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        out = STAGE.run(ctx)
        ckpt_mb = os.path.getsize(out["checkpoint"]) / 2**20
    return {"rank": args.rank, "val_loss": out["val_loss"], "val_loss_start": out["val_loss_start"],
            "eos_rate": out["eos_rate"], "trainable_params": out["trainable_params"],
            "step_time_s": out["step_time_s"], "stage_time_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before, "checkpoint_mb": ckpt_mb, "threads": threads, "traced_peak_mb": peak.get("mb")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", default=os.path.join(C.ROOT, "checkpoints", "pretrain_final.safetensors"))
    ap.add_argument("--vocab", default=None, help="default: vocab.json beside --pretrain")
    ap.add_argument("--data-dir", default=os.path.join(C.ROOT, "data"))
    ap.add_argument("--steps", type=int, default=200, help="SFT steps, the same for every variant")
    ap.add_argument("--ranks", default="0,4,8,16", help="comma list; 0 = full SFT")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="c_attn,c_proj")
    ap.add_argument("--lr", type=float, default=1e-3, help="SFT's default; the same for every variant")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="lora", help="runs/bench/<out>.json (and <out>_memory.json)")
    ap.add_argument("--memory-steps", type=int, default=20,
                    help="steps of the separate tracemalloc run per variant (0: none)")
    ap.add_argument("--no-timing", action="store_true", help="only the memory runs")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)    # internal: run one variant
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)     # internal: its memory run
    args = ap.parse_args()
    if args.rank is not None:
        print(json.dumps(one(args), default=float))
        return
    ranks = list(map(int, args.ranks.split(",")))
    if args.memory_steps:
        mem = [child(args, r, "--memory") for r in ranks]
        print(f"\nlive memory while training (tracemalloc peak, {args.memory_steps} steps; {args.targets})\n")
        print(C.table(["variant", "trainable params", "traced peak MB", "process peak RSS MB"],
                      [(_name(x), f"{x['trainable_params']:,}", f"{x['traced_peak_mb']:.0f}", f"{x['peak_rss_mb']:.0f}")
                       for x in mem]))
        print("wrote", C.write_json(f"{args.out}_memory", {"meta": C.meta(mem[0]["threads"], steps=args.memory_steps,
                                                                   targets=args.targets), "rows": mem}))
    if not args.no_timing:
        timing(args, [child(args, r) for r in ranks])


def _name(x) -> str:
    return "full SFT" if x["rank"] == 0 else f"LoRA r={x['rank']}"


def child(args, r: int, *extra) -> dict:
    """One variant in its own process -> its figures."""
    cmd = [sys.executable, __file__, "--rank", str(r), *extra] + sys.argv[1:]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"variant r={r} failed:\n{res.stderr[-2000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"r={r}{' (memory)' if extra else ''}: {row}", flush=True)
    return row


def timing(args, rows):
    full = next((x for x in rows if x["rank"] == 0), None)
    print(f"\nSFT from {args.pretrain}, {args.steps} steps of batch 16, lr {args.lr:g}; LoRA alpha {args.alpha:g} "
          f"on {args.targets}; load average {C.loadavg()}\n")
    print(C.table(["variant", "held-out loss", "closes", "trainable params", "s/step", "peak RSS MB", "checkpoint MB"],
                  [(_name(x), f"{x['val_loss_start']:.3f} -> {x['val_loss']:.3f}",
                    f"{x['eos_rate']:.0%}", f"{x['trainable_params']:,}"
                    + (f" ({x['trainable_params'] / full['trainable_params']:.1%})" if full and x["rank"] else ""),
                    f"{x['step_time_s']:.3f}", f"{x['peak_rss_mb']:.0f}", f"{x['checkpoint_mb']:.2f}") for x in rows]))
    print("wrote", C.write_json(args.out, {"meta": C.meta(rows[0]["threads"], steps=args.steps, lr=args.lr, alpha=args.alpha,
                                                         targets=args.targets, pretrain=args.pretrain), "rows": rows}))


if __name__ == "__main__":
    main()
