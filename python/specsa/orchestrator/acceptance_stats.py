"""Per-request (or per-batch) acceptance statistics the planner reads. Pure Python, immutable.

Model: a_k = P(the draft token at depth k is accepted | the path reached depth k), for the
top-1 draft at that depth. The loop reports, per verify step, how many draft tokens were
accepted (`accepted`, the index into `SpecStats.accept_histogram`), how deep the draft went
(`depth`) and its width (`width`, TreeSpec.topk). Depths 1..min(accepted + 1, depth) were
reached; depths 1..accepted succeeded, depth accepted + 1 (if drafted) failed; deeper depths
say nothing.

Update (EMA, as SGLang's AdaptiveStepSlot smooths accept length, here per depth): a width-w
step tests w siblings, so its success rate is r_k = 1 - (1 - a_k)^w (independent siblings).
Each observation x in {0, 1} at a reached depth k moves that rate:

    r_k' = (1 - alpha) * r_k + alpha * x,      a_k' = 1 - (1 - r_k')^(1 / w)

(for chains w = 1 this is the plain EMA a_k' = (1 - alpha) a_k + alpha x). Depths never
reached keep their value; `rate(k)` for a depth never observed returns the rate of the deepest
observed depth (the prior while nothing was observed), so evidence of high acceptance lets the
planner try longer drafts. `steps` counts observed speculative steps (the warm-up counter).

    s = AcceptanceStats.initial(prior=0.6)
    s = s.updated(accepted=3, depth=4)         # depths 1-3 accepted, depth 4 rejected
    s.rate(1), s.rate(4), s.rate(9)            # 9 was never reached: rate(4)'s value
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from specsa.config import ConfigError
from specsa.draft_tree import MAX_TREE_NODES

MAX_DEPTH = MAX_TREE_NODES      # a verified tree is at most this deep


@dataclass(frozen=True)
class AcceptanceStats:
    """rates[k-1] = a_k; seen[k-1] = observations at depth k; steps = speculative steps seen."""

    rates: tuple[float, ...]
    seen: tuple[int, ...]
    steps: int = 0
    alpha: float = 0.2
    prior: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"AcceptanceStats.alpha must be in (0, 1], got {self.alpha!r}")
        if not 0.0 <= self.prior <= 1.0:
            raise ConfigError(f"AcceptanceStats.prior must be in [0, 1], got {self.prior!r}")
        if len(self.rates) != len(self.seen) or not self.rates:
            raise ConfigError("AcceptanceStats.rates and .seen must be non-empty and equally long")
        bad = [r for r in self.rates if not 0.0 <= r <= 1.0]
        if bad:
            raise ConfigError(f"AcceptanceStats.rates must lie in [0, 1], got {bad[0]!r}")

    @classmethod
    def initial(cls, prior: float = 0.6, alpha: float = 0.2,
                max_depth: int = MAX_DEPTH) -> "AcceptanceStats":
        return cls(rates=(float(prior),) * max_depth, seen=(0,) * max_depth, alpha=alpha,
                   prior=float(prior))

    @property
    def max_depth(self) -> int:
        return len(self.rates)

    def rate(self, k: int) -> float:
        """a_k for depth k >= 1 (see the module docstring for unobserved depths)."""
        if k < 1:
            raise ConfigError(f"depth must be >= 1, got {k}")
        k = min(k, self.max_depth)
        if self.seen[k - 1]:
            return self.rates[k - 1]
        deepest = max((j for j in range(k - 1) if self.seen[j]), default=None)
        return self.prior if deepest is None else self.rates[deepest]

    def updated(self, accepted: int, depth: int, width: int = 1) -> "AcceptanceStats":
        """Statistics after one verify step that accepted `accepted` of a draft `depth` deep."""
        if depth < 0 or not 0 <= accepted <= depth:
            raise ConfigError(f"need 0 <= accepted <= depth, got accepted={accepted}, "
                              f"depth={depth}")
        if width < 1:
            raise ConfigError(f"draft width must be >= 1, got {width}")
        if depth == 0:
            return self      # no speculation this step: nothing was tested
        rates, seen = list(self.rates), list(self.seen)
        for k in range(1, min(accepted + 1, depth, self.max_depth) + 1):
            x = 1.0 if k <= accepted else 0.0
            a = self.rate(k)
            r = 1.0 - (1.0 - a) ** width
            r = (1.0 - self.alpha) * r + self.alpha * x
            rates[k - 1] = 1.0 - (1.0 - r) ** (1.0 / width)
            seen[k - 1] += 1
        return replace(self, rates=tuple(rates), seen=tuple(seen), steps=self.steps + 1)

    def updated_many(self, accepted: Sequence[int], depth: int, width: int = 1
                     ) -> "AcceptanceStats":
        """Several requests' steps of one batch, in order."""
        s = self
        for a in accepted:
            s = s.updated(int(a), depth, width)
        return s

    @classmethod
    def from_histogram(cls, histogram: Sequence[int], depth: int, prior: float = 0.6,
                       alpha: float = 0.2, max_depth: int = MAX_DEPTH) -> "AcceptanceStats":
        """Counting estimate from a chain run's `accept_histogram` (h[k] = steps that accepted
        k drafts, all with draft depth `depth`): a_k = #(accepted >= k) / #(accepted >= k-1).
        Useful to seed a controller from a previous prompt's run."""
        if depth < 1 or len(histogram) > depth + 1 or any(int(c) < 0 for c in histogram):
            raise ConfigError(f"histogram {list(histogram)} does not fit draft depth {depth}")
        h = [int(c) for c in histogram] + [0] * (depth + 1 - len(histogram))
        rates, seen = [float(prior)] * max_depth, [0] * max_depth
        for k in range(1, min(depth, max_depth) + 1):
            reached = sum(h[k - 1:])
            if reached:
                rates[k - 1] = sum(h[k:]) / reached
                seen[k - 1] = reached
        return cls(rates=tuple(rates), seen=tuple(seen), steps=sum(h), alpha=alpha,
                   prior=float(prior))
