"""Where does a worked sum go wrong? Greedy replies to the held-out math tasks (rlvf_val.json),
split into the steps of the house style "72 + 19：先算个位，2 + 9 = 11，写1进1；再算十位，
7 + 1 + 1 = 9。所以72 + 19 = 91，答案是91。":

- restated: the reply opens with the prompt's two numbers in order (copying from the prompt);
- facts: every single-digit fact the reply writes ("2 + 9 = 11", "7 × 8 = 56") is right, counted
  over facts (the table learnt by heart);
- answer: the verifier accepts the reply (stages/verifiers.py).

Also on a sample of the *training* math tasks (sft_data.json), to tell underfitting from a
failure to generalise; and, for a pretrained checkpoint (--facts), how many of the 281
single-digit facts (a + b, a × b, a - b with a result 0..9) it completes greedily after three
facts as context, the held-out ones included ("7 + 8 = " -> "15").

    python bench/math_steps.py --checkpoint checkpoints/sft_final.safetensors
    python bench/math_steps.py --checkpoint A.safetensors --checkpoint B.safetensors   # side by side
    python bench/math_steps.py --facts --checkpoint checkpoints/pretrain_final.safetensors
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygrad_llm.chat_eval import generate_replies  # noqa: E402
from tinygrad_llm.checkpoint import load_gpt  # noqa: E402
from tinygrad_llm.data import data_file, load_rlvf, read_items  # noqa: E402
from tinygrad_llm.stages.verifiers import verify_task  # noqa: E402

FACT = re.compile(r"(?<![\d.])(\d) ([+\-×]) (\d) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def steps(tasks: list[dict], replies: list[str]) -> dict:
    """Shares of replies that restate the operands / answer right, and of single-digit facts right."""
    restated = right = facts = facts_ok = 0
    for task, reply in zip(tasks, replies):
        right += verify_task(task, reply)
        nums = re.findall(r"\d+", task["prompt"])[:2]
        opening = re.match(r"(\d+) [+\-×÷] (\d+)", reply)
        restated += bool(opening) and list(opening.groups()) == nums
        for a, op, b, c in FACT.findall(reply):
            facts += 1
            facts_ok += OPS[op](int(a), int(b)) == int(c)
    n = max(1, len(tasks))
    return {"restated": restated / n, "facts": facts_ok / max(1, facts), "n_facts": facts, "answer": right / n,
            "n": len(tasks)}


def fact_probe(model, tok) -> tuple[int, int]:
    """Greedy completions of every single-digit fact after a context of three -> (right, total)."""
    facts = [(f"{a} + {b} = ", a + b) for a in range(10) for b in range(10)]
    facts += [(f"{a} × {b} = ", a * b) for a in range(1, 10) for b in range(1, 10)]
    facts += [(f"{b + d} - {b} = ", d) for b in range(10) for d in range(10)]
    context = "3 + 4 = 7，6 × 2 = 12，9 - 5 = 4，"
    gen = model.generate([tok.encode(context + f, False) for f, _ in facts], max_new_tokens=3, temperature=0.0,
                         stop_tokens=())
    right = sum(re.match(rf"{c}(?!\d)", tok.decode(list(out))) is not None for (_, c), out in zip(facts, gen.tokens))
    return right, len(facts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", help="a chat checkpoint (repeatable); default checkpoints/sft_final")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--train-sample", type=int, default=120, help="training math tasks to check (0: none)")
    ap.add_argument("--facts", action="store_true", help="the single-digit fact probe (a pretrained checkpoint)")
    args = ap.parse_args(argv)
    if args.facts:
        for ck in args.checkpoint or [str(ROOT / "checkpoints" / "pretrain_final.safetensors")]:
            right, n = fact_probe(*load_gpt(Path(ck))[:2])
            print(f"{ck}: {right} of {n} single-digit facts completed right ({right / n:.0%})")
        return
    data = Path(args.data_dir)
    held_out = [t for t in load_rlvf(data / "rlvf_val.json") if t["type"] == "math"]
    train = [{"type": "math", "prompt": it["user"], "expected_answer": m.group(1)}
             for _, it in read_items(data_file(data, "sft_data.json"))
             if it.get("category") == "math_task" and (m := re.search(r"答案是(-?\d+)", it["assistant"]))]
    train = random.Random(0).sample(train, min(args.train_sample, len(train)))
    print(f"{'checkpoint':<44}{'set':<10}{'tasks':>6}{'restated':>10}{'facts right':>13}{'answer':>8}")
    for ck in args.checkpoint or [str(ROOT / "checkpoints" / "sft_final.safetensors")]:
        model, tok = load_gpt(Path(ck))[:2]
        for name, tasks in (("held-out", held_out), ("training", train)):
            if not tasks:
                continue
            replies = generate_replies(model, tok, [t["prompt"] for t in tasks], max_new_tokens=96, batch=40)[0]
            s = steps(tasks, replies)
            print(f"{Path(ck).name[-44:]:<44}{name:<10}{s['n']:>6}{s['restated']:>10.0%}"
                  f"{s['facts']:>8.0%} of {s['n_facts']:<4}{s['answer']:>6.0%}")


if __name__ == "__main__":
    main()
