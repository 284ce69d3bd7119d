"""PPO's own pieces, apart from what it shares with GRPO (policy.py): the critic (a value
head on a GPT trunk, initialised from the reward model), policy and critic under one
optimizer, the adaptive KL controller, and the pure, unit-tested functions of one episode:
reward-model scores, per-token rewards, GAE, whitening, the clipped policy and value losses,
entropy, explained variance and the episode's figures; and the held-out evaluation
(score_replies). The trainer and the stage are in rlhf.py."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import engine as E
from .. import nn
from ..engine import Tensor
from ..model import GPT, ScalarHead
from ..tokenizer import IM_END_ID
from .policy import clip_fraction, clipped_surrogate, kl_k1, kl_k3, logprobs_no_grad, masked_mean, rollouts_in_chunks
from .reward_model import RewardModel


# ----------------------------------------------------------------------------------------
# the critic, the KL controller


class ValueModel(GPT):
    """The critic: GPT trunk + value_head (1, C). values(idx) (B, L) -> (B, L): V at every position."""

    def __init__(self, config, seed: int = 0, dtype=np.float32):
        super().__init__(replace(config, dropout=0.0), seed, dtype)
        self.value_head = ScalarHead(config.n_embd, np.random.default_rng(seed + 2), dtype)

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "ValueModel":
        """Trunk and head copied from the reward model: the critic starts out predicting the
        score the reply would get if it ended here, not noise."""
        vm = cls(rm.config, dtype=rm.dtype)
        state = {k.replace("reward_head.", "value_head."): v.copy() for k, v in rm.state_dict().items()}
        vm.load_state_dict(state, source="reward model weights")
        return vm

    def values(self, idx) -> Tensor:
        return self.value_head(self.hidden_states(idx))             # (B, L, C) -> (B, L)


class PolicyAndValue(nn.Module):
    """Policy and critic under one set of names (policy.*, critic.*) so one optimizer, one
    gradient clip and one resumable checkpoint cover both (TRL's PolicyAndValueWrapper)."""

    def __init__(self, policy: GPT, critic: ValueModel):
        self.policy, self.critic = policy, critic
        self.config = policy.config


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target > 0:
            err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.value *= 1.0 + err * n / self.horizon
        return self.value


# ----------------------------------------------------------------------------------------
# the pieces (pure functions, unit-tested)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) on right-padded rows.

    rewards, values, mask: (B, L); each row's valid positions are contiguous and the
    episode ends after the last one (V = 0 beyond it). -> advantages, returns (B, L), 0
    outside the mask. delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}."""
    m = np.asarray(mask, np.float64)
    r, v = np.asarray(rewards, np.float64) * m, np.asarray(values, np.float64) * m
    adv = np.zeros_like(r)
    last, next_v = np.zeros(r.shape[0]), np.zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):                  # pass 1 ... L, right to left
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]      # 0 after the reply ends
        adv[:, t] = last
        next_v = v[:, t]
    return adv, (adv + v) * m


def token_rewards(scores, finished, kl, last_index, beta: float, unfinished_penalty: float):
    """Per-token rewards (InstructGPT eq. 2, per token as in Ziegler et al. 2019 / TRL):
    -beta * kl_t on every token (kl_t = logp_old - logp_ref, the k1 estimate, 0 off the reply)
    plus, at the reply's last token, the score minus unfinished_penalty if it never closed.
    scores, finished, last_index: (B,); kl: (B, L). -> rewards (B, L), final scores (B,)."""
    final = np.asarray(scores, np.float64) - unfinished_penalty * (~np.asarray(finished, bool))
    rewards = -beta * np.asarray(kl, np.float64)
    rewards[np.arange(len(final)), last_index] += final
    return rewards, final


def rm_scores(rm: RewardModel, ro) -> np.ndarray:
    """Reward-model score of each rollout reply (B,). The RM only ever saw replies closed by
    <|im_end|>, so one cut off by max_new_tokens is scored with <|im_end|> appended: its score
    at some mid-reply token would be out of distribution, free for the policy to exploit.
    The missing close is paid for by token_rewards' unfinished_penalty instead."""
    seqs = [list(p) + list(r) + ([] if done else [IM_END_ID]) for p, r, done in zip(ro.prompts, ro.replies, ro.finished)]
    return rm.score_ids(seqs).astype(np.float64)


def masked_whiten(x, mask, eps: float = 1e-8, pool=None):
    """(x - mean) / std over the positions where mask > 0; 0 elsewhere (TRL's masked_whiten).
    pool: the masked values of the whole batch, when x holds only a rank's part of it (MPI)."""
    m = np.asarray(mask, bool)
    vals = x[m] if pool is None else np.asarray(pool)
    out = np.zeros_like(x)
    out[m] = (x[m] - vals.mean()) / (vals.std() + eps)
    return out


def ppo_losses(logp: Tensor, values: Tensor, old_logp, old_values, adv, returns, mask,
               clip_ratio: float = 0.2, value_clip: float = 0.2):
    """Clipped surrogate and clipped value loss, token-level means over mask (B, L).

    logp: (B, L) log pi_theta(y_t) (Tensor); values: (B, L) V_phi (Tensor); old_logp,
    old_values, adv, returns: (B, L) arrays from the rollout. -> pg_loss, vf_loss, stats.
      pg = -mean(min(A ratio, A clip(ratio, 1 - eps, 1 + eps)))        (policy.clipped_surrogate)
      vf = 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))   (37 details, #9)"""
    dt = logp.dtype
    m = np.asarray(mask, dt)
    R, old_v = np.asarray(returns, dt), np.asarray(old_values, dt)
    surr, log_ratio = clipped_surrogate(logp, old_logp, adv, m, clip_ratio)
    pg_loss = -masked_mean(surr, m)
    v_clipped = (values - old_v).clip(-value_clip, value_clip) + old_v
    vf_loss = masked_mean(E.maximum((values - R) ** 2, (v_clipped - R) ** 2), m) * 0.5
    r, valid = np.exp(log_ratio.data), m > 0
    stats = {"pg_loss": float(pg_loss.data), "value_loss": float(vf_loss.data),
             # k3 estimate of KL(old || new) (37 details, #12)
             "approx_kl": float(masked_mean(kl_k3(log_ratio.data), m)),
             "clip_frac": clip_fraction(r - 1, m, clip_ratio),
             "ratio_min": float(r[valid].min()) if valid.any() else 1.0,
             "ratio_max": float(r[valid].max()) if valid.any() else 1.0,
             "value_clip_frac": clip_fraction(values.data - old_v, m, value_clip)}
    return pg_loss, vf_loss, stats


# the per-minibatch figures that are means over its reply tokens (ppo_losses' and the entropy)
MEAN_METRICS = ("pg_loss", "value_loss", "approx_kl", "clip_frac", "value_clip_frac", "entropy")


def entropy(logits: np.ndarray, mask) -> float:
    """Mean entropy (nats) of softmax(logits) (B, L, V) over the positions where mask > 0."""
    z = logits[np.asarray(mask) > 0].astype(np.float64)              # (n, V)
    if not len(z):
        return 0.0
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    s = p.sum(-1)
    return float(np.mean(np.log(s) - (p * z).sum(-1) / s))


def explained_variance(pred, target, mask) -> float:
    """1 - Var(target - pred) / Var(target) over the mask: 1 perfect, 0 no better than the mean."""
    m = np.asarray(mask) > 0
    var = np.var(target[m])
    return float(1 - np.var(target[m] - pred[m]) / var) if var > 0 else float("nan")


def episode_stats(g: dict, beta: float) -> dict:
    """An episode's logged figures from its rows (every rank's, rlhf.PPOTrainer.collect): per row
    score, kl (summed over the reply), final (score less penalties), finished, lens, penalty,
    looped, refused; per reply token values, returns."""
    return {"score": float(g["score"].mean()), "kl": float(g["kl"].mean()),
            "rlhf_reward": float((g["final"] - beta * g["kl"]).mean()), "kl_coef": beta,
            "eos_rate": float(g["finished"].mean()), "reply_len": float(g["lens"].mean()),
            "penalty": float(g["penalty"].mean()), "loop_share": float(g["looped"].mean()),
            "refusal_share": float(g["refused"].mean()),
            "explained_var": explained_variance(g["values"], g["returns"], np.ones(len(g["values"]), bool))}


def score_replies(model, ref, rm: RewardModel, tok, prompts, n: int, rng, *, temperature: float,
                  max_new_tokens: int, batch: int) -> dict:
    """Sample n replies per prompt from `model` -> mean RM score, KL to `ref` (sum over tokens,
    per reply), EOS rate, share of distinct replies, mean length, and the replies (RLHF's
    held-out evaluation)."""
    scores, kls, finished, lens, texts = [], [], [], [], []
    for ro in rollouts_in_chunks(model, tok, prompts, samples=n, temperature=temperature,
                                 max_new_tokens=max_new_tokens, batch=batch, rng=rng):
        lp = logprobs_no_grad(model, ro.x, ro.y, temperature, ro.action_mask)
        lr = logprobs_no_grad(ref, ro.x, ro.y, temperature, ro.action_mask)
        kls += list((kl_k1(lp, lr) * ro.action_mask).sum(1))
        scores += list(rm_scores(rm, ro))
        finished += list(ro.finished)
        lens += list(ro.action_mask.sum(1))
        texts += ro.texts
    return {"score": float(np.mean(scores)), "score_std": float(np.std(scores)), "kl": float(np.mean(kls)),
            "eos_rate": float(np.mean(finished)), "distinct": len(set(texts)) / len(texts),
            "reply_len": float(np.mean(lens)), "n": len(texts), "texts": texts, "samples_per_prompt": n,
            "scores": np.array(scores), "kls": np.array(kls)}


@dataclass
class Experience:
    """One episode's rollout, laid out (B, L) like policy.build_batch, plus the minibatch plan."""
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    old_values: np.ndarray
    adv: np.ndarray
    returns: np.ndarray
    stats: dict
    plan: list            # row-index arrays of the whole episode, one per minibatch step, epoch by epoch
    rows: tuple           # this rank's rows [lo, hi) of the episode (one process: all of them)
    reply_tokens: np.ndarray   # (P,) reply tokens of every row of the episode, on every rank
