"""Shared by the tests that drive the real CLIs as subprocesses (test_cli, test_faults,
test_inspect): a tiny data directory, running train.py / inference.py, and hashing a
directory to prove a failed run touched nothing."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data"
# every subprocess: one BLAS/Numba thread (bit-reproducible and kind to a loaded 2-core box)
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TINYGRAD_LLM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONIOENCODING": "utf-8"}
# a subprocess that takes longer than this is hung, not slow
TIMEOUT = 300


def write_tiny_data(d: Path, pretrain_chars: int = 4000, n_sft: int = 40) -> Path:
    """A few KB of the bundled Chinese prose and a few dozen SFT conversations, with held-out
    files so nothing depends on the 10% split."""
    d.mkdir(parents=True, exist_ok=True)
    prose = (BUNDLED / "pretrain_data.txt").read_text(encoding="utf-8")
    (d / "pretrain_data.txt").write_text(prose[:pretrain_chars], encoding="utf-8")
    (d / "pretrain_val.txt").write_text(prose[pretrain_chars:pretrain_chars + 800], encoding="utf-8")
    sft = json.loads((BUNDLED / "sft_data.json").read_text(encoding="utf-8"))
    sft_val = json.loads((BUNDLED / "sft_val.json").read_text(encoding="utf-8"))
    (d / "sft_data.json").write_text(json.dumps(sft[:n_sft], ensure_ascii=False, indent=1), encoding="utf-8")
    (d / "sft_val.json").write_text(json.dumps(sft_val[:6], ensure_ascii=False, indent=1), encoding="utf-8")
    return d


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *map(str, args)]


def inference_cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "inference.py"), *map(str, args)]


def run(cmd, stdin: str | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=ENV, cwd=ROOT,
                          timeout=timeout, **feed)


def run_many(cmds: dict, timeout: float = TIMEOUT, parallel: int = 4) -> dict:
    """Run the commands `parallel` at a time (most of each run is interpreter + Numba start-up,
    which overlaps well): {key: CompletedProcess}. A value may be (cmd, stdin text)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(spec):
        cmd, stdin = spec if isinstance(spec, tuple) else (spec, None)
        return run(cmd, stdin=stdin, timeout=timeout)

    with ThreadPoolExecutor(parallel) as pool:
        futures = {k: pool.submit(one, spec) for k, spec in cmds.items()}
        return {k: f.result() for k, f in futures.items()}


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip()]


def assert_one_line_error(res, code: int = 2, *fragments: str) -> str:
    """Exit `code` with exactly one non-empty stderr line, 'error: ...', holding `fragments`."""
    lines = error_lines(res.stderr)
    assert res.returncode == code, f"exit {res.returncode}, stderr:\n{res.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def tree_digest(d: Path) -> dict:
    """{relative path: sha256} of every file under d (to prove a run left them untouched)."""
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}
