"""Dense paged tree verification (the dense baseline): every committed token unmasked, the draft
tail under the ancestor mask, groups of C queries sharing each KV read, split-KV + merge.

It is the fused NSA kernel (kernels/fused/verify.py) in its DENSE mode: pass 2 over [0, P) with
no window mask and pass 3 with the tree mask, so paging, masking and the merge are shared code.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..fused.args import SplitWorkspace, VerifyArgs
from ..fused.verify import VerifyGeometry, nsa_verify_fwd


def dense_tree_verify(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, geo: VerifyGeometry,
                      scale: float, out: torch.Tensor | None = None,
                      workspace: SplitWorkspace | None = None) -> torch.Tensor:
    """Dense tree attention.

    Args:
        q (torch.Tensor): [Nq, HQ, D]; k_new, v_new: [Nq, HKV, D] (draft tail, request-major).
        k_cache, v_cache (torch.Tensor): [num_pages, page_size, HKV, D].
        geo (VerifyGeometry): from `build_geometry` (any group size; window ignored).
        out: [Nq, HQ, D]  # mutable
    Returns:
        out [Nq, HQ, D]. CUDA-graph safe.
    """
    # the dense mode uses no selection, window or gates: any ungated parameter set serves
    a = VerifyArgs(q, k_new, v_new, k_cache, v_cache, geo, NSAParams(gated=False), scale,
                   out=out, workspace=workspace)
    return nsa_verify_fwd(a, dense=True)
