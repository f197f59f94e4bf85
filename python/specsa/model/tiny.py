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


# -- EAGLE / EAGLE-3 draft heads ------------------------------------------------------------
EAGLE_ARCH = {("eagle", "llama"): "LlamaForCausalLMEagle", ("eagle", "qwen2"): "Qwen2ForCausalLMEagle",
              ("eagle3", "llama"): "LlamaForCausalLMEagle3"}


def build_tiny_eagle(out_dir: str | Path, target_dir: str | Path, kind: str = "eagle3",
                     seed: int = 0, *, num_layers: int = 1, draft_vocab_size: int | None = None,
                     aux_layer_ids: list[int] | None = None, fc_norm: bool = False,
                     mimic: bool = False) -> Path:
    """Write a tiny random EAGLE (`kind="eagle"`) or EAGLE-3 (`"eagle3"`) head for the target
    checkpoint at `target_dir`, in the formats SGLang 0.5.17 loads (and specsa.model.eagle):

    - EAGLE: architectures [Llama|Qwen2]ForCausalLMEagle; weights without the `model.` prefix:
      embed_tokens, fc (2H -> H, with bias), layers.L.* without layer 0's input_layernorm; no
      lm_head and no final norm (the target's embedding and LM head are used).
    - EAGLE-3: architectures LlamaForCausalLMEagle3 with the released heads' names: fc
      (3H -> H), midlayer.* (layer 0: hidden_norm + input_layernorm, q/k/v from 2H), norm,
      lm_head over `draft_vocab_size` hot tokens with d2t (draft id -> target id offset) and
      t2d; `eagle_config.eagle_aux_hidden_state_layer_ids` (default: the three evenly spaced
      target layers 0, n//2 - 1, n - 2: distinct for a target of 4 or more layers).
    Weights are random: a head agrees with its target no more than chance allows. mimic=True
    instead writes a head that predicts what the target predicts from the current token alone
    (final norm + LM head of its embedding): with a target whose layers add little
    (`damp_layers`) its drafts are mostly accepted, which exercises multi-token accepts.
    """
    from specsa.model.load import read_json

    t = read_json(Path(target_dir) / "config.json")
    model_type = t["model_type"]
    if (kind, model_type) not in EAGLE_ARCH:
        raise ValueError(f"build_tiny_eagle: no {kind} head for a {model_type} target")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, v, n = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    hq, hkv = t["num_attention_heads"], t["num_key_value_heads"]
    d = t.get("head_dim") or h // hq
    cfg = _eagle_config(t, kind, num_layers)
    if mimic and kind == "eagle3":
        hkv = cfg["num_key_value_heads"] = hq      # the head's own geometry: v carries H dims
    rw = _RandomWeights(seed)      # draws in call order: the order below fixes the values
    _eagle_layers(rw, kind, num_layers, h, hq, hkv, d, t["intermediate_size"],
                  qkv_bias=model_type == "qwen2")
    if kind == "eagle":
        # replaced by the target's embedding when loaded
        rw.w["embed_tokens.weight"] = torch.randn(v, h, generator=rw.g)
        rw.lin("fc", h, 2 * h, bias=True)
    else:
        _eagle3_head(rw, cfg, h, v, n, aux_layer_ids, fc_norm, draft_vocab_size)
    w = rw.w
    if mimic:
        _mimic(w, kind, read_weights_file(Path(target_dir)), h, hq, hkv, d, num_layers, cfg)
    save_weights(out, w)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


class _RandomWeights:
    """Seeded random tensors by checkpoint name: linear weights (+ bias) and RMSNorm scales."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.w: dict[str, torch.Tensor] = {}

    def lin(self, name: str, out_f: int, in_f: int, bias: bool = False) -> None:
        self.w[name + ".weight"] = torch.randn(out_f, in_f, generator=self.g) * in_f ** -0.5
        if bias:
            self.w[name + ".bias"] = torch.randn(out_f, generator=self.g) * 0.1

    def norm(self, name: str, dim: int) -> None:
        self.w[name + ".weight"] = 1 + torch.randn(dim, generator=self.g) * 0.1


def _eagle_config(t: dict, kind: str, num_layers: int) -> dict:
    """The head's config.json from the target's: its shape fields, the EAGLE architecture."""
    cfg = {k: t[k] for k in ("model_type", "hidden_size", "intermediate_size",
                             "num_attention_heads", "num_key_value_heads", "head_dim",
                             "hidden_act", "rms_norm_eps", "max_position_embeddings",
                             "rope_theta", "bos_token_id", "eos_token_id") if k in t}
    cfg.update(architectures=[EAGLE_ARCH[kind, t["model_type"]]], num_hidden_layers=num_layers,
               vocab_size=t["vocab_size"], tie_word_embeddings=False, torch_dtype="float32")
    if "rope_parameters" in t:
        cfg["rope_parameters"] = t["rope_parameters"]
    return cfg


def _eagle_layers(rw: _RandomWeights, kind: str, num_layers: int, h: int, hq: int, hkv: int,
                  d: int, inter: int, qkv_bias: bool) -> None:
    """The head's decoder layers (EAGLE-3's single layer is `midlayer.`, its q/k/v read 2H)."""
    for layer in range(num_layers):
        p = "midlayer." if kind == "eagle3" and num_layers == 1 else f"layers.{layer}."
        in_f = 2 * h if kind == "eagle3" and layer == 0 else h
        if kind == "eagle3":
            rw.norm(p + "hidden_norm", h)
            if layer == 0:
                rw.norm(p + "input_layernorm", h)
        elif layer > 0:
            rw.norm(p + "input_layernorm", h)
        rw.norm(p + "post_attention_layernorm", h)
        rw.lin(p + "self_attn.q_proj", hq * d, in_f, qkv_bias)
        rw.lin(p + "self_attn.k_proj", hkv * d, in_f, qkv_bias)
        rw.lin(p + "self_attn.v_proj", hkv * d, in_f, qkv_bias)
        rw.lin(p + "self_attn.o_proj", h, hq * d)
        rw.lin(p + "mlp.gate_proj", inter, h)
        rw.lin(p + "mlp.up_proj", inter, h)
        rw.lin(p + "mlp.down_proj", h, inter)


def _eagle3_head(rw: _RandomWeights, cfg: dict, h: int, v: int, n: int,
                 aux_layer_ids: list[int] | None, fc_norm: bool,
                 draft_vocab_size: int | None) -> None:
    """EAGLE-3's fc over the aux hidden states (+ their norms), final norm and hot-token
    lm_head with d2t / t2d; records the aux layer ids and draft vocabulary in `cfg`."""
    ids = aux_layer_ids if aux_layer_ids is not None else [0, n // 2 - 1, n - 2]
    if len(set(ids)) != len(ids) or not all(0 <= i <= n - 2 for i in ids):
        raise ValueError(f"build_tiny_eagle: aux layer ids {ids} must be distinct and in "
                         f"[0, {n - 2}] for a {n}-layer target")
    cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(ids),
                           "use_aux_hidden_state": True}
    if fc_norm:
        cfg["fc_norm"] = True
        for i in range(len(ids)):
            rw.norm(f"fc_norm.{i}", h)
    rw.lin("fc", h, len(ids) * h)
    rw.norm("norm", h)
    dv = draft_vocab_size or v
    cfg["draft_vocab_size"] = dv
    hot = torch.sort(torch.randperm(v, generator=rw.g)[:dv]).values
    rw.w["d2t"] = hot - torch.arange(dv)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[hot] = True
    rw.w["t2d"] = t2d
    rw.lin("lm_head", dv, h)


def read_weights_file(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _mimic(w: dict, kind: str, tw: dict, h: int, hq: int, hkv: int, d: int, layers: int,
           cfg: dict) -> None:
    """Overwrite a head's weights so that its output is (a positive multiple of) the target's
    final-normed embedding of the row's token: EAGLE through fc = [diag(norm weight), 0] with
    every layer's o_proj / down_proj zero; EAGLE-3 (needs Hkv = Hq) through layer 0's
    attention, q = k = 3 * normed embedding (each row mostly attends to itself), v = it, fc and
    the MLP zero, the target's final norm weight and LM head (all hot ids)."""
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")) or name.startswith("fc."):
            w[name] = torch.zeros_like(w[name])
    wn = tw["model.norm.weight"]
    if kind == "eagle":
        w["fc.weight"][:, :h] = torch.diag(wn)
        return
    if hkv * d != h or hq != hkv:
        raise ValueError("build_tiny_eagle(mimic=True): an EAGLE-3 mimic needs "
                         "num_key_value_heads = num_attention_heads and heads * head_dim = hidden")
    p = "midlayer." if layers == 1 else "layers.0."
    eye = torch.eye(h)
    zero = torch.zeros(h, h)
    w[p + "input_layernorm.weight"] = torch.ones(h)
    w[p + "self_attn.q_proj.weight"] = torch.cat([3 * eye, zero], 1)
    w[p + "self_attn.k_proj.weight"] = torch.cat([3 * eye, zero], 1)
    w[p + "self_attn.v_proj.weight"] = torch.cat([eye, zero], 1)
    w[p + "self_attn.o_proj.weight"] = eye.clone()
    w["norm.weight"] = wn.clone()
    hot = w["d2t"] + torch.arange(w["d2t"].shape[0])
    w["lm_head.weight"] = tw["lm_head.weight"][hot].clone()


def damp_layers(model_dir: str | Path, factor: float) -> Path:
    """Scale every layer's o_proj and down_proj in a tiny checkpoint by `factor` (in place):
    the residual stream then stays close to the token embedding, so the next token depends
    mostly on the current one (attention still matters, NSA still decides it)."""
    model_dir = Path(model_dir)
    w = read_weights_file(model_dir)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = w[name] * factor
    save_weights(model_dir, w)
    return model_dir
