"""tinygrad_llm: MyLLM from scratch on a NumPy autograd engine with Numba kernels.

The seed's public names are importable from here (lazily, so `import tinygrad_llm` stays cheap):
MyLLMTokenizer, GPT, GPTConfig, get_mini_config, get_tiny_config, RewardModel,
RewardModelTrainer, PPOTrainer, RLHFConfig, RLVFTrainer, RLVFConfig, MathVerifier, LogicVerifier.
"""
import ctypes
import importlib
import os
import sys

# Numba's parallel kernels run on GNU OpenMP, whose idle threads spin for a while after each
# kernel; on two cores they steal the CPU from the GEMM that comes next (the mini training step
# at 8x256: 2,770 tokens/s spinning, 3,620 with passive waits; bench/train_step.py). Numba's
# workqueue layer sleeps too, but costs 70 us per kernel launch against OpenMP's 5 us, which
# decoding cannot afford. Read when OpenMP starts (the first parallel kernel or thread setting)
# in this process; an explicit setting wins. bench/compare_torch.py runs PyTorch in a process of
# its own, which keeps PyTorch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")     # (was in kernels.py; libgomp busy-waits otherwise)


def _keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default every block over 128 kB-32 MB is its own mmap, returned to the OS on free; a
    training step allocates and frees hundreds of MB of activations and gradients (the logits
    alone are B*T*V*4 bytes: 105 MB at 16x256), so every step first-touches them again: ~35,000
    page faults per 16x256 step, each zeroing a 4 kB page. With mmap off and the heap never
    trimmed, the freed blocks are reused: 16x256 steps went from 3,457 / 3,834 to 4,299 / 4,391
    tokens/s in alternating processes (bench/README.md), peak memory unchanged. Skipped off glibc, when the user set any
    MALLOC_* variable, or with TINYGRAD_LLM_KEEP_MEMORY=0 (glibc's default, for comparison)."""
    if (sys.platform != "linux" or os.environ.get("TINYGRAD_LLM_KEEP_MEMORY") == "0"
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                      # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


KEEPS_FREED_MEMORY = _keep_freed_memory()

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
