from .naive import forced_blocks, naive_selected_attention, naive_topk

__all__ = ["forced_blocks", "naive_selected_attention", "naive_topk"]
