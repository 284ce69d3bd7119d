"""The attention kernels against their NumPy references: the fused causal attention (forward and
backward, kernels/attention.py), the one-token decode attention over a KV cache and the whole
batch-1 decode step (kernels/decode.py). Tolerances and helpers as in test_kernels.py."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_kernels import DTYPES, FEW, close, randn, seeds

from tinygrad_llm import kernels as K


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(B=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 40), hs=st.integers(1, 20), seed=seeds)
def test_attention(dtype, B, NH, T, hs, seed):
    """The fused causal attention against its full-matrix reference, forward and backward.
    atol 4x: y and the gradients are sums of up to T = 40 products of O(1) terms, added in
    another order than the reference's BLAS matmuls."""
    rng = np.random.default_rng(seed)
    q, k, v, dy = (randn(rng, (B, NH, T, hs), dtype) for _ in range(4))
    scale = 1 / math.sqrt(hs)
    y, lse = K.attention_fwd_nb(q, k, v, scale)
    y_ref, lse_ref = K.attention_fwd_ref(q, k, v, scale)
    close(y, y_ref, dtype, atol_scale=4)
    close(lse, lse_ref, dtype, atol_scale=4)
    close(K.attention_bwd_nb(dy, q, k, v, lse, scale), K.attention_bwd_ref(dy, q, k, v, lse_ref, scale), dtype,
          atol_scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(B=st.integers(1, 3), NH=st.integers(1, 3), hs=st.sampled_from([2, 4, 6, 16]), L0=st.integers(0, 12),
       rope=st.booleans(), smear=st.booleans(), seed=seeds)
def test_decode_attention(dtype, B, NH, hs, L0, rope, smear, seed):
    """One new token per row at position L0 of a cache with some keys masked (left padding):
    the same output and bit-identical cache writes (key, transposed key, value, smear's raw key)."""
    rng = np.random.default_rng(seed)
    Tmax = L0 + 3
    qkv = randn(rng, (B, 3 * NH * hs), dtype)
    kc, vc = randn(rng, (B, NH, Tmax, hs), dtype), randn(rng, (B, NH, Tmax, hs), dtype)
    key_valid = rng.random((B, Tmax)) < 0.6
    cos, sin = (randn(rng, (B, hs), dtype) for _ in range(2)) if rope else (None, None)
    k_last = randn(rng, (B, NH, hs), dtype) if smear else None
    gate, mix = rng.random(NH).astype(dtype), rng.random(B) < 0.7
    kT = np.ascontiguousarray(kc.swapaxes(-1, -2))
    outs = []
    for f in (K.decode_attention_nb, K.decode_attention_ref):
        caches = [kc.copy(), kT.copy(), vc.copy(), None if k_last is None else k_last.copy()]
        y = f(qkv, caches[0], caches[1], caches[2], key_valid, L0, cos, sin, caches[3], gate, mix)
        outs.append((y, caches))
    (y, got), (y_ref, want) = outs
    close(y, y_ref, dtype, atol_scale=4)       # sums of up to 13 products of O(1) terms
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(L=st.integers(1, 3), NH=st.integers(1, 3), hs=st.sampled_from([2, 4, 8]), V=st.integers(1, 40),
       L0=st.integers(0, 9), rope=st.booleans(), smear=st.booleans(), seed=seeds)
def test_decode_token(dtype, L, NH, hs, V, L0, rope, smear, seed):
    """The whole batch-1 step (every layer, one kernel call) against its NumPy reference: the
    same logits and cache writes in every layer, the rest of the cache untouched. atol 8x: the
    vector-matrix products add their terms in another order than BLAS, through L layers."""
    rng = np.random.default_rng(seed)
    C, Tmax = NH * hs, L0 + 2
    w = K.DecodeWeights(ln=1 + randn(rng, (L, 4, C), dtype, 0.1),
                        wa=randn(rng, (L, C, 3 * C), dtype, 0.3), ba=randn(rng, (L, 3 * C), dtype, 0.1),
                        wp=randn(rng, (L, C, C), dtype, 0.3), bp=randn(rng, (L, C), dtype, 0.1),
                        wf=randn(rng, (L, C, 4 * C), dtype, 0.3), bf=randn(rng, (L, 4 * C), dtype, 0.1),
                        wm=randn(rng, (L, 4 * C, C), dtype, 0.3), bm=randn(rng, (L, C), dtype, 0.1),
                        lnf=1 + randn(rng, (2, C), dtype, 0.1), wte_t=randn(rng, (C, V), dtype),
                        gate=rng.random((L, NH)).astype(dtype), eps=1e-5)
    x = randn(rng, (1, C), dtype)
    kc, vc = randn(rng, (L, 1, NH, Tmax, hs), dtype), randn(rng, (L, 1, NH, Tmax, hs), dtype)
    key_valid = rng.random((1, Tmax)) < 0.6
    cos, sin = (randn(rng, (1, hs), dtype) for _ in range(2)) if rope else (None, None)
    k_last = randn(rng, (L, 1, NH, hs), dtype) if smear else None
    mix = rng.random(1) < 0.7
    kT = np.ascontiguousarray(kc.swapaxes(-1, -2))
    outs = []
    for f in (K.decode_token_nb, K.decode_token_ref):
        caches = [kc.copy(), kT.copy(), vc.copy(), None if k_last is None else k_last.copy()]
        logits = f(x, L0, cos, sin, mix, w, caches[0], caches[1], caches[2], caches[3], key_valid)
        outs.append((logits, caches))
    (y, got), (y_ref, want) = outs
    assert y.shape == (1, V)
    close(y, y_ref, dtype, atol_scale=8)
    for a, b in zip(got, want):
        if a is not None:
            close(a, b, dtype, atol_scale=8)
    for a, before, at in ((got[0], kc, np.s_[..., L0, :]), (got[1], kT, np.s_[..., L0]), (got[2], vc, np.s_[..., L0, :])):
        untouched = np.ones(a.shape, bool)
        untouched[at] = False
        assert np.array_equal(a[untouched], before[untouched])   # only position L0 is written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed_a", [False, True])
def test_gemm_tiles(dtype, transposed_a):
    """The register tiles under the fused attention: C (+)= A @ B for M a multiple of 8, N of 16,
    A C-ordered or a transposed view; Numba's SLP setting is restored after the call."""
    from numba.core import config as numba_config

    from tinygrad_llm.kernels._tiles import gemm_tiles, run_with_slp
    rng = np.random.default_rng(4)
    M, N, K = 24, 32, 13
    A = randn(rng, (K, M), dtype).T if transposed_a else randn(rng, (M, K), dtype)
    B, C0 = randn(rng, (K, N), dtype), randn(rng, (M, N), dtype)
    before = numba_config.SLP_VECTORIZE
    C = C0.copy()
    run_with_slp(gemm_tiles, A, B, C, M, N, K, False)
    assert numba_config.SLP_VECTORIZE == before
    close(C, A @ B, dtype, atol_scale=4)           # K = 13 products, in another order than BLAS
    C = C0.copy()
    run_with_slp(gemm_tiles, A, B, C, M, N, K, True)
    close(C, C0 + A @ B, dtype, atol_scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(B=st.integers(1, 3), T=st.integers(1, 9), NH=st.integers(1, 3), hs=st.sampled_from([2, 4, 8]),
       per_row=st.booleans(), seed=seeds)
def test_rope_split_and_merge(dtype, B, T, NH, hs, per_row, seed):
    """The head split with RoPE and its backward: bit-identical to the NumPy reference (the same
    operations in the same order), and merge is the transpose of split: <split(x), g> = <x, merge(g)>."""
    rng = np.random.default_rng(seed)
    qkv, g = randn(rng, (B, T, 3 * NH * hs), dtype), randn(rng, (3, B, NH, T, hs), dtype)
    cos, sin = (randn(rng, (B if per_row else 1, T, hs), dtype) for _ in range(2))
    heads = K.rope_split_nb(qkv, NH, cos, sin)
    np.testing.assert_array_equal(heads, K.rope_split_ref(qkv, NH, cos, sin))
    dqkv = K.rope_merge_nb(g, cos, sin)
    np.testing.assert_array_equal(dqkv, K.rope_merge_ref(g, cos, sin))
    assert heads.dtype == dqkv.dtype == dtype
    lhs, rhs = float((heads.astype(np.float64) * g).sum()), float((qkv.astype(np.float64) * dqkv).sum())
    assert abs(lhs - rhs) <= 1e-4 * (1 + abs(lhs))


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(B=st.integers(1, 3), T=st.integers(1, 12), NH=st.integers(1, 3), hs=st.sampled_from([1, 2, 4]),
       per_row=st.booleans(), seed=seeds)
def test_smear_fwd_and_bwd(dtype, B, T, NH, hs, per_row, seed):
    """Smeared keys, forward and backward, against the reference: y, diff and dqkv bit-identical
    (the same operations in the same order), the gate's gradient to rounding (float64 sums in
    another order); mix per row (left padding) or shared (B|1, T)."""
    rng = np.random.default_rng(seed)
    qkv, dout = randn(rng, (B, T, 3 * NH * hs), dtype), randn(rng, (B, T, 3 * NH * hs), dtype)
    gate = rng.random(NH).astype(dtype)
    mix = rng.random((B if per_row else 1, T)) < 0.7
    y, diff = K.smear_fwd_nb(qkv, gate, mix)
    y_ref, diff_ref = K.smear_fwd_ref(qkv, gate, mix)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(diff, diff_ref)
    d, dgate = K.smear_bwd_nb(dout, diff, gate, mix)
    d_ref, dgate_ref = K.smear_bwd_ref(dout, diff_ref, gate, mix)
    np.testing.assert_array_equal(d, d_ref)
    close(dgate, dgate_ref, dtype, atol_scale=4)
