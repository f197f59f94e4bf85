"""One request's new block of tokens: the unit every forward works on.

Every forward (prefill chunk, decode step, tree verification) gives each request a block of
new tokens with parents *inside the block*: a chain has parents [-1, 0, 1, ...], a decode
step is one token with parent -1, a draft tree is any parents with parents[u] < u. Node u
sits at position P + depth(u) (P = committed length) and sees the committed context, its
ancestors and itself (docs/DESIGN.md section 3); `specsa.kernels.nsa.build_tree_visibility`
turns (P, parents) into the masks.

Example: P = 6, parents [-1, 0, 0, 1] -> depth [0, 1, 1, 2], positions [6, 7, 7, 8]; node 3
sees positions 0..5, nodes 0, 1 and itself, never its uncle node 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class BlockError(ValueError):
    """Malformed block input; the message names the request and node."""


@dataclass(frozen=True)
class BlockInput:
    """New tokens of one request. tokens: [n] int; parents: [n] int within the block
    (parents[u] < u, -1 = child of the committed context) or None for a chain."""

    rid: int
    tokens: Sequence[int] | torch.Tensor
    parents: Sequence[int] | torch.Tensor | None = None


def as_list(x: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def normalise_parents(rid: int, n: int, parents) -> tuple[int, ...]:
    """Validated parents tuple; None -> chain."""
    if parents is None:
        return tuple(range(-1, n - 1))
    par = as_list(parents)
    if len(par) != n:
        raise BlockError(f"request {rid}: {len(par)} parents for {n} tokens")
    for u, p in enumerate(par):
        if not -1 <= p < u:
            raise BlockError(f"request {rid}: parent of node {u} is {p}; parents must precede "
                             f"their children (-1 <= parent < node)")
    return tuple(par)
