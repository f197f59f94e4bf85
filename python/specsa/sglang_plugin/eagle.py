"""Which kind of draft a SPECSA server runs: a separate draft model / self-draft (STANDALONE
shape) or an EAGLE / EAGLE-3 head (EAGLE shape), docs/DESIGN.md section 8.

The kind is read once, when the server arguments are resolved, from the draft checkpoint's
config.json `architectures` (the names SGLang 0.5.17's model registry maps to its EAGLE
classes), and recorded on the ServerArgs object (`_specsa_draft`, a private attribute: it
travels with the pickled arguments to the scheduler processes). `SpecsaAlgo` (algorithm.py)
answers SGLang's is_standalone() / is_eagle() / is_eagle3() from it in every process, so
SGLang's own EAGLE V2 pipeline (target hidden-state capture, EAGLE-3 aux layers, shared
embedding / LM head, draft hidden states carried between steps) switches on for EAGLE heads;
the worker factory picks the matching worker class (worker.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("specsa")

STANDALONE, EAGLE, EAGLE3 = "standalone", "eagle", "eagle3"
ATTR = "_specsa_draft"

# SGLang 0.5.17 EntryClass names (sglang/srt/models/*eagle*.py). MLA-shaped heads
# (MistralLarge3ForCausalLMEagle, Eagle3DeepseekV2ForCausalLM) need MLA targets, which the
# specsa backend does not serve; they are listed so that they get a clear error.
EAGLE_ARCHS = ("LlamaForCausalLMEagle", "Qwen2ForCausalLMEagle", "MistralForCausalLMEagle")
EAGLE3_ARCHS = ("LlamaForCausalLMEagle3",)
UNSUPPORTED_ARCHS = ("MistralLarge3ForCausalLMEagle", "Eagle3DeepseekV2ForCausalLM",
                     "Ernie4_5_MoeForCausalLMMTP")

_LOCAL = {"kind": None}     # this process's last resolved kind (before ServerArgs is published)


def draft_architecture(path: str, revision: str | None = None,
                       trust_remote_code: bool = False) -> str | None:
    """architectures[0] of a draft checkpoint: config.json of a local folder, else SGLang's
    config loader (hub ids)."""
    p = Path(path) / "config.json"
    if p.is_file():
        try:
            archs = json.loads(p.read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError):
            archs = []
        return archs[0] if archs else None
    from sglang.srt.utils.hf_transformers_utils import get_config
    cfg = get_config(path, trust_remote_code=trust_remote_code, revision=revision)
    archs = getattr(cfg, "architectures", None) or []
    return archs[0] if archs else None


def kind_of_architecture(arch: str | None) -> str:
    if arch in EAGLE3_ARCHS:
        return EAGLE3
    if arch in EAGLE_ARCHS:
        return EAGLE
    if arch in UNSUPPORTED_ARCHS:
        raise ValueError(f"--speculative-algorithm specsa: draft architecture {arch} (an MLA "
                         "EAGLE / MTP head) is not supported: the specsa target backend serves "
                         "MHA Llama / Qwen2 models")
    return STANDALONE


def resolve(sa) -> str:
    """Detect the draft kind of these server arguments and record it on them."""
    kind = STANDALONE
    if sa.speculative_draft_model_path is not None and \
            sa.speculative_draft_model_path != sa.model_path:
        arch = draft_architecture(sa.speculative_draft_model_path,
                                  sa.speculative_draft_model_revision, sa.trust_remote_code)
        kind = kind_of_architecture(arch)
        if kind != STANDALONE:
            logger.warning("specsa: draft %s is an %s head (%s): SGLang's EAGLE pipeline drafts "
                           "from the target's hidden states; the target verifies on the specsa "
                           "NSA backend", sa.speculative_draft_model_path,
                           "EAGLE-3" if kind == EAGLE3 else "EAGLE", arch)
    object.__setattr__(sa, ATTR, kind)
    _LOCAL["kind"] = kind
    return kind


def kind_of(sa=None) -> str:
    """The draft kind of `sa`, else of this process's published ServerArgs (scheduler,
    tokenizer), else the last one resolved in this process; STANDALONE when none says."""
    if sa is None:
        try:
            from sglang.srt.runtime_context import get_server_args
            sa = get_server_args()
        except Exception:      # noqa: BLE001 - not published yet in this process
            sa = None
    kind = getattr(sa, ATTR, None) if sa is not None else None
    return kind or _LOCAL["kind"] or STANDALONE
