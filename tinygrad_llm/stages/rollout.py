"""The rollout shared by PPO (rlhf.py) and GRPO (rlvf.py): sample replies with the KV
cache, then lay prompt + reply out as one right-padded batch on which the training forward
recomputes per-token log-probs (so old and new log-probs come from the same computation and
the first PPO ratio is exactly 1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import engine as E
from ..engine import Tensor
from ..nn import evaluating
from ..tokenizer import IM_END_ID, PAD_ID


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


def chat_prompt(tok, user_text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True)


def build_batch(prompts: list, replies: list, dtype=np.float32):
    """prompt + reply per row -> x, y, action_mask (B, L), right-padded."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies)]
    L = max(len(s) for s in seqs) - 1
    B = len(seqs)
    x = np.full((B, L), PAD_ID, np.int64)
    y = np.full((B, L), PAD_ID, np.int64)
    m = np.zeros((B, L), dtype)
    for b, (s, p, r) in enumerate(zip(seqs, prompts, replies)):
        n = len(s) - 1
        x[b, :n], y[b, :n] = s[:-1], s[1:]
        m[b, len(p) - 1:len(p) - 1 + len(r)] = 1.0      # y[t] is reply token t - (len(p) - 1)
    return x, y, m


def rollout(policy, tok, user_prompts: list[str], *, samples: int = 1, temperature: float = 1.0,
            max_new_tokens: int = 64, rng=None, top_k=None, top_p=None) -> Rollout:
    """Sample `samples` replies per prompt (rows grouped by prompt: prompt i owns rows
    i*samples ... i*samples + samples - 1)."""
    prompts = [chat_prompt(tok, u) for u in user_prompts for _ in range(samples)]
    gen = policy.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_tokens=(IM_END_ID,), rng=rng, return_logprobs=True)
    replies = gen.replies()
    # a reply must hold at least one action; an empty one cannot happen (>= 1 token sampled)
    x, y, m = build_batch(gen.prompts, replies, policy.dtype)
    texts = [tok.decode(r) for r in replies]
    return Rollout(x, y, m, gen.prompts, replies, texts, gen.finished.copy(), gen.logprobs)


def token_logprobs(model, x, y, temperature: float = 1.0) -> Tensor:
    """log pi(y_t | x_<=t) under softmax(logits / temperature): (B, L) Tensor (with a graph
    when grad mode is on). Uses the fused cross-entropy: logp = -CE(reduction="none")."""
    logits, _ = model(x)
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    return -E.cross_entropy(logits, y, reduction="none")


def logprobs_no_grad(model, x, y, temperature: float = 1.0) -> np.ndarray:
    """Same as token_logprobs, evaluated with dropout off and no graph."""
    with evaluating(model):
        return token_logprobs(model, x, y, temperature).data
