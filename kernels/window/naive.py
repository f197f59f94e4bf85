"""Sliding-window branch of NSA, fp32 reference.

Legend: Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, w = params.window.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..selection.naive import attend_set


def window_start(t: int, params: NSAParams) -> int:
    """First position of the window of a query at t: max(0, t - w + 1)."""
    return max(0, t - params.window + 1)


def naive_window_attention(q: torch.Tensor, k_path: torch.Tensor, v_path: torch.Tensor,
                           params: NSAParams, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-branch attention of one query at t = len(k_path) - 1 over positions
    max(0, t-w+1)..t of its path.

    Args:
        q (torch.Tensor): shape [Hq, D].
        k_path, v_path (torch.Tensor): shape [t+1, Hkv, D], positions 0..t of the query's path.
        params (NSAParams): window.
        scale (float): softmax scale.
    Returns:
        (o [Hq, D] float32, lse [Hq] float32).

    Bytes: reads Hq*D + 2*Hkv*min(w, t+1)*D elements, writes Hq*(D+1) floats.
    """
    hq, dim = q.shape
    hkv = k_path.shape[1]
    if hq % hkv:
        raise ValueError(f"naive_window_attention: Hq={hq} must be a multiple of Hkv={hkv}")
    g, t = hq // hkv, k_path.shape[0] - 1
    lo = window_start(t, params)
    o = torch.zeros(hq, dim, dtype=torch.float32, device=q.device)
    lse = torch.zeros(hq, dtype=torch.float32, device=q.device)
    for h in range(hq):
        o[h], lse[h] = attend_set(q[h], k_path[lo:, h // g], v_path[lo:, h // g], scale)
    return o, lse
