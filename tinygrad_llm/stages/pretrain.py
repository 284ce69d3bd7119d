"""Stage 1: pretraining — next-character prediction on the corpus.

Batches are random windows of block_size + 1 characters from the token stream; the
held-out figures are the loss on the validation text, also as bits per character, and the
copy probe (probe.py: can the model repeat digits it has just read, in phrasings training
never used?)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, LoopConfig
from ..data import load_drills, load_split, mixed_pretrain_batch, pretrain_batch
from ..distributed import shard_rows
from ..loop import train
from ..model import GPT
from ..probe import copy_probe, facts_probe
from .common import Stage, load_resume, make_saver


@dataclass
class PretrainConfig(LoopConfig):
    """What pretraining sets apart from LoopConfig's defaults."""
    max_steps: int = 1800           # 900 steps of 16 rows took the held-out tasks 30% -> 62% against 600 (bench/README.md,
    batch_size: int = 8             # "The budget, ..."); the same tokens in twice the steps of 8 rows learn faster: at the
                                    # 20-minute budget's 990 steps held-out loss 2.757 -> 2.649, sums 33% -> 63%, SFT
                                    # tasks 37% -> 44% (bench/README.md, "A 20-minute budget")
    lr: float = 2e-3
    warmup_steps: int = 60
    # Muon for the blocks' matrices (optim.Muon), AdamW at lr for the rest: on one host, in the steps
    # the budget gives each, held-out loss 2.43-2.45 -> 2.33-2.36, copy probe 14-15% -> 38-80%, sums
    # 66-85% -> 95-99%, SFT tasks 51-61% -> 63-82% (two seeds; bench/README.md, "Muon")
    optimizer: str = "muon"
    eval_every: int = 200
    eval_batches: int = 32         # held-out batches per evaluation (the same windows every time)
    # copy spans and single-digit facts (data/pretrain_drills.txt, when the data has them; see
    # data/drills.py): drill_share of every batch's rows, from the first step (bench/README.md,
    # "Positions and copying": the spans form a copying head that works in unseen phrasings;
    # "What a worked sum needs": the facts are the table a worked sum chains). Optionally the
    # first copy_warmup_steps steps are small batches of copy spans alone (off: the head they
    # form is lost once text comes in). Half the rows (the file also holds worked question-answer
    # lines, data/pretrain.py): bench/README.md "The digit facts, again", "The budget, ..."
    copy_warmup_steps: int = 0
    copy_warmup_batch: int = 8
    copy_warmup_len: int = 128
    drill_share: float = 0.5
    # the share of wte's initial variance that comes from the text's character co-occurrence
    # (ppmi_embeddings; init_embeddings): 0 = random rows, 1 = co-occurrence alone; emb_keep: the
    # characters that keep their random rows (the digits and signs: in prose they fill the same
    # slots, and a worked sum must tell them apart). On since session 18: at the default run's
    # lengths it raised the SFT chat on both seeds tried (61 / 63% -> 69-75%, meta 55 / 65% ->
    # 67-72%), the tasks level on average (bench/README.md, "Character vectors from co-occurrence")
    emb_ppmi: float = 1.0
    emb_keep: str = "0123456789+-×÷="

    def validate(self, name: str = "pretrain"):
        super().validate(name)
        if not 0.0 <= self.emb_ppmi <= 1.0:
            raise ConfigError(f"{name}: emb_ppmi must be in [0, 1], got {self.emb_ppmi}")


TINY_OVERRIDES = {"max_steps": 60, "batch_size": 8, "eval_every": 30, "eval_batches": 4, "warmup_steps": 10}


def ppmi_matrix(ids, vocab_size: int, window: int = 2, cds: float = 0.75) -> np.ndarray:
    """Positive pointwise mutual information of the characters of `ids` (Levy, Goldberg and
    Dagan 2015): c(i, j) counts j within `window` places of i, either side, weighted 1/distance;
    PPMI(i, j) = max(0, log(c(i, j) * sum_k c_k ** cds / (c_i * c_j ** cds))), with c_i the row
    sums and cds the context-distribution smoothing; 0 where c(i, j) = 0. -> (V, V) float64."""
    ids, V = np.asarray(ids, np.int64), vocab_size
    counts = np.zeros(V * V)
    for d in range(1, window + 1):
        counts += np.bincount(ids[:-d] * V + ids[d:], minlength=V * V) / d
    counts = counts.reshape(V, V)
    counts += counts.T                                   # j after i, and j before i
    row = counts.sum(1)
    ctx = row ** cds
    pmi = np.zeros((V, V))
    nz = counts > 0                                      # then row[i] > 0 and ctx[j] > 0 too
    pmi[nz] = np.log(counts[nz] * ctx.sum() / (row[:, None] * ctx[None, :])[nz])
    return np.maximum(pmi, 0.0)


def ppmi_embeddings(ids, vocab_size: int, dim: int, window: int = 2, std: float = 0.02) -> np.ndarray:
    """Character vectors from co-occurrence: the top `dim` singular vectors of ppmi_matrix, each
    scaled by the square root of its singular value, rescaled so the characters that occur have
    element std `std` (nn.Embedding's init); characters with no positive PMI (those that never
    occur) get zero rows. Characters met in the same contexts ("冷" and "寒", "加" and "减")
    start near each other instead of at random. -> (vocab_size, dim) float64."""
    ppmi = ppmi_matrix(ids, vocab_size, window)
    seen = ppmi.any(1)
    # the left singular vectors and values of ppmi from the eigenvectors of ppmi @ ppmi.T
    # (eigenvalues s^2, ascending): 2-3x quicker than np.linalg.svd at 2,950 characters
    lam, u = np.linalg.eigh(ppmi @ ppmi.T)
    emb = u[:, ::-1][:, :dim] * np.maximum(lam[::-1][:dim], 0.0) ** 0.25
    emb[~seen] = 0.0
    scale = emb[seen].std() if seen.any() else 0.0
    return emb * (std / scale) if scale > 0 else emb


def init_embeddings(weight: np.ndarray, ids, share: float, keep=()) -> None:
    """wte's rows (random at nn.Embedding's std) <- sqrt(1 - share) * themselves + sqrt(share) *
    ppmi_embeddings at the same std, in place: the rows stay as spread as at random and about
    `share` of their variance says which characters share contexts. Co-occurrence alone (share 1)
    starts the ten digits at cosine 0.93-1.00 to each other and "+", "-", "=" at 1.00, the very
    symbols a worked sum must tell apart. Characters absent from the text, and the ids in `keep`,
    keep their random rows."""
    emb = ppmi_embeddings(ids, *weight.shape, std=float(weight.std()))
    seen = emb.any(1)
    seen[list(keep)] = False
    weight[seen] = (np.sqrt(1.0 - share) * weight[seen] + np.sqrt(share) * emb[seen]).astype(weight.dtype)


def curriculum_batch(step: int, cfg: PretrainConfig, ids, drill_ids, block_size: int, rng):
    """The batch of `step`: copy spans alone (copy_warmup_batch x copy_warmup_len) during the
    copy warm-up, then block_size windows with drill_share of the rows from the copy spans."""
    if drill_ids is None:
        return pretrain_batch(ids, cfg.batch_size, block_size, rng)
    if step < cfg.copy_warmup_steps:
        return pretrain_batch(drill_ids, cfg.copy_warmup_batch, min(cfg.copy_warmup_len, block_size), rng)
    return mixed_pretrain_batch(ids, drill_ids, cfg.drill_share, cfg.batch_size, block_size, rng)


def val_loss(model, val_ids, cfg, block_size, seed=0) -> float:
    """Mean loss over fixed held-out windows (the same windows at every evaluation)."""
    rng = np.random.default_rng(seed)
    T = min(block_size, len(val_ids) - 2)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = pretrain_batch(val_ids, cfg.batch_size, T, rng)
        losses.append(float(model(x, y)[1].data))
    return float(np.mean(losses))


def run(ctx) -> dict:
    cfg, mcfg, tok = ctx.cfg.pretrain, ctx.cfg.model, ctx.tokenizer
    cfg.validate("pretrain")
    train_text, val_text = load_split(ctx.data_dir, "pretrain", seed=ctx.seed)
    train_ids = np.array(tok.encode(train_text, allow_special=False), np.int64)
    val_ids = np.array(tok.encode(val_text, allow_special=False), np.int64)
    drills = load_drills(ctx.data_dir)
    drill_ids = np.array(tok.encode(drills, allow_special=False), np.int64) if drills else None
    T = mcfg.block_size

    model = GPT(mcfg, seed=ctx.seed)
    resume = load_resume(ctx, model, STAGE.name)
    if cfg.emb_ppmi and not resume:
        init_embeddings(model.transformer.wte.weight.data, train_ids, cfg.emb_ppmi,
                        keep=tok.encode(cfg.emb_keep, allow_special=False))
    step = [resume["step"] if resume else 0]           # get_batch is called once per step

    def get_batch(rng):
        step[0] += 1
        return curriculum_batch(step[0] - 1, cfg, train_ids, drill_ids, T, rng)

    def loss_fn(model, batch):
        x, y = batch
        return model(x, y)[1], {"tokens": x.size}

    def evaluate(model):
        loss = val_loss(model, val_ids, cfg, T)
        return {"loss": loss, "bpc": loss / math.log(2), "copy_acc": copy_probe(model, tok)["copy_acc"],
                "facts_acc": facts_probe(model, tok)}

    t0 = time.perf_counter()
    out = train(model, cfg, get_batch, loss_fn, stage="pretrain", logger=ctx.logger, evaluate=evaluate,
                save=make_saver(ctx, model, STAGE), resume=resume, shard=shard_rows,
                rng=np.random.default_rng(ctx.seed), show_progress=ctx.show_progress)
    dt = time.perf_counter() - t0
    first, last = out["evals"][0], out["evals"][-1]
    steps_run = len(out["history"])
    tok_s = steps_run * cfg.batch_size * T / dt if dt > 0 else 0.0
    return {"headline": f"held-out loss {last['loss']:.3f} ({last['bpc']:.2f} bits/char), "
                        f"copy probe {last['copy_acc']:.0%} (chance 10%), sums probe {last['facts_acc']:.0%}",
            "val_loss": last["loss"], "val_bpc": last["bpc"], "val_loss_start": first["loss"],
            "copy_acc": last["copy_acc"], "copy_acc_start": first["copy_acc"], "facts_acc": last["facts_acc"],
            "train_loss_end": out["history"][-1]["loss"] if out["history"] else None,
            "params": model.num_parameters(), "train_chars": len(train_text), "tokens_per_s": tok_s}


STAGE = Stage("pretrain", reads=(), writes="pretrain_final", config=PretrainConfig, tiny=TINY_OVERRIDES, run=run,
              data_parallel=True)
