"""SpecSA under SGLang tensor parallelism on the CPU harness (two ranks over gloo, one core
each): greedy outputs at --tp-size 2 equal --tp-size 1 for NSA autoregressive decoding, for
speculative decoding (self-draft chain) and for a native NSA checkpoint whose gate and
learned-compression weights are sharded like the attention heads (query heads / KV heads)."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

NEW = 12
TP2 = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}      # one core per rank (SGLang's CPU TP rule)



@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(99)
    return [[rng.randrange(2, 512) for _ in range(n)] for n in (210, 140)]


def _outputs(model, args, prompts, env=None):
    with launch_server(model, free_port(), args, env=env, timeout=900) as srv:
        outs = [srv.generate(input_ids=p, max_new_tokens=NEW)["output_ids"] for p in prompts]
        return outs, srv.log_path.read_text()


def test_tp2_equals_tp1_autoregressive_and_speculative(tmp_path, prompts):
    from specsa.model.tiny import build_tiny
    model = str(build_tiny(tmp_path / "m", kind="llama", seed=4, num_heads=4, num_kv_heads=2))
    ar = ["--attention-backend", "specsa"]
    ref, _ = _outputs(model, ar, prompts)
    got, log = _outputs(model, ar + ["--tp-size", "2"], prompts, TP2)
    assert got == ref
    assert "TP1" in log                      # the second rank ran
    spec = ["--speculative-algo", "specsa", "--speculative-num-steps", "3", "--tp-size", "2"]
    got, _ = _outputs(model, spec, prompts, TP2)
    assert got == ref


def test_native_checkpoint_sharded(tmp_path, prompts):
    from specsa.model.tiny import build_tiny
    model = str(build_tiny(tmp_path / "n", kind="qwen2", native=True, seed=3, num_heads=4,
                           num_kv_heads=2))
    ar = ["--attention-backend", "specsa"]
    ref, _ = _outputs(model, ar, prompts[:1])
    got, log = _outputs(model, ar + ["--tp-size", "2"], prompts[:1], TP2)
    assert "native NSA weights attached to 2 layers (tensor-parallel rank 1 of 2)" in log
    assert got == ref
