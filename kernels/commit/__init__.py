from .fused import fused_commit
from .naive import (
    naive_commit,
    naive_read_cmp,
    naive_read_kv,
    naive_write_cmp,
    naive_write_kv,
)

__all__ = ["fused_commit", "naive_commit", "naive_read_cmp", "naive_read_kv", "naive_write_cmp",
           "naive_write_kv"]
