"""Kernels for the hot paths between matmuls, each a NumPy reference beside a Numba kernel.

Every op comes as a pair with one signature, llm.c style: `<op>_ref` is the plain, vectorized
NumPy algorithm (the readable reference and the fallback), `<op>_nb` the fused Numba kernel
(one pass per row, `prange` over rows, no temporaries). The engine calls the dispatcher `<op>`,
which picks one of the two per kernel family:

    set_kernel_backend("numpy")                 # every family on the references
    set_kernel_backend({"gelu": "numpy"})        # one family only
    TINYGRAD_LLM_KERNELS=numpy python train.py   # env var: forces the references, wins over code

`DEFAULT_BACKEND` records what bench/kernels.py measured at the mini model's shapes: a family
whose kernel does not beat its reference stays on "numpy" (STYLE.md: a kernel earns its place).

Dtypes: float32 or float64 in, the same dtype out, never upcast. Row sums inside kernels use
float64 accumulators (more accurate than a float32 running sum, and cheap); everything else is
computed in the input dtype. All arrays are C-contiguous. Numba rules: fastmath stays off, so
sums are written as 16 interleaved partial sums, a fixed (deterministic) reassociation that LLVM
can map onto SIMD registers; exp in float32 kernels is a vectorizable polynomial (`_exp_neg`).
"""
import math
import os

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

KERNELS = ("softmax", "attn_softmax", "ce", "layernorm", "gelu", "adamw", "attn_decode")
BACKENDS = ("numba", "numpy")

# filled from bench/kernels.py (runs/bench/kernels.json) at the mini shapes, 2 threads
DEFAULT_BACKEND = {
    "softmax": "numba",
    "attn_softmax": "numba",
    "ce": "numba",
    "layernorm": "numba",
    "gelu": "numba",
    "adamw": "numba",
    "attn_decode": "numba",
}

# ----------------------------------------------------------------------------------------------
# backend selection


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


# the env var is read once at import; when set it overrides whatever code asks for
_FORCED = os.environ.get("TINYGRAD_LLM_KERNELS") or None
if _FORCED is not None:
    _check_backend(_FORCED)
_chosen = dict(DEFAULT_BACKEND)


def set_kernel_backend(choice):
    """choice: "numba" | "numpy" (all families), {family: backend} (some), or "default"."""
    if choice == "default":
        _chosen.update(DEFAULT_BACKEND)
    elif isinstance(choice, str):
        _chosen.update({k: _check_backend(choice) for k in KERNELS})
    else:
        unknown = set(choice) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernel families {sorted(unknown)}; expected {KERNELS}")
        _chosen.update({k: _check_backend(v) for k, v in choice.items()})


def get_kernel_backend():
    """-> {family: "numba" | "numpy"}, the backend each dispatcher uses right now."""
    return {k: _FORCED or v for k, v in _chosen.items()}


def _use_nb(family):
    return (_FORCED or _chosen[family]) == "numba"


# ----------------------------------------------------------------------------------------------
# shared Numba helpers (inlined into the kernels)


def _exp_neg(t):
    """exp(t) for t <= 0. Plain Python meaning; inside Numba the overload below is used."""
    return math.exp(t)


@overload(_exp_neg)
def _exp_neg_overload(t):
    if t != types.float32:
        return lambda t: math.exp(t)  # float64: libm exp, exact to the last bit or so

    # float32: libm expf is a scalar call LLVM cannot vectorize, which made every softmax slower
    # than NumPy's SIMD exp. This is Cephes expf (reference: Cephes expf.c): t = n*ln2 + r with
    # |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n built exactly from integer shifts.
    # Within 1 ulp of exp on [-87, 0]; 0 below -87 (exp < 1.7e-38), positive t clamp to 0.
    def expf_neg(t):
        lo = np.float32(-87.0)
        tc = lo if t < lo else (np.float32(0.0) if t > np.float32(0.0) else t)  # keeps NaN
        nf = np.floor(tc * np.float32(1.44269504088896341) + np.float32(0.5))  # round(t/ln2)
        # r = t - n*ln2 with ln2 split in two so n*C1 is exact (Cody-Waite)
        r = tc - nf * np.float32(0.693359375) - nf * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * (r * r) + r + np.float32(1.0)
        # 2^n for n in [-126, 0] as two exact factors 2^n1 * 2^n2, each (1 << (k+62)) * 2^-62
        n = np.int64(nf)
        n1 = n >> 1
        n2 = n - n1
        s1 = np.float32(np.int64(1) << (n1 + 62)) * np.float32(2.0**-62)
        s2 = np.float32(np.int64(1) << (n2 + 62)) * np.float32(2.0**-62)
        return np.float32(0.0) if t < lo else p * s1 * s2

    return expf_neg


@njit(cache=True, fastmath=False)
def _row_max(x, n):
    """x: (>= n,) -> max(x[:n]), n >= 1; NaNs are skipped here and propagate through exp later."""
    m = x[0]
    nb = n // 16 * 16
    if nb >= 32:
        acc = x[:16].copy()  # 16 running maxima, one per SIMD lane
        for j in range(16, nb, 16):
            for k in range(16):
                if x[j + k] > acc[k]:
                    acc[k] = x[j + k]
        for k in range(16):
            if acc[k] > m:
                m = acc[k]
    else:
        nb = 1
    for j in range(nb, n):
        if x[j] > m:
            m = x[j]
    return m


@njit(cache=True, fastmath=False)
def _row_sum(x, n):
    """x: (>= n,) -> float64 sum(x[:n]) through 16 interleaved float64 partial sums."""
    acc = np.zeros(16, np.float64)
    nb = n // 16 * 16
    for j in range(0, nb, 16):
        for k in range(16):
            acc[k] += x[j + k]
    s = 0.0
    for j in range(nb, n):
        s += x[j]
    return s + acc.sum()


@njit(cache=True, fastmath=False)
def _row_dot(a, b, n):
    """a, b: (>= n,) -> float64 sum(a[:n] * b[:n]); products in the input dtype."""
    acc = np.zeros(16, np.float64)
    nb = n // 16 * 16
    for j in range(0, nb, 16):
        for k in range(16):
            acc[k] += a[j + k] * b[j + k]
    s = 0.0
    for j in range(nb, n):
        s += a[j] * b[j]
    return s + acc.sum()


@njit(cache=True, fastmath=False)
def _row_exp_sum(x, m, n):
    """x: (>= n,), m its row max -> float64 sum(exp(x[:n] - m)), the exps never stored."""
    acc = np.zeros(16, np.float64)
    nb = n // 16 * 16
    for j in range(0, nb, 16):
        for k in range(16):
            acc[k] += _exp_neg(x[j + k] - m)
    s = 0.0
    for j in range(nb, n):
        s += _exp_neg(x[j] - m)
    return s + acc.sum()


# ----------------------------------------------------------------------------------------------
# softmax over the last axis


def softmax_fwd_ref(x):
    """x: (N, D) -> y (N, D) = softmax(x, -1), max subtracted first for stability."""
    y = x - x.max(-1, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(-1, keepdims=True)
    return y


@njit(cache=True, fastmath=False, parallel=True)
def softmax_fwd_nb(x):
    """x: (N, D) -> y (N, D); prange over rows, 3 sweeps of a row that stays in L1/L2."""
    N, D = x.shape
    y = np.empty_like(x)
    for r in prange(N):
        xr, yr = x[r], y[r]
        m = _row_max(xr, D)
        for j in range(D):  # pass 1: unnormalized exps (SIMD)
            yr[j] = _exp_neg(xr[j] - m)
        inv = x.dtype.type(1.0 / _row_sum(yr, D))  # pass 2: the normalizer
        for j in range(D):  # pass 3: normalize
            yr[j] *= inv
    return y


def softmax_bwd_ref(y, dy):
    """y, dy: (N, D) -> dx (N, D) = y * (dy - sum(y * dy, -1))."""
    return y * (dy - (y * dy).sum(-1, keepdims=True))


@njit(cache=True, fastmath=False, parallel=True)
def softmax_bwd_nb(y, dy):
    """y, dy: (N, D) -> dx (N, D); one dot and one elementwise sweep per row."""
    N, D = y.shape
    dx = np.empty_like(y)
    for r in prange(N):
        d = y.dtype.type(_row_dot(y[r], dy[r], D))
        for j in range(D):
            dx[r, j] = y[r, j] * (dy[r, j] - d)
    return dx


# ----------------------------------------------------------------------------------------------
# causal attention softmax: p = softmax(scale * att) with key j > query i masked to exactly 0


def attn_softmax_fwd_ref(att, scale):
    """att: (B, NH, T, T) raw q @ k^T -> p (B, NH, T, T), zero above the diagonal."""
    T = att.shape[-1]
    causal = np.tri(T, dtype=bool)  # (T, T), True where key j <= query i
    s = np.where(causal, att * att.dtype.type(scale), att.dtype.type(-np.inf))
    s -= s.max(-1, keepdims=True)  # the diagonal is always valid, so the max is finite
    np.exp(s, out=s)  # exp(-inf) = 0 exactly for the masked keys
    s /= s.sum(-1, keepdims=True)
    return s


@njit(cache=True, fastmath=False, parallel=True)
def attn_softmax_fwd_nb(att, scale):
    """att: (B, NH, T, T) -> p (B, NH, T, T); row i only touches its i+1 valid keys."""
    B, NH, T, _ = att.shape
    if not scale > 0:
        raise ValueError("attn_softmax_fwd_nb: scale must be positive")
    sc = att.dtype.type(scale)
    a = att.reshape(B * NH * T, T)  # rows (b, h, i), a view
    p = np.empty_like(a)
    for r in prange(B * NH * T):
        i = r % T  # query position of this row
        ar, pr = a[r], p[r]
        m = sc * _row_max(ar, i + 1)  # = max(sc * ar[:i+1]) exactly, because sc > 0
        for j in range(i + 1):
            pr[j] = _exp_neg(sc * ar[j] - m)
        inv = att.dtype.type(1.0 / _row_sum(pr, i + 1))
        for j in range(i + 1):
            pr[j] *= inv
        for j in range(i + 1, T):  # masked: exactly zero, never computed
            pr[j] = 0
    return p.reshape(B, NH, T, T)


def attn_softmax_bwd_ref(p, dp, scale):
    """p, dp: (B, NH, T, T) -> datt (B, NH, T, T) = scale * p * (dp - sum(p * dp, -1))."""
    # masked entries have p == 0, so their gradient is 0 without an explicit mask
    return p.dtype.type(scale) * p * (dp - (p * dp).sum(-1, keepdims=True))


@njit(cache=True, fastmath=False, parallel=True)
def attn_softmax_bwd_nb(p, dp, scale):
    """p, dp: (B, NH, T, T) -> datt (B, NH, T, T); zeros above the diagonal written directly."""
    B, NH, T, _ = p.shape
    sc = p.dtype.type(scale)
    p2, dp2 = p.reshape(B * NH * T, T), dp.reshape(B * NH * T, T)
    datt = np.empty_like(p2)
    for r in prange(B * NH * T):
        i = r % T
        d = p.dtype.type(_row_dot(p2[r], dp2[r], i + 1))
        for j in range(i + 1):
            datt[r, j] = sc * p2[r, j] * (dp2[r, j] - d)
        for j in range(i + 1, T):
            datt[r, j] = 0
    return datt.reshape(B, NH, T, T)


# ----------------------------------------------------------------------------------------------
# cross-entropy over the vocabulary, weighted per row by a mask (0 = ignore the row)


def _check_targets(targets, V):
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"cross-entropy targets must lie in [0, {V})")


def ce_fwd_ref(logits, targets, mask):
    """logits (N, V), targets (N,) int64, mask (N,) -> losses (N,), lse (N,) logsumexp."""
    _check_targets(targets, logits.shape[1])
    m = logits.max(-1)  # (N,)
    e = np.exp(logits - m[:, None])  # (N, V)
    lse = m + np.log(e.sum(-1))
    losses = mask * (lse - logits[np.arange(len(targets)), targets])
    return losses, lse


@njit(cache=True, fastmath=False, parallel=True)
def ce_fwd_nb(logits, targets, mask):
    """logits (N, V), targets (N,), mask (N,) -> losses (N,), lse (N,); 2 sweeps per row."""
    N, V = logits.shape
    for n in range(N):
        if targets[n] < 0 or targets[n] >= V:
            raise ValueError("cross-entropy targets must lie in [0, V)")
    losses = np.empty(N, logits.dtype)
    lse = np.empty(N, logits.dtype)
    for n in prange(N):
        xr = logits[n]
        m = _row_max(xr, V)  # pass 1: max
        lse[n] = m + math.log(_row_exp_sum(xr, m, V))  # pass 2: sum of exps, in float64
        losses[n] = mask[n] * (lse[n] - xr[targets[n]])
    return losses, lse


def ce_bwd_ref(logits, targets, mask, lse, dlosses):
    """... lse (N,), dlosses (N,) -> dlogits (N, V) = c * (softmax - onehot), c = dlosses*mask."""
    _check_targets(targets, logits.shape[1])
    c = (dlosses * mask)[:, None]  # (N, 1) per-row weight
    dlogits = np.exp(logits - lse[:, None])  # softmax from the saved logsumexp
    dlogits[np.arange(len(targets)), targets] -= 1
    dlogits *= c
    return dlogits


@njit(cache=True, fastmath=False, parallel=True)
def ce_bwd_nb(logits, targets, mask, lse, dlosses):
    """Same contract as ce_bwd_ref; one sweep per row, rows with weight 0 just zeroed."""
    N, V = logits.shape
    for n in range(N):
        if targets[n] < 0 or targets[n] >= V:
            raise ValueError("cross-entropy targets must lie in [0, V)")
    dlogits = np.empty_like(logits)
    for n in prange(N):
        c = dlosses[n] * mask[n]
        if c == 0:  # masked row (prompt tokens, padding): skip the exps
            dlogits[n, :] = 0
            continue
        # lse >= max(logits[n]) even after rounding, so every exp argument is <= 0
        for j in range(V):
            dlogits[n, j] = _exp_neg(logits[n, j] - lse[n]) * c
        t = targets[n]
        dlogits[n, t] = (_exp_neg(logits[n, t] - lse[n]) - 1) * c  # same order as the ref
    return dlogits


# ----------------------------------------------------------------------------------------------
# LayerNorm over the last axis (biased variance, like PyTorch); llm.c's layernorm pair


def layernorm_fwd_ref(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> y (N, C), mean (N,), rstd (N,) saved for backward."""
    mean = x.mean(-1)
    xc = x - mean[:, None]
    rstd = 1 / np.sqrt((xc * xc).mean(-1) + x.dtype.type(eps))
    y = xc * rstd[:, None]
    y *= w
    y += b
    return y, mean, rstd


@njit(cache=True, fastmath=False, parallel=True)
def layernorm_fwd_nb(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> y, mean, rstd; prange over rows, two-pass variance."""
    N, C = x.shape
    dt = x.dtype.type
    y = np.empty_like(x)
    mean = np.empty(N, x.dtype)
    rstd = np.empty(N, x.dtype)
    for r in prange(N):
        xr = x[r]
        mu = dt(_row_sum(xr, C) / C)  # pass 1: mean
        acc = np.zeros(16, np.float64)  # pass 2: sum of squared deviations, 16 lanes
        cb = C // 16 * 16
        for j in range(0, cb, 16):
            for k in range(16):
                d = xr[j + k] - mu
                acc[k] += d * d
        var = acc.sum()
        for j in range(cb, C):
            var += (xr[j] - mu) * (xr[j] - mu)
        rs = dt(1.0 / math.sqrt(var / C + eps))
        mean[r], rstd[r] = mu, rs
        for j in range(C):  # pass 3: normalize, scale, shift
            y[r, j] = (xr[j] - mu) * rs * w[j] + b[j]
    return y, mean, rstd


def layernorm_bwd_ref(dy, x, w, mean, rstd):
    """dy, x (N, C), w (C,), mean, rstd (N,) -> dx (N, C), dw (C,), db (C,)."""
    norm = (x - mean[:, None]) * rstd[:, None]  # (N, C) the normalized input
    dnorm = dy * w
    # dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)); reference: llm.c
    dx = dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True)
    dx *= rstd[:, None]
    return dx, (dy * norm).sum(0), dy.sum(0)


@njit(cache=True, fastmath=False, parallel=True)
def layernorm_bwd_nb(dy, x, w, mean, rstd):
    """Same contract as layernorm_bwd_ref; prange over 16 row blocks, dw/db summed per block."""
    N, C = x.shape
    dt = x.dtype.type
    dx = np.empty_like(x)
    nblk = min(N, 16)  # fixed block count: the result does not depend on the thread count
    dwp = np.zeros((nblk, C), np.float64)  # per-block partial dw, db: no two threads share a row
    dbp = np.zeros((nblk, C), np.float64)
    for blk in prange(nblk):
        for r in range(blk * N // nblk, (blk + 1) * N // nblk):
            mu, rs = mean[r], rstd[r]
            # pass 1: the two row means of backward, mean(dnorm) and mean(dnorm * norm)
            g1 = dt(_row_dot(dy[r], w, C) / C)
            acc = np.zeros(16, np.float64)
            cb = C // 16 * 16
            for j in range(0, cb, 16):
                for k in range(16):
                    acc[k] += dy[r, j + k] * w[j + k] * ((x[r, j + k] - mu) * rs)
            s2 = acc.sum()
            for j in range(cb, C):
                s2 += dy[r, j] * w[j] * ((x[r, j] - mu) * rs)
            g2 = dt(s2 / C)
            # pass 2: dx, and this block's share of dw, db
            for j in range(C):
                norm = (x[r, j] - mu) * rs
                dx[r, j] = (dy[r, j] * w[j] - g1 - norm * g2) * rs
                dwp[blk, j] += dy[r, j] * norm
                dbp[blk, j] += dy[r, j]
    dw = np.empty(C, x.dtype)
    db = np.empty(C, x.dtype)
    for j in range(C):  # reduce the blocks in a fixed order
        dw[j], db[j] = dwp[:, j].sum(), dbp[:, j].sum()
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(k (x + a x^3))), k = sqrt(2/pi)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_fwd_ref(x):
    """x: any shape -> y, same shape; GPT-2's formula computed with in-place temporaries."""
    u = x * x
    u *= GELU_A
    u += 1
    u *= x
    u *= GELU_K  # u = k (x + a x^3)
    np.tanh(u, out=u)
    u += 1
    u *= x
    u *= 0.5
    return u


def gelu_bwd_ref(x, dy):
    """x, dy: any shape -> dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2))."""
    x2 = x * x
    t = np.tanh(GELU_K * x * (1 + GELU_A * x2))
    du = GELU_K * (1 + 3 * GELU_A * x2)  # du/dx
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)


# the kernels use 0.5 (1 + tanh(u)) = sigmoid(2u), written with exp(-2|u|) <= 1 so it never
# overflows and keeps full relative precision in the left tail, where 1 + tanh(u) cancels


@njit(cache=True, fastmath=False, parallel=True)
def gelu_fwd_nb(x):
    """x: any shape -> y, same shape; flat view, prange over 16K-element blocks."""
    dt = x.dtype.type
    k, a, zero, one, two = dt(0.7978845608028654), dt(0.044715), dt(0.0), dt(1.0), dt(2.0)
    xf = x.reshape(x.size)
    y = np.empty_like(xf)
    nblk = (x.size + 16383) // 16384
    for blk in prange(nblk):
        for i in range(blk * 16384, min((blk + 1) * 16384, x.size)):
            u = k * (xf[i] + a * xf[i] * xf[i] * xf[i])
            e = _exp_neg(-two * abs(u))
            s = one / (one + e) if u >= zero else e / (one + e)  # sigmoid(2u)
            y[i] = xf[i] * s
    return y.reshape(x.shape)


@njit(cache=True, fastmath=False, parallel=True)
def gelu_bwd_nb(x, dy):
    """x, dy: any shape -> dx = dy * (s + 2 x s (1 - s) du/dx), s = sigmoid(2u)."""
    dt = x.dtype.type
    k, a, zero, one, two = dt(0.7978845608028654), dt(0.044715), dt(0.0), dt(1.0), dt(2.0)
    three = dt(3.0)
    xf, dyf = x.reshape(x.size), dy.reshape(dy.size)
    dx = np.empty_like(xf)
    nblk = (x.size + 16383) // 16384
    for blk in prange(nblk):
        for i in range(blk * 16384, min((blk + 1) * 16384, x.size)):
            x2 = xf[i] * xf[i]
            u = k * (xf[i] + a * x2 * xf[i])
            e = _exp_neg(-two * abs(u))
            s = one / (one + e) if u >= zero else e / (one + e)
            ss = e / ((one + e) * (one + e))  # s (1 - s), symmetric in u
            dx[i] = dyf[i] * (s + two * xf[i] * ss * (k * (one + three * a * x2)))
    return dx.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# AdamW, in place; reference: PyTorch AdamW docs (decoupled weight decay, bias-corrected moments)


def adamw_update_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """p, g, m, v: same shape, updated in place (p, m, v); step counts from 1."""
    dt = p.dtype.type
    step_size = dt(lr / (1 - beta1**step))  # lr / bias_correction1
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    p *= dt(1 - lr * weight_decay)  # decoupled weight decay
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * g * g
    denom = np.sqrt(v)  # sqrt(vhat) + eps = sqrt(v) / sqrt(bc2) + eps
    denom /= bc2_sqrt
    denom += dt(eps)
    np.divide(m, denom, out=denom)
    denom *= step_size
    p -= denom


@njit(cache=True, fastmath=False, parallel=True)
def adamw_update_nb(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Same contract as adamw_update_ref; one fused sweep over flat views, prange over blocks."""
    dt = p.dtype.type
    step_size = dt(lr / (1 - beta1**step))
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    decay, b1, c1 = dt(1 - lr * weight_decay), dt(beta1), dt(1 - beta1)
    b2, c2, ep = dt(beta2), dt(1 - beta2), dt(eps)
    pf, gf, mf, vf = p.reshape(p.size), g.reshape(g.size), m.reshape(m.size), v.reshape(v.size)
    nblk = (p.size + 16383) // 16384
    for blk in prange(nblk):
        for i in range(blk * 16384, min((blk + 1) * 16384, p.size)):
            mi = b1 * mf[i] + c1 * gf[i]
            vi = b2 * vf[i] + c2 * gf[i] * gf[i]
            mf[i], vf[i] = mi, vi
            pf[i] = pf[i] * decay - mi / (math.sqrt(vi) / bc2_sqrt + ep) * step_size


# ----------------------------------------------------------------------------------------------
# attention for one new token against a KV cache (generation)


def attn_decode_fwd_ref(q, k_cache, v_cache, n_valid, scale):
    """q (B, NH, 1, hs), k/v_cache (B, NH, Tmax, hs) -> y (B, NH, 1, hs) over n_valid keys."""
    if not 1 <= n_valid <= k_cache.shape[2]:
        raise ValueError(f"n_valid={n_valid} outside [1, {k_cache.shape[2]}]")
    k, v = k_cache[:, :, :n_valid], v_cache[:, :, :n_valid]  # (B, NH, n, hs) views
    att = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)  # (B, NH, 1, n)
    att -= att.max(-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(-1, keepdims=True)
    return att @ v  # (B, NH, 1, hs)


@njit(cache=True, fastmath=False, parallel=True)
def attn_decode_fwd_nb(q, k_cache, v_cache, n_valid, scale):
    """Same contract as attn_decode_fwd_ref; prange over (b, h), softmax and p @ v fused."""
    B, NH, Tmax, hs = k_cache.shape
    if not 1 <= n_valid <= Tmax:
        raise ValueError("attn_decode_fwd_nb: n_valid outside [1, Tmax]")
    dt = q.dtype.type
    sc = dt(scale)
    y = np.empty_like(q)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        qv, kc, vc = q[b, h, 0], k_cache[b, h], v_cache[b, h]
        s = np.empty(n_valid, q.dtype)  # scores of the valid keys
        for t in range(n_valid):
            s[t] = dt(_row_dot(qv, kc[t], hs)) * sc
        m = _row_max(s, n_valid)
        for t in range(n_valid):
            s[t] = _exp_neg(s[t] - m)
        acc = np.zeros(hs, np.float64)  # unnormalized p @ v, normalized once at the end
        for t in range(n_valid):
            for d in range(hs):
                acc[d] += s[t] * vc[t, d]
        inv = 1.0 / _row_sum(s, n_valid)
        for d in range(hs):
            y[b, h, 0, d] = acc[d] * inv
    return y


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def softmax_fwd(x):
    """x: (N, D) -> softmax over the last axis."""
    return softmax_fwd_nb(x) if _use_nb("softmax") else softmax_fwd_ref(x)


def softmax_bwd(y, dy):
    """y, dy: (N, D) -> dx (N, D)."""
    return softmax_bwd_nb(y, dy) if _use_nb("softmax") else softmax_bwd_ref(y, dy)


def attn_softmax_fwd(att, scale):
    """att: (B, NH, T, T) -> causal softmax(scale * att)."""
    f = attn_softmax_fwd_nb if _use_nb("attn_softmax") else attn_softmax_fwd_ref
    return f(att, float(scale))


def attn_softmax_bwd(p, dp, scale):
    """p, dp: (B, NH, T, T) -> datt (B, NH, T, T)."""
    f = attn_softmax_bwd_nb if _use_nb("attn_softmax") else attn_softmax_bwd_ref
    return f(p, dp, float(scale))


def ce_fwd(logits, targets, mask):
    """logits (N, V), targets (N,) int64, mask (N,) -> losses (N,), lse (N,)."""
    return (ce_fwd_nb if _use_nb("ce") else ce_fwd_ref)(logits, targets, mask)


def ce_bwd(logits, targets, mask, lse, dlosses):
    """-> dlogits (N, V)."""
    return (ce_bwd_nb if _use_nb("ce") else ce_bwd_ref)(logits, targets, mask, lse, dlosses)


def layernorm_fwd(x, w, b, eps):
    """x (N, C), w, b (C,) -> y (N, C), mean (N,), rstd (N,)."""
    f = layernorm_fwd_nb if _use_nb("layernorm") else layernorm_fwd_ref
    return f(x, w, b, float(eps))


def layernorm_bwd(dy, x, w, mean, rstd):
    """-> dx (N, C), dw (C,), db (C,)."""
    f = layernorm_bwd_nb if _use_nb("layernorm") else layernorm_bwd_ref
    return f(dy, x, w, mean, rstd)


def gelu_fwd(x):
    """x: any shape -> GELU(x)."""
    return gelu_fwd_nb(x) if _use_nb("gelu") else gelu_fwd_ref(x)


def gelu_bwd(x, dy):
    """x, dy: any shape -> dx."""
    return gelu_bwd_nb(x, dy) if _use_nb("gelu") else gelu_bwd_ref(x, dy)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """In place on p, m, v (any shape, C-contiguous); step >= 1."""
    f = adamw_update_nb if _use_nb("adamw") else adamw_update_ref
    f(p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))


def attn_decode_fwd(q, k_cache, v_cache, n_valid, scale):
    """q (B, NH, 1, hs), caches (B, NH, Tmax, hs) -> y (B, NH, 1, hs)."""
    f = attn_decode_fwd_nb if _use_nb("attn_decode") else attn_decode_fwd_ref
    return f(q, k_cache, v_cache, int(n_valid), float(scale))
