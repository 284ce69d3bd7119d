"""Softmax over the last axis of (N, D) rows: y = softmax(x), dx = y * (dy - sum(y * dy)).
The engine's softmax op and the KV cache's attention over cached keys use it.
"""
import numpy as np
from numba import njit, prange

from ._helpers import softmax_bwd_row, softmax_row
from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def softmax_fwd_ref(x):
    """x: (N, D) -> y (N, D) = softmax(x, -1), max subtracted first for stability."""
    y = x - x.max(-1, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(-1, keepdims=True)
    return y


def softmax_bwd_ref(y, dy):
    """y, dy: (N, D) -> dx (N, D) = y * (dy - sum(y * dy, -1))."""
    return y * (dy - (y * dy).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _softmax_fwd_kernel(x, y):
    for r in prange(x.shape[0]):  # rows are independent: one thread per block of rows
        softmax_row(x[r], y[r], x.shape[1], x.dtype.type(1))  # sc = 1 is exact


def softmax_fwd_nb(x):
    """x: (N, D) -> y (N, D); fused max / exp / normalize per row, prange over rows."""
    y = np.empty(x.shape, x.dtype)
    _softmax_fwd_kernel(x, y)
    return y


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _softmax_bwd_kernel(y, dy, dx):
    for r in prange(y.shape[0]):
        softmax_bwd_row(y[r], dy[r], dx[r], y.shape[1], y.dtype.type(1))


def softmax_bwd_nb(y, dy):
    """y, dy: (N, D) -> dx (N, D); one dot and one elementwise sweep per row."""
    dx = np.empty(y.shape, y.dtype)
    _softmax_bwd_kernel(y, dy, dx)
    return dx


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls


def softmax_fwd(x):
    """x: (N, D) -> softmax over the last axis."""
    return softmax_fwd_nb(x) if use_numba("softmax") else softmax_fwd_ref(x)


def softmax_bwd(y, dy):
    """y, dy: (N, D) -> dx (N, D)."""
    return softmax_bwd_nb(y, dy) if use_numba("softmax") else softmax_bwd_ref(y, dy)
