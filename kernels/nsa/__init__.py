from .masked import TreeVisibility, build_tree_visibility, masked_nsa, provisional_cmp
from .naive import naive_nsa_prefill, naive_nsa_query, naive_nsa_tree

__all__ = ["TreeVisibility", "build_tree_visibility", "masked_nsa", "naive_nsa_prefill",
           "naive_nsa_query", "naive_nsa_tree", "provisional_cmp"]
