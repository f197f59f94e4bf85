"""SHARED_INDEX verification (approximate; APPROX precision classes only): every query of a
group uses its representative's (deepest query's) selected blocks. Implemented as
EXACT_MERGED over a geometry whose selection sources all point at the representative
(`build_geometry(..., shared=True)`): the union is the representative's list, owned by all.
"""
from __future__ import annotations

import torch

from ..fused.args import VerifyArgs
from .exact_merged import exact_merged_verify


def shared_index_verify(a: VerifyArgs,
                        union_buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        **knobs) -> torch.Tensor:
    """Args / Returns: as `exact_merged_verify` (a.geo built with shared=True)."""
    return exact_merged_verify(a, union_buf=union_buf, **knobs)
