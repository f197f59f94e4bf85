"""The inputs of one fused verify / decode launch, bundled once: every entry point over the fused
kernel (the three verification schedules, decode, dense tree verification, the runtime's
`NSAVerifier`) passes the same tensors, geometry, NSA parameters, scale and output buffers,
so they travel as one `VerifyArgs` instead of a dozen positional arguments repeated per
wrapper."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..common.params import NSAParams

if TYPE_CHECKING:   # verify.py imports this module; the annotation needs only the name
    from .verify import VerifyGeometry


class SplitWorkspace(NamedTuple):
    """Split-KV buffers of one launch shape (`verify.split_workspace` builds them): partials
    o_part [NSPLIT*NB*Nq*HQ*D] and lse_part [NSPLIT*NB*Nq*HQ] (fp32), and done [>= groups x
    KV heads] int32 split counters, zero between launches."""

    o_part: torch.Tensor
    lse_part: torch.Tensor
    done: torch.Tensor


@dataclass(frozen=True)
class VerifyArgs:
    """What the fused kernel reads and writes in one step (frozen: the bundle, not the tensors;
    `out` and `workspace` are written in place).

    q [Nq, HQ, D] (bf16 / fp16 / fp32), one row per verifier query; k_new, v_new [Nq, HKV, D]
    the draft tail's keys / values (not yet in the cache); k_cache, v_cache [num_pages,
    page_size, HKV, D]; geo the step's `VerifyGeometry`; params, scale the NSA parameters and
    softmax scale; sel [Nq, HKV, topn] int32 sorted ascending, -1 padded (None: dense);
    o_cmp [Nq, HQ, D], gates [Nq, HQ, 3] (sigmoid values): gated combine only;
    out [Nq, HQ, D] (None: allocated); workspace: fixed split buffers for CUDA graphs
    (`SplitWorkspace`; None: allocated per launch).
    """

    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    geo: VerifyGeometry
    params: NSAParams
    scale: float
    sel: torch.Tensor | None = None
    o_cmp: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    out: torch.Tensor | None = None
    workspace: SplitWorkspace | None = None


def check_verify_args(a: VerifyArgs, dense: bool) -> None:
    """Shape / dtype checks with messages naming the problem (no device syncs)."""
    q, k_cache, v_cache = a.q, a.k_cache, a.v_cache
    nq, hq, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_pages, page_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hkv = k_cache.shape[2]
    if hq % hkv or k_cache.shape[3] != d:
        raise ValueError(f"q [Nq, Hq={hq}, D={d}] does not fit cache Hkv={hkv}, D={k_cache.shape[3]}")
    if a.k_new.shape != (nq, hkv, d) or a.v_new.shape != a.k_new.shape:
        raise ValueError(f"k_new/v_new must be [Nq={nq}, Hkv={hkv}, D={d}], got {tuple(a.k_new.shape)}")
    if nq != a.geo.num_queries:
        raise ValueError(f"q has {nq} queries but the plan has {a.geo.num_queries}")
    for name in ("q", "k_new", "v_new", "k_cache", "v_cache"):
        t = getattr(a, name)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not dense:
        _check_selected_branch(a, nq, hq, hkv)


def _check_selected_branch(a: VerifyArgs, nq: int, hq: int, hkv: int) -> None:
    # the sparse (non-dense) launch: a selection, and combine inputs matching params.gated
    sel, params, o_cmp, gates = a.sel, a.params, a.o_cmp, a.gates
    if sel is None or sel.shape != (nq, hkv, params.topn) or sel.dtype != torch.int32:
        raise ValueError(f"sel must be int32 [Nq={nq}, Hkv={hkv}, topn={params.topn}], got "
                         f"{None if sel is None else (tuple(sel.shape), sel.dtype)}")
    if params.gated and (o_cmp is None or gates is None):
        raise ValueError("params.gated is True (gated combine) but o_cmp or gates is None")
    if not params.gated and gates is not None:
        raise ValueError("gates given but params.gated is False (union combine)")
    if params.gated and (o_cmp.shape != a.q.shape or gates.shape != (nq, hq, 3)):
        raise ValueError(f"o_cmp must be [Nq, Hq, D] and gates [Nq, Hq, 3], got "
                         f"{tuple(o_cmp.shape)}, {tuple(gates.shape)}")
