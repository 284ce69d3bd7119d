"""Our engine against PyTorch's stored values (tests/fixtures/*.npz, written by
tests/make_fixtures.py), float64: a handful of ops (value and gradient of every input) and one
tiny-GPT training step (logits, loss, every parameter's gradient, 3 AdamW steps), for both
position schemes. Needs no torch: this is the outside reference on every machine;
tests/test_torch_reference.py runs the same comparisons live where torch is installed.

Tolerance: both sides compute in float64 (~1e-16 relative error per operation) but sum in
different orders (BLAS blocking, our kernels' partial sums), which over these few hundred terms
per sum stays below ~1e-13 (measured: at most 4e-15 on any op's output or gradient and on the
GPT's logits, loss and gradients). RTOL = ATOL = 1e-10 leaves that margin and still catches any
real mistake: a wrong formula, a missing term or a transposed gradient is off by 1e-3 or more.
One exception, the weights after the AdamW steps (ATOL_ADAMW = 1e-9): a gradient that is 0 in
exact arithmetic (c_attn's key bias with learned positions: softmax ignores a shift q.b shared by
every key) comes out as round-off on one side (~1e-18) and exactly 0 on the other, and AdamW
divides it by sqrt(v) + eps, eps = 1e-8, so each step moves that weight by up to lr * noise / eps:
noise of 1e-16 (2.2e-16 times the gradients' scale, 0.5) over 3 steps at lr 1e-2 is 3e-10.
Measured: 8e-11 on that bias, below 1e-13 on every other weight.
"""
from pathlib import Path

import numpy as np
import pytest

from make_fixtures import ADAMW_STEPS, FIXTURE_VERSION, GPT_POS_EMB
from tinygrad_llm import engine as E
from tinygrad_llm.config import GPTConfig
from tinygrad_llm.engine import Tensor
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import AdamW

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RTOL = ATOL = 1e-10
ATOL_ADAMW = 1e-9       # weights after AdamW steps (module docstring)


def load(name: str) -> dict:
    path = FIXTURES / name
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    assert int(arrays["meta.fixture_version"]) == FIXTURE_VERSION, \
        f"{name} is fixture version {arrays['meta.fixture_version']}, expected {FIXTURE_VERSION}: rerun tests/make_fixtures.py"
    return arrays


def close(ours, ref, what, atol=ATOL):
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol, err_msg=what)


def rope(pos, hs, base):
    """RoPE cos, sin for positions (B, T), as (B, 1, T, hs) (what GPT.positions_for hands attention)."""
    cos, sin = E.rope_table(int(pos.max()) + 1, hs, base)
    return cos[pos][:, None], sin[pos][:, None]


def attention(t, a, smear):
    n_head, qkv = int(a["n_head"]), t["qkv"]
    hs = qkv.shape[-1] // 3 // n_head
    if smear:
        qkv = E.smear_keys(qkv, t["alpha"], n_head, t["pos"] != 0)
    return E.causal_self_attention(qkv, n_head, *rope(t["pos"], hs, float(a["rope_base"])))


# our side of each op fixture: (inputs: Tensors for those with a stored gradient, arrays for the
# rest; args) -> output Tensor
OURS = {
    "linear": lambda t, a: E.linear(t["x"], t["w"], t["b"]),
    "matmul": lambda t, a: E.matmul(t["a"], t["b"]),
    "layer_norm": lambda t, a: E.layer_norm(t["x"], t["w"], t["b"], float(a["eps"])),
    "gelu": lambda t, a: E.gelu(t["x"]),
    "softmax": lambda t, a: E.softmax(t["x"], int(a["axis"])),
    "log_softmax": lambda t, a: E.log_softmax(t["x"], int(a["axis"])),
    "logsigmoid": lambda t, a: E.logsigmoid(t["x"]),
    "cross_entropy": lambda t, a: E.cross_entropy(t["logits"], t["targets"], ignore_index=int(a["ignore_index"])),
    "cross_entropy_mask": lambda t, a: E.cross_entropy(t["logits"], t["targets"], mask=t["mask"]),
    "embedding": lambda t, a: E.embedding(t["weight"], t["idx"]),
    "scaled_dot_product_attention": lambda t, a: E.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
    "attention_rope": lambda t, a: attention(t, a, smear=False),
    "attention_rope_smear": lambda t, a: attention(t, a, smear=True),
}


def test_every_fixture_has_a_test_and_all_stay_small():
    files = {p.name: p.stat().st_size for p in FIXTURES.glob("*.npz")}
    assert set(files) == {f"op_{n}.npz" for n in OURS} | {f"gpt_{p}.npz" for p in GPT_POS_EMB}
    assert sum(files.values()) < 1_000_000          # the repository carries them: keep the cases tiny


@pytest.mark.parametrize("name", sorted(OURS))
def test_op_matches_pytorch(name):
    f = load(f"op_{name}.npz")
    inputs = {k[3:]: v for k, v in f.items() if k.startswith("in.")}
    t = {k: Tensor(v.copy(), requires_grad=True) if f"grad.{k}" in f else v for k, v in inputs.items()}
    args = {k[4:]: v for k, v in f.items() if k.startswith("arg.")}
    out = OURS[name](t, args)
    close(out.data, f["out"], f"{name}: output")
    out.backward(f["dout"])
    for k, v in t.items():
        if isinstance(v, Tensor):
            close(v.grad, f[f"grad.{k}"], f"{name}: gradient of {k}")


@pytest.mark.parametrize("pos_emb", GPT_POS_EMB)
def test_gpt_step_matches_pytorch(pos_emb):
    """Logits, loss and every gradient of one forward/backward, then 3 AdamW steps on the batch:
    the loss before each step, the loss and every weight after the last."""
    f = load(f"gpt_{pos_emb}.npz")
    cfg = {k[4:]: v.item() for k, v in f.items() if k.startswith("cfg.")}
    model = GPT(GPTConfig(dropout=0.0, **cfg), dtype=np.float64)
    model.load_state_dict({k[6:]: v for k, v in f.items() if k.startswith("param.")})   # names must match 1:1
    opt = AdamW(model.named_parameters(), lr=float(f["adamw.lr"]), betas=(float(f["adamw.beta1"]), float(f["adamw.beta2"])),
                eps=float(f["adamw.eps"]), weight_decay=float(f["adamw.weight_decay"]))
    losses = []
    for step in range(ADAMW_STEPS):
        logits, loss = model(f["idx"], f["targets"])
        loss.backward()
        if step == 0:
            close(logits.data, f["logits"], "logits")
            close(loss.data, f["loss"], "loss")
            for name, p in model.named_parameters():
                close(p.grad, f[f"grad.{name}"], f"gradient of {name}")
        losses.append(float(loss.data))
        opt.step()
        opt.zero_grad()
    close(losses, f["losses"], "loss before each AdamW step")
    with E.no_grad():
        _, loss = model(f["idx"], f["targets"])
    close(loss.data, f["loss_final"], "loss after the AdamW steps")
    for name, p in model.named_parameters():
        close(p.data, f[f"final.{name}"], f"{name} after the AdamW steps", atol=ATOL_ADAMW)
