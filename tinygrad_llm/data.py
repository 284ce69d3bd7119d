"""Loading and validating every data file, and the batch builders.

Bad input gets one clear line naming the file and the item (DataError), never a traceback
from deep inside. Formats (DESIGN.md): pretrain_data.txt (or .jsonl of {"text"} lines, or a
directory of .txt files); sft_data.json; reward_data.json; rlvf_data.json. A held-out split
sits beside each as *_val.* (pretrain_val.txt, sft_val.json, reward_val.json, rlvf_val.json);
without one, a seeded 10% of the training file is held out instead."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .tokenizer import IM_END_ID, PAD_ID, MyLLMTokenizer

FILES = {"pretrain": "pretrain_data.txt", "sft": "sft_data.json", "reward": "reward_data.json", "rlvf": "rlvf_data.json"}
DRILLS_FILE = "pretrain_drills.txt"   # optional: reading drills the pretrain stage mixes in (see drill_share)
VAL_FILES = {"pretrain": "pretrain_val.txt", "sft": "sft_val.json", "reward": "reward_val.json", "rlvf": "rlvf_val.json"}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the item."""


# ----------------------------------------------------------------------------------------
# reading files


def read_text(path) -> str:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def read_json(path):
    """The parsed file; every failure is one DataError line. Syntax errors give file:line:col;
    json also raises RecursionError (nesting too deep) and a plain ValueError (an integer of
    more than 4300 digits), which would otherwise escape as tracebacks."""
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        raise DataError(f"{path}: unreadable JSON value: {(str(e).splitlines() or ['?'])[0]}") from None
    return _refuse_lone_surrogates(obj, text, path)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(obj, text: str, where):
    """JSON escapes like \\ud800 decode to lone UTF-16 surrogates: strings that are not text,
    that no UTF-8 file can hold (saving the vocabulary would crash). Valid UTF-8 input can only
    produce them through such escapes, so the check runs only when one is present."""
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not a character") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
    return obj


def _json_list(path) -> list:
    items = read_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: the list is empty")
    return items


def _str_field(path, i, item, key, allow_empty=False) -> str:
    if not isinstance(item, dict):
        raise DataError(f"{path}: item {i}: expected an object, got {type(item).__name__}")
    if key not in item:
        raise DataError(f"{path}: item {i}: missing field '{key}'")
    val = item[key]
    if not isinstance(val, str):
        raise DataError(f"{path}: item {i}: field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DataError(f"{path}: item {i}: field '{key}' is empty")
    return val


def load_pretrain_text(path) -> str:
    """A .txt file, a .jsonl file of {"text": ...} lines, or a directory of .txt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"{path}: directory holds no .txt files")
        text = "\n".join(read_text(f) for f in files)
    elif path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}:{e.colno}: malformed JSON line: {e.msg}") from None
            except (RecursionError, ValueError):   # see read_json
                raise DataError(f"{path}:{n}: unreadable JSON line (nested too deeply or a huge number)") from None
            obj = _refuse_lone_surrogates(obj, line, f"{path}:{n}")
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected an object with a 'text' field")
            parts.append(_str_field(path, f"on line {n}", obj, "text", allow_empty=True))
        text = "\n".join(parts)
    else:
        text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the corpus is empty")
    return text


def load_sft(path) -> list[list[dict]]:
    """-> conversations as message lists [{"role", "content"}, ...] with >= 1 assistant turn."""
    convs = []
    for i, item in enumerate(_json_list(path)):
        if isinstance(item, dict) and "messages" in item:
            msgs = item["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{path}: item {i}: 'messages' must be a non-empty list")
            conv = []
            for j, m in enumerate(msgs):
                role = _str_field(path, f"{i} message {j}", m, "role")
                if role not in ROLES:
                    raise DataError(f"{path}: item {i} message {j}: unknown role {role!r} (use {', '.join(ROLES)})")
                conv.append({"role": role, "content": _str_field(path, f"{i} message {j}", m, "content")})
            if not any(m["role"] == "assistant" for m in conv):
                raise DataError(f"{path}: item {i}: no assistant message to learn from")
        else:
            conv = [{"role": "user", "content": _str_field(path, i, item, "user")},
                    {"role": "assistant", "content": _str_field(path, i, item, "assistant")}]
        convs.append(conv)
    return convs


def load_reward(path) -> list[dict]:
    """-> [{"prompt", "chosen", "rejected"}]; extra fields (e.g. "kind") are kept and ignored."""
    out = []
    for i, item in enumerate(_json_list(path)):
        pair = {k: _str_field(path, i, item, k) for k in ("prompt", "chosen", "rejected")}
        out.append({**item, **pair})
    return out


def load_rlvf(path) -> list[dict]:
    """-> [{"type", "prompt", "expected_answer" (str), "keywords" (list, optional)}]."""
    out = []
    for i, item in enumerate(_json_list(path)):
        typ = _str_field(path, i, item, "type")
        if typ not in ("math", "logic"):
            raise DataError(f"{path}: item {i}: type must be 'math' or 'logic', got {typ!r}")
        prompt = _str_field(path, i, item, "prompt")
        ans = item.get("expected_answer")
        if isinstance(ans, (int, float)) and not isinstance(ans, bool):
            ans = str(ans)
        if not isinstance(ans, str) or not ans.strip():
            raise DataError(f"{path}: item {i}: 'expected_answer' must be a non-empty string or number")
        kw = item.get("keywords", [])
        if not isinstance(kw, list) or not all(isinstance(k, str) for k in kw):
            raise DataError(f"{path}: item {i}: 'keywords' must be a list of strings")
        out.append({**item, "type": typ, "prompt": prompt, "expected_answer": ans, "keywords": kw})
    return out


LOADERS = {"pretrain": load_pretrain_text, "sft": load_sft, "reward": load_reward, "rlvf": load_rlvf}


def load_drills(data_dir) -> str | None:
    """The reading drills (pretrain_drills.txt) or None when the directory has none."""
    path = Path(data_dir) / DRILLS_FILE
    return read_text(path) if path.exists() else None


def pretrain_path(data_dir) -> Path:
    """pretrain_data.txt, else pretrain_data.jsonl, else a pretrain/ directory of .txt files."""
    d = Path(data_dir)
    for cand in (d / "pretrain_data.txt", d / "pretrain_data.jsonl", d / "pretrain"):
        if cand.exists():
            return cand
    raise DataError(f"{d}: no pretrain_data.txt, pretrain_data.jsonl or pretrain/ directory")


def load_split(data_dir, kind: str, seed: int = 0, val_frac: float = 0.1):
    """-> (train, val) for `kind` in pretrain/sft/reward/rlvf, using the *_val file if present."""
    d = Path(data_dir)
    path = pretrain_path(d) if kind == "pretrain" else d / FILES[kind]
    train = LOADERS[kind](path)
    vpath = d / VAL_FILES[kind]
    if vpath.exists():
        return train, LOADERS[kind](vpath)
    if kind == "pretrain":                      # the last part of the stream
        cut = int(len(train) * (1 - val_frac))
        return train[:cut], train[cut:]
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(len(train) * val_frac))
    if len(train) < 2:
        raise DataError(f"{path}: need at least 2 items to hold some out (or provide {vpath.name})")
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]


def all_texts(data_dir) -> list[str]:
    """Every piece of text in the data directory, for building the vocabulary."""
    texts = []
    d = Path(data_dir)
    for kind in FILES:
        try:
            train, val = load_split(d, kind)
        except DataError:
            if kind == "pretrain":
                raise
            continue
        for part in (train, val):
            if isinstance(part, str):
                texts.append(part)
            else:
                texts.extend(json.dumps(x, ensure_ascii=False) for x in part)
    drills = load_drills(d)
    if drills:
        texts.append(drills)
    return texts


# ----------------------------------------------------------------------------------------
# batch builders


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


def pad_batch(examples, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(ids, mask)] -> x, y, loss_mask (B, T) right-padded to the longest example."""
    T = max(len(ids) for ids, _ in examples) - 1
    B = len(examples)
    x = np.full((B, T), PAD_ID, np.int64)
    y = np.full((B, T), PAD_ID, np.int64)
    m = np.zeros((B, T), dtype)
    for b, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[b, :n], y[b, :n], m[b, :n] = ids[:-1], ids[1:], mask[1:]
    return x, y, m


def ends_with_im_end(reply_ids) -> bool:
    return len(reply_ids) > 0 and int(reply_ids[-1]) == IM_END_ID
