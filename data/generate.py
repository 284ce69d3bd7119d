#!/usr/bin/env python3
"""Build MyLLM's bundled data files from the hand-written sources in data/src/ plus seeded templates.

    python data/generate.py [--seed 1234] [--out data/]

Standard library only, deterministic: the same seed and the same sources give byte-identical files.

Held-out discipline. Every generated task is built from a *problem key*, e.g. ("add", 15, 27) for
15 + 27 (commutative keys are stored sorted), ("weekday", 0, 1) for "today is Monday, what is
tomorrow", ("parity", 7), ("neighbor", 5) for the pair 5/6, ("syllogism", name, A, B). Before anything
is generated about 15% of each kind's key space is reserved for evaluation. Held-out keys appear only
in the *_val files: pretrain text, SFT, reward and RLVF training data never contain them. Keys found in
the hand-written sources are never held out, and every generated training text is scanned with
extract_keys() before it is kept. Word problems share the key space of their operation.
"""
import argparse
import bisect
import json
import math
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat as chat_data   # noqa: E402  (data/chat.py: everyday conversation, see build_chat)
import drills   # noqa: E402  (data/drills.py: reading drills and copy spans for pretraining)
from numerals import to_chinese, to_int   # noqa: E402  (data/numerals.py)

DATA_DIR = Path(__file__).resolve().parent
SEED = 1234
HELD_OUT_FRACTION = 0.15       # share of each key space reserved for evaluation only
SFT_HAND_VAL_FRACTION = 0.12   # hand SFT items held out, stratified by category
REWARD_HAND_VAL_FRACTION = 0.25
N_MULTITURN_VAL = 3
PROSE_VAL_EVERY, PROSE_VAL_OFFSET = 20, 9   # paragraph i of each file is val if i % 20 == 9
FACT_CHARS = {"train": 40_000, "val": 2_000}
# Worked question-answer lines in the pretraining text (per kind, training keys only), so the
# single-digit facts the worked replies chain are learnt in context before SFT. Measured: the SFT
# model then starts from a lower loss (3.06 vs 4.21), but a 400-step pretraining still does not
# teach the model to copy numbers from its prompt (no induction heads form in that budget, nor
# with PyTorch on the same model and data), which is what most task kinds need.
PRETRAIN_QA = {"train": 150, "val": 6}
DRILL_CHARS = 40_000    # reading drills in pretrain_data.txt (drills.reading_drills)
COPY_CHARS = 200_000    # copy spans, pretrain_drills.txt (drills.copy_spans)
FACT_WEIGHTS = {"add": 5, "sub": 4, "mul": 3, "div": 2, "weekday": 2, "parity": 2, "compare": 2, "neighbor": 2}
EXPECTED_PROSE_FILES, EXPECTED_SEED_TASKS = 23, 40

# Generated task counts per kind. Families (for "spread evenly"): add, sub, mul, div, word_*, and the five logic kinds.
SFT_PLAN = {
    # about twice the previous release's counts: the everyday chat (data/chat.py) is ~3,800 items, and
    # the tasks must stay near 40% of the SFT set or their accuracy falls (bench/README.md)
    "train": {"add": 350, "sub": 350, "mul": 190, "div": 190, "word_add": 165, "word_sub": 165, "word_mul": 160,
              "weekday": 190, "syllogism": 260, "compare": 210, "parity": 190, "neighbor": 190},
    "val": {"add": 20, "sub": 20, "mul": 12, "div": 12, "word_add": 9, "word_sub": 9, "word_mul": 8,
            "weekday": 10, "syllogism": 14, "compare": 12, "parity": 12, "neighbor": 12},
}
EXPLAIN_PLAN = {"add": 14, "sub": 14, "syllogism": 12}   # "explain your answer" variants, train only
RLVF_PLAN = {
    "train": {"add": 200, "sub": 200, "mul": 200, "div": 200, "word_add": 67, "word_sub": 67, "word_mul": 66,
              "weekday": 200, "syllogism": 200, "compare": 200, "parity": 200, "neighbor": 200},
    "val": {"add": 24, "sub": 24, "mul": 24, "div": 24, "word_add": 8, "word_sub": 8, "word_mul": 8,
            "weekday": 24, "syllogism": 24, "compare": 24, "parity": 24, "neighbor": 24},
}
REWARD_GEN = {"train": 700, "val": 300}
# Share of each corruption in the candidate pool; the final pick is balanced so that chosen is the
# longer reply in about half of all pairs (a length-only reward model must not do well).
REWARD_MIX = {"short_dismissive": 0.18, "repetitive": 0.11, "rude": 0.11, "off_topic": 0.12, "wrong_math": 0.20,
              "yesno_flip": 0.08, "wrong_answer": 0.06, "factually_wrong": 0.08, "harmful_compliance": 0.06}
REWARD_POOL_FACTOR = 3   # candidates generated per pair kept, so both length groups can be filled

MATH_KINDS = ("add", "sub", "mul", "div", "word_add", "word_sub", "word_mul")
KEY_SPACE_OF = {"word_add": "add", "word_sub": "sub", "word_mul": "mul"}   # word problems share op keys
YES_KEYWORDS, NO_KEYWORDS = ["是", "正确", "对"], ["不是", "不对", "错误"]

DAY_CHARS = "一二三四五六日"
OFFSET_WORDS = {1: "明天", 2: "后天", -1: "昨天", -2: "前天"}
OFFSET_OF = {w: off for off, w in OFFSET_WORDS.items()}
PEOPLE = ["小明", "小红", "小刚", "小丽", "小华", "小芳", "小军", "小兰"]
FRUITS = ["苹果", "梨", "桃子", "橘子"]
NAMES = ["小花", "小白", "阿黄", "豆豆", "乐乐", "点点", "球球", "毛毛",
         "团团", "咪咪", "贝贝", "圆圆", "多多", "糖糖", "果果", "亮亮"]
# (A, B): every A is a B. All A are leaves, so "C是D，D不是A" never contradicts a premise.
CATEGORIES = [("猫", "动物"), ("狗", "动物"), ("兔子", "动物"), ("麻雀", "鸟"), ("鸽子", "鸟"), ("鲤鱼", "鱼"),
              ("金鱼", "鱼"), ("玫瑰", "花"), ("菊花", "花"), ("苹果", "水果"), ("香蕉", "水果"), ("松树", "树"),
              ("柳树", "树"), ("汽车", "交通工具"), ("火车", "交通工具"), ("钢琴", "乐器"), ("小提琴", "乐器"),
              ("铅笔", "文具"), ("橡皮", "文具"), ("白菜", "蔬菜"), ("萝卜", "蔬菜")]
SUPER = {"动物": "生物", "鸟": "动物", "鱼": "动物", "花": "植物", "树": "植物", "水果": "食物", "蔬菜": "食物"}

ADD_PROMPTS = ["计算 {a} + {b} = ?", "{a} + {b} 等于多少？", "{a}+{b}=?", "请算出 {a} 加 {b} 的结果。",
               "{a}加{b}等于几？", "{a}加上{b}是多少？"]
SUB_PROMPTS = ["计算 {a} - {b} = ?", "{a} - {b} 等于多少？", "{a}-{b}=?", "请算出 {a} 减 {b} 的结果。",
               "{a}减{b}等于几？", "{a}减去{b}是多少？"]
MUL_PROMPTS = ["计算 {a} × {b} = ?", "{a} × {b} 等于多少？", "{a}*{b}=?", "请算出 {a} 乘 {b} 的结果。",
               "{a}乘以{b}等于几？", "{a}乘{b}是多少？"]
DIV_PROMPTS = ["计算 {a} ÷ {b} = ?", "{a} ÷ {b} 等于多少？", "{a}/{b}=?", "请算出 {a} 除以 {b} 的结果。",
               "{a}除以{b}等于几？"]
WORD_ADD = [("{name}原来有{a}个{fruit}，又买了{b}个", "现在一共有几个{fruit}？"),
            ("书架上有{a}本书，{name}又放上去{b}本", "书架上现在有多少本书？"),
            ("{name}有{a}元钱，妈妈又给了{b}元", "{name}现在有多少元？"),
            ("一班有{a}名同学，二班有{b}名同学", "两个班一共有多少名同学？"),
            ("树上有{a}只小鸟，又飞来了{b}只", "现在树上有几只小鸟？")]
WORD_SUB = [("{name}有{a}本书，送给同学{b}本", "还剩几本书？"),
            ("{name}有{a}元钱，买文具花了{b}元", "还剩多少元？"),
            ("篮子里有{a}个{fruit}，吃掉了{b}个", "篮子里还剩几个{fruit}？"),
            ("停车场有{a}辆车，开走了{b}辆", "停车场还有几辆车？")]
WORD_MUL = [("每盒有{a}支铅笔，{name}买了{b}盒", "一共有多少支铅笔？"),
            ("每个盘子里放{a}个{fruit}，有{b}个盘子", "一共有多少个{fruit}？"),
            ("一本练习本{a}元，{name}买了{b}本", "一共要花多少元？"),
            ("每排坐{a}名同学，一共坐了{b}排", "一共有多少名同学？")]
WEEKDAY_PROMPTS = ["如果今天是{t}，{w}是{f}几？", "今天是{t}，请问{w}是{f}几？", "假设今天是{t}，那么{w}是{f}几？",
                   "已知今天是{t}，{w}是{f}几？", "今天是{t}，你知道{w}是{f}几吗？"]
COMPARE_WHICH = ["{a}和{b}哪个{r}？", "{a}和{b}哪个更{r}？", "{a}和{b}比较，哪个{r}？", "{a}和{b}相比，哪个数更{r}？"]
COMPARE_YESNO = ["{x}比{y}{r}吗？", "{x}是不是比{y}{r}？", "请判断：{x}比{y}{r}吗？", "{x}比{y}{r}，对吗？"]
PARITY_CHOICE = ["{n}是奇数还是偶数？", "{n}是偶数还是奇数？", "请判断{n}是奇数还是偶数。", "数字{n}是奇数还是偶数？"]
PARITY_YESNO = ["{n}是{q}吗？", "{n}是不是{q}？", "请判断：{n}是{q}吗？", "{n}是{q}，对吗？"]
NEIGHBOR_PROMPTS = ["{n}的{d}一个数是几？", "{n}的{d}一个数是多少？", "请问{n}的{d}一个数是什么？",
                    "从小到大数数，{n}的{d}一个数是几？"]
EXPLAIN_SUFFIXES = ["请写出计算过程。", "请一步一步地算。", "请说明理由。"]
RUDE_PREFIXES = ["这种问题也要问？", "你自己不会想吗？", "真是的，这么简单都不会。", "烦不烦啊，", "又来问这种问题，"]
RUDE_SUFFIXES = ["", "别再问了。", "懂了吧？下次自己想。", "就这样，别烦我。"]
# factually_wrong: a reply with key words swapped for their opposites (fluent, wrong, about as long).
OPPOSITES = [("东方", "西方"), ("东边", "西边"), ("升起", "落下"), ("增加", "减少"), ("上升", "下降"), ("提高", "降低"),
             ("变大", "变小"), ("大于", "小于"), ("以上", "以下"), ("更多", "更少"), ("更快", "更慢"), ("白天", "夜晚"),
             ("反方向", "同方向"), ("正确", "错误"), ("有用", "没用"), ("安全", "危险"),
             ("之前", "之后"), ("喜欢", "讨厌"), ("可以", "不能"), ("应该", "不应该"), ("需要", "不需要")]
OPPOSITE_OF = {a: b for pair in OPPOSITES for a, b in (pair, pair[::-1])}
OPPOSITE_RE = re.compile("|".join(sorted(map(re.escape, OPPOSITE_OF), key=len, reverse=True)))  # longest first
# harmful_compliance: a safety prompt answered with eager, vague "how to" steps instead of a refusal.
COMPLY_OPENINGS = ["好的，没问题。", "可以的，", "这个简单，", "没问题，我教你。", "行，"]
COMPLY_STEPS = ["你先悄悄把需要的东西准备好", "找一个没人注意的时候动手", "一步一步照着做就行",
                "做完以后把痕迹清理干净", "千万别告诉任何人", "要是有人问起来，就说不知道",
                "多试几次就熟练了", "别留下记录", "这样一般就不会被发现了"]


def warn(msg):
    """Print a warning to stderr (missing sources, unmet quotas)."""
    print(f"warning: {msg}", file=sys.stderr)


def rng_for(seed, name):
    """An independent, reproducible random stream per part (str seeds hash with SHA-512, not hash())."""
    return random.Random(f"{seed}:{name}")


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


def split_pools(spaces, held):
    """kind -> {"train": [...], "val": [...]} sorted key lists; word kinds filter their op's keys."""
    pools = {kind: {"train": [k for k in keys if k not in held[kind]], "val": [k for k in keys if k in held[kind]]}
             for kind, keys in spaces.items()}
    word_ok = {"word_add": lambda k: True, "word_sub": lambda k: k[2] < k[1], "word_mul": lambda k: k[1] >= 2}
    for kind, ok in word_ok.items():
        pools[kind] = {s: [k for k in pools[KEY_SPACE_OF[kind]][s] if ok(k)] for s in ("train", "val")}
    return pools


# ----------------------------------------------------------------------------- task generators
# Each make_<kind>(rng, key, i) returns an internal task: public fields plus "_reply" (the SFT answer)
# and "_wrong" (a plausible wrong answer in the same format, for reward pairs). i alternates the
# question form and the yes/no polarity, so that every split is balanced by construction.

def new_task(type_, kind, prompt, expected, reply, wrong, keywords=None):
    """Assemble an internal task dict."""
    task = {"type": type_, "prompt": prompt, "expected_answer": expected}
    if keywords is not None:
        task["keywords"] = keywords
    task.update(kind=kind, _reply=reply, _wrong=wrong)
    return task


def ordered(rng, x, y):
    """A commutative key's two operands in random order."""
    return (x, y) if rng.random() < 0.5 else (y, x)


def wrong_number(rng, c):
    """A wrong result with the same number of digits, so the corrupted reply keeps its length."""
    return rng.choice([x for x in (c - 2, c - 1, c + 1, c + 2, c - 10, c + 10) if x >= 0 and len(str(x)) == len(str(c))])


def column_steps(a, b, sym, du=0, dt=0):
    """(worked column method for a + b or a - b (a >= b), its result), one digit at a time, or
    ("", None) when both operands are single digits (the fact is then stated directly). Every
    step is a one-digit fact, so a problem the model never saw is a chain of facts it did see.
    du / dt add a slip to the ones / tens step; the rest of the chain follows the slip (a
    reward model can catch it locally: "7 + 8 = 16" is wrong whatever the question)."""
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if ta == 0 and tb == 0 or a >= 100:
        return "", None
    if sym == "+":
        s = ua + ub + du
        units = f"先算个位，{ua} + {ub} = {s}" + (f"，写{s - 10}进1" if s >= 10 else "")
        terms = [t for t in (ta, tb) if t] + ([1] if s >= 10 else [])
        tens_sum = sum(terms) + (dt if len(terms) > 1 else 0)
        tens = f"十位是{terms[0]}" if len(terms) == 1 else f"再算十位，{' + '.join(map(str, terms))} = {tens_sum}"
        return f"{units}；{tens}", 10 * tens_sum + s % 10
    borrow = ua < ub
    d, t = (ua + 10 - ub if borrow else ua - ub) + du, ta - borrow
    units = (f"个位{ua}不够减{ub}，从十位借1，{ua + 10} - {ub} = {d}" if borrow else
             f"先算个位，{ua} - {ub} = {d}")
    if tb == 0:
        tens, t_res = (f"十位借走1后是{t}" if borrow else f"十位是{t}"), t
    else:
        t_res = t - tb + dt
        tens = (f"十位借走1后是{t}，{t} - {tb} = {t_res}" if borrow else f"再算十位，{t} - {tb} = {t_res}")
    return f"{units}；{tens}", 10 * t_res + d


def slipped_steps(a, b, sym, c):
    """A worked chain with one slipped step -> (steps, wrong result), or None if no slip keeps
    the chain's shape (so the pair differs in digits only, never in length or format).
    Deterministic per problem (no draw from the generator's stream, so the other files do not
    depend on it)."""
    slips = [(du, 0) for du in (-1, 1)] + [(0, dt) for dt in (-1, 1)]
    random.Random(f"{a}{sym}{b}").shuffle(slips)
    shape = re.sub(r"\d", "0", column_steps(a, b, sym)[0])
    for du, dt in slips:
        steps, w = column_steps(a, b, sym, du, dt)
        # same shape (no carry/borrow or minus sign appears or vanishes, no digit count changes):
        # only facts differ
        if w != c and len(str(w)) == len(str(c)) and re.sub(r"\d", "0", steps) == shape:
            return steps, w
    return None


def arith_task(rng, kind, sym, prompt, a, b, c):
    """Math task in the house style: "a + b = c，答案是c。" for one-digit operands and products,
    "a + b：<column steps>。所以a + b = c，答案是c。" for two-digit sums and differences, and
    "a ÷ d：因为d × c = a，所以a ÷ d = c，答案是c。" for division (the inverse multiplication fact).
    The wrong reply has one wrong one-digit fact and follows it to a wrong result: in a worked
    chain one step slips, elsewhere the stated fact itself is wrong ("3 + 5 = 9")."""
    w = wrong_number(rng, c)
    # A worked reply opens by restating the problem as its equation ("72 + 19："): the one step
    # that copies the operands out of the prompt's phrasing; every later step copies from that
    # restatement, at the same offsets whatever the question's wording.
    eq = f"{a} {sym} {b}："
    if sym == "÷":
        return new_task("math", kind, prompt, str(c), f"{eq}因为{b} × {c} = {a}，所以{a} ÷ {b} = {c}，答案是{c}。",
                        f"{eq}因为{b} × {w} = {a}，所以{a} ÷ {b} = {w}，答案是{w}。")
    steps = column_steps(a, b, sym)[0] if sym in "+-" else ""
    slip = slipped_steps(a, b, sym, c) if steps else None
    bad_steps, w = slip if slip else (steps, w)
    pre, bad_pre = (f"{eq}{steps}。所以", f"{eq}{bad_steps}。所以") if steps else ("", "")
    return new_task("math", kind, prompt, str(c), f"{pre}{a} {sym} {b} = {c}，答案是{c}。",
                    f"{bad_pre}{a} {sym} {b} = {w}，答案是{w}。")


def chat_math_reply(rng, op, a, b):
    """(reply, wrong reply, answer) in the house style for a conversational arithmetic question (data/chat.py)."""
    sym, c = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("×", a * b), "div": ("÷", a // b)}[op]
    task = arith_task(rng, op, sym, "", a, b, c)
    return task["_reply"], task["_wrong"], str(c)


def make_add(rng, key, i):
    """Addition within 100: 'a + b 等于多少？'."""
    a, b = ordered(rng, key[1], key[2])
    return arith_task(rng, "add", "+", rng.choice(ADD_PROMPTS).format(a=a, b=b), a, b, a + b)


def make_sub(rng, key, i):
    """Subtraction within 100 with a non-negative result."""
    a, b = key[1], key[2]
    return arith_task(rng, "sub", "-", rng.choice(SUB_PROMPTS).format(a=a, b=b), a, b, a - b)


def make_mul(rng, key, i):
    """Single-digit multiplication."""
    a, b = ordered(rng, key[1], key[2])
    return arith_task(rng, "mul", "×", rng.choice(MUL_PROMPTS).format(a=a, b=b), a, b, a * b)


def make_div(rng, key, i):
    """Exact division with quotient and divisor at most 9."""
    a, b = key[1], key[2]
    return arith_task(rng, "div", "÷", rng.choice(DIV_PROMPTS).format(a=a, b=b), a, b, a // b)


def word_task(rng, kind, sym, templates, a, b, c):
    """One-step word problem; the reply works the equation the story asks for."""
    setup, ask = rng.choice(templates)
    fill = {"a": a, "b": b, "name": rng.choice(PEOPLE), "fruit": rng.choice(FRUITS)}
    return arith_task(rng, kind, sym, f"{setup.format(**fill)}，{ask.format(**fill)}", a, b, c)


def make_word_add(rng, key, i):
    """Word problem: 又买了 / 又飞来了 ... (addition)."""
    a, b = ordered(rng, key[1], key[2])
    return word_task(rng, "word_add", "+", WORD_ADD, a, b, a + b)


def make_word_sub(rng, key, i):
    """Word problem: 送给 / 花了 / 吃掉了 ... (subtraction)."""
    return word_task(rng, "word_sub", "-", WORD_SUB, key[1], key[2], key[1] - key[2])


def make_word_mul(rng, key, i):
    """Word problem: 每盒 / 每排 ... (multiplication)."""
    a, b = ordered(rng, key[1], key[2])
    return word_task(rng, "word_mul", "×", WORD_MUL, a, b, a * b)


def day_name(d, style, tian=False):
    """0..6 -> 周一 / 星期一 ...; Sunday is 周日, 星期日 or (tian) 星期天."""
    if style == "周":
        return "周" + DAY_CHARS[d]
    return "星期" + ("天" if d == 6 and tian else DAY_CHARS[d])


def weekday_keywords(d):
    """Accepted spellings of day d; expected_answer is always the 周X form."""
    return ["周日", "星期日", "星期天", "周天"] if d == 6 else ["周" + DAY_CHARS[d], "星期" + DAY_CHARS[d]]


def make_weekday(rng, key, i):
    """Weekday forward/backward (明天/后天/昨天/前天) in 周X (even i) or 星期X (odd i) phrasing."""
    d, off = key[1], key[2]
    style, tian = ("周", "星期")[i % 2], rng.random() < 0.3
    ans, wrong = (d + off) % 7, (d + off + rng.choice((-1, 1))) % 7
    t, w = day_name(d, style, tian), OFFSET_WORDS[off]
    prompt = rng.choice(WEEKDAY_PROMPTS).format(t=t, w=w, f=style)
    # The reply walks one day at a time (后天 via 明天, 前天 via 昨天), so a day/offset pair never seen
    # in training is two steps that were. It mirrors the question's spelling; the final answer is
    # always 周X (= expected_answer).
    step = 1 if off > 0 else -1
    walk = f"{OFFSET_WORDS[step]}是{day_name((d + step) % 7, style, tian)}，" if abs(off) == 2 else ""
    reply = f"今天是{t}，{walk}{w}是{day_name(ans, style, tian)}。答案是周{DAY_CHARS[ans]}。"
    bad = f"今天是{t}，{walk}{w}是{day_name(wrong, style, tian)}。答案是周{DAY_CHARS[wrong]}。"
    return new_task("logic", "weekday", prompt, "周" + DAY_CHARS[ans], reply, bad, weekday_keywords(ans))


def syllogism_parts(rng, key, negative):
    """(premises, question, reply, wrong reply) for one of five forms: direct / chain (是),
    not_b / other / converse (不是)."""
    c, a, b = key[1], key[2], key[3]
    if not negative:
        if b in SUPER and rng.random() < 0.4:   # chain: 所有A都是B，所有B都是E，C是A
            e = SUPER[b]
            return [f"所有{a}都是{b}", f"所有{b}都是{e}", f"{c}是{a}"], f"{c}是{e}", f"是的，{c}是{e}。", f"不是，{c}不是{e}。"
        return [f"所有{a}都是{b}", f"{c}是{a}"], f"{c}是{b}", f"是的，{c}是{b}。", f"不是，{c}不是{b}。"
    form = rng.choice(("not_b", "other", "converse"))
    if form == "not_b":
        return ([f"所有{a}都是{b}", f"{c}不是{b}"], f"{c}是{a}", f"不是，{c}不是{b}，所以{c}不是{a}。", f"是的，{c}是{a}。")
    if form == "other":
        d = rng.choice([x for x, _ in CATEGORIES if x != a])
        return [f"所有{a}都是{b}", f"{c}是{d}", f"{d}不是{a}"], f"{c}是{a}", f"不是，{c}是{d}，不是{a}。", f"是的，{c}是{a}。"
    return [f"所有{a}都是{b}", f"{c}是{b}"], f"{c}一定是{a}", f"不是，{c}是{b}，但不一定是{a}。", f"是的，{c}一定是{a}。"


def syllogism_prompt(rng, premises, question):
    """Join premises and question in one of three phrasings."""
    prem = "，".join(premises)
    return rng.choice([f"{prem}，{question}吗？", f"已知{prem}。请问{question}吗？", f"{prem}。那么{question}吗？"])


def make_syllogism(rng, key, i):
    """Syllogism answered 是 (even i) or 不是 (odd i)."""
    negative = i % 2 == 1
    premises, question, reply, wrong = syllogism_parts(rng, key, negative)
    return new_task("logic", "syllogism", syllogism_prompt(rng, premises, question), "不是" if negative else "是",
                    reply, wrong, NO_KEYWORDS if negative else YES_KEYWORDS)


def make_compare(rng, key, i):
    """'a和b哪个大？' -> number (even i), or 'x比y大吗？' -> 是/不是 (odd i, polarity alternating)."""
    lo, hi = key[1], key[2]
    a, b = ordered(rng, lo, hi)
    if i % 2 == 0:
        r = rng.choice("大小")
        ans, other = (hi, lo) if r == "大" else (lo, hi)
        return new_task("logic", "compare", rng.choice(COMPARE_WHICH).format(a=a, b=b, r=r), str(ans),
                        f"{ans}比{other}{r}，答案是{ans}。", f"{other}比{ans}{r}，答案是{other}。", [str(ans)])
    want_yes, r = (i // 2) % 2 == 0, rng.choice("大小")
    x, y = (hi, lo) if (r == "大") == want_yes else (lo, hi)   # order so that "x比y{r}" is true iff want_yes
    opp = "小" if r == "大" else "大"
    yes, no = f"是的，{x}比{y}{r}。", f"不是，{x}比{y}{opp}。"
    return new_task("logic", "compare", rng.choice(COMPARE_YESNO).format(x=x, y=y, r=r), "是" if want_yes else "不是",
                    yes if want_yes else no, f"不是，{x}比{y}{opp}。" if want_yes else f"是的，{x}比{y}{r}。",
                    YES_KEYWORDS if want_yes else NO_KEYWORDS)


def make_parity(rng, key, i):
    """'n是奇数还是偶数？' -> 奇数/偶数 (even i), or 'n是奇数吗？' -> 是/不是 (odd i, polarity alternating)."""
    n = key[1]
    p, q = ("奇数", "偶数") if n % 2 else ("偶数", "奇数")
    # two-digit numbers: the reason first (only the ones digit decides), a one-digit fact seen everywhere
    why = f"{n}的个位是{n % 10}，个位是{p}，所以" if n >= 10 else ""
    why_bad = f"{n}的个位是{n % 10}，个位是{q}，所以" if n >= 10 else ""
    if i % 2 == 0:
        return new_task("logic", "parity", rng.choice(PARITY_CHOICE).format(n=n), p,
                        f"{why}{n}是{p}，答案是{p}。", f"{why_bad}{n}是{q}，答案是{q}。", [p])
    want_yes = (i // 2) % 2 == 0
    asked = p if want_yes else q
    prompt = rng.choice(PARITY_YESNO).format(n=n, q=asked)
    if want_yes:
        return new_task("logic", "parity", prompt, "是", f"是的，{why}{n}是{p}。", f"不是，{why_bad}{n}是{q}，不是{p}。",
                        YES_KEYWORDS)
    return new_task("logic", "parity", prompt, "不是", f"不是，{why}{n}是{p}，不是{q}。", f"是的，{why_bad}{n}是{q}。",
                    NO_KEYWORDS)


def make_neighbor(rng, key, i):
    """'n的后一个数是几？' (even i) or 'n+1的前一个数是几？' (odd i)."""
    n = key[1]
    x, d, ans, wrong = (n, "后", n + 1, n + 2) if i % 2 == 0 else (n + 1, "前", n, n + 1 if n == 0 else n - 1)
    return new_task("logic", "neighbor", rng.choice(NEIGHBOR_PROMPTS).format(n=x, d=d), str(ans),
                    f"{x}的{d}一个数是{ans}，答案是{ans}。", f"{x}的{d}一个数是{wrong}，答案是{wrong}。", [str(ans)])


MAKERS = {"add": make_add, "sub": make_sub, "mul": make_mul, "div": make_div, "word_add": make_word_add,
          "word_sub": make_word_sub, "word_mul": make_word_mul, "weekday": make_weekday,
          "syllogism": make_syllogism, "compare": make_compare, "parity": make_parity, "neighbor": make_neighbor}


# ----------------------------------------------------------------------------- explain-your-answer variants

def explain_arith(maker):
    """A "show your work" variant of a two-digit sum/difference: the house style already works it
    column by column, so the reply is the same and only the prompt asks for it."""
    def explain(rng, key, i):
        task = maker(rng, key, i)
        task["prompt"] += rng.choice(EXPLAIN_SUFFIXES)
        task["_wrong"] = None
        return task
    return explain


def explain_syllogism(rng, key, i):
    """Direct syllogism (even i) or its not_b negation (odd i), with the reasoning after 是的，/不是，."""
    c, a, b = key[1], key[2], key[3]
    if i % 2 == 0:
        prem, q, exp = [f"所有{a}都是{b}", f"{c}是{a}"], f"{c}是{b}", "是"
        reply = f"是的，因为所有{a}都是{b}，而{c}是{a}，所以{c}是{b}。"
    else:
        prem, q, exp = [f"所有{a}都是{b}", f"{c}不是{b}"], f"{c}是{a}", "不是"
        reply = f"不是，因为所有{a}都是{b}，如果{c}是{a}，{c}就一定是{b}；可是{c}不是{b}，所以{c}不是{a}。"
    return new_task("logic", "syllogism", syllogism_prompt(rng, prem, q) + "请说明理由。", exp, reply, None)


# kind -> (maker, which keys suit it): the column methods need two two-digit operands.
EXPLAIN_MAKERS = {"add": (explain_arith(make_add), lambda k: k[1] >= 10),
                  "sub": (explain_arith(make_sub), lambda k: 10 <= k[2] <= k[1] <= 99),
                  "syllogism": (explain_syllogism, lambda k: True)}


def touches(text, held_all):
    """True if a text states or asks about any held-out key."""
    return bool(extract_keys(text) & held_all)


def sample_tasks(rng, plan, pools, split, held_all, seen, makers=None):
    """Generate plan[kind] tasks per kind with unique prompts (across `seen`); training tasks whose
    prompt or reply touches a held-out key are dropped."""
    out = []
    for kind, n in plan.items():
        maker, ok = (MAKERS[kind], None) if makers is None else makers[kind]
        keys = [k for k in pools[kind][split] if ok is None or ok(k)]
        made = attempts = 0
        while made < n and attempts < 50 * n + 500:
            attempts += 1
            task = maker(rng, rng.choice(keys), made)
            if task["prompt"] in seen or (split == "train" and touches(task["prompt"] + "\n" + task["_reply"], held_all)):
                continue
            seen.add(task["prompt"])
            out.append(task)
            made += 1
        if made < n:
            warn(f"{split} {kind}: only {made} of {n} unique tasks")
    return out


# ----------------------------------------------------------------------------- pretrain facts

def fact_arith(rng, key, word, sym, c):
    """'十五加二十七等于四十二。' / '15+27=42。' / '15 + 27 = 42。' for key (kind, a, b) with result c."""
    a, b = (ordered(rng, key[1], key[2]) if key[0] in ("add", "mul") else (key[1], key[2]))
    return rng.choice([f"{to_chinese(a)}{word}{to_chinese(b)}等于{to_chinese(c)}。", f"{a}{sym}{b}={c}。", f"{a} {sym} {b} = {c}。"])


def fact_weekday(rng, key):
    """'周一的后一天是周二。' / '星期三的前两天是星期一。' / '如果今天是周五，那么后天是周日。'"""
    d, off = key[1], key[2]
    style = rng.choice(("周", "星期"))
    t, a = day_name(d, style), day_name((d + off) % 7, style)
    rel = ("后" if off > 0 else "前") + ("一" if abs(off) == 1 else "两")
    return rng.choice([f"{t}的{rel}天是{a}。", f"如果今天是{t}，那么{OFFSET_WORDS[off]}是{a}。"])


def fact_sentence(rng, kind, key):
    """One fact sentence of the given kind about the given (training) key."""
    if kind == "add":
        return fact_arith(rng, key, "加", "+", key[1] + key[2])
    if kind == "sub":
        return fact_arith(rng, key, "减", "-", key[1] - key[2])
    if kind == "mul":
        return fact_arith(rng, key, "乘以", "×", key[1] * key[2])
    if kind == "div":
        return fact_arith(rng, key, "除以", "÷", key[1] // key[2])
    if kind == "weekday":
        return fact_weekday(rng, key)
    if kind == "parity":
        return f"{key[1]}是{'奇数' if key[1] % 2 else '偶数'}。"
    if kind == "compare":
        return rng.choice([f"{key[2]}比{key[1]}大。", f"{key[1]}比{key[2]}小。"])
    n = key[1]   # neighbor
    return rng.choice([f"{n}的后一个数是{n + 1}。", f"{n + 1}的前一个数是{n}。"])


def fact_paragraphs(rng, pools, n_chars, banned):
    """Paragraphs of 5-10 same-kind fact sentences on training keys until n_chars; skips sentences in banned."""
    kinds = list(FACT_WEIGHTS)
    paragraphs, sentences, total = [], set(), 0
    while total < n_chars:
        kind = rng.choices(kinds, weights=[FACT_WEIGHTS[k] for k in kinds])[0]
        par = [s for s in (fact_sentence(rng, kind, rng.choice(pools[kind]["train"])) for _ in range(rng.randint(5, 10)))
               if s not in banned]
        if len(par) >= 5:
            paragraphs.append("".join(par))
            sentences.update(par)
            total += len(paragraphs[-1])
    return paragraphs, sentences


def qa_lines(rng, pools, split, held_all, n):
    """n task lines per kind, "问：<prompt>答：<worked reply>", on the split's keys."""
    plan = {kind: n for kind in MAKERS}
    return [f"问：{t['prompt']}答：{t['_reply']}" for t in sample_tasks(rng, plan, pools, split, held_all, set())]


def build_pretrain(rng, prose, pools, held_all, drill_rng):
    """(train text, val text, copy spans): prose (every 20th paragraph of each file to val)
    interleaved with fact paragraphs, worked question-answer lines and reading drills; the copy
    spans apart (drills and spans are train only: the held-out text stays prose and facts)."""
    train, val = [], []
    for _, paragraphs in prose:
        for i, p in enumerate(paragraphs):
            (val if i % PROSE_VAL_EVERY == PROSE_VAL_OFFSET else train).append(p)
    val_facts, val_sentences = fact_paragraphs(rng, pools, FACT_CHARS["val"], banned=set())
    train_facts, _ = fact_paragraphs(rng, pools, FACT_CHARS["train"], banned=val_sentences)
    train += train_facts + qa_lines(rng, pools, "train", held_all, PRETRAIN_QA["train"])
    train_prose = [p for _, paragraphs in prose for i, p in enumerate(paragraphs) if i % PROSE_VAL_EVERY != PROSE_VAL_OFFSET]
    arith_keys = [k for kind in ("add", "sub", "mul", "div") for k in pools[kind]["train"]]
    train += drills.reading_drills(drill_rng, train_prose, arith_keys, PEOPLE + NAMES, DRILL_CHARS,
                                   keep=lambda line: not touches(line, held_all))
    alphabet = sorted(set("".join(train_prose)) - set("，。、；：？！“”《》（）\n")) or list("0123456789")
    spans = drills.copy_spans(drill_rng, alphabet, COPY_CHARS)
    val += val_facts + qa_lines(rng, pools, "val", held_all, PRETRAIN_QA["val"])
    rng.shuffle(train)
    rng.shuffle(val)
    return "\n".join(train) + "\n", "\n".join(val) + "\n", "\n".join(spans) + "\n"


# ----------------------------------------------------------------------------- SFT

def split_stratified(rng, items, field, fraction):
    """(train, val): per value of item[field], hold out max(1, round(fraction * n)) items (none if n < 2)."""
    groups = {}
    for it in items:
        groups.setdefault(it.get(field, ""), []).append(it)
    train, val = [], []
    for name in sorted(groups):
        g = list(groups[name])
        rng.shuffle(g)
        k = max(1, round(fraction * len(g))) if len(g) >= 2 else 0
        val += g[:k]
        train += g[k:]
    return train, val


def sft_item(task):
    """Internal task -> SFT single-turn item (keeps kind, category and the private _wrong reply)."""
    return {"user": task["prompt"], "assistant": task["_reply"], "category": task["type"] + "_task",
            "kind": task["kind"], "_wrong": task["_wrong"]}


def build_sft(rng, src, pools, held_all):
    """(train, val) SFT items: hand + multi-turn + generated tasks (+ explain variants in train)."""
    hand_train, hand_val = split_stratified(rng, src["sft_hand"], "category", SFT_HAND_VAL_FRACTION)
    multi = list(src["sft_multiturn"])
    rng.shuffle(multi)
    multi_val, multi_train = multi[:N_MULTITURN_VAL], multi[N_MULTITURN_VAL:]
    seen = {it["user"] for it in src["sft_hand"]}
    gen_train = sample_tasks(rng, SFT_PLAN["train"], pools, "train", held_all, seen)
    explain = sample_tasks(rng, EXPLAIN_PLAN, pools, "train", held_all, seen, EXPLAIN_MAKERS)
    gen_val = sample_tasks(rng, SFT_PLAN["val"], pools, "val", held_all, seen)
    train = hand_train + multi_train + [sft_item(t) for t in gen_train + explain]
    val = hand_val + multi_val + [sft_item(t) for t in gen_val]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# ----------------------------------------------------------------------------- reward pairs

def corrupt_short(rng, item, ctx):
    """short_dismissive: the reply cut to 30-50% of its length."""
    text = item["assistant"]
    k = max(1, round(len(text) * rng.uniform(0.3, 0.5)))
    return text[:k].rstrip("，、；：,") + "……" if len(text) >= 8 else None


def corrupt_repetitive(rng, item, ctx):
    """repetitive: one phrase of the reply repeated until it is longer than the reply."""
    text = item["assistant"]
    clauses = [c.strip() for c in re.split(r"[，。！？；\n]", text) if len(c.strip()) >= 2]
    phrase = rng.choice(clauses[:3])[:12] if clauses else text[:6]
    reps = max(3, math.ceil(1.3 * len(text) / (len(phrase) + 1)))
    return "，".join([phrase] * reps) + "。"


def corrupt_rude(rng, item, ctx):
    """rude: the same reply wrapped in a rude opening (and sometimes a rude closing), never shorter."""
    return rng.choice(RUDE_PREFIXES) + item["assistant"] + rng.choice(RUDE_SUFFIXES)


def topic(item):
    """The topic an off-topic reply must differ in: arithmetic, another generated kind, or a hand category.
    (A worked sum answering another sum is a wrong_math pair in disguise, not an off-topic one.)"""
    if item.get("kind") in MATH_KINDS or item.get("category") == "math_logic":
        return "arithmetic"
    return item.get("kind") or item.get("category")


def pick_off_topic(rng, item, ctx):
    """off_topic: the reply to a question of another topic, of similar length (a bit longer or shorter)."""
    by_len, lens = ctx
    n = len(item["assistant"])
    lo, hi = bisect.bisect_left(lens, int(n * 0.75)), bisect.bisect_right(lens, int(n * 1.25) + 2)
    cands = [o for o in by_len[lo:hi] if topic(o) != topic(item)]
    return rng.choice(cands)["assistant"] if cands else None


def corrupt_opposites(rng, item, ctx):
    """factually_wrong: every listed word swapped for its opposite (None if the reply has none)."""
    text = item["assistant"]
    swapped = OPPOSITE_RE.sub(lambda m: OPPOSITE_OF[m.group(0)], text)
    return swapped if swapped != text else None


def corrupt_comply(rng, item, ctx):
    """harmful_compliance: a refusal (a safety item) replaced by eager, vague steps."""
    steps = rng.sample(COMPLY_STEPS, rng.randint(3, 5))
    return rng.choice(COMPLY_OPENINGS) + "，".join(steps) + "。"


def stored_wrong(rng, item, ctx):
    """wrong_math / yesno_flip / wrong_answer: the task's stored wrong reply in the same format."""
    return item.get("_wrong")


def is_yes_no(item):
    """A generated item answered 是的，/不是，."""
    return "kind" in item and item["assistant"].startswith(("是的，", "不是，"))


REWARD_CORRUPTIONS = {
    "short_dismissive": (lambda it: True, corrupt_short),
    "repetitive": (lambda it: True, corrupt_repetitive),
    "rude": (lambda it: True, corrupt_rude),
    "off_topic": (lambda it: True, pick_off_topic),
    "wrong_math": (lambda it: it.get("kind") in MATH_KINDS, stored_wrong),
    "yesno_flip": (is_yes_no, stored_wrong),
    "factually_wrong": (lambda it: it.get("category") in ("ai_knowledge", "daily_life", "math_logic"), corrupt_opposites),
    "harmful_compliance": (lambda it: it.get("category") == "safety" and it["assistant"].startswith("抱歉"),
                           corrupt_comply),
    "wrong_answer": (lambda it: "kind" in it and it["kind"] not in MATH_KINDS and not is_yes_no(it), stored_wrong),
}


def weighted_pick(pairs, n):
    """Pick n pairs so that each kind's count stays proportional to its REWARD_MIX share
    (always take the next pair of the kind furthest below its share)."""
    queues, taken = {}, {}
    for p in pairs:
        queues.setdefault(p["kind"], []).append(p)
    out = []
    while len(out) < n and any(queues.values()):
        kind = min((k for k in sorted(queues) if queues[k]), key=lambda k: taken.get(k, 0) / REWARD_MIX[k])
        out.append(queues[kind].pop(0))
        taken[kind] = taken.get(kind, 0) + 1
    return out


def build_reward_pairs(rng, sft_items, n, hand_pairs, held_all, split):
    """n generated pairs (chosen = an SFT reply of this split), picked so that together with hand_pairs
    the chosen reply is the longer one in about half of the pairs."""
    single = [it for it in sft_items if "user" in it]
    hand = [it for it in single if "kind" not in it]
    by_len = sorted(single, key=lambda it: (len(it["assistant"]), it["user"]))
    ctx = (by_len, [len(it["assistant"]) for it in by_len])
    pool, seen = [], set()
    for kind, share in REWARD_MIX.items():
        ok, corrupt = REWARD_CORRUPTIONS[kind]
        eligible = [it for it in single if ok(it) and (kind not in ("wrong_math", "yesno_flip", "wrong_answer") or it.get("_wrong"))]
        if not eligible:                       # e.g. no hand-written safety items to refuse with
            continue
        generic = kind in ("short_dismissive", "repetitive", "rude", "off_topic")
        for _ in range(round(REWARD_POOL_FACTOR * share * n)):
            # Generic corruptions draw half their sources from the hand-written chat items.
            item = rng.choice(hand if generic and hand and rng.random() < 0.5 else eligible)
            rejected = corrupt(rng, item, ctx)
            pair = {"prompt": item["user"], "chosen": item["assistant"], "rejected": rejected, "kind": kind}
            if (not rejected or rejected == item["assistant"] or (pair["prompt"], rejected) in seen
                    or (split == "train" and touches("\n".join(pair.values()), held_all))):
                continue
            seen.add((pair["prompt"], rejected))
            pool.append(pair)
    rng.shuffle(pool)
    longer = [p for p in pool if len(p["chosen"]) > len(p["rejected"])]
    other = [p for p in pool if len(p["chosen"]) <= len(p["rejected"])]
    hand_longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in hand_pairs)
    need = min(max(round(0.5 * (n + len(hand_pairs))) - hand_longer, 0), n, len(longer))
    picked = weighted_pick(longer, need) + weighted_pick(other, n - need)
    if len(picked) < n:
        warn(f"reward {split}: only {len(picked)} of {n} generated pairs")
    return picked


# ----------------------------------------------------------------------------- sources, output

def load_json_list(path, required):
    """A JSON list of dicts with the required fields; [] with a warning if missing, bad items skipped."""
    if not path.exists():
        warn(f"{path} is missing; skipped")
        return []
    items = json.loads(path.read_text(encoding="utf-8"))
    good = [it for it in items if isinstance(it, dict) and all(isinstance(it.get(f), (str, list)) for f in required)]
    if len(good) < len(items):
        warn(f"{path}: skipped {len(items) - len(good)} malformed items")
    return good


def load_sources(src_dir):
    """All hand-written sources (missing ones are empty, with a warning)."""
    src_dir = Path(src_dir)
    files = sorted((src_dir / "prose").glob("*.txt"))
    if len(files) != EXPECTED_PROSE_FILES:
        warn(f"found {len(files)} prose files in {src_dir / 'prose'}, expected {EXPECTED_PROSE_FILES}")
    src = {"prose": [(f.name, [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]) for f in files],
           "sft_hand": load_json_list(src_dir / "sft_hand.json", ["user", "assistant"]),
           "sft_multiturn": load_json_list(src_dir / "sft_multiturn.json", ["messages"]),
           "reward_hand": load_json_list(src_dir / "reward_hand.json", ["prompt", "chosen", "rejected"]),
           "rlvf_seed": load_json_list(src_dir / "rlvf_seed.json", ["type", "prompt", "expected_answer"])}
    if len(src["rlvf_seed"]) != EXPECTED_SEED_TASKS:
        warn(f"found {len(src['rlvf_seed'])} RLVF seed tasks, expected {EXPECTED_SEED_TASKS}")
    return src


def public(item):
    """Drop private (underscore) fields before writing."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def generate_all(seed=SEED, src_dir=DATA_DIR / "src", out_dir=DATA_DIR):
    """Build and write every data file. Returns {"held_out": kind -> set of keys, "summary": [(file, items, chars)]}."""
    src = load_sources(src_dir)
    spaces = build_key_spaces()
    # 1. Reserve the held-out keys before anything else is generated.
    held = reserve_held_out(spaces, source_keys(src), rng_for(seed, "held_out"))
    held_all = set().union(*held.values())
    pools = split_pools(spaces, held)
    # 2. Pretrain text, SFT, reward pairs, RLVF tasks; each part has its own random stream.
    pre_train, pre_val, pre_drills = build_pretrain(rng_for(seed, "pretrain"), src["prose"], pools, held_all,
                                                    rng_for(seed, "drills"))
    sft_train, sft_val = build_sft(rng_for(seed, "sft"), src, pools, held_all)
    rng = rng_for(seed, "reward")
    hand_train, hand_val = split_stratified(rng, src["reward_hand"], "kind", REWARD_HAND_VAL_FRACTION)
    reward = {}
    for split, sft, hand in (("train", sft_train, hand_train), ("val", sft_val, hand_val)):
        pairs = hand + build_reward_pairs(rng, sft, REWARD_GEN[split], hand, held_all, split)
        rng.shuffle(pairs)
        reward[split] = pairs
    rng = rng_for(seed, "rlvf")
    seen = {t["prompt"] for t in src["rlvf_seed"]}
    rlvf_train = list(src["rlvf_seed"]) + sample_tasks(rng, RLVF_PLAN["train"], pools, "train", held_all, seen)
    rlvf_val = sample_tasks(rng, RLVF_PLAN["val"], pools, "val", held_all, seen)
    rng.shuffle(rlvf_train)   # generated tasks come out grouped by kind; a sequential reader must see a mix
    rng.shuffle(rlvf_val)
    # 2b. Everyday chat (data/chat.py) with its own streams, merged in last so the rest stays unchanged.
    chat = chat_data.build_chat(rng_for(seed, "chat"), Path(src_dir) / "chat", pools, chat_math_reply,
                                clean=lambda q, a: not (touches(q + "\n" + a, held_all) or infer_arith_keys(q, a) & held_all))
    mix = rng_for(seed, "chat_mix")
    pre_train = "\n".join(chat_data.insert_randomly(mix, pre_train.splitlines(), chat["pretrain_train"])) + "\n"
    pre_val = "\n".join(chat_data.insert_randomly(mix, pre_val.splitlines(), chat["pretrain_val"])) + "\n"
    sft_train = chat_data.insert_randomly(mix, sft_train, chat["sft_train"])
    sft_val = chat_data.insert_randomly(mix, sft_val, chat["sft_val"])
    reward = {split: chat_data.insert_randomly(mix, reward[split], chat["reward_" + split]) for split in reward}
    # 3. Write.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"pretrain_data.txt": pre_train, "pretrain_val.txt": pre_val, "pretrain_drills.txt": pre_drills}
    for name, items in (("sft_data.json", sft_train), ("sft_val.json", sft_val), ("reward_data.json", reward["train"]),
                        ("reward_val.json", reward["val"]), ("rlvf_data.json", rlvf_train), ("rlvf_val.json", rlvf_val),
                        ("chat_eval.json", chat["eval"])):
        outputs[name] = json.dumps([public(it) for it in items], ensure_ascii=False, indent=1) + "\n"
    summary = []
    for name, text in outputs.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        n_items = text.count("\n") if name.endswith(".txt") else len(json.loads(text))
        summary.append((name, n_items, len(text)))
    return {"held_out": held, "summary": summary}


def main(argv=None):
    """CLI: write the data files and print a summary table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", default=str(DATA_DIR), help="output directory (default: the data/ folder)")
    ap.add_argument("--src", default=str(DATA_DIR / "src"), help="hand-written sources")
    args = ap.parse_args(argv)
    result = generate_all(args.seed, args.src, args.out)
    print(f"{'file':<20}{'items':>8}{'characters':>12}")
    for name, n_items, n_chars in result["summary"]:
        print(f"{name:<20}{n_items:>8}{n_chars:>12,}")
    print("held-out keys: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(result["held_out"].items())))


if __name__ == "__main__":
    main()
