"""fp32 reference of dense tree verification: node u attends to every committed token and to
its ancestors (and itself); no sparsity. The baseline NSA verification is compared with.

Legend: T tree nodes, P committed tokens, Hq / Hkv heads, G = Hq // Hkv, D head dim.
"""
from __future__ import annotations

import torch

from ..common.tree import node_depths, tree_path


def naive_dense_tree(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                     k_tree: torch.Tensor, v_tree: torch.Tensor, parents: list[int],
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Args:
        q (torch.Tensor): [T, Hq, D]; k_ctx, v_ctx: [P, Hkv, D]; k_tree, v_tree: [T, Hkv, D].
        parents (list[int]): -1 for node 0, else a smaller index.
        scale (float): softmax scale.
    Returns:
        (o [T, Hq, D] float32, lse [T, Hq] float32, natural log).

    Bytes: reads T*Hq*D + 2*(P+T)*Hkv*D elements once (a fused kernel), writes T*Hq*D.
    """
    par = [int(p) for p in parents]
    node_depths(par)
    t_nodes, hq, _ = q.shape
    g = hq // k_ctx.shape[1]
    o = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.zeros(t_nodes, hq, dtype=torch.float32)
    for u in range(t_nodes):
        nodes = torch.tensor(tree_path(u, par), dtype=torch.int64)
        kp = torch.cat([k_ctx.float(), k_tree[nodes].float()])
        vp = torch.cat([v_ctx.float(), v_tree[nodes].float()])
        for h in range(hq):
            logits = (kp[:, h // g] @ q[u, h].float()) * scale
            lse[u, h] = torch.logsumexp(logits, 0)
            o[u, h] = torch.softmax(logits, 0) @ vp[:, h // g]
    return o, lse
