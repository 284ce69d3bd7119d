"""Tensor and reverse-mode autograd on NumPy.

Every op is a plain function that computes its forward result with NumPy (or a kernel
from kernels.py) and, when a graph is being built, attaches a `_backward(dout)` closure
right below it, micrograd style. `Tensor.backward()` walks the graph in reverse
topological order and *accumulates* gradients into `.grad` (a tied embedding receives
both of its contributions).

dtype policy: a Tensor keeps the dtype of its array (float32 for training, float64 for
gradient checks). Binary ops refuse to mix float dtypes instead of silently promoting.
"""
from __future__ import annotations

import builtins
import contextlib
import math
import os
import time
from collections import defaultdict

import numpy as np

from . import kernels as K
from .runtime import bmm, mm

# ----------------------------------------------------------------------------------------
# global state: grad mode, the dropout RNG, the op profiler

_grad_enabled = True
_rng = np.random.default_rng(0)
_profiler: "Profiler | None" = None


@contextlib.contextmanager
def no_grad():
    """Inside this context ops build no graph (inference, rollouts, evaluation)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled


def manual_seed(seed: int) -> None:
    """Seed the RNG used by dropout."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng_state() -> dict:
    return _rng.bit_generator.state


def set_rng_state(state: dict) -> None:
    _rng.bit_generator.state = state


class Profiler:
    """Per-op call counts and total forward / backward wall time.

    Switch on with `with profile() as prof:` or the env var TINYGRAD_LLM_PROFILE=1
    (then a table is printed at exit)."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.fwd = defaultdict(float)
        self.bwd = defaultdict(float)
        self.bwd_calls = defaultdict(int)

    def rows(self):
        """[(op, calls, fwd_s, bwd_s)] sorted by total time, descending."""
        ops = set(self.fwd) | set(self.bwd)
        rows = [(op, self.calls[op], self.fwd[op], self.bwd[op]) for op in ops]
        return sorted(rows, key=lambda r: -(r[2] + r[3]))

    def table(self, top: int | None = None) -> str:
        rows = self.rows()[:top]
        total = builtins.sum(r[2] + r[3] for r in self.rows()) or 1.0
        lines = [f"{'op':<22}{'calls':>8}{'fwd ms':>11}{'bwd ms':>11}{'share':>8}"]
        for op, n, f, b in rows:
            lines.append(f"{op:<22}{n:>8}{f * 1e3:>11.1f}{b * 1e3:>11.1f}{(f + b) / total:>8.1%}")
        return "\n".join(lines)


@contextlib.contextmanager
def profile():
    """`with profile() as prof: ...; print(prof.table())`"""
    global _profiler
    prev, _profiler = _profiler, Profiler()
    try:
        yield _profiler
    finally:
        _profiler = prev


if os.environ.get("TINYGRAD_LLM_PROFILE"):
    import atexit

    _profiler = Profiler()
    atexit.register(lambda: print("\n[tinygrad_llm profiler]\n" + _profiler.table()))


def _op(name):
    """Decorator: time an op's forward (and tag its backward) while profiling."""

    def deco(fn):
        def wrapper(*args, **kwargs):
            if _profiler is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _profiler.fwd[name] += time.perf_counter() - t0
            _profiler.calls[name] += 1
            return out

        wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn
        return wrapper

    return deco


# ----------------------------------------------------------------------------------------
# Tensor


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_op", "_retain")
    __array_priority__ = 100  # so `ndarray * Tensor` dispatches to Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(Tensor) is ambiguous: use t.detach() or Tensor(t.data)")
        if isinstance(data, np.generic):            # NumPy scalar: keep its dtype
            data = np.asarray(data)
        elif not isinstance(data, np.ndarray):
            # Python scalars / lists: floats become float32 (the training dtype), like torch.
            data = np.asarray(data)
            if data.dtype == np.float64:
                data = data.astype(np.float32)
        if requires_grad and not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"only floating tensors can require grad, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = ()
        self._backward = None
        self._op = ""
        self._retain = False

    # -- basic properties ------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        g = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{g}, op={self._op or 'leaf'})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def retain_grad(self) -> "Tensor":
        """Keep this intermediate's gradient after backward() (leaves always keep theirs)."""
        self._retain = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def _accumulate(self, g: np.ndarray) -> None:
        # Accumulate, never assign: a tensor used twice gets both contributions.
        # `self.grad + g` (not +=) so an array shared by two tensors is never mutated.
        assert g.shape == self.shape, f"grad shape {g.shape} != tensor shape {self.shape} ({self._op})"
        assert g.dtype == self.dtype, f"grad dtype {g.dtype} != tensor dtype {self.dtype} ({self._op})"
        self.grad = g if self.grad is None else self.grad + g

    def backward(self, grad: np.ndarray | None = None) -> None:
        """Reverse-mode autodiff from this tensor. Scalars need no `grad`."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (built under no_grad, or from constants)")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs an explicit grad of that shape")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad)
        if grad.shape != self.shape or grad.dtype != self.dtype:
            raise ValueError(f"backward grad has shape {grad.shape} / {grad.dtype}, expected {self.shape} / {self.dtype}")
        # topological order, iteratively (deep graphs would overflow Python's recursion)
        topo, seen, stack = [], set(), [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                topo.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in seen)
        self._accumulate(grad)
        prof = _profiler
        for node in reversed(topo):
            if node._backward is None or node.grad is None:
                continue
            if prof is None:
                node._backward(node.grad)
            else:
                t0 = time.perf_counter()
                node._backward(node.grad)
                prof.bwd[node._op] += time.perf_counter() - t0
            # free the graph as we go: intermediates drop their grad and closure
            node._backward, node._parents = None, ()
            if not node._retain:
                node.grad = None

    # -- operators ---------------------------------------------------------------------
    def __add__(self, o): return add(self, o)
    def __radd__(self, o): return add(self, o)
    def __sub__(self, o): return sub(self, o)
    def __rsub__(self, o): return sub(_const(o, self), self)
    def __mul__(self, o): return mul(self, o)
    def __rmul__(self, o): return mul(self, o)
    def __truediv__(self, o): return div(self, o)
    def __rtruediv__(self, o): return div(_const(o, self), self)
    def __pow__(self, e): return pow(self, e)
    def __neg__(self): return neg(self)
    def __matmul__(self, o): return matmul(self, o)
    def __getitem__(self, idx): return getitem(self, idx)

    # -- method forms of the ops (defined explicitly, no setattr magic) ----------------
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def reshape(self, *shape): return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    def permute(self, *axes): return permute(self, axes)
    def transpose(self, ax0=-2, ax1=-1): return transpose(self, ax0, ax1)
    T = property(lambda self: transpose(self, -2, -1))
    def exp(self): return exp(self)
    def log(self): return log(self)
    def tanh(self): return tanh(self)
    def sqrt(self): return sqrt(self)
    def relu(self): return relu(self)
    def gelu(self): return gelu(self)
    def sigmoid(self): return sigmoid(self)
    def logsigmoid(self): return logsigmoid(self)
    def softmax(self, axis=-1): return softmax(self, axis)
    def log_softmax(self, axis=-1): return log_softmax(self, axis)
    def masked_fill(self, mask, value): return masked_fill(self, mask, value)
    def clip(self, lo, hi): return clip(self, lo, hi)
    def astype(self, dtype): return cast(self, dtype)


# ----------------------------------------------------------------------------------------
# helpers shared by the ops


def _const(x, like: Tensor) -> Tensor:
    """Wrap a Python scalar or same-dtype array as a constant; refuse silent dtype changes."""
    if isinstance(x, Tensor):
        if x.dtype != like.dtype and np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"dtype mismatch: {like.dtype} vs {x.dtype}; cast explicitly with .astype()")
        return x
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, np.ndarray):
        return Tensor(np.asarray(x, dtype=like.dtype))
    if isinstance(x, np.ndarray):
        if x.dtype != like.dtype:
            raise TypeError(f"dtype mismatch: Tensor is {like.dtype}, array is {x.dtype}; cast explicitly")
        return Tensor(x)
    raise TypeError(f"cannot combine Tensor with {type(x).__name__}")


def _make(data: np.ndarray, parents: tuple, op: str) -> Tensor:
    """Output tensor of an op; it joins the graph only if grad mode is on and a parent needs grad."""
    out = Tensor(np.asarray(data))                 # 0-d results arrive as NumPy scalars
    if _grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._op = op
    return out


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a broadcast gradient back down to `shape` (the one place broadcasting is undone)."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _binary(a, b):
    a = a if isinstance(a, Tensor) else _const(a, b)
    b = _const(b, a)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    return a, b


# ----------------------------------------------------------------------------------------
# elementwise arithmetic (broadcasting)


@_op("add")
def add(a, b):
    a, b = _binary(a, b)
    out = _make(a.data + b.data, (a, b), "add")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(dout, a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(dout, b.shape))
        out._backward = _backward
    return out


@_op("sub")
def sub(a, b):
    a, b = _binary(a, b)
    out = _make(a.data - b.data, (a, b), "sub")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(dout, a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(-dout, b.shape))
        out._backward = _backward
    return out


@_op("mul")
def mul(a, b):
    a, b = _binary(a, b)
    out = _make(a.data * b.data, (a, b), "mul")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(dout * b.data, a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(dout * a.data, b.shape))
        out._backward = _backward
    return out


@_op("div")
def div(a, b):
    a, b = _binary(a, b)
    out = _make(a.data / b.data, (a, b), "div")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(dout / b.data, a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(-dout * a.data / (b.data * b.data), b.shape))
        out._backward = _backward
    return out


@_op("pow")
def pow(a: Tensor, e: float):
    """a ** e for a constant exponent e."""
    if isinstance(e, Tensor):
        raise TypeError("pow supports a constant exponent only")
    out = _make(a.data ** e, (a,), "pow")
    if out.requires_grad:
        def _backward(dout):
            a._accumulate(dout * (e * a.data ** (e - 1)).astype(a.dtype, copy=False))
        out._backward = _backward
    return out


@_op("neg")
def neg(a: Tensor):
    out = _make(-a.data, (a,), "neg")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(-dout)
    return out


@_op("minimum")
def minimum(a, b):
    """Elementwise min; at ties the gradient goes to `a` (as in PPO's min(surr1, surr2))."""
    a, b = _binary(a, b)
    pick_a = a.data <= b.data
    out = _make(np.where(pick_a, a.data, b.data), (a, b), "minimum")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(np.where(pick_a, dout, 0).astype(dout.dtype), a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(np.where(pick_a, 0, dout).astype(dout.dtype), b.shape))
        out._backward = _backward
    return out


@_op("maximum")
def maximum(a, b):
    """Elementwise max; at ties the gradient goes to `a`."""
    a, b = _binary(a, b)
    pick_a = a.data >= b.data
    out = _make(np.where(pick_a, a.data, b.data), (a, b), "maximum")
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(np.where(pick_a, dout, 0).astype(dout.dtype), a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(np.where(pick_a, 0, dout).astype(dout.dtype), b.shape))
        out._backward = _backward
    return out


@_op("clip")
def clip(a: Tensor, lo: float, hi: float):
    """Clamp to [lo, hi]; the gradient is zero where the value was clipped."""
    inside = (a.data >= lo) & (a.data <= hi)
    out = _make(np.clip(a.data, lo, hi), (a,), "clip")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * inside)
    return out


@_op("cast")
def cast(a: Tensor, dtype):
    """Explicit dtype conversion; the gradient is cast back to the input's dtype."""
    out = _make(a.data.astype(dtype), (a,), "cast")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout.astype(a.dtype))
    return out


# ----------------------------------------------------------------------------------------
# matmul: (..., n, k) @ (..., k, m) with batch broadcasting, e.g. (B, NH, T, hs) @ (B, NH, hs, T)


@_op("matmul")
def matmul(a: Tensor, b: Tensor):
    b = _const(b, a)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs tensors with at least 2 dims, got {a.shape} @ {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape} (inner dims {a.shape[-1]} != {b.shape[-2]})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul batch dims do not broadcast: {a.shape} @ {b.shape}") from None
    out = _make(a.data @ b.data, (a, b), "matmul")
    if out.requires_grad:
        def _backward(dout):
            # dA = dout @ B^T, dB = A^T @ dout, each summed over broadcast batch dims
            if a.requires_grad: a._accumulate(unbroadcast(dout @ b.data.swapaxes(-1, -2), a.shape))
            if b.requires_grad:
                if a.ndim > 2 and b.ndim == 2:
                    # (B, T, k)^T @ (B, T, m) summed over batch == one (k, B*T) @ (B*T, m) GEMM
                    k, m = a.shape[-1], dout.shape[-1]
                    b._accumulate(a.data.reshape(-1, k).T @ dout.reshape(-1, m))
                else:
                    b._accumulate(unbroadcast(a.data.swapaxes(-1, -2) @ dout, b.shape))
        out._backward = _backward
    return out


@_op("linear")
def linear(x: Tensor, w: Tensor, b: Tensor | None = None):
    """y = x @ W.T + b with W (out, in): one fused op so the weight gradient is a single GEMM.
    x: (..., in) -> (..., out)"""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight is {w.shape} (out, in)")
    x2 = x.data.reshape(-1, x.shape[-1])                      # (N, in)
    y = mm(x2, w.data.T, None if b is None else b.data)       # (N, out), bias added per part
    parents = (x, w) if b is None else (x, w, b)
    out = _make(y.reshape(*x.shape[:-1], w.shape[0]), parents, "linear")
    if out.requires_grad:
        def _backward(dout):
            d2 = dout.reshape(-1, w.shape[0])                 # (N, out)
            if x.requires_grad: x._accumulate(mm(d2, w.data).reshape(x.shape))
            if w.requires_grad: w._accumulate(mm(d2.T, x2))   # (out, in)
            if b is not None and b.requires_grad: b._accumulate(d2.sum(0))
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# reductions


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(ax % ndim for ax in axes)


@_op("sum")
def sum(a: Tensor, axis=None, keepdims=False):
    out = _make(np.asarray(a.data.sum(axis=axis, keepdims=keepdims)), (a,), "sum")
    if out.requires_grad:
        axes = _norm_axes(axis, a.ndim)
        def _backward(dout):
            if not keepdims:
                dout = np.expand_dims(dout, axes)
            a._accumulate(np.broadcast_to(dout, a.shape).copy())
        out._backward = _backward
    return out


def mean(a: Tensor, axis=None, keepdims=False):
    """Composed: sum / count (no backward of its own)."""
    n = int(np.prod([a.shape[ax] for ax in _norm_axes(axis, a.ndim)]))
    return sum(a, axis, keepdims) * (1.0 / n)


@_op("max")
def max(a: Tensor, axis=None, keepdims=False):
    """Max reduction; ties share the gradient equally."""
    m = a.data.max(axis=axis, keepdims=True)                # keepdims shape, for broadcasting
    out = _make(m if keepdims else np.squeeze(m, axis=_norm_axes(axis, a.ndim)), (a,), "max")
    if out.requires_grad:
        def _backward(dout):
            hit = a.data == m
            d = dout.reshape(m.shape) / hit.sum(axis=axis, keepdims=True)
            a._accumulate((hit * d).astype(a.dtype, copy=False))
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# shape ops


@_op("reshape")
def reshape(a: Tensor, shape):
    try:
        data = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"cannot reshape {a.shape} ({a.size} elements) into {tuple(shape)}") from None
    out = _make(data, (a,), "reshape")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout.reshape(a.shape))
    return out


@_op("permute")
def permute(a: Tensor, axes):
    axes = tuple(ax % a.ndim for ax in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute axes {axes} are not a permutation of {a.ndim} dims")
    out = _make(a.data.transpose(axes), (a,), "permute")
    if out.requires_grad:
        inv = tuple(np.argsort(axes))
        out._backward = lambda dout: a._accumulate(dout.transpose(inv))
    return out


def transpose(a: Tensor, ax0: int = -2, ax1: int = -1):
    """Swap two axes (torch semantics); composed from permute."""
    axes = list(range(a.ndim))
    axes[ax0], axes[ax1] = axes[ax1], axes[ax0]
    return permute(a, axes)


def _is_advanced(idx) -> bool:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(p, (list, np.ndarray, Tensor)) for p in parts)


@_op("getitem")
def getitem(a: Tensor, idx):
    """Basic slices and integer-array indexing, e.g. gathering the log-prob of each chosen token."""
    if isinstance(idx, Tensor):
        idx = idx.data
    elif isinstance(idx, tuple):
        idx = tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    try:
        data = a.data[idx]
    except IndexError as e:
        raise IndexError(f"index into tensor of shape {a.shape} failed: {e}") from None
    out = _make(np.asarray(data), (a,), "getitem")
    if out.requires_grad:
        advanced = _is_advanced(idx)
        def _backward(dout):
            g = np.zeros_like(a.data)
            if advanced:
                np.add.at(g, idx, dout)  # repeated indices accumulate
            else:
                g[idx] = dout
            a._accumulate(g)
        out._backward = _backward
    return out


@_op("concatenate")
def concatenate(tensors, axis=0):
    tensors = list(tensors)
    out = _make(np.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), "concatenate")
    if out.requires_grad:
        sizes = np.cumsum([t.shape[axis] for t in tensors])[:-1]
        def _backward(dout):
            for t, g in zip(tensors, np.split(dout, sizes, axis=axis)):
                if t.requires_grad: t._accumulate(np.ascontiguousarray(g))
        out._backward = _backward
    return out


def stack(tensors, axis=0):
    """Composed: expand each input by one axis, then concatenate."""
    tensors = list(tensors)
    ax = axis % (tensors[0].ndim + 1)
    return concatenate([reshape(t, t.shape[:ax] + (1,) + t.shape[ax:]) for t in tensors], axis=ax)


def split(a: Tensor, sections, axis=-1):
    """Composed from getitem: split into equal `sections` (int) or at the given sizes (list)."""
    axis = axis % a.ndim
    n = a.shape[axis]
    if isinstance(sections, int):
        if n % sections:
            raise ValueError(f"cannot split axis of size {n} into {sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
    outs, start = [], 0
    for s in sizes:
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(start, start + s)
        outs.append(getitem(a, tuple(sl)))
        start += s
    return outs


# ----------------------------------------------------------------------------------------
# elementwise nonlinearities


@_op("exp")
def exp(a: Tensor):
    y = np.exp(a.data)
    out = _make(y, (a,), "exp")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * y)
    return out


@_op("log")
def log(a: Tensor):
    out = _make(np.log(a.data), (a,), "log")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout / a.data)
    return out


@_op("tanh")
def tanh(a: Tensor):
    y = np.tanh(a.data)
    out = _make(y, (a,), "tanh")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * (1 - y * y))
    return out


@_op("sqrt")
def sqrt(a: Tensor):
    y = np.sqrt(a.data)
    out = _make(y, (a,), "sqrt")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * 0.5 / y)
    return out


@_op("relu")
def relu(a: Tensor):
    out = _make(np.maximum(a.data, 0), (a,), "relu")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * (a.data > 0))
    return out


@_op("gelu")
def gelu(a: Tensor):
    """GELU, tanh approximation (GPT-2); fused kernel forward and backward."""
    out = _make(K.gelu_fwd(a.data), (a,), "gelu")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(K.gelu_bwd(a.data, np.ascontiguousarray(dout)))
    return out


def _sigmoid(x):
    # stable for large |x|: exp of a non-positive number only
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@_op("sigmoid")
def sigmoid(a: Tensor):
    y = _sigmoid(a.data)
    out = _make(y, (a,), "sigmoid")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * y * (1 - y))
    return out


@_op("logsigmoid")
def logsigmoid(a: Tensor):
    """log(sigmoid(x)) = -log(1 + exp(-x)), computed stably; d/dx = sigmoid(-x)."""
    out = _make(-np.logaddexp(0, -a.data), (a,), "logsigmoid")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout * _sigmoid(-a.data))
    return out


# ----------------------------------------------------------------------------------------
# softmax family


def _rows(x: np.ndarray, axis: int):
    """Move `axis` last and flatten the rest: (..., D) -> (N, D), plus how to undo it."""
    axis = axis % x.ndim
    xm = np.moveaxis(x, axis, -1)
    shape = xm.shape
    return np.ascontiguousarray(xm.reshape(-1, shape[-1])), lambda r: np.moveaxis(r.reshape(shape), -1, axis)


@_op("softmax")
def softmax(a: Tensor, axis=-1):
    x2, undo = _rows(a.data, axis)
    y2 = K.softmax_fwd(x2)
    out = _make(np.ascontiguousarray(undo(y2)), (a,), "softmax")
    if out.requires_grad:
        def _backward(dout):
            d2, _ = _rows(dout, axis)
            a._accumulate(np.ascontiguousarray(undo(K.softmax_bwd(y2, d2))))
        out._backward = _backward
    return out


@_op("log_softmax")
def log_softmax(a: Tensor, axis=-1):
    """x - logsumexp(x); backward: dx = dy - softmax(x) * sum(dy)."""
    x = a.data
    m = x.max(axis=axis, keepdims=True)
    y = x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
    out = _make(y, (a,), "log_softmax")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dout - np.exp(y) * dout.sum(axis=axis, keepdims=True))
    return out


@_op("masked_fill")
def masked_fill(a: Tensor, mask, value: float):
    """Where `mask` (bool, broadcastable) is True put `value`; no gradient flows there."""
    mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask, dtype=bool)
    out = _make(np.where(mask, np.asarray(value, dtype=a.dtype), a.data), (a,), "masked_fill")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(unbroadcast(np.where(mask, 0, dout).astype(a.dtype), a.shape))
    return out


# ----------------------------------------------------------------------------------------
# fused layers: embedding, dropout, layer norm, cross-entropy, causal attention


@_op("embedding")
def embedding(weight: Tensor, idx) -> Tensor:
    """weight (V, C), idx int (...) -> (..., C); backward scatter-adds rows (repeats accumulate)."""
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(f"token id out of range [0, {weight.shape[0]}): min {idx.min()}, max {idx.max()}")
    out = _make(weight.data[idx], (weight,), "embedding")
    if out.requires_grad:
        def _backward(dout):
            weight._accumulate(K.embedding_bwd(idx.reshape(-1), dout.reshape(-1, weight.shape[1]), weight.shape[0]))
        out._backward = _backward
    return out


@_op("dropout")
def dropout(a: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero with probability p and scale by 1/(1-p); identity in eval. The mask
    is a hash of (seed, element index), one seed per call drawn from the engine's generator
    (manual_seed), so it does not depend on the thread count (kernels.dropout_fwd)."""
    if not training or p == 0.0:
        return a
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    y, keep = K.dropout_fwd(a.data, p, _rng.integers(0, 2**63))   # keep: uint8, a's shape
    out = _make(y, (a,), "dropout")
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(K.dropout_bwd(dout, keep, p))
    return out


@_op("layer_norm")
def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """x (..., C) normalised over C, then * w + b. Kernel caches mean and rstd for backward."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x.data.reshape(-1, C))
    y, mean_, rstd = K.layernorm_fwd(x2, w.data, b.data, eps)
    out = _make(y.reshape(x.shape), (x, w, b), "layer_norm")
    if out.requires_grad:
        def _backward(dout):
            dx, dw, db = K.layernorm_bwd(np.ascontiguousarray(dout.reshape(-1, C)), x2, w.data, mean_, rstd)
            if x.requires_grad: x._accumulate(dx.reshape(x.shape))
            if w.requires_grad: w._accumulate(dw)
            if b.requires_grad: b._accumulate(db)
        out._backward = _backward
    return out


@_op("cross_entropy")
def cross_entropy(logits: Tensor, targets, mask=None, ignore_index: int | None = None,
                  reduction: str = "mean") -> Tensor:
    """Fused, stable log-softmax + NLL from logits (..., V) and int targets (...).

    mask (...) weights each position (0 = ignored); ignore_index does the same for a target
    value. reduction: "mean" (over positions with weight, i.e. sum / sum(mask)), "sum", or
    "none" (per-position losses, shape (...))."""
    V = logits.shape[-1]
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} does not match logits {logits.shape[:-1]}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")
    w = np.ones(targets.shape, dtype=logits.dtype)
    if mask is not None:
        w = w * np.asarray(mask.data if isinstance(mask, Tensor) else mask).astype(logits.dtype)
    t = targets.astype(np.int64).reshape(-1)
    if ignore_index is not None:
        ignored = t == ignore_index
        w = w * ~ignored.reshape(targets.shape)
        t = np.where(ignored, 0, t)
    if t.size and (t.min() < 0 or t.max() >= V):
        raise IndexError(f"cross_entropy: target id out of range [0, {V})")
    w = np.ascontiguousarray(w.reshape(-1))
    l2 = np.ascontiguousarray(logits.data.reshape(-1, V))
    losses, lse = K.ce_fwd(l2, t, w)
    denom = w.sum() if reduction == "mean" else 1.0
    if reduction == "none":
        data = losses.reshape(targets.shape)
    else:
        data = np.asarray(losses.sum() / np.maximum(denom, 1e-12), dtype=logits.dtype)
    out = _make(data, (logits,), "cross_entropy")
    if out.requires_grad:
        def _backward(dout):
            if reduction == "none":
                dl = np.ascontiguousarray(dout.reshape(-1))
            else:
                dl = np.full(t.shape, dout / np.maximum(denom, 1e-12), dtype=logits.dtype)
            logits._accumulate(K.ce_bwd(l2, t, w, lse, dl).reshape(logits.shape))
        out._backward = _backward
    return out


# Query rows per block: T = 256 runs as 4 blocks, 10/16 of the full T x T work. One layer's
# attention forward + backward at 16x256, 2 threads: 42-47 ms in one block, 35-42 ms in 4,
# 52 ms in 8 (smaller GEMMs lose more than the skipped work gains).
ATTN_BLOCK = 64


def _query_blocks(T: int):
    """[(s, e)] query ranges of about ATTN_BLOCK rows; block (s, e) attends to keys 0..e-1."""
    edges = np.linspace(0, T, (T // ATTN_BLOCK or 1) + 1).astype(int).tolist()   # (max is an op here)
    return list(zip(edges[:-1], edges[1:]))


def _attention_fwd(q, k, v):
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


def _attention_bwd(dy, q, k, v, ps):
    """Backward of _attention_fwd, passes in reverse order per block -> dqkv (3, B, NH, T, hs):
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


@_op("attention")
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention. q, k, v: (B, NH, T, hs) -> (B, NH, T, hs)."""
    if not (q.shape == k.shape == v.shape) or q.ndim != 4:
        raise ValueError(f"attention expects q, k, v of one shape (B, NH, T, hs), got {q.shape}, {k.shape}, {v.shape}")
    y, ps = _attention_fwd(q.data, k.data, v.data)
    out = _make(y, (q, k, v), "attention")
    if out.requires_grad:
        def _backward(dout):
            dq, dk, dv = _attention_bwd(dout, q.data, k.data, v.data, ps)     # views of one array
            for t, g in ((q, dq), (k, dk), (v, dv)):
                if t.requires_grad: t._accumulate(g)
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# positions inside attention: rotary embedding (RoPE) and smeared keys (model.py's docstring
# has the formulas and the config fields that turn them on)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] over the last axis (GPT-NeoX / Hugging Face LLaMA convention)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope_table(n_pos: int, head_size: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_pos, head_size) float64 for positions 0..n_pos-1: inv_freq_j = base^(-2j/hs)
    for j < hs/2, angle = position * inv_freq, each repeated as [f, f] over the head."""
    if head_size % 2:
        raise ValueError(f"RoPE needs an even head size, got {head_size}")
    inv_freq = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)   # (hs/2,)
    angle = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]          # (n_pos, hs/2)
    angle = np.concatenate([angle, angle], axis=-1)                                   # (n_pos, hs)
    return np.cos(angle), np.sin(angle)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x' = x*cos + rotate_half(x)*sin: each pair (x_j, x_{j+hs/2}) turned by its angle."""
    return x * cos + rotate_half(x) * sin


def apply_rope_transposed(g: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The transpose of apply_rope (the backward): rotate_half is x -> R x with R^T = -R, so
    d/dx of <g, x*cos + R x*sin> is g*cos + R^T (g*sin) = g*cos - rotate_half(g*sin)."""
    return g * cos - rotate_half(g * sin)


def smear_keys_array(k: np.ndarray, k_before: np.ndarray | None, gate: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """k (B, T, NH, hs) -> k_t + gate_h * (k_{t-1} - k_t) where mix (B|1, T) is True, k_t elsewhere.
    k_before (B, NH, hs): the key before k[:, 0] (the KV cache's last one), or None: then
    t = 0 has no previous key and never mixes. gate (NH,) = sigmoid(alpha)."""
    prev = np.empty_like(k)
    prev[:, 1:] = k[:, :-1]
    prev[:, 0] = 0 if k_before is None else k_before
    w = _smear_weight(mix, gate, k_before is None, k.dtype)
    return k + w * (prev - k)


def _smear_weight(mix, gate, first_has_no_prev: bool, dtype) -> np.ndarray:
    """(B|1, T, NH, 1): the mixing weight gate_h where a token mixes with its previous key, else 0."""
    mix = np.array(mix, dtype=bool, ndmin=2)
    if first_has_no_prev:
        mix[:, 0] = False
    return (mix[:, :, None, None] * gate[:, None]).astype(dtype, copy=False)


@_op("smear_keys")
def smear_keys(qkv: Tensor, alpha: Tensor, n_head: int, mix) -> Tensor:
    """Smeared keys (Olsson et al. 2022): qkv (B, T, 3C) -> qkv with every key replaced by
    k_t + sigmoid(alpha_h) * (k_{t-1} - k_t) where mix (B|1, T) is True (each row's first real
    token, position 0, has none to mix with; t = 0 never mixes). q and v pass unchanged.
    alpha (NH,) is a learned per-head gate."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    gate = _sigmoid(alpha.data)                                       # (NH,)
    w = _smear_weight(mix, gate, True, qkv.dtype)                     # (B|1, T, NH, 1)
    x = qkv.data.reshape(B, T, 3, n_head, hs)
    k = x[:, :, 1]                                                    # (B, T, NH, hs)
    prev = np.zeros_like(k)
    prev[:, 1:] = k[:, :-1]
    diff = prev - k
    y = x.copy()
    y[:, :, 1] = k + w * diff
    out = _make(y.reshape(B, T, C3), (qkv, alpha), "smear_keys")
    if out.requires_grad:
        def _backward(dout):
            dk_out = dout.reshape(B, T, 3, n_head, hs)[:, :, 1]      # d/d(smeared k)
            if qkv.requires_grad:
                d = dout.reshape(B, T, 3, n_head, hs).copy()
                wd = w * dk_out
                d[:, :, 1] = dk_out - wd                              # through k_t's own weight (1 - w_t)
                d[:, :-1, 1] += wd[:, 1:]                             # through being k_{t+1}'s previous key
                qkv._accumulate(d.reshape(B, T, C3))
            if alpha.requires_grad:
                m = _smear_weight(mix, np.ones_like(gate), True, qkv.dtype)   # 1 where it mixed
                dgate = (dk_out * diff * m).sum(axis=(0, 1, 3))       # (NH,)
                alpha._accumulate(dgate * gate * (1 - gate))
        out._backward = _backward
    return out


@_op("self_attention")
def causal_self_attention(qkv: Tensor, n_head: int, cos: np.ndarray | None = None,
                          sin: np.ndarray | None = None) -> Tensor:
    """Fused head split + causal attention + head merge, so the qkv split costs no graph nodes.
    qkv: (B, T, 3C) with q, k, v side by side -> (B, T, C). With cos, sin (broadcastable to
    (B, 1, T, hs)) q and k of every head are rotated (RoPE, apply_rope) after the split."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    # (B, T, 3, NH, hs) -> (3, B, NH, T, hs); contiguous so the batched matmuls hit BLAS directly
    heads = np.ascontiguousarray(qkv.data.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4))
    q, k, v = heads[0], heads[1], heads[2]
    rope = cos is not None
    if rope:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)     # new contiguous arrays
    y, ps = _attention_fwd(q, k, v)                         # (B, NH, T, hs)
    out = _make(y.transpose(0, 2, 1, 3).reshape(B, T, C), (qkv,), "self_attention")
    if out.requires_grad:
        def _backward(dout):
            dy = np.ascontiguousarray(dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))
            dheads = _attention_bwd(dy, q, k, v, ps)       # (3, B, NH, T, hs), wrt rotated q, k
            if rope:
                dheads[0] = apply_rope_transposed(dheads[0], cos, sin)
                dheads[1] = apply_rope_transposed(dheads[1], cos, sin)
            qkv._accumulate(np.ascontiguousarray(dheads.transpose(1, 3, 0, 2, 4)).reshape(B, T, C3))
        out._backward = _backward
    return out
