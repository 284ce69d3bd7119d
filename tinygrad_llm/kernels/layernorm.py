"""LayerNorm over the last axis of (N, C) rows, biased variance like PyTorch; llm.c's layernorm
pair: the forward saves mean and rstd (N,) for the backward.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import row_dot, row_sum
from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def layernorm_fwd_ref(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> y (N, C), mean (N,), rstd (N,) saved for backward."""
    mean = x.mean(-1)
    xc = x - mean[:, None]
    rstd = 1 / np.sqrt((xc * xc).mean(-1) + x.dtype.type(eps))
    y = xc * rstd[:, None]
    y *= w
    y += b
    return y, mean, rstd


def layernorm_bwd_ref(dy, x, w, mean, rstd):
    """dy, x (N, C), w (C,), mean, rstd (N,) -> dx (N, C), dw (C,), db (C,)."""
    norm = (x - mean[:, None]) * rstd[:, None]  # (N, C) the normalized input
    dnorm = dy * w
    # dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)); reference: llm.c
    dx = dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True)
    dx *= rstd[:, None]
    return dx, (dy * norm).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures


@njit(cache=True, fastmath=False, error_model="numpy")
def _layernorm_row(x, w, b, y, eps):
    """x, w, b, y: (C,) -> y = (x - mean) * rstd * w + b; returns (mean, rstd)."""
    dt, C = x.dtype.type, x.shape[0]
    mu = dt(row_sum(x, C) / C)  # pass 1: mean
    s0 = s1 = s2 = s3 = 0.0  # pass 2: squared deviations, 4 float64 accumulators
    cb = C // 4 * 4
    for j in range(0, cb, 4):
        d0, d1, d2, d3 = x[j] - mu, x[j + 1] - mu, x[j + 2] - mu, x[j + 3] - mu
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
    var = (s0 + s1) + (s2 + s3)
    for j in range(cb, C):
        var += (x[j] - mu) * (x[j] - mu)
    rs = dt(1.0 / math.sqrt(var / C + eps))
    for j in range(C):  # pass 3: normalize, scale, shift
        y[j] = (x[j] - mu) * rs * w[j] + b[j]
    return mu, rs


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _layernorm_fwd_kernel(x, w, b, eps, y, mean, rstd):
    for r in prange(x.shape[0]):
        mean[r], rstd[r] = _layernorm_row(x[r], w, b, y[r], eps)


def layernorm_fwd_nb(x, w, b, eps):
    """x (N, C), w, b (C,) -> y, mean, rstd; prange over rows, two-pass variance."""
    y, mean, rstd = np.empty(x.shape, x.dtype), np.empty(len(x), x.dtype), np.empty(len(x), x.dtype)
    _layernorm_fwd_kernel(x, w, b, eps, y, mean, rstd)
    return y, mean, rstd


@njit(cache=True, fastmath=False, error_model="numpy")
def _layernorm_bwd_row(dy, x, w, mu, rs, dx, dw, db):
    """dy, x, w, dx: (C,); dw, db: (C,) float64 partial sums this row adds into."""
    dt, C = x.dtype.type, x.shape[0]
    # pass 1: the two row means of the backward, mean(dnorm) and mean(dnorm * norm)
    g1 = dt(row_dot(dy, w, C) / C)
    s0 = s1 = s2 = s3 = 0.0
    cb = C // 4 * 4
    for j in range(0, cb, 4):
        s0 += dy[j] * w[j] * ((x[j] - mu) * rs)
        s1 += dy[j + 1] * w[j + 1] * ((x[j + 1] - mu) * rs)
        s2 += dy[j + 2] * w[j + 2] * ((x[j + 2] - mu) * rs)
        s3 += dy[j + 3] * w[j + 3] * ((x[j + 3] - mu) * rs)
    s = (s0 + s1) + (s2 + s3)
    for j in range(cb, C):
        s += dy[j] * w[j] * ((x[j] - mu) * rs)
    g2 = dt(s / C)
    # pass 2: dx, and this row's share of dw and db
    for j in range(C):
        norm = (x[j] - mu) * rs
        dx[j] = (dy[j] * w[j] - g1 - norm * g2) * rs
        dw[j] += dy[j] * norm
        db[j] += dy[j]


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _layernorm_bwd_kernel(dy, x, w, mean, rstd, dx, dwp, dbp):
    N, nblk = x.shape[0], dwp.shape[0]
    for blk in prange(nblk):  # block blk owns rows [lo, hi) and row blk of dwp, dbp
        for r in range(blk * N // nblk, (blk + 1) * N // nblk):
            _layernorm_bwd_row(dy[r], x[r], w, mean[r], rstd[r], dx[r], dwp[blk], dbp[blk])


def layernorm_bwd_nb(dy, x, w, mean, rstd):
    """Same contract as layernorm_bwd_ref; prange over 16 row blocks, dw/db reduced after."""
    dx = np.empty(x.shape, x.dtype)
    # a fixed block count, so the result does not depend on the thread count; float64 partials
    dwp = np.zeros((min(len(x), 16), x.shape[1]))
    dbp = np.zeros_like(dwp)
    _layernorm_bwd_kernel(dy, x, w, mean, rstd, dx, dwp, dbp)
    return dx, dwp.sum(0).astype(x.dtype), dbp.sum(0).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def layernorm_fwd(x, w, b, eps):
    """x (N, C), w, b (C,) -> y (N, C), mean (N,), rstd (N,)."""
    f = layernorm_fwd_nb if use_numba("layernorm") else layernorm_fwd_ref
    return f(x, w, b, float(eps))


def layernorm_bwd(dy, x, w, mean, rstd):
    """-> dx (N, C), dw (C,), db (C,)."""
    f = layernorm_bwd_nb if use_numba("layernorm") else layernorm_bwd_ref
    return f(dy, x, w, mean, rstd)
