"""Tensor, the graph and reverse-mode autodiff: grad mode (`no_grad`), what makes a function an
op (`op`, `op_output`), constants, `unbroadcast`, and `Tensor.backward()`.

Every op is a plain function that computes its forward result with NumPy (or a kernel) and, when
a graph is being built, attaches a `_backward(dout)` closure right below it, micrograd style.
`Tensor.backward()` walks the graph in reverse topological order and *accumulates* gradients
into `.grad` (a tied embedding receives both of its contributions).

dtype policy: a Tensor keeps the dtype of its array (float32 for training, float64 for gradient
checks). Binary ops refuse to mix float dtypes instead of silently promoting.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from . import profiler

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this context ops build no graph (inference, rollouts, evaluation)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


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
        for node in reversed(topo):
            if node._backward is None or node.grad is None:
                continue
            profiler.run_backward(node)                 # node._backward(node.grad), timed if profiling
            # free the graph as we go: intermediates drop their grad and closure
            node._backward, node._parents = None, ()
            if not node._retain:
                node.grad = None

    # -- operators: each calls its op in ops.py ------------------------------------------
    def __add__(self, o): return ops.add(self, o)
    def __radd__(self, o): return ops.add(self, o)
    def __sub__(self, o): return ops.sub(self, o)
    def __rsub__(self, o): return ops.sub(constant(o, self), self)
    def __mul__(self, o): return ops.mul(self, o)
    def __rmul__(self, o): return ops.mul(self, o)
    def __truediv__(self, o): return ops.div(self, o)
    def __rtruediv__(self, o): return ops.div(constant(o, self), self)
    def __pow__(self, e): return ops.power(self, e)
    def __neg__(self): return ops.neg(self)
    def __matmul__(self, o): return ops.matmul(self, o)
    def __getitem__(self, idx): return ops.getitem(self, idx)

    # -- method forms of the ops (defined explicitly, no setattr magic) ----------------
    def sum(self, axis=None, keepdims=False): return ops.reduce_sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.reduce_max(self, axis, keepdims)
    def reshape(self, *shape): return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    def permute(self, *axes): return ops.permute(self, axes)
    def transpose(self, ax0=-2, ax1=-1): return ops.transpose(self, ax0, ax1)
    T = property(lambda self: ops.transpose(self, -2, -1))
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def tanh(self): return ops.tanh(self)
    def sqrt(self): return ops.sqrt(self)
    def relu(self): return ops.relu(self)
    def gelu(self): return ops.gelu(self)
    def sigmoid(self): return ops.sigmoid(self)
    def logsigmoid(self): return ops.logsigmoid(self)
    def softmax(self, axis=-1): return ops.softmax(self, axis)
    def log_softmax(self, axis=-1): return ops.log_softmax(self, axis)
    def masked_fill(self, mask, value): return ops.masked_fill(self, mask, value)
    def clip(self, lo, hi): return ops.clip(self, lo, hi)
    def astype(self, dtype): return ops.cast(self, dtype)


# ----------------------------------------------------------------------------------------
# what every op uses: the decorator, the output node, constants, undoing broadcasting


def op(fn):
    """Make `fn` an engine op named `fn.__name__`, the one place its name comes from: the node it
    returns is tagged with that name (repr, error messages, the profiler's backward time) unless
    an inner op made and named it, and its forward is timed while profiling."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = profiler.run_forward(name, fn, args, kwargs)
        if out._parents and not out._op:
            out._op = name
        return out

    return wrapper


def op_output(data: np.ndarray, parents: tuple) -> Tensor:
    """Output tensor of an op; it joins the graph only if grad mode is on and a parent needs grad."""
    out = Tensor(np.asarray(data))                 # 0-d results arrive as NumPy scalars
    if _grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
    return out


def constant(x, like: Tensor) -> Tensor:
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


# The operator and method forms above call the ops, and the ops build Tensors: ops.py is imported
# last, once Tensor and the helpers exist (the one import inside the engine that points back).
from . import ops  # noqa: E402
