"""tinygrad_llm: MyLLM from scratch on a NumPy autograd engine with Numba kernels.

The seed's public names are importable from here (lazily: `import tinygrad_llm` loads only
runtime.py and NumPy):
MyLLMTokenizer, GPT, GPTConfig, get_mini_config, get_tiny_config, RewardModel,
RewardModelTrainer, PPOTrainer, RLHFConfig, RLVFTrainer, RLVFConfig, MathVerifier, LogicVerifier.
"""
import importlib

# CPU tuning (OpenMP waits, glibc's malloc) is set when runtime.py is imported: here, first, before
# any kernel starts OpenMP or any step allocates. runtime.py's docstring says what each buys.
from .runtime import KEEPS_FREED_MEMORY  # noqa: F401

# exit codes of the command lines (train.py, inference.py, python -m tinygrad_llm.inspect)
EXIT_BAD_INPUT = 2         # a bad flag, data file, config or checkpoint: one line on stderr, nothing written
EXIT_NONFINITE = 3         # training stopped on a NaN/Inf before it touched the weights
EXIT_INTERRUPTED = 130     # Ctrl-C / SIGTERM: a resumable checkpoint was written

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
