"""Best-of-n decoding (tinygrad_llm/rerank.py): the sequence score, and which candidate wins."""
import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm import rerank
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.model import GPT, Generation


@pytest.fixture(scope="module")
def model():
    return GPT(get_tiny_config(vocab_size=60), seed=3)


def _logp_by_recompute(model, prompt, reply):
    """sum_t log softmax(logits)[reply_t], one full forward per token (no batching, no padding)."""
    seq, total = list(prompt), 0.0
    for t in reply:
        with E.no_grad():
            logits = model(np.array([seq]))[0].data[0, -1].astype(np.float64)
        total += logits[t] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        seq.append(t)
    return total


def test_sequence_logprob_is_the_sum_of_the_reply_tokens_log_probs(model):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(5, 60, n)) for n in (3, 9, 5)]
    replies = [list(rng.integers(5, 60, n)) for n in (6, 2, 11)]      # ragged: padding must not count
    model.train()
    got = rerank.sequence_logprob(model, prompts, replies, batch=2)
    assert model.training                                           # the caller's mode is restored
    model.eval()
    want = [_logp_by_recompute(model, p, r) for p, r in zip(prompts, replies)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_best_of_one_is_greedy(model):
    prompts = [[5, 6, 7], [8, 9]]
    g = model.generate(prompts, max_new_tokens=8, temperature=0.0)
    b = rerank.best_of(model, prompts, 1, max_new_tokens=8)
    assert b.replies() == g.replies()


def test_best_of_picks_the_likeliest_candidate(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    n, kw = 5, dict(max_new_tokens=6, stop_tokens=(99,))      # no stop token: every candidate runs to the end
    got = rerank.best_of(model, prompts, n, rng=7, **kw)
    greedy = model.generate(prompts, temperature=0.0, **kw).replies()
    rows = [p for p in prompts for _ in range(n - 1)]
    sampled = model.generate(rows, temperature=0.8, top_p=0.9, rng=7, **kw).replies()
    for i, p in enumerate(prompts):
        cands = [greedy[i]] + sampled[i * (n - 1):(i + 1) * (n - 1)]
        scores = rerank.sequence_logprob(model, [p] * n, cands)
        assert got.replies()[i] == cands[int(np.argmax(scores))]
        assert len({tuple(c) for c in cands}) > 1                 # the samples did differ from greedy


class _Scripted:
    """A stand-in model whose candidates are given: greedy replies, then sampled ones."""

    dtype = np.float32

    def __init__(self, greedy, sampled):
        self.out = {0.0: greedy, 0.8: sampled}

    def generate(self, prompts, temperature, max_new_tokens, stop_tokens, **kw):
        rows = self.out[temperature]
        N = max(len(r) for r, _ in rows)
        tokens = np.zeros((len(rows), N), np.int64)
        mask = np.zeros((len(rows), N), np.float32)
        for i, (r, _) in enumerate(rows):
            tokens[i, :len(r)], mask[i, :len(r)] = r, 1
        return Generation(tokens, mask, None, np.array([f for _, f in rows]), prompts)


def test_a_closed_reply_beats_a_likelier_cut_one(monkeypatch):
    # prompt 0: the greedy reply was cut; prompt 1: every candidate was cut (the likeliest wins)
    m = _Scripted(greedy=[([1, 2, 3], False), ([4], False)],
                  sampled=[([5, 6], True), ([7, 8, 9, 10], False), ([11], False), ([12, 13], False)])
    def score(model, prompts, replies):        # shorter is likelier, and the cut [1, 2, 3] likeliest of all
        return np.array([10.0 if r[0] == 1 else -len(r) for r in replies])
    monkeypatch.setattr(rerank, "sequence_logprob", score)
    got = rerank.best_of(m, [[0], [0]], 3)
    assert got.replies() == [[5, 6], [4]]
    assert got.finished.tolist() == [True, False]


def test_best_of_rejects_n_below_one(model):
    with pytest.raises(ValueError, match="n must be >= 1"):
        rerank.best_of(model, [[5]], 0)


def _bench_best_of():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "best_of.py"
    spec = importlib.util.spec_from_file_location("best_of", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_best_of_counts_ranked_pairs_as_a_double_loop_does():
    """bench/best_of.py's ranks_acceptable_higher: every (acceptable, unacceptable) pair of one
    prompt's candidates, ties lost, prompts with no such pair contributing nothing."""
    bench = _bench_best_of()
    rng = np.random.default_rng(1)
    score = rng.integers(0, 4, (7, 5)).astype(float)        # small integers: ties happen
    ok = rng.random((7, 5)) < 0.5
    ok[0], ok[1] = True, False                               # all acceptable / none: no pairs
    won = pairs = 0
    for s, o in zip(score, ok):
        for a in range(5):
            for b in range(5):
                if o[a] and not o[b]:
                    pairs += 1
                    won += s[a] > s[b]
    assert bench.ranks_acceptable_higher(score, ok) == (won, pairs) and pairs > 0


def test_bench_best_of_more_scores_by_hand(model):
    """--more-scores: PMI against other prompts' likelihood of the same reply, the mean bigram
    Jaccard similarity to the other candidates, the count of identical candidates."""
    bench = _bench_best_of()
    model.eval()
    rng = np.random.default_rng(2)
    ids = [list(rng.integers(5, 60, k)) for k in (3, 6, 4)]
    replies = [list(rng.integers(5, 60, k)) for k in (4, 2, 4, 5, 3, 3)]       # 3 prompts x n = 2
    texts = ["你好呀", "你好", "天很蓝", "天很蓝", "七天", "一周七天"]
    ll = np.array([_logp_by_recompute(model, ids[j // 2], r) for j, r in enumerate(replies)]).reshape(3, 2)
    got = bench.more_scores(model, ids, replies, texts, ll, np.random.default_rng(9), others=2)
    shifts = np.random.default_rng(9).integers(1, 3, 2)                   # the two other prompts per prompt
    other = np.array([[[_logp_by_recompute(model, ids[(i + sh) % 3], replies[2 * i + k]) for k in range(2)]
                       for i in range(3)] for sh in shifts])
    pmi = ll - np.log(np.exp(other).mean(0))
    np.testing.assert_allclose(got["PMI"], pmi, rtol=1e-4, atol=1e-4)
    jac = np.array([[1 / 2, 1 / 2], [1.0, 1.0], [1 / 3, 1 / 3]])          # {你好, 好呀} vs {你好}; ...
    np.testing.assert_allclose(got["agreement (MBR)"], jac, atol=1e-3)
    np.testing.assert_allclose(got["majority"], [[1, 1], [2, 2], [1, 1]], atol=1e-3)
