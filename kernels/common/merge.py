"""(o, lse) merge of split-KV partial states (FlashInfer cascade `merge_state` semantics), with
the NSA gated combine folded in so a gated step costs one merge launch, not three.

Legend: NSPLIT splits, NB branches (1: union / dense, 2: gated selected + window), NQ queries,
HQ heads, D head dim (BD padded), BH heads per program. lse is in log2 units (the kernels
accumulate with exp2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pow2
from .tl_math import merge_state


@triton.jit
def gated_combine(GATES, OCMP, p_row, m_row, o_d, m_o, b_slc, b_win, D: tl.constexpr):
    # o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win for rows p_row (flat query-head index;
    # gates [*, 3] in (cmp, slc, win) order, sigmoid already applied), in fp32
    p_g = GATES + p_row * 3
    b_gc = tl.load(p_g + 0, mask=m_row, other=0.).to(tl.float32)
    b_gs = tl.load(p_g + 1, mask=m_row, other=0.).to(tl.float32)
    b_gw = tl.load(p_g + 2, mask=m_row, other=0.).to(tl.float32)
    b_oc = tl.load(OCMP + p_row[:, None] * D + o_d[None, :], mask=m_o, other=0.).to(tl.float32)
    return b_gc[:, None] * b_oc + b_gs[:, None] * b_slc + b_gw[:, None] * b_win


@triton.jit
def _merge_branch(OPART, LPART, i_q, o_h, m_h, o_d, m_d, br, NQ, NSPLIT,
                  HQ: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                  BH: tl.constexpr, BD: tl.constexpr):
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BD], tl.float32)
    for s in range(NSPLIT):
        base = (s * NB + br) * NQ * HQ + i_q * HQ + o_h                  # [BH]
        b_l = tl.load(LPART + base, mask=m_h, other=float("-inf"))
        b_o = tl.load(OPART + base[:, None] * D + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0.0)
        m, l, acc = merge_state(m, l, acc, b_l, b_o)
    return acc / tl.where(l > 0, l, 1.0)[:, None]


@triton.jit(do_not_specialize=["NQ", "NSPLIT"])
def _merge_splits_kernel(OPART, LPART, OCMP, GATES, OUT, NQ, NSPLIT,
                         HQ: tl.constexpr, D: tl.constexpr,
                         NB: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
                         GATED: tl.constexpr):
    i_q, i_hb = tl.program_id(0), tl.program_id(1)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < HQ
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_o = _merge_branch(OPART, LPART, i_q, o_h, m_h, o_d, m_d, 0, NQ, NSPLIT, HQ, D, NB, BH, BD)
    p_row = i_q * HQ + o_h
    m_o = m_h[:, None] & m_d[None, :]
    if GATED:
        b_w = _merge_branch(OPART, LPART, i_q, o_h, m_h, o_d, m_d, 1, NQ, NSPLIT, HQ, D, NB, BH, BD)
        b_o = gated_combine(GATES, OCMP, p_row, m_h, o_d, m_o, b_o, b_w, D)
    tl.store(OUT + p_row[:, None] * D + o_d[None, :], b_o.to(OUT.dtype.element_ty), mask=m_o)


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, num_splits: int, num_branches: int,
                 out: torch.Tensor, o_cmp: torch.Tensor | None = None,
                 gates: torch.Tensor | None = None) -> torch.Tensor:
    """Merge split-KV partials into `out`.

    Args:
        o_part (torch.Tensor): fp32, [NSPLIT, NB, NQ, HQ, D] (flat ok), each split's normalised o.
        lse_part (torch.Tensor): fp32, [NSPLIT, NB, NQ, HQ], log2-sum-exp2 of each split's
            logits (-inf: the split saw no key; such a split gets weight 0).
        num_splits, num_branches (int): NSPLIT, NB (2 = gated: branch 0 selected, 1 window).
        out (torch.Tensor): [NQ, HQ, D]  # mutable
        o_cmp, gates: [NQ, HQ, D] and [NQ, HQ, 3] for the gated combine
            o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win; None for union / dense.
    Returns:
        out. A row with no key in any split gets 0 (the NSA convention for an empty branch).
    """
    nq, hq, d = out.shape
    bh = min(16, triton.next_power_of_2(hq))
    gated = gates is not None
    _merge_splits_kernel[(nq, triton.cdiv(hq, bh))](
        OPART=o_part, LPART=lse_part, OCMP=o_cmp if gated else out, GATES=gates if gated else out,
        OUT=out, NQ=nq, HQ=hq, D=d, NSPLIT=num_splits, NB=num_branches, BH=bh,
        BD=pow2(d, 16), GATED=gated, num_warps=4)
    return out


def merge_states_torch(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference merge in natural-log units: o [S, ..., D], lse [S, ...] -> (o, lse)."""
    m = lse.max(0).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)
    tot = w.sum(0)
    o_m = (w.unsqueeze(-1) * o).sum(0) / tot.clamp_min(1e-30).unsqueeze(-1)
    return o_m, torch.log(tot) + m
