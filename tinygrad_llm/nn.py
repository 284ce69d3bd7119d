"""Modules built on the engine: Module, Linear, Embedding, LayerNorm, Dropout, MLP,
CausalSelfAttention. Parameter names follow nanoGPT so a state dict maps 1:1 onto a
PyTorch nanoGPT-style model (see DESIGN.md section 2)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import engine as E
from .engine import Tensor


class Module:
    """Parameters are the Tensor attributes with requires_grad=True; submodules are Module
    attributes or ModuleList items. Names come from the attribute path, e.g. `h.0.ln_1.weight`."""

    training = True

    def named_parameters(self, prefix: str = ""):
        """Yield (name, Tensor) in definition order; a tensor shared by two modules (tied
        weights) is yielded once, under its first name."""
        seen = set()
        for name, p in self._named_parameters(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _named_parameters(self, prefix):
        for key, val in vars(self).items():
            if isinstance(val, Tensor) and val.requires_grad:
                yield prefix + key, val
            elif isinstance(val, Module):
                yield from val._named_parameters(f"{prefix}{key}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        yield self
        for val in vars(self).values():
            if isinstance(val, Module):
                yield from val.modules()

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, dtype):
        """Convert every parameter to `dtype` (explicitly; e.g. float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    @property
    def dtype(self):
        # the first parameter only: building the whole list cost 0.5 ms, a quarter of a decoded token
        first = next(self.named_parameters(), None)
        if first is None:
            raise IndexError(f"{type(self).__name__} has no trainable parameter to take a dtype from")
        return first[1].dtype

    def state_dict(self) -> dict:
        """{name: ndarray} (the arrays themselves, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True, source: str = "state dict") -> None:
        """Copy arrays in after checking names, shapes and dtypes; raise one clear error otherwise."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise ValueError(f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, p in params.items():
            if name not in state:
                continue
            arr = np.asarray(state[name])
            if arr.shape != p.shape:
                raise ValueError(f"{source}: '{name}' has shape {arr.shape}, the model expects {p.shape}")
            if arr.dtype != p.dtype:
                raise ValueError(f"{source}: '{name}' has dtype {arr.dtype}, the model expects {p.dtype}")
        for name, p in params.items():
            if name in state:
                p.data = np.array(state[name], copy=True)
                p.grad = None


@contextmanager
def evaluating(module: Module):
    """Inside: dropout off and no graph built; afterwards the module's mode is restored."""
    was = module.training
    module.eval()
    try:
        with E.no_grad():
            yield module
    finally:
        module.train(was)


class ModuleList(Module):
    """A list of modules named 0, 1, 2, ... (nanoGPT's `transformer.h`)."""

    def __init__(self, modules):
        self._items = list(modules)

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def _named_parameters(self, prefix):
        for i, m in enumerate(self._items):
            yield from m._named_parameters(f"{prefix}{i}.")

    def modules(self):
        yield self
        for m in self._items:
            yield from m.modules()


def _param(shape, std, rng, dtype):
    return Tensor((rng.standard_normal(shape) * std).astype(dtype), requires_grad=True)


class Linear(Module):
    """y = x @ W.T + b, W (out, in). x: (..., in) -> (..., out). GPT-2 init: N(0, 0.02)."""

    def __init__(self, in_features, out_features, bias=True, std=0.02, rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = _param((out_features, in_features), std, rng, dtype)
        self.bias = Tensor(np.zeros(out_features, dtype), requires_grad=True) if bias else None

    def __call__(self, x: Tensor) -> Tensor:
        return E.linear(x, self.weight, self.bias)


class LoRALinear(Linear):
    """A Linear with a low-rank adapter (LoRA, Hu et al. 2021, eq. 3):
        y = x @ W.T + b + (alpha / r) * (x @ A.T) @ B.T,   A (r, in), B (out, r).
    W and b are the wrapped Linear's own arrays (no copy); A starts random as in the paper's
    reference code (loralib: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))) and
    B at zero, so a fresh adapter computes exactly the base layer. Parameter names:
    `<layer>.weight`, `.bias`, `.lora_A`, `.lora_B`. Freezing the base is the caller's
    (lora.apply_lora): here W and b are used as they are."""

    def __init__(self, base: Linear, r: int, alpha: float, rng=None):
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        out_features, in_features = base.weight.shape
        dtype = base.weight.dtype
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scale = r, alpha / r
        bound = 1.0 / np.sqrt(in_features)
        self.lora_A = Tensor(rng.uniform(-bound, bound, (r, in_features)).astype(dtype), requires_grad=True)
        self.lora_B = Tensor(np.zeros((out_features, r), dtype), requires_grad=True)

    def __call__(self, x: Tensor) -> Tensor:
        # one fused op: as x W^T + b + scale * (x A^T) B^T, with a third of the graph's memory
        return E.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)

    def merged_weight(self) -> np.ndarray:
        """W + (alpha / r) B A: the plain Linear weight that computes the same function."""
        return (self.weight.data + self.scale * (self.lora_B.data @ self.lora_A.data)).astype(self.weight.dtype)


class Embedding(Module):
    """idx int (...) -> (..., C)."""

    def __init__(self, num_embeddings, dim, std=0.02, rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = _param((num_embeddings, dim), std, rng, dtype)

    def __call__(self, idx) -> Tensor:
        return E.embedding(self.weight, idx)


class LayerNorm(Module):
    """Normalise over the last axis (eps 1e-5), then scale and shift."""

    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        self.weight = Tensor(np.ones(dim, dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(dim, dtype), requires_grad=True)
        self.eps = eps

    def __call__(self, x: Tensor) -> Tensor:
        return E.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        return E.dropout(x, self.p, self.training)


class MLP(Module):
    """c_fc (C -> 4C), GELU (tanh approx), c_proj (4C -> C), dropout."""

    def __init__(self, n_embd, dropout=0.0, proj_std=0.02, rng=None, dtype=np.float32, bias=True):
        self.c_fc = Linear(n_embd, 4 * n_embd, bias, rng=rng, dtype=dtype)
        self.c_proj = Linear(4 * n_embd, n_embd, bias, std=proj_std, rng=rng, dtype=dtype)
        self.dropout = Dropout(dropout)

    def __call__(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(E.gelu(self.c_fc(x))))


@dataclass
class Positions:
    """Where each token is, as attention needs it. ids (B|1, T) int: positions, 0 at each row's
    first real token; cos, sin (B|1, 1, T, hs) RoPE tables for those positions, or None (no RoPE)."""
    ids: np.ndarray
    cos: np.ndarray | None = None
    sin: np.ndarray | None = None

    @property
    def mix(self) -> np.ndarray:
        """(B|1, T) True where a smeared key mixes in the previous one: all but position 0."""
        return self.ids != 0


# sigmoid(-3) = 0.047: a smeared key starts as ~95% itself, ~5% the previous token's key, so a
# fresh model is close to plain attention and the gate learns how much to mix (per head)
SMEAR_INIT = -3.0


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with a fused qkv projection.

    c_attn: (3C, C) producing q, k, v in that order; c_proj: (C, C). x: (B, T, C) -> (B, T, C).
    smear=True adds `smear` (NH,), the smeared-keys gate (engine.smear_keys); RoPE is on when
    `pos` carries cos/sin tables. With a `cache` (inference only) new keys/values are appended
    and earlier ones reused."""

    def __init__(self, n_embd, n_head, dropout=0.0, proj_std=0.02, rng=None, dtype=np.float32, bias=True,
                 smear=False):
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, bias, rng=rng, dtype=dtype)
        self.c_proj = Linear(n_embd, n_embd, bias, std=proj_std, rng=rng, dtype=dtype)
        self.smear = Tensor(np.full(n_head, SMEAR_INIT, dtype), requires_grad=True) if smear else None
        self.resid_dropout = Dropout(dropout)

    def __call__(self, x: Tensor, cache=None, layer: int = 0, pos: Positions | None = None) -> Tensor:
        B, T, C = x.shape
        if pos is None:
            pos = Positions(np.arange(T)[None])
        qkv = self.c_attn(x)                                          # (B, T, 3C)
        if cache is None:
            if self.smear is not None:
                qkv = E.smear_keys(qkv, self.smear, self.n_head, pos.mix)
            y = E.causal_self_attention(qkv, self.n_head, pos.cos, pos.sin)   # (B, T, C)
        else:                                                         # inference: no graph
            gate = None if self.smear is None else E.sigmoid_array(self.smear.data)
            y = Tensor(cache.attend(layer, qkv.data, self.n_head, pos, gate))
        return self.resid_dropout(self.c_proj(y))
