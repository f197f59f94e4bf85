"""Composed NSA reference: one query at a time over its own path (the specification every
other path must match; docs/DESIGN.md section 3, docs/CONTRACTS.md sections 2-3).

Legend: T queries, P committed tokens, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head
dim, t query position, n = params.topn. cw = (wk, bk, wv, bv) learned compression weights
(wk, wv [Hkv, l]; bk, bv [Hkv, D] or None) or None for MEAN.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..common.tree import node_depths, parent_list, tree_path
from ..compression.naive import compress, naive_block_scores, naive_cmp_attention
from ..selection.naive import (
    attend_set,
    naive_selected_attention,
    naive_topk,
    selected_positions,
)
from ..window.naive import naive_window_attention, window_start

CompressionWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def check_combine(params: NSAParams, gates: torch.Tensor | None, what: str) -> None:
    """Gates must be given exactly when params.gated: a silent union/gated mix-up would change
    every output without failing."""
    if params.gated and gates is None:
        raise ValueError(f"{what}: params.gated is True (gated combine) but gates is None")
    if not params.gated and gates is not None:
        raise ValueError(f"{what}: gates given but params.gated is False (union combine)")


def _compressed_kv(k_path, v_path, params, cw):
    if cw is None:
        return compress(k_path, params), compress(v_path, params)
    if len(cw) != 4:
        raise ValueError("cw must be (wk, bk, wv, bv) (biases may be None) or None for MEAN")
    wk, bk, wv, bv = cw
    return compress(k_path, params, wk, bk), compress(v_path, params, wv, bv)


def naive_nsa_query(q: torch.Tensor, k_path: torch.Tensor, v_path: torch.Tensor,
                    params: NSAParams, scale: float, cw: CompressionWeights | None = None,
                    gates: torch.Tensor | None = None, sel: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA output of one query at t = len(k_path) - 1.

    Args:
        q (torch.Tensor): shape [Hq, D].
        k_path, v_path (torch.Tensor): shape [t+1, Hkv, D], cached (post-RoPE) keys / values of
            the query's own path, positions 0..t in order.
        params (NSAParams): NSA geometry; params.gated must agree with `gates`.
        scale (float): the layer's softmax scale.
        cw (tuple | None): (wk, bk, wv, bv) learned compression, or None for MEAN.
        gates (torch.Tensor | None): shape [Hq, 3] (cmp, slc, win) sigmoid gates -> gated
            combine; None -> union combine (one softmax over selected-block tokens U window
            tokens, each once; the compressed branch only scores).
        sel (torch.Tensor | None): shape [Hkv, topn] int, -1 padded: attend with these
            selected blocks instead of the query's own top-n (another layer's selection under
            index reuse, a group representative's under SHARED_INDEX; docs/DESIGN.md
            section 5). Only tokens at positions <= t count.
    Returns:
        (o [Hq, D] float32, sel [Hkv, topn] int64 sorted ascending, -1 padded): the selection
        used.

    Bytes (per query): compression reads (t+1)*Hkv*D*2 elements, compressed attention reads
    2*Nc*Hkv*D, selection + window read at most 2*Hkv*(n*l' + w)*D; writes Hq*D floats and
    Hkv*n int64.
    """
    if q.dim() != 2 or k_path.dim() != 3 or k_path.shape != v_path.shape or q.shape[1] != k_path.shape[2]:
        raise ValueError(f"naive_nsa_query: q [Hq, D], k_path/v_path [t+1, Hkv, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k_path.shape)}, {tuple(v_path.shape)}")
    if k_path.shape[0] == 0:
        raise ValueError("naive_nsa_query: empty path (the query's own key must be on it)")
    check_combine(params, gates, "naive_nsa_query")
    hq, dim = q.shape
    t, hkv = k_path.shape[0] - 1, k_path.shape[1]
    if hq % hkv:
        raise ValueError(f"naive_nsa_query: Hq={hq} must be a multiple of Hkv={hkv}")
    ck, cv = _compressed_kv(k_path, v_path, params, cw)
    o_cmp, p = naive_cmp_attention(q, ck, cv, scale)
    if sel is None:
        scores = naive_block_scores(p, t, params, num_kv_heads=hkv)
        sel = naive_topk(scores, t, params)
    else:
        sel = sel.to(torch.int64)
        if tuple(sel.shape) != (hkv, params.topn):
            raise ValueError(f"naive_nsa_query: sel must be [Hkv={hkv}, topn={params.topn}], "
                             f"got {tuple(sel.shape)}")
    if gates is not None:
        if tuple(gates.shape) != (hq, 3):
            raise ValueError(f"naive_nsa_query: gates must be [Hq={hq}, 3], got {tuple(gates.shape)}")
        o_slc, _ = naive_selected_attention(q, k_path, v_path, sel, params, scale)
        o_win, _ = naive_window_attention(q, k_path, v_path, params, scale)
        g = gates.float()
        return g[:, 0:1] * o_cmp + g[:, 1:2] * o_slc + g[:, 2:3] * o_win, sel
    g_size, lo = hq // hkv, window_start(t, params)
    o = torch.zeros(hq, dim, dtype=torch.float32, device=q.device)
    for kh in range(hkv):
        pos = set(selected_positions(sel[kh], t, params).tolist()) | set(range(lo, t + 1))
        idx = torch.tensor(sorted(pos), dtype=torch.int64)
        for h in range(kh * g_size, (kh + 1) * g_size):
            o[h], _ = attend_set(q[h], k_path[idx, kh], v_path[idx, kh], scale)
    return o, sel


def naive_nsa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NSAParams,
                      scale: float, cw: CompressionWeights | None = None,
                      gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal NSA over a linear sequence: query t sees k[0..t].

    Args:
        q (torch.Tensor): shape [T, Hq, D]; k, v: shape [T, Hkv, D]; gates: [T, Hq, 3] or None.
    Returns:
        (o [T, Hq, D] float32, sel [T, Hkv, topn] int64).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0]:
        raise ValueError(f"naive_nsa_prefill: q [T, Hq, D], k/v [T, Hkv, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    outs, sels = [], []
    for t in range(q.shape[0]):
        o, s = naive_nsa_query(q[t], k[: t + 1], v[: t + 1], params, scale, cw,
                               None if gates is None else gates[t])
        outs.append(o)
        sels.append(s)
    return torch.stack(outs), torch.stack(sels)


def naive_nsa_tree(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                   k_tree: torch.Tensor, v_tree: torch.Tensor, parents: torch.Tensor,
                   params: NSAParams, scale: float, cw: CompressionWeights | None = None,
                   gates: torch.Tensor | None = None, sel: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA verification of a draft tree: node u sits at position P + depth(u) and runs
    `naive_nsa_query` over its path = committed context + ancestors + u. Compression blocks
    closing inside the tree are thereby path-dependent (provisional) automatically.

    Args:
        q (torch.Tensor): shape [T, Hq, D], one query per tree node.
        k_ctx, v_ctx (torch.Tensor): shape [P, Hkv, D], committed keys / values (P may be 0).
        k_tree, v_tree (torch.Tensor): shape [T, Hkv, D], the tree nodes' keys / values.
        parents (torch.Tensor): shape [T] int; -1 = child of the committed context (node 0);
            otherwise a smaller node index.
        gates (torch.Tensor | None): shape [T, Hq, 3] or None.
        sel (torch.Tensor | None): shape [T, Hkv, topn]: given selections (see
            `naive_nsa_query`), or None for each node's own.
    Returns:
        (o [T, Hq, D] float32, sel [T, Hkv, topn] int64).

    Example: P=5, parents=[-1, 0, 0, 1]: node 3 sits at position 7 and sees context 0..4,
    nodes 0, 1 and itself; node 2 (sibling of 1) is invisible to it.
    """
    t_nodes = q.shape[0]
    if k_tree.shape[0] != t_nodes or parents.shape != (t_nodes,):
        raise ValueError(f"naive_nsa_tree: q has {t_nodes} nodes but k_tree {tuple(k_tree.shape)}, "
                         f"parents {tuple(parents.shape)}")
    node_depths(parents)
    par = parent_list(parents)
    outs, sels = [], []
    for u in range(t_nodes):
        nodes = torch.tensor(tree_path(u, par), dtype=torch.int64)
        kp = torch.cat([k_ctx.float(), k_tree[nodes].float()])
        vp = torch.cat([v_ctx.float(), v_tree[nodes].float()])
        o, s = naive_nsa_query(q[u], kp, vp, params, scale, cw, None if gates is None else gates[u],
                               None if sel is None else sel[u])
        outs.append(o)
        sels.append(s)
    return torch.stack(outs), torch.stack(sels)
