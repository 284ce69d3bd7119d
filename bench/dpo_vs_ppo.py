"""DPO vs reward model + PPO from the same SFT checkpoint, on held-out data only:

- preference accuracy on the held-out pairs (reward_val.json): the reward model's pairwise
  accuracy, and each policy's implicit reward beta * log(pi / pi_SFT) (DPO's; for PPO the same
  formula read off its weights; a tie counts one half, so SFT itself scores 50%);
- the reward model's mean score of sampled replies to held-out prompts (the RLHF stage's own
  evaluation: the same prompts, temperature and seeded draws for every model), with the KL to
  SFT (nats per reply), the share that close and the share of distinct replies;
- the chat evaluation (chat_eval.py, test half) of greedy replies.

    python bench/dpo_vs_ppo.py --sft REF/sft_final.safetensors \\
        --rm REF/reward_model.safetensors --policy PPO=REF/rlhf_final.safetensors \\
        --policy DPO=checkpoints/dpo_final.safetensors

Training times are not measured here: they are the stages' own (runs/<run-id>/summary.json).
Writes runs/bench/dpo_vs_ppo.json."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import common as C


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=os.path.join(C.ROOT, "checkpoints", "sft_final.safetensors"))
    ap.add_argument("--rm", default=os.path.join(C.ROOT, "checkpoints", "reward_model.safetensors"))
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="a policy trained from --sft (repeatable)")
    ap.add_argument("--data-dir", default=os.path.join(C.ROOT, "data"))
    ap.add_argument("--beta", type=float, default=None, help="implicit-reward scale (default: DPOConfig's)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = C.setup_threads(args.threads)

    from tinygrad_llm import chat_eval
    from tinygrad_llm.checkpoint import load_gpt, load_into
    from tinygrad_llm.data import load_split
    from tinygrad_llm.stages.dpo import DPOConfig, encode_pairs, implicit_rewards, pair_logprobs, reward_stats
    from tinygrad_llm.stages.reward_model import RewardConfig, RewardModel, RewardModelTrainer
    from tinygrad_llm.stages.policy import prompt_split
    from tinygrad_llm.stages.rlhf import PPOTrainer, RLHFConfig

    beta = args.beta or DPOConfig().beta
    sft, tok = load_gpt(args.sft)
    rm = RewardModel(sft.config)
    load_into(rm, args.rm, tok.fingerprint())
    rm.tokenizer = tok
    policies = {"SFT": sft, **{n: load_gpt(p)[0] for n, p in (s.split("=", 1) for s in args.policy)}}

    _, val_pairs = load_split(args.data_dir, "reward", seed=args.seed)
    enc, kept = encode_pairs(tok, val_pairs, sft.config.block_size)       # the pairs that fit the context
    scorer = RewardModelTrainer(rm, tok, RewardConfig(lm_coef=rm.lm_coef))   # the checkpoint's own score
    rm_acc = scorer.pair_stats(scorer.encode([val_pairs[i] for i in kept]))["accuracy"]
    ref_logp = pair_logprobs(sft, enc)
    rlhf_cfg = RLHFConfig()
    _, _, val_prompts = prompt_split(args.data_dir, args.seed, rlhf_cfg.eval_prompts)
    judge = PPOTrainer(sft, rm, tok, rlhf_config=rlhf_cfg, ref_model=sft, seed=args.seed)
    chat_items = chat_eval.dev_test_split(chat_eval.load_chat_eval(args.data_dir))[1]

    rows = {}
    for name, model in policies.items():
        t0 = time.perf_counter()
        r = implicit_rewards(model, ref_logp, enc, beta)
        ev = judge.evaluate(val_prompts, model=model)             # the same seeded draws for every model
        chat = chat_eval.evaluate_chat(model, tok, chat_items, max_new_tokens=rlhf_cfg.chat_eval_tokens, batch=32)
        rows[name] = {"implicit_accuracy": reward_stats(r[:, 0], r[:, 1])["accuracy"], "rm_score": ev["score"],
                      "kl": ev["kl"], "eos_rate": ev["eos_rate"], "distinct": ev["distinct"],
                      **chat_eval.flat(chat), "eval_s": time.perf_counter() - t0}
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}, flush=True)

    print(f"\nheld-out pairs: {len(enc)} (reward model's pairwise accuracy {rm_acc:.1%}); held-out prompts: "
          f"{len(val_prompts)} x {rlhf_cfg.eval_samples} samples at T={rlhf_cfg.temperature}; chat test half: "
          f"{len(chat_items)} prompts; beta {beta:g}; load average {C.loadavg()}\n")
    print(C.table(["policy", "implicit-reward acc", "RM score", "KL to SFT", "closes", "distinct", "chat acceptable",
                   "benign refused", "harmful refused"],
                  [(n, f"{x['implicit_accuracy']:.1%}", f"{x['rm_score']:+.2f}", f"{x['kl']:.2f}", f"{x['eos_rate']:.0%}",
                    f"{x['distinct']:.0%}", f"{x['chat_acceptable']:.0%}", f"{x['chat_refusal']:.0%}",
                    f"{x['chat_harmful_refusal']:.0%}") for n, x in rows.items()]))
    print("wrote", C.write_json("dpo_vs_ppo", {"meta": C.meta(threads, sft=args.sft, rm=args.rm, policies=args.policy,
                                                              beta=beta), "rm_pairwise_accuracy": rm_acc, "rows": rows}))


if __name__ == "__main__":
    main()
