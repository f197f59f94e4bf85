"""Staging of a step's new rows, fp32-exact torch reference (copies and dtype casts only).

Legend: N new rows (tokens of a decode / verify / draft forward), Hq / Hkv query / KV heads,
D head dim, S pool slots (SGLang's flat token pool: slot = page * PS + offset).

A model's attention layer hands q, k, v as views of its fused QKV projection (after RoPE), so
their rows are strided, not contiguous. A step needs (1) k, v stored in the pool at the
forward's slots (what later steps read) and (2) q, k, v as contiguous rows (what the step's
kernels read: the very values the pool holds; k and v have the pool's dtype).
"""
from __future__ import annotations

import torch


def naive_stage_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     loc: torch.Tensor | None, k_pool: torch.Tensor | None,
                     v_pool: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k / v [N, Hkv, D] (any strides); loc [N] pool slots or None (no store);
    k_pool / v_pool [S, Hkv, D] of k's / v's dtype  # mutable. Returns contiguous (q, k, v)."""
    qc = q.clone(memory_format=torch.contiguous_format)
    kc = k.clone(memory_format=torch.contiguous_format)
    vc = v.clone(memory_format=torch.contiguous_format)
    if loc is not None:
        for n in range(q.shape[0]):
            s = int(loc[n])
            k_pool[s] = kc[n]
            v_pool[s] = vc[n]
    return qc, kc, vc
