"""Helpers shared by the bench scripts: threads, interleaved timing with medians, the machine's
float32 matmul ceiling, tables and JSON under runs/bench/.

Timing rule (DESIGN.md section 4): the things compared run in the same process, interleaved
round by round (the order rotates each round, so no variant always runs first), and each is
reported as the median of its repeats. Within a round each variant runs twice back to back and
only the second run is timed: a timed run then always follows a run of itself, as a training
step follows a step. Timing every run in a rotated cycle let the order bias the result, since a
cyclic rotation keeps each variant's predecessor fixed: two identical training steps read 597
and 544 ms, the slower one always right after the 2048x256@256x6400 GEMM that flushes the
caches (bench/README.md, "Interleaving"). The load average is
recorded beside every result: on a 2-core machine shared with another busy process, absolute
numbers mean little, ratios measured interleaved still mean something.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "runs", "bench")
if ROOT not in sys.path:                     # `python bench/NAME.py` from anywhere
    sys.path.insert(0, ROOT)

# The GEMMs that define "peak" for MFU: the mini model's c_fc (N=2048 rows, C=256 -> 4C) and
# its tied lm_head (C=256 -> V=6400). Float32, the training dtype.
GEMM_SHAPES = ((2048, 256, 1024), (2048, 256, 6400))


def setup_threads(n: int | None) -> int:
    """BLAS (threadpoolctl) and Numba threads, the way train.py sets them."""
    from tinygrad_llm.runtime import configure_threads
    return configure_threads(n)


def loadavg() -> tuple:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:                          # not on every platform
        return (float("nan"),) * 3


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def interleave(variants: dict, repeats: int, warmup: int = 1, settle: int = 1) -> dict:
    """variants {name: thunk}. Warm each up `warmup` times, then `repeats` rounds in which every
    variant, in an order rotated by one each round, runs `settle` untimed times and then once
    timed, so that what ran just before a timed run is the variant itself, never a neighbour
    of the order. -> {name: [seconds, ...]}."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            for _ in range(settle):
                variants[n]()
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def gemm_thunks(shapes=GEMM_SHAPES, dtype="float32") -> dict:
    """{label: (thunk, flops)} for (M, K) @ (K, N) GEMMs on random data."""
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    for M, Kd, N in shapes:
        a = rng.standard_normal((M, Kd)).astype(dtype)
        b = rng.standard_normal((Kd, N)).astype(dtype)
        c = np.empty((M, N), dtype)
        out[f"gemm {M}x{Kd}@{Kd}x{N}"] = (lambda a=a, b=b, c=c: np.matmul(a, b, out=c), 2.0 * M * Kd * N)
    return out


def table(headers, rows, fmts=None, left=(0,)) -> str:
    """Plain text table; fmts: one format spec per column (None = str); `left`: the column
    indices aligned left (the rest align right)."""
    fmts = fmts or [None] * len(headers)
    cells = [list(map(str, headers))] + [[format(v, f) if f and isinstance(v, (int, float)) else str(v)
                                           for v, f in zip(r, fmts)] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("-" * max(len(x) for x in lines))
    return "\n".join(lines)


def blas_facts() -> dict:
    """The BLAS libraries loaded (threadpoolctl): library and version, the kernel each picked for
    this CPU (OpenBLAS: "Haswell", "SkylakeX", ...; OPENBLAS_CORETYPE overrides its choice), its
    thread count right now and where it comes from (NumPy's is in numpy.libs), plus Numba's
    threads. DESIGN.md section 4: every bench says which kernel ran."""
    import os
    facts = dict(openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", "unset"), blas=[])
    try:
        from threadpoolctl import threadpool_info
        for i in threadpool_info():
            if i.get("user_api") == "blas":
                facts["blas"].append(dict(library=f"{i.get('internal_api')} {i.get('version')}",
                                          kernel=i.get("architecture"), threads=i.get("num_threads"),
                                          owner=os.path.basename(os.path.dirname(i.get("filepath", "")))))
    except ImportError:
        pass
    try:
        import numba
        facts.update(numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    return facts


def cache_sizes() -> str:
    """'L2 1024K, L3 16384K' for CPU 0 (Linux sysfs), or 'the caches' where unknown."""
    base, out = "/sys/devices/system/cpu/cpu0/cache", []
    try:
        for d in sorted(os.listdir(base)):
            with open(f"{base}/{d}/level") as f1, open(f"{base}/{d}/size") as f2, open(f"{base}/{d}/type") as f3:
                level, size, kind = f1.read().strip(), f2.read().strip(), f3.read().strip()
            if kind != "Instruction" and level in ("2", "3"):
                out.append(f"L{level} {size}")
    except OSError:
        pass
    return ", ".join(out) or "the caches"


def blas_line() -> str:
    """One line for a table's heading, e.g. 'BLAS openblas 0.3.27 (numpy.libs), kernel Haswell,
    2 threads; OPENBLAS_CORETYPE=Haswell; 2 Numba threads'."""
    f = blas_facts()
    libs = "; ".join(f"{b['library']} ({b['owner']}), kernel {b['kernel']}, {b['threads']} threads"
                     for b in f["blas"]) or "none found by threadpoolctl"
    return f"BLAS {libs}; OPENBLAS_CORETYPE={f['openblas_coretype']}; {f.get('numba_threads', '?')} Numba threads"


def meta(threads: int | None = None, **extra) -> dict:
    """Machine and library facts stored with each result."""
    import numpy as np
    m = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), python=platform.python_version(), numpy=np.__version__,
             cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), threads=threads)
    try:
        import numba
        m.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
        m["blas"] = [(i.get("internal_api"), i.get("version"), i.get("num_threads")) for i in threadpool_info()]
    except ImportError:
        pass
    m.update(blas_facts=blas_facts(), **extra)
    return m


def write_json(name: str, payload: dict) -> str:
    """runs/bench/<name>.json (directories created); returns the path."""
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False, default=float)
    return path
