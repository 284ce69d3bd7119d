"""One decoding step of a GPT on plain arrays: one new token per row in, the next token's logits
out, the KV cache extended in place. GPT.generate uses it for every step after the prompt.

It runs the same kernels and GEMMs as the model's forward (kernels.layernorm_fwd, runtime.mm,
kernels.gelu_fwd, the tied lm_head) in the same order, but builds no Tensor and no graph node:
at one token per row each op is so small that creating its Tensor costs about as much as the
op. Attention over the cache is one kernel per layer (kernels.decode_attention) where
KVCache.attend makes a dozen NumPy calls. Models with LoRA adapters take the Tensor path
(`fast_decoding_supported`).
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


def fast_decoding_supported(model) -> bool:
    """True when enabled and every linear layer of the blocks is a plain nn.Linear (no LoRA)."""
    return ENABLED and all(type(lin) is nn.Linear for b in model.transformer.h
               for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))


def _linear(x, lin: nn.Linear):
    """x (B, in) -> x @ W.T + b, as engine.linear computes it."""
    return mm(x, lin.weight.data.T, None if lin.bias is None else lin.bias.data)


def _layer_norm(x, ln: nn.LayerNorm):
    return K.layernorm_fwd(x, ln.weight.data, ln.bias.data, ln.eps)[0]


def decode_step(model, tok, positions, cache) -> np.ndarray:
    """tok (B,) int: each row's newest token; positions (B,) int: its position (0 at the row's
    first real token) -> logits (B, V). Writes the token's keys and values at cache.length in
    every layer; the caller marks the position valid (cache.add_valid) and advances the cache."""
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
