"""Teacher-forced log-probabilities of given tokens under a model: how PPO, GRPO and DPO score
the policy and its reference, and how best-of-n reranking (rerank.py) scores a reply.

    logp = token_logprobs(model, x, y)              # (B, L) Tensor, with a graph when grad is on
    ref = logprobs_no_grad(ref_model, x, y)          # (B, L) array, dropout off, no graph
"""
from __future__ import annotations

import numpy as np

from . import engine as E
from .engine import Tensor
from .nn import evaluating


def token_logprobs(model, x, y, temperature: float = 1.0, mask=None) -> Tensor:
    """log p(y_t | x_<=t) under softmax(logits / temperature): (B, L) Tensor (with a graph
    when grad mode is on). Uses the fused cross-entropy: logp = -CE(reduction="none").
    mask (B, L): only the positions with mask > 0 are computed (the lm_head on those rows,
    GPT.head_rows), the others read 0."""
    if mask is None:
        logits, _ = model(x)
        targets = y
    else:
        logits, rows = model.head_rows(model.hidden_states(x), mask)
        targets = np.asarray(y).reshape(-1)[rows]
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    logp = -E.cross_entropy(logits, targets, reduction="none")
    return logp if mask is None else E.scatter(logp, rows, x.size).reshape(*x.shape)


def logprobs_no_grad(model, x, y, temperature: float = 1.0, mask=None) -> np.ndarray:
    """Same as token_logprobs, evaluated with dropout off and no graph."""
    with evaluating(model):
        return token_logprobs(model, x, y, temperature, mask).data
