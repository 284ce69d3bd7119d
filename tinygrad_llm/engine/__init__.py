"""The autograd engine: Tensor and reverse-mode autodiff on NumPy, every op with its backward
right below its forward. In reading order:

    tensor.py     Tensor, the graph, backward(), no_grad(), and what makes a function an op
    ops.py        primitive ops (elementwise, matmul, reductions, shape ops, softmax) and the
                  few composed from them (mean, transpose, stack, split)
    fused.py      fused layers with hand-written backward: linear, lora_linear, embedding, dropout,
                  layer_norm, cross_entropy
    attention.py  causal attention by query blocks, RoPE, smeared keys
    profiler.py   per-op call counts and forward / backward time

Everything public is importable from here: `from tinygrad_llm import engine as E; E.matmul(a, b)`.
The engine builds on kernels/ (the loops between matmuls) and runtime.py (the threaded GEMMs).
"""
from .attention import (apply_rope, apply_rope_transposed, causal_self_attention, rope_table,
                        rotate_half, scaled_dot_product_attention, smear_keys, smear_keys_array)
from .fused import (cross_entropy, dropout, embedding, get_rng_state, layer_norm, linear, lora_linear,
                    manual_seed, set_rng_state)
from .ops import (add, cast, clip, concatenate, div, exp, gelu, getitem, log, log_softmax, logsigmoid,
                  masked_fill, matmul, maximum, mean, minimum, mul, neg, permute, power, reduce_max,
                  reduce_sum, relu, reshape, scatter, sigmoid, sigmoid_array, softmax, split, sqrt, stack, sub,
                  tanh, transpose)
from .profiler import Profiler, profile
from .tensor import Tensor, constant, no_grad, op, op_output, unbroadcast
