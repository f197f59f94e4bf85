"""The GPU check scripts run end to end on the CPU harness (`--cpu-smoke`), so they do not rot
between the rare sessions that have a GPU: the sampled-verification check starts its two
servers side by side, writes every setting's chi-square rows and marks the JSON complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")
pytest.importorskip("scipy")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_sampling_check_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), REQS="8")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "sglang_gpu_sampling_check.py"),
                        "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=1200,
                       cwd="/tmp")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "sglang_gpu_sampling_check.json").read_text())
    assert res["complete"] and res["requests"] == 8
    settings = {row["setting"] for row in res["rows"]}
    assert settings == {"default", "top_k", "top_p", "power: specsa t=0.7 vs ar t=1.0"}
    assert len(res["rows"]) == 4 * res["new_tokens"]
    assert all(0.0 <= row["p"] <= 1.0 for row in res["rows"])
    assert set(res["warmup_s"]) == {f"{s}/{k}" for s in ("nsa_ar", "specsa")
                                    for k in ("default", "top_k", "top_p")} | {"specsa/power_t0.7"}
