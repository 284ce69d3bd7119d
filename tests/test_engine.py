"""Engine: every op's gradient against central finite differences (float64, random upstream
gradient), shapes and broadcasting drawn by hypothesis, and the autograd properties."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinygrad_llm
from tinygrad_llm import engine as E
from tinygrad_llm import gradcheck as G
from tinygrad_llm.engine import Tensor

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.mark.parametrize("name", list(G.OPS))
def test_op_gradient_matches_finite_differences(name):
    for r in G.check_op(name):
        assert r.ok, f"{name}.{r.name}: max abs {r.max_abs:.2e}, max rel {r.max_rel:.2e}"


def test_module_gradients_match_finite_differences():
    for r in G.check_modules():
        assert r.ok, f"{r.name}: max rel {r.max_rel:.2e}"


def test_gradcheck_catches_a_wrong_backward():
    # a deliberately wrong backward must FAIL: the checker is not vacuous
    def bad_square(a):
        out = E.op_output(a.data ** 2, (a,))
        out._backward = lambda d: a._accumulate(d * a.data)      # should be 2 * a
        return out
    res = G.check(bad_square, [Tensor(np.random.default_rng(0).standard_normal(5), requires_grad=True)])
    assert not res[0].ok


# -- broadcasting, drawn by hypothesis ------------------------------------------------------

@st.composite
def broadcast_pair(draw):
    nd = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    other = [1 if draw(st.booleans()) else s for s in shape]
    drop = draw(st.integers(0, nd - 1))
    return tuple(shape), tuple(other[drop:])


@SETTINGS
@given(broadcast_pair(), st.sampled_from(["add", "sub", "mul", "div"]), st.booleans())
def test_binary_broadcasting_gradients(shapes, op, swap):
    a_shape, b_shape = shapes if not swap else shapes[::-1]
    rng = np.random.default_rng(1)
    a = Tensor(rng.standard_normal(a_shape), requires_grad=True)
    b = Tensor(np.abs(rng.standard_normal(b_shape)) + 0.5, requires_grad=True)
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "div": lambda x, y: x / y}[op]
    for r in G.check(fn, [a, b]):
        assert r.ok, (op, a_shape, b_shape, r)
    assert a.grad.shape == a_shape and b.grad.shape == b_shape


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_batched_matmul_gradients(b1, b2, n, k, m, broadcast_b):
    rng = np.random.default_rng(2)
    a = Tensor(rng.standard_normal((b1, b2, n, k)), requires_grad=True)
    b = Tensor(rng.standard_normal((k, m) if broadcast_b else (b1, b2, k, m)), requires_grad=True)
    for r in G.check(lambda x, y: x @ y, [a, b]):
        assert r.ok


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_reductions_gradients(shape, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    keep = data.draw(st.booleans())
    rng = np.random.default_rng(3)
    x = Tensor(rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.1, requires_grad=True)
    for fn in (lambda t: t.sum(axis, keep), lambda t: t.mean(axis, keep), lambda t: t.max(axis, keep)):
        assert all(r.ok for r in G.check(fn, [x]))


# -- properties --------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 5), st.integers(1, 40), st.sampled_from([np.float32, np.float64]))
def test_softmax_rows_sum_to_one(n, d, dtype):
    x = Tensor((np.random.default_rng(4).standard_normal((n, d)) * 30).astype(dtype))
    y = E.softmax(x, -1).data
    assert y.dtype == dtype
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 9), st.sampled_from([2, 4, 8]), st.data())
def test_attention_is_causal(B, NH, T, hs, data):
    path = data.draw(st.sampled_from(["numpy", "numba"]))        # blocked GEMMs | fused kernel
    before = tinygrad_llm.kernels.get_kernel_backend()["attention"]
    tinygrad_llm.kernels.set_kernel_backend({"attention": path})
    try:
        _check_attention_is_causal(B, NH, T, hs, data)
    finally:
        tinygrad_llm.kernels.set_kernel_backend({"attention": before})


def _check_attention_is_causal(B, NH, T, hs, data):
    t = data.draw(st.integers(0, T - 2))
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((B, NH, T, hs)).astype(np.float32) for _ in range(3))
    y1 = E.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v)).data
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t + 1:] += 5.0
    v2[:, :, t + 1:] -= 3.0
    y2 = E.scaled_dot_product_attention(Tensor(q), Tensor(k2), Tensor(v2)).data
    np.testing.assert_array_equal(y1[:, :, :t + 1], y2[:, :, :t + 1])   # bit-identical
    assert not np.array_equal(y1[:, :, t + 1:], y2[:, :, t + 1:])


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 64))
def test_layer_norm_normalises_rows(n, c):
    x = Tensor(np.random.default_rng(6).standard_normal((n, c)) * 7 + 3)
    y = E.layer_norm(x, Tensor(np.ones(c)), Tensor(np.zeros(c))).data
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-10)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)   # eps 1e-5 against variance ~49


@SETTINGS
@given(n=st.integers(1, 12), data=st.data())
def test_gathered_rows_scatter_back_and_repeated_rows_accumulate(n, data):
    """x[rows] then scatter(rows) is x on those rows and 0 elsewhere; the gather's gradient is
    the same whether its rows are distinct (plain assignment) or repeated (np.add.at)."""
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    x = Tensor(np.random.default_rng(n).standard_normal((n, 3)), requires_grad=True)
    out = E.scatter(x[rows], rows, n)
    keep = np.zeros(n, bool)
    keep[rows] = True
    np.testing.assert_array_equal(out.data, x.data * keep[:, None])
    (out * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad, 2.0 * keep[:, None] * np.ones((n, 3)))
    x.grad = None
    x[np.concatenate([rows, rows[:1]])].sum().backward()          # a row twice: counted twice
    want = keep[:, None] * 1.0 + (np.arange(n) == rows[0])[:, None]
    np.testing.assert_array_equal(x.grad, want * np.ones((n, 3)))


def test_reused_tensor_accumulates_both_gradients():
    rng = np.random.default_rng(7)
    w = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    x = Tensor(rng.standard_normal((2, 3)))
    (E.linear(x, w).sum() + (w * w).sum()).backward()
    together = w.grad.copy()
    w.grad = None
    E.linear(x, w).sum().backward()
    g1, w.grad = w.grad.copy(), None
    (w * w).sum().backward()
    np.testing.assert_allclose(together, g1 + w.grad, rtol=1e-12)


def test_tied_weight_gets_both_contributions():
    rng = np.random.default_rng(8)
    wte = Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    h = E.embedding(wte, np.array([[1, 2, 2]]))
    E.cross_entropy(E.linear(h, wte), np.array([[2, 0, 1]])).backward()
    assert np.abs(wte.grad[[0, 3, 4]]).sum() > 0      # rows only used as output classes


def test_dtype_is_kept_and_never_mixed():
    x32 = Tensor(np.ones((2, 2), np.float32), requires_grad=True)
    y = (x32 * 2.5 + 1).exp().sum()
    assert y.dtype == np.float32
    y.backward()
    assert x32.grad.dtype == np.float32
    with pytest.raises(TypeError, match="dtype mismatch"):
        x32 + Tensor(np.ones((2, 2), np.float64))


def test_no_grad_builds_no_graph_and_retain_grad_keeps_intermediates():
    x = Tensor(np.ones(3), requires_grad=True)
    with E.no_grad():
        assert not (x * 2).requires_grad
    h = (x * 3).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 6 * np.ones(3))
    np.testing.assert_allclose(x.grad, 18 * np.ones(3))


def test_dropout_train_and_eval():
    E.manual_seed(0)
    x = Tensor(np.ones((100, 100), np.float32))
    y = E.dropout(x, 0.5, training=True).data
    assert set(np.unique(y)) == {0.0, 2.0}
    assert E.dropout(x, 0.5, training=False) is x


def test_profiler_counts_ops():
    x = Tensor(np.ones((4, 4), np.float32), requires_grad=True)
    with E.profile() as prof:
        E.gelu(x @ x).sum().backward()
    names = {r[0] for r in prof.rows()}
    assert {"matmul", "gelu", "reduce_sum"} <= names
    assert "gelu" in prof.table()


@pytest.mark.parametrize("fn, match", [
    (lambda: Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5))), "matmul shape mismatch"),
    (lambda: Tensor(np.ones((2, 3))) + Tensor(np.ones((4, 5))), "cannot be broadcast"),
    (lambda: Tensor(np.ones((2, 3)), requires_grad=True).exp().backward(), "non-scalar"),
    (lambda: Tensor(np.ones(3)).reshape(2, 2), "cannot reshape"),
    (lambda: E.embedding(Tensor(np.ones((3, 2))), np.array([5])), "out of range"),
    (lambda: E.scatter(Tensor(np.ones((2, 3))), np.array([1, 1]), 4), "distinct"),
    (lambda: E.scatter(Tensor(np.ones((2, 3))), np.array([1, 4]), 4), "distinct ints in"),
])
def test_bad_input_gives_a_clear_error(fn, match):
    with pytest.raises((ValueError, RuntimeError, IndexError, TypeError), match=match):
        fn()


def test_threaded_bmm_equals_matmul():
    from tinygrad_llm import runtime
    rng = np.random.default_rng(9)
    a = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    b = rng.standard_normal((3, 4, 7, 6)).astype(np.float32).swapaxes(-1, -2)   # a strided view
    for threads in (2, 1):
        try:
            runtime.configure_threads(threads)
            got = runtime.bmm(a, b)
            big = np.zeros((3, 4, 9, 7), np.float32)            # out=: rows 2..6 of a larger array
            runtime.bmm(a, b, out=big[:, :, 2:7])
        finally:
            runtime.configure_threads(1)
        np.testing.assert_allclose(got, a @ b, rtol=1e-6)
        np.testing.assert_allclose(big[:, :, 2:7], a @ b, rtol=1e-6)
        assert not big[:, :, :2].any() and not big[:, :, 7:].any()
    assert runtime.bmm(a[:1, :1], b[:1, :1]).shape == (1, 1, 5, 7)
    try:                                                   # an out= whose leading dims cannot merge
        runtime.configure_threads(2)
        with pytest.raises(ValueError, match="cannot be viewed"):
            runtime.bmm(a, b, out=np.zeros((4, 3, 5, 7), np.float32).swapaxes(0, 1))
    finally:
        runtime.configure_threads(1)


@pytest.mark.parametrize("shape", [(300, 40, 200), (40, 300, 500), (257, 129, 257), (8, 9, 10)])
def test_threaded_mm_equals_matmul(shape, monkeypatch):
    """The split GEMM of linear(): row split (M >= N), column split, uneven cuts, and the
    small-GEMM fallback, on C-ordered and transposed operands, in float64."""
    from tinygrad_llm import runtime
    monkeypatch.setattr(runtime, "PAR_MIN_FLOPS", 0)
    M, K, N = shape
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((M, K)), rng.standard_normal((N, K)).T            # b: a transposed view
    bias = rng.standard_normal(N)
    for threads in (2, 1):
        try:
            runtime.configure_threads(threads)
            got, got_t, got_b = runtime.mm(a, b), runtime.mm(b.T, a.T), runtime.mm(a, b, bias)
        finally:
            runtime.configure_threads(1)
        np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_t, b.T @ a.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_b, a @ b + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65])
def test_few_rows_mm_equals_matmul(rows):
    """x @ W.T with few rows takes the (W @ x.T).T path: same values, C-ordered result."""
    from tinygrad_llm import runtime
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((rows, 48)), rng.standard_normal((96, 48))
    got = runtime.mm(x, w.T)
    assert got.flags.c_contiguous and got.shape == (rows, 96)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-12, atol=1e-12)
    bias = rng.standard_normal(96)
    np.testing.assert_allclose(runtime.mm(x, w.T, bias), x @ w.T + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not tinygrad_llm.KEEPS_FREED_MEMORY, reason="not glibc, or opted out")
def test_freed_memory_is_reused_without_page_faults():
    """tinygrad_llm turns glibc's mmap-per-large-block off: arrays of a step's sizes, freed and
    allocated again, come back without page faults (glibc's default: ~10,000 per round here)."""
    import resource
    sizes = np.random.default_rng(0).integers(1 << 16, 1 << 24, 20)     # 256 kB .. 64 MB
    def one_round():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [np.ones(int(n), np.float32) for n in sizes]
        del arrays
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    one_round()                                                          # first touch
    assert max(one_round(), one_round()) < 2000


def test_single_thread_block_restores_the_count():
    from tinygrad_llm import runtime
    try:
        runtime.configure_threads(2)
        with runtime.single_thread():
            assert runtime._threads == 1
        assert runtime._threads == 2
    finally:
        runtime.configure_threads(1)


def test_auto_threads_drop_to_one_when_others_are_busy(monkeypatch):
    from tinygrad_llm import runtime
    clock = {"busy": 0.0}
    monkeypatch.setattr(runtime, "_cpu_busy_jiffies", lambda: clock["busy"])
    monkeypatch.setattr(runtime.os, "sysconf", lambda name: 1)          # 1 jiffy = 1 s
    monkeypatch.setattr(runtime, "CHECK_EVERY_S", 0.0)
    monkeypatch.delenv("TINYGRAD_LLM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    try:
        assert runtime.configure_threads(None) == 2
        runtime.adapt_threads()                                          # first reading
        clock["busy"] += 1e6                                             # others burn CPU
        assert runtime.adapt_threads() == 1
        runtime.adapt_threads()
        assert runtime.adapt_threads() == 2                              # idle again
    finally:
        runtime.configure_threads(1)


@pytest.mark.parametrize("name", ["attention", "self_attention"])
def test_attention_by_query_blocks(name, monkeypatch):
    """Blocks of about 2 query rows (T = 5 -> rows 0-1 and 2-4): the blocked attention matches
    the one-block result and passes the finite-difference check."""
    fn, build = G.OPS[name]
    inputs = build(np.random.default_rng(3))
    one = fn(*inputs).data
    from tinygrad_llm.engine import attention
    monkeypatch.setattr(attention, "ATTN_BLOCK", 2)
    monkeypatch.setitem(tinygrad_llm.kernels.backend._chosen, "attention", "numpy")   # the blocked path
    assert attention._query_blocks(5) == [(0, 2), (2, 5)]
    np.testing.assert_allclose(fn(*inputs).data, one, rtol=1e-12, atol=1e-12)
    for r in G.check_op(name):
        assert r.ok, f"{name} by blocks: {r}"


# -- RoPE, drawn by hypothesis --------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.sampled_from([2, 4, 8]), st.booleans(),
       st.integers(0, 20))
def test_rope_is_a_rotation_by_relative_position(B, NH, T, hs, per_row, shift):
    rng = np.random.default_rng(B * 100 + NH * 10 + T)
    cos_t, sin_t = E.rope_table(T + 21, hs, base=100.0)
    assert cos_t.shape == sin_t.shape == (T + 21, hs)
    pos = rng.integers(0, T + 1, (B, T)) if per_row else np.arange(T)[None]
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]                  # (B|1, 1, T, hs)
    q, k = rng.standard_normal((2, B, NH, T, hs))
    qr, kr = E.apply_rope(q, cos, sin), E.apply_rope(k, cos, sin)
    assert qr.shape == q.shape
    # a rotation: norms kept, and the transpose (the backward) undoes it
    np.testing.assert_allclose(np.linalg.norm(qr, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(E.apply_rope_transposed(qr, cos, sin), q, atol=1e-12)
    # q_i . k_j depends on the positions only through their difference
    cos2, sin2 = cos_t[pos + shift][:, None], sin_t[pos + shift][:, None]
    a = qr @ kr.swapaxes(-1, -2)
    b = E.apply_rope(q, cos2, sin2) @ E.apply_rope(k, cos2, sin2).swapaxes(-1, -2)
    np.testing.assert_allclose(a, b, atol=1e-10)


def test_rope_matches_the_pairwise_rotation_formula():
    # [x_j, x_{j+hs/2}] turned by angle p * base^(-2j/hs), written out with 2x2 rotations
    hs, base, p = 6, 10000.0, 7
    cos, sin = (t[p] for t in E.rope_table(8, hs, base))
    x = np.random.default_rng(0).standard_normal(hs)
    want = np.empty(hs)
    for j in range(hs // 2):
        a = p * base ** (-2 * j / hs)
        x1, x2 = x[j], x[j + hs // 2]
        want[j], want[j + hs // 2] = x1 * np.cos(a) - x2 * np.sin(a), x1 * np.sin(a) + x2 * np.cos(a)
    np.testing.assert_allclose(E.apply_rope(x, cos, sin), want, atol=1e-14)


def test_smear_keys_mixes_only_after_position_zero():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 4, 3 * 4))                     # C = 4, 2 heads of 2
    alpha = np.array([0.0, 2.0])
    pos = np.array([[0, 1, 2, 3], [0, 0, 1, 2]])                  # row 1: one left pad
    out = E.smear_keys(Tensor(qkv), Tensor(alpha), 2, pos != 0).data.reshape(2, 4, 3, 2, 2)
    x = qkv.reshape(2, 4, 3, 2, 2)
    g = 1 / (1 + np.exp(-alpha))[:, None]
    np.testing.assert_array_equal(out[:, :, [0, 2]], x[:, :, [0, 2]])    # q, v untouched
    for b in range(2):
        for t in range(4):
            k = x[b, t, 1]
            want = k + g * (x[b, t - 1, 1] - k) if pos[b, t] else k
            np.testing.assert_allclose(out[b, t, 1], want, atol=1e-14)
