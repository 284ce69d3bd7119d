"""The wall-clock budget (budget.py): lengths kept when the time suffices, shortened by the
largest factor on the grid that fits when it does not (RLVF by f ** ELASTIC), lengths given on
the command line kept, the pace corrected by each stage's measured time, the calibration step
leaving no trace, and the resume command (train.resume_argv). The config is a stand-in with
the five stages' length fields."""
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tinygrad_llm import engine as E
from tinygrad_llm.budget import COST, ELASTIC, GRID, MIN_SCALE, MUON_STEP, RESERVE_S, Budget, calibration_step
from tinygrad_llm.config import get_tiny_config

STAGES = ["pretrain", "sft", "reward", "rlhf", "rlvf"]
FULL = {"pretrain": 900, "sft": 2600, "reward": 150, "rlhf": 10, "rlvf": 90}


def run_cfg():
    return SimpleNamespace(pretrain=SimpleNamespace(max_steps=900), sft=SimpleNamespace(max_steps=2600),
                           reward=SimpleNamespace(max_steps=150), rlhf=SimpleNamespace(num_episodes=10),
                           rlvf=SimpleNamespace(num_iterations=90))


def full_seconds(pace, stages=STAGES):
    return sum(COST[s][0] * FULL[s] + COST[s][1] for s in stages) * pace


def budget_for(seconds_of_work, pace=1.0, given=()):
    """A Budget whose time left (after the reserve) is `seconds_of_work`."""
    cfg = run_cfg()
    return cfg, Budget(seconds_of_work + RESERVE_S, STAGES, cfg, given, pace, time.perf_counter())


def test_enough_time_changes_nothing():
    cfg, b = budget_for(full_seconds(0.5) * 1.2, pace=0.5)
    for s in STAGES:
        assert b.plan(s, cfg) is None
    assert cfg.pretrain.max_steps == 900 and cfg.sft.max_steps == 2600 and cfg.rlvf.num_iterations == 90
    assert set(b.scale.values()) == {1.0}


def planned_seconds(f, pace=1.0):
    """What the whole run takes at factor f, by the module's own cost model."""
    return sum(COST[s][0] * round(FULL[s] * f ** ELASTIC.get(s, 1.0)) + COST[s][1] for s in STAGES) * pace


def test_half_the_time_takes_the_largest_factor_on_the_grid_that_fits():
    cfg, b = budget_for(full_seconds(1.0) * 0.52)
    line = b.plan("pretrain", cfg)
    f = round(cfg.pretrain.max_steps / 900, 10)
    assert abs(f / GRID - round(f / GRID)) < 1e-9                               # a multiple of the grid
    left = full_seconds(1.0) * 0.52
    assert planned_seconds(f) <= left < planned_seconds(f + GRID)              # the largest that fits
    assert "pretrain" in line and "900 ->" in line and "--budget-min 0" in line
    b.done("pretrain", COST["pretrain"][0] * cfg.pretrain.max_steps * 1.0)     # took what was predicted
    b.deadline -= COST["pretrain"][0] * cfg.pretrain.max_steps                 # ... and that much time
    b.plan("sft", cfg)
    f_sft = (cfg.sft.max_steps / 2600) ** (1 / ELASTIC.get("sft", 1.0))           # SFT's length is 2600 * f ** ELASTIC
    assert abs(f_sft - f) <= GRID + 1e-3                                       # the same factor, one grid step at most
    assert cfg.sft.max_steps / 2600 > cfg.pretrain.max_steps / 900              # SFT gives way least (bench/README)
    assert 0 < ELASTIC["rlvf"] and b.length("rlvf", f) == round(90 * f ** ELASTIC["rlvf"])


def test_given_lengths_are_kept_and_the_others_pay_for_them():
    cfg, b = budget_for(full_seconds(1.0) * 0.6, given={"sft"})
    b.plan("pretrain", cfg)
    cfg2, b2 = budget_for(full_seconds(1.0) * 0.6)
    b2.plan("pretrain", cfg2)
    assert b.scale["pretrain"] < b2.scale["pretrain"]       # SFT's full length is paid from the rest
    b.plan("sft", cfg)
    assert cfg.sft.max_steps == 2600 and b.scale["sft"] == 1.0


def test_a_slow_stage_makes_the_next_ones_shorter():
    cfg, b = budget_for(full_seconds(1.0) * 0.8)
    b.plan("pretrain", cfg)
    pace = b.pace
    b.done("pretrain", 2 * COST["pretrain"][0] * cfg.pretrain.max_steps)   # twice as slow as predicted
    assert b.pace == pytest.approx(2 * pace)
    b.plan("sft", cfg)
    assert b.scale["sft"] < b.scale["pretrain"]


def test_no_time_left_falls_to_the_floor_not_to_zero():
    cfg, b = budget_for(-100.0)
    b.plan("pretrain", cfg)
    assert b.scale["pretrain"] == MIN_SCALE and cfg.pretrain.max_steps == 90


def test_a_muon_stage_pays_for_its_newton_schulz_steps():
    cfg = run_cfg()
    cfg.pretrain.optimizer = "muon"
    b = Budget(1e9, STAGES, cfg, (), 1.0, time.perf_counter())
    assert b.cost("pretrain", 100) == pytest.approx((COST["pretrain"][0] + MUON_STEP) * 100)
    assert b.cost("sft", 100) == pytest.approx(COST["sft"][0] * 100)         # AdamW: no extra


def test_pins_name_the_planned_lengths():
    cfg, b = budget_for(full_seconds(1.0) * 0.5)
    b.plan("pretrain", cfg)
    b.plan("sft", cfg)
    assert b.pins() == [f"--pretrain.max_steps={cfg.pretrain.max_steps}", f"--sft.max_steps={cfg.sft.max_steps}"]


def test_agree_sets_the_factor_every_rank_uses():
    cfg, b = budget_for(full_seconds(1.0) * 0.9)
    b.plan("pretrain", cfg, agree=lambda f: 0.25)
    assert cfg.pretrain.max_steps == 225


def test_calibration_step_times_and_leaves_the_rng_alone():
    cfg = get_tiny_config(vocab_size=100)
    cfg.dropout = 0.1                         # the forward draws dropout masks from the engine's RNG
    E.manual_seed(5)
    before = E.get_rng_state()
    secs = calibration_step(cfg, batch_size=2)
    assert 0 < secs < 10
    after = E.get_rng_state()
    assert str(before) == str(after)
    assert np.isfinite(secs)


def _train_module():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stage_args", [[], ["--stage", "all"], ["--stage=all"]])
def test_resume_command_runs_the_interrupted_stage_on_with_its_length(stage_args):
    train = _train_module()
    argv = [*stage_args, "--ckpt-dir", "my ckpt", "--sft.lr=1e-4", "--resume"]
    pins = ["--pretrain.max_steps=450", "--sft.max_steps=1300"]
    again = train.resume_argv(argv, ["sft", "reward", "rlhf", "rlvf"], pins)
    assert again == ["--ckpt-dir", "my ckpt", "--sft.lr=1e-4", "--stage", "sft,reward,rlhf,rlvf",
                     "--sft.max_steps=1300", "--resume"]
    given = train.resume_argv(["--sft.max_steps=99"], ["sft"], pins)      # a given length stays as given
    assert given == ["--sft.max_steps=99", "--stage", "sft", "--resume"]
