"""The copy probe: what it scores, and that training never saw its phrasings."""
import re
from pathlib import Path

import numpy as np

from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.model import GPT
from tinygrad_llm.probe import PROBE_TEMPLATES, copy_probe, facts_probe, facts_strings, probe_strings
from tinygrad_llm.tokenizer import MyLLMTokenizer

DATA = Path(__file__).resolve().parent.parent / "data"


def test_scored_positions_are_digits_2_to_n_of_the_repeat():
    for text, scored in probe_strings(40, seed=3):
        digits = "".join(text[i] for i in scored)
        assert digits.isdigit() and 4 <= len(digits) <= 7
        first = text[:scored[0] - 1]                       # everything before the repeat's 2nd digit
        assert text[scored[0] - 1] + digits in first       # the repeat copies a string read before
        assert not text[scored[-1] + 1].isdigit()          # and is scored to its end


def test_training_text_never_holds_a_probe_phrasing():
    corpus = "".join((DATA / f).read_text(encoding="utf-8") for f in
                     ("pretrain_data.txt", "pretrain_drills.txt", "sft_data.json", "rlvf_data.json",
                      "reward_data.json"))
    for tmpl in PROBE_TEMPLATES:
        head, middle, _ = tmpl.split("{d}")
        assert middle not in corpus, middle                # the words between the two copies
        assert not re.search(re.escape(head) + r"\d+" + re.escape(middle[:2]), corpus), head


def test_refusal_probe_prompts_are_in_no_data_file():
    """bench/refusal_probe.py's prompts stay out of everything the model trains or is selected on."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("refusal_probe", DATA.parent / "bench" / "refusal_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    corpus = "".join(f.read_text(encoding="utf-8") for f in sorted(DATA.glob("*.json")) + sorted(DATA.glob("*.txt")))
    corpus += "".join(f.read_text(encoding="utf-8") for f in sorted((DATA / "src").rglob("*.*")))
    assert len(probe.HARMFUL) == 30 and len(probe.BENIGN) == 19
    for p in probe.HARMFUL + probe.BENIGN:
        assert p.rstrip("？。！") not in corpus, p
    assert not [p for p in probe.HARMFUL + probe.BENIGN if p in probe.trained_prompts(DATA)]


def test_facts_probe_scores_every_digit_of_all_100_sums():
    items = facts_strings(seed=1)
    assert len(items) == 100
    sums = set()
    for text, scored in items:
        m = re.fullmatch(r"(\d+) \+ (\d+)：先算个位，(\d) \+ (\d) = (\d+)。", text)
        x, y, a, b, c = map(int, m.groups())
        assert (x % 10, y % 10) == (a, b) and c == a + b and "".join(text[i] for i in scored) == str(c)
        sums.add((a, b))
    assert len(sums) == 100


class Oracle:
    """Predicts every next character exactly (or, with wrong=True, never)."""
    training = False

    def __init__(self, vocab_size, wrong=False):
        self.vocab_size, self.wrong = vocab_size, wrong

    def eval(self): pass

    def train(self, mode=True): pass

    def __call__(self, x):
        logits = np.zeros((*x.shape, self.vocab_size))
        nxt = (x[:, 1:] + self.wrong) % self.vocab_size
        logits[:, :-1][np.arange(x.shape[0])[:, None], np.arange(x.shape[1] - 1)[None], nxt] = 1.0
        return type("T", (), {"data": logits})(), None


def test_copy_probe_runs_and_perfect_copier_scores_one():
    tok = MyLLMTokenizer().build_vocab(["".join(PROBE_TEMPLATES) + "0123456789"])
    model = GPT(get_tiny_config(tok.vocab_size), seed=0)
    out = copy_probe(model, tok, n=8)
    assert 0.0 <= out["copy_acc"] <= 1.0 and len(out["by_template"]) == len(PROBE_TEMPLATES)
    assert copy_probe(Oracle(tok.vocab_size), tok, n=8)["by_template"] == [1.0] * len(PROBE_TEMPLATES)
    assert copy_probe(Oracle(tok.vocab_size, wrong=True), tok, n=8)["copy_acc"] == 0.0


def test_facts_probe_runs_and_scores_an_oracle_one():
    tok = MyLLMTokenizer().build_vocab(["".join(t for t, _ in facts_strings())])
    assert 0.0 <= facts_probe(GPT(get_tiny_config(tok.vocab_size), seed=0), tok) <= 1.0
    assert facts_probe(Oracle(tok.vocab_size), tok) == 1.0
    assert facts_probe(Oracle(tok.vocab_size, wrong=True), tok) == 0.0
