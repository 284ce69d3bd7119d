"""Which decoding settings give the best chats? The chat evaluation (tinygrad_llm/chat_eval.py,
data/chat_eval.json) of one checkpoint under several decoding settings, as a table.

    python bench/chat_decoding.py                                   # checkpoints/sft_final
    python bench/chat_decoding.py --checkpoint checkpoints/rlhf_final.safetensors --seeds 3

Settings: greedy; greedy + repetition penalty 1.1 / 1.2 / 1.3; greedy + no-repeat n-gram 3 / 4;
top-p 0.8 / 0.9 at temperature 0.7 (top-k off; sampled rows are averaged over --seeds fixed
seeds); best of 4 / 8 (the likeliest of the greedy reply and 3 / 7 samples, rerank.py). Columns:
acceptable share (closed, no loop, no refusal, answers) over benign prompts, its per-category
split, refusal and loop shares, share closed, and harmful prompts refused. What it measured picks
inference.py's defaults (README). It runs on the dev half of the chat evaluation
(chat_eval.dev_test_split): a choice made here never looks at the test half (--test-half reports
on the other half a choice already made)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygrad_llm.checkpoint import load_gpt  # noqa: E402
from tinygrad_llm.chat_eval import BENIGN, dev_test_split, evaluate_chat, load_chat_eval  # noqa: E402

SETTINGS = [
    ("greedy", {"temperature": 0.0}),
    ("greedy, rep 1.1", {"temperature": 0.0, "repetition_penalty": 1.1}),
    ("greedy, rep 1.2", {"temperature": 0.0, "repetition_penalty": 1.2}),
    ("greedy, rep 1.3", {"temperature": 0.0, "repetition_penalty": 1.3}),
    ("greedy, no-repeat 3", {"temperature": 0.0, "no_repeat_ngram": 3}),
    ("greedy, no-repeat 4", {"temperature": 0.0, "no_repeat_ngram": 4}),
    ("greedy, rep 1.1, no-repeat 4", {"temperature": 0.0, "repetition_penalty": 1.1, "no_repeat_ngram": 4}),
    ("T 0.7, top-p 0.8", {"temperature": 0.7, "top_p": 0.8}),
    ("T 0.7, top-p 0.9", {"temperature": 0.7, "top_p": 0.9}),
    ("T 0.7, top-p 0.9, rep 1.1", {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}),
    # the likeliest of greedy + 3 / 7 samples at T 0.8, top-p 0.9 (tinygrad_llm/rerank.py)
    ("best of 4", {"best_of": 4, "temperature": 0.8}),
    ("best of 8", {"best_of": 8, "temperature": 0.8}),
]
COLS = ("acceptable", "refusal", "loop", "closed", "harmful_refusal")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "sft_final.safetensors"))
    ap.add_argument("--vocab", help="default: vocab.json beside the checkpoint")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=3, help="fixed seeds 0..n-1 for the sampled settings")
    ap.add_argument("--show", type=int, default=0, help="print the first N replies of every setting")
    ap.add_argument("--settings", help="comma-separated setting names to run (default: all)")
    ap.add_argument("--test-half", action="store_true",
                    help="run on the test half instead (to report a choice already made on the dev half)")
    args = ap.parse_args(argv)
    path = Path(args.checkpoint)
    if not path.exists():
        print(f"error: {path}: checkpoint not found (train one: python train.py --stage pretrain,sft)", file=sys.stderr)
        return 2
    items = load_chat_eval(args.data_dir)
    if items is None:
        print(f"error: {args.data_dir}: no chat_eval.json", file=sys.stderr)
        return 2
    items = dev_test_split(items)[1 if args.test_half else 0]     # choose on dev; the stages report on test
    settings = SETTINGS
    if args.settings:
        names = [n.strip() for n in args.settings.split(",")]
        unknown = [n for n in names if n not in dict(SETTINGS)]
        if unknown:
            print(f"error: unknown setting(s) {unknown}; choose from {[n for n, _ in SETTINGS]}", file=sys.stderr)
            return 2
        settings = [(n, kw) for n, kw in SETTINGS if n in names]
    model, tok = load_gpt(path, Path(args.vocab) if args.vocab else path.parent / "vocab.json")
    counts = {c: sum(it["category"] == c for it in items) for c in ("meta", "knowledge", "math", "harmful")}
    print(f"{path.name}: {len(items)} prompts ({', '.join(f'{c} {n}' for c, n in counts.items())}), "
          f"{args.max_new_tokens} new tokens\n")
    cats = [c for c in BENIGN if counts[c]]
    head = f"| setting | {' | '.join(COLS)} | {' | '.join(c + ' acc.' for c in cats)} | s |"
    print(head)
    print("|" + "---|" * (len(COLS) + len(cats) + 2))
    for name, kw in settings:
        t0 = time.perf_counter()
        seeds = range(args.seeds) if kw.get("temperature", 0) > 0 else [None]
        runs = [evaluate_chat(model, tok, items, max_new_tokens=args.max_new_tokens, rng=s, **kw) for s in seeds]
        secs = time.perf_counter() - t0
        row = [np.mean([r[k] for r in runs]) for k in COLS]
        row += [np.mean([r["by_category"][c]["acceptable"] for r in runs]) for c in cats]
        print(f"| {name} | " + " | ".join(f"{v:.0%}" for v in row) + f" | {secs:.0f} |", flush=True)
        for r in runs[0]["replies"][:args.show]:
            print(f"    [{r['category']}] {r['prompt']} -> {r['reply']}{'' if r['acceptable'] else '  ✗'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
