#!/usr/bin/env python3
"""Build MyLLM's bundled data files from the hand-written sources in data/src/ plus seeded templates.

    python data/generate.py [--seed 1234] [--out data/] [--src data/src/]

Standard library only, deterministic: the same seed and the same sources give byte-identical files.
This file reads the sources, runs the parts in order (each with its own random stream) and writes
the files; each part is a module of its own, in the order they are used:

    numerals.py   Chinese numerals 0..100
    keys.py       problem keys and the held-out discipline: ~15% of each kind's keys reserved for
                  the *_val files before anything is generated; no training text may touch them
                  (except the fact tables': taught in full, held out by phrasing only)
    phrasings.py  the tasks' question templates, training and held-out
    tasks.py      math and logic tasks from keys, in the house style (reply + a wrong reply)
    drills.py     reading drills and copy spans
    pretrain.py   pretrain_data.txt, pretrain_val.txt, pretrain_drills.txt
    sft.py        sft_data.json, sft_val.json
    reward.py     reward_data.json, reward_val.json
    rlvf.py       rlvf_data.json, rlvf_val.json
    chat.py       everyday chat, merged into pretraining, SFT and reward data; chat_eval.json
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat as chat_data   # noqa: E402  (data/chat.py: everyday conversation, see build_chat)
from keys import (FACT_KINDS, banned_keys, build_key_spaces, infer_arith_keys, reserve_held_out, source_keys,  # noqa: E402
                  split_pools, touches, warn)
from pretrain import build_pretrain   # noqa: E402
from reward import build_reward   # noqa: E402
from rlvf import build_rlvf   # noqa: E402
from sft import build_sft   # noqa: E402
from tasks import chat_math_reply   # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
SEED = 1234
EXPECTED_PROSE_FILES, EXPECTED_SEED_TASKS = 23, 40


def rng_for(seed, name):
    """An independent, reproducible random stream per part (str seeds hash with SHA-512, not hash())."""
    return random.Random(f"{seed}:{name}")


# ----------------------------------------------------------------------------- sources, output

def load_json_list(path, required):
    """A JSON list of dicts with the required fields; [] with a warning if missing, bad items skipped."""
    if not path.exists():
        warn(f"{path} is missing; skipped")
        return []
    items = json.loads(path.read_text(encoding="utf-8"))
    good = [it for it in items if isinstance(it, dict) and all(isinstance(it.get(f), (str, list)) for f in required)]
    if len(good) < len(items):
        warn(f"{path}: skipped {len(items) - len(good)} malformed items")
    return good


def load_sources(src_dir):
    """All hand-written sources (missing ones are empty, with a warning)."""
    src_dir = Path(src_dir)
    files = sorted((src_dir / "prose").glob("*.txt"))
    if len(files) != EXPECTED_PROSE_FILES:
        warn(f"found {len(files)} prose files in {src_dir / 'prose'}, expected {EXPECTED_PROSE_FILES}")
    src = {"prose": [(f.name, [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]) for f in files],
           "sft_hand": load_json_list(src_dir / "sft_hand.json", ["user", "assistant"]),
           "sft_multiturn": load_json_list(src_dir / "sft_multiturn.json", ["messages"]),
           "reward_hand": load_json_list(src_dir / "reward_hand.json", ["prompt", "chosen", "rejected"]),
           "rlvf_seed": load_json_list(src_dir / "rlvf_seed.json", ["type", "prompt", "expected_answer"])}
    if len(src["rlvf_seed"]) != EXPECTED_SEED_TASKS:
        warn(f"found {len(src['rlvf_seed'])} RLVF seed tasks, expected {EXPECTED_SEED_TASKS}")
    return src


def public(item):
    """Drop private (underscore) fields before writing."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def generate_all(seed=SEED, src_dir=DATA_DIR / "src", out_dir=DATA_DIR):
    """Build and write every data file. Returns {"held_out": kind -> set of keys (the val tasks' keys),
    "banned": the held-out keys no training text contains (not the fact tables'), "summary": [(file, items, chars)]}."""
    src = load_sources(src_dir)
    spaces = build_key_spaces()
    # 1. Reserve the held-out keys before anything else is generated.
    held = reserve_held_out(spaces, source_keys(src), rng_for(seed, "held_out"))
    banned = banned_keys(held)
    pools = split_pools(spaces, held)
    # 2. Pretrain text, SFT, reward pairs, RLVF tasks; each part has its own random stream.
    pre_train, pre_val, pre_drills = build_pretrain(rng_for(seed, "pretrain"), src["prose"], pools, banned,
                                                    rng_for(seed, "drills"))
    sft_train, sft_val = build_sft(rng_for(seed, "sft"), src, pools, banned)
    reward = build_reward(rng_for(seed, "reward"), src["reward_hand"], sft_train, sft_val, banned)
    rlvf_train, rlvf_val = build_rlvf(rng_for(seed, "rlvf"), src["rlvf_seed"], pools, banned)
    # 2b. Everyday chat (data/chat.py) with its own streams, merged in last so the rest stays unchanged.
    chat = chat_data.build_chat(rng_for(seed, "chat"), Path(src_dir) / "chat", pools, chat_math_reply,
                                clean=lambda q, a: not (touches(q + "\n" + a, banned) or infer_arith_keys(q, a) & banned))
    mix = rng_for(seed, "chat_mix")
    pre_train = "\n".join(chat_data.insert_randomly(mix, pre_train.splitlines(), chat["pretrain_train"])) + "\n"
    pre_val = "\n".join(chat_data.insert_randomly(mix, pre_val.splitlines(), chat["pretrain_val"])) + "\n"
    sft_train = chat_data.insert_randomly(mix, sft_train, chat["sft_train"])
    sft_val = chat_data.insert_randomly(mix, sft_val, chat["sft_val"])
    reward = {split: chat_data.insert_randomly(mix, reward[split], chat["reward_" + split]) for split in reward}
    # 3. Write.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"pretrain_data.txt": pre_train, "pretrain_val.txt": pre_val, "pretrain_drills.txt": pre_drills}
    for name, items in (("sft_data.json", sft_train), ("sft_val.json", sft_val), ("reward_data.json", reward["train"]),
                        ("reward_val.json", reward["val"]), ("rlvf_data.json", rlvf_train), ("rlvf_val.json", rlvf_val),
                        ("chat_eval.json", chat["eval"])):
        # one compact item per line: readable, diffable, and smaller than indented JSON
        outputs[name] = "[\n" + ",\n".join(json.dumps(public(it), ensure_ascii=False, separators=(",", ":"))
                                             for it in items) + "\n]\n"
    summary = []
    for name, text in outputs.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        n_items = text.count("\n") if name.endswith(".txt") else len(json.loads(text))
        summary.append((name, n_items, len(text)))
    return {"held_out": held, "banned": banned, "summary": summary}


def main(argv=None):
    """CLI: write the data files and print a summary table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", default=str(DATA_DIR), help="output directory (default: the data/ folder)")
    ap.add_argument("--src", default=str(DATA_DIR / "src"), help="hand-written sources")
    args = ap.parse_args(argv)
    result = generate_all(args.seed, args.src, args.out)
    print(f"{'file':<20}{'items':>8}{'characters':>12}")
    for name, n_items, n_chars in result["summary"]:
        print(f"{name:<20}{n_items:>8}{n_chars:>12,}")
    print("held-out keys: " + ", ".join(f"{k} {len(v)}" + (" (taught: a fact table)" if k in FACT_KINDS else "")
                                        for k, v in sorted(result["held_out"].items())))


if __name__ == "__main__":
    main()
