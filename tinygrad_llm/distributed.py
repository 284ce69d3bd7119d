"""Data parallel training over MPI (mpi4py on MPICH, the optional extra `mpi`), the way llm.c
scales with `mpirun`: every rank holds the whole model, takes its own rows of every global
batch, and one in-place Allreduce per step sums the gradients, so every rank applies the same
AdamW update to the same weights.

    mpiexec -n 2 python train.py --stage pretrain,sft

`world()` is the one entry point. Under `mpiexec -n N` (N > 1, read from the process manager's
environment: PMI_SIZE for MPICH's Hydra, OMPI_COMM_WORLD_SIZE for Open MPI) it imports mpi4py
and returns an `MPIWorld`; otherwise a `SingleProcess` whose size is 1, and nothing imports MPI.

How a step stays equal to one process running the same global batch (DESIGN.md section 2):
every rank draws the *whole* global batch from the same RNG (so the data order and the batch
do not depend on N, and the RNG a checkpoint stores is every rank's), then keeps its rows
(`shard_rows`). A loss that is a mean over the batch (over the masked tokens for SFT) is the
global mean only when each rank's gradient is weighted by its share of the global denominator:
the stage's shard function returns that share, `GradReducer` scales the gradients by it while
packing them into the flat buffer, and the Allreduce's sum is then the global mean's gradient.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .config import ConfigError

# a rank other than 0 waits this long before printing its error and aborting the job: when the
# error is one every rank hits (a bad file they all read), rank 0's abort ends the job first and
# the message is printed once; a rank that alone fails still brings the job down a second later
ABORT_GRACE_S = 1.0
# and after printing it, this long before MPI_Abort: the message goes through MPICH's proxy to
# mpiexec's stderr, and an abort that kills the proxy first loses it (seen once in CI: the job
# ended with the right exit code and no error line)
ABORT_FLUSH_S = 0.3


def launched_size() -> int:
    """The number of ranks the MPI launcher started (1 when not under mpiexec)."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


class SingleProcess:
    """One process: rank 0 of 1; every collective is the identity."""
    rank, size = 0, 1

    @property
    def is_main(self) -> bool:
        return True

    def barrier(self) -> None:
        pass

    def gather(self, obj) -> list:
        return [obj]


class MPIWorld(SingleProcess):
    """N processes under mpiexec (mpi4py's COMM_WORLD)."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise SystemExit(f"error: started by mpiexec with {launched_size()} processes, but mpi4py is not "
                             "installed (pip install -e '.[mpi]')") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.comm.Barrier()

    def gather(self, obj) -> list:
        """Every rank's obj (a small picklable value), on every rank."""
        return self.comm.allgather(obj)

    def broadcast_params(self, named) -> None:
        """Rank 0's weights to every rank, in place (at start and after a resume), after checking
        that every rank built the same parameters (names, shapes, dtypes)."""
        layout = [(n, p.data.shape, str(p.data.dtype)) for n, p in named]
        ref = self.comm.bcast(layout, root=0)
        if layout != ref:
            mine, its = next(((a, b) for a, b in zip(layout, ref) if a != b), (len(layout), len(ref)))
            raise ConfigError(f"rank {self.rank} built other parameters than rank 0 ({mine} vs {its}): every "
                              "rank needs the same config, data and checkpoints")
        for _, p in named:
            self.comm.Bcast(p.data, root=0)              # in place; parameters are C-contiguous

    def abort(self, message: str, code: int) -> None:
        """Print `message` once and end every rank with exit code `code` (MPI_Abort): a rank that
        raised must not leave the others waiting forever in the next Allreduce."""
        if self.rank != 0:
            time.sleep(ABORT_GRACE_S)
        print(message, file=sys.stderr, flush=True)
        time.sleep(ABORT_FLUSH_S)
        # MPICH prints its own "Abort(code) on node ..." line; the message above is the one that counts
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        self.comm.Abort(code)


_WORLD = None


def world():
    """The process group this process belongs to (created on first use)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIWorld() if launched_size() > 1 else SingleProcess()
    return _WORLD


# ----------------------------------------------------------------------------------------
# sharding a global batch


def row_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of n that `rank` of `size` takes: contiguous, sizes differing by at most 1."""
    return rank * n // size, (rank + 1) * n // size


def pair_rows(n_pairs: int, rank: int, size: int) -> tuple[np.ndarray, float]:
    """For a batch of n_pairs preference pairs laid out as the chosen rows then the rejected rows
    (reward model, DPO): -> (the row indices of this rank's pairs, both halves; its share of a
    mean over pairs)."""
    lo, hi = row_range(n_pairs, rank, size)
    return np.r_[lo:hi, n_pairs + lo:n_pairs + hi], (hi - lo) / n_pairs


def shard_rows(batch: tuple, rank: int, size: int, count=None) -> tuple[tuple, float]:
    """batch: arrays that all have the global batch's B rows -> (this rank's rows of each, its share
    of the loss's denominator). count (B,): what each row adds to the denominator of the loss's
    mean (its loss-mask tokens for SFT); None: rows count alike (a mean over rows or tokens of
    equal-length rows)."""
    B = len(batch[0])
    lo, hi = row_range(B, rank, size)
    share = (hi - lo) / B if count is None else float(np.sum(count[lo:hi])) / max(float(np.sum(count)), 1e-12)
    return tuple(a[lo:hi] for a in batch), share


def concat_ranks(world, **arrays) -> dict:
    """Each rank's per-row arrays -> the same arrays of the whole global batch, on every rank
    (concatenated in rank order, so rows stay in the order row_range gave them out). The RL
    stages sample on each rank their part and need whole-batch figures (GRPO's curriculum, means)."""
    parts = world.gather({k: np.asarray(v) for k, v in arrays.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


# ----------------------------------------------------------------------------------------
# the one Allreduce of a step


class GradReducer:
    """Packs every gradient, scaled by this rank's share, into one preallocated flat buffer (the
    parameters' dtype: float32 in training) and sums it over the ranks with one in-place Allreduce.

    Buffer layout: [gradients | one has-grad flag per parameter | loss | metrics | stop flag].
    The tail rides along in the same call: the loss and the metrics (means over the batch, so
    weighted by the share like the gradients; "tokens" is a count and is summed as is), and
    whether any rank was asked to stop (Ctrl-C / SIGTERM), so every rank stops after the same step.
    A parameter no rank has a gradient for keeps grad None (AdamW skips it, as in one process)."""

    def __init__(self, world, params):
        self.world, self.params = world, list(params)
        dtype = {p.data.dtype for p in self.params}
        if len(dtype) != 1:
            raise ValueError(f"GradReducer: parameters of several dtypes {sorted(map(str, dtype))}")
        self.dtype = dtype.pop()
        self.offsets = np.cumsum([0] + [p.data.size for p in self.params])
        self.n_grad = int(self.offsets[-1])
        self.buf, self.metric_names = None, None
        self.times = []                                     # seconds in each step's Allreduce (bench/data_parallel.py)

    def _allocate(self, metric_names) -> None:
        self.metric_names = sorted(metric_names)
        self.buf = np.empty(self.n_grad + len(self.params) + 1 + len(self.metric_names) + 1, self.dtype)

    def allreduce(self, loss_val: float, metrics: dict, share: float, stop: bool):
        """After backward on this rank's rows: sum over ranks, point every p.grad at its slice of
        the reduced buffer. -> (global loss, global metrics, stop requested on any rank)."""
        if self.buf is None:
            self._allocate(metrics)
        if sorted(metrics) != self.metric_names:
            raise RuntimeError(f"GradReducer: metrics {sorted(metrics)} differ from the first step's {self.metric_names}")
        buf, n, P = self.buf, self.n_grad, len(self.params)
        scale = self.dtype.type(share)
        # pass 1: pack (scaled copy) into the buffer
        for i, p in enumerate(self.params):
            g = buf[self.offsets[i]:self.offsets[i + 1]]
            if p.grad is None:
                g[:] = 0
            else:
                np.multiply(p.grad.reshape(-1), scale, out=g)
            buf[n + i] = p.grad is not None
        tail = [loss_val * share] + [metrics[k] if k == "tokens" else metrics[k] * share for k in self.metric_names]
        buf[n + P:n + P + len(tail)] = tail
        buf[-1] = bool(stop)
        # pass 2: the one collective of the step, in place
        t0 = time.perf_counter()
        self.world.comm.Allreduce(self.world.MPI.IN_PLACE, buf, op=self.world.MPI.SUM)
        self.times.append(time.perf_counter() - t0)
        # pass 3: unpack (views, no copy)
        for i, p in enumerate(self.params):
            p.grad = buf[self.offsets[i]:self.offsets[i + 1]].reshape(p.data.shape) if buf[n + i] > 0 else None
        loss = float(buf[n + P])
        reduced = {k: float(v) for k, v in zip(self.metric_names, buf[n + P + 1:n + P + 1 + len(self.metric_names)])}
        if "tokens" in reduced:
            reduced["tokens"] = int(round(reduced["tokens"]))
        return loss, reduced, bool(buf[-1] > 0)
