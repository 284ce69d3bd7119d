"""AdamW, in place on parameter, first and second moment arrays; reference: PyTorch AdamW docs
(decoupled weight decay, bias-corrected moments). The optimizer calls `adamw_update` per array.
"""
import math

import numpy as np
from numba import njit, prange

from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def adamw_update_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """p, g, m, v: one shape; p, m, v updated in place; step counts from 1."""
    dt = p.dtype.type
    step_size = dt(lr / (1 - beta1**step))  # lr / bias_correction1
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    p *= dt(1 - lr * weight_decay)  # decoupled weight decay
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * g * g
    denom = np.sqrt(v)  # sqrt(vhat) + eps = sqrt(v) / sqrt(bias_correction2) + eps
    denom /= bc2_sqrt
    denom += dt(eps)
    np.divide(m, denom, out=denom)
    denom *= step_size
    p -= denom


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures
# (flat views cut into 16K-element spans, one span per prange iteration)


@njit(cache=True, fastmath=False, error_model="numpy")
def _adamw_span(p, g, m, v, decay, b1, c1, b2, c2, eps, bc2_sqrt, step_size):
    """p, g, m, v: (n,); constants already in the arrays' dtype."""
    for i in range(p.shape[0]):
        m[i] = b1 * m[i] + c1 * g[i]
        v[i] = b2 * v[i] + c2 * g[i] * g[i]
        p[i] = p[i] * decay - m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps) * step_size


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _adamw_kernel(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    dt = p.dtype.type  # the same constants, rounded the same way, as adamw_update_ref
    step_size = dt(lr / (1 - beta1**step))
    bc2_sqrt = dt(math.sqrt(1 - beta2**step))
    decay, b1, c1, b2, c2 = dt(1 - lr * weight_decay), dt(beta1), dt(1 - beta1), dt(beta2), dt(1 - beta2)
    n = p.shape[0]
    for blk in prange((n + 16383) // 16384):
        lo, hi = blk * 16384, min((blk + 1) * 16384, n)
        _adamw_span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi],
                    decay, b1, c1, b2, c2, dt(eps), bc2_sqrt, step_size)


def adamw_update_nb(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Same contract as adamw_update_ref; one fused sweep over flat views."""
    if not all(a.flags.c_contiguous for a in (p, g, m, v)):  # else reshape copies, updates get lost
        raise ValueError("adamw_update_nb needs C-contiguous p, g, m, v")
    _adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                  lr, beta1, beta2, eps, weight_decay, step)


# ----------------------------------------------------------------------------------------------
# dispatchers: what the engine calls. Scalars are normalized to Python float / int so a Numba
# kernel compiles one signature per array dtype, whatever scalar type the caller passes.


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """In place on p, m, v (any shape, C-contiguous); step >= 1."""
    f = adamw_update_nb if use_numba("adamw") else adamw_update_ref
    f(p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
