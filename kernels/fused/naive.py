"""fp32 reference of the fused selected + window + combine step over a draft tree, GIVEN the
selections (and, gated, o_cmp and gates) the refresh kernel produced. Composes the branch
references of kernels/selection/naive.py and kernels/window/naive.py per query over its path.

Legend: T tree nodes, P committed tokens, Hq / Hkv heads, D head dim, n = params.topn.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..common.tree import node_depths, tree_path
from ..selection.naive import attend_set, naive_selected_attention, selected_positions
from ..window.naive import naive_window_attention, window_start


def naive_fused_query(q: torch.Tensor, k_path: torch.Tensor, v_path: torch.Tensor,
                      sel: torch.Tensor, params: NSAParams, scale: float,
                      o_cmp: torch.Tensor | None = None,
                      gates: torch.Tensor | None = None) -> torch.Tensor:
    """One query at t = len(k_path) - 1: q [Hq, D], k_path/v_path [t+1, Hkv, D], sel [Hkv, n];
    gated: o_cmp [Hq, D], gates [Hq, 3] (cmp, slc, win). Returns o [Hq, D] float32.

    Bytes: reads Hq*D + 2*Hkv*(n*l' + w)*D elements at most, writes Hq*D floats."""
    q, k_path, v_path = q.float(), k_path.float(), v_path.float()
    if gates is not None:
        o_slc, _ = naive_selected_attention(q, k_path, v_path, sel.long(), params, scale)
        o_win, _ = naive_window_attention(q, k_path, v_path, params, scale)
        g = gates.float()
        return g[:, 0:1] * o_cmp.float() + g[:, 1:2] * o_slc + g[:, 2:3] * o_win
    hq, dim = q.shape
    hkv = k_path.shape[1]
    t, gs = k_path.shape[0] - 1, hq // hkv
    lo = window_start(t, params)
    o = torch.zeros(hq, dim, dtype=torch.float32)
    for kh in range(hkv):
        pos = set(selected_positions(sel[kh].long(), t, params).tolist()) | set(range(lo, t + 1))
        idx = torch.tensor(sorted(pos), dtype=torch.int64)
        for h in range(kh * gs, (kh + 1) * gs):
            o[h], _ = attend_set(q[h], k_path[idx, kh], v_path[idx, kh], scale)
    return o


def naive_fused_tree(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                     k_tree: torch.Tensor, v_tree: torch.Tensor, parents: list[int],
                     sel: torch.Tensor, params: NSAParams, scale: float,
                     o_cmp: torch.Tensor | None = None,
                     gates: torch.Tensor | None = None) -> torch.Tensor:
    """Every node u of a tree below P = len(k_ctx) committed tokens, over its own path.

    Args:
        q (torch.Tensor): [T, Hq, D]; k_ctx, v_ctx: [P, Hkv, D]; k_tree, v_tree: [T, Hkv, D].
        parents (list[int]): -1 for node 0, else a smaller index.
        sel (torch.Tensor): [T, Hkv, n] sorted, -1 padded; o_cmp [T, Hq, D], gates [T, Hq, 3].
    Returns:
        o [T, Hq, D] float32.
    """
    par = [int(p) for p in parents]
    node_depths(par)
    outs = []
    for u in range(q.shape[0]):
        nodes = torch.tensor(tree_path(u, par), dtype=torch.int64)
        kp = torch.cat([k_ctx.float(), k_tree[nodes].float()])
        vp = torch.cat([v_ctx.float(), v_tree[nodes].float()])
        outs.append(naive_fused_query(q[u], kp, vp, sel[u], params, scale,
                                      None if o_cmp is None else o_cmp[u],
                                      None if gates is None else gates[u]))
    return torch.stack(outs)
