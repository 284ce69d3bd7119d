"""The head split of attention with the rotary embedding fused in, and its backward: c_attn's
output (B, T, 3C) -> q, k, v as heads (3, B, NH, T, hs) with q and k rotated (RoPE, the
rotate-half convention of engine.apply_rope), in one pass instead of a transposing copy and
two rotations of five NumPy passes each; the backward rotates dq, dk back and merges the heads
into (B, T, 3C) in one pass too. cos, sin: (B|1, T, hs), the rows of each token's position.
"""
import numpy as np
from numba import njit, prange

from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy (the engine re-exports the first three; the KV cache and tests use them)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (GPT-NeoX / Hugging Face LLaMA convention)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """x' = x*cos + rotate_half(x)*sin: each pair (x_j, x_{j+hs/2}) turned by its angle."""
    return x * cos + rotate_half(x) * sin


def apply_rope_transposed(g, cos, sin):
    """The transpose of apply_rope (the backward): rotate_half is x -> R x with R^T = -R, so
    d/dx of <g, x*cos + R x*sin> is g*cos + R^T (g*sin) = g*cos - rotate_half(g*sin)."""
    return g * cos - rotate_half(g * sin)



def rope_split_ref(qkv, n_head, cos, sin):
    """qkv (B, T, 3C), cos, sin (B|1, T, hs) -> heads (3, B, NH, T, hs), q and k rotated:
    x' = x*cos + rotate_half(x)*sin."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    heads = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4).copy()   # a copy even where a view would do
    c, s = cos[:, None], sin[:, None]                                  # (B|1, 1, T, hs)
    for i in (0, 1):
        heads[i] = apply_rope(heads[i], c, s)
    return heads


def rope_merge_ref(dheads, cos, sin):
    """dheads (3, B, NH, T, hs): gradients of the rotated q, k and of v -> dqkv (B, T, 3C). The
    rotation's transpose: g*cos - rotate_half(g*sin) (engine.apply_rope_transposed)."""
    _, B, NH, T, hs = dheads.shape
    d = dheads.copy()
    c, s = cos[:, None], sin[:, None]
    for i in (0, 1):
        d[i] = apply_rope_transposed(dheads[i], c, s)
    return np.ascontiguousarray(d.transpose(1, 3, 0, 2, 4)).reshape(B, T, 3 * NH * hs)


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures, one kernel for both directions: prange over the (b, t) rows of
# qkv; the pair (x_c, x_c+hs/2) of a rotation lies in one row, so each row is read once and
# written once. The same
# operations as the reference, in the same order: results are bit-identical.


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _rope_kernel(rows, heads, cos, sin, forward):
    """forward: rows (B, T, 3C) -> heads (3, B, NH, T, hs), q and k rotated; else heads (the
    gradients) -> rows, the rotation transposed. v moves unchanged either way."""
    _, B, NH, T, hs = heads.shape
    h2 = hs // 2
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        cb = b if cos.shape[0] > 1 else 0
        cr, sr, row = cos[cb, t], sin[cb, t], rows[b, t]
        for part in range(3):
            for h in range(NH):
                seg, hd = row[(part * NH + h) * hs:(part * NH + h + 1) * hs], heads[part, b, h, t]
                x, out = (seg, hd) if forward else (hd, seg)
                if part == 2:                                          # v
                    for c in range(hs):
                        out[c] = x[c]
                elif forward:                                          # x*cos + rotate_half(x)*sin
                    for c in range(h2):
                        out[c] = x[c] * cr[c] + (-x[c + h2]) * sr[c]
                    for c in range(h2, hs):
                        out[c] = x[c] * cr[c] + x[c - h2] * sr[c]
                else:                                                  # g*cos - rotate_half(g*sin)
                    for c in range(h2):
                        out[c] = x[c] * cr[c] - (-(x[c + h2] * sr[c + h2]))
                    for c in range(h2, hs):
                        out[c] = x[c] * cr[c] - x[c - h2] * sr[c - h2]


def rope_split_nb(qkv, n_head, cos, sin):
    """Same contract as rope_split_ref."""
    B, T, C3 = qkv.shape
    heads = np.empty((3, B, n_head, T, C3 // 3 // n_head), qkv.dtype)
    _rope_kernel(np.ascontiguousarray(qkv), heads, np.ascontiguousarray(cos), np.ascontiguousarray(sin), True)
    return heads


def rope_merge_nb(dheads, cos, sin):
    """Same contract as rope_merge_ref."""
    _, B, NH, T, hs = dheads.shape
    dqkv = np.empty((B, T, 3 * NH * hs), dheads.dtype)
    _rope_kernel(dqkv, np.ascontiguousarray(dheads), np.ascontiguousarray(cos), np.ascontiguousarray(sin), False)
    return dqkv


# ----------------------------------------------------------------------------------------------
# dispatchers


def rope_split(qkv, n_head, cos, sin):
    """qkv (B, T, 3C) -> heads (3, B, NH, T, hs) with q, k rotated; cos, sin (B|1, T, hs)."""
    return (rope_split_nb if use_numba("rope") else rope_split_ref)(qkv, int(n_head), cos, sin)


def rope_merge(dheads, cos, sin):
    """dheads (3, B, NH, T, hs) -> dqkv (B, T, 3C), the rotation undone on dq, dk."""
    return (rope_merge_nb if use_numba("rope") else rope_merge_ref)(dheads, cos, sin)
