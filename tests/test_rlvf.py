"""RLVF (GRPO): advantages, rewards, pass@k, the loss (values + finite differences), an
end-to-end run that learns a trivial task, and the stage entry point on a tiny model."""
import json
from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest

from tinygrad_llm.checkpoint import weights_path
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.engine import Tensor
from tinygrad_llm.gradcheck import check_module
from tinygrad_llm.loop import RunLogger
from tinygrad_llm.model import GPT
from tinygrad_llm.stages.common import StageContext
from tinygrad_llm.stages.rlvf import (
    TINY_OVERRIDES, LogicVerifier, MathVerifier, RLVFConfig, RLVFTrainer, TaskSampler, group_advantages,
    grpo_loss, pass_at_k, run, step_credit, task_rewards,
)
from tinygrad_llm.stages.policy import build_batch, token_logprobs
from tinygrad_llm.tokenizer import MyLLMTokenizer


# -- advantages -------------------------------------------------------------------------


def test_advantages_hand_made_groups():
    # group 0: one right of four; group 1: all right (no signal); group 2: two and two
    r = [1.0, -0.5, -0.5, -0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -0.5, -0.5]
    adv, zero_var = group_advantages(r, 4, eps=0.0)
    assert zero_var.tolist() == [False, True, False]
    # group 0: mean -0.125, population std sqrt(0.421875) = 0.6495 -> (1.125, -0.375) / std
    np.testing.assert_allclose(adv[:4], [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3)], rtol=1e-12)
    assert np.all(adv[4:8] == 0.0)                       # exactly zero, not eps noise
    np.testing.assert_allclose(adv[8:], [1, 1, -1, -1], rtol=1e-12)
    for g in adv.reshape(3, 4):                          # centred in every group
        assert abs(g.sum()) < 1e-12


def test_advantages_eps_and_dr_grpo():
    r = [1.0, -0.5]
    adv, _ = group_advantages(r, 2, eps=1e-4)
    np.testing.assert_allclose(adv, [0.75 / (0.75 + 1e-4), -0.75 / (0.75 + 1e-4)])
    dr, zv = group_advantages([1.0, -0.5, -0.5, -0.5], 4, scale=False)   # Dr. GRPO: r - mean only
    np.testing.assert_allclose(dr, [1.125, -0.375, -0.375, -0.375])
    assert not zv[0]
    with pytest.raises(ValueError):
        group_advantages([1.0, 0.0, 1.0], 2)              # not a whole number of groups


# -- rewards and pass@k -----------------------------------------------------------------


def test_task_rewards_verifier_and_format_bonus():
    cfg = RLVFConfig(correct_reward=1.0, incorrect_reward=-0.5, format_reward=0.1, step_reward=0.0)
    task = {"type": "math", "prompt": "计算 15 + 27 = ?", "expected_answer": "42"}
    texts = ["15 + 27 = 42，答案是42。", "15 + 27 = 41，答案是41。", "15 + 27 = 42，答案是42。", "42"]
    finished = [True, True, False, True]                 # third: cut off before <|im_end|>
    rewards, correct, _ = task_rewards([task] * 4, texts, finished, cfg)
    np.testing.assert_allclose(rewards, [1.1, -0.4, 1.0, 1.0])   # "42" is right but not house style
    assert correct.tolist() == [True, False, True, True]
    logic = {"type": "logic", "prompt": "所有猫都是动物，小花是猫，请问小花是动物吗？", "expected_answer": "是"}
    rewards, _, steps = task_rewards([logic] * 2, ["是的，小花是动物。", "不是，小花不是动物。"], [True, True], cfg)
    np.testing.assert_allclose(rewards, [1.1, -0.4])
    assert steps.tolist() == [0.0, 0.0]                  # no step credit outside math


def test_step_credit_counts_true_facts_about_the_prompts_numbers():
    p = "72 加 19 等于多少？"
    good = "72 + 19：先算个位，2 + 9 = 11，写1进1；再算十位，7 + 1 + 1 = 9。所以72 + 19 = 91，答案是91。"
    assert step_credit(p, good) == 1.0
    slip = "72 + 19：先算个位，2 + 9 = 12，写2进1；再算十位，7 + 1 + 1 = 9。所以72 + 19 = 92，答案是92。"
    assert step_credit(p, slip) == pytest.approx(1 / 3)
    other = "47 + 38：先算个位，7 + 8 = 15，写5进1；再算十位，4 + 3 + 1 = 8。所以47 + 38 = 85，答案是85。"
    assert step_credit(p, other) == 0.0                   # true facts about numbers not in the prompt
    assert step_credit(p, "答案是91。") == 0.0
    cfg = RLVFConfig(step_reward=0.3, format_reward=0.0)
    task = {"type": "math", "prompt": p, "expected_answer": "91"}
    rewards, correct, steps = task_rewards([task] * 2, [good, slip], [True, True], cfg)
    np.testing.assert_allclose(steps, [1.0, 1 / 3])
    np.testing.assert_allclose(rewards, [1.0 + 0.3, -0.5 + 0.1])


def test_pass_at_k_matches_enumeration():
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    for n, c, k in [(8, 2, 4), (8, 3, 1), (6, 1, 4), (5, 5, 4)]:
        subsets = list(combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_task_sampler_curriculum():
    tasks = [{"type": "math", "prompt": f"{k}{i}", "expected_answer": "1", "kind": k}
             for k in ("easy", "hard", "mid") for i in range(5)]
    s = TaskSampler(tasks, np.random.default_rng(0), group_size=8, floor=0.05)
    for _ in range(20):                                   # solve rates 1, 0 and 1/2 observed
        s.update(tasks[::5], [1.0, 0.0, 0.5])
    w = dict(zip(s.kinds, s.weights()))
    assert w["mid"] > 0.9 and 0 < w["easy"] < 0.05 and 0 < w["hard"] < 0.05   # floor keeps them in play
    drawn = s.draw(200)
    assert sum(t["kind"] == "mid" for t in drawn) > 170
    mids = [t["prompt"] for t in drawn if t["kind"] == "mid"][:5]
    assert sorted(mids) == [f"mid{i}" for i in range(5)]  # epochs without replacement within a kind
    plain = TaskSampler(tasks, np.random.default_rng(0), group_size=8, curriculum=False)
    assert sorted(t["prompt"] for t in plain.draw(15)) == sorted(t["prompt"] for t in tasks)


# -- the loss ---------------------------------------------------------------------------


def _leaf(values):
    return Tensor(np.asarray(values, np.float64), requires_grad=True)


def test_loss_value_on_policy():
    """ratio 1 and policy == reference: loss = -(token-weighted mean of A), KL 0."""
    logp = _leaf([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float64)          # row 1: 2 reply tokens
    adv = np.array([1.0, -2.0])
    loss, st = grpo_loss(logp, logp.data, logp.data, adv, mask, clip_ratio=0.2, kl_coef=0.1)
    assert float(loss.data) == pytest.approx(-(3 * 1.0 + 2 * -2.0) / 5)
    assert st["kl"] == 0.0 and st["clip_frac"] == 0.0
    loss.backward()
    # d loss / d logp_t = -A / n_tokens on reply tokens, 0 on padding
    np.testing.assert_allclose(logp.grad, -adv[:, None] * mask / 5)


def test_loss_clipping_and_k3():
    # token 0: ratio e^0.5 > 1.2; token 1: ratio e^-0.5 < 0.8
    logp = _leaf([[0.0, 0.0]])
    old = np.array([[-0.5, 0.5]])
    mask = np.ones((1, 2))
    for a, grad_zero in ((1.0, [True, False]), (-1.0, [False, True])):
        # A > 0: the surrogate is capped above 1 + eps (no push further up), not below 1 - eps;
        # A < 0 mirrors it: the pessimistic min keeps the unclipped term where it is worse.
        logp.grad = None
        loss, st = grpo_loss(logp, old, logp.data, np.array([a]), mask, clip_ratio=0.2, kl_coef=0.0)
        loss.backward()
        assert (logp.grad[0] == 0).tolist() == grad_zero
        assert st["clip_frac"] == 1.0
    # k3 = exp(d) - d - 1 with d = ref - logp, e.g. d = 1: e - 2
    loss, st = grpo_loss(logp, logp.data, np.array([[1.0, -1.0]]), np.zeros(1), mask, kl_coef=1.0)
    assert st["kl"] == pytest.approx(((np.e - 2) + (np.exp(-1) + 1 - 1)) / 2)
    assert float(loss.data) == pytest.approx(st["kl"])


def test_loss_gradcheck_tiny_model():
    """d(GRPO loss)/d(every parameter) of a float64 tiny GPT against central differences,
    with ratios on both sides of the clip range and a nonzero KL."""
    rng = np.random.default_rng(0)
    model = GPT(get_tiny_config(vocab_size=30), seed=0).to(np.float64)
    prompts = [rng.integers(6, 30, n).tolist() for n in (4, 6, 5)]
    replies = [rng.integers(6, 30, n).tolist() for n in (3, 2, 4)]
    x, y, mask = build_batch(prompts, replies, np.float64)
    base = token_logprobs(model, x, y).data
    old = base + rng.normal(0, 0.3, base.shape)          # some ratios outside [0.8, 1.2]
    ref = base + rng.normal(0, 0.5, base.shape)
    adv = np.array([1.3, -0.7, 0.4])

    def forward():
        return grpo_loss(token_logprobs(model, x, y), old, ref, adv, mask, clip_ratio=0.2, kl_coef=0.1)[0]

    results = check_module(model, forward, max_elems=6, seed=1)
    bad = [(r.name, r.max_rel) for r in results if not r.ok]
    assert not bad, bad


# -- end to end -------------------------------------------------------------------------


def _digits_tokenizer():
    # capped vocabulary: the 6 specials + "0".."9"; prompts encode to <UNK>, so every task
    # looks alike and "1" is the one answer to learn (1/16 of random samples at the start)
    return MyLLMTokenizer(vocab_size=16).build_vocab("0123456789")


def test_grpo_learns_trivial_task():
    tok = _digits_tokenizer()
    model = GPT(get_tiny_config(vocab_size=len(tok)), seed=0)
    tasks = [{"type": "math", "prompt": f"问题{i}", "expected_answer": "1"} for i in range(8)]
    # a high lr: the whole task is one logit to raise (seeds 0-2 all reach >= 0.9 pass@1)
    cfg = RLVFConfig(num_iterations=10, samples_per_task=8, tasks_per_iter=8, max_new_tokens=1, lr=1e-2,
                     warmup_steps=0, kl_coef=0.0, format_reward=0.0, eval_samples=4, seed=0)
    trainer = RLVFTrainer(model, tok, model.config, cfg)
    before = trainer.evaluate(tasks)
    history = trainer.train(tasks)
    after = trainer.evaluate(tasks)
    assert before["accuracy"] == 0.0 and after["accuracy"] == 1.0
    assert before["pass@1"] < 0.2 and after["pass@1"] > 0.8
    assert history[-1]["reward"] > history[0]["reward"]
    assert set(history[0]) >= {"reward", "accuracy", "zero_var_share", "kl", "reply_len", "entropy"}


def test_inner_epochs_reuse_samples_and_clip():
    """GRPO's mu > 1: later epochs see ratios != 1, and the clip engages after a big step."""
    tok = _digits_tokenizer()
    model = GPT(get_tiny_config(vocab_size=len(tok)), seed=0)
    tasks = [{"type": "math", "prompt": f"问题{i}", "expected_answer": "1"} for i in range(8)]
    cfg = RLVFConfig(num_iterations=3, samples_per_task=8, tasks_per_iter=8, max_new_tokens=1, lr=3e-2,
                     warmup_steps=0, inner_epochs=3, eval_samples=0, seed=0)
    history = RLVFTrainer(model, tok, model.config, cfg).train(tasks)
    assert max(h["clip_frac"] for h in history) > 0
    assert all(np.isfinite(h["loss"]) and h["kl"] >= 0 for h in history if h["grad_norm"] > 0)


def test_chat_replay_adds_the_sft_loss_on_replayed_conversations():
    """--rlvf.chat_replay (PPO-ptx): each update adds the SFT loss of replay_rows conversations;
    it falls as they are learnt, and without replay rows the run is the plain one."""
    from tinygrad_llm.data import encode_chat
    tok = _digits_tokenizer()
    conv = [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "12"}]
    replay = [tuple(np.array(a) for a in encode_chat(tok, conv, 64))]
    tasks = [{"type": "math", "prompt": f"问题{i}", "expected_answer": "1"} for i in range(8)]
    kw = dict(num_iterations=8, samples_per_task=8, tasks_per_iter=8, max_new_tokens=1, lr=1e-2, warmup_steps=0,
              kl_coef=0.0, format_reward=0.0, eval_samples=0, seed=0)
    hist = RLVFTrainer(GPT(get_tiny_config(vocab_size=len(tok)), seed=0), tok, None,
                       RLVFConfig(chat_replay=1.0, replay_rows=2, **kw), replay=replay).train(tasks)
    losses = [h["replay_loss"] for h in hist if "replay_loss" in h]
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0]
    plain = RLVFTrainer(GPT(get_tiny_config(vocab_size=len(tok)), seed=0), tok, None, RLVFConfig(**kw)).train(tasks)
    off = RLVFTrainer(GPT(get_tiny_config(vocab_size=len(tok)), seed=0), tok, None, RLVFConfig(chat_replay=0.0, **kw),
                      replay=replay).train(tasks)
    assert [h["loss"] for h in plain] == [h["loss"] for h in off] and "replay_loss" not in off[0]


def test_old_knob_names_are_aliases():
    """beta, clip_eps and warmup_iters were this stage's names: still accepted, as the new ones."""
    assert RLVFConfig(beta=0.02, clip_eps=0.3, warmup_iters=1) == RLVFConfig(kl_coef=0.02, clip_ratio=0.3,
                                                                            warmup_steps=1)
    with pytest.raises(TypeError):
        RLVFConfig(beta=0.02, kl_coef=0.02)


def test_seed_api_and_reexports():
    tok = _digits_tokenizer()
    model = GPT(get_tiny_config(vocab_size=len(tok)))
    cfg = RLVFConfig(correct_reward=1.0, incorrect_reward=-0.5, num_iterations=2, samples_per_task=2,
                     max_new_tokens=2, eval_samples=0, curriculum=True)
    trainer = RLVFTrainer(model, tok, model.config, cfg)
    history = trainer.train([{"type": "math", "prompt": "3 + 5 等于多少？", "expected_answer": "8"}], batch_size=4)
    assert len(history) == 2
    assert "accuracy" in trainer.evaluate([{"type": "logic", "prompt": "是吗？", "expected_answer": "是"}])
    assert MathVerifier().verify("答案是8。", "8") and LogicVerifier().verify("是的，小花是动物。", "是")


def test_train_eval_tasks_must_not_be_negative():
    from tinygrad_llm.config import ConfigError
    RLVFConfig(train_eval_tasks=0).validate()                  # 0: off
    with pytest.raises(ConfigError, match="train_eval_tasks"):
        RLVFConfig(train_eval_tasks=-1).validate()
    with pytest.raises(ConfigError, match="eval_every"):
        RLVFConfig(eval_every=-1).validate()


def test_eval_every_logs_held_out_accuracy_while_training(tmp_path):
    """--rlvf.eval_every: greedy accuracy on the held-out tasks at the start, every N iterations
    and at the end, logged as val_accuracy; it rises on a learnable task."""
    tok = _digits_tokenizer()
    model = GPT(get_tiny_config(vocab_size=len(tok)), seed=0)
    tasks = [{"type": "math", "prompt": f"问题{i}", "expected_answer": "1"} for i in range(8)]
    cfg = RLVFConfig(num_iterations=10, samples_per_task=8, tasks_per_iter=8, max_new_tokens=1, lr=1e-2,
                     warmup_steps=0, kl_coef=0.0, format_reward=0.0, eval_samples=0, eval_every=5, seed=0)
    logger = RunLogger(tmp_path / "run")
    RLVFTrainer(model, tok, model.config, cfg, logger=logger).train(tasks[:6], val_tasks=tasks[6:])
    evals = [(r["step"], r["val_accuracy"]) for r in logger.read_metrics("rlvf") if "val_accuracy" in r]
    assert [s for s, _ in evals] == [0, 5, 10]
    assert evals[0][1] == 0.0 and evals[-1][1] == 1.0


def test_stage_run_tiny(tmp_path):
    """run(ctx) as train.py calls it: loads sft_final, evaluates, trains, saves, logs, plots."""
    tasks = [{"type": "math", "prompt": f"计算 {a} + {b} = ?", "expected_answer": str(a + b)}
             for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1)]]
    tasks += [{"type": "logic", "prompt": f"{n}是偶数吗？", "expected_answer": "是" if n % 2 == 0 else "不是"}
              for n in (2, 3, 8, 5)]
    data_dir, ckpt_dir = tmp_path / "data", tmp_path / "ckpt"
    data_dir.mkdir()
    (data_dir / "rlvf_data.json").write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    tok = MyLLMTokenizer().build_vocab([json.dumps(t, ensure_ascii=False) for t in tasks])
    mcfg = get_tiny_config(vocab_size=len(tok))
    cfg = SimpleNamespace(model=mcfg, rlvf=RLVFConfig(**TINY_OVERRIDES))
    ctx = StageContext(cfg=cfg, tokenizer=tok, data_dir=data_dir, ckpt_dir=ckpt_dir,
                       logger=RunLogger(tmp_path / "run"), seed=0, show_progress=False)
    ctx.save_model(GPT(mcfg), "sft_final", "sft", 0)
    out = run(ctx)
    assert weights_path(ckpt_dir / "rlvf_final").exists()
    for key in ("headline", "acc_before", "acc_after", "math_before", "logic_after", "pass@1_before",
                "pass@4_after", "reward_start", "reward_end", "zero_var_share", "time_s", "samples"):
        assert key in out, key
    assert out["init_from"] == "sft_final" and len(out["samples"]) == min(TINY_OVERRIDES["n_show"], out["n_val"])
    # the training-task check: a fixed sample of the training split, greedy, before and after
    assert out["n_train_eval"] == TINY_OVERRIDES["train_eval_tasks"]
    assert 0 <= out["train_acc_before"] <= 1 and 0 <= out["train_acc_after"] <= 1 and "training tasks" in out["headline"]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "run" / "rlvf_curves.png").exists()
    except ImportError:
        assert out["plot"].startswith("skipped")
    rows = ctx.logger.read_metrics("rlvf")
    assert len([r for r in rows if "reward" in r]) == TINY_OVERRIDES["num_iterations"]
