"""Which side of each kernel pair runs: the Numba kernel or its NumPy reference, per family.

    set_kernel_backend("numpy")                 # every family on the references
    set_kernel_backend({"gelu": "numpy"})        # one family only
    TINYGRAD_LLM_KERNELS=numpy python train.py   # env var: forces the references, wins over code

Every family's dispatcher asks `use_numba(family)`. `DEFAULT_BACKEND` records what
bench/kernels.py measured at the mini model's shapes: a family whose kernel does not beat its
reference stays on "numpy" (STYLE.md: a kernel earns its place).
"""
import os

# the families, in llm.c's order (forward pass, loss, optimizer)
KERNELS = ("embedding", "layernorm", "attn_softmax", "attention", "decode", "rope", "smear", "gelu", "dropout", "softmax",
           "ce", "adamw")
BACKENDS = ("numba", "numpy")

# Filled from bench/kernels.py at the mini shapes (runs/bench/kernels*.json): every kernel won.
# "attention"'s "numpy" side is not a reference but the engine's blocked BLAS GEMMs
# (engine/attention.py); the fused kernel (kernels/attention.py) beat it at the pipeline's 2
# threads, 1.06-1.25x per training step on a quiet machine (1.14x at 16x256 on 2026-12-06), and
# over a whole `--stage all` run (bench/README.md, "Closer to the machine"). At one thread or on
# a busy machine it was slower (0.77-0.96x of the attention op): set {"attention": "numpy"} there.
DEFAULT_BACKEND = {k: "numba" for k in KERNELS}


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


# the env var is read once at import; when set it overrides whatever code asks for
_FORCED = os.environ.get("TINYGRAD_LLM_KERNELS") or None
if _FORCED is not None:
    _check_backend(_FORCED)
_chosen = dict(DEFAULT_BACKEND)


def set_kernel_backend(choice):
    """choice: "numba" | "numpy" (all families), {family: backend} (some), or "default"."""
    if choice == "default":
        _chosen.update(DEFAULT_BACKEND)
    elif isinstance(choice, str):
        _chosen.update({k: _check_backend(choice) for k in KERNELS})
    else:
        unknown = set(choice) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernel families {sorted(unknown)}; expected {KERNELS}")
        _chosen.update({k: _check_backend(v) for k, v in choice.items()})


def get_kernel_backend():
    """-> {family: "numba" | "numpy"}, the backend each dispatcher uses right now."""
    return {k: _FORCED or v for k, v in _chosen.items()}


def use_numba(family: str) -> bool:
    """True when `family`'s dispatcher should run the Numba kernel."""
    return (_FORCED or _chosen[family]) == "numba"
