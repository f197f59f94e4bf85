"""Autoregressive NSA decode: one query per request (a one-node tree whose KV is passed as the
draft tail), selected + window + combine fused, split-KV so batch 1 still fills the GPU."""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from .args import VerifyArgs
from .geometry import build_geometry
from .verify import VerifyGeometry, nsa_verify_fwd


def decode_geometry(prefix_lens: list[int], block_table: torch.Tensor, params: NSAParams,
                    num_splits: int) -> VerifyGeometry:
    """Geometry for B decode rows; prefix_lens[b] = committed tokens before the new one."""
    b = len(prefix_lens)
    return build_geometry([[-1]] * b, list(prefix_lens), block_table, [[0]] * b, 1,
                          params.window, num_splits)


def fused_decode(a: VerifyArgs, **knobs) -> torch.Tensor:
    """Args:
        a (VerifyArgs): q [B, HQ, D]; k_new, v_new [B, HKV, D], the new token's KV (not yet in
            the cache); sel [B, HKV, topn] int32; geo `decode_geometry(...)`; o_cmp [B, HQ, D],
            gates [B, HQ, 3]: gated only; out [B, HQ, D]  # mutable
        knobs: `nsa_verify_fwd` launch knobs (num_warps, num_stages, blocks_per_iter).
    Returns:
        a.out. CUDA-graph safe.
    """
    return nsa_verify_fwd(a, **knobs)
