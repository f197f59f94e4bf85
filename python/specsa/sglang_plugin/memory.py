"""NSA's compressed KV inside SGLang's memory budget.

The target backend keeps one compressed K/V token per `stride` positions, stored per KV page
(CONTRACTS.md section 4: token i lives in the page of its closing position, `cmp_per_page`
slots a page). Two things make that fit SGLang's sizing:

1. Page size. With pages smaller than the stride (SGLang's default page size is 1) every page
   would need its own slot, as much memory as the KV pool itself. So a server whose target runs
   the specsa backend gets page size = stride when it asked for less (SGLang does the same for
   its own sparse backends, e.g. FlashMLA / DSA pages of 64). Radix-cache sharing then works
   at that granularity. `specsa_page_size` is a post-process pass of ServerArgs (run at the
   slot of `_handle_page_size`, before speculative decoding is resolved).
2. Budget. SGLang sizes the KV pool as available bytes // bytes per token ("cell size"). The
   AROUND hook on DefaultPoolConfigurator.__init__ adds the compressed cache's bytes per token
   to the target's cell size, so pool + compressed cache fit inside --mem-fraction-static.

Also here: the CPU harness's default KV size (`cpu_default_max_tokens`), used when the user
gives no --max-total-tokens: SGLang would otherwise size the pool from the machine's RAM.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

from specsa.config import NSAConfig

from .algorithm import BACKEND
from .settings import attn_impl, resolve_nsa_config

logger = logging.getLogger("specsa")

_BACKEND_FIELDS = ("attention_backend", "decode_attention_backend", "prefill_attention_backend")


def uses_specsa(args) -> bool:
    """Does the target of these server args (or a ResolvedView of them) run the specsa
    backend? `--speculative-algo specsa` implies it."""
    algo = str(getattr(args, "speculative_algorithm", None) or "").upper()
    return algo == "SPECSA" or any(getattr(args, f, None) == BACKEND for f in _BACKEND_FIELDS)


def read_model_config(model_path: str | None) -> dict:
    """config.json of a local model folder, {} when there is none (a hub id, no file)."""
    if not model_path:
        return {}
    p = Path(model_path) / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def server_nsa_config(args) -> NSAConfig:
    """The NSA config the target backend will resolve (config.json["nsa"] <- $SPECSA_NSA)."""
    cfg = read_model_config(getattr(args, "model_path", None))
    return resolve_nsa_config(SimpleNamespace(nsa=cfg.get("nsa")))


def specsa_page_size(view) -> dict:
    """Post-process pass: raise the page size of a specsa server to the compression stride."""
    if not uses_specsa(view):
        return {}
    stride = server_nsa_config(view).stride
    ps = view.page_size or 1
    if ps >= stride:
        return {}
    logger.warning("specsa: NSA keeps one compressed KV token per %d positions per KV page; "
                   "page size raised from %d to %d (smaller pages would need a compressed slot "
                   "each)", stride, ps, stride)
    return {"page_size": stride}


def page_size_hook(original, sa, *args, **kwargs):
    """AROUND ServerArgs._handle_page_size: SGLang's default first, then ours."""
    out = original(sa, *args, **kwargs)
    from sglang.srt.arg_groups.overrides import run_post_process_pass
    run_post_process_pass(sa, specsa_page_size)
    return out


def compressed_bytes_per_token(nsa: NSAConfig, page_size: int, num_layers: int,
                               kv_heads: int, head_dim: int, v_head_dim: int,
                               elem_size: int) -> float:
    """Bytes of compressed K + V the target backend holds per KV-pool token."""
    per_page = nsa.params.cmp_per_page(page_size) * kv_heads * (head_dim + v_head_dim) * elem_size
    return num_layers * per_page / page_size


def compressed_shape(num_layers: int, pool_rows: int, page_size: int, nsa: NSAConfig,
                     kv_heads: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """[layers, pages, cmp_per_page, Hkv, D] of the Triton backend's compressed K (and V) for
    SGLang's pool of `pool_rows` slots (its size plus the padding page)."""
    if pool_rows % page_size:
        raise ValueError(f"specsa: KV pool of {pool_rows} slots is not a multiple of page size "
                         f"{page_size}")
    return (num_layers, pool_rows // page_size, nsa.params.cmp_per_page(page_size), kv_heads,
            head_dim)


def target_compressed_cell(kvc) -> int:
    """Extra bytes per token for a KVCacheConfigurator of the target (0 for other servers)."""
    sa = kvc.server_args
    if kvc.is_draft_worker or not uses_specsa(sa):
        return 0
    mc = kvc.model_config
    tp = max(1, int(getattr(sa, "tp_size", 1) or 1))
    kv_heads = mc.get_num_kv_heads(tp)
    head_dim = mc.head_dim
    v_head_dim = getattr(mc, "v_head_dim", None) or head_dim
    # the Triton path keeps the pool's dtype; the torch reference path (CPU harness) fp32
    elem = 4 if attn_impl(str(kvc.device)) == "torch" else kvc.kv_cache_dtype.itemsize
    num_layers = kvc.layer_info.num_effective_layers
    nsa = resolve_nsa_config(mc.hf_config)
    return int(-(-compressed_bytes_per_token(nsa, kvc.page_size, num_layers, kv_heads, head_dim,
                                             v_head_dim, elem) // 1))


def pool_configurator_hook(original, self, kvc, *args, **kwargs):
    """AROUND DefaultPoolConfigurator.__init__: count the compressed cache in the cell size."""
    original(self, kvc, *args, **kwargs)
    extra = target_compressed_cell(kvc)
    if extra and getattr(self, "_cell_size", 0):
        logger.warning("specsa: KV pool cell %d B/token + compressed KV %d B/token",
                       self._cell_size, extra)
        self._cell_size += extra


# -- CPU harness ----------------------------------------------------------------------------
CPU_KV_BUDGET_BYTES = 2 << 30        # at most 2 GiB of KV (plus compressed KV) by default
CPU_KV_MIN_TOKENS, CPU_KV_MAX_TOKENS = 4096, 131072
ENV_CPU_KV_BUDGET = "SPECSA_CPU_KV_BYTES"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def cpu_default_max_tokens(model_cfg: dict, dtype: str | None, nsa: NSAConfig,
                           page_size: int, budget: int | None = None) -> int:
    """KV-pool tokens for the CPU harness when the user gave no --max-total-tokens: the pool
    and its compressed cache take at most min(budget, RAM / 8), clamped to [4096, 131072]
    tokens and rounded down to whole pages."""
    budget = budget or min(CPU_KV_BUDGET_BYTES, _ram_bytes() // 8)
    layers = int(model_cfg.get("num_hidden_layers", 32))
    heads = int(model_cfg.get("num_attention_heads", 32))
    kv_heads = int(model_cfg.get("num_key_value_heads", heads))
    head_dim = int(model_cfg.get("head_dim") or int(model_cfg.get("hidden_size", 4096)) // heads)
    elem = 2 if str(dtype) in ("bfloat16", "float16", "half") else 4
    cell = layers * kv_heads * 2 * head_dim * elem
    cell += compressed_bytes_per_token(nsa, page_size, layers, kv_heads, head_dim, head_dim, 4)
    tokens = int(budget // max(cell, 1))
    tokens = max(CPU_KV_MIN_TOKENS, min(CPU_KV_MAX_TOKENS, tokens))
    return tokens // page_size * page_size


def apply_cpu_defaults(sa) -> None:
    """The CPU platform's server-args defaults (SGLANG_PLATFORM=specsa_cpu)."""
    if getattr(sa, "max_total_tokens", None) is not None:
        return
    env = os.environ.get(ENV_CPU_KV_BUDGET, "").strip()
    budget = int(env) if env.isdigit() else None
    cfg = read_model_config(getattr(sa, "model_path", None))
    nsa = resolve_nsa_config(SimpleNamespace(nsa=cfg.get("nsa")))
    ps = max(getattr(sa, "page_size", None) or 1, nsa.stride)
    dtype = getattr(sa, "dtype", None)
    if dtype in (None, "auto"):
        dtype = cfg.get("torch_dtype", "float32")
    sa.max_total_tokens = cpu_default_max_tokens(cfg, dtype, nsa, ps, budget)
    logger.warning("specsa_cpu: --max-total-tokens not given; KV pool of %d tokens (at most "
                   "%d MiB of KV; set --max-total-tokens or %s=<bytes> to change it)",
                   sa.max_total_tokens, (budget or min(CPU_KV_BUDGET_BYTES, _ram_bytes() // 8))
                   >> 20, ENV_CPU_KV_BUDGET)
