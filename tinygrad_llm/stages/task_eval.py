"""The held-out evaluation on verifiable tasks (data/rlvf_val.json): greedy accuracy overall,
per type and per kind, and pass@k from sampled replies. RLVF reports it before and after
training; SFT reports it too, since it is RLVF's starting point."""
from __future__ import annotations

from math import comb

import numpy as np

from .policy import rollouts_in_chunks
from .verifiers import verify_task

PASS_KS = (1, 4)   # pass@k reported by evaluate_tasks()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def evaluate_tasks(model, tok, tasks, samples: int = 0, *, max_new_tokens: int,
                   temperature: float = 1.0, batch: int = 128, seed: int = 0) -> dict:
    """Greedy accuracy (overall, per type, per kind) and, with `samples` > 0, pass@k for k in
    PASS_KS from that many sampled replies per task (the same draws for every model: seed)."""
    def generate(n, temp, rng) -> list[str]:
        return [t for ro in rollouts_in_chunks(model, tok, [t["prompt"] for t in tasks], samples=n, temperature=temp,
                                               max_new_tokens=max_new_tokens, batch=batch, rng=rng) for t in ro.texts]

    greedy = generate(1, 0.0, None)
    ok = np.array([verify_task(t, r) for t, r in zip(tasks, greedy)], dtype=bool)
    types = np.array([t["type"] for t in tasks])
    out = {"accuracy": float(ok.mean()), "n": len(tasks), "replies": greedy}
    for typ in ("math", "logic"):
        if (types == typ).any():
            out[f"{typ}_accuracy"] = float(ok[types == typ].mean())
    kinds = np.array([str(t.get("kind", t["type"])) for t in tasks])  # generated data tags a kind
    out["by_kind"] = {str(k): float(ok[kinds == k].mean()) for k in sorted(set(kinds))}
    if samples:
        texts = generate(samples, temperature, np.random.default_rng(seed))
        hits = np.array([verify_task(t, r) for t, r in zip([t for t in tasks for _ in range(samples)], texts)])
        counts = hits.reshape(len(tasks), samples).sum(1)
        for k in PASS_KS:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, int(cc), k) for cc in counts]))
    return out
