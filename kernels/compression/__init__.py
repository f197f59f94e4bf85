from .naive import (
    compress,
    compress_blocks,
    naive_block_scores,
    naive_cmp_attention,
    overlap_weights,
)

__all__ = ["compress", "compress_blocks", "naive_block_scores", "naive_cmp_attention", "overlap_weights"]
from .blocks import compress_gather, compress_paged

__all__ += ["compress_gather", "compress_paged"]
