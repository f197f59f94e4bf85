"""The drafter protocol shared by every drafter, and the draft it returns.

The loop calls, per step, `propose(requests)` with each request's full token context (prompt
+ emitted tokens; the last one is the root, whose KV is not cached yet) and gets one `Draft`
per request. After acceptance it calls `observe(rid, context)` with the new context so a
stateful drafter (a draft model with its own KV cache) can roll back to what was kept, and
`release(rid)` when the request finishes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from specsa.config import ConfigError
from specsa.draft_tree import DraftTree, TreeSpec


def synced_prefix(cache, cached: dict[int, list[int]], rid: int, want: list[int]) -> int:
    """How many leading tokens of `want` the draft cache already holds for `rid` (the longest
    common prefix with what it cached), registering `rid` with the cache on first sight."""
    if rid not in cached:
        cache.add_request(rid)
        cached[rid] = []
    have = cached[rid]
    keep = 0
    while keep < min(len(have), len(want)) and have[keep] == want[keep]:
        keep += 1
    return keep


class DraftError(ConfigError):
    """A drafter cannot be built or used with this target (spec, tokenizer, vocabulary)."""


@dataclass(frozen=True)
class DraftRequest:
    """rid: request id; context: all tokens so far (context[-1] is the root); prefix_len: the
    target's committed length (= len(context) - 1)."""

    rid: int
    context: tuple[int, ...]

    @property
    def prefix_len(self) -> int:
        return len(self.context) - 1

    @property
    def root(self) -> int:
        return self.context[-1]


@dataclass(frozen=True)
class Draft:
    """tree: the proposal below the root. draft_probs: [T, V] processed distribution q_u that
    node u's children were drawn from, or None when the children were chosen deterministically
    (top-k, lookup, oracle); acceptance then uses point-mass q, which keeps sampling exact.
    replacement: siblings were drawn i.i.d. (True) or without replacement (False)."""

    tree: DraftTree
    draft_probs: torch.Tensor | None = None
    replacement: bool = False


class Drafter(Protocol):
    vocab_size: int | None  # None: token-agnostic (lookup drafters)
    spec: TreeSpec          # draft shape; the orchestrator may change it between steps

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        ...

    def observe(self, rid: int, context: Sequence[int]) -> None:
        ...

    def release(self, rid: int) -> None:
        ...


class StatelessDrafter:
    """Base for drafters without per-request state."""

    vocab_size: int | None = None

    def observe(self, rid: int, context: Sequence[int]) -> None:
        return None

    def release(self, rid: int) -> None:
        return None


def trie_tree(root: int, prefix_len: int, branches: Sequence[Sequence[int]],
              max_tokens: int) -> DraftTree:
    """Merge token sequences into a trie below `root`, in the given priority order, stopping
    at `max_tokens` draft nodes. Shared prefixes become shared nodes (no duplicate siblings)."""
    toks, pars = [root], [-1]
    index: dict[tuple[int, int], int] = {}
    for seq in branches:
        u = 0
        for t in seq:
            key = (u, int(t))
            if key not in index:
                if len(toks) - 1 >= max_tokens:
                    break
                toks.append(int(t))
                pars.append(u)
                index[key] = len(toks) - 1
            u = index[key]
    return DraftTree(tokens=toks, parents=pars, prefix_len=prefix_len)
