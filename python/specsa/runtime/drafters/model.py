"""Draft-model drafter: any causal LM with the target's vocabulary, including the target's
own first K layers (`self:K`, weights shared, no copy).

The draft model keeps its own paged KV cache holding each request's committed context.
`propose` first syncs it with the context (roll back to the longest common prefix, then
append the missing tokens in one batched forward), then grows the tree depth by depth; each
depth is one batched draft forward over the tree expanded so far (uncommitted: the forward
writes nothing, so rejected drafts need no rollback at all).

Expansion (EAGLE-2 style): every frontier node proposes its top-k tokens, scored by the
cumulative draft log-probability of the path; the best `topk` candidates of the depth become
the next frontier; at the end the best `tokens` candidates overall are kept (a child never
outscores its parent, so the kept set is a tree; ties go to the earlier candidate). Chains
(topk=1) under sampling instead draw each token from the processed draft distribution q and
return q, so acceptance is Leviathan/Chen rejection sampling; top-k trees are deterministic
and return no q (point-mass acceptance, still exact).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import BlockInput, NSADecoder
from specsa.runtime.drafters.base import Draft, DraftError, DraftRequest, synced_prefix
from specsa.runtime.sampling import filtered_probs
from specsa.draft_tree import DraftTree, TreeSpec


def truncated_view(model: NSADecoder, num_layers: int) -> NSADecoder:
    """The target's first `num_layers` layers + final norm + LM head, sharing every weight.

    Shallow copies of the two module containers with a shorter layer list; nothing is copied
    or re-allocated. (A `NSADecoder.truncated(k)` in specsa.model would make this official.)"""
    total = model.cfg.num_layers
    if not 1 <= num_layers <= total:
        raise DraftError(f"--draft self:{num_layers}: K must be in [1, {total}] (the target has "
                         f"{total} layers)")
    view = copy.copy(model)
    view.__dict__.pop("forward", None)   # an instance-level wrapper (e.g. a recorder) is not ours
    view._modules = dict(model._modules)
    backbone = copy.copy(model.model)
    backbone._modules = dict(model.model._modules)
    backbone.layers = nn.ModuleList(list(model.model.layers)[:num_layers])
    view.model = backbone
    view.cfg = replace(model.cfg, num_layers=num_layers)
    return view


@dataclass
class _Expansion:
    """One request's tree under construction: the candidate pool and the expanded subset."""

    req: DraftRequest
    tok: list[int]
    par: list[int]
    score: list[float]
    expanded: list[int] = field(default_factory=lambda: [0])   # pool ids in block order
    frontier: list[int] = field(default_factory=lambda: [0])
    q: dict[int, torch.Tensor] = field(default_factory=dict)    # pool id -> q (sampled chains)


class ModelDrafter:
    def __init__(self, model: NSADecoder, spec: TreeSpec, sampling: SamplingConfig,
                 cache: CacheConfig, generator: torch.Generator | None = None):
        self.model, self.spec, self.sampling, self.gen = model, spec, sampling, generator
        self.vocab_size = model.cfg.vocab_size
        self.cache = model.new_cache(cache)
        self.cached: dict[int, list[int]] = {}

    # -- protocol -------------------------------------------------------------------------
    def observe(self, rid: int, context: Sequence[int]) -> None:
        return None   # synced lazily in propose (one batched catch-up forward)

    def release(self, rid: int) -> None:
        if rid in self.cached:
            self.cache.free_request(rid)
            del self.cached[rid]

    @property
    def sample_chain(self) -> bool:
        """Sampled chains carry q for exact rejection sampling; trees draft top-k (point-mass
        q). A property, so a planner that changes `spec` between steps stays exact."""
        return self.spec.is_chain and not self.sampling.greedy

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        self._sync(requests)
        exps = [_Expansion(req=r, tok=[r.root], par=[-1], score=[0.0]) for r in requests]
        for _ in range(self.spec.depth):
            blocks = []
            for e in exps:
                where = {p: i for i, p in enumerate(e.expanded)}
                blocks.append(BlockInput(e.req.rid, [e.tok[p] for p in e.expanded],
                                         [where.get(e.par[p], -1) for p in e.expanded]))
            logits, _ = self.model(self.cache, blocks)
            off = 0
            for e, b in zip(exps, blocks):
                rows = torch.tensor([off + e.expanded.index(u) for u in e.frontier])
                self._expand(e, logits[rows])
                off += len(b.tokens)
        return [self._finish(e) for e in exps]

    # -- steps ----------------------------------------------------------------------------
    def _sync(self, requests: Sequence[DraftRequest]) -> None:
        """Make the draft cache hold exactly context[:-1] for every request."""
        blocks = []
        for r in requests:
            want = list(r.context[:-1])
            keep = synced_prefix(self.cache, self.cached, r.rid, want)
            have = self.cached[r.rid]
            if keep < len(have):
                self.cache.rollback(r.rid, keep)
                del have[keep:]
            if keep < len(want):
                blocks.append(BlockInput(r.rid, want[keep:]))
        if blocks:
            _, pending = self.model(self.cache, blocks, last_only=True)
            for b in blocks:
                self.cache.commit(b.rid, pending)
                self.cached[b.rid].extend(int(t) for t in b.tokens)

    def _expand(self, e: _Expansion, logits: torch.Tensor) -> None:
        """logits [len(frontier), V] -> candidates appended to the pool, next frontier."""
        logits = logits.float().cpu()   # tiny [k, V]; host-side tree building, CPU generator
        if self.sampling.greedy:
            logp = torch.log_softmax(logits.float(), dim=-1)
        else:
            q = filtered_probs(logits, self.sampling.temperature, self.sampling.top_k,
                               self.sampling.top_p)
            logp = q.log()
        cands = []
        for i, u in enumerate(e.frontier):
            if self.sample_chain:
                x = int(torch.multinomial(q[i], 1, generator=self.gen))
                e.q[u] = q[i]
                picks = [(x, float(logp[i, x]))]
            else:
                k = min(self.spec.topk, logp.shape[-1])
                val, idx = torch.topk(logp[i], k)   # descending; ties to the lower id
                picks = [(int(x), float(v)) for x, v in zip(idx, val) if v > float("-inf")]
            for x, lp in picks:
                e.tok.append(x)
                e.par.append(u)
                e.score.append(e.score[u] + lp)
                cands.append(len(e.tok) - 1)
        best = sorted(cands, key=lambda c: (-e.score[c], c))[:self.spec.topk]
        e.frontier = sorted(best)
        e.expanded.extend(e.frontier)

    def _finish(self, e: _Expansion) -> Draft:
        keep = sorted(sorted(range(1, len(e.tok)), key=lambda c: (-e.score[c], c))
                      [:self.spec.tokens])
        ids = [0] + keep
        where = {p: i for i, p in enumerate(ids)}
        tree = DraftTree(tokens=[e.tok[p] for p in ids],
                         parents=[-1] + [where[e.par[p]] for p in keep],
                         prefix_len=e.req.prefix_len)
        if not self.sample_chain:
            return Draft(tree=tree)
        q = torch.zeros(len(ids), self.vocab_size)
        for i, p in enumerate(ids):
            if p in e.q:
                q[i] = e.q[p]
        return Draft(tree=tree, draft_probs=q)
