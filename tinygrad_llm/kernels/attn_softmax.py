"""Causal attention softmax: p = softmax(scale * att) over each query's visible keys, key j >
query i masked to exactly 0, and its backward. att holds the raw q @ k^T scores of a block of
queries (the last Tq of Tk positions), as the engine's blocked attention computes them.
"""
import numpy as np
from numba import njit, prange

from ._helpers import softmax_bwd_row, softmax_row
from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def attn_softmax_fwd_ref(att, scale):
    """att: (B, NH, Tq, Tk) raw q @ k^T, the queries being the last Tq of Tk positions
    -> p (B, NH, Tq, Tk), zero above the (bottom-right) diagonal; Tq == Tk is plain causal."""
    Tq, Tk = att.shape[-2:]
    causal = np.tri(Tq, Tk, Tk - Tq, dtype=bool)  # True where key j <= the query's position
    s = np.where(causal, att * att.dtype.type(scale), att.dtype.type(-np.inf))
    s -= s.max(-1, keepdims=True)  # the diagonal is always valid, so every max is finite
    np.exp(s, out=s)  # exp(-inf) = 0 exactly for the masked keys
    s /= s.sum(-1, keepdims=True)
    return s


def attn_softmax_bwd_ref(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk) = scale * p * (dp - sum(p * dp, -1))."""
    # masked entries have p == 0, so their gradient is 0 without an explicit mask
    return p.dtype.type(scale) * p * (dp - (p * dp).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures
# (att, p: (B*NH*Tq, Tk) views, rows (b, h, i); each row only touches its visible keys)


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attn_softmax_fwd_kernel(att, p, Tq, scale):
    off = att.shape[1] - Tq  # att, p: (B*NH*Tq, Tk) views, rows (b, h, i); query i is at off + i
    sc = att.dtype.type(scale)
    for r in prange(att.shape[0]):
        softmax_row(att[r], p[r], off + r % Tq + 1, sc)  # keys 0..off+i are visible


def attn_softmax_fwd_nb(att, scale):
    """att: (B, NH, Tq, Tk) -> p (B, NH, Tq, Tk); each row only touches its visible keys."""
    if not scale > 0:
        raise ValueError(f"attn_softmax_fwd_nb needs scale > 0, got {scale}")
    Tq, Tk = att.shape[-2:]
    if Tq > Tk:
        raise ValueError(f"attn_softmax_fwd_nb: {Tq} queries but only {Tk} keys")
    p = np.empty(att.shape, att.dtype)
    _attn_softmax_fwd_kernel(att.reshape(-1, Tk), p.reshape(-1, Tk), Tq, scale)
    return p


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attn_softmax_bwd_kernel(p, dp, datt, Tq, scale):
    off = p.shape[1] - Tq  # (B*NH*Tq, Tk) views
    sc = p.dtype.type(scale)
    for r in prange(p.shape[0]):
        softmax_bwd_row(p[r], dp[r], datt[r], off + r % Tq + 1, sc)


def attn_softmax_bwd_nb(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk); masked entries written as 0 directly."""
    datt = np.empty(p.shape, p.dtype)
    Tq, Tk = p.shape[-2:]
    _attn_softmax_bwd_kernel(p.reshape(-1, Tk), dp.reshape(-1, Tk), datt.reshape(-1, Tk), Tq, scale)
    return datt


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def attn_softmax_fwd(att, scale):
    """att: (B, NH, Tq, Tk) -> causal softmax(scale * att), queries the last Tq positions."""
    f = attn_softmax_fwd_nb if use_numba("attn_softmax") else attn_softmax_fwd_ref
    return f(att, float(scale))


def attn_softmax_bwd(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk)."""
    f = attn_softmax_bwd_nb if use_numba("attn_softmax") else attn_softmax_bwd_ref
    return f(p, dp, float(scale))
