"""MyLLMTokenizer: character level, with the special tokens and chat template of DESIGN.md.

    tok = MyLLMTokenizer(); tok.build_vocab(texts)
    ids = tok.encode("你好")            # unknown characters -> <UNK> (id 1), never an error
    tok.decode(ids)                     # special tokens skipped unless asked
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections import Counter

PAD, UNK, BOS, EOS, IM_START, IM_END = "<PAD>", "<UNK>", "<BOS>", "<EOS>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IM_START, IM_END]       # ids 0..5, fixed by contract
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(6)

# Characters always in the vocabulary, whatever the corpus: digits, ASCII letters and
# punctuation, common full-width punctuation and maths symbols (so a user's "7×8=?" encodes).
BASE_CHARS = (string.digits + string.ascii_letters + string.punctuation + " \n"
              + "，。！？、；：“”‘’（）《》【】…—·％＋－×÷＝＜＞～０１２３４５６７８９")

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class MyLLMTokenizer:
    def __init__(self, vocab_size: int = 6400):
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        self.max_vocab_size = vocab_size
        self.itos: list[str] = list(SPECIAL_TOKENS)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    # ids of the special tokens, by name
    pad_id, unk_id, bos_id, eos_id, im_start_id, im_end_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID

    def fingerprint(self) -> str:
        """sha256 of the vocabulary: checkpoints record it so a model is never paired with
        a different vocabulary."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def build_vocab(self, text_or_texts) -> "MyLLMTokenizer":
        """Specials first, then the characters of the texts plus BASE_CHARS, most frequent
        first (ties by code point, so the result is deterministic), capped at vocab_size."""
        texts = [text_or_texts] if isinstance(text_or_texts, str) else list(text_or_texts)
        counts = Counter()
        for t in texts:
            counts.update(_SPECIAL_RE.sub("", t))
        room = self.max_vocab_size - len(SPECIAL_TOKENS)
        base = [c for c in dict.fromkeys(BASE_CHARS)]
        rest = sorted((c for c in counts if c not in set(base)), key=lambda c: (-counts[c], c))
        # the base set is always kept; the corpus's rarest characters go first if over the cap
        chars = base[:room] + rest[: max(0, room - len(base))]
        chars.sort(key=lambda c: (-counts.get(c, 0), c))
        self.itos = list(SPECIAL_TOKENS) + chars
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        return self

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Characters -> ids. With allow_special the literal strings of special tokens
        (e.g. "<|im_end|>") become their ids; user content is encoded with allow_special=False
        so it cannot inject template tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        parts = _SPECIAL_RE.split(text) if allow_special else [text]
        ids = []
        for part in parts:
            if allow_special and part in self.stoi and part in SPECIAL_TOKENS:
                ids.append(self.stoi[part])
            else:
                ids.extend(self.stoi.get(c, UNK_ID) for c in part)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} outside the vocabulary [0, {len(self.itos)})")
            if skip_special_tokens and i < len(SPECIAL_TOKENS):
                continue
            out.append(self.itos[i])
        return "".join(out)

    # -- chat template -------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        """<|im_start|>{role}\\n{content}<|im_end|>\\n per message, then (optionally) the
        assistant header. tokenize=True returns ids, encoding message content without
        special-token parsing."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        ids, text = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content'")
            text.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
            ids += [IM_START_ID] + self.encode(f"{m['role']}\n", False) + self.encode(m["content"], False) \
                + [IM_END_ID] + self.encode("\n", False)
        if add_generation_prompt:
            text.append(f"{IM_START}assistant\n")
            ids += [IM_START_ID] + self.encode("assistant\n", False)
        return ids if tokenize else "".join(text)

    def chat_prompt(self, user_text: str) -> list[int]:
        """The ids of one user turn and the assistant header: what a model replies to."""
        return self.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        tokenize=True)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> None:
        """Vocabulary as JSON, written atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": "tinygrad_llm-char-vocab", "version": 1, "itos": self.itos}, f, ensure_ascii=False)
        os.replace(tmp, path)

    def load(self, path) -> "MyLLMTokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None
        except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, a huge number, deep nesting
            raise ValueError(f"{path}: not a valid vocabulary JSON file ({(str(e).splitlines() or ['?'])[0]})") from None
        itos = obj.get("itos") if isinstance(obj, dict) else None
        if not isinstance(itos, list) or itos[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS \
                or not all(isinstance(c, str) for c in itos) or len(set(itos)) != len(itos):
            raise ValueError(f"{path}: vocabulary must list the special tokens {SPECIAL_TOKENS} first, then unique characters")
        self.itos = itos
        self.stoi = {t: i for i, t in enumerate(itos)}
        self.max_vocab_size = max(self.max_vocab_size, len(itos))
        return self

    @classmethod
    def from_file(cls, path) -> "MyLLMTokenizer":
        return cls().load(path)
