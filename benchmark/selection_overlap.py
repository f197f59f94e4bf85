"""Selected-block overlap between verifier queries (what the grouped kernels exploit).

`SelectionRecorder` records, for every tree-verification forward of a target model, each
request's NSA selections sel [L, T, Hkv, topn] (block indices, -1 padded) in verification
order. `overlap_by_layer` then measures, per layer, how many of a query's selected blocks
its neighbour also selected: for adjacent verifier queries (consecutive slots of the
flattened tree) and for parent-child pairs.

    with SelectionRecorder(model) as rec:
        speculative_generate(model, prompts, drafter, sampling)
    overlap_by_layer(rec.records)["adjacent"]["shared_fraction"]   # one value per layer

How it records: the model's CPU path computes sel in `masked_nsa` and drops it, so the
recorder wraps `specsa.model.nsa_layer.masked_nsa` (calls arrive layer-major, one per request
view) and this model instance's `forward` (to know the batch and to skip prefill /
last_only forwards and forwards of other model objects such as a draft view). Because it
patches the model module for the duration of a `with` block, it lives beside the benchmark
that uses it (benchmark/spec_cpu.py), not in the package; a `record_selections` flag on
NSADecoder.forward would make this official.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VerifyRecord:
    rid: int
    parents: tuple[int, ...]
    sel: torch.Tensor            # [L, T, Hkv, topn] int64, -1 padded


class SelectionRecorder:
    def __init__(self, model):
        self.model = model
        self.records: list[VerifyRecord] = []
        self._buf: list[torch.Tensor] | None = None

    def __enter__(self) -> "SelectionRecorder":
        import specsa.model.nsa_layer as attn

        self._attn, self._orig_nsa = attn, attn.masked_nsa
        orig_forward = self.model.forward

        def nsa(*a, **kw):
            o, sel = self._orig_nsa(*a, **kw)
            if self._buf is not None:
                self._buf.append(sel.detach().to("cpu", torch.int64))
            return o, sel

        def forward(cache, blocks, *, last_only: bool = False, **kw):
            if last_only:
                return orig_forward(cache, blocks, last_only=last_only, **kw)
            self._buf = []
            try:
                out = orig_forward(cache, blocks, last_only=last_only, **kw)
            finally:
                buf, self._buf = self._buf, None
            self._store(blocks, buf)
            return out

        attn.masked_nsa = nsa
        self.model.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        self._attn.masked_nsa = self._orig_nsa
        del self.model.forward      # back to the class method

    def _store(self, blocks, buf: list[torch.Tensor]) -> None:
        b = len(blocks)
        if not buf or len(buf) % b:
            return
        layers = len(buf) // b
        for i, blk in enumerate(blocks):
            n = len(blk.tokens)
            par = (tuple(range(-1, n - 1)) if blk.parents is None
                   else tuple(int(x) for x in torch.as_tensor(blk.parents).tolist()))
            sel = torch.stack([buf[l * b + i] for l in range(layers)])
            self.records.append(VerifyRecord(rid=blk.rid, parents=par, sel=sel))


def _pair_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [Hkv, topn] (-1 padded) -> per head (|A∩B| / |B|, |A∩B| / |A∪B|)."""
    inter = ((b.unsqueeze(-1) == a.unsqueeze(-2)) & (b.unsqueeze(-1) >= 0)).any(-1).sum(-1)
    na, nb = (a >= 0).sum(-1), (b >= 0).sum(-1)
    union = na + nb - inter
    return inter / nb.clamp(min=1), inter / union.clamp(min=1)


def overlap_by_layer(records: list[VerifyRecord]) -> dict:
    """Per layer means over all pairs and KV heads of shared_fraction = |A∩B|/|B| (B the later
    query) and jaccard, for adjacent slots and for parent-child pairs; plus pair counts."""
    out = {}
    if not records:
        return out
    L = records[0].sel.shape[0]
    for kind in ("adjacent", "parent_child"):
        shared = torch.zeros(L, dtype=torch.float64)
        jac = torch.zeros(L, dtype=torch.float64)
        pairs = 0
        for r in records:
            T = r.sel.shape[1]
            if kind == "adjacent":
                idx = [(u - 1, u) for u in range(1, T)]
            else:
                idx = [(p, u) for u, p in enumerate(r.parents) if p >= 0]
            for a, b in idx:
                for l in range(L):
                    s, j = _pair_stats(r.sel[l, a], r.sel[l, b])
                    shared[l] += s.double().mean()
                    jac[l] += j.double().mean()
            pairs += len(idx)
        d = max(pairs, 1)
        out[kind] = {"pairs": pairs, "shared_fraction": (shared / d).tolist(),
                     "jaccard": (jac / d).tolist(),
                     "shared_fraction_mean": float((shared / d).mean()),
                     "jaccard_mean": float((jac / d).mean())}
    return out
