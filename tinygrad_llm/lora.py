"""LoRA: low-rank adapters on chosen projections of a GPT, their checkpoints, and merging.

    python train.py --stage sft --lora.r=8 --lora.targets=c_attn,c_proj   # -> checkpoints/sft_lora.safetensors
    python -m tinygrad_llm.lora merge checkpoints/sft_lora.safetensors checkpoints/sft_merged.safetensors
    python inference.py --checkpoint checkpoints/sft_merged.safetensors

apply_lora(model, cfg) swaps every targeted Linear for an nn.LoRALinear (Hu et al. 2021) and
freezes everything else: the base's parameters get requires_grad=False, so backward computes
no gradient for them (no weight GEMMs, nothing through the tied embedding), and
model.named_parameters() / state_dict() are the adapters alone: what the optimizer updates and
what an adapter checkpoint stores. (Convert dtypes before applying: .to() sees only parameters.)

An adapter checkpoint holds `<layer>.lora_A (r, in)` and `<layer>.lora_B (out, r)`, e.g.
`transformer.h.0.attn.c_attn.lora_A`; its metadata records r, alpha, the targets, the model
config, and which base it belongs to: the base file's name and the sha256 of its tensors (the
`sha256` of the base's own metadata). It attaches to that base only."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import nn
from .checkpoint import (CheckpointError, check_finite, config_from_meta, digest, load_weights, read_metadata,
                         save_checkpoint, save_tensors, weights_path)
from .config import ConfigError
from .engine import Tensor

FORMAT = "tinygrad_llm/lora-1"
ADAPTER_KEYS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    r: int = 0                       # rank; 0 = no adapters (the stage fine-tunes every weight)
    alpha: float = 16.0              # the update is scaled by alpha / r (the paper fixes alpha and varies r)
    targets: str = "c_attn,c_proj"   # comma list; a name matches each Linear whose path ends with it
                                     # (c_proj: attention's and the MLP's; attn.c_proj: attention's only; c_fc)

    def validate(self):
        if not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"lora.r must be an integer >= 0, got {self.r!r}")
        if self.r and not (self.alpha > 0 and self.target_list):
            raise ConfigError("lora: alpha must be > 0 and targets name at least one layer")

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in str(self.targets).split(",") if t.strip()]


def linears(module: nn.Module, prefix: str = ""):
    """Yield (path, parent module, attribute name, Linear) for every Linear under `module`."""
    children = enumerate(module) if isinstance(module, nn.ModuleList) else vars(module).items()
    for key, val in children:
        path = f"{prefix}{key}"
        if isinstance(val, nn.Linear):
            yield path, module, key, val
        elif isinstance(val, nn.Module):
            yield from linears(val, path + ".")


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Put an adapter on every targeted Linear of `model` and freeze the rest, in place (module
    docstring) -> the adapted layers' paths. ConfigError if a target matches no layer."""
    cfg.validate()
    rng = np.random.default_rng(seed)
    adapted = []
    for path, parent, key, lin in list(linears(model)):
        if any(path == t or path.endswith("." + t) for t in cfg.target_list):
            setattr(parent, key, nn.LoRALinear(lin, cfg.r, cfg.alpha, rng))
            adapted.append(path)
    hit = {t for t in cfg.target_list for p in adapted if p == t or p.endswith("." + t)}
    if set(cfg.target_list) - hit:
        raise ConfigError(f"lora.targets: no layer named {', '.join(sorted(set(cfg.target_list) - hit))} "
                          f"(layers: {', '.join(sorted({p.rsplit('.', 1)[-1] for p, *_ in linears(model)}))})")
    frozen = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] not in ADAPTER_KEYS]
    for p in frozen:
        p.requires_grad = False                      # frozen: no gradient, not in the optimizer
    model.lora_frozen = getattr(model, "lora_frozen", []) + frozen      # what merge_lora unfreezes
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (W + alpha/r B A) and unfreeze the base, in place:
    afterwards `model` is a plain model whose state_dict is every weight again."""
    for _, parent, key, lin in list(linears(model)):
        if isinstance(lin, nn.LoRALinear):
            plain = nn.Linear.__new__(nn.Linear)
            plain.weight = Tensor(lin.merged_weight(), requires_grad=True)
            plain.bias = lin.bias
            setattr(parent, key, plain)
    for p in getattr(model, "lora_frozen", []):
        p.requires_grad = True
    model.lora_frozen = []
    return model


# ----------------------------------------------------------------------------------------
# adapter checkpoints


def save_adapter(path, model, cfg: LoRAConfig, base_path, *, stage: str, step: int, vocab_sha: str = "") -> Path:
    """Write the adapters of `model` (its state_dict: the base is frozen) with the record of
    their base checkpoint, atomically."""
    path, base_path = weights_path(path), weights_path(base_path)
    tensors = model.state_dict()
    if not tensors or any(k.rsplit(".", 1)[-1] not in ADAPTER_KEYS for k in tensors):
        raise ValueError("save_adapter: the model must carry adapters and a frozen base (apply_lora)")
    check_finite(path, tensors)
    meta = {"format": FORMAT, "stage": stage, "step": str(step), "config": json.dumps(asdict(model.config)),
            "lora": json.dumps(asdict(cfg)), "base": base_path.name,
            "base_sha256": read_metadata(base_path)["sha256"], "sha256": digest(tensors), "vocab_sha256": vocab_sha}
    save_tensors(tensors, path, meta)
    return path


def attach_adapter(model, path, base_sha256: str) -> dict:
    """Put the adapters of checkpoint `path` on `model`, whose weights are those of the base
    with tensors' sha256 `base_sha256`; CheckpointError (one line) for another base. -> metadata."""
    path = weights_path(path)
    tensors, meta = load_weights(path, fmt=FORMAT)
    if meta["base_sha256"] != base_sha256:
        raise CheckpointError(f"{path}: these adapters belong to base {meta['base']} (tensors sha256 "
                              f"{meta['base_sha256'][:12]}), not to this base (sha256 {base_sha256[:12]})")
    cfg = LoRAConfig(**json.loads(meta["lora"]))
    apply_lora(model, cfg)
    try:
        model.load_state_dict(tensors, strict=True, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return meta


def merge(adapter, out, base=None) -> Path:
    """Adapter checkpoint + its base (default: the file named in the adapter's record, beside
    the adapter) -> a plain GPT checkpoint at `out` that inference.py loads."""
    from .checkpoint import load_into
    from .model import GPT

    adapter = weights_path(adapter)
    meta = read_metadata(adapter)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{adapter}: not a LoRA adapter checkpoint (format {meta.get('format')!r})")
    base = weights_path(base) if base else adapter.parent / meta["base"]
    base_meta = read_metadata(base)
    model = GPT(config_from_meta(base_meta, base))
    load_into(model, base)
    attach_adapter(model, adapter, base_meta["sha256"])
    merge_lora(model)
    extra = {"lora": json.loads(meta["lora"]), "base": base.name, "adapter": adapter.name}
    return save_checkpoint(out, model, stage=meta["stage"], step=int(meta["step"]),
                           vocab_sha=meta.get("vocab_sha256", ""), extra=extra)


def main(argv=None) -> int:
    from . import EXIT_BAD_INPUT
    ap = argparse.ArgumentParser(prog="python -m tinygrad_llm.lora", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base: a plain checkpoint inference.py loads")
    m.add_argument("adapter")
    m.add_argument("out")
    m.add_argument("--base", help="the base checkpoint (default: the one the adapter records, beside it)")
    args = ap.parse_args(argv)
    try:
        out = merge(args.adapter, args.out, args.base)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
