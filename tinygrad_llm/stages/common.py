"""What a stage declares (Stage), what it receives (StageContext), and the checkpoint helpers
every stage shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import chat_eval
from ..checkpoint import CheckpointError, load_into, save_checkpoint, weights_path
from ..config import DEFAULT_SEED
from ..distributed import world
from ..loop import RunLogger
from ..model import GPT
from ..tokenizer import MyLLMTokenizer


@dataclass(frozen=True)
class Stage:
    """A stage's declaration (its module's STAGE); train.py derives the stage graph, the command
    line and the checkpoint names from these.

    name: --stage name, config section (--<name>.field=...) and metrics label; reads: the
    checkpoints it needs (STYLE.md section 5's init_from first); writes: the checkpoint it
    leaves; config: its config dataclass; tiny: the --config tiny overrides; run(ctx) -> figures;
    data_parallel: whether it splits its batches over the ranks of `mpiexec -n N` (distributed.py);
    in_all: whether `--stage all` runs it (DPO, an alternative to reward model + PPO, does not)."""
    name: str
    reads: tuple
    writes: str
    config: type
    tiny: dict
    run: Callable
    data_parallel: bool = False
    in_all: bool = True


@dataclass
class StageContext:
    cfg: Any                    # the nested run config: cfg.model (GPTConfig), cfg.pretrain, cfg.sft, ...
    tokenizer: MyLLMTokenizer
    data_dir: Path
    ckpt_dir: Path
    logger: RunLogger
    seed: int = DEFAULT_SEED
    resume: bool = False
    show_progress: bool = True

    @property
    def vocab_sha(self) -> str:
        return self.tokenizer.fingerprint()

    def ckpt(self, name: str) -> Path:
        return weights_path(self.ckpt_dir / name)

    def load_model(self, name: str, cls=GPT, **kwargs):
        """A model of class `cls` with the weights of checkpoint `name` (clear error if absent)."""
        path = self.ckpt(name)
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found (run the stage that writes it first)")
        model = cls(self.cfg.model, **kwargs)
        load_into(model, path, self.vocab_sha)
        return model

    def save_model(self, model, name: str, stage: str, step: int, extra: dict | None = None) -> Path:
        """Write checkpoint `name` (rank 0 alone under MPI: every rank holds the same weights)."""
        if not world().is_main:
            return self.ckpt(name)
        return save_checkpoint(self.ckpt(name), model, stage=stage, step=step, vocab_sha=self.vocab_sha, extra=extra)


# ----------------------------------------------------------------------------------------
# resumable checkpoints for the loop: `<stage>_last` weights + `<stage>_last.state` (optimizer
# moments, step, RNG states). Written on interrupt / every ckpt_every steps, removed when the
# stage finishes and its final checkpoint is safely on disk. Under MPI rank 0 writes them; the
# state holds every rank's dropout RNG (each rank draws its own masks) so a resume is exact.


def make_saver(ctx: StageContext, model, stage: Stage, extra: dict | None = None, final=None):
    """The `save(kind, step, optimizer, rng)` callback that loop.train calls: "final" writes
    stage.writes (or calls final(step), e.g. SFT's LoRA adapter), "periodic" / "interrupt"
    `<stage>_last` and its state."""
    from .. import engine as E
    from ..checkpoint import save_state, state_path

    last = f"{stage.name}_last"

    def save(kind, step, optimizer, rng):
        dist = world()
        if kind == "final":
            if final is None:
                ctx.save_model(model, stage.writes, stage.name, step, extra)
            else:
                final(step)
            for p in (ctx.ckpt(last), state_path(ctx.ckpt(last))):
                if dist.is_main and p.exists():
                    p.unlink()
            return
        engine_rngs = dist.gather(E.get_rng_state())         # a collective: every rank calls save
        ctx.save_model(model, last, stage.name, step, extra)
        if dist.is_main:
            save_state(ctx.ckpt(last), optimizer.state_dict(),
                       {"step": step, "rng": rng.bit_generator.state, "engine_rng": engine_rngs[0],
                        "engine_rng_ranks": engine_rngs})

    return save


def load_resume(ctx: StageContext, model, stage: str) -> dict | None:
    """If ctx.resume and `<stage>_last` exists: load its weights into `model` and return the
    loop's resume dict; otherwise None (the stage starts fresh)."""
    from ..checkpoint import load_state

    last = ctx.ckpt(f"{stage}_last")
    if not (ctx.resume and last.exists()):
        return None
    load_into(model, last, ctx.vocab_sha)
    arrays, info = load_state(last)
    # this rank's dropout RNG (a rank past those saved keeps the RNG train.py seeded it with)
    ranks, rank = info.get("engine_rng_ranks") or [info["engine_rng"]], world().rank
    engine_rng = ranks[rank] if rank < len(ranks) else None
    return {"step": info["step"], "optimizer": arrays, "rng": info["rng"], "engine_rng": engine_rng}


def chat_eval_after(ctx: StageContext, model, stage: str, step: int, items: int = 0, max_new_tokens: int = 96):
    """The chat evaluation (chat_eval.py) of a stage's trained model on the test half of
    chat_eval.json (the first `items` of it; 0 = all), logged to metrics.jsonl as chat_* at
    `step`; None when the data has no chat_eval.json."""
    found = chat_eval.load_chat_eval(ctx.data_dir)
    if found is None:
        return None
    test = chat_eval.subset(chat_eval.dev_test_split(found)[1], items)
    res = chat_eval.evaluate_chat(model, ctx.tokenizer, test, max_new_tokens=max_new_tokens)
    ctx.logger.log(stage, step, **chat_eval.flat(res))
    return res
