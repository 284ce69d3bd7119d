"""tinygrad_llm: MyLLM from scratch on a NumPy autograd engine with Numba kernels.

The seed's public names are importable from here (lazily, so `import tinygrad_llm` stays cheap):
MyLLMTokenizer, GPT, GPTConfig, get_mini_config, get_tiny_config, RewardModel,
RewardModelTrainer, PPOTrainer, RLHFConfig, RLVFTrainer, RLVFConfig, MathVerifier, LogicVerifier.
"""
import importlib
import os

# Numba's parallel kernels run on GNU OpenMP, whose idle threads spin for a while after each
# kernel; on two cores they steal the CPU from the GEMM that comes next (the mini training step
# at 8x256: 2,770 tokens/s spinning, 3,620 with passive waits; bench/train_step.py). Numba's
# workqueue layer sleeps too, but costs 70 us per kernel launch against OpenMP's 5 us, which
# decoding cannot afford. Read when OpenMP starts (the first parallel kernel or thread setting)
# in this process; an explicit setting wins. bench/compare_torch.py runs PyTorch in a process of
# its own, which keeps PyTorch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "Tensor": "engine", "no_grad": "engine",
    "MyLLMTokenizer": "tokenizer",
    "GPT": "model",
    "GPTConfig": "config", "get_mini_config": "config", "get_tiny_config": "config",
    "RewardModel": "stages.reward_model", "RewardModelTrainer": "stages.reward_model",
    "PPOTrainer": "stages.rlhf", "RLHFConfig": "stages.rlhf",
    "RLVFTrainer": "stages.rlvf", "RLVFConfig": "stages.rlvf",
    "MathVerifier": "stages.verifiers", "LogicVerifier": "stages.verifiers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tinygrad_llm' has no attribute {name!r}")
