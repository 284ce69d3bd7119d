"""Greedy accuracy per task kind on a larger held-out draw than rlvf_val.json's 24 a kind.

A per-kind change between two SFT models on 24 tasks is mostly noise (bench/README.md, "Worked
comparisons, neighbours and weekdays"). This draws more tasks the same way data/generate.py draws
rlvf_val.json: held-out keys only, held-out phrasings only, none of rlvf_val.json's prompts; by
data/tasks.py's sample_tasks from its own seeded stream. Each checkpoint answers the same draw.

    python bench/held_out_tasks.py --checkpoint A/sft_final.safetensors --checkpoint B/sft_final.safetensors
    python bench/held_out_tasks.py --checkpoint CK --plan "neighbor=60,sub=120" --seed 7
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from tinygrad_llm.checkpoint import load_gpt  # noqa: E402
from tinygrad_llm.data import load_rlvf  # noqa: E402
from tinygrad_llm.stages.task_eval import evaluate_tasks  # noqa: E402

PLAN = "add=120,sub=120,compare=120,neighbor=60,parity=60,word_add=60,word_sub=60"


def draw(plan: dict, seed: int) -> list[dict]:
    """`plan[kind]` held-out tasks per kind, public fields only, none of rlvf_val.json's prompts."""
    import generate as g   # data/generate.py (standard library only)
    import keys as k
    from tasks import sample_tasks
    src = g.load_sources(g.DATA_DIR / "src")
    spaces = k.build_key_spaces()
    held = k.reserve_held_out(spaces, k.source_keys(src), g.rng_for(g.SEED, "held_out"))
    pools = k.split_pools(spaces, held)
    seen = {t["prompt"] for t in load_rlvf(ROOT / "data" / "rlvf_val.json")}
    tasks = sample_tasks(random.Random(seed), plan, pools, "val", k.banned_keys(held), seen)
    return [g.public(t) for t in tasks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="a GPT checkpoint (repeat to compare)")
    ap.add_argument("--plan", default=PLAN, help=f"kind=count,... (default {PLAN})")
    ap.add_argument("--seed", type=int, default=99, help="the draw's seed")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    args = ap.parse_args(argv)
    from tasks import MAKERS
    try:
        plan = {kind.strip(): int(n) for kind, n in (part.split("=") for part in args.plan.split(","))}
    except ValueError:
        sys.exit(f"error: --plan must read kind=count,..., got {args.plan!r}")
    if set(plan) - set(MAKERS):
        sys.exit(f"error: --plan: unknown kind(s) {sorted(set(plan) - set(MAKERS))}; kinds: {', '.join(MAKERS)}")
    tasks = draw(plan, args.seed)
    kinds = list(plan)
    print(f"{len(tasks)} held-out tasks (seed {args.seed}): " + ", ".join(f"{kd} {plan[kd]}" for kd in kinds))
    print("| checkpoint | all | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 2) + "|")
    for path in args.checkpoint:
        model, tok = load_gpt(path)
        res = evaluate_tasks(model, tok, tasks, max_new_tokens=args.max_new_tokens)
        cells = [f"{100 * res['by_kind'].get(kd, float('nan')):.0f}%" for kd in kinds]
        print(f"| {path} | {100 * res['accuracy']:.1f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
