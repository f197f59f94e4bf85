"""BENCHMARK-ONLY oracle drafter: it is told each request's autoregressive continuation and
drafts it correctly with a controlled probability, so benchmarks can sweep the acceptance
rate independently of any real drafter. Never use it to generate text.

Along the main path each drafted token is the true next token with probability
`accept_prob` (independently), else a wrong one ((true + 1) mod V); under greedy
verification the accepted length is then geometric. A tree adds wrong siblings along the
main path (topk - 1 per level, until `tokens` nodes). Off the oracle sequence (after a
sampled deviation, or past its end) it proposes nothing, which is still valid: the verify
step then emits just the target's own token.
"""
from __future__ import annotations

import random
from typing import Sequence

from specsa.runtime.drafters.base import Draft, DraftError, DraftRequest, StatelessDrafter
from specsa.draft_tree import DraftTree, TreeSpec


class OracleDrafter(StatelessDrafter):
    def __init__(self, accept_prob: float, spec: TreeSpec, vocab_size: int, seed: int = 0):
        if not 0.0 <= accept_prob <= 1.0:
            raise DraftError(f"--draft oracle:P: P must be in [0, 1], got {accept_prob!r}")
        self.p, self.spec, self.vocab_size = accept_prob, spec, vocab_size
        self.rng = random.Random(seed)
        self.truth: dict[int, list[int]] = {}

    def set_truth(self, rid: int, tokens: Sequence[int]) -> None:
        """The full AR token sequence (prompt + continuation) of request `rid`."""
        self.truth[rid] = [int(t) for t in tokens]

    def release(self, rid: int) -> None:
        self.truth.pop(rid, None)

    def _propose_one(self, r: DraftRequest) -> Draft:
        seq, m, V = self.truth.get(r.rid), len(r.context), self.vocab_size
        if seq is None or seq[:m] != list(r.context):
            return Draft(tree=DraftTree(tokens=[r.root], parents=[-1], prefix_len=r.prefix_len))
        true = seq[m:m + self.spec.depth]
        toks, pars, u = [r.root], [-1], 0
        for t in true:
            if len(toks) > self.spec.tokens:
                break
            main = t if self.rng.random() < self.p else (t + 1) % V
            toks.append(main)
            pars.append(u)
            nxt = len(toks) - 1
            for j in range(1, self.spec.topk):   # wrong siblings: never the true token
                if len(toks) > self.spec.tokens:
                    break
                toks.append((t + 1 + j) % V)
                pars.append(u)
            u = nxt
        return Draft(tree=DraftTree(tokens=toks, parents=pars, prefix_len=r.prefix_len))

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [self._propose_one(r) for r in requests]
