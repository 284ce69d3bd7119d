"""Train MyLLM through its five stages: Pretrain -> SFT -> Reward Model -> RLHF (PPO) -> RLVF.

    python train.py --stage all                    # everything, bundled data, mini config, in 20 minutes
    python train.py --stage all --budget-min 0     # the full schedule, however long it takes here
    python train.py --stage pretrain,sft --config tiny
    python train.py --skip-pretrain --skip-sft     # only the later stages (needs sft_final)
    python train.py --stage sft --sft.max_steps=200 --model.dropout=0.0
    python train.py --stage all --resume           # continue an interrupted stage
    mpiexec -n 2 python train.py --stage pretrain,sft   # data parallel over 2 processes (extra `mpi`)
    python train.py --stage sft --lora.r=8         # LoRA: train adapters only -> checkpoints/sft_lora
    python train.py --stage dpo                    # DPO from sft_final on the preference pairs (not in "all")

Every field of the config dataclasses can be overridden as --<section>.<field>=<value>;
`python train.py --help-config` lists them with their defaults."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

from tinygrad_llm import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE
from tinygrad_llm.config import DEFAULT_SEED
from tinygrad_llm.distributed import world
from tinygrad_llm.lora import LoRAConfig
from tinygrad_llm.stages import load_stages

STAGES = load_stages()          # name -> Stage (stages/common.py), in training order


class UsageError(ValueError):
    pass


def producers() -> dict:
    """checkpoint name -> the stage that writes it (the stage graph's edges)."""
    return {st.writes: name for name, st in STAGES.items()}


class RunConfig:
    """The nested config: .model (GPTConfig) and one config per stage (.pretrain, .sft, ...)."""

    def __init__(self, preset: str):
        from tinygrad_llm.config import get_mini_config, get_tiny_config
        self.model = {"tiny": get_tiny_config, "mini": get_mini_config}[preset]()
        for name, st in STAGES.items():
            setattr(self, name, st.config(**(st.tiny if preset == "tiny" else {})))
        self.lora = LoRAConfig()                # --lora.r=8: the SFT stage trains adapters only

    def sections(self):
        return {"model": self.model, **{s: getattr(self, s) for s in STAGES}, "lora": self.lora}


def _parse_value(raw: str, current, name: str):
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if current is None:
            for conv in (int, float):
                try:
                    return conv(raw)
                except ValueError:
                    pass
            return None if raw.lower() == "none" else raw
        return type(current)(raw)
    except ValueError:
        raise UsageError(f"--{name}: cannot read {raw!r} as {type(current).__name__}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """--section.field=value for every dataclass field (minGPT's merge_from_args)."""
    sections = cfg.sections()
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=")[0]:
            raise UsageError(f"unrecognised argument {arg!r} (overrides look like --model.n_layer=2)")
        key, raw = arg[2:].split("=", 1)
        section, field = key.split(".", 1)
        if section not in sections:
            raise UsageError(f"--{key}: unknown section {section!r}; known: {', '.join(sections)}")
        obj = sections[section]
        names = [f.name for f in fields(obj)]
        field = getattr(obj, "ALIASES", {}).get(field, field)      # a renamed field's old name (config.renamed)
        if field not in names:
            raise UsageError(f"--{key}: {section} has no field {field!r}; known: {', '.join(names)}")
        setattr(obj, field, _parse_value(raw, getattr(obj, field), key))
    # re-run the model config's validation after overrides
    type(cfg.model).__post_init__(cfg.model)
    cfg.lora.validate()


def select_stages(args) -> list[str]:
    names = [s for s in STAGES if STAGES[s].in_all] if args.stage in ("all", None) else [s.strip() for s in args.stage.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise UsageError(f"--stage: unknown stage(s) {', '.join(unknown)}; choose from all, {', '.join(STAGES)}")
    skipped = {s for s in STAGES if getattr(args, f"skip_{s}")}
    return [s for s in STAGES if s in names and s not in skipped]


def check_data_parallel(stages, size: int) -> None:
    """Under mpiexec -n N (N > 1), only stages that split their batches over the ranks may run."""
    single = [s for s in stages if not STAGES[s].data_parallel]
    if size > 1 and single:
        raise UsageError(f"stage(s) {', '.join(single)} run in one process only (not yet split over MPI ranks): "
                         f"run them without mpiexec, e.g. python train.py --stage {','.join(single)}")


def check_inputs(stages, ckpt_dir: Path) -> None:
    """Fail before any work if a stage's input checkpoint neither exists nor will be written."""
    from tinygrad_llm.checkpoint import weights_path
    for i, s in enumerate(stages):
        for ckpt in STAGES[s].reads:
            producer = producers()[ckpt]
            if producer not in stages[:i] and not weights_path(ckpt_dir / ckpt).exists():
                raise UsageError(f"stage {s} needs {weights_path(ckpt_dir / ckpt)}, which does not exist "
                                 f"(run --stage {producer} first)")
    if stages and stages[0] != "pretrain" and not (ckpt_dir / "vocab.json").exists():
        raise UsageError(f"{ckpt_dir / 'vocab.json'} not found: run the pretrain stage first")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", help="all (" + " -> ".join(s for s in STAGES if STAGES[s].in_all)
                    + "), or a comma list of: " + ", ".join(STAGES)
                    + " (dpo: Direct Preference Optimization from sft_final, an alternative to reward + rlhf)")
    for s in STAGES:
        ap.add_argument(f"--skip-{s}", action="store_true", help=f"skip the {s} stage")
    ap.add_argument("--config", default="mini", choices=["tiny", "mini"], help="model + stage preset")
    ap.add_argument("--data-dir", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--ckpt-dir", default="checkpoints")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--run-id", default=None, help="default: a timestamp")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--resume", action="store_true", help="continue interrupted stages from <stage>_last")
    ap.add_argument("--threads", type=int, default=None, help="BLAS + Numba threads (default: auto, 2 dropping to 1 under load; see README)")
    ap.add_argument("--budget-min", type=float, default=20.0,
                    help="wall-clock budget of the whole run in minutes: on a slower machine the stages are shortened "
                         "together to end in time (tinygrad_llm/budget.py); 0: the full schedule, however long")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--help-config", action="store_true", help="list every --section.field and its default")
    args, overrides = ap.parse_known_args(argv)
    return args, overrides


def build_tokenizer(stages, data_dir: Path, ckpt_dir: Path, vocab_size: int):
    from tinygrad_llm.data import all_texts
    from tinygrad_llm.tokenizer import MyLLMTokenizer
    path = ckpt_dir / "vocab.json"
    if "pretrain" in stages:  # a new model: a new vocabulary (saved once pretraining succeeds)
        return MyLLMTokenizer(vocab_size).build_vocab(all_texts(data_dir))
    try:
        return MyLLMTokenizer().load(path)
    except (OSError, ValueError) as e:     # unreadable or not a vocabulary: one line, exit 2
        raise UsageError(str(e)) from None


def print_summary(rows) -> None:
    w = max([len(r[3]) for r in rows] + [10])
    print("\n" + f"{'stage':<10}{'time':>9}  {'headline':<{w}}  checkpoint")
    for stage, secs, ckpt, headline in rows:
        print(f"{stage:<10}{secs:>8.1f}s  {headline:<{w}}  {ckpt}")


def fail(dist, message: str, code: int) -> int:
    """Print the one error line and exit with `code`; under MPI this ends every rank (no rank
    is left waiting in a collective for one that failed)."""
    if dist.size > 1:
        dist.abort(message, code)
    print(message, file=sys.stderr)
    return code


def main(argv=None) -> int:
    dist = world()
    if not dist.is_main:              # rank 0 alone prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        return run_stages(argv, dist)
    except (Exception, KeyboardInterrupt) as e:
        if dist.size == 1:
            raise
        return fail(dist, traceback.format_exc().rstrip(), EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else 1)


def given_lengths(overrides) -> set[str]:
    """The stages whose length (budget.LENGTH) the command line sets."""
    from tinygrad_llm.budget import LENGTH
    keys = {a[2:].split("=", 1)[0] for a in overrides}
    return {s for s, field in LENGTH.items() if f"{s}.{field}" in keys}


def plan_budget(args, overrides, cfg, stages, dist, t_start):
    """The run's Budget (budget.py), or None with --budget-min 0."""
    from tinygrad_llm.budget import Budget, calibration_step
    if not args.budget_min:
        return None
    pace = dist.gather(calibration_step(cfg.model))[0]
    return Budget(args.budget_min * 60, stages, cfg, given_lengths(overrides), pace, t_start)


def resume_argv(argv, remaining, pins) -> list[str]:
    """The arguments that continue an interrupted run: the stages from the interrupted one on
    (those that finished are not run again), the length the budget gave the interrupted one
    (pins: budget.Budget.pins()), and --resume last."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--resume" or a.startswith("--stage="):
            skip = False
            continue
        if a == "--stage":
            skip = True
            continue
        out.append(a)
    keys = {a.split("=")[0] for a in out}
    pins = [p for p in pins if p[2:].split(".")[0] in remaining and p.split("=")[0] not in keys]
    return [*out, "--stage", ",".join(remaining), *pins, "--resume"]


def run_stages(argv, dist) -> int:
    t_start = time.perf_counter()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from tinygrad_llm.checkpoint import CheckpointError
    from tinygrad_llm.config import ConfigError
    from tinygrad_llm.data import DataError
    from tinygrad_llm.loop import NonFiniteError, RunLogger, TrainingInterrupted
    from tinygrad_llm.stages.common import StageContext
    from tinygrad_llm.report import write_report
    from tinygrad_llm.runtime import configure_threads
    from tinygrad_llm import engine

    budget, remaining = None, []
    try:
        cfg = RunConfig(args.config)
        if args.help_config:
            for name, sec in cfg.sections().items():
                for f in fields(sec):
                    print(f"--{name}.{f.name}={getattr(sec, f.name)}")
            return 0
        apply_overrides(cfg, overrides)
        if not args.budget_min >= 0:
            raise UsageError(f"--budget-min must be >= 0 (0: no budget), got {args.budget_min}")
        stages = select_stages(args)
        if not stages:
            raise UsageError("no stage left to run")
        if cfg.lora.r and stages != ["sft"]:
            raise UsageError("--lora.r applies to --stage sft alone: it writes an adapter (sft_lora), not sft_final; "
                             "merge it first (python -m tinygrad_llm.lora merge) to go on from it")
        data_dir, ckpt_dir = Path(args.data_dir), Path(args.ckpt_dir)
        if not data_dir.is_dir():
            raise UsageError(f"--data-dir {data_dir}: not a directory")
        check_data_parallel(stages, dist.size)
        check_inputs(stages, ckpt_dir)
        configure_threads(1 if args.threads is None and dist.size > 1 else args.threads)   # MPI: a thread per rank
        tok = build_tokenizer(stages, data_dir, ckpt_dir, cfg.model.vocab_size)
        cfg.model.vocab_size = len(tok)
        run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
        logger = RunLogger(Path(args.runs_dir) / run_id, enabled=dist.is_main)
        engine.manual_seed(args.seed + dist.rank)     # dropout masks follow --seed too (each rank its own)
        ctx = StageContext(cfg, tok, data_dir, ckpt_dir, logger, seed=args.seed, resume=args.resume,
                           show_progress=not args.no_progress and dist.is_main)
        print(f"run {run_id}: stages {' -> '.join(stages)}, config {args.config}, vocabulary {len(tok)}, "
              f"logs in {logger.dir}" + (f", {dist.size} MPI processes" if dist.size > 1 else ""))
        budget = plan_budget(args, overrides, cfg, stages, dist, t_start)
        if budget:
            print(f"budget {args.budget_min:g} min (a calibration step takes {budget.pace:.2f} s here)")
        rows = []
        for s in stages:
            remaining = stages[stages.index(s):]
            print(f"\n=== {s} ===")
            if budget and (line := budget.plan(s, cfg, agree=lambda f: dist.gather(f)[0])):
                print(line)
            t0 = time.perf_counter()
            figures = STAGES[s].run(ctx)
            secs = time.perf_counter() - t0
            if budget and s in budget.chosen:
                budget.done(s, secs)
                figures.update(length=budget.chosen[s], full_length=budget.full[s])
            if s == "pretrain" and dist.is_main:   # only now: a failed pretrain leaves the old vocabulary
                tok.save(ckpt_dir / "vocab.json")
            dist.barrier()        # the next stage reads what rank 0 has just written
            figures["time_s"] = secs
            logger.update_summary(s, **figures)
            rows.append((s, secs, figures.get("checkpoint", str(ctx.ckpt(STAGES[s].writes))), figures.get("headline", "")))
            print(f"{s}: {figures.get('headline', '')} ({secs:.1f}s)")
        print_summary(rows)
        if dist.is_main:
            print(write_report(logger.dir))
        return 0
    except (UsageError, ConfigError, DataError, CheckpointError) as e:
        return fail(dist, f"error: {e}", EXIT_BAD_INPUT)
    except NonFiniteError as e:
        return fail(dist, f"error: {e}", EXIT_NONFINITE)
    except TrainingInterrupted as e:   # every rank stops after the same step (loop.py); rank 0 saved
        again = resume_argv(sys.argv[1:] if argv is None else argv, remaining, budget.pins() if budget else [])
        launcher = ["mpiexec", "-n", str(dist.size)] if dist.size > 1 else []
        cmd = shlex.join([*launcher, "python", "train.py", *again])   # quoted: paths may hold spaces
        if dist.is_main:
            print(f"\n{e}. A resumable checkpoint was saved; continue with:\n    {cmd}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
