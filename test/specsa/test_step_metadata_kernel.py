"""The one-launch step metadata kernel (kernels/stage/step_metadata.py, through
`DeviceStepMetadata.fill_from_pool`) against the torch reference it replaces before every SGLang
decode / verify step: prefix from seq_lens, parents_from_links (chains for the padding rows
beyond the links), block_table_from over the requests' req_to_token rows and
`DeviceStepMetadata.fill`. Fresh random inputs, every kernel output poisoned before the run,
results bit-identical: random trees (a chain too: ancestor bit 63 at T = 64), prefixes around
compression-block boundaries, page sizes 1 and 16, random page permutations in req_to_token,
slot tables wider and narrower than the block table, group sizes 1 / 4 / T, SHARED_INDEX."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit

import random  # noqa: E402

import pytest  # noqa: E402
from conftest import DEV, links, random_tree  # noqa: E402

from specsa.device_metadata import (DeviceStepMetadata, chain_parents,  # noqa: E402
                                    parents_from_links)
from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.stage import fill_step_metadata  # noqa: E402
from specsa.sglang_plugin.step_metadata import block_table_from  # noqa: E402

PARAMS = {"tiny": NSAParams(block=8, stride=4, select=16, topn=4, window=32),
          "default": NSAParams()}
MARGIN = 5


def outputs(dm: DeviceStepMetadata) -> dict[str, torch.Tensor]:
    g = dm.geo
    return {"prefix": dm.prefix, "parents": dm.parents, "block_table": dm.block_table,
            "q_pos": dm.q_pos, "q_anc": g.q_anc, "cmp_lens": dm.cmp_lens, "upd_lo": dm.upd_lo,
            "prov_idx": dm.prov_idx, "prov_cidx": dm.prov_cidx, "prov_vis": dm.prov_vis,
            "g_winlo": g.g_winlo, "sel_src": g.sel_src}


def slot_table(rng: random.Random, rows: int, cols: int, page: int) -> torch.Tensor:
    """SGLang's req_to_token: each row's logical pages are random physical pages (slot =
    page * PS + offset), no two rows sharing one."""
    n_pages = -(-cols // page)
    ids = list(range(1, 3 * rows * n_pages + 1))
    rng.shuffle(ids)
    pages = torch.tensor(ids[:rows * n_pages]).view(rows, n_pages)
    col = torch.arange(cols)
    return (pages[:, col // page] * page + col % page).to(torch.int32)


# (T, C, shared, decode, raw): raw = rows with EAGLE links (None: chains only); raw < B leaves
# CUDA-graph padding rows that keep the chain
CASES = [
    pytest.param(1, 1, False, True, None, id="decode"),
    pytest.param(1, 1, True, False, 4, id="T1-links"),
    pytest.param(4, 1, False, False, None, id="chain4-C1"),
    pytest.param(6, 4, False, False, 3, id="T6-C4-pad1"),
    pytest.param(13, 4, True, False, 2, id="T13-C4-shared-pad2"),
    pytest.param(13, 13, True, False, 4, id="T13-CT-shared"),
    pytest.param(64, 64, True, False, 3, id="T64-CT-shared-pad1"),
    pytest.param(64, 4, False, False, 4, id="T64-C4"),
]


@pytest.mark.parametrize("pname", ["tiny", "default"])
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("t, c, shared, decode, raw", CASES)
def test_kernel_equals_torch_reference(pname, page, t, c, shared, decode, raw):
    params = PARAMS[pname]
    rng = random.Random(f"{pname}-{page}-{t}-{c}-{shared}-{raw}")
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    bs = 4
    # committed lengths around block boundaries (l - 1, multiples of d), a long one and 0
    prefix = [params.block - 1 - rng.randrange(3), 3 * params.stride + rng.randrange(4),
              1000 + rng.randrange(64), 0]
    order = torch.randperm(bs, generator=gen).tolist()
    prefix = [prefix[i] for i in order]
    seq = [p + 1 for p in prefix] if decode else prefix
    if decode:
        seq[prefix.index(0)] = 0                        # clamps to prefix 0
    # seq_lens longer than the batch, int64 (SGLang's) or int32
    seq_lens = torch.tensor(seq + [77, 5], dtype=rng.choice([torch.int64, torch.int32]))
    width = (max(prefix) + t) // page + 2 + rng.randrange(3)
    # the slot table wider than the block table's pages, or narrower (zero-padded columns)
    wide = rng.random() < 0.5
    cols = width * page + rng.randrange(1, 40) if wide else (width - 2) * page - rng.randrange(3)
    rows = bs + 3
    req_to_token = slot_table(rng, rows, cols, page)
    pool_idx = torch.randperm(rows, generator=gen)[:bs + 1].to(
        rng.choice([torch.int32, torch.int64]))
    trees = [random_tree(rng, t) for _ in range(bs)]
    if t > 2:
        trees[rng.randrange(bs)] = list(range(-1, t - 1))      # a chain: bit T - 1 set
    link = None
    if raw is not None:
        nt = torch.tensor([links(p)[0] for p in trees[:raw]], dtype=torch.int64)
        ns = torch.tensor([links(p)[1] for p in trees[:raw]], dtype=torch.int64)
        link = (nt.to(DEV), ns.to(DEV))

    # the reference, as SGLang's backend composed it before
    ref = DeviceStepMetadata(bs, t, width, page, params, c, shared, MARGIN, DEV)
    seq32 = seq_lens[:bs].to(torch.int32)
    ref_prefix = (seq32 - 1).clamp(min=0) if decode else seq32
    parents = chain_parents(bs, t, "cpu")
    if raw is not None:
        par = parents_from_links(*link).cpu()
        assert par.tolist() == trees[:raw]
        parents = torch.cat([par, parents[raw:]])
    rows_sel = req_to_token.index_select(0, pool_idx[:bs].long())
    ref.fill(ref_prefix.to(DEV), parents.to(DEV),
             block_table_from(rows_sel, page, width).to(DEV), params.window)

    got = DeviceStepMetadata(bs, t, width, page, params, c, shared, MARGIN, DEV)
    for name, x in outputs(got).items():
        if name != "sel_src" or shared:          # (unshared: the identity, never rewritten)
            x.fill_(-7)
    got.fill_from_pool(seq_lens.to(DEV), decode, req_to_token.to(DEV), pool_idx.to(DEV),
                       params.window, link)
    want = outputs(ref)
    for name, x in outputs(got).items():
        w = want[name]
        assert x.dtype == w.dtype and x.shape == w.shape, name
        assert torch.equal(x.cpu(), w.cpu()), (name, x.cpu(), w.cpu())
    if t == 64 and shared:                        # the chain's last node: bit 63 (negative)
        assert (got.geo.q_anc < 0).any()


def test_fill_step_metadata_rejects_bad_buffers():
    params = PARAMS["tiny"]
    dm = DeviceStepMetadata(2, 4, 8, 1, params, 2, False, MARGIN, DEV)
    out = outputs(dm)
    del out["sel_src"]
    args = dict(decode=False, window=32, params=params, page_size=1, group_size=2,
                margin=MARGIN, **out)
    seq = torch.tensor([5, 9], device=DEV)
    rt = torch.zeros(4, 16, dtype=torch.int32, device=DEV)
    idx = torch.tensor([0, 1], device=DEV)
    with pytest.raises(ValueError, match="q_pos"):
        fill_step_metadata(seq, rt, idx, **{**args, "q_pos": dm.q_pos.long()})
    with pytest.raises(ValueError, match="links"):
        bad = torch.zeros(3, 4, dtype=torch.long, device=DEV)
        fill_step_metadata(seq, rt, idx, next_token=bad, next_sibling=bad, **args)
    with pytest.raises(ValueError, match=">= 2"):
        fill_step_metadata(seq[:1], rt, idx, **args)


@pytest.mark.parametrize("t, page", [(6, 1), (13, 16)])
def test_kernel_equals_reference_on_malformed_inputs(t, page):
    """Garbage links (cycles, parents after children: no ancestor at some depth, so the tail
    source falls back to node 0 as argmax does) and negative slot-table entries (floor
    division): still the reference's values. Targets stay distinct, so the reference's
    scatters have no duplicate indices (whose winner torch leaves undefined on CUDA)."""
    params = PARAMS["tiny"]
    rng = random.Random(t * 7 + page)
    bs, c = 6, 4
    # P = 3 mod 4: nodes on a cycle (depth 2^rounds after pointer jumping) close a block
    prefix = [7, 11, 15, 303, 0, 10]
    width = (max(prefix) + 4 * t) // page + 2
    req_to_token = slot_table(rng, bs, width * page, page) - rng.randrange(1, 3) * 97 * page
    req_to_token[:, ::3] = -req_to_token[:, ::3].abs() - 1
    pool_idx = torch.tensor([2, 0, 1, 5, 3, 4])

    def garbage():
        out = []
        for _ in range(bs):
            tgt = list(range(t))
            rng.shuffle(tgt)
            out.append([v if rng.random() < 0.6 else -1 for v in tgt])
        return torch.tensor(out, dtype=torch.int64)

    nt, ns = garbage(), garbage()
    seq_lens = torch.tensor(prefix)
    ref = DeviceStepMetadata(bs, t, width, page, params, c, True, MARGIN, DEV)
    rows_sel = req_to_token.index_select(0, pool_idx)
    ref.fill(seq_lens.to(torch.int32).to(DEV), parents_from_links(nt, ns).to(DEV),
             block_table_from(rows_sel, page, width).to(DEV), params.window)
    got = DeviceStepMetadata(bs, t, width, page, params, c, True, MARGIN, DEV)
    for x in outputs(got).values():
        x.fill_(-7)
    got.fill_from_pool(seq_lens.to(DEV), False, req_to_token.to(DEV), pool_idx.to(DEV),
                       params.window, (nt.to(DEV), ns.to(DEV)))
    want = outputs(ref)
    for name, x in outputs(got).items():
        assert torch.equal(x.cpu(), want[name].cpu()), name
