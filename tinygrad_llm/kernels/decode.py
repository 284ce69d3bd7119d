"""Attention of one new token per row over a KV cache (generation), one layer: split the token's
qkv into heads, smear its key with the previous one and rotate q and k (RoPE) when the model
uses them, append k and v to the cache in place, and attend over the cache's real keys.
model.KVCache.attend does the same for any number of new tokens with GEMMs; this pair is the
single-token decode step, where those ops are too small to pay for one call each.
"""
import math

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg, row_max, row_sum
from .backend import use_numba
from .rope import apply_rope


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def decode_attention_ref(qkv, kc, kT, vc, key_valid, L0, cos, sin, k_last, gate, mix):
    """qkv (B, 3C): the new token of each row. kc, vc (B, NH, Tmax, hs): the layer's cache, its
    position L0 written here; kT (B, NH, hs, Tmax): the keys once more, transposed (the kernel's
    scores run along it), position L0 written here too; key_valid (B, Tmax): real tokens (position L0 counts as real).
    cos, sin (B, hs) or None: RoPE rows of the new positions. k_last (B, NH, hs) or None: each
    row's previous raw key (smeared keys), replaced by the new raw key here; gate (NH,) =
    sigmoid(smear); mix (B,) bool: which rows smear. -> y (B, C), the heads side by side."""
    B, NH, _, hs = kc.shape
    x = qkv.reshape(B, 3, NH, hs)
    q, k, v = x[:, 0], x[:, 1], x[:, 2]                                    # (B, NH, hs)
    if k_last is not None:
        w = (mix[:, None, None] * gate[None, :, None]).astype(qkv.dtype)   # (B, NH, 1)
        k_raw = k.copy()
        k = k + w * (k_last - k)
        k_last[...] = k_raw
    if cos is not None:
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    kc[:, :, L0] = k
    kT[:, :, :, L0] = k
    vc[:, :, L0] = v
    keys, vals = kc[:, :, :L0 + 1], vc[:, :, :L0 + 1]                      # (B, NH, L, hs)
    s = np.einsum("bhd,bhjd->bhj", q, keys) * qkv.dtype.type(1.0 / math.sqrt(hs))
    seen = key_valid[:, None, :L0 + 1].copy()
    seen[..., L0] = True                                                   # a query always sees itself
    s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhj,bhjd->bhd", p, vals).reshape(B, NH * hs)


# ----------------------------------------------------------------------------------------------
# Numba kernel, same signature: prange over (row, head); each writes its own cache slots


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _decode_kernel(qkv, kc, kT, vc, key_valid, L0, cos, sin, k_last, gate, mix, rope, smear, y):
    B, NH, _, hs = kc.shape
    C, h2 = NH * hs, hs // 2
    sc = qkv.dtype.type(1.0 / math.sqrt(hs))
    # scratch rows per head, allocated once per call (an allocation per head cost ~1 us each)
    t_all, qr_all, s_all = np.empty((B * NH, hs), qkv.dtype), np.empty((B * NH, hs), qkv.dtype), np.empty((B * NH, L0 + 1), qkv.dtype)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        o = h * hs                                             # the head's columns in q, k and v
        q, k, v = qkv[b, o:o + hs], qkv[b, C + o:C + o + hs], qkv[b, 2 * C + o:2 * C + o + hs]
        kn, t, qr, s = kc[b, h, L0], t_all[bh], qr_all[bh], s_all[bh]   # kn: the new key's cache slot
        # pass 1: the new key smeared with the previous raw key, q and k rotated, k and v cached
        for c in range(hs):
            t[c] = k[c] + gate[h] * (k_last[b, h, c] - k[c]) if smear and mix[b] else k[c]
            if smear:
                k_last[b, h, c] = k[c]
        for c in range(hs):
            if rope:  # x*cos + rotate_half(x)*sin, the same operations as engine.apply_rope
                qr[c] = q[c] * cos[b, c] + (-q[c + h2] if c < h2 else q[c - h2]) * sin[b, c]
                kn[c] = t[c] * cos[b, c] + (-t[c + h2] if c < h2 else t[c - h2]) * sin[b, c]
            else:
                qr[c] = q[c]
                kn[c] = t[c]
            kT[b, h, c, L0] = kn[c]
        vc[b, h, L0] = v
        # pass 2: scores q . k_j as hs axpys along kT's rows (contiguous over keys: they
        # vectorize, where one dot product per key would be a serial sum); masked keys are
        # scored too but get probability 0 below
        for j in range(L0 + 1):
            s[j] = 0
        for c in range(hs):
            a, kc_row = qr[c], kT[b, h, c]
            for j in range(L0 + 1):
                s[j] += a * kc_row[j]
        # pass 3: softmax over the real keys; a masked key's score becomes -inf, so its exp is 0
        neg_inf = qkv.dtype.type(-np.inf)
        for j in range(L0 + 1):
            s[j] = s[j] * sc if key_valid[b, j] or j == L0 else neg_inf
        m = row_max(s, L0 + 1)                                  # finite: the new key is always seen
        for j in range(L0 + 1):
            s[j] = exp_neg(s[j] - m)
        inv = qkv.dtype.type(1.0 / row_sum(s, L0 + 1))
        # pass 4: y = sum_j p_j v_j, one axpy per key along v's contiguous rows, normalized once
        yh = y[b, o:o + hs]
        yh[:] = 0
        for j in range(L0 + 1):
            pj, vj = s[j], vc[b, h, j]
            for c in range(hs):
                yh[c] += pj * vj[c]
        for c in range(hs):
            yh[c] *= inv


def decode_attention_nb(qkv, kc, kT, vc, key_valid, L0, cos, sin, k_last, gate, mix):
    """Same contract as decode_attention_ref; None inputs become empty arrays and flags."""
    B, NH, _, hs = kc.shape
    dt = qkv.dtype
    rope, smear = cos is not None, k_last is not None
    none2, none3 = np.empty((0, 0), dt), np.empty((0, 0, 0), dt)
    y = np.empty((B, NH * hs), dt)
    _decode_kernel(np.ascontiguousarray(qkv), kc, kT, vc, key_valid, L0,
                   np.ascontiguousarray(cos) if rope else none2, np.ascontiguousarray(sin) if rope else none2,
                   k_last if smear else none3, gate if smear else np.empty(0, dt),
                   mix if smear else np.empty(0, np.bool_), rope, smear, y)
    return y


# ----------------------------------------------------------------------------------------------
# dispatcher: L0 normalized to a Python int


def decode_attention(qkv, kc, kT, vc, key_valid, L0, cos=None, sin=None, k_last=None, gate=None, mix=None):
    """qkv (B, 3C) of one new token per row -> y (B, C); the cache (and k_last) updated in place."""
    f = decode_attention_nb if use_numba("decode") else decode_attention_ref
    return f(qkv, kc, kT, vc, key_valid, int(L0), cos, sin, k_last, gate, mix)
