"""Acceptance: which path of a verified draft tree is kept, and the bonus token after it.

Greedy (temperature 0): walk from the root; at node u the target's argmax is the next
token; if a child of u carries it, accept that child and continue, else emit the argmax as
the bonus token and stop. The emitted tokens are then exactly what greedy autoregressive
decoding emits.

Sampling: recursive multi-draft rejection sampling (SpecInfer "multi-step speculative
sampling"; Leviathan et al. / Chen et al. when every node has one child). At node u with
target distribution p and draft distribution q (both after temperature / top-k / top-p,
applied identically):
    for each child c of u in index order, with token x = tokens[c]:
        accept c with probability min(1, p(x) / q(x)); if accepted, continue at c;
        else p <- norm(max(p - q, 0)), and (drafts without replacement) q <- norm(q with x
        zeroed);
    all children rejected (or none exist): emit a bonus token sampled from p.
Why it is exact: one step outputs x w.p. min(p, q)(x) + P(reject) * residual(x) = p(x),
provided the next draft is distributed as the (updated) q given the history. A rejected x
always has p(x) < q(x), so the residual has no mass on it; that is what makes the
without-replacement update valid (Jeon et al., "Recursive Speculative Decoding", 2024).
Two draft modes are therefore exact, and the caller must say which it used:
  - `draft_probs` given, `replacement=False`: siblings drawn from q without replacement
    (torch.multinomial(q, k, replacement=False)), the default for sampled trees;
  - `draft_probs` given, `replacement=True`: siblings drawn i.i.d. from q;
  - `draft_probs=None`: deterministic drafts (top-k trees, n-gram, oracle). Then q is the
    point mass on each drafted token: accept w.p. p(x), on reject zero p(x) and renormalise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specsa.config import SamplingConfig
from specsa.runtime.sampling import filtered_probs
from specsa.draft_tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    """nodes: accepted path as node indices, root first (the root is always kept: it is an
    already emitted token whose KV is committed now). tokens: newly emitted tokens, i.e. the
    accepted draft tokens (nodes[1:]) followed by the bonus token.

    Example: tree tokens [7, 3, 5, 9], parents [-1, 0, 0, 1]; the target's argmax after 7 is
    3 and after 3 is 4: nodes = [0, 1], tokens = [3, 4] (draft 3 accepted, bonus 4)."""

    nodes: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def accepted(self) -> int:
        """Number of accepted draft tokens (0 .. depth of the tree)."""
        return len(self.nodes) - 1


def sampling_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature, top-k, top-p.

    Uses the autoregressive sampler's own transform (specsa.runtime.sampling.filtered_probs)
    so target and draft distributions are processed exactly as AR decoding processes them."""
    return filtered_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def greedy_accept(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """logits [T, V] (row u predicts the token after node u) -> longest matching path +
    bonus. argmax ties go to the lower token id, as torch.argmax and the AR sampler do."""
    _check(tree, logits)
    target = logits.argmax(dim=-1).tolist()
    toks = tree.tokens.tolist()
    u, nodes = 0, [0]
    while True:
        nxt = next((c for c in tree.children[u] if toks[c] == target[u]), None)
        if nxt is None:
            return Acceptance(nodes=tuple(nodes), tokens=tuple(toks[v] for v in nodes[1:])
                              + (target[u],))
        u = nxt
        nodes.append(u)


def sample_accept(tree: DraftTree, target_probs: torch.Tensor,
                  draft_probs: torch.Tensor | None, generator: torch.Generator | None = None,
                  replacement: bool = False) -> Acceptance:
    """Recursive multi-draft rejection sampling (module docstring).

    Args:
        target_probs: [T, V] processed target distribution per node (sampling_probs).
        draft_probs: [T, V] processed draft distribution q_u from which node u's children
            were drawn, or None for deterministic drafts (point-mass q).
        generator: CPU torch.Generator for reproducible draws.
        replacement: whether siblings were drawn with replacement (ignored when None).
    """
    _check(tree, target_probs)
    if draft_probs is not None and draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs shape {tuple(draft_probs.shape)} != target_probs "
                         f"shape {tuple(target_probs.shape)}: same vocabulary required")
    # float64 on the host: the walk is sequential and tiny, and the residual
    # max(p - q, 0) of nearly equal distributions needs the extra precision.
    P = target_probs.detach().to("cpu", torch.float64)
    Q = None if draft_probs is None else draft_probs.detach().to("cpu", torch.float64)
    toks = tree.tokens.tolist()
    u, nodes = 0, [0]
    while True:
        p = P[u].clone()
        q = None if Q is None else Q[u].clone()
        nxt = None
        for c in tree.children[u]:
            x = toks[c]
            qx = 1.0 if q is None else float(q[x])
            if qx <= 0.0:
                raise ValueError(f"draft token {x} at node {c} has zero draft probability "
                                 f"under its parent's q: it cannot have been drawn from q")
            r = float(torch.rand((), generator=generator, dtype=torch.float64))
            if r < min(1.0, float(p[x]) / qx):
                nxt = c
                break
            p = _residual(p, q, x)
            if q is not None and not replacement:
                q[x] = 0.0
                s = q.sum()
                if s <= 0:  # every token drafted already; no sibling can follow
                    q = None
                else:
                    q = q / s
        if nxt is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(nodes=tuple(nodes), tokens=tuple(toks[v] for v in nodes[1:])
                              + (bonus,))
        u = nxt
        nodes.append(u)


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    if q is None:
        r = p.clone()
        r[x] = 0.0
    else:
        r = (p - q).clamp(min=0.0)
    s = r.sum()
    # s == 0 means p <= q everywhere, i.e. p == q: rejection then had probability 0 up to
    # rounding, and keeping p is the exact continuation.
    return p if s <= 0 else r / s


def _check(tree: DraftTree, rows: torch.Tensor) -> None:
    if rows.dim() != 2 or rows.shape[0] != tree.size:
        raise ValueError(f"expected [T={tree.size}, V] rows (one per tree node), "
                         f"got shape {tuple(rows.shape)}")
    if int(tree.tokens.max()) >= rows.shape[1]:
        raise ValueError(f"draft token id {int(tree.tokens.max())} >= vocabulary size "
                         f"{rows.shape[1]}: drafter and target vocabularies differ")
