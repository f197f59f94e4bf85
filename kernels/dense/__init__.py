from .naive import naive_dense_tree
from .tree_verify import dense_tree_verify

__all__ = ["dense_tree_verify", "naive_dense_tree"]
