"""One decoding step of a GPT on plain arrays: one new token per row in, the next token's logits
out, the KV cache extended in place. GPT.generate uses it for every step after the prompt.

It runs the same kernels and GEMMs as the model's forward (kernels.layernorm_fwd, runtime.mm,
kernels.gelu_fwd, the tied lm_head) in the same order, but builds no Tensor and no graph node:
at one token per row each op is so small that creating its Tensor costs about as much as the
op. Attention over the cache is one kernel per layer (kernels.decode_attention) where
KVCache.attend makes a dozen NumPy calls. Models with LoRA adapters take the Tensor path
(`fast_decoding_supported`).

A batch of one sequence (chat, the server) goes further: the whole step is one kernel call
(kernels.decode_token) over the weights packed once per generate() call (`pack_weights`:
stacked per layer, transposed so each vector-matrix product streams its weights once), with
no NumPy call per layer at all.
"""
from __future__ import annotations

import numpy as np

from . import kernels as K
from . import nn
from .engine import sigmoid_array
from .runtime import mm


# False sends every step through the model's Tensor forward, the path this one must equal
# (bench/generate.py compares the two; tests/test_model.py checks they choose the same tokens)
ENABLED = True
# False: a batch of one decodes layer by layer too (bench/generate.py compares the two)
FUSE_BATCH1 = True


def fast_decoding_supported(model) -> bool:
    """True when enabled and every linear layer of the blocks is a plain nn.Linear (no LoRA)."""
    return ENABLED and all(type(lin) is nn.Linear for b in model.transformer.h
               for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))


def _linear(x, lin: nn.Linear):
    """x (B, in) -> x @ W.T + b, as engine.linear computes it."""
    return mm(x, lin.weight.data.T, None if lin.bias is None else lin.bias.data)


def _layer_norm(x, ln: nn.LayerNorm):
    return K.layernorm_fwd(x, ln.weight.data, ln.bias.data, ln.eps)[0]


def packed_for(model, B: int) -> K.DecodeWeights | None:
    """pack_weights(model) when a batch of B = 1 decodes through kernels.decode_token, else None."""
    return pack_weights(model) if FUSE_BATCH1 and B == 1 and fast_decoding_supported(model) else None


def _transposed(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape[::-1], a.dtype)
    K.transpose_into(a, out)
    return out


def pack_weights(model) -> K.DecodeWeights:
    """The model's weights as kernels.decode_token reads them: a copy (the model's size), made
    once per generate() call (mini: ~3 ms on the first host, ~7 ms on the AMD one; a 32-token
    reply takes ~50 ms there), so it never goes stale when training changes the weights."""
    h = model.transformer.h
    dt = model.transformer.wte.weight.data.dtype

    def stack(f):
        return np.ascontiguousarray(np.stack([f(b) for b in h]))

    def stack_t(f):                                        # each layer's W (out, in) -> (L, in, out)
        return np.stack([_transposed(f(b).weight.data) for b in h])

    def bias(lin):
        return np.zeros(lin.weight.shape[0], dt) if lin.bias is None else lin.bias.data

    smear = h[0].attn.smear is not None
    return K.DecodeWeights(
        ln=stack(lambda b: np.stack([b.ln_1.weight.data, b.ln_1.bias.data, b.ln_2.weight.data, b.ln_2.bias.data])),
        wa=stack_t(lambda b: b.attn.c_attn), ba=stack(lambda b: bias(b.attn.c_attn)),
        wp=stack_t(lambda b: b.attn.c_proj), bp=stack(lambda b: bias(b.attn.c_proj)),
        wf=stack_t(lambda b: b.mlp.c_fc), bf=stack(lambda b: bias(b.mlp.c_fc)),
        wm=stack_t(lambda b: b.mlp.c_proj), bm=stack(lambda b: bias(b.mlp.c_proj)),
        lnf=np.stack([model.transformer.ln_f.weight.data, model.transformer.ln_f.bias.data]),
        wte_t=_transposed(model.transformer.wte.weight.data),
        gate=stack(lambda b: sigmoid_array(b.attn.smear.data)) if smear else np.zeros((len(h), model.config.n_head), dt),
        eps=h[0].ln_1.eps)


def decode_step(model, tok, positions, cache, packed: K.DecodeWeights | None = None) -> np.ndarray:
    """tok (B,) int: each row's newest token; positions (B,) int: its position (0 at the row's
    first real token) -> logits (B, V). Writes the token's keys and values at cache.length in
    every layer; the caller marks the position valid (cache.add_valid) and advances the cache.
    packed (pack_weights(model), batch 1 only): the whole step in one kernel call."""
    cfg = model.config
    tr = model.transformer
    B = len(tok)
    x = tr.wte.weight.data[tok]                                          # (B, C)
    if tr.wpe is not None:
        x = x + tr.wpe.weight.data[positions]
    cos = sin = None
    if cfg.pos_emb == "rope":
        pos = model.positions_for(positions[:, None], B, 1)             # cos, sin (B, 1, 1, hs)
        cos, sin = pos.cos.reshape(B, -1), pos.sin.reshape(B, -1)
    mix = positions != 0                                                 # smeared keys: not at position 0
    if packed is not None and B == 1:
        return K.decode_token(x, cache.length, cos, sin, mix, packed, cache.k, cache.kT, cache.v,
                              cache.k_last, cache.key_valid)
    for i, block in enumerate(tr.h):
        attn = block.attn
        qkv = _linear(_layer_norm(x, block.ln_1), attn.c_attn)           # (B, 3C)
        gate = None if attn.smear is None else sigmoid_array(attn.smear.data)
        k_last = None if cache.k_last is None else cache.k_last[i]
        y = K.decode_attention(qkv, cache.k[i], cache.kT[i], cache.v[i], cache.key_valid, cache.length,
                               cos, sin, k_last, gate, mix)              # (B, C)
        x = x + _linear(y, attn.c_proj)
        h = K.gelu_fwd(_linear(_layer_norm(x, block.ln_2), block.mlp.c_fc))   # (B, 4C)
        x = x + _linear(h, block.mlp.c_proj)
    return mm(_layer_norm(x, tr.ln_f), tr.wte.weight.data.T)            # (B, V), tied lm_head
