"""An OpenAI-compatible HTTP server for one chat model, and a web page that looks inside it.

    python inference.py --serve [--checkpoint ...] [--host 127.0.0.1] [--port 8000]

This module owns the HTTP side: routes, reading bodies, error responses, server-sent events,
and the rule that one generation runs at a time (one model, one KV cache, one lock
that requests wait for; a threading.Lock, so not strictly first come, first served). It
calls, and does not repeat: openai_api.py (request validation, stop strings, response bodies),
`GPT.generate` (sampling with a KV cache), the tokenizer's chat template, and
`inspect.explain_tokens` (probabilities and attention, the same computation as the CLI's).

    GET  /                      the chat page (tinygrad_llm/web/: plain HTML, JS and CSS, offline)
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   OpenAI chat completions; "stream": true sends server-sent events
    POST /v1/inspect            {messages, reply, max_tokens?} -> per reply token: its probability,
                                the top 10 alternatives, and each attention head's row over the context

A bad request gets a 4xx and {"error": {"message", "type", "param"}}; a handler that fails
answers 500 in the same shape (the traceback goes to the server's log, never to the client).
A prompt longer than the context is cut from the left, as the CLI does, and the response says
how many tokens were dropped: the header X-Prompt-Truncated-Tokens, and the field
"prompt_truncated_tokens" (in the body, or in a stream's last chunk). README, "Serving"."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .inspect import explain_tokens
from .openai_api import (ApiError, ChatRequest, Decoding, Reply, chunk_body, completion_body, error_body,
                         first_stop, held_back, parse_chat_request, parse_inspect_request)
from .tokenizer import EOS_ID, IM_END_ID

MAX_BODY_BYTES = 1 << 20       # 1 MiB: thousands of times the 256-character context; larger gets 413
DRAIN_LIMIT = 16 << 20         # after a 413, read and drop up to this much so the client can read the answer
DRAIN_TIMEOUT_S = 5            # ... waiting at most this long for each piece of it
MAX_WAITING = 64               # requests holding or waiting for the model; one more gets 503
SOCKET_TIMEOUT_S = 60          # a client silent this long (mid-request, or not reading a stream) is dropped
TOP_N = 10                     # alternatives per token in /v1/inspect
STOP_IDS = (IM_END_ID, EOS_ID)         # a reply ends at <|im_end|> (or <EOS>)
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, socket.timeout)
WEB_DIR = Path(__file__).with_name("web")
PAGES = {"/": ("index.html", "text/html"), "/index.html": ("index.html", "text/html"),
         "/app.js": ("app.js", "text/javascript"), "/style.css": ("style.css", "text/css")}


# ----------------------------------------------------------------------------------------
# the model: prompts, one generation at a time, inspection


class _StopString(Exception):
    """Raised from generate's per-token callback to end decoding at a stop string."""


class ChatModel:
    """The one model behind the server. Callers hold `turn()` around generate and inspect:
    generation keeps one KV cache and switches the process's thread settings, so two at once
    would corrupt each other."""

    def __init__(self, model, tok, name: str, defaults: Decoding | None = None):
        self.model, self.tok, self.name = model, tok, name
        self.defaults = defaults or Decoding()
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._places = threading.BoundedSemaphore(MAX_WAITING)

    @contextmanager
    def turn(self):
        """Wait for the model; 503 when MAX_WAITING requests already hold or wait for it."""
        if not self._places.acquire(blocking=False):
            raise ApiError(503, f"{MAX_WAITING} requests are already waiting; try again shortly",
                           headers={"Retry-After": "1"})
        try:
            with self._lock:
                yield
        finally:
            self._places.release()

    def prompt(self, messages, max_tokens: int | None) -> tuple[list[int], int, int]:
        """-> (prompt ids, max_tokens, tokens cut from the left). With max_tokens left out:
        the default, or less when the context has less room left, but never under a quarter
        of the context (the prompt is cut to make that room)."""
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if max_tokens is None:
            room = max(self.block_size - len(ids), self.block_size // 4)
            max_tokens = min(self.defaults.max_tokens, room, self.block_size - 1)
        dropped = max(0, len(ids) - (self.block_size - max_tokens))
        return ids[dropped:], max_tokens, dropped

    def generate(self, req: ChatRequest, ids, max_tokens: int, on_text=None) -> Reply:
        """Decode until <|im_end|>, a stop string, or max_tokens. on_text(new_text) receives
        the reply as it decodes, minus any tail a stop string might still claim."""
        d, text, sent, n, finish = self.defaults, "", 0, 0, "length"

        def on_token(step, tokens):
            nonlocal text, sent, n, finish
            t, n = int(tokens[0]), n + 1
            if t in STOP_IDS:
                finish = "stop"
                return
            text += self.tok.decode([t])
            cut = first_stop(text, req.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
                raise _StopString
            ready = len(text) - held_back(text, req.stop)
            if on_text is not None and ready > sent:
                on_text(text[sent:ready])
                sent = ready

        try:
            self.model.generate([ids], max_new_tokens=max_tokens, temperature=req.temperature,
                                top_k=req.top_k or None, top_p=req.top_p, repetition_penalty=d.repetition_penalty,
                                no_repeat_ngram=d.no_repeat_ngram, stop_tokens=STOP_IDS, rng=req.seed,
                                stream=on_token)
        except _StopString:
            pass
        if on_text is not None and len(text) > sent:
            on_text(text[sent:])
        return Reply(text, finish, n)

    def inspect(self, messages, reply: str, max_tokens: int | None = None) -> dict:
        """The answer of POST /v1/inspect (README, "Serving"): the context as token strings and,
        per reply token, its probability, the TOP_N most likely tokens, and attention rows.
        The prompt is cut as a completion with this max_tokens cut it, so the context is the one
        the reply was written in (cut further if the reply is longer than max_tokens)."""
        prompt, _, dropped = self.prompt(messages, max_tokens)
        reply_ids = self.tok.encode(reply, allow_special=False)
        if len(reply_ids) >= self.block_size:
            raise ApiError(400, f"the reply is {len(reply_ids)} tokens; at most {self.block_size - 1} fit "
                                "in the context beside the prompt", "reply")
        more = max(0, len(prompt) + len(reply_ids) - self.block_size)
        ids, dropped = prompt[more:] + reply_ids, dropped + more
        start = len(ids) - len(reply_ids)
        cfg, itos = self.model.config, self.tok.itos
        tokens = [{"position": v["position"], "token": itos[v["id"]], "prob": round(v["prob"], 6),
                   "top": [{"token": itos[i], "prob": round(p, 6)} for i, p in v["top"]],
                   "attention": np.round(v["attention"], 4).tolist()}
                  for v in explain_tokens(self.model, ids, start, TOP_N)]
        return {"object": "inspection", "model": self.name, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "context": [itos[i] for i in ids], "reply_start": start, "prompt_truncated_tokens": dropped,
                "tokens": tokens}


# ----------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """One HTTP request, in its own thread: route it, check it, answer it."""
    protocol_version = "HTTP/1.1"          # keep-alive, which the openai client uses
    server_version = "MyLLM"
    timeout = SOCKET_TIMEOUT_S

    # every method goes through the routes, which say which each path takes (404 / 405 otherwise)
    def do_GET(self):
        self.route()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def routes(self) -> dict:
        """path -> {method: handler}."""
        page = {path: {"GET": self.send_page} for path in PAGES}
        return {**page, "/v1/models": {"GET": self.list_models},
                "/v1/chat/completions": {"POST": self.chat_completions},
                "/v1/inspect": {"POST": self.inspect}}

    def route(self):
        self.answered, self.unread, self.body_read = False, 0, False
        path = urlsplit(self.path).path
        try:
            methods = self.routes().get(path)
            if methods is None:
                raise ApiError(404, f"no such path: {path[:200]}")
            if self.command not in methods:
                raise ApiError(405, f"{path} takes {', '.join(methods)}, not {self.command}",
                               headers={"Allow": ", ".join(methods)})
            methods[self.command]()
        except ApiError as e:
            if self.body_pending():                    # refused before reading it: the body's bytes would
                self.close_connection = True           # be read as the next request, so end the connection
            self.send_json(e.status, error_body(e.status, e.message, e.param), e.headers)
            if self.unread:
                self.discard_unread()
        except CLIENT_GONE:
            self.close_connection = True               # the client went away: no one to answer
            self.log_message('"%s": the client went away; request abandoned', self.requestline)
        except Exception:                              # a bug of ours: log it, tell the client little
            self.log_error("%s", traceback.format_exc())
            self.close_connection = True
            if not self.answered:
                self.send_json(500, error_body(500, "internal error (the server's log has the details)"))

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, too long a header, a method
        it has no do_X for: 501, which here is 405 like any method a path does not take), as JSON."""
        code = 405 if code == HTTPStatus.NOT_IMPLEMENTED else int(code)
        if self.request_version == "HTTP/0.9":        # an unreadable request line: http.server would send
            self.request_version = "HTTP/1.1"         # the body alone, without a status line
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.send_json(code, error_body(code, message or HTTPStatus(code).phrase), {"Connection": "close"})

    # -- reading -------------------------------------------------------------------------
    def read_json(self):
        """The request body as JSON: 411 without a Content-Length, 413 over MAX_BODY_BYTES,
        400 when it does not parse."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not read)")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True                      # where the body ends is unknown
            raise ApiError(411 if length is None else 400, "a POST needs a Content-Length header with the "
                                                           "body's size in bytes")
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            self.unread = n                                   # route() drops it after answering
            raise ApiError(413, f"the body is {n} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(n)
        self.body_read = True
        if len(raw) < n:
            raise ConnectionResetError("the client sent less than its Content-Length")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:             # bad JSON or UTF-8, a 5000-digit number, deep nesting
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None

    def body_pending(self) -> bool:
        """Whether the request came with a body that has not been read."""
        has_body = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers
        return has_body and not self.body_read

    def discard_unread(self):
        """After refusing a body unread: read and drop up to DRAIN_LIMIT bytes of it, so a
        client still sending it gets to read our answer (closing at once could reset the
        connection under it). A client that sends less is waited for a few seconds at most."""
        left = min(self.unread, DRAIN_LIMIT)
        self.connection.settimeout(DRAIN_TIMEOUT_S)
        try:
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:
            pass

    # -- writing -------------------------------------------------------------------------
    def send_json(self, status: int, obj, headers: dict | None = None):
        # "replace": a lone surrogate a client sent (JSON allows "\\ud800") cannot be UTF-8
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")
        self.send_head(status, "application/json; charset=utf-8", {"Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_head(self, status: int, content_type: str, headers: dict):
        self.answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def send_event(self, obj):
        """One server-sent event: `data: <json>` and a blank line."""
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace") + b"\n\n")

    # -- endpoints -----------------------------------------------------------------------
    def send_page(self):
        name, content_type = PAGES[urlsplit(self.path).path]
        body = (WEB_DIR / name).read_bytes()
        self.send_head(200, f"{content_type}; charset=utf-8", {"Content-Length": str(len(body)),
                                                              "Cache-Control": "no-cache"})
        self.wfile.write(body)

    def list_models(self):
        chat = self.server.chat
        model = {"id": chat.name, "object": "model", "created": chat.created, "owned_by": "tinygrad_llm",
                 "context_length": chat.block_size}           # ours: tokens of prompt + reply that fit
        self.send_json(200, {"object": "list", "data": [model]})

    def chat_completions(self):
        chat = self.server.chat
        req = parse_chat_request(self.read_json(), chat.block_size, chat.vocab_size, chat.defaults)
        ids, max_tokens, dropped = chat.prompt(req.messages, req.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        with chat.turn():
            if req.stream:                             # streams hold the model while they send
                return self.stream_completion(req, ids, max_tokens, dropped, cid, created)
            reply = chat.generate(req, ids, max_tokens)
        self.send_json(200, completion_body(cid, created, chat.name, reply, len(ids), dropped),
                       {"X-Prompt-Truncated-Tokens": str(dropped)})

    def stream_completion(self, req, ids, max_tokens, dropped, cid, created):
        """Server-sent events: a chunk with the role, one per piece of decoded text, a last one
        with finish_reason and usage, then `data: [DONE]`. The connection closes after it."""
        chat = self.server.chat
        self.close_connection = True                   # no Content-Length: the end of the body is the close
        self.send_head(200, "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache", "Connection": "close",
                                                                 "X-Prompt-Truncated-Tokens": str(dropped)})
        self.send_event(chunk_body(cid, created, chat.name, {"role": "assistant", "content": ""}))
        reply = chat.generate(req, ids, max_tokens,
                              on_text=lambda s: self.send_event(chunk_body(cid, created, chat.name, {"content": s})))
        usage = {"prompt_tokens": len(ids), "completion_tokens": reply.tokens, "total_tokens": len(ids) + reply.tokens}
        self.send_event(chunk_body(cid, created, chat.name, {}, reply.finish_reason, usage=usage,
                                   prompt_truncated_tokens=dropped))
        self.wfile.write(b"data: [DONE]\n\n")

    def inspect(self):
        chat = self.server.chat
        messages, reply, max_tokens = parse_inspect_request(self.read_json(), chat.block_size)
        with chat.turn():
            result = chat.inspect(messages, reply, max_tokens)
        self.send_json(200, result)


class ChatServer(ThreadingHTTPServer):
    """A thread per connection; the handlers share `chat`, the one ChatModel."""
    daemon_threads = True          # a hung client never keeps the process alive
    request_queue_size = 128       # connections the OS queues before accept (32 clients connect at once)

    def __init__(self, chat: ChatModel, host: str = "127.0.0.1", port: int = 8000):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.chat = chat

    def handle_error(self, request, client_address):
        """A client that hung up while http.server itself answered it (a malformed request) is
        no error of ours; anything else is logged with its traceback, as socketserver does."""
        if not isinstance(sys.exc_info()[1], CLIENT_GONE):
            super().handle_error(request, client_address)


def serve(model, tok, name: str, host: str = "127.0.0.1", port: int = 8000, defaults: Decoding | None = None) -> int:
    """Serve until Ctrl-C. Port 0 picks a free port; the first line printed names the URL.
    ValueError when the address cannot be listened on (port taken, not this machine's)."""
    try:
        server = ChatServer(ChatModel(model, tok, name, defaults), host, port)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}"
    print(f"serving {name} at {url}/ (chat page) and {url}/v1 (OpenAI API); Ctrl-C stops", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
