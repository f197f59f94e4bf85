"""INDEPENDENT verification: every verifier query is its own NSA decode row (the baseline).

Engineered like the merged schedule (fused branches, paged reads, split-KV + merge): a program
owns one query x G heads of one KV head ([G padded to 16, D] Q tile) and reads that query's own
topn blocks straight from `sel`, its window and the draft tail. Each query re-reads the blocks
and window it shares with its tree neighbours: that re-read is what EXACT_MERGED removes.
"""
from __future__ import annotations

import torch

from ..fused.args import VerifyArgs
from ..fused.verify import nsa_verify_fwd


def independent_verify(a: VerifyArgs, **knobs) -> torch.Tensor:
    """Selected + window + combine for each query on its own.

    Args:
        a (VerifyArgs): q [Nq, HQ, D]; k_new, v_new [Nq, HKV, D] draft-tail KV; k_cache,
            v_cache [num_pages, page_size, HKV, D]; sel [Nq, HKV, topn] int32 sorted
            ascending, -1 padded; geo built with group_size 1; o_cmp [Nq, HQ, D],
            gates [Nq, HQ, 3]: gated combine only; out [Nq, HQ, D]  # mutable
        knobs: `nsa_verify_fwd` launch knobs (num_warps, num_stages, blocks_per_iter).
    Returns:
        a.out. CUDA-graph safe.
    """
    if a.geo.C != 1:
        raise ValueError(f"independent_verify needs a geometry with group_size 1, got {a.geo.C}")
    return nsa_verify_fwd(a, **knobs)
