"""Problem keys and the held-out discipline of the data generator (imported by generate.py).

Every generated task is built from a *problem key*, e.g. ("add", 15, 27) for 15 + 27 (commutative
keys are stored sorted), ("weekday", 0, 1) for "today is Monday, what is tomorrow", ("parity", 7),
("neighbor", 5) for the pair 5/6, ("syllogism", name, A, B). Before anything is generated about 15%
of each kind's key space is reserved for evaluation (reserve_held_out). Held-out keys appear only in
the *_val files: pretrain text, SFT, reward and RLVF training data never contain them. The fact
tables (FACT_KINDS: the 9 x 9 products, their inverse divisions, the weekday steps) are the
exception: a fact that is never taught can only be guessed (held-out products and weekday steps
scored 0%), so they are taught in full and their held-out tasks differ from training in phrasing
only (phrasings.py's "val" templates, which every held-out task uses). Keys found in
the hand-written sources are never held out (source_keys), and every generated training text is
scanned with extract_keys() before it is kept (touches). Word problems share the key space of their
operation (KEY_SPACE_OF).

Standard library only. warn() lives here too: every part of the generator imports this module.
"""
import re
import sys

from numerals import to_int

HELD_OUT_FRACTION = 0.15       # share of each key space reserved for evaluation only
FACT_KINDS = ("mul", "div", "weekday")   # taught in full; held out by phrasing, not by key
KEY_SPACE_OF = {"word_add": "add", "word_sub": "sub", "word_mul": "mul"}   # word problems share op keys

DAY_CHARS = "一二三四五六日"
OFFSET_WORDS = {1: "明天", 2: "后天", -1: "昨天", -2: "前天"}
OFFSET_OF = {w: off for off, w in OFFSET_WORDS.items()}
NAMES = ["小花", "小白", "阿黄", "豆豆", "乐乐", "点点", "球球", "毛毛",
         "团团", "咪咪", "贝贝", "圆圆", "多多", "糖糖", "果果", "亮亮"]
# (A, B): every A is a B. All A are leaves, so "C是D，D不是A" never contradicts a premise.
CATEGORIES = [("猫", "动物"), ("狗", "动物"), ("兔子", "动物"), ("麻雀", "鸟"), ("鸽子", "鸟"), ("鲤鱼", "鱼"),
              ("金鱼", "鱼"), ("玫瑰", "花"), ("菊花", "花"), ("苹果", "水果"), ("香蕉", "水果"), ("松树", "树"),
              ("柳树", "树"), ("汽车", "交通工具"), ("火车", "交通工具"), ("钢琴", "乐器"), ("小提琴", "乐器"),
              ("铅笔", "文具"), ("橡皮", "文具"), ("白菜", "蔬菜"), ("萝卜", "蔬菜")]


def warn(msg):
    """Print a warning to stderr (missing sources, unmet quotas)."""
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- problem keys

def build_key_spaces():
    """kind -> sorted list of every problem key of that kind."""
    r = range
    return {
        "add": [("add", a, b) for a in r(1, 100) for b in r(a, 100) if a + b <= 100],
        "sub": [("sub", a, b) for a in r(1, 101) for b in r(1, a + 1)],
        "mul": [("mul", a, b) for a in r(1, 10) for b in r(a, 10)],
        "div": [("div", q * d, d) for q in r(1, 10) for d in r(1, 10)],
        "weekday": [("weekday", d, o) for d in r(7) for o in (1, 2, -1, -2)],
        "syllogism": [("syllogism", n, a, b) for n in NAMES for a, b in CATEGORIES],
        "compare": [("compare", a, b) for a in r(1, 101) for b in r(a + 1, 101)],
        "parity": [("parity", n) for n in r(1, 101)],
        "neighbor": [("neighbor", n) for n in r(0, 100)],   # the pair n, n + 1
    }


NUM = r"(\d+|[零一二两三四五六七八九十百]+)"
ARITH_RE = re.compile(NUM + r"\s*(加上|加|\+|减去|减|-|−|乘以|乘|×|\*|除以|÷|/)\s*" + NUM)
OP_KIND = {"加上": "add", "加": "add", "+": "add", "减去": "sub", "减": "sub", "-": "sub", "−": "sub",
           "乘以": "mul", "乘": "mul", "×": "mul", "*": "mul", "除以": "div", "÷": "div", "/": "div"}
COMPARE_RE = re.compile(NUM + r"(?:是不是)?比" + NUM + r"(?:大|小)")
WHICH_RE = re.compile(NUM + r"和" + NUM + r"(?:比较|相比)?，?哪个")
PARITY_RE = re.compile(r"(?<![\d零一二两三四五六七八九十百])" + NUM + r"(?:是不是|是)(?:奇数|偶数)")
NEIGHBOR_RE = re.compile(NUM + r"的(后|前)一个数")
DAY_REL_RE = re.compile(r"(?:周|星期)([一二三四五六日天])的(后|前)(一|两)天")
TODAY_RE = re.compile(r"今天是(?:周|星期)([一二三四五六日天])")
OFFSET_RE = re.compile(r"明天|后天|昨天|前天")
SYLLOGISM_RE = re.compile(r"所有(?:的)?([^，。？！；,\s]+?)都是([^，。？！；,\s]+)")


def day_index(ch):
    """Day character (一..六, 日/天) -> 0..6 with Monday = 0."""
    return 6 if ch in "日天" else DAY_CHARS.index(ch)


def extract_keys(text):
    """Every problem key a text states or asks about (digits or Chinese numerals). Over-reports rather than misses."""
    keys = set()
    for a, op, b in ARITH_RE.findall(text):
        a, b, kind = to_int(a), to_int(b), OP_KIND[op]
        if a is None or b is None:
            continue
        keys.add((kind, min(a, b), max(a, b)) if kind in ("add", "mul") else (kind, a, b))
    for a, b in COMPARE_RE.findall(text) + WHICH_RE.findall(text):
        a, b = to_int(a), to_int(b)
        if a is not None and b is not None:
            keys.add(("compare", min(a, b), max(a, b)))
    for n in PARITY_RE.findall(text):
        if to_int(n) is not None:
            keys.add(("parity", to_int(n)))
    for n, d in NEIGHBOR_RE.findall(text):
        if to_int(n) is not None:
            keys.add(("neighbor", to_int(n) if d == "后" else to_int(n) - 1))
    for ch, d, step in DAY_REL_RE.findall(text):
        keys.add(("weekday", day_index(ch), (1 if step == "一" else 2) * (1 if d == "后" else -1)))
    for m in TODAY_RE.finditer(text):
        w = OFFSET_RE.search(text, m.end())
        if w:
            keys.add(("weekday", day_index(m[1]), OFFSET_OF[w[0]]))
    edges = SYLLOGISM_RE.findall(text)
    for name in NAMES:
        if name in text:
            keys.update(("syllogism", name, a, b) for a, b in edges)
    return keys


def infer_arith_keys(question, answer):
    """Keys of word problems stated without an operator: two numbers of the question whose
    sum/difference/product/quotient appears in the answer. Used on hand-written sources."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    found = {int(x) for x in re.findall(r"\d+", answer)}
    keys = set()
    for i, x in enumerate(nums):
        for j, y in enumerate(nums):
            if i == j:
                continue
            if x + y in found:
                keys.add(("add", min(x, y), max(x, y)))
            if x - y in found:
                keys.add(("sub", x, y))
            if x * y in found:
                keys.add(("mul", min(x, y), max(x, y)))
            if y and x % y == 0 and x // y in found:
                keys.add(("div", x, y))
    return keys


def source_keys(src):
    """All keys the hand-written sources contain: these may never be held out."""
    keys = set()
    for _, paragraphs in src["prose"]:
        for p in paragraphs:
            keys |= extract_keys(p)
    for it in src["sft_hand"]:
        keys |= extract_keys(it["user"] + "\n" + it["assistant"]) | infer_arith_keys(it["user"], it["assistant"])
    for it in src["sft_multiturn"]:
        msgs = it["messages"]
        keys |= extract_keys("\n".join(m["content"] for m in msgs))
        for q, a in zip(msgs, msgs[1:]):
            keys |= infer_arith_keys(q["content"], a["content"])
    for it in src["reward_hand"]:
        keys |= extract_keys("\n".join((it["prompt"], it["chosen"], it["rejected"])))
        keys |= infer_arith_keys(it["prompt"], it["chosen"]) | infer_arith_keys(it["prompt"], it["rejected"])
    for it in src["rlvf_seed"]:
        keys |= extract_keys(it["prompt"]) | infer_arith_keys(it["prompt"], it["expected_answer"])
    return keys


def reserve_held_out(spaces, forbidden, rng):
    """kind -> set of held-out keys: ~15% of each space, never a key of the sources.
    Weekday keys are stratified by offset (one start day per 明天/后天/昨天/前天)."""
    held = {}
    for kind in sorted(spaces):
        strata = {}
        for key in spaces[kind]:
            strata.setdefault(key[2] if kind == "weekday" else None, []).append(key)
        held[kind] = set()
        for stratum in sorted(strata, key=str):
            order = list(strata[stratum])
            rng.shuffle(order)   # shuffle the full space first so that source edits move few keys
            k = max(1, round(HELD_OUT_FRACTION * len(order)))
            held[kind].update([key for key in order if key not in forbidden][:k])
    return held


def banned_keys(held):
    """The keys no training text may contain: every held-out key but the fact tables'."""
    return set().union(*(keys for kind, keys in held.items() if kind not in FACT_KINDS))


def split_pools(spaces, held):
    """kind -> {"train": [...], "val": [...]} sorted key lists (a fact kind trains on all its keys);
    word kinds filter their op's keys."""
    pools = {kind: {"train": [k for k in keys if kind in FACT_KINDS or k not in held[kind]],
                    "val": [k for k in keys if k in held[kind]]} for kind, keys in spaces.items()}
    word_ok = {"word_add": lambda k: True, "word_sub": lambda k: k[2] < k[1], "word_mul": lambda k: k[1] >= 2}
    for kind, ok in word_ok.items():
        pools[kind] = {s: [k for k in pools[KEY_SPACE_OF[kind]][s] if ok(k)] for s in ("train", "val")}
    return pools


def touches(text, held_all):
    """True if a text states or asks about any held-out key."""
    return bool(extract_keys(text) & held_all)
