"""Export to Hugging Face (tinygrad_llm/export.py): a tiny trained checkpoint of each position
scheme, loaded back with transformers, computes our logits, our greedy replies, our token ids
and our chat template; the reward model's export gives our scores. Skips (but for the
refusals, which need neither) unless torch and transformers are installed:
`pip install -e ".[hf]"`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinygrad_llm.checkpoint import save_checkpoint
from tinygrad_llm.config import GPTConfig
from tinygrad_llm.data import encode_chat, pad_batch, sft_examples
from tinygrad_llm.export import export_hf, main, qkv_per_head
from tinygrad_llm.model import GPT, KVCache
from tinygrad_llm.optim import AdamW
from tinygrad_llm.stages.reward_model import RewardModel, encode_reply
from tinygrad_llm.tokenizer import SPECIAL_TOKENS, MyLLMTokenizer

# float32 on both sides: the same sums in another order (BLAS vs torch) and, for RoPE, torch
# computing angles in float32 where we use float64 move logits by ~1e-6..1e-5; 1e-4 is the
# contract (DESIGN.md, Export) and leaves room for neither a wrong layout nor a wrong position
TOL = 1e-4
CONVS = [
    [{"role": "user", "content": "你好！"}, {"role": "assistant", "content": "你好！我是MyLLM，很高兴和你聊天。"}],
    [{"role": "user", "content": "3 + 5 等于多少？"}, {"role": "assistant", "content": "3 + 5 = 8，答案是8。"}],
    [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "今天星期几？"},
     {"role": "assistant", "content": "我不知道今天的日期。"}],
    [{"role": "user", "content": "谢谢你"}, {"role": "assistant", "content": "不客气，再见！"}],
]
PROMPTS = ["你好！", "3 + 5 等于多少？", "今天星期几？谢谢"]
VARIANTS = {   # name -> GPTConfig fields beyond the tiny shape
    "learned": {"pos_emb": "learned"},
    "rope": {"pos_emb": "rope"},
    "rope_nobias": {"pos_emb": "rope", "bias": False, "rope_base": 500.0},
}


def tiny_config(tok, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=len(tok), block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **kw)


def train_tiny(model, tok, steps: int = 40) -> GPT:
    """A few AdamW steps on the chat examples: every weight and bias moves off its init."""
    x, y, m = pad_batch(sft_examples(tok, CONVS, model.config.block_size))
    opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(x, y, loss_mask=m)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer().build_vocab([m["content"] for c in CONVS for m in c])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """{variant: (our model, HF model, HF tokenizer)} for every variant, plus "rm_<variant>"
    for the reward models (learned, rope): (RewardModel, HF sequence classifier, HF tokenizer)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("export")
    tok.save(root / "vocab.json")
    out = {}
    for name, kw in VARIANTS.items():
        model = train_tiny(GPT(tiny_config(tok, **kw), seed=1), tok)
        save_checkpoint(root / f"{name}.safetensors", model, stage="sft", step=40, vocab_sha=tok.fingerprint())
        assert main(["hf", str(root / f"{name}.safetensors"), str(root / name)]) == 0
        hf = tf.AutoModelForCausalLM.from_pretrained(root / name).eval()
        out[name] = (model.eval(), hf, tf.AutoTokenizer.from_pretrained(root / name))
        if name in ("learned", "rope"):
            rm = RewardModel.from_pretrained(model, seed=2)
            rm.reward_head.bias.data[:] = 0.7        # a bias the export must fold into ln_f
            rm.tokenizer = tok
            save_checkpoint(root / f"rm_{name}.safetensors", rm, stage="reward", step=1, vocab_sha=tok.fingerprint())
            export_hf(root / f"rm_{name}.safetensors", root / f"rm_{name}")
            hf_rm = tf.AutoModelForSequenceClassification.from_pretrained(root / f"rm_{name}")
            out[f"rm_{name}"] = (rm, hf_rm.eval(), tf.AutoTokenizer.from_pretrained(root / f"rm_{name}"))
    return out


def hf_ids(res) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list, or a BatchEncoding in transformers 5."""
    return list(res["input_ids"] if hasattr(res, "keys") else res)


def left_pad(prompts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> idx, valid (B, T) and positions from 0 at each row's first real token (as generate())."""
    T = max(map(len, prompts))
    idx, valid = np.zeros((len(prompts), T), np.int64), np.zeros((len(prompts), T), bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):], valid[b, T - len(p):] = p, True
    return idx, valid, np.maximum(np.cumsum(valid, 1) - 1, 0)


def max_logit_diff(variant, exported, tok) -> float:
    import torch
    model, hf, _ = exported[variant]
    T = model.config.block_size
    x = np.random.default_rng(0).integers(0, len(tok), (3, T))                     # a full context
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(x)).logits.numpy()
    diff = np.abs(model(x)[0].data - theirs).max()
    # a left-padded batch: ours masks padding through the KV cache (generate's prefill); HF
    # through attention_mask, with position_ids passed (a plain forward does not derive them)
    idx, valid, pos = left_pad([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
                                for p in PROMPTS])
    cache = KVCache(model.config, len(idx), idx.shape[1], model.dtype)
    cache.add_valid(valid)
    ours = model(idx, positions=pos, cache=cache)[0].data
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(idx), attention_mask=torch.tensor(valid.astype(np.int64)),
                    position_ids=torch.tensor(pos)).logits.numpy()
    return float(max(diff, np.abs(ours - theirs)[valid].max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match(variant, exported, tok):
    diff = max_logit_diff(variant, exported, tok)
    print(f"\n{variant}: max |logit difference| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("variant", ["learned", "rope"])
def test_greedy_replies_match(variant, exported, tok):
    model, hf, htok = exported[variant]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in PROMPTS]
    ours = model.generate(prompts, max_new_tokens=24, temperature=0).replies()
    enc = htok.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True,
                                   padding=True, return_tensors="pt", return_dict=True)
    assert htok.padding_side == "left"
    gen = hf.generate(**enc, max_new_tokens=24)                 # generation_config: greedy, stops at 5 and 3
    theirs = gen[:, enc["input_ids"].shape[1]:].tolist()
    for a, b in zip(ours, theirs):
        assert b[:len(a)] == a and all(t == 0 for t in b[len(a):])   # then only padding
    assert any(len(a) > 3 for a in ours)


def test_config_and_files(exported, tmp_path):
    hf_l, hf_r = exported["learned"][1], exported["rope"][1]
    assert type(hf_l).__name__ == "GPT2LMHeadModel" and hf_l.config.activation_function == "gelu_new"
    assert type(hf_r).__name__ == "GPTNeoXForCausalLM" and hf_r.config.use_parallel_residual is False
    for hf in (hf_l, hf_r):
        assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (2, 3, 0)
        assert list(hf.generation_config.eos_token_id) == [5, 3]
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied
    assert type(exported["rm_rope"][1]).__name__ == "GPTNeoXForSequenceClassification"
    assert exported["rm_learned"][1].config.num_labels == 1


def test_qkv_per_head_layout():
    C, NH = 6, 3
    rows = np.arange(3 * C)                          # q rows 0..5, k 6..11, v 12..17; hs = 2
    assert qkv_per_head(rows, NH).tolist() == [0, 1, 6, 7, 12, 13, 2, 3, 8, 9, 14, 15, 4, 5, 10, 11, 16, 17]


def test_chat_template_gives_our_ids(exported, tok):
    htok = exported["rope"][2]
    for conv in CONVS + [[{"role": "user", "content": "未知字符：ꙮ😀\n换行  空格"}]]:
        for gen_prompt in (True, False):
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
            assert hf_ids(htok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)) == ours
            assert htok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=False) == \
                tok.apply_chat_template(conv, add_generation_prompt=gen_prompt)
    # SFT's ids (data.encode_chat) are the template's too
    assert hf_ids(htok.apply_chat_template(CONVS[2], tokenize=True)) == encode_chat(tok, CONVS[2], 999)[0]


N_TOKENIZER_EXAMPLES = 600
_CHARS = st.one_of(st.sampled_from("你好我是很高兴和聊天谢再见今星期几？！，。3+5=8 \n\t\r"),   # in the vocabulary
                   st.sampled_from(SPECIAL_TOKENS + ["<|im_start", "|>", "<", ">", "<PAD", "UNK>"]),
                   st.characters(exclude_categories=("Cs",)))     # anything else: unknown -> <UNK>
TEXTS = st.lists(_CHARS, max_size=40).map("".join)


@settings(max_examples=N_TOKENIZER_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, content=TEXTS)
def test_tokenizer_ids_equal_ours(exported, tok, text, content):
    """Every string encodes to our ids (special-token strings included, as encode() parses them)
    and decodes back as ours does; lone surrogates are left out: they are not text and Rust's
    tokenizers cannot take them (ours maps them to <UNK>)."""
    htok = exported["learned"][2]
    ids = tok.encode(text)
    assert htok(text, add_special_tokens=False)["input_ids"] == ids
    assert htok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert htok.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    # the chat template: equal as long as the content holds no special-token string, which
    # apply_chat_template (text first, then tokenised) would turn into that token (export.py)
    if not any(s in content for s in SPECIAL_TOKENS):
        conv = [{"role": "user", "content": content}, {"role": "assistant", "content": text[::-1]}]
        if not any(s in text[::-1] for s in SPECIAL_TOKENS):
            for gp in (True, False):
                assert hf_ids(htok.apply_chat_template(conv, add_generation_prompt=gp, tokenize=True)) == \
                    tok.apply_chat_template(conv, add_generation_prompt=gp, tokenize=True)


@pytest.mark.parametrize("variant", ["learned", "rope"])
def test_reward_model_scores_equal(variant, exported, tok):
    import torch
    rm, hf, htok = exported[f"rm_{variant}"]
    prompts, replies = ["你好！", "3 + 5 等于多少？", "谢谢你"], ["你好！我是MyLLM。", "等于8。", "不客气"]
    ours = rm.score(prompts, replies)
    # the score is read at the reply's closing <|im_end|>: the template's text minus its final newline
    texts = [htok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                      tokenize=False)[:-1] for p, r in zip(prompts, replies)]
    enc = htok(texts, return_tensors="pt", padding=True)
    assert enc["input_ids"][0].tolist()[:len(encode_reply(tok, prompts[0], replies[0]))] == \
        encode_reply(tok, prompts[0], replies[0])
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0].numpy()
    assert np.abs(ours - theirs).max() < TOL and np.ptp(ours) > 1e-3


def test_smear_keys_and_critic_refused(tmp_path, tok, capsys):
    """What transformers cannot compute is refused in one line, exit 2, nothing written."""
    tok.save(tmp_path / "vocab.json")
    save_checkpoint(tmp_path / "smear.safetensors", GPT(tiny_config(tok, pos_emb="rope", smear_keys=True)),
                    stage="sft", step=0, vocab_sha=tok.fingerprint())
    assert main(["hf", str(tmp_path / "smear.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "smear_keys" in err and "previous token" in err
    assert not (tmp_path / "out").exists()
    from tinygrad_llm.stages.reward_model import RewardModel
    save_checkpoint(tmp_path / "rm.safetensors", RewardModel.from_pretrained(GPT(tiny_config(tok))), stage="reward",
                    step=0, vocab_sha=tok.fingerprint(), extra={"lm_coef": 2.0})
    assert main(["hf", str(tmp_path / "rm.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lm_coef=2" in err and not (tmp_path / "out").exists()
    other = MyLLMTokenizer().build_vocab("别的字")
    other.save(tmp_path / "other.json")
    save_checkpoint(tmp_path / "ok.safetensors", GPT(tiny_config(tok)), stage="sft", step=0, vocab_sha=tok.fingerprint())
    assert main(["hf", str(tmp_path / "ok.safetensors"), str(tmp_path / "out"), "--vocab", str(tmp_path / "other.json")]) == 2
    assert "different vocabulary" in capsys.readouterr().err
    assert main(["hf", str(tmp_path / "missing.safetensors"), str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def test_export_files_need_no_torch(tmp_path, tok):
    """The export itself is NumPy + safetensors: metadata {"format": "pt"}, Conv1D weights (in, out)."""
    from safetensors import safe_open
    tok.save(tmp_path / "vocab.json")
    model = GPT(tiny_config(tok), seed=3)
    save_checkpoint(tmp_path / "m.safetensors", model, stage="sft", step=0, vocab_sha=tok.fingerprint())
    export_hf(tmp_path / "m.safetensors", tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        w = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        assert "lm_head.weight" not in f.keys()
    np.testing.assert_array_equal(w, model.transformer.h[0].attn.c_attn.weight.data.T)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_positions"] == 64
