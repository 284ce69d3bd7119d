"""Tests for data/generate.py: determinism, formats, correct answers, held-out discipline, balance.

The generator runs into temporary directories (well under a second per run) on whatever sources
data/src/ holds; checks on the hand-written sources are skipped when a source is missing.
"""
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("data_generate", ROOT / "data" / "generate.py")
gen = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gen)
# the generator's parts (data/keys.py, data/tasks.py, ...), on sys.path once generate.py is loaded
import keys as data_keys  # noqa: E402
import pretrain as data_pretrain  # noqa: E402
import reward as data_reward  # noqa: E402
import rlvf as data_rlvf  # noqa: E402
import phrasings  # noqa: E402
import tasks as data_tasks  # noqa: E402

JSON_FILES = ["sft_data.json", "sft_val.json", "reward_data.json", "reward_val.json", "rlvf_data.json", "rlvf_val.json"]
FAMILY = {"word_add": "word", "word_sub": "word", "word_mul": "word"}   # kinds that share one val quota
SYM = {"add": "+", "sub": "-", "mul": "×", "div": "÷", "word_add": "+", "word_sub": "-", "word_mul": "×"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Generate once with the default seed; returns (out_dir, result)."""
    out = tmp_path_factory.mktemp("data")
    return out, gen.generate_all(seed=gen.SEED, out_dir=out)


def load(out, name):
    """Parsed JSON list or pretrain lines."""
    text = (out / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text.splitlines()


def nums(text):
    return [int(x) for x in re.findall(r"\d+", text)]


# ----------------------------------------------------------------------------- independent solvers

def parse_weekday(prompt):
    """Today's name (the one day named: 周X or 星期X, X not 几) and 明天/后天/昨天/前天 (either first)
    -> (day 0..6 with Monday 0, offset)."""
    m = re.search(r"(?:周|星期)([一二三四五六日天])", prompt)
    word = re.search(r"明天|后天|昨天|前天", prompt)[0]
    return (6 if m[1] in "日天" else "一二三四五六".index(m[1])), {"明天": 1, "后天": 2, "昨天": -1, "前天": -2}[word]


def solve_syllogism(prompt):
    """'是' iff the question's category is reachable from the name's stated categories via 所有X都是Y."""
    edges = {}
    for a, b in re.findall(r"所有([^，。？]+?)都是([^，。？]+)", prompt):
        edges.setdefault(a, set()).add(b)
    names = "|".join(data_keys.NAMES)
    cats, target = set(), None
    for clause in re.split(r"[，。？,.?：:；;！!—]", prompt):   # any lead-in words before the name
        m = re.search(rf"({names})(一定)?(不是|是)(.+?)(吗)?$", clause)
        if not m:
            continue
        if m[5]:
            target = m[4]
        elif m[3] == "是":
            cats.add(m[4])
    assert target is not None, prompt
    frontier = set(cats)
    while frontier:   # transitive closure of the stated categories
        frontier = {b for a in frontier for b in edges.get(a, ())} - cats
        cats |= frontier
    return "是" if target in cats else "不是"


def neighbor_after(prompt):
    """True if the number asked for comes after the one named: the first 前 / 后 after it."""
    return re.search(r"\d+\D*?(前|后)", prompt)[1] == "后"


def says(ans, reply):
    """Whether a house-style reply gives `ans`: a yes/no first ("是的，…"), anything else as
    "答案是N。" at the end."""
    if ans in ("是", "不是"):
        return reply.startswith("是的，" if ans == "是" else "不是，")
    return reply.endswith(f"答案是{ans}。")


def works_in_steps(kind, prompt, reply):
    """neighbor: the direction ("要多1" after, "要少1" before) is said, then n ± 1 worked digit by digit;
    a subtraction that borrows takes the lent 1 off the tens as a fact of its own."""
    if kind == "neighbor":
        n, after = nums(prompt)[0], neighbor_after(prompt)
        return reply.startswith(f"{n}的{'后' if after else '前'}一个数要{'多' if after else '少'}1：") and "所以是" in reply
    if kind in ("sub", "word_sub") and "借" in reply:
        ta = int(re.match(r"(\d+) - \d+：", reply)[1]) // 10
        return f"十位借走1后是{ta} - 1 = {ta - 1}" in reply
    return True


def solve(kind, prompt):
    """Expected answer recomputed from the prompt alone."""
    n = nums(prompt)
    if kind in ("add", "word_add"):
        return str(n[0] + n[1])
    if kind in ("sub", "word_sub"):
        assert n[0] >= n[1]
        return str(n[0] - n[1])
    if kind in ("mul", "word_mul"):
        assert n[0] <= 9 and n[1] <= 9
        return str(n[0] * n[1])
    if kind == "div":
        assert n[0] % n[1] == 0 and n[0] // n[1] <= 9 and n[1] <= 9
        return str(n[0] // n[1])
    if kind == "weekday":
        day, off = parse_weekday(prompt)
        return "周" + "一二三四五六日"[(day + off) % 7]
    if kind == "syllogism":
        return solve_syllogism(prompt)
    if kind == "compare":
        m = re.search(r"(\d+)(?:是不是)?比(\d+)(大|小)", prompt)
        if not m:   # "which is bigger / smaller": the last 大 or 小 of the question
            return str(max(n[:2]) if re.findall(r"大|小", prompt)[-1] == "大" else min(n[:2]))
        x, y = int(m[1]), int(m[2])
        return "是" if (x > y) == (m[3] == "大") else "不是"
    if kind == "parity":
        p = "奇数" if n[0] % 2 else "偶数"
        if ("奇" in prompt and "偶" in prompt) or ("单数" in prompt and "双数" in prompt):   # "odd or even?"
            return p
        return "是" if re.search(r"奇数|偶数", prompt)[0] == p else "不是"
    if kind == "neighbor":
        return str(n[0] + 1 if neighbor_after(prompt) else n[0] - 1)
    raise AssertionError(kind)


def item_key(kind, prompt):
    """Problem key of a generated item, parsed from its prompt (independent of generate.extract_keys)."""
    n = nums(prompt)
    op = kind.replace("word_", "")
    if op in ("add", "mul", "compare"):
        return (op, min(n[:2]), max(n[:2]))
    if op in ("sub", "div"):
        return (op, n[0], n[1])
    if kind == "parity":
        return ("parity", n[0])
    if kind == "neighbor":
        return ("neighbor", n[0] if neighbor_after(prompt) else n[0] - 1)
    if kind == "weekday":
        return ("weekday",) + parse_weekday(prompt)
    if kind == "syllogism":
        a, b = re.search(r"所有([^，。？]+?)都是([^，。？]+)", prompt).groups()
        return ("syllogism", next(x for x in data_keys.NAMES if x in prompt), a, b)
    raise AssertionError(kind)


def generated(items):
    """Generated (kinded) task or SFT items, as (kind, prompt, item)."""
    return [(it["kind"], it.get("prompt", it.get("user")), it) for it in items
            if it.get("kind") in data_tasks.MAKERS and ("prompt" in it or "user" in it)]


# ----------------------------------------------------------------------------- tests

def test_chinese_numerals():
    import numerals                                     # data/numerals.py (on sys.path once generate.py loaded)
    cases = {0: "零", 1: "一", 10: "十", 11: "十一", 15: "十五", 20: "二十", 42: "四十二", 56: "五十六",
             90: "九十", 99: "九十九", 100: "一百"}
    for n, s in cases.items():
        assert numerals.to_chinese(n) == s
    assert all(numerals.from_chinese(numerals.to_chinese(n)) == n for n in range(101))
    assert numerals.from_chinese("两") == 2 and numerals.from_chinese("三百") is None
    with pytest.raises(ValueError):
        numerals.to_chinese(101)


def test_extract_keys_reads_every_fact_form():
    expect = {
        "十五加二十七等于四十二。": ("add", 15, 27), "27+15=42。": ("add", 15, 27), "请算出 42 减 15 的结果。": ("sub", 42, 15),
        "八乘以七等于五十六。": ("mul", 7, 8), "56÷8=7。": ("div", 56, 8), "周一的后一天是周二。": ("weekday", 0, 1),
        "星期三的前两天是星期一。": ("weekday", 2, -2), "如果今天是周日，后天是周几？": ("weekday", 6, 2),
        "7是奇数。": ("parity", 7), "8是不是奇数？": ("parity", 8), "42比17大。": ("compare", 17, 42),
        "17和42哪个数更大？": ("compare", 17, 42), "6的前一个数是几？": ("neighbor", 5), "5的后一个数是6。": ("neighbor", 5),
        "所有的猫都是动物，小花是猫，小花是动物吗？": ("syllogism", "小花", "猫", "动物"),
    }
    for text, key in expect.items():
        assert key in data_keys.extract_keys(text), text
    assert ("add", 5, 8) in data_keys.infer_arith_keys("小明有8个苹果，又买了5个，一共几个？", "13")
    # Every fact-sentence form round-trips to its key.
    rng = gen.random.Random(0)
    spaces = data_keys.build_key_spaces()
    for kind in data_pretrain.FACT_WEIGHTS:
        for key in rng.sample(spaces[kind], 10):
            for _ in range(5):
                s = data_pretrain.fact_sentence(rng, kind, key)
                assert key in data_keys.extract_keys(s), s


def test_deterministic(run, tmp_path):
    out, _ = run
    gen.generate_all(seed=gen.SEED, out_dir=tmp_path / "again")
    gen.generate_all(seed=gen.SEED + 1, out_dir=tmp_path / "other")
    names = ["pretrain_data.txt", "pretrain_val.txt", "pretrain_drills.txt", "chat_eval.json"] + JSON_FILES
    assert all((out / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in names)
    assert any((out / n).read_bytes() != (tmp_path / "other" / n).read_bytes() for n in names)


def test_missing_sources_are_skipped(tmp_path, capsys):
    gen.generate_all(seed=gen.SEED, src_dir=tmp_path / "no_src", out_dir=tmp_path / "out")
    assert "missing" in capsys.readouterr().err
    assert len(load(tmp_path / "out", "rlvf_val.json")) == sum(data_rlvf.RLVF_PLAN["val"].values())


def test_formats(run):
    out, _ = run
    for name in ("sft_data.json", "sft_val.json"):
        for it in load(out, name):
            if "messages" in it:
                roles = [m["role"] for m in it["messages"]]
                assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
                assert all(isinstance(m["content"], str) and m["content"] for m in it["messages"])
            else:
                assert it["user"] and it["assistant"] and isinstance(it["category"], str)
            assert not any(k.startswith("_") for k in it)
    for name in ("reward_data.json", "reward_val.json"):
        for it in load(out, name):
            assert it["prompt"] and it["chosen"] and it["rejected"] and it["chosen"] != it["rejected"] and it["kind"]
    for name in ("rlvf_data.json", "rlvf_val.json"):
        for it in load(out, name):
            assert it["type"] in ("math", "logic") and it["prompt"] and isinstance(it["expected_answer"], str)
            assert all(isinstance(k, str) for k in it.get("keywords", []))
            if it.get("kind") in data_tasks.MAKERS and it["expected_answer"] in ("是", "不是"):
                assert it["keywords"] == (data_tasks.YES_KEYWORDS if it["expected_answer"] == "是" else data_tasks.NO_KEYWORDS)
    for name in ("pretrain_data.txt", "pretrain_val.txt"):
        assert all(line.strip() for line in load(out, name))


def test_sizes(run):
    out, _ = run
    n_generated = {name: len(generated(load(out, name))) for name in ("sft_data.json", "sft_val.json", "rlvf_data.json")}
    assert n_generated["sft_data.json"] >= 1500 and 140 <= n_generated["sft_val.json"] <= 160
    assert n_generated["rlvf_data.json"] >= 1950 and len(load(out, "rlvf_val.json")) == 240
    assert 650 <= len(load(out, "reward_data.json")) and 140 <= len(load(out, "reward_val.json"))
    assert sum(map(len, load(out, "pretrain_data.txt"))) > 40_000


def test_prose_split(run):
    """Every prose paragraph lands in exactly one pretrain file; every 20th (index 9, 29, ...) in val."""
    out, _ = run
    train, val = set(load(out, "pretrain_data.txt")), set(load(out, "pretrain_val.txt"))
    assert not train & val
    for path in sorted((ROOT / "data" / "src" / "prose").glob("*.txt")):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            assert line in (val if i % data_pretrain.PROSE_VAL_EVERY == data_pretrain.PROSE_VAL_OFFSET else train), (path.name, i)


def test_task_answers_are_correct(run):
    out, _ = run
    tasks = generated(load(out, "rlvf_data.json")) + generated(load(out, "rlvf_val.json"))
    assert len(tasks) > 2000
    for kind, prompt, it in tasks:
        assert it["expected_answer"] == solve(kind, prompt), prompt
        assert it["type"] == ("math" if kind in data_tasks.MATH_KINDS else "logic")


def test_sft_answers_are_correct(run):
    out, _ = run
    items = generated(load(out, "sft_data.json")) + generated(load(out, "sft_val.json"))
    assert len(items) > 1600
    for kind, prompt, it in items:
        ans, reply = solve(kind, prompt), it["assistant"]
        assert says(ans, reply) and works_in_steps(kind, prompt, reply), (prompt, reply)
        if kind in SYM:
            a, b = nums(prompt)[:2]
            assert f"{a} {SYM[kind]} {b} = {ans}，" in reply, (prompt, reply)


def test_held_out_discipline(run):
    out, result = run
    held, banned = set().union(*result["held_out"].values()), result["banned"]
    spaces = data_keys.build_key_spaces()
    for kind, keys in result["held_out"].items():   # ~15% of every key space (weekday: source-limited)
        assert 0.10 * len(spaces[kind]) <= len(keys) <= 0.16 * len(spaces[kind]) + 1, kind
    # The fact tables are taught in full; every other held-out key is banned from training.
    assert banned == {k for k in held if k[0] not in data_keys.FACT_KINDS}
    # Val keys, parsed from the prompts, are all held out.
    val_keys = {item_key(k, p) for name in ("rlvf_val.json", "sft_val.json") for k, p, _ in generated(load(out, name))}
    assert val_keys <= held and len({k[0] for k in val_keys}) == 9
    # No training item is about a banned key: generated items by their prompt's numbers ...
    taught = set()
    for name in ("rlvf_data.json", "sft_data.json"):
        train_keys = {item_key(k, p) for k, p, _ in generated(load(out, name))}
        assert not train_keys & banned, name
        taught |= train_keys
    assert {k for k in held if k[0] in data_keys.FACT_KINDS} <= taught   # ... while the fact tables are taught
    held = banned
    # ... and every training text by the extractor (arithmetic, weekdays, parity, comparisons, neighbours, syllogisms).
    texts = list(load(out, "pretrain_data.txt")) + list(load(out, "pretrain_drills.txt"))
    for it in load(out, "sft_data.json"):
        if "messages" in it:
            texts.append("\n".join(m["content"] for m in it["messages"]))
            for q, a in zip(it["messages"], it["messages"][1:]):
                assert not data_keys.infer_arith_keys(q["content"], a["content"]) & held
        else:
            texts.append(it["user"] + "\n" + it["assistant"])
            if "kind" not in it:
                assert not data_keys.infer_arith_keys(it["user"], it["assistant"]) & held
    texts += ["\n".join((it["prompt"], it["chosen"], it["rejected"])) for it in load(out, "reward_data.json")]
    for it in load(out, "rlvf_data.json"):
        texts.append(it["prompt"])
        if "kind" not in it:   # a hand-written seed task (the heuristic over-reports on generated ones)
            assert not data_keys.infer_arith_keys(it["prompt"], it["expected_answer"]) & held
    for text in texts:
        assert not data_keys.extract_keys(text) & held, text
    # An extractor-independent scan of the digit equations in the pretrain text.
    for a, op, b in re.findall(r"(\d+) ?([+\-×÷]) ?(\d+) ?=", "\n".join(load(out, "pretrain_data.txt"))):
        a, b, kind = int(a), int(b), {"+": "add", "-": "sub", "×": "mul", "÷": "div"}[op]
        assert ((kind, min(a, b), max(a, b)) if kind in ("add", "mul") else (kind, a, b)) not in held


PHRASING_LISTS = {"compare": ["compare_which", "compare_yesno"], "parity": ["parity_choice", "parity_yesno"]}


def phrasing_regex(kind, split):
    """A regex matching any question of the kind worded by one of the split's phrasings (prefix match:
    an "explain" variant appends a request)."""
    alts = []
    for name in PHRASING_LISTS.get(kind, [kind]):
        for t in phrasings.PHRASINGS[name][split]:
            t = "，".join(t) if isinstance(t, list) else t
            alts.append(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)))
    return re.compile("(?:" + "|".join(alts) + ")")


def test_held_out_tasks_are_phrased_apart(run):
    """Held-out tasks use only the held-out phrasings; training tasks never do."""
    out, _ = run
    for name, split in (("rlvf_val.json", "val"), ("sft_val.json", "val"), ("rlvf_data.json", "train"),
                        ("sft_data.json", "train")):
        for kind, prompt, _ in generated(load(out, name)):
            if split == "val":
                assert phrasing_regex(kind, "val").fullmatch(prompt), (name, prompt)
            else:
                assert phrasing_regex(kind, "train").match(prompt), (name, prompt)
                assert not phrasing_regex(kind, "val").fullmatch(prompt), (name, prompt)


def hand_pairs():
    """(prompt, chosen, rejected) of the hand-written reward pairs (empty if the source is missing)."""
    path = ROOT / "data" / "src" / "reward_hand.json"
    items = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    return {(p["prompt"], p["chosen"], p["rejected"]) for p in items}


def test_reward_pairs_are_not_solved_by_length(run):
    out, _ = run
    hand = hand_pairs()
    for name in ("reward_data.json", "reward_val.json"):
        pairs = load(out, name)
        share = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs)
        assert 0.35 <= share <= 0.65, (name, share)
        assert all(Counter(p["kind"] for p in pairs)[k] > 0 for k in data_reward.REWARD_MIX)
        for p in pairs:
            if (p["prompt"], p["chosen"], p["rejected"]) in hand:
                continue
            if p["kind"] in ("repetitive", "rude"):
                assert len(p["rejected"]) > len(p["chosen"]), p
            if p["kind"] == "short_dismissive":
                assert len(p["rejected"]) <= 0.5 * len(p["chosen"]) + 2, p
            if p["kind"] == "wrong_math":   # same format and length, different number
                assert len(p["rejected"]) == len(p["chosen"]) and re.sub(r"\d", "0", p["rejected"]) == re.sub(r"\d", "0", p["chosen"]), p


def test_reward_pairs_come_from_the_same_split(run):
    out, _ = run
    hand = hand_pairs()
    for reward, sft in (("reward_data.json", "sft_data.json"), ("reward_val.json", "sft_val.json")):
        replies = {(it["user"], it["assistant"]) for it in load(out, sft) if "user" in it}
        for p in load(out, reward):
            assert (p["prompt"], p["chosen"], p["rejected"]) in hand or (p["prompt"], p["chosen"]) in replies, p


def test_rlvf_val_is_balanced(run):
    out, _ = run
    tasks = load(out, "rlvf_val.json")
    types = Counter(t["type"] for t in tasks)
    assert types["math"] == types["logic"] == 120
    families = Counter(FAMILY.get(t["kind"], t["kind"]) for t in tasks)
    assert len(families) == 10 and max(families.values()) == min(families.values())
    yes_no = [t["expected_answer"] for t in tasks if t["expected_answer"] in ("是", "不是")]
    assert len(yes_no) >= 40 and 0.4 <= yes_no.count("不是") / len(yes_no) <= 0.6
    seed = json.loads((ROOT / "data" / "src" / "rlvf_seed.json").read_text(encoding="utf-8")) \
        if (ROOT / "data" / "src" / "rlvf_seed.json").exists() else []
    train = load(out, "rlvf_data.json")
    assert all(task in train for task in seed)
    assert len({t.get("kind") for t in train[:100]}) >= 8   # shuffled, not grouped by kind


# ----------------------------------------------------------------------------- everyday chat (data/chat.py)

CHAT_DIR = ROOT / "data" / "src" / "chat"
CHAT_SYM = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}


def chat_intents():
    if not CHAT_DIR.exists():
        pytest.skip("no data/src/chat")
    return gen.chat_data.load_intents(CHAT_DIR)


def chat_items(out, name):
    return [it for it in load(out, name) if it.get("category", "").startswith("chat_")]


def test_chat_sources_are_clean():
    """Intents are well formed, val phrasings are not train phrasings in disguise, and no chat text
    states a problem key (so the sources do not move the held-out reservation)."""
    intents = chat_intents()
    cats = Counter(it["category"] for it in intents)
    assert cats["meta"] >= 60 and cats["knowledge"] >= 100 and cats["harmful"] >= 25 and cats["math"] == 4
    for it in intents:
        train = {gen.chat_data.normalize(v) for p in it["train_prompts"] for v in [p] + gen.chat_data.variants(p, it["category"])
                 } if it["category"] != "math" else set(it["train_prompts"])
        assert not any(gen.chat_data.normalize(p) in train for p in it["val_prompts"]), it["intent"]
        if it["category"] in ("meta", "knowledge"):
            assert it["keywords"] and all(any(k in r for k in it["keywords"]) for r in it["replies"]), it["intent"]
            assert all(6 <= len(r) <= 80 for r in it["replies"]), it["intent"]   # short replies
        if it["category"] == "knowledge":   # the answer is not given away by the held-out question
            assert not any(k in p for k in it["keywords"] for p in it["val_prompts"]), it["intent"]
        texts = it["train_prompts"] + it["val_prompts"] + it.get("replies", [])
        assert not any(data_keys.extract_keys(t) for t in texts if "{" not in t), it["intent"]


def test_chat_sft_and_eval(run):
    out, _ = run
    intents = chat_intents()
    train, val, evals = chat_items(out, "sft_data.json"), chat_items(out, "sft_val.json"), load(out, "chat_eval.json")
    assert 5000 <= len(train) <= 11000   # every train phrasing plus its composed variants (9498 at present)
    users = {it["user"] for it in train}
    for it in intents:   # every train phrasing is used at least once
        if it["category"] != "math":
            assert set(it["train_prompts"]) <= users, it["intent"]
    cats = Counter(e["category"] for e in evals)
    assert cats["meta"] >= 60 and cats["knowledge"] >= 60 and cats["math"] >= 30 and cats["harmful"] >= 30
    assert 150 <= cats["meta"] + cats["knowledge"] + cats["math"] <= 250
    for e in evals:
        assert set(e) <= {"prompt", "category", "intent", "keywords", "answer"} and e["prompt"] and e["intent"]
        assert e["keywords"] and all(isinstance(k, str) and k for k in e["keywords"])
        assert ("answer" in e) == (e["category"] == "math")
    # Held out: no eval prompt is a training prompt anywhere (SFT users, multi-turn turns, reward prompts, pretraining).
    trained = {it["user"] for it in load(out, "sft_data.json") if "user" in it}
    trained |= {m["content"] for it in load(out, "sft_data.json") if "messages" in it for m in it["messages"]}
    trained |= {p["prompt"] for p in load(out, "reward_data.json")}
    pretrain = "\n".join(load(out, "pretrain_data.txt"))
    for e in evals:
        assert e["prompt"] not in trained and f"问：{e['prompt']}答：" not in pretrain, e["prompt"]
    assert {e["prompt"] for e in evals} <= {it["user"] for it in val}


def test_chat_math_follows_the_house_style_and_held_out_keys(run):
    out, result = run
    held = set().union(*result["held_out"].values())
    banned = result["banned"]
    val_reply = {it["user"]: it["assistant"] for it in chat_items(out, "sft_val.json")}
    for split, items in (("train", chat_items(out, "sft_data.json")), ("val", chat_items(out, "sft_val.json"))):
        math = [it for it in items if it["category"] == "chat_math"]
        assert len(math) >= (250 if split == "train" else 30)
        for it in math:
            m = re.search(r"(\d+) ([+\-×÷]) (\d+) = (\d+)，答案是(\d+)。$", it["assistant"])
            assert m and m[4] == m[5], it
            a, sym, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            op = {"+": "add", "-": "sub", "×": "mul", "÷": "div"}[sym]
            assert c == {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b if b else -1}[op] and it["intent"] == "chat_" + op
            key = (op, min(a, b), max(a, b)) if op in ("add", "mul") else (op, a, b)
            assert key in held if split == "val" else key not in banned, (split, it)
            if split == "train":
                assert not data_keys.extract_keys(it["user"] + "\n" + it["assistant"]) & banned
                assert not data_keys.infer_arith_keys(it["user"], it["assistant"]) & banned
    for e in load(out, "chat_eval.json"):
        if e["category"] == "math":
            assert val_reply[e["prompt"]].endswith(f"答案是{e['answer']}。")


def test_chat_knowledge_is_in_the_pretraining_text(run):
    """Every fact asked about is stated in the training prose (23_everyday_facts.txt, val paragraphs excluded)."""
    out, _ = run
    path = ROOT / "data" / "src" / "prose" / "23_everyday_facts.txt"
    paragraphs = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train_prose = "\n".join(p for i, p in enumerate(paragraphs) if i % data_pretrain.PROSE_VAL_EVERY != data_pretrain.PROSE_VAL_OFFSET)
    pretrain = "\n".join(load(out, "pretrain_data.txt"))
    for it in chat_intents():
        if it["category"] == "knowledge":
            assert any(k in train_prose for k in it["keywords"]), it["intent"]
            assert any(k in pretrain for k in it["keywords"]), it["intent"]


def test_chat_reward_pairs(run):
    out, _ = run
    for name, n in (("reward_data.json", 300), ("reward_val.json", 100)):
        pairs = [p for p in load(out, name) if p["kind"] in ("over_refusal", "loop")]
        kinds = Counter(p["kind"] for p in pairs)
        assert kinds["over_refusal"] >= 0.4 * n and kinds["loop"] >= 0.25 * n, (name, kinds)
        for p in pairs:
            if p["kind"] == "loop":
                assert len(p["rejected"]) > len(p["chosen"]) and p["rejected"][:2] == p["chosen"][:2], p
            else:
                assert p["rejected"] in gen.chat_data.REFUSALS, p
        near = [p for p in pairs if p["kind"] == "over_refusal" and abs(len(p["rejected"]) - len(p["chosen"])) <= 8]
        assert len(near) >= 0.2 * kinds["over_refusal"], name   # not all refusals are short


def test_chat_eval_does_not_move_when_training_phrasings_are_added(run, tmp_path):
    """The held-out side draws from streams of its own: one more training phrasing (and so one more
    SFT item and pretraining line) leaves chat_eval.json and the chat part of sft_val.json as they were."""
    import shutil
    out, _ = run
    src = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "src", src)
    path = src / "chat" / "knowledge.json"
    intents = json.loads(path.read_text(encoding="utf-8"))
    intents[0]["train_prompts"].append("这是测试时加上的一个新问法吗")
    path.write_text(json.dumps(intents, ensure_ascii=False), encoding="utf-8")
    other = tmp_path / "out"
    other.mkdir()
    gen.generate_all(seed=gen.SEED, src_dir=src, out_dir=other)
    assert load(other, "chat_eval.json") == load(out, "chat_eval.json")
    chat_val = lambda d: sorted(json.dumps(it, ensure_ascii=False, sort_keys=True) for it in chat_items(d, "sft_val.json"))
    assert chat_val(other) == chat_val(out)
    assert len(chat_items(other, "sft_data.json")) == len(chat_items(out, "sft_data.json")) + 1


def test_held_out_tasks_do_not_move_when_training_phrasings_are_added(run, tmp_path, monkeypatch):
    """rlvf_val.json and the tasks of sft_val.json draw from streams of their own."""
    out, _ = run
    monkeypatch.setitem(phrasings.PHRASINGS["add"], "train", phrasings.PHRASINGS["add"]["train"] + ["试试{a}加{b}？"])
    gen.generate_all(seed=gen.SEED, out_dir=tmp_path)
    assert load(tmp_path, "rlvf_val.json") == load(out, "rlvf_val.json")
    tasks = lambda d: [it for it in load(d, "sft_val.json") if it.get("kind") in data_tasks.MAKERS]
    assert tasks(tmp_path) == tasks(out) and load(tmp_path, "rlvf_data.json") != load(out, "rlvf_data.json")


def test_digit_facts_are_true_and_skip_what_keep_refuses():
    import random

    import drills as data_drills
    lines = data_drills.digit_facts(random.Random(0), 5_000, keep=lambda f: "7 × 8" not in f)
    facts = [f for line in lines for f in re.split("[，；。]", line) if f]
    assert sum(map(len, lines)) >= 5_000 and len(facts) > 300
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
    for f in facts:
        m = re.fullmatch(r"(\d+) ([+\-×÷]) (\d)( \+ 1)? = (\d+)", f)
        assert m, f
        a, op, b, carry, c = m.groups()
        assert ops[op](int(a), int(b)) + (1 if carry else 0) == int(c), f
        assert int(a) <= 81 and (op != "-" or 0 <= int(c) <= 9) and "7 × 8" not in f
    assert {f.split(" ")[1] for f in facts} == {"+", "-", "×", "÷"}


def test_worked_drills_are_right_and_in_training_phrasings(run):
    """pretrain_drills.txt's worked question-answer lines: every kind of WORKED_WEIGHTS, each answer
    right, each question in a training phrasing and never in a held-out one."""
    out, _ = run
    qa = [line[2:].rsplit("答：", 1) for line in load(out, "pretrain_drills.txt") if line.startswith("问：")]
    assert sum(len(q) + len(a) + 4 for q, a in qa) >= 0.7 * data_pretrain.WORKED_CHARS
    regex = {k: (phrasing_regex(k, "train"), phrasing_regex(k, "val")) for k in data_pretrain.WORKED_WEIGHTS}

    def right(kind, q, a):
        try:
            ans = solve(kind, q)
        except (AssertionError, TypeError, IndexError):    # the question is not of this kind
            return False
        return says(ans, a)

    seen = Counter()
    for q, a in qa:
        # a few training phrasings of two kinds read alike ("63比42多几" is a sub and a compare form)
        kinds = [k for k, (train, _) in regex.items() if train.fullmatch(q) and right(k, q, a)]
        assert kinds and not any(regex[k][1].fullmatch(q) for k in kinds), (q, a)
        seen[kinds[0]] += 1
    assert set(seen) == set(data_pretrain.WORKED_WEIGHTS), seen


def test_bench_held_out_draw_is_held_out(run):
    """bench/held_out_tasks.py's larger draw: held-out keys, right answers, none of rlvf_val's
    prompts, the same tasks for the same seed."""
    _, result = run
    spec = importlib.util.spec_from_file_location("held_out_tasks", ROOT / "bench" / "held_out_tasks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plan = {"neighbor": 8, "sub": 8, "compare": 8, "word_add": 4}
    tasks = bench.draw(plan, seed=3)
    assert Counter(t["kind"] for t in tasks) == Counter(plan) and tasks == bench.draw(plan, seed=3)
    held = set().union(*result["held_out"].values())
    val = {t["prompt"] for t in json.loads((ROOT / "data" / "rlvf_val.json").read_text(encoding="utf-8"))}
    for t in tasks:
        assert item_key(t["kind"], t["prompt"]) in held and t["prompt"] not in val, t
        assert t["expected_answer"] == solve(t["kind"], t["prompt"]) and not any(k.startswith("_") for k in t), t


def test_bench_rlvf_transfer_crosses_phrasings_and_keys():
    """bench/rlvf_transfer.py's diagnostic sets: RLVF_PLAN's counts, none of the held-out prompts,
    held-out phrasings in one and training phrasings in the other."""
    spec = importlib.util.spec_from_file_location("rlvf_transfer", ROOT / "bench" / "rlvf_transfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    val = json.loads((ROOT / "data" / "rlvf_val.json").read_text(encoding="utf-8"))
    exclude = {t["prompt"] for t in val}
    for key_split, phrasing_split in (("train", "val"), ("val", "train")):
        tasks = bench.crossed_tasks(key_split, phrasing_split, exclude)
        assert Counter(t["kind"] for t in tasks) == Counter(data_rlvf.RLVF_PLAN["train"])
        assert not exclude & {t["prompt"] for t in tasks}
        assert all(set(t) >= {"type", "prompt", "expected_answer"} and not any(k.startswith("_") for k in t)
                   for t in tasks)
