"""Run alone or under `mpiexec -n N` by tests/test_data_parallel.py: train tiny float64 models
(dropout off) for STEPS steps through loop.train on fixed global batches, for each of the three
ways a stage splits its batch (distributed.py), and write this rank's parameters to
OUT/rank<r>.npz (keys "<kind>/<parameter>").

    python tests/dp_worker.py OUT            # one process: the reference
    mpiexec -n 2 python tests/dp_worker.py OUT

- rows: a mean over equal rows (pretrain, shard_rows);
- masked: a mean over loss-mask tokens, rows holding different numbers of them, and a batch
  that does not split evenly (SFT: shard_rows with count=);
- pairs: a Bradley-Terry mean over (chosen, rejected) pairs (RewardModelTrainer.shard)."""
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygrad_llm.config import LoopConfig, get_tiny_config  # noqa: E402
from tinygrad_llm.distributed import shard_rows, world  # noqa: E402
from tinygrad_llm.loop import train  # noqa: E402
from tinygrad_llm.model import GPT  # noqa: E402
from tinygrad_llm.stages.reward_model import RewardConfig, RewardModel, RewardModelTrainer  # noqa: E402

STEPS, V, B, T = 3, 50, 5, 12         # B = 5: two ranks get 2 and 3 rows
# pretrain's lr (3 steps move every weight visibly); grad_clip small enough to clip (global norm)
CFG = LoopConfig(max_steps=STEPS, batch_size=B, lr=2e-3, warmup_steps=1, eval_every=0, log_every=1, grad_clip=0.5)
MCFG = dataclasses.replace(get_tiny_config(vocab_size=V), dropout=0.0, block_size=T)


def windows(rng):
    x = rng.integers(0, V, (B, T))
    return x, np.roll(x, -1, axis=1)


def masked(rng):
    x, y = windows(rng)
    m = (rng.random((B, T)) < rng.random((B, 1))).astype(np.float64)    # rows with 0 .. T tokens
    return x, y, m


def run(kind: str) -> dict:
    dist = world()
    if kind == "pairs":
        model = RewardModel(MCFG, seed=3, dtype=np.float64)
        trainer = RewardModelTrainer(model, tokenizer=None, config=RewardConfig())

        def get_batch(rng):
            idx = rng.integers(0, V, (2 * B, T))
            return idx, rng.integers(1, T, 2 * B), B

        loss_fn, shard = trainer.loss_fn, trainer.shard
        # as the reward stage does: reward_head.bias cancels in r_c - r_r, its gradient is pure
        # rounding, which Adam would scale up to lr-sized steps (one process and two alike)
        params = [(k, p) for k, p in model.named_parameters() if k != "reward_head.bias"]
    else:
        model = GPT(MCFG, seed=3, dtype=np.float64)
        params = None
        get_batch = windows if kind == "rows" else masked

        def loss_fn(model, batch):
            x, y, *m = batch
            return model(x, y, loss_mask=m[0] if m else None)[1], {"tokens": x.size}

        shard = shard_rows if kind == "rows" else (lambda b, r, n: shard_rows(b, r, n, count=b[2].sum(axis=1)))
    if dist.rank == 1:               # a rank that starts from other weights: the broadcast must fix it
        for p in model.parameters():
            p.data += 1.0
    train(model, CFG, get_batch, loss_fn, stage=kind, rng=np.random.default_rng(11), shard=shard,
          params=params, show_progress=False)
    return {f"{kind}/{k}": v for k, v in model.state_dict().items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    arrays = {}
    for kind in ("rows", "masked", "pairs"):
        arrays.update(run(kind))
    np.savez(out / f"rank{world().rank}.npz", **arrays)
