"""Look inside a checkpoint: attention maps, next-token probabilities and per-parameter
gradient norms.

    python -m tinygrad_llm.inspect attention --checkpoint checkpoints/sft_final.safetensors --text "你好" [--chat]
    python -m tinygrad_llm.inspect grads --checkpoint checkpoints/pretrain_final.safetensors [--batch 4]

`attention` runs the model on the text and saves, per layer, a heatmap PNG with one panel
per head (row = query position, column = the key position it attends to), plus a text
summary of which earlier character each position attends to most. The heatmaps need
matplotlib (`pip install -e ".[plot]"`). `grads` takes one pretraining batch and prints,
for every parameter in named_parameters() order, |param|, |grad| and their ratio, then the
global gradient norm (the number the training loop logs as grad_norm).
The vocabulary is read from vocab.json beside the checkpoint unless --vocab is given.
`look_inside` and `explain_tokens` are the computations; the server's POST /v1/inspect
(serve.py) and the web page use the same ones."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from . import EXIT_BAD_INPUT
from .checkpoint import load_gpt

PLOT_HINT = 'the heatmaps need matplotlib: pip install -e ".[plot]"   (or: pip install matplotlib)'
# fonts that hold CJK glyphs; without one the heatmap axes show positions instead of characters
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")


# ----------------------------------------------------------------------------------------
# attention


def attention_probs(qkv: np.ndarray, n_head: int, cos=None, sin=None) -> np.ndarray:
    """qkv (B, T, 3C), q, k, v side by side as c_attn emits them -> the causal attention
    probabilities softmax(q k^T / sqrt(hs)) (B, NH, T, T), computed in float64. The same
    math as engine.causal_self_attention, written out so it can be looked at; cos, sin
    (RoPE tables, broadcastable to (B, 1, T, hs)) rotate q and k first."""
    from .engine import apply_rope

    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    heads = qkv.astype(np.float64).reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    q, k = heads[0], heads[1]
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = q @ k.swapaxes(-1, -2) / math.sqrt(hs)                                            # (B, NH, T, T)
    att = np.where(np.tril(np.ones((T, T), dtype=bool)), att, -np.inf)                      # no peeking ahead
    p = np.exp(att - att.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def look_inside(model, ids) -> tuple[np.ndarray, list[np.ndarray]]:
    """ids (T,) -> (logits (T, V), per layer the attention probabilities (NH, T, T)) from one
    forward pass with dropout off. logits[t] scores the token after position t; row t of a map
    is how much position t attends to each position j <= t. Each block's q, k come from its
    own c_attn(ln_1(x)); x then goes through the block as in the model's forward, and the
    logits are the model's own (ln_f, then the tied lm_head)."""
    from . import engine as E

    idx = np.asarray(ids, dtype=np.int64)[None]                      # (1, T)
    tr = model.transformer
    was_training = model.training
    model.eval()                                                      # dropout off
    maps = []
    try:
        with E.no_grad():
            pos = model.positions_for(np.arange(idx.shape[1]), 1, idx.shape[1])
            x = tr.wte(idx) if tr.wpe is None else tr.wte(idx) + tr.wpe(pos.ids)   # (1, T, C)
            for block in tr.h:
                attn = block.attn
                qkv = attn.c_attn(block.ln_1(x))                      # (1, T, 3C)
                if attn.smear is not None:                            # smeared keys (model.py)
                    qkv = E.smear_keys(qkv, attn.smear, attn.n_head, pos.mix)
                maps.append(attention_probs(qkv.data, attn.n_head, pos.cos, pos.sin)[0])
                x = block(x, pos=pos)
            logits = E.linear(tr.ln_f(x), tr.wte.weight)              # (1, T, V), tied head
    finally:
        model.train(was_training)
    return logits.data[0], maps


def attention_maps(model, ids) -> list[np.ndarray]:
    """ids (T,) -> per layer the attention probabilities (NH, T, T) (see look_inside)."""
    return look_inside(model, ids)[1]


def explain_tokens(model, ids, start: int, top: int = 10) -> list[dict]:
    """Why the model wrote ids[start:], given everything before: one dict per position
    p >= start (start >= 1), from one forward pass over ids (T,):
      "position" p, "id" ids[p], "prob" P(ids[p] | ids[:p]) at temperature 1,
      "top" [(id, prob)] * top, the most likely next tokens at p (best first),
      "attention" (L, NH, p): row p - 1 of every head, i.e. where each head looked from the
      position whose output predicted ids[p]."""
    if not 1 <= start <= len(ids):
        raise ValueError(f"start must be in [1, {len(ids)}], got {start}")
    logits, maps = look_inside(model, ids)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)                             # (T, V) softmax, temperature 1
    att = np.stack(maps)                                              # (L, NH, T, T)
    views = []
    for p in range(start, len(ids)):
        row = probs[p - 1]                                            # the distribution ids[p] was drawn from
        best = np.argsort(-row, kind="stable")[:top]
        views.append({"position": p, "id": int(ids[p]), "prob": float(row[ids[p]]),
                      "top": [(int(i), float(row[i])) for i in best],
                      "attention": att[:, :, p - 1, :p]})
    return views


def token_label(tok, i: int) -> str:
    s = tok.itos[int(i)]
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(s, s)


def summarize(maps, labels) -> list[str]:
    """One line per (layer, head): each position's character -> the character it attends to
    most (and how many positions back it is)."""
    lines = []
    for layer, p in enumerate(maps):
        for h in range(p.shape[0]):
            top = p[h].argmax(-1)                                      # (T,) most-attended key per query
            pairs = [f"{labels[t]}→{labels[j]}({j - t:+d})" if j != t else f"{labels[t]}→self"
                     for t, j in enumerate(top)]
            lines.append(f"layer {layer} head {h}: " + " ".join(pairs))
    return lines


def plot_attention(maps, labels, out_dir: Path) -> list[Path]:
    """One PNG per layer, a heatmap panel per head. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    font = next((f for f in CJK_FONTS if f in installed), None)
    ascii_only = all(l.isascii() for l in labels)
    ticks = labels if font or ascii_only else [str(i) for i in range(len(labels))]
    out_dir.mkdir(parents=True, exist_ok=True)
    T, paths = len(labels), []
    every = -(-T // 32)                          # at most 32 labelled ticks per axis: readable, and fast
    fontsize = max(5, min(9, 300 // min(T, 32)))
    for layer, p in enumerate(maps):
        nh = p.shape[0]
        cols = min(nh, 4)
        rows = (nh + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.2 * rows + 0.6), squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= nh:
                ax.axis("off")
                continue
            im = ax.imshow(p[h], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"head {h}", fontsize=9)
            shown = range(0, T, every)
            ax.set_xticks(shown)
            ax.set_yticks(shown)
            ax.set_xticklabels([ticks[i] for i in shown], fontsize=fontsize, rotation=90, fontfamily=font or "sans-serif")
            ax.set_yticklabels([ticks[i] for i in shown], fontsize=fontsize, fontfamily=font or "sans-serif")
            ax.set_xlabel("key (attended to)", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        fig.suptitle(f"attention, layer {layer}")
        path = out_dir / f"attention_layer{layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if ticks is not labels:
        print("(no CJK font found: the heatmap axes show positions; the summary above names the characters)")
    return paths


def cmd_attention(args) -> int:
    model, tok = load_gpt(args.checkpoint, args.vocab)
    if not args.text.strip():
        raise ValueError("--text is empty: give the text to run the model on")
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.text}], add_generation_prompt=True,
                                      tokenize=True)
    else:
        ids = tok.encode(args.text, allow_special=False)
    T = model.config.block_size
    if len(ids) > T:
        print(f"(the text is {len(ids)} tokens, longer than the context: showing the last {T})")
        ids = ids[-T:]
    maps = attention_maps(model, ids)
    labels = [token_label(tok, i) for i in ids]
    print(f"{len(maps)} layers x {maps[0].shape[0]} heads over {len(ids)} tokens; "
          "each position -> the earlier position it attends to most (offset):")
    print("\n".join(summarize(maps, labels)))
    try:
        paths = plot_attention(maps, labels, Path(args.out))
    except ImportError:
        print(f"error: {PLOT_HINT}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in paths:
        print(f"saved {p}")
    return 0


# ----------------------------------------------------------------------------------------
# gradients


def grad_norms(model, x, y) -> tuple[float, list[tuple[str, tuple, float, float, float]], float]:
    """One forward + backward on (x, y) (B, T) with dropout off -> (loss, rows, global norm);
    rows (name, shape, |param|, |grad|, |grad|/|param|) in named_parameters() order."""
    from .optim import clip_grad_norm

    was_training = model.training
    model.eval()                    # dropout off: the same batch always gives the same gradients
    model.zero_grad()
    try:
        _, loss = model(x, y)
        loss.backward()
    finally:
        model.train(was_training)
    rows = []
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else np.zeros_like(p.data)
        pn = float(np.sqrt(np.sum(np.square(p.data, dtype=np.float64))))
        gn = float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))
        rows.append((name, tuple(p.shape), pn, gn, gn / pn if pn > 0 else float("inf")))
    total = clip_grad_norm(model.parameters(), 0.0)      # max_norm 0: measure only, no clipping
    model.zero_grad()
    return float(loss.data), rows, total


def cmd_grads(args) -> int:
    from .data import load_split, pretrain_batch

    if args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    model, tok = load_gpt(args.checkpoint, args.vocab)
    train_text, _ = load_split(args.data_dir, "pretrain")
    ids = np.array(tok.encode(train_text, allow_special=False), np.int64)
    T = min(model.config.block_size, len(ids) - 2)
    x, y = pretrain_batch(ids, args.batch, T, np.random.default_rng(args.seed))
    loss, rows, total = grad_norms(model, x, y)
    w = max(len(r[0]) for r in rows)
    print(f"one pretraining batch of {args.batch} x {T} from {args.data_dir} (seed {args.seed}, dropout off): "
          f"loss {loss:.4f}")
    print(f"{'parameter':<{w}}  {'shape':<12} {'|param|':>10} {'|grad|':>10} {'|grad|/|param|':>15}")
    for name, shape, pn, gn, ratio in rows:
        print(f"{name:<{w}}  {str(shape):<12} {pn:>10.4f} {gn:>10.3e} {ratio:>15.3e}")
    print(f"global gradient norm: {total:.4f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinygrad_llm.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="attention heatmaps (one PNG per layer) and a text summary")
    a.add_argument("--text", required=True, help="the text to run the model on")
    a.add_argument("--chat", action="store_true", help="wrap the text as a user turn in the chat template")
    a.add_argument("--out", default="runs/attention", help="directory for the PNGs")
    g = sub.add_parser("grads", help="per-parameter gradient norms on one pretraining batch")
    g.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seed", type=int, default=0, help="which batch")
    for p in (a, g):
        p.add_argument("--checkpoint", required=True, help="a GPT .safetensors checkpoint")
        p.add_argument("--vocab", help="vocabulary JSON (default: vocab.json beside the checkpoint)")
        p.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from .checkpoint import CheckpointError
    from .runtime import configure_threads
    try:
        configure_threads(args.threads)
        return cmd_attention(args) if args.command == "attention" else cmd_grads(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:     # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
