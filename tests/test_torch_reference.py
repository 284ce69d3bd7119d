"""Ops and one attention layer against PyTorch, float64: values and gradients.

PyTorch is optional (not a dependency): without it this module is skipped. Every check runs
forward, then backward with a random upstream gradient (a plain .sum() would hide
transposition bugs), and compares the output and each input's gradient.

Tolerance: float64 carries ~1e-16 relative error per operation; ours and PyTorch sum in
different orders (BLAS blocking, 16-way partial sums in our kernels), which over the few
hundred terms here stays below ~1e-13. ATOL = 1e-10 leaves that margin while still catching
any real mistake (a wrong formula is off by 1e-3 or more).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tinygrad_llm import engine as E  # noqa: E402
from tinygrad_llm import nn  # noqa: E402
from tinygrad_llm.engine import Tensor  # noqa: E402

ATOL, RTOL = 1e-10, 1e-10


def compare(ours_fn, torch_fn, *arrays, rng, grad_of=None):
    """Run both on float64 copies of `arrays`; compare outputs and gradients of `grad_of`
    (indices of the inputs that get gradients; default all)."""
    grad_of = range(len(arrays)) if grad_of is None else grad_of
    ts = [Tensor(a.copy(), requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    tt = [torch.tensor(a, requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    out, tout = ours_fn(*ts), torch_fn(*tt)
    np.testing.assert_allclose(out.data, tout.detach().numpy(), rtol=RTOL, atol=ATOL)
    dout = np.asarray(rng.standard_normal(out.shape))
    out.backward(dout)
    tout.backward(torch.from_numpy(dout))
    for i in grad_of:
        np.testing.assert_allclose(ts[i].grad, tt[i].grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"input {i}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_matmul_batched_and_broadcast(rng):
    a, b = rng.standard_normal((2, 3, 5, 7)), rng.standard_normal((7, 4))
    compare(E.matmul, torch.matmul, a, b, rng=rng)
    a, b = rng.standard_normal((2, 3, 5, 7)), rng.standard_normal((3, 7, 4))    # batch broadcast
    compare(E.matmul, torch.matmul, a, b, rng=rng)


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_and_log_softmax(rng, axis):
    x = rng.standard_normal((3, 6, 11)) * 4
    compare(lambda t: E.softmax(t, axis), lambda t: F.softmax(t, dim=axis), x, rng=rng)
    compare(lambda t: E.log_softmax(t, axis), lambda t: F.log_softmax(t, dim=axis), x, rng=rng)


def test_layer_norm(rng):
    x, w, b = rng.standard_normal((4, 5, 32)) * 3 + 1, rng.standard_normal(32), rng.standard_normal(32)
    compare(lambda x, w, b: E.layer_norm(x, w, b, 1e-5),
            lambda x, w, b: F.layer_norm(x, (32,), w, b, eps=1e-5), x, w, b, rng=rng)


def test_gelu_tanh(rng):
    x = rng.standard_normal((6, 50)) * 3
    compare(E.gelu, lambda t: F.gelu(t, approximate="tanh"), x, rng=rng)


def test_logsigmoid(rng):
    x = np.concatenate([rng.standard_normal(40) * 5, [-50.0, 50.0, 0.0]])   # includes the stable tails
    compare(E.logsigmoid, F.logsigmoid, x, rng=rng)


def test_cross_entropy_ignore_and_mask(rng):
    B, T, V = 3, 7, 13
    logits = rng.standard_normal((B, T, V)) * 3
    targets = rng.integers(0, V, (B, T))
    targets[0, :3] = -100                                  # ignored positions (PyTorch's default index)
    ours = lambda l: E.cross_entropy(l, targets, ignore_index=-100)          # noqa: E731
    ref = lambda l: F.cross_entropy(l.reshape(-1, V), torch.from_numpy(targets.reshape(-1)),  # noqa: E731
                                    ignore_index=-100)
    compare(ours, ref, logits, rng=rng)
    # a 0/1 loss mask (SFT's assistant tokens) = mean over the kept positions
    mask = (rng.random((B, T)) < 0.6).astype(np.float64)
    mask[0, 0] = 1.0
    t2 = np.where(targets < 0, 0, targets)
    ours = lambda l: E.cross_entropy(l, t2, mask=mask)                      # noqa: E731

    def ref(l):
        per = F.cross_entropy(l.reshape(-1, V), torch.from_numpy(t2.reshape(-1)), reduction="none")
        m = torch.from_numpy(mask.reshape(-1))
        return (per * m).sum() / m.sum()
    compare(ours, ref, logits, rng=rng)


def test_causal_self_attention_layer(rng):
    """nn.CausalSelfAttention vs an explicit PyTorch one with its weights copied in."""
    B, T, C, NH = 2, 9, 16, 4
    hs = C // NH
    attn = nn.CausalSelfAttention(C, NH, dropout=0.0, rng=rng, dtype=np.float64)
    for p in (attn.c_attn.bias, attn.c_proj.bias):          # non-zero biases, so their grads mean something
        p.data = rng.standard_normal(p.shape) * 0.1
    x = rng.standard_normal((B, T, C))
    names = ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    tw = {n: torch.tensor(p.data.copy(), requires_grad=True) for n, p in attn.named_parameters()}
    assert sorted(tw) == sorted(names)

    def torch_attn(xt):
        q, k, v = F.linear(xt, tw["c_attn.weight"], tw["c_attn.bias"]).split(C, dim=2)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))        # (B, NH, T, hs)
        att = q @ k.transpose(-2, -1) / hs ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return F.linear(y, tw["c_proj.weight"], tw["c_proj.bias"])

    compare(attn, torch_attn, x, rng=rng)                   # output and dx
    for n, p in attn.named_parameters():                    # and every weight gradient
        np.testing.assert_allclose(p.grad, tw[n].grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=n)


@pytest.mark.parametrize("smear", [False, True])
def test_rope_and_smeared_keys_attention(rng, smear):
    """causal_self_attention with RoPE (and smear_keys before it) vs PyTorch written out from
    the formulas in model.py's docstring (rotate-half RoPE as Hugging Face LLaMA's): the output
    and the gradients of qkv and of the smear gate alpha. Row 1 is left-padded (positions
    0, 0, 0, 1, ...), as generation passes them."""
    B, T, NH, hs, base = 2, 7, 2, 8, 10000.0
    C = NH * hs
    pos = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    cos, sin = (t[pos][:, None] for t in E.rope_table(16, hs, base))
    qkv, alpha = rng.standard_normal((B, T, 3 * C)), rng.standard_normal(NH)

    def ours(qkv_t, a_t):
        if smear:
            qkv_t = E.smear_keys(qkv_t, a_t, NH, pos != 0)
        return E.causal_self_attention(qkv_t, NH, cos, sin)

    def rotate_half(x):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def ref(qkv_t, a_t):
        q, k, v = (t.reshape(B, T, NH, hs) for t in qkv_t.split(C, dim=2))
        if smear:
            prev = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], dim=1)
            mixed = k + torch.sigmoid(a_t).view(1, 1, NH, 1) * (prev - k)
            k = torch.where(torch.from_numpy(pos != 0).view(B, T, 1, 1), mixed, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                           # (B, NH, T, hs)
        inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        freqs = torch.from_numpy(pos).double()[..., None] * inv_freq                  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                             # (B, 1, T, hs)
        q = q * emb.cos() + rotate_half(q) * emb.sin()
        k = k * emb.cos() + rotate_half(k) * emb.sin()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, C)

    compare(ours, ref, qkv, alpha, rng=rng, grad_of=[0, 1] if smear else [0])
