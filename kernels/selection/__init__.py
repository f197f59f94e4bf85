from .naive import forced_blocks, naive_selected_attention, naive_topk

__all__ = ["forced_blocks", "naive_selected_attention", "naive_topk"]
from .exact_merged import exact_merged_verify
from .independent import independent_verify
from .shared_index import shared_index_verify

__all__ += ["exact_merged_verify", "independent_verify", "shared_index_verify"]
