"""Real SGLang 0.5.17 server processes on the CPU harness (SGLANG_PLATFORM=specsa_cpu):
`--speculative-algo specsa` greedy outputs equal the same server without speculation (NSA
autoregressive, backend specsa) and the standalone runtime (`specsa.runtime.generate`), for
prompts long enough that NSA is sparse at the tiny model's geometry (block 8, stride 4, select
16, top-4, window 32; prompts of ~130-230 tokens), with chain and tree drafts, a separate draft
model and self-drafting, page sizes 1 (which a specsa server raises to the compression
stride, 4 here) and 16 (64: test_sglang_memory.py), concurrent requests and radix-cache hits; plus
aborts / invalid requests without KV leaks, a frontend program, and plain launches.

One server per configuration (class-scoped); each start takes ~20-40 s on 2 cores.
"""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

NEW = 16                          # greedy tokens per request
LEAK_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from specsa.model.tiny import build_tiny
    root = tmp_path_factory.mktemp("sglang_models")
    target = build_tiny(root / "target", kind="llama", seed=0)
    # the same tokenizer, a different (1-layer) network: a separate draft model
    draft = build_tiny(root / "draft", kind="llama", seed=0, num_layers=1)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)
    return [[rng.randrange(2, 512) for _ in range(n)] for n in (230, 170, 131, 201)]


@pytest.fixture(scope="module")
def reference(models, prompts):
    """Greedy tokens of the standalone runtime (autoregressive NSA, fp32)."""
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.runtime.generate import generate
    model = load_model(models[0])
    res, _ = generate(model, prompts, SamplingConfig(max_new_tokens=NEW))
    return [r.tokens for r in res]


def _check_greedy(srv, prompts, reference, what):
    for i, (p, ref) in enumerate(zip(prompts, reference)):
        out = srv.generate(input_ids=p, max_new_tokens=NEW)
        assert out["output_ids"] == ref, f"{what}: prompt {i} differs from the runtime"


def _check_concurrent(srv, prompts, reference):
    assert srv.generate_concurrent(prompts, NEW) == reference


def _check_radix(srv, prompts, reference, page):
    p = prompts[0]
    first = srv.generate(input_ids=p, max_new_tokens=NEW)
    again = srv.generate(input_ids=p, max_new_tokens=NEW)
    assert first["output_ids"] == again["output_ids"] == reference[0]
    cached = again["meta_info"]["cached_tokens"]
    assert cached >= (len(p) // page - 1) * page, f"expected a radix hit, cached={cached}"
    # a shared prefix with a different tail: reuses pages (and their compressed tokens)
    q = p[:150] + prompts[1][:40]
    out = srv.generate(input_ids=q, max_new_tokens=NEW)
    assert out["meta_info"]["cached_tokens"] >= (150 // page - 1) * page
    return q, out["output_ids"]


@pytest.fixture(scope="module")
def nospec(models):
    """NSA autoregressive on SGLang: backend specsa, no speculation, page 1."""
    with launch_server(models[0], free_port(), ["--attention-backend", "specsa"]) as srv:
        yield srv


class TestNoSpec:
    def test_equals_runtime(self, nospec, prompts, reference):
        _check_greedy(nospec, prompts, reference, "no-spec specsa backend")


class TestChainDraftModelPage16:
    @pytest.fixture(scope="class")
    def srv(self, models):
        args = ["--speculative-algo", "specsa", "--speculative-draft-model-path", models[1],
                "--speculative-num-steps", "3", "--page-size", "16"]
        with launch_server(models[0], free_port(), args, env=LEAK_ENV) as srv:
            yield srv

    def test_greedy_equals_runtime(self, srv, prompts, reference):
        _check_greedy(srv, prompts, reference, "chain + draft model, page 16")

    def test_concurrent(self, srv, prompts, reference):
        _check_concurrent(srv, prompts, reference)

    def test_radix_cache(self, srv, nospec, prompts, reference):
        q, got = _check_radix(srv, prompts, reference, 16)
        assert got == nospec.generate(input_ids=q, max_new_tokens=NEW)["output_ids"]

    def test_openai_completions(self, srv, nospec, prompts):
        body = {"model": "m", "prompt": prompts[2], "max_tokens": NEW, "temperature": 0}
        s1, a = srv.post("/v1/completions", body)
        s2, b = nospec.post("/v1/completions", body)
        assert s1 == s2 == 200, (a, b)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["usage"]["completion_tokens"] == NEW or a["choices"][0]["finish_reason"] == "stop"


class TestTreeSelfDraftPage1:
    @pytest.fixture(scope="class")
    def srv(self, models):
        args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3",
                "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "6",
                "--context-length", "512"]
        with launch_server(models[0], free_port(), args, env=LEAK_ENV) as srv:
            yield srv

    def test_greedy_equals_runtime_and_accepts(self, srv, prompts, reference):
        accept = []
        for p, ref in zip(prompts, reference):
            out = srv.generate(input_ids=p, max_new_tokens=NEW)
            assert out["output_ids"] == ref
            accept.append(out["meta_info"]["spec_accept_length"])
        assert max(accept) > 1.5, f"self-drafting should accept drafts, got {accept}"

    def test_concurrent(self, srv, prompts, reference):
        _check_concurrent(srv, prompts, reference)

    def test_radix_cache(self, srv, nospec, prompts, reference):
        # asked for SGLang's default page size 1; a specsa server runs at page size = the
        # compression stride (4 at the tiny geometry), so radix hits are 4-token aligned
        q, got = _check_radix(srv, prompts, reference, 4)
        assert got == nospec.generate(input_ids=q, max_new_tokens=NEW)["output_ids"]

    def test_openai_and_text_prompt(self, srv, nospec):
        text = "Speculative decoding drafts tokens and verifies them. " * 12
        body = {"model": "m", "prompt": text, "max_tokens": NEW, "temperature": 0}
        s1, a = srv.post("/v1/completions", body)
        s2, b = nospec.post("/v1/completions", body)
        assert s1 == s2 == 200, (a, b)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert srv.generate(text=text, max_new_tokens=NEW)["output_ids"] == \
            nospec.generate(text=text, max_new_tokens=NEW)["output_ids"]

    def test_frontend_program(self, srv, nospec):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
        import frontend_program as fp
        got = fp.run(srv.url, max_tokens=8)
        want = fp.run(nospec.url, max_tokens=8)
        assert got["verdict"] in fp.CHOICES
        assert got == want      # greedy: the same program answers the same with and without spec
        assert all(got[f"answer_{i}"] for i in range(len(fp.QUESTIONS)))

    def test_abort_and_invalid_requests_leave_no_leak(self, srv, prompts, reference):
        # a long request aborted mid-generation
        rid = "specsa-abort-test"
        res = {}

        def long_req():
            res["out"] = srv.post("/generate", {"input_ids": prompts[2][:40], "rid": rid,
                                                "sampling_params": {"temperature": 0,
                                                                    "max_new_tokens": 460,
                                                                    "ignore_eos": True}})
        t = threading.Thread(target=long_req)
        t.start()
        for _ in range(200):          # abort once the request is running
            _, load = srv.get("/get_load")
            if sum(x["num_reqs"] for x in load):
                break
            time.sleep(0.05)
        srv.post("/abort_request", {"rid": rid})
        t.join(timeout=300)
        status, out = res["out"]
        assert status == 200 or status >= 400
        if status == 200:
            assert len(out["output_ids"]) < 460, "the request was not aborted"
        # invalid requests: too long for --context-length 512, bad sampling params
        # (out-of-vocabulary input_ids are not checked by SGLang 0.5.17 itself: not sent)
        for body in ({"input_ids": list(range(2, 600)), "sampling_params": {"max_new_tokens": 4}},
                     {"input_ids": prompts[1], "sampling_params": {"temperature": -1.0}},
                     {"input_ids": prompts[1], "sampling_params": {"max_new_tokens": -3}}):
            status, out = srv.post("/generate", body)
            assert status >= 400, (body["sampling_params"], status, out)
        # sampled requests (SGLang's default temperature 1.0, top-k, top-p) are verified by
        # the torch tree speculative sampling of cpu_fallbacks.py (distribution: see
        # test_sglang_sampling.py)
        for params in ({}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9}):
            status, out = srv.post("/generate", {"input_ids": prompts[1], "sampling_params": {
                "max_new_tokens": 4, "ignore_eos": True, **params}})
            assert status == 200 and len(out["output_ids"]) == 4, (params, status, out)
        time.sleep(4.0)   # idle: the scheduler's strict memory check runs (raises on a leak)
        assert srv.alive(), srv.log_tail()
        assert srv.get("/health_generate")[0] == 200
        status, load = srv.get("/get_load")
        assert status == 200 and sum(x["num_tokens"] for x in load) == 0, load
        assert "memory leak" not in srv.log_path.read_text()
        assert srv.generate(input_ids=prompts[2], max_new_tokens=NEW)["output_ids"] == reference[2]


class TestTreeSelfDraftPage16:
    @pytest.fixture(scope="class")
    def srv(self, models):
        args = ["--speculative-algo", "specsa", "--speculative-num-steps", "2",
                "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4",
                "--page-size", "16"]
        with launch_server(models[0], free_port(), args, env=LEAK_ENV) as srv:
            yield srv

    def test_greedy_equals_runtime(self, srv, prompts, reference):
        _check_greedy(srv, prompts[:2], reference[:2], "tree + self-draft, page 16")
        _check_radix(srv, prompts, reference, 16)


TRITON_ENV = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1"}


class TestTritonTarget:
    """The CUDA target path (Triton kernels, static per-step buffers that CUDA graphs capture)
    run on the CPU under the Triton interpreter: NSA autoregressive and a tree self-draft with
    page size 16 both equal the runtime."""

    @pytest.fixture(scope="class")
    def ar(self, models):
        with launch_server(models[0], free_port(), ["--attention-backend", "specsa"],
                           env={**TRITON_ENV, **LEAK_ENV}) as srv:
            yield srv

    @pytest.fixture(scope="class")
    def spec(self, models):
        args = ["--speculative-algo", "specsa", "--speculative-num-steps", "2",
                "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4",
                "--page-size", "16"]
        with launch_server(models[0], free_port(), args, env={**TRITON_ENV, **LEAK_ENV}) as srv:
            yield srv

    def test_autoregressive_equals_runtime(self, ar, prompts, reference):
        _check_greedy(ar, prompts[:2], reference[:2], "triton target, no speculation")
        log = ar.log_path.read_text()
        assert "target NSA attention on the Triton kernels" in log
        # the step stores its K/V with the staging launch (kernels/stage), as on CUDA
        assert "step K/V store fused with staging" in log

    def test_tree_equals_runtime_and_radix(self, spec, prompts, reference):
        _check_greedy(spec, prompts[:2], reference[:2], "triton target, tree + self-draft")
        _check_radix(spec, prompts, reference, 16)
        log = spec.log_path.read_text()
        assert "memory leak" not in log and "target NSA attention on the Triton kernels" in log
        assert "step K/V store fused with staging" in log
        # SGLang writes the (unread) tree mask into the backend's small QLEN_ONLY buffer
        assert "verify tree mask QLEN_ONLY" in log


@pytest.fixture(scope="module")
def native_model(tmp_path_factory):
    """A native NSA Qwen2 (gates + learned compression, QKV biases) at the tiny geometry."""
    from specsa.model.tiny import build_tiny
    return str(build_tiny(tmp_path_factory.mktemp("sglang_native") / "m", kind="qwen2",
                          native=True, seed=3))


@pytest.fixture(scope="module")
def native_reference(native_model, prompts):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.runtime.generate import generate
    res, _ = generate(load_model(native_model), prompts[:2], SamplingConfig(max_new_tokens=NEW))
    return [r.tokens for r in res]


class TestNativeCheckpoint:
    """Native NSA weights (gate_proj, compress_k/v) load into SGLang's Qwen2 class and drive the
    specsa backend: a tree self-draft equals the runtime on the torch path (CPU default) and on
    the Triton path (interpreter)."""

    ARGS = ["--speculative-algo", "specsa", "--speculative-num-steps", "2",
            "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4"]

    def test_torch_path(self, native_model, prompts, native_reference):
        with launch_server(native_model, free_port(), self.ARGS, env=LEAK_ENV) as srv:
            _check_greedy(srv, prompts[:2], native_reference, "native, torch path")
            assert "native NSA weights attached" in srv.log_path.read_text()

    def test_triton_path(self, native_model, prompts, native_reference):
        with launch_server(native_model, free_port(), self.ARGS, env={**TRITON_ENV, **LEAK_ENV}) as srv:
            _check_greedy(srv, prompts[:1], native_reference[:1], "native, triton path")


def test_plain_launch_without_specsa(models, prompts):
    """The plugin does not break SGLang when SpecSA is not used."""
    with launch_server(models[0], free_port(), ["--attention-backend", "torch_native"]) as srv:
        out = srv.generate(input_ids=prompts[2][:40], max_new_tokens=4)
        assert len(out["output_ids"]) == 4


def test_specsa_rejects_other_target_backend(models):
    import subprocess
    code = ("from sglang.srt.plugins import load_plugins; load_plugins();"
            "from sglang.srt.server_args import prepare_server_args;"
            f"prepare_server_args(['--model-path', {models[0]!r}, '--device', 'cpu',"
            "'--speculative-algo', 'specsa', '--attention-backend', 'torch_native'])")
    env = dict(os.environ, SGLANG_PLATFORM="specsa_cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd="/tmp", timeout=300)
    assert r.returncode != 0
    assert "must be the 'specsa' NSA backend" in r.stderr, r.stderr[-2000:]
