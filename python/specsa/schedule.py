"""Verification schedule geometry on the host: lay a draft tree out flat (CHAIN / BFS / DFS,
`specsa.draft_tree.traversal_order`) and cut the flat order into groups of C verifier queries (docs/DESIGN.md section 4). Pure functions of the tree shape;
`specsa.verifier.NSAVerifier.prepare` calls them once per step.

Why the order matters: EXACT_MERGED reads the union of a group's selections once, so adjacent
queries should share blocks. BFS puts siblings together (same position, near-identical
selections); DFS puts parent and child together (the child's selection extends the parent's).
"""
from __future__ import annotations

from typing import Sequence

import torch

from specsa.config import ConfigError, Schedule, Traversal
from specsa.kernels.common.tree import (MAX_TREE_NODES, TreeError, node_depths, rooted_parents,
                                        traversal_order)

# Q-tile rows per program (C x G). Every row computes every union block, so rows cost MMA work
# growing with C while the bytes saved per query shrink. Measured on the H200 (64K, overlap
# 0.5, bf16, benchmark/results/h200/kernels.json "tuning"): 16 rows win for T <= 16 and at
# batch 1; 64 rows win for many queries (B=16, T=64: 698 vs 823 us).
ROWS_SMALL, ROWS_LARGE, LARGE_STEP = 16, 64, 512
# Steps of at most this many verifier queries (all requests together) run INDEPENDENT: a 4-query
# step is one 16-row tile either way, and EXACT_MERGED's union launch and ownership masks cost
# more than they save (H200, benchmark/results/h200/kernels.json "grid", 16K-128K: T=4 batch 1
# 23.4-24.0 us INDEPENDENT vs 32.3-32.7 us EXACT_MERGED; T=4 batch 16 and T=16 batch 1 are
# faster merged: 90-93 vs 104-105 us, 37.7-39.4 vs 42.8-44.1 us).
SMALL_STEP_QUERIES = 8


def as_parents(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """Plain list of parent indices, validated: parents[0] = -1, parents[u] < u."""
    try:
        return rooted_parents(parents)
    except TreeError as e:
        raise ConfigError(str(e)) from None


def flat_orders(parents: Sequence[list[int]], traversal: Traversal) -> list[list[int]]:
    """Per tree, the flat order its verifier queries take (`traversal_order`); a traversal the
    tree cannot take (CHAIN on a branching tree) is a configuration error."""
    try:
        return [traversal_order(p, traversal) for p in parents]
    except TreeError as e:
        raise ConfigError(str(e)) from None


def cut_groups(order: list[int], group_size: int) -> list[list[int]]:
    """Consecutive groups of at most C flat slots (the last one may be shorter)."""
    if group_size < 1:
        raise ConfigError(f"group size must be >= 1, got {group_size}")
    return [order[i:i + group_size] for i in range(0, len(order), group_size)]


def default_group_size(gqa: int, num_queries: int = 1) -> int:
    """C such that C x G fills (without overflowing) the Q tile chosen for this step size."""
    rows = ROWS_LARGE if num_queries >= LARGE_STEP else ROWS_SMALL
    return max(1, min(MAX_TREE_NODES, rows // gqa))


def default_schedule(num_queries: int) -> Schedule:
    """The exact schedule (STRICT) for a verification step of `num_queries` queries."""
    return Schedule.INDEPENDENT if num_queries <= SMALL_STEP_QUERIES else Schedule.EXACT_MERGED


def default_num_splits(num_programs: int, work_tiles: int, num_sms: int) -> int:
    """Split-KV factor: enough programs for two waves of the GPU, at least 2 tiles per split."""
    if num_sms <= 0:
        return 1
    want = -(-2 * num_sms // max(1, num_programs))
    return int(max(1, min(want, work_tiles // 2, 16)))


def shared_sources(par: list[int], traversal: Traversal, group_size: int) -> list[int]:
    """SHARED_INDEX: for every node, the node whose selection it attends with (its group's
    representative): groups of C consecutive nodes in the flat order, representative = the
    deepest member, ties to the latest in the order (as `build_geometry(..., shared=True)`
    in kernels/fused/geometry.py, which the Triton verifier runs).

    Example: chain of 4, C=2 -> [1, 1, 3, 3]; parents [-1, 0, 0, 1], BFS, C=2 -> groups
    [0, 1], [2, 3] -> [1, 1, 3, 3].
    """
    dep = node_depths(par)
    src = list(range(len(par)))
    for group in cut_groups(flat_orders([par], traversal)[0], group_size):
        rep = max(group[::-1], key=lambda u: dep[u])
        for u in group:
            src[u] = rep
    return src
