"""Which position scheme learns to copy soonest? The table that decides GPTConfig.pos_emb.

    python bench/copy_probe.py                               # learned, rope, rope+smear; 400 steps each
    python bench/copy_probe.py --variants rope --steps 200 --every 25
    python bench/copy_probe.py --data-dir some/other/data    # the same question on another corpus

Each variant trains a fresh mini model (same seed, same batches, same learning-rate schedule
as the pretrain stage: PretrainConfig's defaults unless overridden) on the pretraining text
and, every --every steps, prints the copy probe (tinygrad_llm/probe.py: accuracy on digits
2..n of a just-read random digit string, in phrasings training never used; chance 10%) and
the held-out loss. The copy spans (pretrain_drills.txt) come in on the pretrain stage's
curriculum (--copy-warmup-steps of copy spans alone, then --drill-share of the rows;
--no-drills: text only). Variants run one after another in this process: the figures are about
learning, not speed, so they do not need a quiet machine. Results: runs/bench/copy_probe.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

import common as C
from tinygrad_llm.config import get_mini_config
from tinygrad_llm.data import all_texts, load_drills, load_split
from tinygrad_llm.loop import train
from tinygrad_llm.model import GPT
from tinygrad_llm.probe import copy_probe
from tinygrad_llm.stages.pretrain import PretrainConfig, curriculum_batch, val_loss
from tinygrad_llm.tokenizer import MyLLMTokenizer

VARIANTS = {"learned": {}, "learned+smear": {"smear_keys": True},
            "rope": {"pos_emb": "rope"}, "rope+smear": {"pos_emb": "rope", "smear_keys": True}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="learned,rope,rope+smear", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=PretrainConfig.max_steps)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=PretrainConfig.lr)
    ap.add_argument("--data-dir", default=os.path.join(C.ROOT, "data"))
    ap.add_argument("--copy-warmup-steps", type=int, default=PretrainConfig.copy_warmup_steps)
    ap.add_argument("--drill-share", type=float, default=PretrainConfig.drill_share)
    ap.add_argument("--no-drills", action="store_true", help="ignore pretrain_drills.txt (text only)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    C.setup_threads(args.threads)

    tok = MyLLMTokenizer().build_vocab(all_texts(args.data_dir))
    train_text, val_text = load_split(args.data_dir, "pretrain", seed=args.seed)
    train_ids = np.array(tok.encode(train_text, allow_special=False), np.int64)
    val_ids = np.array(tok.encode(val_text, allow_special=False), np.int64)
    drills = None if args.no_drills else load_drills(args.data_dir)
    drill_ids = np.array(tok.encode(drills, allow_special=False), np.int64) if drills else None
    cfg = PretrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.every,
                         log_every=args.steps + 1, copy_warmup_steps=args.copy_warmup_steps,
                         drill_share=args.drill_share)
    results = {}
    for name in args.variants.split(","):
        mcfg = get_mini_config(tok.vocab_size)
        for k, v in VARIANTS[name].items():
            setattr(mcfg, k, v)
        mcfg.__post_init__()
        model = GPT(mcfg, seed=args.seed)
        rows = []

        def evaluate(m):
            row = {"loss": val_loss(m, val_ids, cfg, mcfg.block_size), **copy_probe(m, tok)}
            print(f"  {name:<12} step {len(rows) * args.every:>5}  held-out loss {row['loss']:.3f}  "
                  f"copy {row['copy_acc']:6.1%}  per phrasing " + " ".join(f"{a:.0%}" for a in row["by_template"]),
                  flush=True)
            rows.append(row)
            return {"loss": row["loss"], "copy_acc": row["copy_acc"]}

        t0 = time.perf_counter()
        step = [0]

        def get_batch(rng):
            step[0] += 1
            return curriculum_batch(step[0] - 1, cfg, train_ids, drill_ids, mcfg.block_size, rng)

        train(model, cfg, get_batch,
              lambda m, b: (m(b[0], b[1])[1], {"tokens": b[0].size}), stage=f"copy_probe:{name}",
              evaluate=evaluate, rng=np.random.default_rng(args.seed), show_progress=False)
        results[name] = {"rows": rows, "time_s": time.perf_counter() - t0}

    steps = list(range(0, args.steps + 1, args.every))
    print(f"\ncopy probe (digits 2..n of a repeat, unseen phrasings; chance 10%), {args.batch_size}x{256} batches")
    print(f"{'variant':<14}" + "".join(f"{s:>8}" for s in steps) + "   held-out loss at the end")
    for name, r in results.items():
        print(f"{name:<14}" + "".join(f"{row['copy_acc']:>8.0%}" for row in r["rows"]) + f"   {r['rows'][-1]['loss']:.3f}"
              f" ({r['rows'][-1]['loss'] / math.log(2):.2f} bits/char)")
    os.makedirs(C.OUT_DIR, exist_ok=True)
    with open(os.path.join(C.OUT_DIR, "copy_probe.json"), "w") as f:
        json.dump({"args": vars(args), "steps": steps, "loadavg": C.loadavg(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
