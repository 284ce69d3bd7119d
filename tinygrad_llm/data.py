"""Loading and validating every data file (the batch builders: batches.py).

Bad input gets one clear line naming the file and the item (DataError), never a traceback
from deep inside. Formats (DESIGN.md, "Data files"): pretrain_data.txt (or .jsonl of {"text"}
lines, or a directory of .txt files); sft_data.json; reward_data.json; rlvf_data.json; the
chat evaluation's chat_eval.json (chat_eval.py). Every .json list may instead be a .jsonl file
of the same name, one object a line (read_items, the one reader of both); preference data may
also be TRL's conversational form (load_reward). A held-out split sits beside each as *_val.*
(pretrain_val.txt, sft_val.json, reward_val.json, rlvf_val.json); without one, a seeded 10% of
the training file is held out instead."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


FILES = {"pretrain": "pretrain_data.txt", "sft": "sft_data.json", "reward": "reward_data.json", "rlvf": "rlvf_data.json"}
DRILLS_FILE = "pretrain_drills.txt"   # optional: reading drills the pretrain stage mixes in (see drill_share)
VAL_FILES = {"pretrain": "pretrain_val.txt", "sft": "sft_val.json", "reward": "reward_val.json", "rlvf": "rlvf_val.json"}
ROLES = ("system", "user", "assistant")
PAIR = ("prompt", "chosen", "rejected")


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


def _parse(text: str, path, line: int | None = None):
    """json.loads of a whole file (line None) or of one .jsonl line, every failure one DataError
    line: syntax errors give file:line:col; json also raises RecursionError (nesting too deep)
    and a plain ValueError (an integer of more than 4300 digits), which would otherwise escape
    as tracebacks."""
    where, what = (str(path), "JSON") if line is None else (f"{path}:{line}", "JSON line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno if line is None else line}:{e.colno}: malformed {what}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: {what} nested too deeply") from None
    except ValueError as e:
        raise DataError(f"{where}: unreadable {what} value: {(str(e).splitlines() or ['?'])[0]}") from None
    return _refuse_lone_surrogates(obj, text, where)


def read_json(path):
    """The parsed file; every failure is one DataError line (see _parse)."""
    return _parse(read_text(path), path)


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


def read_items(path) -> list[tuple[str, object]]:
    """A .json file holding a list, or a .jsonl file holding one JSON value a line (blank lines
    skipped) -> [(where, item)], `where` naming the file and the item for error messages:
    "data/sft_data.json: item 3" or "data/sft_data.jsonl:7" (line 7). The one reader of every
    list-of-items file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        items = [(f"{path}:{n}", _parse(line, path, n))
                 for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
        if not items:
            raise DataError(f"{path}: no JSON lines (the file is empty)")
        return items
    items = read_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: the list is empty")
    return [(f"{path}: item {i}", item) for i, item in enumerate(items)]


BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"
UNTRACKED = ("sft_data.json",)     # bundled files too large for git: data/generate.py writes them on first use


def generated_is_stale(data_dir) -> bool:
    """True when a file of UNTRACKED in data_dir is older than the generator's code (data_dir/*.py)
    or one of its sources (data_dir/src/...), as after a `git checkout` or `git pull` that changed
    them: the file git does not track would otherwise stay as the old sources made it."""
    d = Path(data_dir)
    built = min((d / name).stat().st_mtime for name in UNTRACKED)
    sources = [*d.glob("*.py"), *(p for p in (d / "src").rglob("*") if p.is_file())]
    return any(p.stat().st_mtime > built for p in sources)


def ensure_bundled(data_dir) -> None:
    """If data_dir is the bundled data/ folder and a file of UNTRACKED is missing or older than
    the generator and its sources (generated_is_stale), run data/generate.py (deterministic,
    ~2 s; it rewrites the tracked files byte for byte)."""
    d = Path(data_dir).resolve()
    if d != BUNDLED_DIR or not (d / "generate.py").exists():
        return
    missing = not all((d / name).exists() for name in UNTRACKED)
    if not missing and not generated_is_stale(d):
        return
    why = "first use" if missing else "its sources changed"
    print(f"{d}: writing {', '.join(UNTRACKED)} with data/generate.py ({why})", file=sys.stderr)
    subprocess.run([sys.executable, str(d / "generate.py")], check=True, stdout=subprocess.DEVNULL)


def data_file(data_dir, name: str) -> Path | None:
    """data_dir/name ("sft_data.json") or, failing that, its .jsonl twin; None when neither
    exists. Both at once is refused: which one was meant? The bundled folder's untracked
    files are generated first (ensure_bundled)."""
    if name in UNTRACKED:
        ensure_bundled(data_dir)
    path = Path(data_dir) / name
    twin = path.with_suffix(".jsonl")
    if path.exists() and twin.exists() and path != twin:
        raise DataError(f"{path}: both {path.name} and {twin.name} exist; keep one")
    return path if path.exists() else twin if twin.exists() else None


def _str_field(where: str, item, key, allow_empty=False) -> str:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    if key not in item:
        raise DataError(f"{where}: missing field '{key}'")
    val = item[key]
    if not isinstance(val, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return val


def _messages(where: str, msgs, field: str = "messages") -> list[dict]:
    """A non-empty list of {"role", "content"} (roles of ROLES) -> the same as plain dicts."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for j, m in enumerate(msgs):
        at = f"{where} {field}[{j}]" if field != "messages" else f"{where} message {j}"
        role = _str_field(at, m, "role")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r} (use {', '.join(ROLES)})")
        out.append({"role": role, "content": _str_field(at, m, "content")})
    return out


def load_pretrain_text(path) -> str:
    """A .txt file, a .jsonl file of {"text": ...} lines, or a directory of .txt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"{path}: directory holds no .txt files")
        text = "\n".join(read_text(f) for f in files)
    elif path.suffix == ".jsonl":
        text = "\n".join(_str_field(where, obj, "text", allow_empty=True) for where, obj in read_items(path))
    else:
        text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the corpus is empty")
    return text


def load_sft(path) -> list[list[dict]]:
    """-> conversations as message lists [{"role", "content"}, ...] with >= 1 assistant turn.
    An item is {"user", "assistant"} or {"messages": [...]} (TRL's conversational SFT form)."""
    convs = []
    for where, item in read_items(path):
        if isinstance(item, dict) and "messages" in item:
            conv = _messages(where, item["messages"])
            if not any(m["role"] == "assistant" for m in conv):
                raise DataError(f"{where}: no assistant message to learn from")
        else:
            conv = [{"role": "user", "content": _str_field(where, item, "user")},
                    {"role": "assistant", "content": _str_field(where, item, "assistant")}]
        convs.append(conv)
    return convs


def _user_prompt(where: str, item: dict, key: str = "prompt") -> str:
    """A prompt as a string, or as TRL's conversational one-user-message list -> its text."""
    val = item.get(key) if isinstance(item, dict) else None
    if not isinstance(val, list):
        return _str_field(where, item, key)
    msgs = _messages(where, val, key)
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        raise DataError(f"{where}: '{key}' must be one user message (the stages read one user turn), "
                        f"got roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _conversational_pair(where: str, item: dict) -> dict:
    """TRL's conversational preference forms -> {"prompt", "chosen", "rejected"} strings:
    explicit prompt {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}, or implicit
    {"chosen": [whole conversation], "rejected": [...]} whose shared opening turns are the
    prompt. Our reward model scores one user turn and one reply, so the prompt must come to
    one user message and each reply to one assistant message."""
    for key in ("chosen", "rejected"):
        if key not in item:
            raise DataError(f"{where}: missing field '{key}'")
    chosen, rejected = _messages(where, item["chosen"], "chosen"), _messages(where, item["rejected"], "rejected")
    if "prompt" in item:
        prompt = _user_prompt(where, item)
    else:                                          # implicit prompt: the turns both share
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        head, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if len(head) != 1 or head[0]["role"] != "user":
            raise DataError(f"{where}: the turns 'chosen' and 'rejected' share (the implicit prompt) must be one "
                            f"user message, got roles {[m['role'] for m in head]}")
        prompt = head[0]["content"]
    out = {"prompt": prompt}
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must be one assistant message after the prompt, "
                            f"got roles {[m['role'] for m in reply]}")
        out[key] = reply[0]["content"]
    return out


def load_reward(path) -> list[dict]:
    """-> [{"prompt", "chosen", "rejected"}] strings, from that form or TRL's conversational
    ones (_conversational_pair); extra fields (e.g. "kind") are kept and ignored."""
    out = []
    for where, item in read_items(path):
        if isinstance(item, dict) and any(isinstance(item.get(k), list) for k in PAIR):
            pair = _conversational_pair(where, item)
        else:
            pair = {k: _str_field(where, item, k) for k in PAIR}
        out.append({**item, **pair})
    return out


def load_rlvf(path) -> list[dict]:
    """-> [{"type", "prompt", "expected_answer" (str), "keywords" (list, optional)}]; the prompt
    may be TRL's conversational one-user-message list."""
    out = []
    for where, item in read_items(path):
        typ = _str_field(where, item, "type")
        if typ not in ("math", "logic"):
            raise DataError(f"{where}: type must be 'math' or 'logic', got {typ!r}")
        prompt = _user_prompt(where, item)
        ans = item.get("expected_answer")
        if isinstance(ans, (int, float)) and not isinstance(ans, bool):
            ans = str(ans)
        if not isinstance(ans, str) or not ans.strip():
            raise DataError(f"{where}: 'expected_answer' must be a non-empty string or number")
        kw = item.get("keywords", [])
        if not isinstance(kw, list) or not all(isinstance(k, str) for k in kw):
            raise DataError(f"{where}: 'keywords' must be a list of strings")
        out.append({**item, "type": typ, "prompt": prompt, "expected_answer": ans, "keywords": kw})
    return out


LOADERS = {"pretrain": load_pretrain_text, "sft": load_sft, "reward": load_reward, "rlvf": load_rlvf}


def load_drills(data_dir) -> str | None:
    """The reading drills (pretrain_drills.txt) or None when the directory has none."""
    path = Path(data_dir) / DRILLS_FILE
    return read_text(path) if path.exists() else None


def pretrain_path(data_dir, val: bool = False) -> Path | None:
    """pretrain_data.txt, else pretrain_data.jsonl, else a pretrain/ directory of .txt files
    (DataError when none); val=True: pretrain_val.txt, else pretrain_val.jsonl, else None."""
    d = Path(data_dir)
    stem = "pretrain_val" if val else "pretrain_data"
    for cand in (d / f"{stem}.txt", d / f"{stem}.jsonl") + (() if val else (d / "pretrain",)):
        if cand.exists():
            return cand
    if val:
        return None
    raise DataError(f"{d}: no pretrain_data.txt, pretrain_data.jsonl or pretrain/ directory")


def split_paths(data_dir, kind: str) -> tuple[Path, Path | None]:
    """-> (training file, held-out file or None) of `kind`: each .json name may be .jsonl instead."""
    d = Path(data_dir)
    if kind == "pretrain":
        return pretrain_path(d), pretrain_path(d, val=True)
    path = data_file(d, FILES[kind])
    if path is None:
        raise DataError(f"{d / FILES[kind]}: file not found (nor {Path(FILES[kind]).stem}.jsonl)")
    return path, data_file(d, VAL_FILES[kind])


def load_split(data_dir, kind: str, seed: int = 0, val_frac: float = 0.1):
    """-> (train, val) for `kind` in pretrain/sft/reward/rlvf, using the *_val file if present."""
    path, vpath = split_paths(data_dir, kind)
    train = LOADERS[kind](path)
    if vpath is not None:
        return train, LOADERS[kind](vpath)
    if kind == "pretrain":                      # the last part of the stream
        cut = int(len(train) * (1 - val_frac))
        return train[:cut], train[cut:]
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(len(train) * val_frac))
    if len(train) < 2:
        raise DataError(f"{path}: need at least 2 items to hold some out (or provide {VAL_FILES[kind]})")
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


# the batch builders live in batches.py; importing them from here keeps working
from .batches import (encode_chat, first_turns, mixed_pretrain_batch, pad_batch, pad_rows,  # noqa: E402,F401
                      pretrain_batch, sft_examples)
