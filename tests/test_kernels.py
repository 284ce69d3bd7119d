"""Kernel pairs: every Numba `_nb` against its NumPy `_ref` (the references themselves are checked
against formulas in test_kernel_references.py).

Tolerances. float64: rtol = atol = 1e-12; the two sides differ only in summation order and in
libm vs NumPy exp (both within an ulp), i.e. ~1e-16 relative per op, so 1e-12 leaves 4 orders of
margin. float32 (eps = 1.2e-7): rtol 1e-5 (~80 ulp) covers a handful of roundings plus a
different summation order and the kernels' polynomial exp (< 1 ulp, see test_exp_neg);
atol 1e-6 covers entries produced by cancellation (dy - sum(y * dy) near 0, GELU's left tail where
the reference's 1 + tanh(u) cancels), whose error is ~eps times the size of the operands, which
are O(1) here. Sums over N rows (LayerNorm's dw, db) get atol scaled by N.
Shapes come from hypothesis (few examples, no deadline: the first call of a kernel compiles it).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import kernels as K

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
FEW = settings(max_examples=15, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


def close(a, b, dtype, atol_scale=1.0):
    """a (kernel) equals b (reference) within the dtype's tolerance, and keeps the dtype."""
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    tol = TOL[dtype]
    np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * atol_scale)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------------------------------------
# _nb == _ref on random shapes, both dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(N=st.integers(1, 9), D=st.integers(1, 70), scale=st.sampled_from([1.0, 30.0]), seed=seeds)
def test_softmax(dtype, N, D, scale, seed):
    rng = np.random.default_rng(seed)
    x, dy = randn(rng, (N, D), dtype, scale), randn(rng, (N, D), dtype)
    y = K.softmax_fwd_nb(x)
    close(y, K.softmax_fwd_ref(x), dtype)
    np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-5 if dtype == np.float32 else 1e-12)
    close(K.softmax_bwd_nb(y, dy), K.softmax_bwd_ref(y, dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(B=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 40), cut=st.integers(0, 39), seed=seeds)
def test_attn_softmax(dtype, B, NH, T, cut, seed):
    """Square (plain causal) and rectangular blocks: the last Tq of T queries against all T keys."""
    Tq = T - cut % T
    rng = np.random.default_rng(seed)
    att, dp = randn(rng, (B, NH, Tq, T), dtype, 4.0), randn(rng, (B, NH, Tq, T), dtype)
    scale = 1 / math.sqrt(16)
    p = K.attn_softmax_fwd_nb(att, scale)
    close(p, K.attn_softmax_fwd_ref(att, scale), dtype)
    above = np.triu(np.ones((T, T), bool), 1)[T - Tq:]  # key j > query position T - Tq + i
    assert np.all(p[..., above] == 0) and np.all(K.attn_softmax_fwd_ref(att, scale)[..., above] == 0)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5 if dtype == np.float32 else 1e-12)
    datt = K.attn_softmax_bwd_nb(p, dp, scale)
    close(datt, K.attn_softmax_bwd_ref(p, dp, scale), dtype)
    assert np.all(datt[..., above] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(N=st.integers(1, 9), V=st.integers(2, 90), seed=seeds)
def test_ce(dtype, N, V, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, (N, V), dtype, 3.0)
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) < 0.7).astype(dtype)
    dlosses = randn(rng, N, dtype)
    losses, lse = K.ce_fwd_nb(logits, targets, mask)
    losses_ref, lse_ref = K.ce_fwd_ref(logits, targets, mask)
    close(losses, losses_ref, dtype, atol_scale=10)  # lse - logit[t] is O(log V + 3 sigma)
    close(lse, lse_ref, dtype, atol_scale=10)
    close(K.ce_bwd_nb(logits, targets, mask, lse, dlosses),
          K.ce_bwd_ref(logits, targets, mask, lse, dlosses), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(N=st.integers(1, 40), C=st.integers(1, 70), seed=seeds)
def test_layernorm(dtype, N, C, seed):
    rng = np.random.default_rng(seed)
    x, dy = randn(rng, (N, C), dtype, 2.0) + dtype(0.5), randn(rng, (N, C), dtype)
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    out_nb, out_ref = K.layernorm_fwd_nb(x, w, b, 1e-5), K.layernorm_fwd_ref(x, w, b, 1e-5)
    for a, r in zip(out_nb, out_ref):
        close(a, r, dtype, atol_scale=10)  # y up to |w| * 4 sigma; rstd up to 1/sqrt(eps) at C=1
    _, mean, rstd = out_ref
    grads_nb, grads_ref = K.layernorm_bwd_nb(dy, x, w, mean, rstd), K.layernorm_bwd_ref(dy, x, w, mean, rstd)
    close(grads_nb[0], grads_ref[0], dtype, atol_scale=10)
    close(grads_nb[1], grads_ref[1], dtype, atol_scale=10 * N)  # sums over N rows
    close(grads_nb[2], grads_ref[2], dtype, atol_scale=10 * N)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), seed=seeds)
def test_gelu(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x, dy = randn(rng, shape, dtype, 4.0), randn(rng, shape, dtype)
    close(K.gelu_fwd_nb(x), K.gelu_fwd_ref(x), dtype, atol_scale=4)  # tail: eps * |x|, |x| < 4 sigma
    close(K.gelu_bwd_nb(x, dy), K.gelu_bwd_ref(x, dy), dtype, atol_scale=4)


def test_gelu_large_block_count():
    """More than one 16K-element span, with a ragged last span."""
    x = randn(np.random.default_rng(0), (3, 16384 + 7), np.float32, 3.0)
    close(K.gelu_fwd_nb(x), K.gelu_fwd_ref(x), np.float32, atol_scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_nb_ref_hand(dtype):
    """Three steps of nb and ref against a scalar hand computation of the formula in the brief."""
    rng = np.random.default_rng(1)
    shape = (7, 13)
    p0 = randn(rng, shape, dtype)
    grads = [randn(rng, shape, dtype) for _ in range(3)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    states = {}
    for name, f in (("nb", K.adamw_update_nb), ("ref", K.adamw_update_ref)):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for step, g in enumerate(grads, start=1):
            f(p, g, m, v, step=step, **hp)
        assert p.dtype == m.dtype == v.dtype == dtype
        states[name] = (p, m, v)
    # hand computation, one element at a time, in float64
    P, M, Vv = p0.astype(np.float64), np.zeros(shape), np.zeros(shape)
    for step, g in enumerate(grads, start=1):
        for i in np.ndindex(shape):
            gi = float(g[i])
            P[i] -= hp["lr"] * hp["weight_decay"] * P[i]
            M[i] = hp["beta1"] * M[i] + (1 - hp["beta1"]) * gi
            Vv[i] = hp["beta2"] * Vv[i] + (1 - hp["beta2"]) * gi * gi
            mhat, vhat = M[i] / (1 - hp["beta1"] ** step), Vv[i] / (1 - hp["beta2"] ** step)
            P[i] -= hp["lr"] * mhat / (math.sqrt(vhat) + hp["eps"])
    for name in ("nb", "ref"):
        for a, b in zip(states[name], (P, M, Vv)):
            np.testing.assert_allclose(a, b, **TOL[dtype])
    for a, b in zip(states["nb"], states["ref"]):
        close(a, b, dtype)


def test_adamw_large_flat():
    """Several 16K-element spans; any shape works through flat views."""
    rng = np.random.default_rng(2)
    arrs = [randn(rng, (5, 7001), np.float32) for _ in range(2)] + [np.abs(randn(rng, (5, 7001), np.float32))]
    a, b = [x.copy() for x in arrs], [x.copy() for x in arrs]
    g = randn(rng, (5, 7001), np.float32)
    K.adamw_update_nb(a[0], g, a[1], a[2], 1e-3, 0.9, 0.95, 1e-8, 0.1, 4)
    K.adamw_update_ref(b[0], g, b[1], b[2], 1e-3, 0.9, 0.95, 1e-8, 0.1, 4)
    for x, y in zip(a, b):
        close(x, y, np.float32)


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_no_overflow(dtype):
    """Logits of size 1e4: everything stays finite and the pairs still agree."""
    rng = np.random.default_rng(3)
    x = randn(rng, (4, 50), dtype, 1e4)
    targets, mask = rng.integers(0, 50, 4), np.ones(4, dtype)
    for f in (K.softmax_fwd_nb, K.softmax_fwd_ref):
        y = f(x)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-5)
    close(K.softmax_fwd_nb(x), K.softmax_fwd_ref(x), dtype)
    (l_nb, lse_nb), (l_ref, lse_ref) = K.ce_fwd_nb(x, targets, mask), K.ce_fwd_ref(x, targets, mask)
    assert np.all(np.isfinite(l_nb)) and np.all(np.isfinite(lse_nb))
    close(l_nb, l_ref, dtype, atol_scale=1e4)  # lse ~ 3e4: an ulp of it is ~2e-3 in float32
    dl = K.ce_bwd_nb(x, targets, mask, lse_nb, np.ones(4, dtype))
    assert np.all(np.isfinite(dl))
    close(dl, K.ce_bwd_ref(x, targets, mask, lse_ref, np.ones(4, dtype)), dtype, atol_scale=1e3)
    att = randn(rng, (1, 2, 9, 9), dtype, 1e4)
    p = K.attn_softmax_fwd_nb(att, 0.125)
    assert np.all(np.isfinite(p))
    close(p, K.attn_softmax_fwd_ref(att, 0.125), dtype)
    g = K.gelu_fwd_nb(randn(rng, 100, dtype, 1e4))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_mask_all_zero(dtype):
    rng = np.random.default_rng(4)
    x, targets, mask = randn(rng, (6, 11), dtype), rng.integers(0, 11, 6), np.zeros(6, dtype)
    for fwd, bwd in ((K.ce_fwd_nb, K.ce_bwd_nb), (K.ce_fwd_ref, K.ce_bwd_ref)):
        losses, lse = fwd(x, targets, mask)
        assert np.all(losses == 0) and np.all(np.isfinite(lse))
        assert np.all(bwd(x, targets, mask, lse, np.ones(6, dtype)) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row_and_single_position(dtype):
    """N = 1 rows and T = 1 attention (a single visible key: probability exactly 1)."""
    rng = np.random.default_rng(5)
    x = randn(rng, (1, 33), dtype)
    close(K.softmax_fwd_nb(x), K.softmax_fwd_ref(x), dtype)
    att = randn(rng, (2, 3, 1, 1), dtype)
    assert np.all(K.attn_softmax_fwd_nb(att, 0.5) == 1) and np.all(K.attn_softmax_fwd_ref(att, 0.5) == 1)


def test_non_contiguous_inputs_still_correct():
    """The contract is C-contiguous, but a transposed input must not give a silently wrong result."""
    rng = np.random.default_rng(10)
    x = randn(rng, (7, 5), np.float32).T  # F-ordered view
    close(K.gelu_fwd_nb(x), K.gelu_fwd_ref(x), np.float32)
    att = randn(rng, (3, 2, 6, 6), np.float32).swapaxes(0, 1)
    close(K.attn_softmax_fwd_nb(att, 0.5), K.attn_softmax_fwd_ref(att, 0.5), np.float32)
    with pytest.raises(ValueError):  # in place through a copy would lose the update
        K.adamw_update_nb(x, x, x.copy(), x.copy(), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_bad_arguments_raise():
    x = np.zeros((2, 5), np.float32)
    for f in (K.ce_fwd_nb, K.ce_fwd_ref):
        with pytest.raises(ValueError):
            f(x, np.array([0, 5]), np.ones(2, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), p=st.floats(0.0, 0.95),
       seed=st.integers(0, 2**64 - 1))
def test_dropout(dtype, shape, p, seed):
    """The kernel draws the very mask of the reference (same hash): y, keep and dx are equal."""
    rng = np.random.default_rng(seed % 2**32)
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    y_nb, keep_nb = K.dropout_fwd_nb(x, p, seed)
    y_ref, keep_ref = K.dropout_fwd_ref(x, p, seed)
    assert keep_nb.dtype == keep_ref.dtype == np.uint8 and y_nb.dtype == dtype
    np.testing.assert_array_equal(keep_nb, keep_ref)
    np.testing.assert_array_equal(y_nb, y_ref)
    np.testing.assert_array_equal(K.dropout_bwd_nb(dy, keep_ref, p), K.dropout_bwd_ref(dy, keep_ref, p))


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(N=st.integers(1, 300), C=st.integers(1, 150), V=st.integers(1, 40), seed=seeds)
def test_embedding_bwd(dtype, N, C, V, seed):
    """Scatter-add by column strips equals np.add.at bit for bit (same order of additions);
    repeated ids are summed and ids that never occur get zero rows."""
    rng = np.random.default_rng(seed)
    idx, dout = rng.integers(0, V, N), randn(rng, (N, C), dtype)
    got = K.embedding_bwd_nb(idx, dout, V)
    assert got.dtype == dtype and got.shape == (V, C)
    np.testing.assert_array_equal(got, K.embedding_bwd_ref(idx, dout, V))
    for v in range(V):
        np.testing.assert_allclose(got[v], dout[idx == v].sum(0), **TOL[dtype])


def test_dropout_ref_is_splitmix64():
    """The reference's vectorised uint64 hash against splitmix64 in plain Python integers."""
    M = 2**64 - 1
    def splitmix64(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & M
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & M
        return z ^ (z >> 31)
    seed, p = 2**64 - 3, 0.3
    keep = K.dropout_fwd_ref(np.ones(50), p, seed)[1]
    expect = [int(splitmix64((seed + (i + 1) * 0x9E3779B97F4A7C15) & M) >> 40 >= round(p * 2**24)) for i in range(50)]
    assert keep.tolist() == expect


def test_dropout_mask_statistics_and_threads():
    """Over 1M elements the dropped share is p within 5 sigma, masks of two seeds are
    independent, the mask is the same at 1 and 2 threads, and more than one span is covered."""
    import numba
    x = np.ones((4, 2**18), np.float32)
    for p in (0.1, 0.5):
        y, keep = K.dropout_fwd_nb(x, p, 12345)
        sigma = math.sqrt(p * (1 - p) / x.size)
        assert abs((1 - keep.mean()) - p) < 5 * sigma
        np.testing.assert_array_equal(y, keep * np.float32(1 / (1 - p)))
        other = K.dropout_fwd_nb(x, p, 12346)[1]
        both = (keep & other).mean()                       # P(both kept) = (1 - p)^2
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / x.size)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = K.dropout_fwd_nb(x, 0.1, 99)[1]
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(one, K.dropout_fwd_nb(x, 0.1, 99)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_preserved_by_dispatchers(dtype):
    """Every dispatcher returns the input dtype, never an upcast, on both backends."""
    rng = np.random.default_rng(6)
    x, w = randn(rng, (3, 8), dtype), randn(rng, 8, dtype)
    att = randn(rng, (1, 2, 4, 4), dtype)
    t, mask = np.array([1, 2, 3]), np.ones(3, dtype)
    for backend in ("numba", "numpy"):
        K.set_kernel_backend(backend)
        try:
            y = K.softmax_fwd(x)
            losses, lse = K.ce_fwd(x, t, mask)
            ln = K.layernorm_fwd(x, w, w, np.float32(1e-5))  # a NumPy scalar must not upcast either
            outs = [y, K.softmax_bwd(y, x), K.attn_softmax_fwd(att, np.float64(0.5)),
                    K.attn_softmax_bwd(att, att, 0.5), losses, lse, K.ce_bwd(x, t, mask, lse, mask),
                    *ln, *K.layernorm_bwd(x, x, w, ln[1], ln[2]), K.gelu_fwd(x), K.gelu_bwd(x, x),
                    K.dropout_fwd(x, 0.5, 3)[0],
                    K.dropout_bwd(x, K.dropout_fwd(x, 0.5, 3)[1], np.float64(0.5)),
                    K.embedding_bwd(t, x, 5)]
            p, m, v = x.copy(), np.zeros_like(x), np.zeros_like(x)
            K.adamw_update(p, x, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
        finally:
            K.set_kernel_backend("default")
        assert all(o.dtype == dtype for o in outs + [p, m, v])


def test_exp_neg():
    """The float32 polynomial exp: within 1 ulp on [-87, 0], 0 below, NaN kept, -inf -> 0."""
    from numba import njit

    from tinygrad_llm.kernels._helpers import exp_neg

    @njit
    def run(t, out):
        for i in range(t.shape[0]):
            out[i] = exp_neg(t[i])

    rng = np.random.default_rng(7)
    t = np.concatenate([-rng.random(200_000).astype(np.float32) * 87,
                        np.float32([0, -0.0, -1e-30, -86, -87, -87.01, -1e4, -np.inf, np.nan])])
    out = np.empty_like(t)
    run(t, out)
    exact = np.exp(t.astype(np.float64))
    ok = t >= -87
    ulps = np.abs(out[ok] - exact[ok]) / np.spacing(exact[ok].astype(np.float32))
    assert ulps.max() <= 1.0
    assert np.all(out[(t < -87)] == 0) and np.isnan(out[-1])
