"""EAGLE / EAGLE-3 drafter (`--draft eagle:DIR`): a draft head fed by the target's hidden
states (docs/DESIGN.md section 8; the head itself is `specsa.model.eagle`).

The head keeps one row per committed target position p: (token p + 1, target feature of p),
so after a step that committed positions P..P'-1 it appends exactly those rows, the way
SGLang's draft extend does. The target hands its features over through
`observe_target(rid, pending, nodes)`, which the loop calls after every commit (prefill
chunks, then each verified tree's committed path); the loading step told the target which
features to return (`NSADecoder.set_hidden_capture`).

`propose` appends the missing committed rows (one batched head forward; its last row gives
the root's children), then grows the tree depth by depth like the model drafter (EAGLE-2
expansion: `ModelDrafter._expand` / `_finish`, the same scores, shapes, sampled chains with
q): each depth is one head forward over the draft nodes expanded so far, a node's feature
being its parent row's output hidden state (the root's parent row is the last committed one).
Nothing of a draft is ever stored.
"""
from __future__ import annotations

from typing import Sequence

import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import BlockInput, NSADecoder, PendingKV
from specsa.model.eagle import EagleHead
from specsa.runtime.drafters.base import Draft, DraftError, DraftRequest, synced_prefix
from specsa.runtime.drafters.model import ModelDrafter, _Expansion
from specsa.draft_tree import TreeSpec


class EagleDrafter(ModelDrafter):
    def __init__(self, head: EagleHead, target: NSADecoder, spec: TreeSpec,
                 sampling: SamplingConfig, cache: CacheConfig | None = None,
                 generator: torch.Generator | None = None):
        # ModelDrafter's _expand / _finish / sample_chain read spec, sampling, gen, vocab_size
        self.model, self.spec, self.sampling, self.gen = head, spec, sampling, generator
        self.target = target
        self.vocab_size = target.cfg.vocab_size
        self.cache = head.new_cache()            # head rows: dense, per request, no paging
        self.cached: dict[int, list[int]] = {}   # rid -> token of each committed head row
        # rid -> (first position, [feature rows]) of committed target positions whose head row
        # is not appended yet; the last appended row's feature is kept (a re-sync recomputes it)
        self.features: dict[int, tuple[int, list[torch.Tensor]]] = {}

    # -- protocol -------------------------------------------------------------------------
    def observe_target(self, rid: int, pending: PendingKV, nodes: Sequence[int] | None = None
                       ) -> None:
        """The target committed `nodes` (a root-first path; None: the whole chain block) of
        rid's block in `pending`: keep their features for the head rows of those positions."""
        if pending.hidden is None:
            raise DraftError("EAGLE drafter: the target returned no hidden states (was its "
                             "capture reset? load_eagle_head sets it)")
        meta = pending.blocks[rid]
        idx = list(range(meta.num_nodes)) if nodes is None else list(nodes)
        if not idx:
            return
        rows = pending.hidden[torch.tensor([meta.offset + i for i in idx],
                                           device=pending.hidden.device)]
        start, have = self.features.get(rid, (meta.prefix_len, []))
        if start + sum(r.shape[0] for r in have) != meta.prefix_len:
            raise DraftError(f"EAGLE drafter: request {rid}: target features arrive for "
                             f"position {meta.prefix_len}, expected "
                             f"{start + sum(r.shape[0] for r in have)}")
        self.features[rid] = (start, have + [rows])

    def observe(self, rid: int, context: Sequence[int]) -> None:
        return None

    def release(self, rid: int) -> None:
        self.cached.pop(rid, None)
        self.features.pop(rid, None)
        if self.cache.has(rid):
            self.cache.free_request(rid)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        roots = self._sync(requests)
        exps = [_Expansion(req=r, tok=[r.root], par=[-1], score=[0.0]) for r in requests]
        outs: list[dict[int, torch.Tensor]] = []
        for e, (logits, hidden) in zip(exps, roots):
            outs.append({0: hidden})      # the root's children read the last committed row's
            self._expand(e, logits[None])
        for _ in range(self.spec.depth - 1):
            blocks, feats = [], []
            for e, out in zip(exps, outs):
                rows = e.expanded[1:]
                where = {p: i for i, p in enumerate(rows)}
                blocks.append(BlockInput(e.req.rid, [e.tok[p] for p in rows],
                                         [where.get(e.par[p], -1) for p in rows]))
                feats.append(torch.stack([out[e.par[p]] for p in rows]))
            logits, hidden = self.model(self.cache, blocks, torch.cat(feats))
            off = 0
            for e, out, b in zip(exps, outs, blocks):
                rows = e.expanded[1:]
                for i, p in enumerate(rows):
                    out[p] = hidden[off + i]
                self._expand(e, logits[torch.tensor([off + rows.index(u) for u in e.frontier])])
                off += len(rows)
        return [self._finish(e) for e in exps]

    # -- steps ----------------------------------------------------------------------------
    def _sync(self, requests: Sequence[DraftRequest]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Append the head rows of every committed position not in the head cache yet (row p:
        token context[p + 1], target feature of p) and return each request's last row's
        (logits, hidden): the root's children and their feature."""
        blocks, feats = [], []
        for r in requests:
            P = r.prefix_len
            if P < 1:
                raise DraftError(f"EAGLE drafter: request {r.rid} has no committed token")
            want = list(r.context[1:P + 1])
            keep = synced_prefix(self.cache, self.cached, r.rid, want)
            have = self.cached[r.rid]
            keep = min(keep, P - 1)           # the last row is recomputed for its output
            start, rows = self.features.get(r.rid, (0, []))
            feat = torch.cat(rows) if rows else None
            if feat is None or start > keep or start + feat.shape[0] < P:
                end = start + (0 if feat is None else feat.shape[0])
                raise DraftError(
                    f"EAGLE drafter: request {r.rid} needs the target's hidden states of "
                    f"positions {keep}..{P - 1}, has {start}..{end - 1} (run it through "
                    "speculative_generate, which passes them on with observe_target)")
            if keep < len(have):
                self.cache.rollback(r.rid, keep)
                del have[keep:]
            blocks.append(BlockInput(r.rid, want[keep:]))
            feats.append(feat[keep - start:P - start])
            self.features[r.rid] = (P - 1, [feat[P - 1 - start:P - start]])
        logits, hidden = self.model(self.cache, blocks, torch.cat(feats), last_only=True,
                                    commit=True)
        for b in blocks:
            self.cached[b.rid].extend(int(t) for t in b.tokens)
        return [(logits[i], hidden[i]) for i in range(len(blocks))]
