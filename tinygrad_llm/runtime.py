"""CPU tuning, all of it: process settings made at import, the thread count, the threaded GEMMs
of linear() (`mm`) and of the attention (`bmm`), and one-thread decoding. What each buys, as
measured in bench/README.md on the 2-core VM (tokens/s of a mini training step unless said):

  setting                              what it buys
  OMP_WAIT_POLICY=PASSIVE              Numba's OpenMP threads sleep after a kernel instead of
    (set at import unless set)         spinning through the next GEMM: 8x256 2,770 -> ~3,600
  glibc keeps freed memory             no mmap per large block, so a step's activations are not
    (mallopt at import)                faulted in again: 16x256 3,457 / 3,834 -> 4,299 / 4,391,
                                       peak memory unchanged; TINYGRAD_LLM_KEEP_MEMORY=0 turns it off
  bmm: per-head GEMMs on one-thread    one BLAS thread synchronisation per op, not one per head
    BLAS, split across workers         slice: under load the (8,4,256,64) batched attention matmul
                                       took 1,015 ms on 2-thread BLAS, 29 ms on one thread
  single_thread() for decoding one     batch 1: 20.1 -> 2.0 ms/token (before passive waits);
    row                                today quiet, vocab 2,950: 1,126 -> 1,251 tokens/s. From
                                       2 rows on decoding keeps the threads: batch 16 1.13x,
                                       batch 128 (RL rollouts) 1.47x the one-thread speed
  mm: few rows as (W @ x.T).T          16 rows x the 6,400-row lm_head: 1.65 -> 0.72 ms; batch-16
                                       decoding 0.65x -> 0.85x PyTorch's speed
  mm: a GEMM split in two one-thread   16x256: 4,084 -> 4,407 and 3,849 -> 4,084 (interleaved);
    halves, one per worker             8x256: 3,972 -> 3,847, a draw
  threads "auto" (adapt_threads)       2 threads, 1 while other processes keep > 0.4 core busy,
                                       checked every 3 s from /proc/stat: under load 6-8 a
                                       2-thread step ran 201 tokens/s against 1,114 at 1 thread
                                       (measured before bmm and passive waits existed); the one
                                       switch is --threads N / TINYGRAD_LLM_THREADS=N: a fixed count

Removed as paying nothing measurable: GOMP_SPINCOUNT=0 (libgomp already spins 0 times under
OMP_WAIT_POLICY=PASSIVE, and the setting overrode a user's OMP_WAIT_POLICY=ACTIVE) and adding
linear()'s bias per worker part (~1% of a step, below what the bench resolves).

The process settings are made when this module is imported, which `import tinygrad_llm` does
first: before any kernel starts OpenMP or any step allocates. Nothing here imports the rest of
the package.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

# ----------------------------------------------------------------------------------------
# process settings, made once at import

# Read when OpenMP starts (the first parallel kernel or thread setting) in this process; an
# explicit setting wins. Numba's workqueue layer would sleep too, but costs 70 us per kernel
# launch against OpenMP's 5 us, which decoding cannot afford. bench/compare_torch.py runs
# PyTorch in a process of its own, which keeps PyTorch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default every block over 128 kB-32 MB is its own mmap, returned to the OS on free; a
    training step allocates and frees hundreds of MB (the 16x256 logits alone are 105 MB), so
    every step first-touches them again: ~35,000 page faults per 16x256 step. With mmap off and
    the heap never trimmed, freed blocks are reused. Skipped off glibc, when the user set any
    MALLOC_* variable, or with TINYGRAD_LLM_KEEP_MEMORY=0 (glibc's default, for comparison)."""
    if (sys.platform != "linux" or os.environ.get("TINYGRAD_LLM_KEEP_MEMORY") == "0"
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                      # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


KEEPS_FREED_MEMORY = _keep_freed_memory()


# ----------------------------------------------------------------------------------------
# threads: BLAS and Numba at one count, and one-thread blocks

_threads = 1
_pool: ThreadPoolExecutor | None = None
_blas = None        # a cached threadpoolctl controller (building one scans the loaded libraries)
_auto = None        # {"max": n, "t": wall, "busy": jiffies, "ours": cpu s} when the count adapts
CHECK_EVERY_S = 3.0
OTHERS_BUSY = 0.4   # cores used by other processes above which 2 threads lose (bench/README.md)


def configure_threads(n: int | None = None) -> int:
    """Set BLAS and Numba to n threads. n None: TINYGRAD_LLM_THREADS if set, else "auto"
    (min(2, cores), adapted to the machine's load by adapt_threads)."""
    global _auto
    env = os.environ.get("TINYGRAD_LLM_THREADS")
    if n is None and not env:
        _auto = {"max": min(2, os.cpu_count() or 1), "t": 0.0}
        return _set_threads(_auto["max"])
    _auto = None
    return _set_threads(n or int(env))


def _set_threads(n: int) -> int:
    global _threads, _pool, _blas
    from threadpoolctl import ThreadpoolController
    if _blas is None:
        _blas = ThreadpoolController()
    _blas.limit(limits=n, user_api="blas")
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    _threads = n
    if n > 1 and (_pool is None or _pool._max_workers != n):
        _pool = ThreadPoolExecutor(n, thread_name_prefix="bmm")
    return n


@contextmanager
def single_thread():
    """Run a block with BLAS, Numba and bmm at one thread, then restore the count. Used for
    decoding a single row: one token's ops are tiny, and every parallel region of 2 BLAS / Numba
    threads pays a thread wake-up that costs more than the work (bench/README.md, "Decoding on
    both cores": batch 1 at vocab 2,950, 1,251 tokens/s at 1 thread, 1,126 at 2)."""
    n, auto = _threads, _auto
    if n <= 1:
        yield
        return
    _set_threads(1)
    try:
        yield
    finally:
        _set_threads(n)
        if auto is not None:
            auto["t"] = 0.0        # restart load sampling: the last sample saw our 1-thread span


# ----------------------------------------------------------------------------------------
# the thread count follows the machine's load ("auto")


def _cpu_busy_jiffies() -> int:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals) - vals[3] - vals[4]            # all minus idle and iowait


def adapt_threads() -> int:
    """In "auto" mode, every CHECK_EVERY_S seconds: use 1 thread while other processes keep
    more than OTHERS_BUSY of a core busy, else the maximum. Called by the training loops and
    generation; cheap when not due. Returns the thread count in use."""
    if _auto is None or _auto["max"] < 2:
        return _threads
    now = time.perf_counter()
    if now - _auto["t"] < CHECK_EVERY_S:
        return _threads
    try:
        busy = _cpu_busy_jiffies() / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):     # no /proc (not Linux): keep the count
        return _threads
    t = os.times()
    ours = t.user + t.system
    if _auto["t"]:
        others = ((busy - _auto["busy"]) - (ours - _auto["ours"])) / (now - _auto["t"])
        want = 1 if others > OTHERS_BUSY else _auto["max"]
        if want != _threads:
            _set_threads(want)
    _auto.update(t=now, busy=busy, ours=ours)
    return _threads


# ----------------------------------------------------------------------------------------
# GEMMs split across worker threads, each on one-thread BLAS (NumPy releases the GIL in BLAS)


def bmm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a (..., n, k) @ b (..., k, m) with equal leading dims, e.g. (B, NH, T, hs) @ (B, NH, hs, T):
    the B*NH small GEMMs in `threads` parts, so BLAS threads synchronise once per op, not once
    per slice. out: where to write the result (..., n, m), e.g. a block of rows of a larger array."""
    lead = a.shape[:-2]
    N = int(np.prod(lead)) if lead else 1
    if _threads <= 1 or N < 2 or a.shape[:-2] != b.shape[:-2]:
        return np.matmul(a, b, out=out)
    A = a.reshape(N, *a.shape[-2:])                      # views: leading dims are contiguous
    Bm = b.reshape(N, *b.shape[-2:])
    if out is None:
        out = np.empty((*lead, A.shape[1], Bm.shape[2]), np.result_type(a, b))
    O = out.reshape(N, A.shape[1], Bm.shape[2])
    if not np.may_share_memory(O, out):                  # reshape had to copy: writes would be lost
        raise ValueError(f"bmm: out {out.shape} with strides {out.strides} cannot be viewed as {O.shape}")
    _in_parts(N, lambda s: np.matmul(A[s], Bm[s], out=O[s]))
    return out


def _in_parts(n: int, work) -> None:
    """work(slice) over min(threads, n) contiguous parts of range(n), one per worker thread,
    each on one-thread BLAS (NumPy releases the GIL inside BLAS)."""
    cuts = np.linspace(0, n, min(_threads, n) + 1).astype(int)
    with _blas.limit(limits=1, user_api="blas"):
        list(_pool.map(lambda i: work(slice(cuts[i], cuts[i + 1])), range(len(cuts) - 1)))


PAR_MIN_FLOPS = 1 << 24    # below ~16 MFLOP a GEMM is too short to be worth a thread hand-off
# x (M, K) @ W.T with few rows (decoding a batch: M = batch size) runs 1.3-2.5x faster in OpenBLAS
# as (W @ x.T).T, e.g. 16 x 256 @ 256 x 6400: 1.65 ms vs 0.72 ms at one thread (M = 2..64); from
# M = 128 on the two are within 10% and the copy back to C order eats the gain.
FEW_ROWS = 64


def mm(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """2-D a (M, K) @ b (K, N) (+ bias (N,)): a few rows against a transposed weight as one GEMM
    in the faster orientation (FEW_ROWS); a large GEMM split along the longer of M and N into
    `threads` parts, one per Python worker on one-thread BLAS; else one plain GEMM."""
    M, N = a.shape[0], b.shape[1]
    if 1 < M <= FEW_ROWS and b.T.flags.c_contiguous:
        out = np.ascontiguousarray((b.T @ a.T).T)
    elif _threads <= 1 or 2 * M * N * a.shape[1] < PAR_MIN_FLOPS:
        out = a @ b
    elif M >= N:
        out = np.empty((M, N), np.result_type(a, b))
        _in_parts(M, lambda s: np.matmul(a[s], b, out=out[s]))
    else:
        out = np.empty((M, N), np.result_type(a, b))
        _in_parts(N, lambda s: np.matmul(a, b[:, s], out=out[:, s]))
    if bias is not None:
        out += bias
    return out
