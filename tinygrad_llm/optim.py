"""AdamW with decoupled weight decay, Muon for the blocks' weight matrices, global-norm gradient
clipping, warmup + cosine LR."""
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


# Newton-Schulz quintic coefficients of Keller Jordan's Muon (github.com/KellerJordan/Muon):
# chosen to push every singular value of X into ~[0.7, 1.2] in 5 steps, fast rather than exact
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: np.ndarray, steps: int = 5) -> np.ndarray:
    """~U V^T of G = U S V^T for a stack of matrices (..., m, n): `steps` Newton-Schulz
    iterations X <- a X + (b A + c A^2) X, A = X X^T, from X = G / ||G||_F (so every singular
    value starts at <= 1), on the wide orientation (m <= n).

    Each iteration multiplies X on the left by a polynomial P of A, so X_k = Q X_0 with
    Q = P_k ... P_1, and A_{k+1} = P A P: the whole iteration runs on m x m matrices, and X_0 is
    touched twice (its Gram matrix, then Q X_0) instead of twice per iteration: 35% fewer flops
    for the mini blocks' matrices, 1.7x faster here (bench/README.md, "Muon"). Same dtype in and
    out; the textbook loop is tests/test_nn_optim.py's reference."""
    dt = G.dtype.type
    a, b, c = (dt(k) for k in NS_COEFFS)
    tall = G.shape[-2] > G.shape[-1]
    X = np.ascontiguousarray(np.swapaxes(G, -1, -2)) if tall else G
    A = X @ np.swapaxes(X, -1, -2)
    scale = 1 / (np.sqrt(np.trace(A, axis1=-2, axis2=-1))[..., None, None] + dt(1e-7))   # 1 / ||X||_F
    A = A * scale * scale                                            # the Gram matrix of X / ||X||_F
    eye = np.eye(A.shape[-1], dtype=G.dtype)
    Q = None
    for k in range(steps):
        P = a * eye + b * A + c * (A @ A)
        Q = P if Q is None else P @ Q
        if k < steps - 1:
            A = P @ (A @ P)
    X = (Q @ X) * scale
    return np.ascontiguousarray(np.swapaxes(X, -1, -2)) if tall else X


class Muon:
    """Muon (MomentUm Orthogonalized by Newton-schulz; Jordan et al. 2024, the optimizer of the
    nanoGPT speedrun records) for the transformer blocks' weight matrices, AdamW for the rest
    (embeddings, which the lm_head shares, biases, LayerNorms: their gradients are not
    matrices of a linear map between hidden states, as in Muon's reference code).

    A matrix W (out, in) with gradient G: momentum M <- beta M + (1 - beta) G; the Nesterov
    update U = orthogonalize((1 - beta) G + beta M), so every direction of the update gets the
    same size whatever its gradient's singular value; W <- W (1 - lr wd) - muon_lr sqrt(max(1,
    out/in)) U. The matrices decay as AdamW would decay them (its lr, `lr`: at Muon's 0.02, 0.1
    would shrink them by e^-2 in 1,000 steps); the loop's schedule (warm-up, cosine) scales
    `muon_lr` by the same factor as `lr`. Matrices of equal shape are orthogonalized as one
    stack. `named_params`, `lr`, `betas`, `eps`, `weight_decay` as in AdamW (for the AdamW part
    and, weight decay, the matrices too); state by name as AdamW's, with the momentum under
    "muon.<name>"."""

    def __init__(self, named_params, lr=1e-3, betas=ADAMW_BETAS, eps=1e-8, weight_decay=0.1,
                 muon_lr=0.02, momentum=0.95, ns_steps=5):
        named = list(named_params)
        self.matrices = [(n, p) for n, p in named if self.is_matrix(n, p)]
        rest = [(n, p) for n, p in named if not self.is_matrix(n, p)]
        if not self.matrices:
            raise ValueError("Muon got no weight matrices of the transformer blocks")
        self.adamw = AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) if rest else None
        self.lr, self.muon_lr, self.momentum, self.ns_steps = lr, muon_lr, momentum, ns_steps
        self.weight_decay = weight_decay
        self.params = named
        self.step_count = 0
        self.buf = {n: np.zeros_like(p.data) for n, p in self.matrices}

    @staticmethod
    def is_matrix(name: str, p) -> bool:
        return p.ndim == 2 and ".h." in f".{name}"

    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        self.step_count += 1
        if self.adamw is not None:
            self.adamw.step(lr)
        scale = lr / self.lr if self.lr else 1.0          # the schedule's factor
        groups: dict[tuple, list] = {}
        for n, p in self.matrices:
            if p.grad is None:
                continue
            g = p.grad
            buf = self.buf[n]
            buf *= p.dtype.type(self.momentum)
            buf += p.dtype.type(1 - self.momentum) * g
            groups.setdefault(p.shape, []).append((p, (1 - self.momentum) * g + self.momentum * buf))
        for shape, items in groups.items():
            U = orthogonalize(np.stack([u for _, u in items]), self.ns_steps)
            step = self.muon_lr * scale * max(1.0, shape[0] / shape[1]) ** 0.5
            for (p, _), u in zip(items, U):
                if self.weight_decay:
                    p.data *= p.dtype.type(1 - lr * self.weight_decay)
                p.data -= p.dtype.type(step) * u

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        state = self.adamw.state_dict() if self.adamw is not None else {}
        state["step"] = np.array(self.step_count, dtype=np.int64)
        state.update({f"muon.{n}": b for n, b in self.buf.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.adamw is not None:
            self.adamw.load_state_dict(state)
        for n, p in self.matrices:
            key = f"muon.{n}"
            if key not in state or state[key].shape != p.shape:
                raise ValueError(f"optimizer state: '{key}' missing or of the wrong shape")
            self.buf[n] = np.array(state[key], dtype=p.dtype)
        self.step_count = int(state["step"])


def make_optimizer(named_params, cfg):
    """The optimizer a LoopConfig asks for (cfg.optimizer): AdamW, or Muon + AdamW."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        return Muon(named_params, muon_lr=cfg.muon_lr, momentum=cfg.muon_momentum, **kw)
    return AdamW(named_params, **kw)
