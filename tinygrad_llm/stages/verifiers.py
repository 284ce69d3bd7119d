"""Automatic answer checkers for RLVF: pure functions from (task, reply) to bool, and
`step_credit`, partial credit (a float) for the worked steps of a math reply.

The model is taught to answer "…，答案是42。" (or to lead with "是的，"/"不是，" for yes/no
questions), so both verifiers first look for that *designated* answer and fall back to
simpler heuristics only when it is missing. Every function accepts arbitrary text and never
raises, except `verify_task` / `states_answer` on a task of unknown type (and `verify_task`
on keywords that are not a list): ValueError.
"""
from __future__ import annotations

import re

# Full-width digits and signs are mapped to ASCII. "。" and "，" are left alone: they end
# clauses, and a full-width comma between digits is too ambiguous to be a thousands separator.
_FULLWIDTH = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)},
                            "－": "-", "−": "-", "＋": "+", "．": ".", "：": ":"})
# "答案是" / "答案为" / "答案:" ("：" is already ":" after _normalise).
_MARKER = re.compile(r"答案\s*(?:是|为|:)\s*:?\s*")
# A clause ends at sentence punctuation; an ASCII "," or "." only when it is not inside a
# number ("1,000", "2.5").
_CLAUSE_END = re.compile(r"[，。！？；;!?\n]|,(?![0-9]{3})|\.(?![0-9])")
# A number: optional sign ("负" too), thousands groups or plain digits, optional decimals.
# The look-behind stops "5-3" from reading as "-3" and "1.2.3" from yielding ".3".
_NUMBER = re.compile(r"(?<![0-9.])(?:负|[-+])?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")
_TRIM = " \t\r\n:。.！!？?，,"  # stripped around a designated answer before comparing it
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5,
              "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_NUMBER = re.compile(r"(负)?([零〇一二两三四五六七八九十百千]+)")


def _normalise(text: str) -> str:
    """Full-width digits/signs -> ASCII; everything else unchanged."""
    return text.translate(_FULLWIDTH)


def _designated(text: str) -> str | None:
    """The clause after the LAST answer marker ("答案是…"), or None when there is none.
    Empty clauses are skipped, so a reply cut off right after "答案是" falls back to the rest."""
    for marker in reversed(list(_MARKER.finditer(text))):
        # search from the marker instead of slicing off the rest: no O(len) copy per marker
        end = _CLAUSE_END.search(text, marker.end())
        clause = text[marker.end():end.start() if end else len(text)]
        if clause.strip(_TRIM):
            return clause
    return None


def _first_clause(text: str) -> str:
    """The reply up to its first clause-ending punctuation."""
    text = text.strip()
    end = _CLAUSE_END.search(text)
    return text[:end.start()] if end else text


def _canonical(number: str) -> str:
    """'-1,000.50' -> '-1000.5': one spelling per value, so string equality is numeric
    equality (done on strings, not floats, so huge or long inputs never overflow)."""
    negative = number.startswith(("-", "负"))
    whole, _, frac = number.lstrip("+-负").replace(",", "").partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "-" + out if negative and out != "0" else out


def _chinese_to_int(numeral: str) -> int | None:
    """Small Chinese numerals (< 10000): '八' -> 8, '十二' -> 12, '一百零五' -> 105; else None."""
    total, digit, last_unit = 0, None, 10_000
    for ch in numeral:
        if ch in _CN_DIGITS:
            if digit not in (None, 0):  # "一二" is a digit string, not a numeral
                return None
            digit = _CN_DIGITS[ch]
        else:
            unit = _CN_UNITS[ch]
            if unit >= last_unit:  # units must shrink: "十百" is malformed
                return None
            total += (1 if digit is None else digit) * unit  # bare "十" means 10
            digit, last_unit = None, unit
    return total + (digit or 0)


def _parse_number(text: str) -> str | None:
    """Canonical number if the whole of `text` is one number (Arabic or Chinese), else None."""
    text = _normalise(text).strip().rstrip("。.")
    if _NUMBER.fullmatch(text):
        return _canonical(text)
    m = _CN_NUMBER.fullmatch(text)
    value = _chinese_to_int(m.group(2)) if m else None
    return None if value is None else _canonical(("-" if m.group(1) else "") + str(value))


class MathVerifier:
    """Checks that the reply's designated final number equals the expected answer."""

    def _extract(self, response: str) -> tuple[str | None, bool]:
        """(canonical answer or None, whether it came from an answer marker)."""
        if not isinstance(response, str):
            return None, False
        text = _normalise(response)
        clause = _designated(text)
        if clause is None:  # no marker: the last number the reply wrote is its answer
            numbers = _NUMBER.findall(text)
            return (_canonical(numbers[-1]) if numbers else None), False
        # "答案是 5 + 3 = 8": the answer is what follows the last "=".
        segment = clause.rsplit("=", 1)[-1].strip()
        m = _NUMBER.search(segment)
        if m:
            return _canonical(m.group()), True
        # "答案是八": Chinese numerals count only at the start of a clause without digits.
        m = _CN_NUMBER.match(segment)
        value = _chinese_to_int(m.group(2)) if m else None
        if value is None:
            return None, True
        return _canonical(("-" if m.group(1) else "") + str(value)), True

    def extract_answer(self, response: str) -> str | None:
        """The designated final answer as a canonical number string ('8', '-3', '2.5'), or None."""
        return self._extract(response)[0]

    def verify(self, response: str, expected_answer: str) -> bool:
        """Numeric comparison ('8.0' == '8'); a non-numeric expected is compared as a stripped
        string against the designated answer (or the whole reply when there is no marker)."""
        if not isinstance(response, str):
            return False
        expected = str(expected_answer).strip()
        if not expected:
            return False
        number = _parse_number(expected)
        if number is not None:
            return self.extract_answer(response) == number
        text = _normalise(response)
        clause = _designated(text)
        answer = text if clause is None else clause
        return answer.strip(_TRIM) == _normalise(expected).strip(_TRIM)


# Yes/no vocabulary. Negative markers are checked before positive ones because nearly every
# negative contains a positive ("不是" contains "是", "不对" contains "对").
_YES = {"是", "是的", "对", "对的", "正确", "正确的", "没错", "真", "成立", "yes", "true", "correct"}
_NO = {"不是", "不", "否", "不对", "不正确", "错误", "错", "错的", "没有", "假", "不成立",
       "no", "false", "wrong", "incorrect"}
_NEG = re.compile(r"不|否|没有|并非|错|(?<![a-z])(?:no|not|wrong|incorrect|false)(?![a-z])", re.I)
_POS = re.compile(r"是|对|正确|(?<![a-z])(?:yes|correct|true|right)(?![a-z])", re.I)
_POS_IDIOMS = re.compile(r"没错|不错")  # contain a negative character but mean "right"
# "不知道" contains "不" but is no answer; without this a reply "不知道" would score as "no".
_UNSURE = re.compile(r"不知道|不确定|不清楚|无法|说不准|不好说")
_LEADS = ("是的", "不是", "不对", "不正确", "没错", "正确", "错误", "对的")  # "是的，…" style
# Answers of a known kind, so a *different* answer of the same kind can be recognised.
_WEEKDAY = re.compile(r"(?:周|星期|礼拜)([一二三四五六日天1-7])(?![一二三四五六七八九十0-9])")
_WEEKDAY_KEY = {**dict(zip("一二三四五六日天", (1, 2, 3, 4, 5, 6, 7, 7))),
                **{str(i): i for i in range(1, 8)}}
_PARITY = re.compile(r"([奇偶单双])数")
_PARITY_KEY = {"奇": "odd", "单": "odd", "偶": "even", "双": "even"}
_KINDS = ((_WEEKDAY, _WEEKDAY_KEY), (_PARITY, _PARITY_KEY))
_NEGATION_BEFORE = re.compile(r"[不非没未]")
_NEGATION_WINDOW = 3  # chars before a match that may hold its negation ("不是", "并非", "不会是")


def _polarity(clause: str) -> bool | None:
    """True for yes, False for no, None when the clause states neither (or is unsure)."""
    if _UNSURE.search(clause):
        return None
    clause = _POS_IDIOMS.sub("对", clause)
    if _NEG.search(clause):
        return False
    return True if _POS.search(clause) else None


def _negated(text: str, start: int) -> bool:
    """Whether the match at `start` is preceded, within its clause, by a negation."""
    # Only the last _NEGATION_WINDOW chars can matter, and _CLAUSE_END looks only forward, so
    # scanning that tail finds the same clause ends as scanning all of text[:start] would;
    # it keeps a long reply with many matches linear instead of quadratic.
    prefix = text[max(0, start - _NEGATION_WINDOW):start]
    ends = list(_CLAUSE_END.finditer(prefix))
    prefix = prefix[ends[-1].end():] if ends else prefix
    return bool(_NEGATION_BEFORE.search(prefix))


def _bounded(word: str) -> re.Pattern:
    """Pattern for `word` that refuses to match inside a longer number or word
    ('2' in '12' or '2.5', '周二' in '周二十', 'yes' in 'yesterday')."""
    pre = post = ""
    for chars in ("0-9", "零〇一二两三四五六七八九十百千", "A-Za-z"):
        if re.match(f"[{chars}]", word[0]):
            pre = f"(?<![{chars}.])" if chars == "0-9" else f"(?<![{chars}])"
        if re.match(f"[{chars}]", word[-1]):
            post = f"(?![{chars}]|\\.[0-9])" if chars == "0-9" else f"(?![{chars}])"
    return re.compile(pre + re.escape(word) + post)


def _mentions(text: str, words: list[str]) -> bool:
    """Whether any of `words` occurs in `text`, bounded and not negated."""
    return any(not _negated(text, m.start()) for w in words for m in _bounded(w).finditer(text))


class LogicVerifier:
    """Checks yes/no, weekday, parity and short-word answers, preferring the "答案是" clause."""

    def verify(self, response: str, expected_answer: str, keywords: list[str] | None = None) -> bool:
        """Whether the reply's stated answer is `expected_answer` (or one of its multi-character
        `keywords`; single-character keywords count only as the whole designated answer)."""
        if not isinstance(response, str):
            return False
        expected = _normalise(str(expected_answer)).strip().rstrip("。.")
        if not expected:
            return False
        text = _normalise(response)
        clause = _designated(text)
        if expected.lower() in _YES | _NO:
            stated = _polarity(clause if clause is not None else _first_clause(text))
            return stated is not None and stated == (expected.lower() in _YES)
        if _parse_number(expected) is not None:  # numbers follow the math rules ("2" != "12")
            return MathVerifier().verify(response, expected)
        keywords = [_normalise(str(k)).strip() for k in (keywords or []) if str(k).strip()]
        # Whole-answer match first: this is the only way a single char like "二" may count.
        whole = (clause if clause is not None else text).strip(_TRIM)
        if whole == expected or whole in keywords:
            return True
        region = clause if clause is not None else text
        for pattern, key in _KINDS:
            m = pattern.fullmatch(expected)
            if not m:
                continue
            found = [key[x.group(1)] for x in pattern.finditer(region) if not _negated(region, x.start())]
            if clause is not None and any(k != key[m.group(1)] for k in found):
                return False  # the answer clause names a competing answer ("答案是周三")
            if found:  # no marker: the last weekday/parity the reply states is its answer
                return found[-1] == key[m.group(1)]
        return _mentions(region, [expected] + [k for k in keywords if len(k) > 1])


def _task_type(task: dict) -> str:
    """The task's type, validated; unknown types raise ValueError."""
    kind = task.get("type") if isinstance(task, dict) else None
    if kind not in ("math", "logic"):
        raise ValueError(f"unknown RLVF task type {kind!r}: expected 'math' or 'logic'")
    return kind


def verify_task(task: dict, response: str) -> bool:
    """Dispatch one RLVF task {"type", "expected_answer", "keywords"?} to its verifier."""
    kind = _task_type(task)
    keywords = task.get("keywords")
    if keywords is not None and not isinstance(keywords, (list, tuple)):
        raise ValueError(f"RLVF task 'keywords' must be a list of strings, got {type(keywords).__name__}")
    if kind == "math":
        return MathVerifier().verify(response, task.get("expected_answer", ""))
    return LogicVerifier().verify(response, task.get("expected_answer", ""), keywords)


def states_answer(task: dict, response: str) -> bool:
    """Whether the reply states its answer in the parseable house style (for a format reward):
    math needs "答案是<number>"; logic needs a non-empty "答案是…" clause, or for yes/no tasks
    a leading "是的，"/"不是，"-style word."""
    kind = _task_type(task)
    if not isinstance(response, str):
        return False
    if kind == "math":
        value, from_marker = MathVerifier()._extract(response)
        return from_marker and value is not None
    text = _normalise(response)
    clause = _designated(text)
    if clause is not None:  # _designated already skips empty clauses
        return True
    expected = _normalise(str(task.get("expected_answer", ""))).strip().rstrip("。.").lower()
    if expected not in _YES | _NO:
        return False
    first = _first_clause(text)
    # A bare single-char lead ("是。", "对，") counts only as the whole first clause.
    return (first.startswith(_LEADS) or first in {"是", "对", "否", "不"}) and _polarity(first) is not None


# ----------------------------------------------------------------------------------------
# partial credit


_STEP = re.compile(r"(\d+)\s*([+\-×÷])\s*(\d+)(?:\s*([+\-])\s*(\d+))?\s*=\s*(\d+)")
_EQUATION = re.compile(r"^(\d+)\s*[+\-×÷]\s*(\d+)：")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y,
        "÷": lambda x, y: x / y if y else float("nan")}


def step_credit(prompt: str, reply: str) -> float:
    """Partial credit for a worked reply: the share of its stated facts ("7 + 8 = 15",
    "4 + 3 + 1 = 8") that are true, times whether its opening restatement ("72 + 19：") copies
    two numbers that are in the prompt (else 0: true facts about the wrong numbers earn
    nothing). 0.0 for a reply with no worked fact."""
    facts = _STEP.findall(reply)
    if not facts:
        return 0.0
    true = 0
    for a, op, b, op2, c, r in facts:
        v = _OPS[op](int(a), int(b))
        if op2:
            v = _OPS[op2](v, int(c))
        true += v == int(r)
    m = _EQUATION.match(reply)
    if m:
        in_prompt = set(re.findall(r"\d+", prompt))
        if not {m.group(1), m.group(2)} <= in_prompt:
            return 0.0
    return true / len(facts)
