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
computed in the input dtype. All arrays are C-contiguous. Numba settings: fastmath stays off, so
results are reproducible and LLVM may not reorder a sum; we write sums with 8 accumulators
ourselves (a fixed order). error_model="numpy" makes x / 0 give inf like NumPy instead of raising,
which removes a branch per division and lets elementwise loops vectorize. libm's expf cannot be
vectorized, so float32 kernels use their own polynomial exp (`_exp_neg`, within 1 ulp).
"""
import math
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Numba's OpenMP layer (libgomp) busy-waits at every barrier by default. On 2 cores shared with
# any other busy thread (another process, or OpenBLAS's own workers), a waiting thread then spins
# through a whole scheduler slice: measured 4.8 ms mean per parallel call under load vs 25 us
# with GOMP_SPINCOUNT=0 (cost on a quiet machine: ~10 us instead of ~2 us per call), and a
# matmul -> GELU -> matmul -> LayerNorm sequence ran 1.7x faster. libgomp reads this when it loads,
# at the first parallel kernel call (not at import), so this is in time. It reaches any libgomp
# loaded later in the process too (e.g. PyTorch's in bench/); set it explicitly to override.
os.environ.setdefault("GOMP_SPINCOUNT", "0")

KERNELS = ("softmax", "attn_softmax", "ce", "layernorm", "gelu", "dropout", "embedding", "adamw", "attn_decode")
BACKENDS = ("numba", "numpy")

# Filled from bench/kernels.py at the mini shapes (runs/bench/kernels*.json). attn_decode stays
# on NumPy: at B=16 its batched matmul (BLAS per head) beats our scalar dot products.
DEFAULT_BACKEND = {
    "softmax": "numba",
    "attn_softmax": "numba",
    "ce": "numba",
    "layernorm": "numba",
    "gelu": "numba",
    "dropout": "numba",
    "embedding": "numba",
    "adamw": "numba",
    "attn_decode": "numpy",
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


@intrinsic
def _f32_from_bits(typingctx, bits):
    """int32 -> the float32 with those bits (NumPy's .view(np.float32) for one scalar)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())  # no instruction: same register, new type

    return types.float32(types.int32), codegen


@overload(_exp_neg)
def _exp_neg_overload(t):
    if t != types.float32:
        return lambda t: math.exp(t)  # float64: libm exp, exact to the last bit or so

    # float32: libm expf is a scalar call LLVM cannot vectorize, which made every softmax slower
    # than NumPy's SIMD exp. This is Cephes expf (reference: Cephes expf.c): t = n*ln2 + r with
    # |r| <= ln2/2, exp(r) by a degree-7 polynomial, times 2^n written straight into the exponent
    # bits. Within 1 ulp of exp on [-87, 0]; 0 below -87 (exp < 1.7e-38); t > 0 is clamped to 0.
    def expf_neg(t):
        lo = np.float32(-87.0)  # keeps n >= -126, the smallest normal exponent
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
        two_n = _f32_from_bits(np.int32((np.int64(nf) + 127) << 23))  # 2^n: biased exponent n+127
        return np.float32(0.0) if t < lo else p * two_n

    return expf_neg


# Reductions keep 8 independent accumulators: one running sum is a chain of dependent adds (4
# cycles each); 8 chains overlap in the pipeline. Without fastmath LLVM will not do this for us.
# (It does not turn them into SIMD either; the elementwise loops are where SIMD happens.)


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_max(x, n):
    """x: (>= n,) -> max(x[:n]), n >= 1. NaNs are skipped here; they propagate through exp."""
    m = x[0]
    nb = n // 8 * 8
    if nb >= 16:
        m0, m1, m2, m3, m4, m5, m6, m7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
        for j in range(8, nb, 8):
            m0 = x[j] if x[j] > m0 else m0
            m1 = x[j + 1] if x[j + 1] > m1 else m1
            m2 = x[j + 2] if x[j + 2] > m2 else m2
            m3 = x[j + 3] if x[j + 3] > m3 else m3
            m4 = x[j + 4] if x[j + 4] > m4 else m4
            m5 = x[j + 5] if x[j + 5] > m5 else m5
            m6 = x[j + 6] if x[j + 6] > m6 else m6
            m7 = x[j + 7] if x[j + 7] > m7 else m7
        m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    else:
        nb = 1
    for j in range(nb, n):  # the tail (or a short row)
        if x[j] > m:
            m = x[j]
    return m


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_sum(x, n):
    """x: (>= n,) -> float64 sum(x[:n])."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    nb = n // 8 * 8
    for j in range(0, nb, 8):
        s0 += x[j]
        s1 += x[j + 1]
        s2 += x[j + 2]
        s3 += x[j + 3]
        s4 += x[j + 4]
        s5 += x[j + 5]
        s6 += x[j + 6]
        s7 += x[j + 7]
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for j in range(nb, n):
        s += x[j]
    return s


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_dot(a, b, n):
    """a, b: (>= n,) -> float64 sum(a[:n] * b[:n]); the products are rounded in the input dtype."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    nb = n // 8 * 8
    for j in range(0, nb, 8):
        s0 += a[j] * b[j]
        s1 += a[j + 1] * b[j + 1]
        s2 += a[j + 2] * b[j + 2]
        s3 += a[j + 3] * b[j + 3]
        s4 += a[j + 4] * b[j + 4]
        s5 += a[j + 5] * b[j + 5]
        s6 += a[j + 6] * b[j + 6]
        s7 += a[j + 7] * b[j + 7]
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for j in range(nb, n):
        s += a[j] * b[j]
    return s


# Row work lives in small @njit functions taking 1-D rows, called from the prange loops: LLVM
# vectorizes those loops reliably (measured ~1.6x faster than the same loops written inline).
# The public `_nb` functions allocate outputs with NumPy, which asks the kernel for huge pages;
# Numba's own allocator faults in 4 KB pages, +16 ms per (2048, 6400) float32 array on this VM.
# Outputs are always C-contiguous, so the reshapes below are views the kernels write through.


@njit(cache=True, fastmath=False, error_model="numpy")
def _softmax_row(x, y, n, sc):
    """x, y: (D,) -> y[:n] = softmax(sc * x[:n]), y[n:] = 0 (masked keys); sc > 0."""
    m = sc * _row_max(x, n)  # = max(sc * x) exactly, since sc > 0
    for j in range(n):  # pass 1: unnormalized exps
        y[j] = _exp_neg(sc * x[j] - m)
    inv = x.dtype.type(1.0 / _row_sum(y, n))  # pass 2: the normalizer
    for j in range(n):  # pass 3: normalize
        y[j] *= inv
    for j in range(n, y.shape[0]):  # masked entries: exactly zero, no exp computed
        y[j] = 0


@njit(cache=True, fastmath=False, error_model="numpy")
def _softmax_bwd_row(y, dy, dx, n, sc):
    """y, dy, dx: (D,) -> dx[:n] = sc * y * (dy - sum(y * dy)) over the first n, dx[n:] = 0."""
    d = y.dtype.type(_row_dot(y, dy, n))
    for j in range(n):
        dx[j] = sc * y[j] * (dy[j] - d)
    for j in range(n, dx.shape[0]):
        dx[j] = 0


# ----------------------------------------------------------------------------------------------
# softmax over the last axis


def softmax_fwd_ref(x):
    """x: (N, D) -> y (N, D) = softmax(x, -1), max subtracted first for stability."""
    y = x - x.max(-1, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(-1, keepdims=True)
    return y


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _softmax_fwd_kernel(x, y):
    for r in prange(x.shape[0]):  # rows are independent: one thread per block of rows
        _softmax_row(x[r], y[r], x.shape[1], x.dtype.type(1))  # sc = 1 is exact


def softmax_fwd_nb(x):
    """x: (N, D) -> y (N, D); fused max / exp / normalize per row, prange over rows."""
    y = np.empty(x.shape, x.dtype)
    _softmax_fwd_kernel(x, y)
    return y


def softmax_bwd_ref(y, dy):
    """y, dy: (N, D) -> dx (N, D) = y * (dy - sum(y * dy, -1))."""
    return y * (dy - (y * dy).sum(-1, keepdims=True))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _softmax_bwd_kernel(y, dy, dx):
    for r in prange(y.shape[0]):
        _softmax_bwd_row(y[r], dy[r], dx[r], y.shape[1], y.dtype.type(1))


def softmax_bwd_nb(y, dy):
    """y, dy: (N, D) -> dx (N, D); one dot and one elementwise sweep per row."""
    dx = np.empty(y.shape, y.dtype)
    _softmax_bwd_kernel(y, dy, dx)
    return dx


# ----------------------------------------------------------------------------------------------
# causal attention softmax: p = softmax(scale * att), key j > query i masked to exactly 0


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


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attn_softmax_fwd_kernel(att, p, Tq, scale):
    off = att.shape[1] - Tq  # att, p: (B*NH*Tq, Tk) views, rows (b, h, i); query i is at off + i
    sc = att.dtype.type(scale)
    for r in prange(att.shape[0]):
        _softmax_row(att[r], p[r], off + r % Tq + 1, sc)  # keys 0..off+i are visible


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


def attn_softmax_bwd_ref(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk) = scale * p * (dp - sum(p * dp, -1))."""
    # masked entries have p == 0, so their gradient is 0 without an explicit mask
    return p.dtype.type(scale) * p * (dp - (p * dp).sum(-1, keepdims=True))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attn_softmax_bwd_kernel(p, dp, datt, Tq, scale):
    off = p.shape[1] - Tq  # (B*NH*Tq, Tk) views
    sc = p.dtype.type(scale)
    for r in prange(p.shape[0]):
        _softmax_bwd_row(p[r], dp[r], datt[r], off + r % Tq + 1, sc)


def attn_softmax_bwd_nb(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk); masked entries written as 0 directly."""
    datt = np.empty(p.shape, p.dtype)
    Tq, Tk = p.shape[-2:]
    _attn_softmax_bwd_kernel(p.reshape(-1, Tk), dp.reshape(-1, Tk), datt.reshape(-1, Tk), Tq, scale)
    return datt


# ----------------------------------------------------------------------------------------------
# cross-entropy over the vocabulary, each row weighted by a mask (0 = the row does not count)


def _check_targets(targets, V):
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"cross-entropy targets must lie in [0, {V})")


def ce_fwd_ref(logits, targets, mask):
    """logits (N, V), targets (N,) int64, mask (N,) -> losses (N,), lse (N,) logsumexp."""
    _check_targets(targets, logits.shape[1])
    m = logits.max(-1)  # (N,)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    losses = mask * (lse - logits[np.arange(len(targets)), targets])
    return losses, lse


@njit(cache=True, fastmath=False, error_model="numpy")
def _logsumexp_row(x, buf, n):
    """x, buf: (>= n,) -> float64 logsumexp(x[:n]); buf is scratch for the exps."""
    m = _row_max(x, n)
    for j in range(n):  # stored, not summed on the fly: a running sum would block SIMD
        buf[j] = _exp_neg(x[j] - m)
    return m + math.log(_row_sum(buf, n))


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


def ce_bwd_ref(logits, targets, mask, lse, dlosses):
    """... lse (N,), dlosses (N,) -> dlogits (N, V) = c * (softmax - onehot), c = dlosses*mask."""
    _check_targets(targets, logits.shape[1])
    dlogits = np.exp(logits - lse[:, None])  # softmax, from the saved logsumexp
    dlogits[np.arange(len(targets)), targets] -= 1
    dlogits *= (dlosses * mask)[:, None]
    return dlogits


@njit(cache=True, fastmath=False, error_model="numpy")
def _ce_bwd_row(x, lse, c, t, dx):
    """x, dx: (V,) -> dx = c * (exp(x - lse) - onehot(t))."""
    if c == 0:  # masked rows (prompt tokens, padding): no exps to compute
        dx[:] = 0
        return
    # lse >= max(x) even after rounding, so every exp argument is <= 0
    for j in range(x.shape[0]):
        dx[j] = _exp_neg(x[j] - lse) * c
    dx[t] = (_exp_neg(x[t] - lse) - x.dtype.type(1)) * c  # same operations as the ref


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
# LayerNorm over the last axis, biased variance like PyTorch; llm.c's layernorm pair


def layernorm_fwd_ref(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> y (N, C), mean (N,), rstd (N,) saved for backward."""
    mean = x.mean(-1)
    xc = x - mean[:, None]
    rstd = 1 / np.sqrt((xc * xc).mean(-1) + x.dtype.type(eps))
    y = xc * rstd[:, None]
    y *= w
    y += b
    return y, mean, rstd


@njit(cache=True, fastmath=False, error_model="numpy")
def _layernorm_row(x, w, b, y, eps):
    """x, w, b, y: (C,) -> y = (x - mean) * rstd * w + b; returns (mean, rstd)."""
    dt, C = x.dtype.type, x.shape[0]
    mu = dt(_row_sum(x, C) / C)  # pass 1: mean
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


def layernorm_bwd_ref(dy, x, w, mean, rstd):
    """dy, x (N, C), w (C,), mean, rstd (N,) -> dx (N, C), dw (C,), db (C,)."""
    norm = (x - mean[:, None]) * rstd[:, None]  # (N, C) the normalized input
    dnorm = dy * w
    # dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)); reference: llm.c
    dx = dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True)
    dx *= rstd[:, None]
    return dx, (dy * norm).sum(0), dy.sum(0)


@njit(cache=True, fastmath=False, error_model="numpy")
def _layernorm_bwd_row(dy, x, w, mu, rs, dx, dw, db):
    """dy, x, w, dx: (C,); dw, db: (C,) float64 partial sums this row adds into."""
    dt, C = x.dtype.type, x.shape[0]
    # pass 1: the two row means of the backward, mean(dnorm) and mean(dnorm * norm)
    g1 = dt(_row_dot(dy, w, C) / C)
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
# GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(k (x + a x^3))), k = sqrt(2/pi)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_fwd_ref(x):
    """x: any shape -> y, same shape; GPT-2's formula, in place on one temporary."""
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
    """x, dy: any shape -> dx = dy * 0.5 (1 + t + x (1 - t^2) du/dx), t = tanh(u)."""
    x2 = x * x
    t = x2 * GELU_A
    t += 1
    t *= x
    t *= GELU_K
    np.tanh(t, out=t)  # t = tanh(k (x + a x^3))
    du = x2  # reuse: du/dx = k (1 + 3 a x^2)
    du *= 3 * GELU_A
    du += 1
    du *= GELU_K
    dx = t * t
    np.subtract(1, dx, out=dx)  # 1 - t^2
    dx *= du
    dx *= x
    dx += t
    dx += 1
    dx *= 0.5
    dx *= dy
    return dx


# The kernels use 0.5 (1 + tanh(u)) = sigmoid(2u), written with e = exp(-2|u|) <= 1: one exp
# instead of a tanh, no overflow, and full precision in the left tail where 1 + tanh(u) cancels.


@njit(cache=True, fastmath=False, error_model="numpy")
def _gelu_fwd_span(x, y):
    """x, y: (n,) -> y = x * sigmoid(2u)."""
    dt = x.dtype.type
    k, a = dt(0.7978845608028654), dt(0.044715)  # GELU_K, GELU_A (no globals in kernels)
    zero, one, two = dt(0), dt(1), dt(2)
    for i in range(x.shape[0]):
        u = k * (x[i] + a * x[i] * x[i] * x[i])
        e = _exp_neg(-two * abs(u))
        y[i] = x[i] * (one / (one + e) if u >= zero else e / (one + e))


@njit(cache=True, fastmath=False, error_model="numpy")
def _gelu_bwd_span(x, dy, dx):
    """x, dy, dx: (n,) -> dx = dy * (s + 2 x s (1 - s) du/dx), s = sigmoid(2u)."""
    dt = x.dtype.type
    k, a = dt(0.7978845608028654), dt(0.044715)  # GELU_K, GELU_A
    zero, one, two, three = dt(0), dt(1), dt(2), dt(3)
    for i in range(x.shape[0]):
        x2 = x[i] * x[i]
        u = k * (x[i] + a * x2 * x[i])
        e = _exp_neg(-two * abs(u))
        s = one / (one + e) if u >= zero else e / (one + e)
        ss = e / ((one + e) * (one + e))  # s (1 - s), the same for u and -u
        dx[i] = dy[i] * (s + two * x[i] * ss * (k * (one + three * a * x2)))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _gelu_fwd_kernel(x, y):
    n = x.shape[0]  # flat views, cut into 16K-element spans
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _gelu_fwd_span(x[lo:hi], y[lo:hi])


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _gelu_bwd_kernel(x, dy, dx):
    n = x.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _gelu_bwd_span(x[lo:hi], dy[lo:hi], dx[lo:hi])


def gelu_fwd_nb(x):
    """x: any shape -> y, same shape."""
    y = np.empty(x.shape, x.dtype)
    _gelu_fwd_kernel(x.reshape(-1), y.reshape(-1))
    return y


def gelu_bwd_nb(x, dy):
    """x, dy: any shape -> dx, same shape."""
    dx = np.empty(x.shape, x.dtype)
    _gelu_bwd_kernel(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------------------------
# Dropout from a counter-based hash: element i of a call with seed s is kept when the top 24 bits
# of splitmix64(s + (i + 1) * golden) are >= p * 2^24 (reference: Steele, Lea, Flood 2014, "Fast
# splittable pseudorandom number generators", the finaliser of Java's SplittableRandom). Each
# element depends only on (s, i): the mask is the same at any thread count and the kernel keeps
# no RNG state; the engine draws one seed per call from its seeded generator.

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _drop_threshold(p):
    """Elements whose 24-bit hash is below this are dropped: P(drop) = p to within 2^-24."""
    return np.uint64(round(p * (1 << 24)))


def dropout_fwd_ref(x, p, seed):
    """x: any shape (C order), p in [0, 1), seed < 2^64 -> y = x * keep / (1 - p), keep (uint8)."""
    u = np.uint64
    z = np.arange(1, x.size + 1, dtype=u) * u(_GOLDEN) + u(seed)  # uint64 arithmetic wraps
    z = (z ^ (z >> u(30))) * u(_MIX1)
    z = (z ^ (z >> u(27))) * u(_MIX2)
    z ^= z >> u(31)
    keep = ((z >> u(40)) >= _drop_threshold(p)).astype(np.uint8).reshape(x.shape)
    return x * keep * x.dtype.type(1.0 / (1.0 - p)), keep


def dropout_bwd_ref(dy, keep, p):
    """dy, keep: one shape -> dx = dy * keep / (1 - p)."""
    return dy * keep * dy.dtype.type(1.0 / (1.0 - p))


@njit(cache=True, fastmath=False, error_model="numpy")
def _dropout_fwd_span(x, first, threshold, seed, scale, y, keep):
    """x, y, keep: (n,), element j is element first + j of the call -> y, keep."""
    # _GOLDEN, _MIX1, _MIX2 (no globals in kernels)
    golden, mix1, mix2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    s30, s27, s31, s40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
    for j in range(x.shape[0]):
        z = np.uint64(first + j + 1) * golden + seed
        z = (z ^ (z >> s30)) * mix1
        z = (z ^ (z >> s27)) * mix2
        z = z ^ (z >> s31)
        k = np.uint8((z >> s40) >= threshold)
        keep[j] = k
        y[j] = x[j] * x.dtype.type(k) * scale


@njit(cache=True, fastmath=False, error_model="numpy")
def _dropout_bwd_span(dy, keep, scale, dx):
    for j in range(dy.shape[0]):
        dx[j] = dy[j] * dy.dtype.type(keep[j]) * scale


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _dropout_fwd_kernel(x, threshold, seed, scale, y, keep):
    n = x.shape[0]  # flat views, cut into 16K-element spans
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _dropout_fwd_span(x[lo:hi], lo, threshold, seed, scale, y[lo:hi], keep[lo:hi])


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _dropout_bwd_kernel(dy, keep, scale, dx):
    n = dy.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _dropout_bwd_span(dy[lo:hi], keep[lo:hi], scale, dx[lo:hi])


def dropout_fwd_nb(x, p, seed):
    """x: any shape (C order), p in [0, 1), seed < 2^64 -> y, keep (uint8)."""
    y, keep = np.empty(x.shape, x.dtype), np.empty(x.shape, np.uint8)
    _dropout_fwd_kernel(x.reshape(-1), _drop_threshold(p), np.uint64(seed), x.dtype.type(1.0 / (1.0 - p)),
                        y.reshape(-1), keep.reshape(-1))
    return y, keep


def dropout_bwd_nb(dy, keep, p):
    """dy, keep: one shape (C order) -> dx."""
    dx = np.empty(dy.shape, dy.dtype)
    _dropout_bwd_kernel(dy.reshape(-1), keep.reshape(-1), dy.dtype.type(1.0 / (1.0 - p)), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------------------------
# Embedding backward: scatter-add the rows of dout into the rows of dW named by idx (a token that
# occurs twice gets both rows). np.add.at does it one element at a time (~6 ns per element); the
# kernel splits the columns between threads, so no two threads ever add into the same element,
# and adds the rows in index order, as np.add.at does: the two agree bit for bit.


def embedding_bwd_ref(idx, dout, V):
    """idx (N,) int64 in [0, V), dout (N, C) -> dW (V, C)."""
    dw = np.zeros((V, dout.shape[1]), dout.dtype)
    np.add.at(dw, idx, dout)
    return dw


@njit(cache=True, fastmath=False, error_model="numpy")
def _add_into(dst, src):
    for c in range(dst.shape[0]):
        dst[c] += src[c]


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _embedding_bwd_kernel(idx, dout, dw):
    C = dout.shape[1]
    for blk in prange((C + 63) // 64):  # 64-column strips
        lo, hi = blk * 64, min((blk + 1) * 64, C)
        for i in range(idx.shape[0]):
            _add_into(dw[idx[i], lo:hi], dout[i, lo:hi])


def embedding_bwd_nb(idx, dout, V):
    """idx (N,) int64 in [0, V), dout (N, C) -> dW (V, C)."""
    dw = np.zeros((V, dout.shape[1]), dout.dtype)
    _embedding_bwd_kernel(idx, dout, dw)
    return dw


# ----------------------------------------------------------------------------------------------
# AdamW, in place; reference: PyTorch AdamW docs (decoupled weight decay, bias-corrected moments)


def adamw_update_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """p, g, m, v: one shape; p, m, v updated in place; step counts from 1."""
    dt = p.dtype.type
    step_size = dt(lr / (1 - beta1**step))  # lr / bias_correction1
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    p *= dt(1 - lr * weight_decay)  # decoupled weight decay
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * g * g
    denom = np.sqrt(v)  # sqrt(vhat) + eps = sqrt(v) / sqrt(bias_correction2) + eps
    denom /= bc2_sqrt
    denom += dt(eps)
    np.divide(m, denom, out=denom)
    denom *= step_size
    p -= denom


@njit(cache=True, fastmath=False, error_model="numpy")
def _adamw_span(p, g, m, v, decay, b1, c1, b2, c2, eps, bc2_sqrt, step_size):
    """p, g, m, v: (n,); constants already in the arrays' dtype."""
    for i in range(p.shape[0]):
        m[i] = b1 * m[i] + c1 * g[i]
        v[i] = b2 * v[i] + c2 * g[i] * g[i]
        p[i] = p[i] * decay - m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps) * step_size


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _adamw_kernel(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    dt = p.dtype.type  # the same constants, rounded the same way, as adamw_update_ref
    step_size = dt(lr / (1 - beta1**step))
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    decay, b1, c1, b2, c2 = dt(1 - lr * weight_decay), dt(beta1), dt(1 - beta1), dt(beta2), dt(1 - beta2)
    n = p.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _adamw_span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi],
                    decay, b1, c1, b2, c2, dt(eps), bc2_sqrt, step_size)


def adamw_update_nb(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Same contract as adamw_update_ref; one fused sweep over flat views."""
    if not all(a.flags.c_contiguous for a in (p, g, m, v)):  # else reshape copies, updates get lost
        raise ValueError("adamw_update_nb needs C-contiguous p, g, m, v")
    _adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                  lr, beta1, beta2, eps, weight_decay, step)


# ----------------------------------------------------------------------------------------------
# attention of one new token against a KV cache (generation)


def _check_n_valid(n_valid, Tmax):
    if not 1 <= n_valid <= Tmax:
        raise ValueError(f"n_valid={n_valid} outside [1, {Tmax}]")


def attn_decode_fwd_ref(q, k_cache, v_cache, n_valid, scale):
    """q (B, NH, 1, hs), k/v_cache (B, NH, Tmax, hs) -> y (B, NH, 1, hs) over n_valid keys."""
    _check_n_valid(n_valid, k_cache.shape[2])
    k, v = k_cache[:, :, :n_valid], v_cache[:, :, :n_valid]  # (B, NH, n, hs) views
    att = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)  # (B, NH, 1, n)
    att -= att.max(-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(-1, keepdims=True)
    return att @ v  # (B, NH, 1, hs)


@njit(cache=True, fastmath=False, error_model="numpy")
def _attn_decode_head(q, k, v, y, n, sc):
    """q, y: (hs,); k, v: (Tmax, hs) -> y = softmax(sc * k[:n] @ q) @ v[:n]."""
    s = np.empty(n, q.dtype)  # scores of the valid keys
    for t in range(n):
        s[t] = q.dtype.type(_row_dot(q, k[t], q.shape[0])) * sc
    m = _row_max(s, n)
    for t in range(n):
        s[t] = _exp_neg(s[t] - m)
    acc = np.zeros(q.shape[0], np.float64)  # unnormalized p @ v, normalized once at the end
    for t in range(n):
        for d in range(q.shape[0]):
            acc[d] += s[t] * v[t, d]
    inv = 1.0 / _row_sum(s, n)
    for d in range(q.shape[0]):
        y[d] = acc[d] * inv


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _attn_decode_kernel(q, k_cache, v_cache, n_valid, scale, y):
    B, NH = q.shape[0], q.shape[1]
    sc = q.dtype.type(scale)
    for bh in prange(B * NH):  # one (sequence, head) per iteration
        b, h = bh // NH, bh % NH
        _attn_decode_head(q[b, h, 0], k_cache[b, h], v_cache[b, h], y[b, h, 0], n_valid, sc)


def attn_decode_fwd_nb(q, k_cache, v_cache, n_valid, scale):
    """Same contract as attn_decode_fwd_ref; prange over (b, h), softmax and p @ v fused."""
    _check_n_valid(n_valid, k_cache.shape[2])
    y = np.empty(q.shape, q.dtype)
    _attn_decode_kernel(q, k_cache, v_cache, n_valid, scale, y)
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
    """att: (B, NH, Tq, Tk) -> causal softmax(scale * att), queries the last Tq positions."""
    f = attn_softmax_fwd_nb if _use_nb("attn_softmax") else attn_softmax_fwd_ref
    return f(att, float(scale))


def attn_softmax_bwd(p, dp, scale):
    """p, dp: (B, NH, Tq, Tk) -> datt (B, NH, Tq, Tk)."""
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


def dropout_fwd(x, p, seed):
    """x: any shape -> y = x * keep / (1 - p), keep (uint8, x's shape)."""
    f = dropout_fwd_nb if _use_nb("dropout") else dropout_fwd_ref
    return f(np.ascontiguousarray(x), float(p), int(seed))


def dropout_bwd(dy, keep, p):
    """dy, keep: one shape -> dx."""
    f = dropout_bwd_nb if _use_nb("dropout") else dropout_bwd_ref
    return f(np.ascontiguousarray(dy), keep, float(p))


def embedding_bwd(idx, dout, V):
    """idx: int (N,) in [0, V), dout (N, C) -> dW (V, C), repeated ids summed."""
    f = embedding_bwd_nb if _use_nb("embedding") else embedding_bwd_ref
    return f(np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(dout), int(V))


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """In place on p, m, v (any shape, C-contiguous); step >= 1."""
    f = adamw_update_nb if _use_nb("adamw") else adamw_update_ref
    f(p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))


def attn_decode_fwd(q, k_cache, v_cache, n_valid, scale):
    """q (B, NH, 1, hs), caches (B, NH, Tmax, hs) -> y (B, NH, 1, hs)."""
    f = attn_decode_fwd_nb if _use_nb("attn_decode") else attn_decode_fwd_ref
    return f(q, k_cache, v_cache, int(n_valid), float(scale))
