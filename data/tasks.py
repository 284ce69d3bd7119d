"""Math and logic tasks from problem keys (imported by generate.py; keys.py holds the keys).

A task is one question with its checkable answer, in the house style that SFT teaches, RLVF
verifies and the reward model compares: make_<kind>(rng, key, i, split) for each of twelve kinds
(MAKERS), "explain your answer" variants (EXPLAIN_MAKERS), and sample_tasks() that draws a plan of
them with unique prompts, dropping training tasks that touch a held-out key. The questions are
worded from phrasings.py: held-out ("val") tasks only in phrasings that training never uses. The
same tasks feed the pretraining text's worked lines (pretrain.py), SFT (sft.py), the reward pairs'
wrong replies (reward.py) and RLVF (rlvf.py); chat_math_reply() writes data/chat.py's arithmetic
replies.

Standard library only; deterministic given the random.Random passed in.
"""
import random
import re

from keys import CATEGORIES, DAY_CHARS, OFFSET_WORDS, touches, warn
from phrasings import PHRASINGS

MATH_KINDS = ("add", "sub", "mul", "div", "word_add", "word_sub", "word_mul")
YES_KEYWORDS, NO_KEYWORDS = ["是", "正确", "对"], ["不是", "不对", "错误"]
PEOPLE = ["小明", "小红", "小刚", "小丽", "小华", "小芳", "小军", "小兰"]
FRUITS = ["苹果", "梨", "桃子", "橘子"]
SUPER = {"动物": "生物", "鸟": "动物", "鱼": "动物", "花": "植物", "树": "植物", "水果": "食物", "蔬菜": "食物"}

EXPLAIN_SUFFIXES = ["请写出计算过程。", "请一步一步地算。", "请说明理由。"]


def phrase(rng, name, split):
    """One of phrasings.py's question templates `name` for the split ("train" or held-out "val")."""
    return rng.choice(PHRASINGS[name][split])


# ----------------------------------------------------------------------------- task generators
# Each make_<kind>(rng, key, i, split) returns an internal task: public fields plus "_reply" (the SFT answer)
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
    # the lent 1 is taken off as a fact of its own ("十位借走1后是8 - 1 = 7"): said as a bare
    # number ("借走1后是7"), the tens digit came out copied and not lowered
    lent = f"十位借走1后是{ta} - 1 = {t}" if borrow else ""
    if tb == 0:
        tens, t_res = (lent if borrow else f"十位是{t}"), t
    else:
        t_res = t - tb + dt
        tens = (f"{lent}，{t} - {tb} = {t_res}" if borrow else f"再算十位，{t} - {tb} = {t_res}")
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


def make_add(rng, key, i, split):
    """Addition within 100: 'a + b 等于多少？'."""
    a, b = ordered(rng, key[1], key[2])
    return arith_task(rng, "add", "+", phrase(rng, "add", split).format(a=a, b=b), a, b, a + b)


def make_sub(rng, key, i, split):
    """Subtraction within 100 with a non-negative result."""
    a, b = key[1], key[2]
    return arith_task(rng, "sub", "-", phrase(rng, "sub", split).format(a=a, b=b), a, b, a - b)


def make_mul(rng, key, i, split):
    """Single-digit multiplication."""
    a, b = ordered(rng, key[1], key[2])
    return arith_task(rng, "mul", "×", phrase(rng, "mul", split).format(a=a, b=b), a, b, a * b)


def make_div(rng, key, i, split):
    """Exact division with quotient and divisor at most 9."""
    a, b = key[1], key[2]
    return arith_task(rng, "div", "÷", phrase(rng, "div", split).format(a=a, b=b), a, b, a // b)


def word_task(rng, kind, sym, templates, a, b, c):
    """One-step word problem; the reply works the equation the story asks for."""
    setup, ask = rng.choice(templates)
    fill = {"a": a, "b": b, "name": rng.choice(PEOPLE), "fruit": rng.choice(FRUITS)}
    return arith_task(rng, kind, sym, f"{setup.format(**fill)}，{ask.format(**fill)}", a, b, c)


def make_word_add(rng, key, i, split):
    """Word problem: 又买了 / 又飞来了 ... (addition)."""
    a, b = ordered(rng, key[1], key[2])
    return word_task(rng, "word_add", "+", PHRASINGS["word_add"][split], a, b, a + b)


def make_word_sub(rng, key, i, split):
    """Word problem: 送给 / 花了 / 吃掉了 ... (subtraction)."""
    return word_task(rng, "word_sub", "-", PHRASINGS["word_sub"][split], key[1], key[2], key[1] - key[2])


def make_word_mul(rng, key, i, split):
    """Word problem: 每盒 / 每排 ... (multiplication)."""
    a, b = ordered(rng, key[1], key[2])
    return word_task(rng, "word_mul", "×", PHRASINGS["word_mul"][split], a, b, a * b)


def day_name(d, style, tian=False):
    """0..6 -> 周一 / 星期一 ...; Sunday is 周日, 星期日 or (tian) 星期天."""
    if style == "周":
        return "周" + DAY_CHARS[d]
    return "星期" + ("天" if d == 6 and tian else DAY_CHARS[d])


def weekday_keywords(d):
    """Accepted spellings of day d; expected_answer is always the 周X form."""
    return ["周日", "星期日", "星期天", "周天"] if d == 6 else ["周" + DAY_CHARS[d], "星期" + DAY_CHARS[d]]


def make_weekday(rng, key, i, split):
    """Weekday forward/backward (明天/后天/昨天/前天) in 周X (even i) or 星期X (odd i) phrasing."""
    d, off = key[1], key[2]
    style, tian = ("周", "星期")[i % 2], rng.random() < 0.3
    ans, wrong = (d + off) % 7, (d + off + rng.choice((-1, 1))) % 7
    t, w = day_name(d, style, tian), OFFSET_WORDS[off]
    prompt = phrase(rng, "weekday", split).format(t=t, w=w, f=style)
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


def syllogism_prompt(rng, premises, question, split):
    """Join premises and question in one of the split's phrasings."""
    return phrase(rng, "syllogism", split).format(prem="，".join(premises), q=question)


def make_syllogism(rng, key, i, split):
    """Syllogism answered 是 (even i) or 不是 (odd i)."""
    negative = i % 2 == 1
    premises, question, reply, wrong = syllogism_parts(rng, key, negative)
    return new_task("logic", "syllogism", syllogism_prompt(rng, premises, question, split), "不是" if negative else "是",
                    reply, wrong, NO_KEYWORDS if negative else YES_KEYWORDS)


def make_compare(rng, key, i, split):
    """'a和b哪个大？' -> number (even i), or 'x比y大吗？' -> 是/不是 (odd i, polarity alternating)."""
    lo, hi = key[1], key[2]
    a, b = ordered(rng, lo, hi)
    if i % 2 == 0:
        r = rng.choice("大小")
        ans, other = (hi, lo) if r == "大" else (lo, hi)
        return new_task("logic", "compare", phrase(rng, "compare_which", split).format(a=a, b=b, r=r), str(ans),
                        f"{ans}比{other}{r}，答案是{ans}。", f"{other}比{ans}{r}，答案是{other}。", [str(ans)])
    want_yes, r = (i // 2) % 2 == 0, rng.choice("大小")
    x, y = (hi, lo) if (r == "大") == want_yes else (lo, hi)   # order so that "x比y{r}" is true iff want_yes
    opp = "小" if r == "大" else "大"
    yes, no = f"是的，{x}比{y}{r}。", f"不是，{x}比{y}{opp}。"
    return new_task("logic", "compare", phrase(rng, "compare_yesno", split).format(x=x, y=y, r=r), "是" if want_yes else "不是",
                    yes if want_yes else no, f"不是，{x}比{y}{opp}。" if want_yes else f"是的，{x}比{y}{r}。",
                    YES_KEYWORDS if want_yes else NO_KEYWORDS)


def make_parity(rng, key, i, split):
    """'n是奇数还是偶数？' -> 奇数/偶数 (even i), or 'n是奇数吗？' -> 是/不是 (odd i, polarity alternating)."""
    n = key[1]
    p, q = ("奇数", "偶数") if n % 2 else ("偶数", "奇数")
    # two-digit numbers: the reason first (only the ones digit decides), a one-digit fact seen everywhere
    why = f"{n}的个位是{n % 10}，个位是{p}，所以" if n >= 10 else ""
    why_bad = f"{n}的个位是{n % 10}，个位是{q}，所以" if n >= 10 else ""
    if i % 2 == 0:
        return new_task("logic", "parity", phrase(rng, "parity_choice", split).format(n=n), p,
                        f"{why}{n}是{p}，答案是{p}。", f"{why_bad}{n}是{q}，答案是{q}。", [p])
    want_yes = (i // 2) % 2 == 0
    asked = p if want_yes else q
    prompt = phrase(rng, "parity_yesno", split).format(n=n, q=asked)
    if want_yes:
        return new_task("logic", "parity", prompt, "是", f"是的，{why}{n}是{p}。", f"不是，{why_bad}{n}是{q}，不是{p}。",
                        YES_KEYWORDS)
    return new_task("logic", "parity", prompt, "不是", f"不是，{why}{n}是{p}，不是{q}。", f"是的，{why_bad}{n}是{q}。",
                    NO_KEYWORDS)


def make_neighbor(rng, key, i, split):
    """'n的后一个数是几？' (even i) or 'n+1的前一个数是几？' (odd i). The reply says the direction
    first ("后" -> 多1, "前" -> 少1), then works n ± 1 digit by digit (column_steps; said at once,
    the number came out one too many, one too few or copied unchanged). No "n ± 1" equation: the
    steps are one-digit facts, so no reply states a held-out two-digit key of another kind."""
    n = key[1]
    x, d, ans, sym = (n, "后", n + 1, "+") if i % 2 == 0 else (n + 1, "前", n, "-")
    say = f"{x}的{d}一个数要{'多' if sym == '+' else '少'}1："
    worked = column_steps(x, 1, sym)[0]
    steps = worked or f"{x} {sym} 1 = {ans}"                            # one digit (or 100): the fact itself
    slip = slipped_steps(x, 1, sym, ans) if worked else None
    bad, wrong = slip if slip else (f"{x} {sym} 1 = {ans + 1}", ans + 1)
    return new_task("logic", "neighbor", phrase(rng, "neighbor", split).format(n=x, d=d), str(ans),
                    f"{say}{steps}。所以是{ans}，答案是{ans}。", f"{say}{bad}。所以是{wrong}，答案是{wrong}。", [str(ans)])


MAKERS = {"add": make_add, "sub": make_sub, "mul": make_mul, "div": make_div, "word_add": make_word_add,
          "word_sub": make_word_sub, "word_mul": make_word_mul, "weekday": make_weekday,
          "syllogism": make_syllogism, "compare": make_compare, "parity": make_parity, "neighbor": make_neighbor}


# ----------------------------------------------------------------------------- explain-your-answer variants

def explain_arith(maker):
    """A "show your work" variant of a two-digit sum/difference: the house style already works it
    column by column, so the reply is the same and only the prompt asks for it."""
    def explain(rng, key, i, split):
        task = maker(rng, key, i, split)
        task["prompt"] += rng.choice(EXPLAIN_SUFFIXES)
        task["_wrong"] = None
        return task
    return explain


def explain_syllogism(rng, key, i, split):
    """Direct syllogism (even i) or its not_b negation (odd i), with the reasoning after 是的，/不是，."""
    c, a, b = key[1], key[2], key[3]
    if i % 2 == 0:
        prem, q, exp = [f"所有{a}都是{b}", f"{c}是{a}"], f"{c}是{b}", "是"
        reply = f"是的，因为所有{a}都是{b}，而{c}是{a}，所以{c}是{b}。"
    else:
        prem, q, exp = [f"所有{a}都是{b}", f"{c}不是{b}"], f"{c}是{a}", "不是"
        reply = f"不是，因为所有{a}都是{b}，如果{c}是{a}，{c}就一定是{b}；可是{c}不是{b}，所以{c}不是{a}。"
    return new_task("logic", "syllogism", syllogism_prompt(rng, prem, q, "train") + "请说明理由。", exp, reply, None)


# kind -> (maker, which keys suit it): the column methods need two two-digit operands.
EXPLAIN_MAKERS = {"add": (explain_arith(make_add), lambda k: k[1] >= 10),
                  "sub": (explain_arith(make_sub), lambda k: 10 <= k[2] <= k[1] <= 99),
                  "syllogism": (explain_syllogism, lambda k: True)}


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
            task = maker(rng, rng.choice(keys), made, split)
            if task["prompt"] in seen or (split == "train" and touches(task["prompt"] + "\n" + task["_reply"], held_all)):
                continue
            seen.add(task["prompt"])
            out.append(task)
            made += 1
        if made < n:
            warn(f"{split} {kind}: only {made} of {n} unique tasks")
    return out
