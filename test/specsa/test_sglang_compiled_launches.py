"""Every Triton kernel configuration an SGLang server launches on the CPU harness (the Triton
target path under the interpreter: NSA AR, and a tree with a separate draft model and two
requests batched together) also compiles for the GPU (sm_90).

test_compiled_launches.py does this for the kernel tests; the server adds the backend's own
launches (paged prefill, decode, verification and refresh at the step shapes SGLang gives it,
the draft backend). The interpreter never type-checks a kernel the way the compiler does: a
compile error of one kernel stopped every NSA server on the H100 at commit 54c7899 while every
CPU test passed. The server processes record their launches through test/record_site
(sitecustomize), since they never import the tests' conftest."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from launch_record import assert_records_compile

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="with a GPU the servers compile every launch")]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

TEST = Path(__file__).resolve().parents[1]
PRODUCTION = {"_nsa_verify_fwd_kernel", "prefill_tile_kernel", "compress_paged_kernel"}


def test_every_server_launch_compiles_for_sm90(tmp_path):
    from specsa.model.tiny import build_tiny
    target = build_tiny(tmp_path / "target", kind="llama", seed=0)
    draft = build_tiny(tmp_path / "draft", kind="llama", seed=0, num_layers=1)
    rec = tmp_path / "launches.jsonl"
    env = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1",
           "SPECSA_RECORD_LAUNCHES": str(rec),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TEST / "record_site"),
                                                       os.environ.get("PYTHONPATH")]))}
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (190, 141)]
    tree = ["--speculative-algo", "specsa", "--speculative-draft-model-path", str(draft),
            "--speculative-num-steps", "2", "--speculative-eagle-topk", "2",
            "--speculative-num-draft-tokens", "4", "--page-size", "16"]
    for args in (["--attention-backend", "specsa"], tree):
        with launch_server(str(target), free_port(), args, env=env) as srv:
            assert len(srv.generate_concurrent(prompts, 6)) == 2
    names = {json.loads(line)["name"] for line in rec.read_text().splitlines()}
    assert PRODUCTION <= names, f"the servers launched only {sorted(names)}"
    assert_records_compile(rec)
