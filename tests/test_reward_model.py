"""Reward model: padding independence, the Bradley-Terry loss and its gradient, centring,
checkpoint round trip, and the stage end to end on the tiny config."""
import json
import types
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.gradcheck import check, check_module
from tinygrad_llm.loop import RunLogger
from tinygrad_llm.model import GPT
from tinygrad_llm.stages.common import StageContext
from tinygrad_llm.stages.reward_model import (RewardConfig, RewardModel, RewardModelTrainer, TINY_OVERRIDES,
                                              encode_reply, pad_right, pairwise_loss, run, slip,
                                              synthetic_pairs)
from tinygrad_llm.tokenizer import IM_END_ID, PAD_ID, MyLLMTokenizer

SRC = Path(__file__).resolve().parents[1] / "data" / "src"
PAIRS = [{"prompt": "什么是机器学习？", "chosen": "机器学习让计算机从数据中学习规律。", "rejected": "不知道。"},
         {"prompt": "太阳从哪边升起？", "chosen": "太阳从东方升起。", "rejected": "滚。"},
         {"prompt": "你好", "chosen": "你好！很高兴认识你，有什么可以帮你？", "rejected": "哦。"},
         {"prompt": "1+1等于几？", "chosen": "1+1=2，答案是2。", "rejected": "别问我。"}]


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer().build_vocab([json.dumps(PAIRS, ensure_ascii=False)])


def tiny_rm(tok, dtype=np.float32, seed=0):
    return RewardModel.from_pretrained(GPT(get_tiny_config(len(tok)), seed=seed, dtype=dtype))


def test_from_pretrained_copies_trunk_and_adds_a_fresh_head(tok):
    base = GPT(get_tiny_config(len(tok)), seed=3)
    rm = RewardModel.from_pretrained(base)
    sd, bsd = rm.state_dict(), base.state_dict()
    assert set(sd) == set(bsd) | {"reward_head.weight", "reward_head.bias"}
    for k, v in bsd.items():
        np.testing.assert_array_equal(sd[k], v)
        assert sd[k] is not v                           # a copy: training the RM leaves the base alone
    C = base.config.n_embd
    assert sd["reward_head.weight"].shape == (1, C) and sd["reward_head.bias"].shape == (1,)
    assert not sd["reward_head.bias"].any()
    # N(0, 1/(C+1)): with 64 draws the sample std lands within 30% of 1/sqrt(C+1)
    assert abs(sd["reward_head.weight"].std() * np.sqrt(C + 1) - 1) < 0.3
    assert rm.config.dropout == 0.0


def test_score_independent_of_padding(tok):
    """Right padding after the last token cannot change the score (causal attention, read at last)."""
    rm = tiny_rm(tok, np.float64)
    seq = encode_reply(tok, "你好", "你好！很高兴认识你。")
    assert seq[-1] == IM_END_ID
    with E.no_grad():
        alone = rm.rewards(np.array([seq]), [len(seq) - 1]).data[0]
        padded = np.array([seq + [PAD_ID] * 9])
        pad_score = rm.rewards(padded, [len(seq) - 1]).data[0]
    assert pad_score == pytest.approx(alone, rel=1e-12, abs=1e-12)
    # batched with a longer neighbour (so padded) == scored alone
    longer = encode_reply(tok, "什么是机器学习？", "机器学习让计算机从数据中学习规律，而不是由人写死规则。")
    together = rm.score_ids([seq, longer])
    singles = [rm.score_ids([seq])[0], rm.score_ids([longer])[0]]
    np.testing.assert_allclose(together, singles, rtol=1e-12, atol=1e-12)


def test_score_strings_equals_score_ids(tok):
    rm = tiny_rm(tok)
    s = rm.score(["你好", "1+1等于几？"], ["你好！", "答案是2。"], tokenizer=tok)
    ids = [encode_reply(tok, "你好", "你好！"), encode_reply(tok, "1+1等于几？", "答案是2。")]
    np.testing.assert_array_equal(s, rm.score_ids(ids))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_rm(tok).score(["a"], ["b"])


def test_pad_right_cuts_from_the_left_to_keep_the_reply_end():
    idx, last = pad_right([[1, 2, 3, 4, 5], [7, 8]], block_size=3)
    np.testing.assert_array_equal(idx, [[3, 4, 5], [7, 8, PAD_ID]])
    np.testing.assert_array_equal(last, [2, 1])


def test_pairwise_loss_value_and_margin():
    rc, rr = E.Tensor(np.array([2.0, -1.0])), E.Tensor(np.array([0.5, 0.0]))
    # -log sigma(d) = log(1 + exp(-d)), d = (1.5, -1.0); margin 0.5 shifts d down by 0.5
    assert float(pairwise_loss(rc, rr).data) == pytest.approx(np.mean(np.log1p(np.exp([-1.5, 1.0]))), rel=1e-12)
    assert float(pairwise_loss(rc, rr, 0.5).data) == pytest.approx(np.mean(np.log1p(np.exp([-1.0, 1.5]))), rel=1e-12)


def test_reward_loss_gradcheck(tok):
    """The Bradley-Terry loss through the whole tiny reward model, finite differences in float64.
    The likelihood term (lm_coef) is a constant by design, which finite differences would see
    through: it is off here, and test_lm_term_... checks that it carries no gradient."""
    rm = tiny_rm(tok, np.float64)
    trainer = RewardModelTrainer(rm, tok, RewardConfig(margin=0.3, lm_coef=0.0))
    batch = trainer.batch(trainer.encode(PAIRS[:2]))
    res = check_module(rm, lambda: trainer.loss_fn(rm, batch)[0], max_elems=6)
    bad = [r for r in res if not r.ok]
    assert not bad, bad
    # and d loss / d scores on its own
    res = check(lambda a, b: pairwise_loss(a, b, 0.3), [E.Tensor(np.random.default_rng(0).standard_normal(5), requires_grad=True),
                                                         E.Tensor(np.random.default_rng(1).standard_normal(5), requires_grad=True)])
    assert all(r.ok for r in res)


def test_trainer_fits_pairs_and_centres(tok):
    rm = tiny_rm(tok, seed=1)
    cfg = RewardConfig(max_steps=25, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, log_every=5,
                       eval_train_pairs=4)
    center = [(p["prompt"], p["chosen"]) for p in PAIRS]
    fig = RewardModelTrainer(rm, tok, cfg).train(PAIRS, val_data=PAIRS, center_replies=center)
    assert fig["train_accuracy"] == 1.0 and fig["val_margin"] > 0
    # after centring the given replies score 0 on average, and the shift lives in the head's bias
    assert rm.score([p for p, _ in center], [r for _, r in center]).mean() == pytest.approx(0.0, abs=1e-5)
    assert rm.reward_head.bias.data[0] == pytest.approx(fig["bias_shift"], abs=1e-6)
    # seed API: epochs sets the number of steps
    fig = RewardModelTrainer(tiny_rm(tok), tok, RewardConfig(batch_size=2, eval_every=0)).train(PAIRS, epochs=1)
    assert fig["steps"] == 2


def test_synthetic_pairs():
    pool = [(p["prompt"], p["chosen"]) for p in PAIRS]
    out = synthetic_pairs(pool, 6, 3, np.random.default_rng(0))
    assert len(out) == 9
    replies = dict(pool)
    for p in out[:6]:      # mismatch: own reply preferred over another prompt's reply
        assert p["chosen"] == replies[p["prompt"]] and p["rejected"] in replies.values() and p["rejected"] != p["chosen"]
    for p in out[6:]:      # loop: a fragment of the reply, repeated
        frag = p["rejected"].split("，")[0]
        assert frag in p["chosen"] and p["rejected"].count(frag) >= 3
    assert synthetic_pairs([("a", "同一句。"), ("b", "同一句。")], 2, 0, np.random.default_rng(0)) == []


@pytest.mark.parametrize("reply, wrong_spans", [
    ("3 + 5 = 8，答案是8。", ["3 + 5 = 7", "3 + 5 = 9"]),
    ("因为8 × 7 = 56，所以56 ÷ 8 = 7，答案是7。", ["8 × 7 = 55", "8 × 7 = 57", "56 ÷ 8 = 6", "56 ÷ 8 = 8"]),
    ("9 - 9 = 0，答案是0。", ["9 - 9 = 1"]),
    ("5 + 5 = 10，答案是10。", ["5 + 5 = 11"]),
])
def test_slip_states_one_wrong_fact(reply, wrong_spans):
    rng = np.random.default_rng(1)
    for _ in range(10):
        bad = slip(reply, rng)
        assert bad != reply and len(bad) == len(reply) and any(w in bad for w in wrong_spans), bad


def test_slip_leaves_replies_without_a_correct_equation():
    rng = np.random.default_rng(0)
    assert slip("今天天气很好。", rng) is None
    assert slip("1 + 1 = 3，4 + 3 + 1 = 9", rng) is None      # wrong facts are not "corrected" into others
    pool = [("q", "2 × 3 = 6，答案是6。"), ("p", "你好！")]
    out = synthetic_pairs(pool, 0, 0, rng, n_slip=4)
    assert len(out) == 4 and all(p["prompt"] == "q" and p["rejected"] in ("2 × 3 = 5，答案是6。", "2 × 3 = 7，答案是6。")
                                 for p in out)


def test_freeze_embeddings_and_synthetic_batches(tok):
    rm = tiny_rm(tok)
    wte = rm.transformer.wte.weight.data.copy()
    head = rm.reward_head.weight.data.copy()
    cfg = RewardConfig(max_steps=2, batch_size=4, eval_every=0, warmup_steps=0, freeze_embeddings=True,
                       mismatch_frac=0.25, loop_frac=0.25, eval_train_pairs=2)
    RewardModelTrainer(rm, tok, cfg).train(PAIRS, mismatch_replies=[(p["prompt"], p["chosen"]) for p in PAIRS])
    np.testing.assert_array_equal(rm.transformer.wte.weight.data, wte)
    assert not np.array_equal(rm.reward_head.weight.data, head)


def _tiny_ctx(tmp_path, data_dir, tok, stage_cfgs):
    cfg = types.SimpleNamespace(model=get_tiny_config(len(tok)), **stage_cfgs)
    return StageContext(cfg, tok, Path(data_dir), tmp_path / "ckpt", RunLogger(tmp_path / "run"), seed=0,
                        show_progress=False)


def make_data_dir(tmp_path) -> Path:
    """The hand-written sources laid out as a data directory (no *_val files: 10% held out)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "reward_data.json").write_text((SRC / "reward_hand.json").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "sft_data.json").write_text((SRC / "sft_hand.json").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "pretrain_data.txt").write_text("你好，世界。", encoding="utf-8")
    return d


def test_stage_runs_on_tiny_config_and_round_trips(tmp_path):
    from tinygrad_llm.data import all_texts
    d = make_data_dir(tmp_path)
    tok = MyLLMTokenizer().build_vocab(all_texts(d))
    rcfg = RewardConfig(**TINY_OVERRIDES)
    ctx = _tiny_ctx(tmp_path, d, tok, {"reward": rcfg})
    ctx.save_model(GPT(ctx.cfg.model, seed=0), "sft_final", "sft", 0)
    out = run(ctx)
    for k in ("headline", "val_accuracy", "train_accuracy", "val_margin", "time_s", "bias_shift"):
        assert k in out
    assert 0.0 <= out["val_accuracy"] <= 1.0
    assert not ctx.ckpt("reward_last").exists()                 # resumable state removed when done
    # the saved model (centred bias included) loads strictly and scores the same
    rm = ctx.load_model("reward_model", RewardModel)
    assert rm.reward_head.bias.data[0] == pytest.approx(out["bias_shift"], abs=1e-6)
    assert rm.lm_coef == rcfg.lm_coef > 0          # the likelihood term travels with it (load_extra)
    assert ctx.logger.read_metrics("reward")


def test_length_rule_prefers_the_longer_reply_per_kind():
    from tinygrad_llm.stages.reward_model import length_rule
    pairs = [{"chosen": "一个星期有七天。", "rejected": "七天", "kind": "short"},
             {"chosen": "好的", "rejected": "好的好的好的好的", "kind": "loop"},
             {"chosen": "对", "rejected": "错", "kind": "loop"}]
    acc, by_kind = length_rule(pairs)
    assert acc == (1 + 0 + 0.5) / 3 and by_kind == {"loop": 0.25, "short": 1.0}


def test_lm_term_is_the_replys_mean_log_prob_under_the_trunks_lm_head(tok):
    """RewardConfig.lm_coef: the score adds lm_coef x the mean log p of the reply's tokens (the
    closing <|im_end|> included, the prompt and the header not), as the GPT's own logits give
    it; right padding changes neither; it is a constant (the head's gradient is unchanged)."""
    rm = tiny_rm(tok, np.float64, seed=2)
    seqs = [encode_reply(tok, "你好", "你好！很高兴认识你。"), encode_reply(tok, "太阳从哪边升起？", "东方。")]
    idx, last = pad_right(seqs, rm.config.block_size)
    with E.no_grad():
        logits = GPT.__call__(rm, idx)[0].data                          # the tied LM head's logits
        head = rm.rewards(idx, last).data
        rm.lm_coef = 0.7
        both = rm.rewards(idx, last).data
        padded, _ = pad_right([s + [PAD_ID] * 5 for s in seqs], rm.config.block_size)
        both_padded = rm.rewards(padded, last).data
    for b, s in enumerate(seqs):
        start = len(tok.chat_prompt("你好" if b == 0 else "太阳从哪边升起？"))
        lp = logits[b] - np.log(np.exp(logits[b]).sum(-1, keepdims=True))
        want = np.mean([lp[t - 1, s[t]] for t in range(start, len(s))])
        np.testing.assert_allclose(both[b] - head[b], 0.7 * want, rtol=1e-10)
    np.testing.assert_allclose(both_padded, both, rtol=1e-10)
    grads = []
    for coef in (0.0, 0.7):                                              # no gradient through the term
        rm.lm_coef = coef
        rm.zero_grad()
        rm.rewards(idx, last).sum().backward()
        grads.append({k: p.grad.copy() for k, p in rm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(np.array_equal(grads[0][k], grads[1][k]) for k in grads[0])
