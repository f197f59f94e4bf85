"""Host-side geometry of provisional compressed tokens: the compression blocks that close inside
a draft tree (docs/DESIGN.md section 2). Shared by the runtime's Triton forward
(`build_triton_forward`) and the SGLang Triton backend, which differ only in how a committed
position names its KV source."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from specsa.kernels.common.params import NSAParams
from specsa.kernels.common.tree import node_depths


def closing_blocks(parents: Sequence[int], prefix_len: int, params: NSAParams,
                   committed: Callable[[int], int], tail_offset: int
                   ) -> list[tuple[list[int], int] | None]:
    """Per tree node v: (the l sources of the block closing at v, oldest first; its compressed
    index i) or None when no block closes at v. A source is `committed(t)` for a committed
    position t < prefix_len, else the tail row -1 - (tail_offset + u) of v's ancestor u."""
    l, d = params.block, params.stride
    depth = node_depths(parents)
    out: list[tuple[list[int], int] | None] = []
    for v, dv in enumerate(depth):
        pos = prefix_len + dv
        e = pos - l + 1
        if e < 0 or e % d:
            out.append(None)
            continue
        src, cur = [], v
        for t in range(pos, e - 1, -1):                  # newest first
            if t >= prefix_len:
                src.append(-1 - (tail_offset + cur))
                cur = parents[cur]
            else:
                src.append(committed(t))
        out.append((src[::-1], e // d))
    return out


def visible_rows(parents: Sequence[int], row_of: dict[int, int]) -> list[list[int]]:
    """Per node u: the provisional rows (`row_of[w]`) of u and its ancestors, oldest first."""
    rows = []
    for u in range(len(parents)):
        seen, cur = [], u
        while cur >= 0:
            if cur in row_of:
                seen.append(row_of[cur])
            cur = parents[cur]
        rows.append(seen[::-1])
    return rows
