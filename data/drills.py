"""Pretraining text that teaches copying and the digit facts: reading drills, copy spans and
single-digit facts (used by generate.py).

Copying what was just read (an induction head) is what lets a model restate "72 加 19" as
72 + 19. Two kinds of text teach it:
- copy spans (pretrain_drills.txt): a random span of characters or digits, repeated two or three
  times, with no words around it. Nothing but copying predicts a repeat, and no phrasing is there
  to learn a shortcut on: in bench/copy_probe.py this forms a copying head that works in phrasings
  never seen (the copy probe), where drills with markers and phrasings did not. The pretrain
  stage mixes them into pretrain.drill_share of its batch rows.
- reading drills (inside pretrain_data.txt): a span (digits, words, a sentence, an arithmetic
  problem) stated and repeated under markers drawn from many lists, so the copying is also seen
  inside ordinary sentences and a problem is seen restated as its equation.
The copy probe's phrasings (tinygrad_llm/probe.py) are never used.

Copying is not all a worked sum needs: single-digit facts (pretrain_drills.txt too, beside the
copy spans) give the table every worked reply chains, "7 + 8 = 15；15 - 8 = 7；7 × 8 = 56；…", in
the replies' own format (bench/math_steps.py: with too few of them the model restates "72 加 19"
as 72 + 19 and then writes "2 + 9 = 10"). Beside them, pretrain.py puts whole worked
question-answer lines in that file (pretrain.worked_lines): a question in one of many phrasings,
then the reply that restates it as its equation and walks the digits, so the copying a worked
reply does is drilled where it is used (bench/README.md, "The budget, and worked lines in the
drills").

Standard library only; deterministic given the random.Random passed in.
"""

DRILL_MARKERS = ["编号", "学号", "工号", "座位号", "门牌号", "车次", "航班号", "订单号", "邮编", "验证码", "序号",
                 "房间号", "票号", "批号", "会员号", "准考证号", "桌号", "柜号", "车牌尾号", "分机号", "页码", "代码",
                 "暗码", "货号", "楼号", "证号", "型号", "班次", "密码", "线路"]
DRILL_SAY = ["是", "为", "：", "写着", "记作", "叫", "等于", "定为"]
DRILL_AGAIN = ["重复一遍：", "我再读一次：", "记住了：", "抄写如下：", "确认一下：", "也就是", "没错，", "请写下：",
               "跟我念：", "复述：", "原样写出：", "再核对一次：", "照抄：", "重说一次：", "对照一下：", "换行再写："]
DRILL_WORDS = ["苹果", "星星", "河流", "老师", "书包", "月亮", "钢笔", "小猫", "火车", "森林", "白云", "窗户", "雨伞",
               "面包", "蜡烛", "桥梁", "灯塔", "花园", "石头", "风筝", "茶杯", "草地", "雪人", "海浪", "蜜蜂", "台灯"]
DRILL_ASK = ["{a}加{b}等于多少？", "{a}加上{b}是几？", "把{a}和{b}加起来是多少？", "{a}减{b}还剩多少？",
             "从{a}里减去{b}得几？", "{a}乘{b}是多少？", "{a}的{b}倍是多少？", "{a}除以{b}等于几？",
             "{a}个加{b}个一共几个？", "有{a}个，拿走{b}个，还剩几个？", "{a}和{b}的和是多少？", "{a}与{b}的差是多少？"]
DRILL_ASK_SYM = ["+", "+", "+", "-", "-", "×", "×", "÷", "+", "-", "+", "-"]


def digit_string(rng, lo=3, hi=9):
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def copy_spans(rng, alphabet, n_chars):
    """Lines of random spans (4-16 characters, half of them digits only) each repeated 2-3 times."""
    lines, total = [], 0
    while total < n_chars:
        pool = "0123456789" if rng.random() < 0.5 else alphabet
        span = "".join(rng.choice(pool) for _ in range(rng.randint(4, 16)))
        lines.append(span * rng.randint(2, 3) + "。")
        total += len(lines[-1])
    return ["".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]


def digit_fact(rng):
    """One single-digit fact in the worked replies' format: '7 + 8 = 15', '7 + 1 + 1 = 9' (a carried
    ten), '15 - 8 = 7' (a borrowed ten), '7 × 8 = 56', '56 ÷ 8 = 7'."""
    kind = rng.randrange(5)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} + {b} + 1 = {a + b + 1}"
    if kind == 2:
        a = b + rng.randint(0, 9)
        return f"{a} - {b} = {a - b}"
    a, b = max(a, 1), max(b, 1)
    return f"{a} × {b} = {a * b}" if kind == 3 else f"{a * b} ÷ {b} = {a}"


def digit_facts(rng, n_chars, keep=lambda fact: True):
    """Lines of 8-16 single-digit facts (digit_fact) until n_chars: the table every worked sum
    chains, dense enough to be learnt by heart. keep(fact): False drops one (a held-out key)."""
    lines, total = [], 0
    while total < n_chars:
        facts = []
        while len(facts) < rng.randint(8, 16):
            f = digit_fact(rng)
            if keep(f):
                facts.append(f)
        lines.append(rng.choice(["，", "；", "。"]).join(facts) + "。")
        total += len(lines[-1])
    return lines


def drill_line(rng, sentences, arith_keys, names):
    """One line that states a span and repeats it (see DRILL_MARKERS)."""
    form = rng.randrange(7)
    name, name2 = rng.sample(names, 2)
    if form == 0:                                   # marker + digits, repeated under another marker
        d, m = digit_string(rng), rng.choice(DRILL_MARKERS)
        return f"{m}{rng.choice(DRILL_SAY)}{d}，{rng.choice(DRILL_AGAIN)}{rng.choice([m, ''])}{d}。"
    if form == 1:                                   # several digit strings, each repeated in turn
        ds = [digit_string(rng, 2, 6) for _ in range(rng.randint(2, 3))]
        ms = rng.sample(DRILL_MARKERS, len(ds))
        first = "，".join(f"{m}{d}" for m, d in zip(ms, ds))
        return f"{first}。{rng.choice(DRILL_AGAIN)}" + "，".join(f"{m}{d}" for m, d in zip(ms, ds)) + "。"
    if form == 2:                                   # quoted speech copied by someone else
        d = digit_string(rng) if rng.random() < 0.6 else "".join(rng.sample(DRILL_WORDS, rng.randint(2, 3)))
        return f"{name}说：“{d}”。{name2}{rng.choice(['跟着说', '重复道', '点头说', '写下'])}：“{d}”。"
    if form == 3:                                   # a list of words, repeated in order
        ws = rng.sample(DRILL_WORDS, rng.randint(3, 5))
        return f"{name}的清单：{'、'.join(ws)}。{rng.choice(DRILL_AGAIN)}{'、'.join(ws)}。"
    if form == 4 and sentences:                     # a sentence of prose, read twice
        s = rng.choice(sentences)
        return f"{s}{rng.choice(DRILL_AGAIN)}{s}"
    if form in (4, 5):                              # a digit string three times
        d = digit_string(rng, 2, 6)
        return f"{rng.choice(DRILL_MARKERS)}{d}，{d}，{d}。"
    key = rng.choice(arith_keys)                    # an arithmetic problem restated as its equation
    sym = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}[key[0]]
    ask = rng.choice([q for q, s in zip(DRILL_ASK, DRILL_ASK_SYM) if s == sym])
    a, b = key[1], key[2]
    return f"{name}问：{ask.format(a=a, b=b)}先写出算式：{a} {sym} {b}。"


def reading_drills(rng, prose, arith_keys, names, n_chars, keep=lambda line: True):
    """Drill lines until n_chars, grouped in paragraphs. prose: paragraphs whose sentences may be
    repeated; arith_keys: (kind, a, b) problems that may be restated; keep(line): False drops a
    line (generate.py drops any that touches a held-out key)."""
    sentences = [s + "。" for p in prose for s in p.split("。") if 8 <= len(s) <= 40]
    lines, total = [], 0
    while total < n_chars:
        line = drill_line(rng, sentences, arith_keys, names)
        if not keep(line):
            continue
        lines.append(line)
        total += len(line)
    # grouped into paragraphs of 4-8 lines, so a 256-character window holds several drills
    out = []
    while lines:
        k = rng.randint(4, 8)
        out.append("".join(lines[:k]))
        lines = lines[k:]
    return out
