"""Grouped, split refresh kernel: compressed attention + Eq. 9 block scores + GQA group sum +
forced blocks + top-n for a group of C query rows at once (same result as `score_topk`).

Why: `score_topk` runs one program per (query row, KV head) and walks the compressed tokens twice
serially, so every verifier query re-reads all compressed keys (the bulk of NSA's bytes at long
context: INDEPENDENT's cost) and batch-1 decode runs only Hkv programs. Here a program owns a
group of C rows (verifier queries of one request, or one decode row) x G heads of one KV head
(a [RR = CP*GP, D] Q tile, GP = pow2(G), >= 16 rows for the MMA) and one split of the selection
blocks, so each compressed-key tile is loaded once for all C*G rows and the splits fill the GPU.

Legend (FLA): i_ program ids / scalars, o_ offset vectors, m_ masks, p_ pointers, b_ on-chip
blocks. Constexprs: HQ / HKV heads, G = HQ // HKV (GP its power of two), CP queries per program
tile (RR = CP*GP rows), D head dim (BD), L block l, DS stride d, LS selection block l', R = l'/d
compressed tokens starting per selection block (RP its power of two), K = l/d selection strips a
token spans (K <= R, so a token touches its own block and at most the next), PS page size, CPP
compressed tokens per page, TOPN n, BS = BN selection blocks per tile = running-list length
(power of two >= max(16, n)), TB = BS*RP token tile, MP provisional tokens visible per row
(MPP padded so NPS = CP*MPP >= 16 slots), NSPLIT splits.

Schedule (per group g, KV head h, split s of the group's candidate blocks [0, nblk)):
  split s covers blocks [s*CH, (s+1)*CH), CH = BS * ceil(nblk / (NSPLIT*BS)), and the committed
  compressed tokens *starting* in them (tokens [s*CH*R, (s+1)*CH*R)).
  pass 1: per row, max and sum of exp over the split's tokens (+ the row's provisional tokens in
          split 0): partials (m, l), log2 units.
  pass 2: merge the NSPLIT partials -> global lse per row; walk the split's blocks BS at a time:
          p = exp2(s - lse) [RR, TB], o_cmp += p @ V, Eq. 9 block scores + G-head sum -> [CP, BS]
          (own weight min(K, R-m), spill max(0, m+K-R) into the next block; the spill into the
          split's first block comes from a small carry tile; on tensor cores, see
          grouped_tiles.py), provisional tokens' share where they land, forced blocks -> +inf,
          then merge into a running top-BN list per query of packed keys (float bits << 24 |
          (2^24-1-j): higher score first, ties -> lower block index), see grouped_tiles.py.
  merge:  by the split of (g, h) that finishes pass 2 last (an atomic counter per (g, h); no
          merge launch): global top-n of the NSPLIT lists (a superset: every split keeps its
          own top-n), sorted ascending, -1 padded; o_cmp = sum of the split partials (each
          already normalised by the global lse, so no rescaling).
NSPLIT == 1 runs both passes and the final pick in one program (one launch); NSPLIT > 1 is
two launches (pass 1, pass 2 + merge). NSPLIT is a
runtime int (only NSP, its power-of-two tile, is a constexpr): it follows the context length and
the group count, and a constexpr would compile a new kernel mid-serving for each value (measured:
0.4-2.9 s per compile on an H100 for the 8B shape).
Exactness: overlap weights are exact small integers, so fp32 scores equal the reference's up to
summation order; selections equal it except between scores within fp32 rounding of each other.
Rows of a group must belong to one request (the committed compressed tokens are shared).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..common.launch import num_sms, pow2, split_counters
from ..common.params import NSAParams
from ..common.tl_math import LN2, LOG2E, NEG_BIG, load_rows
from ..common.tl_math import dot_f32 as _dot
from ..common.tree import MAX_TREE_NODES
from .args import RefreshArgs, check_refresh_args, prov_pointers, refresh_outputs
from .grouped_tiles import (
    MERGE_BITONIC,
    MERGE_RANK,
    _group,
    _pick,
    _prov_probs,
    _prov_tile,
    _scores,
    _split_range,
    _stats,
)


@triton.jit
def _group_q(q, block_table, order, g_start_p, g_len_p, q_req, q_pos, cmp_lens, scale, stride_bt,
             i_g, i_h, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr,
             D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, DS: tl.constexpr,
             LS: tl.constexpr):
    # the group's rows (see _group) and its [RR, BD] Q tile; the Q load is masked by the rows,
    # so an unused slot (g_len 0: the kernel returns next) reads nothing
    g_len, m_r, i_qr, gg, n_cr, i_qq, m_q, cur_q, i_req = _group(
        i_g, order, g_start_p, g_len_p, q_req, q_pos, cmp_lens, G, GP, CP, L, DS, LS)
    o_hq = i_qr * HQ + i_h * G + gg                                                # [RR]
    b_q, o_d, m_d = load_rows(q, o_hq, m_r, D, BD)
    p_bt = block_table + i_req * stride_bt
    return g_len, m_r, n_cr, i_qq, m_q, cur_q, scale * LOG2E, p_bt, o_hq, b_q, o_d, m_d


@triton.jit
def _prov_stats(b_q, prov_k, prov_cidx, prov_vis, order, g_start_p, i_g, g_len, m_r, i_h, o_d,
                m_d, qk_scale, b_m, b_l, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                CP: tl.constexpr, MP: tl.constexpr, MPP: tl.constexpr, DS: tl.constexpr,
                F32: tl.constexpr):
    # fold the group's provisional tokens into the rows' (max, sum exp2); their masked logits
    # and slots come back so that the fused kernel's pass 2 need not recompute them
    b_sp, m_rp, b_prow, b_pst = _prov_tile(b_q, prov_k, prov_cidx, prov_vis, order, g_start_p,
                                           i_g, g_len, m_r, i_h, o_d, m_d, qk_scale, HKV, D,
                                           GP, CP, MP, MPP, DS, F32)
    b_sp = tl.where(m_rp, b_sp, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_sp, 1))
    b_l = b_l * tl.exp2(b_m - b_mn) + tl.sum(tl.exp2(b_sp - b_mn[:, None]), 1)
    return b_mn, b_l, b_sp, m_rp, b_prow, b_pst


@triton.jit
def _lse2(b_m, b_l):
    # (row has a token, log2-sum-exp2); 0 where it has none, so exp2(s - lse) stays finite
    m_any = b_l > 0
    return m_any, tl.where(m_any, b_m + tl.log2(tl.where(m_any, b_l, 1.)), 0.)


@triton.jit
def _prov_out(b_acc, b_p, prov_v, b_prow, b_pst, i_h, o_d, m_d, HKV: tl.constexpr,
              D: tl.constexpr, F32: tl.constexpr):
    # o_cmp share of the provisional tokens: probabilities b_p [RR, NPS] times their values
    b_pv = tl.load(prov_v + (b_prow * HKV + i_h)[:, None] * D + o_d[None, :],
                   mask=(b_pst >= 0)[:, None] & m_d[None, :], other=0.)
    return b_acc + _dot(b_p.to(b_pv.dtype), b_pv, F32)


@triton.jit(do_not_specialize=["stride_bt", "NQ", "NSPLIT"])
def score_topk_grouped_stats_kernel(
    q, ck_cache, block_table, q_req, q_pos, cmp_lens, order, g_start_p, g_len_p,
    prov_k, prov_cidx, prov_vis, m_part, l_part, scale, stride_bt, NQ,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr,
    R: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr, TB: tl.constexpr,
    MP: tl.constexpr, MPP: tl.constexpr, NSPLIT, BS: tl.constexpr,
    HAS_PROV: tl.constexpr, F32: tl.constexpr, TS: tl.constexpr,
):
    # pass 1 of split i_s: (max, sum exp2) partials of every row over the split's tokens
    i_g, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g_len, m_r, n_cr, _qq, m_q, cur_q, qk_scale, p_bt, o_hq, b_q, o_d, m_d = _group_q(
        q, block_table, order, g_start_p, g_len_p, q_req, q_pos, cmp_lens, scale, stride_bt,
        i_g, i_h, HQ, G, GP, CP, D, BD, L, DS, LS)
    if g_len == 0:
        return
    jlo, jhi = _split_range(tl.max(tl.where(m_q, cur_q + 1, 0), 0), i_s, NSPLIT, BS)
    b_m = tl.full([CP * GP], NEG_BIG, tl.float32)
    b_l = tl.zeros([CP * GP], tl.float32)
    b_m, b_l = _stats(b_q, ck_cache, p_bt, i_h, o_d, m_d, n_cr, jlo * R,
                      tl.minimum(jhi * R, tl.max(n_cr, 0)), qk_scale, b_m, b_l,
                      HKV, D, PS, CPP, L, DS, TS, F32)
    if HAS_PROV:  # noqa: SIM102 (constexpr, dropped at compile time; i_s is run-time)
        if i_s == 0:
            # fresh names: a name bound before this run-time `if` (like `_`) must keep its type
            # inside it, which the compiler checks and the interpreter does not
            b_m, b_l, _sp, _rp, _prow, _pst = _prov_stats(
                b_q, prov_k, prov_cidx, prov_vis, order, g_start_p, i_g, g_len, m_r, i_h, o_d,
                m_d, qk_scale, b_m, b_l, HKV, D, GP, CP, MP, MPP, DS, F32)
    o_w = i_s * NQ * HQ + o_hq
    tl.store(m_part + o_w, b_m, mask=m_r)
    tl.store(l_part + o_w, b_l, mask=m_r)


@triton.jit
def _split_lse(m_part, l_part, o_hq, m_r, NQ, HQ: tl.constexpr, NSPLIT,
               NSP: tl.constexpr):
    # merge pass 1's NSPLIT (max, sum exp2) partials of every row -> (row has a token, lse)
    o_sp = tl.arange(0, NSP)
    m_w = m_r[:, None] & (o_sp[None, :] < NSPLIT)
    o_w = o_sp[None, :] * NQ * HQ + o_hq[:, None]                                  # [RR, NSP]
    b_ms = tl.load(m_part + o_w, mask=m_w, other=NEG_BIG)
    b_ls = tl.load(l_part + o_w, mask=m_w, other=0.)
    b_m = tl.max(b_ms, 1)
    return _lse2(b_m, tl.sum(b_ls * tl.exp2(b_ms - b_m[:, None]), 1))


@triton.jit(do_not_specialize=["stride_bt", "NQ", "NSPLIT"])
def score_topk_grouped_scores_kernel(
    q, ck_cache, cv_cache, block_table, q_req, q_pos, cmp_lens, order, g_start_p, g_len_p,
    prov_k, prov_v, prov_cidx, prov_vis, m_part, l_part, cand, sel, o_part, lse, o_cmp, done,
    scale, stride_bt, NQ,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr,
    R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
    TOPN: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, MP: tl.constexpr, MPP: tl.constexpr, NSPLIT,
    NSP: tl.constexpr, HAS_PROV: tl.constexpr, WITH_OUT: tl.constexpr, F32: tl.constexpr,
    MERGE: tl.constexpr, TS: tl.constexpr, FUSED: tl.constexpr,
):
    # pass 2 of split i_s: global lse from pass 1's partials, then the split's block scores ->
    # its top-BS candidate keys per query (cand); o_cmp partial (o_part, already globally
    # normalised). FUSED (NSPLIT == 1, one launch): pass 1 runs here instead, the final pick
    # goes straight to sel and o_part is o_cmp itself. One kernel for both modes: they differ
    # only in where the lse comes from and where the result goes.
    i_g, i_h = tl.program_id(0), tl.program_id(1)
    g_len, m_r, n_cr, i_qq, m_q, cur_q, qk_scale, p_bt, o_hq, b_q, o_d, m_d = _group_q(
        q, block_table, order, g_start_p, g_len_p, q_req, q_pos, cmp_lens, scale, stride_bt,
        i_g, i_h, HQ, G, GP, CP, D, BD, L, DS, LS)
    if g_len == 0:
        return
    b_pst = tl.full([CP * MPP], -1, tl.int32)
    if FUSED:
        i_s: tl.constexpr = 0   # the only split, known at compile time: no split branches
        b_m = tl.full([CP * GP], NEG_BIG, tl.float32)
        b_l = tl.zeros([CP * GP], tl.float32)
        b_m, b_l = _stats(b_q, ck_cache, p_bt, i_h, o_d, m_d, n_cr, 0, tl.max(n_cr, 0), qk_scale,
                          b_m, b_l, HKV, D, PS, CPP, L, DS, TS, F32)
        if HAS_PROV:
            b_m, b_l, b_sp, m_rp, b_prow, b_pst = _prov_stats(
                b_q, prov_k, prov_cidx, prov_vis, order, g_start_p, i_g, g_len, m_r, i_h, o_d,
                m_d, qk_scale, b_m, b_l, HKV, D, GP, CP, MP, MPP, DS, F32)
        m_any, b_lse = _lse2(b_m, b_l)                                             # [RR] log2
    else:
        i_s = tl.program_id(2)
        m_any, b_lse = _split_lse(m_part, l_part, o_hq, m_r, NQ, HQ, NSPLIT, NSP)
        if HAS_PROV:
            b_sp, m_rp, b_prow, b_pst = _prov_tile(
                b_q, prov_k, prov_cidx, prov_vis, order, g_start_p, i_g, g_len, m_r, i_h, o_d,
                m_d, qk_scale, HKV, D, GP, CP, MP, MPP, DS, F32)
    b_acc = tl.zeros([CP * GP, BD], tl.float32)
    b_pp = tl.zeros([CP * MPP], tl.float32)
    if HAS_PROV:
        b_p = _prov_probs(b_sp, m_rp, b_lse)
        b_pp = tl.sum(b_p, 0)
        if WITH_OUT:  # noqa: SIM102 (constexpr, dropped at compile time; i_s is run-time)
            if i_s == 0:
                b_acc = _prov_out(b_acc, b_p, prov_v, b_prow, b_pst, i_h, o_d, m_d, HKV, D, F32)
    nblk = tl.max(tl.where(m_q, cur_q + 1, 0), 0)
    if FUSED:
        jlo: tl.constexpr = 0
        jhi = nblk
    else:
        jlo, jhi = _split_range(nblk, i_s, NSPLIT, BS)
    b_run, b_acc = _scores(b_q, ck_cache, cv_cache, p_bt, i_h, o_d, m_d, n_cr, cur_q, m_q, b_lse,
                           jlo, jhi, qk_scale, b_pp, b_pst, b_acc, HKV, D, PS, CPP, L, DS, LS, R,
                           RP, K, CP, GP, BS, TB, TOPN, INIT, LOCAL, MPP, HAS_PROV, WITH_OUT, F32, MERGE)
    o_n = tl.arange(0, BS)
    if FUSED:
        b_i = _pick(b_run, o_n, TOPN)
        tl.store(sel + (i_qq[:, None] * HKV + i_h) * TOPN + o_n[None, :],
                 b_i.to(sel.dtype.element_ty), mask=m_q[:, None] & (o_n[None, :] < TOPN))
    else:
        tl.store(cand + ((i_s * NQ + i_qq[:, None]) * HKV + i_h) * BS + o_n[None, :], b_run,
                 mask=m_q[:, None])
    if WITH_OUT:
        tl.store(o_part + (i_s * NQ * HQ + o_hq)[:, None] * D + o_d[None, :],
                 b_acc.to(o_part.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
        if i_s == 0:
            tl.store(lse + o_hq, tl.where(m_any, b_lse * LN2, float("-inf")), mask=m_r)
    if not FUSED:
        # the split that finishes last merges the group's lists / partials, so a split refresh
        # needs no merge launch: barrier + release order every thread's stores before the
        # counter, the acquire orders the last split's loads after it (split-K "fixup"); the
        # counter is reset for the next launch
        tl.debug_barrier()
        p_done = done + i_g * HKV + i_h
        n_done = tl.atomic_add(p_done, 1, sem="acq_rel", scope="gpu")
        if n_done == NSPLIT - 1:
            g_start = tl.load(g_start_p + i_g)
            for c in range(g_len):
                i_q = tl.load(order + g_start + c).to(tl.int64)
                _merge_row(cand, o_part, sel, o_cmp, i_q, i_h, NQ, HQ, HKV, G, GP, D, BD, TOPN,
                           BS, NSPLIT, NSP, WITH_OUT)
            tl.atomic_xchg(p_done, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_row(cand, o_part, sel, o_cmp, i_q, i_h, NQ, HQ: tl.constexpr, HKV: tl.constexpr,
               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               TOPN: tl.constexpr, BS: tl.constexpr, NSPLIT, NSP: tl.constexpr,
               WITH_OUT: tl.constexpr):
    # global top-n of one (query, KV head) from the splits' lists; o_cmp = sum of partials.
    # ".cg" loads skip L1: other SMs wrote the lists during this launch
    o_sp = tl.arange(0, NSP)
    o_n = tl.arange(0, BS)
    m_c = (o_sp[:, None] < NSPLIT) & (o_n[None, :] < TOPN)
    b_key = tl.load(cand + ((o_sp[:, None] * NQ + i_q) * HKV + i_h) * BS + o_n[None, :],
                    mask=m_c, other=-1, cache_modifier=".cg")
    # TOPN rounds of "take the max": valid keys are unique, so each round removes one winner
    b_top = tl.full([BS], -1, tl.int64)
    for n in tl.static_range(TOPN):
        b_mx = tl.max(tl.max(b_key, 1), 0)
        b_top = tl.where(o_n == n, b_mx, b_top)
        b_key = tl.where(b_key == b_mx, -1, b_key)
    b_i = tl.reshape(_pick(tl.reshape(b_top, [1, BS]), o_n, TOPN), [BS])
    tl.store(sel + (i_q * HKV + i_h) * TOPN + o_n, b_i.to(sel.dtype.element_ty), mask=o_n < TOPN)
    if WITH_OUT:
        o_g = tl.arange(0, GP)
        o_d = tl.arange(0, BD)
        m_o = (o_g[:, None] < G) & (o_d[None, :] < D)
        o_hq = i_q * HQ + i_h * G + o_g
        b_o = tl.zeros([GP, BD], tl.float32)
        for s in range(NSPLIT):
            b_o += tl.load(o_part + (s * NQ * HQ + o_hq)[:, None] * D + o_d[None, :], mask=m_o,
                           other=0., cache_modifier=".cg")
        tl.store(o_cmp + o_hq[:, None] * D + o_d[None, :], b_o.to(o_cmp.dtype.element_ty), mask=m_o)


# ------------------------------------------------------------------ host side -------------
def refresh_groups(q_req: Sequence[int], group_size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of up to group_size consecutive rows of one request (host lists in, device int32
    tensors out): (order [Nq] = arange, g_start [NG], g_len [NG]). For callers without a
    verification plan; a `VerifyGeometry` gives (geo.order, geo.g_start, geo.g_len) directly.

    Example: q_req [0, 0, 0, 1], group_size 2 -> g_start [0, 2, 3], g_len [2, 1, 1].
    """
    if group_size < 1:
        raise ValueError(f"refresh_groups: group_size must be >= 1, got {group_size}")
    q_req = [int(r) for r in q_req]
    starts, lens = [], []
    i = 0
    while i < len(q_req):
        j = i
        while j < len(q_req) and j - i < group_size and q_req[j] == q_req[i]:
            j += 1
        starts.append(i)
        lens.append(j - i)
        i = j
    i32 = {"dtype": torch.int32, "device": device}
    return (torch.arange(len(q_req), **i32), torch.tensor(starts, **i32), torch.tensor(lens, **i32))


def default_refresh_splits(num_programs: int, max_blocks: int, params: NSAParams,
                           num_sms: int, rows: int = 64) -> int:
    """Splits of the selection-block range so that num_programs * splits fills about two waves
    of the GPU (four for Q tiles of <= 16 rows, e.g. decode: measured faster on the H200), each
    split keeping >= 2 tiles of work; 1 without a GPU; at most 32 (the merge scans
    splits * pow2(topn) keys topn times)."""
    if num_sms <= 0:
        return 1
    bs = pow2(params.topn, 16)
    waves = 4 if rows <= 16 else 2
    want = -(-waves * num_sms // max(1, num_programs))
    return int(max(1, min(want, max_blocks // (2 * bs), 32)))


def refresh_rows(group_size: int, q_heads: int, kv_heads: int) -> int:
    """Rows of the grouped refresh's Q tile: CP * GP (>= 16 for the MMA)."""
    gp = pow2(q_heads // kv_heads)
    return max(pow2(group_size), pow2(16 // gp)) * gp


def refresh_workspace(nq: int, hq: int, hkv: int, dim: int, params: NSAParams, num_splits: int,
                      with_out: bool, device, num_groups: int | None = None,
                      counters: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Fixed split buffers (m_part, l_part [NS*Nq*Hq] fp32, cand [NS*Nq*Hkv*BS] int64,
    o_part [NS*Nq*Hq*D] fp32 or a 1-element dummy, done [NG*Hkv] int32 split counters, zero;
    the kernel leaves them zero) for CUDA-graph capture; BS = pow2(topn) >= 16; num_groups NG
    defaults to Nq (one row per group); counters: given ones instead."""
    bs = pow2(params.topn, 16)
    f32 = {"dtype": torch.float32, "device": device}
    ng = nq if num_groups is None else num_groups
    return (torch.empty(num_splits * nq * hq, **f32), torch.empty(num_splits * nq * hq, **f32),
            torch.empty(num_splits * nq * hkv * bs, dtype=torch.int64, device=device),
            torch.empty(num_splits * nq * hq * dim if with_out else 1, **f32),
            torch.zeros(ng * hkv, dtype=torch.int32, device=device) if counters is None
            else counters)


def score_topk_grouped(a: RefreshArgs, group_size: int = 1,
                       groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       num_splits: int | None = None,
                       workspace: tuple[torch.Tensor, ...] | None = None,
                       num_warps: int | None = None, num_stages: int = 2,
                       merge: str = "auto",
                       stats_tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Selected blocks (and the compressed-branch output) of every query row; the same inputs and
    results as `score_topk`, computed per group of rows sharing each compressed-key load.

    Args:
        a (RefreshArgs): as `score_topk` (sel int32 [Nq, Hkv, topn], o_cmp [Nq, Hq, D],
            lse [Nq, Hq] fp32; # mutable).
        group_size (int): C, the most rows in a group (1..64).
        groups: (order [Nq], g_start [NG], g_len [NG]) int32 on the device: group k is the rows
            order[g_start[k] : g_start[k] + g_len[k]] (g_len 0 = unused slot), all of one
            request, g_len <= group_size, every row in exactly one group. A verification plan's
            (geo.order, geo.g_start, geo.g_len) with group_size geo.C fits. None: each row
            alone when group_size == 1, else `refresh_groups(q_req.tolist(), group_size)` (a
            host sync: eager only).
        num_splits (int | None): splits of each group's selection-block range; default
            `default_refresh_splits` from the block table's capacity (1 on CPU).
        workspace: `refresh_workspace(...)` buffers (CUDA graphs, num_splits > 1).
        num_warps, num_stages: Triton launch knobs of the two passes.
        merge (str): running top-n merge: "bitonic" (sort the tile, bitonic merge with the
            list), "rank" (rank counting) or "auto" (bitonic on CUDA, rank in the CPU
            interpreter); same result. The CPU tests run both.
        stats_tile (int | None): compressed tokens per pass-1 tile (power of two >= 16;
            default the pass-2 tile).
    Returns:
        (sel, o_cmp or None, lse or None) as `score_topk`.
    CUDA graphs: no host sync when groups is given (or group_size == 1); grid from host ints.

    Example: a T=16 draft tree, G=4, group_size 16 -> one program per (KV head, split) holds
    the 64 rows (16 queries x 4 heads) and reads each compressed key once per split.
    """
    q = a.q
    nq, hq, _ = q.shape
    hkv = a.ck_cache.shape[2]
    what = "score_topk_grouped"
    has_prov = check_refresh_args(what, a)
    if not 1 <= group_size <= MAX_TREE_NODES:
        raise ValueError(f"{what}: group_size must be in 1..{MAX_TREE_NODES}, got {group_size}")
    with_out = a.wants_out
    sel, o_cmp, lse = refresh_outputs(a)
    if nq == 0:
        return sel, o_cmp, lse
    order, g_start, g_len = _groups_or_default(what, q, a.q_req, group_size, groups)
    ns = _num_splits(what, num_splits, g_len.shape[0] * hkv, q, a.block_table, a.params,
                     a.page_size, refresh_rows(group_size, hq, hkv))
    both, pass2 = _grouped_constexprs(what, a, a.prov.vis.shape[1] if has_prov else 1, with_out,
                                      group_size, merge, stats_tile, num_warps)
    dummy = q.new_empty(1)
    ptrs = prov_pointers(a, has_prov, dummy)
    both.update(HAS_PROV=has_prov, q=q, ck_cache=a.ck_cache, block_table=a.block_table,
                q_req=a.q_req, q_pos=a.q_pos, cmp_lens=a.cmp_lens, order=order,
                g_start_p=g_start, g_len_p=g_len, prov_k=ptrs["prov_k"],
                prov_cidx=ptrs["prov_cidx"], prov_vis=ptrs["prov_vis"], scale=float(a.scale),
                stride_bt=a.block_table.stride(0), num_stages=num_stages)
    pass2.update(cv_cache=a.cv_cache, prov_v=ptrs["prov_v"])
    outs = (sel, o_cmp if with_out else dummy, lse if with_out else dummy)
    if ns == 1:
        # pass 1, pass 2 and the final pick in one program per (group, KV head)
        score_topk_grouped_scores_kernel[(g_len.shape[0], hkv, 1)](
            **both, **pass2, m_part=dummy, l_part=dummy, cand=dummy, sel=outs[0], o_part=outs[1],
            lse=outs[2], o_cmp=dummy, done=dummy, NSPLIT=1, NSP=1, FUSED=True)
    else:
        _launch_split(what, both, pass2, ns, g_len.shape[0], outs, a.params, with_out, workspace)
    return sel, o_cmp, lse


def _groups_or_default(what: str, q: torch.Tensor, q_req: torch.Tensor, group_size: int,
                       groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the caller's plan (shapes checked), else each row alone or `refresh_groups` (host sync)
    nq = q.shape[0]
    if groups is None:
        if group_size == 1:
            ar = torch.arange(nq, dtype=torch.int32, device=q.device)
            groups = (ar, ar, torch.ones(nq, dtype=torch.int32, device=q.device))
        else:
            groups = refresh_groups(q_req.tolist(), group_size, q.device)
    order, g_start, g_len = groups
    ng = g_len.shape[0]
    if order.shape != (nq,) or g_start.shape != (ng,):
        raise ValueError(f"{what}: groups must be (order [Nq={nq}], g_start [NG], g_len [NG]), got "
                         f"{tuple(order.shape)}, {tuple(g_start.shape)}, {tuple(g_len.shape)}")
    return order, g_start, g_len


def _num_splits(what: str, num_splits: int | None, num_programs: int, q: torch.Tensor,
                block_table: torch.Tensor, params: NSAParams, page_size: int, rows: int) -> int:
    # the caller's split count, else `default_refresh_splits` for the block table's capacity
    if num_splits is None:
        max_blocks = -(-block_table.shape[1] * page_size // params.select)
        num_splits = default_refresh_splits(num_programs, max_blocks, params, num_sms(q.device),
                                            rows)
    ns = int(num_splits)
    if ns < 1:
        raise ValueError(f"{what}: num_splits must be >= 1, got {ns}")
    return ns


def _grouped_constexprs(what: str, a: RefreshArgs, mp: int, with_out: bool, group_size: int,
                        merge: str, stats_tile: int | None,
                        num_warps: int | None) -> tuple[dict, dict]:
    """Tile sizes and launch knobs of the grouped kernels: (those of every pass, pass 2's own);
    mp: provisional tokens visible per row (1 without any)."""
    q, params = a.q, a.params
    nq, hq, dim = q.shape
    _, cpp, hkv, _ = a.ck_cache.shape
    g = hq // hkv
    gp = pow2(g)
    cp = max(pow2(group_size), pow2(16 // gp))         # rows CP*GP >= 16 for the MMA
    r = params.select // params.stride
    rp = pow2(r)
    bs = pow2(params.topn, 16)
    mpp = max(pow2(mp), pow2(16 // cp))                # slots CP*MPP >= 16 for the MMA
    bd = pow2(dim, 16)
    on_gpu = q.device.type == "cuda"
    merges = {"bitonic": MERGE_BITONIC, "rank": MERGE_RANK,
              "auto": MERGE_BITONIC if on_gpu else MERGE_RANK}
    if merge not in merges:
        raise ValueError(f"{what}: merge must be one of {sorted(merges)}, got {merge!r}")
    ts = bs * rp if stats_tile is None else int(stats_tile)
    if ts < 16 or ts & (ts - 1):
        raise ValueError(f"{what}: stats_tile must be a power of two >= 16, got {stats_tile}")
    if num_warps is None:   # H200 (stages_tune.json): 4 warps up to 64 rows, 8 from 128 rows or
        num_warps = 8 if (with_out or cp * gp >= 128) and bd >= 128 else 4   # with o_cmp (spills)
    both = {"NQ": nq, "HQ": hq, "HKV": hkv, "G": g, "GP": gp, "CP": cp, "D": dim, "BD": bd,
            "L": params.block, "DS": params.stride, "LS": params.select, "R": r, "PS": a.page_size,
            "CPP": cpp, "TB": bs * rp, "MP": mp, "MPP": mpp,
            "F32": q.dtype == torch.float32 or q.device.type == "cpu", "TS": ts,
            "num_warps": num_warps}
    pass2 = {"RP": rp, "K": params.block // params.stride, "TOPN": params.topn, "BS": bs,
             "INIT": params.init_blocks, "LOCAL": params.local_blocks, "WITH_OUT": with_out,
             "MERGE": merges[merge]}
    return both, pass2


def _launch_split(what: str, both: dict, pass2: dict, ns: int, ng: int, outs: tuple,
                  params: NSAParams, with_out: bool, workspace) -> None:
    # NSPLIT > 1: pass 1 per split, then pass 2 per split, whose last split per (group, KV
    # head) merges the splits' lists / partials
    nq, hq, hkv, dim, bs = both["NQ"], both["HQ"], both["HKV"], both["D"], pass2["BS"]
    dev = both["q"].device
    if workspace is None:
        # partials from the allocator, counters from the device's persistent zero buffer (a
        # zeros() per refresh would cost a fill launch inside every CUDA graph)
        workspace = refresh_workspace(nq, hq, hkv, dim, params, ns, with_out, dev,
                                      counters=split_counters(dev, ng * hkv))
    m_part, l_part, cand, o_part, done = workspace
    if (m_part.numel() < ns * nq * hq or cand.numel() < ns * nq * hkv * bs
            or (with_out and o_part.numel() < ns * nq * hq * dim) or done.numel() < ng * hkv):
        raise ValueError(f"{what}: workspace too small for {ns} splits and {ng} groups x {hkv} "
                         "KV heads (see refresh_workspace)")
    sel, o_cmp, lse = outs
    score_topk_grouped_stats_kernel[(ng, hkv, ns)](
        **both, m_part=m_part, l_part=l_part, NSPLIT=ns, BS=bs)
    score_topk_grouped_scores_kernel[(ng, hkv, ns)](
        **both, **pass2, m_part=m_part, l_part=l_part, cand=cand, sel=sel, o_part=o_part, lse=lse,
        o_cmp=o_cmp, done=done, NSPLIT=ns, NSP=pow2(ns), FUSED=False)
