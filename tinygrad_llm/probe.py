"""The copy probe: can the model repeat digits it has just read? And the facts probe: does it
know the single-digit sums that every worked reply chains?

In-context copying (an induction head: "find where the current token appeared before and
predict what followed it there") is what a model needs to restate "72 加 19" as 72 + 19
before working it. The probe measures it directly: a phrasing that training never used
holds a random digit string twice,

    号码是 4 8 1 0 5 3，再说一遍，号码是 4 8 1 0 5 3。
                                          ^ ^ ^ ^ ^  scored: digits 2..n of the repeat

and we score the model's greedy next-token prediction for digits 2..n of the repeat (the
first digit of the repeat could come from the phrasing alone). A model that does not copy
is at chance, 10%; one that copies is near 100%.

The phrasings below are the probe's own: data/drills.py's copy drills use other markers,
and tests/test_probe.py checks that the bundled pretraining text never holds a probe phrasing,
so the figure measures the general mechanism, not a memorised template.

The facts probe scores all 100 sums a + b (a, b = 0..9) in the worked replies' own format,
"…先算个位，7 + 8 = 15", teacher-forced: a fact counts when every digit of its sum is the
model's greedy prediction. Every two-digit addition a model works is two such facts (plus
copying), so this figure says how much of the table its worked sums can rely on.
"""
from __future__ import annotations

import numpy as np

from .nn import evaluating

# {d} is the digit string; each phrasing states it once, then asks for it again.
PROBE_TEMPLATES = (
    "号码是{d}，再说一遍，号码是{d}。",
    "她把卡号{d}抄在纸上，又念了一次：{d}。",
    "快递单上写着{d}；核对后确认单号为{d}。",
    "口令{d}，收到，口令{d}，完毕。",
)


def probe_strings(n: int, seed: int = 0, min_digits: int = 5, max_digits: int = 8):
    """n probe texts -> list of (text, [character indices scored]) cycling through the phrasings."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = "".join(str(x) for x in rng.integers(0, 10, rng.integers(min_digits, max_digits + 1)))
        tmpl = PROBE_TEMPLATES[i % len(PROBE_TEMPLATES)]
        text = tmpl.format(d=d)
        second = tmpl.index("{d}", tmpl.index("{d}") + 3) + len(d) - 3   # where the repeat starts
        out.append((text, list(range(second + 1, second + len(d)))))      # digits 2..n of the repeat
    return out


def scored_hits(model, tok, items, batch: int) -> list[np.ndarray]:
    """For each (text, [character indices]) item, whether the model's greedy (argmax) prediction
    of each scored character is right -> one bool array per item. Teacher-forced, right-padded
    batches (positions start at 0), dropout off, no graph; character index == token index
    (char-level tokenizer)."""
    out = []
    with evaluating(model):
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            ids = [tok.encode(text, allow_special=False) for text, _ in chunk]
            x = np.zeros((len(ids), max(len(r) for r in ids)), np.int64)
            for b, row in enumerate(ids):
                x[b, :len(row)] = row
            pred = model(x)[0].data.argmax(-1)                 # (B, T): prediction of token t + 1
            out += [np.array([pred[b, t - 1] == ids[b][t] for t in scored]) for b, (_, scored) in enumerate(chunk)]
    return out


def copy_probe(model, tok, n: int = 96, seed: int = 0, batch: int = 32) -> dict:
    """Accuracy of predicting digits 2..n of a just-read random digit string, in phrasings
    training never used -> {"copy_acc": overall, "by_template": [acc per phrasing]}."""
    hits = scored_hits(model, tok, probe_strings(n, seed), batch)
    k = len(PROBE_TEMPLATES)                                   # item i uses phrasing i % k
    right = [sum(h.sum() for h in hits[j::k]) for j in range(k)]
    total = [sum(h.size for h in hits[j::k]) for j in range(k)]
    return {"copy_acc": float(sum(right) / sum(total)), "by_template": [r / t for r, t in zip(right, total)]}


def facts_strings(seed: int = 0):
    """The 100 facts probe texts -> list of (text, [character indices scored]): the sum a + b in a
    worked reply's first step, after a restated equation whose ones digits are a and b."""
    rng = np.random.default_rng(seed)
    out = []
    for a in range(10):
        for b in range(10):
            x, y = 10 * int(rng.integers(1, 5)) + a, 10 * int(rng.integers(1, 5)) + b
            head = f"{x} + {y}：先算个位，{a} + {b} = "
            out.append((head + f"{a + b}。", list(range(len(head), len(head) + len(str(a + b))))))
    return out


def facts_probe(model, tok, seed: int = 0, batch: int = 50) -> float:
    """Share of the 100 single-digit sums whose every digit the model predicts (greedy,
    teacher-forced)."""
    hits = scored_hits(model, tok, facts_strings(seed), batch)
    return sum(bool(h.all()) for h in hits) / len(hits)
