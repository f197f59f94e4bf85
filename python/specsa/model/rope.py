"""Rotary position embedding (HF Llama convention: rotate_half over [x1, x2] halves).

Inverse frequencies follow transformers' `modeling_rope_utils` for the supported types
(default, linear, llama3, yarn) so that logits match HF checkpoints bit-for-bit in fp32.
"""
from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention_factor applied to cos/sin)."""
    base = rope.theta
    dim = head_dim
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = rope.rope_type
    if t == "default":
        return inv, 1.0
    factor = float(rope.get("factor"))
    if t == "linear":
        return inv / factor, 1.0
    if t == "llama3":
        return _llama3(inv, rope, factor), 1.0
    return _yarn(rope, dim, factor)


def _llama3(inv: torch.Tensor, rope: RopeConfig, factor: float) -> torch.Tensor:
    low, high = float(rope.get("low_freq_factor")), float(rope.get("high_freq_factor"))
    old_ctx = float(rope.get("original_max_position_embeddings"))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    base = rope.theta
    orig = float(rope.get("original_max_position_embeddings"))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(attn)


class Rotary(torch.nn.Module):
    """cos/sin tables computed per forward for the given positions (no max length cap)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        inv, self.attention_factor = inv_freq_and_scale(rope, head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] int64 -> cos, sin [N, head_dim] in `dtype` (computed in fp32 like HF)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_factor).to(dtype),
                (emb.sin() * self.attention_factor).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos, sin [N, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]
