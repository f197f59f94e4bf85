"""One layer of an NSA decode / verification step on the Triton kernels, written once for both
engines (the standalone runtime's Triton path, `specsa.model.nsa_layer`, and the SGLang
backend, `specsa.sglang_plugin.triton_backend`):

1. provisional compressed tokens of the tree nodes that close a compression block
   (`compress_gather` over committed slots and the nodes' own new K/V);
2. refresh: compressed attention + Eq. 9 block scores + top-n over the step's query groups
   (`score_topk_grouped`, compressed keys read once per group), unless the layer reuses the
   selection of the step's last refresh layer (REUSE classes) — with the gated combine the
   kernel still runs for this layer's compressed-branch output;
3. selected + window + combine through the step's `NSAVerifier` metadata (INDEPENDENT,
   EXACT_MERGED or SHARED_INDEX).

What a step must provide is `StepTensors`: the engines build it differently (the runtime on the
host from its paged cache; SGLang on the device from its request tables, `specsa.device_metadata`)
but hand the kernels the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specsa.kernels.common.params import NSAParams
# module references (not names) so that tests can count kernel calls by patching the module
from specsa.kernels import compression as kc
from specsa.kernels import refresh as kr


@dataclass(frozen=True)
class StepTensors:
    """Device metadata of one step's verify rows (all int32 unless noted).

    block_table [B, W] pages; q_req / q_pos [N] request and position of each row;
    cmp_lens [B] committed compressed tokens; prov_idx [Np, l] compress_gather sources of the
    provisional tokens (None: none close), prov_cidx [Np], prov_vis [N, MP] (-1 padded);
    groups (order [N], g_start [NG], g_len [NG]) and group_size for the grouped refresh (None:
    per-row refresh); verifier: the NSAVerifier holding the step's metadata."""

    block_table: torch.Tensor
    q_req: torch.Tensor
    q_pos: torch.Tensor
    cmp_lens: torch.Tensor
    prov_idx: torch.Tensor | None
    prov_cidx: torch.Tensor | None
    prov_vis: torch.Tensor | None
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    group_size: int
    verifier: object


def verify_layer(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, ck_cache: torch.Tensor,
                 cv_cache: torch.Tensor, step: StepTensors, params: NSAParams, scale: float,
                 page_size: int, *, gates: torch.Tensor | None = None, cw=None,
                 reuse_sel: torch.Tensor | None = None, keep_provisional: bool = False,
                 out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSA output of the step's verify rows for one layer.

    Args:
        q [N, Hq, D]; k_new, v_new [N, Hkv, D] the rows' K/V in the cache dtype (not read
        from the cache); k_cache / v_cache [pages, PS, Hkv, D]; ck_cache / cv_cache the
        paged compressed cache; gates [N, Hq, 3] (gated combine); cw learned compression.
        reuse_sel: the selection to reuse (a REUSE layer), or None to refresh.
        keep_provisional: compute the provisional compressed tokens even when the layer
            reuses its selection (the runtime commits them; SGLang recomputes committed
            compressed tokens from the pool instead).
        out: [N, Hq, D]  # mutable
    Returns:
        (out, sel, prov_k, prov_v): the output, the selection used (to reuse in later
        layers) and the provisional compressed tokens (the runtime commits them).
    """
    prov_k = prov_v = k_new.new_empty(0, *k_new.shape[1:])
    prov = None
    refresh = reuse_sel is None
    if (refresh or params.gated or keep_provisional) and step.prov_idx is not None:
        prov_k, prov_v = kc.compress_gather(k_cache, v_cache, k_new, v_new, step.prov_idx, params,
                                         cw=cw)
        prov = kr.ProvisionalTokens(prov_k.to(ck_cache.dtype), prov_v.to(cv_cache.dtype),
                                    step.prov_cidx, step.prov_vis)
    sel, o_cmp = reuse_sel, None
    if refresh or params.gated:
        args = kr.RefreshArgs(q, ck_cache, cv_cache, step.block_table, step.q_req, step.q_pos,
                              step.cmp_lens, params, scale, page_size, prov=prov,
                              with_out=params.gated)
        if step.groups is not None:
            own, o_cmp, _ = kr.score_topk_grouped(args, group_size=step.group_size,
                                                  groups=step.groups)
        else:
            own, o_cmp, _ = kr.score_topk(args)
        if refresh:
            sel = own
    out = step.verifier.run(q, k_new, v_new, k_cache, v_cache, sel, o_cmp=o_cmp,
                            gates=None if gates is None else gates.contiguous(), out=out)
    return out, sel, prov_k, prov_v
