"""Fused layers, each one op with a hand-written backward over kernels or single GEMMs: linear,
lora_linear, embedding, dropout (and the seeded generator its masks come from), layer_norm, cross_entropy.
Causal attention, RoPE and smeared keys are in attention.py.
"""
from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..runtime import mm
from .tensor import Tensor, op, op_output


@op
def linear(x: Tensor, w: Tensor, b: Tensor | None = None):
    """y = x @ W.T + b with W (out, in): one fused op so the weight gradient is a single GEMM.
    x: (..., in) -> (..., out)"""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight is {w.shape} (out, in)")
    x2 = x.data.reshape(-1, x.shape[-1])                      # (N, in)
    y = mm(x2, w.data.T, None if b is None else b.data)       # (N, out)
    parents = (x, w) if b is None else (x, w, b)
    out = op_output(y.reshape(*x.shape[:-1], w.shape[0]), parents)
    if out.requires_grad:
        def _backward(dout):
            d2 = dout.reshape(-1, w.shape[0])                 # (N, out)
            if x.requires_grad: x._accumulate(mm(d2, w.data).reshape(x.shape))
            if w.requires_grad: w._accumulate(mm(d2.T, x2))   # (out, in)
            if b is not None and b.requires_grad: b._accumulate(d2.sum(0))
        out._backward = _backward
    return out


@op
def lora_linear(x: Tensor, w: Tensor, b: Tensor | None, a: Tensor, bb: Tensor, scale: float):
    """y = x @ W.T + b + scale * (x @ A.T) @ B.T (LoRA, Hu et al. 2021), W (out, in), A (r, in),
    B (out, r). x: (..., in) -> (..., out). One op, one output array: backward keeps x and the
    (N, r) projection x A^T, not the base's and the adapter's (N, out) outputs apart."""
    if x.shape[-1] != w.shape[1] or a.shape != (bb.shape[1], w.shape[1]) or bb.shape[0] != w.shape[0]:
        raise ValueError(f"lora_linear: x {x.shape}, W {w.shape}, A {a.shape}, B {bb.shape} do not fit")
    x2 = x.data.reshape(-1, x.shape[-1])                      # (N, in)
    xa = mm(x2, a.data.T) * np.asarray(scale, x.dtype)        # (N, r), scaled once
    y = mm(x2, w.data.T, None if b is None else b.data) + mm(xa, bb.data.T)   # (N, out)
    parents = (x, w, a, bb) if b is None else (x, w, b, a, bb)
    out = op_output(y.reshape(*x.shape[:-1], w.shape[0]), parents)
    if out.requires_grad:
        def _backward(dout):
            d2 = dout.reshape(-1, w.shape[0])                 # (N, out)
            db2 = mm(d2, bb.data) * np.asarray(scale, d2.dtype)   # (N, r): d(x A^T), through B and the scale
            if x.requires_grad: x._accumulate((mm(d2, w.data) + mm(db2, a.data)).reshape(x.shape))
            if w.requires_grad: w._accumulate(mm(d2.T, x2))   # (out, in)
            if b is not None and b.requires_grad: b._accumulate(d2.sum(0))
            if a.requires_grad: a._accumulate(mm(db2.T, x2))  # (r, in)
            if bb.requires_grad: bb._accumulate(mm(d2.T, xa))  # (out, r)
        out._backward = _backward
    return out


@op
def embedding(weight: Tensor, idx) -> Tensor:
    """weight (V, C), idx int (...) -> (..., C); backward scatter-adds rows (repeats accumulate)."""
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(f"token id out of range [0, {weight.shape[0]}): min {idx.min()}, max {idx.max()}")
    out = op_output(weight.data[idx], (weight,))
    if out.requires_grad:
        def _backward(dout):
            weight._accumulate(K.embedding_bwd(idx.reshape(-1), dout.reshape(-1, weight.shape[1]), weight.shape[0]))
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# dropout and its generator: one seed per call, drawn from a generator that manual_seed resets
# and checkpoints save (get_rng_state / set_rng_state), so a resumed run drops the same units

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the RNG used by dropout."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng_state() -> dict:
    return _rng.bit_generator.state


def set_rng_state(state: dict) -> None:
    _rng.bit_generator.state = state


@op
def dropout(a: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero with probability p and scale by 1/(1-p); identity in eval. The mask
    is a hash of (seed, element index), one seed per call drawn from the engine's generator
    (manual_seed), so it does not depend on the thread count (kernels.dropout_fwd)."""
    if not training or p == 0.0:
        return a
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    y, keep = K.dropout_fwd(a.data, p, _rng.integers(0, 2**63))   # keep: uint8, a's shape
    out = op_output(y, (a,))
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(K.dropout_bwd(dout, keep, p))
    return out


# ----------------------------------------------------------------------------------------
# normalisation and the loss


@op
def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """x (..., C) normalised over C, then * w + b. Kernel caches mean and rstd for backward."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x.data.reshape(-1, C))
    y, mean_, rstd = K.layernorm_fwd(x2, w.data, b.data, eps)
    out = op_output(y.reshape(x.shape), (x, w, b))
    if out.requires_grad:
        def _backward(dout):
            dx, dw, db = K.layernorm_bwd(np.ascontiguousarray(dout.reshape(-1, C)), x2, w.data, mean_, rstd)
            if x.requires_grad: x._accumulate(dx.reshape(x.shape))
            if w.requires_grad: w._accumulate(dw)
            if b.requires_grad: b._accumulate(db)
        out._backward = _backward
    return out


@op
def cross_entropy(logits: Tensor, targets, mask=None, ignore_index: int | None = None,
                  reduction: str = "mean") -> Tensor:
    """Fused, stable log-softmax + NLL from logits (..., V) and int targets (...).

    mask (...) weights each position (0 = ignored); ignore_index does the same for a target
    value. reduction: "mean" (over positions with weight, i.e. sum / sum(mask)), "sum", or
    "none" (per-position losses, shape (...))."""
    V = logits.shape[-1]
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} does not match logits {logits.shape[:-1]}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")
    w = np.ones(targets.shape, dtype=logits.dtype)
    if mask is not None:
        w = w * np.asarray(mask.data if isinstance(mask, Tensor) else mask).astype(logits.dtype)
    t = targets.astype(np.int64).reshape(-1)
    if ignore_index is not None:
        ignored = t == ignore_index
        w = w * ~ignored.reshape(targets.shape)
        t = np.where(ignored, 0, t)
    if t.size and (t.min() < 0 or t.max() >= V):
        raise IndexError(f"cross_entropy: target id out of range [0, {V})")
    w = np.ascontiguousarray(w.reshape(-1))
    l2 = np.ascontiguousarray(logits.data.reshape(-1, V))
    losses, lse = K.ce_fwd(l2, t, w)
    denom = w.sum() if reduction == "mean" else 1.0
    if reduction == "none":
        data = losses.reshape(targets.shape)
    else:
        data = np.asarray(losses.sum() / np.maximum(denom, 1e-12), dtype=logits.dtype)
    out = op_output(data, (logits,))
    if out.requires_grad:
        def _backward(dout):
            if reduction == "none":
                dl = np.ascontiguousarray(dout.reshape(-1))
            else:
                dl = np.full(t.shape, dout / np.maximum(denom, 1e-12), dtype=logits.dtype)
            logits._accumulate(K.ce_bwd(l2, t, w, lse, dl).reshape(logits.shape))
        out._backward = _backward
    return out
