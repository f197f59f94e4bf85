from .naive import compress, compress_blocks, naive_block_scores, naive_cmp_attention, overlap_weights

__all__ = ["compress", "compress_blocks", "naive_block_scores", "naive_cmp_attention", "overlap_weights"]
from .blocks import compress_gather, compress_paged
from .score_topk import score_topk

__all__ += ["compress_gather", "compress_paged", "score_topk"]
from .score_topk_grouped import refresh_groups, refresh_workspace, score_topk_grouped

__all__ += ["refresh_groups", "refresh_workspace", "score_topk_grouped"]
