"""Load a HF checkpoint folder into an `NSADecoder` (docs/CONTRACTS.md section 5).

Folder: config.json + safetensors (model.safetensors, or shards listed in
model.safetensors.index.json) + tokenizer files. `config.json["nsa"]` (optional) holds
NSAConfig fields; absent means training-free NSA (union, mean) with defaults. CLI overrides
(`--nsa key=value,...`) apply on top. Every problem raises `LoadError` naming the file or
tensor (and shapes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from specsa.config import Combine, Compression, ConfigError, NSAConfig

from .config import ModelConfig
from .decoder import NSADecoder

# Buffers some exporters save that carry no information for us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LoadError(RuntimeError):
    """A checkpoint folder cannot be loaded; the message names the file or tensor."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None


def load_configs(model_dir: str | Path, nsa_overrides: str | dict | None = None
                 ) -> tuple[ModelConfig, NSAConfig, dict]:
    """(model config, NSA config with overrides applied, raw config.json)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise LoadError(f"model folder {str(d)!r} does not exist")
    raw = read_json(d / "config.json")
    cfg = ModelConfig.from_hf(raw)
    try:
        nsa = NSAConfig.from_dict(raw.get("nsa") or {})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{d / 'config.json'}: field 'nsa': {e}") from None
    return cfg, nsa.with_overrides(nsa_overrides), raw


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise LoadError(f"{index}: missing or empty 'weight_map'")
        files = [model_dir / f for f in sorted(set(wmap.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{model_dir}: no *.safetensors weights (and no "
                        "model.safetensors.index.json)")
    for f in files:
        if not f.exists():
            raise LoadError(f"{f}: weight shard listed in the index is missing")
    return files


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            tensors = load_file(str(f))
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
            raise LoadError(f"{f}: cannot read safetensors file (corrupt or truncated?): {e}") from None
        for name, t in tensors.items():
            if name in out:
                raise LoadError(f"{f}: tensor {name!r} also appears in another shard")
            out[name] = t
    return out


def load_model(model_dir: str | Path, *, nsa_overrides: str | dict | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> NSADecoder:
    """Build an NSADecoder from a HF folder. Missing, unexpected or mis-shaped tensors and
    NSA modes without their weights are `LoadError`s naming the tensor."""
    d = Path(model_dir)
    cfg, nsa, _ = load_configs(d, nsa_overrides)
    weights = {k: v for k, v in read_weights(d).items() if not k.endswith(_IGNORED_SUFFIXES)}
    gate_bias = any(k.endswith("self_attn.gate_proj.bias") for k in weights)
    compress_bias = any(k.endswith(("self_attn.compress_k.bias", "self_attn.compress_v.bias"))
                        for k in weights)
    with torch.device("meta"):
        model = NSADecoder(cfg, nsa, gate_bias=gate_bias, compress_bias=compress_bias)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        weights.pop("lm_head.weight", None)   # tied: HF ignores a saved copy too
    _check_names(expected, weights, nsa, d)
    state = {}
    for name, ref in expected.items():
        t = weights[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise LoadError(f"{d}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                            f"{tuple(ref.shape)} from config.json")
        state[name] = t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg.rope, cfg.head_dim)   # real buffer, not meta
    return model.to(device).eval()


def _check_names(expected: dict, weights: dict, nsa: NSAConfig, d: Path) -> None:
    missing = [k for k in expected if k not in weights]
    if missing:
        hint = ""
        if any(".gate_proj." in k and "self_attn" in k for k in missing) and nsa.combine is Combine.GATED:
            hint = (" (combine=gated needs native NSA gate weights; use --nsa combine=union "
                    "for a dense checkpoint)")
        elif any(".compress_" in k for k in missing) and nsa.compress is Compression.LEARNED:
            hint = (" (compress=learned needs native NSA compression weights; use --nsa "
                    "compress=mean for a dense checkpoint)")
        raise LoadError(f"{d}: missing weight {missing[0]!r} (expected shape "
                        f"{tuple(expected[missing[0]].shape)}; {len(missing)} missing){hint}")
    # Native NSA weights are allowed (and unused) when overrides run the checkpoint training-free.
    nsa_extra = (".self_attn.gate_proj.", ".self_attn.compress_k.", ".self_attn.compress_v.")
    unexpected = [k for k in weights if k not in expected and not any(s in k for s in nsa_extra)]
    if unexpected:
        raise LoadError(f"{d}: unexpected weight {unexpected[0]!r} with shape "
                        f"{tuple(weights[unexpected[0]].shape)} ({len(unexpected)} unexpected; "
                        "is config.json the right one for these weights?)")


def load_tokenizer(model_dir: str | Path):
    """transformers AutoTokenizer from the folder (no network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise LoadError(f"{model_dir}: cannot load tokenizer: {e}") from None
