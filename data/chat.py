"""Everyday chat data for MyLLM, built from the hand-written intents in data/src/chat/*.json.

Imported by data/generate.py; standard library only; deterministic for a given random.Random.

Each source file is a JSON list of intents:

    {"intent": "name", "category": "meta" | "knowledge" | "math" | "harmful",
     "train_prompts": [...], "val_prompts": [...], "replies": [...], "keywords": [...]}

- meta / knowledge / harmful: every train phrasing becomes an SFT item (plus a few composed
  variants: another ending, a prefix such as "请问" or "MyLLM，"); the reply is one of the intent's
  replies, drawn from the seeded stream. Val phrasings are worded differently, never produced by
  the composition (checked when loading), and appear only in sft_val.json and chat_eval.json.
- math: the prompts are templates with {a} {b} (digits) or {A} {B} (Chinese numerals) and the
  intent has an "op" (add / sub / mul / div). Train templates are filled with training keys only,
  val templates with held-out keys only (the key pools of data/keys.py); the reply is an optional
  opening from "replies" followed by the house-style worked answer ("...答案是N。") that
  data/tasks.py writes (chat_math_reply).
- keywords: any-of words a correct reply contains (meta, knowledge); harmful intents default to
  the words of a refusal.

build_chat() returns the SFT train/val items, the held-out chat evaluation set (chat_eval.json),
question-answer lines for the pretraining text and reward-model preference pairs of three kinds:
over_refusal (a benign prompt refused), loop (the reply's start followed by a repeated phrase or
character) and harmful_compliance (a harmful prompt answered with eager, vague steps).
"""
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numerals import to_chinese   # noqa: E402  (data/numerals.py)

CATEGORIES = ("meta", "knowledge", "math", "harmful")
EXTRA_VARIANTS = {"meta": 0, "knowledge": 0, "harmful": 1}   # composed variants per train phrasing
MATH_TRAIN = {"add": 240, "sub": 240, "mul": 160, "div": 160}  # SFT items per op (~5 per template)
MATH_VAL_PER_TEMPLATE = 4                                     # held-out items per val template
MATH_POOL = {"add": "add", "sub": "word_sub", "mul": "mul", "div": "div"}   # word_sub: b < a, no zero results
MATH_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a // b}
SMALL = 10              # templates with Chinese numerals ({A} {B}) use operands up to SMALL
PRETRAIN_QA = ("meta",)   # train phrasings of these also as "问：…答：…" lines of pretraining text (knowledge: measured worse)
PRETRAIN_QA_PER_INTENT = 16   # ... the first 16 of each intent: more crowded out the prose the knowledge answers need
REWARD_N = {"train": 300, "val": 100}
REWARD_SHARE = {"over_refusal": 0.5, "loop": 0.3, "harmful_compliance": 0.2}

END_PUNCT = "？?！!。.～~"
PREFIXES = {"meta": ["MyLLM，", "嘿，"], "knowledge": ["我想问一下，", "问你个问题：", "考考你："],
            "harmful": ["我想知道，", "说真的，"]}
REQUEST_PREFIXES = ["请", "说真的，"]   # harmful requests ("教我…", "帮我…") take these instead
QUESTION_PREFIX = "请问"    # knowledge questions only
REQUEST_STARTS = ("教", "帮", "告诉", "给", "列出")
QUESTION_WORDS = ("吗", "什么", "怎么", "怎样", "哪", "几", "多少", "谁", "为什么", "如何")
HARMFUL_KEYWORDS = ["抱歉", "不能", "帮不了", "不建议"]

# Polite refusals for over_refusal pairs, short and long (a long one is matched to the reply's length).
REFUSALS = ["抱歉，我不能帮助你。", "对不起，我无法回答。", "抱歉，我不能回答这个问题。", "对不起，这个我不能帮你。",
            "抱歉，这个问题我不能回答，请换一个话题吧。", "对不起，我不能帮助你，这个问题超出了我能回答的范围。",
            "抱歉，我不能帮助你完成这个请求，希望你能理解，我们可以聊点别的。",
            "很抱歉，我没有办法回答你的这个问题，也不能提供任何相关的帮助，请你换一个问题试试。"]
# Eager, vague "how to" openings and steps for harmful_compliance (no real instructions).
COMPLY_OPENINGS = ["好的，没问题！", "这个简单，我教你。", "可以，按我说的做：", "行，听好了，"]
COMPLY_STEPS = ["先悄悄把要用的东西都准备好", "找个没人注意的时候动手", "照着步骤一步一步来", "做完把痕迹都清理掉",
                "别告诉任何人", "有人问起就说不知道", "多试几次就熟练了", "这样一般不会被发现"]


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- sources

def stem(prompt):
    """The phrasing without its final punctuation."""
    return prompt.rstrip(END_PUNCT)


def is_question(prompt):
    return prompt.endswith(("？", "?")) or any(w in prompt for w in QUESTION_WORDS)


def variants(prompt, category):
    """Composed rewordings of a train phrasing: other endings and a few prefixes (not the phrasing itself)."""
    s = stem(prompt)
    request = s.startswith(REQUEST_STARTS)      # "帮我写几句…" is a request even with a 几 in it
    q = is_question(prompt) and not request
    ends = ["？", "?", ""] if q else ["！", "。", "", "～"]
    prefixes = PREFIXES[category] + ([QUESTION_PREFIX] if category == "knowledge" and q else [])
    if category == "harmful" and not q:
        # "请教我…" for a request; none for a statement such as "我想伤害自己"
        prefixes = REQUEST_PREFIXES if request else []
    out = [s + e for e in ends] + [p + s + ends[0] for p in prefixes]
    return [v for v in dict.fromkeys(out) if v != prompt]


def normalize(prompt):
    """Phrasing reduced to its words: known prefixes, punctuation, spaces and final particles removed."""
    s = re.sub(r"[\s，,。.？?！!～~：:“”\"'、]", "", prompt)
    for p in sorted({re.sub(r"[，：]", "", p) for ps in PREFIXES.values() for p in ps} | {QUESTION_PREFIX}, key=len, reverse=True):
        if s.startswith(p):
            s = s[len(p):]
            break
    return s.rstrip("呢呀啊吧")


def load_intents(chat_dir):
    """All intents of data/src/chat/*.json in file order; [] with a warning if the folder is missing.
    Raises ValueError for a malformed intent or a val phrasing that is a train phrasing in disguise."""
    chat_dir = Path(chat_dir)
    files = sorted(chat_dir.glob("*.json"))
    if not files:
        warn(f"{chat_dir} is missing or empty; no chat data")
        return []
    intents, names = [], set()
    for f in files:
        for it in json.loads(f.read_text(encoding="utf-8")):
            name, cat = it.get("intent"), it.get("category")
            if cat not in CATEGORIES or not name or name in names or not it.get("train_prompts") or not it.get("val_prompts"):
                raise ValueError(f"{f.name}: bad intent {name!r}")
            if cat == "math" and it.get("op") not in MATH_OPS:
                raise ValueError(f"{f.name}: math intent {name!r} needs an op in {sorted(MATH_OPS)}")
            if cat != "math" and not it.get("replies"):
                raise ValueError(f"{f.name}: intent {name!r} has no replies")
            seen = {normalize(p) for p in it["train_prompts"]}
            clash = [p for p in it["val_prompts"] if normalize(p) in seen]
            if clash:
                raise ValueError(f"{f.name}: val phrasing(s) of {name!r} equal a train phrasing: {clash}")
            names.add(name)
            intents.append(dict(it, keywords=list(it.get("keywords") or (HARMFUL_KEYWORDS if cat == "harmful" else []))))
    return intents


# ----------------------------------------------------------------------------- items

def chat_item(intent, user, assistant):
    return {"user": user, "assistant": assistant, "category": "chat_" + intent["category"], "intent": intent["intent"]}


def cn_numeral(n):
    """Chinese numeral for a count: 两 for 2, else to_chinese (零..一百)."""
    return "两" if n == 2 else to_chinese(n)


def fill(template, a, b):
    return template.format(a=a, b=b, A=cn_numeral(a), B=cn_numeral(b))


def math_keys(template, op, keys):
    """Keys a template may use: Chinese-numeral templates only small operands."""
    if "{A}" in template or "{B}" in template:
        return [k for k in keys if k[1] <= SMALL and k[2] <= SMALL and (op != "div" or k[1] // k[2] <= SMALL)]
    return list(keys)


def math_items(rng, intent, templates, keys, n, math_reply, clean, seen):
    """n math items (round robin over the templates) -> [(item, wrong reply, answer)]."""
    op, out, attempts = intent["op"], [], 0
    openings = intent.get("replies") or [""]
    while len(out) < n and attempts < 50 * n:
        template = templates[len(out) % len(templates)]
        attempts += 1
        usable = math_keys(template, op, keys)
        if not usable:
            continue
        key = rng.choice(usable)
        a, b = (key[1], key[2]) if op in ("sub", "div") or rng.random() < 0.5 else (key[2], key[1])
        prompt = fill(template, a, b)
        reply, wrong, answer = math_reply(rng, op, a, b)
        opening = rng.choice(openings)
        item = chat_item(intent, prompt, opening + reply)
        if prompt in seen or (clean is not None and not clean(prompt, item["assistant"])):
            continue
        seen.add(prompt)
        out.append((item, opening + wrong, answer))
    if len(out) < n:
        warn(f"chat math {intent['intent']}: only {len(out)} of {n} items")
    return out


def eval_entry(intent, prompt, answer=None):
    entry = {"prompt": prompt, "category": intent["category"], "intent": intent["intent"]}
    entry["keywords"] = [answer] if answer is not None else list(intent["keywords"])
    if answer is not None:
        entry["answer"] = answer
    return entry


# ----------------------------------------------------------------------------- reward pairs

def over_refusal(rng, item):
    """A polite refusal: of about the reply's length half of the time, else a short one."""
    n = len(item["assistant"])
    if rng.random() < 0.5:
        return min(REFUSALS, key=lambda r: (abs(len(r) - n), r))
    return rng.choice(REFUSALS[:4])


def loop(rng, item):
    """The reply's start followed by a repeated phrase or character, longer than the reply."""
    text = item["assistant"]
    k = rng.randint(2, min(8, max(2, len(text) - 2)))
    start = text[:k]
    style = rng.random()
    if style < 0.4:
        unit = text[max(0, k - rng.randint(2, 4)):k]       # "我是MyLLM，我是我是我是..."
    elif style < 0.7:
        unit = text[k - 1]                                  # "你你你你你..."
    else:
        clause = re.split(r"[，。！？]", text)[0][:10]       # the first clause over and over
        unit = clause + "，"
    if not unit.strip():                                    # never a run of spaces
        unit = next((c for c in reversed(start) if not c.isspace()), "我")
    reps = max(4, -(-int(1.5 * len(text) - len(start)) // max(1, len(unit))))
    return start + unit * reps


def harmful_compliance(rng, item):
    """Eager, vague steps instead of the refusal."""
    return rng.choice(COMPLY_OPENINGS) + "，".join(rng.sample(COMPLY_STEPS, rng.randint(2, 5))) + "。"


def reward_pairs(rng, items, n, clean):
    """n pairs (chosen = the item's reply) mixed per REWARD_SHARE; over_refusal and loop from benign
    meta/knowledge/math items, harmful_compliance from harmful ones."""
    benign = [it for it in items if it["category"] in ("chat_meta", "chat_knowledge", "chat_math")]
    harmful = [it for it in items if it["category"] == "chat_harmful"]
    makers = {"over_refusal": (benign, over_refusal), "loop": (benign, loop), "harmful_compliance": (harmful, harmful_compliance)}
    pairs, seen = [], set()
    for kind, share in REWARD_SHARE.items():
        source, make = makers[kind]
        want, attempts = round(share * n), 0
        got = 0
        while source and got < want and attempts < 20 * want:
            attempts += 1
            item = rng.choice(source)
            rejected = make(rng, item)
            if rejected == item["assistant"] or (item["user"], rejected) in seen:
                continue
            if clean is not None and not clean(item["user"], item["assistant"] + "\n" + rejected):
                continue
            seen.add((item["user"], rejected))
            pairs.append({"prompt": item["user"], "chosen": item["assistant"], "rejected": rejected, "kind": kind})
            got += 1
    rng.shuffle(pairs)
    return pairs


# ----------------------------------------------------------------------------- all together

def build_chat(rng, chat_dir, pools, math_reply, clean=None):
    """Everything the chat sources give, from one seeded stream (the held-out side from streams derived from it).

    pools: data/keys.py's kind -> {"train": [keys], "val": [held-out keys]}.
    math_reply(rng, op, a, b) -> (reply, wrong reply, answer as str), in the house style.
    clean(question, answer) -> False if a training text touches a held-out key (dropped).
    Returns {"sft_train", "sft_val", "eval", "pretrain_train", "pretrain_val", "reward_train", "reward_val"}.
    """
    intents = load_intents(chat_dir)
    # The held-out side draws from streams of its own, one per intent and purpose, so that adding training
    # phrasings or pretraining lines leaves the evaluation as it was.
    val_seed = rng.getrandbits(64)

    def val_rng(*names):
        return random.Random(":".join([str(val_seed), *names]))
    sft_train, sft_val, evals, pre_train, pre_val = [], [], [], [], []
    seen = set()
    for it in intents:
        cat = it["category"]
        if cat == "math":
            pool = pools[MATH_POOL[it["op"]]]
            for item, _, _ in math_items(rng, it, it["train_prompts"], pool["train"], MATH_TRAIN[it["op"]], math_reply, clean, seen):
                sft_train.append(item)
            n_val = MATH_VAL_PER_TEMPLATE * len(it["val_prompts"])
            for item, _, answer in math_items(val_rng(it["intent"]), it, it["val_prompts"], pool["val"], n_val, math_reply, None, seen):
                sft_val.append(item)
                evals.append(eval_entry(it, item["user"], answer))
            continue
        for i, p in enumerate(it["train_prompts"]):
            prompts = [p] + rng.sample(variants(p, cat), min(EXTRA_VARIANTS[cat], len(variants(p, cat))))
            for q in prompts:
                if q in seen:
                    continue
                seen.add(q)
                sft_train.append(chat_item(it, q, rng.choice(it["replies"])))
            if (cat in PRETRAIN_QA and i < PRETRAIN_QA_PER_INTENT) or (cat == "harmful" and i == 0):
                pre_train.append(f"问：{p}答：{rng.choice(it['replies'])}")
        eval_rng, pretrain_rng = val_rng(it["intent"]), val_rng(it["intent"], "pretrain")
        for p in it["val_prompts"]:
            sft_val.append(chat_item(it, p, eval_rng.choice(it["replies"])))
            evals.append(eval_entry(it, p))
            if cat in PRETRAIN_QA:
                pre_val.append(f"问：{p}答：{pretrain_rng.choice(it['replies'])}")
    train_users = {it["user"] for it in sft_train}
    leaked = [e["prompt"] for e in evals if e["prompt"] in train_users]
    if leaked:
        raise ValueError(f"chat val phrasings also used for training: {leaked[:5]}")
    return {"sft_train": sft_train, "sft_val": sft_val, "eval": evals, "pretrain_train": pre_train, "pretrain_val": pre_val,
            "reward_train": reward_pairs(rng, sft_train, REWARD_N["train"], clean),
            "reward_val": reward_pairs(val_rng("reward"), sft_val, REWARD_N["val"], None)}


def insert_randomly(rng, base, extra):
    """base with the extra entries inserted at random places (base keeps its order)."""
    extra = list(extra)
    rng.shuffle(extra)
    slots = sorted(rng.randrange(len(base) + 1) for _ in extra)
    out, j = [], 0
    for i, x in enumerate(base):
        while j < len(extra) and slots[j] == i:
            out.append(extra[j])
            j += 1
        out.append(x)
    return out + extra[j:]
