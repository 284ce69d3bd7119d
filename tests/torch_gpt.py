"""Our GPT written out in PyTorch from the formulas (model.py's docstring, DESIGN.md section 2):
the outside reference that tests/test_torch_reference.py compares against live and that
tests/make_fixtures.py freezes into tests/fixtures/*.npz for machines without torch.

Functional, over a {name: tensor} dict with our parameter names (nanoGPT's), so our
state_dict() loads 1:1 and gradients compare by name: pre-LayerNorm blocks (eps 1e-5), fused
c_attn with q, k, v in that order, GELU tanh approximation, lm_head tied to wte, no dropout.
Positions as GPTConfig.pos_emb says: "learned" adds wpe; "rope" rotates q and k of every head
(rotate-half convention of GPT-NeoX / Hugging Face LLaMA); smear_keys mixes each key with the
previous token's before RoPE. PyTorch is optional: only modules that already have it import this.
"""
import torch
import torch.nn.functional as F

LN_EPS = 1e-5


def param_shapes(cfg) -> dict:
    """{name: shape} of every parameter, in our model's order (cfg: a GPTConfig or anything with
    its fields)."""
    C = cfg.n_embd
    shapes = {"transformer.wte.weight": (cfg.vocab_size, C)}
    if cfg.pos_emb == "learned":
        shapes["transformer.wpe.weight"] = (cfg.block_size, C)

    def linear(name, n_out, n_in):
        shapes[name + ".weight"] = (n_out, n_in)
        if cfg.bias:
            shapes[name + ".bias"] = (n_out,)

    def layer_norm(name):
        shapes[name + ".weight"] = (C,)
        shapes[name + ".bias"] = (C,)       # our LayerNorm always has a bias

    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        layer_norm(h + "ln_1")
        linear(h + "attn.c_attn", 3 * C, C)
        linear(h + "attn.c_proj", C, C)
        if cfg.smear_keys:
            shapes[h + "attn.smear"] = (cfg.n_head,)
        layer_norm(h + "ln_2")
        linear(h + "mlp.c_fc", 4 * C, C)
        linear(h + "mlp.c_proj", C, 4 * C)
    layer_norm("transformer.ln_f")
    return shapes


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x, pos, base=10000.0):
    """x (B, NH, T, hs), pos (B|1, T) ints -> x*cos + rotate_half(x)*sin, with
    inv_freq_j = base^(-2j/hs) (j < hs/2) and angle = pos * inv_freq repeated as [f, f]."""
    hs = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)   # (hs/2,)
    freqs = torch.as_tensor(pos).double()[..., None] * inv_freq                   # (B|1, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None].to(x.dtype)                  # (B|1, 1, T, hs)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def smear_keys(k, alpha, mix):
    """k (B, T, NH, hs) -> k_t + sigmoid(alpha_h) * (k_{t-1} - k_t) where mix (B|1, T) is True
    (t = 0 has no previous key: k_{-1} = 0, and mix is False there in every caller)."""
    prev = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], dim=1)
    mixed = k + torch.sigmoid(alpha).view(1, 1, -1, 1) * (prev - k)
    return torch.where(torch.as_tensor(mix).view(*mix.shape, 1, 1), mixed, k)


def attention(qkv, n_head, pos=None, base=10000.0, alpha=None, mix=None):
    """qkv (B, T, 3C) -> (B, T, C): split into heads, smeared keys (alpha, mix), RoPE (pos),
    causal scaled dot-product attention, heads merged. pos None: no RoPE; alpha None: no smear."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head) for t in qkv.split(C, dim=2))   # (B, T, NH, hs)
    if alpha is not None:
        k = smear_keys(k, alpha, mix)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                                # (B, NH, T, hs)
    if pos is not None:
        q, k = rope(q, pos, base), rope(k, pos, base)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


def gpt(params, cfg, idx, targets=None):
    """params {name: tensor}, idx (B, T) int64 tensor -> (logits (B, T, V), mean cross-entropy
    over every position or None). Positions 0..T-1."""
    B, T = idx.shape
    C = cfg.n_embd
    p = params

    def linear(x, name):
        return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), p[name + ".weight"], p[name + ".bias"], eps=LN_EPS)

    x = p["transformer.wte.weight"][idx]                                             # (B, T, C)
    if cfg.pos_emb == "learned":
        x = x + p["transformer.wpe.weight"][:T]
    pos = torch.arange(T)[None]                                                       # (1, T)
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        qkv = linear(layer_norm(x, h + "ln_1"), h + "attn.c_attn")
        y = attention(qkv, cfg.n_head, pos if cfg.pos_emb == "rope" else None, cfg.rope_base,
                      p.get(h + "attn.smear"), pos != 0)
        x = x + linear(y, h + "attn.c_proj")
        x = x + linear(F.gelu(linear(layer_norm(x, h + "ln_2"), h + "mlp.c_fc"), approximate="tanh"),
                       h + "mlp.c_proj")
    logits = layer_norm(x, "transformer.ln_f") @ p["transformer.wte.weight"].T         # tied lm_head
    loss = None if targets is None else F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
    return logits, loss


def adamw(params, lr, betas, eps, weight_decay):
    """torch.optim.AdamW over the dict's tensors, decaying matrices only (ndim >= 2), as ours."""
    decay = [t for t in params.values() if t.dim() >= 2]
    rest = [t for t in params.values() if t.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)
