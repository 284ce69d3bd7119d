"""Export a checkpoint to a Hugging Face `transformers` directory.

    python -m tinygrad_llm.export hf checkpoints/rlvf_final.safetensors hf/myllm
    python -m tinygrad_llm.export hf checkpoints/reward_model.safetensors hf/myllm-rm

Needs only NumPy and safetensors: transformers is what *reads* the result. Each position
scheme goes to the transformers architecture that computes exactly what ours does:

- pos_emb="learned" -> GPT2LMHeadModel (model_type "gpt2"). Parameter names are already
  GPT-2's; HF's Conv1D stores (in, out) and computes x @ W + b where our Linear stores
  (out, in), so the four Conv1D weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are
  transposed and everything else is copied (llm.c's export_hf.py does the same).
- pos_emb="rope" -> GPTNeoXForCausalLM (model_type "gpt_neox"): rotary embedding in the
  rotate-half form with base rope_base on the whole head (rotary_pct 1.0), sequential pre-LN
  blocks (use_parallel_residual false), gelu_new (the tanh GELU), LayerNorm eps 1e-5.
  Its fused query_key_value is read per head, [q_h, k_h, v_h] for each head h, where our
  c_attn is [q, k, v] with the heads inside each, so the rows are permuted; nn.Linear
  stores (out, in) as ours does, so nothing is transposed.
- smear_keys=True is refused: neither architecture mixes a key with the previous token's key.

Both are tied (lm_head = wte). config.json carries our special-token ids (bos 2, eos 3,
pad 0); generation_config.json stops at <EOS> (3) and <|im_end|> (5) and decodes greedily,
as inference.py does. Positions: ours count from 0 at a row's first real token; transformers'
generate() derives the same position_ids from the attention mask of a left-padded batch,
but a plain forward() over a left-padded batch must be given position_ids = cumsum(mask) - 1.
transformers computes RoPE angles (position * inv_freq) in float32, ours in float64, so the
logits of a rope export drift from ours with position: for the mini rlvf_final, max 1.6e-5 over
positions 0-31 and 1.4e-4 over 224-255 (2.2e-5 everywhere once HF is handed float64-built
tables); greedy choices agreed on all 2,048 positions measured.

The reward model (a RewardModel checkpoint: trunk + reward_head (1, C) with a bias) goes to
GPT2ForSequenceClassification / GPTNeoXForSequenceClassification with num_labels 1, whose
`score` has no bias. In that model ln_f's output feeds nothing but the score, so the bias is
folded into ln_f's shift, beta' = beta + b * w / (w . w), which leaves w . h' = w . h + b:
the scores equal ours exactly (the exported trunk's ln_f is therefore not the SFT model's).
transformers scores the last token that is not <PAD>; ours is read at the reply's closing
<|im_end|>, so score `chat template + reply + <|im_end|>` with no trailing newline (the chat
template adds one: drop the last id), right-padded (the RM export's tokenizer pads right).

The tokenizer is a BPE model with no merges over our vocabulary: it splits text into
characters and maps each to its id, unknown ones to <UNK>; the six special tokens are added
tokens, so their literal strings in text become their ids, as MyLLMTokenizer.encode does by
default. tokenizer_config.json holds our chat template as Jinja (tests/test_export.py checks
every id against ours). One difference no tokenizer can remove: apply_chat_template renders
text and then tokenizes it, so a special-token string *inside* a message's content becomes
that token there, where ours encodes message content as plain characters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .checkpoint import CheckpointError, atomic_write, config_from_meta, extra_of, load_weights, weights_path
from .config import GPTConfig
from .tokenizer import (BOS, BOS_ID, EOS, EOS_ID, IM_END, IM_END_ID, IM_START, PAD, PAD_ID, SPECIAL_TOKENS, UNK,
                        MyLLMTokenizer)

# our chat template (tokenizer.py), as the Jinja that transformers' apply_chat_template renders
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# HF GPT-2's Conv1D layers: weight (in, out), ours (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LINEAR_BIASES = {"attn.c_attn.bias": 3, "attn.c_proj.bias": 1, "mlp.c_fc.bias": 4, "mlp.c_proj.bias": 1}  # x C
# our block's names -> GPTNeoXLayer's
NEOX_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_attn": "attention.query_key_value",
              "attn.c_proj": "attention.dense", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
MODEL_CLASSES = ("GPT", "RewardModel")


class ExportError(ValueError):
    """A checkpoint that transformers cannot express, or inputs that do not fit together."""


# ----------------------------------------------------------------------------------------
# weights


def with_biases(tensors: dict, cfg: GPTConfig) -> dict:
    """bias=False models have no Linear biases; both HF architectures always have them: zeros."""
    out = dict(tensors)
    if not cfg.bias:
        dtype = tensors["transformer.wte.weight"].dtype
        for i in range(cfg.n_layer):
            for name, mult in LINEAR_BIASES.items():
                out.setdefault(f"transformer.h.{i}.{name}", np.zeros(mult * cfg.n_embd, dtype))
    return out


def gpt2_tensors(tensors: dict, cfg: GPTConfig) -> dict:
    """Our trunk -> GPT2Model's `transformer.*` tensors: the four Conv1D weights transposed."""
    out = {}
    for name, a in with_biases(tensors, cfg).items():
        if not name.startswith("transformer."):
            continue
        out[name] = np.ascontiguousarray(a.T) if name.endswith(CONV1D) else a
    return out


def qkv_per_head(a: np.ndarray, n_head: int) -> np.ndarray:
    """c_attn rows [q; k; v] (3C, ...) with heads inside each -> GPT-NeoX's [q_0 k_0 v_0; q_1 k_1 v_1; ...]."""
    C3 = a.shape[0]
    hs = C3 // 3 // n_head
    per = a.reshape(3, n_head, hs, *a.shape[1:])               # (3, NH, hs, ...)
    return np.ascontiguousarray(per.swapaxes(0, 1).reshape(C3, *a.shape[1:]))   # (NH, 3, hs, ...) -> (3C, ...)


def neox_tensors(tensors: dict, cfg: GPTConfig) -> dict:
    """Our trunk -> GPTNeoXModel's `gpt_neox.*` tensors (nn.Linear is (out, in) like ours)."""
    t = with_biases(tensors, cfg)
    out = {"gpt_neox.embed_in.weight": t["transformer.wte.weight"],
           "gpt_neox.final_layer_norm.weight": t["transformer.ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": t["transformer.ln_f.bias"]}
    for i in range(cfg.n_layer):
        for ours, theirs in NEOX_NAMES.items():
            for kind in ("weight", "bias"):
                a = t[f"transformer.h.{i}.{ours}.{kind}"]
                out[f"gpt_neox.layers.{i}.{theirs}.{kind}"] = qkv_per_head(a, cfg.n_head) if ours == "attn.c_attn" else a
    return out


def fold_score_bias(w: np.ndarray, b: np.ndarray, ln_bias: np.ndarray) -> np.ndarray:
    """reward_head (w (1, C), b (1,)) over ln_f -> ln_f's new shift so that a bias-free score
    w . h' equals w . h + b (module docstring). Computed in float64, stored in ln_f's dtype."""
    w64 = w[0].astype(np.float64)
    norm2 = float(w64 @ w64)
    if norm2 == 0.0:
        raise ExportError("reward_head.weight is all zeros: its bias cannot be folded into ln_f")
    return (ln_bias.astype(np.float64) + float(b[0]) * w64 / norm2).astype(ln_bias.dtype)


# ----------------------------------------------------------------------------------------
# config files


def model_config(cfg: GPTConfig, reward: bool) -> dict:
    """config.json for the architecture that matches cfg.pos_emb (module docstring)."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
              "tie_word_embeddings": True}
    if reward:   # one scalar per sequence, as TRL's RewardTrainer expects
        common |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    if cfg.pos_emb == "learned":
        arch = "GPT2ForSequenceClassification" if reward else "GPT2LMHeadModel"
        return {"architectures": [arch], "model_type": "gpt2", "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": 4 * cfg.n_embd,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                # our dropout: after the embedding sum and on both residual branches, none on attention weights
                "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "attn_pdrop": 0.0,
                "scale_attn_weights": True, **common}
    arch = "GPTNeoXForSequenceClassification" if reward else "GPTNeoXForCausalLM"
    return {"architectures": [arch], "model_type": "gpt_neox", "max_position_embeddings": cfg.block_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": 4 * cfg.n_embd, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
            "use_parallel_residual": False, "attention_bias": True,
            # rotary on the whole head with our base; the first two names are transformers 4.x's,
            # rope_parameters 5.x's (each reads the other's too)
            "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0},
            "hidden_dropout": cfg.dropout, "attention_dropout": 0.0, "classifier_dropout": 0.0, **common}


def generation_config(cfg: GPTConfig) -> dict:
    """Stop at <|im_end|> (a chat reply's end) or <EOS>; greedy, as inference.py by default."""
    return {"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, EOS_ID], "pad_token_id": PAD_ID,
            "do_sample": False, "max_new_tokens": 128}     # inference.py's default reply length


def tokenizer_json(tok: MyLLMTokenizer) -> dict:
    """tokenizers' serialisation of a character-level tokenizer: BPE with no merges splits
    a string into its characters, each looked up in the vocabulary (unknown -> <UNK>, one per
    character); no normaliser or pre-tokeniser touches the text; Fuse joins tokens on decode."""
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": dict(tok.stoi), "merges": []}}


def tokenizer_config(cfg: GPTConfig, padding_side: str) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
            "padding_side": padding_side, "truncation_side": "left",   # as our CLI cuts long prompts
            # no token_type_ids: GPT-2 would add wte[token_type_id] (our <PAD> row) to every token
            "model_input_names": ["input_ids", "attention_mask"],
            "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
            "additional_special_tokens": [IM_START, IM_END],
            "clean_up_tokenization_spaces": False,     # decode must not touch the spaces
            "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for i, s in enumerate(SPECIAL_TOKENS)}}


# ----------------------------------------------------------------------------------------
# the export


def read_checkpoint(path, vocab=None) -> tuple[dict, GPTConfig, str, MyLLMTokenizer]:
    """-> (tensors, config, model class, tokenizer), refusing what transformers cannot express."""
    path = weights_path(path)
    tensors, meta = load_weights(path)
    cfg = config_from_meta(meta, path)
    cls = meta.get("model_class", "GPT")
    if cls not in MODEL_CLASSES:
        raise ExportError(f"{path}: a {cls} checkpoint; only a language model (GPT) or a reward model exports")
    if cfg.smear_keys:
        raise ExportError(f"{path}: smear_keys=True mixes each key with the previous token's key, which no "
                          "transformers architecture (GPT-2, GPT-NeoX) computes; export a model trained without it")
    lm_coef = float(extra_of(meta).get("lm_coef", 0.0))
    if cls == "RewardModel" and lm_coef:
        raise ExportError(f"{path}: this reward model's score adds lm_coef={lm_coef:g} x the reply's mean log-probability "
                          "under its LM head, which a sequence classifier does not compute; export one trained with "
                          "--reward.lm_coef=0")
    if cfg.pos_emb not in ("learned", "rope"):
        raise ExportError(f"{path}: pos_emb={cfg.pos_emb!r} has no transformers counterpart")
    vocab = Path(vocab) if vocab else path.parent / "vocab.json"
    try:
        tok = MyLLMTokenizer().load(vocab)
    except (OSError, ValueError) as e:
        raise ExportError(str(e)) from None
    if meta.get("vocab_sha256") and meta["vocab_sha256"] != tok.fingerprint():
        raise ExportError(f"{path}: trained with a different vocabulary than {vocab}")
    if len(tok) > cfg.vocab_size:
        raise ExportError(f"{vocab}: {len(tok)} tokens, more than the model's vocab_size {cfg.vocab_size}")
    return tensors, cfg, cls, tok


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"))


def export_hf(checkpoint, out_dir, vocab=None) -> dict:
    """Write the Hugging Face directory for `checkpoint` -> {"architecture", "files"}."""
    tensors, cfg, cls, tok = read_checkpoint(checkpoint, vocab)
    reward = cls == "RewardModel"
    trunk = gpt2_tensors if cfg.pos_emb == "learned" else neox_tensors
    hf = trunk(tensors, cfg)
    if reward:
        ln_f = "transformer.ln_f.bias" if cfg.pos_emb == "learned" else "gpt_neox.final_layer_norm.bias"
        hf[ln_f] = fold_score_bias(tensors["reward_head.weight"], tensors["reward_head.bias"], hf[ln_f])
        hf["score.weight"] = tensors["reward_head.weight"]
    config = model_config(cfg, reward)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": None, "config.json": config, "tokenizer.json": tokenizer_json(tok),
             # the LM pads left for batched generation; the RM pads right (its score is read at the last real token)
             "tokenizer_config.json": tokenizer_config(cfg, "right" if reward else "left"),
             "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                                         "additional_special_tokens": [IM_START, IM_END]}}
    if not reward:
        files["generation_config.json"] = generation_config(cfg)
    def write_weights(p):
        save_file({k: np.ascontiguousarray(v) for k, v in hf.items()}, str(p), metadata={"format": "pt"})
        os.chmod(p, 0o644)                   # safetensors creates it owner-only, unlike the JSON files
    atomic_write(out / "model.safetensors", write_weights)
    for name, obj in files.items():
        if obj is not None:
            _write_json(out / name, obj)
    return {"architecture": config["architectures"][0], "files": sorted(files)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinygrad_llm.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face transformers directory (GPT-2 or GPT-NeoX, see the module doc)")
    hf.add_argument("checkpoint", help="a .safetensors checkpoint (a language model or the reward model)")
    hf.add_argument("out_dir", help="directory to write (created; files of the same names are replaced)")
    hf.add_argument("--vocab", help="vocabulary JSON (default: vocab.json beside the checkpoint)")
    args = ap.parse_args(argv)
    try:
        res = export_hf(args.checkpoint, args.out_dir, args.vocab)
    except (ExportError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {res['architecture']} ({', '.join(res['files'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
