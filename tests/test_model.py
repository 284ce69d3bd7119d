"""GPT: KV-cache generation equals full recomputation, sampling options, every parameter's
gradient, and the llm.c smoke test (a tiny model overfits one batch)."""
import dataclasses

import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm import gradcheck as G
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import AdamW


@pytest.fixture(scope="module")
def model():
    return GPT(get_tiny_config(vocab_size=60), seed=3)


def _full_recompute_greedy(model, prompt, n):
    seq, logits_seen = list(prompt), []
    for _ in range(n):
        with E.no_grad():
            logits = model(np.array([seq]))[0].data[0, -1]
        logits_seen.append(logits)
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], logits_seen


def test_kv_cache_greedy_equals_full_recompute(model):
    prompts = [[7, 8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23]]           # ragged: left padding
    g = model.generate(prompts, max_new_tokens=12, temperature=0.0, stop_tokens=(), return_logprobs=True)
    for b, p in enumerate(prompts):
        toks, logits = _full_recompute_greedy(model, p, 12)
        assert g.tokens[b].tolist() == toks
        for t, lg in enumerate(logits):
            lp = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
            assert abs(lp[toks[t]] - g.logprobs[b, t]) < 1e-4          # float32 precision


@pytest.mark.parametrize("temperature, rng, fast", [(0.0, None, True), (1.0, 5, True),
                                                    (1.0, "rows", True), (1.0, 5, False)])
def test_finished_rows_leave_the_batch_without_changing_any_row(model, monkeypatch, temperature, rng, fast):
    """generate() drops finished rows from its batch and KV cache (model.COMPACT_BELOW): every
    row's tokens, mask, log-probs and finish equal those of the batch decoded to the end, for
    greedy, a shared Generator and one Generator per row, on both decoding paths."""
    import tinygrad_llm.decode as D
    import tinygrad_llm.model as M
    monkeypatch.setattr(D, "ENABLED", fast)
    prompts = [[7 + b % 9, 8, 9 + b % 5][: 1 + b % 3] for b in range(12)]     # ragged
    stop = (3, 11, 17, 29, 40)                                                  # sampled: replies of many lengths
    if temperature == 0:                # greedy: stop at tokens the rows reach at different steps
        free = model.generate(prompts, max_new_tokens=24, temperature=0.0, stop_tokens=()).tokens
        stop = tuple({int(free[b, 1 + 2 * b]) for b in range(0, 12, 2)})
    def run():
        r = [np.random.default_rng(100 + b) for b in range(12)] if rng == "rows" else rng
        return model.generate(prompts, max_new_tokens=24, temperature=temperature, rng=r, stop_tokens=stop,
                              return_logprobs=True)
    monkeypatch.setattr(M, "COMPACT_BELOW", 0.0)
    whole = run()
    monkeypatch.setattr(M, "COMPACT_BELOW", 0.75)
    calls, select = [], M.KVCache.select
    monkeypatch.setattr(M.KVCache, "select", lambda self, rows: (calls.append(len(rows)), select(self, rows)))
    compact = run()
    assert calls                                                                # the batch did shrink
    lengths = whole.mask.sum(1)
    assert lengths.min() < lengths.max() - 3 and whole.finished.sum() >= 6      # rows do leave early
    assert np.array_equal(compact.tokens, whole.tokens) and np.array_equal(compact.mask, whole.mask)
    assert np.array_equal(compact.finished, whole.finished)
    np.testing.assert_allclose(compact.logprobs * compact.mask, whole.logprobs * whole.mask, atol=1e-5)


def test_cached_logits_equal_full_forward(model):
    from tinygrad_llm.model import KVCache
    seq = np.array([[5, 6, 7, 8, 9, 10]])
    with E.no_grad():
        full = model(seq)[0].data
        cache = KVCache(model.config, 1, 6, np.float32)
        cache.add_valid(np.ones((1, 3), bool))
        a = model(seq[:, :3], positions=np.arange(3)[None], cache=cache)[0].data
        cache.advance(3)
        outs = [a]
        for t in range(3, 6):
            cache.add_valid(np.ones((1, 1), bool))
            outs.append(model(seq[:, t:t + 1], positions=np.array([[t]]), cache=cache)[0].data)
            cache.advance(1)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


def test_sampling_is_seeded_and_options_behave(model):
    p = [[3, 4, 5]]
    a = model.generate(p, 10, temperature=1.0, rng=1, stop_tokens=())
    b = model.generate(p, 10, temperature=1.0, rng=1, stop_tokens=())
    assert np.array_equal(a.tokens, b.tokens)
    greedy = model.generate(p, 10, temperature=0.0, stop_tokens=())
    topk1 = model.generate(p, 10, temperature=0.7, top_k=1, rng=2, stop_tokens=())
    assert np.array_equal(greedy.tokens, topk1.tokens)
    nucleus = model.generate(p, 10, temperature=0.7, top_p=1e-6, rng=3, stop_tokens=())
    assert np.array_equal(greedy.tokens, nucleus.tokens)
    rep = model.generate(p, 10, temperature=0.0, repetition_penalty=50.0, stop_tokens=())
    assert len(set(rep.tokens[0].tolist())) > len(set(greedy.tokens[0].tolist())) or len(set(greedy.tokens[0].tolist())) == 10


def test_stop_tokens_end_a_row_and_mask_what_follows(model):
    g0 = model.generate([[3, 4, 5], [6, 7]], 8, temperature=0.0, stop_tokens=())
    stop = int(g0.tokens[0, 2])                      # make row 0's third token a stop token
    g = model.generate([[3, 4, 5], [6, 7]], 8, temperature=0.0, stop_tokens=(stop,))
    assert g.finished[0] and g.mask[0].sum() == list(g0.tokens[0]).index(stop) + 1
    assert (g.tokens[0, int(g.mask[0].sum()):] == 0).all()


def test_long_prompts_are_cut_from_the_left_with_a_warning(model):
    T = model.config.block_size
    with pytest.warns(UserWarning, match="cut from the left"):
        g = model.generate([list(range(1, 50)) * 3], max_new_tokens=5, temperature=0.0)
    assert len(g.prompts[0]) == T - 5


def test_every_gpt_parameter_passes_gradcheck():
    results = G.check_tiny_gpt(max_elems=6)
    assert len(results) == 2 + 12 * get_tiny_config().n_layer + 2      # wte, wpe, blocks, ln_f
    bad = [r for r in results if not r.ok]
    assert not bad, bad


def test_every_rope_smear_gpt_parameter_passes_gradcheck():
    results = G.check_tiny_gpt(max_elems=6, pos_emb="rope", smear_keys=True)
    names = [r.name for r in results]
    assert len(results) == 1 + 13 * get_tiny_config().n_layer + 2      # wte, blocks (+ smear), ln_f
    assert "gpt.transformer.h.1.attn.smear" in names and not any("wpe" in n for n in names)
    bad = [r for r in results if not r.ok]
    assert not bad, bad


def test_embedding_noise_is_a_constant_on_the_token_embeddings():
    """NEFTune's noise (stages/sft.py): zero noise changes nothing, any other noise changes the
    logits, it gets no gradient of its own, and every parameter's gradient stays right under it."""
    m = GPT(dataclasses.replace(get_tiny_config(vocab_size=60), pos_emb="rope"), seed=3).to(np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 60, (2, 7))
    with E.no_grad():
        base = m(idx)[0].data
        assert np.array_equal(m(idx, emb_noise=np.zeros((2, 7, 64)))[0].data, base)
        noise = rng.uniform(-0.05, 0.05, (2, 7, 64))
        assert not np.allclose(m(idx, emb_noise=noise)[0].data, base)
    with pytest.raises(TypeError, match="dtype"):      # never a silent cast
        m(idx, emb_noise=noise.astype(np.float32))
    results = G.check_tiny_gpt(max_elems=4, pos_emb="rope", emb_noise=0.05)
    bad = [r for r in results if not r.ok]
    assert len(results) == 1 + 12 * get_tiny_config().n_layer + 2 and not bad, bad


def _loss_and_grads(m, loss):
    for _, p in m.named_parameters():
        p.grad = None
    out = loss()
    out.backward()
    return float(out.data), {k: p.grad.copy() for k, p in m.named_parameters()}


def test_loss_on_the_masked_positions_equals_the_full_forward_and_its_gradients():
    """logprobs.masked_loss and token_logprobs(mask=) run the lm_head on the masked positions only: the same
    loss, log-probs (0 off the mask) and gradients as the full logits, in float64; a weighted
    mask and an all-zero mask too."""
    from tinygrad_llm.logprobs import masked_loss, token_logprobs
    m = GPT(dataclasses.replace(get_tiny_config(vocab_size=50), pos_emb="rope"), seed=2).to(np.float64)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 50, (3, 9)), rng.integers(0, 50, (3, 9))
    for mask in ((rng.random((3, 9)) > 0.5) * 1.0, (rng.random((3, 9)) > 0.4) * rng.random((3, 9)), np.zeros((3, 9))):
        up = rng.standard_normal((3, 9)) * (mask > 0)            # a random upstream gradient on the mask
        pairs = [(lambda: m(x, y, loss_mask=mask)[1], lambda: masked_loss(m, x, y, mask)),
                 (lambda: (token_logprobs(m, x, y, 0.7) * up).sum(), lambda: (token_logprobs(m, x, y, 0.7, mask) * up).sum())]
        for full, part in pairs:
            (l_full, g_full), (l_part, g_part) = _loss_and_grads(m, full), _loss_and_grads(m, part)
            assert l_part == pytest.approx(l_full, abs=1e-12)
            for k, g in g_full.items():
                np.testing.assert_allclose(g_part[k], g, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(token_logprobs(m, x, y, 0.7, mask).data,
                                   token_logprobs(m, x, y, 0.7).data * (mask > 0), atol=1e-12)


# -- positions: RoPE and smeared keys --------------------------------------------------------

def _varied(cfg, seed=0):
    """A float64 model with larger random weights than the init (and the smear gates spread
    around 0.5), so greedy generation does not just repeat a token and a cache bug shows."""
    m = GPT(cfg, seed=seed).to(np.float64)
    rng = np.random.default_rng(seed + 100)
    for name, p in m.named_parameters():
        p.data = p.data + rng.standard_normal(p.shape) * (1.0 if name.endswith("smear") else 0.15)
    return m


POS_VARIANTS = {"rope": dict(pos_emb="rope"), "rope_smear": dict(pos_emb="rope", smear_keys=True),
                "learned_smear": dict(smear_keys=True)}


@pytest.mark.parametrize("variant", list(POS_VARIANTS))
def test_kv_cache_equals_full_recompute_with_positions(variant):
    m = _varied(dataclasses.replace(get_tiny_config(vocab_size=60), **POS_VARIANTS[variant]), seed=5)
    prompts = [[7, 8, 9, 10, 11, 12, 30], [13, 14], [20, 21, 22, 23]]      # ragged: left padding
    g = m.generate(prompts, max_new_tokens=10, temperature=0.0, stop_tokens=(), return_logprobs=True)
    distinct = set()
    for b, p in enumerate(prompts):
        toks, logits = _full_recompute_greedy(m, p, 10)
        assert g.tokens[b].tolist() == toks, (b, g.tokens[b].tolist(), toks)
        alone = m.generate([p], max_new_tokens=10, temperature=0.0, stop_tokens=(), return_logprobs=True)
        assert alone.tokens[0].tolist() == toks
        for t, lg in enumerate(logits):
            lp = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
            assert abs(lp[toks[t]] - g.logprobs[b, t]) < 1e-9                # float64: to rounding
            assert abs(lp[toks[t]] - alone.logprobs[0, t]) < 1e-9
        distinct |= set(toks)
    assert len(distinct) > 3                                               # not a degenerate test


@pytest.mark.parametrize("variant", list(POS_VARIANTS))
def test_cached_logits_equal_full_forward_with_positions(variant):
    from tinygrad_llm.model import KVCache
    m = _varied(dataclasses.replace(get_tiny_config(vocab_size=60), **POS_VARIANTS[variant]), seed=2)
    seq = np.array([[5, 6, 7, 8, 9, 10, 11]])
    with E.no_grad():
        full = m(seq)[0].data
        cache = KVCache(m.config, 1, 7, np.float64)
        cache.add_valid(np.ones((1, 3), bool))
        outs = [m(seq[:, :3], positions=np.arange(3)[None], cache=cache)[0].data]
        cache.advance(3)
        for t in range(3, 7):
            cache.add_valid(np.ones((1, 1), bool))
            outs.append(m(seq[:, t:t + 1], positions=np.array([[t]]), cache=cache)[0].data)
            cache.advance(1)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_rope_model_has_no_wpe_and_positions_matter_relatively():
    cfg = dataclasses.replace(get_tiny_config(vocab_size=60), pos_emb="rope")
    m = _varied(cfg, seed=1)
    assert not any("wpe" in k for k in m.state_dict())
    assert m.transformer.wpe is None
    seq = np.array([[5, 6, 7, 8, 9]])
    with E.no_grad():
        a = m(seq)[0].data
        shifted = m(seq, positions=np.arange(5) + 20)[0].data      # RoPE: only differences count
        swapped = m(seq[:, ::-1].copy())[0].data
    np.testing.assert_allclose(shifted, a, rtol=1e-9, atol=1e-9)
    assert not np.allclose(swapped[0, -1], a[0, -1])               # yet order is seen


def test_position_config_is_validated():
    from tinygrad_llm.config import ConfigError, GPTConfig
    with pytest.raises(ConfigError, match="pos_emb"):
        GPTConfig(pos_emb="alibi")
    with pytest.raises(ConfigError, match="even head size"):
        GPTConfig(n_embd=12, n_head=4, pos_emb="rope")
    with pytest.raises(ConfigError, match="rope_base"):
        GPTConfig(rope_base=0.5)
    with pytest.raises(ConfigError, match="smear_keys"):
        GPTConfig(smear_keys="yes")
    assert GPTConfig().pos_emb == "learned" and GPTConfig().smear_keys is False


def test_tiny_model_overfits_a_single_batch():
    cfg = get_tiny_config(vocab_size=40)
    m = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (4, 16))
    y = np.roll(x, -1, 1)
    opt = AdamW(m.named_parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        _, loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.data))
    assert losses[0] > 3.0 and losses[-1] < 0.1, (losses[0], losses[-1])


@pytest.mark.parametrize("variant", ["learned"] + list(POS_VARIANTS))
def test_fast_decoding_chooses_the_tokens_of_the_tensor_path(variant, monkeypatch):
    """decode.decode_step (arrays, one attention kernel per layer; at batch 1 the whole step in
    one kernel, kernels.decode_token) against the model's Tensor forward over the cache: greedy
    tokens identical at batch 1 (both decode paths) and in a ragged, left-padded batch of 16,
    float32; log-probs to float32 rounding (the sums run in another order)."""
    from tinygrad_llm import decode
    cfg = dataclasses.replace(get_tiny_config(vocab_size=60), **POS_VARIANTS.get(variant, {}))
    m = _varied(cfg, seed=7).to(np.float32)
    rng = np.random.default_rng(11)
    batch = [rng.integers(6, 60, int(n)).tolist() for n in rng.integers(1, 12, 16)]   # ragged
    calls = []
    real = decode.K.decode_token
    monkeypatch.setattr(decode.K, "decode_token", lambda *a: calls.append(1) or real(*a))
    distinct = set()
    for prompts in ([batch[0]], batch):
        runs = {}
        for path in ("fused", "layers", "tensor"):
            monkeypatch.setattr(decode, "ENABLED", path != "tensor")
            monkeypatch.setattr(decode, "FUSE_BATCH1", path == "fused")
            runs[path] = m.generate(prompts, max_new_tokens=20, temperature=0.0, stop_tokens=(),
                                    return_logprobs=True)
        for path in ("fused", "layers"):
            np.testing.assert_array_equal(runs[path].tokens, runs["tensor"].tokens)
            np.testing.assert_allclose(runs[path].logprobs, runs["tensor"].logprobs, atol=1e-4)
        distinct |= set(runs["fused"].tokens.ravel().tolist())
    assert len(calls) == 19                # batch 1, fused: every step after the prompt, nothing else
    assert len(distinct) > 3                                               # not a degenerate test


def test_models_with_lora_adapters_decode_through_the_tensor_path():
    """decode_step knows plain Linear layers only: with adapters generation takes the Tensor path
    (and still runs); once merged, the fast path again, choosing the same tokens."""
    from tinygrad_llm import decode, lora
    m = _varied(get_tiny_config(vocab_size=60), seed=2).to(np.float32)
    lora.apply_lora(m, lora.LoRAConfig(r=2), seed=0)
    assert not decode.fast_decoding_supported(m)
    adapted = m.generate([[7, 8, 9]], max_new_tokens=8, temperature=0.0, stop_tokens=())
    lora.merge_lora(m)
    assert decode.fast_decoding_supported(m)
    merged = m.generate([[7, 8, 9]], max_new_tokens=8, temperature=0.0, stop_tokens=())
    np.testing.assert_array_equal(adapted.tokens, merged.tokens)   # B = 0 at init: the same weights


@pytest.mark.parametrize("variant", ["learned", "rope_smear"])
def test_fused_attention_path_gives_the_gradients_of_the_blocked_path(variant, monkeypatch):
    """A whole float64 GPT step on the fused attention kernel (kernels "attention" = numba) against
    the blocked GEMMs (numpy): the same loss and every parameter's gradient, to rounding."""
    from tinygrad_llm.kernels import backend
    cfg = dataclasses.replace(get_tiny_config(vocab_size=40), dropout=0.0, **POS_VARIANTS.get(variant, {}))
    m = _varied(cfg, seed=4)
    rng = np.random.default_rng(6)
    idx, tgt = rng.integers(0, 40, (3, 37)), rng.integers(0, 40, (3, 37))   # T = 37: padded blocks
    out = {}
    for path in ("numpy", "numba"):
        monkeypatch.setitem(backend._chosen, "attention", path)
        m.zero_grad()
        _, loss = m(idx, targets=tgt)
        loss.backward()
        out[path] = (loss.data.item(), {n: p.grad.copy() for n, p in m.named_parameters()})
    assert abs(out["numpy"][0] - out["numba"][0]) < 1e-12
    for n, g in out["numpy"][1].items():
        np.testing.assert_allclose(out["numba"][1][n], g, rtol=1e-9, atol=1e-12, err_msg=n)
