"""Dropout from a counter-based hash: element i of a call with seed s is kept when the top 24 bits
of splitmix64(s + (i + 1) * golden) are >= p * 2^24 (reference: Steele, Lea, Flood 2014, "Fast
splittable pseudorandom number generators", the finaliser of Java's SplittableRandom). Each
element depends only on (s, i): the mask is the same at any thread count and the kernel keeps
no RNG state; the engine draws one seed per call from its seeded generator.
"""
import numpy as np
from numba import njit, prange

from .backend import use_numba


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _drop_threshold(p):
    """Elements whose 24-bit hash is below this are dropped: P(drop) = p to within 2^-24."""
    return np.uint64(round(p * (1 << 24)))


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


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


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures
# (flat views cut into 16K-element spans, one span per prange iteration)


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


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _dropout_fwd_kernel(x, threshold, seed, scale, y, keep):
    n = x.shape[0]  # flat views, cut into 16K-element spans
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _dropout_fwd_span(x[lo:hi], lo, threshold, seed, scale, y[lo:hi], keep[lo:hi])


def dropout_fwd_nb(x, p, seed):
    """x: any shape (C order), p in [0, 1), seed < 2^64 -> y, keep (uint8)."""
    y, keep = np.empty(x.shape, x.dtype), np.empty(x.shape, np.uint8)
    _dropout_fwd_kernel(x.reshape(-1), _drop_threshold(p), np.uint64(seed), x.dtype.type(1.0 / (1.0 - p)),
                        y.reshape(-1), keep.reshape(-1))
    return y, keep


@njit(cache=True, fastmath=False, error_model="numpy")
def _dropout_bwd_span(dy, keep, scale, dx):
    for j in range(dy.shape[0]):
        dx[j] = dy[j] * dy.dtype.type(keep[j]) * scale


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _dropout_bwd_kernel(dy, keep, scale, dx):
    n = dy.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _dropout_bwd_span(dy[lo:hi], keep[lo:hi], scale, dx[lo:hi])


def dropout_bwd_nb(dy, keep, p):
    """dy, keep: one shape (C order) -> dx."""
    dx = np.empty(dy.shape, dy.dtype)
    _dropout_bwd_kernel(dy.reshape(-1), keep.reshape(-1), dy.dtype.type(1.0 / (1.0 - p)), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def dropout_fwd(x, p, seed):
    """x: any shape -> y = x * keep / (1 - p), keep (uint8, x's shape)."""
    f = dropout_fwd_nb if use_numba("dropout") else dropout_fwd_ref
    return f(np.ascontiguousarray(x), float(p), int(seed))


def dropout_bwd(dy, keep, p):
    """dy, keep: one shape -> dx."""
    f = dropout_bwd_nb if use_numba("dropout") else dropout_bwd_ref
    return f(np.ascontiguousarray(dy), keep, float(p))
