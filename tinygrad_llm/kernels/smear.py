"""Smeared keys (engine.smear_keys; model.py's docstring has the formula): every key of c_attn's
output (B, T, 3C) mixed with the previous token's key, k_t + w_t (k_{t-1} - k_t), where
w_t = gate_h if the token mixes (mix[b, t], never at t = 0) and 0 elsewhere; q and v pass
unchanged. The forward also returns diff = k_{t-1} - k_t (the previous key 0 at t = 0), which the
backward needs; both are one pass over qkv instead of the reference's five or six.
"""
import numpy as np
from numba import njit, prange

from .backend import use_numba


# ----------------------------------------------------------------------------------------------
# reference: plain NumPy


def smear_weight(mix, gate, dtype, first_has_no_prev=True):
    """mix (B|1, T) bool, gate (NH,) -> (B|1, T, NH, 1): gate_h where a token mixes, else 0.
    t = 0 never mixes unless its previous key comes from elsewhere (first_has_no_prev False:
    the KV cache's last key, engine.smear_keys_array)."""
    mix = np.array(mix, dtype=bool, ndmin=2)
    if first_has_no_prev:
        mix[:, 0] = False
    return (mix[:, :, None, None] * gate[:, None]).astype(dtype, copy=False)


def smear_fwd_ref(qkv, gate, mix):
    """qkv (B, T, 3C), gate (NH,) = sigmoid(alpha), mix (B|1, T) bool -> y (B, T, 3C) with the
    keys smeared, diff (B, T, C) = k_{t-1} - k_t."""
    B, T, C3 = qkv.shape
    NH = gate.shape[0]
    hs = C3 // 3 // NH
    x = qkv.reshape(B, T, 3, NH, hs)
    k = x[:, :, 1]                                                    # (B, T, NH, hs)
    prev = np.zeros_like(k)
    prev[:, 1:] = k[:, :-1]
    diff = prev - k
    y = x.copy()
    y[:, :, 1] = k + smear_weight(mix, gate, qkv.dtype) * diff
    return y.reshape(B, T, C3), diff.reshape(B, T, NH * hs)


def smear_bwd_ref(dout, diff, gate, mix):
    """dout (B, T, 3C), diff (B, T, C) from the forward -> dqkv (B, T, 3C), dgate (NH,) =
    d loss / d gate_h (the engine multiplies by gate (1 - gate) for alpha)."""
    B, T, C3 = dout.shape
    NH = gate.shape[0]
    hs = C3 // 3 // NH
    w = smear_weight(mix, gate, dout.dtype)                           # (B|1, T, NH, 1)
    d = dout.reshape(B, T, 3, NH, hs).copy()
    dk_out = dout.reshape(B, T, 3, NH, hs)[:, :, 1]                   # d/d(smeared k)
    wd = w * dk_out
    d[:, :, 1] = dk_out - wd                                          # through k_t's own weight (1 - w_t)
    d[:, :-1, 1] += wd[:, 1:]                                         # through being k_{t+1}'s previous key
    m = smear_weight(mix, np.ones_like(gate), dout.dtype)            # 1 where it mixed
    dgate = (dk_out * diff.reshape(B, T, NH, hs) * m).sum(axis=(0, 1, 3))
    return d.reshape(B, T, C3), dgate


# ----------------------------------------------------------------------------------------------
# Numba kernels, same signatures: prange over rows b; the same operations in the same order as
# the reference, so y, diff and dqkv are bit-identical (dgate sums in float64, in another order)


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _smear_fwd_kernel(qkv, gate, mix, y, diff):
    B, T, C3 = qkv.shape
    NH = gate.shape[0]
    C = C3 // 3
    hs = C // NH
    zero = qkv.dtype.type(0)
    for b in prange(B):
        for t in range(T):
            y[b, t, :C] = qkv[b, t, :C]                               # q and v unchanged
            y[b, t, 2 * C:] = qkv[b, t, 2 * C:]
            for h in range(NH):
                w = gate[h] if t > 0 and mix[b, t] else zero
                for c in range(h * hs, (h + 1) * hs):
                    k = qkv[b, t, C + c]
                    d = (qkv[b, t - 1, C + c] if t > 0 else zero) - k
                    diff[b, t, c] = d
                    y[b, t, C + c] = k + w * d


def _rows(mix, B, T):
    """mix (B|1, T) -> (B, T) bool, C-contiguous: one row per batch row."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(mix, dtype=bool).reshape(-1, T), (B, T)))


def smear_fwd_nb(qkv, gate, mix):
    """Same contract as smear_fwd_ref."""
    B, T, C3 = qkv.shape
    y, diff = np.empty(qkv.shape, qkv.dtype), np.empty((B, T, C3 // 3), qkv.dtype)
    _smear_fwd_kernel(np.ascontiguousarray(qkv), gate, _rows(mix, B, T), y, diff)
    return y, diff


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _smear_bwd_kernel(dout, diff, gate, mix, d, dgate_rows):
    B, T, C3 = dout.shape
    NH = gate.shape[0]
    C = C3 // 3
    hs = C // NH
    zero = dout.dtype.type(0)
    for b in prange(B):
        for t in range(T):
            d[b, t, :C] = dout[b, t, :C]
            d[b, t, 2 * C:] = dout[b, t, 2 * C:]
            for h in range(NH):
                mixes = t > 0 and mix[b, t]
                nxt = t + 1 < T and mix[b, t + 1]                   # k_t is the previous key of k_{t+1}
                w = gate[h] if mixes else zero
                wn = gate[h] if nxt else zero
                acc = 0.0
                for c in range(h * hs, (h + 1) * hs):
                    g = dout[b, t, C + c]
                    v = g - w * g
                    if t + 1 < T:
                        v += wn * dout[b, t + 1, C + c]
                    d[b, t, C + c] = v
                    if mixes:
                        acc += g * diff[b, t, c]
                dgate_rows[b, h] += acc


def smear_bwd_nb(dout, diff, gate, mix):
    """Same contract as smear_bwd_ref."""
    B, T, _ = dout.shape
    d = np.empty(dout.shape, dout.dtype)
    rows = np.zeros((B, gate.shape[0]))                               # float64 partial sums per row
    _smear_bwd_kernel(np.ascontiguousarray(dout), diff, gate, _rows(mix, B, T), d, rows)
    return d, rows.sum(0).astype(dout.dtype)


# ----------------------------------------------------------------------------------------------
# dispatchers


def smear_fwd(qkv, gate, mix):
    """qkv (B, T, 3C) -> (y with the keys smeared, diff for the backward)."""
    return smear_fwd_nb(qkv, gate, mix) if use_numba("smear") else smear_fwd_ref(qkv, gate, mix)


def smear_bwd(dout, diff, gate, mix):
    """-> (dqkv (B, T, 3C), dgate (NH,))."""
    return smear_bwd_nb(dout, diff, gate, mix) if use_numba("smear") else smear_bwd_ref(dout, diff, gate, mix)
