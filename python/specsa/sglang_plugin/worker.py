"""SpecSA's speculative workers: SGLang's EAGLE V2 pipeline (draft prefill, multi-step chain /
top-k tree drafting, `build_eagle_verify_input`, `run_eagle_verify` with greedy tree acceptance
and KV commit, draft extend) with

- `SpecsaWorker`: a separate draft model or self-draft (SGLang's STANDALONE worker);
- `SpecsaEagleWorker`: an EAGLE / EAGLE-3 head (SGLang's EAGLE worker: the head reads the
  target's hidden states, shares its embedding / LM head; eagle.py tells which kind).

Target verification attention is the `specsa` NSA backend, which the SPECSA algorithm forces on
the target (algorithm.py); the mixin adapts the constructor to 0.5.17's scheduler, checks that
wiring and, when asked (step_timing.py), times the phases of every decode step.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext

from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

from . import branch_tail
from .algorithm import BACKEND
from .settings import (step_plan, step_timing_path, sync_debug_path, torch_profile_spec,
                       verify_knobs)
from .draft_vocab import restrict_draft_head
from .jit_warmup import warm_tree_step_kernels
from .step_timing import StepTimer, TorchProfile


class _SpecsaWorkerMixin:
    def __init__(self, server_args, gpu_id, nccl_port, target_worker, ps=None, **kwargs):
        # 0.5.17's scheduler passes ps= (scheduler.py:916-927) and keywords only.
        super().__init__(server_args=server_args, gpu_id=gpu_id, ps=ps, nccl_port=nccl_port,
                         target_worker=target_worker)
        path, prof = step_timing_path(), torch_profile_spec()
        self.timer = StepTimer(path) if path else None
        sync_path = sync_debug_path()
        self.sync_debug = None
        if sync_path:
            from .sync_debug import SyncDebug
            self.sync_debug = SyncDebug(sync_path)
        self.profile = TorchProfile(prof) if prof else None
        if self.timer is not None:
            self._instrument(self.timer)
        # the per-step orchestrator (step_policy.py): SGLang's runtime-state switcher driven
        # by SpecSA's planner; set before init_cuda_graphs, which captures every length
        self.policy = None
        plan = step_plan()
        if plan.mode != "off":
            from .step_policy import make_controller
            self.adaptive_controller = make_controller(self, plan, verify_knobs())
            self.policy = self.adaptive_controller.params
        branch_tail.ACTIVE = True       # trees: sync-free branch tail copy (branch_tail.py)

    def apply_runtime_state(self, state) -> None:
        super().apply_runtime_state(state)
        if self.timer is not None:
            state.target_attn_backend.timer = self.timer

    def init_attention_backends(self):
        super().init_attention_backends()
        backend = self.target_worker.model_runner.attn_backend
        name = type(backend).__name__
        if name not in ("SpecsaAttnBackend", "SpecsaTritonBackend"):
            raise ValueError(f"specsa worker: the target's attention backend is {name}, "
                             f"expected the '{BACKEND}' backend (--attention-backend {BACKEND})")
        if self.timer is not None:
            backend.timer = self.timer
        # trees: no Triton compile inside a step (jit_warmup.py). Here, not in __init__: the
        # scheduler creates this worker before it allocates the KV pools (0.5.17's
        # init_model_worker: draft worker, memory pools, attention backends, CUDA graphs)
        warm_tree_step_kernels(self)

    # -- timing (off unless SPECSA_STEP_TIMING / SPECSA_TORCH_PROFILE is set) ---------------
    def _instrument(self, timer: StepTimer) -> None:
        """Wrap the phase functions of one decode step so that each marks its end."""
        def after(obj, name, phase, before=None):
            fn = getattr(obj, name)

            @functools.wraps(fn)
            def wrapped(*a, **kw):
                if before:
                    timer.mark(before)
                out = fn(*a, **kw)
                timer.mark(phase)
                return out
            setattr(obj, name, wrapped)

        after(self._draft_worker, "draft", "draft")
        after(self._target_worker, "forward_batch_generation", "target_fwd", before="verify_prep")
        after(self, "verify", "accept")
        after(self._draft_worker, "_draft_extend_for_decode", "draft_extend")

    def forward_batch_generation(self, batch, *args, **kwargs):
        decode = not (batch.forward_mode.is_extend() or batch.is_extend_in_batch) \
            and not batch.forward_mode.is_idle()
        if self.policy is not None and batch.seq_lens_cpu is not None \
                and len(batch.seq_lens_cpu):
            self.policy.observe_context(int(batch.seq_lens_cpu.max()))
        if not decode or (self.timer is None and self.profile is None
                          and self.sync_debug is None):
            return super().forward_batch_generation(batch, *args, **kwargs)
        if self.profile is not None:
            self.profile.step_begin()
        if self.timer is not None:
            seq = batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens.cpu()
            self.timer.begin(len(seq), int(seq.max()) if len(seq) else 0,
                             steps=self.speculative_num_steps,
                             predicted_ms=None if self.policy is None
                             else self.policy.predicted_ms)
        with self.sync_debug.step() if self.sync_debug is not None else nullcontext():
            out = super().forward_batch_generation(batch, *args, **kwargs)
        if self.timer is not None:
            self.timer.end()
        if self.profile is not None:
            self.profile.step_end()
        return out


class SpecsaWorker(_SpecsaWorkerMixin, StandaloneWorkerV2):
    """A separate draft model (or the target itself) drafts."""

    def alloc_memory_pool(self, *args, **kwargs):
        # the draft worker loads --speculative-token-map here but, STANDALONE, keeps its own
        # full LM head: keep only the hot rows (draft_vocab.py; 0.5.17 would map
        # full-vocabulary indices through the map)
        out = super().alloc_memory_pool(*args, **kwargs)
        dw = self._draft_worker
        if getattr(dw, "hot_token_id", None) is not None:
            dw.hot_token_id = restrict_draft_head(dw.draft_runner, dw.hot_token_id)
        return out


class SpecsaEagleWorker(_SpecsaWorkerMixin, EAGLEWorkerV2):
    """An EAGLE / EAGLE-3 head drafts from the target's hidden states."""
