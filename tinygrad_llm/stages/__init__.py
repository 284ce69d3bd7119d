"""The five stages in training order, then DPO (its own stage, not in `--stage all`). Each
module declares itself as STAGE (common.Stage: the checkpoints it reads and writes, its config,
its tiny overrides, its run); train.py derives its stage graph, command line and checkpoint
names from these. policy.py is the RL toolkit that PPO (rlhf.py), GRPO (rlvf.py) and DPO share."""
import importlib

MODULES = ("pretrain", "sft", "reward_model", "rlhf", "rlvf", "dpo")


def load_stages() -> dict:
    """{stage name: its Stage}, in training order (imports the stage modules)."""
    stages = [importlib.import_module(f".{m}", __name__).STAGE for m in MODULES]
    return {s.name: s for s in stages}
