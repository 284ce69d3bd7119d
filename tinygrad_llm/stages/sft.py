"""Stage 2: supervised fine-tuning on chat conversations.

Starts from pretrain_final. Each conversation is laid out with the chat template; the loss
is on assistant tokens only, including their closing <|im_end|> (so the model learns to
stop), with system and user tokens masked. Held-out figures: assistant-token loss, the
share of replies to unseen prompts that close with <|im_end|>, and, when the data holds
chat_eval.json, the chat evaluation (chat_eval.py: share of acceptable greedy replies to
everyday prompts; refusals, loops; harmful prompts refused).

With --lora.r > 0 only low-rank adapters on the targeted projections train (lora.py) and the
stage writes them alone, as sft_lora (an adapter checkpoint tied to pretrain_final), not sft_final."""
from __future__ import annotations

import string
import time
from dataclasses import dataclass

import numpy as np

from .. import chat_eval, lora
from ..config import ConfigError, LoopConfig
from ..data import FILES, DataError, data_file, first_turns, load_split, pad_batch, sft_examples
from ..distributed import shard_rows
from ..logprobs import masked_loss
from ..loop import train
from ..model import GPT
from ..tokenizer import IM_END_ID, IM_START_ID
from .common import Stage, chat_eval_after, load_resume, make_saver
from .task_eval import evaluate_tasks


@dataclass
class SFTConfig(LoopConfig):
    max_steps: int = 2600            # ~3.4 passes over the 12,281 conversations; 1,000 steps left the model
                                    # underfit: chat 45% -> 57%, tasks 29% -> 37% at 1,400 (bench/README.md, SFT steps);
                                    # length-grouped batches (group_by_length) pay for 1,800; "The budget, ..." for 2,200;
                                    # 2,600 with the time two-thread decoding saved: tasks +6 / +3 / +4 on three seeds ("SFT steps, again")
    warmup_steps: int = 30
    eval_every: int = 200
    eval_prompts: int = 48          # held-out prompts answered (greedy) for the <|im_end|> rate
    max_new_tokens: int = 96
    chat_eval_tokens: int = 96      # reply length for the chat evaluation (data/chat_eval.json)
    chat_eval_items: int = 0        # 0 = every item of the chat evaluation
    group_by_length: int = 8        # batches of similar length (length_grouped) from this many
                                    # batches' worth of examples; 1 = plain random batches
    neftune_alpha: float = 2.0      # NEFTune (Jain et al. 2023): uniform noise of magnitude alpha / sqrt(L * C),
                                    # L the batch's length, on the token embeddings while training; 0 = off.
                                    # 2: held-out chat up, tasks kept; 5 cost the tasks, 15 everything
                                    # (bench/README.md, "Phrasings round 4, and noise on the embeddings")
    prompt_dropout: float = 0.0     # each character of a user turn is left out of the training row with this
                                    # probability (word dropout on the prompt; digits, numerals, operators,
                                    # negations and Latin letters kept: PROTECTED); 0 = off. 0.1 / 0.2 cost
                                    # 5 chat points (bench/README.md, "Word dropout on the prompt")

    def validate(self, name: str = "sft"):
        super().validate(name)
        if self.group_by_length < 1:
            raise ConfigError(f"{name}: group_by_length must be >= 1 (1: plain random batches)")
        if self.neftune_alpha < 0:
            raise ConfigError(f"{name}: neftune_alpha must be >= 0 (0: off), got {self.neftune_alpha}")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"{name}: prompt_dropout must be in [0, 1) (0: off), got {self.prompt_dropout}")


LORA_WRITES = "sft_lora"          # with --lora.r > 0: the adapter checkpoint, instead of sft_final
TINY_OVERRIDES = {"max_steps": 40, "batch_size": 8, "eval_every": 20, "eval_prompts": 8, "max_new_tokens": 24,
                  "warmup_steps": 5, "chat_eval_tokens": 24, "chat_eval_items": 8}


def length_grouped(rng, lengths: np.ndarray, batch_size: int, group: int) -> np.ndarray:
    """Indices of one batch of examples of similar length, so that right-padding wastes little
    (Hugging Face Trainer's group_by_length, without its state): draw group * batch_size
    examples at random, sort them by length, and take one of the `group` slices at random.
    Every example is as likely to be drawn as with plain random batches; the draw uses only
    `rng`, so a resumed run draws the batches an uninterrupted one would."""
    idx = rng.integers(0, len(lengths), batch_size * group)
    idx = idx[np.argsort(lengths[idx], kind="stable")]
    g = int(rng.integers(group))
    return idx[g * batch_size:(g + 1) * batch_size]


# characters prompt dropout never removes: the ones a reply restates or whose loss flips the meaning
PROTECTED = set("0123456789一二三四五六七八九十百千万两零几+-×÷=＋－加减乘除不没无非别否未") | set(string.ascii_letters)


def droppable(tok, ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` (a chat-template row) that prompt dropout may remove: the content
    characters of user turns, minus PROTECTED ones."""
    head = [IM_START_ID] + tok.encode("user\n", False)
    keep = np.array([c in PROTECTED for c in tok.itos])
    out, i, n = np.zeros(len(ids), bool), 0, len(head)
    while i < len(ids):
        if ids[i] == IM_START_ID and list(ids[i:i + n]) == head:
            j = i + n
            while j < len(ids) and ids[j] != IM_END_ID:
                out[j] = not keep[ids[j]]
                j += 1
            i = j
        i += 1
    return out


def drop_prompt_chars(ids: np.ndarray, mask: np.ndarray, can_drop: np.ndarray, p: float, rng):
    """Word dropout on the prompt: each position in `can_drop` is removed with probability p
    (the reply and its loss mask untouched) -> the shorter (ids, mask)."""
    gone = can_drop & (rng.random(len(ids)) < p)
    return ids[~gone], mask[~gone]


def reply_eos_rate(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 16):
    """Greedy replies to `prompts` -> (share closed with <|im_end|>, reply texts)."""
    texts, closed = chat_eval.generate_replies(model, tok, prompts, max_new_tokens, batch)
    return sum(closed) / max(1, len(prompts)), texts


def run(ctx) -> dict:
    cfg, tok = ctx.cfg.sft, ctx.tokenizer
    cfg.validate("sft")
    T = ctx.cfg.model.block_size
    train_convs, val_convs = load_split(ctx.data_dir, "sft", seed=ctx.seed)
    train_ex = sft_examples(tok, train_convs, T)
    val_ex = sft_examples(tok, val_convs, T)
    if not train_ex or not val_ex:
        raise DataError(f"{ctx.data_dir}: no SFT conversation with an assistant reply fits the context")
    val_prompts = [u for u, _ in map(first_turns, val_convs) if u is not None][: cfg.eval_prompts]

    model = ctx.load_model(STAGE.reads[0], GPT)
    lora_cfg = getattr(ctx.cfg, "lora", None)
    save_final = None
    if lora_cfg is not None and lora_cfg.r:        # adapters only (lora.py); the base stays as it is
        lora.apply_lora(model, lora_cfg, seed=ctx.seed)

        def save_final(step):
            lora.save_adapter(ctx.ckpt(LORA_WRITES), model, lora_cfg, ctx.ckpt(STAGE.reads[0]), stage="sft",
                              step=step, vocab_sha=ctx.vocab_sha)
    trainable = int(sum(p.size for _, p in model.named_parameters()))
    resume = load_resume(ctx, model, STAGE.name)
    before_eos, before_texts = reply_eos_rate(model, tok, val_prompts[:5], cfg.max_new_tokens)

    lengths = np.array([len(ids) for ids, _ in train_ex])
    can_drop = [droppable(tok, ids) for ids, _ in train_ex] if cfg.prompt_dropout else None

    def get_batch(rng):
        if cfg.group_by_length > 1:
            rows = length_grouped(rng, lengths, cfg.batch_size, cfg.group_by_length)
        else:
            rows = rng.integers(0, len(train_ex), cfg.batch_size)
        batch = [train_ex[i] for i in rows]
        if can_drop is not None:
            batch = [drop_prompt_chars(ids, m, can_drop[i], cfg.prompt_dropout, rng) for (ids, m), i in zip(batch, rows)]
        x, y, m = pad_batch(batch)
        if not cfg.neftune_alpha:
            return x, y, m
        # NEFTune: the noise is drawn here, from the loop's RNG, so a resumed run draws the same
        B, L = x.shape                                      # L: this batch's padded length
        C = model.config.n_embd
        mag = cfg.neftune_alpha / np.sqrt(L * C)
        return x, y, m, rng.uniform(-mag, mag, (B, L, C)).astype(model.dtype)

    def loss_fn(model, batch):
        x, y, m, *noise = batch
        return masked_loss(model, x, y, m, emb_noise=noise[0] if noise else None), {"tokens": x.size}

    def shard(batch, rank, size):
        # the loss is a mean over assistant tokens: a rank's share is its rows' share of them
        return shard_rows(batch, rank, size, count=batch[2].sum(axis=1))

    def evaluate(model):
        # assistant-token loss over the whole held-out split, weighted by tokens
        total, count = 0.0, 0.0
        for i in range(0, len(val_ex), cfg.batch_size):
            x, y, m = pad_batch(val_ex[i:i + cfg.batch_size])
            total += float(masked_loss(model, x, y, m).data) * m.sum()
            count += m.sum()
        return {"loss": total / count}

    t0 = time.perf_counter()
    out = train(model, cfg, get_batch, loss_fn, stage="sft", logger=ctx.logger, evaluate=evaluate,
                save=make_saver(ctx, model, STAGE, final=save_final), resume=resume, shard=shard,
                rng=np.random.default_rng(ctx.seed + 1), show_progress=ctx.show_progress)
    train_time = time.perf_counter() - t0
    eos_rate, texts = reply_eos_rate(model, tok, val_prompts, cfg.max_new_tokens)
    samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(val_prompts[:5], before_texts, texts[:5])]
    chat = chat_eval_after(ctx, model, "sft", cfg.max_steps, cfg.chat_eval_items, cfg.chat_eval_tokens)
    if chat is not None:
        samples += chat_eval.samples(None, chat, n=8)
    tasks = task_eval_after(ctx, model)
    last = out["evals"][-1]
    headline = f"held-out loss {last['loss']:.3f}, {eos_rate:.0%} replies close with <|im_end|>"
    if tasks:
        headline = (f"tasks {tasks['task_acc']:.0%} (math {tasks['task_math_acc']:.0%}, "
                    f"logic {tasks['task_logic_acc']:.0%}); {headline}")
    if chat is not None:
        headline = f"{chat_eval.headline(chat)}; {headline}"
    if save_final is not None:
        headline = f"LoRA r={lora_cfg.r} ({trainable:,} trainable parameters); {headline}"
    return {"headline": headline, "checkpoint": str(ctx.ckpt(LORA_WRITES if save_final else STAGE.writes)),
            "trainable_params": trainable, "step_time_s": out["step_time_s"],
            "val_loss": last["loss"], "val_loss_start": out["evals"][0]["loss"], "eos_rate": eos_rate,
            "eos_rate_before": before_eos, "train_time_s": train_time, "samples": samples,
            "train_conversations": len(train_ex), "val_conversations": len(val_ex), **chat_eval.flat(chat), **tasks}


def task_eval_after(ctx, model) -> dict:
    """Greedy accuracy on the held-out verifiable tasks (rlvf_val), RLVF's starting point
    ({} when the data has no RLVF split). Logged as task_* at the stage's last step."""
    if data_file(ctx.data_dir, FILES["rlvf"]) is None:
        return {}
    _, val_tasks = load_split(ctx.data_dir, "rlvf", seed=ctx.seed)
    ev = evaluate_tasks(model, ctx.tokenizer, val_tasks, samples=0, max_new_tokens=ctx.cfg.rlvf.max_new_tokens)
    out = {"task_acc": ev["accuracy"], "task_math_acc": ev.get("math_accuracy", 0.0),
           "task_logic_acc": ev.get("logic_accuracy", 0.0), "task_by_kind": ev["by_kind"]}
    ctx.logger.log("sft", ctx.cfg.sft.max_steps, **{k: v for k, v in out.items() if k != "task_by_kind"})
    return out


STAGE = Stage("sft", reads=("pretrain_final",), writes="sft_final", config=SFTConfig, tiny=TINY_OVERRIDES, run=run,
              data_parallel=True)
