"""Drafters behind one protocol (`base.Drafter`) and the `--draft SPEC` parser.

Specs: `self:K` (the target's first K layers + final norm + LM head, sharing weights),
`model:DIR` (a causal LM checkpoint with the target's tokenizer), `eagle:DIR` (an EAGLE or
EAGLE-3 draft head fed by the target's hidden states), `ngram:N` (prompt lookup
with n-grams up to N), `oracle:P` (BENCHMARK ONLY: knows the AR continuation, each drafted
token right with probability P).
"""
from __future__ import annotations

from dataclasses import dataclass

from specsa.runtime.drafters.base import Draft, DraftError, Drafter, DraftRequest, trie_tree
from specsa.runtime.drafters.ngram import NGramDrafter
from specsa.runtime.drafters.oracle import OracleDrafter

__all__ = ["Draft", "DraftError", "Drafter", "DraftRequest", "DraftSpec", "NGramDrafter",
           "OracleDrafter", "parse_draft_spec", "trie_tree"]

KINDS = ("self", "model", "eagle", "ngram", "oracle")


@dataclass(frozen=True)
class DraftSpec:
    kind: str            # one of KINDS
    layers: int = 0      # self:K
    path: str = ""       # model:DIR, eagle:DIR
    n: int = 0           # ngram:N
    accept_prob: float = 0.0  # oracle:P


def parse_draft_spec(spec: str) -> DraftSpec:
    """'self:K' | 'model:DIR' | 'eagle:DIR' | 'ngram:N' | 'oracle:P' -> DraftSpec, with
    errors that say which part is wrong."""
    fmt = "expected self:K, model:DIR, eagle:DIR, ngram:N or oracle:P"
    if not isinstance(spec, str) or ":" not in spec:
        raise DraftError(f"--draft {spec!r}: {fmt}")
    kind, arg = spec.split(":", 1)
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in KINDS:
        raise DraftError(f"--draft {spec!r}: unknown drafter {kind!r}; {fmt}")
    if kind in ("model", "eagle"):
        if not arg:
            raise DraftError(f"--draft {spec!r}: {kind}:DIR needs a checkpoint directory")
        return DraftSpec(kind=kind, path=arg)
    if kind == "oracle":
        try:
            p = float(arg)
        except ValueError:
            raise DraftError(f"--draft {spec!r}: oracle:P needs a probability, got {arg!r}") from None
        if not 0.0 <= p <= 1.0:
            raise DraftError(f"--draft {spec!r}: oracle:P needs 0 <= P <= 1, got {p}")
        return DraftSpec(kind=kind, accept_prob=p)
    try:
        k = int(arg)
    except ValueError:
        raise DraftError(f"--draft {spec!r}: {kind}:N needs a positive integer, got {arg!r}") from None
    if k < 1:
        raise DraftError(f"--draft {spec!r}: {kind}:N needs a positive integer, got {k}")
    return DraftSpec(kind=kind, layers=k) if kind == "self" else DraftSpec(kind=kind, n=k)
