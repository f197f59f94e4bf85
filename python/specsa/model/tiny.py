"""Deterministic tiny random checkpoints (HF folder layout) with the bundled tokenizer.

Used by tests, benchmarks and `python -m specsa demo`: no network, same bytes for the same
arguments. Dense (`native=False`) folders are plain Llama/Qwen2 checkpoints that HF
transformers loads too; `native=True` adds the NSA gate and learned-compression weights of
CONTRACTS.md section 5 and sets config.json["nsa"] to gated/learned.

    build_tiny("/tmp/tiny", kind="qwen2", num_kv_heads=1)     # G = 4
    model = load_model("/tmp/tiny")
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from specsa.config import Combine, Compression, NSAConfig

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tinytok"
TOKENIZER_VOCAB = 512   # tinytok: 512 BPE tokens, <|bos|> = 0, <|eos|> = 1

# Small NSA geometry so that ~100-token contexts already exercise every branch sparsely.
TINY_NSA = NSAConfig(block=8, stride=4, select=16, topn=4, window=32)

_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def tiny_config(kind: str = "llama", *, vocab_size: int = TOKENIZER_VOCAB, hidden_size: int = 64,
                intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, head_dim: int | None = None, rope_theta: float = 10000.0,
                rope_scaling: dict | None = None, tie_word_embeddings: bool = False,
                max_position_embeddings: int = 4096, attention_bias: bool = False,
                nsa: NSAConfig | None = TINY_NSA) -> dict:
    """config.json contents (transformers-5 style `rope_parameters`, plus `rope_theta` for
    readers that predate it)."""
    if kind not in _ARCH:
        raise ValueError(f"build_tiny: kind must be one of {sorted(_ARCH)}, got {kind!r}")
    arch, model_type = _ARCH[kind]
    rope = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    cfg = {
        "architectures": [arch], "model_type": model_type, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": head_dim or hidden_size // num_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": max_position_embeddings,
        "rope_theta": rope_theta, "rope_parameters": rope, "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32",
    }
    if kind == "llama":
        cfg.update(attention_bias=attention_bias, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None)
    if nsa is not None:
        cfg["nsa"] = nsa.to_dict()
    return cfg


def random_weights(cfg: dict, *, native: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random weights, scaled so that logits and attention scores have O(1) spread (near-ties
    would make greedy comparisons between numerically different paths flaky)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg["model_type"] == "llama" and cfg.get("attention_bias", False)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def lin(name, out_f, in_f, bias=False):
        w[name + ".weight"] = randn(out_f, in_f, std=in_f ** -0.5)
        if bias:
            w[name + ".bias"] = randn(out_f, std=0.1)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1 + randn(h, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + randn(h, std=0.1)
        lin(p + "self_attn.q_proj", hq * d, h, qkv_bias)
        lin(p + "self_attn.k_proj", hkv * d, h, qkv_bias)
        lin(p + "self_attn.v_proj", hkv * d, h, qkv_bias)
        lin(p + "self_attn.o_proj", h, hq * d, o_bias)
        lin(p + "mlp.gate_proj", i, h)
        lin(p + "mlp.up_proj", i, h)
        lin(p + "mlp.down_proj", h, i)
        if native:
            blk = cfg["nsa"]["block"]
            lin(p + "self_attn.gate_proj", 3 * hq, h, bias=True)
            for kv in ("k", "v"):
                w[p + f"self_attn.compress_{kv}.weight"] = (1 + randn(hkv, blk, std=0.3)) / blk
                w[p + f"self_attn.compress_{kv}.bias"] = randn(hkv, d, std=0.1)
    w["model.norm.weight"] = 1 + randn(h, std=0.1)
    if not cfg["tie_word_embeddings"]:
        lin("lm_head", v, h)
    return w


def save_weights(out: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> None:
    """model.safetensors, or `shards` files + model.safetensors.index.json."""
    from safetensors.torch import save_file

    names = list(weights)
    if shards <= 1:
        save_file({k: weights[k].contiguous() for k in names}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    wmap = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k].contiguous() for k in names[s * per:(s + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))


def build_tiny(out_dir: str | Path, kind: str = "llama", native: bool = False, seed: int = 0,
               *, shards: int = 1, nsa: NSAConfig | None = None, **shape) -> Path:
    """Write a tiny random checkpoint folder and return its path.

    kind: "llama" | "qwen2" (qwen2 has QKV biases). native: add gate + learned-compression
    weights and set nsa combine=gated, compress=learned. shape: keyword arguments of
    `tiny_config` (hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size,
    rope_theta, rope_scaling, tie_word_embeddings, ...). nsa: NSA geometry written to
    config.json (default TINY_NSA).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nsa = nsa or TINY_NSA
    if native:
        nsa = NSAConfig(**{**nsa.to_dict(), "combine": Combine.GATED,
                           "compress": Compression.LEARNED})
    cfg = tiny_config(kind, nsa=nsa, **shape)
    if cfg["vocab_size"] < TOKENIZER_VOCAB:
        raise ValueError(f"build_tiny: vocab_size {cfg['vocab_size']} is smaller than the bundled "
                         f"tokenizer's {TOKENIZER_VOCAB} tokens")
    save_weights(out, random_weights(cfg, native=native, seed=seed), shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER_DIR.glob("*.json"):
        shutil.copyfile(f, out / f.name)
    return out
