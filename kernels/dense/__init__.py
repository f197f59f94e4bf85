from .naive import naive_dense_tree
from .tree_verify import dense_tree_verify

__all__ = ["naive_dense_tree", "dense_tree_verify"]
