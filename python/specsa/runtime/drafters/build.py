"""`--draft SPEC` -> a Drafter bound to a target model, with the compatibility checks."""
from __future__ import annotations

import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import NSADecoder
from specsa.runtime.drafters import DraftError, DraftSpec, NGramDrafter, OracleDrafter, parse_draft_spec
from specsa.runtime.drafters.model import ModelDrafter, truncated_view
from specsa.draft_tree import TreeSpec


def check_compatible(target: NSADecoder, draft: NSADecoder, target_tok=None, draft_tok=None,
                     where: str = "draft") -> None:
    """Same vocabulary size and (when both are known) the same token -> id mapping."""
    tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
    if tv != dv:
        raise DraftError(f"{where}: vocabulary size {dv} differs from the target's {tv}; "
                         "a draft model must share the target's tokenizer and vocabulary")
    if target_tok is not None and draft_tok is not None:
        a, b = target_tok.get_vocab(), draft_tok.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise DraftError(f"{where}: tokenizer differs from the target's ({len(a)} vs {len(b)} "
                             f"tokens; first differences {diff}); draft and target must use one "
                             "tokenizer")


def build_drafter(spec: str | DraftSpec, target: NSADecoder, tree: TreeSpec,
                  sampling: SamplingConfig, cache: CacheConfig, *, tokenizer=None,
                  seed: int | None = None, nsa_overrides: str | dict | None = None):
    """Drafter for `spec` ('self:K', 'model:DIR', 'eagle:DIR', 'ngram:N', 'oracle:P').
    eagle:DIR also makes `target` return the hidden states the head reads.

    The oracle needs `set_truth(rid, tokens)` per request before use (benchmarks only)."""
    s = parse_draft_spec(spec) if isinstance(spec, str) else spec
    gen = None if seed is None else torch.Generator().manual_seed(int(seed) + 1)
    if s.kind == "ngram":
        return NGramDrafter(s.n, tree)
    if s.kind == "oracle":
        return OracleDrafter(s.accept_prob, tree, target.cfg.vocab_size, seed=seed or 0)
    if s.kind == "self":
        return ModelDrafter(truncated_view(target, s.layers), tree, sampling, cache, gen)
    if s.kind == "eagle":
        return build_eagle(s.path, target, tree, sampling, gen)
    from specsa.model import load_model, load_tokenizer
    draft = load_model(s.path, nsa_overrides=nsa_overrides, device=target.device,
                       dtype=target.dtype)
    draft_tok = None
    if tokenizer is not None:
        try:
            draft_tok = load_tokenizer(s.path)
        except Exception as e:  # noqa: BLE001 - any loader failure is the same user error
            raise DraftError(f"--draft model:{s.path}: cannot load its tokenizer to check it "
                             f"against the target's ({e})") from None
    check_compatible(target, draft, tokenizer, draft_tok, where=f"--draft model:{s.path}")
    return ModelDrafter(draft, tree, sampling, cache, gen)


def build_eagle(path: str, target: NSADecoder, tree: TreeSpec, sampling: SamplingConfig,
                gen: torch.Generator | None = None):
    """EagleDrafter for the EAGLE / EAGLE-3 head folder `path` (DraftError naming it when the
    folder is not an EAGLE head or does not fit the target)."""
    from specsa.config import ConfigError
    from specsa.model.eagle import load_eagle_head
    from specsa.model.load import LoadError
    from specsa.runtime.drafters.eagle import EagleDrafter

    try:
        head = load_eagle_head(path, target)
    except (LoadError, ConfigError) as e:
        raise DraftError(f"--draft eagle:{path}: {e}") from None
    return EagleDrafter(head, target, tree, sampling, generator=gen)
