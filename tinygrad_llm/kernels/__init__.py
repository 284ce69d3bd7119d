"""Kernels for the hot paths between matmuls: one file per family, each a NumPy reference beside
a Numba kernel, in llm.c's order inside every file: reference, Numba kernel, dispatcher.

    embedding.py     embedding backward (scatter-add of rows)
    layernorm.py     LayerNorm forward / backward
    attn_softmax.py  the causal softmax inside attention
    attention.py     fused causal attention forward / backward (no (T, T) matrix kept)
    decode.py        one new token's attention over the KV cache, and a whole batch-1 step (generation)
    rope.py          the head split with RoPE on q, k, and its backward (one pass each)
    smear.py         smeared keys: each key mixed with the previous token's, and the backward
    gelu.py          GELU (tanh approximation)
    dropout.py       dropout masks from a counter-based hash
    softmax.py       softmax over the last axis
    crossentropy.py  fused cross-entropy over the vocabulary
    adamw.py         the AdamW update, in place
    _helpers.py      the Numba pieces they share (exp for t <= 0, row reductions, softmax rows)
    _tiles.py        register-tiled small matrix products (the fused attention's GEMMs)
    backend.py       which side of each pair runs (set_kernel_backend, TINYGRAD_LLM_KERNELS)

Every op comes as a pair with one signature: `<op>_ref` is the plain, vectorized NumPy algorithm
(the readable reference and the fallback), `<op>_nb` the fused Numba kernel (one pass per row,
`prange` over rows, no temporaries, `cache=True`). The engine calls the dispatcher `<op>`, which
picks one of the two per family (backend.py). The `_nb` functions allocate their outputs with
NumPy, which asks the kernel for huge pages (Numba's own allocator faults in 4 KB pages: +16 ms
per (2048, 6400) float32 array on this VM); outputs are C-contiguous, so the reshapes inside are
views the kernels write through.

Dtypes: float32 or float64 in, the same dtype out, never upcast. Row sums inside kernels use
float64 accumulators (more accurate than a float32 running sum, and cheap); everything else is
computed in the input dtype. All arrays are C-contiguous. Numba settings: fastmath stays off, so
results are reproducible and LLVM may not reorder a sum; we write sums with 8 accumulators
ourselves (a fixed order). error_model="numpy" makes x / 0 give inf like NumPy instead of raising,
which removes a branch per division and lets elementwise loops vectorize. libm's expf cannot be
vectorized, so float32 kernels use their own polynomial exp (`_helpers.exp_neg`, within 1 ulp).

Kernels import only NumPy and Numba; the engine builds on them.
"""
from .adamw import adamw_update, adamw_update_nb, adamw_update_ref
from .attention import attention_bwd_nb, attention_bwd_ref, attention_fwd_nb, attention_fwd_ref
from .attn_softmax import (attn_softmax_bwd, attn_softmax_bwd_nb, attn_softmax_bwd_ref, attn_softmax_fwd,
                           attn_softmax_fwd_nb, attn_softmax_fwd_ref)
from .backend import BACKENDS, DEFAULT_BACKEND, KERNELS, get_kernel_backend, set_kernel_backend, use_numba
from .decode import (DecodeWeights, decode_attention, decode_attention_nb, decode_attention_ref, decode_token,
                     decode_token_nb, decode_token_ref, transpose_into)
from .crossentropy import ce_bwd, ce_bwd_nb, ce_bwd_ref, ce_fwd, ce_fwd_nb, ce_fwd_ref
from .dropout import dropout_bwd, dropout_bwd_nb, dropout_bwd_ref, dropout_fwd, dropout_fwd_nb, dropout_fwd_ref
from .embedding import embedding_bwd, embedding_bwd_nb, embedding_bwd_ref
from .gelu import GELU_A, GELU_K, gelu_bwd, gelu_bwd_nb, gelu_bwd_ref, gelu_fwd, gelu_fwd_nb, gelu_fwd_ref
from .layernorm import (layernorm_bwd, layernorm_bwd_nb, layernorm_bwd_ref, layernorm_fwd, layernorm_fwd_nb,
                        layernorm_fwd_ref)
from .rope import rope_merge, rope_merge_nb, rope_merge_ref, rope_split, rope_split_nb, rope_split_ref
from .smear import smear_bwd, smear_bwd_nb, smear_bwd_ref, smear_fwd, smear_fwd_nb, smear_fwd_ref, smear_weight
from .softmax import softmax_bwd, softmax_bwd_nb, softmax_bwd_ref, softmax_fwd, softmax_fwd_nb, softmax_fwd_ref
