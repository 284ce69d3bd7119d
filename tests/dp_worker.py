"""Run alone or under `mpiexec -n N` by tests/test_data_parallel.py: train tiny float64 models
(dropout off) for STEPS steps through loop.train on fixed global batches, for each of the three
ways a stage splits its batch (distributed.py), and write this rank's parameters to
OUT/rank<r>.npz (keys "<kind>/<parameter>").

    python tests/dp_worker.py OUT [KIND ...]          # one process: the reference
    mpiexec -n 2 python tests/dp_worker.py OUT [KIND ...]   # default: every kind below

- rows: a mean over equal rows (pretrain, shard_rows);
- masked: a mean over loss-mask tokens, rows holding different numbers of them, and a batch
  that does not split evenly (SFT: shard_rows with count=);
- pairs: a Bradley-Terry mean over (chosen, rejected) pairs (RewardModelTrainer.shard);
- dpo: DPO's loss on (chosen, rejected) reply pairs against a frozen reference (dpo.shard_pairs);
- gaps: masked, but a step where rank 1's rows hold no loss token and a step where no row does:
  a rank (or every rank) without a loss joins the Allreduce with nothing (loss_fn -> None);
- grpo: RLVF's GRPO on a digits tokenizer (RLVFTrainer.shard: each rank samples whole groups);
  also writes each step's logged figures and whether this rank had a loss ("grpo_log/...");
- ppo: RLHF's PPO, policy and critic (PPOTrainer.shard: each rank samples its prompts' replies)."""
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygrad_llm.config import LoopConfig, get_tiny_config  # noqa: E402
from tinygrad_llm.distributed import shard_rows, world  # noqa: E402
from tinygrad_llm.loop import train  # noqa: E402
from tinygrad_llm.model import GPT  # noqa: E402
from tinygrad_llm.stages.dpo import dpo_loss, reply_logprobs, shard_pairs  # noqa: E402
from tinygrad_llm.stages.policy import frozen, logprobs_no_grad  # noqa: E402
from tinygrad_llm.stages.reward_model import RewardConfig, RewardModel, RewardModelTrainer  # noqa: E402
from tinygrad_llm.stages.rlhf import PPOTrainer, RLHFConfig  # noqa: E402
from tinygrad_llm.stages.rlvf import RLVFConfig, RLVFTrainer  # noqa: E402
from tinygrad_llm.tokenizer import MyLLMTokenizer  # noqa: E402

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


def gaps():
    """get_batch: masked() batches, but at step 1 rows 2-4 (rank 1's of 2) hold no loss token, and
    at step 2 no row does."""
    steps = iter(range(STEPS))

    def get_batch(rng):
        x, y, m = masked(rng)
        m[{1: 2, 2: 0}.get(next(steps), B):] = 0
        return x, y, m
    return get_batch


def grpo_tokenizer():
    return MyLLMTokenizer(vocab_size=8).build_vocab("01")          # a one-digit reply is right 1 time in 8


def grpo_model(tok):
    return GPT(dataclasses.replace(get_tiny_config(vocab_size=len(tok)), dropout=0.0), seed=3, dtype=np.float64)


def run_grpo() -> dict:
    """A few GRPO iterations (inner_epochs 2) with the curriculum on, 5 groups (2 + 3 on two ranks),
    one task kind never solvable (its groups carry no signal) -> parameters and the logged figures."""
    tok = grpo_tokenizer()
    model = grpo_model(tok)
    # prompts of different lengths: the ranks' batches are padded differently
    tasks = [{"type": "math", "prompt": "问" * (1 + i), "expected_answer": a, "kind": k}
             for i, (a, k) in enumerate([("1", "one"), ("0", "zero"), ("10", "never")] * 3)]
    cfg = RLVFConfig(num_iterations=4, samples_per_task=6, tasks_per_iter=5, max_new_tokens=1, lr=1e-2,
                     warmup_steps=0, inner_epochs=2, format_reward=0.0, eval_samples=0, seed=3)
    trainer = RLVFTrainer(model, tok, None, cfg)
    had_loss = record_losses(trainer)
    history = trainer.train(tasks)
    log = {f"grpo_log/{k}": np.array([h[k] for h in history], np.float64)
           for k in ("loss", "grad_norm", "kl", "pg", "reward", "accuracy", "zero_var_share", "entropy")}
    log["grpo_log/had_loss"] = np.array(had_loss)
    return {**{f"grpo/{k}": v for k, v in model.state_dict().items()}, **log}


def record_losses(trainer) -> list:
    """Wrap trainer.loss_fn -> the list it fills: whether this rank had a loss at each step."""
    had_loss, loss_fn = [], trainer.loss_fn

    def recording(model, b):
        loss, metrics = loss_fn(model, b)
        had_loss.append(loss is not None)
        return loss, metrics

    trainer.loss_fn = recording
    return had_loss


PPO_PROMPTS = ["你好", "1+1等于几？", "什么是机器学习？", "太阳从哪边升起？", "讲个故事", "你是谁？"]


def ppo_models():
    """-> tokenizer, policy, reward model (float64, dropout off) for run_ppo."""
    tok = MyLLMTokenizer().build_vocab(PPO_PROMPTS)
    mcfg = dataclasses.replace(get_tiny_config(vocab_size=len(tok)), dropout=0.0)
    return tok, GPT(mcfg, seed=3, dtype=np.float64), RewardModel.from_pretrained(GPT(mcfg, seed=4, dtype=np.float64))


def run_ppo() -> dict:
    """Two PPO episodes of 5 prompts (2 + 3 on two ranks) in minibatches of 2, 2, 1 (some hold no
    row of a rank) -> policy and critic parameters and the logged figures ("ppo_log/...")."""
    tok, policy, rm = ppo_models()
    cfg = RLHFConfig(num_episodes=2, prompts_per_episode=5, minibatch_size=2, ppo_epochs=2, max_new_tokens=5,
                     warmup_steps=0, lr=1e-3)
    trainer = PPOTrainer(policy, rm, tok, None, cfg, seed=7)
    had_loss = record_losses(trainer)
    history = trainer.train(PPO_PROMPTS)
    log = {f"ppo_log/{k}": np.array([h[k] for h in history], np.float64)
           for k in ("loss", "grad_norm", "pg_loss", "value_loss", "approx_kl", "clip_frac", "entropy", "ratio_min",
                     "ratio_max", "score", "kl", "explained_var", "reply_len")}
    log["ppo_log/had_loss"] = np.array(had_loss)
    return {**{f"ppo/{k}": v for k, v in trainer.model.state_dict().items()}, **log}


def run(kind: str) -> dict:
    dist = world()
    if kind == "grpo":
        return run_grpo()
    if kind == "ppo":
        return run_ppo()
    if kind == "dpo":
        model = GPT(MCFG, seed=3, dtype=np.float64)
        ref = frozen(GPT(MCFG, seed=4, dtype=np.float64))
        params = None

        def get_batch(rng):
            x, y = rng.integers(0, V, (2 * B, T)), rng.integers(0, V, (2 * B, T))
            m = (np.arange(T)[None, :] >= rng.integers(1, T - 1, (2 * B, 1))).astype(np.float64)   # reply tokens
            return x, y, m, (logprobs_no_grad(ref, x, y) * m).sum(1)

        def loss_fn(model, batch):
            x, y, m, ref_logp = batch
            return dpo_loss(reply_logprobs(model, x, y, m), ref_logp, 0.5)[0], {"tokens": int(m.sum())}

        shard = shard_pairs
    elif kind == "pairs":
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
        get_batch = {"rows": windows, "masked": masked, "gaps": gaps()}[kind]

        def loss_fn(model, batch):
            x, y, *m = batch
            if m and not m[0].any():         # nothing to learn in these rows
                return None, {"tokens": 0}
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
    for kind in sys.argv[2:] or ("rows", "masked", "pairs", "dpo", "gaps", "grpo", "ppo"):
        arrays.update(run(kind))
    np.savez(out / f"rank{world().rank}.npz", **arrays)
