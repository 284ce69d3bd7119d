"""The OpenAI chat-completions protocol, without the HTTP: requests in, checked values out
(every refusal an ApiError with its 4xx status), stop strings, and the response bodies in
OpenAI's shapes. serve.py puts this on the wire; nothing here touches a socket or the model.

    req = parse_chat_request(json.loads(body), block_size=256, vocab_size=2600, defaults=Decoding())
    ...                                       # generate a Reply
    completion_body(cid, created, "myllm", reply, prompt_tokens, dropped)

README, "Serving", lists the fields and the errors."""
from __future__ import annotations

from dataclasses import dataclass

MAX_STOPS, MAX_STOP_CHARS = 4, 256     # OpenAI allows up to 4 stop strings
ROLES = ("system", "user", "assistant")
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "method_not_allowed",
               411: "invalid_request_error", 413: "request_too_large", 503: "server_busy", 500: "server_error"}


class ApiError(Exception):
    """A request we refuse: HTTP status, a message for the client, which field (if one)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param}}


# ----------------------------------------------------------------------------------------
# requests: JSON in, checked values out (every refusal is an ApiError 400)


@dataclass
class Decoding:
    """How replies are sampled when a request leaves a field out: inference.py's flags
    (greedy by default; when sampling, top-p 0.9 and top-k 20; bench/chat_decoding.py)."""
    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 20
    max_tokens: int = 128
    repetition_penalty: float = 1.0    # server-wide, not per request
    no_repeat_ngram: int = 0           # server-wide, not per request


@dataclass
class ChatRequest:
    messages: list            # [{"role", "content"}], content as one string
    max_tokens: int | None    # None: the server's default, fitted to the context (ChatModel.prompt)
    temperature: float
    top_p: float
    top_k: int
    stop: tuple               # stop strings; the reply ends before the first one
    seed: int | None
    stream: bool


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _typed(body: dict, name: str, kinds: tuple, default, what: str):
    """body[name] if it is one of `kinds` (a JSON true is never a number), else 400; absent or null -> default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {_json_type(value)}", name)
    return value


def _number(body, name, lo, hi, default, lo_open=False) -> float:
    value = _typed(body, name, (int, float), default, "a number")
    if not ((lo < value) if lo_open else (lo <= value)) or not value <= hi:      # NaN fails both
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return float(value)


def _integer(body, name, lo, hi, default) -> int | None:
    value = _typed(body, name, (int,), default, "an integer")
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be an integer in [{lo}, {hi}], got {value}", name)
    return value


def _content(value, i: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"messages[{i}].content must be a string (or a list of text parts), "
                        f"got {_json_type(value)}", "messages")


def parse_messages(value) -> list[dict]:
    """OpenAI messages -> [{"role", "content"}] for the chat template; 400 unless a non-empty
    array of system / user / assistant turns with text, not all of it blank."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {_json_type(m)}", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role[:40]) if isinstance(role, str) else _json_type(role)
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {shown}", "messages")
        messages.append({"role": role, "content": _content(m.get("content"), i)})
    if not any(m["content"].strip() for m in messages):
        raise ApiError(400, "every message is empty: give some text", "messages")
    return messages


def parse_stop(value) -> tuple:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' must be a string or an array of up to {MAX_STOPS} strings of 1 to "
                            f"{MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def parse_chat_request(body, block_size: int, vocab_size: int, defaults: Decoding) -> ChatRequest:
    """The body of POST /v1/chat/completions -> ChatRequest. Fields OpenAI has and we do not
    use (user, presence_penalty, ...) are ignored; `model` may name anything (there is one)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(body)}")
    _typed(body, "model", (str,), None, "a string")
    if _typed(body, "n", (int,), 1, "an integer") != 1:
        raise ApiError(400, "'n' must be 1: one choice per request", "n")
    newest = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=_integer(body, newest, 1, block_size - 1, None),
        temperature=_number(body, "temperature", 0, 2, defaults.temperature),
        top_p=_number(body, "top_p", 0, 1, defaults.top_p, lo_open=True),
        top_k=_integer(body, "top_k", 0, vocab_size, defaults.top_k),  # ours (as vLLM's); 0 = off
        stop=parse_stop(body.get("stop")),
        seed=_integer(body, "seed", 0, 2 ** 63 - 1, None),
        stream=_typed(body, "stream", (bool,), False, "true or false"))


def parse_inspect_request(body, block_size: int) -> tuple[list[dict], str, int | None]:
    """The body of POST /v1/inspect -> (messages before the reply, the reply's text, the
    max_tokens the reply was asked with, or None)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(body)}")
    reply = _typed(body, "reply", (str,), None, "a string")
    if reply is None:
        raise ApiError(400, "'reply' is missing: the assistant's reply to explain, as a string", "reply")
    return parse_messages(body.get("messages")), reply, _integer(body, "max_tokens", 1, block_size - 1, None)


# ----------------------------------------------------------------------------------------
# stop strings


def first_stop(text: str, stops) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops) -> int:
    """How many characters at the end of text could still begin a stop string: a stream
    holds them back until the next characters decide."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)



@dataclass
class Reply:
    text: str
    finish_reason: str        # "stop": <|im_end|> or a stop string; "length": max_tokens reached
    tokens: int               # tokens sampled, the closing <|im_end|> included


# ----------------------------------------------------------------------------------------
# response bodies (OpenAI's shapes)


def completion_body(cid: str, created: int, model: str, reply: Reply, prompt_tokens: int, dropped: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": reply.tokens,
                      "total_tokens": prompt_tokens + reply.tokens},
            "prompt_truncated_tokens": dropped}


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason=None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
