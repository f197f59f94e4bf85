"""Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

`filtered_probs` is the target distribution after all filters; speculative acceptance
(rejection sampling) must use exactly this distribution, so it is public.

Example: logits [[2, 1, 0]] with top_k=2, temperature=1 -> probs [[0.731, 0.269, 0]].
"""
from __future__ import annotations

import torch

from specsa.config import SamplingConfig


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of each row.

    Args:
        logits: [B, V] any float dtype (computed in float32).
        temperature: > 0 (greedy is handled by the caller: argmax).
        top_k: keep the k largest logits (0 = all). Ties at the k-th value are all kept.
        top_p: keep the smallest prefix of tokens sorted by probability whose mass reaches
            top_p (1.0 = all); the most likely token is always kept.
    Returns:
        probs [B, V] float32, rows sum to 1, zeros outside the kept set.
    """
    if temperature <= 0:
        raise ValueError(f"filtered_probs: temperature must be > 0, got {temperature}")
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (torch.cumsum(sp, dim=-1) - sp) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row: logits [B, V] -> [B] int64 (argmax when cfg.greedy)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
