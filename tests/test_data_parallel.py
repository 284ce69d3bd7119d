"""Data parallel over MPI (distributed.py): `mpiexec -n 2` trains the same weights as one process
on the same global batch (float64, dropout off), bit-identical on both ranks; a rank that fails
brings the job down with one line and the single-process exit code, no rank hanging and no
checkpoint touched; Ctrl-C under mpiexec saves once, and the printed `mpiexec ... --resume`
finishes bit-identical to an uninterrupted run. The MPI tests skip without the extra `mpi`
(mpi4py + an mpiexec); each subprocess has a timeout."""
import importlib.util
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import dp_worker
from cli_helpers import BUNDLED, ENV, ROOT, TIMEOUT, error_lines, run, run_many, train_cmd, tree_digest, write_tiny_data
from tinygrad_llm.distributed import row_range, shard_rows
from tinygrad_llm.model import GPT
from tinygrad_llm.stages.reward_model import RewardModel, RewardModelTrainer
from tinygrad_llm.stages.rlhf import TINY_OVERRIDES as TINY_RLHF, PPOTrainer, RLHFConfig
from tinygrad_llm.stages.rlvf import TINY_OVERRIDES as TINY_RLVF

MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="the extra `mpi` (mpi4py + mpiexec) is not installed")
WORKER = ROOT / "tests" / "dp_worker.py"


def mpi_cmd(n: int, *args) -> list[str]:
    return [MPIEXEC, "-n", str(n), *map(str, args)]


# ----------------------------------------------------------------------------------------
# sharding (no MPI needed)


def test_shards_partition_the_batch_and_their_shares_sum_to_one():
    rng = np.random.default_rng(0)
    for B in (1, 5, 8, 13):
        for size in (1, 2, 3, 4):
            x = np.arange(B)
            m = (rng.random((B, 7)) < 0.5).astype(np.float32)
            parts = [shard_rows((x, m), r, size, count=m.sum(axis=1)) for r in range(size)]
            assert np.array_equal(np.concatenate([p[0][0] for p in parts]), x)          # every row once, in order
            assert [len(p[0][0]) for p in parts] == [row_range(B, r, size)[1] - row_range(B, r, size)[0]
                                                      for r in range(size)]
            assert max(len(p[0][0]) for p in parts) - min(len(p[0][0]) for p in parts) <= 1
            if m.sum():
                assert sum(p[1] for p in parts) == pytest.approx(1.0, abs=1e-12)
                assert [p[1] for p in parts] == pytest.approx([p[0][1].sum() / m.sum() for p in parts])


def test_reward_shard_keeps_each_pair_together():
    idx = np.arange(10)[:, None] * np.ones((1, 3), np.int64)      # rows 0-4 chosen, 5-9 their rejected
    last = np.arange(10)
    (i0, l0, b0), s0 = RewardModelTrainer.shard((idx, last, 5), 0, 2)
    (i1, l1, b1), s1 = RewardModelTrainer.shard((idx, last, 5), 1, 2)
    assert (b0, b1) == (2, 3) and s0 + s1 == 1.0 and s0 == 2 / 5
    assert list(l0) == [0, 1, 5, 6] and list(l1) == [2, 3, 4, 7, 8, 9]     # chosen i beside rejected i
    assert i0.shape == (4, 3) and i1.shape == (6, 3)


def test_without_mpiexec_nothing_imports_mpi():
    code = ("import sys, train; from tinygrad_llm.distributed import world; "
            "assert world().size == 1 and 'mpi4py' not in sys.modules, sorted(m for m in sys.modules if 'mpi' in m)")
    res = subprocess.run([sys.executable, "-c", code], env={**ENV, "PMI_SIZE": "1"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------
# equality with one process (float64, dropout off)


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> tuple:
    """dp_worker.py's every kind, once alone and once under mpiexec -n 2 -> (one process's
    arrays, rank 0's, rank 1's)."""
    one, two = (tmp_path_factory.mktemp(k) for k in ("one", "two"))
    res = run_many({"one": [sys.executable, WORKER, one], "two": mpi_cmd(2, sys.executable, WORKER, two)})
    for k, r in res.items():
        assert r.returncode == 0, f"{k}: {r.stderr}"
    ref, r0, r1 = (dict(np.load(p)) for p in (one / "rank0.npz", two / "rank0.npz", two / "rank1.npz"))
    assert set(ref) == set(r0) == set(r1) and len(ref) > 0
    return ref, r0, r1


@needs_mpi
def test_two_ranks_equal_one_process_and_each_other(worker_runs):
    ref, r0, r1 = ({k: v for k, v in r.items() if k.split("/")[0] in ("rows", "masked", "gaps", "pairs", "dpo")}
                   for r in worker_runs)
    start = {f"{kind}/{k}": v for kind, cls in (("rows", GPT), ("masked", GPT), ("gaps", GPT), ("pairs", RewardModel),
                                                ("dpo", GPT))
             for k, v in cls(dp_worker.MCFG, seed=3, dtype=np.float64).state_dict().items()}
    assert set(ref) == set(start)
    for k in ref:
        # both ranks apply the same AdamW to the same summed gradient: bit-identical
        assert np.array_equal(r0[k], r1[k]), f"{k}: ranks differ by {np.abs(r0[k] - r1[k]).max()}"
        # the global batch's gradient, up to the order of float64 sums (Adam's normalisation
        # amplifies the rounding of gradients that nearly cancel, hence 1e-12 and not 1e-15)
        assert np.abs(r0[k] - ref[k]).max() < 1e-12, f"{k}: differs from one process by {np.abs(r0[k] - ref[k]).max()}"
    # (a bias added to both replies of a pair cancels in r_c - r_r: those two have no gradient)
    still = {"pairs/reward_head.bias", "pairs/transformer.ln_f.bias"}
    moved = [np.abs(ref[k] - start[k]).max() for k in start if k not in still]
    assert min(moved) > 1e-4, "some weight did not move: the test would not see a wrong gradient"


def rl_start(kind: str) -> dict:
    """The weights dp_worker's RL run of `kind` starts from."""
    if kind == "grpo":
        return dp_worker.grpo_model(dp_worker.grpo_tokenizer()).state_dict()
    tok, policy, rm = dp_worker.ppo_models()
    return PPOTrainer(policy, rm, tok).model.state_dict()


@needs_mpi
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_on_two_ranks_equals_one_process(worker_runs, kind):
    """GRPO and PPO (dp_worker.run_grpo / run_ppo): each rank samples its part of every batch (GRPO:
    whole groups), with the replies one process samples; the whole-batch figures (curriculum, means,
    PPO's whitening, each minibatch's token count) come from every rank, each rank's loss is
    weighted by its share of the tokens. In both runs some step has a rank with nothing to learn."""
    ref, r0, r1 = worker_runs
    start = rl_start(kind)
    assert {k for k in ref if k.startswith(f"{kind}/")} == {f"{kind}/{k}" for k in start}
    for k in start:
        a, b, want = r0[f"{kind}/{k}"], r1[f"{kind}/{k}"], ref[f"{kind}/{k}"]
        assert np.array_equal(a, b), f"{k}: ranks differ by {np.abs(a - b).max()}"
        # Adam's normalisation (lr 1e-2 / 1e-3) amplifies the rounding of reordered float64 sums
        assert np.abs(a - want).max() < 1e-10, f"{k}: differs from one process by {np.abs(a - want).max()}"
        assert np.abs(want - start[k]).max() > 1e-4, f"{k} did not move: the test would not see a wrong gradient"
    log = [k for k in ref if k.startswith(f"{kind}_log/") and not k.endswith("had_loss")]
    for k in log:                  # the logged figures: global, the same on both ranks (NaN: GRPO's KL, no update)
        assert np.array_equal(r0[k], r1[k], equal_nan=True), k
        assert np.allclose(r0[k], ref[k], rtol=0, atol=1e-10, equal_nan=True), f"{k}: {r0[k]} vs {ref[k]}"
    alone = ref[f"{kind}_log/had_loss"]
    ranks = np.stack([r0[f"{kind}_log/had_loss"], r1[f"{kind}_log/had_loss"]])
    assert np.array_equal(ranks.any(0), alone)
    # a rank without a loss while the other had one: it joined the Allreduce with a zero share
    assert (alone & ~ranks.all(0)).any() and ranks.all(0).any()
    if kind == "grpo":             # and steps where no group had signal: no update on any rank
        assert (~alone).any() and np.array_equal(alone, ref["grpo_log/grad_norm"] > 0)


# ----------------------------------------------------------------------------------------
# faults through the CLI


def tiny_args(work: Path, data: Path, steps: int, *extra) -> list[str]:
    return ["--config", "tiny", "--stage", "pretrain", f"--pretrain.max_steps={steps}", "--pretrain.log_every=1",
            "--model.dropout=0.1", "--data-dir", data, "--ckpt-dir", work / "ckpt", "--runs-dir", work / "runs",
            "--run-id", "r", "--no-progress", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("dp") / "tiny data")


def seeded_ckpt(work: Path) -> dict:
    """A checkpoint dir holding an earlier run's file: a failed run must leave it as it was."""
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "vocab.json").write_text('{"earlier": "run"}', encoding="utf-8")
    return tree_digest(work / "ckpt")


@needs_mpi
def test_failing_rank_brings_every_rank_down_with_one_line(tmp_path, data_dir):
    """Rank 1 reads a corrupt file while rank 0, with good data, waits for it in the weights'
    broadcast; rank 1 builds another model than rank 0; a NaN (every rank at the same step, after
    the Allreduce) exits 3 as one process does. Each: one error line, nothing written."""
    bad = tmp_path / "bad data"
    shutil.copytree(data_dir, bad)
    (bad / "pretrain_data.txt").write_bytes((data_dir / "pretrain_data.txt").read_bytes()[:999] + b"\xff\xfe")
    works = {k: tmp_path / k for k in ("shard", "layout", "nan")}
    before = {k: seeded_ckpt(w) for k, w in works.items()}
    py = [sys.executable, ROOT / "train.py"]
    cmds = {"shard": [MPIEXEC, "-n", "1", *map(str, py + tiny_args(works["shard"], data_dir, 5)), ":",
                      "-n", "1", *map(str, py + tiny_args(works["shard"], bad, 5))],
            "layout": [MPIEXEC, "-n", "1", *map(str, py + tiny_args(works["layout"], data_dir, 5)), ":",
                       "-n", "1", *map(str, py + tiny_args(works["layout"], data_dir, 5, "--model.n_embd=32"))],
            "nan": mpi_cmd(2, *train_cmd(*tiny_args(works["nan"], data_dir, 10, "--pretrain.lr=1e30")))}
    t0 = time.monotonic()
    res = run_many(cmds, timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    for k, code, fragment in (("shard", 2, str(bad / "pretrain_data.txt")), ("nan", 3, "non-finite"),
                              ("layout", 2, "rank 1 built other parameters than rank 0")):
        r = res[k]
        assert r.returncode == code, f"{k}: exit {r.returncode}\n{r.stderr}"
        errors = [l for l in error_lines(r.stderr) if "error" in l.lower()]
        assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], f"{k}:\n{r.stderr}"
        assert "Traceback" not in r.stderr
        assert tree_digest(works[k] / "ckpt") == before[k], f"{k}: the checkpoint dir changed"


@needs_mpi
def test_ctrl_c_under_mpiexec_then_resume_is_bit_identical(tmp_path, data_dir):
    steps = 60
    ref_work, work = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen(mpi_cmd(2, *train_cmd(*tiny_args(ref_work, data_dir, steps))), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT)
    try:
        metrics = work / "runs" / "r" / "metrics.jsonl"
        proc = subprocess.Popen(mpi_cmd(2, *train_cmd(*tiny_args(work, data_dir, steps))), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                                env=ENV, cwd=ROOT)
        deadline = time.monotonic() + TIMEOUT
        while not (metrics.exists() and '"loss"' in metrics.read_text(encoding="utf-8")):
            assert proc.poll() is None, f"mpiexec ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)                  # Hydra passes it on to every rank
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 130, f"exit {proc.returncode}\n{err}"
        m = re.findall(r"stopped by \w+ after step (\d+)", err)
        assert len(m) == 1 and 0 < int(m[0]) < steps, err       # printed once (rank 0)
        ckpt = work / "ckpt"
        assert (ckpt / "pretrain_last.safetensors").exists() and not (ckpt / "pretrain_final.safetensors").exists()
        info = json.loads(load_file_meta(ckpt / "pretrain_last.state.safetensors")["info"])
        assert len(info["engine_rng_ranks"]) == 2                 # each rank's dropout RNG

        # the printed command, pasted as is, finishes the stage under mpiexec -n 2
        line = next(l.strip() for l in err.splitlines() if l.strip().startswith("mpiexec -n 2 python train.py"))
        cmd = shlex.split(line)
        assert cmd[-1] == "--resume"
        res = run(mpi_cmd(2, sys.executable, ROOT / "train.py", *cmd[5:]))
        assert res.returncode == 0, res.stderr
        rows = [json.loads(l) for l in metrics.read_text(encoding="utf-8").splitlines()]
        assert rows[-1]["step"] == steps and not (ckpt / "pretrain_last.safetensors").exists()

        _, ref_err = reference.communicate(timeout=TIMEOUT)
        assert reference.returncode == 0, ref_err
        got = load_file(str(ckpt / "pretrain_final.safetensors"))
        want = load_file(str(ref_work / "ckpt" / "pretrain_final.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k]), f"{k} differs by {np.abs(got[k] - want[k]).max()}"
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


@needs_mpi
def test_every_stage_through_the_cli_under_mpiexec(tmp_path, data_dir):
    """--stage all, tiny, under mpiexec -n 2: the evaluations and RLHF's chat guard (every rank)
    and the split steps finish without a hang; rank 0 alone writes checkpoints, one log row a step."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    for name, n in (("rlvf_data.json", 12), ("reward_data.json", 16), ("reward_val.json", 4), ("chat_eval.json", 40)):
        items = json.loads((BUNDLED / name).read_text(encoding="utf-8"))[:n]
        (data / name).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    res = run(mpi_cmd(2, *train_cmd("--config", "tiny", "--stage", "all", "--pretrain.max_steps=4", "--sft.max_steps=4",
                                    "--reward.max_steps=4", "--data-dir", data, "--ckpt-dir", tmp_path / "ckpt",
                                    "--runs-dir", tmp_path / "runs", "--run-id", "r", "--no-progress")))
    assert res.returncode == 0, res.stderr
    for stage in ("rlhf", "rlvf"):
        assert (tmp_path / "ckpt" / f"{stage}_final.safetensors").exists()
        assert not (tmp_path / "ckpt" / f"{stage}_last.safetensors").exists()
    rows = [json.loads(l) for l in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for stage, key, n in (("rlvf", "reward", TINY_RLVF["num_iterations"]),
                          ("rlhf", "pg_loss", TINY_RLHF["num_episodes"] * RLHFConfig(**TINY_RLHF).steps_per_episode)):
        steps = [r["step"] for r in rows if r["stage"] == stage and key in r]
        assert steps == list(range(1, n + 1)), f"{stage}: {steps}"            # once each: rank 0 alone logs
    assert {"rlhf", "rlvf"} <= set(json.loads((tmp_path / "runs" / "r" / "summary.json").read_text(encoding="utf-8")))


def test_a_stage_that_cannot_split_is_refused_under_mpiexec(monkeypatch):
    import train
    from tinygrad_llm.stages.common import Stage
    assert all(s.data_parallel for s in train.STAGES.values())        # today every stage splits
    monkeypatch.setitem(train.STAGES, "solo", Stage("solo", (), "solo_final", object, {}, run=None))
    train.check_data_parallel(["pretrain", "solo"], 1)
    with pytest.raises(train.UsageError, match="run them without mpiexec"):
        train.check_data_parallel(["pretrain", "solo"], 2)


def load_file_meta(path: Path) -> dict:
    from tinygrad_llm.checkpoint import read_metadata
    return read_metadata(path)
