"""Memory of mini training over many steps: resident set at fixed steps, to show there is no
per-step growth (a leak would be a graph kept alive, or gradients accumulating somewhere).

    python bench/memory.py                 # 200 steps of 8x256, vocab 6,400, auto threads
    python bench/memory.py --steps 50 --shape 16x256 --threads 1

Each step is bench/train_step.py's (forward, loss, backward, clip 1.0, AdamW, zero_grad) on a
fixed random batch: memory does not depend on the tokens. Writes runs/bench/memory.json.
"""
from __future__ import annotations

import argparse
import resource

import common as C
from train_step import SHAPES, Trainer


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shape", default="8x256", choices=[f"{b}x{t}" for b, t in SHAPES], help="B x T")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = C.setup_threads(args.threads)
    B, T = map(int, args.shape.split("x"))
    tr = Trainer()                                   # train_step.py's step: the one being benchmarked
    marks = sorted({1, 10, *range(50, args.steps + 1, 50), args.steps})
    rows = []
    for step in range(1, args.steps + 1):
        tr.step(B, T)
        if step in marks:
            rows.append((step, rss_mb()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    growth = rows[-1][1] - next(r for s, r in rows if s >= 10)
    print(f"\nmini model, vocab {tr.cfg.vocab_size}, {B}x{T}, float32, {threads} thread(s)\n")
    print(C.table(["step", "VmRSS MB"], rows, [None, ".0f"]))
    print(f"\ngrowth from step 10 to {args.steps}: {growth:+.0f} MB; peak (ru_maxrss) {peak:.0f} MB")
    print("wrote", C.write_json("memory", {"meta": C.meta(threads, steps=args.steps, batch=B, seq=T),
                                           "rss_mb": rows, "growth_mb": growth, "peak_mb": peak}))


if __name__ == "__main__":
    main()
