"""Fuzzing the input surface: data loaders, tokenizer, chat template, verifiers.

Every input either loads or is refused with DataError / ValueError carrying one line (for
data files: naming the file); nothing raises anything else, and nothing already on disk
changes. The number of cases tried is printed at the end of the module and written to
<pytest basetemp>/fuzz_cases.json."""
import hashlib
import json
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinygrad_llm.data import DataError, all_texts, load_pretrain_text, load_reward, load_rlvf, load_sft, load_split
from tinygrad_llm.stages.verifiers import LogicVerifier, MathVerifier, states_answer, verify_task
from tinygrad_llm.tokenizer import IM_END_ID, IM_START_ID, SPECIAL_TOKENS, MyLLMTokenizer

CASES = Counter()        # test name -> examples tried
FUZZ = settings(deadline=None, derandomize=True, database=None,      # same cases every run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(n: int):
    return settings(FUZZ, max_examples=n)

# ----------------------------------------------------------------------------------------
# strategies: text from many scripts, control characters, emoji, special-token strings

ALPHABET = st.one_of(
    st.sampled_from("你好世界人工智能答案是不对周一二三十百千零负。，！？：；“”（）"),          # Chinese + full-width punctuation
    st.sampled_from("０１２３４５６７８９＋－．：−"),                                     # full-width digits and signs
    st.sampled_from(string.printable),
    st.sampled_from("\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u200b\u200e\u202e\u2028\u2029\ufeff\ufffd"),  # controls, bidi, BOM
    st.sampled_from("😀🎉👨‍👩‍👧🇨🇳🏳️‍🌈\U0001F9E0"),                                             # emoji, ZWJ sequences, flags
    st.sampled_from("ÀßЖжαβγאבגعربي한국어ひらがなカタカナदेवनागरी\u0301\u0308"),             # other scripts, combining marks
    st.characters(codec="utf-8"),                                                        # anything encodable
    st.sampled_from("\ud800\udbff\udc00\udfff"),                                         # lone surrogates: not text
)
SPECIAL_STR = st.sampled_from(SPECIAL_TOKENS + ["答案是", "答案为", "答案:", "=", "是的，", "不是，"])
TEXT = st.lists(st.one_of(ALPHABET, SPECIAL_STR), max_size=40).map("".join)


@st.composite
def huge_text(draw):
    """Up to ~80k characters: a short piece repeated (cheap to generate, hard to process)."""
    return draw(TEXT) * draw(st.integers(1, 2000)) if draw(st.booleans()) else draw(TEXT)


ANY_TEXT = st.one_of(TEXT, huge_text())
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), ANY_TEXT)
JSON = st.recursive(JSON_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                    max_leaves=12)
KEYS = ["user", "assistant", "messages", "role", "content", "prompt", "chosen", "rejected", "type",
        "expected_answer", "keywords", "text", "kind"]
VALUE = st.one_of(ANY_TEXT, st.sampled_from(["user", "assistant", "system", "math", "logic", "", " "]),
                  st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.none(), st.lists(TEXT, max_size=3),
                  st.just([]), st.just({}))
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name"]) | TEXT, VALUE, max_size=4)
# near-valid items: the right keys (some missing, some extra) with values of any type
ITEM = st.one_of(st.dictionaries(st.sampled_from(KEYS) | TEXT, VALUE, max_size=6),
                 st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
                 st.fixed_dictionaries({"user": VALUE, "assistant": VALUE}),
                 st.fixed_dictionaries({"prompt": VALUE, "chosen": VALUE, "rejected": VALUE}),
                 st.fixed_dictionaries({"type": VALUE, "prompt": VALUE, "expected_answer": VALUE},
                                       optional={"keywords": VALUE}),
                 JSON)
DOCUMENT = st.one_of(st.lists(ITEM, max_size=6), JSON)


@st.composite
def file_bytes(draw):
    """Raw bytes, or a JSON document serialised in one of several ways."""
    kind = draw(st.sampled_from(["bytes", "json", "json-ascii", "json-cut", "jsonl", "deep", "bignum"]))
    if kind == "bytes":
        return draw(st.binary(max_size=3000))
    if kind == "deep":                                           # nesting past the recursion limit
        n = draw(st.integers(1, 100_000))
        return draw(st.sampled_from(["[", '{"a":'])).encode() * n
    if kind == "bignum":                                         # past Python's 4300-digit int limit
        return b'[{"user": ' + b"9" * draw(st.integers(1, 10_000)) + b', "expected_answer": 1}]'
    doc = draw(DOCUMENT)
    if kind == "jsonl":
        items = doc if isinstance(doc, list) else [doc]
        return "\n".join(json.dumps(x, ensure_ascii=draw(st.booleans())) for x in items).encode("utf-8", "surrogatepass")
    text = json.dumps(doc, ensure_ascii=(kind == "json-ascii"))
    raw = text.encode("utf-8", "surrogatepass")                  # lone surrogates: invalid UTF-8, must be refused
    if kind == "json-cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_refusal(e: Exception, path: Path | None = None):
    msg = str(e)
    assert msg and len(msg.splitlines()) == 1, f"not one line: {msg!r}"
    if path is not None:
        assert path.name in msg, f"{msg!r} does not name {path.name}"


@pytest.fixture(scope="module")
def work(tmp_path_factory, request):
    """A scratch dir with some files already on disk that no call may touch."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "keep").mkdir()
    (d / "keep" / "sft_data.json").write_text('[{"user": "你好", "assistant": "你好！"}]', encoding="utf-8")
    (d / "keep" / "vocab.json").write_bytes(b"\x00\xff not json")
    (d / "keep" / "pretrain_data.txt").write_text("人工智能" * 100, encoding="utf-8")
    before = {p.name: digest(p) for p in (d / "keep").iterdir()}
    yield d
    assert {p.name: digest(p) for p in (d / "keep").iterdir()} == before
    total = sum(CASES.values())
    report = {"total": total, **CASES}
    (tmp_path_factory.getbasetemp() / "fuzz_cases.json").write_text(json.dumps(report, indent=1))
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():          # print past pytest's output capture
            tr.write_line(f"\ntest_fuzz: {total} fuzz cases tried ({', '.join(f'{k} {v}' for k, v in CASES.items())})")


# ----------------------------------------------------------------------------------------
# data loaders

LOADERS = [("sft_data.json", load_sft), ("reward_data.json", load_reward), ("rlvf_data.json", load_rlvf),
           ("pretrain_data.txt", load_pretrain_text), ("pretrain_data.jsonl", load_pretrain_text)]


@fuzz(200)
@given(raw=file_bytes())
def test_loaders_load_or_refuse_with_one_line(work, raw):
    CASES["loaders"] += 1
    for name, loader in LOADERS:
        p = work / name
        p.write_bytes(raw)
        before = digest(p)
        try:
            out = loader(p)
        except DataError as e:
            assert_refusal(e, p)
        else:
            check_loaded(name, out)
        assert digest(p) == before


def check_loaded(name, out):
    """What a successful load promises the stages."""
    json.dumps(out, ensure_ascii=False).encode("utf-8")          # real text: the vocabulary can be saved
    if name.startswith("pretrain"):
        assert isinstance(out, str) and out.strip()
        return
    assert isinstance(out, list) and out
    for item in out:
        if name == "sft_data.json":
            assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in item)
            assert any(m["role"] == "assistant" for m in item)
        elif name == "reward_data.json":
            assert all(isinstance(item[k], str) for k in ("prompt", "chosen", "rejected"))
        else:
            assert item["type"] in ("math", "logic") and isinstance(item["expected_answer"], str)
            assert all(isinstance(k, str) for k in item["keywords"])


@fuzz(50)
@given(files=st.dictionaries(st.sampled_from(["pretrain_data.txt", "pretrain_val.txt", "sft_data.json", "sft_val.json",
                                              "reward_data.json", "rlvf_data.json", "rlvf_val.json"]),
                             file_bytes(), max_size=7))
def test_data_dir_loads_or_refuses(work, files):
    """A whole --data-dir of fuzzed files: vocabulary texts and every split."""
    CASES["data dirs"] += 1
    d = work / f"dir{CASES['data dirs']}"
    d.mkdir()
    for name, raw in files.items():
        (d / name).write_bytes(raw)
    before = {p.name: digest(p) for p in d.iterdir()}
    for call in [lambda: all_texts(d)] + [lambda k=k: load_split(d, k) for k in ("pretrain", "sft", "reward", "rlvf")]:
        try:
            call()
        except DataError as e:
            assert_refusal(e)
    try:
        texts = all_texts(d)
    except DataError:
        pass
    else:                                   # what train.py does next: a vocabulary, saved and fingerprinted
        tok = MyLLMTokenizer(500).build_vocab(texts)
        tok.save(d / "vocab.json")
        assert MyLLMTokenizer().load(d / "vocab.json").fingerprint() == tok.fingerprint()
        (d / "vocab.json").unlink()
    assert {p.name: digest(p) for p in d.iterdir()} == before


# ----------------------------------------------------------------------------------------
# tokenizer and chat template


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer(300).build_vocab(["你好世界人工智能答案是", "ÀßЖ😀"])


@fuzz(150)
@given(texts=st.lists(ANY_TEXT, max_size=4), size=st.integers(7, 400), probe=ANY_TEXT, special=st.booleans())
def test_vocab_encode_decode(texts, size, probe, special):
    CASES["tokenizer"] += 1
    tok = MyLLMTokenizer(size).build_vocab(texts)
    assert tok.itos[:6] == SPECIAL_TOKENS and len(set(tok.itos)) == len(tok) <= size
    ids = tok.encode(probe, allow_special=special)
    assert all(0 <= i < len(tok) for i in ids)
    if all(c in tok.stoi for c in probe):          # every character known: exact round trip
        assert tok.decode(ids, skip_special_tokens=False) == probe
    if not special:                                 # user text never becomes a template token
        assert IM_START_ID not in ids and IM_END_ID not in ids
    assert isinstance(tok.decode(ids), str)


@fuzz(100)
@given(ids=st.lists(st.integers(-2**70, 2**70) | st.integers(-3, 400), max_size=50))
def test_decode_any_ids(tok, ids):
    CASES["decode"] += 1
    try:
        assert isinstance(tok.decode(ids), str)
    except ValueError as e:
        assert_refusal(e)
        assert any(not 0 <= i < len(tok) for i in ids)


@fuzz(200)
@given(messages=st.one_of(st.lists(MESSAGE, max_size=4),
                          st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                          "content": ANY_TEXT}), max_size=4),
                          JSON),
       gen=st.booleans())
def test_chat_template(tok, messages, gen):
    CASES["chat template"] += 1
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=gen)
        ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    except ValueError as e:
        assert_refusal(e)
        return
    # one <|im_start|> / <|im_end|> per message (+ the generation header): content cannot inject them
    assert ids.count(IM_END_ID) == len(messages)
    assert ids.count(IM_START_ID) == len(messages) + gen
    contents = "".join(m["role"] + m["content"] for m in messages)
    if not any(t in contents for t in SPECIAL_TOKENS):
        assert tok.encode(text, allow_special=True) == ids


@fuzz(30)
@given(raw=file_bytes())
def test_vocab_file_loads_or_refuses(work, raw):
    CASES["vocab files"] += 1
    p = work / "vocab.json"
    p.write_bytes(raw)
    try:
        tok = MyLLMTokenizer().load(p)
    except ValueError as e:
        assert_refusal(e, p)
    else:
        assert tok.itos[:6] == SPECIAL_TOKENS


# ----------------------------------------------------------------------------------------
# verifiers

TASK = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["math", "logic"]),
                           "expected_answer": st.one_of(TEXT, st.integers(-10**30, 10**30).map(str),
                                                        st.sampled_from(["是", "不是", "对", "否", "周一", "奇数", "8", "-3", "2.5", "十二"]),
                                                        VALUE)},
                          optional={"keywords": st.one_of(st.lists(TEXT, max_size=3), VALUE)}),
    st.dictionaries(st.sampled_from(["type", "expected_answer", "keywords"]) | TEXT, VALUE, max_size=3),
    JSON)
REPLY = st.one_of(ANY_TEXT,
                  st.tuples(TEXT, st.sampled_from(["答案是", "答案为", "答案：", "是的，", "不是，"]), TEXT).map("".join),
                  st.none(), st.integers())


@fuzz(300)
@given(task=TASK, reply=REPLY)
def test_verifying_any_task_and_reply_does_not_crash(task, reply):
    """A bool or a one-line refusal for any task and reply (plus: a number the math verifier
    extracts is one it accepts)."""
    CASES["verifiers"] += 1
    for fn in (verify_task, states_answer):
        try:
            assert fn(task, reply) in (True, False)
        except ValueError as e:
            assert_refusal(e)
    expected = task.get("expected_answer", "") if isinstance(task, dict) else ""
    assert LogicVerifier().verify(reply, expected) in (True, False)
    answer = MathVerifier().extract_answer(reply)
    assert answer is None or MathVerifier().verify(f"答案是{answer}。", answer)


@pytest.mark.parametrize("reply", ["不周一" * 30_000, "答案是。" * 25_000, "不猫" * 50_000],
                         ids=["negated-weekdays", "empty-answer-clauses", "negated-keywords"])
def test_verifiers_reject_long_degenerate_replies(reply):
    """~100k-character replies that negate the answer or state none: no verifier accepts them.
    Regression: negation and answer-marker scans re-read the whole prefix per match, so these
    took minutes; how their time grows with the length is measured in bench/verifiers.py
    (timing stays out of tests)."""
    for task in ({"type": "logic", "expected_answer": "周一"}, {"type": "logic", "expected_answer": "猫"},
                 {"type": "math", "expected_answer": "5"}):
        assert verify_task(task, reply) is False
        assert states_answer(task, reply) is False
