"""The batch builders: pretraining windows (with reading drills mixed in), chat conversations
laid out with the chat template and their loss mask, right-padded batches. data.py loads and
validates the files these read; its names for them (data.pad_batch, ...) still work."""
from __future__ import annotations

import numpy as np

from .tokenizer import PAD_ID, MyLLMTokenizer

def pretrain_batch(ids: np.ndarray, batch_size: int, block_size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of block_size + 1 tokens -> x, y (B, T)."""
    if len(ids) <= block_size + 1:
        raise DataError(f"corpus has {len(ids)} tokens, fewer than block_size + 2 = {block_size + 2}")
    starts = rng.integers(0, len(ids) - block_size - 1, batch_size)
    win = ids[starts[:, None] + np.arange(block_size + 1)]
    return win[:, :-1], win[:, 1:]


def mixed_pretrain_batch(ids: np.ndarray, drill_ids: np.ndarray | None, share: float, batch_size: int,
                         block_size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """pretrain_batch() whose first round(share * batch_size) rows are windows of the drills."""
    n = 0 if drill_ids is None else int(round(share * batch_size))
    if n == 0:
        return pretrain_batch(ids, batch_size, block_size, rng)
    xd, yd = pretrain_batch(drill_ids, n, block_size, rng)
    if n == batch_size:
        return xd, yd
    x, y = pretrain_batch(ids, batch_size - n, block_size, rng)
    return np.concatenate([xd, x]), np.concatenate([yd, y])


def encode_chat(tok: MyLLMTokenizer, messages, block_size: int) -> tuple[list[int], list[int]]:
    """Chat template ids and a loss mask that is 1 on assistant content and its closing
    <|im_end|> (the model must learn to stop), 0 on system/user turns and headers."""
    ids, mask = [], []
    for m in messages:
        head = tok.apply_chat_template([m], add_generation_prompt=False, tokenize=True)
        # head = <|im_start|> role \n content <|im_end|> \n
        n_head = 1 + len(tok.encode(m["role"] + "\n", False))
        n_body = len(head) - n_head - 1            # content + <|im_end|>
        learn = 1 if m["role"] == "assistant" else 0
        ids += head
        mask += [0] * n_head + [learn] * n_body + [0]
    return ids[:block_size + 1], mask[:block_size + 1]


def sft_examples(tok, convs, block_size) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation -> (x, y, mask) shifted by one; conversations with no learnable token
    left after truncation are dropped."""
    out = []
    for conv in convs:
        ids, mask = encode_chat(tok, conv, block_size)
        if sum(mask[1:]) > 0:
            out.append((np.array(ids, np.int64), np.array(mask, np.float32)))
    return out


def pad_rows(rows, fill, dtype) -> np.ndarray:
    """Sequences of different lengths -> (B, L) array of `dtype`, each row right-padded with
    `fill` to the longest: the one padding every batch builder uses."""
    out = np.full((len(rows), max(len(r) for r in rows)), fill, dtype)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def pad_batch(examples, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(ids, mask)] -> x, y, loss_mask (B, T) right-padded to the longest example (x, y with
    <PAD>, the mask with 0)."""
    x = pad_rows([ids[:-1] for ids, _ in examples], PAD_ID, np.int64)
    y = pad_rows([ids[1:] for ids, _ in examples], PAD_ID, np.int64)
    return x, y, pad_rows([mask[1:] for _, mask in examples], 0, dtype)


def build_batch(prompts: list, replies: list, dtype=np.float32):
    """prompt + reply per row -> x, y, action_mask (B, L), right-padded (pad_batch with the
    mask on the reply tokens: y[t] is reply token t - (len(prompt) - 1)). The RL stages' and
    DPO's layout, and rerank's."""
    return pad_batch([(list(p) + list(r), [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, replies)], dtype)


def first_turns(conv) -> tuple[str | None, str | None]:
    """A conversation's first user turn and the assistant reply right after it (None where
    there is none): the prompt an RL stage samples from, the reply the SFT data gives it.
    Later turns lean on their context, so alone they are not fair prompts."""
    for i, m in enumerate(conv):
        if m["role"] == "user":
            nxt = conv[i + 1] if i + 1 < len(conv) else None
            return m["content"], nxt["content"] if nxt is not None and nxt["role"] == "assistant" else None
    return None, None
