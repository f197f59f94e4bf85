"""The draft's sink + window attention (sglang_plugin/draft_backend.py) on the CPU harness
under the Triton interpreter: a tree self-draft (top-2, per-branch block tables at page 16)
whose draft decode and draft extend run the window kernel still gives exactly the runtime's
greedy tokens (the target verifies every draft token), and the drafts get accepted."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

NEW = 16


def test_window_draft_tree_equals_runtime(tmp_path):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    model = str(build_tiny(tmp_path / "m", kind="llama", seed=0))
    rng = random.Random(1234)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (230, 170)]
    ref = [r.tokens for r in generate(load_model(model), prompts,
                                      SamplingConfig(max_new_tokens=NEW))[0]]
    # window 16 + sink 8 on ~200-token prompts: the draft really sees a window
    env = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1",
           "SPECSA_DRAFT_ATTN": "window=16,sink=8"}
    args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3",
            "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4",
            "--page-size", "16"]
    with launch_server(model, free_port(), args, env=env) as srv:
        outs = [srv.generate(input_ids=p, max_new_tokens=NEW) for p in prompts]
        log = srv.log_path.read_text()
    assert [o["output_ids"] for o in outs] == ref
    assert "draft attention = sink 8 + window 16 through the fused kernel" in log
    assert "draft K/V store fused with staging" in log
    assert "tree branch tail pages copied without a host sync (topk 2, page 16)" in log
    assert max(o["meta_info"]["spec_accept_length"] for o in outs) > 1.5


@pytest.mark.parametrize("built_t,spec_t,rows,expect", [
    (1, 4, 8, 4),        # a T=1 state's backend during the draft-extend capture at T=4
    (4, 1, 2, 1),        # the widest state's backend running an eager T=1 forward
    (4, None, 6, 3),     # no spec_info width: T from the forward's rows
    (3, 0, 6, 3)])       # an unset width (0) with rows that fit: T from the rows
def test_draft_extend_takes_t_from_the_forward(built_t, spec_t, rows, expect):
    """SGLang's adaptive mode (SPECSA_PLAN) builds one draft-extend backend per draft length
    but captures every state's draft-extend graph at the server's widest T (a GPU-only path:
    the CPU harness has no graphs). The metadata must follow the forward's T, or the capture
    fails ("forward has 4 query rows, the metadata 1", seen on the H100 at 01fdc29)."""
    from types import SimpleNamespace

    import torch

    from specsa.sglang_plugin.draft_backend import _WindowExtend
    from specsa.sglang_plugin.settings import DraftWindow
    bs, ps, width = 2, 16, 64
    pool = SimpleNamespace(head_num=2, head_dim=8)
    runner = SimpleNamespace(
        model_config=SimpleNamespace(num_attention_heads=4), token_to_kv_pool=pool,
        page_size=ps, req_to_token_pool=SimpleNamespace(
            req_to_token=torch.arange(4 * width, dtype=torch.int32).reshape(4, width)),
        device="cpu", tp_size=1)
    backend = _WindowExtend()
    backend._setup_window(runner, DraftWindow(sink=16, window=32), built_t)
    seq_lens = torch.tensor([40, 57], dtype=torch.int32)
    fb = SimpleNamespace(
        batch_size=bs, seq_lens=seq_lens, req_pool_indices=torch.tensor([1, 3]),
        out_cache_loc=torch.zeros(rows, dtype=torch.int64),
        spec_info=None if spec_t is None else SimpleNamespace(num_tokens_per_req=spec_t))
    backend._build_metadata(fb)
    meta = backend.window_meta
    assert (meta.rows, meta.t) == (bs, expect)
    prefix = (seq_lens - expect).tolist()
    want = [p + i for p in prefix for i in range(expect)]
    assert meta.geo.q_pos.tolist() == want
    assert meta.geo.req_P.tolist() == prefix


def test_stage_ok_only_for_rows_it_can_store():
    """The one-launch staging (kernels/stage) runs only where it stores exactly what the pool's
    own store would: a pool that allows it, k / v in the pool's dtype and one slot per row."""
    from types import SimpleNamespace

    import torch

    from specsa.sglang_plugin.kv_staging import direct_store_ok, stage_ok
    pool = SimpleNamespace(dtype=torch.bfloat16)
    q = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    k = torch.zeros(4, 2, 16, dtype=torch.bfloat16)
    fb = SimpleNamespace(out_cache_loc=torch.zeros(4, dtype=torch.int64))
    assert stage_ok(True, pool, q, k, k, fb, True)
    assert not stage_ok(False, pool, q, k, k, fb, True)                 # pool refuses
    assert not stage_ok(True, pool, q, k.float(), k, fb, True)           # another dtype
    short = SimpleNamespace(out_cache_loc=torch.zeros(3, dtype=torch.int64))
    assert not stage_ok(True, pool, q, k, k, short, True)                # slots != rows
    assert stage_ok(True, pool, q, k, k, short, False)                   # no store: fine
    assert not direct_store_ok(pool)                                     # not an MHA pool
