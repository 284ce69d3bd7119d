"""LoRA: the adapter's function and gradients (finite differences, float64), a frozen base that
never moves, adapter checkpoints that belong to one base, merging, and the CLI end to end."""
import json

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run, run_many, train_cmd, write_tiny_data
from tinygrad_llm import nn
from tinygrad_llm.checkpoint import CheckpointError, load_gpt, load_into, read_metadata, save_checkpoint
from tinygrad_llm.config import ConfigError, LoopConfig, get_tiny_config
from tinygrad_llm.engine import Tensor
from tinygrad_llm.gradcheck import check, check_module
from tinygrad_llm.lora import LoRAConfig, apply_lora, attach_adapter, merge, save_adapter
from tinygrad_llm.loop import train
from tinygrad_llm.model import GPT

V = 40


def tiny_gpt(seed=0, dtype=np.float32):
    import dataclasses
    return GPT(dataclasses.replace(get_tiny_config(V), dropout=0.0), seed=seed, dtype=dtype)


def randomize_B(model, seed=1, std=0.1):
    """A trained-looking adapter: B off zero (at B = 0 the gradient of A is exactly 0)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data = (rng.standard_normal(p.shape) * std).astype(p.dtype)


def test_fresh_adapter_computes_the_base_and_merging_keeps_the_function():
    rng = np.random.default_rng(0)
    base = nn.Linear(6, 5, rng=rng, dtype=np.float64)
    lora = nn.LoRALinear(base, r=3, alpha=6.0, rng=rng)
    x = Tensor(rng.standard_normal((2, 4, 6)))
    assert np.array_equal(lora(x).data, base(x).data)                 # B = 0: exactly the base
    assert lora.lora_A.shape == (3, 6) and lora.lora_B.shape == (5, 3) and lora.scale == 2.0
    lora.lora_B.data = rng.standard_normal((5, 3))
    by_hand = x.data @ base.weight.data.T + base.bias.data + 2.0 * (x.data @ lora.lora_A.data.T) @ lora.lora_B.data.T
    np.testing.assert_allclose(lora(x).data, by_hand, rtol=1e-12)
    np.testing.assert_allclose(x.data @ lora.merged_weight().T + base.bias.data, by_hand, rtol=1e-12)


def test_lora_linear_gradcheck():
    """d/dA, d/dB, d/dW, d/db and d/dx of a LoRALinear against central differences (float64)."""
    rng = np.random.default_rng(2)
    lora = nn.LoRALinear(nn.Linear(6, 5, rng=rng, dtype=np.float64), r=3, alpha=4.0, rng=rng)
    lora.lora_B.data = rng.standard_normal((5, 3))
    x = Tensor(rng.standard_normal((2, 4, 6)), requires_grad=True)
    res = check_module(lora, lambda: lora(x)) + check(lambda t: lora(t), [x])
    assert {r.name for r in res[:-1]} == {"weight", "bias", "lora_A", "lora_B"}
    assert all(r.ok for r in res), [r for r in res if not r.ok]


def test_adapters_on_a_tiny_gpt_gradcheck_and_first_forward():
    model = tiny_gpt(dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, V, (2, 9))
    tgt = np.random.default_rng(1).integers(0, V, (2, 9))
    logits0 = model(idx)[0].data
    adapted = apply_lora(model, LoRAConfig(r=2, alpha=4.0, targets="c_attn,c_proj,c_fc"))
    assert len(adapted) == 8                                          # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert np.array_equal(model(idx)[0].data, logits0)                # the first forward is the base's
    randomize_B(model)
    res = check_module(model, lambda: model(idx, tgt)[1], max_elems=6)
    assert {r.name.rsplit(".", 1)[-1] for r in res} == {"lora_A", "lora_B"}   # only adapters are parameters now
    assert all(r.ok for r in res), [r for r in res if not r.ok]


def test_targets_select_layers_and_unknown_targets_are_refused():
    m = tiny_gpt()
    assert apply_lora(m, LoRAConfig(r=2, targets="attn.c_proj")) == ["transformer.h.0.attn.c_proj",
                                                                      "transformer.h.1.attn.c_proj"]
    with pytest.raises(ConfigError, match="no layer named q_proj"):
        apply_lora(tiny_gpt(), LoRAConfig(r=2, targets="c_attn,q_proj"))
    with pytest.raises(ConfigError):
        LoRAConfig(r=-1).validate()


def test_frozen_base_gets_no_gradient_and_no_update():
    model = tiny_gpt()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4))
    frozen = model.lora_frozen
    adapters = {k: v.copy() for k, v in model.state_dict().items()}
    assert set(adapters) and all(k.endswith(("lora_A", "lora_B")) for k in adapters)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, (4, 12))

    def loss_fn(m, batch):
        return m(batch[:, :-1], batch[:, 1:])[1], {"tokens": batch.size}

    cfg = LoopConfig(max_steps=5, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, log_every=1)
    out = train(model, cfg, lambda r: idx, loss_fn, stage="sft", show_progress=False)
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert all(p.grad is None for p in frozen)                       # backward never reached them
    after = {k: p.data for k, p in zip(before, frozen)}
    assert len(frozen) == len(before)
    for k, v in before.items():
        assert np.array_equal(after[k], v), k                        # bit for bit
    assert any(not np.array_equal(v, model.state_dict()[k]) for k, v in adapters.items())


def test_adapter_checkpoint_belongs_to_its_base_and_merges(tmp_path):
    base = tiny_gpt(seed=0)
    save_checkpoint(tmp_path / "base", base, stage="pretrain", step=1)
    model = tiny_gpt(seed=0)
    cfg = LoRAConfig(r=2, alpha=8.0, targets="c_attn,c_fc")
    apply_lora(model, cfg, seed=3)
    randomize_B(model)
    path = save_adapter(tmp_path / "ad", model, cfg, tmp_path / "base", stage="sft", step=7)
    meta = read_metadata(path)
    assert meta["base"] == "base.safetensors"
    assert meta["base_sha256"] == read_metadata(tmp_path / "base.safetensors")["sha256"]
    from safetensors.numpy import load_file
    keys = set(load_file(str(path)))
    assert "transformer.h.0.attn.c_attn.lora_A" in keys and len(keys) == 8   # 2 layers x 2 targets x (A, B)
    # onto the same base: the same function; onto another: refused
    again = tiny_gpt(seed=0)
    attach_adapter(again, path, meta["base_sha256"])
    idx = np.random.default_rng(0).integers(0, V, (2, 7))
    np.testing.assert_array_equal(again(idx)[0].data, model(idx)[0].data)
    save_checkpoint(tmp_path / "other", tiny_gpt(seed=9), stage="pretrain", step=1)
    with pytest.raises(CheckpointError, match="belong to base base.safetensors"):
        merge(path, tmp_path / "bad", tmp_path / "other")
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        load_into(tiny_gpt(), path)                                   # not a whole model
    merged = load_gpt_plain(merge(path, tmp_path / "merged"))
    np.testing.assert_allclose(merged(idx)[0].data, model(idx)[0].data, rtol=1e-4, atol=1e-5)
    assert set(merged.state_dict()) == set(base.state_dict())


def load_gpt_plain(path):
    m = tiny_gpt()
    load_into(m, path)
    return m


def test_cli_sft_lora_merge_and_refusals(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    ck = tmp_path / "ckpt"
    common = ["--config", "tiny", "--data-dir", data, "--ckpt-dir", ck, "--runs-dir", tmp_path / "runs",
              "--no-progress", "--threads", "1"]
    res = run(train_cmd("--stage", "pretrain", "--pretrain.max_steps=3", "--pretrain.eval_batches=1", *common))
    assert res.returncode == 0, res.stderr
    res = run(train_cmd("--stage", "sft", "--lora.r=4", "--lora.targets=c_attn,c_fc", "--sft.max_steps=3",
                        "--sft.eval_prompts=2", "--sft.max_new_tokens=4", *common))
    assert res.returncode == 0, res.stderr
    assert (ck / "sft_lora.safetensors").exists() and not (ck / "sft_final.safetensors").exists()
    assert "sft_lora.safetensors" in res.stdout and "LoRA r=4" in res.stdout
    import sys
    lora_cmd = [sys.executable, "-m", "tinygrad_llm.lora", "merge"]
    res = run_many({"merge": lora_cmd + [ck / "sft_lora.safetensors", ck / "merged.safetensors"],
                    "chain": train_cmd("--stage", "sft,reward", "--lora.r=4", *common),
                    "bad_target": train_cmd("--stage", "sft", "--lora.r=4", "--lora.targets=q_proj", *common),
                    "other_base": lora_cmd + [ck / "sft_lora.safetensors", tmp_path / "x.safetensors",
                                              "--base", ck / "sft_lora.safetensors"]})
    assert res["merge"].returncode == 0, res["merge"].stderr
    model, _ = load_gpt(ck / "merged.safetensors")                   # what inference.py loads
    assert json.loads(read_metadata(ck / "merged.safetensors")["extra"])["lora"]["r"] == 4
    assert model.num_parameters() > 0
    assert_one_line_error(res["chain"], 2, "--lora.r applies to --stage sft alone")
    assert_one_line_error(res["bad_target"], 2, "q_proj")
    assert_one_line_error(res["other_base"], 2)
    assert not (tmp_path / "x.safetensors").exists()
