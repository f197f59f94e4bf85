"""Model geometry parsed from a HF `config.json` (Llama / Qwen2 family).

Parsed once at load time into a frozen dataclass; everything below reads this, never the
raw dict. Unsupported architectures or values raise `ModelConfigError` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from specsa.config import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelConfigError(ConfigError):
    """config.json describes a model this runtime cannot run; the message says which field."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters, merged from `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5). `extra` keeps the type-specific keys (factor, ...)."""

    theta: float = 10000.0
    rope_type: str = "default"
    extra: tuple[tuple[str, float | int | bool | None], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.extra).get(key, default)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False      # qwen2: always; llama: attention_bias
    o_bias: bool = False        # llama attention_bias only
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type"), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"config.json: unsupported architecture {arch or d.get('model_type')!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")

        def req(key: str) -> int:
            if key not in d:
                raise ModelConfigError(f"config.json: missing field {key!r}")
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelConfigError(f"config.json: {key} must be a positive integer, got {v!r}")
            return v

        hidden, heads = req("hidden_size"), req("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelConfigError(f"config.json: num_attention_heads ({heads}) must be a multiple "
                                   f"of num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise ModelConfigError(f"config.json: head_dim ({head_dim}) must be even for RoPE")
        qwen = arch == "Qwen2ForCausalLM"
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch, vocab_size=req("vocab_size"), hidden_size=hidden,
            intermediate_size=req("intermediate_size"), num_layers=req("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=parse_rope(d),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(d.get("attention_bias", False)),
            o_bias=False if qwen else bool(d.get("attention_bias", False)),
            mlp_bias=False if qwen else bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids)


def parse_rope(d: dict) -> RopeConfig:
    """RoPE from either config format. transformers 5 writes `rope_parameters` (theta inside);
    older checkpoints write `rope_theta` + `rope_scaling` (`type` or `rope_type`)."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(f"config.json: rope type {rope_type!r} is not supported "
                               f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type in ("linear", "llama3") and merged.get("factor") is None:
        raise ModelConfigError(f"config.json: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise ModelConfigError(f"config.json: llama3 rope scaling needs {key!r}")
    if rope_type == "yarn":
        merged.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        if merged.get("factor") is None:
            merged["factor"] = d["max_position_embeddings"] / merged["original_max_position_embeddings"]
    return RopeConfig(theta=float(theta), rope_type=rope_type,
                      extra=tuple(sorted(merged.items())))
