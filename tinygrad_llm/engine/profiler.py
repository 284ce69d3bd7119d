"""The op profiler: per-op call counts and forward / backward wall time.

    with engine.profile() as prof:
        ...                        # forward and backward passes
    print(prof.table())

or TINYGRAD_LLM_PROFILE=1 (a table is printed at exit). An op's name is its function's name
(`tensor.op`); forward time is counted where the op is called (`run_forward`), backward time
where `Tensor.backward()` runs the node's closure (`run_backward`). Nothing here knows Tensor.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections import defaultdict

_current: "Profiler | None" = None     # the profiler switched on, if any


class Profiler:
    """Per-op call counts and total forward / backward wall time, in seconds."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.fwd = defaultdict(float)
        self.bwd = defaultdict(float)
        self.bwd_calls = defaultdict(int)

    def rows(self):
        """[(op, calls, fwd_s, bwd_s)] sorted by total time, descending."""
        ops = set(self.fwd) | set(self.bwd)
        rows = [(op, self.calls[op], self.fwd[op], self.bwd[op]) for op in ops]
        return sorted(rows, key=lambda r: -(r[2] + r[3]))

    def table(self, top: int | None = None) -> str:
        rows = self.rows()
        total = sum(r[2] + r[3] for r in rows) or 1.0
        lines = [f"{'op':<22}{'calls':>8}{'fwd ms':>11}{'bwd ms':>11}{'share':>8}"]
        for op, n, f, b in rows[:top]:
            lines.append(f"{op:<22}{n:>8}{f * 1e3:>11.1f}{b * 1e3:>11.1f}{(f + b) / total:>8.1%}")
        return "\n".join(lines)


@contextlib.contextmanager
def profile():
    """`with profile() as prof: ...; print(prof.table())`"""
    global _current
    prev, _current = _current, Profiler()
    try:
        yield _current
    finally:
        _current = prev


def run_forward(name: str, fn, args, kwargs):
    """fn(*args, **kwargs), its time and one call counted under `name` while profiling."""
    prof = _current
    if prof is None:
        return fn(*args, **kwargs)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    prof.fwd[name] += time.perf_counter() - t0
    prof.calls[name] += 1
    return out


def run_backward(node) -> None:
    """node._backward(node.grad), its time counted under the node's op name while profiling."""
    prof = _current
    if prof is None:
        node._backward(node.grad)
        return
    t0 = time.perf_counter()
    node._backward(node.grad)
    prof.bwd[node._op] += time.perf_counter() - t0


if os.environ.get("TINYGRAD_LLM_PROFILE"):
    _current = Profiler()
    atexit.register(lambda: print("\n[tinygrad_llm profiler]\n" + _current.table()))
