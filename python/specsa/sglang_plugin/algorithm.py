"""The SPECSA speculative algorithm as SGLang sees it (a `CustomSpecAlgo`) and its server-args
handling: draft shape defaults, the implied `specsa` attention backend, and clear rejections of
combinations the worker does not support.
"""
from __future__ import annotations

import logging

from sglang.srt.speculative.spec_registry import CustomSpecAlgo

from .eagle import EAGLE, EAGLE3, STANDALONE, kind_of, resolve

logger = logging.getLogger("specsa")

BACKEND = "specsa"
DEFAULT_STEPS = 3
DEFAULT_TOPK = 1


class SpecsaAlgo(CustomSpecAlgo):
    """SpecSA's algorithm: target verification through the specsa NSA backend, drafting in
    one of two shapes chosen by the draft checkpoint (eagle.py, detected once at server-args
    time): STANDALONE (a separate draft model or self-draft, no draft hidden states) or
    EAGLE / EAGLE-3 (a draft head fed by the target's hidden states)."""

    # SGLang sizes the draft KV pool, the decode reservation, the hidden-state capture modes
    # (target FULL / draft LAST for EAGLE, none for STANDALONE), EAGLE-3's aux layers and the
    # shared embedding / LM head from these answers; the worker class follows the same kind.
    def is_standalone(self) -> bool:
        return kind_of() == STANDALONE

    def is_eagle(self) -> bool:
        return kind_of() in (EAGLE, EAGLE3)

    def is_eagle3(self) -> bool:
        return kind_of() == EAGLE3

    # 0.5.17's scheduler calls these three on the algorithm, but CustomSpecAlgo lacks them
    # (scheduler.py:1294, :1428; overlap_utils.py:305).
    def carries_draft_hidden_states(self) -> bool:
        return self.is_eagle()

    def need_topk(self) -> bool:
        return True

    def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                          needs_confidence_relay=False):
        from sglang.srt.managers.overlap_utils import FutureMap
        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                         needs_confidence_relay)

    def handle_server_args(self, server_args) -> None:
        handle_specsa_server_args(server_args)


def _reject(msg: str) -> None:
    raise ValueError(f"--speculative-algorithm specsa: {msg}")


_BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
_USER_BACKENDS: dict[int, dict] = {}


def record_user_backends(sa, *args, **kwargs):
    """BEFORE hook on ServerArgs.__post_init__: the attention backends the user named, before
    device handlers (e.g. _handle_cpu_backends) fill in defaults."""
    _USER_BACKENDS[id(sa)] = {f: getattr(sa, f, None) for f in _BACKEND_FIELDS}


def _imply_backend(sa) -> None:
    user = _USER_BACKENDS.pop(id(sa), None)
    if user is None:     # hook not applied: the fields are the best we know
        user = {f: getattr(sa, f) for f in _BACKEND_FIELDS}
    named = {f: b for f, b in user.items() if b}
    other = {f: b for f, b in named.items() if b != BACKEND}
    if other:
        flags = ", ".join(f"--{f.replace('_', '-')} {b}" for f, b in other.items())
        _reject(f"the target's attention must be the '{BACKEND}' NSA backend (NSA verification "
                f"semantics); got {flags}. Drop the flag or pass --attention-backend {BACKEND}.")
    sa.attention_backend = BACKEND
    # Declarations made earlier in resolution (the platform's default backend) are applied
    # at the end of __post_init__; declare ours last so that it wins.
    from sglang.srt.arg_groups.overrides import run_post_process_pass

    def _specsa_attention_backend(view) -> dict:
        return {"attention_backend": BACKEND}
    run_post_process_pass(sa, _specsa_attention_backend)


def _draft_shape(sa) -> None:
    steps = sa.speculative_num_steps or DEFAULT_STEPS
    topk = sa.speculative_eagle_topk or DEFAULT_TOPK
    if steps < 1 or topk < 1:
        _reject(f"--speculative-num-steps ({steps}) and --speculative-eagle-topk ({topk}) must "
                "be >= 1")
    most = topk + (steps - 1) * topk * topk + 1     # nodes EAGLE's tree search can offer
    if topk == 1:
        if sa.speculative_num_draft_tokens not in (None, steps + 1):
            logger.warning("specsa: a chain (topk 1) verifies steps + 1 = %d tokens; ignoring "
                           "--speculative-num-draft-tokens %s", steps + 1,
                           sa.speculative_num_draft_tokens)
        draft = steps + 1
    else:
        draft = sa.speculative_num_draft_tokens or min(steps * topk + 1, most)
        if not 2 <= draft <= most:
            _reject(f"--speculative-num-draft-tokens {draft} must be in [2, {most}] for "
                    f"steps={steps}, topk={topk}")
    sa.speculative_num_steps, sa.speculative_eagle_topk = steps, topk
    sa.speculative_num_draft_tokens = draft


# Set in the process that parsed the server arguments (the tokenizer manager's) once SPECSA
# is selected.
SELECTED = {"specsa": False}


def handle_specsa_server_args(sa) -> None:
    """Fill SPECSA's defaults into ServerArgs and reject what the worker cannot do."""
    SELECTED["specsa"] = True
    if sa.speculative_use_rejection_sampling:
        _reject("--speculative-use-rejection-sampling is not supported (greedy tree "
                "verification and SGLang's tree sampling only)")
    if sa.enable_dp_attention:
        _reject("--enable-dp-attention is not supported")
    if sa.pp_size != 1:
        _reject("pipeline parallelism (--pp-size > 1) is not supported")
    if sa.speculative_adaptive:
        _reject("--speculative-adaptive is not supported")
    _imply_backend(sa)
    _draft_shape(sa)
    resolve(sa)          # standalone draft or EAGLE / EAGLE-3 head (eagle.py)
    if sa.speculative_draft_model_path is None:       # self-drafting: the target drafts for itself
        sa.speculative_draft_model_path = sa.model_path
        sa.speculative_draft_model_revision = sa.revision
    if sa.speculative_draft_attention_backend is None:
        # The draft's attention: on CUDA the specsa backend gives it a sink + window through the
        # fused kernel (draft_backend.py) unless SPECSA_DRAFT_ATTN=dense, which keeps SGLang's
        # Triton backend over the whole context; on the CPU harness the specsa backend runs
        # it densely (torch).
        from .settings import draft_attention
        on_cuda = str(sa.device).startswith("cuda")
        sa.speculative_draft_attention_backend = \
            "triton" if on_cuda and draft_attention() is None else BACKEND
    from .settings import overlap_schedule
    import torch
    device = str(sa.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not overlap_schedule(device):
        # SGLang's overlap scheduler prepares step N+1 on the host while the GPU runs step N;
        # the SpecSA step needs no host sync (its metadata is built on the device), so it stays
        # on with CUDA unless SPECSA_OVERLAP=off (settings.py)
        sa.disable_overlap_schedule = True
    if sa.enable_mixed_chunk:
        logger.warning("specsa: mixed chunked prefill is disabled for speculative decoding")
        sa.enable_mixed_chunk = False
    if sa.max_running_requests is None:
        sa.max_running_requests = 48
    from .settings import attn_impl, verify_knobs
    verify_knobs()          # a knob outside its precision class fails here, before start-up
    if attn_impl(str(sa.device)) == "torch" or not str(sa.device).startswith("cuda"):
        _disable_target_cuda_graphs(sa)


def _disable_target_cuda_graphs(sa) -> None:
    """The torch NSA path (CPU harness) is eager; SGLang would otherwise try to capture decode /
    verify graphs through it. The Triton path (CUDA) is graph-capturable."""
    try:
        from sglang.srt.server_args import Backend
    except ImportError:
        return
    cfg = getattr(sa, "cuda_graph_config", None)
    if cfg is not None:
        logger.warning("specsa: CUDA graphs are disabled (the NSA target backend runs eagerly)")
        cfg.decode.backend = Backend.DISABLED
        cfg.prefill.backend = Backend.DISABLED
