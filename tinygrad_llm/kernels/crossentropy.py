"""Cross-entropy over the vocabulary from logits (N, V), each row weighted by a mask (0 = the
row does not count): losses = mask * (logsumexp(x) - x[target]); the backward reuses the saved
logsumexp, dlogits = c * (softmax - onehot), c = dlosses * mask.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg, row_max, row_sum
from .backend import use_numba


def _check_targets(targets, V):
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"cross-entropy targets must lie in [0, {V})")


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def ce_fwd_ref(logits, targets, mask):
    """logits (N, V), targets (N,) int64, mask (N,) -> losses (N,), lse (N,) logsumexp."""
    _check_targets(targets, logits.shape[1])
    m = logits.max(-1)  # (N,)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    losses = mask * (lse - logits[np.arange(len(targets)), targets])
    return losses, lse


def ce_bwd_ref(logits, targets, mask, lse, dlosses):
    """... lse (N,), dlosses (N,) -> dlogits (N, V) = c * (softmax - onehot), c = dlosses*mask."""
    _check_targets(targets, logits.shape[1])
    dlogits = np.exp(logits - lse[:, None])  # softmax, from the saved logsumexp
    dlogits[np.arange(len(targets)), targets] -= 1
    dlogits *= (dlosses * mask)[:, None]
    return dlogits


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures


@njit(cache=True, fastmath=False, error_model="numpy")
def _logsumexp_row(x, buf, n):
    """x, buf: (>= n,) -> float64 logsumexp(x[:n]); buf is scratch for the exps."""
    m = row_max(x, n)
    for j in range(n):  # stored, not summed on the fly: a running sum would block SIMD
        buf[j] = exp_neg(x[j] - m)
    return m + math.log(row_sum(buf, n))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _ce_fwd_kernel(logits, targets, mask, losses, lse, buf):
    N, V = logits.shape
    nblk = buf.shape[0]  # row blocks, each with its own scratch row
    for blk in prange(nblk):
        for n in range(blk * N // nblk, (blk + 1) * N // nblk):
            lse[n] = _logsumexp_row(logits[n], buf[blk], V)
            losses[n] = mask[n] * (lse[n] - logits[n, targets[n]])  # same order as the ref


def ce_fwd_nb(logits, targets, mask):
    """logits (N, V), targets (N,), mask (N,) -> losses (N,), lse (N,); 2 sweeps per row."""
    _check_targets(targets, logits.shape[1])
    losses, lse = np.empty(len(logits), logits.dtype), np.empty(len(logits), logits.dtype)
    buf = np.empty((min(len(logits), 64), logits.shape[1]), logits.dtype)  # exps scratch
    _ce_fwd_kernel(logits, targets, mask, losses, lse, buf)
    return losses, lse


@njit(cache=True, fastmath=False, error_model="numpy")
def _ce_bwd_row(x, lse, c, t, dx):
    """x, dx: (V,) -> dx = c * (exp(x - lse) - onehot(t))."""
    if c == 0:  # masked rows (prompt tokens, padding): no exps to compute
        dx[:] = 0
        return
    # lse >= max(x) even after rounding, so every exp argument is <= 0
    for j in range(x.shape[0]):
        dx[j] = exp_neg(x[j] - lse) * c
    dx[t] = (exp_neg(x[t] - lse) - x.dtype.type(1)) * c  # same operations as the ref


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _ce_bwd_kernel(logits, targets, mask, lse, dlosses, dlogits):
    for n in prange(logits.shape[0]):
        _ce_bwd_row(logits[n], lse[n], dlosses[n] * mask[n], targets[n], dlogits[n])


def ce_bwd_nb(logits, targets, mask, lse, dlosses):
    """Same contract as ce_bwd_ref; one sweep per row."""
    _check_targets(targets, logits.shape[1])
    dlogits = np.empty(logits.shape, logits.dtype)
    _ce_bwd_kernel(logits, targets, mask, lse, dlosses, dlogits)
    return dlogits


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls


def ce_fwd(logits, targets, mask):
    """logits (N, V), targets (N,) int64, mask (N,) -> losses (N,), lse (N,)."""
    return (ce_fwd_nb if use_numba("ce") else ce_fwd_ref)(logits, targets, mask)


def ce_bwd(logits, targets, mask, lse, dlosses):
    """-> dlogits (N, V)."""
    return (ce_bwd_nb if use_numba("ce") else ce_bwd_ref)(logits, targets, mask, lse, dlosses)
