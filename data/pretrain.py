"""Pretraining text (pretrain_data.txt, pretrain_val.txt, pretrain_drills.txt; imported by generate.py).

The hand-written prose (every 20th paragraph of each file held out), interleaved with paragraphs of
one-line facts on training keys ("十五加二十七等于四十二。"), worked question-answer lines from
tasks.py, and data/drills.py's reading drills; the copy spans, single-digit facts and worked
question-answer lines go to a file of their own (pretrain_drills.txt, mixed into
pretrain.drill_share of the batch rows).

Standard library only; deterministic given the random.Random passed in.
"""
import random

import drills
from keys import NAMES, OFFSET_WORDS, touches
from numerals import to_chinese
from tasks import MAKERS, PEOPLE, day_name, ordered, sample_tasks

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
# single-digit facts, pretrain_drills.txt too (drills.digit_facts): twice the copy spans, since the
# sums probe was 37% at 200k (bench/README.md, "The digit facts, again")
DIGIT_FACT_CHARS = 400_000
# worked arithmetic, pretrain_drills.txt too (worked_lines): "问：<a training phrasing>答：<worked reply>"
# on training keys, so the copying a worked reply does (operands out of the question, then each
# digit out of the restated equation) is drilled with the facts in place
WORKED_CHARS = 300_000
WORKED_WEIGHTS = {"add": 3, "sub": 3, "word_add": 1, "word_sub": 1, "word_mul": 1, "mul": 1, "div": 1,
                  "weekday": 1, "parity": 1, "compare": 1, "neighbor": 1}
FACT_WEIGHTS = {"add": 5, "sub": 4, "mul": 3, "div": 2, "weekday": 2, "parity": 2, "compare": 2, "neighbor": 2}


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


def qa_lines(rng, pools, split, held_all, plan):
    """plan[kind] task lines per kind, "问：<prompt>答：<worked reply>", on the split's keys."""
    return [f"问：{t['prompt']}答：{t['_reply']}" for t in sample_tasks(rng, plan, pools, split, held_all, set())]


def worked_lines(rng, pools, held_all, n_chars):
    """Worked question-answer lines, "问：<question>答：<worked reply>", of the WORKED_WEIGHTS kinds
    (training phrasings and keys, none touching a held-out key) until about n_chars."""
    per_line = 75                                   # characters of an average line
    total_w = sum(WORKED_WEIGHTS.values())
    return qa_lines(rng, pools, "train", held_all,
                    {k: max(1, round(n_chars / per_line * w / total_w)) for k, w in WORKED_WEIGHTS.items()})


def build_pretrain(rng, prose, pools, held_all, drill_rng):
    """(train text, val text, copy spans): prose (every 20th paragraph of each file to val)
    interleaved with fact paragraphs, worked question-answer lines and reading drills; the copy
    spans apart (drills and spans are train only: the held-out text stays prose and facts)."""
    train, val = [], []
    for _, paragraphs in prose:
        for i, p in enumerate(paragraphs):
            (val if i % PROSE_VAL_EVERY == PROSE_VAL_OFFSET else train).append(p)
    val_rng = random.Random(rng.getrandbits(64))   # the val text does not move when training phrasings change
    val_facts, val_sentences = fact_paragraphs(rng, pools, FACT_CHARS["val"], banned=set())
    train_facts, _ = fact_paragraphs(rng, pools, FACT_CHARS["train"], banned=val_sentences)
    train += train_facts + qa_lines(rng, pools, "train", held_all, dict.fromkeys(MAKERS, PRETRAIN_QA["train"]))
    train_prose = [p for _, paragraphs in prose for i, p in enumerate(paragraphs) if i % PROSE_VAL_EVERY != PROSE_VAL_OFFSET]
    arith_keys = [k for kind in ("add", "sub", "mul", "div") for k in pools[kind]["train"]]
    train += drills.reading_drills(drill_rng, train_prose, arith_keys, PEOPLE + NAMES, DRILL_CHARS,
                                   keep=lambda line: not touches(line, held_all))
    alphabet = sorted(set("".join(train_prose)) - set("，。、；：？！“”《》（）\n")) or list("0123456789")
    spans = drills.copy_spans(drill_rng, alphabet, COPY_CHARS)
    spans += drills.digit_facts(drill_rng, DIGIT_FACT_CHARS, keep=lambda fact: not touches(fact, held_all))
    drill_rng.shuffle(spans)
    if WORKED_CHARS:
        worked_rng = random.Random(drill_rng.getrandbits(64))
        for line in worked_lines(worked_rng, pools, held_all, WORKED_CHARS):
            spans.insert(worked_rng.randrange(len(spans) + 1), line)
    val += val_facts + qa_lines(val_rng, pools, "val", held_all, dict.fromkeys(MAKERS, PRETRAIN_QA["val"]))
    rng.shuffle(train)
    val_rng.shuffle(val)
    return "\n".join(train) + "\n", "\n".join(val) + "\n", "\n".join(spans) + "\n"
