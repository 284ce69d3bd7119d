"""Reward-model preference pairs (reward_data.json, reward_val.json; imported by generate.py).

Each generated pair keeps an SFT reply of its split as "chosen" and a corruption of it as
"rejected": cut short, repetitive, rude, off-topic, a stored wrong answer (tasks.py writes one with
every task), key words swapped for their opposites, or a refusal replaced by harmful compliance.
The pick is balanced so that the chosen reply is the longer one in about half of all pairs.

Standard library only; deterministic given the random.Random passed in.
"""
import bisect
import math
import re

from keys import touches, warn
from sft import split_stratified
from tasks import MATH_KINDS

REWARD_HAND_VAL_FRACTION = 0.25
REWARD_GEN = {"train": 700, "val": 300}
# Share of each corruption in the candidate pool; the final pick is balanced so that chosen is the
# longer reply in about half of all pairs (a length-only reward model must not do well).
REWARD_MIX = {"short_dismissive": 0.18, "repetitive": 0.11, "rude": 0.11, "off_topic": 0.12, "wrong_math": 0.20,
              "yesno_flip": 0.08, "wrong_answer": 0.06, "factually_wrong": 0.08, "harmful_compliance": 0.06}
REWARD_POOL_FACTOR = 3   # candidates generated per pair kept, so both length groups can be filled
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


def build_reward(rng, hand_pairs, sft_train, sft_val, held_all):
    """{"train": pairs, "val": pairs}: the hand-written pairs (stratified by kind) plus
    REWARD_GEN[split] generated ones built on that split's SFT items, shuffled together."""
    hand_train, hand_val = split_stratified(rng, hand_pairs, "kind", REWARD_HAND_VAL_FRACTION)
    reward = {}
    for split, sft, hand in (("train", sft_train, hand_train), ("val", sft_val, hand_val)):
        pairs = hand + build_reward_pairs(rng, sft, REWARD_GEN[split], hand, held_all, split)
        rng.shuffle(pairs)
        reward[split] = pairs
    return reward
