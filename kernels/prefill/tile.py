"""Prefill tile kernel: forced selected blocks + sliding window + the free blocks' partials +
the NSA combine, for a tile of consecutive query rows of one request.

A program owns CT consecutive rows of one request x the G heads of one KV head (an [R, D] Q
tile, rows r = c * G + gg, R = pow2(CT * G) >= 16) and walks, with per-row masks:
  1. the forced initial blocks [0, INIT * l'),
  2. the forced local blocks of the tile's rows (row t: blocks cur(t) - LOCAL + 1 .. cur(t)),
  3. the window band [t_min - w + 1, t_max] (row t: max(0, t - w + 1) .. t),
  4. the partials (o, lse) of the row's free selected blocks, written by sparse.py, merged
     into the same online softmax (selected branch when gated).
Union combine: one softmax; tokens inside the row's window are taken only by pass 3, so every
token of selected U window enters once (passes 1-2 and the free partials mask them). Gated:
o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (o_cmp from the refresh kernel).
Adjacent rows share the window and the forced blocks, so the tile reads them once (about
(w + CT) tokens per tile instead of w per row).

Legend (FLA): i_ program ids / scalars, o_ offsets, m_ masks, p_ pointers, b_ on-chip blocks.
Constexprs: HQ / HKV heads, G = HQ // HKV, D head dim (BD tile), R rows, LS selection block l',
W window, PS page size, TOPN n, INIT / LOCAL forced blocks, SLO / NF free slots (sparse.py),
BN token tile, GATED combine, HAS_PART free partials present.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.launch import pow2
from ..common.merge import gated_combine
from ..common.params import NSAParams
from ..common.tl_math import LOG2E, load_rows, merge_state
from ..common.tl_math import dot_f32 as _dot
from ..common.tl_math import online_step as _online


@triton.jit
def _kv(k_cache, v_cache, p_bt, o_pos, m_t, i_h, o_d, m_d,
        HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr):
    b_pg = tl.load(p_bt + o_pos // PS, mask=m_t, other=0).to(tl.int64)
    o_kv = ((b_pg * PS + o_pos % PS) * HKV + i_h) * D                             # [BN]
    m_kv = m_t[:, None] & m_d[None, :]
    b_k = tl.load(k_cache + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.)
    b_v = tl.load(v_cache + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.)
    return b_k, b_v


# which token band `_band` walks: its extra per-row mask
INIT_BLOCKS = tl.constexpr(0)
LOCAL_BLOCKS = tl.constexpr(1)
WINDOW = tl.constexpr(2)


@triton.jit
def _band(b_m, b_l, b_acc, b_q, k_cache, v_cache, p_bt, lo, hi, t_r, cur_r, m_r, i_h, o_d, m_d,
          qk_scale, HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, LS: tl.constexpr,
          W: tl.constexpr, LOCAL: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
          GATED: tl.constexpr, F32: tl.constexpr):
    # one online-softmax walk over positions [lo, hi) shared by the tile's rows; row t keeps
    # positions <= t of its own forced local blocks (LOCAL_BLOCKS) or window (WINDOW); union
    # combine: the forced passes leave row t's window to the window pass (each token once)
    o_n = tl.arange(0, BN)
    for p0 in range(lo, hi, BN):
        o_pos = p0 + o_n
        m_t = o_pos < hi
        b_k, b_v = _kv(k_cache, v_cache, p_bt, o_pos, m_t, i_h, o_d, m_d, HKV, D, PS)
        b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale                            # [R, BN]
        m_s = m_r[:, None] & m_t[None, :] & (o_pos[None, :] <= t_r[:, None])
        if KIND == LOCAL_BLOCKS:
            m_s = m_s & (o_pos[None, :] // LS > cur_r[:, None] - LOCAL)
        if KIND == WINDOW:
            m_s = m_s & (o_pos[None, :] >= t_r[:, None] - W + 1)
        elif not GATED:
            m_s = m_s & (o_pos[None, :] < t_r[:, None] - W + 1)
        b_m, b_l, b_acc = _online(b_m, b_l, b_acc, b_s, m_s, b_v, F32)
    return b_m, b_l, b_acc


@triton.jit
def _free_partials(b_m, b_l, b_acc, sel, part_o, part_lse, i_q, gg, t_r, cur_r, m_r, i_h, o_d,
                   m_d, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, LS: tl.constexpr,
                   W: tl.constexpr, TOPN: tl.constexpr, INIT: tl.constexpr,
                   LOCAL: tl.constexpr, SLO: tl.constexpr, NF: tl.constexpr,
                   GATED: tl.constexpr):
    # the (o, lse) partials sparse.py wrote for the rows' free selected blocks, merged into the
    # same softmax; forced blocks (and, union, blocks starting in the window) are skipped
    for f in range(NF):
        b_blk = tl.load(sel + (i_q * HKV + i_h) * TOPN + SLO + f, mask=m_r, other=-1)
        m_p = m_r & (b_blk >= INIT) & (b_blk <= cur_r - LOCAL)
        if not GATED:
            m_p = m_p & (b_blk * LS < t_r - W + 1)
        o_e = ((i_q * HKV + i_h) * NF + f) * G + gg                                # [R]
        b_pl = tl.load(part_lse + o_e, mask=m_p, other=float("-inf"))
        b_po = tl.load(part_o + o_e[:, None] * D + o_d[None, :], mask=m_p[:, None] & m_d[None, :],
                       other=0.).to(tl.float32)
        b_m, b_l, b_acc = merge_state(b_m, b_l, b_acc, b_pl, b_po)
    return b_m, b_l, b_acc


@triton.jit(do_not_specialize=["stride_bt"])
def prefill_tile_kernel(
    q, k_cache, v_cache, block_table, q_req, q_pos, g_start_p, g_len_p, sel, part_o, part_lse,
    o_cmp, gates, out, qk_scale, stride_bt,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    R: tl.constexpr, LS: tl.constexpr, W: tl.constexpr, PS: tl.constexpr, TOPN: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, SLO: tl.constexpr, NF: tl.constexpr,
    BN: tl.constexpr, GATED: tl.constexpr, HAS_PART: tl.constexpr, F32: tl.constexpr,
):
    i_g, i_h = tl.program_id(0), tl.program_id(1)
    g_len = tl.load(g_len_p + i_g)
    if g_len == 0:
        return
    g_start = tl.load(g_start_p + i_g).to(tl.int64)
    o_r = tl.arange(0, R)
    o_c = o_r // G
    gg = o_r % G
    m_r = o_c < g_len
    i_q = g_start + tl.where(m_r, o_c, 0)                                         # [R] row
    i_req = tl.load(q_req + g_start).to(tl.int64)
    t_r = tl.load(q_pos + i_q, mask=m_r, other=0)                                 # [R]
    t_max = tl.max(tl.where(m_r, t_r, 0), 0)
    t_min = tl.min(tl.where(m_r, t_r, 2147483647), 0)
    cur_r = t_r // LS
    o_hq = i_q * HQ + i_h * G + gg                                                # [R]
    b_q, o_d, m_d = load_rows(q, o_hq, m_r, D, BD)
    m_qd = m_r[:, None] & m_d[None, :]
    p_bt = block_table + i_req * stride_bt
    b_m = tl.full([R], float("-inf"), tl.float32)      # union, or gated selected branch
    b_l = tl.zeros([R], tl.float32)
    b_acc = tl.zeros([R, BD], tl.float32)
    w_m = tl.full([R], float("-inf"), tl.float32)      # gated window branch
    w_l = tl.zeros([R], tl.float32)
    w_acc = tl.zeros([R, BD], tl.float32)
    # ---- 1. forced initial blocks --------------------------------------------------------
    hi = tl.minimum(INIT * LS, t_max + 1)
    if not GATED:
        hi = tl.minimum(hi, t_max - W + 1)
    b_m, b_l, b_acc = _band(b_m, b_l, b_acc, b_q, k_cache, v_cache, p_bt, 0, hi, t_r, cur_r, m_r,
                            i_h, o_d, m_d, qk_scale, HKV, D, PS, LS, W, LOCAL, BN, INIT_BLOCKS,
                            GATED, F32)
    # ---- 2. forced local blocks (positions from block max(INIT, cur_min - LOCAL + 1)) ------
    lo = tl.maximum(INIT, t_min // LS - LOCAL + 1) * LS
    hi = tl.minimum((t_max // LS + 1) * LS, t_max + 1)
    if not GATED:
        hi = tl.minimum(hi, t_max - W + 1)
    b_m, b_l, b_acc = _band(b_m, b_l, b_acc, b_q, k_cache, v_cache, p_bt, lo, hi, t_r, cur_r, m_r,
                            i_h, o_d, m_d, qk_scale, HKV, D, PS, LS, W, LOCAL, BN, LOCAL_BLOCKS,
                            GATED, F32)
    # ---- 3. window band ------------------------------------------------------------------
    lo = tl.maximum(t_min - W + 1, 0)
    if GATED:
        w_m, w_l, w_acc = _band(w_m, w_l, w_acc, b_q, k_cache, v_cache, p_bt, lo, t_max + 1, t_r,
                                cur_r, m_r, i_h, o_d, m_d, qk_scale, HKV, D, PS, LS, W, LOCAL, BN,
                                WINDOW, GATED, F32)
    else:
        b_m, b_l, b_acc = _band(b_m, b_l, b_acc, b_q, k_cache, v_cache, p_bt, lo, t_max + 1, t_r,
                                cur_r, m_r, i_h, o_d, m_d, qk_scale, HKV, D, PS, LS, W, LOCAL, BN,
                                WINDOW, GATED, F32)
    # ---- 4. free selected blocks: merge the partials of sparse.py ------------------------
    if HAS_PART:
        b_m, b_l, b_acc = _free_partials(b_m, b_l, b_acc, sel, part_o, part_lse, i_q, gg, t_r,
                                         cur_r, m_r, i_h, o_d, m_d, HKV, G, D, LS, W, TOPN, INIT,
                                         LOCAL, SLO, NF, GATED)
    # ---- epilogue ------------------------------------------------------------------------
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]
    if GATED:
        b_ow = w_acc / tl.where(w_l > 0, w_l, 1.)[:, None]
        b_o = gated_combine(gates, o_cmp, o_hq, m_r, o_d, m_qd, b_o, b_ow, D)
    tl.store(out + o_hq[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_qd)


def prefill_tile(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, q_req: torch.Tensor, q_pos: torch.Tensor,
                 tiles: tuple[torch.Tensor, torch.Tensor], sel: torch.Tensor, params: NSAParams,
                 scale: float, out: torch.Tensor, ct: int, part_o: torch.Tensor | None = None,
                 part_lse: torch.Tensor | None = None, o_cmp: torch.Tensor | None = None,
                 gates: torch.Tensor | None = None, slots: tuple[int, int] = (0, 0),
                 num_warps: int | None = None, num_stages: int = 2, block_n: int = 64) -> None:
    """Launch the tile kernel over tiles = (g_start [NG], g_len [NG]) of at most ct rows."""
    g_start, g_len = tiles
    _nq, hq, dim = q.shape
    _, ps, hkv, _ = k_cache.shape
    g = hq // hkv
    r = pow2(ct * g, 16)
    bd = pow2(dim, 16)
    slo, nf = slots
    has_part = part_o is not None and nf > 0
    if num_warps is None:
        num_warps = 8 if r * bd >= 128 * 128 or (params.gated and r * bd >= 64 * 128) else 4
    prefill_tile_kernel[(g_len.shape[0], hkv)](
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, q_req=q_req,
        q_pos=q_pos, g_start_p=g_start, g_len_p=g_len, sel=sel,
        part_o=part_o if has_part else q, part_lse=part_lse if has_part else q,
        o_cmp=o_cmp if params.gated else q, gates=gates if params.gated else q, out=out,
        qk_scale=float(scale) * LOG2E.value, stride_bt=block_table.stride(0),
        HQ=hq, HKV=hkv, G=g, D=dim, BD=bd, R=r, LS=params.select, W=params.window, PS=ps,
        TOPN=params.topn, INIT=params.init_blocks, LOCAL=params.local_blocks, SLO=slo,
        NF=max(nf, 1), BN=block_n, GATED=params.gated, HAS_PART=has_part,
        F32=q.dtype == torch.float32 or q.device.type == "cpu",
        num_warps=num_warps, num_stages=num_stages)
