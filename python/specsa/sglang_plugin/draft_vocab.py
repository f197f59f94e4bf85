"""A separate draft model with a reduced vocabulary: `--speculative-token-map` (SGLang's
hot-token table, FR-Spec style) for `--speculative-algo specsa --speculative-draft-model-path`.

Why: a small draft's LM head is much of its cost. The 2-layer draft of the 8B shape reads
1.05 GB of LM head per draft forward against 0.87 GB for its two layers; keeping the 32K most
frequent tokens reads a quarter of it. Lossless: the draft only proposes, the target verifies.

SGLang 0.5.17 slices the head for EAGLE heads (`EAGLEWorkerV2.init_lm_head`), but STANDALONE
keeps the draft model's own head untouched while it still maps the draft's top-k indices
through the token map (`hot_token_id[topk_index]`), so the proposals would be the wrong tokens.
The SpecSA worker slices the draft model's head to the hot rows instead (`restrict_draft_head`).
"""
from __future__ import annotations

import logging

import torch

from specsa.config import ConfigError

log = logging.getLogger("specsa")


def restrict_draft_head(runner, hot: torch.Tensor) -> torch.Tensor:
    """Keep rows `hot` of the draft model's LM head (the embeddings stay whole, tied or not);
    returns `hot` on the head's device. Raises ConfigError for a map that is empty, out of
    range or has repeats, a draft model without get/set_embed_and_head, or a sharded draft."""
    model = runner.model
    name = type(model).__name__
    if not (hasattr(model, "get_embed_and_head") and hasattr(model, "set_embed_and_head")):
        raise ConfigError(f"--speculative-token-map: the draft model class {name} cannot have "
                          "its LM head replaced (no get_embed_and_head / set_embed_and_head)")
    if int(getattr(runner, "tp_size", 1) or 1) != 1:
        raise ConfigError("--speculative-token-map with a separate draft model needs the draft "
                          "at tensor-parallel size 1 (its LM head is sharded by vocabulary)")
    embed, head = model.get_embed_and_head()
    vocab = int(head.shape[0])
    hot = hot.to(device=head.device, dtype=torch.int64).flatten()
    n = int(hot.numel())
    if n == 0 or int(hot.min()) < 0 or int(hot.max()) >= vocab:
        raise ConfigError(f"--speculative-token-map: {n} token ids, they must be non-empty and "
                          f"within the draft's vocabulary [0, {vocab})")
    if int(torch.unique(hot).numel()) != n:
        raise ConfigError("--speculative-token-map: the token ids must be distinct")
    # a new tensor: with tied embeddings the head is the embedding table, which stays whole
    model.set_embed_and_head(embed, torch.nn.Parameter(head.data[hot].clone(),
                                                       requires_grad=False))
    log.warning("specsa: draft LM head restricted to %d of %d tokens (--speculative-token-map)",
                n, vocab)
    return hot
