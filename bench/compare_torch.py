"""Our engine vs PyTorch eager on the same model, weights, batch and thread count.

    python bench/compare_torch.py               # 2 threads, train step at 8x256, generation B=1, 16
    python bench/compare_torch.py --threads 1
    python bench/compare_torch.py --quick       # 3 repeats, 32 new tokens

PyTorch is not a dependency: `pip install torch==2.13.0` (the CPU build these machines hold;
never install torch without that pin). Without it the script says so and exits 0.

1. Numerics (dropout off): logits, loss and every parameter gradient of one forward/backward,
   max abs difference ours vs PyTorch, in float32 and then in float64.
2. Speed (dropout as configured): a full train step (forward, backward, clip 1.0, AdamW) and
   greedy generation (prompt 32) at batch 1 and 16, ours and PyTorch interleaved, medians.
   Each side runs in a worker process of its own with its own defaults (speed_worker): both
   use libgomp, which reads its settings once per process, and ours asks for passive waits.
   PyTorch generates with a simple KV-cache loop (preallocated per-layer K/V, SDPA), ours with
   model.generate (also a KV cache). The ratio is ours / PyTorch tokens/s.

The PyTorch model is nanoGPT's: pre-LN blocks, fused c_attn (3C, C) with q, k, v in that
order, GELU tanh approximation, LayerNorm eps 1e-5, lm_head tied to wte, and the same parameter
names, so our state_dict() loads 1:1. Like ours it has no dropout on the attention weights
(dropout after the embeddings, after attn.c_proj and after mlp.c_proj). Positions follow the
config: learned wpe, or RoPE on q and k from the same float64 table (the mini config's choice);
smeared keys are not written in PyTorch here. Every table names each process's BLAS and kernel.
Writes runs/bench/compare_torch-t<threads>.json.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

import common as C

# libgomp settings as the user left them, read before our package sets its default
# (OMP_WAIT_POLICY, in tinygrad_llm/runtime.py)
USER_GOMP_ENV = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY",)}

INSTALL_HINT = ("PyTorch is not installed; it is an optional yardstick only. Install the CPU build these "
                "machines hold with:\n    pip install torch==2.13.0\n(never without the pin: any other spec "
                "downloads gigabytes)")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="train-step batch size")
    ap.add_argument("--seq", type=int, default=256, help="train-step sequence length")
    ap.add_argument("--gen-batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="3 repeats, 32 new tokens")
    ap.add_argument("--dropout", type=float, default=None,
                    help="dropout of the speed runs (default: the mini config's, 0); the numerics run has it off")
    args = ap.parse_args()
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    if args.quick:
        args.repeats, args.new_tokens = 3, 32
    return args


# ----------------------------------------------------------------------------------------
# nanoGPT in PyTorch, with a KV cache for generation

def build_torch_gpt(torch, cfg):
    nn, F = torch.nn, torch.nn.functional
    if cfg.smear_keys:
        raise NotImplementedError("compare_torch: the PyTorch model has no smeared keys")
    rope = cfg.pos_emb == "rope"

    def rotate(x, cos, sin):
        """RoPE, rotate-half convention (model.py's docstring): x*cos + rotate_half(x)*sin."""
        h = x.shape[-1] // 2
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)   # float64 tables rounded to the model's dtype, as ours
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
            self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.resid_dropout = nn.Dropout(cfg.dropout)

        def forward(self, x, cache=None, layer=0, pos=0, cos_sin=None):
            B, T, Cn = x.shape
            nh = cfg.n_head
            q, k, v = self.c_attn(x).split(Cn, dim=2)
            q, k, v = (t.view(B, T, nh, Cn // nh).transpose(1, 2) for t in (q, k, v))   # (B, nh, T, hs)
            if cos_sin is not None:                     # positions pos..pos+T-1 (no padding here)
                q, k = rotate(q, *cos_sin), rotate(k, *cos_sin)
            if cache is not None:                       # write the new keys/values, attend to all so far
                cache[0][layer][:, :, pos:pos + T] = k
                cache[1][layer][:, :, pos:pos + T] = v
                k, v = cache[0][layer][:, :, :pos + T], cache[1][layer][:, :, :pos + T]
            # prefill (T == keys) is causal; one new query may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, Cn)))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
            self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.dropout = nn.Dropout(cfg.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
            self.attn = CausalSelfAttention()
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
            self.mlp = MLP()

        def forward(self, x, cache=None, layer=0, pos=0, cos_sin=None):
            x = x + self.attn(self.ln_1(x), cache, layer, pos, cos_sin)
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), drop=nn.Dropout(cfg.dropout),
                         h=nn.ModuleList(Block() for _ in range(cfg.n_layer)),
                         ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias))
            if not rope:
                parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.transformer = nn.ModuleDict(parts)
            if rope:                                    # the same float64 table as ours
                from tinygrad_llm.engine import rope_table
                cos, sin = rope_table(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_base)
                self.rope_cos, self.rope_sin = torch.from_numpy(cos), torch.from_numpy(sin)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight          # tied

        def forward(self, idx, targets=None, cache=None, pos=0):
            B, T = idx.shape
            tr = self.transformer
            if rope:
                x, cos_sin = tr.drop(tr.wte(idx)), (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])
            else:
                x, cos_sin = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(pos, pos + T))), None
            for i, block in enumerate(tr.h):
                x = block(x, cache, i, pos, cos_sin)
            logits = self.lm_head(tr.ln_f(x))
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        @torch.no_grad()
        def generate(self, idx, n_new):
            """Greedy, KV cache: prefill the prompt, then one token per step. idx (B, Tp) -> (B, n_new)."""
            B, Tp = idx.shape
            hs = cfg.n_embd // cfg.n_head
            shape = (cfg.n_layer, B, cfg.n_head, Tp + n_new, hs)
            dt = self.transformer.wte.weight.dtype
            cache = (torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt))
            out, pos, step = [], 0, idx
            for _ in range(n_new):
                logits, _ = self(step, cache=cache, pos=pos)
                pos += step.shape[1]
                step = logits[:, -1].argmax(-1, keepdim=True)
                out.append(step)
            return torch.cat(out, 1)

    return GPT()


def load_ours_into_torch(torch, tmodel, ours):
    """Copy our state_dict into the torch model by name (1:1; lm_head is tied, so it has no key)."""
    state = ours.state_dict()
    tparams = dict(tmodel.named_parameters())
    if set(state) != set(tparams):
        raise RuntimeError(f"parameter names differ: {sorted(set(state) ^ set(tparams))[:6]}")
    with torch.no_grad():
        for name, p in tparams.items():
            p.copy_(torch.from_numpy(state[name]))


# ----------------------------------------------------------------------------------------
# 1. numerics

def numerics(torch, cfg, dtype, B=4, T=64, seed=0):
    """-> dict of max abs differences (dropout off)."""
    import dataclasses
    import numpy as np
    from tinygrad_llm.model import GPT
    cfg = dataclasses.replace(cfg, dropout=0.0)
    ours = GPT(cfg, seed=seed, dtype=dtype)
    tm = build_torch_gpt(torch, cfg).to(torch.float64 if dtype == np.float64 else torch.float32)
    load_ours_into_torch(torch, tm, ours)
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, cfg.vocab_size, (B, T + 1))
    x, y = np.ascontiguousarray(xy[:, :-1]), np.ascontiguousarray(xy[:, 1:])
    logits, loss = ours(x, y)
    loss.backward()
    tlogits, tloss = tm(torch.from_numpy(x), torch.from_numpy(y))
    tloss.backward()
    tgrads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    grad_diff = {n: float(np.abs(p.grad - tgrads[n]).max()) for n, p in ours.named_parameters()}
    worst = max(grad_diff, key=grad_diff.get)
    return dict(dtype=np.dtype(dtype).name, B=B, T=T,
                logits=float(np.abs(logits.data - tlogits.detach().numpy()).max()),
                logits_scale=float(np.abs(logits.data).max()),
                loss=abs(float(loss.data) - tloss.item()), loss_value=float(loss.data),
                grad_max=grad_diff[worst], grad_worst=worst,
                grad_scale=float(max(np.abs(g).max() for g in tgrads.values())), grads=grad_diff)


# ----------------------------------------------------------------------------------------
# 2. speed

def mini_config(dropout=None):
    """The mini model at a 6,400-character vocabulary; dropout: None keeps the config's."""
    from tinygrad_llm.config import get_mini_config
    cfg = get_mini_config(vocab_size=6400)
    if dropout is not None:
        cfg.dropout = dropout
    return cfg


def speed_worker(side, args, user_gomp_env, conn):
    """One side of the speed comparison in its own process, so that each runs with its own
    defaults: Numba's OpenMP and PyTorch's are the same libgomp, set up once per process, and
    our package asks for passive waits (OMP_WAIT_POLICY=PASSIVE) which slow
    PyTorch's many small parallel regions, and for glibc's malloc to keep freed memory
    (tinygrad_llm/runtime.py), which PyTorch does not do. The PyTorch worker gets none of
    these: the user's libgomp settings or none, and glibc's default allocator, as a plain
    PyTorch run. Answers ("train",), ("generate", b), ("tokens", b), ("state",),
    ("load", state), ("blas",), ("quit",) over `conn`."""
    import os
    if side == "torch":
        for var, value in user_gomp_env.items():
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value
        os.environ["TINYGRAD_LLM_KEEP_MEMORY"] = "0"   # read when tinygrad_llm is imported, below
        import torch                          # first: its libgomp starts with that environment
        torch.set_num_threads(args["threads"])
    import numpy as np
    C.setup_threads(args["threads"])
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW, clip_grad_norm
    cfg = mini_config(args["dropout"])
    ours = GPT(cfg, seed=0).train()            # both sides start from these weights
    rng = np.random.default_rng(0)
    xy = rng.integers(0, cfg.vocab_size, (args["batch"], args["seq"] + 1))
    x, y = np.ascontiguousarray(xy[:, :-1]), np.ascontiguousarray(xy[:, 1:])
    prompts = {b: rng.integers(6, cfg.vocab_size, (b, args["prompt_len"])) for b in args["gen_batches"]}
    toks = {}
    if side == "ours":
        params = ours.parameters()
        opt = AdamW(ours.named_parameters(), lr=3e-4, weight_decay=0.1)

        def step():
            _, loss = ours(x, y)
            loss.backward()
            clip_grad_norm(params, 1.0)
            opt.step()
            opt.zero_grad()

        def generate(b):
            ours.eval()
            toks[b] = ours.generate(prompts[b].tolist(), max_new_tokens=args["new_tokens"], temperature=0.0,
                                    stop_tokens=()).tokens

        def load(state):
            ours.load_state_dict(state)
    else:
        tm = build_torch_gpt(torch, cfg).train()
        load_ours_into_torch(torch, tm, ours)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        tparams = list(tm.parameters())
        decay = [p for p in tparams if p.dim() >= 2]                       # as optim.AdamW: matrices only
        nodecay = [p for p in tparams if p.dim() < 2]
        topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                                 lr=3e-4, betas=(0.9, 0.95), eps=1e-8)

        def step():
            _, loss = tm(tx, ty)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tparams, 1.0)
            topt.step()
            topt.zero_grad(set_to_none=True)

        def generate(b):
            tm.eval()
            toks[b] = tm.generate(torch.from_numpy(prompts[b]), args["new_tokens"]).numpy()

        def load(state):
            ours.load_state_dict(state)
            load_ours_into_torch(torch, tm, ours)

    handlers = {"train": step, "generate": generate, "tokens": lambda b: toks[b],
                "state": ours.state_dict, "load": load, "blas": C.blas_line}
    while True:
        cmd, *rest = conn.recv()
        if cmd == "quit":
            return
        try:
            conn.send(handlers[cmd](*rest))
        except Exception as exc:              # noqa: BLE001 - handed to the parent, which raises it
            conn.send(exc)


def main():
    args = parse_args()
    try:
        import torch
    except ImportError:
        print(INSTALL_HINT)
        return 0
    import numpy as np
    C.setup_threads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = mini_config(args.dropout)

    # 1. numerics
    num = [numerics(torch, cfg, np.float32), numerics(torch, cfg, np.float64)]
    print(f"\nnumerics, dropout off, B x T = {num[0]['B']}x{num[0]['T']}, max abs difference ours vs PyTorch:")
    print(C.blas_line())
    print(C.table(["dtype", "logits", "(|logits| max)", "loss", "grads (worst)", "(|grad| max)", "worst param"],
                  [[r["dtype"], r["logits"], r["logits_scale"], r["loss"], r["grad_max"], r["grad_scale"],
                    r["grad_worst"]] for r in num], [None, ".2e", ".2e", ".2e", ".2e", ".2e", None], left=(0, 6)))

    # 2. speed: one worker process per side, driven alternately (see speed_worker)
    ctx = mp.get_context("spawn")
    conns, procs = {}, {}
    for side in ("ours", "torch"):
        conns[side], child = ctx.Pipe()
        procs[side] = ctx.Process(target=speed_worker, args=(side, vars(args), USER_GOMP_ENV, child))
        procs[side].start()
        child.close()                         # so that a worker dying shows up as EOFError in recv()

    def call(side, *msg):
        conns[side].send(msg)
        reply = conns[side].recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    try:
        load0 = C.loadavg()
        train_t = C.interleave({side: lambda side=side: call(side, "train") for side in conns}, args.repeats, warmup=2)
        # generation from the trained-a-little weights, copied so that both start equal
        call("torch", "load", call("ours", "state"))
        gen_variants = {f"{side} B={b}": lambda side=side, b=b: call(side, "generate", b)
                        for b in args.gen_batches for side in conns}
        gen_t = C.interleave(gen_variants, args.repeats, warmup=1)
        load1 = C.loadavg()
        toks = {(side, b): call(side, "tokens", b) for side in conns for b in args.gen_batches}
        blas = {side: call(side, "blas") for side in conns}
    finally:
        for side in conns:
            conns[side].send(("quit",))
            procs[side].join()

    ntok = args.batch * args.seq
    rows, speed = [], []
    to, tt = C.median(train_t["ours"]), C.median(train_t["torch"])
    speed.append(dict(what=f"train step {args.batch}x{args.seq}", ours_tokens_per_s=ntok / to,
                      torch_tokens_per_s=ntok / tt, ratio=tt / to, ours_s_all=train_t["ours"],
                      torch_s_all=train_t["torch"]))
    rows.append([f"train step {args.batch}x{args.seq}", ntok / to, ntok / tt, f"{tt / to:.2f}", ""])
    for b in args.gen_batches:
        go, gt = C.median(gen_t[f"ours B={b}"]), C.median(gen_t[f"torch B={b}"])
        agree = float((toks[("ours", b)] == toks[("torch", b)]).mean())
        n = b * args.new_tokens
        speed.append(dict(what=f"generate B={b}", ours_tokens_per_s=n / go, torch_tokens_per_s=n / gt,
                          ratio=gt / go, greedy_token_agreement=agree, ours_s_all=gen_t[f"ours B={b}"],
                          torch_s_all=gen_t[f"torch B={b}"]))
        rows.append([f"generate B={b} (KV cache)", n / go, n / gt, f"{gt / go:.2f}", f"{agree:.0%}"])
    print(f"\nspeed, mini model (vocab {cfg.vocab_size}, dropout {cfg.dropout}), float32, {args.threads} threads, "
          f"torch {torch.__version__}; generation: greedy, prompt {args.prompt_len}, {args.new_tokens} new; "
          f"repeats {args.repeats}, interleaved; load avg before/after {load0[0]:.2f}/{load1[0]:.2f}")
    for side in conns:
        print(f"{side} process: {blas[side]}")
    print()
    print(C.table(["", "ours tok/s", "torch tok/s", "ours/torch", "same tokens"], rows,
                  [None, ".0f", ".0f", None, None]))
    path = C.write_json(f"compare_torch-t{args.threads}", dict(
        meta=C.meta(args.threads, torch=torch.__version__, repeats=args.repeats, blas_per_process=blas,
                    loadavg_before=load0,
                    loadavg_after=load1, train_shape=[args.batch, args.seq], prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, torch_generation="KV cache (preallocated, SDPA), greedy"),
        numerics=num, speed=speed))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
