"""Checkpoints: safetensors round trip, atomic writes, and clear errors for damaged files."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinygrad_llm.checkpoint import CheckpointError, config_from_meta, load_into, load_weights, save_checkpoint
from tinygrad_llm.config import get_tiny_config
from tinygrad_llm.model import GPT


@pytest.fixture
def saved(tmp_path):
    m = GPT(get_tiny_config(vocab_size=30), seed=1)
    return m, save_checkpoint(tmp_path / "pretrain_final", m, stage="pretrain", step=7, vocab_sha="abc")


def test_roundtrip_and_plain_safetensors(saved):
    m, path = saved
    assert path.name == "pretrain_final.safetensors"
    plain = load_file(str(path))                                   # loadable with safetensors alone
    assert set(plain) == set(m.state_dict())
    tensors, meta = load_weights(path)
    assert meta["stage"] == "pretrain" and meta["step"] == "7"
    assert json.loads(meta["config"])["n_layer"] == 2
    m2 = GPT(get_tiny_config(vocab_size=30), seed=2)
    load_into(m2, path, vocab_sha="abc")
    for k, v in m.state_dict().items():
        assert np.array_equal(v, m2.state_dict()[k])


def test_truncated_file_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(path)


def test_tampered_file_is_refused(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF                                               # flip bits in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_weights(path)


def test_mismatched_config_or_vocab_is_refused(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="does not match"):
        load_into(GPT(get_tiny_config(vocab_size=31)), path)
    with pytest.raises(CheckpointError, match="different vocabulary"):
        load_into(GPT(get_tiny_config(vocab_size=30)), path, vocab_sha="other")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(path.with_name("nope.safetensors"))


def test_nan_weights_are_never_written(saved, tmp_path):
    m, path = saved
    before = path.read_bytes()
    m.transformer.wte.weight.data[0, 0] = np.nan
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(path, m, stage="pretrain", step=8)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))                       # no temp file left behind


def test_rope_smear_checkpoint_roundtrips_and_generates(tmp_path):
    import dataclasses
    cfg = dataclasses.replace(get_tiny_config(vocab_size=30), pos_emb="rope", rope_base=500.0, smear_keys=True)
    m = GPT(cfg, seed=1)
    m.transformer.h[0].attn.smear.data[:] = [0.5, -1.0]             # not the init, so loading shows
    path = save_checkpoint(tmp_path / "rope", m, stage="pretrain", step=1)
    assert not any("wpe" in k for k in load_file(str(path)))
    assert "transformer.h.1.attn.smear" in load_file(str(path))
    tensors, meta = load_weights(path)
    cfg2 = config_from_meta(meta)
    assert (cfg2.pos_emb, cfg2.rope_base, cfg2.smear_keys) == ("rope", 500.0, True)
    m2 = GPT(cfg2, seed=2)
    load_into(m2, path)
    np.testing.assert_array_equal(m2.transformer.h[0].attn.smear.data, [0.5, -1.0])
    g1 = m.generate([[5, 6, 7]], 6, temperature=0.0, stop_tokens=())
    g2 = m2.generate([[5, 6, 7]], 6, temperature=0.0, stop_tokens=())
    assert np.array_equal(g1.tokens, g2.tokens)
    with pytest.raises(CheckpointError, match="does not match"):       # a learned model is not a rope one
        load_into(GPT(get_tiny_config(vocab_size=30)), path)


def test_checkpoint_without_position_fields_loads_as_learned(saved, tmp_path):
    """Checkpoints written before pos_emb / rope_base / smear_keys existed."""
    from safetensors.numpy import save_file
    m, path = saved
    tensors, meta = load_weights(path)
    old_cfg = json.loads(meta["config"])
    for k in ("pos_emb", "rope_base", "smear_keys"):
        old_cfg.pop(k)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "config": json.dumps(old_cfg)})
    cfg = config_from_meta(load_weights(old)[1])
    assert cfg.pos_emb == "learned" and cfg.smear_keys is False
    m2 = GPT(cfg, seed=5)
    load_into(m2, old)
    for k, v in m.state_dict().items():
        assert np.array_equal(v, m2.state_dict()[k])
