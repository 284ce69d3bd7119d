"""The RL toolkit PPO (rlhf.py) and GRPO (rlvf.py) share: the rollout, per-token log-probs,
the clipped surrogate, the KL estimators, masked means, the prompt and task samplers, the frozen
reference and the dropout-off policy, chunked sampling for evaluation, and the before/after
line each RL stage logs, and the optimizer knobs both stages' configs share (RLConfig).

The rollout samples replies with the KV cache, then lays prompt + reply out as one
right-padded batch on which the training forward recomputes per-token log-probs (so old and
new log-probs come from the same computation and the first PPO ratio is exactly 1). Both
stages then train through the one loop (loop.train): each batch of samples becomes a plan
of minibatches, `inner_epochs` passes over it, and get_batch pops the next one."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np

from .. import chat_eval
from .. import engine as E
from .. import nn
from ..config import LoopConfig
from ..batches import build_batch
from ..data import DataError, first_turns, load_split
from ..engine import Tensor
from ..logprobs import logprobs_no_grad, token_logprobs  # noqa: F401  (the stages import them from here)
from ..tokenizer import IM_END_ID


@dataclass
class RLConfig:
    """The optimizer knobs PPO and GRPO share (each stage sets its own lr and warmup), and how
    they become the loop's config: one loop step per minibatch, logged every step."""
    lr: float = 3e-5
    warmup_steps: int = 3            # in optimizer steps
    min_lr_ratio: float = 1.0        # 1.0: constant after warmup (RL runs are too short to anneal)
    weight_decay: float = 0.0        # decay would pull away from the SFT weights, not toward anything useful
    grad_clip: float = 1.0
    ckpt_every: int = 0              # steps between resumable checkpoints (0: on interrupt only)

    def loop_config(self, max_steps: int, batch_size: int, eval_every: int = 0) -> LoopConfig:
        return LoopConfig(max_steps=max_steps, batch_size=batch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
                          warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                          eval_every=eval_every, log_every=1, ckpt_every=self.ckpt_every)


def same_weights(a, b) -> bool:
    """Whether two models hold the same parameters (an RL stage whose guard rolled back to the
    SFT weights: its after figures are its before figures)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@dataclass
class Rollout:
    """One batch of sampled replies.

    x, y: (B, L) inputs / next-token targets of prompt + reply, right-padded;
    action_mask: (B, L) 1 where y is a generated token (the stop token included);
    prompts: prompt ids per row; replies: generated ids per row (stop token included);
    texts: decoded replies; finished: (B,) the reply closed with a stop token;
    logprobs: (B, N) sampling log-probs of the generated tokens (row b: first len(replies[b])
    entries), free from generate(); e.g. for an entropy estimate."""
    x: np.ndarray
    y: np.ndarray
    action_mask: np.ndarray
    prompts: list
    replies: list
    texts: list
    finished: np.ndarray
    logprobs: np.ndarray | None = None

    @property
    def last_index(self) -> np.ndarray:
        """(B,) position in x of the last generated token (where a reward is read / given)."""
        return (np.cumsum(self.action_mask, 1) * self.action_mask).argmax(1)


def rollout(policy, tok, user_prompts: list[str], *, samples: int = 1, temperature: float = 1.0,
            max_new_tokens: int = 64, rng=None, top_k=None, top_p=None) -> Rollout:
    """Sample `samples` replies per prompt (rows grouped by prompt: prompt i owns rows
    i*samples ... i*samples + samples - 1); temperature 0 is greedy."""
    prompts = [tok.chat_prompt(u) for u in user_prompts for _ in range(samples)]
    gen = policy.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_tokens=(IM_END_ID,), rng=rng, return_logprobs=True)
    replies = gen.replies()
    # a reply must hold at least one action; an empty one cannot happen (>= 1 token sampled)
    x, y, m = build_batch(gen.prompts, replies, policy.dtype)
    texts = [tok.decode(r) for r in replies]
    return Rollout(x, y, m, gen.prompts, replies, texts, gen.finished.copy(), gen.logprobs)


def row_rngs(key: int, groups, samples: int) -> list:
    """One sampling Generator per row of the groups `groups` (their indices in the global batch),
    `samples` rows each, seeded by (key, group, member): a reply's draws depend on which group
    and member it is, not on the rank that samples it or the other rows of its batch, so N ranks
    sample what one process does (key: drawn once per batch from the shared RNG)."""
    return [np.random.default_rng([key, int(g), i]) for g in groups for i in range(samples)]


def rollouts_in_chunks(model, tok, user_prompts: list[str], *, samples: int = 1, temperature: float = 1.0,
                       max_new_tokens: int = 64, batch: int = 128, rng=None):
    """rollout() over many prompts for evaluation, at most `batch` rows (whole groups) a call
    -> one Rollout per chunk, in prompt order."""
    per = max(1, batch // samples)
    for i in range(0, len(user_prompts), per):
        yield rollout(model, tok, user_prompts[i:i + per], samples=samples, temperature=temperature,
                      max_new_tokens=max_new_tokens, rng=rng)


# ----------------------------------------------------------------------------------------
# the clipped surrogate, KL (the log-probs: logprobs.py)


def masked_mean(x, mask):
    """Mean of x (B, L) over the positions where mask (0/1) is 1, 0 for an empty mask; x a
    Tensor (-> scalar Tensor) or an array (-> float)."""
    m = np.asarray(mask)
    n = max(float(m.sum()), 1.0)
    return (x * m).sum() * (1.0 / n)


def clipped_surrogate(logp: Tensor, old_logp, adv, mask, clip_ratio: float):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), to be maximised:
    min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp).

    logp: (B, L) Tensor; old_logp: (B, L) array; adv: advantages broadcastable to (B, L)
    (PPO: per token, GRPO: per reply (B, 1)); mask: (B, L) 0/1. -> surrogate (B, L) Tensor,
    and log rho (B, L) Tensor, masked (its exp is rho)."""
    dt = logp.dtype
    m = np.asarray(mask, dt)
    A = np.asarray(adv, dt)
    # mask the log-ratio before exp: at padding it is meaningless and could overflow
    log_ratio = (logp - np.asarray(old_logp, dt)) * m
    ratio = log_ratio.exp()
    return E.minimum(ratio * A, ratio.clip(1.0 - clip_ratio, 1.0 + clip_ratio) * A), log_ratio


def clip_fraction(deviation: np.ndarray, mask, clip: float) -> float:
    """Share of the masked tokens where |deviation| > clip (ratio - 1 for the surrogate's clip,
    V - V_old for the critic's)."""
    return float(masked_mean((np.abs(deviation) > clip).astype(np.float64), mask))


def kl_k1(logp, ref_logp):
    """k1 = log p - log q: the plain estimate of KL(p || q) from samples of p, per token
    (unbiased, high variance, can be negative; PPO's per-token reward penalty)."""
    return logp - ref_logp


def kl_k3(log_ratio):
    """k3 = r - 1 - log r with r = q / p = exp(log_ratio): Schulman's low-variance, always
    >= 0 estimate of KL(p || q) from samples of p (http://joschu.net/blog/kl-approx.html).
    log_ratio: a Tensor (GRPO's loss) or an array (PPO's approx_kl)."""
    exp = np.exp if isinstance(log_ratio, np.ndarray) else Tensor.exp
    return exp(log_ratio) - log_ratio - 1.0


# ----------------------------------------------------------------------------------------
# the models: a dropout-off policy, a frozen reference


def disable_dropout(model):
    """Set every Dropout to p = 0 (and say so in the config): the training forward must
    compute the same function as the rollout, or the first PPO ratio is not 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.config = replace(model.config, dropout=0.0)
    return model


def frozen(model, copy_weights: bool = False):
    """A reference model (a copy of `model` with copy_weights): dropout off, eval mode, in no
    optimizer, only ever run under no_grad. (requires_grad=False would hide its weights from
    state_dict / dtype.)"""
    return disable_dropout(copy.deepcopy(model) if copy_weights else model).eval()


# ----------------------------------------------------------------------------------------
# sampling prompts, minibatch plans


class EpochOrder:
    """Indices 0 ... n - 1 in epochs without replacement: each epoch a reshuffle of the last
    (of 0 ... n - 1 at first, or when n changes)."""

    def __init__(self):
        self.order, self.pos = [], 0

    def next(self, rng, n: int) -> int:
        if self.pos >= len(self.order):
            self.order = [int(i) for i in rng.permutation(self.order if len(self.order) == n else n)]
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


class TaskSampler:
    """Picks each iteration's tasks. Plain: epochs over a reshuffled order. Curriculum (online
    difficulty filtering, cf. Bae et al. 2025): a task *kind* (the data's "kind" tag, else its
    type) is drawn with weight 1 - p^G - (1-p)^G + floor, where p is the kind's running solve
    rate: that is the chance a group of G has both right and wrong replies, i.e. any signal.
    The floor keeps every kind in play, so none drifts unwatched."""

    EMA = 0.3        # weight of the newest group in a kind's running solve rate

    def __init__(self, tasks, rng, group_size: int, curriculum: bool = True, floor: float = 0.05):
        self.tasks, self.rng, self.G, self.curriculum, self.floor = tasks, rng, group_size, curriculum, floor
        kinds = [self.kind(t) for t in tasks]
        self.kinds = sorted(set(kinds))
        self.members = {k: [i for i, kk in enumerate(kinds) if kk == k] for k in self.kinds}
        self.orders = {k: EpochOrder() for k in self.kinds}                    # epochs within a kind
        self.solve = {k: 0.5 for k in self.kinds}                              # unknown: most promising

    def kind(self, task) -> str:
        return str(task.get("kind", task["type"])) if self.curriculum else "all"

    def weights(self) -> np.ndarray:
        p = np.array([self.solve[k] for k in self.kinds])
        w = 1.0 - p ** self.G - (1.0 - p) ** self.G + self.floor
        return w / w.sum()

    def draw(self, n: int) -> list:
        ks = self.rng.choice(len(self.kinds), size=n, p=self.weights()) if self.curriculum else np.zeros(n, int)
        return [self.tasks[self.members[k][self.orders[k].next(self.rng, len(self.members[k]))]]
                for k in (self.kinds[i] for i in ks)]

    def update(self, tasks, group_acc) -> None:
        for t, acc in zip(tasks, group_acc):
            k = self.kind(t)
            self.solve[k] += self.EMA * (float(acc) - self.solve[k])


def minibatch_plan(rng, rows: int, epochs: int, minibatches: int) -> list:
    """`epochs` passes over rows 0 ... rows - 1, each reshuffled and cut into `minibatches`
    row-index arrays -> the list of them, in the order loop.train takes them."""
    return [chunk for _ in range(epochs) for chunk in np.array_split(rng.permutation(rows), minibatches)]


def local_rows(rows, lo: int, hi: int):
    """The rows of a global minibatch that this rank sampled (its row_range [lo, hi)), as indices
    into its own rows, in the plan's order (MPI; one process: the rows as they are)."""
    rows = np.asarray(rows)
    return rows[(rows >= lo) & (rows < hi)] - lo


def used_columns(mask, rows) -> int:
    """Columns up to the last reply token among `rows`; the rest is padding for all of them."""
    return int(np.flatnonzero(mask[rows].any(0)).max()) + 1


# ----------------------------------------------------------------------------------------
# reporting


def log_before_after(logger, stage: str, step: int, before: dict, after: dict) -> None:
    """The held-out figures of an RL stage before and after training, as one metrics row
    (val_before_<k>, val_after_<k> for every float figure)."""
    logger.log(stage, step, **{f"val_{w}_{k}": v for w, e in (("before", before), ("after", after))
                               for k, v in e.items() if isinstance(v, float)})


# ----------------------------------------------------------------------------------------
# the prompts an RL stage samples from


def user_prompts(convs) -> list[str]:
    """The first user turn of each conversation (data.first_turns), deduplicated in order."""
    return list(dict.fromkeys(u for u, _ in map(first_turns, convs) if u))


def prompt_split(data_dir, seed: int, eval_prompts: int = 0):
    """-> (SFT training conversations, training prompts, held-out prompts). Training prompts:
    every first user turn of the SFT training data, less the chat evaluation's prompts;
    held-out: those of the SFT held-out split that are not training prompts, a seeded sample
    of eval_prompts of them (0: all). The same held-out prompts for every model compared."""
    train_convs, val_convs = load_split(data_dir, "sft", seed=seed)
    chat_held_out = {it["prompt"] for it in chat_eval.load_chat_eval(data_dir) or []}
    train_prompts = [p for p in user_prompts(train_convs) if p not in chat_held_out]
    held_in = set(train_prompts)
    val_prompts = [p for p in user_prompts(val_convs) if p not in held_in]
    if not val_prompts:
        raise DataError(f"{data_dir}: no held-out SFT prompt that is not also a training prompt")
    pick = np.random.default_rng(seed).permutation(len(val_prompts))[:eval_prompts or None]
    return train_convs, train_prompts, [val_prompts[i] for i in sorted(pick)]
