"""Embedding backward: scatter-add the rows of dout into the rows of dW named by idx (a token that
occurs twice gets both rows). np.add.at does it one element at a time (~6 ns per element); the
kernel splits the columns between threads, so no two threads ever add into the same element,
and adds the rows in index order, as np.add.at does: the two agree bit for bit.
"""
import numpy as np
from numba import njit, prange

from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def embedding_bwd_ref(idx, dout, V):
    """idx (N,) int64 in [0, V), dout (N, C) -> dW (V, C)."""
    dw = np.zeros((V, dout.shape[1]), dout.dtype)
    np.add.at(dw, idx, dout)
    return dw


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures


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
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def embedding_bwd(idx, dout, V):
    """idx: int (N,) in [0, V), dout (N, C) -> dW (V, C), repeated ids summed."""
    f = embedding_bwd_nb if use_numba("embedding") else embedding_bwd_ref
    return f(np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(dout), int(V))
