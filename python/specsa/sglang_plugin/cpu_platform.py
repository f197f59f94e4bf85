"""Out-of-tree SGLang platform that runs the real server on a CPU-only machine (test harness).

SGLang's stock CPU engine needs a CPU build of sgl-kernel that is not on PyPI.
This platform (entry point group `sglang.srt.platforms`, name `specsa_cpu`) is selected only by
`SGLANG_PLATFORM=specsa_cpu`; it supplies the torch KV pool / allocator classes that 0.5.17
requires from out-of-tree platforms, and `register()` then installs the torch fallbacks of
`cpu_fallbacks.py`. Nothing here is imported on the CUDA path.
"""
from __future__ import annotations

import os

PLATFORM_NAME = "specsa_cpu"


def selected() -> bool:
    """True when the user asked for this platform (the only switch; read at the edge)."""
    return os.environ.get("SGLANG_PLATFORM", "") == PLATFORM_NAME


def activate() -> str | None:
    """Entry point of `sglang.srt.platforms`: the platform class path, or None (not selected)."""
    return "specsa.sglang_plugin.cpu_platform.SpecsaCpuPlatform" if selected() else None


def _make_allocator(size, page_size, dtype, device, kvcache, need_sort):
    import torch
    from sglang.srt.mem_cache.allocator import (PagedTokenToKVPoolAllocator,
                                                TokenToKVPoolAllocator, alloc_extend_naive)
    from sglang.srt.mem_cache.allocator.paged import get_num_new_pages

    if page_size == 1:
        return TokenToKVPoolAllocator(size, dtype=dtype, device=device, kvcache=kvcache,
                                      need_sort=need_sort)

    # 0.5.17's paged allocator launches Triton unconditionally (allocator/paged.py:197,238);
    # its torch twin alloc_extend_naive does the same page arithmetic.
    class CpuPagedAllocator(PagedTokenToKVPoolAllocator):
        def alloc_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc,
                         extend_num_tokens, num_new_pages=None):
            bs = len(prefix_lens)
            if self.need_sort and extend_num_tokens // self.page_size + bs + 1 > len(self.free_pages):
                self.merge_and_sort_free()
            if num_new_pages is None:
                num_new_pages = get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size,
                                                  prefix_lens=prefix_lens_cpu)
            if num_new_pages > len(self.free_pages):
                return None
            out = torch.empty((extend_num_tokens,), dtype=torch.int64, device=self.device)
            alloc_extend_naive(prefix_lens, seq_lens, last_loc, self.free_pages, out,
                               self.page_size, self.device)
            self.free_pages = self.free_pages[num_new_pages:]
            return out

        def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
            return self.alloc_extend(seq_lens - 1, seq_lens_cpu - 1, seq_lens, seq_lens_cpu,
                                     last_loc, len(seq_lens))

    return CpuPagedAllocator(size, page_size=page_size, dtype=dtype, device=device,
                             kvcache=kvcache, need_sort=need_sort)


def _platform_cls():
    from sglang.srt.platforms.cpu import CpuDeviceMixin
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import SRTPlatform

    class _SpecsaCpuPlatform(CpuDeviceMixin, SRTPlatform):
        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"

        def get_default_attention_backend(self):
            return "torch_native"

        def apply_server_args_defaults(self, server_args):
            # a laptop-sized KV pool unless --max-total-tokens is given (SGLang would size it
            # from the machine's RAM: gigabytes for a tiny model)
            from .memory import apply_cpu_defaults
            apply_cpu_defaults(server_args)

        def is_pin_memory_available(self, device=None):
            return False

        # 0.5.17 asks OOT platforms for these (kv_cache_configurator.py:868,1080;
        # memory_pool.py:3609); the base class raises NotImplementedError.
        def get_mha_kv_pool_cls(self):
            from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
            return MHATokenToKVPool

        def get_mla_kv_pool_cls(self):
            from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
            return MLATokenToKVPool

        def get_paged_allocator_cls(self):
            return _make_allocator

    _SpecsaCpuPlatform.__name__ = _SpecsaCpuPlatform.__qualname__ = "SpecsaCpuPlatform"
    return _SpecsaCpuPlatform


def __getattr__(name: str):
    # The class is built lazily so that importing this module (the entry point is resolved in
    # every process) never imports sglang's platform machinery unless the platform is chosen.
    if name == "SpecsaCpuPlatform":
        cls = _platform_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
