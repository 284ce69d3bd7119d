"""Preference pairs the reward model makes for itself (synthetic_pairs: off-topic, looping and
slipped-digit rejects from held-in replies) and the baseline it must beat (length_rule): the
helpers of stages/reward_model.py, kept apart from the model and its training."""
from __future__ import annotations

import re

import numpy as np

from ..batches import first_turns


def length_rule(pairs) -> tuple[float, dict]:
    """The baseline a reward model must beat: prefer the longer reply (characters; a tie counts
    one half) -> (accuracy over the pairs, accuracy per "kind")."""
    hits = np.array([1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"])
                     else 0.0 for p in pairs])
    kinds = [p.get("kind", "?") for p in pairs]
    return float(hits.mean()), {k: float(hits[[i for i, q in enumerate(kinds) if q == k]].mean()) for k in sorted(set(kinds))}


_EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
        "÷": lambda a, b: a // b if b and a % b == 0 else None}


def slip(reply: str, rng) -> str | None:
    """The reply with one of its correct equations ("7 + 8 = 15") stating a result off by one
    of the same length ("7 + 8 = 16"), or None if it has no correct equation."""
    ok = [m for m in _EQUATION.finditer(reply) if _OPS[m[2]](int(m[1]), int(m[3])) == int(m[4])]
    if not ok:
        return None
    m = ok[int(rng.integers(len(ok)))]
    z = int(m[4])
    options = [w for w in (z - 1, z + 1) if w >= 0 and len(str(w)) == len(m[4])]   # same length
    wrong = options[int(rng.integers(len(options)))]
    return reply[:m.start(4)] + str(wrong) + reply[m.end(4):]


def synthetic_pairs(replies, n_mismatch: int, n_loop: int, rng, n_slip: int = 0) -> list[dict]:
    """Preference pairs made from held-in (prompt, reply) examples, for the ways a sampling
    LM goes wrong that 750 labelled pairs teach too thinly (and PPO would exploit):
      mismatch: chosen = the reply to this prompt, rejected = the reply to another prompt
                (the labelled off-topic rejects are mostly of another *kind* than the prompt,
                so alone they let the RM score a reply without reading the prompt);
      loop:     chosen = the reply, rejected = a fragment of it repeated ("...，...，...");
      slip:     chosen = a reply with arithmetic, rejected = the same with one wrong fact
                ("7 + 8 = 16"): checkable without the question, so learnable by a model that
                cannot yet compare a result with its question.
    -> [{"prompt", "chosen", "rejected"}], n_mismatch + n_loop + n_slip of them (fewer if the
    pool has no two different replies, or no reply with a correct equation)."""
    out = []
    for _ in range(100 * n_mismatch):              # bounded: a pool of one reply text yields nothing
        if len(out) == n_mismatch:
            break
        a, b = rng.integers(0, len(replies), 2)
        if replies[a][1] != replies[b][1]:         # same text under two prompts: no preference
            out.append({"prompt": replies[a][0], "chosen": replies[a][1], "rejected": replies[b][1]})
    for a in rng.integers(0, len(replies), n_loop) if replies else []:
        prompt, reply = replies[a]
        k = int(rng.integers(2, max(3, min(8, len(reply) // 2) + 1)))       # fragment of 2..8 characters
        s = int(rng.integers(0, max(1, len(reply) - k)))
        loop = "，".join([reply[s:s + k]] * max(3, len(reply) // (k + 1) + 1)) + "。"
        if loop != reply:
            out.append({"prompt": prompt, "chosen": reply, "rejected": loop})
    with_eq = [i for i, (_, r) in enumerate(replies) if _EQUATION.search(r)] if n_slip else []
    for a in rng.choice(with_eq, n_slip) if with_eq else []:
        prompt, reply = replies[a]
        bad = slip(reply, rng)
        if bad is not None:
            out.append({"prompt": prompt, "chosen": reply, "rejected": bad})
    return out


def sft_replies(convs) -> list[tuple[str, str]]:
    """(first user turn, the assistant reply to it) of each SFT conversation that has both."""
    return [(u, r) for u, r in map(first_turns, convs) if u is not None and r is not None]
