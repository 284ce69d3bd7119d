"""DPO: the loss by hand, its gradient through the tiny model (finite differences, float64),
log-probs over the reply only, learning on a few pairs, and the stage end to end (not in --stage all)."""
import json
import math
import types

import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.gradcheck import check, check_module
from tinygrad_llm.loop import RunLogger
from tinygrad_llm.model import GPT
from tinygrad_llm.stages.common import StageContext
from tinygrad_llm.stages.dpo import (DPOConfig, TINY_OVERRIDES, dpo_loss, encode_pairs, pair_batch, pair_logprobs,
                                     reply_logprobs, run)
from tinygrad_llm.stages.policy import disable_dropout, frozen
from tinygrad_llm.tokenizer import MyLLMTokenizer

PAIRS = [{"prompt": "什么是机器学习？", "chosen": "机器学习让计算机从数据中学习规律。", "rejected": "不知道。", "kind": "short"},
         {"prompt": "太阳从哪边升起？", "chosen": "太阳从东方升起。", "rejected": "滚。", "kind": "rude"},
         {"prompt": "你好", "chosen": "你好！很高兴认识你。", "rejected": "哦。", "kind": "short"},
         {"prompt": "1+1等于几？", "chosen": "1+1=2，答案是2。", "rejected": "1+1=3，答案是3。", "kind": "wrong_math"}]


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer().build_vocab([json.dumps(PAIRS, ensure_ascii=False)])


def tiny_policy(tok, dtype=np.float32, seed=0):
    return disable_dropout(GPT(get_tiny_config(len(tok)), seed=seed, dtype=dtype))


def test_dpo_loss_by_hand():
    logp = E.Tensor(np.array([-3.0, -5.0, -4.0, -4.5]))              # chosen rows, then rejected rows
    ref = np.array([-3.5, -4.0, -4.0, -5.0])
    loss, st = dpo_loss(logp, ref, beta=0.5)
    rc, rr = 0.5 * np.array([0.5, -1.0]), 0.5 * np.array([0.0, 0.5])
    assert float(loss.data) == pytest.approx(np.mean(np.log1p(np.exp(-(rc - rr)))), rel=1e-12)
    assert st["accuracy"] == 0.5 and st["margin"] == pytest.approx(np.mean(rc - rr))
    assert st["chosen_reward"] == pytest.approx(rc.mean()) and st["rejected_reward"] == pytest.approx(rr.mean())
    # a tie counts one half: the untrained policy (pi = pi_ref) scores 50%, loss log 2
    loss, st = dpo_loss(E.Tensor(ref.copy()), ref, beta=0.1)
    assert st["accuracy"] == 0.5 and float(loss.data) == pytest.approx(math.log(2), rel=1e-12)


def test_reply_logprobs_sum_the_reply_tokens_only(tok):
    model = tiny_policy(tok, np.float64)
    enc, kept = encode_pairs(tok, PAIRS[:2], 64)
    assert kept == [0, 1]
    x, y, m = pair_batch(enc, np.float64)
    lp = reply_logprobs(model, x, y, m).data
    logits = model(x)[0].data
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    for row, (prompt, reply) in enumerate([(enc[0][0], enc[0][1]), (enc[1][0], enc[1][1]),
                                           (enc[0][0], enc[0][2]), (enc[1][0], enc[1][2])]):
        seq = prompt + reply
        # the reply's tokens are predicted at positions len(prompt) - 1 ... len(seq) - 2
        want = sum(logsm[row, t, seq[t + 1]] for t in range(len(prompt) - 1, len(seq) - 1))
        assert lp[row] == pytest.approx(want, rel=1e-10)
    # pairs that do not fit the context are left out
    full, _ = encode_pairs(tok, PAIRS, 64)
    lengths = [len(p) + max(len(c), len(r)) - 1 for p, c, r in full]
    assert encode_pairs(tok, PAIRS, min(lengths))[1] == [i for i, n in enumerate(lengths) if n == min(lengths)]


def test_dpo_loss_gradcheck_tiny_model(tok):
    """d(DPO loss)/d(every policy parameter), float64, central differences, with the policy
    moved off the reference so the sigmoid is not at its symmetric point."""
    policy = tiny_policy(tok, np.float64, seed=1)
    ref = frozen(tiny_policy(tok, np.float64, seed=2))
    enc, _ = encode_pairs(tok, PAIRS, 64)
    x, y, m = pair_batch(enc, np.float64)
    ref_logp = pair_logprobs(ref, enc)
    ref_logp = np.concatenate([ref_logp[:, 0], ref_logp[:, 1]])
    res = check_module(policy, lambda: dpo_loss(reply_logprobs(policy, x, y, m), ref_logp, 0.3)[0], max_elems=5)
    assert all(r.ok for r in res), [r for r in res if not r.ok]
    # and the loss as a function of the log-probs alone
    rng = np.random.default_rng(0)
    res = check(lambda lp: dpo_loss(lp, ref_logp, 0.3)[0], [E.Tensor(rng.standard_normal(8), requires_grad=True)])
    assert all(r.ok for r in res)


def _ctx(tmp_path, tok, pairs, **overrides):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "reward_data.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    (d / "reward_val.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    cfg = types.SimpleNamespace(model=get_tiny_config(len(tok)), dpo=DPOConfig(**{**TINY_OVERRIDES, **overrides}))
    ctx = StageContext(cfg, tok, d, tmp_path / "ckpt", RunLogger(tmp_path / "run"), seed=0, show_progress=False)
    ctx.save_model(GPT(cfg.model, seed=0), "sft_final", "sft", 0)
    return ctx


def test_stage_learns_the_training_pairs_and_writes_dpo_final(tmp_path, tok):
    # held-out pairs = the training pairs here: the point is that the loop moves the implicit reward
    ctx = _ctx(tmp_path, tok, PAIRS, max_steps=12, lr=3e-3, eval_every=6)
    out = run(ctx)
    assert out["val_accuracy_start"] == 0.5 and out["val_accuracy"] == 1.0
    assert out["val_margin"] > 0 and out["val_loss"] < math.log(2)
    assert set(out["val_accuracy_by_kind"]) == {"short", "rude", "wrong_math"}
    assert ctx.ckpt("dpo_final").exists() and not ctx.ckpt("dpo_last").exists()
    ctx.load_model("dpo_final", GPT)                                 # a plain GPT checkpoint
    rows = ctx.logger.read_metrics("dpo")
    for k in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert k in rows[-1] or any(k in r for r in rows), k
    assert rows[0]["val_accuracy"] == 0.5 and rows[0]["val_loss_eval"] == pytest.approx(math.log(2))


def test_dpo_is_its_own_stage_not_in_all(capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args, _ = cli.parse_args(["--stage", "all"])
    assert cli.select_stages(args) == ["pretrain", "sft", "reward", "rlhf", "rlvf"]
    args, _ = cli.parse_args(["--stage", "dpo"])
    assert cli.select_stages(args) == ["dpo"]
    assert cli.producers()["dpo_final"] == "dpo"
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    assert "dpo: Direct Preference Optimization" in " ".join(capsys.readouterr().out.split())


def test_without_periodic_evaluation_no_start_figure_is_made_up(tmp_path, tok):
    out = run(_ctx(tmp_path, tok, PAIRS[:2], max_steps=2, eval_every=0))
    assert out["val_accuracy_start"] is None and "accuracy -> " not in out["headline"]
    assert "implicit-reward accuracy" in out["headline"]
