"""Write tests/fixtures/*.npz: PyTorch's values for a handful of ops and for one tiny-GPT training
step, so that tests/test_fixtures.py checks our engine against an outside reference on machines
without torch (llm.c's versioned reference file, STYLE.md section 4).

    python tests/make_fixtures.py      # needs torch (pip install torch==2.13.0); rewrites every file

Everything is float64 and seeded: the inputs are drawn here with NumPy and stored in the file
beside what PyTorch computed from them, so the test needs neither torch nor this script's random
streams. Each file records FIXTURE_VERSION and the torch and NumPy versions that wrote it.
Bump FIXTURE_VERSION whenever what a file holds changes (a case, a shape, a key): the test
refuses files of another version. Written with fixed zip timestamps, so rerunning with the same
torch leaves the files byte-identical.

op_<name>.npz   inputs in.<x>, the upstream gradient dout, out = op(inputs), and grad.<x> for
                each input that gets a gradient (backward of out with dout); scalar arguments
                as arg.<k>; meta.what is the PyTorch expression
gpt_<pos>.npz   a tiny GPT (cfg.*), pos_emb "learned" or "rope": weights param.<name>, a batch
                (idx, targets), logits, loss, grad.<name> of every parameter, then 3 AdamW
                steps (adamw.*) on that batch: losses (the loss before each step),
                loss_final and final.<name> (the weights after the third)
"""
from __future__ import annotations

import io
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

FIXTURE_VERSION = 1
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# the tiny GPT: 2 layers, so a block's output feeds another block; T < block_size, so wpe rows past
# T get no gradient (and must still decay); ~7k parameters keep each file under 200 KB
GPT_CONFIG = dict(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True, rope_base=10000.0,
                  smear_keys=False)
GPT_POS_EMB = ("learned", "rope")
GPT_BATCH = (2, 12)                                            # B, T
ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
ADAMW_STEPS = 3


def rng_for(name: str) -> np.random.Generator:
    """One stream per case, so adding or changing a case leaves the other files as they were."""
    return np.random.default_rng(zlib.crc32(name.encode()))


# ----------------------------------------------------------------------------------------
# the op cases

def op_cases(F, torch_gpt) -> dict:
    """{name: make(rng) -> (inputs {name: array}, the names that get a gradient, args, op(tensors,
    args), op as text)}."""
    cases = {}

    def case(name):
        def register(make):
            cases[name] = make
            return make
        return register

    @case("linear")
    def _(rng):
        return (dict(x=rng.standard_normal((3, 5, 7)), w=rng.standard_normal((4, 7)), b=rng.standard_normal(4)),
                "x w b", {}, lambda t, a: F.linear(t["x"], t["w"], t["b"]), "F.linear(x, w, b)")

    @case("matmul")
    def _(rng):                                                # batch dims broadcast: (2, 3) against (3,)
        return (dict(a=rng.standard_normal((2, 3, 5, 7)), b=rng.standard_normal((3, 7, 4))),
                "a b", {}, lambda t, a: t["a"] @ t["b"], "a @ b")

    @case("layer_norm")
    def _(rng):
        C = 32
        return (dict(x=rng.standard_normal((4, 5, C)) * 3 + 1, w=rng.standard_normal(C), b=rng.standard_normal(C)),
                "x w b", dict(eps=1e-5),
                lambda t, a: F.layer_norm(t["x"], (C,), t["w"], t["b"], eps=a["eps"]), "F.layer_norm(x, (C,), w, b, eps)")

    @case("gelu")
    def _(rng):
        return (dict(x=rng.standard_normal((6, 50)) * 3), "x", {},
                lambda t, a: F.gelu(t["x"], approximate="tanh"), 'F.gelu(x, approximate="tanh")')

    @case("softmax")
    def _(rng):
        return (dict(x=rng.standard_normal((3, 6, 11)) * 4), "x", dict(axis=-1),
                lambda t, a: F.softmax(t["x"], dim=a["axis"]), "F.softmax(x, dim=axis)")

    @case("log_softmax")
    def _(rng):
        return (dict(x=rng.standard_normal((3, 6, 11)) * 4), "x", dict(axis=1),
                lambda t, a: F.log_softmax(t["x"], dim=a["axis"]), "F.log_softmax(x, dim=axis)")

    @case("logsigmoid")
    def _(rng):                                                # with the tails a naive log(sigmoid) gets wrong
        return (dict(x=np.concatenate([rng.standard_normal(40) * 5, [-50.0, 50.0, 0.0]])), "x", {},
                lambda t, a: F.logsigmoid(t["x"]), "F.logsigmoid(x)")

    @case("cross_entropy")
    def _(rng):
        B, T, V = 3, 7, 13
        targets = rng.integers(0, V, (B, T))
        targets[0, :3] = -100                                  # ignored positions (PyTorch's default index)
        return (dict(logits=rng.standard_normal((B, T, V)) * 3, targets=targets), "logits", dict(ignore_index=-100),
                lambda t, a: F.cross_entropy(t["logits"].reshape(-1, V), t["targets"].reshape(-1),
                                             ignore_index=a["ignore_index"]),
                "F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index)")

    @case("cross_entropy_mask")
    def _(rng):                                                # SFT's 0/1 loss mask: mean over the kept positions
        B, T, V = 3, 7, 13
        mask = (rng.random((B, T)) < 0.6).astype(np.float64)
        mask[0, 0] = 1.0

        def fn(t, a):
            per = F.cross_entropy(t["logits"].reshape(-1, V), t["targets"].reshape(-1), reduction="none")
            return (per * t["mask"].reshape(-1)).sum() / t["mask"].sum()
        return (dict(logits=rng.standard_normal((B, T, V)) * 3, targets=rng.integers(0, V, (B, T)), mask=mask),
                "logits", {}, fn, "(F.cross_entropy(logits, targets, reduction='none') * mask).sum() / mask.sum()")

    @case("embedding")
    def _(rng):                                                # repeated ids: their gradients must add up
        idx = rng.integers(0, 11, (3, 5))
        idx[1, :2] = idx[0, 0]
        return (dict(weight=rng.standard_normal((11, 6)), idx=idx), "weight", {},
                lambda t, a: F.embedding(t["idx"], t["weight"]), "F.embedding(idx, weight)")

    @case("scaled_dot_product_attention")
    def _(rng):
        q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))
        return (dict(q=q, k=k, v=v), "q k v", {},
                lambda t, a: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True),
                "F.scaled_dot_product_attention(q, k, v, is_causal=True)")

    def attention_case(rng, smear):
        """qkv (B, T, 3C) through smeared keys (optional), RoPE and causal attention; row 1 is
        left-padded (positions 0, 0, 0, 1, ...), as generation passes them."""
        B, T, NH, hs = 2, 7, 2, 8
        pos = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
        inputs = dict(qkv=rng.standard_normal((B, T, 3 * NH * hs)), pos=pos)
        if smear:
            inputs["alpha"] = rng.standard_normal(NH)

        def fn(t, a):
            alpha = t["alpha"] if smear else None
            return torch_gpt.attention(t["qkv"], a["n_head"], t["pos"], a["rope_base"], alpha, t["pos"] != 0)
        return (inputs, "qkv alpha" if smear else "qkv", dict(n_head=NH, rope_base=10000.0), fn,
                "tests/torch_gpt.py attention(qkv, n_head, pos, rope_base" + (", alpha, pos != 0)" if smear else ")"))

    cases["attention_rope"] = lambda rng: attention_case(rng, smear=False)
    cases["attention_rope_smear"] = lambda rng: attention_case(rng, smear=True)
    return cases


# ----------------------------------------------------------------------------------------
# writing

def meta(torch, what: str) -> dict:
    return {"meta.fixture_version": np.array(FIXTURE_VERSION), "meta.torch_version": np.array(torch.__version__),
            "meta.numpy_version": np.array(np.__version__), "meta.what": np.array(what)}


def save_npz(path: Path, arrays: dict) -> int:
    """np.savez_compressed with fixed zip timestamps (byte-identical reruns); -> bytes written."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)
    return path.stat().st_size


def op_fixture(torch, name, make) -> dict:
    inputs, grad_of, args, fn, what = make(rng_for(name))
    grad_of = grad_of.split()
    t = {k: torch.tensor(v, requires_grad=k in grad_of) for k, v in inputs.items()}
    out = fn(t, args)
    dout = rng_for(name + ".dout").standard_normal(out.shape)  # random, so a transposed gradient shows
    out.backward(torch.from_numpy(np.asarray(dout)))
    arrays = {f"in.{k}": v for k, v in inputs.items()}
    arrays.update({f"grad.{k}": t[k].grad.numpy() for k in grad_of})
    arrays.update({f"arg.{k}": np.array(v) for k, v in args.items()})
    arrays.update(out=out.detach().numpy(), dout=dout, **meta(torch, what))
    return arrays


def init_weights(shapes: dict, rng) -> dict:
    """Weights of a size that keeps every activation in range and every gradient non-trivial:
    LayerNorm gains 1 + 0.1 n, every other vector 0.1 n (so biases matter), matrices 0.3 n."""
    out = {}
    for name, shape in shapes.items():
        n = rng.standard_normal(shape)
        gain = name.endswith(".weight") and len(shape) == 1
        out[name] = 1.0 + 0.1 * n if gain else (0.1 if len(shape) == 1 else 0.3) * n
    return out


def gpt_fixture(torch, torch_gpt, pos_emb: str) -> dict:
    from types import SimpleNamespace
    cfg = SimpleNamespace(pos_emb=pos_emb, **GPT_CONFIG)
    rng = rng_for(f"gpt_{pos_emb}")
    weights = init_weights(torch_gpt.param_shapes(cfg), rng)
    B, T = GPT_BATCH
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    params = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    opt = torch_gpt.adamw(params, ADAMW["lr"], (ADAMW["beta1"], ADAMW["beta2"]), ADAMW["eps"], ADAMW["weight_decay"])
    x, y = torch.from_numpy(idx), torch.from_numpy(targets)
    arrays = {f"param.{k}": v for k, v in weights.items()}
    losses = []
    for step in range(ADAMW_STEPS):
        opt.zero_grad(set_to_none=True)
        logits, loss = torch_gpt.gpt(params, cfg, x, y)
        loss.backward()
        if step == 0:
            arrays.update(logits=logits.detach().numpy(), loss=np.array(loss.item()))
            arrays.update({f"grad.{k}": p.grad.numpy().copy() for k, p in params.items()})
        losses.append(loss.item())
        opt.step()
    with torch.no_grad():
        _, loss_final = torch_gpt.gpt(params, cfg, x, y)
    arrays.update({f"final.{k}": p.detach().numpy().copy() for k, p in params.items()})
    arrays.update(idx=idx, targets=targets, losses=np.array(losses), loss_final=np.array(loss_final.item()))
    arrays.update({f"cfg.{k}": np.array(v) for k, v in vars(cfg).items()})
    arrays.update({f"adamw.{k}": np.array(v) for k, v in ADAMW.items()})
    arrays.update(meta(torch, f"tests/torch_gpt.py gpt(), pos_emb={pos_emb!r}, then torch.optim.AdamW x{ADAMW_STEPS}"))
    return arrays


def main() -> int:
    try:
        import torch
    except ImportError:
        print("make_fixtures needs PyTorch: pip install torch==2.13.0", file=sys.stderr)
        return 1
    import torch.nn.functional as F
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_gpt
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(exist_ok=True)
    files = {f"op_{name}.npz": op_fixture(torch, name, make) for name, make in op_cases(F, torch_gpt).items()}
    files.update({f"gpt_{pos}.npz": gpt_fixture(torch, torch_gpt, pos) for pos in GPT_POS_EMB})
    for stale in set(p.name for p in FIXTURES.glob("*.npz")) - set(files):
        (FIXTURES / stale).unlink()
    total = 0
    for name, arrays in files.items():
        size = save_npz(FIXTURES / name, arrays)
        total += size
        print(f"{name:<40}{size:>9,} bytes")
    print(f"{'total':<40}{total:>9,} bytes  (fixture version {FIXTURE_VERSION}, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
