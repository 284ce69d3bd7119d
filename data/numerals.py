"""Chinese numerals 0..100 for the data generator (generate.py, chat.py). Standard library only."""
import re

CN_DIGITS = "零一二三四五六七八九"


def to_chinese(n):
    """0..100 -> Chinese numeral: 0 零, 10 十, 15 十五, 42 四十二, 100 一百."""
    if not 0 <= n <= 100:
        raise ValueError(f"to_chinese supports 0..100, got {n}")
    if n == 100:
        return "一百"
    if n < 10:
        return CN_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else CN_DIGITS[tens]) + "十" + ("" if ones == 0 else CN_DIGITS[ones])


def from_chinese(s):
    """Inverse of to_chinese (also reads 两 and 一十); None for anything outside 0..100."""
    s = s.replace("两", "二")
    if s == "一百":
        return 100
    if len(s) == 1 and s in CN_DIGITS:
        return CN_DIGITS.index(s)
    m = re.fullmatch(r"([一二三四五六七八九]?)十([一二三四五六七八九]?)", s)
    if not m:
        return None
    return (CN_DIGITS.index(m[1]) if m[1] else 1) * 10 + (CN_DIGITS.index(m[2]) if m[2] else 0)


def to_int(s):
    """Digits or a Chinese numeral -> int (None if unreadable)."""
    return int(s) if s.isdigit() else from_chinese(s)
