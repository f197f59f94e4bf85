"""Every kernel configuration the kernel tests launch in the Triton interpreter also compiles for
the GPU (sm_90), on a machine without one.

The interpreter runs a kernel as Python and never type-checks it the way the compiler does:
`score_topk_grouped_stats_kernel` re-bound `_` (an int64 block from `_group_q`) with the int32
results of `_prov_stats` inside a run-time `if` for the split refresh with provisional tokens.
Every CPU test passed; on the H100 (commit 54c7899) the kernel failed to compile, and with it
16 refresh tests and every SGLang server at 64K. This test records the launches of the kernel
tests (test/launch_record.py), then compiles each distinct configuration's front end and one
configuration per kernel all the way to a cubin.

In a session that runs every kernel test (CI, `make test`) conftest records their launches as
they run and this test, ordered last, compiles those; run alone or in a filtered session it
runs the kernel tests again in a subprocess to record them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SESSION_LAUNCHES
from launch_record import assert_records_compile

TEST = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="with a GPU the kernel tests compile every launch")]


def _record_in_subprocess(rec: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", SPECSA_RECORD_LAUNCHES=str(rec))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not slow", str(TEST / "kernels"),
                        # the step-metadata kernel's tests compare against specsa.device_metadata
                        str(TEST / "specsa" / "test_step_metadata_kernel.py"),
                        "--deselect", str(TEST / "kernels" / "test_sm90_compile.py")],
                       env=env, capture_output=True, text=True, timeout=1800, cwd=TEST.parent)
    assert r.returncode == 0, f"recording run failed:\n{r.stdout[-3000:]}"


def test_every_interpreted_launch_compiles_for_sm90(tmp_path):
    session = SESSION_LAUNCHES["path"]
    if session is not None and SESSION_LAUNCHES["complete"] and session.exists():
        rec = session                       # this session ran every kernel test: its launches
    else:
        rec = tmp_path / "launches.jsonl"
        _record_in_subprocess(rec)
    names = {json.loads(line)["name"] for line in rec.read_text().splitlines()}
    # the kernels of every production path were launched (a recorder that saw nothing passes)
    assert {"_nsa_verify_fwd_kernel", "score_topk_kernel", "score_topk_grouped_stats_kernel",
            "score_topk_grouped_scores_kernel", "prefill_tile_kernel",
            "compress_paged_kernel", "stage_rows_kernel", "step_metadata_kernel"} <= names, \
        sorted(names)
    assert_records_compile(rec)
