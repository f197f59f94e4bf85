"""benchmark/profile_runtime_steps.py measures the runtime's own whole steps (the GPU profile
of the standalone runtime, not composed from kernel timings) and checks the planner against
the steps it prices; here it runs end to end on the tiny CPU model (--tiny)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from specsa.orchestrator import load_profile

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "profile_runtime_steps", REPO / "benchmark" / "profile_runtime_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runtime_step_profile_and_plan_check(tmp_path):
    assert _script().main(["--tiny", "--out", str(tmp_path), "--check-tokens", "20"]) == 0
    prof = load_profile(tmp_path / "cpu" / "runtime" / "tiny.json")
    assert load_profile(tmp_path / "runtime_profile_cpu_tiny.json") == prof   # flat copy
    assert prof.model.num_layers == 4 and dict(prof.metadata)["engine"] == "runtime"
    assert {d.name for d in prof.draft} == {"oracle", "self:1"}
    # a full grid: 2 contexts x 2 batches x 2 T x 2 traversals x 2 refresh periods
    assert len(prof.verify) == 32 and len(prof.decode) == 8
    assert {e.refresh_period for e in prof.verify} == {1, 4}
    assert all(e.ms > 0 for e in prof.verify)
    check = json.loads((tmp_path / "runtime_plan_check.json").read_text())
    runs = {r["precision"]: r for r in check["runs"]}
    assert set(runs) == {"strict", "reuse"}
    for prec, run in runs.items():
        p = run["planner"]
        assert p["steps"] == len(run["steps"]) > 0
        assert p["predicted_ms"] > 0 and p["measured_ms"] > 0
        assert p["measured_over_predicted"] == p["measured_ms"] / p["predicted_ms"]
    # STRICT never leaves its class (no reuse) and emits the autoregressive tokens
    assert runs["strict"]["same_tokens_as_ar"] is True
    assert runs["strict"]["first_divergence"] is None
    assert set(runs["strict"]["knob_counts"]["refresh_period"]) == {"1"}
