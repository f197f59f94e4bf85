"""Top-n block selection and selected-branch attention of NSA, fp32 reference.

Legend: Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, l' = params.select,
n = params.topn, Nsel = params.num_sel(t+1) candidate blocks (j*l' <= t).
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams


def forced_blocks(t: int, params: NSAParams) -> list[int]:
    """Always-selected blocks for a query at t: 0..init_blocks-1 and the local_blocks blocks
    ending at floor(t/l'), clipped to existing candidates; ascending, each once."""
    cur = t // params.select
    forced = set(range(min(params.init_blocks, cur + 1)))
    forced.update(j for j in range(cur - params.local_blocks + 1, cur + 1) if j >= 0)
    return sorted(forced)


def check_topn(params: NSAParams, what: str) -> None:
    if params.topn < params.init_blocks + params.local_blocks:
        raise ValueError(f"{what}: topn ({params.topn}) must be >= init_blocks + local_blocks "
                         f"({params.init_blocks} + {params.local_blocks})")


def naive_topk(scores: torch.Tensor, t: int, params: NSAParams) -> torch.Tensor:
    """Selected blocks of one query at position t.

    Args:
        scores (torch.Tensor): shape [Hkv, Nsel], Nsel = params.num_sel(t+1) (group-summed Eq. 9
            scores; compared in float32).
        t (int): query position.
        params (NSAParams): select, topn, init_blocks, local_blocks.
    Returns:
        torch.Tensor: shape [Hkv, topn] int64: the forced blocks plus the highest-scoring other
        candidates (ties -> lower block index), sorted ascending, padded with -1 at the end when
        fewer than topn candidates exist.

    Bytes: reads Hkv*Nsel floats, writes Hkv*topn int64.

    Example: t=40, l'=8, topn=4, init=1, local=2 -> candidates 0..5, forced {0, 4, 5}; the best
    of blocks 1..3 fills the last slot; if blocks 1 and 3 tie, block 1 wins -> [0, 1, 4, 5].
    """
    check_topn(params, "naive_topk")
    nsel = params.num_sel(t + 1)
    if scores.dim() != 2 or scores.shape[1] != nsel:
        raise ValueError(f"naive_topk: scores must be [Hkv, Nsel={nsel}] for t={t}, got {tuple(scores.shape)}")
    hkv = scores.shape[0]
    forced = forced_blocks(t, params)
    out = torch.full((hkv, params.topn), -1, dtype=torch.int64, device=scores.device)
    s = scores.float().cpu().tolist()
    for h in range(hkv):
        others = sorted((j for j in range(nsel) if j not in forced), key=lambda j: (-s[h][j], j))
        chosen = sorted(forced + others[: params.topn - len(forced)])
        out[h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


def attend_set(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T) v for one head over an explicit token set: q [D], k/v [N, D].
    Empty set -> (zeros, -inf)."""
    if k.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float32), torch.tensor(float("-inf"))
    logits = (k.float() @ q.float()) * scale
    lse = torch.logsumexp(logits, dim=0)
    return torch.exp(logits - lse) @ v.float(), lse


def selected_positions(sel_row: torch.Tensor, t: int, params: NSAParams) -> torch.Tensor:
    """Token positions (<= t, ascending) of the selected blocks in sel_row [topn] (-1 ignored)."""
    pos = [b * params.select + o for b in sel_row.tolist() if b >= 0 for o in range(params.select)]
    return torch.tensor(sorted(x for x in pos if x <= t), dtype=torch.int64)


def naive_selected_attention(q: torch.Tensor, k_path: torch.Tensor, v_path: torch.Tensor,
                             sel: torch.Tensor, params: NSAParams,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-branch attention of one query at t = len(k_path) - 1.

    Args:
        q (torch.Tensor): shape [Hq, D].
        k_path, v_path (torch.Tensor): shape [t+1, Hkv, D], the query's path, positions 0..t.
        sel (torch.Tensor): shape [Hkv, topn] int64, -1 padded (from `naive_topk`).
        params (NSAParams): select.
        scale (float): softmax scale.
    Returns:
        (o [Hq, D] float32, lse [Hq] float32): attention over the tokens of the selected blocks
        with position <= t; lse is the natural-log sum of exp(scale * q.k).

    Bytes: reads Hq*D + 2*Hkv*min(topn*l', t+1)*D elements, writes Hq*(D+1) floats.
    """
    hq, dim = q.shape
    hkv = k_path.shape[1]
    if hq % hkv or sel.shape[0] != hkv:
        raise ValueError(f"naive_selected_attention: Hq={hq}, Hkv={hkv}, sel {tuple(sel.shape)} mismatch")
    g, t = hq // hkv, k_path.shape[0] - 1
    o = torch.zeros(hq, dim, dtype=torch.float32, device=q.device)
    lse = torch.zeros(hq, dtype=torch.float32, device=q.device)
    for kh in range(hkv):
        pos = selected_positions(sel[kh], t, params)
        for h in range(kh * g, (kh + 1) * g):
            o[h], lse[h] = attend_set(q[h], k_path[pos, kh], v_path[pos, kh], scale)
    return o, lse
