"""Kernel references against straightforward formulas and against finite differences (float64),
and the backend switch (per family, and TINYGRAD_LLM_KERNELS). test_kernels.py checks each Numba
kernel against these references."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinygrad_llm import kernels as K


def numgrad(f, x, dout, h=1e-6):
    """Central differences of sum(f(x) * dout) w.r.t. x, in float64 (the tinygrad gradcheck)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = (f(x) * dout).sum()
        x[i] = old - h
        fm = (f(x) * dout).sum()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


# ---------------------------------------------------------------------------------------------
# the references against straightforward formulas (float64)


def test_refs_against_formulas():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 7))
    e = np.exp(x)
    np.testing.assert_allclose(K.softmax_fwd_ref(x), e / e.sum(-1, keepdims=True), rtol=1e-12)
    # attention: softmax over the visible keys only, row by row
    att, scale = rng.standard_normal((2, 2, 6, 6)), 0.37
    p = K.attn_softmax_fwd_ref(att, scale)
    for b, h, i in np.ndindex(2, 2, 6):
        ei = np.exp(scale * att[b, h, i, : i + 1])
        np.testing.assert_allclose(p[b, h, i, : i + 1], ei / ei.sum(), rtol=1e-12)
    # cross-entropy: -log_softmax gathered at the targets, times the mask
    targets, mask = rng.integers(0, 7, 5), np.array([1.0, 0.0, 0.5, 1.0, 2.0])
    logp = x - np.log(e.sum(-1, keepdims=True))
    losses, lse = K.ce_fwd_ref(x, targets, mask)
    np.testing.assert_allclose(losses, -mask * logp[np.arange(5), targets], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lse, np.log(e.sum(-1)), rtol=1e-12)
    # LayerNorm: (x - mean) / sqrt(var + eps) * w + b with NumPy's biased variance
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    y, mean, rstd = K.layernorm_fwd_ref(x, w, b, 1e-5)
    expect = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(y, expect, rtol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(-1) + 1e-5), rtol=1e-12)
    # GELU: GPT-2's formula, element by element with math.tanh
    xs = np.linspace(-6, 6, 41)
    g = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in xs]
    np.testing.assert_allclose(K.gelu_fwd_ref(xs), g, rtol=1e-12, atol=1e-15)


def test_attention_ref_is_softmax_then_values_and_its_backward_the_gradient():
    """attention_fwd_ref = attn_softmax_fwd_ref(q k^T) @ v with lse = log of each row's
    normalizer; attention_bwd_ref = central differences of sum(y * dy) (float64, h = 1e-6)."""
    rng = np.random.default_rng(12)
    q, k, v, dy = rng.standard_normal((4, 2, 2, 5, 3))
    scale = 0.6
    y, lse = K.attention_fwd_ref(q, k, v, scale)
    att = q @ k.swapaxes(-1, -2)
    np.testing.assert_allclose(y, K.attn_softmax_fwd_ref(att, scale) @ v, rtol=1e-12)
    for b, h, i in np.ndindex(2, 2, 5):
        np.testing.assert_allclose(lse[b, h, i], np.log(np.exp(scale * att[b, h, i, : i + 1]).sum()), rtol=1e-12)
    grads = K.attention_bwd_ref(dy, q, k, v, lse, scale)
    for n, x in enumerate((q, k, v)):
        def f(a, n=n):
            args = [q, k, v]
            args[n] = a
            return K.attention_fwd_ref(*args, scale)[0]
        np.testing.assert_allclose(grads[n], numgrad(f, x.copy(), dy), rtol=1e-6, atol=1e-8)


def test_ref_backwards_by_finite_differences():
    """Each backward reference is the gradient of sum(forward * dout), by central differences."""
    rng = np.random.default_rng(9)
    tol = dict(rtol=1e-6, atol=1e-8)  # central differences with h = 1e-6 in float64: error ~1e-9
    x, dout = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    y = K.softmax_fwd_ref(x)
    np.testing.assert_allclose(K.softmax_bwd_ref(y, dout), numgrad(K.softmax_fwd_ref, x, dout), **tol)
    att, datt_out = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2, 4, 4))
    p = K.attn_softmax_fwd_ref(att, 0.7)
    np.testing.assert_allclose(K.attn_softmax_bwd_ref(p, datt_out, 0.7),
                               numgrad(lambda a: K.attn_softmax_fwd_ref(a, 0.7), att, datt_out), **tol)
    targets, mask, dl = rng.integers(0, 5, 3), np.array([1.0, 0.0, 0.5]), rng.standard_normal(3)
    _, lse = K.ce_fwd_ref(x, targets, mask)
    np.testing.assert_allclose(K.ce_bwd_ref(x, targets, mask, lse, dl),
                               numgrad(lambda a: K.ce_fwd_ref(a, targets, mask)[0], x, dl), **tol)
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    _, mean, rstd = K.layernorm_fwd_ref(x, w, b, 1e-5)
    dx, dw, db = K.layernorm_bwd_ref(dout, x, w, mean, rstd)
    np.testing.assert_allclose(dx, numgrad(lambda a: K.layernorm_fwd_ref(a, w, b, 1e-5)[0], x, dout), **tol)
    np.testing.assert_allclose(dw, numgrad(lambda a: K.layernorm_fwd_ref(x, a, b, 1e-5)[0], w, dout), **tol)
    np.testing.assert_allclose(db, numgrad(lambda a: K.layernorm_fwd_ref(x, w, a, 1e-5)[0], b, dout), **tol)
    xg = rng.standard_normal((3, 5)) * 3
    np.testing.assert_allclose(K.gelu_bwd_ref(xg, dout), numgrad(K.gelu_fwd_ref, xg, dout), **tol)


# ---------------------------------------------------------------------------------------------
# backend selection


def test_backend_switching(monkeypatch):
    from tinygrad_llm.kernels import backend, gelu
    monkeypatch.setattr(backend, "_FORCED", None)  # as if TINYGRAD_LLM_KERNELS were unset
    calls = []
    monkeypatch.setattr(gelu, "gelu_fwd_nb", lambda x: calls.append("nb") or x)
    monkeypatch.setattr(gelu, "gelu_fwd_ref", lambda x: calls.append("ref") or x)
    x = np.zeros(3, np.float32)
    try:
        K.set_kernel_backend("numba")
        K.gelu_fwd(x)
        K.set_kernel_backend({"gelu": "numpy"})
        K.gelu_fwd(x)
        assert K.get_kernel_backend()["gelu"] == "numpy"
        assert K.get_kernel_backend()["softmax"] == "numba"  # untouched by the per-kernel choice
        K.set_kernel_backend("default")
        assert K.get_kernel_backend() == K.DEFAULT_BACKEND
        with pytest.raises(ValueError):
            K.set_kernel_backend("cuda")
        with pytest.raises(ValueError):
            K.set_kernel_backend({"matmul": "numba"})
    finally:
        K.set_kernel_backend("default")
    assert calls == ["nb", "ref"]
    assert set(K.DEFAULT_BACKEND) == set(K.KERNELS)


def test_env_var_forces_references():
    code = ("from tinygrad_llm import kernels as K; K.set_kernel_backend('numba'); "
            "print(sorted(set(K.get_kernel_backend().values())))")
    env = dict(os.environ, TINYGRAD_LLM_KERNELS="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['numpy']"
