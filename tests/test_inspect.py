"""python -m tinygrad_llm.inspect: attention maps that match the model's own attention, and
per-parameter gradient norms that match a plain backward pass."""
import math
import sys

import numpy as np
import pytest

from cli_helpers import run
from tinygrad_llm import engine as E
from tinygrad_llm.engine import attention
from tinygrad_llm import inspect as I
from tinygrad_llm.checkpoint import load_gpt, save_checkpoint
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import clip_grad_norm
from tinygrad_llm.tokenizer import MyLLMTokenizer

TEXT = "人工智能是计算机科学的一个分支。它研究如何让机器像人一样思考和学习。\n" * 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT saved as a checkpoint with vocab.json beside it, and a data dir."""
    d = tmp_path_factory.mktemp("inspect")
    tok = MyLLMTokenizer(200).build_vocab(TEXT)
    tok.save(d / "vocab.json")
    model = GPT(get_tiny_config(vocab_size=len(tok)), seed=3)
    path = save_checkpoint(d / "pretrain_final", model, stage="pretrain", step=0, vocab_sha=tok.fingerprint())
    (d / "data").mkdir()
    (d / "data" / "pretrain_data.txt").write_text(TEXT, encoding="utf-8")
    return path


def test_attention_maps_are_the_models_attention(ckpt):
    """Rebuild each block's attention output from the maps (p @ v, merge heads, c_proj) and
    compare with the block's own attention; also compare p with the engine's kernel."""
    model, tok = load_gpt(ckpt)
    ids = tok.encode("人工智能是什么？", allow_special=False)
    maps = I.attention_maps(model, ids)
    T, tr = len(ids), model.transformer
    assert len(maps) == model.config.n_layer
    with E.no_grad():
        x = tr.wte(np.array([ids])) + tr.wpe(np.arange(T))
        for block, p in zip(tr.h, maps):
            NH = block.attn.n_head
            assert p.shape == (NH, T, T)
            np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)            # rows are distributions
            assert np.all(p[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)   # causal
            qkv = block.attn.c_attn(block.ln_1(x)).data                         # (1, T, 3C)
            C, hs = qkv.shape[-1] // 3, qkv.shape[-1] // 3 // NH
            heads = qkv.reshape(1, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
            # float32 kernel vs float64 recomputation: agree to float32 rounding
            _, p_engine = attention._blocked_fwd(*(np.ascontiguousarray(h) for h in heads))   # keeps p
            assert len(p_engine) == 1                                             # T < 2 blocks
            np.testing.assert_allclose(p, p_engine[0][0], atol=2e-6)
            y = (p[None] @ heads[2].astype(np.float64)).transpose(0, 2, 1, 3).reshape(1, T, C)
            want = block.attn(block.ln_1(x)).data
            np.testing.assert_allclose(block.attn.c_proj(E.Tensor(y.astype(np.float32))).data, want, atol=1e-5)
            x = block(x)
    assert model.training is False                                               # eval mode kept


def test_attention_cli_pngs_and_summary(ckpt, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "att"
    assert I.main(["attention", "--checkpoint", str(ckpt), "--text", "人工智能", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["attention_layer0.png", "attention_layer1.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    heads = [l for l in printed.splitlines() if l.startswith("layer ")]
    assert len(heads) == 2 * 2                                                   # n_layer x n_head
    assert all(len(l.split(": ", 1)[1].split()) == 4 for l in heads)             # one entry per character
    assert heads[0].split(": ", 1)[1].startswith("人→self")                       # position 0 sees only itself


def test_attention_chat_template_and_long_text(ckpt, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, tok = load_gpt(ckpt)
    n_chat = len(tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True))
    assert I.main(["attention", "--checkpoint", str(ckpt), "--text", "你好", "--chat", "--out", str(tmp_path)]) == 0
    first = [l for l in capsys.readouterr().out.splitlines() if l.startswith("layer 0 head 0")][0]
    entries = first.split(": ", 1)[1].split()
    assert entries[0] == "<|im_start|>→self" and len(entries) == n_chat
    assert I.main(["attention", "--checkpoint", str(ckpt), "--text", "人" * 100, "--out", str(tmp_path)]) == 0
    assert "showing the last 64" in capsys.readouterr().out


def test_attention_without_matplotlib_says_how_to_install(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                          # import fails
    assert I.main(["attention", "--checkpoint", str(ckpt), "--text", "人工", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert 'pip install -e ".[plot]"' in captured.err
    assert "layer 0 head 0: 人→self" in captured.out                            # the text summary still printed
    assert not list(tmp_path.glob("*.png"))


def test_grads_match_a_plain_backward(ckpt, capsys):
    model, tok = load_gpt(ckpt)
    ids = np.array(tok.encode(TEXT, allow_special=False))
    x, y = ids[None, :64], ids[None, 1:65]
    loss, rows, total = I.grad_norms(model, x, y)
    assert [r[0] for r in rows] == [n for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())                        # left clean
    _, ref = model(x, y)
    ref.backward()
    assert loss == pytest.approx(float(ref.data))
    for (name, shape, pn, gn, ratio), (_, p) in zip(rows, model.named_parameters()):
        assert shape == p.shape
        assert gn == pytest.approx(float(np.linalg.norm(p.grad.astype(np.float64))), rel=1e-6)
        assert pn == pytest.approx(float(np.linalg.norm(p.data.astype(np.float64))), rel=1e-6)
        assert ratio == (pytest.approx(gn / pn) if pn > 0 else float("inf"))    # fresh biases are 0
    assert total == pytest.approx(math.sqrt(sum(r[3] ** 2 for r in rows)), rel=1e-6)
    assert total == pytest.approx(clip_grad_norm(model.parameters(), 0.0), rel=1e-6)


def test_grads_cli_table(ckpt, capsys):
    assert I.main(["grads", "--checkpoint", str(ckpt), "--data-dir", str(ckpt.parent / "data"), "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [n for n, _ in load_gpt(ckpt)[0].named_parameters()]
    assert lines[0].startswith("one pretraining batch of 2 x 64")
    assert lines[1].split() == ["parameter", "shape", "|param|", "|grad|", "|grad|/|param|"]
    assert [l.split()[0] for l in lines[2:-1]] == names                 # named_parameters() order
    assert lines[-1].startswith("global gradient norm: ")


@pytest.mark.parametrize("argv, fragment", [
    (["grads", "--checkpoint", "{d}/none.safetensors"], "checkpoint not found"),
    (["attention", "--checkpoint", "{ckpt}", "--text", "  "], "--text is empty"),
    (["grads", "--checkpoint", "{ckpt}", "--data-dir", "{d}"], "no pretrain_data.txt"),
    (["grads", "--checkpoint", "{ckpt}", "--batch", "0"], "--batch must be positive"),
    (["attention", "--checkpoint", "{ckpt}", "--text", "x", "--vocab", "{d}/nope.json"], "vocabulary file not found"),
])
def test_inspect_errors_are_one_line(ckpt, tmp_path, capsys, argv, fragment):
    argv = [a.format(d=tmp_path, ckpt=ckpt) for a in argv]
    assert I.main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_module_entry_point(ckpt, tmp_path):
    res = run([sys.executable, "-m", "tinygrad_llm.inspect", "attention", "--checkpoint", str(ckpt),
               "--text", "人工智能", "--out", str(tmp_path)])
    assert res.returncode in (0, 2), res.stderr                  # 2 only when matplotlib is missing
    assert "layer 1 head 1: 人→self" in res.stdout


def test_attention_maps_of_a_rope_smear_model():
    """RoPE and smeared keys shape the maps: p @ v through c_proj gives the block's attention."""
    import dataclasses
    model = GPT(dataclasses.replace(get_tiny_config(vocab_size=40), pos_emb="rope", smear_keys=True), seed=0)
    for block in model.transformer.h:
        block.attn.smear.data[:] = [1.0, -1.0]
        block.attn.c_attn.weight.data *= 8                           # sharper attention than at init
    ids = [5, 9, 12, 5, 9, 30, 7]
    maps = I.attention_maps(model, ids)
    T, tr = len(ids), model.transformer
    pos = model.positions_for(np.arange(T), 1, T)
    with E.no_grad():
        x = tr.wte(np.array([ids]))
        for block, p in zip(tr.h, maps):
            qkv = block.attn.c_attn(block.ln_1(x)).data
            NH, C = block.attn.n_head, qkv.shape[-1] // 3
            v = qkv.reshape(1, T, 3, NH, C // NH)[:, :, 2].transpose(0, 2, 1, 3).astype(np.float64)
            y = (p[None] @ v).transpose(0, 2, 1, 3).reshape(1, T, C)
            want = block.attn(block.ln_1(x), pos=pos).data
            np.testing.assert_allclose(block.attn.c_proj(E.Tensor(y.astype(np.float32))).data, want, atol=1e-5)
            plain = I.attention_probs(qkv, NH)[0]                     # without RoPE / smear: other maps
            assert np.abs(plain - p).max() > 1e-3
            x = block(x, pos=pos)


def test_look_inside_logits_are_the_models_and_explain_tokens(ckpt):
    """One pass gives the model's own logits beside the maps; explain_tokens reads them."""
    model, tok = load_gpt(ckpt)
    ids = tok.encode("人工智能是计算机科学", allow_special=False)
    logits, maps = I.look_inside(model, ids)
    want, _ = model(np.array([ids]))
    np.testing.assert_allclose(logits, want.data[0], atol=1e-5)
    assert all(np.array_equal(m, p) for m, p in zip(maps, I.attention_maps(model, ids)))
    views = I.explain_tokens(model, ids, start=3, top=5)
    assert [v["position"] for v in views] == list(range(3, len(ids)))
    z = want.data[0].astype(np.float64)
    for v in views:
        p = v["position"]
        probs = np.exp(z[p - 1] - z[p - 1].max())
        probs /= probs.sum()
        assert v["id"] == ids[p] and v["prob"] == pytest.approx(probs[ids[p]], rel=1e-5)
        assert [i for i, _ in v["top"]] == list(np.argsort(-probs, kind="stable")[:5])
        assert all(a >= b for (_, a), (_, b) in zip(v["top"], v["top"][1:]))         # best first
        assert v["attention"].shape == (2, 2, p)                                     # (L, NH, p)
        np.testing.assert_allclose(v["attention"], np.stack(maps)[:, :, p - 1, :p])
        np.testing.assert_allclose(v["attention"].sum(-1), 1.0, atol=1e-12)         # row p-1 sees 0..p-1
    with pytest.raises(ValueError):
        I.explain_tokens(model, ids, start=0)
