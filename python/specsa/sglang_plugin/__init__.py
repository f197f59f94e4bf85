"""SpecSA as an SGLang plugin (entry point group `sglang.srt.plugins`, pinned sglang==0.5.17).

`register()` runs in every SGLang process before arguments are parsed and:
- adds the `specsa` attention backend (NSA extend / decode / TARGET_VERIFY, backend.py);
- registers the `SPECSA` speculative algorithm (algorithm.py) with its workers (worker.py), so
  `python -m sglang.launch_server --model-path M --speculative-algo specsa` works, with a
  separate draft model, self-drafting or an EAGLE / EAGLE-3 head (eagle.py);
- lets `specsa` serve as an EAGLE draft attention backend (dense, torch; used on CPU);
- works around 0.5.17's `get_draft_kv_pool` startup crash for workers without a draft runner;
- fits NSA's compressed KV into SGLang's memory sizing: page size >= the compression stride
  and the compressed cache counted in the KV pool's bytes per token (memory.py);
- loads native NSA weights (gates, learned compression) into SGLang's Llama / Qwen2 classes
  (native_weights.py);
- copies the prefix tail page into tree draft branches without a host sync (branch_tail.py,
  SpecSA servers only);
- only with SGLANG_PLATFORM=specsa_cpu: installs the torch fallbacks of cpu_fallbacks.py.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("specsa")
_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:                                      # 0.5.23+
        from sglang.srt.arg_groups.choices import add_attention_backend_choices
    except ImportError:                       # 0.5.17: server_args.py:386
        from sglang.srt.server_args import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from .algorithm import BACKEND, SpecsaAlgo, record_user_backends
    from .cpu_platform import selected as cpu_platform_selected

    add_attention_backend_choices([BACKEND])

    @register_attention_backend(BACKEND)
    def _make_backend(runner):
        from .backend import make_target_backend
        return make_target_backend(runner)

    @SpeculativeAlgorithm.register("SPECSA", supports_overlap=True, spec_class=SpecsaAlgo)
    def _worker_cls(server_args):
        from .eagle import STANDALONE, kind_of
        from .worker import SpecsaEagleWorker, SpecsaWorker
        return SpecsaWorker if kind_of(server_args) == STANDALONE else SpecsaEagleWorker

    HookRegistry.register("sglang.srt.speculative.draft_utils.DraftBackendFactory."
                          "create_decode_backend", _draft_decode_backend, HookType.AROUND)
    HookRegistry.register("sglang.srt.speculative.draft_utils.DraftBackendFactory."
                          "create_draft_extend_backend", _draft_extend_backend, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__",
                          record_user_backends, HookType.BEFORE)
    _register_draft_kv_pool_fix(HookRegistry, HookType)
    from .memory import page_size_hook, pool_configurator_hook
    HookRegistry.register("sglang.srt.server_args.ServerArgs._handle_page_size",
                          page_size_hook, HookType.AROUND)
    HookRegistry.register("sglang.srt.model_executor.pool_configurator."
                          "DefaultPoolConfigurator.__init__", pool_configurator_hook,
                          HookType.AROUND)
    from .native_weights import MODEL_CLASSES, load_weights_hook
    for cls in MODEL_CLASSES:          # native NSA checkpoints: gate / compression weights
        HookRegistry.register(f"{cls}.load_weights", load_weights_hook, HookType.AROUND)
    HookRegistry.register("sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker."
                          "_capture_cuda_graphs", _draft_graphs, HookType.AROUND)
    from .branch_tail import duplicate_prefix_tail      # trees at page > 1: no host sync
    HookRegistry.register("sglang.srt.speculative.eagle_worker_common."
                          "duplicate_prefix_tail_to_draft_branches", duplicate_prefix_tail,
                          HookType.AROUND)
    if cpu_platform_selected():
        from . import cpu_fallbacks
        cpu_fallbacks.install(HookRegistry, HookType)


def _draft_backend_name(factory, phase_field: str) -> str | None:
    sa = factory.server_args
    return factory.draft_attn_backend or getattr(sa, phase_field, None) or sa.attention_backend


def _draft_window(factory):
    """The draft's sink + window (draft_backend.py), or None for dense attention. CUDA: the
    default. CPU harness: dense torch unless SPECSA_DRAFT_ATTN is set and Triton runs in the
    interpreter (tests of the window path)."""
    import os

    from .settings import ENV_DRAFT_ATTN, draft_attention
    on_cuda = str(factory.draft_model_runner.device).startswith("cuda")
    if on_cuda or (os.environ.get(ENV_DRAFT_ATTN) and os.environ.get("TRITON_INTERPRET") == "1"):
        return draft_attention()
    return None


def _draft_decode_backend(original, factory):
    if _draft_backend_name(factory, "decode_attention_backend") != "specsa":
        return original(factory)
    if factory.speculative_num_steps <= 1:
        return None
    win = _draft_window(factory)
    if win is not None:
        from .draft_backend import SpecsaDraftDecodeBackend as WindowDecode
        return WindowDecode(factory.draft_model_runner, factory.topk,
                            factory.speculative_num_steps, win)
    from .backend import SpecsaDraftDecodeBackend
    return SpecsaDraftDecodeBackend(factory.draft_model_runner, factory.topk,
                                    factory.speculative_num_steps)


def _draft_extend_backend(original, factory):
    if _draft_backend_name(factory, "prefill_attention_backend") != "specsa":
        return original(factory)
    win = _draft_window(factory)
    if win is not None:
        from .draft_backend import SpecsaDraftExtendBackend, cpu_draft_extend_backend
        runner = factory.draft_model_runner
        make = SpecsaDraftExtendBackend if str(runner.device).startswith("cuda") \
            else cpu_draft_extend_backend
        from .settings import state_draft_tokens
        return make(runner, win, state_draft_tokens(runner.server_args))
    from .backend import SpecsaAttnBackend
    return SpecsaAttnBackend(factory.draft_model_runner, dense=True)


def _register_draft_kv_pool_fix(HookRegistry, HookType) -> None:
    # 0.5.17: Scheduler.init_disaggregation always calls kv_cache_builder.get_draft_kv_pool
    # (scheduler.py:1288), which dereferences draft_worker.draft_worker.draft_runner and
    # crashes for a spec worker without a draft TpModelWorker.
    try:
        import sglang.srt.mem_cache.kv_cache_builder as kcb
    except ImportError:
        return
    if not hasattr(kcb, "get_draft_kv_pool"):
        return

    def _get_draft_kv_pool(original, *args, **kwargs):
        dw = kwargs.get("draft_worker", args[0] if args else None)
        if dw is not None and getattr(dw, "draft_worker", None) is None:
            return None
        return original(*args, **kwargs)
    HookRegistry.register("sglang.srt.mem_cache.kv_cache_builder.get_draft_kv_pool",
                          _get_draft_kv_pool, HookType.AROUND)



def _draft_graphs(original, worker, *args, **kwargs):
    """Keep only the draft CUDA graphs SPECSA_DRAFT_GRAPHS names (SpecSA servers only), and
    for a standalone-shaped draft drop the hidden states of the draft-extend graph's output
    (an EAGLE head needs them).

    0.5.17's draft-extend graph runs its forward in CaptureHiddenMode.LAST (one row per
    request) but the worker then indexes those rows with per-token select indices (up to
    bs * num_draft_tokens): with a STANDALONE-shaped draft that needs no hidden states this
    read out of bounds (device-side assert on the H200, later in filter_batch). The eager path
    returns none for such drafts (CaptureHiddenMode.NULL), so the graph path now does too."""
    result = original(worker, *args, **kwargs)
    algo = getattr(getattr(worker, "server_args", None), "speculative_algorithm", None)
    if str(algo).upper() != "SPECSA":
        return result
    from .settings import draft_graphs
    mode = draft_graphs()
    if mode in ("decode", "none"):
        worker.cuda_graph_runner_for_draft_extend = None
    if mode == "none":
        worker.cuda_graph_runner = None
    from .eagle import STANDALONE, kind_of
    runner = getattr(worker, "cuda_graph_runner_for_draft_extend", None)
    if runner is not None and kind_of(worker.server_args) == STANDALONE:
        execute = runner.execute

        def execute_without_hidden(forward_batch):
            out = execute(forward_batch)
            out.hidden_states = None
            return out
        runner.execute = execute_without_hidden
    logger.warning("specsa: draft CUDA graphs kept: %s", mode)
    return result
