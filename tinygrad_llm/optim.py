"""AdamW with decoupled weight decay, global-norm gradient clipping, warmup + cosine LR."""
from __future__ import annotations

import math

import numpy as np

from . import kernels as K
from .config import ADAMW_BETAS


class AdamW:
    """AdamW (reference: PyTorch AdamW docs / Loshchilov & Hutter 2019).

    Weight decay is applied to matrices only (ndim >= 2: linear weights and embeddings),
    not to biases and LayerNorm parameters, as in nanoGPT. Takes `named_parameters()` so
    its state can be saved and restored by name."""

    def __init__(self, named_params, lr=3e-4, betas=ADAMW_BETAS, eps=1e-8, weight_decay=0.1):
        self.params = list(named_params)
        if not self.params:
            raise ValueError("AdamW got no parameters")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.m = {n: np.zeros_like(p.data) for n, p in self.params}
        self.v = {n: np.zeros_like(p.data) for n, p in self.params}

    def decays(self, p) -> bool:
        return p.ndim >= 2

    def step(self, lr: float | None = None) -> None:
        """One update of every parameter that has a gradient (in place)."""
        lr = self.lr if lr is None else lr
        self.step_count += 1
        b1, b2 = self.betas
        for name, p in self.params:
            if p.grad is None:
                continue
            wd = self.weight_decay if self.decays(p) else 0.0
            K.adamw_update(p.data, np.ascontiguousarray(p.grad), self.m[name], self.v[name],
                           lr, b1, b2, self.eps, wd, self.step_count)

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """Flat {key: ndarray} so it can be stored as safetensors."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for n, _ in self.params:
            state[f"m.{n}"] = self.m[n]
            state[f"v.{n}"] = self.v[n]
        return state

    def load_state_dict(self, state: dict) -> None:
        for n, p in self.params:
            for key, store in ((f"m.{n}", self.m), (f"v.{n}", self.v)):
                if key not in state or state[key].shape != p.shape:
                    raise ValueError(f"optimizer state: '{key}' missing or of the wrong shape")
                store[n] = np.array(state[key], dtype=p.dtype)
        self.step_count = int(state["step"])


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm
    before clipping (may be inf/nan: the caller decides what to do with a bad step)."""
    grads = [p.grad for p in params if p.grad is not None]
    # one BLAS dot per tensor; the per-tensor sums are added as Python floats (float64)
    total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * p.grad.dtype.type(scale)  # new array: never mutate a shared grad
    return total


def get_lr(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """nanoGPT's schedule. 1) linear warmup for warmup_steps, 2) cosine decay down to
    min_lr at max_steps, 3) min_lr after that."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
