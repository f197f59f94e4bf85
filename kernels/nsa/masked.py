"""Vectorised torch NSA over an explicit visibility structure: the CPU path the model uses for
prefill chunks, decode and tree verification. Same semantics as `naive.py` (the reference),
computed in float32 whatever the input dtype, with queries processed in chunks so that memory
stays O(chunk * Hq * Nk).

Legend: Nq queries, Nk keys, Nc compressed tokens, Hq query heads, Hkv KV heads,
G = Hq // Hkv, D head dim, C query chunk, l / d / l' / n / w = params.block / stride /
select / topn / window, P committed tokens, T tree (or chunk) nodes, Np tree nodes that close
a compression block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.params import NSAParams
from ..common.tree import ancestor_mask, node_depths
from ..compression.naive import compress_blocks, overlap_weights
from ..selection.naive import check_topn
from .naive import check_combine

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TreeVisibility:
    """Index tensors for `masked_nsa` over [committed context (P keys) + tree (T keys)].

    depth [T] int64: 0 for children of the context. q_pos [T] int64 = P + depth.
    k_pos [P+T] int64: arange(P) then q_pos. ancestors [T, T] bool: ancestors[u, v] iff v is u
    or an ancestor of u. kv_visible [T, P+T] bool: all context keys + ancestors (incl. self).
    cmp_nodes [Np] int64: tree nodes v closing a compressed block (i*d + l - 1 == q_pos[v]),
    ascending; cmp_idx [Np] int64: that block's index i. num_committed_cmp: params.num_cmp(P),
    the compressed tokens finalised in the context. c_idx [Ncc+Np] int64 = arange(Ncc) then
    cmp_idx; c_visible [T, Ncc+Np] bool: committed ones for all, provisional token of v for v
    and its descendants.
    """

    depth: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    ancestors: torch.Tensor
    kv_visible: torch.Tensor
    cmp_nodes: torch.Tensor
    cmp_idx: torch.Tensor
    num_committed_cmp: int
    c_idx: torch.Tensor
    c_visible: torch.Tensor


def build_tree_visibility(P: int, parents: torch.Tensor, params: NSAParams) -> TreeVisibility:
    """Visibility of a draft tree (or a prefill chunk: chain parents [-1, 0, 1, ...]; or a decode
    step: parents [-1]) hanging below P committed tokens.

    Args:
        P (int): committed tokens (positions 0..P-1), whose keys come first in `k`.
        parents (torch.Tensor): shape [T] int; -1 = child of the context, else a smaller index.
        params (NSAParams): block, stride.
    Returns:
        TreeVisibility (see its docstring). Use:

            vis = build_tree_visibility(P, parents, params)
            pk = provisional_cmp(k_ctx, k_tree, parents, params, wk, bk)   # [Np, Hkv, D]
            pv = provisional_cmp(v_ctx, v_tree, parents, params, wv, bv)
            ck = torch.cat([ck_committed[:vis.num_committed_cmp], pk])      # c_idx order
            o, sel = masked_nsa(q, torch.cat([k_ctx, k_tree]), torch.cat([v_ctx, v_tree]),
                                vis.q_pos, vis.k_pos, vis.kv_visible, ck, cv, vis.c_idx,
                                vis.c_visible, params, scale, gates)

    Example: P=30, l=32, d=16, parents=[-1, 0, 0]: nodes 1 and 2 (siblings, position 31) both
    close compressed token 0 (covering 0..31) with different last keys; cmp_nodes=[1, 2],
    cmp_idx=[0, 0]; node 1 sees only its own version.
    """
    if P < 0:
        raise ValueError(f"build_tree_visibility: P must be >= 0, got {P}")
    if parents.dim() != 1:
        raise ValueError(f"build_tree_visibility: parents must be [T], got {tuple(parents.shape)}")
    dev = parents.device
    parents = parents.to(torch.int64)
    depth = torch.tensor(node_depths(parents), dtype=torch.int64, device=dev)
    t = depth.shape[0]
    q_pos = P + depth
    k_pos = torch.cat([torch.arange(P, device=dev), q_pos])
    anc = ancestor_mask(parents)
    kv_visible = torch.cat([torch.ones(t, P, dtype=torch.bool, device=dev), anc], dim=1)
    e = q_pos - params.block + 1                     # start of a block closing at q_pos
    closes = (e >= 0) & (e % params.stride == 0)
    cmp_nodes = closes.nonzero().squeeze(1)
    cmp_idx = e[cmp_nodes] // params.stride
    ncc = params.num_cmp(P)
    c_idx = torch.cat([torch.arange(ncc, device=dev), cmp_idx])
    c_visible = torch.cat([torch.ones(t, ncc, dtype=torch.bool, device=dev), anc[:, cmp_nodes]], dim=1)
    return TreeVisibility(depth=depth, q_pos=q_pos, k_pos=k_pos, ancestors=anc,
                          kv_visible=kv_visible, cmp_nodes=cmp_nodes, cmp_idx=cmp_idx,
                          num_committed_cmp=ncc, c_idx=c_idx, c_visible=c_visible)


def provisional_cmp(k_ctx: torch.Tensor, k_tree: torch.Tensor, parents: torch.Tensor,
                    params: NSAParams, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, ctx_len: int | None = None) -> torch.Tensor:
    """Path-dependent compressed tokens closed inside a tree: for every node v with
    i*d + l - 1 == q_pos[v], phi over the l keys of v's path ending at v. Call once with keys
    and once with values; the result is what the commit step stores for accepted nodes.

    Args:
        k_ctx (torch.Tensor): shape [Nctx, Hkv, D], the last Nctx committed keys (positions
            ctx_len - Nctx .. ctx_len - 1). Nctx >= min(ctx_len, l - 1) suffices.
        k_tree (torch.Tensor): shape [T, Hkv, D].
        parents (torch.Tensor): shape [T] int (see `build_tree_visibility`).
        weight, bias: learned compression ([Hkv, l], [Hkv, D] or None) or None for MEAN.
        ctx_len (int | None): P, the committed length; default Nctx (the whole context given).
    Returns:
        torch.Tensor: shape [Np, Hkv, D] float32, rows in `TreeVisibility.cmp_nodes` order.
        Bit-identical to `compress` over the same path (same `compress_blocks` arithmetic).

    Bytes: reads Np*l*Hkv*D elements, writes Np*Hkv*D floats.
    """
    nctx = k_ctx.shape[0]
    P = nctx if ctx_len is None else ctx_len
    if nctx > P or k_ctx.dim() != 3 or k_tree.dim() != 3 or k_ctx.shape[1:] != k_tree.shape[1:]:
        raise ValueError(f"provisional_cmp: k_ctx {tuple(k_ctx.shape)} (ctx_len={P}) and k_tree "
                         f"{tuple(k_tree.shape)} must be [N, Hkv, D] with N <= ctx_len")
    l, dev = params.block, k_tree.device
    parents = parents.to(torch.int64).to(dev)
    q_pos = P + torch.tensor(node_depths(parents), dtype=torch.int64, device=dev)
    e = q_pos - l + 1
    nodes = ((e >= 0) & (e % params.stride == 0)).nonzero().squeeze(1)          # [Np]
    if nodes.numel() == 0:
        return torch.zeros(0, *k_tree.shape[1:], dtype=torch.float32, device=dev)
    keep = min(nctx, l - 1)   # only the last l-1 committed keys can share a block with the tree
    k_ctx = k_ctx[nctx - keep:]
    ctx_start = P - keep
    anc = [nodes]                                    # anc[s][r]: ancestor s steps above nodes[r]
    for _ in range(1, l):
        prev = anc[-1]
        anc.append(torch.where(prev >= 0, parents[prev.clamp(min=0)], prev))
    anc = torch.stack(anc[::-1], dim=1)                                        # [Np, l] oldest first
    pos = q_pos[nodes][:, None] - torch.arange(l - 1, -1, -1, device=dev)[None, :]
    ctx_row = pos - ctx_start
    if bool(((anc < 0) & (ctx_row < 0)).any()):
        raise ValueError(f"provisional_cmp: k_ctx holds positions {ctx_start}..{P - 1}; a block "
                         f"needs earlier keys (pass at least the last {l - 1} committed keys)")
    src = torch.where(anc >= 0, keep + anc, ctx_row)
    keys = torch.cat([k_ctx.float(), k_tree.float()])
    return compress_blocks(keys[src], weight, bias)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to mask; rows with no visible entry give zeros."""
    x = logits.masked_fill(~mask, NEG_INF)
    p = torch.softmax(x, dim=-1)
    return p.masked_fill_(~mask.any(dim=-1, keepdim=True), 0.0)


def _attend(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Masked attention of a query chunk: qc [C, Hkv, G, D], kc / vc [Hkv, N, D], mask
    [C, Hkv, N] bool shared by the G heads of a group -> [C, Hkv, G, D]. Rows with no visible
    key give zeros."""
    c, hkv, g, dim = qc.shape
    n = kc.shape[1]
    if n == 0:
        return qc.new_zeros(c, hkv, g, dim)
    # Batch = G with stride-0 keys and a mask broadcast over it: the CPU flash kernel then
    # needs neither a G-times expanded mask nor copies of K/V (4-D inputs; 3-D would fall
    # back to the unfused math path).
    bias = torch.where(mask.permute(1, 0, 2), 0.0, NEG_INF)[None]               # [1, Hkv, C, N]
    o = F.scaled_dot_product_attention(
        qc.permute(2, 1, 0, 3), kc[None].expand(g, -1, -1, -1), vc[None].expand(g, -1, -1, -1),
        attn_mask=bias, scale=scale)                                            # [G, Hkv, C, D]
    o = o.permute(2, 1, 0, 3)
    empty = ~mask.any(dim=-1)                                                   # [C, Hkv]
    return o.masked_fill(empty[:, :, None, None], 0.0) if bool(empty.any()) else o


def _first_window_col(k_pos: torch.Tensor, tq: torch.Tensor, params: NSAParams) -> int:
    """Index of the first key whose position can be in some query's window; every key before
    it is older than all windows of the chunk."""
    inside = k_pos >= int(tq.min()) - params.window + 1
    return int(inside.int().argmax()) if bool(inside.any()) else k_pos.shape[0]


def _gather_heads_first(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[cols] as float32 [Hkv, N, D] contiguous (SDPA layout); a slice when cols is a range."""
    if cols.numel() and int(cols[-1]) - int(cols[0]) + 1 == cols.numel():
        x = x[int(cols[0]):int(cols[-1]) + 1]
    else:
        x = x[cols]
    return x.transpose(0, 1).float().contiguous()


def _cmp_branch(qc: torch.Tensor, ckf: torch.Tensor, cvf: torch.Tensor | None,
                c_vis: torch.Tensor, w_overlap: torch.Tensor, scale: float
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Compressed attention + Eq. 9 scores of a chunk: qc [C, Hkv, G, D], ckf / cvf [Nc, Hkv, D],
    c_vis [C, Nc] -> (o_cmp [C, Hkv, G, D] (None when cvf is None), scores [C, Hkv, Nsel] fp32,
    group-summed)."""
    if ckf.shape[0] == 0:
        c, hkv = qc.shape[:2]
        return (None if cvf is None else torch.zeros_like(qc),
                qc.new_zeros(c, hkv, w_overlap.shape[1]))
    logits = torch.einsum("chgd,nhd->chgn", qc, ckf) * scale                    # [C, Hkv, G, Nc]
    p = _masked_softmax(logits, c_vis[:, None, None, :])
    # per-head mapping, then the group sum: the order naive_block_scores uses
    scores = torch.einsum("chgn,nj->chgj", p, w_overlap).sum(dim=2)
    return (None if cvf is None else torch.einsum("chgn,nhd->chgd", p, cvf)), scores


def _cmp_out(qc: torch.Tensor, ckf: torch.Tensor, cvf: torch.Tensor, c_vis: torch.Tensor,
             scale: float) -> torch.Tensor:
    """o_cmp of a chunk without the selection scores (a layer reusing a selection under the
    gated combine): same arithmetic as `_cmp_branch`."""
    if ckf.shape[0] == 0:
        return torch.zeros_like(qc)
    logits = torch.einsum("chgd,nhd->chgn", qc, ckf) * scale
    p = _masked_softmax(logits, c_vis[:, None, None, :])
    return torch.einsum("chgn,nhd->chgd", p, cvf)


def select_blocks(q: torch.Tensor, q_pos: torch.Tensor, ckf: torch.Tensor,
                  c_visible: torch.Tensor, w_overlap: torch.Tensor, params: NSAParams,
                  scale: float, chunk: int = 128) -> torch.Tensor:
    """Selected blocks of every query (the refresh alone, no attention): q [Nq, Hq, D],
    q_pos [Nq] int64, ckf [Nc, Hkv, D] float32, c_visible [Nq, Nc], w_overlap [Nc, Nsel]
    -> [Nq, Hkv, topn] int64 sorted, -1 padded (what `masked_nsa` computes and returns)."""
    nq, hq, dim = q.shape
    hkv = ckf.shape[1]
    sel = torch.full((nq, hkv, params.topn), -1, dtype=torch.int64, device=q.device)
    for s in range(0, nq, chunk):
        e = min(s + chunk, nq)
        qc = q[s:e].float().reshape(e - s, hkv, hq // hkv, dim)
        _, scores = _cmp_branch(qc, ckf, None, c_visible[s:e], w_overlap, scale)
        sel[s:e] = _select(scores, q_pos[s:e], params)
    return sel


def _select(scores: torch.Tensor, t: torch.Tensor, params: NSAParams) -> torch.Tensor:
    """Vectorised `naive_topk`: scores [C, Hkv, Nsel] fp32, t [C] -> [C, Hkv, n] int64."""
    c, hkv, nsel = scores.shape
    n, ls = params.topn, params.select
    width = max(nsel, n)
    j = torch.arange(width, device=scores.device)[None, :]                     # [1, W]
    cur = (t // ls)[:, None]                                                    # [C, 1]
    cand = j <= cur
    forced = cand & ((j < params.init_blocks) | (j > cur - params.local_blocks))
    key = torch.full((c, hkv, width), NEG_INF, dtype=torch.float32, device=scores.device)
    key[:, :, :nsel] = scores
    key = key.masked_fill(~cand[:, None], NEG_INF).masked_fill(forced[:, None], float("inf"))
    # stable descending sort: equal scores keep ascending block order, so ties -> lower index
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    valid = key.gather(-1, order) > NEG_INF
    picked = torch.where(valid, order, width).sort(dim=-1).values
    return picked.masked_fill(picked == width, -1)


def _check_masked(q, k, v, q_pos, k_pos, kv_visible, ck, cv, c_idx, c_visible, gates, params):
    nq, hq, dim = q.shape
    nk, hkv, _ = k.shape
    nc = ck.shape[0]
    checks = [
        (q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and k.shape[2] == dim,
         f"q [Nq, Hq, D], k/v [Nk, Hkv, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"),
        (hq % hkv == 0, f"Hq={hq} must be a multiple of Hkv={hkv}"),
        (q_pos.shape == (nq,) and k_pos.shape == (nk,), (f"q_pos [{nq}] / k_pos [{nk}] expected, got "
         f"{tuple(q_pos.shape)}, {tuple(k_pos.shape)}")),
        (kv_visible.shape == (nq, nk) and kv_visible.dtype == torch.bool,
         f"kv_visible must be bool [{nq}, {nk}], got {kv_visible.dtype} {tuple(kv_visible.shape)}"),
        (ck.dim() == 3 and ck.shape == cv.shape and ck.shape[1:] == k.shape[1:],
         f"ck/cv must be [Nc, {hkv}, {dim}], got {tuple(ck.shape)}, {tuple(cv.shape)}"),
        (c_idx.shape == (nc,), f"c_idx must be [{nc}], got {tuple(c_idx.shape)}"),
        (c_visible.shape == (nq, nc) and c_visible.dtype == torch.bool,
         f"c_visible must be bool [{nq}, {nc}], got {c_visible.dtype} {tuple(c_visible.shape)}"),
        (gates is None or tuple(gates.shape) == (nq, hq, 3),
         f"gates must be [{nq}, {hq}, 3], got {None if gates is None else tuple(gates.shape)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"masked_nsa: {msg}")
    check_combine(params, gates, "masked_nsa")
    check_topn(params, "masked_nsa")


def masked_nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
               k_pos: torch.Tensor, kv_visible: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
               c_idx: torch.Tensor, c_visible: torch.Tensor, params: NSAParams, scale: float,
               gates: torch.Tensor | None = None, out: torch.Tensor | None = None,
               chunk: int = 128, sel: torch.Tensor | None = None,
               sel_src: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA for many queries at once, each over its own visible keys / compressed tokens.

    Args:
        q (torch.Tensor): shape [Nq, Hq, D], any float dtype (computed in float32).
        k, v (torch.Tensor): shape [Nk, Hkv, D], cached post-RoPE keys / values.
        q_pos (torch.Tensor): shape [Nq] int64, query positions t.
        k_pos (torch.Tensor): shape [Nk] int64, key positions.
        kv_visible (torch.Tensor): shape [Nq, Nk] bool, the keys on each query's path (each
            position 0..t exactly once; tree queries: context + ancestors + self).
        ck, cv (torch.Tensor): shape [Nc, Hkv, D], compressed tokens (committed + provisional).
        c_idx (torch.Tensor): shape [Nc] int64, block index i of each compressed token.
        c_visible (torch.Tensor): shape [Nq, Nc] bool, compressed tokens on each query's path.
        params (NSAParams): geometry; params.gated must agree with gates.
        scale (float): softmax scale.
        gates (torch.Tensor | None): shape [Nq, Hq, 3] (cmp, slc, win), or None for union.
        out (torch.Tensor | None): shape [Nq, Hq, D] # mutable; fully overwritten. Default:
            a new tensor of q's dtype.
        chunk (int): queries per step; memory is O(chunk * Hq * Nk) floats.
        sel (torch.Tensor | None): shape [Nq, Hkv, topn] int, sorted, -1 padded: use these
            selected blocks instead of computing them (cross-layer index reuse, the REUSE
            classes of docs/DESIGN.md section 5): the Eq. 9 scores and the top-n are skipped
            entirely; with the union combine so is the whole compressed branch (the gated
            combine still needs o_cmp). Blocks past a query's position or keys off its path
            stay masked by kv_visible.
        sel_src (torch.Tensor | None): shape [Nq] int: query u attends with the selection
            computed for query sel_src[u] (SHARED_INDEX, APPROX classes: a group's
            representative); selections are then computed for every query first. Not with sel.
    Returns:
        (o = out [Nq, Hq, D], sel [Nq, Hkv, topn] int64 sorted ascending, -1 padded): the
        selection each query attended with (given, shared or its own).

    Host syncs (nonzero / max per chunk) make this a CPU / eager path, not CUDA-graph safe.
    Bytes per chunk: reads C*Hq*D + 2*Nk'*Hkv*D + 2*Nc*Hkv*D elements (Nk' = keys visible to
    some query of the chunk), writes C*Hq*D + C*Hkv*n; FLOPs 4*C*Hq*(Nk' + Nc)*D.
    """
    _check_masked(q, k, v, q_pos, k_pos, kv_visible, ck, cv, c_idx, c_visible, gates, params)
    nq, hq, dim = q.shape
    hkv = k.shape[1]
    q_pos, k_pos = q_pos.long(), k_pos.long()   # int32 positions are fine; gather needs int64
    if out is None:
        out = torch.empty(nq, hq, dim, dtype=q.dtype, device=q.device)
    _check_reuse(out, sel, sel_src, nq, hq, dim, hkv, params)
    given = sel is not None
    if nq == 0:
        return out, torch.full((nq, hkv, params.topn), -1, dtype=torch.int64, device=q.device)
    ckf, cvf = ck.float(), cv.float()
    nsel = params.num_sel(int(q_pos.max()) + 1)  # host sync: sizes the score table
    w_overlap = overlap_weights(c_idx, nsel, params)                            # [Nc, Nsel]
    if sel_src is not None:
        own = select_blocks(q, q_pos, ckf, c_visible, w_overlap, params, scale, chunk)
        sel, given = own[sel_src.to(own.device).long()], True
    if given:
        sel = sel.to(device=q.device, dtype=torch.int64)
    else:
        sel = torch.full((nq, hkv, params.topn), -1, dtype=torch.int64, device=q.device)
    k_blk = (k_pos // params.select).clamp(max=nsel)    # column nsel of `chosen` is never set
    for s in range(0, nq, chunk):
        e = min(s + chunk, nq)
        qc = q[s:e].float().reshape(e - s, hkv, hq // hkv, dim)                     # [C, Hkv, G, D]
        if given:
            sel_c = sel[s:e]
            o_cmp = (_cmp_out(qc, ckf, cvf, c_visible[s:e], scale) if gates is not None
                     else None)
        else:
            o_cmp, scores = _cmp_branch(qc, ckf, cvf, c_visible[s:e], w_overlap, scale)
            sel_c = _select(scores, q_pos[s:e], params)                         # [C, Hkv, n]
            sel[s:e] = sel_c
        o = _sel_win_chunk(qc, k, v, q_pos[s:e], k_pos, k_blk, kv_visible[s:e], sel_c, nsel,
                           o_cmp, None if gates is None else gates[s:e], params, scale)
        out[s:e] = o.reshape(e - s, hq, dim).to(out.dtype)
    return out, sel


def _check_reuse(out, sel, sel_src, nq: int, hq: int, dim: int, hkv: int, params: NSAParams) -> None:
    # masked_nsa's output buffer and reused / shared selection arguments
    if tuple(out.shape) != (nq, hq, dim):
        raise ValueError(f"masked_nsa: out must be [{nq}, {hq}, {dim}], got {tuple(out.shape)}")
    if sel is not None and sel_src is not None:
        raise ValueError("masked_nsa: give sel (reused selection) or sel_src (shared "
                         "selection), not both")
    if sel is not None and tuple(sel.shape) != (nq, hkv, params.topn):
        raise ValueError(f"masked_nsa: sel must be [{nq}, {hkv}, {params.topn}], got "
                         f"{tuple(sel.shape)}")
    if sel_src is not None and tuple(sel_src.shape) != (nq,):
        raise ValueError(f"masked_nsa: sel_src must be [{nq}], got {tuple(sel_src.shape)}")


def _sel_win_chunk(qc, k, v, tq, k_pos, k_blk, vis, sel_c, nsel, o_cmp, gates_c,
                   params: NSAParams, scale: float) -> torch.Tensor:
    """Selected + window branches and the combine for a chunk of queries qc [C, Hkv, G, D]
    with selections sel_c [C, Hkv, n]; returns o [C, Hkv, G, D] fp32."""
    c, hkv, g, _ = qc.shape
    chosen = torch.zeros(c, hkv, nsel + 1, dtype=torch.bool, device=qc.device)
    # -1 padding (and, for a given selection, blocks no query here can see) -> column nsel
    chosen.scatter_(2, sel_c.masked_fill((sel_c < 0) | (sel_c >= nsel), nsel), True)
    # keys some query of the chunk sees AND that lie in a block selected by some
    # (query, head) or in the chunk's window span: the rest would be masked anyway
    used = chosen.any(dim=1).any(dim=0)[k_blk] | (k_pos > int(tq.min()) - params.window)
    cols = (vis.any(dim=0) & used).nonzero().squeeze(1)  # host sync: sizes the key gather
    vis = vis[:, cols]                                                          # [C, Nk']
    in_sel = chosen.gather(2, k_blk[cols][None, None, :].expand(c, hkv, -1))   # [C, Hkv, Nk']
    m_slc = in_sel & vis[:, None, :]
    m_win = ((k_pos[cols][None, :] > (tq - params.window)[:, None]) & vis)[:, None, :]
    # gather per chunk (not one fp32 copy of the whole cache): decode at long context reads
    # only the selected blocks and the window
    kc, vc = (_gather_heads_first(x, cols) for x in (k, v))                    # [Hkv, Nk', D]
    if gates_c is None:
        return _attend(qc, kc, vc, m_slc | m_win, scale)
    # the window branch only needs the keys near the chunk's queries
    lo = _first_window_col(k_pos[cols], tq, params)
    gc = gates_c.float().reshape(c, hkv, g, 3)
    o_slc = _attend(qc, kc, vc, m_slc, scale)
    o_win = _attend(qc, kc[:, lo:], vc[:, lo:], m_win[..., lo:].expand(-1, hkv, -1), scale)
    return gc[..., 0:1] * o_cmp + gc[..., 1:2] * o_slc + gc[..., 2:3] * o_win
