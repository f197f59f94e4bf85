"""Host-side construction of `VerifyGeometry` (once per step, never per layer).

Plain lists in, device int tensors out; one asynchronous (pinned) host->device copy per tensor. The per-step plan
(`specsa.metadata`) calls this; CUDA-graph users copy the result into the captured buffers with
`copy_geometry_`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..common.tree import MAX_TREE_NODES, ancestor_bits, node_depths, rooted_parents
from ..common.upload import to_device
from .verify import VerifyGeometry


def build_geometry(parents: list[list[int]], prefix_lens: list[int], block_table: torch.Tensor,
                   orders: list[list[int]], group_size: int, window: int, num_splits: int,
                   shared: bool = False, direct: bool | None = None) -> VerifyGeometry:
    """Geometry of a batch of draft trees.

    Args:
        parents: per request, parents[u] (-1 for node 0, else < u); T <= MAX_TREE_NODES nodes.
        prefix_lens: per request committed length P.
        block_table (torch.Tensor): [B, max_pages] int32 on the target device.
        orders: per request, the flattened node order (a permutation of range(T)).
        group_size (int): C, queries per group (groups never span requests).
        window (int): NSA window w (for each group's committed-window start).
        num_splits (int): split-KV factor of the verify kernel.
        shared (bool): SHARED_INDEX: every slot uses its group's deepest query's selection.
        direct (bool | None): read selections in place (default: group_size == 1).
    Returns:
        VerifyGeometry with global query index = request offset + node index.
    """
    if len(parents) != len(prefix_lens) or len(parents) != len(orders):
        raise ValueError("parents, prefix_lens and orders need one entry per request")
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [B, max_pages], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    req_off, q_pos, q_anc, order, sel_src = [], [], [], [], []
    g_req, g_start, g_len, g_winlo = [], [], [], []
    off = 0
    for b, (par, P, ordr) in enumerate(zip(parents, prefix_lens, orders)):
        t = len(par)
        if not 1 <= t <= MAX_TREE_NODES:
            raise ValueError(f"request {b}: tree has {t} nodes; the tree mask supports "
                             f"1..{MAX_TREE_NODES}")
        if sorted(ordr) != list(range(t)):
            raise ValueError(f"request {b}: order is not a permutation of its {t} nodes")
        dep = node_depths(rooted_parents(par))
        req_off.append(off)
        q_pos.extend(P + d for d in dep)
        q_anc.extend(ancestor_bits(par))
        for s in range(0, t, group_size):
            nodes = ordr[s:s + group_size]
            rep = max(nodes[::-1], key=lambda u: dep[u])   # deepest; ties -> latest in order
            g_req.append(b)
            g_start.append(len(order))
            g_len.append(len(nodes))
            g_winlo.append(max(0, P + min(dep[u] for u in nodes) - window + 1))
            order.extend(off + u for u in nodes)
            sel_src.extend(off + (rep if shared else u) for u in nodes)
        off += t
    dev = block_table.device

    def i32(x):
        return to_device(x, torch.int32, dev)

    anc = to_device(np.array(q_anc, dtype=np.uint64).view(np.int64), torch.int64, dev)
    return VerifyGeometry(
        req_P=i32(list(prefix_lens)), req_off=i32(req_off), req_T=i32([len(p) for p in parents]),
        block_table=block_table, q_pos=i32(q_pos), q_anc=anc, order=i32(order),
        sel_src=i32(sel_src), g_req=i32(g_req), g_start=i32(g_start), g_len=i32(g_len),
        g_winlo=i32(g_winlo), C=group_size, t_max=max(len(p) for p in parents),
        num_splits=num_splits, direct=group_size == 1 if direct is None else direct)


def copy_geometry_(dst: VerifyGeometry, src: VerifyGeometry) -> VerifyGeometry:
    """Copy src's tensors into dst's (captured CUDA-graph buffers); shapes and ints must match."""
    for name in ("C", "t_max", "num_splits", "direct"):
        if getattr(dst, name) != getattr(src, name):
            raise ValueError(f"graph geometry mismatch: {name} {getattr(dst, name)} != {getattr(src, name)}")
    for name in ("req_P", "req_off", "req_T", "block_table", "q_pos", "q_anc", "order", "sel_src",
                 "g_req", "g_start", "g_len", "g_winlo"):
        a, b = getattr(dst, name), getattr(src, name)
        if a.shape != b.shape:
            raise ValueError(f"graph geometry mismatch: {name} shape {tuple(a.shape)} != {tuple(b.shape)}")
        if a.data_ptr() != b.data_ptr():
            a.copy_(b, non_blocking=True)
    return dst
