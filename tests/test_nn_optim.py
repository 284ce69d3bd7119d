"""Modules (names, init, state dicts) and the optimizer (AdamW by hand, decay groups, clipping, schedule)."""
import math

import numpy as np
import pytest

from tinygrad_llm import nn
from tinygrad_llm.config import ConfigError, GPTConfig, LoopConfig, get_mini_config, get_tiny_config
from tinygrad_llm.engine import Tensor
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import NS_COEFFS, AdamW, Muon, clip_grad_norm, get_lr, make_optimizer, orthogonalize


def test_parameter_names_follow_the_nanogpt_contract():
    cfg = get_tiny_config(vocab_size=30)
    names = dict((n, p.shape) for n, p in GPT(cfg).named_parameters())
    C, T = cfg.n_embd, cfg.block_size
    assert names["transformer.wte.weight"] == (30, C)
    assert names["transformer.wpe.weight"] == (T, C)
    assert names["transformer.h.0.attn.c_attn.weight"] == (3 * C, C)
    assert names["transformer.h.0.attn.c_attn.bias"] == (3 * C,)
    assert names["transformer.h.1.attn.c_proj.weight"] == (C, C)
    assert names["transformer.h.0.mlp.c_fc.weight"] == (4 * C, C)
    assert names["transformer.h.0.mlp.c_proj.weight"] == (C, 4 * C)
    assert names["transformer.ln_f.weight"] == (C,)
    assert not any("lm_head" in n for n in names)          # tied to wte, no key


def test_mini_model_size_matches_the_seed():
    # ~3.7M parameters at a 2,000-character vocabulary
    n = GPT(get_mini_config(vocab_size=2000)).num_parameters()
    assert 3.5e6 < n < 3.9e6


def test_gpt2_init_scales_residual_projections():
    cfg = get_mini_config(vocab_size=500)
    m = GPT(cfg, seed=0)
    sd = m.state_dict()
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 1e-3


@pytest.mark.parametrize("kw, match", [({"n_embd": 30, "n_head": 4}, "divisible"), ({"n_layer": 0}, "positive"),
                                       ({"dropout": 1.5}, "dropout")])
def test_impossible_config_fails_at_construction(kw, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**kw)


def test_load_state_dict_checks_names_shapes_dtypes():
    m = nn.Linear(3, 2)
    sd = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys"):
        m.load_state_dict({"weight": sd["weight"]})
    with pytest.raises(ValueError, match="unexpected keys"):
        m.load_state_dict({**sd, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        m.load_state_dict({**sd, "weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="dtype"):
        m.load_state_dict({**sd, "weight": sd["weight"].astype(np.float64)})
    m.load_state_dict(sd)


def test_train_eval_and_to_dtype():
    m = GPT(get_tiny_config(vocab_size=20))
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    assert m.to(np.float64).dtype == np.float64


def _adamw_by_hand(p, grads, lr, b1, b2, eps, wd):
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def test_adamw_matches_the_formula_and_skips_decay_on_biases():
    rng = np.random.default_rng(0)
    W = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    b = Tensor(rng.standard_normal(4), requires_grad=True)
    W0, b0 = W.data.copy(), b.data.copy()
    opt = AdamW([("W", W), ("b", b)], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    gW = [rng.standard_normal((3, 4)) for _ in range(3)]
    gb = [rng.standard_normal(4) for _ in range(3)]
    for i in range(3):
        W.grad, b.grad = gW[i], gb[i]
        opt.step()
    np.testing.assert_allclose(W.data, _adamw_by_hand(W0, gW, 0.1, 0.9, 0.95, 1e-8, 0.5), rtol=1e-10)
    np.testing.assert_allclose(b.data, _adamw_by_hand(b0, gb, 0.1, 0.9, 0.95, 1e-8, 0.0), rtol=1e-10)


def test_adamw_state_roundtrip():
    p = Tensor(np.ones((2, 2)), requires_grad=True)
    opt = AdamW([("p", p)], lr=0.1)
    p.grad = np.ones((2, 2))
    opt.step()
    opt2 = AdamW([("p", p)], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 1 and np.array_equal(opt2.m["p"], opt.m["p"])


def test_clip_grad_norm_returns_norm_and_scales():
    a = Tensor(np.zeros(2), requires_grad=True)
    b = Tensor(np.zeros(1), requires_grad=True)
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    norm = clip_grad_norm([a, b], 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt((a.grad ** 2).sum() + (b.grad ** 2).sum()) == pytest.approx(1.0, rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    lrs = [get_lr(s, 1.0, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:100], lrs[11:100]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


@pytest.mark.parametrize("shape", [(6, 16), (16, 6), (3, 8, 8)])
def test_orthogonalize_flattens_the_singular_values(shape):
    rng = np.random.default_rng(1)
    k = min(shape[-2:])                      # G = P diag(s) Q^T with singular values s from 1 to 10
    P = np.linalg.qr(rng.standard_normal((*shape[:-2], shape[-2], k)))[0]
    Q = np.linalg.qr(rng.standard_normal((*shape[:-2], shape[-1], k)))[0]
    G = P * np.linspace(1.0, 10.0, k) @ np.swapaxes(Q, -1, -2)
    U = orthogonalize(G)
    assert U.shape == G.shape and U.dtype == G.dtype
    for g, u in zip(G.reshape(-1, *shape[-2:]), U.reshape(-1, *shape[-2:])):
        s = np.linalg.svd(u, compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.3, s          # Muon's quintic: about [0.7, 1.2], not exactly 1
        Ug, _, Vg = np.linalg.svd(g, full_matrices=False)  # and the same singular vectors as G's polar factor
        assert np.abs(u - Ug @ Vg).max() < 0.5
        np.testing.assert_allclose(Ug.T @ u @ Vg.T, np.diag(np.diag(Ug.T @ u @ Vg.T)), atol=1e-6)


def _orthogonalize_by_hand(G, steps=5):
    a, b, c = NS_COEFFS
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_muon_matches_the_formula_and_leaves_the_rest_to_adamw():
    rng = np.random.default_rng(0)
    W = Tensor(rng.standard_normal((8, 4)), requires_grad=True)            # a block's matrix (tall)
    emb = Tensor(rng.standard_normal((5, 4)), requires_grad=True)          # not a block's: AdamW
    b = Tensor(rng.standard_normal(8), requires_grad=True)
    named = [("transformer.h.0.mlp.c_fc.weight", W), ("transformer.wte.weight", emb), ("transformer.h.0.mlp.c_fc.bias", b)]
    W0, e0, b0 = W.data.copy(), emb.data.copy(), b.data.copy()
    opt = Muon(named, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5, muon_lr=0.02, momentum=0.9)
    gW = [rng.standard_normal((8, 4)) for _ in range(3)]
    ge = [rng.standard_normal((5, 4)) for _ in range(3)]
    gb = [rng.standard_normal(8) for _ in range(3)]
    lrs = [0.1, 0.05, 0.025]                  # a schedule: Muon's lr follows it (0.02 x lr / 0.1)
    for i in range(3):
        W.grad, emb.grad, b.grad = gW[i], ge[i], gb[i]
        opt.step(lrs[i])
    w, m = W0.copy(), np.zeros_like(W0)
    for g, lr in zip(gW, lrs):
        m = 0.9 * m + 0.1 * g
        mlr = 0.02 * lr / 0.1
        w = w * (1 - lr * 0.5) - mlr * math.sqrt(8 / 4) * _orthogonalize_by_hand(0.1 * g + 0.9 * m)
    np.testing.assert_allclose(W.data, w, rtol=1e-10, atol=1e-12)
    ref = AdamW([("e", Tensor(e0.copy(), requires_grad=True)), ("b", Tensor(b0.copy(), requires_grad=True))],
                lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    for i in range(3):
        ref.params[0][1].grad, ref.params[1][1].grad = ge[i], gb[i]
        ref.step(lrs[i])
    np.testing.assert_allclose(emb.data, ref.params[0][1].data, rtol=1e-12)
    np.testing.assert_allclose(b.data, ref.params[1][1].data, rtol=1e-12)


def test_muon_state_roundtrip_and_the_config_switch():
    model = GPT(get_tiny_config(), seed=0)
    cfg = LoopConfig(optimizer="muon")
    opt = make_optimizer(model.named_parameters(), cfg)
    assert isinstance(opt, Muon) and {n for n, _ in opt.matrices} == \
        {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")}
    for _, p in model.named_parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    opt2 = make_optimizer(model.named_parameters(), cfg)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 1 and all(np.array_equal(opt2.buf[n], opt.buf[n]) for n in opt.buf)
    assert np.array_equal(opt2.adamw.m["transformer.wte.weight"], opt.adamw.m["transformer.wte.weight"])
    assert isinstance(make_optimizer(model.named_parameters(), LoopConfig()), AdamW)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        LoopConfig(optimizer="sgd").validate("pretrain")
