"""Checkpoints: safetensors round trip, atomic writes, and clear errors for damaged files."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinygrad_llm.checkpoint import CheckpointError, load_into, load_weights, save_checkpoint
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
