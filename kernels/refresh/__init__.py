"""The refresh kernels: compressed attention + Eq. 9 block scores + GQA group sum + forced
blocks + top-n selection of every verifier (or decode / prefill) row, in one pass over the
compressed cache. `score_topk` (per_row.py): one program per (row, KV head);
`score_topk_grouped` (grouped.py): one program per group of rows and split of the blocks.
The fp32 specification is kernels/compression/naive.py + kernels/selection/naive.py."""
from .args import ProvisionalTokens, RefreshArgs
from .grouped import (
    default_refresh_splits,
    refresh_groups,
    refresh_rows,
    refresh_workspace,
    score_topk_grouped,
)
from .per_row import score_topk

__all__ = ["ProvisionalTokens", "RefreshArgs", "default_refresh_splits", "refresh_groups",
           "refresh_rows", "refresh_workspace", "score_topk", "score_topk_grouped"]
