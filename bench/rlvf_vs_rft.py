"""GRPO against rejection-sampling fine-tuning (RFT), from the same checkpoint, same rollouts.

    python bench/rlvf_vs_rft.py                                  # from checkpoints/sft_final
    python bench/rlvf_vs_rft.py --init checkpoints/rlhf_final.safetensors --iters 30

Both methods see the same number of sampled replies: each iteration draws --tasks tasks
from rlvf_data.json and samples a group of --group replies per task (temperature 1).
- GRPO: the RLVF stage's trainer (stages/rlvf.py, RLVFConfig defaults unless overridden, so
  its tasks come from the curriculum sampler).
- RFT (a.k.a. STaR / expert iteration, "SFT on the model's own verified-correct samples"):
  the replies the verifier accepts (one per distinct text) become an SFT batch, loss on the
  reply tokens, one AdamW step per iteration at --rft-lr; tasks drawn in plain epochs (RFT
  learns only from solved tasks, so it has no use for the curriculum's difficulty weights).
Before and after, both report greedy accuracy on rlvf_val.json (overall, math, logic) and
pass@1 / pass@4 from 8 samples. Results: runs/bench/rlvf_vs_rft.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import common as C
from tinygrad_llm.checkpoint import config_from_meta, load_into, read_metadata
from tinygrad_llm.data import load_split
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import AdamW, clip_grad_norm
from tinygrad_llm.stages.rlvf import RLVFConfig, RLVFTrainer, TaskSampler
from tinygrad_llm.stages.policy import build_batch, rollout
from tinygrad_llm.stages.verifiers import verify_task
from tinygrad_llm.tokenizer import MyLLMTokenizer


def load(path):
    meta = read_metadata(path)
    model = GPT(config_from_meta(meta, path))
    load_into(model, path)
    return model


def rft(model, tok, tasks, cfg: RLVFConfig, iters: int, lr: float, rng) -> list[dict]:
    """Rejection-sampling fine-tuning: sample, keep verified-correct distinct replies, one SFT step."""
    opt = AdamW(list(model.named_parameters()), lr=lr, weight_decay=0.0)
    sampler = TaskSampler(tasks, rng, cfg.samples_per_task, curriculum=False)
    hist = []
    for it in range(iters):
        batch = sampler.draw(cfg.tasks_per_iter)
        model.eval()
        ro = rollout(model, tok, [t["prompt"] for t in batch], samples=cfg.samples_per_task,
                     temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, rng=rng)
        row_tasks = [t for t in batch for _ in range(cfg.samples_per_task)]
        ok = np.array([verify_task(t, r) and f for t, r, f in zip(row_tasks, ro.texts, ro.finished)])
        keep, seen = [], set()
        for i in np.flatnonzero(ok):
            if (row_tasks[i]["prompt"], ro.texts[i]) not in seen:
                seen.add((row_tasks[i]["prompt"], ro.texts[i]))
                keep.append(i)
        if keep:
            x, y, m = build_batch([ro.prompts[i] for i in keep], [ro.replies[i] for i in keep], model.dtype)
            _, loss = model(x, y, loss_mask=m)
            loss.backward()
            clip_grad_norm(model.parameters(), cfg.grad_clip)
            opt.step(lr)
            opt.zero_grad()
        hist.append({"iter": it, "accuracy": float(ok.mean()), "kept": len(keep)})
    return hist


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=os.path.join(C.ROOT, "checkpoints", "sft_final.safetensors"))
    ap.add_argument("--data-dir", default=os.path.join(C.ROOT, "data"))
    ap.add_argument("--vocab", default=os.path.join(C.ROOT, "checkpoints", "vocab.json"))
    ap.add_argument("--iters", type=int, default=RLVFConfig.num_iterations)
    ap.add_argument("--tasks", type=int, default=RLVFConfig.tasks_per_iter)
    ap.add_argument("--group", type=int, default=RLVFConfig.samples_per_task)
    ap.add_argument("--rft-lr", type=float, default=1e-4)
    ap.add_argument("--methods", default="grpo,rft")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    C.setup_threads(args.threads)
    tok = MyLLMTokenizer().load(args.vocab)
    train_tasks, val_tasks = load_split(args.data_dir, "rlvf", seed=args.seed)
    cfg = RLVFConfig(num_iterations=args.iters, tasks_per_iter=args.tasks, samples_per_task=args.group)
    results = {}
    for method in args.methods.split(","):
        policy = load(args.init)
        trainer = RLVFTrainer(policy, tok, policy.config, cfg, seed=args.seed)
        t0 = time.perf_counter()
        before = trainer.evaluate(val_tasks)
        if method == "grpo":
            hist = trainer.train(train_tasks)
        else:
            hist = rft(policy, tok, train_tasks, cfg, args.iters, args.rft_lr, np.random.default_rng(args.seed))
        after = trainer.evaluate(val_tasks)
        results[method] = {k: {kk: v for kk, v in e.items() if kk != "replies"} for k, e in (("before", before), ("after", after))}
        results[method]["time_s"] = time.perf_counter() - t0
        results[method]["history"] = hist
        print(f"{method}: greedy {before['accuracy']:.1%} -> {after['accuracy']:.1%}  "
              f"math {before.get('math_accuracy', 0):.1%} -> {after.get('math_accuracy', 0):.1%}  "
              f"logic {before.get('logic_accuracy', 0):.1%} -> {after.get('logic_accuracy', 0):.1%}  "
              f"pass@1 {before['pass@1']:.1%} -> {after['pass@1']:.1%}  pass@4 {before['pass@4']:.1%} -> {after['pass@4']:.1%}",
              flush=True)
    os.makedirs(C.OUT_DIR, exist_ok=True)
    with open(os.path.join(C.OUT_DIR, "rlvf_vs_rft.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
