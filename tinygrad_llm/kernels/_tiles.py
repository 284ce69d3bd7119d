"""Small matrix products inside Numba kernels, register-tiled: `gemm_tiles(A, B, C, M, N, K,
accumulate)` computes C[:M, :N] (+)= A[:M, :K] @ B[:K, :N] in tiles of 8 x 16, each tile held in
sixteen 8-tuples (one SIMD register each once vectorized) while the K products stream through.

Why tiles: an axpy loop (C[i, :] += a * B[d, :]) keeps its accumulators in memory, a load and a
store per multiply-add; on the 2-core VM that ran at ~15 GFLOP/s. A tile keeps 128 accumulators
in registers and loads one row of B per 8 rows of A: ~55-75 GFLOP/s at one thread (8 x 8 tiles:
~45-60), about half of OpenBLAS's own GEMM. Two things make LLVM emit the SIMD code:
- Numba's SLP vectorizer, off by default since numba#8705 (a miscompilation), must be on while
  the calling kernel compiles: `run_with_slp` turns it on for that one call (the machine code is
  then cached like any other). Tests compare every kernel built on these tiles to its reference.
- Indices are unsigned (np.uint64): a signed index carries Python's negative-index wrap-around
  branch, which stops the vectorizer.
fastmath is {"contract"} only: a * b + c becomes one fused multiply-add (one rounding instead of
two); no sum is reordered, so results stay reproducible.

M must be a multiple of 8 and N of 16 (callers pad with zeros); A may be a transposed view.
"""
import numpy as np
from numba import njit
from numba.core import config as numba_config

TILE_ROWS, TILE_COLS = 8, 16
_FM = {"contract"}


def run_with_slp(kernel, *args):
    """kernel(*args) with Numba's SLP vectorizer on, so that its first call (the compilation, or
    the load from Numba's cache) builds the tiles' SIMD code."""
    before = numba_config.SLP_VECTORIZE
    numba_config.SLP_VECTORIZE = 1
    try:
        return kernel(*args)
    finally:
        numba_config.SLP_VECTORIZE = before


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _load8(x, j):
    """x[j:j + 8] as a tuple; j unsigned."""
    u = np.uint64
    return (x[j], x[j + u(1)], x[j + u(2)], x[j + u(3)], x[j + u(4)], x[j + u(5)], x[j + u(6)], x[j + u(7)])


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _fma8(c, a, b):
    """c + a * b for 8-tuples c, b and a scalar a."""
    return (c[0] + a * b[0], c[1] + a * b[1], c[2] + a * b[2], c[3] + a * b[3],
            c[4] + a * b[4], c[5] + a * b[5], c[6] + a * b[6], c[7] + a * b[7])


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _store8(x, j, c):
    """x[j:j + 8] = c; j unsigned."""
    u = np.uint64
    x[j], x[j + u(1)], x[j + u(2)], x[j + u(3)], x[j + u(4)], x[j + u(5)], x[j + u(6)], x[j + u(7)] = c


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _tile(A, B, C, i0, j0, K, accumulate):
    """C[i0:i0+8, j0:j0+16] (+)= A[i0:i0+8, :K] @ B[:K, j0:j0+16]: per row r two accumulator
    tuples, c_r for columns j0..j0+7 and e_r for j0+8..j0+15 (16 registers in all)."""
    u = np.uint64
    i0, j0 = u(i0), u(j0)
    j8 = j0 + u(8)
    rows = (i0, i0 + u(1), i0 + u(2), i0 + u(3), i0 + u(4), i0 + u(5), i0 + u(6), i0 + u(7))
    i1, i2, i3, i4, i5, i6, i7 = rows[1:]
    if accumulate:
        c0, c1, c2, c3 = _load8(C[i0], j0), _load8(C[i1], j0), _load8(C[i2], j0), _load8(C[i3], j0)
        c4, c5, c6, c7 = _load8(C[i4], j0), _load8(C[i5], j0), _load8(C[i6], j0), _load8(C[i7], j0)
        e0, e1, e2, e3 = _load8(C[i0], j8), _load8(C[i1], j8), _load8(C[i2], j8), _load8(C[i3], j8)
        e4, e5, e6, e7 = _load8(C[i4], j8), _load8(C[i5], j8), _load8(C[i6], j8), _load8(C[i7], j8)
    else:
        z = C.dtype.type(0)
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = (z, z, z, z, z, z, z, z)
        e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = c0
    for d in range(u(K)):
        b, bb = _load8(B[d], j0), _load8(B[d], j8)              # one row of B, shared by 8 rows of A
        a = A[i0, d]
        c0, e0 = _fma8(c0, a, b), _fma8(e0, a, bb)
        a = A[i1, d]
        c1, e1 = _fma8(c1, a, b), _fma8(e1, a, bb)
        a = A[i2, d]
        c2, e2 = _fma8(c2, a, b), _fma8(e2, a, bb)
        a = A[i3, d]
        c3, e3 = _fma8(c3, a, b), _fma8(e3, a, bb)
        a = A[i4, d]
        c4, e4 = _fma8(c4, a, b), _fma8(e4, a, bb)
        a = A[i5, d]
        c5, e5 = _fma8(c5, a, b), _fma8(e5, a, bb)
        a = A[i6, d]
        c6, e6 = _fma8(c6, a, b), _fma8(e6, a, bb)
        a = A[i7, d]
        c7, e7 = _fma8(c7, a, b), _fma8(e7, a, bb)
    for i, c, e in ((i0, c0, e0), (i1, c1, e1), (i2, c2, e2), (i3, c3, e3),
                    (i4, c4, e4), (i5, c5, e5), (i6, c6, e6), (i7, c7, e7)):
        _store8(C[i], j0, c)
        _store8(C[i], j8, e)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def gemm_tiles(A, B, C, M, N, K, accumulate):
    """C[:M, :N] = A[:M, :K] @ B[:K, :N] (accumulate: C[:M, :N] += ...); M a multiple of 8,
    N of 16."""
    for i0 in range(0, M, TILE_ROWS):
        for j0 in range(0, N, TILE_COLS):
            _tile(A, B, C, i0, j0, K, accumulate)
