"""Stage 5, RLVF: reinforcement learning from verifiable rewards with GRPO.

For every task the policy samples a *group* of G replies; a verifier (verifiers.py) marks
each right or wrong, and each reply's advantage is its reward relative to its own group,
A_i = (r_i - mean(r)) / (std(r) + eps), broadcast over the reply's tokens. No value model,
no reward model (reference: DeepSeekMath, Shao et al. 2024, section 4.1 "GRPO"). The loss
is PPO's clipped surrogate (policy.clipped_surrogate) with these group advantages, plus
kl_coef * KL to the frozen SFT model measured by Schulman's k3 estimator (policy.kl_k3),
averaged over all reply tokens of the batch, and no critic. `dr_grpo=True` drops the std division, which biases updates toward
groups with low reward variance (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
Training"); our token-level average already removes GRPO's per-reply length normalisation.

The seed's `samples_per_task=2` is raised to 8 by default: a group of 2 has signal only
when exactly one reply is right (then its advantages are always +-1, whatever the task's
difficulty), so a task solved 10% of the time gives signal in 18% of its groups with G = 2
but in 57% with G = 8, and most of the sampling time with G = 2 teaches nothing.

Only groups with unequal rewards are put through the update (the others have A = 0 and
would add KL gradient only); their share is logged as zero_var_share. Dropout is off in
this stage, so the sampler and the loss see one function and the first PPO ratio is 1.

The steps run in the one training loop (loop.train), as PPO's do: get_batch samples a group
per task when the plan is used up and plans inner_epochs steps on the groups with signal (a
step with none makes no update); loss_fn is the clipped surrogate and the KL.

Under `mpiexec -n N` each rank samples whole groups (its row_range of the iteration's tasks,
which the shared RNG draws alike on every rank), each reply with its own RNG seeded by
(iteration key, group, member), so the replies do not depend on N; the rewards are gathered
for the curriculum and the logged means, each rank's loss is weighted by its share of the
batch's reply tokens, and the loop's one Allreduce sums the gradients: N ranks train what one
process does. Evaluations run on every rank (the same weights give the same figures).

What to expect: RL sharpens what the SFT model can already do sometimes. Greedy accuracy
can rise at most toward pass@k of the starting model (the share of tasks it solves in k
samples), so evaluate() reports pass@1 / pass@4 beside greedy accuracy: if pass@4 is barely
above greedy accuracy, the SFT model (or the task set) is the bottleneck, not this stage.
It also reports greedy accuracy on a fixed sample of its training tasks (train_eval_tasks): what
RL sharpens where it trains, beside what carries over (bench/README.md, "What RLVF sharpens").

    trainer = RLVFTrainer(model, tokenizer, model_config, RLVFConfig())   # model_config: the seed's; unused
    history = trainer.train(tasks, batch_size=4)
    print(trainer.evaluate(test_tasks)["accuracy"])
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .. import chat_eval
from ..config import ConfigError, renamed
from ..data import load_split, pad_batch, sft_examples
from ..distributed import concat_ranks, row_range, world
from ..engine import Tensor
from ..logprobs import masked_loss
from ..loop import train
from ..report import plot_stage
from .common import Stage, chat_eval_after, load_resume, make_saver
from .policy import (RLConfig, TaskSampler, build_batch, clip_fraction, clipped_surrogate, disable_dropout, frozen,
                     kl_k3, log_before_after, logprobs_no_grad, masked_mean, rollout, row_rngs, same_weights,
                     token_logprobs)
from .task_eval import PASS_KS, evaluate_tasks, pass_at_k
from .verifiers import LogicVerifier, MathVerifier, states_answer, step_credit, verify_task

__all__ = ["RLVFConfig", "RLVFTrainer", "MathVerifier", "LogicVerifier", "STAGE", "TINY_OVERRIDES",
           "evaluate_tasks", "group_advantages", "grpo_loss", "pass_at_k", "step_credit", "task_rewards", "TaskSampler", "run"]

@renamed(beta="kl_coef", clip_eps="clip_ratio", warmup_iters="warmup_steps")   # this stage's names until 2026-12
@dataclass
class RLVFConfig(RLConfig):
    # the seed's fields
    correct_reward: float = 1.0
    incorrect_reward: float = -0.5
    num_iterations: int = 90         # 30 moved the held-out tasks by -1 on two seeds, 90 by +4 and +3 (bench/README.md,
                                     # "RLVF, longer"); 180 in the diagnostic reached +5 to +6 and stayed there
    samples_per_task: int = 8        # group size G (seed: 2, too little signal, see module doc)
    # sampling
    tasks_per_iter: int = 16         # tasks (groups) per iteration; train(batch_size=...) overrides
    curriculum: bool = True          # favour task kinds the policy solves sometimes (TaskSampler)
    curriculum_floor: float = 0.05   # every kind keeps at least this weight
    temperature: float = 1.0         # sampling temperature; the loss optimises softmax(logits / T)
    max_new_tokens: int = 80         # the longest house-style reply (a worked subtraction) is 73 characters
    # rewards
    format_reward: float = 0.1       # bonus for closing with <|im_end|> and a parseable answer; 0 = off
    step_reward: float = 0.5         # partial credit x the share of true worked steps (step_credit; bench "Partial credit")
    # GRPO update (lr, warmup_steps, ...: RLConfig)
    lr: float = 3e-5                 # mini model: 1e-4 / 2e-4 cost 5 held-out points in 30 iterations, 6e-5 cost 5 in 60
    warmup_steps: int = 3            # optimizer steps (one per iteration while inner_epochs is 1)
    inner_epochs: int = 1            # gradient steps per batch of samples (GRPO's mu)
    clip_ratio: float = 0.2          # PPO ratio clip; inactive when inner_epochs == 1 (ratio is 1)
    kl_coef: float = 0.04            # beta, the KL coefficient (DeepSeekMath's value)
    adv_eps: float = 1e-4            # eps in (r - mean) / (std + eps)
    dr_grpo: bool = False            # True: advantages r - mean, no std division
    chat_replay: float = 0.0         # weight of an SFT loss on replay_rows SFT conversations added to every update
                                     # (InstructGPT's PPO-ptx mix), so the chat the stage does not train keeps; 0 = off
                                     # (1 kept the chat and lost the task gain; 0.3 within noise over four pairs:
                                     # bench/README.md, "RLVF: group size, reuse of the samples, temperature")
    replay_rows: int = 8
    # evaluation
    eval_every: int = 0              # iterations between greedy held-out evaluations while training (val_accuracy
                                     # in the curves: what more iterations buy, bench "RLVF, longer"); 0 = before/after only
    eval_samples: int = 4            # sampled replies per task for pass@k (>= max(PASS_KS)); 4: pass@4 = any of 4
    eval_temperature: float = 1.0
    eval_batch: int = 128            # rows per generate() call during evaluation
    train_eval_tasks: int = 240      # greedy accuracy on this many *training* tasks too; 0 = off
    n_show: int = 5                  # held-out tasks shown before/after in the summary
    chat_eval_tokens: int = 96       # the chat evaluation of the final model (test half of chat_eval.json)
    chat_eval_items: int = 0         # 0 = every item of it
    init_from: str = "auto"          # "auto": rlhf_final if it exists, else sft_final
    seed: int | None = None          # None: the run's --seed

    def validate(self):
        if self.samples_per_task < 2:
            raise ConfigError("rlvf.samples_per_task must be >= 2: a group of one has no relative advantage")
        if self.eval_samples and self.eval_samples < max(PASS_KS):
            raise ConfigError(f"rlvf.eval_samples must be 0 or >= {max(PASS_KS)} for pass@{max(PASS_KS)}")
        if self.tasks_per_iter <= 0 or self.inner_epochs <= 0 or self.lr <= 0 or \
                min(self.num_iterations, self.train_eval_tasks, self.eval_every, self.chat_replay, self.replay_rows) < 0:
            raise ConfigError("rlvf: tasks_per_iter, inner_epochs, lr > 0; num_iterations, train_eval_tasks, eval_every, "
                              "chat_replay, replay_rows >= 0")
        if self.init_from not in ("auto", "sft_final", "rlhf_final"):
            raise ConfigError(f"rlvf.init_from must be auto, sft_final or rlhf_final, got {self.init_from!r}")


# --config tiny: a handful of small iterations, seconds in all
TINY_OVERRIDES = dict(num_iterations=3, samples_per_task=4, tasks_per_iter=2, max_new_tokens=12, eval_samples=4,
                      n_show=2, train_eval_tasks=4, warmup_steps=0, chat_eval_tokens=12, chat_eval_items=4)


# ----------------------------------------------------------------------------------------
# the pieces: rewards, advantages, loss, pass@k (pure functions, unit-tested)


def task_rewards(tasks, texts, finished, cfg: RLVFConfig):
    """One reward per reply: correct/incorrect from the verifier, plus cfg.format_reward when
    the reply closed with <|im_end|> and stated its answer parseably, plus cfg.step_reward *
    step_credit for math replies. -> rewards (N,), correct (N,) bool, step credit (N,)."""
    correct = np.array([verify_task(t, r) for t, r in zip(tasks, texts)], dtype=bool)
    formatted = np.array([bool(f) and states_answer(t, r) for t, r, f in zip(tasks, texts, finished)], dtype=bool)
    steps = np.array([step_credit(t["prompt"], r) if t["type"] == "math" else 0.0 for t, r in zip(tasks, texts)])
    rewards = (np.where(correct, cfg.correct_reward, cfg.incorrect_reward) + cfg.format_reward * formatted
               + cfg.step_reward * steps)
    return rewards.astype(np.float64), correct, steps


def group_advantages(rewards, group_size: int, eps: float = 1e-4, scale: bool = True):
    """rewards (N * G,) in groups of G consecutive rows -> advantages (N * G,), zero_var (N,).

    A = (r - mean_group) / (std_group + eps) (GRPO, DeepSeekMath eq. 3 with outcome
    supervision; population std); scale=False gives Dr. GRPO's r - mean. A group whose
    rewards are all equal gets A = 0 exactly: it carries no preference between its replies."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)       # (N, G)
    centred = r - r.mean(1, keepdims=True)
    zero_var = np.ptp(r, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):     # eps = 0 on a zero-variance group
        adv = centred / (r.std(1, keepdims=True) + eps) if scale else centred
    adv[zero_var] = 0.0                     # exact zeros, not eps-sized float noise
    return adv.reshape(-1), zero_var


def grpo_loss(logp: Tensor, old_logp, ref_logp, adv, mask, clip_ratio: float = 0.2, kl_coef: float = 0.04):
    """PPO's clipped surrogate with per-reply advantages + kl_coef * k3 KL, averaged over all
    reply tokens of the batch.

    logp: (B, L) Tensor, log pi_theta(y_t); old_logp, ref_logp: (B, L) arrays under the
    sampling policy and the frozen reference; adv: (B,) per-reply advantage, broadcast over
    its tokens; mask: (B, L) 1 on reply tokens. -> (scalar loss Tensor, stats dict).

    per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + kl_coef k3, rho = exp(logp - old_logp),
    k3 = exp(d) - d - 1 with d = ref_logp - logp: an unbiased, low-variance, never negative
    estimate of KL(pi_theta || pi_ref) from samples of pi_theta."""
    dt = logp.dtype
    m = np.asarray(mask, dtype=dt)
    surr, log_ratio = clipped_surrogate(logp, old_logp, np.asarray(adv, dtype=dt)[:, None], m, clip_ratio)
    kl = kl_k3((np.asarray(ref_logp, dt) - logp) * m)                         # (B, L), 0 at padding
    # token-level average over the whole batch (DAPO's choice; Dr. GRPO's point is that a
    # per-reply 1/|o_i| favours long wrong replies)
    loss = masked_mean(kl * kl_coef - surr, m)
    stats = {"kl": float(masked_mean(kl.data, m)), "pg": float(masked_mean(-surr.data, m)),
             "clip_frac": clip_fraction(np.exp(log_ratio.data) - 1, m, clip_ratio)}
    return loss, stats


# ----------------------------------------------------------------------------------------
# the trainer


class RLVFTrainer:
    """GRPO on verifiable tasks. model: the policy (trained in place, dropout off); ref_model:
    the frozen reference for the KL term (default: a copy of `model` as passed in). `config`
    is the model config the seed passes (the model carries its own; not used)."""

    def __init__(self, model, tokenizer, config=None, rlvf_config: RLVFConfig | None = None, ref_model=None,
                 logger=None, show_progress: bool = False, seed: int = 0, replay=None):
        """replay: SFT examples [(ids, mask)] (data.sft_examples) for cfg.chat_replay."""
        self.cfg = rlvf_config or RLVFConfig()
        self.cfg.validate()
        self.policy, self.tok = disable_dropout(model), tokenizer
        self.ref = frozen(model, copy_weights=True) if ref_model is None else frozen(ref_model)
        self.logger, self.show_progress = logger, show_progress
        seed = self.cfg.seed if self.cfg.seed is not None else seed
        self.rng = np.random.default_rng(seed)
        self.eval_seed = seed + 1                  # the same draws before and after training
        self.replay = replay if self.cfg.chat_replay and self.cfg.replay_rows else None
        self.replay_rng = np.random.default_rng(seed + 2)   # the same rows on every rank (MPI)
        self.iteration, self.plan, self.exp = 0, [], None
        self.sampler, self.batch_size = None, self.cfg.tasks_per_iter

    # -- sampling: a group per task, rewards, advantages, the plan ---------------------------
    def collect(self, rng, tasks) -> dict:
        """Sample a group of G replies per task, score them -> the batch the next inner_epochs
        steps train on (the groups with signal) and the iteration's metrics. Under MPI each rank
        samples whole groups, its row_range of the tasks; every figure of the whole batch (the
        curriculum, the means, the loss's denominator) comes from all ranks' rows."""
        c, G, dist = self.cfg, self.cfg.samples_per_task, world()
        key = int(rng.integers(2 ** 63))          # this iteration's sampling seed, from the shared RNG
        lo, hi = row_range(len(tasks), dist.rank, dist.size)
        mine = tasks[lo:hi]
        # rows task-major: task i owns rows i*G ... i*G+G-1, each sampled with its own RNG (row_rngs)
        ro = rollout(self.policy, self.tok, [t["prompt"] for t in mine], samples=G, temperature=c.temperature,
                     max_new_tokens=c.max_new_tokens, rng=row_rngs(key, range(lo, hi), G))
        rewards, correct, steps = task_rewards([t for t in mine for _ in range(G)], ro.texts, ro.finished, c)
        lens = np.array([len(r) for r in ro.replies])
        # the whole batch's rows, in task order, on every rank (one process: these rows as they are)
        rows = concat_ranks(dist, rewards=rewards, correct=correct, steps=steps, finished=ro.finished, lens=lens,
                            logp=[ro.logprobs[b, :n].sum() for b, n in enumerate(lens)])
        adv, zero_var = group_advantages(rows["rewards"], G, c.adv_eps, scale=not c.dr_grpo)
        groups_correct = rows["correct"].reshape(-1, G)
        self.sampler.update(tasks, groups_correct.mean(1))
        stats = {"iteration": self.iteration, "reward": float(rows["rewards"].mean()),
                 "accuracy": float(rows["correct"].mean()), "zero_var_share": float(zero_var.mean()),
                 "reply_len": float(rows["lens"].mean()),
                 # entropy of the sampling policy, Monte-Carlo: E[-log pi(y)] over the sampled tokens
                 "entropy": -float(sum(rows["logp"]) / rows["lens"].sum()),
                 "finished": float(rows["finished"].mean()), "step_credit": float(rows["steps"].mean()),
                 # why groups carry no signal: all solved (too easy) or none solved (too hard)
                 "groups_all_correct": float(groups_correct.all(1).mean()),
                 "groups_none_correct": float((~groups_correct).all(1).mean())}
        # update on the groups that carry signal; the others would only add KL gradient
        signal = np.repeat(~zero_var, G)
        total = int(rows["lens"][signal].sum())     # the reply tokens the loss averages over, all ranks
        keep = np.flatnonzero(signal[lo * G:hi * G])
        if not len(keep):     # nothing to learn here: a zero share (KL undefined if no rank has any)
            return {"stats": stats, "share": 0.0, "kl": 0.0 if total else float("nan")}
        x, y, mask = build_batch([ro.prompts[i] for i in keep], [ro.replies[i] for i in keep], self.policy.dtype)
        return {"stats": stats, "x": x, "y": y, "mask": mask, "adv": adv[lo * G:hi * G][keep], "old_logp": None,
                "ref_logp": logprobs_no_grad(self.ref, x, y, c.temperature, mask), "share": float(mask.sum()) / total}

    # -- the loop's two callbacks ------------------------------------------------------------
    def get_batch(self, rng) -> dict:
        """The batch of the next step; a new group per task when the plan is used up. All
        inner_epochs steps of an iteration take the whole batch (one minibatch an epoch)."""
        if not self.plan:
            self.exp = self.collect(rng, self.sampler.draw(self.batch_size))
            self.plan = [self.exp] * self.cfg.inner_epochs
            self.iteration += 1
        return self.plan.pop(0)

    def loss_fn(self, model, b):
        """grpo_loss on the batch -> (loss, metrics); (None, metrics) when no group had signal."""
        if "x" not in b:
            return None, {"kl": b["kl"], "pg": 0.0, "clip_frac": 0.0, "tokens": 0, "shared": b["stats"]}
        logp = token_logprobs(model, b["x"], b["y"], self.cfg.temperature, b["mask"])   # (B, L), with graph
        if b["old_logp"] is None:                  # dropout is off: the first pass *is* pi_old
            b["old_logp"] = logp.data.copy()
        loss, st = grpo_loss(logp, b["old_logp"], b["ref_logp"], b["adv"], b["mask"], self.cfg.clip_ratio,
                             self.cfg.kl_coef)
        tokens = int(b["x"].size)
        if self.replay is not None:                # PPO-ptx: the SFT loss on a few SFT conversations
            rows = self.replay_rng.integers(0, len(self.replay), self.cfg.replay_rows)
            x, y, m = pad_batch([self.replay[i] for i in rows], model.dtype)
            sft = masked_loss(model, x, y, m)
            # every rank draws the same rows: weighted by the rank's share, the Allreduce's sum counts them once
            loss = loss + sft * (self.cfg.chat_replay * b["share"])
            st["replay_loss"], tokens = float(sft.data), tokens + int(x.size)
        return loss, {**st, "tokens": tokens, "shared": b["stats"]}

    @staticmethod
    def shard(b, rank: int, size: int):
        """loop.train's shard under MPI: collect() sampled only this rank's groups -> (them, their
        share of the reply tokens the loss averages over)."""
        return b, b["share"]

    def train(self, tasks, batch_size: int | None = None, save=None, resume=None, val_tasks=None) -> list[dict]:
        """cfg.num_iterations GRPO iterations over `tasks`, batch_size tasks each (default
        cfg.tasks_per_iter) -> one metrics row per step (loop.train's history: one per iteration
        while inner_epochs is 1). save / resume: as loop.train's; a resumed run starts at the
        iteration boundary of the saved step, and the task order restarts. With val_tasks and
        cfg.eval_every, greedy accuracy on them is logged as val_accuracy every eval_every
        iterations (and at the start and the end)."""
        if not tasks:
            raise ValueError("RLVF needs at least one training task")
        c, dist = self.cfg, world()
        self.batch_size = batch_size or c.tasks_per_iter
        if dist.size > self.batch_size:
            raise ConfigError(f"rlvf: {self.batch_size} tasks per iteration cannot be split over {dist.size} "
                              "processes (each samples whole groups, at least one)")
        self.sampler = TaskSampler(tasks, self.rng, c.samples_per_task, c.curriculum, c.curriculum_floor)
        self.iteration, self.plan = (int(resume["step"]) // c.inner_epochs if resume else 0), []
        every = c.eval_every * c.inner_epochs if val_tasks else 0
        evaluate = (lambda model: {"accuracy": self.evaluate(val_tasks, samples=0, model=model)["accuracy"]}) if every else None
        out = train(self.policy, c.loop_config(c.num_iterations * c.inner_epochs, self.batch_size, every), self.get_batch,
                    self.loss_fn, stage="rlvf", logger=self.logger, evaluate=evaluate, save=save, resume=resume,
                    rng=self.rng, show_progress=self.show_progress, shard=self.shard)
        self.plan = []
        return out["history"]

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, tasks, samples: int | None = None, model=None) -> dict:
        """evaluate_tasks() of `model` (default: the policy) with this trainer's settings."""
        c = self.cfg
        return evaluate_tasks(model or self.policy, self.tok, tasks, c.eval_samples if samples is None else samples,
                              max_new_tokens=c.max_new_tokens, temperature=c.eval_temperature,
                              batch=c.eval_batch, seed=self.eval_seed)


# ----------------------------------------------------------------------------------------
# the stage


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def run(ctx) -> dict:
    """RLVF stage for train.py: load policy + reference, evaluate held-out tasks, train, evaluate,
    save rlvf_final, plot. With --resume, an interrupted run continues from rlvf_last.
    -> headline figures."""
    c, t0 = ctx.cfg.rlvf, time.perf_counter()
    c.validate()
    sft, = STAGE.reads
    init = c.init_from
    if init == "auto":                          # after RLHF when it ran, else straight from SFT
        init = "rlhf_final" if ctx.ckpt("rlhf_final").exists() else sft
    policy, ref = ctx.load_model(init), ctx.load_model(sft)
    train_tasks, val_tasks = load_split(ctx.data_dir, "rlvf", seed=ctx.seed)
    replay = None
    if c.chat_replay and c.replay_rows:
        replay = sft_examples(ctx.tokenizer, load_split(ctx.data_dir, "sft", seed=ctx.seed)[0], ctx.cfg.model.block_size)
    trainer = RLVFTrainer(policy, ctx.tokenizer, None, c, ref_model=ref, logger=ctx.logger,
                          show_progress=ctx.show_progress, seed=ctx.seed, replay=replay)
    before = trainer.evaluate(val_tasks)        # the starting policy, before any resumed weights
    seen = [train_tasks[i] for i in np.random.default_rng(ctx.seed).permutation(len(train_tasks))[:c.train_eval_tasks]]
    seen_before = trainer.evaluate(seen, samples=0) if seen else None
    if init != sft:                             # the bar is set against the SFT model: measure it too,
        # unless RLHF kept its weights (guard rollback)
        sft_eval = before if same_weights(policy, ref) else trainer.evaluate(val_tasks, samples=0, model=ref)
    resume = load_resume(ctx, policy, STAGE.name)
    history = trainer.train(train_tasks, save=make_saver(ctx, policy, STAGE, extra={"init_from": init}),
                            resume=resume, val_tasks=val_tasks)
    after = trainer.evaluate(val_tasks)
    seen_after = trainer.evaluate(seen, samples=0) if seen else None
    log_before_after(ctx.logger, STAGE.name, trainer.iteration, before, after)
    # the run report's plotter (train.py redraws it with every stage at the end of the run)
    plot = plot_stage("rlvf", ctx.logger.read_metrics("rlvf"), ctx.logger.dir) if history and world().is_main else None
    k = max(1, min(3, len(history)))         # start/end reward: mean of the first/last k steps
    out = {"headline": f"held-out acc {_pct(before['accuracy'])} -> {_pct(after['accuracy'])} "
                       f"(math {_pct(before.get('math_accuracy', 0))} -> {_pct(after.get('math_accuracy', 0))}, "
                       f"logic {_pct(before.get('logic_accuracy', 0))} -> {_pct(after.get('logic_accuracy', 0))})",
           "init_from": init, "n_val": len(val_tasks), "iterations": trainer.iteration,
           "acc_before": before["accuracy"], "acc_after": after["accuracy"]}
    if init != sft:
        out["acc_sft"] = sft_eval["accuracy"]
    if seen:
        out["headline"] += f"; training tasks {_pct(seen_before['accuracy'])} -> {_pct(seen_after['accuracy'])}"
        out.update(n_train_eval=len(seen), train_acc_before=seen_before["accuracy"], train_acc_after=seen_after["accuracy"])
    for when, res in (("before", before), ("after", after)):
        out.update({f"{typ}_{when}": res.get(f"{typ}_accuracy") for typ in ("math", "logic")})
        out.update({f"pass@{kk}_{when}": res.get(f"pass@{kk}") for kk in PASS_KS})
    out["by_kind_before"], out["by_kind_after"] = before["by_kind"], after["by_kind"]
    if history:
        kls = [h["kl"] for h in history[-k:] if not math.isnan(h["kl"])]
        out.update(reward_start=float(np.mean([h["reward"] for h in history[:k]])),
                   reward_end=float(np.mean([h["reward"] for h in history[-k:]])),
                   zero_var_share=float(np.mean([h["zero_var_share"] for h in history])),
                   kl_end=float(np.mean(kls)) if kls else None)
    chat = chat_eval_after(ctx, policy, STAGE.name, trainer.iteration, c.chat_eval_items, c.chat_eval_tokens)
    if chat is not None:            # what a user chatting with the final model sees (RLHF reported its start)
        out["headline"] += f"; {chat_eval.headline(chat)}"
        out.update(chat_eval.flat(chat))
    out["plot"] = str(plot) if plot else "skipped (matplotlib not installed)"
    out["time_s"] = time.perf_counter() - t0
    # a fixed spread of held-out tasks (not picked by outcome)
    show = np.unique(np.linspace(0, len(val_tasks) - 1, min(c.n_show, len(val_tasks))).astype(int))
    out["samples"] = [{"prompt": val_tasks[i]["prompt"], "expected": val_tasks[i]["expected_answer"],
                       "before": before["replies"][i], "after": after["replies"][i]} for i in show]
    return out


STAGE = Stage("rlvf", reads=("sft_final",), writes="rlvf_final", config=RLVFConfig, tiny=TINY_OVERRIDES, run=run,
              data_parallel=True)
