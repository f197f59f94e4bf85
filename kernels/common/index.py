"""On-device union of a group's selections (EXACT_MERGED) with per-block ownership bitmasks.

Each group of C <= 64 verifier queries (consecutive flat slots) has C sorted, -1 padded lists of
topn blocks per KV head. One program per (group, KV head) builds, fully in parallel (sort +
prefix sum + segmented OR scan), the ascending union once per block with a bitmask of the
queries that own it (bit c: the group's c-th query), so the verify kernel reads
each union block once and masks it to -inf for non-owners (docs/DESIGN.md section 4, overlap-aware grouping).
SHARED_INDEX reuses this with every slot's selection source set to the representative.

Legend: NG groups, HKV KV heads, CP queries per group (padded), NP = topn padded, CAP capacity.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pow2
from .tree import MAX_TREE_NODES


@triton.jit
def _seg_or(fa, xa, fb, xb):
    # segmented OR: a run restarts where the right operand's flag is set
    return fa | fb, tl.where(fb != 0, xb, xa | xb)


@triton.jit
def _merge_group_selections_kernel(SEL, SELSRC, G_START, G_LEN, UIDX, UOWN, UCNT,
                                   HKV: tl.constexpr, TOPN: tl.constexpr, CAP: tl.constexpr,
                                   CP: tl.constexpr, NP: tl.constexpr):
    # Parallel, no serial merge loop: sort keys block*64 + c, mark run starts, number the runs
    # with a prefix sum (= union rank, ascending), OR the owners of each run with a segmented
    # scan and let each run's last element write (block, owners) at its rank.
    i_g, i_h = tl.program_id(0), tl.program_id(1)
    g_len = tl.load(G_LEN + i_g)
    g_start = tl.load(G_START + i_g)
    BIG: tl.constexpr = 2147483647
    o_c = tl.arange(0, CP)
    o_i = tl.arange(0, NP)
    m_c = o_c < g_len
    i_src = tl.load(SELSRC + g_start + o_c, mask=m_c, other=0)
    m = m_c[:, None] & (o_i[None, :] < TOPN)
    b_sel = tl.load(SEL + (i_src[:, None] * HKV + i_h) * TOPN + o_i[None, :], mask=m, other=-1)
    b_key = tl.where(b_sel >= 0, b_sel * 64 + o_c[:, None], BIG)           # [CP, NP]
    b_key = tl.sort(tl.reshape(b_key, [CP * NP]), 0)                       # [CP*NP]
    o_k = tl.arange(0, CP * NP)
    valid = b_key != BIG
    blk = b_key // 64
    prev = tl.gather(blk, tl.maximum(o_k - 1, 0), 0)
    nxt = tl.gather(blk, tl.minimum(o_k + 1, CP * NP - 1), 0)
    first = valid & ((o_k == 0) | (prev != blk))
    last = valid & ((o_k == CP * NP - 1) | (nxt != blk) | (tl.gather(b_key, tl.minimum(o_k + 1, CP * NP - 1), 0) == BIG))
    bit = tl.where(valid, tl.full([CP * NP], 1, tl.int64) << (b_key % 64).to(tl.int64), 0)
    _, own = tl.associative_scan((first.to(tl.int32), bit), 0, _seg_or)
    rank = tl.cumsum(first.to(tl.int32), 0) - 1
    p_out = (i_g * HKV + i_h) * CAP
    tl.store(UIDX + p_out + rank, blk, mask=last)
    tl.store(UOWN + p_out + rank, own, mask=last)
    tl.store(UCNT + i_g * HKV + i_h, tl.sum(first.to(tl.int32), 0))


def merge_group_selections(sel: torch.Tensor, sel_src: torch.Tensor, g_start: torch.Tensor,
                           g_len: torch.Tensor, group_size: int,
                           out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of each group's selections.

    Args:
        sel (torch.Tensor): shape [Nq, HKV, topn] int32, rows sorted ascending, -1 padded.
        sel_src (torch.Tensor): shape [Nq] int32, flat slot -> selection row it uses.
        g_start, g_len (torch.Tensor): shape [NG] int32, the groups' flat slots
            [g_start, g_start + g_len); g_len <= group_size <= 64; g_len 0 = unused slot.
        out: (idx [NG, HKV, CAP] int32, own [NG, HKV, CAP] int64, cnt [NG, HKV] int32) fixed
            buffers (CAP >= group_size * topn)  # mutable
    Returns:
        (idx, own, cnt): idx[g, h, :cnt] ascending union (entries past cnt are stale); own bit c
        set iff the group's c-th query selected that block.

    Example: lists [0, 3, 5] and [0, 4, 5] -> idx [0, 3, 4, 5], own [0b11, 0b01, 0b10, 0b11].
    """
    _nq, hkv, topn = sel.shape
    if not 1 <= group_size <= MAX_TREE_NODES:
        raise ValueError(f"group_size must be in 1..{MAX_TREE_NODES} (int64 ownership masks), "
                         f"got {group_size}")
    ng = g_len.shape[0]
    if out is None:
        cap = group_size * topn
        out = (torch.empty(ng, hkv, cap, dtype=torch.int32, device=sel.device),
               torch.empty(ng, hkv, cap, dtype=torch.int64, device=sel.device),
               torch.empty(ng, hkv, dtype=torch.int32, device=sel.device))
    idx, own, cnt = out
    if idx.shape[-1] < group_size * topn:
        raise ValueError(f"union capacity {idx.shape[-1]} < group_size*topn = {group_size * topn}")
    _merge_group_selections_kernel[(ng, hkv)](
        SEL=sel, SELSRC=sel_src, G_START=g_start, G_LEN=g_len, UIDX=idx, UOWN=own, UCNT=cnt,
        HKV=hkv, TOPN=topn, CAP=idx.shape[-1], CP=pow2(group_size, 2),
        NP=pow2(topn, 2), num_warps=4)
    return idx, own, cnt
