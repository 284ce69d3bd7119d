"""GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(k (x + a x^3))), k = sqrt(2/pi), on an
array of any shape, and its backward.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg
from .backend import use_numba


GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


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


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures

# The kernels use 0.5 (1 + tanh(u)) = sigmoid(2u), written with e = exp(-2|u|) <= 1: one exp
# instead of a tanh, no overflow, and full precision in the left tail where 1 + tanh(u) cancels.
# Flat views are cut into 16K-element spans, one span per prange iteration.


@njit(cache=True, fastmath=False, error_model="numpy")
def _gelu_fwd_span(x, y):
    """x, y: (n,) -> y = x * sigmoid(2u)."""
    dt = x.dtype.type
    k, a = dt(0.7978845608028654), dt(0.044715)  # GELU_K, GELU_A (no globals in kernels)
    zero, one, two = dt(0), dt(1), dt(2)
    for i in range(x.shape[0]):
        u = k * (x[i] + a * x[i] * x[i] * x[i])
        e = exp_neg(-two * abs(u))
        y[i] = x[i] * (one / (one + e) if u >= zero else e / (one + e))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _gelu_fwd_kernel(x, y):
    n = x.shape[0]  # flat views, cut into 16K-element spans
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _gelu_fwd_span(x[lo:hi], y[lo:hi])


def gelu_fwd_nb(x):
    """x: any shape -> y, same shape."""
    y = np.empty(x.shape, x.dtype)
    _gelu_fwd_kernel(x.reshape(-1), y.reshape(-1))
    return y


@njit(cache=True, fastmath=False, error_model="numpy")
def _gelu_bwd_span(x, dy, dx):
    """x, dy, dx: (n,) -> dx = dy * (s + 2 x s (1 - s) du/dx), s = sigmoid(2u)."""
    dt = x.dtype.type
    k, a = dt(0.7978845608028654), dt(0.044715)  # GELU_K, GELU_A
    zero, one, two, three = dt(0), dt(1), dt(2), dt(3)
    for i in range(x.shape[0]):
        x2 = x[i] * x[i]
        u = k * (x[i] + a * x2 * x[i])
        e = exp_neg(-two * abs(u))
        s = one / (one + e) if u >= zero else e / (one + e)
        ss = e / ((one + e) * (one + e))  # s (1 - s), the same for u and -u
        dx[i] = dy[i] * (s + two * x[i] * ss * (k * (one + three * a * x2)))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _gelu_bwd_kernel(x, dy, dx):
    n = x.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _gelu_bwd_span(x[lo:hi], dy[lo:hi], dx[lo:hi])


def gelu_bwd_nb(x, dy):
    """x, dy: any shape -> dx, same shape."""
    dx = np.empty(x.shape, x.dtype)
    _gelu_bwd_kernel(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls


def gelu_fwd(x):
    """x: any shape -> GELU(x)."""
    return gelu_fwd_nb(x) if use_numba("gelu") else gelu_fwd_ref(x)


def gelu_bwd(x, dy):
    """x, dy: any shape -> dx."""
    return gelu_bwd_nb(x, dy) if use_numba("gelu") else gelu_bwd_ref(x, dy)
