"""What length-grouped batches and a loss on the assistant's positions alone save in SFT: full
training steps of the mini model (forward, backward, clip, AdamW) on the bundled SFT data, with
plain random batches, stages.sft.length_grouped batches (the stage's group_by_length), and
grouped batches whose lm_head runs on the assistant tokens only (logprobs.masked_loss, what the stage
does) instead of every position (model(x, y, loss_mask)), interleaved in one process.

    python bench/sft_batches.py                  # 2 threads, 40 steps of each, groups of 8
    python bench/sft_batches.py --group 4 --steps 20

Reports per variant: ms per step (median), the mean padded length T and the share of real
(non-padding) tokens. What the grouping costs in learning per step is a training question, not
a speed one: bench/README.md, "Length-grouped SFT batches"."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from tinygrad_llm.config import get_mini_config  # noqa: E402
from tinygrad_llm.data import load_split, pad_batch, sft_examples  # noqa: E402
from tinygrad_llm.stages.sft import length_grouped  # noqa: E402
from tinygrad_llm.logprobs import masked_loss  # noqa: E402
from tinygrad_llm.model import GPT  # noqa: E402
from tinygrad_llm.optim import AdamW, clip_grad_norm  # noqa: E402
from tinygrad_llm.tokenizer import PAD_ID, MyLLMTokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="batches' worth drawn per grouped batch")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    args = ap.parse_args()
    C.setup_threads(args.threads)

    convs, _ = load_split(args.data_dir, "sft", seed=1337)
    tok = MyLLMTokenizer().build_vocab([m["content"] for c in convs for m in c])
    cfg = get_mini_config(vocab_size=tok.vocab_size)
    examples = sft_examples(tok, convs, cfg.block_size)
    lengths = np.array([len(ids) for ids, _ in examples])
    model = GPT(cfg, seed=0).train()
    params = model.parameters()
    opt = AdamW(model.named_parameters(), lr=1e-5, weight_decay=0.1)
    def random(rng): return rng.integers(0, len(examples), args.batch)
    def grouped(rng): return length_grouped(rng, lengths, args.batch, args.group)
    def every_position(x, y, m): return model(x, y, loss_mask=m)[1]
    variants = {"random": (random, every_position), f"grouped ({args.group})": (grouped, every_position),
                f"grouped ({args.group}), head on assistant rows": (grouped, lambda x, y, m: masked_loss(model, x, y, m))}
    rngs = {name: np.random.default_rng(0) for name in variants}
    shape = {name: [] for name in variants}

    def step(name):
        draw, loss_of = variants[name]
        x, y, m = pad_batch([examples[i] for i in draw(rngs[name])])
        shape[name].append((x.shape[1], float((x != PAD_ID).mean())))
        loss = loss_of(x, y, m)
        loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad()

    load0 = C.loadavg()
    times = C.interleave({name: (lambda n=name: step(n)) for name in variants}, args.steps)
    rows = []
    for name in variants:
        T, real = np.array(shape[name][1:]).T          # the warm-up step left out
        rows.append([name, C.median(times[name]) * 1e3, T.mean(), f"{real.mean():.0%}"])
    base = rows[0][1]
    for r in rows:
        r.append(f"{base / r[1]:.2f}x")
    print(f"mini model, vocab {tok.vocab_size}, {len(examples)} SFT examples, batch {args.batch}, {args.steps} steps "
          f"each, interleaved; load avg before/after {load0[0]:.2f}/{C.loadavg()[0]:.2f}\n{C.blas_line()}\n")
    print(C.table(["batches", "ms/step", "mean T", "real tokens", "speed-up"], rows, [None, ".0f", ".0f", None, None]))


if __name__ == "__main__":
    main()
