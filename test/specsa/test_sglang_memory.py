"""NSA's compressed KV inside SGLang's memory sizing (specsa.sglang_plugin.memory):
page size raised to the compression stride, the compressed cache counted in the pool's bytes
per token, what the backends really allocate within that count, and the CPU harness's default
KV size (a server started exactly as the README says)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from specsa.config import NSAConfig  # noqa: E402
from specsa.sglang_plugin.compressed_cache import PagedCompressedKV  # noqa: E402
from specsa.sglang_plugin.memory import (  # noqa: E402
    compressed_bytes_per_token, compressed_shape, cpu_default_max_tokens,
    pool_configurator_hook, specsa_page_size)

NSA = NSAConfig()                       # stride 16
TINY = NSAConfig(block=8, stride=4, select=16, topn=4, window=32)


def _view(**kw):
    base = dict(attention_backend=None, decode_attention_backend=None,
                prefill_attention_backend=None, speculative_algorithm=None, page_size=1,
                model_path=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, want", [
    (dict(attention_backend="specsa", page_size=1), {"page_size": 16}),
    (dict(attention_backend="specsa", page_size=None), {"page_size": 16}),
    (dict(speculative_algorithm="specsa", page_size=8), {"page_size": 16}),
    (dict(attention_backend="specsa", page_size=16), {}),
    (dict(attention_backend="specsa", page_size=64), {}),
    (dict(attention_backend="triton", page_size=1), {}),
    (dict(speculative_algorithm="EAGLE", page_size=1), {}),
])
def test_page_size_raised_to_stride_for_specsa_only(kw, want, monkeypatch):
    monkeypatch.delenv("SPECSA_NSA", raising=False)
    assert specsa_page_size(_view(**kw)) == want


def test_page_size_follows_the_checkpoint_stride(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECSA_NSA", raising=False)
    (tmp_path / "config.json").write_text('{"nsa": {"block": 8, "stride": 4, "select": 16}}')
    assert specsa_page_size(_view(attention_backend="specsa", model_path=str(tmp_path))) == \
        {"page_size": 4}
    monkeypatch.setenv("SPECSA_NSA", "block=64,stride=32,select=64")
    assert specsa_page_size(_view(attention_backend="specsa", model_path=str(tmp_path))) == \
        {"page_size": 32}


@pytest.mark.parametrize("nsa", [NSA, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("page", [1, 16, 64])
def test_allocations_fit_the_counted_bytes(nsa, page):
    """Whatever page size the user asks for, the server runs at >= stride, and the compressed
    cache both backends allocate for a pool of N tokens stays within N x the bytes per token
    that the pool sizing counted (plus the pool's padding page), i.e. about KV / stride."""
    ps = specsa_page_size(_view(attention_backend="specsa", page_size=page)).get("page_size", page) \
        if nsa is NSA else max(page, nsa.stride)
    layers, hkv, d, tokens = 3, 2, 16, 4096
    per_tok_bf16 = compressed_bytes_per_token(nsa, ps, layers, hkv, d, d, 2)
    per_tok_fp32 = compressed_bytes_per_token(nsa, ps, layers, hkv, d, d, 4)
    kv_per_tok = layers * hkv * 2 * d * 2
    # about KV / stride (one compressed token per stride positions; ceil at small pages)
    assert per_tok_bf16 <= kv_per_tok / nsa.stride * (1 + nsa.stride / ps) + 1e-9
    # Triton path: [layers, pages, cmp_per_page, Hkv, D] for K and V in the pool dtype
    shape = compressed_shape(layers, tokens + ps, ps, nsa, hkv, d)
    triton_bytes = 2 * 2 * torch.Size(shape).numel()
    assert triton_bytes <= per_tok_bf16 * (tokens + ps) + 1e-6
    # torch path (CPU harness): fp32 entries + one validity byte per (layer, page, slot)
    cache = PagedCompressedKV(layers, tokens + ps, ps, nsa.params, hkv, d, d, "cpu")
    margin = 2 * ps * (per_tok_fp32 + layers)          # its two spare pages
    assert cache.nbytes() <= per_tok_fp32 * (tokens + ps) + layers * (tokens + ps) + margin


def _kvc(backend="specsa", draft=False, page=16, device="cuda", dtype=torch.bfloat16):
    mc = SimpleNamespace(get_num_kv_heads=lambda tp: 8 // tp, head_dim=128, v_head_dim=128,
                         hf_config=SimpleNamespace(nsa=None))
    sa = SimpleNamespace(attention_backend=backend, decode_attention_backend=None,
                         prefill_attention_backend=None, speculative_algorithm=None, tp_size=1)
    return SimpleNamespace(server_args=sa, is_draft_worker=draft, model_config=mc,
                           kv_cache_dtype=dtype, device=device, page_size=page,
                           layer_info=SimpleNamespace(num_effective_layers=32))


@pytest.mark.parametrize("page", [16, 64])
def test_pool_cell_size_counts_the_compressed_cache(page, monkeypatch):
    monkeypatch.delenv("SPECSA_NSA", raising=False)
    monkeypatch.delenv("SPECSA_SGLANG_ATTN", raising=False)
    cell = 32 * 8 * 256 * 2                               # SGLang's own bf16 K+V cell

    def original(self, kvc):
        self._cell_size = cell

    conf = SimpleNamespace()
    pool_configurator_hook(original, conf, _kvc(page=page))
    extra = 32 * NSA.params.cmp_per_page(page) * 8 * 256 * 2 / page
    assert conf._cell_size == cell + int(extra) and extra == cell / 16
    for kvc in (_kvc(draft=True), _kvc(backend="triton")):    # the draft / other backends
        conf = SimpleNamespace()
        pool_configurator_hook(original, conf, kvc)
        assert conf._cell_size == cell
    # a pool sized from a budget with this cell holds the pool and the compressed cache
    budget = 10 << 30
    conf = SimpleNamespace()
    pool_configurator_hook(original, conf, _kvc(page=page))
    n = budget // conf._cell_size // page * page
    pool_bytes = n * cell
    cmp_bytes = 2 * 2 * torch.Size(compressed_shape(32, n + page, page, NSA, 8, 128)).numel()
    assert pool_bytes + cmp_bytes <= budget + 2 * 2 * 32 * 8 * 128 * NSA.params.cmp_per_page(page)


def test_cpu_default_kv_size():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16}
    n = cpu_default_max_tokens(cfg, "float32", TINY, 4, budget=16 << 20)
    per_tok = 2 * 2 * 2 * 16 * 4 + compressed_bytes_per_token(TINY, 4, 2, 2, 16, 16, 4)
    assert n % 4 == 0 and n * per_tok <= 16 << 20 and (n + 4) * per_tok > (16 << 20) - 4 * per_tok
    big = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128}
    assert cpu_default_max_tokens(big, "float32", NSA, 16, budget=1 << 30) == 4096   # floor
    assert cpu_default_max_tokens(cfg, "float32", TINY, 4, budget=1 << 40) == 131072  # cap



@pytest.mark.slow
def test_cpu_server_as_the_readme_says(tmp_path):
    """`SGLANG_PLATFORM=specsa_cpu python -m sglang.launch_server --model-path M --device cpu
    --dtype float32 --speculative-algo specsa` (no --max-total-tokens): the server picks a
    laptop-sized pool, runs at page size = stride, its compressed cache is KV / stride, and it
    serves."""
    import json
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    from specsa.model.tiny import build_tiny
    from specsa.sglang_plugin.harness import free_port, Server

    model = build_tiny(tmp_path / "m", kind="llama", seed=0)
    port = free_port()
    log = tmp_path / "server.log"
    env = {**__import__("os").environ, "SGLANG_PLATFORM": "specsa_cpu", "OMP_NUM_THREADS": "1",
           "SPECSA_CPU_KV_BYTES": str(16 << 20)}
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path",
                             str(model), "--device", "cpu", "--dtype", "float32",
                             "--speculative-algo", "specsa", "--port", str(port)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd="/tmp")
    srv = Server(proc, port, log)
    try:
        srv.wait_healthy(600)
        with urllib.request.urlopen(f"{srv.url}/get_server_info") as r:
            info = json.loads(r.read())
        cfg = json.loads((model / "config.json").read_text())
        assert info["page_size"] == cfg["nsa"]["stride"]
        n = info["max_total_num_tokens"]
        assert n == cpu_default_max_tokens(cfg, "float32", TINY, cfg["nsa"]["stride"],
                                           budget=16 << 20)
        text = log.read_text()
        mib = float(re.search(r"compressed KV ([0-9.]+) MiB for a pool of", text).group(1))
        per_tok = compressed_bytes_per_token(TINY, info["page_size"], 2, 2, 16, 16, 4)
        assert mib * 2**20 <= (n + 3 * info["page_size"]) * (per_tok + 2) + 2**20 * 0.05
        out = srv.generate(input_ids=list(range(2, 150)), max_new_tokens=8)
        assert len(out["output_ids"]) == 8
    finally:
        srv.stop()
        time.sleep(0.5)


@pytest.mark.slow
def test_page_64_server_equals_runtime_with_radix_hits(tmp_path):
    """Page size 64 (16 compressed slots per page at the tiny model's stride 4): speculative
    greedy output equals the runtime, and a repeated prompt and a shared prefix hit the radix
    cache (pages and their compressed tokens reused exactly)."""
    import random

    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    from specsa.sglang_plugin.harness import free_port, launch_server

    model = str(build_tiny(tmp_path / "m", kind="llama", seed=0))
    rng = random.Random(64)
    long = [rng.randrange(2, 512) for _ in range(230)]
    shared = long[:150] + [rng.randrange(2, 512) for _ in range(40)]
    ref = [r.tokens for r in generate(load_model(model), [long, shared],
                                      SamplingConfig(max_new_tokens=12))[0]]
    args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3", "--page-size", "64"]
    with launch_server(model, free_port(), args,
                       env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}) as srv:
        first = srv.generate(input_ids=long, max_new_tokens=12)
        again = srv.generate(input_ids=long, max_new_tokens=12)
        other = srv.generate(input_ids=shared, max_new_tokens=12)
        log = srv.log_path.read_text()
    assert first["output_ids"] == again["output_ids"] == ref[0]
    assert other["output_ids"] == ref[1]
    assert again["meta_info"]["cached_tokens"] >= 192
    assert other["meta_info"]["cached_tokens"] >= 128
    assert "page 64" in log and "memory leak" not in log
