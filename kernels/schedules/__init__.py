"""Verification schedules over the fused verify kernel (docs/DESIGN.md section 4):
INDEPENDENT (each query its own selection), EXACT_MERGED (a group reads the union of its
queries' selections once, per-query ownership masks), SHARED_INDEX (a group attends with one
representative's selection)."""
from .exact_merged import exact_merged_verify
from .independent import independent_verify
from .shared_index import shared_index_verify

__all__ = ["exact_merged_verify", "independent_verify", "shared_index_verify"]
