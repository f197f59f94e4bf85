"""FlashInfer-style NSA verification API: `prepare()` once per verification step (FlashInfer's
`plan()`), `run()` per layer.

    verifier = NSAVerifier(NSAConfig(), num_q_heads=32, num_kv_heads=8, head_dim=128,
                           device="cuda", graph_buffers=True)
    meta = verifier.prepare(parents, prefix_lens, block_table,
                            schedule=Schedule.EXACT_MERGED, traversal=Traversal.BFS)
    for layer in range(num_layers):
        sel, o_cmp = refresh(...)                        # per layer, on the device
        verifier.run(q, k_new, v_new, k_cache[layer], v_cache[layer], sel,
                     o_cmp=o_cmp, gates=gates, out=o)    # no host syncs: graph capturable

prepare() freezes what the host knows (tree topology, positions, page tables, group cuts, union
capacity, split factor) into device buffers; selections are produced on the device per layer,
so run() builds the group unions on the device (docs/DESIGN.md section 4). With graph_buffers=True a
step of the same shape (batch, tree sizes, schedule) rewrites the previous step's buffers in
place, so a graph captured around run() replays with the new step's metadata.
"""
from __future__ import annotations

from typing import Sequence

import torch

from specsa.config import ConfigError, NSAConfig, PrecisionClass, Schedule, Traversal, parse_enum
from specsa.kernels.common.index import merge_group_selections
from specsa.kernels.common.launch import num_sms
from specsa.kernels.fused import (VerifyArgs, build_geometry, copy_geometry_, nsa_verify_fwd,
                                  split_workspace)
from specsa.device_metadata import DeviceStepMetadata
from specsa.metadata import VerifyMetadata
from specsa.kernels.common.tree import MAX_TREE_NODES
from specsa.schedule import as_parents, default_group_size, default_num_splits, flat_orders


def unsupported_reason(schedule: Schedule, precision: PrecisionClass, sizes: Sequence[int],
                       group_size: int, select: int) -> str | None:
    """Why (schedule, precision, tree) cannot run, as a sentence; None when it can."""
    if schedule is Schedule.SHARED_INDEX and precision not in (PrecisionClass.APPROX,
                                                               PrecisionClass.APPROX_REUSE):
        return (f"SHARED_INDEX is approximate and needs an APPROX precision class, but "
                f"precision is {precision.value}")
    if max(sizes) > MAX_TREE_NODES:
        return (f"a draft tree has {max(sizes)} nodes; verification supports at most "
                f"{MAX_TREE_NODES}")
    if not 1 <= group_size <= MAX_TREE_NODES:
        return f"group size {group_size} is outside 1..{MAX_TREE_NODES} (int64 ownership masks)"
    if (max(sizes) - 1) // select + 2 > 64:
        return (f"a tree of {max(sizes)} nodes spans more than 64 selection blocks of {select} "
                "tokens (the per-row tail membership mask has 64 bits)")
    return None


class NSAVerifier:
    """Sparse NSA verification of draft trees over a paged KV cache (see module docstring)."""

    def __init__(self, config: NSAConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cuda", scale: float | None = None,
                 graph_buffers: bool = False, num_warps: int | None = None,
                 num_stages: int = 3, blocks_per_iter: int | None = None) -> None:
        if num_q_heads % num_kv_heads:
            raise ConfigError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                              f"({num_kv_heads})")
        self.config = config
        self.params = config.params
        self.hq, self.hkv, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.device = torch.device(device)
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.graph_buffers = graph_buffers
        # Triton launch knobs of the fused verify kernel (nsa_verify_fwd)
        self.launch = {"num_warps": num_warps, "num_stages": num_stages,
                       "blocks_per_iter": blocks_per_iter}
        self._meta: VerifyMetadata | None = None
        self._num_sms = num_sms(self.device)

    # -- per step -----------------------------------------------------------------------
    def prepare(self, parents: Sequence[Sequence[int] | torch.Tensor], prefix_lens: Sequence[int],
                block_table: torch.Tensor, schedule: Schedule | str = Schedule.EXACT_MERGED,
                traversal: Traversal | str = Traversal.BFS,
                precision: PrecisionClass | str = PrecisionClass.STRICT,
                group_size: int | None = None, num_splits: int | None = None) -> VerifyMetadata:
        """Freeze one step's geometry.

        Args:
            parents: per request, the draft tree's parent list (node 0 = root, -1).
            prefix_lens: per request committed length P (host ints: the host scheduled them).
            block_table (torch.Tensor): [B, max_pages] int32 on the device.
            schedule / traversal / precision: specsa.config enums (or their strings).
            group_size: C for the merged schedules (default: specsa.schedule.default_group_size);
                INDEPENDENT uses 1.
            num_splits: split-KV factor (default: two waves of the GPU; 1 on CPU).
        Returns:
            VerifyMetadata, also kept as the metadata `run()` uses. Raises ConfigError with a
            sentence for unsupported combinations.
        """
        schedule = parse_enum(Schedule, schedule, "schedule")
        traversal = parse_enum(Traversal, traversal, "traversal")
        precision = parse_enum(PrecisionClass, precision, "precision")
        pars = [as_parents(p) for p in parents]
        if len(pars) != len(prefix_lens) or block_table.shape[0] < len(pars):
            raise ConfigError(f"{len(pars)} trees, {len(prefix_lens)} prefix lengths and "
                              f"{block_table.shape[0]} block-table rows do not match")
        sizes = tuple(len(p) for p in pars)
        g = self.hq // self.hkv
        c = 1 if schedule is Schedule.INDEPENDENT else (group_size or default_group_size(g, sum(sizes)))
        why = unsupported_reason(schedule, precision, sizes, c, self.params.select)
        if why:
            raise ConfigError(why)
        orders = flat_orders(pars, traversal)
        n_groups = sum(-(-t // c) for t in sizes)
        if num_splits is None:
            sel_tiles = self.params.topn * (1 if c == 1 else max(1, c // 2))
            work = sel_tiles + -(-self.params.window // 64)
            num_splits = default_num_splits(n_groups * self.hkv, work, self._num_sms)
        geo = build_geometry(pars, [int(p) for p in prefix_lens], block_table, orders, c,
                             self.params.window, num_splits,
                             shared=schedule is Schedule.SHARED_INDEX)
        meta = self._buffers(schedule, traversal, precision, c, num_splits, geo, sizes)
        self._meta = meta
        return meta

    def prepare_on_device(self, bs: int, t: int, table_width: int, page_size: int,
                          schedule: Schedule | str = Schedule.EXACT_MERGED,
                          precision: PrecisionClass | str = PrecisionClass.STRICT,
                          group_size: int | None = None, margin: int = 0,
                          num_splits: int | None = None) -> DeviceStepMetadata:
        """Static buffers for steps of `bs` trees of `t` nodes whose geometry is built on the
        device (`DeviceStepMetadata.fill`, no host sync); `run()` then reads them. Groups are C
        consecutive nodes of a tree in node order (any order is exact; level order keeps
        siblings together)."""
        schedule = parse_enum(Schedule, schedule, "schedule")
        precision = parse_enum(PrecisionClass, precision, "precision")
        g = self.hq // self.hkv
        c = 1 if schedule is Schedule.INDEPENDENT else (group_size or default_group_size(g, bs * t))
        c = min(c, t)          # a group never spans two trees
        why = unsupported_reason(schedule, precision, (t,) * bs, c, self.params.select)
        if why:
            raise ConfigError(why)
        n_groups = bs * -(-t // c)
        if num_splits is None:
            sel_tiles = self.params.topn * (1 if c == 1 else max(1, c // 2))
            work = sel_tiles + -(-self.params.window // 64)
            num_splits = default_num_splits(n_groups * self.hkv, work, self._num_sms)
        dmeta = DeviceStepMetadata(bs, t, table_width, page_size, self.params, c,
                                   schedule is Schedule.SHARED_INDEX, margin, self.device,
                                   num_splits)
        self._meta = None
        self._meta = self._buffers(schedule, Traversal.CHAIN if t == 1 else Traversal.BFS,
                                   precision, c, num_splits, dmeta.geo, (t,) * bs)
        return dmeta

    def _buffers(self, schedule, traversal, precision, c, nsplit, geo, sizes) -> VerifyMetadata:
        old = self._meta
        reuse = (self.graph_buffers and old is not None and old.sizes == sizes
                 and old.group_size == c and old.num_splits == nsplit
                 and old.geometry.block_table.shape == geo.block_table.shape)
        if reuse:
            geo = copy_geometry_(old.geometry, geo)
            union, workspace = old.union, old.workspace
        else:
            nq, ng, cap = geo.num_queries, geo.num_groups, c * self.params.topn
            union = None if c == 1 else (
                torch.empty(ng, self.hkv, cap, dtype=torch.int32, device=self.device),
                torch.empty(ng, self.hkv, cap, dtype=torch.int64, device=self.device),
                torch.empty(ng, self.hkv, dtype=torch.int32, device=self.device))
            nb = 2 if self.params.gated else 1
            workspace = None if nsplit == 1 else split_workspace(
                nsplit, nb, nq, self.hq, self.head_dim, ng * self.hkv, self.device)
        return VerifyMetadata(schedule=schedule, traversal=traversal, precision=precision,
                          params=self.params, group_size=c, num_splits=nsplit, geometry=geo,
                          union=union, workspace=workspace,
                          union_capacity=c * self.params.topn, sizes=sizes,
                          num_queries=geo.num_queries)

    # -- per layer ----------------------------------------------------------------------
    def run(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, sel: torch.Tensor,
            o_cmp: torch.Tensor | None = None, gates: torch.Tensor | None = None,
            layer: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Selected + window + combine for every verifier query of the prepared step.

        Args:
            q (torch.Tensor): [Nq, Hq, D], queries request-major, node order within a request.
            k_new, v_new (torch.Tensor): [Nq, Hkv, D] the draft nodes' KV (not in the cache).
            k_cache, v_cache: this layer's [num_pages, page_size, Hkv, D] (or per-layer lists,
                indexed by `layer`).
            sel (torch.Tensor): [Nq, Hkv, topn] int32 sorted, -1 padded (refresh kernel).
            o_cmp [Nq, Hq, D], gates [Nq, Hq, 3] (sigmoid values): gated combine only.
            out: [Nq, Hq, D]  # mutable
        Returns:
            out. No host syncs; launches: union (merged schedules), fused verify (its last split merges the partials).
        """
        meta = self._meta
        if meta is None:
            raise RuntimeError("NSAVerifier.run() called before prepare()")
        if isinstance(k_cache, (list, tuple)):
            k_cache, v_cache = k_cache[layer], v_cache[layer]
        union = None
        if meta.union is not None:
            geo = meta.geometry
            union = merge_group_selections(sel, geo.sel_src, geo.g_start, geo.g_len,
                                           meta.group_size, out=meta.union)
        a = VerifyArgs(q, k_new, v_new, k_cache, v_cache, meta.geometry, self.params, self.scale,
                       sel=sel, o_cmp=o_cmp, gates=gates, out=out, workspace=meta.workspace)
        return nsa_verify_fwd(a, union=union, **self.launch)
