"""DPO, Direct Preference Optimization (Rafailov et al. 2023): the reward model and PPO
replaced by one classification loss on the same preference pairs. Its own stage
(`python train.py --stage dpo`), not one of the five that `--stage all` runs.

For a prompt x with a chosen reply y_w and a rejected reply y_l, log pi(y|x) is the sum of the
reply's token log-probs (its closing <|im_end|> included, the prompt's tokens not):
    r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))      the implicit reward (the paper's eq. 5)
    loss  = -log sigma(r(y_w) - r(y_l))                 (eq. 7: the reward model's Bradley-Terry
                                                         loss, on implicit rewards)
pi starts from sft_final, pi_ref is a frozen copy of it; dropout is off in both (as TRL's
DPOTrainer), so at step 0 every implicit reward is exactly 0 and the loss is log 2. The
per-token log-probs and the frozen reference are the RL toolkit's (stages/policy.py).

Logged per step and on the held-out pairs (reward_val): loss, the mean chosen and rejected
rewards, their margin and the implicit-reward accuracy (r(y_w) > r(y_l); a tie counts one
half, so the untrained policy scores 50%). After training: the held-out accuracy per failure
kind, and the chat evaluation (test half) before and after."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import chat_eval
from ..config import ConfigError, LoopConfig
from ..data import DataError, load_split
from ..distributed import pair_rows
from ..loop import train
from ..tokenizer import IM_END_ID
from .common import Stage, load_resume, make_saver
from .policy import EpochOrder, build_batch, disable_dropout, frozen, logprobs_no_grad, token_logprobs
from .reward_model import pairwise_loss


@dataclass
class DPOConfig(LoopConfig):
    beta: float = 0.1                # the implicit reward's scale: how tightly pi is held to pi_ref (the paper's 0.1)
    max_steps: int = 150             # ~2.3 passes over the 1,049 training pairs at 16 a step
    batch_size: int = 16             # pairs per step (chosen and rejected rows share one forward)
    lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0        # decay would pull away from the SFT weights, not toward anything useful
    eval_every: int = 50
    log_every: int = 5
    eval_batch: int = 32             # pairs per no-grad forward on the held-out pairs
    chat_eval_tokens: int = 96       # greedy reply length for the chat evaluation (data/chat_eval.json)
    chat_eval_items: int = 0         # 0 = every item of its test half

    def validate(self, name: str = "dpo"):
        super().validate(name)
        if not self.beta > 0:
            raise ConfigError(f"{name}: beta must be positive, got {self.beta}")


TINY_OVERRIDES = {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "log_every": 2,
                  "eval_batch": 8, "chat_eval_tokens": 12, "chat_eval_items": 4}


# ----------------------------------------------------------------------------------------
# pairs, log-probs, the loss


def encode_pairs(tok, pairs, block_size: int) -> tuple[list, list]:
    """{"prompt", "chosen", "rejected"} -> [(prompt ids, chosen ids, rejected ids)], each reply
    closed with <|im_end|>, and the indices of the pairs kept: a pair is left out when a row
    would not fit block_size (prompt + reply - 1 tokens)."""
    out, kept = [], []
    for i, p in enumerate(pairs):
        prompt = tok.chat_prompt(p["prompt"])
        c, r = (tok.encode(p[k], allow_special=False) + [IM_END_ID] for k in ("chosen", "rejected"))
        if len(prompt) + max(len(c), len(r)) - 1 <= block_size:
            out.append((prompt, c, r))
            kept.append(i)
    return out, kept


def pair_batch(enc, dtype=np.float32):
    """Encoded pairs -> x, y, reply mask (2B, L): the B chosen rows, then the B rejected rows."""
    prompts = [p for p, _, _ in enc] * 2
    return build_batch(prompts, [c for _, c, _ in enc] + [r for _, _, r in enc], dtype)


def shard_pairs(batch, rank, size):
    """Under mpiexec: this rank's pairs of a pair_batch (+ reference log-probs), its chosen rows
    and their rejected rows, and its share of the loss, a mean over pairs (distributed.py)."""
    rows, share = pair_rows(len(batch[0]) // 2, rank, size)
    return tuple(a[rows] for a in batch), share


def reply_logprobs(model, x, y, mask):
    """log pi(reply | prompt) per row: (2B,) Tensor, the masked sum of token log-probs."""
    return (token_logprobs(model, x, y, mask=mask) * mask).sum(axis=1)


def dpo_loss(logp, ref_logp, beta: float):
    """logp (2B,) Tensor and ref_logp (2B,) array, chosen rows then rejected rows -> (mean DPO
    loss, {accuracy, margin, chosen_reward, rejected_reward} of the implicit rewards)."""
    B = logp.shape[0] // 2
    r = (logp - ref_logp) * beta                                 # implicit rewards (2B,)
    rc, rr = r[:B], r[B:]
    return pairwise_loss(rc, rr), reward_stats(rc.data, rr.data)


def reward_stats(rc: np.ndarray, rr: np.ndarray) -> dict:
    """Implicit rewards of chosen and rejected replies (N,) -> accuracy (a tie counts 1/2),
    mean margin, mean chosen and rejected reward, and the mean loss -log sigma(margin)."""
    d = np.asarray(rc, np.float64) - np.asarray(rr, np.float64)
    return {"accuracy": float(np.mean((d > 0) + 0.5 * (d == 0))), "margin": float(d.mean()),
            "chosen_reward": float(np.mean(rc)), "rejected_reward": float(np.mean(rr)),
            "loss_eval": float(np.mean(np.logaddexp(0.0, -d)))}


def pair_logprobs(model, enc, batch: int = 32) -> np.ndarray:
    """log pi(reply | prompt) of every pair's chosen and rejected reply -> (N, 2), dropout
    off, no graph."""
    out = np.zeros((len(enc), 2))
    for i in range(0, len(enc), batch):
        x, y, m = pair_batch(enc[i:i + batch], model.dtype)
        lp = (logprobs_no_grad(model, x, y, mask=m) * m).sum(1)
        n = len(lp) // 2
        out[i:i + n] = np.stack([lp[:n], lp[n:]], 1)
    return out


def implicit_rewards(model, ref_logp: np.ndarray, enc, beta: float, batch: int = 32) -> np.ndarray:
    """beta * (log pi - log pi_ref) of each pair's chosen and rejected reply -> (N, 2)."""
    return beta * (pair_logprobs(model, enc, batch) - ref_logp)


# ----------------------------------------------------------------------------------------
# the stage


def run(ctx) -> dict:
    """DPO stage for train.py: sft_final (+ a frozen copy) -> dpo_final. -> headline figures."""
    cfg, tok, t0 = ctx.cfg.dpo, ctx.tokenizer, time.perf_counter()
    cfg.validate("dpo")
    train_pairs, val_pairs = load_split(ctx.data_dir, "reward", seed=ctx.seed)
    T = ctx.cfg.model.block_size
    (train_enc, _), (val_enc, val_kept) = encode_pairs(tok, train_pairs, T), encode_pairs(tok, val_pairs, T)
    if not train_enc or not val_enc:
        raise DataError(f"{ctx.data_dir}: no preference pair fits the context of {T} tokens")
    val_kinds = [val_pairs[i].get("kind", "?") for i in val_kept]
    policy = disable_dropout(ctx.load_model(STAGE.reads[0]))
    ref = frozen(ctx.load_model(STAGE.reads[0]))
    resume = load_resume(ctx, policy, STAGE.name)
    ref_val = pair_logprobs(ref, val_enc, cfg.eval_batch)         # the reference never changes: once
    order = EpochOrder()

    def get_batch(rng):
        enc = [train_enc[order.next(rng, len(train_enc))] for _ in range(cfg.batch_size)]
        x, y, m = pair_batch(enc, policy.dtype)
        return x, y, m, (logprobs_no_grad(ref, x, y, mask=m) * m).sum(1)

    def loss_fn(model, batch):
        x, y, m, ref_logp = batch
        loss, stats = dpo_loss(reply_logprobs(model, x, y, m), ref_logp, cfg.beta)
        stats.pop("loss_eval")
        return loss, {**stats, "tokens": int(m.sum())}

    def evaluate(model):
        r = implicit_rewards(model, ref_val, val_enc, cfg.beta, cfg.eval_batch)
        return reward_stats(r[:, 0], r[:, 1])

    chat_items = chat_eval.load_chat_eval(ctx.data_dir)
    chat_before = None
    if chat_items is not None:
        chat_items = chat_eval.subset(chat_eval.dev_test_split(chat_items)[1], cfg.chat_eval_items)
        chat_before = chat_eval.evaluate_chat(ref, tok, chat_items, max_new_tokens=cfg.chat_eval_tokens, batch=32)
    tt = time.perf_counter()
    out = train(policy, cfg, get_batch, loss_fn, stage="dpo", logger=ctx.logger, evaluate=evaluate,
                save=make_saver(ctx, policy, STAGE), resume=resume, shard=shard_pairs,
                rng=np.random.default_rng(ctx.seed + 5), show_progress=ctx.show_progress)
    train_time = time.perf_counter() - tt
    last = out["evals"][-1]
    first = out["evals"][0] if out["evals"][0]["step"] == 0 and len(out["evals"]) > 1 else None   # eval_every 0: none
    r = implicit_rewards(policy, ref_val, val_enc, cfg.beta, cfg.eval_batch)
    by_kind = {k: reward_stats(r[[i for i, q in enumerate(val_kinds) if q == k], 0],
                               r[[i for i, q in enumerate(val_kinds) if q == k], 1])["accuracy"]
               for k in sorted(set(val_kinds))}
    start = f"{first['accuracy']:.0%} -> " if first else ""
    headline = (f"held-out implicit-reward accuracy {start}{last['accuracy']:.1%}, "
                f"margin {last['margin']:+.2f} (chosen {last['chosen_reward']:+.2f}, rejected {last['rejected_reward']:+.2f})")
    figures = {"val_accuracy": last["accuracy"], "val_accuracy_start": first["accuracy"] if first else None, "val_margin": last["margin"],
               "val_chosen_reward": last["chosen_reward"], "val_rejected_reward": last["rejected_reward"],
               "val_loss": last["loss_eval"], "val_accuracy_by_kind": by_kind, "train_pairs": len(train_enc),
               "val_pairs": len(val_enc), "pairs_too_long": len(train_pairs) + len(val_pairs) - len(train_enc) - len(val_enc), "beta": cfg.beta,
               "train_time_s": train_time, "step_time_s": out["step_time_s"]}
    if chat_before is not None:
        chat_after = chat_eval.evaluate_chat(policy, tok, chat_items, max_new_tokens=cfg.chat_eval_tokens, batch=32)
        ctx.logger.log("dpo", cfg.max_steps, **chat_eval.flat(chat_before, "chat_test_before_"),
                       **chat_eval.flat(chat_after, "chat_test_after_"))
        headline = f"{chat_eval.change_headline(chat_before, chat_after)}; {headline}"
        figures.update(**chat_eval.flat(chat_before, "chat_before_"), **chat_eval.flat(chat_after, "chat_after_"),
                       samples=chat_eval.samples(chat_before, chat_after, n=8))
    return {"headline": headline, **figures, "time_s": time.perf_counter() - t0}


STAGE = Stage("dpo", reads=("sft_final",), writes="dpo_final", config=DPOConfig, tiny=TINY_OVERRIDES, run=run,
              in_all=False, data_parallel=True)
