"""Verification knobs inside SGLang (SPECSA_VERIFY, specsa.config.VerifyKnobs): REUSE classes
skip the selection refresh on reuse layers, REUSE with refresh period 1 is exact, SHARED_INDEX
serves under APPROX, and a knob outside its precision class stops the server at start-up with
a message. The target runs on the Triton path under the interpreter (the CUDA path's code)."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("sglang")

from specsa.config import ConfigError, PrecisionClass, Schedule, VerifyKnobs  # noqa: E402
from specsa.sglang_plugin.settings import verify_knobs  # noqa: E402

NEW = 12
TRITON_ENV = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1"}
SPEC = ["--speculative-algo", "specsa", "--speculative-num-steps", "3"]



def test_knobs_parse_and_class_rules():
    assert verify_knobs({}) == VerifyKnobs()
    k = verify_knobs({"SPECSA_VERIFY": "precision=approx_reuse,schedule=shared_index,"
                                      "group-size=4,refresh_period=3"})
    assert (k.precision, k.schedule, k.group_size, k.refresh_period) == \
        (PrecisionClass.APPROX_REUSE, Schedule.SHARED_INDEX, 4, 3)
    assert [k.refreshes(i) for i in range(7)] == [True, False, False, True, False, False, True]
    assert verify_knobs({"SPECSA_VERIFY": '{"precision": "reuse", "refresh_period": 2}'}) == \
        VerifyKnobs(precision="reuse", refresh_period=2)
    for bad, words in (("refresh_period=2", "needs a REUSE precision class"),
                       ("precision=reuse,schedule=shared_index", "needs an APPROX precision"),
                       ("precision=loose", "unknown value 'loose'"),
                       ("refresh_period=0", "must be an integer >= 1"),
                       ("window=3", "unknown key 'window'"),
                       ("{not json", "cannot read")):
        with pytest.raises(ConfigError, match=words):
            verify_knobs({"SPECSA_VERIFY": bad})


@pytest.fixture(scope="module")
def model_and_ref(tmp_path_factory):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    m = build_tiny(tmp_path_factory.mktemp("knobs") / "m", kind="llama", seed=0)
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (190, 150)]
    res, _ = generate(load_model(str(m)), prompts, SamplingConfig(max_new_tokens=NEW))
    return str(m), prompts, [r.tokens for r in res]


@pytest.mark.slow
def test_reuse_skips_refresh_and_period_one_is_exact(model_and_ref):
    from specsa.sglang_plugin.harness import free_port, launch_server
    model, prompts, ref = model_and_ref
    env = {**TRITON_ENV, "SPECSA_VERIFY": "precision=reuse,refresh_period=2"}
    with launch_server(model, free_port(), SPEC, env=env) as srv:
        outs = [srv.generate(input_ids=p, max_new_tokens=NEW)["output_ids"] for p in prompts]
        log = srv.log_path.read_text()
    assert all(len(o) == NEW for o in outs)
    # the tiny model has 2 layers: layer 0 refreshes, layer 1 reuses its selection
    assert "ran the selection refresh in 1 of 2 layers (refresh period 2)" in log, log[-3000:]
    env = {**TRITON_ENV, "SPECSA_VERIFY": "precision=reuse,refresh_period=1"}
    with launch_server(model, free_port(), SPEC, env=env) as srv:
        assert [srv.generate(input_ids=p, max_new_tokens=NEW)["output_ids"]
                for p in prompts] == ref
        assert "ran the selection refresh in 2 of 2 layers" in srv.log_path.read_text()


@pytest.mark.slow
def test_shared_index_serves_under_approx(model_and_ref):
    from specsa.sglang_plugin.harness import free_port, launch_server
    model, prompts, _ = model_and_ref
    env = {**TRITON_ENV, "SPECSA_VERIFY": "precision=approx,schedule=shared_index,group_size=2"}
    with launch_server(model, free_port(), SPEC, env=env) as srv:
        out = srv.generate(input_ids=prompts[0], max_new_tokens=NEW)
        assert len(out["output_ids"]) == NEW
        assert "schedule=<Schedule.SHARED_INDEX" in srv.log_path.read_text()


def test_knob_outside_class_is_a_startup_error(model_and_ref):
    code = ("from sglang.srt.plugins import load_plugins; load_plugins();"
            "from sglang.srt.server_args import prepare_server_args;"
            f"prepare_server_args(['--model-path', {model_and_ref[0]!r}, '--device', 'cpu',"
            "'--speculative-algo', 'specsa'])")
    env = dict(os.environ, SGLANG_PLATFORM="specsa_cpu", SPECSA_VERIFY="refresh_period=4")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd="/tmp", timeout=300)
    assert r.returncode != 0
    assert "SPECSA_VERIFY: refresh period 4 reuses block selections" in r.stderr, r.stderr[-2000:]
