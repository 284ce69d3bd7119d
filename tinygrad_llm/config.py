"""Configuration dataclasses: the model (GPTConfig), the optimizer and the training loop.

Each stage owns its own config, stating only what differs from these defaults (pretrain, SFT
and the reward model subclass LoopConfig; PPO and GRPO share stages/policy.RLConfig, which
builds theirs); train.py nests them and derives its command line from the fields, so
`--model.n_layer=2` or `--pretrain.max_steps=200` need no hand-kept argparse copy. A renamed
field keeps its old name as an alias (`renamed`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration that cannot work (raised at construction, with the reason)."""


POS_EMB = ("learned", "rope")
OPTIMIZERS = ("adamw", "muon")
DEFAULT_SEED = 1337                    # train.py's --seed, and a StageContext's
ADAMW_BETAS = (0.9, 0.95)              # nanoGPT's (beta1, beta2): LoopConfig's and optim.AdamW's default


@dataclass
class GPTConfig:
    vocab_size: int = 6400     # the built vocabulary's size (<= 6400 characters incl. specials)
    block_size: int = 256      # context length T
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.1       # used in training only; eval/log-prob computations turn it off
    bias: bool = True
    pos_emb: str = "learned"   # "learned" (wpe, GPT-2) | "rope" (rotary q, k; no wpe); model.py's docstring
    rope_base: float = 10000.0 # RoPE: inv_freq_j = rope_base^(-2j/hs)
    smear_keys: bool = False   # learned previous-token mix of the keys (transformer.h.{i}.attn.smear)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vocab_size < 7:
            raise ConfigError(f"GPTConfig.vocab_size ({self.vocab_size}) must hold the 6 special tokens and text")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb not in POS_EMB:
            raise ConfigError(f"GPTConfig.pos_emb must be one of {', '.join(POS_EMB)}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"GPTConfig: RoPE needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 1:
            raise ConfigError(f"GPTConfig.rope_base must be a number > 1, got {self.rope_base!r}")
        self.rope_base = float(self.rope_base)
        if not isinstance(self.smear_keys, bool):
            raise ConfigError(f"GPTConfig.smear_keys must be true or false, got {self.smear_keys!r}")


def get_mini_config(vocab_size: int = 6400) -> GPTConfig:
    """The seed's mini model: 4 layers, 4 heads, 256 wide, context 256 (~3.7M params at a
    2,000-character vocabulary), with rotary positions: in bench/copy_probe.py it reaches a
    lower held-out loss than learned `wpe` for the same tokens (bench/README.md). No dropout:
    in a 20-minute run the model underfits (its SFT replies miss on training prompts too), and
    dropout 0.1 cost held-out loss, tasks and chat (bench/README.md, "Dropout")."""
    return GPTConfig(vocab_size=vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0,
                     pos_emb="rope")


def get_tiny_config(vocab_size: int = 6400) -> GPTConfig:
    """A model for tests and quick demos: 2 layers, 2 heads, 64 wide, context 64."""
    return GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)


@dataclass
class LoopConfig:
    """What the one training loop (loop.py) needs; every gradient-descent stage extends it."""
    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = ADAMW_BETAS[0]
    beta2: float = ADAMW_BETAS[1]
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    ckpt_every: int = 0            # 0: only at the end (and on interrupt)
    optimizer: str = "adamw"       # "adamw" | "muon" (optim.Muon: the blocks' matrices by Muon, the rest AdamW)
    muon_lr: float = 0.02          # Muon's lr for the matrices (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95

    def validate(self, name: str = "loop"):
        if self.max_steps < 0 or self.batch_size <= 0:
            raise ConfigError(f"{name}: max_steps must be >= 0 and batch_size > 0")
        if self.lr <= 0:
            raise ConfigError(f"{name}: lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{name}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


def renamed(**aliases):
    """Class decorator for a config dataclass whose fields were renamed: the old names are
    still accepted as keywords (and as --section.old=value, train.py), as the new ones."""
    def wrap(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in aliases.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: give {new} or its old name {old}, not both")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__, cls.ALIASES = __init__, dict(aliases)
        return cls
    return wrap

