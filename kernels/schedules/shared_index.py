"""SHARED_INDEX verification (approximate; APPROX precision classes only): every query of a
group uses its representative's (deepest query's) selected blocks. Implemented as
EXACT_MERGED over a geometry whose selection sources all point at the representative
(`build_geometry(..., shared=True)`): the union is the representative's list, owned by all.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..fused.verify import VerifyGeometry
from .exact_merged import exact_merged_verify


def shared_index_verify(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, sel: torch.Tensor,
                        geo: VerifyGeometry, params: NSAParams, scale: float,
                        o_cmp: torch.Tensor | None = None, gates: torch.Tensor | None = None,
                        out: torch.Tensor | None = None,
                        workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                        union_buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """Args / Returns: as `exact_merged_verify` (geo built with shared=True)."""
    return exact_merged_verify(q, k_new, v_new, k_cache, v_cache, sel, geo, params, scale,
                               o_cmp=o_cmp, gates=gates, out=out, workspace=workspace,
                               union_buf=union_buf)
