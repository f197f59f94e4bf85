"""NSA geometry as the kernels see it: plain numbers, no enums, no validation.

`specsa.config.NSAConfig` is the validated user-facing config; `NSAConfig.params` turns it
into this. Kernels never import `specsa.config` (dependencies point one way: kernels <- specsa).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NSAParams:
    block: int = 32          # compression block l
    stride: int = 16         # compression stride d
    select: int = 64         # selection block l'
    topn: int = 16           # selected blocks n, forced ones included
    init_blocks: int = 1     # forced leading blocks (block 0 ..)
    local_blocks: int = 2    # forced trailing blocks (the block holding t and the one before)
    window: int = 512        # sliding window w
    gated: bool = False      # True: gated combine of three branches; False: union softmax

    # -- derived geometry shared by every path ------------------------------------------
    def num_cmp(self, length: int) -> int:
        """Number of compressed tokens that exist for a sequence of `length` tokens
        (token i exists iff i*d + l <= length)."""
        return 0 if length < self.block else (length - self.block) // self.stride + 1

    def num_sel(self, length: int) -> int:
        """Number of candidate selection blocks for `length` tokens (j*l' <= length-1)."""
        return (length + self.select - 1) // self.select

    def cmp_per_page(self, page_size: int) -> int:
        """Compressed tokens stored per KV page (see docs/CONTRACTS.md, compressed cache)."""
        return -(-page_size // self.stride)

    def first_cmp_in_page(self, logical_page: int, page_size: int) -> int:
        """Index of the first compressed token whose closing position falls in `logical_page`."""
        lo = logical_page * page_size - (self.block - 1)
        return max(0, -(-lo // self.stride))
