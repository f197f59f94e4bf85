"""NSAVerifier prepare/run (specsa.verifier) vs the fp32 reference, refusals, fixed buffers and
CUDA-graph replay == eager (GPU only)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

import pytest
import torch

from conftest import assert_close, poisoned, requires_cuda
from test_fused import DEV, make_case, reference

from specsa.verifier import NSAVerifier
from specsa.config import ConfigError, NSAConfig, PrecisionClass, Schedule, Traversal

CFG = NSAConfig(block=8, stride=4, select=8, topn=4, init_blocks=1, local_blocks=2, window=12)


def _verifier(cfg, g, hkv, d, device=DEV, **kw):
    return NSAVerifier(cfg, num_q_heads=g * hkv, num_kv_heads=hkv, head_dim=d, device=device,
                       scale=0.3, **kw)


@pytest.mark.parametrize("schedule,traversal,combine", [
    pytest.param(Schedule.INDEPENDENT, Traversal.BFS, "union", id="independent-bfs-union"),
    pytest.param(Schedule.EXACT_MERGED, Traversal.DFS, "gated", id="merged-dfs-gated"),
    pytest.param(Schedule.EXACT_MERGED, Traversal.BFS, "union", id="merged-bfs-union"),
])
def test_prepare_run_matches_reference(schedule, traversal, combine):
    cfg = NSAConfig(**{**CFG.to_dict(), "combine": combine})
    g, hkv, d = 4, 2, 16
    case = make_case([41, 26], [6, 4], g * hkv, hkv, d, 16, cfg.params, seed=7)
    ver = _verifier(cfg, g, hkv, d)
    meta = ver.prepare(case["parents"], case["prefix_lens"], case["block_table"],
                       schedule=schedule, traversal=traversal, group_size=3, num_splits=2)
    assert meta.group_size == (1 if schedule is Schedule.INDEPENDENT else 3)
    out = poisoned(10, g * hkv, d, device=DEV)
    ver.run(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"], case["sel"],
            o_cmp=case["o_cmp"], gates=case["gates"], out=out)
    assert_close(out.cpu(), reference(case, cfg.params, 0.3), what=schedule.value)


def test_prepare_refuses_unsupported_combinations_with_a_sentence():
    ver = _verifier(CFG, 4, 2, 16)
    bt = torch.zeros(1, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(ConfigError, match="SHARED_INDEX is approximate"):
        ver.prepare([[-1, 0]], [10], bt, schedule=Schedule.SHARED_INDEX)
    with pytest.raises(ConfigError, match="CHAIN traversal needs a chain"):
        ver.prepare([[-1, 0, 0]], [10], bt, traversal=Traversal.CHAIN)
    with pytest.raises(ConfigError, match="at most 64"):
        ver.prepare([list(range(-1, 65))], [10], bt)
    with pytest.raises(ConfigError, match="do not match"):
        ver.prepare([[-1], [-1]], [10], bt)
    ver.prepare([[-1, 0]], [10], bt, schedule="shared_index", precision=PrecisionClass.APPROX)


def test_graph_buffers_are_reused_across_steps_of_one_shape():
    ver = _verifier(CFG, 4, 2, 16, graph_buffers=True)
    bt = torch.zeros(2, 8, dtype=torch.int32, device=DEV)
    m1 = ver.prepare([[-1, 0, 0], [-1]], [20, 30], bt, num_splits=2)
    m2 = ver.prepare([[-1, 0, 1], [-1]], [25, 31], bt, num_splits=2)
    assert m2.geometry.q_pos.data_ptr() == m1.geometry.q_pos.data_ptr()
    assert m2.union[0].data_ptr() == m1.union[0].data_ptr()
    assert m2.geometry.q_pos.tolist() == [25, 26, 27, 31]


@requires_cuda
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="graphs need compiled kernels")
def test_cuda_graph_replay_equals_eager():
    cfg = NSAConfig(**{**CFG.to_dict(), "combine": "gated"})
    g, hkv, d = 4, 2, 64
    ver = _verifier(cfg, g, hkv, d, device="cuda", graph_buffers=True)
    a = make_case([300, 90], [6, 5], g * hkv, hkv, d, 16, cfg.params, dtype=torch.bfloat16, seed=1)
    b = make_case([303, 95], [6, 5], g * hkv, hkv, d, 16, cfg.params, dtype=torch.bfloat16, seed=2)
    ver.prepare(a["parents"], a["prefix_lens"], a["block_table"], num_splits=2)
    names = ("q", "k_new", "v_new", "k_cache", "v_cache", "sel", "o_cmp", "gates")
    bufs = {n: a[n].clone() for n in names}
    out = torch.empty_like(a["q"])
    ver.run(**{n: bufs[n] for n in names}, out=out)          # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ver.run(**{n: bufs[n] for n in names}, out=out)
    ver.prepare(b["parents"], b["prefix_lens"], b["block_table"], num_splits=2)
    for n in names:
        bufs[n].copy_(b[n])
    graph.replay()
    eager = ver.run(**{n: b[n] for n in names})
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert_close(out.float().cpu(), reference(b, cfg.params, 0.3), dtype=torch.bfloat16)
