"""Primitive ops, each with its backward right below its forward, and the few composed from them.

Primitives: elementwise arithmetic with broadcasting (add, sub, mul, div, minimum, maximum), one-
input elementwise ops (power, neg, clip, cast, exp, log, tanh, sqrt, relu, gelu, sigmoid,
logsigmoid), matmul, reductions (reduce_sum, reduce_max), shape ops (reshape, permute, getitem,
scatter, concatenate), softmax, log_softmax, masked_fill. Composed, with no backward of their own: mean,
transpose, stack, split. The fused layers are in fused.py and attention.py.
"""
from __future__ import annotations

import numpy as np

from .. import kernels as K
from .tensor import Tensor, constant, op, op_output, unbroadcast

# ----------------------------------------------------------------------------------------
# the two shapes most ops take: one input, or two broadcast against each other


def _unary(a: Tensor, y: np.ndarray, dinp) -> Tensor:
    """Output y of an op of `a` alone; backward gives a dinp(dout)."""
    out = op_output(y, (a,))
    if out.requires_grad:
        out._backward = lambda dout: a._accumulate(dinp(dout))
    return out


def _broadcast(a, b, forward, da, db) -> Tensor:
    """Elementwise op of a and b with NumPy broadcasting: out = forward(x, y) on their arrays;
    backward gives a da(dout, x, y) and b db(dout, x, y), each summed back to its own shape."""
    a = a if isinstance(a, Tensor) else constant(a, b)
    b = constant(b, a)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    x, y = a.data, b.data
    out = op_output(forward(x, y), (a, b))
    if out.requires_grad:
        def _backward(dout):
            if a.requires_grad: a._accumulate(unbroadcast(da(dout, x, y), a.shape))
            if b.requires_grad: b._accumulate(unbroadcast(db(dout, x, y), b.shape))
        out._backward = _backward
    return out


# ----------------------------------------------------------------------------------------
# elementwise arithmetic (broadcasting)


@op
def add(a, b):
    return _broadcast(a, b, np.add, lambda d, x, y: d, lambda d, x, y: d)


@op
def sub(a, b):
    return _broadcast(a, b, np.subtract, lambda d, x, y: d, lambda d, x, y: -d)


@op
def mul(a, b):
    return _broadcast(a, b, np.multiply, lambda d, x, y: d * y, lambda d, x, y: d * x)


@op
def div(a, b):
    return _broadcast(a, b, np.divide, lambda d, x, y: d / y, lambda d, x, y: -d * x / (y * y))


def _select(a, b, a_wins):
    """np.where(a_wins(x, y), x, y) with the gradient following the value taken: the one helper of
    minimum and maximum. a_wins includes ties, so at ties the gradient goes to `a`."""
    return _broadcast(a, b, lambda x, y: np.where(a_wins(x, y), x, y),
                      lambda d, x, y: np.where(a_wins(x, y), d, 0).astype(d.dtype),
                      lambda d, x, y: np.where(a_wins(x, y), 0, d).astype(d.dtype))


@op
def minimum(a, b):
    """Elementwise min; at ties the gradient goes to `a` (as in PPO's min(surr1, surr2))."""
    return _select(a, b, np.less_equal)


@op
def maximum(a, b):
    """Elementwise max; at ties the gradient goes to `a`."""
    return _select(a, b, np.greater_equal)


@op
def power(a: Tensor, e: float):
    """a ** e for a constant exponent e."""
    if isinstance(e, Tensor):
        raise TypeError("power supports a constant exponent only")
    return _unary(a, a.data ** e, lambda dout: dout * (e * a.data ** (e - 1)).astype(a.dtype, copy=False))


@op
def neg(a: Tensor):
    return _unary(a, -a.data, lambda dout: -dout)


@op
def clip(a: Tensor, lo: float, hi: float):
    """Clamp to [lo, hi]; the gradient is zero where the value was clipped."""
    inside = (a.data >= lo) & (a.data <= hi)
    return _unary(a, np.clip(a.data, lo, hi), lambda dout: dout * inside)


@op
def cast(a: Tensor, dtype):
    """Explicit dtype conversion; the gradient is cast back to the input's dtype."""
    return _unary(a, a.data.astype(dtype), lambda dout: dout.astype(a.dtype))


# ----------------------------------------------------------------------------------------
# matmul: (..., n, k) @ (..., k, m) with batch broadcasting, e.g. (B, NH, T, hs) @ (B, NH, hs, T)


@op
def matmul(a: Tensor, b: Tensor):
    b = constant(b, a)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs tensors with at least 2 dims, got {a.shape} @ {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape} (inner dims {a.shape[-1]} != {b.shape[-2]})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul batch dims do not broadcast: {a.shape} @ {b.shape}") from None
    out = op_output(a.data @ b.data, (a, b))
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


# ----------------------------------------------------------------------------------------
# reductions (named reduce_* so that Python's sum and max stay what they are)


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(ax % ndim for ax in axes)


@op
def reduce_sum(a: Tensor, axis=None, keepdims=False):
    def dinp(dout):
        if not keepdims:
            dout = np.expand_dims(dout, _norm_axes(axis, a.ndim))
        return np.broadcast_to(dout, a.shape).copy()
    return _unary(a, np.asarray(a.data.sum(axis=axis, keepdims=keepdims)), dinp)


def mean(a: Tensor, axis=None, keepdims=False):
    """Composed: sum / count (no backward of its own)."""
    n = int(np.prod([a.shape[ax] for ax in _norm_axes(axis, a.ndim)]))
    return reduce_sum(a, axis, keepdims) * (1.0 / n)


@op
def reduce_max(a: Tensor, axis=None, keepdims=False):
    """Max reduction; ties share the gradient equally."""
    m = a.data.max(axis=axis, keepdims=True)                # keepdims shape, for broadcasting

    def dinp(dout):
        hit = a.data == m
        d = dout.reshape(m.shape) / hit.sum(axis=axis, keepdims=True)
        return (hit * d).astype(a.dtype, copy=False)
    return _unary(a, m if keepdims else np.squeeze(m, axis=_norm_axes(axis, a.ndim)), dinp)


# ----------------------------------------------------------------------------------------
# shape ops


@op
def reshape(a: Tensor, shape):
    try:
        data = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"cannot reshape {a.shape} ({a.size} elements) into {tuple(shape)}") from None
    return _unary(a, data, lambda dout: dout.reshape(a.shape))


@op
def permute(a: Tensor, axes):
    axes = tuple(ax % a.ndim for ax in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute axes {axes} are not a permutation of {a.ndim} dims")
    inv = tuple(np.argsort(axes))
    return _unary(a, a.data.transpose(axes), lambda dout: dout.transpose(inv))


def transpose(a: Tensor, ax0: int = -2, ax1: int = -1):
    """Swap two axes (torch semantics); composed from permute."""
    axes = list(range(a.ndim))
    axes[ax0], axes[ax1] = axes[ax1], axes[ax0]
    return permute(a, axes)


def _is_advanced(idx) -> bool:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(p, (list, np.ndarray, Tensor)) for p in parts)


@op
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
    # repeated indices must accumulate (np.add.at, slow); one array of distinct indices need not
    accumulate = _is_advanced(idx) and not _distinct(idx)

    def dinp(dout):
        g = np.zeros_like(a.data)
        if accumulate:
            np.add.at(g, idx, dout)
        else:
            g[idx] = dout
        return g
    return _unary(a, np.asarray(data), dinp)


def _distinct(idx) -> bool:
    """A single 1-D integer array with no index twice (e.g. the rows a loss needs)."""
    return (isinstance(idx, np.ndarray) and idx.ndim == 1 and np.issubdtype(idx.dtype, np.integer)
            and len(np.unique(idx)) == len(idx))


@op
def scatter(a: Tensor, rows, n: int):
    """The inverse of gathering rows: zeros of shape (n, *a.shape[1:]) with out[rows] = a, for a
    of shape (N, ...) and rows N distinct ints in [0, n). Backward: dout[rows]."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or len(rows) != a.shape[0] or not np.issubdtype(rows.dtype, np.integer) or \
            (len(rows) and (rows.min() < 0 or rows.max() >= n)) or not _distinct(rows):
        raise IndexError(f"scatter: rows must be {a.shape[0]} distinct ints in [0, {n}) for a tensor of shape {a.shape}")
    out = np.zeros((n,) + a.shape[1:], dtype=a.dtype)
    out[rows] = a.data
    return _unary(a, out, lambda dout: dout[rows])


@op
def concatenate(tensors, axis=0):
    tensors = list(tensors)
    out = op_output(np.concatenate([t.data for t in tensors], axis=axis), tuple(tensors))
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


@op
def exp(a: Tensor):
    y = np.exp(a.data)
    return _unary(a, y, lambda dout: dout * y)


@op
def log(a: Tensor):
    return _unary(a, np.log(a.data), lambda dout: dout / a.data)


@op
def tanh(a: Tensor):
    y = np.tanh(a.data)
    return _unary(a, y, lambda dout: dout * (1 - y * y))


@op
def sqrt(a: Tensor):
    y = np.sqrt(a.data)
    return _unary(a, y, lambda dout: dout * 0.5 / y)


@op
def relu(a: Tensor):
    return _unary(a, np.maximum(a.data, 0), lambda dout: dout * (a.data > 0))


@op
def gelu(a: Tensor):
    """GELU, tanh approximation (GPT-2); fused kernel forward and backward."""
    return _unary(a, K.gelu_fwd(a.data), lambda dout: K.gelu_bwd(a.data, np.ascontiguousarray(dout)))


def sigmoid_array(x: np.ndarray) -> np.ndarray:
    """sigmoid on an array, stable for large |x|: exp of a non-positive number only."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@op
def sigmoid(a: Tensor):
    y = sigmoid_array(a.data)
    return _unary(a, y, lambda dout: dout * y * (1 - y))


@op
def logsigmoid(a: Tensor):
    """log(sigmoid(x)) = -log(1 + exp(-x)), computed stably; d/dx = sigmoid(-x)."""
    return _unary(a, -np.logaddexp(0, -a.data), lambda dout: dout * sigmoid_array(-a.data))


# ----------------------------------------------------------------------------------------
# softmax family


def _rows(x: np.ndarray, axis: int):
    """Move `axis` last and flatten the rest: (..., D) -> (N, D), plus how to undo it."""
    axis = axis % x.ndim
    xm = np.moveaxis(x, axis, -1)
    shape = xm.shape
    return np.ascontiguousarray(xm.reshape(-1, shape[-1])), lambda r: np.moveaxis(r.reshape(shape), -1, axis)


@op
def softmax(a: Tensor, axis=-1):
    x2, undo = _rows(a.data, axis)
    y2 = K.softmax_fwd(x2)
    return _unary(a, np.ascontiguousarray(undo(y2)),
                  lambda dout: np.ascontiguousarray(undo(K.softmax_bwd(y2, _rows(dout, axis)[0]))))


@op
def log_softmax(a: Tensor, axis=-1):
    """x - logsumexp(x); backward: dx = dy - softmax(x) * sum(dy)."""
    x = a.data
    m = x.max(axis=axis, keepdims=True)
    y = x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
    return _unary(a, y, lambda dout: dout - np.exp(y) * dout.sum(axis=axis, keepdims=True))


@op
def masked_fill(a: Tensor, mask, value: float):
    """Where `mask` (bool, broadcastable) is True put `value`; no gradient flows there."""
    mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask, dtype=bool)
    return _unary(a, np.where(mask, np.asarray(value, dtype=a.dtype), a.data),
                  lambda dout: unbroadcast(np.where(mask, 0, dout).astype(a.dtype), a.shape))
