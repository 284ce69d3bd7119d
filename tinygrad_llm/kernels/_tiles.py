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


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _fma_rows(c, a, b):
    """c[r] + a[r] * b for the 8 rows of a tile half: c 8 tuples of 8, a 8 scalars, b a tuple of 8."""
    return (_fma8(c[0], a[0], b), _fma8(c[1], a[1], b), _fma8(c[2], a[2], b), _fma8(c[3], a[3], b),
            _fma8(c[4], a[4], b), _fma8(c[5], a[5], b), _fma8(c[6], a[6], b), _fma8(c[7], a[7], b))


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _store_rows(C, r, j, c):
    """C[r[k], j:j + 8] = c[k] for the 8 rows, written out: a loop would index the tuple c at
    run time, which keeps it in memory instead of registers."""
    _store8(C[r[0]], j, c[0]), _store8(C[r[1]], j, c[1]), _store8(C[r[2]], j, c[2]), _store8(C[r[3]], j, c[3])
    _store8(C[r[4]], j, c[4]), _store8(C[r[5]], j, c[5]), _store8(C[r[6]], j, c[6]), _store8(C[r[7]], j, c[7])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _tile(A, B, C, i0, j0, K, accumulate):
    """C[i0:i0+8, j0:j0+16] (+)= A[i0:i0+8, :K] @ B[:K, j0:j0+16]: the left half of each row
    (columns j0..j0+7) accumulates in c[r], the right half in e[r] (16 registers in all)."""
    u = np.uint64
    j0, j8 = u(j0), u(j0) + u(8)
    r = (u(i0), u(i0) + u(1), u(i0) + u(2), u(i0) + u(3), u(i0) + u(4), u(i0) + u(5), u(i0) + u(6), u(i0) + u(7))
    if accumulate:
        c = (_load8(C[r[0]], j0), _load8(C[r[1]], j0), _load8(C[r[2]], j0), _load8(C[r[3]], j0),
             _load8(C[r[4]], j0), _load8(C[r[5]], j0), _load8(C[r[6]], j0), _load8(C[r[7]], j0))
        e = (_load8(C[r[0]], j8), _load8(C[r[1]], j8), _load8(C[r[2]], j8), _load8(C[r[3]], j8),
             _load8(C[r[4]], j8), _load8(C[r[5]], j8), _load8(C[r[6]], j8), _load8(C[r[7]], j8))
    else:
        z = C.dtype.type(0)
        z8 = (z, z, z, z, z, z, z, z)
        c = e = (z8, z8, z8, z8, z8, z8, z8, z8)
    for d in range(u(K)):
        a = (A[r[0], d], A[r[1], d], A[r[2], d], A[r[3], d], A[r[4], d], A[r[5], d], A[r[6], d], A[r[7], d])
        c = _fma_rows(c, a, _load8(B[d], j0))                 # one row of B, shared by the 8 rows of A
        e = _fma_rows(e, a, _load8(B[d], j8))
    _store_rows(C, r, j0, c)
    _store_rows(C, r, j8, e)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def gemm_tiles(A, B, C, M, N, K, accumulate):
    """C[:M, :N] = A[:M, :K] @ B[:K, :N] (accumulate: C[:M, :N] += ...); M a multiple of 8,
    N of 16."""
    for i0 in range(0, M, TILE_ROWS):
        for j0 in range(0, N, TILE_COLS):
            _tile(A, B, C, i0, j0, K, accumulate)
