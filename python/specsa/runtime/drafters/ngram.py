"""Prompt-lookup (n-gram) drafter: propose what followed earlier occurrences of the context's
last n tokens (n = N .. 1, longest match first, most recent occurrence first).

Free to run and strong on repetitive text (code, quoting, summaries of the prompt). A chain
takes the best match's continuation; a tree merges the distinct continuations of up to
`topk` matches into a trie (shared prefixes share nodes). Drafts are deterministic, so
sampling acceptance uses point-mass q (see specsa.runtime.accept).
"""
from __future__ import annotations

from typing import Sequence

from specsa.runtime.drafters.base import Draft, DraftError, DraftRequest, StatelessDrafter, trie_tree
from specsa.draft_tree import TreeSpec


class NGramDrafter(StatelessDrafter):
    def __init__(self, n: int, spec: TreeSpec):
        if not isinstance(n, int) or n < 1:
            raise DraftError(f"--draft ngram:N: N must be a positive integer, got {n!r}")
        self.n, self.spec = n, spec

    def continuations(self, ctx: Sequence[int]) -> list[list[int]]:
        """Up to topk distinct continuations of length <= depth, best first."""
        depth, want = self.spec.depth, self.spec.topk
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        L = len(ctx)
        for k in range(min(self.n, L - 1), 0, -1):
            suffix = list(ctx[L - k:])
            first = suffix[0]
            # i = start of an earlier occurrence; its continuation must start before L
            for i in range(L - k - 1, -1, -1):
                if ctx[i] != first or list(ctx[i:i + k]) != suffix:
                    continue
                cont = list(ctx[i + k:i + k + depth])
                key = tuple(cont)
                if cont and key not in seen:
                    seen.add(key)
                    found.append(cont)
                    if len(found) >= want:
                        return found
        return found

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(tree=trie_tree(r.root, r.prefix_len, self.continuations(r.context),
                                     self.spec.tokens)) for r in requests]
