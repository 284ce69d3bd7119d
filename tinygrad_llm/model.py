"""GPT (nanoGPT layout, pre-LayerNorm, tied lm_head), batched generation with a KV cache,
and the scalar head used by the reward model and the PPO critic.

Positions (GPTConfig.pos_emb, rope_base, smear_keys). A token's position p counts from 0 at
the first real (non-padding) token of its row; `hidden_states(positions=...)` takes (T,) or
(B, T) ids, and generation passes per-row ones for left-padded prompts.

- pos_emb="learned" (GPTConfig's default; get_mini_config uses "rope", which measured better): x = wte[idx] + wpe[p], parameter
  `transformer.wpe.weight` (block_size, C), as GPT-2 / nanoGPT.
- pos_emb="rope": no wpe parameter at all. In every layer, after c_attn's split into heads
  of size hs, q and k of every head are rotated (rotate-half convention of GPT-NeoX /
  Hugging Face LLaMA):
      inv_freq_j = rope_base^(-2j/hs), j < hs/2;  f = p * inv_freq;  cos, sin = cos([f, f]), sin([f, f])
      q' = q*cos + rotate_half(q)*sin,  k' = k*cos + rotate_half(k)*sin,  rotate_half([x1, x2]) = [-x2, x1]
  so q'.k' depends on positions only through their difference. The cos/sin table of
  block_size rows is computed once per model (and dtype) and indexed by the positions; the
  rotation happens inside engine.causal_self_attention (no graph nodes), whose backward
  applies the transpose: dq = dq'*cos - rotate_half(dq'*sin).
- smear_keys=True (either pos_emb; "smeared keys", Olsson et al. 2022): a learned gate per
  head, `transformer.h.{i}.attn.smear` (n_head,), initialised to -3 (sigmoid = 0.047), mixes
  each key with the previous token's key before RoPE:
      k_t <- k_t + sigmoid(smear_h) * (k_{t-1} - k_t)      (no mixing where p = 0)
  so one head can match "the token after an X" in a single layer (induction in one step).
  It is its own engine op, engine.smear_keys, with gradients to qkv and the gate.

KV cache: keys are stored smeared and rotated, so each new query only rotates itself and its
own key; for smear_keys the cache also keeps each layer's last raw (unsmeared) key, the
k_{t-1} of the next token. Cached decoding equals full recomputation (tests/test_model.py)."""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from . import engine as E
from . import kernels as K
from . import nn
from .config import GPTConfig
from .decode import decode_step, fast_decoding_supported, packed_for
from .engine import Tensor
from .runtime import adapt_threads, bmm, single_thread
from .tokenizer import EOS_ID, IM_END_ID, PAD_ID

# generate() drops the finished rows from its batch (and KV cache) once no more than this share
# of the rows still in it is decoding: a batch runs as long as its longest reply, and most
# replies are much shorter; 0 = never (bench/README.md, "Finished rows leave the batch")
COMPACT_BELOW = 0.75


class Block(nn.Module):
    """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). x: (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: GPTConfig, rng, dtype):
        proj_std = 0.02 / np.sqrt(2 * cfg.n_layer)  # GPT-2: scale residual projections
        self.ln_1 = nn.LayerNorm(cfg.n_embd, dtype=dtype)
        self.attn = nn.CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, proj_std, rng, dtype, cfg.bias,
                                           smear=cfg.smear_keys)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, dtype=dtype)
        self.mlp = nn.MLP(cfg.n_embd, cfg.dropout, proj_std, rng, dtype, cfg.bias)

    def __call__(self, x, cache=None, layer=0, pos=None):
        x = x + self.attn(self.ln_1(x), cache, layer, pos)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Holds wte, wpe, h, ln_f so parameter names read `transformer.h.0.attn.c_attn.weight`.
    wpe is None (no parameter, no state_dict key) with pos_emb="rope"."""

    def __init__(self, cfg: GPTConfig, rng, dtype):
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, rng=rng, dtype=dtype)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd, rng=rng, dtype=dtype) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, rng, dtype) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, dtype=dtype)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32):
        self.config = config
        self.transformer = Transformer(config, np.random.default_rng(seed), dtype)
        # lm_head is tied to wte: logits = h @ wte.T (no separate parameter, no key)
        self._rope_tables = {}                  # dtype -> (cos, sin) (block_size, hs), for "rope"

    def positions_for(self, positions, B: int, T: int) -> nn.Positions:
        """positions (T,) or (B, T) ints -> what attention needs: the ids as (B|1, T) and, for
        RoPE, the cos/sin rows of those positions as (B|1, 1, T, hs) in the model's dtype."""
        ids = np.asarray(positions)
        ids = ids.reshape(1, T) if ids.ndim == 1 else ids
        if ids.shape not in ((1, T), (B, T)) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"positions must be ints of shape ({T},) or ({B}, {T}), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.block_size):
            raise ValueError(f"positions must lie in [0, block_size={self.config.block_size}), got {ids.min()}..{ids.max()}")
        if self.config.pos_emb != "rope":
            return nn.Positions(ids)
        dtype = self.dtype
        if dtype not in self._rope_tables:
            cfg = self.config
            cos, sin = E.rope_table(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_base)
            self._rope_tables[dtype] = (cos.astype(dtype), sin.astype(dtype))
        cos, sin = self._rope_tables[dtype]
        return nn.Positions(ids, cos[ids][:, None], sin[ids][:, None])

    def hidden_states(self, idx, positions=None, cache=None, emb_noise=None) -> Tensor:
        """idx int (B, T) -> final LayerNorm output (B, T, C). emb_noise: an array (B, T, C) of the
        model's dtype added to the token embeddings, a constant (NEFTune, stages/sft.py)."""
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            positions = np.arange(T)
        pos = self.positions_for(positions, B, T)
        tr = self.transformer
        x = tr.wte(idx)                                                  # (B, T, C)
        if emb_noise is not None:
            x = x + emb_noise
        if tr.wpe is not None:
            x = x + tr.wpe(pos.ids)
        x = tr.drop(x)
        for i, block in enumerate(tr.h):
            x = block(x, cache, i, pos)
        return tr.ln_f(x)

    def __call__(self, idx, targets=None, loss_mask=None, positions=None, cache=None, emb_noise=None):
        """-> (logits (B, T, V), loss or None). loss: mean cross-entropy over positions with
        loss_mask > 0 (all positions when loss_mask is None). emb_noise: see hidden_states."""
        x = self.hidden_states(idx, positions, cache, emb_noise)
        logits = E.linear(x, self.transformer.wte.weight)                 # (B, T, V), tied head
        loss = None
        if targets is not None:
            loss = E.cross_entropy(logits, targets, mask=loss_mask)
        return logits, loss

    forward = __call__

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, no_repeat_ngram: int = 0,
                 stop_tokens=(IM_END_ID, EOS_ID), rng=None, return_logprobs: bool = False,
                 stream=None) -> "Generation":
        """Batched sampling with a KV cache.

        prompts: list of token-id lists (lengths may differ: they are left-padded and the
        padding is masked out of attention). temperature 0 = greedy. Log-probs, when asked,
        are of the chosen token under softmax(logits / temperature) (greedy: T = 1), before
        top-k / top-p / repetition penalty / n-gram blocking, i.e. the policy the RL stages optimise.
        no_repeat_ngram = n > 0: a token that would complete an n-gram the reply already holds is
        never chosen (Hugging Face's no_repeat_ngram_size, but over the reply only: a character
        model must be free to restate the prompt's words).
        stream(step, tokens (B,)) is called after each step (for interactive chat).
        rng: a Generator, a seed, or a list of one Generator per row: then a row's draws do not
        depend on the other rows of the batch (GRPO's groups are sampled alike on any MPI rank)."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        if isinstance(rng, (list, tuple)):
            if len(rng) != len(prompts):
                raise ValueError(f"generate: {len(rng)} row generators for {len(prompts)} prompts")
        elif not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        cfg = self.config
        max_new_tokens = int(min(max_new_tokens, cfg.block_size - 1))
        keep = cfg.block_size - max_new_tokens
        if any(len(p) > keep for p in prompts):
            warnings.warn(f"prompt longer than the context allows ({keep} tokens with {max_new_tokens} new): "
                          "cut from the left", stacklevel=2)
            prompts = [p[-keep:] for p in prompts]
        B, Tp = len(prompts), max(len(p) for p in prompts)
        idx = np.full((B, Tp), PAD_ID, dtype=np.int64)
        valid = np.zeros((B, Tp), dtype=bool)
        for b, p in enumerate(prompts):                                    # left padding
            idx[b, Tp - len(p):] = p
            valid[b, Tp - len(p):] = True
        cache = KVCache(cfg, B, Tp + max_new_tokens, self.dtype)

        out_tokens = np.full((B, max_new_tokens), PAD_ID, dtype=np.int64)
        logprobs = np.zeros((B, max_new_tokens), dtype=self.dtype)
        mask = np.zeros((B, max_new_tokens), dtype=self.dtype)
        finished = np.zeros(B, dtype=bool)
        seen = np.zeros((B, cfg.vocab_size), dtype=bool)                   # for the repetition penalty
        seen[np.arange(B)[:, None], idx] = valid
        ngrams = [{} for _ in range(B)]                 # per row: (n-1)-token prefix -> tokens that followed it
        stop = np.array(sorted(stop_tokens), dtype=np.int64)
        was_training = self.training
        self.eval()
        adapt_threads()                 # in "auto" mode: one thread while the machine is busy
        # one row: tiny ops, a second thread's wake-up costs more than it takes; from two rows on
        # the threads pay (bench/README.md, "Decoding on both cores")
        threads = single_thread() if B == 1 else nullcontext()
        try:
            with E.no_grad(), threads:
                positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)    # first real token at 0
                step_idx, n_real = idx, valid.sum(1)
                fast = fast_decoding_supported(self)                       # one token a row: arrays only
                rows = np.arange(B)                                        # the batch rows still in the cache
                packed = packed_for(self, B) if max_new_tokens > 1 else None     # batch 1: one kernel a step
                for t in range(max_new_tokens):
                    cache.add_valid(valid if t == 0 else np.ones((len(rows), 1), bool))
                    if t > 0 and fast:
                        last = decode_step(self, step_idx[:, 0], positions[:, 0], cache, packed)   # (b, V)
                    else:
                        last = self(step_idx, positions=positions, cache=cache)[0].data[:, -1, :]
                    cache.advance(step_idx.shape[1])
                    banned = _ngram_bans([ngrams[i] for i in rows], out_tokens[rows, :t], no_repeat_ngram,
                                         cfg.vocab_size) if no_repeat_ngram > 0 else None
                    u = None
                    if temperature > 0:   # each row's uniform draw, as if every row of the batch were still decoding
                        u = rng.random((B, 1))[rows] if isinstance(rng, np.random.Generator) \
                            else np.array([[rng[i].random()] for i in rows])
                    tok, lp = _sample(last, temperature, top_k, top_p, repetition_penalty,
                                      seen[rows] if repetition_penalty != 1.0 else None, u, banned)
                    done = finished[rows]
                    tok = np.where(done, PAD_ID, tok)
                    out_tokens[rows, t] = tok
                    logprobs[rows, t] = lp
                    mask[rows, t] = ~done
                    seen[rows, tok] = True
                    if no_repeat_ngram > 0:
                        _ngram_record([ngrams[i] for i in rows], out_tokens[rows, :t + 1], no_repeat_ngram, done)
                    finished[rows] |= np.isin(tok, stop)
                    if stream is not None:
                        stream(t, out_tokens[:, t])
                    if finished.all():
                        break
                    live = ~finished[rows]
                    if live.sum() <= COMPACT_BELOW * len(rows):   # drop finished rows from the batch and the cache
                        keep = np.flatnonzero(live)
                        cache.select(keep)
                        rows, tok = rows[keep], tok[keep]
                    step_idx = tok[:, None]
                    positions = n_real[rows][:, None] + t
        finally:
            self.train(was_training)
        n = t + 1
        return Generation(out_tokens[:, :n], mask[:, :n], logprobs[:, :n] if return_logprobs else None,
                          finished, prompts)


@dataclass
class Generation:
    """tokens (B, N) int64 (PAD after the stop token); mask (B, N) 1 for generated tokens up
    to and including the stop token; logprobs (B, N) or None; finished (B,) stop token seen."""
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray | None
    finished: np.ndarray
    prompts: list

    def replies(self) -> list[list[int]]:
        """Generated ids per row, stop token included."""
        return [row[: int(m.sum())].tolist() for row, m in zip(self.tokens, self.mask)]


def _ngram_bans(ngrams, reply, n: int, V: int):
    """(B, V) bool: tokens that would repeat an n-gram of the reply so far (None when n <= 0)."""
    if n <= 0:
        return None
    banned = np.zeros((len(ngrams), V), dtype=bool)
    if reply.shape[1] >= n - 1:
        for b, seen in enumerate(ngrams):
            after = seen.get(tuple(reply[b, reply.shape[1] - (n - 1):].tolist()))
            if after:
                banned[b, list(after)] = True
    return banned


def _ngram_record(ngrams, reply, n: int, finished):
    """Add the n-gram ending at each live row's newest token to that row's table."""
    if n <= 0 or reply.shape[1] < n:
        return
    for b in np.flatnonzero(~finished):
        g = reply[b, -n:].tolist()
        ngrams[b].setdefault(tuple(g[:-1]), set()).add(g[-1])


def _sample(logits, temperature, top_k, top_p, repetition_penalty, seen, u, banned=None):
    """logits (B, V) -> chosen token (B,), its log-prob under softmax(logits / T) (B,).
    seen: (B, V) bool, tokens already in the row (used by the repetition penalty alone, else
    None); u: (B, 1) uniform draws (unused when greedy); banned: (B, V) bool or None, tokens never
    chosen (no-repeat n-gram blocking)."""
    B, V = logits.shape
    scaled = logits / temperature if temperature > 0 else logits
    logp = scaled - scaled.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))            # policy log-probs (B, V)
    z = scaled.copy()
    if repetition_penalty != 1.0:                                          # CTRL-style penalty
        z = np.where(seen, np.where(z > 0, z / repetition_penalty, z * repetition_penalty), z)
    if banned is not None:
        z = np.where(banned & ~banned.all(-1, keepdims=True), -np.inf, z)  # never ban every token
    if temperature <= 0:
        tok = z.argmax(-1)
    else:
        if top_k is not None and 0 < top_k < V:
            kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = K.softmax_fwd(np.ascontiguousarray(z))
        if top_p is not None and 0.0 < top_p < 1.0:                       # nucleus: smallest set with mass >= top_p
            order = np.argsort(-p, axis=-1)
            ps = np.take_along_axis(p, order, -1)
            cut = np.cumsum(ps, -1) - ps >= top_p                          # tokens after the mass is reached
            ps[cut] = 0.0
            p = np.zeros_like(p)
            np.put_along_axis(p, order, ps, -1)
            p /= p.sum(-1, keepdims=True)
        tok = np.minimum((np.cumsum(p, -1) < u).sum(-1), V - 1)           # inverse-CDF sampling
    return tok.astype(np.int64), logp[np.arange(B), tok]


class KVCache:
    """Keys and values of every layer for generation: (L, B, NH, Tmax, hs) each, plus which
    key positions are real tokens (left padding is masked out). The keys are kept a second time
    as kT (L, B, NH, hs, Tmax), the layout the one-token decode kernel reads. Keys are stored as attention
    uses them (smeared, rotated); with smear_keys, k_last (L, B, NH, hs) keeps each layer's
    raw key of the latest position, the previous key of the next token."""

    def __init__(self, cfg: GPTConfig, B: int, Tmax: int, dtype):
        hs = cfg.n_embd // cfg.n_head
        self.k = np.zeros((cfg.n_layer, B, cfg.n_head, Tmax, hs), dtype)
        self.kT = np.zeros((cfg.n_layer, B, cfg.n_head, hs, Tmax), dtype)   # the keys again, for decode_step
        self.v = np.zeros_like(self.k)
        self.k_last = np.zeros((cfg.n_layer, B, cfg.n_head, hs), dtype) if cfg.smear_keys else None
        self.key_valid = np.zeros((B, Tmax), dtype=bool)
        self.length = 0                                    # positions filled so far

    def add_valid(self, valid):
        """Start a step of valid.shape[1] new positions: record which are real tokens and build,
        once for all layers, which keys each new query may see."""
        L0, T = self.length, valid.shape[1]
        self.key_valid[:, L0:L0 + T] = valid
        # query i (absolute position L0 + i) sees real keys j <= L0 + i, and always itself,
        # so a padding query never has an empty row
        j, i = np.arange(L0 + T), L0 + np.arange(T)
        allowed = (j[None, :] <= i[:, None])[None] & self.key_valid[:, None, :L0 + T]
        allowed |= (j[None, :] == i[:, None])[None]
        self.allowed = allowed[:, None]                      # (B, 1, T, L0 + T)

    def advance(self, T: int):
        self.length += T

    def select(self, rows):
        """Keep only these batch rows (generation drops the rows that have finished)."""
        self.k, self.kT, self.v = self.k[:, rows], self.kT[:, rows], self.v[:, rows]
        if self.k_last is not None:
            self.k_last = self.k_last[:, rows]
        self.key_valid = self.key_valid[rows]

    def attend(self, layer: int, qkv: np.ndarray, n_head: int, pos: nn.Positions | None = None,
               smear_gate: np.ndarray | None = None) -> np.ndarray:
        """qkv (B, T, 3C) of the new tokens -> attention output (B, T, C) over cache + new.
        pos: the new tokens' positions (and RoPE tables); smear_gate (NH,): sigmoid(smear)."""
        B, T, C3 = qkv.shape
        C, L0 = C3 // 3, self.length
        hs = C // n_head
        x = qkv.reshape(B, T, 3, n_head, hs)
        k = x[:, :, 1]                                                          # (B, T, NH, hs) raw
        if smear_gate is not None:
            mix = pos.mix if pos is not None else np.arange(L0, L0 + T)[None] != 0
            k_raw_last = k[:, -1].copy()
            k = E.smear_keys_array(k, self.k_last[layer] if L0 else None, smear_gate, mix)
            self.k_last[layer] = k_raw_last
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (x[:, :, 0], k, x[:, :, 2]))  # (B, NH, T, hs)
        if pos is not None and pos.cos is not None:
            q, k = E.apply_rope(q, pos.cos, pos.sin), E.apply_rope(k, pos.cos, pos.sin)
        self.k[layer, :, :, L0:L0 + T] = k
        self.kT[layer, :, :, :, L0:L0 + T] = k.swapaxes(-1, -2)
        self.v[layer, :, :, L0:L0 + T] = v
        keys, vals = self.k[layer, :, :, :L0 + T], self.v[layer, :, :, :L0 + T]  # (B, NH, L, hs)
        att = bmm(np.ascontiguousarray(q), keys.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, NH, T, L)
        att = np.where(self.allowed, att, -np.inf).astype(qkv.dtype, copy=False)
        p = K.softmax_fwd(np.ascontiguousarray(att.reshape(-1, L0 + T))).reshape(att.shape)
        y = bmm(p, vals)                                                        # (B, NH, T, hs)
        return y.transpose(0, 2, 1, 3).reshape(B, T, C)


class ScalarHead(nn.Module):
    """A (1, C) linear read-out: reward_head / value_head. x (..., C) -> (...)."""

    def __init__(self, n_embd: int, rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Tensor((rng.standard_normal((1, n_embd)) / np.sqrt(n_embd + 1)).astype(dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(1, dtype), requires_grad=True)

    def __call__(self, x: Tensor) -> Tensor:
        y = E.linear(x, self.weight, self.bias)           # (..., 1)
        return y.reshape(y.shape[:-1])
