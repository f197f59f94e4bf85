"""The GPU check scripts run end to end on the CPU harness (`--cpu-smoke`), so they do not rot
between the rare sessions that have a GPU: the sampled-verification check starts its two
servers side by side, writes every setting's chi-square rows and marks the JSON complete."""
from __future__ import annotations

import json
import os
import shutil
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


def test_e2e_cpu_smoke_batches_and_measured_profile(tmp_path):
    """benchmark/sglang_e2e.py on the CPU harness: NSA AR and a chain at batches 1 and 2 (the
    batch sent as one request, so its requests decode together), then a SPECSA_PLAN=sweep
    server whose measured profile the next server's SPECSA_PLAN=auto reads (@sweep); the
    DRAFT_VOCAB server also runs another checkout's SpecSA (PACKAGE=, an A/B of two commits):
    a snapshot whose plugin logs a marker."""
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "python", pkg / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "COMMIT").write_text("abc1234\n")
    init = pkg / "python" / "specsa" / "sglang_plugin" / "__init__.py"
    init.write_text(init.read_text() + '\nimport logging as _l\n'
                    '_l.getLogger("specsa").warning("specsa package marker abc1234")\n')
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / "sglang_e2e.py"), "--cpu-smoke",
         "--out", str(out), "--systems", "nsa_ar,specsa_chain",
         "--variant", "sweep=specsa_chain:SPECSA_PLAN=sweep,steps=0:1:3",
         "--variant", "auto=specsa_chain:SPECSA_PLAN=auto,profile=@sweep",
         "--variant", f"hot=specsa_chain:DRAFT_VOCAB=300;PACKAGE={pkg}",
         "--contexts", "512", "--batches", "1,2", "--new-tokens", "24"],
        capture_output=True, text=True, timeout=1500, cwd="/tmp")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "sglang_e2e.json").read_text())
    rows = {(x["system"], x["batch"]): x for x in res["rows"]}
    assert set(rows) == {(s, b) for s in ("nsa_ar", "specsa_chain", "sweep", "auto", "hot")
                         for b in (1, 2)}
    # DRAFT_VOCAB: a token map of the first 300 ids reaches that server (and only it)
    hot_args = res["servers"]["hot/2l"]["args"]
    assert hot_args[hot_args.index("--speculative-token-map") + 1].endswith("hot_tokens_300.pt")
    assert "--speculative-token-map" not in res["servers"]["specsa_chain/2l"]["args"]
    assert res["servers"]["hot/2l"]["env"] == {"DRAFT_VOCAB": "300", "PACKAGE": str(pkg)}
    # PACKAGE: that server (and only it) imported the snapshot's SpecSA
    assert "specsa package marker abc1234" in (out / "log_hot_2l.txt").read_text()
    assert "package marker" not in (out / "log_specsa_chain_2l.txt").read_text()
    assert {x["package_commit"] for x in res["rows"] if x["system"] == "hot"} == {"abc1234"}
    assert "abc1234" not in {x["package_commit"] for x in res["rows"] if x["system"] != "hot"}
    for (system, batch), row in rows.items():
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0, row
        # the batch's requests overlap for most of their decode
        assert row["tokens_per_s_all_active"] and row["all_active_s"] > 0, row
        if system != "nsa_ar":
            assert row["same_head_as_nsa_ar"] is True, row
    prof = res["servers"]["sweep/2l"]["profile"]
    assert Path(prof).is_file(), prof
    assert res["servers"]["auto/2l"]["env"]["SPECSA_PLAN"] == f"auto,profile={prof}"
    # the auto server planned from it: its steps carry the planner's predicted step time
    assert rows[("auto", 1)]["breakdown"]["predicted_step_ms"] > 0
