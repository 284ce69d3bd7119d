"""Stage 3: the reward model — a GPT trunk (initialised from sft_final) with a scalar
`reward_head` read at the last token of the reply, the closing <|im_end|>.

Trained on preference pairs with the Bradley-Terry loss -log sigma(r_chosen - r_rejected - margin)
(InstructGPT, Ouyang et al. 2022, eq. 1; the optional margin is Llama 2's, Touvron et al.
2023, eq. 2). Dropout is off: the score must be a deterministic function of the text, and
PPO reads it as a reward (TRL and "The N+ Implementation Details of RLHF with PPO",
Huang et al. 2024, disable dropout in every model). After training the head's bias is
shifted so that the SFT data's replies score 0 on average ("we normalize the RM using a
bias so that the labeler demonstrations achieve a mean score of 0 before doing RL",
InstructGPT appendix C.2); the bias is a weight, so the shift is stored with the model.

The score adds a fixed feature by default: lm_coef (2) times the mean log-probability of the reply's
tokens under the trunk's own LM head (the tied wte, frozen by default), computed from the same forward
and carrying no gradient. The head alone could not tell a right worked answer from one with a
slipped digit (the SFT model, which writes the worked steps, can): with the term the held-out
pairs read 85.7% -> 90.6%, on seed 2's model 84.5% -> 85.7% (bench/README.md, "The reward model,
a third time"). The coefficient travels in the checkpoint's metadata (loading sets it: load_extra);
`--reward.lm_coef=0` is the head alone, and the only kind that transformers can score (export.py
refuses the other).

Three eighths of each batch are synthetic by default (synthetic_pairs: a reply against another
prompt's reply, a looping fragment of itself, or itself with one wrong arithmetic fact): the
labelled pairs alone teach too thinly what PPO would exploit (bench/README.md, "Synthetic pairs
for the reward model", has the measurements).

    rm = RewardModel.from_pretrained(sft_model, config)
    RewardModelTrainer(rm, tokenizer, RewardConfig()).train(reward_data, epochs=3)
    rm.score(["什么是机器学习？"], ["机器学习是……"])      # -> array([1.7], dtype=float32)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .. import engine as E
from ..config import ConfigError, GPTConfig, LoopConfig
from ..data import DataError, load_split, pad_rows
from ..distributed import pair_rows
from ..engine import Tensor
from ..logprobs import head_rows
from ..loop import train
from ..model import GPT, ScalarHead
from ..nn import evaluating
from ..tokenizer import IM_END_ID, IM_START_ID, PAD_ID
from .common import Stage, load_resume, make_saver
from .reward_pairs import length_rule, sft_replies, slip, synthetic_pairs  # noqa: F401  (re-exported)

__all__ = ["RewardConfig", "RewardModel", "RewardModelTrainer", "STAGE", "TINY_OVERRIDES",
           "encode_reply", "synthetic_pairs", "pad_right", "pairwise_loss", "run"]


@dataclass
class RewardConfig(LoopConfig):
    max_steps: int = 150            # ~2.5 passes over the labelled pairs; 100 left the RM on the longer-trained
                                    # SFT model at 81% held-out (bench/README.md, "The reward model, again")
    batch_size: int = 32            # pairs per step (chosen and rejected rows share one forward)
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0       # decay would pull the SFT trunk toward 0, not toward anything useful
    eval_every: int = 25
    log_every: int = 5
    margin: float = 0.0             # Bradley-Terry margin (Llama 2); 0 = InstructGPT's loss
    mismatch_frac: float = 0.25     # share of each batch: a reply vs the reply to another prompt (synthetic_pairs)
    loop_frac: float = 0.125        # share of each batch: a reply vs a fragment of it repeated (synthetic_pairs)
    slip_frac: float = 0.125        # share of each batch: a reply vs the same with one wrong arithmetic fact
    freeze_embeddings: bool = True  # keep wte / wpe at their SFT values: fewer weights to overfit 750 pairs
    length_groups: int = 4          # batches drawn per step and grouped by length (1 = no grouping)
    eval_train_pairs: int = 256     # training pairs scored at the end for the train accuracy
    center_samples: int = 512       # SFT replies scored to centre the reward at 0 (0 = no centring)
    lm_coef: float = 2.0            # score = head + lm_coef x the mean log-probability of the reply under the
                                    # trunk's own LM head (RewardModel.reply_logprob), 0 = the head alone: from the
                                    # same SFT model 85.7% -> 90.6% held-out, wrong arithmetic 60 -> 83%, another
                                    # wrong answer 33 -> 83%, flipped yes/no 58 -> 88%, off-topic 81 -> 72% (seed 2's:
                                    # 84.5 -> 85.7%); 4: 87.4% (bench/README.md, "The reward model, a third time")

    def validate(self, name: str = "reward"):
        super().validate(name)
        fracs = (self.mismatch_frac, self.loop_frac, self.slip_frac)
        if min(fracs) < 0 or sum(fracs) >= 1:
            raise ConfigError(f"{name}: mismatch_frac + loop_frac + slip_frac must be in [0, 1) "
                              f"(labelled pairs fill the rest of each batch), got {sum(fracs):g}")


TINY_OVERRIDES = {"max_steps": 6, "batch_size": 8, "warmup_steps": 2, "eval_every": 3, "log_every": 2,
                  "eval_train_pairs": 16, "center_samples": 16}


# ----------------------------------------------------------------------------------------
# the model


class RewardModel(GPT):
    """GPT trunk + reward_head (1, C). Parameter names: transformer.* (as GPT) and
    reward_head.{weight (1, C), bias (1,)}. The LM head (tied to wte) is used only for the
    likelihood term (lm_coef > 0; loading a checkpoint sets it, load_extra)."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32):
        super().__init__(replace(config, dropout=0.0), seed, dtype)   # dropout off (module doc)
        # N(0, 1/(C+1)) weight, zero bias (model.ScalarHead; the scale of Stiennon et al. 2020's head)
        self.reward_head = ScalarHead(config.n_embd, np.random.default_rng(seed + 1), dtype)
        self.tokenizer = None          # set by the trainer / stage so score() can take strings
        self.lm_coef = 0.0             # > 0: the score adds lm_coef x reply_logprob (RewardConfig.lm_coef)

    def load_extra(self, extra: dict):
        """checkpoint.load_into's hook: the lm_coef the checkpoint was trained with (0 before it existed)."""
        self.lm_coef = float(extra.get("lm_coef", 0.0))

    @classmethod
    def from_pretrained(cls, base_model: GPT, config: GPTConfig | None = None, seed: int = 0) -> "RewardModel":
        """A reward model whose trunk is a copy of `base_model`'s weights and whose head is fresh."""
        rm = cls(config or base_model.config, seed=seed, dtype=base_model.dtype)
        state = {k: v.copy() for k, v in base_model.state_dict().items()}
        # strict load: every trunk weight must be present; the head keeps its own init
        rm.load_state_dict({**state, **{f"reward_head.{k}": v for k, v in rm.reward_head.state_dict().items()}},
                           source=f"{type(base_model).__name__} weights")
        rm.tokenizer = getattr(base_model, "tokenizer", None)
        return rm

    def rewards(self, idx, last_index) -> Tensor:
        """idx int (B, L) right-padded, last_index (B,) position of each row's last real token
        -> scores (B,). Causal attention: padding after last_index cannot change the score."""
        h = self.hidden_states(idx)                                   # (B, L, C)
        B = h.shape[0]
        r = self.reward_head(h[np.arange(B), np.asarray(last_index)])   # (B, C) -> (B,)
        if self.lm_coef:
            r = r + Tensor((self.lm_coef * self.reply_logprob(h, idx, last_index)).astype(self.dtype))
        return r

    def reply_logprob(self, h: Tensor, idx, last_index) -> np.ndarray:
        """The mean log-probability of each row's reply tokens under the trunk's own LM head (the
        tied wte): h (B, L, C) final hidden states, idx (B, L), last_index (B,) -> (B,), a constant
        (no gradient). The reply is what follows the last <|im_start|>assistant\n header, its
        closing <|im_end|> included; only the positions that predict it go through the head
        (logprobs.head_rows and the fused cross-entropy, as PPO's token log-probs)."""
        idx, last_index = np.asarray(idx), np.asarray(last_index)
        B, L = idx.shape
        mask = np.zeros((B, L), np.int8)                  # position t - 1 predicts reply token t
        for b, (row, last) in enumerate(zip(idx, last_index)):
            starts = np.flatnonzero(row[:last + 1] == IM_START_ID)
            start = starts[-1] + 1 + _HEADER_LEN if len(starts) else 1
            mask[b, start - 1:last] = 1
        targets = np.zeros_like(idx)
        targets[:, :-1] = idx[:, 1:]
        with E.no_grad():
            logits, rows = head_rows(self, h, mask)
            logp = -E.cross_entropy(logits, targets.reshape(-1)[rows], reduction="none").data
        row_of = rows // L
        total = np.bincount(row_of, weights=logp, minlength=B)
        count = np.bincount(row_of, minlength=B)
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)

    def score_ids(self, seqs, batch_size: int = 32) -> np.ndarray:
        """Token-id sequences (prompt + reply, ending at the reply's last token) -> scores (N,),
        dropout off, no graph. Batches rows of similar length together."""
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = np.zeros(len(seqs), self.dtype)
        with evaluating(self):
            for i in range(0, len(seqs), batch_size):
                rows = order[i:i + batch_size]
                idx, last = pad_right([seqs[j] for j in rows], self.config.block_size)
                out[rows] = self.rewards(idx, last).data
        return out

    def score(self, prompts, replies, tokenizer=None, batch_size: int = 32) -> np.ndarray:
        """User prompts and assistant replies (strings) -> scores (N,). The reply is closed
        with <|im_end|> as in training; higher is better, about 0 for an average SFT reply."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("RewardModel.score needs a tokenizer (pass tokenizer= or set rm.tokenizer)")
        if isinstance(prompts, str):
            prompts, replies = [prompts], [replies]
        if len(prompts) != len(replies):
            raise ValueError(f"score: {len(prompts)} prompts but {len(replies)} replies")
        return self.score_ids([encode_reply(tok, p, r) for p, r in zip(prompts, replies)], batch_size)


_HEADER_LEN = len("assistant\n")      # the characters after <|im_start|> before a reply (tokenizer.py)


def encode_reply(tok, prompt: str, reply: str) -> list[int]:
    """Chat template of one user turn + the assistant reply, ending with its closing <|im_end|>."""
    return tok.chat_prompt(prompt) + tok.encode(reply, allow_special=False) + [IM_END_ID]


def pad_right(seqs, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> idx (B, L) right-padded with <PAD>, last_index (B,). A sequence longer
    than block_size is cut from the left: the reply's end is what the head reads."""
    seqs = [list(s)[-block_size:] for s in seqs]
    return pad_rows(seqs, PAD_ID, np.int64), np.array([len(s) - 1 for s in seqs])


def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0) -> Tensor:
    """Bradley-Terry: mean of -log sigma(r_c - r_r - margin) over pairs (B,) -> scalar."""
    return -((r_chosen - r_rejected - margin).logsigmoid()).mean()


# ----------------------------------------------------------------------------------------
# training


class RewardModelTrainer:
    """Fits a RewardModel to {"prompt", "chosen", "rejected"} pairs with the one training loop."""

    def __init__(self, reward_model: RewardModel, tokenizer, config=None, logger=None,
                 show_progress: bool = False, seed: int = 0):
        # the seed passes the model config here; a RewardConfig sets the training knobs
        self.cfg = config if isinstance(config, RewardConfig) else RewardConfig()
        self.rm, self.tok = reward_model, tokenizer
        self.rm.tokenizer, self.rm.lm_coef = tokenizer, self.cfg.lm_coef
        self.logger, self.show_progress, self.seed = logger, show_progress, seed

    def encode(self, pairs) -> list[tuple[list[int], list[int]]]:
        return [(encode_reply(self.tok, p["prompt"], p["chosen"]), encode_reply(self.tok, p["prompt"], p["rejected"]))
                for p in pairs]

    def batch(self, encoded) -> tuple[np.ndarray, np.ndarray, int]:
        """Pairs -> idx (2B, L) [chosen rows, then rejected rows], last_index (2B,), B."""
        idx, last = pad_right([c for c, _ in encoded] + [r for _, r in encoded], self.rm.config.block_size)
        return idx, last, len(encoded)

    @staticmethod
    def shard(batch, rank, size):
        """This rank's pairs of a batch (its chosen rows and their rejected rows) and its share
        of the loss, a mean over pairs (distributed.py)."""
        idx, last, B = batch
        rows, share = pair_rows(B, rank, size)
        return (idx[rows], last[rows], len(rows) // 2), share

    def loss_fn(self, model, batch):
        idx, last, B = batch
        r = model.rewards(idx, last)                                   # (2B,)
        rc, rr = r[:B], r[B:]
        loss = pairwise_loss(rc, rr, self.cfg.margin)
        diff = rc.data - rr.data
        return loss, {"accuracy": float((diff > 0).mean()), "margin": float(diff.mean()),
                      "tokens": int((idx != PAD_ID).sum())}

    def pair_stats(self, encoded, batch_size: int | None = None) -> dict:
        """Accuracy (r_c > r_r), mean margin r_c - r_r and loss over pairs, no graph."""
        if not encoded:
            return {"accuracy": float("nan"), "margin": float("nan"), "loss": float("nan")}
        seqs = [c for c, _ in encoded] + [r for _, r in encoded]
        s = self.rm.score_ids(seqs, 2 * (batch_size or self.cfg.batch_size)).astype(np.float64)
        diff = s[:len(encoded)] - s[len(encoded):]
        loss = float(np.mean(np.logaddexp(0.0, -(diff - self.cfg.margin))))      # -log sigma(d - m)
        return {"accuracy": float((diff > 0).mean()), "margin": float(diff.mean()), "loss": loss, "diff": diff}

    def train(self, reward_data, epochs: float | None = None, val_data=None, center_replies=None,
              mismatch_replies=None, save=None, resume=None) -> dict:
        """Train on `reward_data` (pairs); `epochs` (seed API) overrides cfg.max_steps.
        val_data: held-out pairs for the accuracy curve; center_replies: [(prompt, reply)] whose
        mean score is moved to 0 afterwards; mismatch_replies: [(prompt, reply)] for
        the synthetic share of each batch (see synthetic_pairs); save / resume: as loop.train's.
        -> figures (accuracies, margins, bias shift, time)."""
        cfg = self.cfg
        if epochs is not None:
            cfg = replace(cfg, max_steps=max(1, math.ceil(epochs * len(reward_data) / cfg.batch_size)))
        cfg.validate("reward")
        if not reward_data:
            raise DataError("reward model: no preference pairs to train on")
        train_enc = self.encode(reward_data)
        val_enc = self.encode(val_data) if val_data else []

        pool = mismatch_replies or []
        n_mis = round(cfg.mismatch_frac * cfg.batch_size) if len(pool) > 1 else 0
        n_loop = round(cfg.loop_frac * cfg.batch_size) if pool else 0
        n_slip = round(cfg.slip_frac * cfg.batch_size) if pool else 0

        n_lab = min(cfg.batch_size - n_mis - n_loop - n_slip, len(train_enc))
        k = max(1, min(cfg.length_groups, len(train_enc) // max(n_lab, 1)))

        def get_batch(rng):
            # length grouping (as Hugging Face's group_by_length): draw k batches' worth, sort by
            # length, keep the j-th of k chunks. Every pair is as likely to be picked as before,
            # and rows of similar length pad less. Synthetic pairs: the same chunk of their own draw.
            j = int(rng.integers(k))
            lab = [train_enc[i] for i in rng.choice(len(train_enc), n_lab * k, replace=False)]
            syn = self.encode(synthetic_pairs(pool, n_mis * k, n_loop * k, rng, n_slip * k))
            return self.batch(_chunk(lab, k, j) + _chunk(syn, k, j))

        def evaluate(model):
            st = self.pair_stats(val_enc)
            return {k: v for k, v in st.items() if k != "diff"}

        # reward_head.bias cancels in r_chosen - r_rejected: its gradient is float noise, which Adam
        # would scale up to lr-sized steps. It only carries the centring shift, set after training.
        params = [(k, p) for k, p in self.rm.named_parameters() if k != "reward_head.bias"
                  and not (cfg.freeze_embeddings and k.startswith(("transformer.wte.", "transformer.wpe.")))]
        t0 = time.perf_counter()
        out = train(self.rm, cfg, get_batch, self.loss_fn, stage="reward", logger=self.logger,
                    evaluate=evaluate if val_enc else None, save=save, resume=resume, params=params, shard=self.shard,
                    rng=np.random.default_rng(self.seed), show_progress=self.show_progress)
        train_time = time.perf_counter() - t0
        figures = {"steps": cfg.max_steps, "train_time_s": train_time}
        # train accuracy on a fixed sample of the training pairs (the whole set costs too much time)
        sample = np.random.default_rng(self.seed + 2).permutation(len(train_enc))[:cfg.eval_train_pairs]
        tr = self.pair_stats([train_enc[i] for i in sample])
        figures.update(train_accuracy=tr["accuracy"], train_margin=tr["margin"], train_loss=tr["loss"])
        if val_enc:
            va = self.pair_stats(val_enc)
            figures.update(val_accuracy=va["accuracy"], val_margin=va["margin"], val_loss=va["loss"],
                           val_accuracy_start=out["evals"][0]["accuracy"] if out["evals"] else None)
            kinds = [p.get("kind", "?") for p in val_data]
            figures["val_accuracy_by_kind"] = {k: float((va["diff"][[i for i, q in enumerate(kinds) if q == k]] > 0).mean())
                                               for k in sorted(set(kinds))}
            figures["length_rule_accuracy"], figures["length_rule_by_kind"] = length_rule(val_data)
        if center_replies:
            figures["bias_shift"] = self.center(center_replies)
        return figures

    def center(self, pairs) -> float:
        """Shift reward_head.bias so the mean score of (prompt, reply) pairs is 0; -> the shift."""
        mean = float(self.rm.score([p for p, _ in pairs], [r for _, r in pairs], self.tok).astype(np.float64).mean())
        self.rm.reward_head.bias.data = (self.rm.reward_head.bias.data - mean).astype(self.rm.dtype)
        return -mean


def _chunk(pairs, k: int, j: int) -> list:
    """The j-th of k equal chunks of `pairs` sorted by their longer sequence."""
    pairs = sorted(pairs, key=lambda p: max(len(p[0]), len(p[1])))
    n = len(pairs) // k
    return pairs[j * n:(j + 1) * n]


# ----------------------------------------------------------------------------------------
# the stage


def run(ctx) -> dict:
    """Reward model stage for train.py: sft_final -> reward_model. -> headline figures."""
    cfg, tok = ctx.cfg.reward, ctx.tokenizer
    cfg.validate("reward")
    t0 = time.perf_counter()
    train_pairs, val_pairs = load_split(ctx.data_dir, "reward", seed=ctx.seed)
    rm = RewardModel.from_pretrained(ctx.load_model(STAGE.reads[0], GPT), ctx.cfg.model, seed=ctx.seed)
    resume = load_resume(ctx, rm, STAGE.name)
    try:
        sft_train, _ = load_split(ctx.data_dir, "sft", seed=ctx.seed)
    except DataError:
        sft_train = []         # no SFT data beside the pairs: no centring, no mismatched pairs
    replies = sft_replies(sft_train)
    pick = np.random.default_rng(ctx.seed).permutation(len(replies))[:cfg.center_samples]
    center = [replies[i] for i in pick]

    trainer = RewardModelTrainer(rm, tok, cfg, logger=ctx.logger, show_progress=ctx.show_progress, seed=ctx.seed)
    saver = make_saver(ctx, rm, STAGE, extra={"lm_coef": cfg.lm_coef})

    def save(kind, step, opt, rng):
        # the loop's periodic / interrupt checkpoints go through; the final one is written
        # below, after centring, so the stored bias is the centred one
        if kind != "final":
            saver(kind, step, opt, rng)

    # synthetic pairs from the SFT replies and the labelled chosen replies (both held-in)
    pool = list(dict.fromkeys(replies + [(p["prompt"], p["chosen"]) for p in train_pairs]))
    figures = trainer.train(train_pairs, val_data=val_pairs, center_replies=center, mismatch_replies=pool,
                            save=save, resume=resume)
    saver("final", figures["steps"], None, None)
    figures.update(headline=f"held-out pairwise acc {figures['val_accuracy']:.1%} (the longer reply: "
                            f"{figures['length_rule_accuracy']:.1%}), margin {figures['val_margin']:.2f}",
                   train_pairs=len(train_pairs), val_pairs=len(val_pairs), time_s=time.perf_counter() - t0)
    return figures


STAGE = Stage("reward", reads=("sft_final",), writes="reward_model", config=RewardConfig, tiny=TINY_OVERRIDES, run=run,
              data_parallel=True)
