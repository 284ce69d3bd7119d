"""Generation speed of the mini model: KV cache (model.generate) vs recomputing the sequence.

    python bench/generate.py                    # 2 threads, batch 1 and 16, prompt 32, 128 new tokens
    python bench/generate.py --threads 1,2      # both thread counts, interleaved
    python bench/generate.py --temperature 1    # sampling instead of greedy
    python bench/generate.py --quick            # 32 new tokens, 2 repeats

"cache": model.generate(prompts, max_new_tokens, temperature, stop_tokens=()) - prefill the
prompt once, then one token per step against the KV cache, each step through decode.decode_step
(arrays only, one attention kernel per layer; at batch 1 the whole step is one kernel call,
kernels.decode_token). "per-layer" (batch 1): decode_step layer by layer (decode.FUSE_BATCH1 =
False). "tensor": the same with decode.ENABLED = False, every step through the model's Tensor
forward (the path before decode_step). "recompute": a loop calling model(idx) under
engine.no_grad() on the whole sequence at every step (the full (B, T, V) logits included, as a
plain forward does) and taking the last position. tokens/s counts generated tokens (B * new
tokens) over the whole call, prefill included. All variants run
interleaved; medians reported. Greedy runs also check that all three give the same tokens.
GFLOP/s counts 2 * (matmul parameters) + 4 * n_layer * C * L FLOPs per processed token at
context length L (prompt and generated tokens), against the best float32 GEMM of the same run
at the thread count the batch decodes at (batch 1 at one thread, runtime.single_thread; larger
batches at --threads). The memory line is the physical
limit of small batches: every step reads all matmul weights once, at the measured bandwidth (a
large copy), less what the CPU's caches keep between steps. Every table names the BLAS, its
kernel and thread counts. Writes runs/bench/generate.json.
"""
from __future__ import annotations

import argparse

import common as C

BANDWIDTH_FLOATS = 64 * 2**20            # 256 MB: far past any cache


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="1, 2, or '1,2' (both, interleaved)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--no-recompute", action="store_true", help="skip the (slow) recompute variant")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.quick:
        args.repeats, args.new_tokens = 2, 32
    return args


def recompute_generate(model, prompts, n_new, temperature, rng):
    """No cache: every step runs the model on the whole sequence. -> new tokens (B, n_new)."""
    import numpy as np
    from tinygrad_llm import engine as E
    idx = np.asarray(prompts, dtype=np.int64)
    with E.no_grad():
        for _ in range(n_new):
            logits, _ = model(idx)
            last = logits.data[:, -1, :].astype(np.float64)            # (B, V)
            if temperature <= 0:
                nxt = last.argmax(-1)
            else:                                                        # inverse-CDF sampling
                p = np.exp((last - last.max(-1, keepdims=True)) / temperature)
                p /= p.sum(-1, keepdims=True)
                nxt = np.minimum((np.cumsum(p, -1) < rng.random((len(p), 1))).sum(-1), p.shape[1] - 1)
            idx = np.concatenate([idx, nxt[:, None]], axis=1)
    return idx[:, -n_new:]


def main():
    args = parse_args()
    import numpy as np
    C.setup_threads(max(args.threads))
    from tinygrad_llm.config import get_mini_config
    from tinygrad_llm.model import GPT
    cfg = get_mini_config(vocab_size=6400)
    if args.prompt_len + args.new_tokens > cfg.block_size:
        raise SystemExit(f"prompt {args.prompt_len} + new {args.new_tokens} exceeds block_size {cfg.block_size}")
    model = GPT(cfg, seed=0).eval()
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(6, cfg.vocab_size, (b, args.prompt_len)).tolist() for b in args.batches}

    from tinygrad_llm import decode
    out = {}

    def cached(th, b, kind="cache"):
        C.setup_threads(th)
        decode.ENABLED, decode.FUSE_BATCH1 = kind != "tensor", kind == "cache"
        try:
            g = model.generate(prompts[b], max_new_tokens=args.new_tokens, temperature=args.temperature,
                               stop_tokens=(), rng=1)
        finally:
            decode.ENABLED = decode.FUSE_BATCH1 = True
        out[(kind, th, b)] = g.tokens

    def recompute(th, b):
        C.setup_threads(th)
        out[("recompute", th, b)] = recompute_generate(model, prompts[b], args.new_tokens, args.temperature,
                                                   np.random.default_rng(1))

    gemms = C.gemm_thunks()
    decode_threads = sorted({1, *args.threads})      # batch 1 decodes at 1 thread, larger batches at --threads
    variants = {f"t{th} gemm {g}": lambda th=th, fn=fn: (C.setup_threads(th), fn())
                for th in decode_threads for g, (fn, _) in gemms.items()}
    stream, dst = np.ones(BANDWIDTH_FLOATS, np.float32), np.zeros(BANDWIDTH_FLOATS, np.float32)
    variants["copy"] = lambda: (C.setup_threads(1), np.copyto(dst, stream))   # bandwidth: decoding streams weights
    kinds = ("cache", "tensor") + (() if args.no_recompute else ("recompute",))
    for th in args.threads:
        for b in args.batches:
            variants[f"t{th} cache B={b}"] = lambda th=th, b=b: cached(th, b)
            variants[f"t{th} tensor B={b}"] = lambda th=th, b=b: cached(th, b, "tensor")
            if b == 1:
                variants[f"t{th} layers B={b}"] = lambda th=th, b=b: cached(th, b, "layers")
            if not args.no_recompute:
                variants[f"t{th} recompute B={b}"] = lambda th=th, b=b: recompute(th, b)
    load0 = C.loadavg()
    times = C.interleave(variants, args.repeats, warmup=1)
    load1 = C.loadavg()
    ceiling = {th: max(f / min(times[f"t{th} gemm {g}"]) for g, (_, f) in gemms.items()) / 1e9   # best run
               for th in decode_threads}
    copy_gbs = 2 * stream.nbytes / min(times["copy"]) / 1e9                     # bytes read + written

    Cn, L = cfg.n_embd, cfg.n_layer
    n_mm = 12 * L * Cn * Cn + cfg.vocab_size * Cn                        # c_attn, c_proj, c_fc, mlp.c_proj, lm_head
    ctx = np.arange(1, args.prompt_len + args.new_tokens + 1)
    flops_per_row = float((2 * n_mm + 4 * L * Cn * ctx).sum())
    results, rows = [], []
    for th, b in [(th, b) for th in args.threads for b in args.batches]:
        ks = kinds + (("layers",) if b == 1 else ())
        t = {k: C.median(times[f"t{th} {k} B={b}"]) for k in ks}
        same = None
        if args.temperature <= 0:
            same = all(np.array_equal(out[("cache", th, b)], out[(k, th, b)]) for k in ks)
        n = b * args.new_tokens
        gflops = b * flops_per_row / t["cache"] / 1e9
        ceil = ceiling[1 if b == 1 else th]          # at the thread count the batch decodes at
        results.append(dict(threads=th, batch=b, same_tokens=same, gflops=gflops, gemm_ceiling_gflops=ceil,
                            copy_gb_per_s=copy_gbs, weights_mb_per_step=4 * n_mm / 1e6,
                            **{f"{k}_s": t[k] for k in ks}, **{f"{k}_tokens_per_s": n / t[k] for k in ks},
                            **{f"{k}_s_all": times[f"t{th} {k} B={b}"] for k in ks}))
        rec = [n / t["recompute"], f"{t['recompute'] / t['cache']:.1f}x"] if "recompute" in t else ["-", "-"]
        rows.append([th, b, n / t["cache"], n / t["layers"] if "layers" in t else "-", n / t["tensor"],
                     f"{t['tensor'] / t['cache']:.2f}x", *rec,
                     t["cache"] * 1e3 / args.new_tokens, gflops, f"{gflops / ceil:.1%}",
                     "-" if same is None else ("yes" if same else "NO")])
    mode = "greedy" if args.temperature <= 0 else f"sampling T={args.temperature}"
    print(f"\nmini model, vocab {cfg.vocab_size}, float32, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {mode}; repeats {args.repeats}, interleaved; "
          f"load avg before/after {load0[0]:.2f}/{load1[0]:.2f}")
    C.setup_threads(max(args.threads))
    print(f"{C.blas_line()} (batch 1 decodes at 1 thread, larger batches at the table row's thread count)")
    print("GEMM ceiling: best float32 GEMM of this run at the thread count a row decodes at, "
          + ", ".join(f"{th} thread{'s' if th > 1 else ''} {c:.1f}" for th, c in ceiling.items()) + " GFLOP/s")
    weights_mb = 4 * n_mm / 1e6                                      # float32 matmul weights, read once a step
    print(f"memory: {copy_gbs:.1f} GB/s at 1 thread (a {stream.nbytes / 1e6:.0f} MB copy, read + write); one decoding "
          f"step streams {weights_mb:.1f} MB of weights: >= {weights_mb / copy_gbs:.2f} ms a step (batch 1: <= "
          f"{1e3 * copy_gbs / weights_mb:.0f} tokens/s) from memory; {C.cache_sizes()} may hold part of them\n")
    print(C.table(["threads", "batch", "cache tok/s", "per-layer tok/s", "tensor tok/s", "decode_step buys",
                   "recompute tok/s", "cache buys", "cache ms/step", "GFLOP/s", "of ceiling", "same tokens"],
                  rows, ["d", "d", ".1f", ".1f", ".1f", None, ".1f", None, ".2f", ".2f", None, None]))
    path = C.write_json("generate", dict(
        meta=C.meta(args.threads, repeats=args.repeats, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    temperature=args.temperature, loadavg_before=load0, loadavg_after=load1),
        results=results))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
