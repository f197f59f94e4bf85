"""A decode / verify step's device metadata in one launch: committed lengths, draft-tree parents,
depths and ancestor bits, positions, the block table, the provisional compressed tokens'
sources / indices / visibility and the verifier's group windows and selection sources.

Why: SGLang's SpecSA backend rebuilt this before every decode / verify step from about 80 small
torch ops (the reference: `specsa.device_metadata.parents_from_links` and
`DeviceStepMetadata.fill`, over `sglang_plugin.step_metadata.block_table_from`). Each is a
latency-bound launch of a few microseconds on tensors of a few hundred elements; one program per
request does all of it. The grid is fixed by the batch size and nothing is read back on the
host, so the launch is CUDA-graph safe and the host can prepare a step while the GPU still runs
the previous one. Every output is an integer and matches the reference bit for bit.

Per request b (committed length P, T draft nodes, node u's depth d(u), position P + d(u)):
- prefix P = max(seq_lens[b] - 1, 0) for decode (seq_lens counts the token being decoded), else
  seq_lens[b]; parents from EAGLE's first-child / next-sibling links for b < raw (pointer
  jumping along sibling chains), the chain u - 1 for the rows beyond (CUDA-graph padding);
- depths and ancestor bitmasks (int64, self included) by ceil(log2 T) rounds of pointer jumping;
- block_table[b, j] = req_to_token[pool_idx[b], j * PS] // PS (0 past the slot table);
- node v closes compression block i when P + d(v) - (l - 1) = i * d >= 0: prov_cidx = i and
  prov_idx its l sources (pool slot block_table[s // PS] * PS + s % PS for positions s < P,
  else tail row -1 - (b * T + a), a = v's first ancestor of depth s - P); rows of other nodes
  are 0; prov_vis[v, a] = b * T + a for v's closing ancestors a (self included), else -1;
- groups of C consecutive nodes: window start max(P + min depth - window + 1, 0) and, for
  SHARED_INDEX, every member's selection source b * T + the group's deepest node (ties -> the
  latest node).

Legend (FLA): i_ program ids, o_ offsets, m_ masks, b_ on-chip blocks. Grid (B,): program b
writes request b's rows. Gathers over the node lanes are [BT, BT] one-hot selects
(x[idx] = sum(where(u == idx, x, 0))); T <= 64 nodes (one int64 ancestor mask per node).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common.launch import pow2
from ..common.params import NSAParams
from ..common.tree import MAX_TREE_NODES


@triton.jit
def _gather(x, idx, o_u):
    """x[idx] over the node lanes: x [BT], idx [BT] (values outside [0, BT) give 0)."""
    return tl.sum(tl.where(o_u[None, :] == idx[:, None], x[None, :], 0), 1)


@triton.jit
def _floor_div(x, n):
    """Python's floor division of int64 x by n > 0 (Triton's // truncates towards zero)."""
    return tl.where(x >= 0, x // n, -((-x - 1) // n) - 1)


# raw (requests with links) follows the batch: as a specialised int (== 1, % 16) it would
# compile new variants while serving
@triton.jit(do_not_specialize=["raw"])
def step_metadata_kernel(
    seq_lens, pool_idx, req_to_token, next_token, next_sibling,
    prefix, parents, block_table, q_pos, q_anc, cmp_lens, upd_lo,
    prov_idx, prov_cidx, prov_vis, g_winlo, sel_src,
    s_rt_r, s_rt_c, rt_cols, s_nt_b, s_nt_t, s_ns_b, s_ns_t, raw, W, margin, window,
    T: tl.constexpr, BT: tl.constexpr, L: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
    C: tl.constexpr, NG: tl.constexpr, BG: tl.constexpr, BW: tl.constexpr,
    ROUNDS: tl.constexpr, DECODE: tl.constexpr, LINKS: tl.constexpr, SHARED: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_u = tl.arange(0, BT).to(tl.int64)
    m_u = o_u < T
    row0 = i_b * T                                   # the request's first query row

    # -- committed length (int32 as the reference buffer holds it) ---------------------------
    b_seq = tl.load(seq_lens + i_b).to(tl.int32)
    if DECODE:
        b_seq = tl.maximum(b_seq - 1, 0)
    tl.store(prefix + i_b, b_seq)
    P = b_seq.to(tl.int64)
    tl.store(cmp_lens + i_b, tl.where(P >= L, (P - L) // D + 1, 0).to(tl.int32))
    tl.store(upd_lo + i_b, tl.maximum(P - margin, 0).to(tl.int32))

    # -- block table: every logical page's id (0 past the slot table) --------------------------
    i_r = tl.load(pool_idx + i_b).to(tl.int64)
    rt_row = req_to_token + i_r * s_rt_r
    for j0 in range(0, W, BW):
        o_w = j0 + tl.arange(0, BW).to(tl.int64)
        m_w = o_w < W
        b_x = tl.load(rt_row + o_w * PS * s_rt_c, mask=m_w & (o_w * PS < rt_cols), other=0)
        tl.store(block_table + i_b * W + o_w, _floor_div(b_x.to(tl.int64), PS).to(tl.int32),
                 mask=m_w)

    # -- parents: the chain, or from the first-child / next-sibling links ---------------------
    b_par = o_u - 1
    if LINKS:
        m_l = m_u & (i_b < raw)
        b_nt = tl.load(next_token + i_b * s_nt_b + o_u * s_nt_t, mask=m_l, other=-1).to(tl.int64)
        b_ns = tl.load(next_sibling + i_b * s_ns_b + o_u * s_ns_t, mask=m_l,
                       other=-1).to(tl.int64)
        # par[first_child(u)] = u; prev[next_sibling(u)] = u (T: none), then follow prev chains
        b_lp = tl.max(tl.where(b_nt[None, :] == o_u[:, None], o_u[None, :], -1), 1)
        b_prev = tl.max(tl.where(b_ns[None, :] == o_u[:, None], o_u[None, :], -1), 1)
        b_prev = tl.where(b_prev >= 0, b_prev, T)
        for _ in tl.static_range(ROUNDS):
            keep = (b_lp >= 0) | (b_prev >= T)
            step = tl.minimum(b_prev, T - 1)
            b_lp = tl.where(keep, b_lp, _gather(b_lp, step, o_u))
            b_prev = tl.where(keep, b_prev, _gather(b_prev, step, o_u))
        b_lp = tl.where(o_u == 0, -1, b_lp)
        b_par = tl.where(i_b < raw, b_lp, b_par)
    tl.store(parents + row0 + o_u, b_par, mask=m_u)

    # -- depths and ancestor bits (pointer jumping, as batched_depths_ancestor_bits) ----------
    has_p = b_par >= 0
    b_up = tl.where(has_p, b_par, o_u)
    b_dep = has_p.to(tl.int64)
    b_bit = tl.full([BT], 1, tl.int64) << o_u
    b_anc = b_bit | tl.where(has_p, _gather(b_bit, b_up, o_u), 0)
    for _ in tl.static_range(ROUNDS):
        b_dep = b_dep + _gather(b_dep, b_up, o_u)
        b_anc = b_anc | _gather(b_anc, b_up, o_u)
        b_up = _gather(b_up, b_up, o_u)
    b_pos = P + b_dep
    tl.store(q_pos + row0 + o_u, b_pos.to(tl.int32), mask=m_u)
    tl.store(q_anc + row0 + o_u, b_anc, mask=m_u)
    # is_anc[v, a]: a is v or one of v's ancestors
    is_anc = ((b_anc[:, None] >> o_u[None, :]) & 1) != 0

    # -- provisional compressed tokens -------------------------------------------------------
    b_first = b_pos - (L - 1)
    closes = (b_first >= 0) & (b_first % D == 0)
    tl.store(prov_cidx + row0 + o_u, tl.where(closes, b_first // D, 0).to(tl.int32), mask=m_u)
    m_c = m_u & closes
    for j in range(L):
        b_s = b_first + j                             # source position
        committed = b_s < P
        safe = tl.maximum(b_s, 0)
        i_pg = safe // PS
        b_x = tl.load(rt_row + i_pg * PS * s_rt_c,
                      mask=m_c & committed & (i_pg < W) & (i_pg * PS < rt_cols), other=0)
        b_slot = _floor_div(b_x.to(tl.int64), PS).to(tl.int32).to(tl.int64) * PS + safe % PS
        # tail: v's first ancestor whose depth is s - P (node 0 when none, as argmax does)
        hit = is_anc & (b_dep[None, :] == (b_s - P)[:, None])
        i_a = tl.min(tl.where(hit, o_u[None, :], BT), 1)
        i_a = tl.where(i_a >= BT, 0, i_a)
        b_src = tl.where(committed, b_slot, -1 - (row0 + i_a))
        tl.store(prov_idx + (row0 + o_u) * L + j, tl.where(closes, b_src, 0).to(tl.int32),
                 mask=m_u)
    b_vis = tl.where(is_anc & closes[None, :], row0 + o_u[None, :], -1)
    tl.store(prov_vis + (row0 + o_u)[:, None] * T + o_u[None, :], b_vis.to(tl.int32),
             mask=m_u[:, None] & m_u[None, :])

    # -- groups of C consecutive nodes: window start and selection source ---------------------
    o_g = tl.arange(0, BG).to(tl.int64)
    member = ((o_u[None, :] // C) == o_g[:, None]) & m_u[None, :]
    b_min = tl.min(tl.where(member, b_dep[None, :], 1 << 30), 1)
    tl.store(g_winlo + i_b * NG + o_g, tl.maximum(P + b_min - window + 1, 0).to(tl.int32),
             mask=o_g < NG)
    if SHARED:
        # the deepest node of u's group, ties -> the latest: key = depth * (C + 1) + offset
        same = ((o_u[:, None] // C) == (o_u[None, :] // C)) & m_u[None, :]
        key = tl.max(tl.where(same, b_dep[None, :] * (C + 1) + o_u[None, :] % C, -1), 1)
        rep = (o_u // C) * C + key % (C + 1)
        tl.store(sel_src + row0 + o_u, (row0 + rep).to(tl.int32), mask=m_u)


def fill_step_metadata(seq_lens: torch.Tensor, req_to_token: torch.Tensor,
                       pool_idx: torch.Tensor, *, decode: bool, window: int, params: NSAParams,
                       page_size: int, group_size: int, margin: int,
                       prefix: torch.Tensor, parents: torch.Tensor, block_table: torch.Tensor,
                       q_pos: torch.Tensor, q_anc: torch.Tensor, cmp_lens: torch.Tensor,
                       upd_lo: torch.Tensor, prov_idx: torch.Tensor, prov_cidx: torch.Tensor,
                       prov_vis: torch.Tensor, g_winlo: torch.Tensor,
                       sel_src: torch.Tensor | None = None,
                       next_token: torch.Tensor | None = None,
                       next_sibling: torch.Tensor | None = None) -> None:
    """Args:
        seq_lens (torch.Tensor): [>= B] int, SGLang's sequence lengths (the first B are read).
        req_to_token (torch.Tensor): [rows, cols] int32 slot table (SGLang's req_to_token).
        pool_idx (torch.Tensor): [>= B] int32 / int64, each request's row of req_to_token.
        decode (bool): prefix = max(seq - 1, 0) (decode) or seq (verification).
        window (int): sliding window (the groups' window starts).
        params (NSAParams): compression block l and stride d.
        page_size, group_size, margin (int): PS, C (groups of C consecutive nodes), the
            committed positions rewritten first (upd_lo = max(P - margin, 0)).
        next_token, next_sibling (torch.Tensor | None): [raw, T] int EAGLE first-child /
            next-sibling links of requests 0 .. raw - 1 (raw <= B); the other rows are chains.
    Outputs, all written in place (contiguous, on one device):  # mutable
        prefix [B] int32, parents [B, T] int64, block_table [B, W] int32, q_pos [N] int32,
        q_anc [N] int64, cmp_lens [B] int32, upd_lo [B] int32, prov_idx [N, l] int32,
        prov_cidx [N] int32, prov_vis [N, T] int32, g_winlo [B * ceil(T / C)] int32 and, for
        SHARED_INDEX, sel_src [N] int32 (None: not written). N = B * T.
    """
    bs, t = parents.shape
    w = block_table.shape[1]
    n, ng = bs * t, -(-t // group_size)
    if not 1 <= t <= MAX_TREE_NODES:
        raise ValueError(f"fill_step_metadata: {t} nodes per tree; supported 1..{MAX_TREE_NODES}")
    expect = {"prefix": (prefix, (bs,), torch.int32), "parents": (parents, (bs, t), torch.int64),
              "block_table": (block_table, (bs, w), torch.int32),
              "q_pos": (q_pos, (n,), torch.int32), "q_anc": (q_anc, (n,), torch.int64),
              "cmp_lens": (cmp_lens, (bs,), torch.int32), "upd_lo": (upd_lo, (bs,), torch.int32),
              "prov_idx": (prov_idx, (n, params.block), torch.int32),
              "prov_cidx": (prov_cidx, (n,), torch.int32),
              "prov_vis": (prov_vis, (n, t), torch.int32),
              "g_winlo": (g_winlo, (bs * ng,), torch.int32)}
    if sel_src is not None:
        expect["sel_src"] = (sel_src, (n,), torch.int32)
    for name, (x, shape, dtype) in expect.items():
        if tuple(x.shape) != shape or x.dtype != dtype or not x.is_contiguous():
            raise ValueError(f"fill_step_metadata: {name} {tuple(x.shape)} {x.dtype} must be a "
                             f"contiguous {list(shape)} {dtype}")
    if seq_lens.shape[0] < bs or pool_idx.shape[0] < bs:
        raise ValueError(f"fill_step_metadata: seq_lens / pool_idx need >= {bs} entries")
    links = next_token is not None
    if links:
        if next_sibling is None or next_token.shape != next_sibling.shape \
                or next_token.shape[1] != t or next_token.shape[0] > bs:
            raise ValueError(f"fill_step_metadata: links {tuple(next_token.shape)} / "
                             f"{None if next_sibling is None else tuple(next_sibling.shape)} "
                             f"must both be [raw <= {bs}, {t}]")
        raw = next_token.shape[0]
    else:
        next_token = next_sibling = parents          # never read
        raw = 0
    if bs == 0:
        return
    step_metadata_kernel[(bs,)](
        seq_lens, pool_idx, req_to_token, next_token, next_sibling,
        prefix, parents, block_table, q_pos, q_anc, cmp_lens, upd_lo,
        prov_idx, prov_cidx, prov_vis, g_winlo, sel_src if sel_src is not None else prov_cidx,
        req_to_token.stride(0), req_to_token.stride(1), req_to_token.shape[1],
        next_token.stride(0), next_token.stride(1), next_sibling.stride(0),
        next_sibling.stride(1), raw, w, margin, window,
        T=t, BT=pow2(t, 2), L=params.block, D=params.stride, PS=page_size, C=group_size,
        NG=ng, BG=pow2(ng, 2), BW=min(1024, pow2(w, 16)),
        ROUNDS=max(1, math.ceil(math.log2(max(t, 2)))), DECODE=decode, LINKS=links,
        SHARED=sel_src is not None, num_warps=4)
