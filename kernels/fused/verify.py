"""Fused NSA verification / decode: selected + window branches + (gated | union) combine in one
launch over a paged KV cache plus a contiguous draft tail, split-KV with an (o, lse) merge.

One kernel serves every schedule (kernels/schedules/{independent,exact_merged,shared_index}.py),
decode (T = 1) and dense tree verification (kernels/dense/): a program owns one group of C
verifier queries x G heads of one KV head (a [R = C*G, D] Q tile, R padded to a power of two
>= 16 for the MMA) and one split of the group's key space:
  1. selected blocks, committed part (positions < P): the group's block list (its own selection
     when C = 1, else the on-chip union of the C sorted lists with a per-block ownership bitmask;
     non-owned rows are masked to -inf). Union combine skips tokens inside every row's window
     (the window pass covers them) so each token enters the softmax once.
  2. committed window [win_lo, P), per-row window mask; DENSE: all of [0, P), no mask.
  3. the draft tail (split 0 only): the request's T tree nodes, ancestor bitmask per row; the
     tree mask is applied only here.
Gated combine keeps two accumulators (slc, win) and mixes them with o_cmp through the gates.

Legend (FLA naming): HQ, HKV, G = HQ // HKV, D head dim (BD padded), R rows per program,
C queries per group, S selection block l', BS token tile of pass 1 (= S padded), BN token tile
of pass 2, TP draft-tail tile, W window, PS page size, NSPLIT splits of the key loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..common.launch import num_sms, pow2, split_counters
from ..common.merge import gated_combine, merge_partials
from ..common.tl_math import LOG2E, load_rows
from .args import SplitWorkspace, VerifyArgs, check_verify_args


@dataclass(frozen=True)
class VerifyGeometry:
    """Device metadata of one verification (or decode) step; built once per step by
    `specsa.metadata` / `build_geometry`, read by every layer. All int32 unless noted.

    req_P [B] committed length; req_off [B] first global query (= draft-tail row) of the request;
    req_T [B] tree size; block_table [B, max_pages]; q_pos [Nq] absolute position;
    q_anc [Nq] int64 ancestor bitmask over request-local node ids (bit u: node u, self incl.);
    order [Nq] flat slot -> global query; sel_src [Nq] flat slot -> query whose selection the
    slot uses (itself, or the group representative for SHARED_INDEX); g_req/g_start/g_len/
    g_winlo [NG] per group (g_len 0 marks an unused slot). Ints: C max group length,
    t_max max tree size, num_splits, direct (True: C == 1, read selections in place).
    """

    req_P: torch.Tensor
    req_off: torch.Tensor
    req_T: torch.Tensor
    block_table: torch.Tensor
    q_pos: torch.Tensor
    q_anc: torch.Tensor
    order: torch.Tensor
    sel_src: torch.Tensor
    g_req: torch.Tensor
    g_start: torch.Tensor
    g_len: torch.Tensor
    g_winlo: torch.Tensor
    C: int
    t_max: int
    num_splits: int
    direct: bool

    @property
    def num_groups(self) -> int:
        return self.g_len.shape[0]

    @property
    def num_queries(self) -> int:
        return self.q_pos.shape[0]


@triton.jit
def _online(m_i, l_i, acc, s, mask, v, DT: tl.constexpr, IEEE: tl.constexpr):
    # s: [R, N] logits in log2 units; masked entries excluded; rows with nothing yet keep -inf.
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
    return m_new, l_i, acc


@triton.jit
def _qk(q, k, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _finish(m_i, l_i, acc):
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    return o, lse


@triton.jit
def _kv_tile(KC, VC, p_bt, pos, m_t, i_h, o_d, m_d, HKV: tl.constexpr, D: tl.constexpr,
             PS: tl.constexpr):
    # K and V rows [N, BD] of KV head i_h at paged positions pos (m_t masks them)
    page = tl.load(p_bt + pos // PS, mask=m_t, other=0)
    off = (page.to(tl.int64) * PS + pos % PS) * (HKV * D) + i_h * D                  # [N]
    b_k = tl.load(KC + off[:, None] + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    b_v = tl.load(VC + off[:, None] + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    return b_k, b_v


@triton.jit
def _selected_pass(m_a, l_a, acc_a, b_q, KC, VC, p_bt, SEL, SELSRC, UIDX, UOWN, UCNT, g_start,
                   i_g, i_h, i_s, NSPLIT, P, t_r, t_max, m_r, o_c, o_d, m_d,
                   HKV: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BS: tl.constexpr,
                   W: tl.constexpr, TOPN: tl.constexpr, CAP: tl.constexpr, PS: tl.constexpr,
                   NBI: tl.constexpr, DIRECT: tl.constexpr, GATED: tl.constexpr,
                   IEEE: tl.constexpr):
    # pass 1: split i_s of the group's selected blocks, committed positions (< P) only
    if DIRECT:
        q0 = tl.load(SELSRC + g_start)
        p_list = SEL + (q0 * HKV + i_h) * TOPN
        n_blk = TOPN
    else:
        p_list = UIDX + (i_g * HKV + i_h) * CAP
        n_blk = tl.load(UCNT + i_g * HKV + i_h)
    chunk = tl.cdiv(n_blk, NSPLIT)
    lo = i_s * chunk
    hi = tl.minimum(lo + chunk, n_blk)
    # NBI selected blocks per iteration: one [NBI*BS] token tile (more bytes in flight)
    o_n = tl.arange(0, NBI * BS)
    o_nb = o_n // BS
    o_nt = o_n % BS
    for i in range(lo, hi, NBI):
        # scalar loads of the NBI block ids (and ownership words), spread over the tile:
        # per-token gathers and an [R, NBI*BS] int64 shift cost more than the loads save
        blk = tl.full([NBI * BS], -1, tl.int32)
        m_own = o_c[:, None] < 0                                         # [R, 1] all false
        for k in tl.static_range(NBI):
            b_k = tl.load(p_list + i + k, mask=i + k < hi, other=-1)
            blk = tl.where(o_nb == k, b_k, blk)
            if not DIRECT:
                own = tl.load(UOWN + (i_g * HKV + i_h) * CAP + i + k, mask=i + k < hi, other=0)
                m_own = m_own | ((o_nb[None, :] == k) & ((((own >> o_c.to(tl.int64)) & 1) != 0)[:, None]))
        pos = blk * S + o_nt                                             # [NBI*BS]
        m_t = (o_nt < S) & (pos < P) & (blk >= 0)
        if not GATED:
            # tokens in every row's window are read by pass 2 instead
            m_t = m_t & (pos < t_max - W + 1)
        b_k, b_v = _kv_tile(KC, VC, p_bt, pos, m_t, i_h, o_d, m_d, HKV, D, PS)
        b_s = _qk(b_q, b_k, IEEE)                                        # [R, NBI*BS]
        m_s = m_t[None, :] & m_r[:, None]
        if not DIRECT:
            m_s = m_s & m_own
        if not GATED:
            m_s = m_s & (pos[None, :] < t_r[:, None] - W + 1)
        m_a, l_a, acc_a = _online(m_a, l_a, acc_a, b_s, m_s, b_v, b_q.dtype, IEEE)
    return m_a, l_a, acc_a


@triton.jit
def _window_pass(m_i, l_i, acc, b_q, KC, VC, p_bt, G_WINLO, i_g, i_h, i_s, NSPLIT, P, t_r, m_r,
                 o_d, m_d, HKV: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                 W: tl.constexpr, PS: tl.constexpr, DENSE: tl.constexpr, IEEE: tl.constexpr):
    # pass 2: split i_s of the committed window [win_lo, P) (dense: the whole prefix)
    if DENSE:
        w_lo = 0
    else:
        w_lo = tl.load(G_WINLO + i_g)
    n_tile = tl.cdiv(tl.maximum(P - w_lo, 0), BN)
    chunk2 = tl.cdiv(n_tile, NSPLIT)
    lo2 = i_s * chunk2
    hi2 = tl.minimum(lo2 + chunk2, n_tile)
    o_n2 = tl.arange(0, BN)
    for i in range(lo2, hi2):
        pos = w_lo + i * BN + o_n2                                       # [BN]
        m_t = pos < P
        b_k, b_v = _kv_tile(KC, VC, p_bt, pos, m_t, i_h, o_d, m_d, HKV, D, PS)
        b_s = _qk(b_q, b_k, IEEE)                                        # [R, BN]
        m_s = m_t[None, :] & m_r[:, None]
        if not DENSE:
            m_s = m_s & (pos[None, :] >= t_r[:, None] - W + 1)
        m_i, l_i, acc = _online(m_i, l_i, acc, b_s, m_s, b_v, b_q.dtype, IEEE)
    return m_i, l_i, acc


@triton.jit
def _tail_selected(SEL, i_src, i_h, m_r, pos_j, P, HKV: tl.constexpr, S: tl.constexpr,
                   TOPN: tl.constexpr, R: tl.constexpr):
    # [R, TP]: tail token j lies in a block row r selected (the tail's blocks b0 .. b0+63
    # as a bitmask per row)
    b0 = P // S
    bits = tl.zeros([R], tl.int64)
    for k in tl.static_range(TOPN):
        sv = tl.load(SEL + (i_src * HKV + i_h) * TOPN + k, mask=m_r, other=-1)
        dv = sv - b0
        ok = (sv >= 0) & (dv >= 0) & (dv < 64)
        bits = bits | tl.where(ok, tl.full([R], 1, tl.int64) << tl.maximum(dv, 0).to(tl.int64), 0)
    db = tl.maximum(pos_j // S - b0, 0).to(tl.int64)
    return ((bits[:, None] >> db[None, :]) & 1) != 0


@triton.jit
def _tail_pass(m_a, l_a, acc_a, m_w, l_w, acc_w, b_q, KN, VN, QPOS, QANC, SEL, REQ_OFF, REQ_T,
               i_b, i_q, i_src, i_h, P, t_r, m_r, o_d, m_d, HKV: tl.constexpr, D: tl.constexpr,
               S: tl.constexpr, W: tl.constexpr, TOPN: tl.constexpr, TP: tl.constexpr,
               R: tl.constexpr, DENSE: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr):
    # pass 3: the request's draft tail, visible along each row's ancestors only
    DT = b_q.dtype
    t_off = tl.load(REQ_OFF + i_b)
    n_t = tl.load(REQ_T + i_b)
    o_j = tl.arange(0, TP)
    m_j = o_j < n_t
    pos_j = tl.load(QPOS + t_off + o_j, mask=m_j, other=0)               # [TP]
    off_j = (t_off + o_j) * (HKV * D) + i_h * D
    b_k = tl.load(KN + off_j[:, None] + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.0)
    b_v = tl.load(VN + off_j[:, None] + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.0)
    b_s = _qk(b_q, b_k, IEEE)                                            # [R, TP]
    anc = tl.load(QANC + i_q, mask=m_r, other=0)                         # [R] int64
    vis = ((anc[:, None] >> o_j[None, :].to(tl.int64)) & 1) != 0
    vis = vis & m_j[None, :] & m_r[:, None]
    if DENSE:
        m_a, l_a, acc_a = _online(m_a, l_a, acc_a, b_s, vis, b_v, DT, IEEE)
    else:
        member = _tail_selected(SEL, i_src, i_h, m_r, pos_j, P, HKV, S, TOPN, R)
        in_win = pos_j[None, :] >= t_r[:, None] - W + 1
        if GATED:
            m_a, l_a, acc_a = _online(m_a, l_a, acc_a, b_s, vis & member, b_v, DT, IEEE)
            m_w, l_w, acc_w = _online(m_w, l_w, acc_w, b_s, vis & in_win, b_v, DT, IEEE)
        else:
            m_a, l_a, acc_a = _online(m_a, l_a, acc_a, b_s, vis & (member | in_win), b_v, DT, IEEE)
    return m_a, l_a, acc_a, m_w, l_w, acc_w


@triton.jit(do_not_specialize=["stride_bt", "NQ", "NSPLIT"])
def _nsa_verify_fwd_kernel(
        Q, KN, VN, KC, VC, BT, REQ_P, REQ_OFF, REQ_T, QPOS, QANC, ORDER, SELSRC,
        G_REQ, G_START, G_LEN, G_WINLO, SEL, UIDX, UOWN, UCNT, OCMP, GATES, OUT, OPART, LPART,
        DONE, sm_scale, stride_bt, NQ, NSPLIT,
        HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BD: tl.constexpr, R: tl.constexpr, S: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
        TP: tl.constexpr, W: tl.constexpr, TOPN: tl.constexpr, CAP: tl.constexpr,
        PS: tl.constexpr, DIRECT: tl.constexpr, GATED: tl.constexpr,
        DENSE: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr, NBI: tl.constexpr):
    i_g, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g_len = tl.load(G_LEN + i_g)
    if g_len == 0:
        return
    g_start = tl.load(G_START + i_g)
    i_b = tl.load(G_REQ + i_g)
    P = tl.load(REQ_P + i_b)
    DT = Q.dtype.element_ty
    qk_scale = sm_scale * LOG2E

    # ---- rows: r = c * G + gh ------------------------------------------------------------
    o_r = tl.arange(0, R)
    o_c = o_r // G
    m_r = o_c < g_len                                                    # [R]
    i_q = tl.load(ORDER + g_start + o_c, mask=m_r, other=0)              # [R] global query
    i_src = tl.load(SELSRC + g_start + o_c, mask=m_r, other=0)           # [R] selection row
    i_hq = i_h * G + o_r % G                                             # [R] query head
    t_r = tl.load(QPOS + i_q, mask=m_r, other=0)                         # [R]
    t_max = tl.max(tl.where(m_r, t_r, 0), 0)
    p_row = (i_q * HQ + i_hq)
    b_q, o_d, m_d = load_rows(Q, p_row, m_r, D, BD)                      # [R, BD]
    b_q = (b_q * qk_scale).to(DT)

    m_a = tl.full([R], float("-inf"), tl.float32)
    l_a = tl.zeros([R], tl.float32)
    acc_a = tl.zeros([R, BD], tl.float32)      # union, or gated selected branch, or dense
    m_w = tl.full([R], float("-inf"), tl.float32)
    l_w = tl.zeros([R], tl.float32)
    acc_w = tl.zeros([R, BD], tl.float32)      # gated window branch
    p_bt = BT + i_b * stride_bt
    if not DENSE:
        m_a, l_a, acc_a = _selected_pass(
            m_a, l_a, acc_a, b_q, KC, VC, p_bt, SEL, SELSRC, UIDX, UOWN, UCNT, g_start, i_g, i_h,
            i_s, NSPLIT, P, t_r, t_max, m_r, o_c, o_d, m_d, HKV, D, S, BS, W, TOPN, CAP, PS, NBI,
            DIRECT, GATED, IEEE)
    if GATED:
        m_w, l_w, acc_w = _window_pass(m_w, l_w, acc_w, b_q, KC, VC, p_bt, G_WINLO, i_g, i_h, i_s,
                                       NSPLIT, P, t_r, m_r, o_d, m_d, HKV, D, BN, W, PS, DENSE, IEEE)
    else:
        m_a, l_a, acc_a = _window_pass(m_a, l_a, acc_a, b_q, KC, VC, p_bt, G_WINLO, i_g, i_h, i_s,
                                       NSPLIT, P, t_r, m_r, o_d, m_d, HKV, D, BN, W, PS, DENSE, IEEE)
    if i_s == 0:
        m_a, l_a, acc_a, m_w, l_w, acc_w = _tail_pass(
            m_a, l_a, acc_a, m_w, l_w, acc_w, b_q, KN, VN, QPOS, QANC, SEL, REQ_OFF, REQ_T, i_b,
            i_q, i_src, i_h, P, t_r, m_r, o_d, m_d, HKV, D, S, W, TOPN, TP, R, DENSE, GATED, IEEE)

    # ---- epilogue ------------------------------------------------------------------------
    o_a, lse_a = _finish(m_a, l_a, acc_a)
    m_o = m_r[:, None] & m_d[None, :]
    if FINAL:
        if GATED:
            o_w, lse_w = _finish(m_w, l_w, acc_w)
            o_a = gated_combine(GATES, OCMP, p_row, m_r, o_d, m_o, o_a, o_w, D)
        tl.store(OUT + p_row[:, None] * D + o_d[None, :], o_a.to(OUT.dtype.element_ty), mask=m_o)
    else:
        NB: tl.constexpr = 2 if GATED else 1
        base = (i_s * NB) * NQ * HQ + p_row                              # [R]
        tl.store(OPART + base[:, None] * D + o_d[None, :], o_a, mask=m_o)
        tl.store(LPART + base, lse_a, mask=m_r)
        if GATED:
            o_w, lse_w = _finish(m_w, l_w, acc_w)
            base_w = base + NQ * HQ
            tl.store(OPART + base_w[:, None] * D + o_d[None, :], o_w, mask=m_o)
            tl.store(LPART + base_w, lse_w, mask=m_r)
        # the split that finishes last merges the (group, head)'s partials, so a split launch
        # needs no second (merge) launch. Every thread's partial stores are ordered before the
        # counter by the barrier + release; the last split's loads after it by the acquire
        # (the stream-K / split-K "fixup" pattern). The counter is reset for the next launch.
        tl.debug_barrier()
        p_done = DONE + i_g * HKV + i_h
        n_done = tl.atomic_add(p_done, 1, sem="acq_rel", scope="gpu")
        if n_done == NSPLIT - 1:
            o_a = merge_partials(OPART, LPART, p_row, m_r, o_d, m_d, 0, NQ, NSPLIT, HQ, D, NB)
            if GATED:
                o_w = merge_partials(OPART, LPART, p_row, m_r, o_d, m_d, 1, NQ, NSPLIT, HQ, D, NB)
                o_a = gated_combine(GATES, OCMP, p_row, m_r, o_d, m_o, o_a, o_w, D)
            tl.store(OUT + p_row[:, None] * D + o_d[None, :], o_a.to(OUT.dtype.element_ty),
                     mask=m_o)
            tl.atomic_xchg(p_done, 0, sem="relaxed", scope="gpu")


def default_blocks_per_iter(rows: int, num_programs: int, device: torch.device) -> int:
    """Selected blocks per pass-1 iteration. Two (a 2*l' token tile: twice the bytes in flight
    per program) where it measured faster on the H200 (benchmark/results/h200/stages.json):
    small Q tiles (decode, rows <= 16) or grids of at most about two waves; one for large
    grids of 64-row tiles, whose 2x larger K/V stages cost occupancy (T=64 x batch 16)."""
    if device.type != "cuda":
        return 1
    return 2 if rows <= 16 or num_programs <= 2 * num_sms(device) else 1


def nsa_verify_fwd(a: VerifyArgs,
                   union: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   dense: bool = False, num_warps: int | None = None, num_stages: int = 3,
                   blocks_per_iter: int | None = None) -> torch.Tensor:
    """Launch the fused kernel (one launch: with a.geo.num_splits > 1 the last split of each
    (group, KV head) merges the partials).

    Args:
        a (VerifyArgs): the step's inputs and output buffers (a.sel may be None when dense).
        union: (idx [NG, HKV, CAP] int32, own [NG, HKV, CAP] int64, cnt [NG, HKV] int32) from
            `specsa.kernels.common.index.merge_group_selections`; needed unless geo.direct/dense.
        dense: every committed token unmasked, no selection / window / gates (kernels/dense).
        num_warps, num_stages, blocks_per_iter (power of two): launch / tile knobs; selected
            blocks loaded per loop iteration of pass 1. None: `default_blocks_per_iter`.
    Returns:
        a.out (allocated when None) [Nq, HQ, D] in q's dtype. CUDA-graph safe: no host syncs;
        grid fixed by geo.
    """
    check_verify_args(a, dense)
    q, k_cache, geo, params = a.q, a.k_cache, a.geo, a.params
    if blocks_per_iter is None:
        blocks_per_iter = default_blocks_per_iter(
            pow2(geo.C * (q.shape[1] // k_cache.shape[2]), 16),
            geo.num_groups * k_cache.shape[2] * geo.num_splits, q.device)
    if blocks_per_iter < 1 or blocks_per_iter & (blocks_per_iter - 1):
        raise ValueError(f"blocks_per_iter must be a power of two >= 1, got {blocks_per_iter}")
    nq, hq, d = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    g = hq // hkv
    gated = params.gated and not dense
    nsplit = geo.num_splits
    out = torch.empty_like(q) if a.out is None else a.out
    rows = pow2(geo.C * g, 16)
    direct = geo.direct or dense
    if not direct and union is None:
        raise ValueError("a merged schedule (group size C > 1) needs the union index from "
                         "merge_group_selections")
    uidx, uown, ucnt = union if union is not None else (geo.order, geo.q_anc, geo.order)
    cap = uidx.shape[-1] if union is not None else 1
    nb = 2 if gated else 1
    opart, lpart, done = _split_buffers(a.workspace, nsplit, nb, geo.num_groups * hkv, q, out)
    sel, o_cmp, gates = a.sel, a.o_cmp, a.gates
    dummy = q
    bd = pow2(d, 16)
    if num_warps is None:
        num_warps = 8 if rows * bd >= 128 * 128 else 4
    _nsa_verify_fwd_kernel[(geo.num_groups, hkv, nsplit)](
        Q=q, KN=a.k_new, VN=a.v_new, KC=k_cache, VC=a.v_cache, BT=geo.block_table,
        REQ_P=geo.req_P, REQ_OFF=geo.req_off, REQ_T=geo.req_T, QPOS=geo.q_pos, QANC=geo.q_anc,
        ORDER=geo.order, SELSRC=geo.sel_src, G_REQ=geo.g_req, G_START=geo.g_start,
        G_LEN=geo.g_len, G_WINLO=geo.g_winlo, SEL=sel if sel is not None else geo.order,
        UIDX=uidx, UOWN=uown, UCNT=ucnt,
        OCMP=o_cmp if gated else dummy, GATES=gates if gated else dummy, OUT=out,
        OPART=opart, LPART=lpart, DONE=done, sm_scale=float(a.scale), stride_bt=geo.block_table.stride(0),
        NQ=nq, HQ=hq, HKV=hkv, G=g, D=d, BD=bd, R=rows, S=params.select,
        BS=pow2(params.select, 16), BN=64, TP=pow2(geo.t_max, 16), W=params.window,
        TOPN=params.topn if sel is not None else 1, CAP=cap, PS=ps, NSPLIT=nsplit,
        DIRECT=direct, GATED=gated, DENSE=dense, FINAL=nsplit == 1,
        IEEE=q.dtype == torch.float32, NBI=int(blocks_per_iter),
        num_warps=num_warps, num_stages=num_stages)
    return out


def split_workspace(num_splits: int, num_branches: int, num_queries: int, q_heads: int,
                    head_dim: int, num_programs: int, device,
                    counters: torch.Tensor | None = None) -> SplitWorkspace:
    """Fixed split-KV buffers for CUDA graphs: partials (o [NSPLIT*NB*Nq*HQ*D], lse
    [NSPLIT*NB*Nq*HQ], fp32) and the per-(group, KV head) split counters (int32, zero; the
    kernel leaves them zero). The counters are the workspace's own (not the device's shared
    `split_counters`): a workspace may serve a stream of its own, e.g. the draft's.
    num_programs: groups x KV heads of the largest launch; counters: given ones instead."""
    n = num_splits * num_branches * num_queries * q_heads
    if counters is None:
        counters = torch.zeros(num_programs, device=device, dtype=torch.int32)
    return SplitWorkspace(torch.empty(n * head_dim, device=device, dtype=torch.float32),
                          torch.empty(n, device=device, dtype=torch.float32), counters)


def _split_buffers(workspace, nsplit: int, nb: int, num_programs: int, q: torch.Tensor,
                   out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the caller's fixed buffers or new ones; unsplit launches write `out` directly (the
    # kernel never touches the partials or the counters)
    if nsplit == 1:
        return out, out, out
    if workspace is None:
        # partials from the allocator; counters from the device's persistent zero buffer (a
        # zeros() per launch would put a fill kernel into every CUDA graph)
        workspace = split_workspace(nsplit, nb, *q.shape, num_programs, q.device,
                                    counters=split_counters(q.device, num_programs))
    if workspace.done.numel() < num_programs:
        raise ValueError(f"workspace has {workspace.done.numel()} split counters, the launch "
                         f"needs {num_programs} (groups x KV heads)")
    return workspace
