"""Thread settings for BLAS (via threadpoolctl) and Numba, the split matmuls of linear()
(`mm`) and of the attention (`bmm`), and `single_thread` for decoding.

Default ("auto"): up to 2 threads, dropping to 1 while other processes keep a core busy
(checked every few seconds from /proc/stat, see `adapt_threads`); `--threads N` or
TINYGRAD_LLM_THREADS=N fixes the count.
OpenBLAS threads synchronise at every call and spin while they wait: when another busy
process holds one of the two cores, each call can wait a whole scheduler time slice. A
large GEMM pays that once; the attention's batched matmul is B*NH small GEMMs and paid it
B*NH times (measured: 10x slower steps under load). So `bmm` runs those slices with BLAS
at one thread, split across `threads` Python workers (NumPy releases the GIL in BLAS):
one synchronisation per op instead of one per slice."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

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
    decoding: one token's ops are tiny, and every parallel region of 2 BLAS / Numba threads
    pays a thread wake-up that costs more than the work (measured on the 2-core machine, quiet:
    batch-1 decode 2.0 ms/token at 1 thread, 20 ms at 2; bench/generate.py --threads 1,2)."""
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


def bmm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a (..., n, k) @ b (..., k, m) with equal leading dims, e.g. (B, NH, T, hs) @ (B, NH, hs, T).
    out: where to write the result (..., n, m), e.g. a block of rows of a larger array."""
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
    """2-D a (M, K) @ b (K, N) (+ bias (N,)), split across `threads` Python workers (BLAS at one
    thread each) along the longer of M and N (a few rows against a transposed weight: one GEMM
    in the faster orientation, see FEW_ROWS). Alone, a GEMM at the model's shapes runs about as
    fast on OpenBLAS's own two threads (~190 GFLOP/s, ~100 at one); inside training steps, timed
    interleaved, the two one-thread halves were 6-11% faster (8x256: 3,424 vs 3,222 tokens/s;
    16x256: 3,621 vs 3,273; bench/README.md). Re-measured with freed memory kept (see
    tinygrad_llm/__init__.py): 16x256 4,407 vs 4,084, 8x256 3,847 vs 3,972 (within noise).
    Each worker adds the bias to its own part, in parallel and while the part is fresh in cache
    (the forward GEMMs of one 16x256 layer, interleaved: 44.7 -> 42.0 ms)."""
    M, N = a.shape[0], b.shape[1]
    if 1 < M <= FEW_ROWS and b.T.flags.c_contiguous:
        out = np.ascontiguousarray((b.T @ a.T).T)
    elif _threads <= 1 or 2 * M * N * a.shape[1] < PAR_MIN_FLOPS:
        out = a @ b
    else:
        out = np.empty((M, N), np.result_type(a, b))
        if M >= N:
            def work(s):
                np.matmul(a[s], b, out=out[s])
                if bias is not None: out[s] += bias
        else:
            def work(s):
                np.matmul(a, b[:, s], out=out[:, s])
                if bias is not None: out[:, s] += bias[s]
        _in_parts(M if M >= N else N, work)
        return out
    if bias is not None:
        out += bias
    return out


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
