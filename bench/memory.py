"""Memory of mini training over many steps: resident set at fixed steps, to show there is no
per-step growth (a leak would be a graph kept alive, or gradients accumulating somewhere).

    python bench/memory.py                 # 200 steps of 8x256, vocab 6,400, auto threads
    python bench/memory.py --steps 50 --threads 1

Random tokens stand in for data (memory does not depend on them); each step is the real one:
forward, loss, backward, clip 1.0, AdamW, zero_grad. Writes runs/bench/memory.json.
"""
from __future__ import annotations

import argparse
import resource

import numpy as np

import common as C


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = C.setup_threads(args.threads)
    from tinygrad_llm.config import get_mini_config
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW, clip_grad_norm

    cfg = get_mini_config(6400)
    model = GPT(cfg)
    model.train()
    opt = AdamW(list(model.named_parameters()), lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    marks = sorted({1, 10, *range(50, args.steps + 1, 50), args.steps})
    rows = []
    for step in range(1, args.steps + 1):
        x, y = (rng.integers(0, cfg.vocab_size, (args.batch, args.seq)) for _ in range(2))
        loss = model(x, y)[1]
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step(1e-3)
        opt.zero_grad()
        if step in marks:
            rows.append((step, rss_mb()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    growth = rows[-1][1] - next(r for s, r in rows if s >= 10)
    print(f"\nmini model, vocab {cfg.vocab_size}, {args.batch}x{args.seq}, float32, {threads} thread(s)\n")
    print(C.table(["step", "VmRSS MB"], rows, [None, ".0f"]))
    print(f"\ngrowth from step 10 to {args.steps}: {growth:+.0f} MB; peak (ru_maxrss) {peak:.0f} MB")
    print("wrote", C.write_json("memory", {"meta": C.meta(threads, steps=args.steps, batch=args.batch, seq=args.seq),
                                           "rss_mb": rows, "growth_mb": growth, "peak_mb": peak}))


if __name__ == "__main__":
    main()
