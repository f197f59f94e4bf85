"""EXACT_MERGED verification (docs/DESIGN.md section 4): queries flattened (CHAIN / BFS / DFS) and cut into
groups of C; a program's Q tile is C queries x G heads. The group's C sorted selections are
merged on the device into one ascending union with a per-block ownership bitmask
(kernels/common/index.py); the verify kernel reads each union block, the committed window
and the draft tail once per group and masks non-owned blocks to -inf per row. Equal to
INDEPENDENT up to accumulation order.
"""
from __future__ import annotations

import torch

from ..common.index import merge_group_selections
from ..fused.args import VerifyArgs
from ..fused.verify import nsa_verify_fwd


def exact_merged_verify(a: VerifyArgs,
                        union_buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        **knobs) -> torch.Tensor:
    """Grouped exact verification.

    Args:
        a (VerifyArgs): as `independent_verify`, geo built with group_size C (1..64) and
            shared=False.
        union_buf: fixed (idx, own, cnt) buffers for `merge_group_selections`  # mutable
        knobs: `nsa_verify_fwd` launch knobs (num_warps, num_stages, blocks_per_iter).
    Returns:
        a.out [Nq, HQ, D]. Two launches (+1 merge when split): union, fused verify. Graph safe.
    """
    geo = a.geo
    union = merge_group_selections(a.sel, geo.sel_src, geo.g_start, geo.g_len, geo.C,
                                   out=union_buf)
    return nsa_verify_fwd(a, union=union, **knobs)
