"""Stage 4, RLHF: PPO against the reward model (InstructGPT, Ouyang et al. 2022; the recipe
of Ziegler et al. 2019 as implemented by TRL's PPOTrainer and documented in "The 37
Implementation Details of PPO", Huang et al. 2022, and "The N+ Implementation Details of
RLHF with PPO", Huang et al. 2024).

Four models: the policy (trained, from sft_final), a frozen reference (sft_final), the
frozen reward model, and a critic: a `value_head` on a trunk initialised from the reward
model (TRL initialises its value model from the reward model). Dropout is off in all of
them, so every log-prob is a deterministic function of the weights.

One episode = one rollout + ppo_epochs passes over it in shuffled minibatches:
  1. sample a reply to each of prompts_per_episode held-in prompts at temperature T,
     stopping at <|im_end|> (kept in the action mask, everything after it masked);
  2. old log-probs (policy), reference log-probs and values, all from logits / T;
  3. per-token reward -beta * (logp_old - logp_ref), plus at the reply's last token the
     reward model's score; a reply that never closed is scored with <|im_end|> appended
     and pays unfinished_penalty (rm_scores, token_rewards); a reply that loops, refuses a
     benign prompt or does not refuse a harmful one pays loop_penalty / refusal_penalty /
     comply_penalty (chat_guard.reply_penalties);
  4. GAE (gamma = 1, lambda = 0.95), returns = advantages + values, advantages whitened
     over the valid tokens of the episode;
  5. each minibatch: clipped surrogate + vf_coef * clipped value loss, one AdamW step on
     policy and critic together, global-norm gradient clipping (TRL's PolicyAndValueWrapper).
Optionally beta follows Ziegler et al.'s adaptive controller toward target_kl.

Watched for reward hacking (chat_guard.ChatGuard, when the data holds chat_eval.json): every
chat_eval_every episodes, greedy replies to held-out everyday prompts are judged
(chat_eval.py); if the acceptable share falls more than chat_guard_drop below the best so far,
or the refusal / loop share rises more than chat_guard_rise, while the reward model scores
those replies higher, training stops and the best weights are kept.

The minibatch steps run in the one training loop (loop.train): get_batch() pops the next
minibatch and makes a new rollout whenever the episode's minibatches are used up.

    trainer = PPOTrainer(policy, reward_model, tokenizer, model_config, RLHFConfig(clip_ratio=0.2, kl_coef=0.1))
    history = trainer.train(prompts)                 # one metrics dict per minibatch update
    trainer.evaluate(held_out_prompts)               # mean RM score, KL to SFT, EOS rate, distinct share
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .. import engine as E
from .. import nn
from ..config import ConfigError, LoopConfig
from ..data import DataError, load_split
from ..engine import Tensor
from ..loop import train
from ..model import GPT, ScalarHead
from ..report import plot_stage
from ..tokenizer import IM_END_ID
from .. import chat_eval
from .chat_guard import ChatGuard, GuardStop, refusal_prompts, reply_penalties
from .common import load_resume, make_saver
from .reward_model import RewardModel
from .rollout import logprobs_no_grad, rollout

__all__ = ["RLHFConfig", "PPOTrainer", "ValueModel", "PolicyAndValue", "AdaptiveKLController", "STAGE_CONFIG",
           "TINY_OVERRIDES", "gae", "masked_whiten", "rm_scores", "token_rewards", "ppo_losses", "disable_dropout", "run"]


@dataclass
class RLHFConfig:
    # the seed's fields
    clip_ratio: float = 0.2          # PPO's epsilon
    kl_coef: float = 0.1             # beta (seed: 0.01); 0.1 keeps the mini policy within ~5 nats/reply of SFT
    num_episodes: int = 50
    # rollout
    prompts_per_episode: int = 16
    temperature: float = 0.7         # sampling temperature T; the policy optimised is softmax(logits / T)
    max_new_tokens: int = 96
    unfinished_penalty: float = 2.0  # subtracted from the score of a reply that never closes with <|im_end|>
    # PPO update
    ppo_epochs: int = 4              # K passes over each rollout
    minibatch_size: int = 8
    lr: float = 2e-5
    warmup_steps: int = 8            # in minibatch steps
    min_lr_ratio: float = 1.0        # 1.0: constant after warmup
    weight_decay: float = 0.0        # decay would pull away from the SFT weights, not toward anything useful
    grad_clip: float = 1.0
    vf_coef: float = 0.1
    value_clip: float = 0.2          # critic's clip range around the rollout's values (TRL: cliprange_value)
    gamma: float = 1.0
    lam: float = 0.95
    target_kl: float = 0.0           # > 0: adaptive beta (Ziegler et al. 2019) toward this KL per reply
    kl_horizon: int = 400            # replies over which the adaptive controller acts
    # evaluation on held-out prompts (same sampling settings as training)
    eval_prompts: int = 96           # held-out prompts (a seeded sample); 0 = all of them
    eval_samples: int = 4            # samples per prompt
    eval_batch: int = 96             # rows per generate() call
    n_show: int = 5
    ckpt_every: int = 0              # minibatch steps between resumable checkpoints (0: on interrupt only)
    # reward shaping against the failures users see (chat_guard.reply_penalties; 0 = off)
    loop_penalty: float = 1.0        # subtracted from the score of a rollout reply that loops (chat_eval.is_loop)
    refusal_penalty: float = 1.0     # ... that refuses a prompt whose SFT reply does not refuse (is_refusal)
    comply_penalty: float = 1.0      # ... that does not refuse a prompt whose SFT reply refuses (harmful)
    # the chat evaluation (data/chat_eval.json) and the reward-hacking guard (chat_guard.ChatGuard)
    chat_eval_every: int = 10        # episodes between chat evaluations (0: before and after only)
    chat_eval_tokens: int = 96       # greedy reply length
    chat_eval_items: int = 0         # 0 = every item
    chat_guard: bool = True          # stop and roll back to the best weights on reward hacking
    chat_guard_drop: float = 0.05    # acceptable share may fall this much below the best ...
    chat_guard_rise: float = 0.05    # ... and the refusal / loop shares rise this much above it

    def validate(self):
        if self.num_episodes < 0 or self.prompts_per_episode <= 0 or self.minibatch_size <= 0 or self.ppo_epochs <= 0:
            raise ConfigError("rlhf: num_episodes >= 0; prompts_per_episode, minibatch_size, ppo_epochs > 0")
        if not (0 < self.clip_ratio < 1 and self.lr > 0 and self.temperature > 0 and self.max_new_tokens > 0):
            raise ConfigError("rlhf: need 0 < clip_ratio < 1, lr > 0, temperature > 0, max_new_tokens > 0")
        if min(self.loop_penalty, self.refusal_penalty, self.comply_penalty, self.chat_guard_drop,
               self.chat_guard_rise) < 0 \
                or self.chat_eval_every < 0 or self.chat_eval_tokens <= 0:
            raise ConfigError("rlhf: penalties and chat_guard_drop / _rise >= 0, chat_eval_every >= 0, "
                              "chat_eval_tokens > 0")

    @property
    def minibatches(self) -> int:
        return math.ceil(self.prompts_per_episode / self.minibatch_size)

    def loop_config(self) -> LoopConfig:
        """What loop.train needs: one loop step per minibatch."""
        return LoopConfig(max_steps=self.num_episodes * self.ppo_epochs * self.minibatches,
                          batch_size=self.minibatch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
                          warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                          grad_clip=self.grad_clip, eval_every=0, log_every=1, ckpt_every=self.ckpt_every)


STAGE_CONFIG = RLHFConfig
TINY_OVERRIDES = {"num_episodes": 2, "prompts_per_episode": 4, "minibatch_size": 2, "ppo_epochs": 2,
                  "max_new_tokens": 12, "warmup_steps": 0, "eval_prompts": 4, "eval_samples": 2, "n_show": 2,
                  "chat_eval_every": 1, "chat_eval_tokens": 12, "chat_eval_items": 4}


# ----------------------------------------------------------------------------------------
# models


def disable_dropout(model):
    """Set every Dropout to p = 0 (and say so in the config): the training forward must
    compute the same function as the rollout, or the first PPO ratio is not 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.config = replace(model.config, dropout=0.0)
    return model


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


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the positions where mask > 0; 0 elsewhere (TRL's masked_whiten)."""
    m = np.asarray(mask, bool)
    vals = x[m]
    out = np.zeros_like(x)
    out[m] = (vals - vals.mean()) / (vals.std() + eps)
    return out


def ppo_losses(logp: Tensor, values: Tensor, old_logp, old_values, adv, returns, mask,
               clip_ratio: float = 0.2, value_clip: float = 0.2):
    """Clipped surrogate and clipped value loss, token-level means over mask (B, L).

    logp: (B, L) log pi_theta(y_t) (Tensor); values: (B, L) V_phi (Tensor); old_logp,
    old_values, adv, returns: (B, L) arrays from the rollout. -> pg_loss, vf_loss, stats.
      ratio = exp(logp - old_logp)
      pg = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))         (PPO, eq. 7)
      vf = 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))   (37 details, #9)"""
    dt = logp.dtype
    m = np.asarray(mask, dt)
    n = max(float(m.sum()), 1.0)
    A, R = np.asarray(adv, dt), np.asarray(returns, dt)
    old_v = np.asarray(old_values, dt)
    # mask the log-ratio before exp: at padding it is meaningless and could overflow
    log_ratio = (logp - np.asarray(old_logp, dt)) * m
    ratio = log_ratio.exp()
    pg = E.maximum(ratio * -A, ratio.clip(1.0 - clip_ratio, 1.0 + clip_ratio) * -A)
    pg_loss = (pg * m).sum() * (1.0 / n)
    v_clipped = (values - old_v).clip(-value_clip, value_clip) + old_v
    vf = E.maximum((values - R) ** 2, (v_clipped - R) ** 2)
    vf_loss = (vf * m).sum() * (0.5 / n)
    r, lr_, valid = ratio.data, log_ratio.data, m > 0
    stats = {"pg_loss": float(pg_loss.data), "value_loss": float(vf_loss.data),
             # k3 estimate of KL(old || new) (37 details, #12; http://joschu.net/blog/kl-approx.html)
             "approx_kl": float((((r - 1) - lr_) * m).sum() / n),
             "clip_frac": float(((np.abs(r - 1) > clip_ratio) * m).sum() / n),
             "ratio_min": float(r[valid].min()) if valid.any() else 1.0,
             "ratio_max": float(r[valid].max()) if valid.any() else 1.0,
             "value_clip_frac": float(((np.abs(values.data - old_v) > value_clip) * m).sum() / n)}
    return pg_loss, vf_loss, stats


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


def _used_columns(mask, rows) -> int:
    """Columns up to the last reply token among `rows`; the rest is padding for all of them."""
    return int(np.flatnonzero(mask[rows].any(0)).max()) + 1


@dataclass
class Experience:
    """One episode's rollout, laid out (B, L) like rollout.build_batch, plus the minibatch plan."""
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    old_values: np.ndarray
    adv: np.ndarray
    returns: np.ndarray
    stats: dict
    plan: list            # row-index arrays, one per minibatch step, epoch by epoch


# ----------------------------------------------------------------------------------------
# the trainer


class PPOTrainer:
    """PPO on a policy (trained in place) against a frozen reward model.

    ref_model: frozen reference (default: a copy of the policy as passed in); critic
    (default: ValueModel.from_reward_model). `config` is the model config (seed API; unused)."""

    def __init__(self, policy_model: GPT, reward_model: RewardModel, tokenizer, config=None,
                 rlhf_config: RLHFConfig | None = None, ref_model: GPT | None = None,
                 critic: ValueModel | None = None, logger=None, show_progress: bool = False, seed: int = 0):
        self.cfg = rlhf_config or RLHFConfig()
        self.cfg.validate()
        self.policy = disable_dropout(policy_model)
        self.ref = disable_dropout(ref_model if ref_model is not None else copy.deepcopy(policy_model))
        # frozen: ref and rm are only ever run under no_grad and are not in the optimizer
        # (requires_grad=False would hide their weights from state_dict / dtype)
        self.rm = reward_model.eval()
        self.ref.eval()
        self.critic = disable_dropout(critic if critic is not None else ValueModel.from_reward_model(reward_model))
        self.model = PolicyAndValue(self.policy, self.critic)
        self.tok, self.logger, self.show_progress, self.seed = tokenizer, logger, show_progress, seed
        self.kl_ctl = AdaptiveKLController(self.cfg.kl_coef, self.cfg.target_kl, self.cfg.kl_horizon)
        self.prompts, self._order, self._pos = [], [], 0
        self.episode, self.exp = 0, None
        self.refusal_ok = set()      # prompts whose refusal is not penalised (harmful requests)
        self.guard = None            # a ChatGuard: chat evaluation every cfg.chat_eval_every episodes
        self._updates = []           # metrics of each update so far (what train returns on an early stop)

    # -- 1-4: rollout, rewards, advantages ------------------------------------------------
    def _next_prompts(self, rng) -> list[str]:
        """prompts_per_episode prompts, epochs without replacement over a reshuffled order."""
        out = []
        while len(out) < self.cfg.prompts_per_episode:
            if self._pos >= len(self._order):
                self._order, self._pos = list(rng.permutation(len(self.prompts))), 0
            out.append(self.prompts[self._order[self._pos]])
            self._pos += 1
        return out

    def collect(self, rng) -> Experience:
        """Sample one episode and compute everything PPO needs from it (no graph)."""
        c = self.cfg
        prompts = self._next_prompts(rng)
        ro = rollout(self.policy, self.tok, prompts, temperature=c.temperature, max_new_tokens=c.max_new_tokens, rng=rng)
        x, y, m = ro.x, ro.y, ro.action_mask
        B = len(x)
        # the minibatch plan of all K epochs; old log-probs are computed in the chunks of the
        # first epoch, so the first training forward repeats that computation bit for bit
        plan = [chunk for _ in range(c.ppo_epochs)
                for chunk in np.array_split(rng.permutation(B), c.minibatches)]
        old_logp, ref_logp, values = (np.zeros(x.shape, np.float64) for _ in range(3))
        for rows in plan[:c.minibatches]:
            n = _used_columns(m, rows)
            xs, ys = x[rows, :n], y[rows, :n]
            old_logp[rows, :n] = logprobs_no_grad(self.policy, xs, ys, c.temperature)
            ref_logp[rows, :n] = logprobs_no_grad(self.ref, xs, ys, c.temperature)
            with E.no_grad():
                values[rows, :n] = self.critic.values(xs).data
        old_logp, ref_logp, values = old_logp * m, ref_logp * m, values * m
        scores = rm_scores(self.rm, ro)
        # shaping: replies that loop, refuse a benign prompt or comply with a harmful one pay (logged apart)
        penalty, looped, refused = reply_penalties(ro.texts, prompts, c.loop_penalty, c.refusal_penalty,
                                                   self.refusal_ok, c.comply_penalty)
        # 3) rewards, 4) advantages and returns
        beta = self.kl_ctl.value
        kl = old_logp - ref_logp                                    # (B, L), 0 off the mask
        rewards, final = token_rewards(scores - penalty, ro.finished, kl, ro.last_index, beta, c.unfinished_penalty)
        adv, returns = gae(rewards, values, m, c.gamma, c.lam)
        adv = masked_whiten(adv, m)
        kl_seq = kl.sum(1)
        lens = m.sum(1)
        stats = {"episode": self.episode, "score": float(scores.mean()), "kl": float(kl_seq.mean()),
                 "rlhf_reward": float((final - beta * kl_seq).mean()), "kl_coef": beta,
                 "eos_rate": float(ro.finished.mean()), "reply_len": float(lens.mean()),
                 "penalty": float(penalty.mean()), "loop_share": float(looped.mean()),
                 "refusal_share": float(refused.mean()), "explained_var": explained_variance(values, returns, m)}
        self.kl_ctl.update(stats["kl"], B)
        dt = self.policy.dtype
        return Experience(x, y, m.astype(dt), old_logp.astype(dt), values.astype(dt), adv.astype(dt),
                          returns.astype(dt), stats, plan)

    # -- 5: the loop's two callbacks ------------------------------------------------------
    def get_batch(self, rng):
        """The next minibatch; a new rollout when the current one is used up."""
        if self.exp is None or not self.exp.plan:
            every = self.cfg.chat_eval_every
            if self.guard is not None and every and self.episode and self.episode % every == 0:
                self.watch()
            self.exp = self.collect(rng)
            self.episode += 1
        e = self.exp
        rows = e.plan.pop(0)
        n = _used_columns(e.mask, rows)                                 # drop columns that are padding for all rows
        return {"x": e.x[rows, :n], "y": e.y[rows, :n], "mask": e.mask[rows, :n], "old_logp": e.old_logp[rows, :n],
                "old_values": e.old_values[rows, :n], "adv": e.adv[rows, :n], "returns": e.returns[rows, :n],
                "stats": e.stats}

    def loss_fn(self, model: PolicyAndValue, mb):
        """Clipped surrogate + vf_coef * clipped value loss on one minibatch -> (loss, metrics)."""
        c = self.cfg
        logits, _ = model.policy(mb["x"])
        z = logits * (1.0 / c.temperature)                          # the sampled policy: softmax(logits / T)
        logp = -E.cross_entropy(z, mb["y"], reduction="none")      # (b, L), as rollout.token_logprobs
        values = model.critic.values(mb["x"])                       # (b, L)
        pg_loss, vf_loss, st = ppo_losses(logp, values, mb["old_logp"], mb["old_values"], mb["adv"],
                                          mb["returns"], mb["mask"], c.clip_ratio, c.value_clip)
        loss = pg_loss + vf_loss * c.vf_coef
        st["entropy"] = entropy(z.data, mb["mask"])
        self._updates.append({**mb["stats"], **st, "loss": float(loss.data)})
        return loss, {**mb["stats"], **st, "tokens": int(mb["x"].size)}

    def watch(self) -> dict:
        """One chat evaluation by the guard, with the last rollout's RM score and KL beside it;
        raises GuardStop on reward hacking (when the guard is enabled)."""
        beside = {k: self.exp.stats[k] for k in ("score", "kl", "penalty")} if self.exp is not None else {}
        step = self.episode * self.cfg.ppo_epochs * self.cfg.minibatches
        rec = self.guard.check(step, self.episode, **{f"rollout_{k}": v for k, v in beside.items()})
        if self.guard.stop:
            raise GuardStop(f"episode {self.episode}: reward hacking: {rec['why']}")
        return rec

    def train(self, prompts, save=None, resume=None) -> list[dict]:
        """cfg.num_episodes episodes on `prompts` (user texts). save / resume: as loop.train's.
        -> one metrics dict per minibatch update (episode stats repeated within an episode)."""
        if not prompts:
            raise DataError("rlhf: no prompts to train on")
        self.prompts = list(prompts)
        lcfg = self.cfg.loop_config()
        if resume:   # restart at the episode boundary the saved step belongs to
            self.episode = int(resume["step"]) // (self.cfg.ppo_epochs * self.cfg.minibatches)
        self._updates = []
        try:
            out = train(self.model, lcfg, self.get_batch, self.loss_fn, stage="rlhf", logger=self.logger,
                        save=save, resume=resume, rng=np.random.default_rng(self.seed),
                        show_progress=self.show_progress)
        except GuardStop as e:      # stop early on the best weights; they become the final checkpoint
            self.guard.restore(f"stopped early at {e}")
            if self.logger:
                self.logger.log("rlhf", len(self._updates), chat_guard=self.guard.reason)
            if save:
                save("final", len(self._updates), None, None)
            self.exp = None
            return self._updates
        self.exp = None
        return out["history"]

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, prompts, samples: int | None = None, model: GPT | None = None, seed: int | None = None) -> dict:
        """Sample `samples` replies per prompt (cfg.temperature, fixed seed: the same draws for
        every model) -> mean RM score, KL to the reference (sum over tokens, per reply), EOS
        rate, share of distinct replies, mean length, and the replies."""
        c = self.cfg
        model = model or self.policy
        n = samples or c.eval_samples
        rng = np.random.default_rng(self.seed + 99 if seed is None else seed)
        per = max(1, c.eval_batch // n)
        scores, kls, finished, lens, texts = [], [], [], [], []
        for i in range(0, len(prompts), per):
            ro = rollout(model, self.tok, prompts[i:i + per], samples=n, temperature=c.temperature,
                         max_new_tokens=c.max_new_tokens, rng=rng)
            lp = logprobs_no_grad(model, ro.x, ro.y, c.temperature)
            lr = logprobs_no_grad(self.ref, ro.x, ro.y, c.temperature)
            kls += list(((lp - lr) * ro.action_mask).sum(1))
            scores += list(rm_scores(self.rm, ro))
            finished += list(ro.finished)
            lens += list(ro.action_mask.sum(1))
            texts += ro.texts
        return {"score": float(np.mean(scores)), "score_std": float(np.std(scores)), "kl": float(np.mean(kls)),
                "eos_rate": float(np.mean(finished)), "distinct": len(set(texts)) / len(texts),
                "reply_len": float(np.mean(lens)), "n": len(texts), "texts": texts, "samples_per_prompt": n,
                "scores": np.array(scores), "kls": np.array(kls)}


# ----------------------------------------------------------------------------------------
# the stage


def user_prompts(convs) -> list[str]:
    """The first user turn of each conversation, deduplicated in order (later turns lean on
    their context, so alone they are not fair prompts)."""
    out = (next((m["content"] for m in c if m["role"] == "user"), None) for c in convs)
    return list(dict.fromkeys(p for p in out if p))


def run(ctx) -> dict:
    """RLHF stage for train.py: sft_final + reward_model -> rlhf_final. -> headline figures."""
    c, tok, t0 = ctx.cfg.rlhf, ctx.tokenizer, time.perf_counter()
    c.validate()
    train_convs, val_convs = load_split(ctx.data_dir, "sft", seed=ctx.seed)
    chat_items = chat_eval.load_chat_eval(ctx.data_dir)
    chat_before = chat_test = None
    chat_held_out = {it["prompt"] for it in chat_items or []}
    # every first user turn of the SFT training data (the chat prompts included), less the chat evaluation's
    train_prompts = [p for p in user_prompts(train_convs) if p not in chat_held_out]
    held_in = set(train_prompts)
    val_prompts = [p for p in user_prompts(val_convs) if p not in held_in]
    if not val_prompts:
        raise DataError(f"{ctx.data_dir}: no held-out SFT prompt that is not also a training prompt")
    pick = np.random.default_rng(ctx.seed).permutation(len(val_prompts))[:c.eval_prompts or None]
    val_prompts = [val_prompts[i] for i in sorted(pick)]

    policy, ref = ctx.load_model("sft_final"), ctx.load_model("sft_final")
    rm = ctx.load_model("reward_model", RewardModel)
    rm.tokenizer = tok
    trainer = PPOTrainer(policy, rm, tok, ctx.cfg.model, c, ref_model=ref, logger=ctx.logger,
                         show_progress=ctx.show_progress, seed=ctx.seed)
    trainer.refusal_ok = refusal_prompts(train_convs)        # harmful requests: refusing them is right
    if chat_items is not None:
        chat_dev, chat_test = chat_eval.dev_test_split(chat_items)     # the guard selects on dev; reports are on test
        trainer.guard = ChatGuard(policy, rm, tok, chat_eval.subset(chat_dev, c.chat_eval_items),
                                  drop=c.chat_guard_drop, rise=c.chat_guard_rise, enabled=c.chat_guard,
                                  max_new_tokens=c.chat_eval_tokens, logger=ctx.logger)
    resume = load_resume(ctx, trainer.model, "rlhf")
    # rlhf_last holds policy + critic (to resume); rlhf_final the policy alone, a plain GPT
    save_last = make_saver(ctx, trainer.model, "rlhf", "rlhf_final")
    save_final = make_saver(ctx, policy, "rlhf", "rlhf_final", extra={"episodes": c.num_episodes})

    def save(kind, step, opt, rng):
        (save_final if kind == "final" else save_last)(kind, step, opt, rng)

    te = time.perf_counter()
    before = trainer.evaluate(val_prompts, model=ref)              # the SFT model, same draws as after
    guard = trainer.guard
    if guard:
        guard.check(0, 0)                                          # the baseline, and the best so far
        chat_before = chat_eval.evaluate_chat(ref, tok, chat_test, max_new_tokens=c.chat_eval_tokens, batch=32)
    tt = time.perf_counter()
    history = trainer.train(train_prompts, save=save, resume=resume)
    train_time = time.perf_counter() - tt
    chat_after = None
    if guard and not guard.reason:                                 # (stopped early: best weights already back)
        last = guard.check(len(history), trainer.episode)
        if c.chat_guard and last["verdict"] in ("worse", "hacking"):
            guard.restore(f"the final weights chat worse than the best ({last['why']})")
            ctx.logger.log("rlhf", len(history), chat_guard=guard.reason)
            save_final("final", len(history), None, None)
    if guard:
        chat_after = chat_eval.evaluate_chat(policy, tok, chat_test, max_new_tokens=c.chat_eval_tokens, batch=32)
        ctx.logger.log("rlhf", len(history), **chat_eval.flat(chat_before, "chat_test_before_"),
                       **chat_eval.flat(chat_after, "chat_test_after_"))
    after = trainer.evaluate(val_prompts)
    eval_time = time.perf_counter() - te - train_time
    ctx.logger.log("rlhf", len(history), **{f"val_{w}_{k}": v for w, e in (("before", before), ("after", after))
                                             for k, v in e.items() if isinstance(v, float)})
    # the run report's plotter (train.py redraws it with every stage at the end of the run)
    plot = plot_stage("rlhf", ctx.logger.read_metrics("rlhf"), ctx.logger.dir) if history else None
    n = before["samples_per_prompt"]
    # paired by prompt: the standard error of the mean per-prompt gain
    gain = (after["scores"] - before["scores"]).reshape(-1, n).mean(1)
    gain_se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("nan")
    samples = [{"prompt": p, "before": before["texts"][i * n], "after": after["texts"][i * n]}
               for i, p in enumerate(val_prompts[:c.n_show])]
    headline = (f"held-out RM score {before['score']:+.2f} -> {after['score']:+.2f} (gain SE {gain_se:.2f}), "
                f"KL to SFT {after['kl']:.2f} nats/reply, EOS {after['eos_rate']:.0%}, distinct {after['distinct']:.0%}")
    chat_figures = {}
    if chat_after is not None:       # the headline leads with what a user would notice
        headline = f"{chat_eval.change_headline(chat_before, chat_after)}; {headline}"
        if guard.reason:
            headline += f"; guard: {guard.reason}"
        samples += chat_eval.samples(chat_before, chat_after, n=8)
        chat_figures = {**chat_eval.flat(chat_before, "chat_before_"), **chat_eval.flat(chat_after, "chat_after_"),
                        "chat_test_items": len(chat_test),
                        "chat_dev_rm_score_before": guard.history[0]["rm_score"], "chat_dev_rm_score_best": guard.best["rm_score"],
                        "chat_guard": guard.reason or "kept the final weights", "chat_best_episode": guard.best_episode,
                        "chat_evaluations": len(guard.history)}
    return {"headline": headline,
            "score_before": before["score"], "score_after": after["score"], "score_gain_se": gain_se,
            "kl_before": before["kl"], "kl_after": after["kl"],
            "eos_rate_before": before["eos_rate"], "eos_rate_after": after["eos_rate"],
            "distinct_before": before["distinct"], "distinct_after": after["distinct"],
            "reply_len_before": before["reply_len"], "reply_len_after": after["reply_len"],
            "eval_prompts": len(val_prompts), "eval_samples_per_prompt": n, "train_prompts": len(train_prompts),
            "episodes": c.num_episodes, "updates": len(history), "kl_coef_end": trainer.kl_ctl.value,
            "plot": str(plot) if plot else "skipped (matplotlib not installed)", "train_time_s": train_time,
            "eval_time_s": eval_time,
            "time_s": time.perf_counter() - t0, "samples": samples, **chat_figures}
