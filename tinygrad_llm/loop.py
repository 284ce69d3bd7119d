"""The one training loop every gradient-descent stage uses (pretrain, SFT, reward model, RLHF's
PPO and RLVF's GRPO), plus the run logger. A stage supplies only `get_batch(rng)` and
`loss_fn(model, batch)`; the RL stages' get_batch pops the next minibatch of their plan and
samples a new batch of replies when it is used up (stages/policy.py).

Reads like nanoGPT's train.py: for each step, evaluate if due, get the learning rate,
forward, backward, check the numbers are finite, clip, optimizer step, log, checkpoint if due.
Ctrl-C / SIGTERM are turned into a request to stop at the next step boundary, where a
resumable checkpoint is written; a non-finite loss or gradient stops the stage before the
bad update touches the weights.

Under `mpiexec -n N` (distributed.py) each rank runs this same loop on its rows of every batch:
the weights are broadcast from rank 0 before the first step, the gradients (and the loss, the
metrics and any stop request) are summed by one Allreduce between backward and clipping, and
only rank 0 logs, shows progress and writes checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import engine as E
from .config import ConfigError, LoopConfig
from .distributed import GradReducer, world
from .optim import clip_grad_norm, get_lr, make_optimizer
from .runtime import adapt_threads


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/Inf; the stage stops, keeping the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: a resumable checkpoint was written (if the stage could save)."""


class RunLogger:
    """runs/<run-id>/metrics.jsonl (one JSON object per logged step) and summary.json."""

    def __init__(self, run_dir, enabled: bool = True):
        self.dir, self.enabled = Path(run_dir), enabled     # enabled=False: MPI ranks other than 0
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary_path = self.dir / "summary.json"

    def log(self, stage: str, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def summary(self) -> dict:
        if self.summary_path.exists():
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        return {}

    def update_summary(self, stage: str, **figures) -> None:
        if not self.enabled:
            return
        s = self.summary()
        s.setdefault(stage, {}).update({k: _jsonable(v) for k, v in figures.items()})
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(s, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(self.summary_path)

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(l) for l in self.metrics_path.read_text(encoding="utf-8").splitlines() if l.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None                    # e.g. GRPO's KL in a step without update: null, valid JSON
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


@contextmanager
def stop_on_signals():
    """While training, SIGINT/SIGTERM set a flag instead of killing the process mid-update."""
    flag = {"stop": None}

    def handler(signum, frame):
        if flag["stop"] is not None:       # a second Ctrl-C means "now": die by the signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        flag["stop"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(model, cfg: LoopConfig, get_batch, loss_fn, *, stage: str, logger: RunLogger | None = None,
          evaluate=None, save=None, resume: dict | None = None, rng=None, params=None, show_progress=True,
          shard=None):
    """Run cfg.max_steps steps -> {"history": one row per step, "evals": one row per evaluation,
    "optimizer": the AdamW (or Muon, cfg.optimizer), "step_time_s": mean seconds per step, evaluations and checkpoints excluded,
    "allreduce_s": seconds of each step's Allreduce (MPI only)}.

    get_batch(rng) -> batch; loss_fn(model, batch) -> (loss Tensor, {metric: float, "tokens": int}),
    or (None, metrics) when the batch carries nothing to learn (GRPO: every group's replies
    scored alike): that step logs its metrics and leaves weights and optimizer as they are
    (under MPI: when no rank had a loss; a rank without one adds nothing to the Allreduce).
    metrics["shared"], if any: {name: float} figures of the whole global batch, the same on
    every rank, logged as they are (the others are means over this rank's rows, reduced);
    evaluate(model) -> {name: float} (model in eval mode, no graph);
    save(kind, step, optimizer, rng) writes a checkpoint (kind "periodic" | "interrupt" | "final");
    resume: {"step", "optimizer", "rng", "engine_rng"} from a previous interrupted run;
    shard(batch, rank, size) -> (this rank's part of the batch, its share of the loss's denominator)
    (distributed.shard_rows): needed only under mpiexec with more than one process. (The RL
    stages sample only their part: their get_batch returns it, their shard passes it on.)"""
    rng = rng if rng is not None else np.random.default_rng(0)
    dist = world()
    if dist.size > 1 and shard is None:
        raise RuntimeError(f"{stage}: this stage cannot split its batches over {dist.size} processes")
    if dist.size > cfg.batch_size:
        raise ConfigError(f"{stage}: batch_size {cfg.batch_size} cannot be split over {dist.size} processes "
                          "(each needs at least one row)")
    named = list(params if params is not None else model.named_parameters())
    opt = make_optimizer(named, cfg)
    start = 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        if resume["engine_rng"] is not None:
            E.set_rng_state(resume["engine_rng"])
        start = int(resume["step"])
    plist = [p for _, p in named]
    reducer = None
    if dist.size > 1:                    # every rank starts from rank 0's weights (fresh or resumed)
        dist.broadcast_params(list(model.named_parameters()))   # the frozen ones too
        reducer = GradReducer(dist, plist)
    show_progress = show_progress and dist.is_main       # rank 0 alone shows progress and logs
    logger = logger if dist.is_main else None
    history, evals = [], []
    min_lr = cfg.lr * cfg.min_lr_ratio
    model.train()
    bar = tqdm(range(start, cfg.max_steps), desc=stage, initial=start, total=cfg.max_steps,
               disable=not show_progress, dynamic_ncols=True, leave=True)
    t_last, tokens_since = time.perf_counter(), 0
    step_time = 0.0                      # wall time of the steps themselves (no evaluation, no checkpoints)
    with stop_on_signals() as flag:
        for step in bar:
            # 1) evaluate on held-out data every eval_every steps (and at the start)
            if evaluate is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0:
                ev = _run_eval(model, evaluate)
                evals.append({"step": step, **ev})
                if logger:
                    logger.log(stage, step, **{f"val_{k}": v for k, v in ev.items()})
            # 2) one optimizer step (threads follow the machine's load, runtime.adapt_threads)
            adapt_threads()
            t_step = time.perf_counter()
            lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, min_lr)
            batch = get_batch(rng)           # the global batch (the same on every rank; RL: this rank's samples)
            if reducer:
                batch, share = shard(batch, dist.rank, dist.size)
            stop_any = False
            with np.errstate(over="ignore", invalid="ignore"):   # a NaN/Inf is reported below, once
                loss, metrics = loss_fn(model, batch)
                metrics = dict(metrics)
                shared = metrics.pop("shared", {})               # whole-batch figures: logged as they are
                loss_val = 0.0
                if loss is not None:
                    loss.backward()
                    loss_val = float(loss.data)
                if reducer:     # sum over ranks: the global batch's gradient and loss (every rank joins,
                                # one with nothing to learn with no gradient and a share of 0)
                    loss_val, metrics, stop_any = reducer.allreduce(loss_val, metrics, share, flag["stop"])
                # a step learns when some rank's loss reached a parameter; else (GRPO: every group's
                # replies scored alike) weights and optimizer stay as they are
                learned = any(p.grad is not None for p in plist)
                norm = clip_grad_norm(plist, cfg.grad_clip) if learned else 0.0
            if learned:
                if not (math.isfinite(loss_val) and math.isfinite(norm)):
                    opt.zero_grad()
                    raise NonFiniteError(f"{stage}: non-finite {'loss' if not math.isfinite(loss_val) else 'gradient norm'} "
                                         f"at step {step} (loss {loss_val}, grad norm {norm}); "
                                         "the weights were not updated and no checkpoint was written from this step")
                opt.step(lr)
                opt.zero_grad()
            step_time += time.perf_counter() - t_step
            metrics.update(shared)
            # 3) log
            tokens_since += int(metrics.get("tokens", 0))
            row = {"loss": loss_val, "lr": lr, "grad_norm": norm,
                   **{k: v for k, v in metrics.items() if k != "tokens"}}
            history.append({"step": step, **row})
            if (step + 1) % cfg.log_every == 0 or step == cfg.max_steps - 1:
                now = time.perf_counter()
                row["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                if logger:
                    logger.log(stage, step + 1, **row)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            # 4) checkpoint / stop requests at a clean step boundary
            done = step + 1
            if flag["stop"] and not reducer or stop_any:   # under MPI: asked on any rank, all stop here
                if save:
                    save("interrupt", done, opt, rng)
                raise TrainingInterrupted(f"{stage}: stopped by {flag['stop'] or 'a signal to another rank'} "
                                          f"after step {done}")
            if save and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.max_steps:
                save("periodic", done, opt, rng)
    bar.close()
    if evaluate is not None:
        ev = _run_eval(model, evaluate)
        evals.append({"step": cfg.max_steps, **ev})
        if logger:
            logger.log(stage, cfg.max_steps, **{f"val_{k}": v for k, v in ev.items()})
    if save:
        save("final", cfg.max_steps, opt, rng)
    return {"history": history, "evals": evals, "optimizer": opt,
            "step_time_s": step_time / max(1, cfg.max_steps - start), "allreduce_s": reducer.times if reducer else []}


def _run_eval(model, evaluate) -> dict:
    model.eval()
    try:
        with E.no_grad():
            return evaluate(model)
    finally:
        model.train()
