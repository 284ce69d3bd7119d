"""Who can find the best of n candidate replies? The chat evaluation (all of chat_eval.json) of
one SFT model's greedy reply and n - 1 samples (T 0.8, top-p 0.9), picked by: greedy alone; the
reward model's highest score (of 2, 4, n); the model's own likelihood of the whole reply
(rerank.sequence_logprob, of 4 and n: what inference.py's --best-of does); and an oracle that
takes any acceptable candidate. Then how often each score ranks an acceptable candidate above an
unacceptable one of the same prompt (what PPO's reward must do on sampled replies).
--more-scores adds three scores that need no reward model: pointwise mutual information
(log p(reply | prompt) - log mean_j p(reply | prompt_j) over 4 other prompts of the set: a reply
any prompt would get scores low), agreement with the other candidates (minimum Bayes risk: the
mean character-bigram Jaccard similarity to them) and the majority (how many candidates are the
same text). bench/README.md, "Best of n" and "The reward model, a third time".

    python bench/best_of.py --checkpoint CK/sft_final.safetensors --reward-model CK/reward_model.safetensors
    python bench/best_of.py ... --reward-model OTHER/reward_model.safetensors --more-scores   # two RMs, and the rest
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygrad_llm import chat_eval as C  # noqa: E402
from tinygrad_llm.checkpoint import config_from_meta, load_gpt, load_into, read_metadata  # noqa: E402
from tinygrad_llm.rerank import candidates, sequence_logprob  # noqa: E402
from tinygrad_llm.stages.reward_model import RewardModel  # noqa: E402
from tinygrad_llm.tokenizer import IM_END_ID  # noqa: E402


def figures(items, test, texts, closed):
    """'acceptable all (meta, knowledge, math) | test half | harmful refused' of one pick."""
    rows = [dict(C.judge(it, t, c), category=it["category"], prompt=it["prompt"])
            for it, t, c in zip(items, texts, closed)]
    share = lambda rs, k: 100 * np.mean([bool(r[k]) for r in rs]) if rs else float("nan")   # noqa: E731
    benign = [r for r in rows if r["category"] != "harmful"]
    cats = ", ".join(f"{share([r for r in rows if r['category'] == c], 'acceptable'):.0f}" for c in C.BENIGN)
    test_benign = [r for r in benign if r["prompt"] in test]
    harmful = [r for r in rows if r["category"] == "harmful"]
    return (f"{share(benign, 'acceptable'):.1f}% ({cats}) | {share(test_benign, 'acceptable'):.1f}% | "
            f"{share(harmful, 'refusal'):.0f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "sft_final.safetensors"))
    ap.add_argument("--reward-model", action="append",
                    help="a reward model checkpoint; repeat to compare several (default: checkpoints/reward_model)")
    ap.add_argument("--more-scores", action="store_true", help="also PMI, agreement (MBR) and majority")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--n", type=int, default=8, help="candidates per prompt (the greedy reply + n - 1 samples)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.reward_model = args.reward_model or [str(ROOT / "checkpoints" / "reward_model.safetensors")]
    for p in (args.checkpoint, *args.reward_model):
        if not Path(p).exists():
            print(f"error: {p}: checkpoint not found (train one: python train.py --stage pretrain,sft,reward)",
                  file=sys.stderr)
            return 2
    model, tok = load_gpt(args.checkpoint)
    items = C.load_chat_eval(args.data_dir)
    test = {it["prompt"] for it in C.dev_test_split(items)[1]}
    prompts = [it["prompt"] for it in items]
    ids = [tok.chat_prompt(p) for p in prompts]
    n, P = args.n, len(items)
    replies, finished = [], []
    for i in range(0, P, 64):                      # rerank.best_of's own candidates, 64 prompts at a time
        r, f = candidates(model, ids[i:i + 64], n, rng=args.seed + i, max_new_tokens=96, stop_tokens=(IM_END_ID,))
        replies += r
        finished += f.tolist()
    texts = [tok.decode(r) for r in replies]
    # (P, n) scores of candidate k of prompt i (flat index i * n + k)
    scores = {}
    for path in args.reward_model:
        name = "the reward model" + (f" {path}" if len(args.reward_model) > 1 else "")
        scores[name] = reward_scores(path, [p for p in prompts for _ in range(n)], texts, tok).reshape(P, n)
    loglik = scores["log p(reply | prompt)"] = sequence_logprob(model, [p for p in ids for _ in range(n)],
                                                               replies).reshape(P, n)
    if args.more_scores:
        scores.update(more_scores(model, ids, replies, texts, loglik, np.random.default_rng(args.seed)))

    def pick(choice):                      # candidate choice[i] of prompt i -> (texts, closed)
        return [texts[i * n + k] for i, k in enumerate(choice)], [finished[i * n + k] for i, k in enumerate(choice)]

    print(f"{Path(args.checkpoint).name}, {len(items)} prompts, {args.n} candidates (greedy + {args.n - 1} samples)\n")
    print("| pick | acceptable, all (meta, knowledge, math) | test half | harmful refused |\n|---|---|---|---|")
    rows = [("greedy alone", np.zeros(len(items), int)), ("one sample", np.ones(len(items), int))]
    for name, score in scores.items():         # the reward models of 2, 4, n; log p of 4, n; the rest of n
        ks = {2, 4} if name.startswith("the reward model") else {4} if score is loglik else set()
        rows += [(f"highest {name.replace('|', chr(92) + '|')} of {k}", score[:, :k].argmax(1))
                 for k in sorted(ks | {args.n}) if k <= args.n]
    ok = np.array([C.judge(items[j // n], t, c)["acceptable"] for j, (t, c) in enumerate(zip(texts, finished))])
    rows.append(("oracle (acceptable if any is)", ok.reshape(P, n).argmax(1)))
    for name, choice in rows:
        print(f"| {name} | {figures(items, test, *pick(choice))} |", flush=True)
    ok = ok.reshape(P, n)
    for name, score in scores.items():
        won, pairs = ranks_acceptable_higher(score, ok)
        print(f"\n{name} scores an acceptable candidate above an unacceptable one of the same prompt: "
              f"{won / max(pairs, 1):.1%} of {pairs} pairs (a coin: 50%)")
    return 0


def reward_scores(path, prompts, texts, tok) -> np.ndarray:
    """The reward model at `path` (with its checkpoint's lm_coef) on (prompt, reply) pairs."""
    rm = RewardModel(config_from_meta(read_metadata(path), path))
    load_into(rm, path)
    return rm.eval().score(prompts, texts, tok)


def more_scores(model, ids, replies, texts, loglik, rng, others: int = 4) -> dict:
    """The scores that need no reward model, each (P, n) like loglik (log p(reply | its prompt)):
    PMI against `others` random other prompts, agreement with the other candidates (MBR) and the
    majority (module doc)."""
    P, n = loglik.shape
    elsewhere = [sequence_logprob(model, [ids[j] for j in shifted for _ in range(n)], replies).reshape(P, n)
                 for shifted in ((np.arange(P) + rng.integers(1, P)) % P for _ in range(others))]
    marginal = np.logaddexp.reduce(np.stack(elsewhere), axis=0) - np.log(others)
    T = np.array(texts, dtype=object).reshape(P, n)
    grams = [[{t[i:i + 2] for i in range(len(t) - 1)} for t in row] for row in T]
    mbr = np.array([[np.mean([len(g[a] & g[b]) / max(1, len(g[a] | g[b])) for b in range(n) if b != a])
                     for a in range(n)] for g in grams])
    same = np.array([[float((row == row[a]).sum()) for a in range(n)] for row in T])
    tiny = 1e-6 * loglik                              # ties (the same agreement) go to the likelier reply
    return {"PMI": loglik - marginal, "agreement (MBR)": mbr + tiny, "majority": same + tiny}


def ranks_acceptable_higher(score: np.ndarray, ok: np.ndarray) -> tuple[int, int]:
    """score, ok (P, n): per prompt, every (acceptable, unacceptable) pair of its candidates ->
    (pairs where the acceptable one scores higher, pairs)."""
    won = pairs = 0
    for s, o in zip(score, ok.astype(bool)):
        diff = s[o][:, None] - s[~o][None, :]
        won, pairs = won + int((diff > 0).sum()), pairs + diff.size
    return won, pairs


if __name__ == "__main__":
    sys.exit(main())
