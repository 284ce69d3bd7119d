"""Full training step of the mini model: forward, loss, backward, clip, AdamW.

    python bench/train_step.py                  # 2 threads, B x T = 8x256, 16x256, 32x128
    python bench/train_step.py --threads 1,2    # both thread counts, interleaved in one process
    python bench/train_step.py --quick          # 3 repeats, a short profile
    python bench/train_step.py --kernels "default;attention=numba"   # kernel choices A/B, interleaved
    python bench/train_step.py --kernels "default;rope=numpy"        # ... e.g. without the fused RoPE split

Model: get_mini_config(vocab_size=6400), float32, dropout as configured (0 in mini), random token
batches. Reported per shape: tokens/s, achieved GFLOP/s with nanoGPT's / PaLM's model FLOPs
per token, 6*N + 12*n_layer*T*C (N = parameters without wpe: a position lookup does no
matmul; wte counts because it is also the lm_head), and MFU against the best float32 GEMM
throughput NumPy reaches in the same run at the same thread count (GEMMs timed interleaved
with the steps; their best run, since load only ever slows a GEMM down). Then the op profiler
(engine.profile()) over a few 8x256 steps at each thread count: each op's forward and backward
time as a share of the step, plus clip, AdamW and the rest (Python, graph bookkeeping).
--kernels names kernel choices to compare, ';' between variants, each "default" (kernels.DEFAULT_BACKEND)
or family=backend pairs over it, e.g. "attention=numba" (the fused attention instead of the blocked
BLAS GEMMs) or "rope=numpy,attention=numpy"; the profile runs on the first variant.
Every table names the BLAS, its kernel and the thread counts. Writes runs/bench/train_step.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import common as C

SHAPES = ((8, 256), (16, 256), (32, 128))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="1, 2, or '1,2' (both, interleaved)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median reported)")
    ap.add_argument("--profile-steps", type=int, default=None, help="steps under the op profiler (5; quick: 2)")
    ap.add_argument("--top", type=int, default=14, help="profiler rows shown")
    ap.add_argument("--shapes", default=",".join(f"{B}x{T}" for B, T in SHAPES), help="B x T list, e.g. 8x256,16x256")
    ap.add_argument("--kernels", default="default",
                    help="';'-separated kernel choices to compare, each 'default' or family=backend pairs")
    ap.add_argument("--smear-keys", action="store_true", help="the model with smeared keys (GPTConfig.smear_keys)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 2 profiled steps")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.kernels = [k.strip() for k in args.kernels.split(";")]
    args.shapes = [tuple(int(v) for v in st.split("x")) for st in args.shapes.split(",")]
    if args.quick:
        args.repeats = 3
    if args.profile_steps is None:
        args.profile_steps = 2 if args.quick else 5
    return args


def model_flops(cfg, n_params_no_wpe: int, T: int) -> float:
    """Training FLOPs per token (PaLM appendix B, nanoGPT estimate_mfu): 6N + 12 L T C."""
    return 6 * n_params_no_wpe + 12 * cfg.n_layer * T * cfg.n_embd


def op_flops(cfg, B: int, T: int) -> dict:
    """{(op, 'fwd'|'bwd'): FLOPs} of the matmul-bearing ops for one step at (B, T)."""
    Cn, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    lin = 2.0 * B * T * (12 * L * Cn * Cn + Cn * V)        # c_attn, c_proj, c_fc, mlp.c_proj, lm_head
    att = 4.0 * B * T * T * Cn * L                         # q@k^T and p@v over all heads (full T x T)
    return {("linear", "fwd"): lin, ("linear", "bwd"): 2 * lin,
            ("causal_self_attention", "fwd"): att, ("causal_self_attention", "bwd"): 2 * att}


class Trainer:
    """One model + AdamW; step(B, T) runs a full training step on a fixed random batch."""

    def __init__(self, vocab_size=6400, seed=0, shapes=SHAPES, smear_keys=False):
        import numpy as np
        from tinygrad_llm.config import get_mini_config
        from tinygrad_llm.model import GPT
        from tinygrad_llm.optim import AdamW
        self.cfg = dataclasses.replace(get_mini_config(vocab_size=vocab_size), smear_keys=smear_keys)
        self.model = GPT(self.cfg, seed=seed).train()
        self.params = self.model.parameters()
        self.opt = AdamW(self.model.named_parameters(), lr=3e-4, weight_decay=0.1)
        rng = np.random.default_rng(seed)
        self.batches = {}
        for B, T in shapes:
            xy = rng.integers(0, vocab_size, (B, T + 1))
            self.batches[(B, T)] = (xy[:, :-1], xy[:, 1:])
        self.clip_s = self.adamw_s = 0.0

    def step(self, B, T, timed_parts=False):
        from tinygrad_llm.optim import clip_grad_norm
        x, y = self.batches[(B, T)]
        _, loss = self.model(x, y)
        loss.backward()
        t0 = time.perf_counter()
        clip_grad_norm(self.params, 1.0)
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        if timed_parts:
            self.clip_s += t1 - t0
            self.adamw_s += time.perf_counter() - t1
        return loss


def profile_table(tr: Trainer, B: int, T: int, steps: int, top: int):
    """Run `steps` profiled steps -> (rows as dicts, step_s, text)."""
    from tinygrad_llm import engine as E
    tr.step(B, T)                                          # warm
    tr.clip_s = tr.adamw_s = 0.0
    with E.profile() as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.step(B, T, timed_parts=True)
        total = time.perf_counter() - t0
    step_s = total / steps
    flops = op_flops(tr.cfg, B, T)
    rows = []
    for op, n, f, b in prof.rows():
        f, b = f / steps, b / steps
        gf = flops.get((op, "fwd")), flops.get((op, "bwd"))
        rows.append(dict(op=op, calls=n // steps, fwd_ms=f * 1e3, bwd_ms=b * 1e3, share=(f + b) / step_s,
                         fwd_gflops=gf[0] / f / 1e9 if gf[0] and f else None,
                         bwd_gflops=gf[1] / b / 1e9 if gf[1] and b else None))
    fwd_tot, bwd_tot = sum(r["fwd_ms"] for r in rows), sum(r["bwd_ms"] for r in rows)
    ops_s = (fwd_tot + bwd_tot) / 1e3
    clip_s, adamw_s = tr.clip_s / steps, tr.adamw_s / steps
    rows.append(dict(op="clip_grad_norm", calls=1, fwd_ms=clip_s * 1e3, bwd_ms=0.0, share=clip_s / step_s))
    rows.append(dict(op="adamw (step+zero)", calls=1, fwd_ms=adamw_s * 1e3, bwd_ms=0.0, share=adamw_s / step_s))
    rest = step_s - ops_s - clip_s - adamw_s
    rows.append(dict(op="rest (python, graph)", calls=0, fwd_ms=rest * 1e3, bwd_ms=0.0, share=rest / step_s))
    rows.sort(key=lambda r: -r["share"])

    def g(v):
        return f"{v:.0f}" if v else ""

    text = C.table(["op", "calls", "fwd ms", "bwd ms", "share", "fwd GF/s", "bwd GF/s"],
                   [[r["op"], r["calls"], r["fwd_ms"], r["bwd_ms"], f"{r['share']:.1%}",
                     g(r.get("fwd_gflops")), g(r.get("bwd_gflops"))] for r in rows[:top]],
                   [None, "d", ".1f", ".1f", None, None, None])
    text += (f"\nprofiled step {step_s * 1e3:.0f} ms = ops forward {fwd_tot:.0f} ms + ops backward {bwd_tot:.0f} ms"
             f" + clip {clip_s * 1e3:.0f} + AdamW {adamw_s * 1e3:.0f} + rest {rest * 1e3:.0f} ms")
    return rows, step_s, text


def main():
    args = parse_args()
    C.setup_threads(max(args.threads))
    from tinygrad_llm import kernels as K
    tr = Trainer(shapes=sorted(set(args.shapes) | {(8, 256)}), smear_keys=args.smear_keys)   # 8x256: profiled
    wpe = tr.model.transformer.wpe
    n_no_wpe = tr.model.num_parameters() - (wpe.weight.size if wpe is not None else 0)   # rope: no wpe
    gemms = C.gemm_thunks()

    def use_kernels(choice):
        """'default' or 'family=backend,...' over the defaults."""
        K.set_kernel_backend("default")
        if choice != "default":
            K.set_kernel_backend(dict(pair.split("=") for pair in choice.split(",")))

    # one variant per (threads, shape, kernel choice) and per (threads, GEMM); each sets its
    # thread count (and kernel choice) first
    variants, labels = {}, {}
    for th in args.threads:
        for B, T in args.shapes:
            for path in args.kernels:
                name = f"t{th} {B}x{T} {path}"
                variants[name] = lambda th=th, B=B, T=T, path=path: (C.setup_threads(th), use_kernels(path),
                                                                     tr.step(B, T))
                labels[name] = (th, B, T, path)
        for g, (fn, _) in gemms.items():
            variants[f"t{th} {g}"] = lambda th=th, fn=fn: (C.setup_threads(th), fn())
    load0 = C.loadavg()
    t0 = time.perf_counter()
    times = C.interleave(variants, args.repeats, warmup=1)
    wall = time.perf_counter() - t0
    load1 = C.loadavg()

    # thread switching costs microseconds; it is inside the timed thunk but negligible next to a step
    peak, results = {}, []
    for th in args.threads:
        gf = {g: gemms[g][1] / C.median(times[f"t{th} {g}"]) / 1e9 for g in gemms}
        best = {g: gemms[g][1] / min(times[f"t{th} {g}"]) / 1e9 for g in gemms}
        # the ceiling is what the machine can do: the best GEMM run, not the median (load only slows)
        peak[th] = dict(gemm_gflops=gf, gemm_gflops_best=best, peak=max(best.values()))
    rows = []
    for name, (th, B, T, path) in labels.items():
        s = C.median(times[name])
        tok_s = B * T / s
        gflops = tok_s * model_flops(tr.cfg, n_no_wpe, T) / 1e9
        mfu = gflops / peak[th]["peak"]
        results.append(dict(threads=th, B=B, T=T, kernels=path, step_ms=s * 1e3, tokens_per_s=tok_s,
                            gflops=gflops, mfu=mfu, step_ms_all=[t * 1e3 for t in times[name]]))
        rows.append([th, f"{B}x{T}", path, s * 1e3, tok_s, gflops, f"{mfu:.1%}", f"{min(times[name]) * 1e3:.0f}"])

    C.setup_threads(max(args.threads))
    print(f"\nmini model, vocab {tr.cfg.vocab_size}, {tr.model.num_parameters() / 1e6:.2f}M params "
          f"({n_no_wpe / 1e6:.2f}M without wpe), dropout {tr.cfg.dropout}{', smeared keys' if tr.cfg.smear_keys else ''}, "
          f"float32; repeats {args.repeats}, "
          f"interleaved; load avg before/after {load0[0]:.2f}/{load1[0]:.2f}")
    print(f"{C.blas_line()} (each row at its own thread count); MFU = fraction of the GEMM ceiling below\n")
    print(C.table(["threads", "B x T", "kernels", "ms/step", "tokens/s", "GFLOP/s", "MFU", "min ms"], rows,
                  ["d", None, None, ".0f", ".0f", ".1f", None, None]))
    print("\nfloat32 GEMM, same run, GFLOP/s median / best (MFU is against the best of the best):")
    print(C.table(["threads"] + list(gemms),
                  [[th] + [f"{peak[th]['gemm_gflops'][g]:.1f} / {peak[th]['gemm_gflops_best'][g]:.1f}" for g in gemms]
                   for th in args.threads], ["d"] + [None] * len(gemms)))

    profiles = []
    use_kernels(args.kernels[0])
    for th in args.threads if args.profile_steps > 0 else ():     # --profile-steps 0: no profile
        C.setup_threads(th)
        prof_rows, prof_step, text = profile_table(tr, 8, 256, args.profile_steps, args.top)
        profiles.append(dict(B=8, T=256, threads=th, steps=args.profile_steps, step_ms=prof_step * 1e3,
                             rows=prof_rows, loadavg=C.loadavg()))
        print(f"\nop profile, 8x256, {th} thread(s), kernels {args.kernels[0]}, {args.profile_steps} steps, "
              f"load avg {C.loadavg()[0]:.2f} (profiler overhead included; GF/s from the ops' matmul FLOPs)\n"
              f"{C.blas_line()}\n{text}")
    path = C.write_json("train_step", dict(
        meta=C.meta(args.threads, repeats=args.repeats, loadavg_before=load0, loadavg_after=load1, wall_s=wall,
                    n_params=tr.model.num_parameters(), n_params_no_wpe=n_no_wpe, vocab_size=tr.cfg.vocab_size),
        results=results, gemm=peak, profiles=profiles))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
