"""Prefill selected attention over the *free* selected blocks, one KV block per program with
the many query rows that selected it (Flash Sparse Attention's loop order).

Why: with one program per query row (attention.py) every row re-reads its 16 blocks with a
G-row Q tile padded to 16 rows; with one program per tile of consecutive rows reading the
tile's union of blocks (the verify kernel's EXACT_MERGED) the MMA work grows with the union,
up to C times the per-row work when adjacent rows select different blocks. Here a program owns
one (request, KV head, block j) and up to CQ (row, slot) entries that selected j: the K/V block
is read once for all of them and every MMA row does useful work, whatever the overlap.

"Free" blocks are the selected blocks that are neither forced initial blocks (j < INIT) nor
forced local ones (j > cur - LOCAL): every row has them, so the tile kernel (tile.py) reads them
with the window instead. In a sorted, -1 padded selection the free blocks sit in slots
[INIT, TOPN - LOCAL) (the INIT initial blocks come first, the local ones last): NF = TOPN - INIT
- LOCAL partial slots per (row, KV head). Union combine: a free block's tokens inside the row's
window belong to the window pass; entries whose block lies wholly inside the window are dropped.

Index (torch, on the device, no host sync): key = (request * Hkv + head) * MAXB + block for
every valid (row, head, free slot) entry, a stable sort, then "items" = runs of one key cut into
pieces of at most CQ entries; item_start[i] = first sorted entry of item i (M for unused slots
of the fixed-size grid).

Output per entry e = (row * Hkv + head) * NF + (slot - SLO): the G heads' normalised partial
o [G, D] and lse [G] (log2 units, the scale of the logits exp2 uses), merged by the tile
kernel into the row's selected (or union) softmax.

Legend (FLA): i_ program ids / scalars, o_ offsets, m_ masks, p_ pointers, b_ on-chip blocks.
Constexprs: HQ / HKV heads, G = HQ // HKV, D head dim (BD tile), LS selection block l' (BT
token tile, NT = ceil(l' / BT) tiles), W window, PS page size, NF partial slots, CQ entries per item (R = pow2(CQ * G) >= 16 MMA rows), GATED combine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.launch import pow2
from ..common.params import NSAParams
from ..common.runs import run_starts
from ..common.tl_math import LOG2E
from ..common.tl_math import dot_f32 as _dot
from ..common.tl_math import online_step as _online


@triton.jit(do_not_specialize=["stride_bt", "M", "MAXB"])
def prefill_sparse_kernel(
    q, k_cache, v_cache, block_table, q_pos, skey, sidx, item_start, part_o, part_lse,
    qk_scale, stride_bt, M, MAXB,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    LS: tl.constexpr, BT: tl.constexpr, NT: tl.constexpr, W: tl.constexpr, PS: tl.constexpr,
    NF: tl.constexpr, CQ: tl.constexpr, R: tl.constexpr,
    GATED: tl.constexpr, F32: tl.constexpr,
):
    i_it = tl.program_id(0)
    i_st = tl.load(item_start + i_it)
    if i_st >= M:
        return
    key0 = tl.load(skey + i_st).to(tl.int64)
    i_blk = key0 % MAXB
    i_h = (key0 // MAXB) % HKV
    i_req = key0 // (MAXB * HKV)
    # ---- rows: r = c * G + gg, entry c of the item, head gg of the KV group ----------------
    o_r = tl.arange(0, R)
    o_c = o_r // G
    gg = o_r % G
    o_e = i_st + o_c
    m_r = (o_c < CQ) & (o_e < M)
    m_r = m_r & (tl.load(skey + o_e, mask=m_r, other=-1).to(tl.int64) == key0)
    b_ent = tl.load(sidx + o_e, mask=m_r, other=0).to(tl.int64)                  # [R] entry
    i_q = b_ent // (HKV * NF)                                                     # [R] row
    t_r = tl.load(q_pos + i_q, mask=m_r, other=0)                                 # [R]
    t_max = tl.max(tl.where(m_r, t_r, 0), 0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_hq = i_q * HQ + i_h * G + gg                                                # [R]
    b_q = tl.load(q + o_hq[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.)
    p_bt = block_table + i_req * stride_bt
    b_m = tl.full([R], float("-inf"), tl.float32)
    b_l = tl.zeros([R], tl.float32)
    b_acc = tl.zeros([R, BD], tl.float32)
    o_t = tl.arange(0, BT)
    for i_t in tl.static_range(NT):
        o_pos = i_blk * LS + i_t * BT + o_t                                       # [BT]
        m_t = (i_t * BT + o_t < LS) & (o_pos <= t_max)
        b_pg = tl.load(p_bt + o_pos // PS, mask=m_t, other=0).to(tl.int64)
        o_kv = ((b_pg * PS + o_pos % PS) * HKV + i_h) * D                         # [BT]
        m_kv = m_t[:, None] & m_d[None, :]
        b_k = tl.load(k_cache + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.)
        b_v = tl.load(v_cache + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.)
        b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale                            # [R, BT]
        m_s = m_r[:, None] & m_t[None, :] & (o_pos[None, :] <= t_r[:, None])
        if not GATED:      # union: tokens inside the row's window belong to the window pass
            m_s = m_s & (o_pos[None, :] < t_r[:, None] - W + 1)
        b_m, b_l, b_acc = _online(b_m, b_l, b_acc, b_s, m_s, b_v, F32)
    m_any = b_l > 0
    b_o = b_acc / tl.where(m_any, b_l, 1.)[:, None]
    b_lse = tl.where(m_any, b_m + tl.log2(tl.where(m_any, b_l, 1.)), float("-inf"))
    o_w = b_ent * G + gg                                                          # [R]
    tl.store(part_o + o_w[:, None] * D + o_d[None, :], b_o.to(part_o.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])
    tl.store(part_lse + o_w, b_lse, mask=m_r)


# ------------------------------------------------------------------ host side -------------
def free_slots(params: NSAParams) -> tuple[int, int]:
    """(SLO, NF): the sorted-selection slots [SLO, SLO + NF) that can hold free blocks."""
    nf = params.topn - params.init_blocks - params.local_blocks
    if nf <= 0:
        return 0, 0
    return params.init_blocks, nf


def sparse_items(sel: torch.Tensor, q_req: torch.Tensor, q_pos: torch.Tensor, params: NSAParams,
                 num_req: int, maxb: int, cq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The inverted index of the free selected blocks of rows sel [N, Hkv, topn].

    Returns (skey [M] sorted keys, sidx [M] entry ids in key order, item_start [NI] int32, M).
    Entry e = (row * Hkv + head) * NF + f holds slot SLO + f; invalid entries sort last (the
    key dtype's max: int32 where every key fits) and start no item. NI = ceil(M / cq) + min(M, Hkv * num_req * maxb) bounds the items
    (each key's run is cut into ceil(run / cq) pieces); unused item slots hold M.
    """
    n, hkv, _ = sel.shape
    slo, nf = free_slots(params)
    dev = sel.device
    s = sel[:, :, slo:slo + nf].to(torch.int64)                                   # [N, Hkv, NF]
    t = q_pos.to(torch.int64).view(n, 1, 1)
    valid = (s >= params.init_blocks) & (s <= t // params.select - params.local_blocks)
    if not params.gated:
        valid &= s * params.select < t - params.window + 1
    head = torch.arange(hkv, device=dev, dtype=torch.int64).view(1, hkv, 1)
    # 32-bit keys where they fit: the radix sort then makes half the passes
    kdt = torch.int32 if num_req * hkv * maxb < (1 << 31) - 1 else torch.int64
    big = torch.iinfo(kdt).max
    key = torch.where(valid, (q_req.to(torch.int64).view(n, 1, 1) * hkv + head) * maxb + s, big)
    key = key.to(kdt)
    skey, sidx = torch.sort(key.reshape(-1), stable=True)
    m = skey.shape[0]
    i = torch.arange(m, device=dev, dtype=torch.int64)
    brk = torch.ones(m, dtype=torch.bool, device=dev)
    brk[1:] = skey[1:] != skey[:-1]
    run0 = run_starts(brk)
    is_start = ((i - run0) % cq == 0) & (skey != big)
    item = torch.cumsum(is_start.to(torch.int32), 0) - 1
    ni = -(-m // cq) + min(m, hkv * num_req * maxb)
    item_start = torch.full((ni + 1,), m, dtype=torch.int32, device=dev)
    item_start.scatter_(0, torch.where(is_start, item, ni).to(torch.int64), i.to(torch.int32))
    return skey, sidx, item_start[:ni], m


def prefill_sparse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, q_pos: torch.Tensor, index, params: NSAParams,
                   scale: float, part_o: torch.Tensor, part_lse: torch.Tensor, cq: int,
                   num_warps: int | None = None, num_stages: int = 2) -> None:
    """Partial (o, lse) of every valid free entry of `index` (from `sparse_items`, same cq)."""
    skey, sidx, item_start, m = index
    _nq, hq, dim = q.shape
    _, ps, hkv, _ = k_cache.shape
    g = hq // hkv
    _, nf = free_slots(params)
    if m == 0 or item_start.shape[0] == 0:
        return
    bt = min(64, triton.next_power_of_2(params.select))
    maxb = _maxb(block_table, ps, params)
    r = pow2(cq * g, 16)
    bd = pow2(dim, 16)
    if num_warps is None:   # sm_90 ptxas: R=128 x D=128 takes 226 registers at 4 warps, 143 at 8
        num_warps = 8 if r * bd >= 128 * 128 else 4
    prefill_sparse_kernel[(item_start.shape[0],)](
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, q_pos=q_pos,
        skey=skey, sidx=sidx, item_start=item_start, part_o=part_o, part_lse=part_lse,
        qk_scale=float(scale) * LOG2E.value, stride_bt=block_table.stride(0), M=m,
        HQ=hq, HKV=hkv, G=g, D=dim, BD=bd, LS=params.select, BT=bt, NT=-(-params.select // bt),
        W=params.window, PS=ps, NF=nf, MAXB=maxb, CQ=cq, R=r, GATED=params.gated,
        F32=q.dtype == torch.float32 or q.device.type == "cpu",
        num_warps=num_warps, num_stages=num_stages)


def _maxb(block_table: torch.Tensor, page_size: int, params: NSAParams) -> int:
    """Selection blocks a block-table row can address (the key's block stride)."""
    return max(1, -(-block_table.shape[1] * page_size // params.select))
