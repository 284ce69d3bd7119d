"""SFT items (sft_data.json, sft_val.json before the everyday chat is merged in; imported by generate.py).

The hand-written single-turn items (stratified by category) and multi-turn conversations of
data/src/, plus generated tasks (tasks.py) as single-turn items, with "explain your answer"
variants in the training split only.

Standard library only; deterministic given the random.Random passed in.
"""
import random

from tasks import EXPLAIN_MAKERS, sample_tasks

SFT_HAND_VAL_FRACTION = 0.12   # hand SFT items held out, stratified by category
N_MULTITURN_VAL = 3

# Generated task counts per kind. Families (for "spread evenly"): add, sub, mul, div, word_*, and the five logic kinds.
SFT_PLAN = {
    # about twice the previous release's counts: the everyday chat (data/chat.py) is ~3,800 items, and
    # the tasks must stay near 40% of the SFT set or their accuracy falls (bench/README.md)
    "train": {"add": 350, "sub": 350, "mul": 190, "div": 190, "word_add": 165, "word_sub": 165, "word_mul": 160,
              "weekday": 190, "syllogism": 260, "compare": 210, "parity": 190, "neighbor": 190},
    "val": {"add": 20, "sub": 20, "mul": 12, "div": 12, "word_add": 9, "word_sub": 9, "word_mul": 8,
            "weekday": 10, "syllogism": 14, "compare": 12, "parity": 12, "neighbor": 12},
}
EXPLAIN_PLAN = {"add": 14, "sub": 14, "syllogism": 12}   # "explain your answer" variants, train only


def split_stratified(rng, items, field, fraction):
    """(train, val): per value of item[field], hold out max(1, round(fraction * n)) items (none if n < 2)."""
    groups = {}
    for it in items:
        groups.setdefault(it.get(field, ""), []).append(it)
    train, val = [], []
    for name in sorted(groups):
        g = list(groups[name])
        rng.shuffle(g)
        k = max(1, round(fraction * len(g))) if len(g) >= 2 else 0
        val += g[:k]
        train += g[k:]
    return train, val


def sft_item(task):
    """Internal task -> SFT single-turn item (keeps kind, category and the private _wrong reply)."""
    return {"user": task["prompt"], "assistant": task["_reply"], "category": task["type"] + "_task",
            "kind": task["kind"], "_wrong": task["_wrong"]}


def build_sft(rng, src, pools, held_all):
    """(train, val) SFT items: hand + multi-turn + generated tasks (+ explain variants in train)."""
    hand_train, hand_val = split_stratified(rng, src["sft_hand"], "category", SFT_HAND_VAL_FRACTION)
    multi = list(src["sft_multiturn"])
    rng.shuffle(multi)
    multi_val, multi_train = multi[:N_MULTITURN_VAL], multi[N_MULTITURN_VAL:]
    seen = {it["user"] for it in src["sft_hand"]}
    val_rng = random.Random(rng.getrandbits(64))   # the val tasks do not move when training phrasings change
    gen_train = sample_tasks(rng, SFT_PLAN["train"], pools, "train", held_all, seen)
    explain = sample_tasks(rng, EXPLAIN_PLAN, pools, "train", held_all, seen, EXPLAIN_MAKERS)
    gen_val = sample_tasks(val_rng, SFT_PLAN["val"], pools, "val", held_all, seen)
    train = hand_train + multi_train + [sft_item(t) for t in gen_train + explain]
    val = hand_val + multi_val + [sft_item(t) for t in gen_val]
    rng.shuffle(train)
    val_rng.shuffle(val)
    return train, val
