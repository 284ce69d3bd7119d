"""Checkpoints: weights as .safetensors (loadable with `safetensors.numpy.load_file` alone),
the model config, stage, step and a checksum in its metadata; optimizer + RNG state in a
separate `<name>.state.safetensors` so `--resume` can continue a stage.

Every write goes to a temporary file in the same directory, is flushed to disk, then
renamed over the final name (os.replace is atomic on POSIX): a crash, Ctrl-C or SIGKILL
never leaves a half-written file under a final name. No pickle anywhere: nothing in a
checkpoint can execute code. `load_gpt` is the one "checkpoint -> GPT" loader (inference.py,
inspect.py and the server use it)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import GPTConfig

FORMAT = "tinygrad_llm/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, tampered with or does not fit the model."""


def weights_path(path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def state_path(path) -> Path:
    p = weights_path(path)
    return p.with_name(p.name[: -len(".safetensors")] + ".state.safetensors")


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """write(tmp) beside `path`, flush it to disk, then rename it over `path` (atomic on POSIX):
    a crash never leaves a half-written file under the final name. Checkpoints and exports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensors(tensors: dict, path: Path, metadata: dict) -> None:
    # np.require, not np.ascontiguousarray: the latter turns a 0-d array (the optimizer's
    # step count) into shape (1,), which then no longer loads back as a scalar
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


def check_finite(path, tensors: dict) -> None:
    """Refuse to write a NaN / Inf weight (CheckpointError naming the file and the tensor)."""
    for name, a in tensors.items():
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"refusing to save {path}: parameter '{name}' is not finite")


def save_checkpoint(path, model, *, stage: str, step: int, vocab_sha: str = "", extra: dict | None = None) -> Path:
    """Write the model's weights (+ config, stage, step, checksum) atomically; returns the path."""
    path = weights_path(path)
    tensors = model.state_dict()
    check_finite(path, tensors)
    meta = {"format": FORMAT, "stage": stage, "step": str(step), "config": json.dumps(asdict(model.config)),
            "sha256": digest(tensors), "vocab_sha256": vocab_sha, "model_class": type(model).__name__,
            "extra": json.dumps(extra or {})}
    save_tensors(tensors, path, meta)
    return path


def extra_of(meta: dict) -> dict:
    """The `extra` dict a checkpoint was saved with (save_checkpoint), from its metadata."""
    return json.loads(meta.get("extra") or "{}")


def read_metadata(path) -> dict:
    from safetensors import safe_open
    path = weights_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_weights(path, verify: bool = True, fmt: str = FORMAT) -> tuple[dict, dict]:
    """-> (tensors, metadata). Validates the format (`fmt`: lora.FORMAT for an adapter) and the checksum."""
    path = weights_path(path)
    meta = read_metadata(path)
    if meta.get("format") != fmt:
        if meta.get("format", "").startswith(FORMAT.split("/")[0] + "/lora"):
            raise CheckpointError(f"{path}: a LoRA adapter, not a whole model; merge it onto its base first: "
                                  f"python -m tinygrad_llm.lora merge {path} OUT.safetensors")
        raise CheckpointError(f"{path}: not a tinygrad_llm checkpoint (format {meta.get('format')!r})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tensors (truncated or corrupt?): {e}") from None
    if verify and digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch: the file was modified or damaged")
    return tensors, meta


def config_from_meta(meta: dict, path="checkpoint") -> GPTConfig:
    try:
        return GPTConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config in metadata: {e}") from None


def load_into(model, path, vocab_sha: str | None = None) -> dict:
    """Load weights into an existing model after checking config and vocabulary; -> metadata.
    A model that defines `load_extra(extra)` gets the `extra` dict it was saved with (settings
    that travel with the weights, e.g. a reward model's lm_coef)."""
    tensors, meta = load_weights(path)
    cfg = config_from_meta(meta, path)
    if asdict(cfg) | {"dropout": 0} != asdict(model.config) | {"dropout": 0}:
        raise CheckpointError(f"{weights_path(path)}: model config {asdict(cfg)} does not match {asdict(model.config)}")
    if vocab_sha and meta.get("vocab_sha256") and meta["vocab_sha256"] != vocab_sha:
        raise CheckpointError(f"{weights_path(path)}: trained with a different vocabulary than the one given")
    try:
        model.load_state_dict(tensors, strict=True, source=str(weights_path(path)))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if hasattr(model, "load_extra"):
        model.load_extra(extra_of(meta))
    return meta


def save_state(path, arrays: dict, info: dict) -> Path:
    """Optimizer arrays and a JSON blob (step, RNG states, ...) for --resume; atomic."""
    p = state_path(path)
    save_tensors(arrays, p, {"format": FORMAT, "info": json.dumps(info), "sha256": digest(arrays)})
    return p


def load_state(path) -> tuple[dict, dict]:
    p = state_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no resumable state found")
    meta = read_metadata(p)
    try:
        arrays = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read state (truncated or corrupt?): {e}") from None
    if digest(arrays) != meta.get("sha256"):
        raise CheckpointError(f"{p}: checksum mismatch: the file was modified or damaged")
    return arrays, json.loads(meta["info"])


def load_gpt(path, vocab=None):
    """-> (GPT in eval mode with the config stored in the checkpoint, its tokenizer) from a GPT
    checkpoint (pretrain_final, sft_final, rlhf_final, rlvf_final) and its vocabulary (default:
    vocab.json beside it). CheckpointError for a missing or unreadable file or a reward model."""
    from .model import GPT
    from .tokenizer import MyLLMTokenizer

    path = weights_path(path)
    meta = read_metadata(path)
    if meta.get("model_class", "GPT") != "GPT":
        raise CheckpointError(f"{path}: a {meta['model_class']} checkpoint scores replies; it does not generate. "
                              "Use pretrain_final, sft_final, rlhf_final or rlvf_final")
    tok = MyLLMTokenizer().load(Path(vocab) if vocab else path.parent / "vocab.json")
    model = GPT(config_from_meta(meta, path))
    load_into(model, path, tok.fingerprint())
    return model.eval(), tok
