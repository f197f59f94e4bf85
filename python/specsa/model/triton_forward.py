"""Host side of the model's Triton path: what one forward needs, built once per forward
(`build_triton_forward`: page tables, positions, provisional-token sources, the `NSAVerifier`
step metadata; no per-layer host work), and the knobs that choose it (`TritonOptions`). The
layer that runs it is `specsa.model.nsa_layer.NSAAttention`; the module docstring there
describes both paths.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from specsa.config import ConfigError, NSAConfig, Schedule, Traversal, VerifyKnobs, parse_enum
from specsa.kernels.common.tree import MAX_TREE_NODES, node_depths
from specsa.kernels.common.upload import to_device
from specsa.verify_layer import StepTensors

from .cache import BlockMeta, PagedKVCache


class Refresh(enum.Enum):
    """Refresh kernel of the Triton path's verify rows (same selections and o_cmp)."""

    GROUPED = "grouped"   # score_topk_grouped on the verifier's groups (keys read once per group)
    PER_ROW = "per_row"   # score_topk, one program per (row, KV head): kept for benchmarks


@dataclass(frozen=True)
class TritonOptions:
    """Knobs of the Triton path's verification (see `specsa.verifier.NSAVerifier.prepare`)."""

    schedule: Schedule = Schedule.EXACT_MERGED
    traversal: Traversal = Traversal.BFS
    group_size: int | None = None
    num_splits: int | None = None
    # chains with more nodes than this are prefill chunks (chunked_nsa_prefill, written in
    # place); at most MAX_TREE_NODES, the verify kernel's limit
    prefill_chain: int = MAX_TREE_NODES
    refresh: Refresh = Refresh.GROUPED

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_enum(Schedule, self.schedule, "schedule"))
        object.__setattr__(self, "refresh", parse_enum(Refresh, self.refresh, "refresh"))
        object.__setattr__(self, "traversal", parse_enum(Traversal, self.traversal, "traversal"))
        if not 1 <= self.prefill_chain <= MAX_TREE_NODES:
            raise ConfigError(f"TritonOptions.prefill_chain must be in 1..{MAX_TREE_NODES} (the verify "
                              f"kernel's tree limit), got {self.prefill_chain}")


@dataclass(frozen=True)
class _Rows:
    """A subset of the batch's rows: `idx` [n] int64 on device, or None when it is all of them
    (then no gather / scatter is needed)."""

    idx: torch.Tensor | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.idx is None else x.index_select(0, self.idx)

    def put(self, out: torch.Tensor, x: torch.Tensor) -> None:
        if self.idx is None:
            out.copy_(x)
        else:
            out.index_copy_(0, self.idx, x)


@dataclass(frozen=True)
class VerifyPart:
    """Verify rows of a Triton forward (requests in batch order, nodes in block order)."""

    rows: _Rows
    block_table: torch.Tensor      # [Bv, max_pages] int32 (committed pages)
    q_req: torch.Tensor            # [Nv] int32
    q_pos: torch.Tensor            # [Nv] int32
    cmp_lens: torch.Tensor         # [Bv] int32 num_cmp(P)
    prov_idx: torch.Tensor | None  # [Np, l] int32 compress_gather sources (None: Np = 0)
    prov_cidx: torch.Tensor | None  # [Np] int32
    prov_vis: torch.Tensor | None  # [Nv, MP] int32, -1 padded
    num_prov: int
    verifier: object               # specsa.verifier.NSAVerifier holding this step's metadata
    # grouped refresh: the step's (order [Nv], g_start [NG], g_len [NG]) int32 cuts and its C;
    # None: per-row score_topk
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    group_size: int = 1

    @property
    def step(self) -> StepTensors:
        """What `specsa.verify_layer.verify_layer` reads."""
        return StepTensors(block_table=self.block_table, q_req=self.q_req, q_pos=self.q_pos,
                           cmp_lens=self.cmp_lens,
                           prov_idx=self.prov_idx if self.num_prov else None,
                           prov_cidx=self.prov_cidx, prov_vis=self.prov_vis, groups=self.groups,
                           group_size=self.group_size, verifier=self.verifier)


@dataclass(frozen=True)
class PrefillPart:
    """Prefill-chunk rows of a Triton forward (written into their page slots first)."""

    rows: _Rows
    block_table: torch.Tensor      # [Bf, max_pages] int32 (pages up to P + n reserved)
    q_req: torch.Tensor            # [Nf] int32
    q_pos: torch.Tensor            # [Nf] int32
    prefix_lens: torch.Tensor      # [Bf] int32
    seq_lens: torch.Tensor         # [Bf] int32
    slots: torch.Tensor            # [Nf] int64 flat raw-KV slot of every row


@dataclass(frozen=True)
class TritonForward:
    """Everything a Triton forward needs from the host, built once per forward (no per-layer
    host work): tokens, positions, last rows, block metas and the two row parts."""

    tokens: torch.Tensor           # [N] int64
    positions: torch.Tensor        # [N] int64
    last_rows: torch.Tensor        # [B] int64, last node of each block
    metas: dict[int, BlockMeta]
    in_place: frozenset[int]       # rids whose block KV the forward writes into its pages
    verify: VerifyPart | None
    prefill: PrefillPart | None
    knobs: VerifyKnobs = VerifyKnobs()


def effective_options(options: "TritonOptions", knobs: VerifyKnobs,
                      traversal: Traversal | None = None) -> "TritonOptions":
    """TritonOptions with the knobs' schedule / group size (when set) and the step's traversal
    (when given): what a forward runs with."""
    kw = {}
    if knobs.schedule is not None:
        kw["schedule"] = knobs.schedule
    if knobs.group_size is not None:
        kw["group_size"] = knobs.group_size
    if traversal is not None:
        kw["traversal"] = traversal
    return replace(options, **kw) if kw else options


def _i32(x, dev) -> torch.Tensor:
    return to_device(x, torch.int32, dev)


def _i64(x, dev) -> torch.Tensor:
    return to_device(x, torch.int64, dev)


def _table(cache: PagedKVCache, rids: list[int], dev) -> torch.Tensor:
    tables = [cache.block_table(r) for r in rids]
    width = max(1, max(len(t) for t in tables))
    return _i32([t + [0] * (width - len(t)) for t in tables], dev)


def build_triton_forward(cache: PagedKVCache, blocks: list[tuple[int, list[int], tuple[int, ...]]],
                        nsa: NSAConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        scale: float, device: torch.device,
                        options: TritonOptions = TritonOptions(),
                        knobs: VerifyKnobs = VerifyKnobs()) -> TritonForward:
    """Host geometry of one Triton forward.

    Args:
        cache: committed context (prefill blocks get their pages reserved here; their length
            only moves at commit).
        blocks: validated (rid, token ids, parents) per request, distinct rids.
        nsa / heads / head_dim / scale: the model's attention geometry.
        options: verification schedule knobs (already combined with `knobs`:
            `effective_options`).
        knobs: precision class (checked by the verifier's prepare() for SHARED_INDEX) and refresh
            period, carried in the TritonForward for the layers.
    Returns:
        TritonForward. A chain block longer than options.prefill_chain is a prefill chunk
        (written in place); everything else is verified from the draft tail.
    """
    p = nsa.params
    ps = cache.page_size
    toks, poss, last, metas, in_place = [], [], [], {}, set()
    vrows, frows = _VerifyRows(), _PrefillRows()
    off = 0
    for rid, ids, par in blocks:
        n, P = len(ids), cache.length(rid)
        pos = [P + d for d in node_depths(par)]
        if par == tuple(range(-1, n - 1)) and n > options.prefill_chain:
            frows.add(cache, rid, P, pos, off)
            in_place.add(rid)
            metas[rid] = BlockMeta(offset=off, prefix_len=P, parents=par,
                                   cmp_offset=vrows.cmp_off, close_nodes=(), cmp_index=())
        else:
            metas[rid] = vrows.add(cache.block_table(rid), ps, p, rid, par, P, pos, off)
        toks.extend(ids)
        poss.extend(pos)
        off += n
        last.append(off - 1)
    dev = torch.device(device)
    verify = prefill = None
    if vrows.rids:
        verify = vrows.part(cache, off, nsa, num_q_heads, num_kv_heads, head_dim, scale, dev,
                            options, knobs)
    if frows.rids:
        prefill = frows.part(cache, off, dev)
    return TritonForward(tokens=_i64(toks, dev), positions=_i64(poss, dev),
                         last_rows=_i64(last, dev), metas=metas, in_place=frozenset(in_place),
                         verify=verify, prefill=prefill, knobs=knobs)


class _VerifyRows:
    """Host lists of a forward's verify part (draft trees, decode rows, short chains), request
    by request, and the `VerifyPart` built from them."""

    def __init__(self):
        self.rids, self.parents, self.prefix, self.rows = [], [], [], []
        self.q_pos, self.q_req = [], []
        self.prov_idx, self.prov_cidx, self.prov_vis = [], [], []
        self.cmp_off = 0          # provisional tokens so far (their compressed-row offset)

    def add(self, pages: list[int], ps: int, p, rid: int, par: tuple[int, ...], P: int,
            pos: list[int], off: int) -> BlockMeta:
        """One request's rows at flat offset `off`; returns its BlockMeta."""
        from specsa.provisional import closing_blocks, visible_rows

        n = len(par)
        voff = len(self.rows)                    # first row of this request in the verify part
        blocks_at = closing_blocks(par, P, p, lambda t, pg=pages: pg[t // ps] * ps + t % ps,
                                   voff)
        close = [v for v, b in enumerate(blocks_at) if b is not None]
        cidx = [blocks_at[v][1] for v in close]
        self.prov_idx.extend(blocks_at[v][0] for v in close)
        self.prov_cidx.extend(cidx)
        self.prov_vis.extend(visible_rows(par, {v: self.cmp_off + j
                                                for j, v in enumerate(close)}))
        self.q_req.extend([len(self.rids)] * n)
        self.rids.append(rid)
        self.parents.append(list(par))
        self.prefix.append(P)
        self.rows.extend(range(off, off + n))
        self.q_pos.extend(pos)
        meta = BlockMeta(offset=off, prefix_len=P, parents=par, cmp_offset=self.cmp_off,
                         close_nodes=tuple(close), cmp_index=tuple(cidx))
        self.cmp_off += len(close)
        return meta

    def part(self, cache: PagedKVCache, n_all: int, nsa: NSAConfig, num_q_heads: int,
             num_kv_heads: int, head_dim: int, scale: float, dev: torch.device,
             options: TritonOptions, knobs: VerifyKnobs) -> VerifyPart:
        """The verify part on the device, with the NSAVerifier prepared for this step."""
        from specsa.verifier import NSAVerifier

        p = nsa.params
        rows = _Rows(None if len(self.rows) == n_all else _i64(self.rows, dev))
        bt = _table(cache, self.rids, dev)
        verifier = NSAVerifier(nsa, num_q_heads, num_kv_heads, head_dim, device=dev, scale=scale)
        meta = verifier.prepare(self.parents, self.prefix, bt, schedule=options.schedule,
                                traversal=options.traversal, precision=knobs.precision,
                                group_size=options.group_size, num_splits=options.num_splits)
        geo = meta.geometry
        # the refresh reuses the verifier's groups (rows request-major in node order, as the
        # verify rows here); a request of one node (decode) is a group of 1
        grouped = options.refresh is Refresh.GROUPED
        npv = len(self.prov_idx)
        mp = max(1, max(len(r) for r in self.prov_vis))
        vis = [r + [-1] * (mp - len(r)) for r in self.prov_vis]
        return VerifyPart(
            rows=rows, block_table=bt, q_req=_i32(self.q_req, dev), q_pos=_i32(self.q_pos, dev),
            cmp_lens=_i32([p.num_cmp(P) for P in self.prefix], dev),
            prov_idx=_i32(self.prov_idx, dev) if npv else None,
            prov_cidx=_i32(self.prov_cidx, dev) if npv else None,
            prov_vis=_i32(vis, dev) if npv else None, num_prov=npv, verifier=verifier,
            groups=(geo.order, geo.g_start, geo.g_len) if grouped else None,
            group_size=geo.C if grouped else 1)


class _PrefillRows:
    """Host lists of a forward's prefill part (chains longer than prefill_chain, written in
    place into pages reserved here) and the `PrefillPart` built from them."""

    def __init__(self):
        self.rids, self.rows, self.q_pos, self.q_req = [], [], [], []
        self.prefix, self.seq_lens, self.slots = [], [], []

    def add(self, cache: PagedKVCache, rid: int, P: int, pos: list[int], off: int) -> None:
        n = len(pos)
        cache.reserve(rid, P + n)
        pages = cache.block_table(rid)
        ps = cache.page_size
        self.q_req.extend([len(self.rids)] * n)
        self.rids.append(rid)
        self.rows.extend(range(off, off + n))
        self.q_pos.extend(pos)
        self.prefix.append(P)
        self.seq_lens.append(P + n)
        self.slots.extend(pages[t // ps] * ps + t % ps for t in pos)

    def part(self, cache: PagedKVCache, n_all: int, dev: torch.device) -> PrefillPart:
        rows = _Rows(None if len(self.rows) == n_all else _i64(self.rows, dev))
        return PrefillPart(
            rows=rows, block_table=_table(cache, self.rids, dev), q_req=_i32(self.q_req, dev),
            q_pos=_i32(self.q_pos, dev), prefix_lens=_i32(self.prefix, dev),
            seq_lens=_i32(self.seq_lens, dev), slots=_i64(self.slots, dev))
