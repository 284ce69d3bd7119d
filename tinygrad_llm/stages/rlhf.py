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
those replies higher, training stops and the best weights are kept; at the end, ChatGuard.settle.

The minibatch steps run in the one training loop (loop.train): get_batch() pops the next
minibatch and makes a new rollout whenever the episode's minibatches are used up.

Under `mpiexec -n N` each rank samples the replies to its row_range of the episode's prompts
(prompts, plan and sampling key drawn from the shared RNG; each reply its own RNG, policy.row_rngs),
the whitening and the episode's figures use every rank's rows, and each rank trains on its
rows of every minibatch, weighted by their share of its reply tokens: N ranks train what one
process does. The chat guard and the evaluations run on every rank.

    trainer = PPOTrainer(policy, reward_model, tokenizer, model_config, RLHFConfig(clip_ratio=0.2, kl_coef=0.1))
    history = trainer.train(prompts)                 # one metrics dict per minibatch update
    trainer.evaluate(held_out_prompts)               # mean RM score, KL to SFT, EOS rate, distinct share
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .. import chat_eval
from .. import engine as E
from ..config import ConfigError
from ..data import DataError
from ..distributed import concat_ranks, row_range, world
from ..loop import train
from ..model import GPT
from ..report import plot_stage
from .chat_guard import ChatGuard, GuardStop, refusal_prompts, reply_penalties
from .common import Stage, load_resume, make_saver
from .policy import (EpochOrder, RLConfig, disable_dropout, frozen, kl_k1, local_rows, log_before_after,
                     logprobs_no_grad, minibatch_plan, prompt_split, rollout, row_rngs, same_weights, used_columns)
from .ppo import (MEAN_METRICS, AdaptiveKLController, Experience, PolicyAndValue, ValueModel, entropy,
                  episode_stats, gae, masked_whiten, ppo_losses, rm_scores, score_replies, token_rewards)
from .reward_model import RewardModel

__all__ = ["RLHFConfig", "PPOTrainer", "ValueModel", "PolicyAndValue", "AdaptiveKLController", "STAGE",
           "TINY_OVERRIDES", "gae", "masked_whiten", "rm_scores", "token_rewards", "ppo_losses", "disable_dropout", "run"]


@dataclass
class RLHFConfig(RLConfig):
    # the seed's fields
    clip_ratio: float = 0.2          # PPO's epsilon
    kl_coef: float = 0.1             # beta (seed: 0.01); 0.1 keeps the mini policy within ~5 nats/reply of SFT
    num_episodes: int = 10         # 10 x 16 prompts; on the bundled RM longer runs lowered the chat figures (bench/README.md)
    # rollout
    prompts_per_episode: int = 16
    temperature: float = 0.7         # sampling temperature T; the policy optimised is softmax(logits / T)
    max_new_tokens: int = 96
    unfinished_penalty: float = 2.0  # subtracted from the score of a reply that never closes with <|im_end|>
    # PPO update (min_lr_ratio, weight_decay, grad_clip, ckpt_every: RLConfig)
    ppo_epochs: int = 4              # K passes over each rollout
    minibatch_size: int = 8
    lr: float = 2e-5
    warmup_steps: int = 8            # in minibatch steps
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
    # reward shaping against the failures users see (chat_guard.reply_penalties; 0 = off)
    loop_penalty: float = 1.0        # subtracted from the score of a rollout reply that loops (chat_eval.is_loop)
    refusal_penalty: float = 1.0     # ... that refuses a prompt whose SFT reply does not refuse (is_refusal)
    comply_penalty: float = 1.0      # ... that does not refuse a prompt whose SFT reply refuses (harmful)
    # the chat evaluation (data/chat_eval.json) and the reward-hacking guard (chat_guard.ChatGuard)
    chat_eval_every: int = 10        # episodes between chat evaluations (0: before and after only)
    chat_eval_tokens: int = 96       # greedy reply length
    chat_eval_items: int = 0         # 0 = every item
    chat_guard: bool = True          # stop and roll back to the best weights on reward hacking
    chat_guard_drop: float = 0.0     # how far the acceptable share may fall below the best, and ...
    chat_guard_rise: float = 0.0     # ... the refusal / loop shares rise above it (0: keep the best dev weights, SFT's too)

    def validate(self):
        if self.num_episodes < 0 or self.prompts_per_episode <= 0 or self.minibatch_size <= 0 or self.ppo_epochs <= 0:
            raise ConfigError("rlhf: num_episodes >= 0; prompts_per_episode, minibatch_size, ppo_epochs > 0")
        if not (0 < self.clip_ratio < 1 and self.lr > 0 and self.temperature > 0 and self.max_new_tokens > 0):
            raise ConfigError("rlhf: need 0 < clip_ratio < 1, lr > 0, temperature > 0, max_new_tokens > 0")
        if min(self.loop_penalty, self.refusal_penalty, self.comply_penalty, self.chat_guard_drop,
               self.chat_guard_rise, self.chat_eval_every) < 0 or self.chat_eval_tokens <= 0:
            raise ConfigError("rlhf: penalties and chat_guard_drop / _rise >= 0, chat_eval_every >= 0, "
                              "chat_eval_tokens > 0")

    @property
    def minibatches(self) -> int:
        return math.ceil(self.prompts_per_episode / self.minibatch_size)

    @property
    def steps_per_episode(self) -> int:
        return self.ppo_epochs * self.minibatches


TINY_OVERRIDES = {"num_episodes": 2, "prompts_per_episode": 4, "minibatch_size": 2, "ppo_epochs": 2,
                  "max_new_tokens": 12, "warmup_steps": 0, "eval_prompts": 4, "eval_samples": 2, "n_show": 2,
                  "chat_eval_every": 1, "chat_eval_tokens": 12, "chat_eval_items": 4}


# ----------------------------------------------------------------------------------------
# the trainer


class PPOTrainer:
    """PPO on a policy (trained in place) against a frozen reward model.

    ref_model: frozen reference (default: a copy of the policy as passed in); critic
    (default: ValueModel.from_reward_model). `config` is the model config the seed passes
    (the models carry their own; not used)."""

    def __init__(self, policy_model: GPT, reward_model: RewardModel, tokenizer, config=None,
                 rlhf_config: RLHFConfig | None = None, ref_model: GPT | None = None,
                 critic: ValueModel | None = None, logger=None, show_progress: bool = False, seed: int = 0):
        self.cfg = rlhf_config or RLHFConfig()
        self.cfg.validate()
        self.policy = disable_dropout(policy_model)
        self.ref = frozen(policy_model, copy_weights=True) if ref_model is None else frozen(ref_model)
        self.rm = reward_model.eval()              # frozen too (its dropout is off by construction)
        self.critic = disable_dropout(critic if critic is not None else ValueModel.from_reward_model(reward_model))
        self.model = PolicyAndValue(self.policy, self.critic)
        self.tok, self.logger, self.show_progress, self.seed = tokenizer, logger, show_progress, seed
        self.kl_ctl = AdaptiveKLController(self.cfg.kl_coef, self.cfg.target_kl, self.cfg.kl_horizon)
        self.prompts, self.order = [], EpochOrder()
        self.episode, self.exp = 0, None
        self.refusal_ok = set()      # prompts whose refusal is not penalised (harmful requests)
        self.guard = None            # a ChatGuard: chat evaluation every cfg.chat_eval_every episodes
        self._updates = []           # metrics of each update so far (what train returns on an early stop)

    # -- 1-4: rollout, rewards, advantages ------------------------------------------------
    def collect(self, rng) -> Experience:
        """Sample one episode and compute everything PPO needs from it (no graph). Under MPI each
        rank samples its row_range of the episode's prompts (drawn, like the plan, from the shared
        RNG); the whitening and the logged figures use every rank's rows."""
        c, dist, P = self.cfg, world(), self.cfg.prompts_per_episode
        prompts = [self.prompts[self.order.next(rng, len(self.prompts))] for _ in range(P)]
        key = int(rng.integers(2 ** 63))                  # the episode's sampling seed (policy.row_rngs)
        # the minibatch plan of all K epochs over the episode's P rows
        plan = minibatch_plan(rng, P, c.ppo_epochs, c.minibatches)
        lo, hi = row_range(P, dist.rank, dist.size)
        prompts = prompts[lo:hi]
        ro = rollout(self.policy, self.tok, prompts, temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                     rng=row_rngs(key, range(lo, hi), 1))
        x, y, m = ro.x, ro.y, ro.action_mask
        # old log-probs are computed in this rank's chunks of the first epoch, so the first
        # training forward repeats that computation bit for bit
        old_logp, ref_logp, values = (np.zeros(x.shape, np.float64) for _ in range(3))
        for rows in (local_rows(r, lo, hi) for r in plan[:c.minibatches]):
            if not len(rows):
                continue
            n = used_columns(m, rows)
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
        kl = kl_k1(old_logp, ref_logp)                              # (B, L), 0 off the mask
        rewards, final = token_rewards(scores - penalty, ro.finished, kl, ro.last_index, beta, c.unfinished_penalty)
        adv, returns = gae(rewards, values, m, c.gamma, c.lam)
        valid = m > 0
        # the whole episode's rows (and valid tokens), in row order, on every rank
        g = concat_ranks(dist, score=scores, kl=kl.sum(1), final=final, finished=ro.finished, lens=m.sum(1),
                         penalty=penalty, looped=looped, refused=refused, adv=adv[valid], values=values[valid],
                         returns=returns[valid])
        adv = masked_whiten(adv, m, pool=g["adv"])
        stats = {"episode": self.episode, **episode_stats(g, beta)}
        self.kl_ctl.update(stats["kl"], P)
        dt = self.policy.dtype
        return Experience(x, y, m.astype(dt), old_logp.astype(dt), values.astype(dt), adv.astype(dt),
                          returns.astype(dt), stats, plan, (lo, hi), g["lens"])

    # -- 5: the loop's callbacks ----------------------------------------------------------
    def get_batch(self, rng):
        """The next minibatch (this rank's rows of it, under MPI); a new rollout when the current
        one is used up."""
        if self.exp is None or not self.exp.plan:
            every = self.cfg.chat_eval_every
            if self.guard is not None and every and self.episode and self.episode % every == 0:
                self.watch()
            self.exp = self.collect(rng)
            self.episode += 1
        e = self.exp
        plan_rows = e.plan.pop(0)
        rows = local_rows(plan_rows, *e.rows)
        if not len(rows):                 # none of this minibatch's rows is this rank's (MPI)
            return {"stats": e.stats, "share": 0.0}
        n = used_columns(e.mask, rows)                                 # drop columns that are padding for all rows
        return {"x": e.x[rows, :n], "y": e.y[rows, :n], "mask": e.mask[rows, :n], "old_logp": e.old_logp[rows, :n],
                "old_values": e.old_values[rows, :n], "adv": e.adv[rows, :n], "returns": e.returns[rows, :n],
                "stats": e.stats,
                # the losses are means over the minibatch's reply tokens: this rank's share of them
                "share": float(e.mask[rows].sum()) / float(e.reply_tokens[plan_rows].sum())}

    @staticmethod
    def shard(mb, rank: int, size: int):
        """loop.train's shard under MPI: get_batch already holds only this rank's rows -> (them, their share)."""
        return mb, mb["share"]

    def loss_fn(self, model: PolicyAndValue, mb):
        """Clipped surrogate + vf_coef * clipped value loss on one minibatch -> (loss, metrics);
        (None, zero metrics) on a rank with no row of it (MPI)."""
        c = self.cfg
        if "x" in mb:
            logits, _ = model.policy(mb["x"])
            z = logits * (1.0 / c.temperature)                          # the sampled policy: softmax(logits / T)
            logp = -E.cross_entropy(z, mb["y"], reduction="none")      # (b, L), as policy.token_logprobs
            values = model.critic.values(mb["x"])                       # (b, L)
            pg_loss, vf_loss, st = ppo_losses(logp, values, mb["old_logp"], mb["old_values"], mb["adv"],
                                              mb["returns"], mb["mask"], c.clip_ratio, c.value_clip)
            loss = pg_loss + vf_loss * c.vf_coef
            st["entropy"] = entropy(z.data, mb["mask"])
            tokens = int(mb["x"].size)
        else:
            loss, tokens = None, 0
            st = {**dict.fromkeys(MEAN_METRICS, 0.0), "ratio_min": math.inf, "ratio_max": -math.inf}
        # the ratio's range over the whole minibatch: a min and a max, which the Allreduce's sum cannot give
        ranges = world().gather((st.pop("ratio_min"), st.pop("ratio_max")))
        shared = {**mb["stats"], "ratio_min": min(a for a, _ in ranges), "ratio_max": max(b for _, b in ranges)}
        self._updates.append({**shared, **st, "loss": float(loss.data) if loss is not None else 0.0})
        return loss, {**st, "tokens": tokens, "shared": shared}

    def watch(self) -> dict:
        """One chat evaluation by the guard, with the last rollout's RM score and KL beside it;
        raises GuardStop on reward hacking (when the guard is enabled)."""
        beside = {k: self.exp.stats[k] for k in ("score", "kl", "penalty")} if self.exp is not None else {}
        step = self.episode * self.cfg.steps_per_episode
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
        c, dist = self.cfg, world()
        if dist.size > c.prompts_per_episode:
            raise ConfigError(f"rlhf: {c.prompts_per_episode} prompts per episode cannot be split over {dist.size} "
                              "processes (each samples at least one)")
        if resume:   # restart at the episode boundary the saved step belongs to
            self.episode = int(resume["step"]) // c.steps_per_episode
        self._updates = []
        try:
            out = train(self.model, c.loop_config(c.num_episodes * c.steps_per_episode, c.prompts_per_episode),
                        self.get_batch, self.loss_fn, stage="rlhf", logger=self.logger, save=save, resume=resume,
                        rng=np.random.default_rng(self.seed), show_progress=self.show_progress, shard=self.shard)
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
        """ppo.score_replies() of `model` (default: the policy) with this trainer's sampling settings
        and a fixed seed (the same draws for every model)."""
        c, model = self.cfg, model or self.policy
        rng = np.random.default_rng(self.seed + 99 if seed is None else seed)
        return score_replies(model, self.ref, self.rm, self.tok, prompts, samples or c.eval_samples, rng,
                             temperature=c.temperature, max_new_tokens=c.max_new_tokens, batch=c.eval_batch)


# ----------------------------------------------------------------------------------------
# the stage


def run(ctx) -> dict:
    """RLHF stage for train.py: sft_final + reward_model -> rlhf_final. -> headline figures."""
    c, tok, t0 = ctx.cfg.rlhf, ctx.tokenizer, time.perf_counter()
    c.validate()
    train_convs, train_prompts, val_prompts = prompt_split(ctx.data_dir, ctx.seed, c.eval_prompts)
    chat_items = chat_eval.load_chat_eval(ctx.data_dir)
    chat_before = chat_test = None

    sft, reward_model = STAGE.reads
    policy, ref = ctx.load_model(sft), ctx.load_model(sft)
    rm = ctx.load_model(reward_model, RewardModel)
    rm.tokenizer = tok                                      # lm_coef: from the checkpoint (load_extra)
    trainer = PPOTrainer(policy, rm, tok, ctx.cfg.model, c, ref_model=ref, logger=ctx.logger,
                         show_progress=ctx.show_progress, seed=ctx.seed)
    trainer.refusal_ok = refusal_prompts(train_convs)        # harmful requests: refusing them is right
    if chat_items is not None:
        chat_dev, chat_test = chat_eval.dev_test_split(chat_items)     # the guard selects on dev; reports are on test
        trainer.guard = ChatGuard(policy, rm, tok, chat_eval.subset(chat_dev, c.chat_eval_items),
                                  drop=c.chat_guard_drop, rise=c.chat_guard_rise, enabled=c.chat_guard,
                                  max_new_tokens=c.chat_eval_tokens, logger=ctx.logger)
    resume = load_resume(ctx, trainer.model, STAGE.name)
    # rlhf_last holds policy + critic (to resume); rlhf_final the policy alone, a plain GPT
    save_last = make_saver(ctx, trainer.model, STAGE)
    save_final = make_saver(ctx, policy, STAGE, extra={"episodes": c.num_episodes})

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
        reason = guard.settle(guard.check(len(history), trainer.episode))
        if reason:
            guard.restore(reason)
            ctx.logger.log("rlhf", len(history), chat_guard=guard.reason)
            save_final("final", len(history), None, None)
    same = guard is not None and bool(guard.reason) and same_weights(policy, ref)   # rolled back to SFT: after = before
    if guard:
        chat_after = chat_before if same else chat_eval.evaluate_chat(policy, tok, chat_test, c.chat_eval_tokens, 32)
        ctx.logger.log("rlhf", len(history), **chat_eval.flat(chat_before, "chat_test_before_"),
                       **chat_eval.flat(chat_after, "chat_test_after_"))
    after = before if same else trainer.evaluate(val_prompts)
    eval_time = time.perf_counter() - te - train_time
    log_before_after(ctx.logger, STAGE.name, len(history), before, after)
    # the run report's plotter (train.py redraws it with every stage at the end of the run)
    plot = plot_stage("rlhf", ctx.logger.read_metrics("rlhf"), ctx.logger.dir) if history and world().is_main else None
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
                        "chat_test_items": len(chat_test), **guard.figures()}
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


STAGE = Stage("rlhf", reads=("sft_final", "reward_model"), writes="rlhf_final", config=RLHFConfig,
              tiny=TINY_OVERRIDES, run=run, data_parallel=True)
