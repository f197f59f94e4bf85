"""Loader: sharded folders, and a clear error naming the problem for every bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from specsa.config import CacheConfig, ConfigError
from specsa.model import BlockInput, LoadError, ModelConfigError, load_model, load_tokenizer
from specsa.model.tiny import build_tiny


@pytest.fixture()
def ckpt(tmp_path):
    return build_tiny(tmp_path / "m", kind="llama")


def _edit_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    w = load_file(str(d / "model.safetensors"))
    fn(w)
    save_file(w, str(d / "model.safetensors"))


def _logits(model, ids):
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=8))
    cache.add_request(0)
    return model(cache, [BlockInput(0, ids)])[0]


def test_sharded_equals_single(tmp_path):
    a = build_tiny(tmp_path / "a", kind="qwen2", native=True, seed=4)
    b = build_tiny(tmp_path / "b", kind="qwen2", native=True, seed=4, shards=3)
    assert len(list(b.glob("*.safetensors"))) == 3 and (b / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 512, (40,))
    assert torch.equal(_logits(load_model(a), ids), _logits(load_model(b), ids))
    assert load_tokenizer(b).encode("hello") == load_tokenizer(a).encode("hello")


def test_invalid_nsa_field(ckpt):
    _edit_config(ckpt, nsa={"block": 8, "stride": 3})
    with pytest.raises(ConfigError, match=r"stride \(3\) must divide block \(8\)"):
        load_model(ckpt)
    _edit_config(ckpt, nsa={"blocks": 8})
    with pytest.raises(ConfigError, match="unknown keys.*blocks"):
        load_model(ckpt)


def test_invalid_nsa_override(ckpt):
    with pytest.raises(ConfigError, match="unknown key 'windw'"):
        load_model(ckpt, nsa_overrides="windw=8")
    with pytest.raises(ConfigError, match="combine: unknown value 'sum'"):
        load_model(ckpt, nsa_overrides="combine=sum")


def test_missing_weight(ckpt):
    _edit_weights(ckpt, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight' "
                                        r"\(expected shape \(128, 64\)"):
        load_model(ckpt)


def test_gated_without_gate_weights(ckpt):
    with pytest.raises(LoadError, match=r"gate_proj.weight.*combine=gated needs native NSA"):
        load_model(ckpt, nsa_overrides="combine=gated")


def test_mismatched_shape(ckpt):
    def shrink(w):
        w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    _edit_weights(ckpt, shrink)
    with pytest.raises(LoadError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                        r"\(16, 64\), expected \(32, 64\)"):
        load_model(ckpt)


def test_unexpected_weight(ckpt):
    _edit_weights(ckpt, lambda w: w.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(LoadError, match=r"unexpected weight 'model.layers.0.extra.weight' with shape \(3,\)"):
        load_model(ckpt)


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ModelConfigError, match="unsupported architecture 'MistralForCausalLM'"):
        load_model(ckpt)


def test_unsupported_rope_type(ckpt):
    _edit_config(ckpt, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ModelConfigError, match="rope type 'longrope' is not supported"):
        load_model(ckpt)


def test_corrupt_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: 4000])
    with pytest.raises(LoadError, match=r"model.safetensors: cannot read safetensors file"):
        load_model(ckpt)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(LoadError, match="cannot read safetensors file"):
        load_model(ckpt)


def test_missing_folder_and_bad_json(tmp_path, ckpt):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"config.json: invalid JSON"):
        load_model(ckpt)


def test_missing_shard(tmp_path):
    d = build_tiny(tmp_path / "s", kind="llama", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="model-00002-of-00002.safetensors: weight shard listed"):
        load_model(d)


def test_token_out_of_vocab(ckpt):
    from specsa.model import BlockError
    with pytest.raises(BlockError, match=r"token id 600 outside the vocabulary \[0, 512\)"):
        _logits(load_model(ckpt), [1, 600])
