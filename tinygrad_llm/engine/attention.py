"""Attention as engine ops: causal scaled-dot-product attention computed by blocks of queries
(`scaled_dot_product_attention` on separate q, k, v; `causal_self_attention` on the fused c_attn
output, with RoPE), the rotary-embedding helpers, and smeared keys (`smear_keys`). model.py's
docstring has the formulas and the config fields that turn RoPE and smeared keys on; the KV cache
uses the array helpers here (rope_table, apply_rope, smear_keys_array) without a graph.

Two paths compute the attention itself, chosen by the "attention" kernel family (kernels.backend):
"numpy" (the default) runs blocks of queries as BLAS GEMMs around the attn_softmax kernels and
keeps each block's probabilities for the backward; "numba" runs kernels/attention.py, one fused
forward and one fused backward over (batch, head), keeping only each query's log-sum-exp. The
attention has no dropout on its probabilities and no padding mask here (training batches are
right-padded, data.pad_batch, so causality alone keeps padding out; generation masks left padding
in its KV cache), so the two paths compute the same function.
"""
from __future__ import annotations

import math

import numpy as np

from .. import kernels as K
from ..kernels.rope import apply_rope, apply_rope_transposed, rotate_half  # noqa: F401 (the engine's RoPE helpers)
from ..runtime import bmm
from .ops import sigmoid_array
from .tensor import Tensor, op, op_output

# Query rows per block: T = 256 runs as 4 blocks, 10/16 of the full T x T work. One layer's
# attention forward + backward at 16x256, 2 threads: 42-47 ms in one block, 35-42 ms in 4,
# 52 ms in 8 (smaller GEMMs lose more than the skipped work gains).
ATTN_BLOCK = 64


def _query_blocks(T: int):
    """[(s, e)] query ranges of about ATTN_BLOCK rows; block (s, e) attends to keys 0..e-1."""
    edges = np.linspace(0, T, max(T // ATTN_BLOCK, 1) + 1).astype(int).tolist()
    return list(zip(edges[:-1], edges[1:]))


def _blocked_fwd(q, k, v):
    """q, k, v: (B, NH, T, hs) arrays -> y (B, NH, T, hs), ps [(B, NH, e - s, e)] for backward.

    Causal, by blocks of queries, so that the keys after a block (all masked) are never
    multiplied: per block, att = q_b @ k[:e]^T (BLAS); p = softmax(att / sqrt(hs)) with the
    causal mask, one fused kernel; y_b = p @ v[:e] (BLAS)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    y, ps = np.empty_like(q), []
    for s, e in _query_blocks(q.shape[2]):
        att = bmm(q[:, :, s:e], k[:, :, :e].swapaxes(-1, -2))           # (B, NH, e - s, e)
        p = K.attn_softmax_fwd(att, scale)                             # zero above the diagonal
        bmm(p, v[:, :, :e], out=y[:, :, s:e])
        ps.append(p)
    return y, ps


def _blocked_bwd(dy, q, k, v, ps):
    """Backward of _blocked_fwd, passes in reverse order per block -> dqkv (3, B, NH, T, hs):
    dq, dk, dv stacked, as causal_self_attention wants them."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    dqkv = np.empty((3, *q.shape), q.dtype)
    dq, dk, dv = dqkv[0], dqkv[1], dqkv[2]
    dk[...] = 0
    dv[...] = 0
    for (s, e), p in zip(_query_blocks(q.shape[2]), ps):
        dyb = dy[:, :, s:e]
        # backward of y_b = p @ v[:e]
        dp = bmm(dyb, v[:, :, :e].swapaxes(-1, -2))                      # (B, NH, e - s, e)
        dv[:, :, :e] += bmm(p.swapaxes(-1, -2), dyb)
        # backward of the masked softmax (scale folded in)
        datt = K.attn_softmax_bwd(p, dp, scale)
        # backward of att = q_b @ k[:e]^T
        bmm(datt, k[:, :, :e], out=dq[:, :, s:e])
        dk[:, :, :e] += bmm(datt.swapaxes(-1, -2), q[:, :, s:e])
    return dqkv


def _attention_fwd(q, k, v):
    """q, k, v: (B, NH, T, hs) -> y (B, NH, T, hs), what the backward needs. The "attention"
    kernel family picks the path: "numba" the fused kernel (keeps lse (B, NH, T) only),
    "numpy" the blocked GEMMs (keep the probabilities of every block)."""
    if K.use_numba("attention"):
        y, lse = K.attention_fwd_nb(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        return y, ("fused", lse)
    y, ps = _blocked_fwd(q, k, v)
    return y, ("blocked", ps)


def _attention_bwd(dy, q, k, v, saved):
    """Backward of _attention_fwd, on the path the forward took -> dqkv (3, B, NH, T, hs)."""
    path, s = saved
    if path == "fused":
        return K.attention_bwd_nb(dy, q, k, v, s, 1.0 / math.sqrt(q.shape[-1]))
    return _blocked_bwd(dy, q, k, v, s)


@op
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention. q, k, v: (B, NH, T, hs) -> (B, NH, T, hs)."""
    if not (q.shape == k.shape == v.shape) or q.ndim != 4:
        raise ValueError(f"attention expects q, k, v of one shape (B, NH, T, hs), got {q.shape}, {k.shape}, {v.shape}")
    y, saved = _attention_fwd(q.data, k.data, v.data)
    out = op_output(y, (q, k, v))
    if out.requires_grad:
        def _backward(dout):
            dq, dk, dv = _attention_bwd(dout, q.data, k.data, v.data, saved)   # views of one array
            for t, g in ((q, dq), (k, dk), (v, dv)):
                if t.requires_grad: t._accumulate(g)
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# positions inside attention: rotary embedding (RoPE) and smeared keys (model.py's docstring
# has the formulas and the config fields that turn them on)


def rope_table(n_pos: int, head_size: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_pos, head_size) float64 for positions 0..n_pos-1: inv_freq_j = base^(-2j/hs)
    for j < hs/2, angle = position * inv_freq, each repeated as [f, f] over the head."""
    if head_size % 2:
        raise ValueError(f"RoPE needs an even head size, got {head_size}")
    inv_freq = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)   # (hs/2,)
    angle = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]          # (n_pos, hs/2)
    angle = np.concatenate([angle, angle], axis=-1)                                   # (n_pos, hs)
    return np.cos(angle), np.sin(angle)


def smear_keys_array(k: np.ndarray, k_before: np.ndarray | None, gate: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """k (B, T, NH, hs) -> k_t + gate_h * (k_{t-1} - k_t) where mix (B|1, T) is True, k_t elsewhere.
    k_before (B, NH, hs): the key before k[:, 0] (the KV cache's last one), or None: then
    t = 0 has no previous key and never mixes. gate (NH,) = sigmoid(alpha)."""
    prev = np.empty_like(k)
    prev[:, 1:] = k[:, :-1]
    prev[:, 0] = 0 if k_before is None else k_before
    w = K.smear_weight(mix, gate, k.dtype, first_has_no_prev=k_before is None)
    return k + w * (prev - k)


@op
def smear_keys(qkv: Tensor, alpha: Tensor, n_head: int, mix) -> Tensor:
    """Smeared keys (Olsson et al. 2022): qkv (B, T, 3C) -> qkv with every key replaced by
    k_t + sigmoid(alpha_h) * (k_{t-1} - k_t) where mix (B|1, T) is True (each row's first real
    token, position 0, has none to mix with; t = 0 never mixes). q and v pass unchanged.
    alpha (NH,) is a learned per-head gate. One kernel pass each way (kernels/smear.py)."""
    if alpha.shape != (n_head,) or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"smear_keys: alpha {alpha.shape} and qkv {qkv.shape} do not fit {n_head} heads")
    gate = sigmoid_array(alpha.data)                                   # (NH,)
    y, diff = K.smear_fwd(qkv.data, gate, mix)
    out = op_output(y, (qkv, alpha))
    if out.requires_grad:
        def _backward(dout):
            dqkv, dgate = K.smear_bwd(dout, diff, gate, mix)
            if qkv.requires_grad:
                qkv._accumulate(dqkv)
            if alpha.requires_grad:
                alpha._accumulate(dgate * gate * (1 - gate))
        out._backward = _backward
    return out


@op
def causal_self_attention(qkv: Tensor, n_head: int, cos: np.ndarray | None = None,
                          sin: np.ndarray | None = None) -> Tensor:
    """Fused head split + causal attention + head merge, so the qkv split costs no graph nodes.
    qkv: (B, T, 3C) with q, k, v side by side -> (B, T, C). With cos, sin (broadcastable to
    (B, 1, T, hs)) q and k of every head are rotated (RoPE, apply_rope) after the split."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    rope = cos is not None
    if rope:   # (B|1, T, hs) rows; the split and the rotation of q, k in one kernel (kernels/rope.py)
        cos, sin = cos.reshape(-1, T, hs), sin.reshape(-1, T, hs)
        heads = K.rope_split(qkv.data, n_head, cos, sin)             # (3, B, NH, T, hs)
    else:      # (B, T, 3, NH, hs) -> (3, B, NH, T, hs); contiguous so the batched matmuls hit BLAS
        heads = np.ascontiguousarray(qkv.data.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4))
    q, k, v = heads[0], heads[1], heads[2]
    y, saved = _attention_fwd(q, k, v)                      # (B, NH, T, hs)
    out = op_output(y.transpose(0, 2, 1, 3).reshape(B, T, C), (qkv,))
    if out.requires_grad:
        def _backward(dout):
            dy = np.ascontiguousarray(dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))
            dheads = _attention_bwd(dy, q, k, v, saved)    # (3, B, NH, T, hs), wrt rotated q, k
            if rope:                                        # rotated back and merged: (B, T, 3C)
                qkv._accumulate(K.rope_merge(dheads, cos, sin))
            else:
                qkv._accumulate(np.ascontiguousarray(dheads.transpose(1, 3, 0, 2, 4)).reshape(B, T, C3))
        out._backward = _backward
    return out
