"""Stage 5, RLVF: reinforcement learning from verifiable rewards with GRPO.

For every task the policy samples a *group* of G replies; a verifier (verifiers.py) marks
each right or wrong, and each reply's advantage is its reward relative to its own group,
A_i = (r_i - mean(r)) / (std(r) + eps), broadcast over the reply's tokens. No value model,
no reward model (reference: DeepSeekMath, Shao et al. 2024, section 4.1 "GRPO"). The loss
is PPO's clipped surrogate plus beta * KL to the frozen SFT model, with the KL measured by
Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html), averaged over all reply
tokens of the batch. `dr_grpo=True` drops the std division, which biases updates toward
groups with low reward variance (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
Training"); our token-level average already removes GRPO's per-reply length normalisation.

The seed's `samples_per_task=2` is raised to 8 by default: a group of 2 has signal only
when exactly one reply is right (then its advantages are always +-1, whatever the task's
difficulty), so a task solved 10% of the time gives signal in 18% of its groups with G = 2
but in 57% with G = 8, and most of the sampling time with G = 2 teaches nothing.

Only groups with unequal rewards are put through the update (the others have A = 0 and
would add KL gradient only); their share is logged as zero_var_share. Dropout is off in
this stage, so the sampler and the loss see one function and the first PPO ratio is 1.

What to expect: RL sharpens what the SFT model can already do sometimes. Greedy accuracy
can rise at most toward pass@k of the starting model (the share of tasks it solves in k
samples), so evaluate() reports pass@1 / pass@4 beside greedy accuracy: if pass@4 is barely
above greedy accuracy, the SFT model (or the task set) is the bottleneck, not this stage.

    trainer = RLVFTrainer(model, tokenizer, model_config, RLVFConfig())
    history = trainer.train(tasks, batch_size=4)
    print(trainer.evaluate(test_tasks)["accuracy"])
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from math import comb

import numpy as np
from tqdm import tqdm

from .. import engine as E
from ..data import load_split
from ..engine import Tensor
from ..loop import NonFiniteError, TrainingInterrupted, stop_on_signals
from ..model import GPT
from ..optim import AdamW, clip_grad_norm, get_lr
from ..report import plot_stage
from ..runtime import adapt_threads
from .common import load_resume, make_saver
from .rollout import build_batch, logprobs_no_grad, rollout, token_logprobs
from .verifiers import LogicVerifier, MathVerifier, states_answer, verify_task

__all__ = ["RLVFConfig", "RLVFTrainer", "MathVerifier", "LogicVerifier", "STAGE_CONFIG", "TINY_OVERRIDES",
           "evaluate_tasks", "group_advantages", "grpo_loss", "pass_at_k", "step_credit", "task_rewards", "run"]

PASS_KS = (1, 4)   # pass@k reported by evaluate()


@dataclass
class RLVFConfig:
    # the seed's fields
    correct_reward: float = 1.0
    incorrect_reward: float = -0.5
    num_iterations: int = 30
    samples_per_task: int = 8        # group size G (seed: 2, too little signal, see module doc)
    # sampling
    tasks_per_iter: int = 16         # tasks (groups) per iteration; train(batch_size=...) overrides
    curriculum: bool = True          # favour task kinds the policy solves sometimes (TaskSampler)
    curriculum_floor: float = 0.05   # every kind keeps at least this weight
    temperature: float = 1.0         # sampling temperature; the loss optimises softmax(logits / T)
    max_new_tokens: int = 80         # the longest house-style reply (a worked subtraction) is 73 characters
    # rewards
    format_reward: float = 0.1       # bonus for closing with <|im_end|> and a parseable answer; 0 = off
    step_reward: float = 0.0         # partial credit: this times the share of true worked steps (step_credit)
    # GRPO update
    lr: float = 3e-5                 # mini model, 30 iterations: 1e-4 / 2e-4 cost 5 held-out points, 3e-5 ~1
    warmup_iters: int = 3
    min_lr_ratio: float = 1.0        # 1.0: constant after warmup (RL runs are too short to anneal)
    weight_decay: float = 0.0        # decaying toward 0 would pull away from the SFT weights
    grad_clip: float = 1.0
    inner_epochs: int = 1            # gradient steps per batch of samples (GRPO's mu)
    clip_eps: float = 0.2            # PPO ratio clip; inactive when inner_epochs == 1 (ratio is 1)
    beta: float = 0.04               # KL coefficient (DeepSeekMath's value)
    adv_eps: float = 1e-4            # eps in (r - mean) / (std + eps)
    dr_grpo: bool = False            # True: advantages r - mean, no std division
    # evaluation
    eval_samples: int = 4            # sampled replies per task for pass@k (>= max(PASS_KS)); 4: pass@4 = any of 4
    eval_temperature: float = 1.0
    eval_batch: int = 128            # rows per generate() call during evaluation
    n_show: int = 5                  # held-out tasks shown before/after in the summary
    init_from: str = "auto"          # "auto": rlhf_final if it exists, else sft_final
    seed: int | None = None          # None: the run's --seed

    def validate(self):
        from ..config import ConfigError
        if self.samples_per_task < 2:
            raise ConfigError("rlvf.samples_per_task must be >= 2: a group of one has no relative advantage")
        if self.eval_samples and self.eval_samples < max(PASS_KS):
            raise ConfigError(f"rlvf.eval_samples must be 0 or >= {max(PASS_KS)} for pass@{max(PASS_KS)}")
        if self.tasks_per_iter <= 0 or self.num_iterations < 0 or self.inner_epochs <= 0 or self.lr <= 0:
            raise ConfigError("rlvf: tasks_per_iter, inner_epochs and lr must be positive, num_iterations >= 0")
        if self.init_from not in ("auto", "sft_final", "rlhf_final"):
            raise ConfigError(f"rlvf.init_from must be auto, sft_final or rlhf_final, got {self.init_from!r}")


STAGE_CONFIG = RLVFConfig
# --config tiny: a handful of small iterations, seconds in all
TINY_OVERRIDES = dict(num_iterations=3, samples_per_task=4, tasks_per_iter=2, max_new_tokens=12,
                      eval_samples=4, n_show=2, warmup_iters=0)


# ----------------------------------------------------------------------------------------
# the pieces: rewards, advantages, loss, pass@k (pure functions, unit-tested)


_STEP = re.compile(r"(\d+)\s*([+\-×÷])\s*(\d+)(?:\s*([+\-])\s*(\d+))?\s*=\s*(\d+)")
_EQUATION = re.compile(r"^(\d+)\s*[+\-×÷]\s*(\d+)：")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y,
        "÷": lambda x, y: x / y if y else float("nan")}


def step_credit(prompt: str, reply: str) -> float:
    """Partial credit for a worked reply: the share of its stated facts ("7 + 8 = 15",
    "4 + 3 + 1 = 8") that are true, times whether its opening restatement ("72 + 19：") copies
    two numbers that are in the prompt (else 0: true facts about the wrong numbers earn
    nothing). 0.0 for a reply with no worked fact."""
    facts = _STEP.findall(reply)
    if not facts:
        return 0.0
    true = 0
    for a, op, b, op2, c, r in facts:
        v = _OPS[op](int(a), int(b))
        if op2:
            v = _OPS[op2](v, int(c))
        true += v == int(r)
    m = _EQUATION.match(reply)
    if m:
        in_prompt = set(re.findall(r"\d+", prompt))
        if not {m.group(1), m.group(2)} <= in_prompt:
            return 0.0
    return true / len(facts)


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


def grpo_loss(logp: Tensor, old_logp, ref_logp, adv, mask, clip_eps: float = 0.2, beta: float = 0.04):
    """Clipped policy-gradient loss + beta * k3 KL, averaged over all reply tokens.

    logp: (B, L) Tensor, log pi_theta(y_t); old_logp, ref_logp: (B, L) arrays under the
    sampling policy and the frozen reference; adv: (B,) per-reply advantage, broadcast over
    its tokens; mask: (B, L) 1 on reply tokens. -> (scalar loss Tensor, stats dict).

    per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (exp(d) - d - 1),
    rho = exp(logp - old_logp), d = ref_logp - logp. exp(d) - d - 1 >= 0 is Schulman's k3,
    an unbiased, low-variance estimate of KL(pi_theta || pi_ref) from samples of pi_theta."""
    dt = logp.dtype
    m = np.asarray(mask, dtype=dt)
    A = np.asarray(adv, dtype=dt)[:, None]                                  # (B, 1)
    # differences are masked *before* exp: at padding they can be large and exp would overflow
    ratio = ((logp - np.asarray(old_logp, dt)) * m).exp()                   # (B, L), 1 at padding
    surr = E.minimum(ratio * A, ratio.clip(1.0 - clip_eps, 1.0 + clip_eps) * A)
    d = (np.asarray(ref_logp, dt) - logp) * m
    kl = d.exp() - d - 1.0                                                  # (B, L), 0 at padding
    n = max(float(m.sum()), 1.0)
    # token-level average over the whole batch (DAPO's choice; Dr. GRPO's point is that a
    # per-reply 1/|o_i| favours long wrong replies), 1/n folded into the mask weights
    loss = ((kl * beta - surr) * (m / n)).sum()
    r = ratio.data
    stats = {"kl": float((kl.data * m).sum() / n), "pg": float((-surr.data * m).sum() / n),
             "clip_frac": float((((r < 1 - clip_eps) | (r > 1 + clip_eps)) * m).sum() / n)}
    return loss, stats


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


# ----------------------------------------------------------------------------------------
# the trainer


class TaskSampler:
    """Picks each iteration's tasks. Plain: epochs over a reshuffled order. Curriculum (online
    difficulty filtering, cf. Bae et al. 2025): a task *kind* (the data's "kind" tag, else its
    type) is drawn with weight 1 - p^G - (1-p)^G + floor, where p is the kind's running solve
    rate: that is the chance a group of G has both right and wrong replies, i.e. any signal.
    The floor keeps every kind in play, so none drifts unwatched."""

    EMA = 0.3        # weight of the newest group in a kind's running solve rate

    def __init__(self, tasks, rng, group_size: int, curriculum: bool = True, floor: float = 0.05):
        self.tasks, self.rng, self.G, self.curriculum, self.floor = tasks, rng, group_size, curriculum, floor
        kinds = [str(t.get("kind", t["type"])) for t in tasks]
        self.kinds = sorted(set(kinds)) if curriculum else ["all"]
        members = {k: [i for i, kk in enumerate(kinds) if kk == k or not curriculum] for k in self.kinds}
        self.queues = {k: [members[k], len(members[k])] for k in self.kinds}   # [order, position]
        self.solve = {k: 0.5 for k in self.kinds}                            # unknown: most promising

    def weights(self) -> np.ndarray:
        p = np.array([self.solve[k] for k in self.kinds])
        w = 1.0 - p ** self.G - (1.0 - p) ** self.G + self.floor
        return w / w.sum()

    def draw(self, n: int) -> list:
        ks = self.rng.choice(len(self.kinds), size=n, p=self.weights()) if self.curriculum else np.zeros(n, int)
        out = []
        for k in (self.kinds[i] for i in ks):
            q = self.queues[k]
            if q[1] == len(q[0]):                  # epochs over the kind without replacement
                q[0], q[1] = [int(i) for i in self.rng.permutation(q[0])], 0
            out.append(self.tasks[q[0][q[1]]])
            q[1] += 1
        return out

    def update(self, tasks, group_acc) -> None:
        for t, acc in zip(tasks, group_acc):
            k = str(t.get("kind", t["type"])) if self.curriculum else "all"
            self.solve[k] += self.EMA * (float(acc) - self.solve[k])


class RLVFTrainer:
    """GRPO on verifiable tasks. model: the policy (trained in place); ref_model: the frozen
    reference for the KL term (default: a copy of `model` as passed in)."""

    def __init__(self, model, tokenizer, config, rlvf_config: RLVFConfig | None = None, ref_model=None,
                 logger=None, show_progress: bool = False, seed: int = 0):
        self.cfg = rlvf_config or RLVFConfig()
        self.cfg.validate()
        self.policy, self.tok, self.model_config = model, tokenizer, config
        if ref_model is None:                      # freeze a copy of the starting weights
            ref_model = GPT(model.config, dtype=model.dtype)
            ref_model.load_state_dict(model.state_dict())  # copies the arrays
        self.ref = ref_model.eval()                # frozen: only ever run under no_grad()
        self.logger, self.show_progress = logger, show_progress
        seed = self.cfg.seed if self.cfg.seed is not None else seed
        self.rng = np.random.default_rng(seed)
        self.eval_seed = seed + 1                  # the same draws before and after training
        self.opt = AdamW(list(model.named_parameters()), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.iteration = 0
        self.interrupted = None
        self.last_group_acc = None
        self.sampler = None

    # -- training -----------------------------------------------------------------------
    def train(self, tasks, batch_size: int | None = None) -> list[dict]:
        """GRPO iterations self.iteration ... cfg.num_iterations - 1 over `tasks`, batch_size tasks
        each (default cfg.tasks_per_iter), cycling through a reshuffled order. -> one metrics
        dict per iteration. Ctrl-C / SIGTERM stop at an iteration boundary (self.interrupted
        then names the signal)."""
        if not tasks:
            raise ValueError("RLVF needs at least one training task")
        bs = batch_size or self.cfg.tasks_per_iter
        if self.sampler is None or self.sampler.tasks is not tasks:   # kept across calls: the solve rates
            self.sampler = TaskSampler(tasks, self.rng, self.cfg.samples_per_task, self.cfg.curriculum,
                                       self.cfg.curriculum_floor)
        sampler, history = self.sampler, []
        bar = tqdm(range(self.iteration, self.cfg.num_iterations), desc="rlvf", initial=self.iteration,
                   total=self.cfg.num_iterations, disable=not self.show_progress, dynamic_ncols=True)
        with stop_on_signals() as flag:
            for _ in bar:
                batch = sampler.draw(bs)
                row = self.step(batch)
                sampler.update(batch, self.last_group_acc)
                history.append(row)
                if self.logger:                    # NaN (no update this iteration) -> null in the JSON
                    self.logger.log("rlvf", row["iter"], **{k: None if isinstance(v, float) and math.isnan(v) else v
                                                            for k, v in row.items() if k != "iter"})
                bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
                if flag["stop"]:
                    self.interrupted = flag["stop"]
                    break
        bar.close()
        return history

    def step(self, tasks) -> dict:
        """One GRPO iteration: sample a group per task, score, update. -> metrics."""
        c, G, t0 = self.cfg, self.cfg.samples_per_task, time.perf_counter()
        adapt_threads()                            # as loop.train: 1 thread while others load the CPU
        self.policy.eval()                         # dropout off: the sampler and the loss see one function
        # 1) a group of G replies per task (rows task-major: task i owns rows i*G ... i*G+G-1)
        ro = rollout(self.policy, self.tok, [t["prompt"] for t in tasks], samples=G, temperature=c.temperature,
                     max_new_tokens=c.max_new_tokens, rng=self.rng)
        row_tasks = [t for t in tasks for _ in range(G)]
        rewards, correct, steps = task_rewards(row_tasks, ro.texts, ro.finished, c)
        adv, zero_var = group_advantages(rewards, G, c.adv_eps, scale=not c.dr_grpo)
        self.last_group_acc = correct.reshape(-1, G).mean(1)                   # (N,) for the sampler
        lens = np.array([len(r) for r in ro.replies])
        # entropy of the sampling policy, Monte-Carlo: E[-log pi(y)] over the sampled tokens
        entropy = -float(sum(ro.logprobs[b, :n].sum() for b, n in enumerate(lens)) / lens.sum())
        metrics = {"iter": self.iteration, "reward": float(rewards.mean()), "accuracy": float(correct.mean()),
                   "zero_var_share": float(zero_var.mean()), "reply_len": float(lens.mean()), "entropy": entropy,
                   "finished": float(ro.finished.mean()), "step_credit": float(steps.mean()),
                   # why groups carry no signal: all solved (too easy) or none solved (too hard)
                   "groups_all_correct": float(correct.reshape(-1, G).all(1).mean()),
                   "groups_none_correct": float((~correct.reshape(-1, G)).all(1).mean())}
        # 2) update on the groups that carry signal; the others would only add KL gradient
        keep = np.flatnonzero(np.repeat(~zero_var, G))
        upd = {"loss": 0.0, "kl": float("nan"), "pg": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
        lr = get_lr(self.iteration, c.lr, c.warmup_iters, c.num_iterations, c.lr * c.min_lr_ratio)
        if len(keep):
            upd = self._update(ro, keep, adv, lr)
        self.iteration += 1
        return {**metrics, **upd, "lr": lr, "time_s": time.perf_counter() - t0}

    def _update(self, ro, keep, adv, lr) -> dict:
        """inner_epochs AdamW steps on rows `keep` of rollout `ro` -> loss / KL / grad norm of the
        first epoch, clip fraction of the later ones."""
        c = self.cfg
        x, y, mask = build_batch([ro.prompts[i] for i in keep], [ro.replies[i] for i in keep], self.policy.dtype)
        ref_logp = logprobs_no_grad(self.ref, x, y, c.temperature)
        params = self.policy.parameters()
        old_logp, first, clipped = None, None, []
        for epoch in range(c.inner_epochs):
            logp = token_logprobs(self.policy, x, y, c.temperature)            # (B, L), with graph
            if old_logp is None:                   # dropout is off: the first pass *is* pi_old
                old_logp = logp.data.copy()
            loss, st = grpo_loss(logp, old_logp, ref_logp, adv[keep], mask, c.clip_eps, c.beta)
            loss.backward()
            norm = clip_grad_norm(params, c.grad_clip)
            if not (math.isfinite(float(loss.data)) and math.isfinite(norm)):
                self.opt.zero_grad()
                raise NonFiniteError(f"rlvf: non-finite loss or gradient at iteration {self.iteration} "
                                     f"(loss {float(loss.data)}, grad norm {norm}); weights not updated")
            self.opt.step(lr)
            self.opt.zero_grad()
            if first is None:
                first = {"loss": float(loss.data), **st, "grad_norm": norm}
            else:                                  # the clip only acts once the policy has moved
                clipped.append(st["clip_frac"])
        return {**first, "clip_frac": float(np.mean(clipped)) if clipped else 0.0}

    def resume_from(self, state: dict) -> None:
        """Continue after an interrupt: {"step", "optimizer", "rng"} as common.load_resume
        returns them (the weights are already loaded). The task order restarts."""
        self.opt.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration = int(state["step"])

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, tasks, samples: int | None = None, model=None) -> dict:
        """evaluate_tasks() of `model` (default: the policy) with this trainer's settings."""
        c = self.cfg
        return evaluate_tasks(model or self.policy, self.tok, tasks, c.eval_samples if samples is None else samples,
                              max_new_tokens=c.max_new_tokens, temperature=c.eval_temperature,
                              batch=c.eval_batch, seed=self.eval_seed)


def evaluate_tasks(model, tok, tasks, samples: int = 0, *, max_new_tokens: int = RLVFConfig.max_new_tokens,
                   temperature: float = 1.0, batch: int = 128, seed: int = 0) -> dict:
    """Greedy accuracy (overall, per type, per kind) and, with `samples` > 0, pass@k for k in
    PASS_KS from that many sampled replies per task. The SFT stage reports it too: it is the
    starting point of RLVF."""
    def generate(n, temp, rng) -> list[str]:
        per, texts = max(1, batch // n), []                # task-major, cfg.eval_batch rows a call
        for i in range(0, len(tasks), per):
            texts += rollout(model, tok, [t["prompt"] for t in tasks[i:i + per]], samples=n, temperature=temp,
                             max_new_tokens=max_new_tokens, rng=rng).texts
        return texts

    greedy = generate(1, 0.0, None)
    ok = np.array([verify_task(t, r) for t, r in zip(tasks, greedy)], dtype=bool)
    types = np.array([t["type"] for t in tasks])
    out = {"accuracy": float(ok.mean()), "n": len(tasks), "replies": greedy}
    for typ in ("math", "logic"):
        if (types == typ).any():
            out[f"{typ}_accuracy"] = float(ok[types == typ].mean())
    kinds = np.array([str(t.get("kind", t["type"])) for t in tasks])  # generated data tags a kind
    out["by_kind"] = {str(k): float(ok[kinds == k].mean()) for k in sorted(set(kinds))}
    if samples:
        texts = generate(samples, temperature, np.random.default_rng(seed))
        hits = np.array([verify_task(t, r) for t, r in zip([t for t in tasks for _ in range(samples)], texts)])
        counts = hits.reshape(len(tasks), samples).sum(1)
        for k in PASS_KS:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, int(cc), k) for cc in counts]))
    return out


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
    init = c.init_from
    if init == "auto":
        init = "rlhf_final" if ctx.ckpt("rlhf_final").exists() else "sft_final"
    policy, ref = ctx.load_model(init), ctx.load_model("sft_final")
    train_tasks, val_tasks = load_split(ctx.data_dir, "rlvf", seed=ctx.seed)
    trainer = RLVFTrainer(policy, ctx.tokenizer, ctx.cfg.model, c, ref_model=ref, logger=ctx.logger,
                          show_progress=ctx.show_progress, seed=ctx.seed)
    before = trainer.evaluate(val_tasks)        # the starting policy, before any resumed weights
    if init != "sft_final":                     # the bar is set against the SFT model: measure it too
        sft_eval = trainer.evaluate(val_tasks, samples=0, model=ref)
    state = load_resume(ctx, policy, "rlvf")
    if state:
        trainer.resume_from(state)
    save = make_saver(ctx, policy, "rlvf", "rlvf_final", extra={"init_from": init})
    history = trainer.train(train_tasks)
    if trainer.interrupted:
        save("interrupt", trainer.iteration, trainer.opt, trainer.rng)
        raise TrainingInterrupted(f"rlvf: stopped by {trainer.interrupted} after iteration {trainer.iteration}")
    after = trainer.evaluate(val_tasks)
    save("final", trainer.iteration, trainer.opt, trainer.rng)
    ctx.logger.log("rlvf", trainer.iteration, **{f"val_{w}_{k}": v for w, e in (("before", before), ("after", after))
                                                  for k, v in e.items() if isinstance(v, float)})
    # the run report's plotter (train.py redraws it with every stage at the end of the run)
    plot = plot_stage("rlvf", ctx.logger.read_metrics("rlvf"), ctx.logger.dir) if history else None
    k = max(1, min(3, len(history)))         # start/end reward: mean of the first/last k iterations
    out = {"headline": f"held-out acc {_pct(before['accuracy'])} -> {_pct(after['accuracy'])} "
                       f"(math {_pct(before.get('math_accuracy', 0))} -> {_pct(after.get('math_accuracy', 0))}, "
                       f"logic {_pct(before.get('logic_accuracy', 0))} -> {_pct(after.get('logic_accuracy', 0))})",
           "init_from": init, "n_val": len(val_tasks), "iterations": trainer.iteration,
           "acc_before": before["accuracy"], "acc_after": after["accuracy"]}
    if init != "sft_final":
        out["acc_sft"] = sft_eval["accuracy"]
    for typ in ("math", "logic"):
        out[f"{typ}_before"] = before.get(f"{typ}_accuracy")
        out[f"{typ}_after"] = after.get(f"{typ}_accuracy")
    for kk in PASS_KS:
        out[f"pass@{kk}_before"] = before.get(f"pass@{kk}")
        out[f"pass@{kk}_after"] = after.get(f"pass@{kk}")
    out["by_kind_before"], out["by_kind_after"] = before["by_kind"], after["by_kind"]
    if history:
        out.update(reward_start=float(np.mean([h["reward"] for h in history[:k]])),
                   reward_end=float(np.mean([h["reward"] for h in history[-k:]])),
                   zero_var_share=float(np.mean([h["zero_var_share"] for h in history])),
                   kl_end=float(np.nanmean([h["kl"] for h in history[-k:]])) if any(
                       not math.isnan(h["kl"]) for h in history[-k:]) else None)
    out["plot"] = str(plot) if plot else "skipped (matplotlib not installed)"
    out["time_s"] = time.perf_counter() - t0
    # a fixed spread of held-out tasks (not picked by outcome)
    show = np.unique(np.linspace(0, len(val_tasks) - 1, min(c.n_show, len(val_tasks))).astype(int))
    out["samples"] = [{"prompt": val_tasks[i]["prompt"], "expected": val_tasks[i]["expected_answer"],
                       "before": before["replies"][i], "after": after["replies"][i]} for i in show]
    return out
