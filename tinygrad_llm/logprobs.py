"""Teacher-forced log-probabilities of given tokens under a model: how PPO, GRPO and DPO score
the policy and its reference, and how best-of-n reranking (rerank.py) scores a reply.

    logp = token_logprobs(model, x, y)              # (B, L) Tensor, with a graph when grad is on
    ref = logprobs_no_grad(ref_model, x, y)          # (B, L) array, dropout off, no graph
    loss = masked_loss(model, x, y, mask)            # SFT's loss: the logits of the masked positions only
"""
from __future__ import annotations

import numpy as np

from . import engine as E
from .engine import Tensor
from .nn import evaluating


def head_rows(model, h: Tensor, mask) -> tuple[Tensor, np.ndarray]:
    """The model's tied lm_head on the positions with mask > 0 only: h (B, T, C), mask (B, T) ->
    (logits (N, V), rows (N,) indices into the flattened B * T positions). A loss that skips the
    prompt and the padding needs no more (on the SFT data 44% of a batch's positions count)."""
    B, T, C = h.shape
    mask = np.asarray(mask)
    if mask.shape != (B, T):
        raise ValueError(f"mask must be ({B}, {T}), got {mask.shape}")
    rows = np.flatnonzero(mask.reshape(-1) > 0)
    return E.linear(h.reshape(B * T, C)[rows], model.transformer.wte.weight), rows


def masked_loss(model, idx, targets, mask, positions=None, emb_noise=None) -> Tensor:
    """model(idx, targets, loss_mask=mask)[1], the mean cross-entropy over the positions with
    mask > 0 weighted by it, with the logits of those positions only (head_rows)."""
    logits, rows = head_rows(model, model.hidden_states(idx, positions, emb_noise=emb_noise), mask)
    w = np.asarray(mask).reshape(-1)[rows]
    return E.cross_entropy(logits, np.asarray(targets).reshape(-1)[rows], mask=w)


def token_logprobs(model, x, y, temperature: float = 1.0, mask=None) -> Tensor:
    """log p(y_t | x_<=t) under softmax(logits / temperature): (B, L) Tensor (with a graph
    when grad mode is on). Uses the fused cross-entropy: logp = -CE(reduction="none").
    mask (B, L): only the positions with mask > 0 are computed (the lm_head on those rows,
    head_rows), the others read 0."""
    if mask is None:
        logits, _ = model(x)
        targets = y
    else:
        logits, rows = head_rows(model, model.hidden_states(x), mask)
        targets = np.asarray(y).reshape(-1)[rows]
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    logp = -E.cross_entropy(logits, targets, reduction="none")
    return logp if mask is None else E.scatter(logp, rows, x.size).reshape(*x.shape)


def logprobs_no_grad(model, x, y, temperature: float = 1.0, mask=None) -> np.ndarray:
    """Same as token_logprobs, evaluated with dropout off and no graph."""
    with evaluating(model):
        return token_logprobs(model, x, y, temperature, mask).data
