"""NSA decoder model: config parsing, RoPE, paged caches, attention, loader, tiny checkpoints.

    from specsa.model import load_model, BlockInput
    model = load_model(path, nsa_overrides="window=64")
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=256))
"""
from .block import BlockError, BlockInput
from .cache import BlockMeta, CacheError, CacheFullError, PagedKVCache, PendingKV
from .config import ModelConfig, ModelConfigError, RopeConfig
from .decoder import NSADecoder
from .load import LoadError, load_configs, load_model, load_tokenizer

__all__ = ["BlockError", "BlockInput", "BlockMeta", "CacheError", "CacheFullError",
           "PagedKVCache", "PendingKV", "ModelConfig", "ModelConfigError", "RopeConfig",
           "NSADecoder", "LoadError", "load_configs", "load_model", "load_tokenizer"]
