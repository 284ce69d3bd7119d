"""Numba kernels vs their NumPy references at the mini model's shapes, forward and backward.

    python bench/kernels.py                 # 2 threads, table + runs/bench/kernels.json
    python bench/kernels.py --threads 1     # single-threaded Numba and BLAS
    python bench/kernels.py --no-compile    # skip the cold / warm compile-time measurement
    python bench/kernels.py --threads 1 --clock cpu   # CPU time: robust when the machine is busy

Mini shapes: B=8, T=256, C=256, NH=4, hs=64, V=6400, so N = B*T = 2048 rows. Each case is warmed
up first (the first call compiles), then timed `--repeats` times with the Numba kernel and its
reference interleaved (alternating which goes first), and the median is reported. A family whose
kernels lose to NumPy should stay on "numpy" in kernels.DEFAULT_BACKEND; the suggestion printed at
the end is what DEFAULT_BACKEND records. Benchmark on a quiet machine: the load average is
printed and saved because other busy processes on these 2 cores distort wall-clock times, the
2-thread ones most (a parallel call waits for both threads to get a core).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, C, NH, HS, V = 8, 256, 256, 4, 64, 6400
N = B * T
ADAMW_VOCAB = 2000  # the mini model with its ~2,000-character vocabulary: 3.7M parameters


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="Numba and BLAS threads")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per case (median reported)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "kernels.json"))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time (all threads): with --threads 1 it measures the work "
                         "itself and is robust to other busy processes; wall is what training sees")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def mini_param_shapes(vocab=ADAMW_VOCAB, n_layer=4):
    """The mini GPT's parameter shapes (nanoGPT layout, lm_head tied to wte)."""
    shapes = [(vocab, C), (T, C)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,),  # ln_1, attn.c_attn, attn.c_proj
                   (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(C,), (C,)]  # ln_f


def build_cases(K, np):
    """-> list of (family, pass, shape label, numba thunk, numpy thunk), float32 inputs."""
    rng = np.random.default_rng(0)
    f32 = np.float32

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    cases = []
    # LayerNorm on (2048, 256)
    x, w, b, dy = randn(N, C), randn(C), randn(C), randn(N, C)
    _, mean, rstd = K.layernorm_fwd_ref(x, w, b, 1e-5)
    cases += [("layernorm", "fwd", f"({N}, {C})", lambda: K.layernorm_fwd_nb(x, w, b, 1e-5),
               lambda: K.layernorm_fwd_ref(x, w, b, 1e-5)),
              ("layernorm", "bwd", f"({N}, {C})", lambda: K.layernorm_bwd_nb(dy, x, w, mean, rstd),
               lambda: K.layernorm_bwd_ref(dy, x, w, mean, rstd))]
    # GELU on the MLP hidden activations (2048, 1024)
    h, dh = randn(N, 4 * C, scale=2.0), randn(N, 4 * C)
    cases += [("gelu", "fwd", f"({N}, {4 * C})", lambda: K.gelu_fwd_nb(h), lambda: K.gelu_fwd_ref(h)),
              ("gelu", "bwd", f"({N}, {4 * C})", lambda: K.gelu_bwd_nb(h, dh), lambda: K.gelu_bwd_ref(h, dh))]
    # dropout (p = 0.1) on the residual stream (2048, 256)
    keep = K.dropout_fwd_ref(x, 0.1, 7)[1]
    cases += [("dropout", "fwd", f"({N}, {C})", lambda: K.dropout_fwd_nb(x, 0.1, 7), lambda: K.dropout_fwd_ref(x, 0.1, 7)),
              ("dropout", "bwd", f"({N}, {C})", lambda: K.dropout_bwd_nb(dy, keep, 0.1),
               lambda: K.dropout_bwd_ref(dy, keep, 0.1))]
    # embedding backward: 2048 token rows scatter-added into the (6400, 256) table
    ids = rng.integers(0, V, N)
    cases += [("embedding", "bwd", f"{N} rows -> ({V}, {C})", lambda: K.embedding_bwd_nb(ids, dy, V),
               lambda: K.embedding_bwd_ref(ids, dy, V))]
    # causal attention softmax on (8, 4, 256, 256), scale 1/sqrt(hs)
    att, dp, sc = randn(B, NH, T, T, scale=8.0), randn(B, NH, T, T), 1 / HS**0.5
    p = K.attn_softmax_fwd_ref(att, sc)
    cases += [("attn_softmax", "fwd", f"({B}, {NH}, {T}, {T})", lambda: K.attn_softmax_fwd_nb(att, sc),
               lambda: K.attn_softmax_fwd_ref(att, sc)),
              ("attn_softmax", "bwd", f"({B}, {NH}, {T}, {T})", lambda: K.attn_softmax_bwd_nb(p, dp, sc),
               lambda: K.attn_softmax_bwd_ref(p, dp, sc))]
    # fused causal attention against the engine's blocked GEMMs + attn_softmax (the "numpy" side
    # of the "attention" family), q, k, v (8, 4, 256, 64)
    from tinygrad_llm.engine.attention import _blocked_bwd, _blocked_fwd
    q, k, v, dyh = (randn(B, NH, T, HS) for _ in range(4))
    _, lse = K.attention_fwd_nb(q, k, v, sc)
    _, ps = _blocked_fwd(q, k, v)
    cases += [("attention", "fwd", f"({B}, {NH}, {T}, {HS}) x3", lambda: K.attention_fwd_nb(q, k, v, sc),
               lambda: _blocked_fwd(q, k, v)),
              ("attention", "bwd", f"({B}, {NH}, {T}, {HS}) x3", lambda: K.attention_bwd_nb(dyh, q, k, v, lse, sc),
               lambda: _blocked_bwd(dyh, q, k, v, ps))]
    # the head split with RoPE (and its backward) on c_attn's output (8, 256, 768)
    qkv3, dheads = randn(B, T, 3 * C), randn(3, B, NH, T, HS)
    cos_r, sin_r = randn(1, T, HS), randn(1, T, HS)
    cases += [("rope", "fwd", f"({B}, {T}, {3 * C})", lambda: K.rope_split_nb(qkv3, NH, cos_r, sin_r),
               lambda: K.rope_split_ref(qkv3, NH, cos_r, sin_r)),
              ("rope", "bwd", f"(3, {B}, {NH}, {T}, {HS})", lambda: K.rope_merge_nb(dheads, cos_r, sin_r),
               lambda: K.rope_merge_ref(dheads, cos_r, sin_r))]
    # smeared keys on c_attn's output (8, 256, 768), forward and backward
    gate_s, mix_s = np.full(NH, 0.05, f32), np.ones((1, T), bool)
    _, diff_s = K.smear_fwd_ref(qkv3, gate_s, mix_s)
    dqkv3 = randn(B, T, 3 * C)
    cases += [("smear", "fwd", f"({B}, {T}, {3 * C})", lambda: K.smear_fwd_nb(qkv3, gate_s, mix_s),
               lambda: K.smear_fwd_ref(qkv3, gate_s, mix_s)),
              ("smear", "bwd", f"({B}, {T}, {3 * C})", lambda: K.smear_bwd_nb(dqkv3, diff_s, gate_s, mix_s),
               lambda: K.smear_bwd_ref(dqkv3, diff_s, gate_s, mix_s))]
    # one decode step's attention, batch 16, 128 cached positions of a 256-slot cache, RoPE
    Bd, L0 = 16, 128
    qkv1 = randn(Bd, 3 * C)
    kc, vc = randn(Bd, NH, T, HS), randn(Bd, NH, T, HS)
    kT, valid = np.ascontiguousarray(kc.swapaxes(-1, -2)), np.ones((Bd, T), bool)
    cos, sin = randn(Bd, HS), randn(Bd, HS)
    cases += [("decode", "step", f"B={Bd}, {L0} cached", lambda: K.decode_attention_nb(
                   qkv1, kc, kT, vc, valid, L0, cos, sin, None, None, None),
               lambda: K.decode_attention_ref(qkv1, kc, kT, vc, valid, L0, cos, sin, None, None, None))]
    # the whole batch-1 decode step (4 layers + lm_head), 128 cached positions, RoPE
    Ld = 4
    dw = K.DecodeWeights(ln=randn(Ld, 4, C), wa=randn(Ld, C, 3 * C, scale=0.05), ba=randn(Ld, 3 * C),
                         wp=randn(Ld, C, C, scale=0.05), bp=randn(Ld, C), wf=randn(Ld, C, 4 * C, scale=0.05),
                         bf=randn(Ld, 4 * C), wm=randn(Ld, 4 * C, C, scale=0.05), bm=randn(Ld, C),
                         lnf=randn(2, C), wte_t=randn(C, V, scale=0.05), gate=np.zeros((Ld, NH), f32), eps=1e-5)
    x1, kc1, vc1 = randn(1, C), randn(Ld, 1, NH, T, HS), randn(Ld, 1, NH, T, HS)
    kT1, valid1, mix1 = np.ascontiguousarray(kc1.swapaxes(-1, -2)), np.ones((1, T), bool), np.ones(1, bool)
    cases += [("decode", "token", f"B=1, {L0} cached, {Ld} layers + lm_head", lambda: K.decode_token_nb(
                   x1, L0, cos[:1], sin[:1], mix1, dw, kc1, kT1, vc1, None, valid1),
               lambda: K.decode_token_ref(x1, L0, cos[:1], sin[:1], mix1, dw, kc1, kT1, vc1, None, valid1))]
    # row softmax and cross-entropy over the vocabulary, (2048, 6400)
    logits, dl = randn(N, V, scale=3.0), randn(N, V)
    y = K.softmax_fwd_ref(logits)
    cases += [("softmax", "fwd", f"({N}, {V})", lambda: K.softmax_fwd_nb(logits),
               lambda: K.softmax_fwd_ref(logits)),
              ("softmax", "bwd", f"({N}, {V})", lambda: K.softmax_bwd_nb(y, dl),
               lambda: K.softmax_bwd_ref(y, dl))]
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) < 0.9).astype(f32)  # SFT-like: some rows masked out
    dlosses = np.full(N, 1 / N, f32)
    _, lse = K.ce_fwd_ref(logits, targets, mask)
    cases += [("ce", "fwd", f"({N}, {V})", lambda: K.ce_fwd_nb(logits, targets, mask),
               lambda: K.ce_fwd_ref(logits, targets, mask)),
              ("ce", "bwd", f"({N}, {V})", lambda: K.ce_bwd_nb(logits, targets, mask, lse, dlosses),
               lambda: K.ce_bwd_ref(logits, targets, mask, lse, dlosses))]
    # AdamW over every parameter array of the mini model, one call per array like optim.py
    params = [randn(*s, scale=0.02) for s in mini_param_shapes()]
    grads = [randn(*s, scale=0.01) for s in mini_param_shapes()]
    ms, vs = [np.zeros_like(q) for q in params], [np.zeros_like(q) for q in params]
    n_params = sum(q.size for q in params)

    def adamw(f):
        for q, g, m, v in zip(params, grads, ms, vs):
            f(q, g, m, v, 3e-4, 0.9, 0.95, 1e-8, 0.1, 10)

    cases += [("adamw", "update", f"{len(params)} arrays, {n_params / 1e6:.2f}M",
               lambda: adamw(K.adamw_update_nb), lambda: adamw(K.adamw_update_ref))]
    return cases


def time_cases(cases, repeats, clock=time.perf_counter):
    """-> {case index: ([numba s ...], [numpy s ...])}, nb and ref interleaved."""
    for _, _, _, nb, ref in cases:  # warm-up: compile, fault in pages, fill caches
        nb(), ref(), nb(), ref()
    times = {i: ([], []) for i in range(len(cases))}
    for r in range(repeats):
        for i, (_, _, _, nb, ref) in enumerate(cases):
            order = ((0, nb), (1, ref)) if r % 2 == 0 else ((1, ref), (0, nb))
            for slot, f in order:
                t0 = clock()
                f()
                times[i][slot].append(clock() - t0)
    return times


def median(ts):
    return sorted(ts)[len(ts) // 2]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def compile_child():
    """Time the first float32 call of every Numba kernel (small shapes), print JSON."""
    import numpy as np

    t0 = time.perf_counter()
    from tinygrad_llm import kernels as K

    out = {"import_s": time.perf_counter() - t0}
    f32, rng = np.float32, np.random.default_rng(0)
    x, w = rng.standard_normal((4, 32)).astype(f32), np.ones(32, f32)
    att = rng.standard_normal((1, 2, 8, 8)).astype(f32)
    t, mask = np.array([1, 2, 3, 4]), np.ones(4, f32)
    _, mean, rstd = K.layernorm_fwd_ref(x, w, w, 1e-5)
    _, lse = K.ce_fwd_ref(x, t, mask)
    calls = {
        "softmax_fwd": lambda: K.softmax_fwd_nb(x), "softmax_bwd": lambda: K.softmax_bwd_nb(x, x),
        "attn_softmax_fwd": lambda: K.attn_softmax_fwd_nb(att, 0.5),
        "attn_softmax_bwd": lambda: K.attn_softmax_bwd_nb(att, att, 0.5),
        "ce_fwd": lambda: K.ce_fwd_nb(x, t, mask), "ce_bwd": lambda: K.ce_bwd_nb(x, t, mask, lse, mask),
        "layernorm_fwd": lambda: K.layernorm_fwd_nb(x, w, w, 1e-5),
        "layernorm_bwd": lambda: K.layernorm_bwd_nb(x, x, w, mean, rstd),
        "gelu_fwd": lambda: K.gelu_fwd_nb(x), "gelu_bwd": lambda: K.gelu_bwd_nb(x, x),
        "dropout_fwd": lambda: K.dropout_fwd_nb(x, 0.1, 7),
        "dropout_bwd": lambda: K.dropout_bwd_nb(x, K.dropout_fwd_ref(x, 0.1, 7)[1], 0.1),
        "embedding_bwd": lambda: K.embedding_bwd_nb(t, x, 8),
        "adamw": lambda: K.adamw_update_nb(x.copy(), x, x.copy(), x * x, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1),
        "rope_split": lambda: K.rope_split_nb(np.ones((1, 4, 24), f32), 2, np.ones((1, 4, 4), f32), np.ones((1, 4, 4), f32)),
        "smear_fwd": lambda: K.smear_fwd_nb(np.ones((1, 4, 12), f32), np.ones(2, f32), np.ones((1, 4), bool)),
        "smear_bwd": lambda: K.smear_bwd_nb(np.ones((1, 4, 12), f32), np.ones((1, 4, 4), f32), np.ones(2, f32),
                                            np.ones((1, 4), bool)),
        "rope_merge": lambda: K.rope_merge_nb(np.ones((3, 1, 2, 4, 4), f32), np.ones((1, 4, 4), f32), np.ones((1, 4, 4), f32)),
        "attention_fwd": lambda: K.attention_fwd_nb(att, att, att, 0.5),
        "attention_bwd": lambda: K.attention_bwd_nb(att, att, att, att, att[..., 0], 0.5),
        "decode_attention": lambda: K.decode_attention_nb(np.ones((1, 48), f32), att.copy(), att.copy(), att.copy(),
                                                          np.ones((1, 8), bool), 3, None, None, None, None, None),
        "decode_token": lambda: K.decode_token_nb(np.ones((1, 8), f32), 3, None, None, np.ones(1, bool), K.DecodeWeights(
            np.ones((1, 4, 8), f32), np.ones((1, 8, 24), f32), np.ones((1, 24), f32), np.ones((1, 8, 8), f32),
            np.ones((1, 8), f32), np.ones((1, 8, 32), f32), np.ones((1, 32), f32), np.ones((1, 32, 8), f32),
            np.ones((1, 8), f32), np.ones((2, 8), f32), np.ones((8, 5), f32), np.zeros((1, 2), f32), 1e-5),
            np.ones((1, 1, 2, 8, 4), f32), np.ones((1, 1, 2, 4, 8), f32), np.ones((1, 1, 2, 8, 4), f32), None,
            np.ones((1, 8), bool)),
    }
    for name, f in calls.items():
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        out[name] = time.perf_counter() - t0
        out[name + "_cpu"] = time.process_time() - c0  # compiling is single-threaded CPU work
    print(json.dumps(out))


def measure_compile(threads):
    """First-call times with an empty Numba cache (cold), then again with it filled (warm)."""
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-child"],
                                  env=env, capture_output=True, text=True, check=True)
            res[label] = json.loads(proc.stdout)
            res[label]["process_s"] = time.perf_counter() - t0
    return res


def main():
    args = parse_args()
    if args.compile_child:
        return compile_child()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # must precede the first numba import
    sys.path.insert(0, ROOT)
    import numba
    import numpy as np
    from threadpoolctl import threadpool_limits

    from common import blas_facts, blas_line

    from tinygrad_llm import kernels as K

    numba.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # BLAS
    load_before = os.getloadavg()
    cases = build_cases(K, np)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_cases(cases, args.repeats, clock)
    load_after = os.getloadavg()

    rows = []
    print(f"\nthreads={args.threads}  repeats={args.repeats}  clock={args.clock}  "
          f"layer={numba.threading_layer()}  "
          f"load avg before/after {load_before[0]:.2f}/{load_after[0]:.2f}")
    print(f"{blas_line()}\n")
    print("medians of the interleaved runs; 'best' compares the fastest run of each side, a steadier")
    print("estimate when other processes share the cores\n")
    print(f"{'kernel':13s} {'pass':7s} {'shape':32s} {'numpy ms':>9s} {'numba ms':>9s} "
          f"{'speed-up':>8s} {'best':>7s}")
    for i, (fam, pas, shape, _, _) in enumerate(cases):
        nb_ts, ref_ts = times[i]
        t_nb, t_ref = median(nb_ts), median(ref_ts)
        best = min(ref_ts) / min(nb_ts)
        rows.append({"kernel": fam, "pass": pas, "shape": shape,
                     "numpy_ms": t_ref * 1e3, "numba_ms": t_nb * 1e3, "speedup": t_ref / t_nb,
                     "numpy_min_ms": min(ref_ts) * 1e3, "numba_min_ms": min(nb_ts) * 1e3, "speedup_best": best})
        print(f"{fam:13s} {pas:7s} {shape:32s} {t_ref * 1e3:9.3f} {t_nb * 1e3:9.3f} "
              f"{t_ref / t_nb:7.2f}x {best:6.2f}x")
    # a family earns "numba" when every one of its cases is faster than the reference
    suggestion = {fam: "numba" if all(r["speedup"] > 1 for r in rows if r["kernel"] == fam) else "numpy"
                  for fam in K.KERNELS}
    print("\nsuggested DEFAULT_BACKEND:", suggestion)
    if suggestion != K.DEFAULT_BACKEND:
        print("(differs from kernels.DEFAULT_BACKEND:", K.DEFAULT_BACKEND, ")")

    compile_times = None
    if not args.no_compile:
        compile_times = measure_compile(args.threads)
        cold, warm = compile_times["cold"], compile_times["warm"]
        kern = [k for k in cold if k not in ("import_s", "process_s") and not k.endswith("_cpu")]
        for d in (cold, warm):
            d["all_kernels_s"] = sum(d[k] for k in kern)
            d["all_kernels_cpu_s"] = sum(d[k + "_cpu"] for k in kern)
        print("\nfirst call of each Numba kernel at float32: compile (cold, empty NUMBA_CACHE_DIR) or")
        print("cache load (warm), seconds; wall and CPU time of the calling process")
        print(f"{'kernel':18s} {'cold wall':>9s} {'cold cpu':>9s} {'warm wall':>9s} {'warm cpu':>9s}")
        for k in ["import_s"] + kern + ["all_kernels_s"]:
            kc = k + "_cpu" if k in kern else ("all_kernels_cpu_s" if k == "all_kernels_s" else k)
            print(f"{k:18s} {cold[k]:9.2f} {cold[kc]:9.2f} {warm[k]:9.2f} {warm[kc]:9.2f}")
        print(f"{'whole process':18s} {cold['process_s']:9.2f} {'':9s} {warm['process_s']:9.2f}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = dict(threads=args.threads, repeats=args.repeats, clock=args.clock,
                threading_layer=numba.threading_layer(),
                numpy=np.__version__, numba=numba.__version__, python=platform.python_version(),
                cpu=cpu_name(), blas_facts=blas_facts(), loadavg_before=load_before,
                loadavg_after=load_after, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=rows, suggested_default_backend=suggestion,
                       default_backend=K.DEFAULT_BACKEND, compile=compile_times), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
