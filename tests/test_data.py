"""Data loaders: every bad file gets one clear error naming the file and the item."""
import json

import numpy as np
import pytest

from tinygrad_llm.config import ConfigError
from tinygrad_llm.data import (DataError, encode_chat, load_pretrain_text, load_reward, load_rlvf, load_sft,
                               load_split, pad_batch, pretrain_batch)
from tinygrad_llm.stages.sft import PROTECTED, drop_prompt_chars, droppable, length_grouped
from tinygrad_llm.tokenizer import IM_END_ID, MyLLMTokenizer


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return p


def test_malformed_json_names_file_line_and_column(tmp_path):
    p = write(tmp_path, "sft_data.json", '[\n {"user": "你好",\n  "assistant": }\n]')
    with pytest.raises(DataError, match=r"sft_data.json:3:\d+: malformed JSON"):
        load_sft(p)


@pytest.mark.parametrize("items, match", [
    ([{"user": "你好"}], "item 0: missing field 'assistant'"),
    ([{"user": "a", "assistant": "b"}, {"user": 3, "assistant": "b"}], "item 1: field 'user' must be a string"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "unknown role"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
    ([], "empty"),
    ({"user": "a"}, "expected a JSON list"),
])
def test_sft_field_errors(tmp_path, items, match):
    with pytest.raises(DataError, match=match):
        load_sft(write(tmp_path, "sft.json", items))


def test_reward_and_rlvf_validation(tmp_path):
    with pytest.raises(DataError, match="item 0: missing field 'rejected'"):
        load_reward(write(tmp_path, "r.json", [{"prompt": "p", "chosen": "c"}]))
    ok = load_reward(write(tmp_path, "r2.json", [{"prompt": "p", "chosen": "c", "rejected": "r", "kind": "rude"}]))
    assert ok[0]["kind"] == "rude"                                      # extra fields kept, ignored
    with pytest.raises(DataError, match="type must be 'math' or 'logic'"):
        load_rlvf(write(tmp_path, "t.json", [{"type": "poem", "prompt": "p", "expected_answer": "1"}]))
    tasks = load_rlvf(write(tmp_path, "t2.json", [{"type": "math", "prompt": "1+1=?", "expected_answer": 2}]))
    assert tasks[0]["expected_answer"] == "2"


def test_pretrain_formats_and_bad_text(tmp_path):
    assert load_pretrain_text(write(tmp_path, "a.txt", "你好世界")) == "你好世界"
    jl = write(tmp_path, "c.jsonl", '{"text": "第一行"}\n\n{"text": "第二行"}\n')
    assert load_pretrain_text(jl) == "第一行\n第二行"
    d = tmp_path / "dir"
    d.mkdir()
    (d / "1.txt").write_text("甲", encoding="utf-8")
    (d / "2.txt").write_text("乙", encoding="utf-8")
    assert load_pretrain_text(d) == "甲\n乙"
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        load_pretrain_text(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="empty"):
        load_pretrain_text(write(tmp_path, "e.txt", "  \n"))
    with pytest.raises(DataError, match="c2.jsonl:2"):
        load_pretrain_text(write(tmp_path, "c2.jsonl", '{"text": "a"}\n{oops}\n'))


def test_split_uses_val_file_or_holds_out(tmp_path):
    items = [{"user": f"问{i}", "assistant": f"答{i}"} for i in range(20)]
    write(tmp_path, "sft_data.json", items)
    train, val = load_split(tmp_path, "sft", seed=0)
    assert len(val) == 2 and len(train) == 18
    write(tmp_path, "sft_val.json", items[:3])
    train, val = load_split(tmp_path, "sft")
    assert len(val) == 3 and len(train) == 20


def test_sft_mask_covers_assistant_tokens_and_im_end_only():
    tok = MyLLMTokenizer().build_vocab("你好！我是助手。")
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "我是助手"}]
    ids, mask = encode_chat(tok, msgs, 256)
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "我是助手" and learned[-1] == IM_END_ID
    x, y, m = pad_batch([(np.array(ids), np.array(mask, np.float32)), (np.array(ids[:8]), np.array(mask[:8], np.float32))])
    assert x.shape == y.shape == m.shape == (2, len(ids) - 1)
    assert m[1].sum() == 0                                      # truncated example: no assistant tokens left


def test_length_grouped_batches_pad_less_and_draw_every_example_alike():
    lengths = np.random.default_rng(1).integers(10, 200, 500)
    rng, plain = np.random.default_rng(0), np.random.default_rng(0)
    counts, pad_grouped, pad_plain = np.zeros(500), [], []
    for _ in range(4000):
        rows = length_grouped(rng, lengths, 16, 8)
        assert rows.shape == (16,) and np.all(np.diff(lengths[rows]) >= 0)    # one sorted slice
        np.add.at(counts, rows, 1)
        pad_grouped.append(1 - lengths[rows].mean() / lengths[rows].max())
        other = plain.integers(0, 500, 16)
        pad_plain.append(1 - lengths[other].mean() / lengths[other].max())
    assert np.mean(pad_grouped) < 0.5 * np.mean(pad_plain)
    # each example is drawn 4000 * 16 / 500 = 128 times on average, whatever its length: the
    # counts spread as a Poisson count would (sd ~11.3) and do not lean toward short or long ones
    assert counts.mean() == 128 and counts.std() < 14
    assert abs(np.corrcoef(counts, lengths)[0, 1]) < 0.2
    # the draw is a function of the RNG's state alone (a resumed run draws the same batches)
    assert np.array_equal(length_grouped(np.random.default_rng(5), lengths, 16, 8),
                          length_grouped(np.random.default_rng(5), lengths, 16, 8))


def test_sft_group_by_length_must_be_positive():
    from tinygrad_llm.config import ConfigError
    from tinygrad_llm.stages.sft import SFTConfig
    SFTConfig(group_by_length=1).validate()                    # 1: plain random batches
    with pytest.raises(ConfigError, match="group_by_length"):
        SFTConfig(group_by_length=0).validate()
    with pytest.raises(ConfigError, match="neftune_alpha"):
        SFTConfig(neftune_alpha=-1.0).validate()
    with pytest.raises(ConfigError, match="prompt_dropout"):
        SFTConfig(prompt_dropout=1.0).validate()


def test_prompt_dropout_touches_only_unprotected_user_characters():
    tok = MyLLMTokenizer()
    conv = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "请问47加38等于多少？不对吧"},
            {"role": "assistant", "content": "47 + 38 = 85。"}, {"role": "user", "content": "谢谢你AI"},
            {"role": "assistant", "content": "不客气。"}]
    tok.build_vocab(["".join(m["content"] for m in conv) + "systemuserassistant"])
    ids, mask = map(np.array, encode_chat(tok, conv, 256))
    can = droppable(tok, ids)
    assert "".join(tok.itos[i] for i in ids[can]) == "请问等于多少？对吧谢谢你"     # system, replies, protected: kept
    rng = np.random.default_rng(0)
    for p in (0.0, 0.3, 0.9):
        out, m = drop_prompt_chars(ids, mask, can, p, np.random.default_rng(1))
        gone = can & (np.random.default_rng(1).random(len(ids)) < p)
        assert np.array_equal(out, ids[~gone])
        kept = set(tok.decode(out.tolist(), skip_special_tokens=False))
        assert {c for c in PROTECTED if c in tok.decode(ids.tolist())} <= kept
        assert m.sum() == mask.sum() and np.array_equal(out[m > 0], ids[mask > 0])   # the learnt tokens, untouched
        if p == 0.0:
            assert np.array_equal(out, ids)
    drops = [len(ids) - len(drop_prompt_chars(ids, mask, can, 0.3, rng)[0]) for _ in range(400)]
    assert abs(np.mean(drops) / can.sum() - 0.3) < 0.03                       # each position with probability p


def test_pretrain_batch_windows():
    ids = np.arange(100)
    x, y = pretrain_batch(ids, 4, 10, np.random.default_rng(0))
    assert x.shape == (4, 10) and np.array_equal(y, x + 1)


def test_mixed_batch_and_the_pretrain_curriculum():
    from tinygrad_llm.data import mixed_pretrain_batch
    from tinygrad_llm.stages.pretrain import PretrainConfig, curriculum_batch
    text, drills = np.arange(1000, dtype=np.int64), np.arange(5000, 6000, dtype=np.int64)
    rng = np.random.default_rng(0)
    x, y = mixed_pretrain_batch(text, drills, 0.25, 8, 16, rng)
    assert x.shape == y.shape == (8, 16) and (y[:, :-1] == x[:, 1:]).all()
    assert (x[:2] >= 5000).all() and (x[2:] < 1000).all()          # round(0.25 * 8) = 2 drill rows first
    x, _ = mixed_pretrain_batch(text, None, 0.9, 8, 16, rng)
    assert (x < 1000).all()                                          # no drills: text only
    cfg = PretrainConfig(batch_size=8, copy_warmup_steps=3, copy_warmup_batch=4, copy_warmup_len=10, drill_share=0.25)
    x, _ = curriculum_batch(2, cfg, text, drills, 32, rng)           # warm-up: copy spans alone, small
    assert x.shape == (4, 10) and (x >= 5000).all()
    x, _ = curriculum_batch(3, cfg, text, drills, 32, rng)           # then windows, a quarter from the spans
    assert x.shape == (8, 32) and (x[:2] >= 5000).all() and (x[2:] < 1000).all()
    x, _ = curriculum_batch(0, cfg, text, None, 32, rng)             # data without spans: text from step 0
    assert x.shape == (8, 32) and (x < 1000).all()


def test_ppmi_matrix_against_a_loop_reference():
    from tinygrad_llm.stages.pretrain import ppmi_matrix
    V, window, cds = 7, 3, 0.75
    ids = np.random.default_rng(0).integers(0, V - 1, 200)           # token V-1 never occurs
    c = np.zeros((V, V))
    for i in range(len(ids)):
        for d in range(1, window + 1):
            if i + d < len(ids):
                c[ids[i], ids[i + d]] += 1 / d
                c[ids[i + d], ids[i]] += 1 / d
    row, ctx = c.sum(1), c.sum(1) ** cds
    ref = np.zeros((V, V))
    for i in range(V):
        for j in range(V):
            if c[i, j] > 0:
                ref[i, j] = max(0.0, np.log(c[i, j] * ctx.sum() / (row[i] * ctx[j])))
    got = ppmi_matrix(ids, V, window, cds)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert not got[V - 1].any() and not got[:, V - 1].any()


def test_ppmi_embeddings_start_interchangeable_characters_together():
    """x and y fill the same slot between a and b; z only between c and d: x starts near y, far from z."""
    from tinygrad_llm.stages.pretrain import PretrainConfig, init_embeddings, ppmi_embeddings
    a, b, c, d, x, y, z, unused = range(8)
    rng = np.random.default_rng(1)
    ids = np.concatenate([[a, rng.choice([x, y]), b] if rng.random() < 0.5 else [c, z, d] for _ in range(3000)])
    emb = ppmi_embeddings(ids, 8, 4, std=0.02)
    assert emb.shape == (8, 4) and emb.dtype == np.float64
    assert not emb[unused].any() and np.isclose(emb[:unused].std(), 0.02)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)   # noqa: E731
    assert cos(emb[x], emb[y]) > 0.9 and abs(cos(emb[x], emb[z])) < 0.3
    # the stage's init: share 0 leaves the random rows, 1 puts the co-occurrence rows in their place,
    # a share between mixes the two at the same std; a character absent from the text keeps its row
    w0 = np.random.default_rng(2).normal(0, 0.02, (8, 4)).astype(np.float32)
    for share in (0.0, 0.5, 1.0):
        w = w0.copy()
        init_embeddings(w, ids, share)
        assert w.dtype == np.float32 and np.array_equal(w[unused], w0[unused])
        want = np.sqrt(1 - share) * w0[:unused] + np.sqrt(share) * ppmi_embeddings(ids, 8, 4, std=float(w0.std()))[:unused]
        np.testing.assert_allclose(w[:unused], want, rtol=1e-5, atol=1e-7)
    w = w0.copy()
    init_embeddings(w, ids, 1.0, keep=[x])                           # x keeps its random row
    assert np.array_equal(w[x], w0[x]) and not np.array_equal(w[y], w0[y])
    with pytest.raises(ConfigError, match="emb_ppmi must be in"):
        PretrainConfig(emb_ppmi=1.5).validate()


def test_bundled_sft_data_is_written_on_first_use(tmp_path, monkeypatch):
    """data/sft_data.json is not in git: the first lookup in the bundled folder runs data/generate.py,
    whose output equals the file the session start wrote; other folders are left alone."""
    import shutil

    from tinygrad_llm import data as D
    bundled, copy = D.BUNDLED_DIR, tmp_path / "data"
    shutil.copytree(bundled, copy, ignore=shutil.ignore_patterns("sft_data.json", "__pycache__"))
    assert D.data_file(copy, "sft_data.json") is None          # not the bundled folder: nothing written
    monkeypatch.setattr(D, "BUNDLED_DIR", copy.resolve())
    path = D.data_file(copy, "sft_data.json")
    assert path == copy / "sft_data.json"
    assert path.read_bytes() == (bundled / "sft_data.json").read_bytes()


def test_bundled_sft_data_is_rewritten_when_its_sources_change(tmp_path, monkeypatch):
    """After a checkout that changes data/src or the generator, the untracked sft_data.json would
    be the old sources' file: it is regenerated when older than any of them, and only then."""
    import os
    import shutil

    from tinygrad_llm import data as D
    bundled, copy = D.BUNDLED_DIR, tmp_path / "data"
    shutil.copytree(bundled, copy, ignore=shutil.ignore_patterns("__pycache__"))
    sft, source = copy / "sft_data.json", copy / "src" / "chat" / "meta.json"
    t0 = sft.stat().st_mtime
    for p in [*copy.glob("*.py"), *(p for p in (copy / "src").rglob("*") if p.is_file())]:
        os.utime(p, (t0 - 10, t0 - 10))
    assert not D.generated_is_stale(copy)
    os.utime(source, (t0 + 10, t0 + 10))                       # as a checkout leaves a changed source
    assert D.generated_is_stale(copy)
    sft.write_text("[]\n", encoding="utf-8")                    # stands in for the old sources' file
    os.utime(sft, (t0, t0))
    monkeypatch.setattr(D, "BUNDLED_DIR", copy.resolve())
    D.ensure_bundled(copy)
    assert sft.read_bytes() == (bundled / "sft_data.json").read_bytes()
    assert not D.generated_is_stale(copy)
