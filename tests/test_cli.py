"""The real CLIs as subprocesses: train.py end to end on a tiny data dir, every kind of bad
input refused with one line and exit 2 without touching a checkpoint, and inference.py's
edge cases (empty / overlong / out-of-vocabulary prompts, piped stdin, --raw)."""
import argparse
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import (ROOT, assert_one_line_error, inference_cmd, run, run_many, train_cmd, tree_digest,
                         write_tiny_data)
from tinygrad_llm.checkpoint import load_gpt

E2E_ARGS = ["--config", "tiny", "--stage", "pretrain,sft", "--pretrain.max_steps=8", "--pretrain.eval_batches=2",
            "--sft.max_steps=4", "--sft.eval_prompts=2", "--sft.max_new_tokens=8", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One `train.py --config tiny --stage pretrain,sft` run; its checkpoints serve every test."""
    work = tmp_path_factory.mktemp("cli")
    data = write_tiny_data(work / "data")
    res = run(train_cmd(*E2E_ARGS, "--data-dir", data, "--ckpt-dir", work / "ckpt", "--runs-dir", work / "runs",
                        "--run-id", "e2e"))
    assert res.returncode == 0, res.stderr
    return argparse.Namespace(work=work, data=data, ckpt=work / "ckpt", run=work / "runs" / "e2e", res=res)


def test_pretrain_sft_end_to_end(e2e):
    for name in ("pretrain_final.safetensors", "sft_final.safetensors", "vocab.json"):
        assert (e2e.ckpt / name).exists(), name
    assert not list(e2e.ckpt.glob("*_last*"))                      # resumable state cleaned up
    rows = [json.loads(l) for l in (e2e.run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["stage"] for r in rows} == {"pretrain", "sft"}
    assert any("loss" in r and r["stage"] == "pretrain" and r["step"] == 8 for r in rows)
    summary = json.loads((e2e.run / "summary.json").read_text(encoding="utf-8"))
    assert "held-out loss" in summary["pretrain"]["headline"] and "held-out loss" in summary["sft"]["headline"]
    out = e2e.res.stdout
    table = out[out.index("\nstage "):]                             # the summary table, after both stages
    assert "headline" in table and "checkpoint" in table
    assert "pretrain_final.safetensors" in table and "sft_final.safetensors" in table


def test_sft_with_neftune_noise_trains_other_weights(e2e, tmp_path):
    """--sft.neftune_alpha: the same SFT run with noise on the embeddings ends elsewhere than without."""
    sft_args = [a for a in E2E_ARGS if not a.startswith(("--pretrain.", "pretrain,"))]
    sft_args[sft_args.index("--stage") + 1] = "sft"
    finals = {}
    for name, extra in (("plain", ["--sft.neftune_alpha=0"]), ("noisy", ["--sft.neftune_alpha=5"])):
        ck = tmp_path / name
        ck.mkdir()
        for f in ("pretrain_final.safetensors", "vocab.json"):
            shutil.copy(e2e.ckpt / f, ck / f)
        res = run(train_cmd(*sft_args, *extra, "--data-dir", e2e.data, "--ckpt-dir", ck, "--runs-dir", tmp_path / "runs",
                            "--run-id", name))
        assert res.returncode == 0, res.stderr
        finals[name] = load_gpt(ck / "sft_final.safetensors")[0].state_dict()
    assert any(not np.array_equal(finals["plain"][k], finals["noisy"][k]) for k in finals["plain"])


def test_a_short_budget_shortens_the_stages(e2e, tmp_path):
    """--budget-min far below what the stage needs: its length falls to budget.MIN_SCALE of the
    configured one, the run says so, and summary.json records both lengths."""
    res = run(train_cmd("--config", "tiny", "--stage", "pretrain", "--budget-min", "0.01", "--pretrain.eval_batches=2",
                        "--data-dir", e2e.data, "--ckpt-dir", tmp_path / "ckpt", "--runs-dir", tmp_path / "runs",
                        "--run-id", "b", "--no-progress", "--threads", "1"))
    assert res.returncode == 0, res.stderr
    assert "budget: pretrain max_steps 60 -> 6 (x0.10)" in res.stdout
    summary = json.loads((tmp_path / "runs" / "b" / "summary.json").read_text(encoding="utf-8"))
    assert (summary["pretrain"]["length"], summary["pretrain"]["full_length"]) == (6, 60)
    rows = [json.loads(l) for l in (tmp_path / "runs" / "b" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert max(r["step"] for r in rows) == 6
    report = (tmp_path / "runs" / "b" / "report.md").read_text(encoding="utf-8")
    assert "Shortened to end within the time budget" in report and "pretrain 6 of 60" in report


# ----------------------------------------------------------------------------------------
# train.py: bad input -> one line on stderr, exit 2, every existing file byte-identical


def _data_with(base: Path, dest: Path, **files) -> Path:
    shutil.copytree(base, dest)
    for name, content in files.items():
        p = dest / name.replace("__", ".")
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return dest


MALFORMED = '[\n {"user": "你好", "assistant": "你好！"},\n {"user": "再见" "assistant": "再见！"}\n]'
MISSING = json.dumps([{"user": "你好", "assistant": "你好！"}, {"user": "再见"}], ensure_ascii=False)

# name: (stage and flags, data-dir files to replace, ckpt files to remove, expected fragments)
BAD = {
    "malformed json": (["--stage", "sft"], {"sft_data__json": MALFORMED}, [],
                       ["sft_data.json:3:", "malformed JSON"]),
    "missing field": (["--stage", "sft"], {"sft_data__json": MISSING}, [],
                      ["sft_data.json", "item 1: missing field 'assistant'"]),
    "empty corpus": (["--stage", "pretrain"], {"pretrain_data__txt": " \n\t\n"}, [],
                     ["pretrain_data.txt", "corpus is empty"]),
    "not utf-8": (["--stage", "pretrain"], {"pretrain_data__txt": "人工智能".encode("gbk")}, [],
                  ["pretrain_data.txt", "not UTF-8"]),
    "unknown stage": (["--stage", "pretrain,finetune"], {}, [], ["unknown stage(s) finetune"]),
    "skipped input": (["--stage", "pretrain,sft", "--skip-pretrain"], {}, ["pretrain_final.safetensors"],
                      ["stage sft needs", "pretrain_final.safetensors", "does not exist"]),
    "impossible config": (["--stage", "pretrain", "--model.n_embd=30", "--model.n_head=4"], {}, [],
                          ["n_embd (30) must be divisible by n_head (4)"]),
    "unknown field": (["--stage", "pretrain", "--model.n_layers=2"], {}, [], ["model has no field 'n_layers'"]),
    "unknown section": (["--stage", "pretrain", "--optim.lr=0.1"], {}, [], ["unknown section 'optim'"]),
    "bad value": (["--stage", "pretrain", "--pretrain.max_steps=many"], {}, [], ["cannot read 'many' as int"]),
    "stray argument": (["--stage", "pretrain", "--fast"], {}, [], ["unrecognised argument '--fast'"]),
    "corrupt vocab": (["--stage", "sft"], {}, [], ["vocab.json", "not a valid vocabulary"]),
    "negative budget": (["--stage", "pretrain", "--budget-min=-1"], {}, [], ["--budget-min must be >= 0"]),
    "no data dir": (["--stage", "pretrain", "--data-dir", "/nonexistent/tiny"], {}, [], ["not a directory"]),
}


@pytest.fixture(scope="module")
def bad_runs(e2e, tmp_path_factory):
    """Every BAD case on its own copy of the e2e checkpoints, run a few at a time."""
    root = tmp_path_factory.mktemp("bad")
    cmds, cases = {}, {}
    for i, (name, (flags, data_files, remove, _)) in enumerate(BAD.items()):
        work = root / f"case{i}"
        data = _data_with(e2e.data, work / "data", **data_files)
        ckpt = work / "ckpt"
        shutil.copytree(e2e.ckpt, ckpt)
        for r in remove:
            (ckpt / r).unlink()
        if name == "corrupt vocab":
            (ckpt / "vocab.json").write_text('{"itos": ["<PAD>"', encoding="utf-8")
        cases[name] = (ckpt, tree_digest(ckpt))
        cmds[name] = train_cmd("--config", "tiny", "--data-dir", data, "--ckpt-dir", ckpt, "--runs-dir", work / "runs",
                               "--no-progress", "--threads", "1", *flags)
    results = run_many(cmds)
    return {name: (results[name], ckpt, digest) for name, (ckpt, digest) in cases.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(bad_runs, case):
    res, ckpt, digest = bad_runs[case]
    assert_one_line_error(res, 2, *BAD[case][3])
    assert tree_digest(ckpt) == digest


# ----------------------------------------------------------------------------------------
# inference.py

GEN = ["--temperature", "0", "--max-new-tokens", "8"]
PIPED = "你好\n\n  三加五等于几？  \n"


def _inference_module():
    spec = importlib.util.spec_from_file_location("inference_cli", ROOT / "inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected_chat(ckpt: Path, lines: list[str]) -> str:
    """What the piped chat must print: the greedy reply to each turn of one conversation,
    computed in process with one BLAS thread, as the subprocess uses."""
    from threadpoolctl import threadpool_limits
    inf = _inference_module()
    model, tok = load_gpt(ckpt / "sft_final.safetensors", ckpt / "vocab.json")
    args = inf.build_parser().parse_args(GEN)      # the CLI's own defaults, as the subprocess has them
    out, messages = [], []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "prompt longer than the context": expected here
        for line in lines:
            messages.append({"role": "user", "content": line})
            reply = inf.answer(model, tok, inf.encode_turn(tok, messages, line, args), args, stream=False)
            messages.append({"role": "assistant", "content": reply})
            out.append(reply + "\n")
    return "".join(out).replace("\r\n", "\n").replace("\r", "\n")   # as text-mode pipes read it


@pytest.fixture(scope="module")
def inference_runs(e2e, tmp_path_factory):
    sft, pre = e2e.ckpt / "sft_final.safetensors", e2e.ckpt / "pretrain_final.safetensors"
    empty = tmp_path_factory.mktemp("empty_ckpt")
    cmds = {
        "empty prompt": inference_cmd("--checkpoint", sft, "--prompt", "", *GEN),
        "blank prompt": inference_cmd("--checkpoint", sft, "--prompt", "  \n ", *GEN),
        "long prompt": inference_cmd("--checkpoint", sft, "--prompt", "人工智能是什么？" * 40, *GEN),
        "out of vocabulary": inference_cmd("--checkpoint", sft, "--prompt", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀 ßж ﷽ \x07", *GEN),
        "missing checkpoint": inference_cmd("--checkpoint", e2e.ckpt / "nope.safetensors", "--prompt", "你好"),
        "best of 0": inference_cmd("--checkpoint", sft, "--prompt", "你好", "--best-of", "0"),
        "empty ckpt dir": inference_cmd("--ckpt-dir", empty, "--prompt", "你好"),
        "piped": (inference_cmd("--checkpoint", sft, *GEN), PIPED),
        "raw": inference_cmd("--raw", "--checkpoint", pre, "--prompt", "人工智能", *GEN),
    }
    return run_many(cmds)


@pytest.mark.parametrize("case, fragment", [("empty prompt", "--prompt is empty"), ("blank prompt", "--prompt is empty"),
                                            ("missing checkpoint", "nope.safetensors: checkpoint not found"),
                                            ("best of 0", "--best-of must be >= 1"),
                                            ("empty ckpt dir", "no checkpoint in")])
def test_inference_refuses_with_one_line(inference_runs, case, fragment):
    assert_one_line_error(inference_runs[case], 2, fragment)


def test_inference_long_prompt_works_and_warns(inference_runs):
    res = inference_runs["long prompt"]
    assert res.returncode == 0, res.stderr
    assert "prompt longer than the context" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.endswith("\n")


def test_inference_out_of_vocabulary_characters_work(inference_runs):
    res = inference_runs["out of vocabulary"]
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    assert res.stdout.endswith("\n")


def test_inference_piped_stdin_one_reply_per_line(inference_runs, e2e):
    res = inference_runs["piped"]
    # EOF ends it cleanly (the conversation outgrows the tiny context: a warning, not an error)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    lines = [l.strip() for l in PIPED.splitlines() if l.strip()]
    assert res.stdout == _expected_chat(e2e.ckpt, lines)                   # one reply per non-empty line


def test_inference_raw_on_pretrain_checkpoint(inference_runs):
    res = inference_runs["raw"]
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    assert res.stdout.endswith("\n") and len(res.stdout) > 1
