"""A wall-clock budget for train.py (`--budget-min`, default 20): on a machine slower than the
one the defaults were tuned on, the stages are shortened together so that the run still ends
in time, instead of running past it; on a fast enough machine nothing changes.

A stage's length is one field of its config (LENGTH). COST says what a stage costs in
calibration steps (one forward and backward of the model on a batch of 16 rows of its context,
16 x 256 tokens for the mini model): so much per unit of its length, plus evaluations and the like that
do not shrink with it. Before the first stage one calibration step is timed here (the pace:
seconds per calibration step). Before each stage the planner finds the largest f, a multiple
of 0.05 (so that runs on the same machine plan the same lengths), for which the stages left fit
in the time left with each at length full * f ** ELASTIC[stage]: RLVF gives way first (30
iterations moved the held-out tasks by -1 on two seeds, 90 by +3 and +4, while a shorter
pretraining or SFT costs every later figure), and SFT last (sqrt(f): in nine shortened runs the
SFT tasks read 37-39% below 1,690 SFT steps and 45-51% at 1,690 after 1,080-1,170 pretraining
steps or at 2,030 after 900; bench/README.md, "A 20-minute budget"); the reward model does not
give way (f ** 0: from the same SFT model, 82 steps read 83.1% held-out and 150 read 87.4%, its
off-topic pairs 57% and 76%; bench/README.md, "The reward model, a third time"). Only the stage about to run takes its length
from f; the others are planned again when their turn comes. After each stage the pace is
corrected by the stage's measured time against its prediction, so a machine that slows down
or speeds up mid-run is followed. A length given on the command line (`--sft.max_steps=...`)
is kept as given. The lengths chosen go into summary.json, and the command that resumes an
interrupted stage keeps its length."""
from __future__ import annotations

import math
import time

import numpy as np

from . import engine as E
from .runtime import adapt_threads

LENGTH = {"pretrain": "max_steps", "sft": "max_steps", "reward": "max_steps", "rlhf": "num_episodes",
          "rlvf": "num_iterations", "dpo": "max_steps"}
# (calibration steps per unit of LENGTH, calibration steps besides) at the mini defaults, from
# two whole runs on the 2-core AMD EPYC host, full and about half length, and pretraining 8-row
# batches (bench/README.md, "A 20-minute budget"); a calibration step took 0.75 s there. SFT:
# 0.311 and 0.315 a step in the default runs s14_J2 and s16_M at the pace their pretraining
# measured (it was 0.35, which gave SFT ~130 steps less than fitted and the later stages the rest).
# Reward: 1.75 (was 1.45) since its score carries the likelihood term (RewardConfig.lm_coef): 150 steps
# took 166 s in s20_LM and s20_LMs2 at calibration steps of 0.66 and 0.61 s (1.68 and 1.82 a step),
# and at 1.45 the second run ended 8 s past 20 minutes
CALIBRATION_ROWS = 16
COST = {"pretrain": (0.56, 0.0), "sft": (0.31, 0.0), "reward": (1.75, 0.0), "rlhf": (8.0, 0.0),
        "rlvf": (6.2, 33.0), "dpo": (0.8, 0.0)}
# a stage whose optimizer is Muon (cfg.<stage>.optimizer) pays its Newton-Schulz steps on top, the same
# at any batch: 0.09 s a step for the mini blocks' matrices alone; inside two default runs a Muon
# pretraining step cost 0.76 and 0.85 calibration steps (0.20 and 0.29 above COST's 0.56; bench/README.md, "Muon")
MUON_STEP = 0.25
ELASTIC = {"rlvf": 3.0, "sft": 0.5, "reward": 0.0}   # a stage's length is full * f ** ELASTIC (1 where not named)
GRID = 0.05            # f is a multiple of this
MIN_SCALE = 0.1        # below it the run is not worth having: it overruns instead
RESERVE_S = 30.0       # the report, the plots and the process's start and end


def calibration_step(model_cfg, batch_size: int = CALIBRATION_ROWS, repeats: int = 4) -> float:
    """Seconds of one forward and backward of a fresh model (`model_cfg`) on a random
    batch_size x block_size batch: the best of `repeats` after one that warms the caches (4: on
    this shared host the best of 2 once read 0.99 s where runs read 0.67-0.82 s, and the plan
    cut pretraining to 900 steps that then ran at the usual pace; bench/README.md, "A 20-minute
    budget"). Leaves the engine's RNG as it found it."""
    from .model import GPT
    rng_state = E.get_rng_state()
    model = GPT(model_cfg, seed=0)
    x = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch_size, model_cfg.block_size + 1))
    best = math.inf
    for i in range(repeats + 1):
        adapt_threads()
        t = time.perf_counter()
        model(x[:, :-1], x[:, 1:])[1].backward()
        if i:
            best = min(best, time.perf_counter() - t)
        model.zero_grad()
    E.set_rng_state(rng_state)
    return best


class Budget:
    """Plans each stage's length for the time left (module docstring).

    seconds: the whole run's budget, counted from `t_start` (time.perf_counter()); stages: the
    stage names to run, in order; cfg: the run config (cfg.<stage> is a stage's config);
    given: the stages whose length the command line set; pace: seconds per calibration step."""

    def __init__(self, seconds: float, stages, cfg, given, pace: float, t_start: float):
        self.stages = [s for s in stages if s in LENGTH]
        self.full = {s: getattr(getattr(cfg, s), LENGTH[s]) for s in self.stages}
        self.muon = {s for s in self.stages if getattr(getattr(cfg, s), "optimizer", "adamw") == "muon"}
        self.given, self.pace = set(given), pace
        self.deadline = t_start + seconds - RESERVE_S
        self.chosen: dict[str, int] = {}

    @property
    def scale(self) -> dict[str, float]:
        """{stage: its planned length / its full length}, for the stages planned so far."""
        return {s: n / self.full[s] for s, n in self.chosen.items()}

    def cost(self, s: str, length: int) -> float:
        per, besides = COST[s]
        return (per + MUON_STEP * (s in self.muon)) * length + besides

    def plan(self, s: str, cfg, agree=lambda f: f) -> str | None:
        """Set stage s's length in cfg.<s> for the time left -> a line saying so when it was
        shortened, else None. agree(f) -> the f every MPI rank uses (rank 0's). When even
        MIN_SCALE does not fit, the run takes MIN_SCALE and overruns."""
        if s not in self.full:
            return None
        left = self.stages[self.stages.index(s):]
        seconds_left = self.deadline - time.perf_counter()

        def seconds(f):
            return sum(self.cost(t, self.length(t, f)) for t in left) * self.pace

        f = 1.0
        while f > MIN_SCALE + 1e-9 and seconds(f) > seconds_left:
            f = round(f - GRID, 10)
        f = agree(f)
        length = self.length(s, f)
        setattr(getattr(cfg, s), LENGTH[s], length)
        self.chosen[s] = length
        if length == self.full[s]:
            return None
        return (f"budget: {s} {LENGTH[s]} {self.full[s]} -> {length} (x{length / self.full[s]:.2f}): the stages left "
                f"would take ~{seconds(1.0) / 60:.0f} min at full length on this machine, "
                f"{max(0, seconds_left) / 60:.1f} min are left (--budget-min 0: the full schedule)")

    def length(self, s: str, f: float) -> int:
        """Stage s's length at factor f (its full length where the command line gave it)."""
        if s in self.given:
            return self.full[s]
        return max(1, round(self.full[s] * f ** ELASTIC.get(s, 1.0)))

    def done(self, s: str, seconds: float) -> None:
        """Correct the pace by stage s's measured time against its prediction."""
        if s in self.chosen:
            predicted = self.cost(s, self.chosen[s]) * self.pace
            if predicted > 0 and seconds > 0:
                self.pace *= seconds / predicted

    def pins(self) -> list[str]:
        """--<stage>.<field>=N for every stage planned so far: what a resumed run must keep."""
        return [f"--{s}.{LENGTH[s]}={n}" for s, n in self.chosen.items()]
