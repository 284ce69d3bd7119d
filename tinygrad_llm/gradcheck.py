"""Finite-difference gradient checks you can run and read by hand.

    python -m tinygrad_llm.gradcheck                # every op and every module parameter
    python -m tinygrad_llm.gradcheck --op softmax   # one op
    python -m tinygrad_llm.gradcheck --model tiny   # every parameter of a tiny GPT (learned
                                                    # positions, and RoPE with smeared keys)

Method (as tinygrad's gradcheck and llm.c's tests): everything in float64; the output is
reduced with a *random* upstream gradient, L = sum(out * dout), so a transposed gradient
cannot hide behind a symmetric reduction; analytic dL/dx from backward() is compared with
central differences (L(x+h) - L(x-h)) / 2h. The relative error is normwise:
max|analytic - numeric| / max|numeric|.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from . import engine as E
from . import kernels as K
from . import nn
from .engine import Tensor

EPS = 1e-6        # central-difference step: truncation O(h^2) ~ 1e-12, round-off ~1e-16/h ~ 1e-10
REL_TOL = 1e-6    # smooth ops in float64 land far below this
ABS_TOL = 1e-8    # for gradients that are (numerically) all zero


@dataclass
class CheckResult:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= REL_TOL or self.max_abs <= ABS_TOL


def check(fn, inputs, names=None, rng=None, max_elems: int | None = None, eps: float = EPS):
    """Compare backward() with central differences for every input Tensor of fn(*inputs).

    fn must be deterministic (reseed any RNG inside it). Inputs are float64 Tensors with
    requires_grad=True; max_elems samples that many entries per input (None: all)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    for t in inputs:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs, got {t.dtype}")
        t.grad = None
    out = fn(*inputs)
    dout = rng.standard_normal(out.shape)
    (out * Tensor(dout)).sum().backward()
    analytic = [t.grad if t.grad is not None else np.zeros_like(t.data) for t in inputs]

    def loss() -> float:
        with E.no_grad():
            return float((fn(*inputs).data * dout).sum())

    results = []
    for i, t in enumerate(inputs):
        flat = t.data.reshape(-1)                      # a view: perturbations land in t.data
        idx = np.arange(flat.size)
        if max_elems is not None and flat.size > max_elems:
            idx = rng.choice(flat.size, max_elems, replace=False)
        numeric = np.empty(len(idx))
        for j, k in enumerate(idx):
            orig = flat[k]
            flat[k] = orig + eps
            lp = loss()
            flat[k] = orig - eps
            lm = loss()
            flat[k] = orig
            numeric[j] = (lp - lm) / (2 * eps)
        a = analytic[i].reshape(-1)[idx]
        max_abs = float(np.max(np.abs(a - numeric))) if len(idx) else 0.0
        max_rel = max_abs / max(float(np.max(np.abs(numeric))) if len(idx) else 0.0, 1e-12)
        name = names[i] if names else f"input{i}"
        results.append(CheckResult(name, t.shape, max_abs, max_rel))
    return results


# ----------------------------------------------------------------------------------------
# the op table: name -> (fn, input builder)


def _t(rng, *shape, positive=False, spread=False):
    x = rng.standard_normal(shape)
    if positive:
        x = np.abs(x) + 0.5
    if spread:  # distinct values well apart, for max / relu / clip kinks
        x = rng.permutation(np.arange(x.size, dtype=np.float64)).reshape(shape) * 0.1 - x.size * 0.05 + 0.037
    return Tensor(x, requires_grad=True)


def _seeded(fn, seed=123):
    """Wrap an op that draws random numbers so every call sees the same mask."""
    def wrapped(*args):
        E.manual_seed(seed)
        return fn(*args)
    return wrapped


def _fused_attention(fn):
    """Run an attention op on the fused kernel (kernels/attention.py), whatever the default path;
    its backward follows the path the forward took."""
    def wrapped(*args):
        before = K.get_kernel_backend()["attention"]
        K.set_kernel_backend({"attention": "numba"})
        try:
            return fn(*args)
        finally:
            K.set_kernel_backend({"attention": before})
    return wrapped


_IDX = np.array([[0, 3, 3], [5, 1, 0]])
# per-row positions as generation makes them: row 1 is left-padded (two pads at position 0)
_POS = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
_COS, _SIN = (t[_POS][:, None] for t in E.rope_table(8, 4, base=10.0))   # (2, 1, 5, 4); base 10: all pairs turn
_TGT = np.array([[1, 4, 0], [2, 2, 3]])
_MASK = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])

OPS = {
    "add": (lambda a, b: a + b, lambda r: [_t(r, 2, 3, 4), _t(r, 3, 1)]),
    "sub": (lambda a, b: a - b, lambda r: [_t(r, 2, 1, 4), _t(r, 3, 4)]),
    "mul": (lambda a, b: a * b, lambda r: [_t(r, 2, 3, 4), _t(r, 4)]),
    "div": (lambda a, b: a / b, lambda r: [_t(r, 3, 4), _t(r, 3, 1, positive=True)]),
    "pow": (lambda a: a ** 3, lambda r: [_t(r, 3, 4)]),
    "neg": (lambda a: -a, lambda r: [_t(r, 5)]),
    "minimum": (E.minimum, lambda r: [_t(r, 3, 4, spread=True), _t(r, 4)]),
    "maximum": (E.maximum, lambda r: [_t(r, 3, 4, spread=True), _t(r, 4)]),
    "clip": (lambda a: E.clip(a, -0.3, 0.4), lambda r: [_t(r, 4, 5, spread=True)]),
    "matmul": (lambda a, b: a @ b, lambda r: [_t(r, 2, 3, 4, 5), _t(r, 2, 3, 5, 6)]),
    "matmul_broadcast": (lambda a, b: a @ b, lambda r: [_t(r, 2, 3, 4, 5), _t(r, 5, 6)]),
    "linear": (E.linear, lambda r: [_t(r, 2, 3, 4), _t(r, 5, 4), _t(r, 5)]),
    "lora_linear": (lambda x, w, b, a, bb: E.lora_linear(x, w, b, a, bb, 1.5),
                    lambda r: [_t(r, 2, 3, 4), _t(r, 5, 4), _t(r, 5), _t(r, 2, 4), _t(r, 5, 2)]),
    "sum": (lambda a: a.sum(axis=1, keepdims=True), lambda r: [_t(r, 2, 3, 4)]),
    "sum_all": (lambda a: a.sum(), lambda r: [_t(r, 2, 3)]),
    "mean": (lambda a: a.mean(axis=(0, 2)), lambda r: [_t(r, 2, 3, 4)]),
    "max": (lambda a: a.max(axis=-1), lambda r: [_t(r, 3, 5, spread=True)]),
    "reshape": (lambda a: a.reshape(4, 6), lambda r: [_t(r, 2, 3, 4)]),
    "permute": (lambda a: a.permute(2, 0, 1), lambda r: [_t(r, 2, 3, 4)]),
    "transpose": (lambda a: a.transpose(0, 2), lambda r: [_t(r, 2, 3, 4)]),
    "getitem_slice": (lambda a: a[:, 1:3, ::2], lambda r: [_t(r, 2, 4, 5)]),
    "getitem_gather": (lambda a: a[np.arange(3)[:, None], np.array([[0, 2, 2]])], lambda r: [_t(r, 3, 4)]),
    "getitem_rows": (lambda a: a[np.array([4, 0, 2])], lambda r: [_t(r, 5, 3)]),     # distinct: no add.at
    "scatter": (lambda a: E.scatter(a, np.array([4, 0, 2]), 6), lambda r: [_t(r, 3, 2)]),
    "concatenate": (lambda a, b: E.concatenate([a, b], axis=1), lambda r: [_t(r, 2, 3), _t(r, 2, 4)]),
    "stack": (lambda a, b: E.stack([a, b], axis=1), lambda r: [_t(r, 2, 3), _t(r, 2, 3)]),
    "split": (lambda a: E.split(a, [1, 3], axis=1)[1] * 2.0, lambda r: [_t(r, 2, 4)]),
    "exp": (E.exp, lambda r: [_t(r, 3, 4)]),
    "log": (E.log, lambda r: [_t(r, 3, 4, positive=True)]),
    "tanh": (E.tanh, lambda r: [_t(r, 3, 4)]),
    "sqrt": (E.sqrt, lambda r: [_t(r, 3, 4, positive=True)]),
    "relu": (E.relu, lambda r: [_t(r, 3, 4, spread=True)]),
    "gelu": (E.gelu, lambda r: [_t(r, 3, 7)]),
    "sigmoid": (E.sigmoid, lambda r: [_t(r, 3, 4)]),
    "logsigmoid": (E.logsigmoid, lambda r: [_t(r, 3, 4)]),
    "softmax": (lambda a: E.softmax(a, axis=-1), lambda r: [_t(r, 3, 5)]),
    "softmax_axis0": (lambda a: E.softmax(a, axis=0), lambda r: [_t(r, 3, 5)]),
    "log_softmax": (lambda a: E.log_softmax(a, axis=-1), lambda r: [_t(r, 3, 5)]),
    "masked_fill": (lambda a: E.masked_fill(a, np.triu(np.ones((4, 4), bool), 1), -1e9).softmax(-1),
                    lambda r: [_t(r, 2, 4, 4)]),
    "embedding": (lambda w: E.embedding(w, _IDX), lambda r: [_t(r, 6, 4)]),
    "dropout": (_seeded(lambda a: E.dropout(a, 0.3, True)), lambda r: [_t(r, 4, 5)]),
    "layer_norm": (E.layer_norm, lambda r: [_t(r, 2, 3, 8), _t(r, 8), _t(r, 8)]),
    "cross_entropy": (lambda l: E.cross_entropy(l, _TGT), lambda r: [_t(r, 2, 3, 6)]),
    "cross_entropy_mask": (lambda l: E.cross_entropy(l, _TGT, mask=_MASK), lambda r: [_t(r, 2, 3, 6)]),
    "cross_entropy_ignore": (lambda l: E.cross_entropy(l, _TGT, ignore_index=2, reduction="sum"),
                             lambda r: [_t(r, 2, 3, 6)]),
    "cross_entropy_none": (lambda l: E.cross_entropy(l, _TGT, reduction="none"), lambda r: [_t(r, 2, 3, 6)]),
    "attention": (E.scaled_dot_product_attention, lambda r: [_t(r, 2, 2, 5, 4), _t(r, 2, 2, 5, 4), _t(r, 2, 2, 5, 4)]),
    "self_attention": (lambda qkv: E.causal_self_attention(qkv, 2), lambda r: [_t(r, 2, 5, 12)]),
    "self_attention_rope": (lambda qkv: E.causal_self_attention(qkv, 2, _COS, _SIN), lambda r: [_t(r, 2, 5, 24)]),
    "attention_fused": (_fused_attention(E.scaled_dot_product_attention),
                        lambda r: [_t(r, 2, 2, 5, 4), _t(r, 2, 2, 5, 4), _t(r, 2, 2, 5, 4)]),
    "self_attention_rope_fused": (_fused_attention(lambda qkv: E.causal_self_attention(qkv, 2, _COS, _SIN)),
                                  lambda r: [_t(r, 2, 5, 24)]),
    "smear_keys": (lambda qkv, a: E.smear_keys(qkv, a, 2, _POS != 0), lambda r: [_t(r, 2, 5, 24), _t(r, 2)]),
    "smear_keys_rope_attention": (lambda qkv, a: E.causal_self_attention(E.smear_keys(qkv, a, 2, _POS != 0), 2, _COS, _SIN),
                                  lambda r: [_t(r, 2, 5, 24), _t(r, 2)]),
}

# GPTConfig variants that `--model tiny` checks, each every parameter
MODEL_VARIANTS = {"gpt": {}, "gpt_rope_smear": {"pos_emb": "rope", "smear_keys": True}}


def _lora_case(rng):
    """A LoRALinear whose B is off zero (at B = 0 the gradient of A is exactly 0: nothing to check)."""
    lora = nn.LoRALinear(nn.Linear(4, 3, rng=rng, dtype=np.float64), r=2, alpha=3.0, rng=rng)
    lora.lora_B.data = rng.standard_normal(lora.lora_B.shape)
    return lora


def _module_cases():
    """name -> (module, input builder); every parameter of the module is checked."""
    r = np.random.default_rng(1)
    d = np.float64
    return {
        "Linear": (nn.Linear(4, 3, rng=r, dtype=d), lambda g: Tensor(g.standard_normal((2, 3, 4)), requires_grad=True)),
        "LoRALinear": (_lora_case(r), lambda g: Tensor(g.standard_normal((2, 3, 4)), requires_grad=True)),
        "Embedding": (nn.Embedding(6, 4, rng=r, dtype=d), lambda g: _IDX),
        "LayerNorm": (nn.LayerNorm(8, dtype=d), lambda g: Tensor(g.standard_normal((2, 3, 8)), requires_grad=True)),
        "MLP": (nn.MLP(4, rng=r, dtype=d), lambda g: Tensor(g.standard_normal((2, 3, 4)), requires_grad=True)),
        "CausalSelfAttention": (nn.CausalSelfAttention(8, 2, rng=r, dtype=d),
                                lambda g: Tensor(g.standard_normal((2, 5, 8)), requires_grad=True)),
        "CausalSelfAttention_smear": (nn.CausalSelfAttention(8, 2, rng=r, dtype=d, smear=True),
                                      lambda g: Tensor(g.standard_normal((2, 5, 8)), requires_grad=True)),
    }


def check_op(name: str, seed: int = 0):
    fn, build = OPS[name]
    rng = np.random.default_rng(seed)
    return check(fn, build(rng), rng=rng)


def check_module(module: nn.Module, forward, max_elems=None, seed: int = 0):
    """Check d(loss)/d(param) for every named parameter of `module`; forward() -> Tensor."""
    named = list(module.named_parameters())
    params = [p for _, p in named]
    # perturbing params in place is seen by forward(), which closes over the module
    return check(lambda *ps: forward(), params, names=[n for n, _ in named],
                 rng=np.random.default_rng(seed), max_elems=max_elems)


def check_modules(seed: int = 0):
    out = []
    for mname, (mod, build) in _module_cases().items():
        x = build(np.random.default_rng(seed + 7))
        res = check_module(mod, lambda: mod(x), seed=seed)
        if isinstance(x, Tensor):  # the input gradient too
            res += [CheckResult(r.name, r.shape, r.max_abs, r.max_rel) for r in check(lambda t: mod(t), [x])]
            res[-1].name = "input"
        out += [CheckResult(f"{mname}.{r.name}", r.shape, r.max_abs, r.max_rel) for r in res]
    return out


def check_tiny_gpt(seed: int = 0, max_elems: int = 24, prefix: str = "gpt", emb_noise: float = 0.0, **config):
    """Every parameter of a tiny GPT (float64, masked cross-entropy); config: GPTConfig
    fields to change, e.g. pos_emb="rope", smear_keys=True; emb_noise > 0: a fixed uniform
    noise of that magnitude on the token embeddings (NEFTune). Names read `{prefix}.{parameter}`."""
    import dataclasses

    from .config import get_tiny_config
    from .model import GPT

    cfg = dataclasses.replace(get_tiny_config(vocab_size=40), dropout=0.0, **config)
    model = GPT(cfg, seed=seed).to(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (2, 9))
    targets = rng.integers(0, cfg.vocab_size, (2, 9))
    mask = (rng.random((2, 9)) > 0.3).astype(np.float64)
    noise = rng.uniform(-emb_noise, emb_noise, (2, 9, cfg.n_embd)) if emb_noise else None

    def forward():
        _, loss = model(idx, targets=targets, loss_mask=mask, emb_noise=noise)
        return loss

    return [CheckResult(f"{prefix}.{r.name}", r.shape, r.max_abs, r.max_rel)
            for r in check_module(model, forward, max_elems=max_elems, seed=seed)]


def print_table(results) -> bool:
    print(f"{'op / parameter':<52}{'shape':<18}{'max abs err':>13}{'max rel err':>13}  result")
    for r in results:
        print(f"{r.name:<52}{str(r.shape):<18}{r.max_abs:>13.2e}{r.max_rel:>13.2e}  {'PASS' if r.ok else 'FAIL'}")
    n_fail = sum(not r.ok for r in results)
    print(f"\n{len(results) - n_fail} passed, {n_fail} failed")
    return n_fail == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinygrad_llm.gradcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", help=f"check one op: {', '.join(OPS)}")
    ap.add_argument("--model", choices=["tiny"], help="check every parameter of a tiny GPT (each of MODEL_VARIANTS)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.op:
        if args.op not in OPS:
            print(f"error: unknown op {args.op!r}; known: {', '.join(OPS)}", file=sys.stderr)
            return 2
        results = [CheckResult(f"{args.op}.{r.name}", r.shape, r.max_abs, r.max_rel) for r in check_op(args.op, args.seed)]
    elif args.model:
        results = [r for name, cfg in MODEL_VARIANTS.items() for r in check_tiny_gpt(args.seed, prefix=name, **cfg)]
    else:
        results = [CheckResult(f"{n}.{r.name}", r.shape, r.max_abs, r.max_rel) for n in OPS for r in check_op(n, args.seed)]
        results += check_modules(args.seed)
    return 0 if print_table(results) else 1


if __name__ == "__main__":
    sys.exit(main())
