"""Autoregressive NSA decode: one query per request (a one-node tree whose KV is passed as the
draft tail), selected + window + combine fused, split-KV so batch 1 still fills the GPU."""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from .geometry import build_geometry
from .verify import VerifyGeometry, nsa_verify_fwd


def decode_geometry(prefix_lens: list[int], block_table: torch.Tensor, params: NSAParams,
                    num_splits: int) -> VerifyGeometry:
    """Geometry for B decode rows; prefix_lens[b] = committed tokens before the new one."""
    b = len(prefix_lens)
    return build_geometry([[-1]] * b, list(prefix_lens), block_table, [[0]] * b, 1,
                          params.window, num_splits)


def fused_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, sel: torch.Tensor,
                 geo: VerifyGeometry, params: NSAParams, scale: float,
                 o_cmp: torch.Tensor | None = None, gates: torch.Tensor | None = None,
                 out: torch.Tensor | None = None,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                 num_warps: int | None = None, num_stages: int = 3,
                 blocks_per_iter: int | None = None) -> torch.Tensor:
    """Args:
        q (torch.Tensor): [B, HQ, D]; k_new, v_new: [B, HKV, D], the new token's KV (not yet
            in the cache). sel: [B, HKV, topn] int32. geo: `decode_geometry(...)`.
        o_cmp [B, HQ, D], gates [B, HQ, 3]: gated only. out: [B, HQ, D]  # mutable
        num_warps, num_stages, blocks_per_iter: as `nsa_verify_fwd`.
    Returns:
        out. CUDA-graph safe.
    """
    return nsa_verify_fwd(q, k_new, v_new, k_cache, v_cache, geo, params, scale, sel=sel,
                          o_cmp=o_cmp, gates=gates, out=out, workspace=workspace,
                          num_warps=num_warps, num_stages=num_stages,
                          blocks_per_iter=blocks_per_iter)
