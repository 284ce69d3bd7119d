"""The five stages in training order. Each module declares itself as STAGE (common.Stage: the
checkpoints it reads and writes, its config, its tiny overrides, its run); train.py derives
its stage graph, command line and checkpoint names from these. policy.py is the RL toolkit
that PPO (rlhf.py) and GRPO (rlvf.py) share."""
import importlib

MODULES = ("pretrain", "sft", "reward_model", "rlhf", "rlvf")


def load_stages() -> dict:
    """{stage name: its Stage}, in training order (imports the stage modules)."""
    stages = [importlib.import_module(f".{m}", __name__).STAGE for m in MODULES]
    return {s.name: s for s in stages}
