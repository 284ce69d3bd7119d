"""What RLVF's held-out gain needs: a diagnostic that trains on what the product never may.

Writes a copy of data/ whose rlvf_data.json holds one of three training sets, each measured on
the unchanged held-out rlvf_val.json (bench/README.md, "RLVF, longer"):

  items      the held-out tasks themselves (rlvf_val.json as the training set)
  phrasings  new tasks in the held-out phrasings, on training keys (operands)
  keys       new tasks in the training phrasings, on the held-out keys

The last two exclude the held-out prompts themselves, and keep RLVF_PLAN's training counts.

    python bench/rlvf_transfer.py --mode phrasings --out DIR
    python train.py --stage rlvf --data-dir DIR --ckpt-dir CK --rlvf.eval_every=30 --rlvf.num_iterations=60
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

import generate as G  # noqa: E402
from keys import build_key_spaces, reserve_held_out, source_keys, split_pools  # noqa: E402
from rlvf import RLVF_PLAN  # noqa: E402
from tasks import MAKERS  # noqa: E402


def crossed_tasks(key_split: str, phrasing_split: str, exclude: set, seed: int = 7) -> list[dict]:
    """RLVF_PLAN["train"]'s counts of tasks on keys of `key_split`, worded in `phrasing_split`'s
    phrasings, none of whose prompts is in `exclude`."""
    src = G.load_sources(G.DATA_DIR / "src")
    spaces = build_key_spaces()
    held = reserve_held_out(spaces, source_keys(src), G.rng_for(G.SEED, "held_out"))   # as generate.py does
    pools = split_pools(spaces, held)
    rng, seen, out = random.Random(seed), set(exclude), []
    for kind, n in RLVF_PLAN["train"].items():
        made = attempts = 0
        while made < n and attempts < 50 * n:
            attempts += 1
            task = MAKERS[kind](rng, rng.choice(pools[kind][key_split]), made, phrasing_split)
            if task["prompt"] not in seen:
                seen.add(task["prompt"])
                out.append(G.public(task))
                made += 1
    rng.shuffle(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("items", "phrasings", "keys"), required=True)
    ap.add_argument("--out", required=True, help="the data folder to write (a copy of data/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out}: exists; give a new folder", file=sys.stderr)
        return 2
    shutil.copytree(ROOT / "data", out)
    val = json.loads((out / "rlvf_val.json").read_text(encoding="utf-8"))
    if args.mode == "items":
        train = val
    else:
        splits = ("train", "val") if args.mode == "phrasings" else ("val", "train")
        train = crossed_tasks(*splits, exclude={t["prompt"] for t in val})
    (out / "rlvf_data.json").write_text(json.dumps(train, ensure_ascii=False, indent=0), encoding="utf-8")
    print(f"{out / 'rlvf_data.json'}: {len(train)} tasks ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
