"""PPO (rlhf.py): GAE by hand, rewards, whitening, the first-minibatch ratio, finite-difference
checks of the PPO and value losses on the tiny model, and the stage end to end."""
import json
import types

import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.engine import Tensor
from tinygrad_llm.gradcheck import check, check_module
from tinygrad_llm.loop import RunLogger
from tinygrad_llm.model import GPT
from tinygrad_llm.stages.common import StageContext
from tinygrad_llm.stages.reward_model import RewardModel
from tinygrad_llm.stages.rlhf import (TINY_OVERRIDES, AdaptiveKLController, PPOTrainer, RLHFConfig, gae,
                                      masked_whiten, ppo_losses, run, token_rewards)
from tinygrad_llm.stages.policy import build_batch
from tinygrad_llm.tokenizer import MyLLMTokenizer

PROMPTS = ["你好", "1+1等于几？", "什么是机器学习？", "太阳从哪边升起？", "讲个故事", "你是谁？"]


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer().build_vocab(PROMPTS)


def make_trainer(tok, dtype=np.float32, **cfg):
    mcfg = get_tiny_config(len(tok))
    mcfg.dropout = 0.1                      # on purpose: the trainer must switch it off
    policy = GPT(mcfg, seed=0, dtype=dtype)
    rm = RewardModel.from_pretrained(GPT(mcfg, seed=1, dtype=dtype))
    base = dict(prompts_per_episode=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6, num_episodes=1,
                warmup_steps=0, lr=1e-3)
    trainer = PPOTrainer(policy, rm, tok, mcfg, RLHFConfig(**{**base, **cfg}), seed=0)
    trainer.prompts = PROMPTS
    return trainer


# ----------------------------------------------------------------------------------------
# pure pieces


def test_gae_matches_hand_computation():
    # one reply of 3 tokens at positions 1..3 of a row of 5 (prompt before, padding after)
    r = np.array([[9.0, 0.0, 0.0, 1.0, 9.0]])        # off-mask values must be ignored
    v = np.array([[9.0, 0.5, 0.2, 0.4, 9.0]])
    m = np.array([[0, 1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    # by hand, right to left, V after the last token = 0:
    # d3 = 1 + 0 - 0.4 = 0.6           A3 = 0.6
    # d2 = 0 + 0.4 - 0.2 = 0.2         A2 = 0.2 + 0.95 * 0.6 = 0.77
    # d1 = 0 + 0.2 - 0.5 = -0.3        A1 = -0.3 + 0.95 * 0.77 = 0.4315
    np.testing.assert_allclose(adv, [[0, 0.4315, 0.77, 0.6, 0]], atol=1e-12)
    np.testing.assert_allclose(ret, [[0, 0.9315, 0.97, 1.0, 0]], atol=1e-12)
    # gamma = lam = 1: the advantage is the sum of future rewards minus V_t (Monte-Carlo)
    adv1, ret1 = gae(r, v, m, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret1[0, 1:4], [1.0, 1.0, 1.0], atol=1e-12)
    # rows are independent: a second, shorter row does not leak into the first
    adv2, _ = gae(np.vstack([r, [[0, 0, 2.0, 0, 0]]]), np.vstack([v, np.zeros((1, 5))]),
                  np.vstack([m, [[0, 1, 1, 0, 0]]]))
    np.testing.assert_allclose(adv2[0], adv[0], atol=1e-12)
    np.testing.assert_allclose(adv2[1], [0, 0.95 * 2.0, 2.0, 0, 0], atol=1e-12)


def test_token_rewards_kl_penalty_score_at_last_token_and_unfinished_penalty():
    kl = np.array([[0.0, 0.5, -0.2, 0.1], [0.0, 0.3, 0.0, 0.0]])
    rewards, final = token_rewards(scores=[1.0, 2.0], finished=[True, False], kl=kl, last_index=[3, 1],
                                   beta=0.1, unfinished_penalty=5.0)
    np.testing.assert_allclose(final, [1.0, -3.0])
    np.testing.assert_allclose(rewards, [[0, -0.05, 0.02, -0.01 + 1.0], [0, -0.03 - 3.0, 0, 0]], atol=1e-12)


def test_masked_whiten():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6)) * 4 + 2
    m = rng.random((3, 6)) > 0.4
    w = masked_whiten(x, m)
    assert w[m].mean() == pytest.approx(0, abs=1e-12) and w[m].std() == pytest.approx(1, abs=1e-6)
    assert not w[~m].any()


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(5.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))     # error clipped at +0.2
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(0.5, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert AdaptiveKLController(0.1, target=0.0, horizon=100).update(5.0, 10) == 0.1   # off


def test_ppo_losses_values_by_hand():
    logp = Tensor(np.log(np.array([[1.5, 0.5, 1.1]])))                   # old log-probs 0: ratio = these
    v = Tensor(np.array([[0.0, 1.0, 0.5]]))
    pg, vf, st = ppo_losses(logp, v, old_logp=np.zeros((1, 3)), old_values=np.array([[0.5, 0.5, 0.5]]),
                            adv=np.array([[1.0, -1.0, 2.0]]), returns=np.array([[1.0, 1.0, 1.0]]),
                            mask=np.array([[1, 1, 1]]), clip_ratio=0.2, value_clip=0.2)
    # token 0: A=1, r=1.5 -> min(1.5, 1.2) = 1.2; token 1: A=-1, r=0.5 -> min(-0.5, -0.8) = -0.8;
    # token 2: A=2, r=1.1 -> 2.2 (inside the clip range)
    assert float(pg.data) == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, rel=1e-12)
    # values: V=0 (clipped to 0.3): max(1, 0.49) = 1; V=1 (clipped to 0.7): max(0, 0.09) = 0.09;
    # V=0.5 (inside): 0.25
    assert float(vf.data) == pytest.approx(0.5 * (1 + 0.09 + 0.25) / 3, rel=1e-12)
    assert st["clip_frac"] == pytest.approx(2 / 3) and st["ratio_min"] == pytest.approx(0.5)
    assert st["ratio_max"] == pytest.approx(1.5)


def test_ppo_losses_gradcheck_wrt_inputs():
    rng = np.random.default_rng(0)
    B, L = 3, 5
    mask = (rng.random((B, L)) > 0.3).astype(np.float64)
    old_logp = rng.standard_normal((B, L)) * 0.3 - 1
    old_v, adv, ret = rng.standard_normal((B, L)), rng.standard_normal((B, L)), rng.standard_normal((B, L))
    # log-probs / values near the rollout's, some beyond the clip ranges, none on a kink
    logp = Tensor(old_logp + rng.uniform(-0.5, 0.5, (B, L)), requires_grad=True)
    vals = Tensor(old_v + rng.uniform(-0.6, 0.6, (B, L)), requires_grad=True)

    def f(lp, v):
        pg, vf, _ = ppo_losses(lp, v, old_logp, old_v, adv, ret, mask, 0.2, 0.2)
        return pg + vf * 0.1

    res = check(f, [logp, vals], names=["logp", "values"])
    assert all(r.ok for r in res), res


# ----------------------------------------------------------------------------------------
# the trainer on the tiny model


def test_first_minibatch_ratio_is_exactly_one(tok):
    trainer = make_trainer(tok)
    rng = np.random.default_rng(0)
    mb = trainer.get_batch(rng)
    _, st = trainer.loss_fn(trainer.model, mb)
    assert st["shared"]["ratio_min"] == 1.0 and st["shared"]["ratio_max"] == 1.0     # the whole minibatch's range
    assert st["approx_kl"] == 0.0 and st["clip_frac"] == 0.0
    # through the loop too: the first logged update of a real run
    hist = make_trainer(tok).train(PROMPTS)
    assert hist[0]["ratio_min"] == 1.0 and hist[0]["ratio_max"] == 1.0 and hist[0]["approx_kl"] == 0.0
    assert len(hist) == 1 * 2 * 2                                # episodes * ppo_epochs * minibatches
    assert all(np.isfinite(h["loss"]) for h in hist)


def test_rollout_masks_and_episode_stats(tok):
    trainer = make_trainer(tok, max_new_tokens=5)
    exp = trainer.collect(np.random.default_rng(1))
    assert exp.mask.shape == exp.x.shape == exp.adv.shape
    assert not exp.old_logp[exp.mask == 0].any() and not exp.adv[exp.mask == 0].any()
    assert exp.mask.sum(1).max() <= 5 and exp.mask.sum(1).min() >= 1
    assert abs(exp.adv[exp.mask > 0].mean()) < 1e-5                  # whitened over valid tokens
    assert exp.stats["kl"] == pytest.approx(0.0, abs=1e-5)           # policy == reference at the start
    assert len(exp.plan) == 2 * 2 and sorted(np.concatenate(exp.plan[:2])) == list(range(4))


def test_critic_starts_from_the_reward_model(tok):
    trainer = make_trainer(tok)
    x, _, _ = build_batch([[4, 9, 10, 11]], [[12, 13, 5]])
    with E.no_grad():
        v = trainer.critic.values(x).data
        r = trainer.rm.rewards(x, [x.shape[1] - 1]).data
    assert v[0, -1] == pytest.approx(r[0], rel=1e-5, abs=1e-6)


def test_ppo_and_value_loss_gradcheck_tiny_model(tok):
    """d(pg + vf_coef * vf)/d(every parameter of policy and critic), float64, finite differences."""
    trainer = make_trainer(tok, dtype=np.float64)
    mb = trainer.get_batch(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    # move the stored log-probs / values off the current ones, so clipping is active somewhere
    mb["old_logp"] = mb["old_logp"] + rng.uniform(-0.4, 0.4, mb["old_logp"].shape) * mb["mask"]
    mb["old_values"] = mb["old_values"] + rng.uniform(-0.4, 0.4, mb["old_values"].shape) * mb["mask"]
    res = check_module(trainer.model, lambda: trainer.loss_fn(trainer.model, mb)[0], max_elems=4)
    bad = [r for r in res if not r.ok]
    assert not bad, bad
    assert {r.name.split(".")[0] for r in res} == {"policy", "critic"}


# ----------------------------------------------------------------------------------------
# the stage


def test_stage_runs_on_tiny_config(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    sft = [{"user": p, "assistant": "好的。"} for p in PROMPTS * 2] + [{"user": f"问题{i}", "assistant": "好。"} for i in range(4)]
    (d / "sft_data.json").write_text(json.dumps(sft, ensure_ascii=False), encoding="utf-8")
    (d / "sft_val.json").write_text(json.dumps([{"user": "新问题？", "assistant": "好。"}], ensure_ascii=False),
                                    encoding="utf-8")
    tok = MyLLMTokenizer().build_vocab([json.dumps(sft, ensure_ascii=False), "新问题？"])
    cfg = types.SimpleNamespace(model=get_tiny_config(len(tok)), rlhf=RLHFConfig(**TINY_OVERRIDES))
    ctx = StageContext(cfg, tok, d, tmp_path / "ckpt", RunLogger(tmp_path / "run"), seed=0, show_progress=False)
    ctx.save_model(GPT(cfg.model, seed=0), "sft_final", "sft", 0)
    ctx.save_model(RewardModel.from_pretrained(GPT(cfg.model, seed=1)), "reward_model", "reward", 0)
    out = run(ctx)
    for k in ("score_before", "score_after", "kl_after", "eos_rate_after", "distinct_after", "samples", "headline"):
        assert k in out
    assert out["kl_before"] == 0.0 and out["samples"][0]["prompt"] == "新问题？"
    assert out["updates"] == TINY_OVERRIDES["num_episodes"] * TINY_OVERRIDES["ppo_epochs"] * 2
    ctx.load_model("rlhf_final", GPT)                               # a plain GPT checkpoint
    assert not ctx.ckpt("rlhf_last").exists()
    rows = ctx.logger.read_metrics("rlhf")
    for k in ("score", "kl", "rlhf_reward", "approx_kl", "clip_frac", "ratio_min", "ratio_max", "entropy",
              "value_loss", "explained_var", "eos_rate", "reply_len"):
        assert k in rows[0], k


def test_seed_api(tok):
    """The seed README's example, end to end on the tiny model (tiny sizes so it runs in seconds)."""
    from tinygrad_llm import PPOTrainer as P, RewardModel as RM, RewardModelTrainer, RLHFConfig as C
    config = get_tiny_config(len(tok))
    base_model = GPT(config, seed=0)
    reward_model = RM.from_pretrained(base_model, config)
    pairs = [{"prompt": p, "chosen": "好的，我来回答。", "rejected": "不知道。"} for p in PROMPTS]
    RewardModelTrainer(reward_model, tok, config).train(pairs, epochs=1)
    rlhf_config = C(clip_ratio=0.2, kl_coef=0.01, num_episodes=1, prompts_per_episode=2, minibatch_size=2,
                    ppo_epochs=1, max_new_tokens=4)
    history = P(GPT(config, seed=0), reward_model, tok, config, rlhf_config).train(PROMPTS)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
