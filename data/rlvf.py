"""RLVF tasks (rlvf_data.json, rlvf_val.json; imported by generate.py).

The hand-written seed tasks of data/src/rlvf_seed.json plus generated tasks (tasks.py) on training
keys; the val split holds generated tasks on held-out keys only (any key of a fact table, keys.py),
worded in held-out phrasings only.

Standard library only; deterministic given the random.Random passed in.
"""
import random

from tasks import sample_tasks

RLVF_PLAN = {
    "train": {"add": 200, "sub": 200, "mul": 200, "div": 200, "word_add": 67, "word_sub": 67, "word_mul": 66,
              "weekday": 200, "syllogism": 200, "compare": 200, "parity": 200, "neighbor": 200},
    "val": {"add": 24, "sub": 24, "mul": 24, "div": 24, "word_add": 8, "word_sub": 8, "word_mul": 8,
            "weekday": 24, "syllogism": 24, "compare": 24, "parity": 24, "neighbor": 24},
}


def build_rlvf(rng, seed_tasks, pools, held_all):
    """(train, val) RLVF tasks, each split shuffled."""
    seen = {t["prompt"] for t in seed_tasks}
    val_rng = random.Random(rng.getrandbits(64))   # the val tasks do not move when training phrasings change
    train = list(seed_tasks) + sample_tasks(rng, RLVF_PLAN["train"], pools, "train", held_all, seen)
    val = sample_tasks(val_rng, RLVF_PLAN["val"], pools, "val", held_all, seen)
    rng.shuffle(train)   # generated tasks come out grouped by kind; a sequential reader must see a mix
    val_rng.shuffle(val)
    return train, val
