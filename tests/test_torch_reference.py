"""Ops, attention and the whole tiny GPT against PyTorch, float64: values and gradients.

PyTorch is optional (not a dependency): without it this module is skipped. Every check runs
forward, then backward with a random upstream gradient (a plain .sum() would hide
transposition bugs), and compares the output and each input's gradient. The PyTorch model is
tests/torch_gpt.py, which tests/make_fixtures.py also freezes into tests/fixtures/ for
tests/test_fixtures.py, the same comparisons where torch is absent.

Tolerance: float64 carries ~1e-16 relative error per operation; ours and PyTorch sum in
different orders (BLAS blocking, 16-way partial sums in our kernels), which over the few
hundred terms here stays below ~1e-13. ATOL = 1e-10 leaves that margin while still catching
any real mistake (a wrong formula is off by 1e-3 or more).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import torch_gpt  # noqa: E402  (tests/torch_gpt.py: our GPT written out in PyTorch)
from tinygrad_llm import engine as E  # noqa: E402
from tinygrad_llm import nn  # noqa: E402
from tinygrad_llm.config import GPTConfig  # noqa: E402
from tinygrad_llm.engine import Tensor  # noqa: E402
from tinygrad_llm.model import GPT  # noqa: E402

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
    """nn.CausalSelfAttention vs PyTorch's (c_attn, tests/torch_gpt.py's attention, c_proj) with
    its weights copied in."""
    B, T, C, NH = 2, 9, 16, 4
    attn = nn.CausalSelfAttention(C, NH, dropout=0.0, rng=rng, dtype=np.float64)
    for p in (attn.c_attn.bias, attn.c_proj.bias):          # non-zero biases, so their grads mean something
        p.data = rng.standard_normal(p.shape) * 0.1
    x = rng.standard_normal((B, T, C))
    names = ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    tw = {n: torch.tensor(p.data.copy(), requires_grad=True) for n, p in attn.named_parameters()}
    assert sorted(tw) == sorted(names)

    def torch_attn(xt):
        qkv = F.linear(xt, tw["c_attn.weight"], tw["c_attn.bias"])
        return F.linear(torch_gpt.attention(qkv, NH), tw["c_proj.weight"], tw["c_proj.bias"])

    compare(attn, torch_attn, x, rng=rng)                   # output and dx
    for n, p in attn.named_parameters():                    # and every weight gradient
        np.testing.assert_allclose(p.grad, tw[n].grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=n)


@pytest.mark.parametrize("smear", [False, True])
def test_rope_and_smeared_keys_attention(rng, smear):
    """causal_self_attention with RoPE (and smear_keys before it) vs PyTorch written out from
    the formulas in model.py's docstring (tests/torch_gpt.py: rotate-half RoPE as Hugging Face
    LLaMA's): the output and the gradients of qkv and of the smear gate alpha. Row 1 is
    left-padded (positions 0, 0, 0, 1, ...), as generation passes them."""
    B, T, NH, hs, base = 2, 7, 2, 8, 10000.0
    C = NH * hs
    pos = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    cos, sin = (t[pos][:, None] for t in E.rope_table(16, hs, base))
    qkv, alpha = rng.standard_normal((B, T, 3 * C)), rng.standard_normal(NH)

    def ours(qkv_t, a_t):
        if smear:
            qkv_t = E.smear_keys(qkv_t, a_t, NH, pos != 0)
        return E.causal_self_attention(qkv_t, NH, cos, sin)

    def theirs(qkv_t, a_t):
        return torch_gpt.attention(qkv_t, NH, torch.from_numpy(pos), base, a_t if smear else None, pos != 0)

    compare(ours, theirs, qkv, alpha, rng=rng, grad_of=[0, 1] if smear else [0])


@pytest.mark.parametrize("pos_emb,smear", [("learned", False), ("rope", False), ("rope", True)])
def test_gpt_forward_backward(rng, pos_emb, smear):
    """The whole tiny GPT vs tests/torch_gpt.py with the same weights: logits, loss and every
    parameter's gradient (tests/fixtures/gpt_*.npz hold the same check, frozen, plus AdamW steps)."""
    cfg = GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.0, pos_emb=pos_emb,
                    smear_keys=smear)
    model = GPT(cfg, seed=1, dtype=np.float64)
    for p in model.parameters():                       # every weight non-trivial (biases start at 0)
        p.data = p.data + rng.standard_normal(p.shape) * 0.1
    assert torch_gpt.param_shapes(cfg) == {n: p.shape for n, p in model.named_parameters()}
    idx, targets = rng.integers(0, cfg.vocab_size, (2, 10)), rng.integers(0, cfg.vocab_size, (2, 10))
    tw = {n: torch.tensor(p.data.copy(), requires_grad=True) for n, p in model.named_parameters()}
    logits, loss = model(idx, targets)
    loss.backward()
    tlogits, tloss = torch_gpt.gpt(tw, cfg, torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    np.testing.assert_allclose(logits.data, tlogits.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss.data, tloss.item(), rtol=RTOL, atol=ATOL)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tw[n].grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=n)
