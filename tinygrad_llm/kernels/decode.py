"""Attention of one new token per row over a KV cache (generation), one layer: split the token's
qkv into heads, smear its key with the previous one and rotate q and k (RoPE) when the model
uses them, append k and v to the cache in place, and attend over the cache's real keys.
model.KVCache.attend does the same for any number of new tokens with GEMMs; this pair is the
single-token decode step, where those ops are too small to pay for one call each.
"""
import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._helpers import exp_neg, row_max, row_sum
from .gelu import _gelu_fwd_span
from .layernorm import _layernorm_row
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


@njit(cache=True, fastmath=False, error_model="numpy")
def _attend_head(q, k, v, kn, kT, vc, valid, L0, cos, sin, klast, g, mix, rope, smear, t, qr, s, yh):
    """One head of one row. q, k, v (hs,): the new token's; kn (hs,): the new key's cache slot
    (kc[b, h, L0]); kT (hs, Tmax), vc (Tmax, hs): the head's cache; valid (Tmax,): real keys;
    cos, sin (hs,): RoPE row of the new position (read when rope); klast (hs,): the previous raw
    key, replaced by this one (when smear); g: the head's gate; mix: this row smears;
    t, qr (hs,), s (>= L0 + 1,): scratch. Writes the head's output yh (hs,)."""
    hs, h2 = q.shape[0], q.shape[0] // 2
    sc = q.dtype.type(1.0 / math.sqrt(hs))
    # pass 1: the new key smeared with the previous raw key, q and k rotated, k and v cached
    for c in range(hs):
        t[c] = k[c] + g * (klast[c] - k[c]) if smear and mix else k[c]
        if smear:
            klast[c] = k[c]
    for c in range(hs):
        if rope:  # x*cos + rotate_half(x)*sin, the same operations as engine.apply_rope
            qr[c] = q[c] * cos[c] + (-q[c + h2] if c < h2 else q[c - h2]) * sin[c]
            kn[c] = t[c] * cos[c] + (-t[c + h2] if c < h2 else t[c - h2]) * sin[c]
        else:
            qr[c] = q[c]
            kn[c] = t[c]
        kT[c, L0] = kn[c]
    vc[L0] = v
    # pass 2: scores q . k_j as hs axpys along kT's rows (contiguous over keys: they
    # vectorize, where one dot product per key would be a serial sum); masked keys are
    # scored too but get probability 0 below
    for j in range(L0 + 1):
        s[j] = 0
    for c in range(hs):
        a, kc_row = qr[c], kT[c]
        for j in range(L0 + 1):
            s[j] += a * kc_row[j]
    # pass 3: softmax over the real keys; a masked key's score becomes -inf, so its exp is 0
    neg_inf = q.dtype.type(-np.inf)
    for j in range(L0 + 1):
        s[j] = s[j] * sc if valid[j] or j == L0 else neg_inf
    m = row_max(s, L0 + 1)                                  # finite: the new key is always seen
    for j in range(L0 + 1):
        s[j] = exp_neg(s[j] - m)
    inv = q.dtype.type(1.0 / row_sum(s, L0 + 1))
    # pass 4: y = sum_j p_j v_j, one axpy per key along v's contiguous rows, normalized once
    yh[:] = 0
    for j in range(L0 + 1):
        pj, vj = s[j], vc[j]
        for c in range(hs):
            yh[c] += pj * vj[c]
    for c in range(hs):
        yh[c] *= inv


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _decode_kernel(qkv, kc, kT, vc, key_valid, L0, cos, sin, k_last, gate, mix, rope, smear, y):
    B, NH, _, hs = kc.shape
    C = NH * hs
    # scratch rows per head, allocated once per call (an allocation per head cost ~1 us each)
    t_all, qr_all, s_all = np.empty((B * NH, hs), qkv.dtype), np.empty((B * NH, hs), qkv.dtype), np.empty((B * NH, L0 + 1), qkv.dtype)
    none = np.empty(0, qkv.dtype)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        o = h * hs                                             # the head's columns in q, k and v
        _attend_head(qkv[b, o:o + hs], qkv[b, C + o:C + o + hs], qkv[b, 2 * C + o:2 * C + o + hs],
                     kc[b, h, L0], kT[b, h], vc[b, h], key_valid[b], L0,
                     cos[b] if rope else none, sin[b] if rope else none,
                     k_last[b, h] if smear else none, gate[h] if smear else qkv.dtype.type(0),
                     mix[b] if smear else False, rope, smear,
                     t_all[bh], qr_all[bh], s_all[bh], y[b, o:o + hs])


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


# ----------------------------------------------------------------------------------------------
# the whole step of one sequence (batch 1): every layer in one kernel call

class DecodeWeights(NamedTuple):
    """A model's weights as decode_token reads them: stacked over the L layers, each matrix
    transposed to (in, out) so a vector-matrix product is one axpy per input along contiguous
    rows. ln (L, 4, C): ln_1 weight, bias, ln_2 weight, bias; wa (L, C, 3C), ba (L, 3C): c_attn;
    wp (L, C, C), bp (L, C): attn.c_proj; wf (L, C, 4C), bf (L, 4C): c_fc; wm (L, 4C, C),
    bm (L, C): mlp.c_proj (zero biases when the model has none); lnf (2, C); wte_t (C, V): the
    tied lm_head; gate (L, NH): sigmoid of the smeared-key gates (zeros without them); eps."""
    ln: np.ndarray
    wa: np.ndarray
    ba: np.ndarray
    wp: np.ndarray
    bp: np.ndarray
    wf: np.ndarray
    bf: np.ndarray
    wm: np.ndarray
    bm: np.ndarray
    lnf: np.ndarray
    wte_t: np.ndarray
    gate: np.ndarray
    eps: float


@njit(cache=True, error_model="numpy")
def transpose_into(a, out):
    """a (n, m) -> out (m, n) = a.T, in 16 x 16 tiles (one pass over each cache line of both):
    DecodeWeights' (in, out) matrices, 5x faster than np.ascontiguousarray(a.T) for the
    (6400, 256) lm_head, which NumPy copies column by column (6 ms a generate() call)."""
    n, m = a.shape
    for i0 in range(0, n, 16):
        for j0 in range(0, m, 16):
            for j in range(j0, min(j0 + 16, m)):
                for i in range(i0, min(i0 + 16, n)):
                    out[j, i] = a[i, j]


def decode_token_ref(x, L0, cos, sin, mix, w: DecodeWeights, kc, kT, vc, k_last, key_valid):
    """One new token of one sequence through every layer and the lm_head. x (1, C): its
    embedding (plus wpe); L0: its cache position; cos, sin (1, hs) or None (RoPE); mix (1,) bool:
    it smears (not at position 0). kc, vc (L, 1, NH, Tmax, hs), kT (L, 1, NH, hs, Tmax), k_last
    (L, 1, NH, hs) or None, key_valid (1, Tmax): the cache, written at L0 in place as
    decode_attention does. -> logits (1, V). The same LayerNorm, GEMM, attention and GELU
    steps as decode.decode_step, on NumPy."""
    from .gelu import gelu_fwd_ref
    from .layernorm import layernorm_fwd_ref
    smear = k_last is not None
    for i in range(w.wa.shape[0]):
        h = layernorm_fwd_ref(x, w.ln[i, 0], w.ln[i, 1], w.eps)[0]
        qkv = h @ w.wa[i] + w.ba[i]
        y = decode_attention_ref(qkv, kc[i], kT[i], vc[i], key_valid, L0, cos, sin,
                                 k_last[i] if smear else None, w.gate[i] if smear else None, mix)
        x = x + (y @ w.wp[i] + w.bp[i])
        h = gelu_fwd_ref(layernorm_fwd_ref(x, w.ln[i, 2], w.ln[i, 3], w.eps)[0] @ w.wf[i] + w.bf[i])
        x = x + (h @ w.wm[i] + w.bm[i])
    return layernorm_fwd_ref(x, w.lnf[0], w.lnf[1], w.eps)[0] @ w.wte_t


@njit(cache=True, fastmath=False, error_model="numpy")
def _vec_mat(x, wt, y):
    """x (K,), wt (K, N) -> y (N,) = x @ wt: four axpys at a time along wt's contiguous rows
    (the inner loop vectorizes; y stays in L1 while the weights stream through once)."""
    K, N = wt.shape
    for o in range(N):
        y[o] = 0
    k4 = K // 4 * 4
    for i in range(0, k4, 4):
        a0, a1, a2, a3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        r0, r1, r2, r3 = wt[i], wt[i + 1], wt[i + 2], wt[i + 3]
        for o in range(N):
            y[o] += a0 * r0[o] + a1 * r1[o] + a2 * r2[o] + a3 * r3[o]
    for i in range(k4, K):
        a, r = x[i], wt[i]
        for o in range(N):
            y[o] += a * r[o]


@njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
def _decode_token_kernel(x, L0, cos, sin, mix, ln, wa, ba, wp, bp, wf, bf, wm, bm, lnf, wte_t, gate, eps,
                         kc, kT, vc, k_last, key_valid, rope, smear, logits):
    L, C = wa.shape[0], wa.shape[1]
    NH = kc.shape[2]
    hs = C // NH
    dt = x.dtype
    h, y, o = np.empty(C, dt), np.empty(C, dt), np.empty(C, dt)
    qkv, f, g = np.empty(3 * C, dt), np.empty(4 * C, dt), np.empty(4 * C, dt)
    t, qr, s = np.empty(hs, dt), np.empty(hs, dt), np.empty(L0 + 1, dt)
    none = np.empty(0, dt)
    for i in range(L):
        _layernorm_row(x, ln[i, 0], ln[i, 1], h, eps)
        _vec_mat(h, wa[i], qkv)
        for c in range(3 * C):
            qkv[c] += ba[i, c]
        for hh in range(NH):
            a = hh * hs
            _attend_head(qkv[a:a + hs], qkv[C + a:C + a + hs], qkv[2 * C + a:2 * C + a + hs],
                         kc[i, 0, hh, L0], kT[i, 0, hh], vc[i, 0, hh], key_valid[0], L0,
                         cos[0] if rope else none, sin[0] if rope else none,
                         k_last[i, 0, hh] if smear else none, gate[i, hh], mix[0], rope, smear,
                         t, qr, s, y[a:a + hs])
        _vec_mat(y, wp[i], o)
        for c in range(C):
            x[c] += o[c] + bp[i, c]
        _layernorm_row(x, ln[i, 2], ln[i, 3], h, eps)
        _vec_mat(h, wf[i], f)
        for c in range(4 * C):
            f[c] += bf[i, c]
        _gelu_fwd_span(f, g)
        _vec_mat(g, wm[i], o)
        for c in range(C):
            x[c] += o[c] + bm[i, c]
    _layernorm_row(x, lnf[0], lnf[1], h, eps)
    _vec_mat(h, wte_t, logits)


def decode_token_nb(x, L0, cos, sin, mix, w: DecodeWeights, kc, kT, vc, k_last, key_valid):
    """Same contract as decode_token_ref: one kernel call for the whole step, one thread, no
    temporaries but a few rows of scratch."""
    dt = x.dtype
    rope, smear = cos is not None, k_last is not None
    none2 = np.empty((0, 0), dt)
    logits = np.empty((1, w.wte_t.shape[1]), dt)
    _decode_token_kernel(x[0].copy(), int(L0), cos if rope else none2, sin if rope else none2, mix,
                         w.ln, w.wa, w.ba, w.wp, w.bp, w.wf, w.bf, w.wm, w.bm, w.lnf, w.wte_t, w.gate,
                         float(w.eps), kc, kT, vc, k_last if smear else np.empty((0, 0, 0, 0), dt),
                         key_valid, rope, smear, logits[0])
    return logits


def decode_token(x, L0, cos, sin, mix, w: DecodeWeights, kc, kT, vc, k_last, key_valid):
    """x (1, C) of one sequence's new token -> logits (1, V); the cache updated in place."""
    f = decode_token_nb if use_numba("decode") else decode_token_ref
    return f(x, L0, cos, sin, mix, w, kc, kT, vc, k_last, key_valid)
