"""`python inference.py --serve` as a real subprocess on a free local port (127.0.0.1), with a
tiny random checkpoint built here: the OpenAI shapes (plain and streamed), seeds, stop strings,
the prompt cut to the context, /v1/inspect, a fuzz of malformed requests, 32 concurrent
clients, a client that leaves mid-stream, and the page in a real headless Chromium (skipped
when no `chromium` binary is installed).

    python tests/test_serve.py screenshot [--checkpoint checkpoints/rlvf_final.safetensors] [--out docs/serve.png]

regenerates the README's screenshot of the page from a real checkpoint."""
from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import ENV, ROOT, assert_one_line_error, inference_cmd, run  # noqa: E402

TEXT = "人工智能是计算机科学的一个分支。它研究如何让机器像人一样思考和学习。你好，我是小模型，很高兴认识你！\n" * 8
HELLO = [{"role": "user", "content": "你好"}]
N_HELLO = 3 + len("user\n你好\nassistant\n")    # its prompt's tokens: 3 special tokens, then characters
START_TIMEOUT = 120          # seconds for the server to print its URL (interpreter + Numba start-up)
REQUEST_TIMEOUT = 60         # a request that takes longer than this is hung, not slow


# ----------------------------------------------------------------------------------------
# the server under test


def build_checkpoint(d: Path) -> Path:
    """A tiny random GPT (2 layers, 2 heads, context 64) saved as sft_final with vocab.json
    beside it: its replies are nonsense, but deterministic, which is all these tests need."""
    from tinygrad_llm.checkpoint import save_checkpoint
    from tinygrad_llm.config import get_tiny_config
    from tinygrad_llm.model import GPT
    from tinygrad_llm.tokenizer import MyLLMTokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok = MyLLMTokenizer(300).build_vocab(TEXT)
    tok.save(d / "vocab.json")
    model = GPT(get_tiny_config(vocab_size=len(tok)), seed=3)
    return save_checkpoint(d / "sft_final", model, stage="sft", step=0, vocab_sha=tok.fingerprint())


class Server:
    """`python inference.py --serve --port 0 ...` in a subprocess; its output goes to a log
    file (a pipe nobody reads would fill and block it)."""

    def __init__(self, checkpoint: Path, log: Path, *flags):
        self.log = log
        self.out = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(inference_cmd("--serve", "--checkpoint", checkpoint, "--port", "0",
                                                   "--threads", "1", *flags),
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=ENV, cwd=ROOT)
        deadline = time.time() + START_TIMEOUT
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text(encoding="utf-8"))):
            assert self.proc.poll() is None, f"the server exited:\n{log.read_text(encoding='utf-8')}"
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.1)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Resident memory of the server process (VmRSS now, VmHWM its peak so far), in kB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()

    def request(self, method: str, path: str, body=None, headers=None):
        """-> (status, headers, parsed JSON or text). body: a dict (sent as JSON) or bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        is_json = resp.getheader("Content-Type", "").startswith("application/json") and raw
        return resp.status, resp, json.loads(raw) if is_json else raw.decode("utf-8")

    def chat(self, **body):
        status, resp, answer = self.request("POST", "/v1/chat/completions", {"messages": HELLO, **body})
        assert status == 200, answer
        return answer, resp

    def stream(self, **body) -> list:
        """A streamed completion -> its events' JSON objects (the last item is "[DONE]")."""
        status, _, text = self.request("POST", "/v1/chat/completions", {"messages": HELLO, **body, "stream": True})
        assert status == 200, text
        assert text.endswith("\n\n")
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), text
        return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]

    def raw(self, data: bytes):
        """Send raw bytes on a new connection -> (status, body bytes) of the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass                                  # the server may answer before reading it all
            resp = http.client.HTTPResponse(s, method=data.split(b" ", 1)[0].decode("latin-1"))
            resp.begin()
            return resp.status, resp, resp.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    srv = Server(build_checkpoint(d / "ckpt"), d / "server.log")
    yield srv
    alive = srv.alive()
    srv.stop()
    log = srv.log.read_text(encoding="utf-8")
    assert alive, f"the server died:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]               # no request ever hit a bug of ours


def assert_error(status, resp, body, code=None):
    """A 4xx (or `code`) with {"error": {"message", "type"}} as JSON."""
    assert (status == code) if code else 400 <= status < 500, (status, body)
    assert resp.getheader("Content-Type", "").startswith("application/json")
    if isinstance(body, bytes):
        body = json.loads(body) if body else None
    if resp._method != "HEAD":
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert isinstance(body["error"]["type"], str) and "Traceback" not in body["error"]["message"]


# ----------------------------------------------------------------------------------------
# the OpenAI shapes


def test_models_and_page_are_served(server):
    status, _, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert models["data"][0]["id"] == "myllm-sft_final" and models["data"][0]["context_length"] == 64
    status, resp, page = server.request("GET", "/")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert '<script src="/app.js">' in page and 'href="/style.css"' in page
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, resp, text = server.request("GET", path)
        assert status == 200 and resp.getheader("Content-Type").startswith(kind) and text
    for name in ("index.html", "app.js", "style.css"):                # offline: nothing fetched from elsewhere
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", (ROOT / "tinygrad_llm/web" / name).read_text())


def test_completion_shape_and_length_finish(server):
    answer, resp = server.chat(max_tokens=5, model="anything")
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int) and answer["model"] == "myllm-sft_final"
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == N_HELLO
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the random model does not close its reply within 5 tokens: it stops for length
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 5
    assert answer["prompt_truncated_tokens"] == 0 and resp.getheader("X-Prompt-Truncated-Tokens") == "0"


def test_stream_chunks_add_up_to_the_reply(server):
    plain, _ = server.chat(max_tokens=12)
    events = server.stream(max_tokens=12)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) >= 2                           # sent as decoded, not at the end
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_seed_reproduces_a_sampled_reply(server):
    sample = dict(temperature=1.0, top_p=1.0, top_k=0, max_tokens=20)
    a = server.chat(seed=7, **sample)[0]["choices"][0]["message"]["content"]
    b = server.chat(seed=7, **sample)[0]["choices"][0]["message"]["content"]
    c = server.chat(seed=8, **sample)[0]["choices"][0]["message"]["content"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in server.stream(seed=7, **sample)[:-1])
    assert a == b == streamed
    assert a != c                    # near-uniform sampling over ~100 characters: a clash is ~impossible


def test_stop_strings_end_the_reply_before_them(server):
    full = server.chat(max_tokens=30)[0]["choices"][0]["message"]["content"]
    assert len(full) >= 8, full
    stop = full[4:6]
    want = full[:full.find(stop)]
    answer = server.chat(max_tokens=30, stop=[stop, "never appears"])[0]
    assert answer["choices"][0]["message"]["content"] == want
    assert answer["choices"][0]["finish_reason"] == "stop"
    streamed = server.stream(max_tokens=30, stop=stop)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1]) == want
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_helpers():
    from tinygrad_llm.openai_api import first_stop, held_back
    assert first_stop("abcdef", ["de", "b"]) == 1 and first_stop("abc", ["x"]) is None
    assert held_back("abcd", ["dx"]) == 1 and held_back("abcd", ["cdef", "x"]) == 2 and held_back("ab", ["x"]) == 0


def test_long_prompt_is_cut_from_the_left_and_said_so(server):
    long = [{"role": "user", "content": "人工智能" * 40}]
    answer, resp = server.chat(messages=long, max_tokens=10)
    dropped = int(resp.getheader("X-Prompt-Truncated-Tokens"))
    assert dropped > 0 and answer["prompt_truncated_tokens"] == dropped
    assert answer["usage"]["prompt_tokens"] == 64 - 10                  # what is left fills the context
    events = server.stream(messages=long, max_tokens=10)
    assert events[-2]["prompt_truncated_tokens"] == dropped


def test_inspect_gives_top10_and_attention_rows(server):
    reply = server.chat(max_tokens=8)[0]["choices"][0]["message"]["content"]
    status, _, ins = server.request("POST", "/v1/inspect", {"messages": HELLO, "reply": reply, "max_tokens": 8})
    assert status == 200 and ins["object"] == "inspection"
    assert (ins["n_layer"], ins["n_head"]) == (2, 2)
    start = ins["reply_start"]
    assert "".join(ins["context"][start:]) == reply and ins["context"][0] == "<|im_start|>"
    assert [t["position"] for t in ins["tokens"]] == list(range(start, start + len(reply)))
    for t in ins["tokens"]:
        probs = [a["prob"] for a in t["top"]]
        assert len(t["top"]) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert t["token"] == ins["context"][t["position"]]
        # greedy decoding took the likeliest token every time
        assert t["top"][0]["token"] == t["token"] and t["top"][0]["prob"] == t["prob"]
        assert len(t["attention"]) == 2 and all(len(heads) == 2 for heads in t["attention"])
        for row in (row for heads in t["attention"] for row in heads):
            assert len(row) == t["position"] and abs(sum(row) - 1) < 1e-2   # rounded to 4 decimals


# ----------------------------------------------------------------------------------------
# bad requests: a fuzz of malformed ones, then a good one still answers as before


def malformed_requests(seed: int = 16) -> list[tuple[str, str, bytes | dict | list | None, dict]]:
    """(method, path, body, headers) that must each get a 4xx: every field of a chat request
    given a wrong value, bodies that are not JSON, wrong paths and methods, bad lengths; then
    random mixes of those, drawn from a seeded generator."""
    rng = random.Random(seed)
    ok = {"messages": HELLO, "max_tokens": 4}
    bad_values = {
        "messages": [None, [], "你好", 5, {}, [1], [[]], [{"role": "bot", "content": "x"}], [{"role": "user"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": None}],
                     [{"role": "tool", "content": "x"}], [{"role": ["user"], "content": "x"}],
                     [{"content": "x"}], [{"role": "user", "content": "   "}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     [{"role": "user", "content": "x"}, "y"]],
        "temperature": [-0.1, 2.01, "0.7", True, [], {}, 1e308 * 10],
        "top_p": [0, -0.5, 1.01, "1", False, []],
        "top_k": [-1, 1.5, "3", 10 ** 6, True],
        "max_tokens": [0, -5, 64, 10 ** 30, 1.5, "10", True, []],
        "max_completion_tokens": [0, 64, "8"],
        "stop": [5, [1], ["a"] * 5, "", [""], ["a" * 300], {"a": 1}, True],
        "seed": [-1, 2 ** 64, 1.5, "1", True],
        "stream": ["yes", 1, [], {}],
        "n": [2, 0, "1", 1.0],
        "model": [5, [], {}, True],
    }
    cases = [("POST", "/v1/chat/completions", {**ok, field: v}, {}) for field, vs in bad_values.items() for v in vs]
    cases += [("POST", "/v1/chat/completions", {k: v for k, v in ok.items() if k != "messages"}, {})]
    not_objects = [[], "x", 5, None, True, [ok]]
    cases += [("POST", path, json.dumps(v).encode(), {}) for v in not_objects
              for path in ("/v1/chat/completions", "/v1/inspect")]
    not_json = [b"", b"{", b"{'messages': []}", b"\xff\xfe\xfa\x00", b"[" * 100_000, b"1" * 5000,
                b'{"messages": [{"role": "user", "content": "x"}]} trailing', b"NaN", b'{"temperature": NaN}',
                "你好".encode("gbk"), b"\x00" * 64]
    cases += [("POST", "/v1/chat/completions", raw, {}) for raw in not_json]
    cases += [("POST", "/v1/inspect", body, {}) for body in (
        {"messages": HELLO}, {"messages": HELLO, "reply": 5}, {"messages": [], "reply": "x"},
        {"messages": HELLO, "reply": "长" * 64}, {"reply": "x"}, {"messages": HELLO, "reply": ["x"]})]
    for path in ("/v2/chat/completions", "/v1/chat", "/../etc/passwd", "/v1/models/x", "/app.js/", "/%00",
                 "/index.htm", "/v1//chat/completions", "/V1/MODELS"):
        cases += [("GET", path, None, {}), ("POST", path, ok, {})]
    for path, allowed in (("/v1/chat/completions", "POST"), ("/v1/inspect", "POST"), ("/v1/models", "GET"),
                          ("/", "GET"), ("/app.js", "GET")):
        cases += [(m, path, ok if m in ("POST", "PUT", "PATCH") else None, {})
                  for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD") if m != allowed]
    # random mixes: several bad fields at once, random bytes, random paths
    fields = list(bad_values)
    for _ in range(60):
        body = {**ok, **{f: rng.choice(bad_values[f]) for f in rng.sample(fields, rng.randint(1, 4))}}
        cases.append(("POST", "/v1/chat/completions", body, {}))
    for _ in range(30):
        cases.append(("POST", rng.choice(["/v1/chat/completions", "/v1/inspect"]), rng.randbytes(rng.randint(1, 300)), {}))
    for _ in range(20):
        path = "/" + "".join(rng.choice("abcxyz/._-%0123") for _ in range(rng.randint(1, 30)))
        cases.append((rng.choice(["GET", "POST", "DELETE"]), path, ok, {}))
    return cases


# requests http.client cannot send as they are, written on the socket byte for byte, and the
# status each must get
POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
RAW_MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),             # too many headers
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),                  # request line too long
    (b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),                  # a method http.server does not know
    (POST + b"\r\n", 411),                                                  # no Content-Length
    (POST + b"Content-Length: abc\r\n\r\n", 400),
    (POST + b"Content-Length: -1\r\n\r\n", 400),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    (b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}", 413),
    (POST + b"Content-Length: 2097152\r\n\r\n" + b" " * 2097152, 413),          # over the 1 MiB limit
    (b"GET / HTTP/9.9\r\n\r\n", 505),                                       # HTTP's own answer: not a 4xx
]


def test_fuzz_of_malformed_requests_then_a_good_one(server):
    before = server.chat(max_tokens=10)[0]["choices"][0]["message"]["content"]
    cases = malformed_requests()
    assert len(cases) + len(RAW_MALFORMED) >= 200, len(cases)
    for method, path, body, headers in cases:
        status, resp, answer = server.request(method, path, body, headers)
        assert_error(status, resp, answer)
    for data, code in RAW_MALFORMED:
        assert_error(*server.raw(data), code=code)
    assert server.alive()
    after = server.chat(max_tokens=10)[0]["choices"][0]["message"]["content"]
    assert after == before


def test_status_codes_of_common_mistakes(server):
    assert_error(*server.request("GET", "/nope"), code=404)
    status, resp, body = server.request("GET", "/v1/chat/completions")
    assert_error(status, resp, body, code=405)
    assert resp.getheader("Allow") == "POST"
    assert_error(*server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}), code=400)
    status, resp, body = server.request("POST", "/v1/chat/completions", {"messages": HELLO, "temperature": 3})
    assert_error(status, resp, body, code=400)
    assert body["error"]["param"] == "temperature" and "[0, 2]" in body["error"]["message"]


# ----------------------------------------------------------------------------------------
# many clients at once, and one that leaves


def test_32_concurrent_clients_times_4_requests(server):
    """Every answer equals the one the same request gets alone (so no two generations shared a
    KV cache), the server lives, and its memory does not grow with the load."""
    prompts = [[{"role": "user", "content": c}] for c in ("你好", "人工智能", "学习", "机器")]
    alone = [server.chat(messages=p, max_tokens=8)[0]["choices"][0]["message"]["content"] for p in prompts]

    def client(i):
        got = []
        for j in range(4):
            k = (i + j) % 4
            if j % 2:                                  # half the requests stream
                events = server.stream(messages=prompts[k], max_tokens=8)
                got.append((k, "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])))
            else:
                got.append((k, server.chat(messages=prompts[k], max_tokens=8)[0]["choices"][0]["message"]["content"]))
        return got

    def round_of_32():
        with ThreadPoolExecutor(32) as pool:
            return [r for rs in pool.map(client, range(32)) for r in rs]

    round_of_32()                                       # warm-up: threads, buffers, allocator pools
    rss0, peak0 = server.rss_kb(), server.rss_kb("VmHWM")
    t0 = time.time()
    results = round_of_32()
    elapsed = time.time() - t0
    rss1, peak1 = server.rss_kb(), server.rss_kb("VmHWM")
    assert len(results) == 128 and all(text == alone[k] for k, text in results)
    assert server.alive()
    print(f"\n32 clients x 4 requests: {128 / elapsed:.1f} requests/s; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, "
          f"peak {peak0 / 1024:.1f} -> {peak1 / 1024:.1f} MiB")
    assert rss1 - rss0 < 20 * 1024, (rss0, rss1)        # flat: 20 MiB is noise for a ~200 MiB process


def test_client_leaving_mid_stream_frees_the_model(server):
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 63}).encode()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")              # the stream has begun
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset, not FIN
        s.close()
    answer, _ = server.chat(max_tokens=4)                            # the lock was released
    assert answer["choices"][0]["finish_reason"] in ("length", "stop") and server.alive()


# ----------------------------------------------------------------------------------------
# the command line


def test_serve_flag_errors_are_one_line(server, tmp_path):
    ckpt = tmp_path / "c"
    path = build_checkpoint(ckpt)
    assert_one_line_error(run(inference_cmd("--serve", "--prompt", "x", "--checkpoint", path)), 2, "--serve")
    assert_one_line_error(run(inference_cmd("--serve", "--port", "70000", "--checkpoint", path)), 2, "--port")
    taken = run(inference_cmd("--serve", "--port", str(server.port), "--checkpoint", path))
    assert_one_line_error(taken, 2, "cannot listen on 127.0.0.1")


# ----------------------------------------------------------------------------------------
# the page, in a real headless Chromium driven over the DevTools protocol


def chromium_binary() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class Chromium:
    """Headless Chromium driven over `--remote-debugging-pipe`: DevTools protocol messages are
    JSON objects separated by NUL bytes, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # keep both ends away from fds 3 and 4 before the child moves them there
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))

        def as_fds_3_and_4():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        flags = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen([binary, *flags], preexec_fn=as_fds_3_and_4, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_browser_r, from_browser_w, child_r, child_w):
            os.close(fd)
        self.next_id, self.buffer, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        """One DevTools command -> its result (events in between are skipped)."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buffer:
                left = deadline - time.time()
                if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                    raise TimeoutError(f"no answer from Chromium to {method}")
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, js: str):
        """Run JavaScript in the page -> its value (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{js!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, js: str, timeout: float = 60):
        deadline = time.time() + timeout
        while not (value := self.eval(js)):
            if time.time() > deadline:
                raise TimeoutError(f"the page never made {js!r} true")
            time.sleep(0.1)
        return value

    def open(self, url: str):
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


def chat_in_page(browser: Chromium, url: str, message: str, click: int | None = 0) -> dict:
    """Open the page, send `message`, wait for the streamed reply and its inspection, click
    reply token `click` (None: the one the model was least sure of) -> what the panel shows."""
    browser.open(url + "/")
    browser.wait_for("document.getElementById('model-name').textContent.length > 0")
    browser.eval(f"document.getElementById('input').value = {json.dumps(message)};"
                 "document.getElementById('composer').requestSubmit(); true")
    browser.wait_for("document.querySelectorAll('.bubble.last .token').length > 0")
    if click is None:                                    # `state` is app.js's top-level const
        click = browser.eval("(() => { const p = state.inspection.tokens.map(t => t.prob);"
                             " return p.indexOf(Math.min(...p)); })()")
    browser.eval(f"document.querySelectorAll('.bubble.last .token')[{click}].click(); true")
    return browser.eval("""(() => ({
        reply: document.querySelector('.bubble.last').textContent,
        bubbles: [...document.querySelectorAll('.bubble')].map(b => b.className),
        panelHidden: document.getElementById('token-panel').hidden,
        title: document.getElementById('token-title').textContent,
        rows: [...document.querySelectorAll('#top-list li')].map(li => ({
            label: li.querySelector('.label').textContent, prob: li.querySelector('.prob').textContent,
            chosen: li.classList.contains('chosen')})),
        heads: [...document.querySelectorAll('#heatmap .head')].map(h => h.querySelectorAll('.ctx').length),
        status: document.getElementById('status').textContent,
    }))()""")


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(server, tmp_path):
    browser = Chromium(chromium_binary())
    try:
        shown = chat_in_page(browser, server.url, "你好")
        png = browser.screenshot()
    finally:
        browser.close()
    reply = server.chat(messages=HELLO)[0]["choices"][0]["message"]["content"]
    assert shown["reply"].replace("↵\n", "\n") == reply                   # the page's defaults: greedy, auto length
    assert shown["bubbles"] == ["bubble user", "bubble assistant last"]
    assert not shown["panelHidden"] and "%" in shown["title"]
    assert len(shown["rows"]) == 10 and all(re.fullmatch(r"\d+\.\d+%", r["prob"]) for r in shown["rows"])
    assert sum(r["chosen"] for r in shown["rows"]) == 1 and shown["rows"][0]["chosen"]   # greedy: the top one
    assert shown["heads"] == [N_HELLO] * 4                               # 2 layers x 2 heads over the context
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def screenshot(argv=None) -> int:
    """Save a screenshot of the page with a reply and an open panel, from a real checkpoint."""
    import argparse
    ap = argparse.ArgumentParser(prog="python tests/test_serve.py screenshot")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints/rlvf_final.safetensors"))
    ap.add_argument("--message", default="你好！")
    ap.add_argument("--click", type=int, default=None, help="which reply token to open (default: the least sure)")
    ap.add_argument("--out", default=str(ROOT / "docs/serve.png"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        srv = Server(Path(args.checkpoint), Path(d) / "server.log")
        browser = Chromium(chromium_binary(), 1400, 1000)
        try:
            shown = chat_in_page(browser, srv.url, args.message, args.click)
            Path(args.out).write_bytes(browser.screenshot())
        finally:
            browser.close()
            srv.stop()
    print(f"reply: {shown['reply']}\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["screenshot"]:
        sys.exit("usage: python tests/test_serve.py screenshot [--checkpoint ...] [--out docs/serve.png]")
    sys.exit(screenshot(sys.argv[2:]))
