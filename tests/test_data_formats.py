"""Every data file as .json (a list) or .jsonl (one object a line), and preference data in
TRL's conversational forms: each loads to the same items; a bad line or item is one
DataError naming file:line (or file: item i), and exit 2 from train.py."""
import json
import shutil

import pytest

from cli_helpers import BUNDLED, assert_one_line_error, run_many, train_cmd, tree_digest
from tinygrad_llm.chat_eval import load_chat_eval
from tinygrad_llm.data import (DataError, all_texts, data_file, load_pretrain_text, load_reward, load_rlvf, load_sft,
                               load_split, read_items)
from tinygrad_llm.tokenizer import MyLLMTokenizer

SFT = [{"user": "你好", "assistant": "你好！"},
       {"messages": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "1+1=?"},
                     {"role": "assistant", "content": "2"}]},
       {"user": "换行\n和 空格", "assistant": "好的\n\n再见"}]
REWARD = [{"prompt": "你好", "chosen": "你好！有什么可以帮你？", "rejected": "走开。", "kind": "rude"},
          {"prompt": "3+5=?", "chosen": "8", "rejected": "9"}]
RLVF = [{"type": "math", "prompt": "3+5=?", "expected_answer": "8"},
        {"type": "logic", "prompt": "今天周一，明天周几？", "expected_answer": "周二", "keywords": ["周二"]}]
CHAT_EVAL = [{"prompt": "你是谁？", "category": "meta", "keywords": ["MyLLM"]},
             {"prompt": "12加30是多少？", "category": "math", "answer": "42"}]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write(path, items, fmt=None):
    """items as a JSON list (.json) or one object a line (.jsonl), by the file's suffix."""
    fmt = fmt or path.suffix
    text = json.dumps(items, ensure_ascii=False, indent=1) if fmt == ".json" else \
        "\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def trl_explicit(pair):
    """TRL's conversational preference form with an explicit prompt."""
    return {"prompt": user(pair["prompt"]), "chosen": assistant(pair["chosen"]),
            "rejected": assistant(pair["rejected"]), **({"kind": pair["kind"]} if "kind" in pair else {})}


def trl_implicit(pair):
    """TRL's implicit-prompt form: chosen and rejected hold the whole conversation."""
    return {"chosen": user(pair["prompt"]) + assistant(pair["chosen"]),
            "rejected": user(pair["prompt"]) + assistant(pair["rejected"]),
            **({"kind": pair["kind"]} if "kind" in pair else {})}


@pytest.mark.parametrize("loader, items", [(load_sft, SFT), (load_reward, REWARD), (load_rlvf, RLVF)])
def test_json_and_jsonl_load_the_same_items(tmp_path, loader, items):
    a = loader(write(tmp_path / "data.json", items))
    b = loader(write(tmp_path / "data.jsonl", items))
    assert a == b and len(a) == len(items)


def test_chat_eval_and_pretrain_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a" / "chat_eval.json", CHAT_EVAL)
    write(tmp_path / "b" / "chat_eval.jsonl", CHAT_EVAL)
    assert load_chat_eval(tmp_path / "a") == load_chat_eval(tmp_path / "b") and len(load_chat_eval(tmp_path / "a")) == 2
    lines = [{"text": "第一段"}, {"text": "第二段\n还有一行"}]
    assert load_pretrain_text(write(tmp_path / "p.jsonl", lines)) == "第一段\n第二段\n还有一行"


@pytest.mark.parametrize("form", [trl_explicit, trl_implicit])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_trl_conversational_preferences_load_as_the_standard_form(tmp_path, form, suffix):
    standard = load_reward(write(tmp_path / "std.json", REWARD))
    conv = load_reward(write(tmp_path / f"conv{suffix}", [form(p) for p in REWARD]))
    keys = ("prompt", "chosen", "rejected", "kind")
    assert [{k: p[k] for k in keys if k in p} for p in conv] == [{k: p[k] for k in keys if k in p} for p in standard]
    # a string prompt with message-list replies reads the same too
    mixed = load_reward(write(tmp_path / "mixed.json", [{**trl_explicit(p), "prompt": p["prompt"]} for p in REWARD]))
    assert [p["chosen"] for p in mixed] == [p["chosen"] for p in standard]


def test_rlvf_conversational_prompt(tmp_path):
    tasks = load_rlvf(write(tmp_path / "t.jsonl", [{**t, "prompt": user(t["prompt"])} for t in RLVF]))
    assert [t["prompt"] for t in tasks] == [t["prompt"] for t in RLVF]


def test_bundled_data_round_trips_through_jsonl(tmp_path):
    """The bundled files converted to .jsonl give the same splits and the same vocabulary."""
    names = ["pretrain_data.txt", "pretrain_val.txt", "sft_data.json", "sft_val.json", "reward_data.json",
             "reward_val.json", "rlvf_data.json", "rlvf_val.json"]
    if not all((BUNDLED / n).exists() for n in names):
        pytest.skip("bundled data not generated")
    (tmp_path / "json").mkdir()
    (tmp_path / "jsonl").mkdir()
    for n in names:
        shutil.copy(BUNDLED / n, tmp_path / "json" / n)
        if n.endswith(".json"):
            write(tmp_path / "jsonl" / (n + "l"), json.loads((BUNDLED / n).read_text(encoding="utf-8")))
        else:
            shutil.copy(BUNDLED / n, tmp_path / "jsonl" / n)
    for kind in ("sft", "reward", "rlvf"):
        assert load_split(tmp_path / "json", kind, seed=3) == load_split(tmp_path / "jsonl", kind, seed=3)
    vocab = [MyLLMTokenizer().build_vocab(all_texts(tmp_path / d)).fingerprint() for d in ("json", "jsonl")]
    assert vocab[0] == vocab[1]


def test_jsonl_val_files_and_twins(tmp_path):
    write(tmp_path / "sft_data.jsonl", SFT * 4)
    write(tmp_path / "sft_val.jsonl", SFT[:1])
    (tmp_path / "pretrain_data.txt").write_text("训练文本" * 10, encoding="utf-8")
    write(tmp_path / "pretrain_val.jsonl", [{"text": "留出文本"}])
    train, val = load_split(tmp_path, "sft")
    assert len(train) == 12 and len(val) == 1
    assert load_split(tmp_path, "pretrain")[1] == "留出文本"
    write(tmp_path / "sft_data.json", SFT)
    with pytest.raises(DataError, match="both sft_data.json and sft_data.jsonl exist"):
        data_file(tmp_path, "sft_data.json")
    with pytest.raises(DataError, match=r"reward_data.json: file not found \(nor reward_data.jsonl\)"):
        load_split(tmp_path, "reward")


@pytest.mark.parametrize("lines, match", [
    (['{"user": "a", "assistant": "b"}', "", '{"user": "c" "assistant": "d"}'],
     r"sft_data.jsonl:3:\d+: malformed JSON line"),
    (['{"user": "a", "assistant": "b"}', '{"user": "c"}'], r"sft_data.jsonl:2: missing field 'assistant'"),
    (['{"user": "a", "assistant": "b"}', '["not", "an", "object"]'], r"sft_data.jsonl:2: expected an object"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"sft_data.jsonl:1 message 0: unknown role 'robot'"),
    (['{"user": "\\ud800", "assistant": "b"}'], r"sft_data.jsonl:1: holds a lone surrogate"),
    (["", "  "], r"sft_data.jsonl: no JSON lines"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, match):
    p = tmp_path / "sft_data.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        load_sft(p)
    assert len(str(e.value).splitlines()) == 1 and str(p) in str(e.value)


@pytest.mark.parametrize("item, match", [
    ({"prompt": user("a") + assistant("b") + user("c"), "chosen": assistant("x"), "rejected": assistant("y")},
     r"item 0: 'prompt' must be one user message .*got roles \['user', 'assistant', 'user'\]"),
    ({"prompt": user("a"), "chosen": assistant("x") + assistant("z"), "rejected": assistant("y")},
     r"item 0: 'chosen' must be one assistant message"),
    ({"chosen": user("a") + assistant("x"), "rejected": user("b") + assistant("y")},
     r"item 0: the turns 'chosen' and 'rejected' share .* got roles \[\]"),
    ({"prompt": user("a"), "chosen": [{"role": "bot", "content": "x"}], "rejected": assistant("y")},
     r"item 0 chosen\[0\]: unknown role 'bot'"),
    ({"prompt": user("a"), "chosen": assistant("x"), "rejected": "y"}, r"item 0: 'rejected' must be a non-empty list"),
    ({"prompt": user("a"), "chosen": assistant("x")}, r"item 0: missing field 'rejected'"),
    ({"chosen": "x", "rejected": "y"}, r"item 0: missing field 'prompt'"),
])
def test_bad_conversational_pairs_name_the_item(tmp_path, item, match):
    with pytest.raises(DataError, match=match):
        load_reward(write(tmp_path / "reward_data.json", [item]))


def test_read_items_locations(tmp_path):
    assert [w for w, _ in read_items(write(tmp_path / "x.json", [1, 2]))] == [f"{tmp_path / 'x.json'}: item {i}"
                                                                                for i in range(2)]
    p = tmp_path / "x.jsonl"
    p.write_text('1\n\n2\n', encoding="utf-8")
    assert read_items(p) == [(f"{p}:1", 1), (f"{p}:3", 2)]


def test_train_py_refuses_a_bad_jsonl_line(tmp_path):
    """Through the CLI: exit 2, one line naming file:line, the checkpoints untouched."""
    cmds, ckpts = {}, {}
    for case in ("sft", "pretrain"):
        data, ckpt = tmp_path / case / "data", tmp_path / case / "ckpt"
        data.mkdir(parents=True)
        ckpt.mkdir()
        MyLLMTokenizer().build_vocab("你好").save(ckpt / "vocab.json")
        (ckpt / "pretrain_final.safetensors").write_bytes(b"")   # exists; never read: the data fails first
        if case == "sft":
            (data / "pretrain_data.txt").write_text("你好" * 50, encoding="utf-8")
            (data / "sft_data.jsonl").write_text('{"user": "a", "assistant": "b"}\n{"user": "c"}\n', encoding="utf-8")
        else:
            (data / "pretrain_data.jsonl").write_text('{"text": "你好"}\n{"text": 3}\n', encoding="utf-8")
        ckpts[case] = (ckpt, tree_digest(ckpt))
        cmds[case] = train_cmd("--config", "tiny", "--stage", case, "--data-dir", data, "--ckpt-dir", ckpt,
                               "--runs-dir", tmp_path / case / "runs", "--no-progress", "--threads", "1")
    res = run_many(cmds)
    assert_one_line_error(res["sft"], 2, "sft_data.jsonl:2: missing field 'assistant'")
    assert_one_line_error(res["pretrain"], 2, "pretrain_data.jsonl:2: field 'text' must be a string")
    for ckpt, digest in ckpts.values():
        assert tree_digest(ckpt) == digest
