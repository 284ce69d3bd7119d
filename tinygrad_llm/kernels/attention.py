"""Fused causal attention, forward and backward, one (batch, head) at a time: y = softmax(scale *
q k^T, causal) v without a (T, T) matrix. The forward keeps only each query's log-sum-exp
(B, NH, T) for the backward, which recomputes the probabilities of each block of queries from it
(FlashAttention, Dao et al. 2022, algorithms 1 and 2, with whole key rows per query block: a
block's (BQ, T) scores fit in cache, so no online rescaling is needed). The engine's other path,
blocked BLAS GEMMs around the attn_softmax kernels, lives in engine/attention.py; backend.py's
"attention" family chooses between them ("numba": these kernels, "numpy": the blocked GEMMs), so
this family has no dispatcher of its own: its reference states the algorithm for the tests, and
the NumPy fallback worth running is the blocked one.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg, row_dot, row_max, row_sum
from ._tiles import TILE_COLS, gemm_tiles, run_with_slp


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy, the full (T, T) matrix per head


def _causal_scores_ref(q, k, scale):
    """q, k: (B, NH, T, hs) -> scale * q k^T (B, NH, T, T) with -inf above the diagonal."""
    T = q.shape[2]
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)
    return np.where(np.tri(T, T, dtype=bool), s, q.dtype.type(-np.inf))


def attention_fwd_ref(q, k, v, scale):
    """q, k, v: (B, NH, T, hs) -> y (B, NH, T, hs), lse (B, NH, T): lse_i = log sum_j<=i exp(s_ij)."""
    s = _causal_scores_ref(q, k, scale)
    m = s.max(-1, keepdims=True)            # the diagonal is always visible: m is finite
    e = np.exp(s - m)                       # exp(-inf) = 0 for the keys after the query
    l = e.sum(-1, keepdims=True)
    y = (e / l) @ v
    return y, (m + np.log(l))[..., 0]


def attention_bwd_ref(dy, q, k, v, lse, scale):
    """dy, q, k, v: (B, NH, T, hs), lse (B, NH, T) -> dqkv (3, B, NH, T, hs): dq, dk, dv stacked."""
    p = np.exp(_causal_scores_ref(q, k, scale) - lse[..., None])      # the forward's probabilities
    dp = dy @ v.swapaxes(-1, -2)                                       # (B, NH, T, T)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * q.dtype.type(scale)   # softmax backward, scale in
    return np.stack([ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dy])


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures. prange over the B*NH heads: each head's rows of y, dq, dk, dv
# are written by one thread only. Per head, the queries run in blocks of BQ rows: a block's
# scores against the keys up to its last row (BQ x n, the only T-sized scratch), its softmax,
# and every product as register tiles (_tiles.gemm_tiles). Each head's q, k, v are zero-padded
# (T up to a multiple of BQ, hs up to a multiple of 16; used in place when already so, as at the
# mini shapes) and k, v also transposed once: padded channels add 0 to every product and padded
# keys are masked, so the tiles need no edge cases.

BQ = 16  # query rows per block: a multiple of the tile's rows and columns; T = 256 computes 8.5/16 of T x T


@njit(cache=True, fastmath=False, error_model="numpy")
def _padded_head(x, rows, cols):
    """x (T, hs) -> (rows, cols) >= (T, hs), zero where x has no entry: x itself when the shapes
    already agree (T = 256, hs = 64: no copy), else a padded copy."""
    T, hs = x.shape
    if T == rows and hs == cols:
        return x
    out = np.empty((rows, cols), x.dtype)
    for j in range(T):
        for d in range(hs):
            out[j, d] = x[j, d]
        for d in range(hs, cols):
            out[j, d] = 0
    for j in range(T, rows):
        for d in range(cols):
            out[j, d] = 0
    return out


@njit(cache=True, fastmath=False, error_model="numpy")
def _transposed(x):
    """x (rows, cols) -> x^T (cols, rows), C order."""
    out = np.empty((x.shape[1], x.shape[0]), x.dtype)
    for j in range(x.shape[0]):
        for d in range(x.shape[1]):
            out[d, j] = x[j, d]
    return out


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attention_fwd_kernel(q, k, v, y, lse, scale):
    BH, T, hs = q.shape  # q, k, v, y: (B*NH, T, hs) views; lse (B*NH, T)
    Tp, hp = (T + BQ - 1) // BQ * BQ, (hs + TILE_COLS - 1) // TILE_COLS * TILE_COLS
    sc = q.dtype.type(scale)
    for bh in prange(BH):
        qP, vP = _padded_head(q[bh], Tp, hp), _padded_head(v[bh], Tp, hp)
        kT = _transposed(_padded_head(k[bh], Tp, hp))
        s, yb = np.empty((BQ, Tp), q.dtype), np.empty((BQ, hp), q.dtype)
        for s0 in range(0, T, BQ):
            n = s0 + BQ                                # keys 0..n-1 cover every row of the block
            gemm_tiles(qP[s0:n], kT, s, BQ, n, hp, False)          # pass 1: scores (BQ, n)
            for r in range(BQ):                                    # pass 2: causal softmax rows
                i = s0 + r
                if i >= T:                                         # a padded query: no output
                    s[r, :n] = 0
                    continue
                m = sc * row_max(s[r], i + 1)
                for j in range(i + 1):
                    s[r, j] = exp_neg(sc * s[r, j] - m)
                l = row_sum(s[r], i + 1)
                inv = q.dtype.type(1.0 / l)
                for j in range(i + 1):
                    s[r, j] *= inv
                for j in range(i + 1, n):                          # keys after the query
                    s[r, j] = 0
                lse[bh, i] = m + math.log(l)
            gemm_tiles(s, vP, yb, BQ, hp, n, False)                # pass 3: y = p @ v
            for r in range(min(BQ, T - s0)):
                y[bh, s0 + r] = yb[r, :hs]


def attention_fwd_nb(q, k, v, scale):
    """q, k, v: (B, NH, T, hs) -> y (B, NH, T, hs), lse (B, NH, T)."""
    B, NH, T, hs = q.shape
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    y = np.empty(q.shape, q.dtype)
    lse = np.empty((B, NH, T), q.dtype)
    run_with_slp(_attention_fwd_kernel, q.reshape(-1, T, hs), k.reshape(-1, T, hs), v.reshape(-1, T, hs),
                 y.reshape(-1, T, hs), lse.reshape(-1, T), scale)
    return y, lse


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attention_bwd_kernel(dy, q, k, v, lse, dq, dk, dv, scale):
    BH, T, hs = q.shape  # (B*NH, T, hs) views; dq, dk, dv written whole here
    Tp, hp = (T + BQ - 1) // BQ * BQ, (hs + TILE_COLS - 1) // TILE_COLS * TILE_COLS
    sc = q.dtype.type(scale)
    for bh in prange(BH):
        qP, kP, dyP = _padded_head(q[bh], Tp, hp), _padded_head(k[bh], Tp, hp), _padded_head(dy[bh], Tp, hp)
        kT, vT = _transposed(kP), _transposed(_padded_head(v[bh], Tp, hp))
        dK, dV = np.zeros((Tp, hp), q.dtype), np.zeros((Tp, hp), q.dtype)
        p, ds, dqb = np.empty((BQ, Tp), q.dtype), np.empty((BQ, Tp), q.dtype), np.empty((BQ, hp), q.dtype)
        for s0 in range(0, T, BQ):
            n = s0 + BQ
            # pass 1: recompute p = exp(scale * q k^T - lse) (lse_i >= every scale * s_ij)
            gemm_tiles(qP[s0:n], kT, p, BQ, n, hp, False)
            for r in range(BQ):
                i = s0 + r
                last = i + 1 if i < T else 0                       # a padded query sees no key
                li = lse[bh, min(i, T - 1)]                        # (the input dtype: float32 exp)
                for j in range(last):
                    p[r, j] = exp_neg(sc * p[r, j] - li)
                for j in range(last, n):
                    p[r, j] = 0
            # pass 2: backward of y = p @ v: dp = dy v^T, dv += p^T dy
            gemm_tiles(dyP[s0:n], vT, ds, BQ, n, hp, False)
            gemm_tiles(p[:, :n].T, dyP[s0:n], dV, n, hp, BQ, True)
            # pass 3: backward of the softmax, scale folded in: ds = scale * p (dp - sum(p dp))
            for r in range(BQ):
                d = q.dtype.type(row_dot(p[r], ds[r], n))
                for j in range(n):
                    ds[r, j] = sc * p[r, j] * (ds[r, j] - d)
            # pass 4: backward of the scores: dq = ds k, dk += ds^T q
            gemm_tiles(ds, kP, dqb, BQ, hp, n, False)
            gemm_tiles(ds[:, :n].T, qP[s0:n], dK, n, hp, BQ, True)
            for r in range(min(BQ, T - s0)):
                dq[bh, s0 + r] = dqb[r, :hs]
        dk[bh] = dK[:T, :hs]
        dv[bh] = dV[:T, :hs]


def attention_bwd_nb(dy, q, k, v, lse, scale):
    """dy, q, k, v: (B, NH, T, hs), lse (B, NH, T) -> dqkv (3, B, NH, T, hs)."""
    B, NH, T, hs = q.shape
    dy, q, k, v = (np.ascontiguousarray(a) for a in (dy, q, k, v))
    dqkv = np.empty((3, *q.shape), q.dtype)
    views = [a.reshape(-1, T, hs) for a in (dy, q, k, v)] + [np.ascontiguousarray(lse).reshape(-1, T)]
    run_with_slp(_attention_bwd_kernel, *views, *(dqkv[i].reshape(-1, T, hs) for i in range(3)), scale)
    return dqkv
