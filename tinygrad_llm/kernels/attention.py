"""Fused causal attention, forward and backward, one (batch, head) at a time: y = softmax(scale *
q k^T, causal) v without a (T, T) matrix. The forward keeps only each query's log-sum-exp
(B, NH, T) for the backward, which recomputes each probability row from it (FlashAttention,
Dao et al. 2022, algorithm 1 and 2, with blocks of one query row). The engine's other path,
blocked BLAS GEMMs around the attn_softmax kernels, lives in engine/attention.py; backend.py's
"attention" family chooses between them ("numba": these kernels, "numpy": the blocked GEMMs), so
this family has no dispatcher of its own: its reference states the algorithm for the tests, and
the NumPy fallback worth running is the blocked one.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg, row_dot, row_max, row_sum


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
# are written by one thread only. Every product is written as an axpy over a contiguous axis
# (keys via k^T's rows, head channels via v's rows), the loop shape LLVM vectorizes without
# reordering a sum; query i only touches keys 0..i.


@njit(cache=True, fastmath=False, error_model="numpy")
def _scores_row(qi, kT, s, n):
    """s[:n] = qi . k_j for keys j < n, as hs axpys over the rows of kT (hs, T)."""
    for j in range(n):
        s[j] = 0
    for d in range(kT.shape[0]):
        a = qi[d]
        kd = kT[d]
        for j in range(n):
            s[j] += a * kd[j]


@njit(cache=True, fastmath=False, error_model="numpy")
def _transpose_into(x, xT):
    """x (T, hs) -> xT (hs, T)."""
    for j in range(x.shape[0]):
        for d in range(x.shape[1]):
            xT[d, j] = x[j, d]


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attention_fwd_kernel(q, k, v, y, lse, scale):
    BH, T, hs = q.shape  # q, k, v, y: (B*NH, T, hs) views; lse (B*NH, T)
    sc = q.dtype.type(scale)
    for bh in prange(BH):
        kT = np.empty((hs, T), q.dtype)
        s = np.empty(T, q.dtype)
        _transpose_into(k[bh], kT)
        for i in range(T):
            n = i + 1
            _scores_row(q[bh, i], kT, s, n)           # pass 1: raw scores of the visible keys
            m = sc * row_max(s, n)                    # pass 2: unnormalized exps, as softmax_row
            for j in range(n):
                s[j] = exp_neg(sc * s[j] - m)
            l = row_sum(s, n)
            inv = q.dtype.type(1.0 / l)
            for j in range(n):                        # pass 3: normalize
                s[j] *= inv
            yi = y[bh, i]                             # pass 4: y_i = sum_j p_j v_j
            for c in range(hs):
                yi[c] = 0
            for j in range(n):
                pj = s[j]
                vj = v[bh, j]
                for c in range(hs):
                    yi[c] += pj * vj[c]
            lse[bh, i] = m + math.log(l)


def attention_fwd_nb(q, k, v, scale):
    """q, k, v: (B, NH, T, hs) -> y (B, NH, T, hs), lse (B, NH, T)."""
    B, NH, T, hs = q.shape
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    y = np.empty(q.shape, q.dtype)
    lse = np.empty((B, NH, T), q.dtype)
    _attention_fwd_kernel(q.reshape(-1, T, hs), k.reshape(-1, T, hs), v.reshape(-1, T, hs),
                          y.reshape(-1, T, hs), lse.reshape(-1, T), scale)
    return y, lse


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attention_bwd_kernel(dy, q, k, v, lse, dq, dk, dv, scale):
    BH, T, hs = q.shape  # (B*NH, T, hs) views; dq, dk, dv written whole here
    sc = q.dtype.type(scale)
    for bh in prange(BH):
        kT = np.empty((hs, T), q.dtype)
        vT = np.empty((hs, T), q.dtype)
        p = np.empty(T, q.dtype)
        dp = np.empty(T, q.dtype)
        _transpose_into(k[bh], kT)
        _transpose_into(v[bh], vT)
        dk[bh] = 0
        dv[bh] = 0
        for i in range(T):
            n = i + 1
            # pass 1: recompute p_ij = exp(scale * s_ij - lse_i) (lse_i >= every scale * s_ij)
            _scores_row(q[bh, i], kT, p, n)
            li = lse[bh, i]
            for j in range(n):
                p[j] = exp_neg(sc * p[j] - li)
            # pass 2: backward of y_i = sum_j p_j v_j: dp_j = dy_i . v_j, dv_j += p_j dy_i
            dyi = dy[bh, i]
            _scores_row(dyi, vT, dp, n)
            for j in range(n):
                pj = p[j]
                dvj = dv[bh, j]
                for c in range(hs):
                    dvj[c] += pj * dyi[c]
            # pass 3: backward of the softmax, scale folded in: ds_j = scale * p_j (dp_j - p . dp)
            d = q.dtype.type(row_dot(p, dp, n))
            for j in range(n):
                dp[j] = sc * p[j] * (dp[j] - d)       # dp now holds ds
            # pass 4: backward of s_j = q_i . k_j: dq_i = sum_j ds_j k_j, dk_j += ds_j q_i
            dqi, qi = dq[bh, i], q[bh, i]
            for c in range(hs):
                dqi[c] = 0
            for j in range(n):
                dsj = dp[j]
                kj, dkj = k[bh, j], dk[bh, j]
                for c in range(hs):
                    dqi[c] += dsj * kj[c]
                    dkj[c] += dsj * qi[c]


def attention_bwd_nb(dy, q, k, v, lse, scale):
    """dy, q, k, v: (B, NH, T, hs), lse (B, NH, T) -> dqkv (3, B, NH, T, hs)."""
    B, NH, T, hs = q.shape
    dy, q, k, v = (np.ascontiguousarray(a) for a in (dy, q, k, v))
    dqkv = np.empty((3, *q.shape), q.dtype)
    views = [a.reshape(-1, T, hs) for a in (dy, q, k, v)] + [lse.reshape(-1, T)]
    _attention_bwd_kernel(*views, *(dqkv[i].reshape(-1, T, hs) for i in range(3)), scale)
    return dqkv
