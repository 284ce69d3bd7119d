"""How the RLVF verifiers' time grows with the length of a reply: linearly, or worse?

    python bench/verifiers.py            # replies of 25k, 50k and 100k characters, 5 repeats
    python bench/verifiers.py --quick    # 2 repeats (a smoke run, not a measurement)

Moved here from a timed test (tests/test_fuzz.py keeps the same replies, checking only what the
verifiers answer): negation and answer-marker scans once re-read the whole prefix at every match,
so a ~100k-character reply such as "不周一" * 30,000 took minutes. For each degenerate reply kind,
verify_task and states_answer run on three tasks (logic 周一, logic 猫, math 5) at doubling
lengths, all interleaved; the table gives the median seconds per length and the growth per
doubling of the length (2 = linear, 4 = quadratic). Writes runs/bench/verifiers.json.
"""
from __future__ import annotations

import argparse

import common as C

UNITS = {"negated-weekdays": "不周一", "empty-answer-clauses": "答案是。", "negated-keywords": "不猫"}
LENGTHS = (25_000, 50_000, 100_000)             # characters
TASKS = ({"type": "logic", "expected_answer": "周一"}, {"type": "logic", "expected_answer": "猫"},
         {"type": "math", "expected_answer": "5"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repeats")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    from tinygrad_llm.stages.verifiers import states_answer, verify_task

    def run(reply):
        for task in TASKS:
            verify_task(task, reply)
            states_answer(task, reply)

    variants = {(kind, n): (lambda r=unit * (n // len(unit)): run(r)) for kind, unit in UNITS.items() for n in LENGTHS}
    times = C.interleave(variants, repeats)
    med = {key: C.median(ts) for key, ts in times.items()}
    rows, results = [], {}
    for kind in UNITS:
        secs = [med[(kind, n)] for n in LENGTHS]
        growth = (secs[-1] / secs[0]) ** (1 / (len(LENGTHS) - 1))   # geometric mean per doubling
        rows.append([kind] + secs + [growth])
        results[kind] = {"seconds": dict(zip(map(str, LENGTHS), secs)), "growth_per_doubling": growth}
    print(C.table(["reply"] + [f"{n // 1000}k chars, s" for n in LENGTHS] + ["growth x2"], rows,
                  [None] + [".3f"] * len(LENGTHS) + [".2f"]))
    print("growth per doubling of the length: 2 = linear, 4 = quadratic")
    print("wrote", C.write_json("verifiers", {"meta": C.meta(repeats=repeats), "results": results}))


if __name__ == "__main__":
    main()
