"""Thread settings for BLAS (via threadpoolctl) and Numba.

Default: 2 threads on a machine with >= 2 cores (see README "Threads": OpenBLAS threads
slow down badly when another busy process shares the cores; pass --threads 1 then)."""
from __future__ import annotations

import os


def configure_threads(n: int | None = None) -> int:
    env = os.environ.get("TINYGRAD_LLM_THREADS")
    n = n or (int(env) if env else min(2, os.cpu_count() or 1))
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return n
