"""The inputs of one refresh launch, bundled once: `score_topk` (per row) and `score_topk_grouped`
compute the same result from the same tensors, so both take one `RefreshArgs` and share its
validation and output allocation; only their launch knobs differ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.params import NSAParams


@dataclass(frozen=True)
class ProvisionalTokens:
    """Compressed tokens closed inside the draft trees (tree nodes that close a compression
    block, `compress_gather`), not in the committed cache yet. One bundle because the kernels
    need all four or none.

    k, v [Np, Hkv, D] (the compressed cache's dtype); cidx [Np] int32, their compressed index
    i; vis [Nq, MP] int32, the rows of k visible to each query (closed by the query or an
    ancestor), -1 padded, MP = max visible per query.
    """

    k: torch.Tensor
    v: torch.Tensor
    cidx: torch.Tensor
    vis: torch.Tensor


@dataclass(frozen=True)
class RefreshArgs:
    """What a refresh kernel reads and writes (frozen: the bundle, not the tensors; sel, o_cmp
    and lse are written in place).

    q [Nq, Hq, D] fp32 / fp16 / bf16: decode queries, tree verifier queries or prefill rows, in
    any mix of requests. ck_cache, cv_cache [num_pages, CPP, Hkv, D]: the paged compressed
    cache (CONTRACTS.md section 4), CPP = ceil(page_size / d). block_table [B, max_pages]
    int32/int64. q_req [Nq] int32: request (block_table row) of each query; q_pos [Nq] int32:
    its absolute position t. cmp_lens [B] int32: committed compressed tokens in the cache per
    request; a row uses tokens 0 .. min(cmp_lens[req], num_cmp(t+1)) - 1 (so a prefill chunk
    passes num_cmp(chunk end) and causality comes from t). params: NSA geometry; scale: softmax
    scale; page_size: KV page size; prov: the trees' provisional compressed tokens (None: none).
    with_out: also compute o_cmp and lse (needed by the gated combine); None: params.gated.
    sel [Nq, Hkv, topn] int32, o_cmp [Nq, Hq, D] like q, lse [Nq, Hq] fp32: output buffers
    (None: allocated).
    """

    q: torch.Tensor
    ck_cache: torch.Tensor
    cv_cache: torch.Tensor
    block_table: torch.Tensor
    q_req: torch.Tensor
    q_pos: torch.Tensor
    cmp_lens: torch.Tensor
    params: NSAParams
    scale: float
    page_size: int
    prov: ProvisionalTokens | None = None
    with_out: bool | None = None
    sel: torch.Tensor | None = None
    o_cmp: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    @property
    def wants_out(self) -> bool:
        """Whether o_cmp and lse are computed (with_out, defaulting to the gated combine)."""
        return self.params.gated if self.with_out is None else self.with_out


def check_refresh_args(what: str, a: RefreshArgs) -> bool:
    """Validate the refresh kernels' arguments (shapes, contiguity, int32 row metadata, NSA
    geometry) with errors that name the argument; returns whether provisional tokens are
    present."""
    q, ck_cache, params = a.q, a.ck_cache, a.params
    nq, hq, dim = q.shape
    _, cpp, hkv, _ = ck_cache.shape
    if params.topn < params.init_blocks + params.local_blocks:
        raise ValueError(f"{what}: topn ({params.topn}) < init_blocks + local_blocks")
    if params.block % params.stride or params.select % params.stride or params.block > params.select:
        raise ValueError(f"{what}: need d | l, d | l', l <= l' (got l={params.block}, "
                         f"d={params.stride}, l'={params.select})")
    if hq % hkv or ck_cache.shape[3] != dim or a.cv_cache.shape != ck_cache.shape:
        raise ValueError(f"{what}: q [Nq, Hq, D] {tuple(q.shape)} and ck/cv [pages, CPP, Hkv, D] "
                         f"{tuple(ck_cache.shape)} disagree (Hq must be a multiple of Hkv)")
    if cpp != params.cmp_per_page(a.page_size):
        raise ValueError(f"{what}: ck_cache has {cpp} slots per page, page_size {a.page_size} "
                         f"needs {params.cmp_per_page(a.page_size)}")
    for name in ("q", "ck_cache", "cv_cache", "q_req", "q_pos", "cmp_lens"):
        if not getattr(a, name).is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous")
    if a.q_req.shape != (nq,) or a.q_pos.shape != (nq,) or a.cmp_lens.shape != a.block_table.shape[:1]:
        raise ValueError(f"{what}: q_req, q_pos must be [Nq] and cmp_lens [B]")
    for name in ("q_req", "q_pos", "cmp_lens"):
        # int64 here makes a loop bound change type inside the kernel, which the GPU compiler
        # rejects (the interpreter does not): say so instead of failing in the compiler
        if getattr(a, name).dtype != torch.int32:
            raise ValueError(f"{what}: {name} must be int32, got {getattr(a, name).dtype}")
    return _check_provisional(what, a, nq, hkv, dim)


def _check_provisional(what: str, a: RefreshArgs, nq: int, hkv: int, dim: int) -> bool:
    # shapes of the provisional tokens; True when some token is visible to some row
    p = a.prov
    if p is None:
        return False
    if any(x is None for x in (p.k, p.v, p.cidx, p.vis)):
        raise ValueError(f"{what}: provisional tokens need all of k, v, cidx and vis")
    np_ = p.k.shape[0]
    if (p.v.shape != p.k.shape or p.k.shape[1:] != (hkv, dim) or p.cidx.shape != (np_,)
            or p.vis.dim() != 2 or p.vis.shape[0] != nq or not p.vis.is_contiguous()
            or not p.k.is_contiguous() or not p.v.is_contiguous()):
        raise ValueError(f"{what}: provisional tokens need k/v [Np, Hkv, D], cidx [Np], "
                         "vis [Nq, MP] (all contiguous)")
    return p.vis.shape[1] > 0 and np_ > 0


def refresh_outputs(a: RefreshArgs) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The outputs: the caller's buffers, or new ones (sel [Nq, Hkv, topn] int32; with
    `wants_out`: o_cmp like q, lse [Nq, Hq] fp32)."""
    q = a.q
    nq, hq, _ = q.shape
    sel, o_cmp, lse = a.sel, a.o_cmp, a.lse
    if sel is None:
        sel = torch.empty(nq, a.ck_cache.shape[2], a.params.topn, dtype=torch.int32,
                          device=q.device)
    if a.wants_out:
        o_cmp = torch.empty_like(q) if o_cmp is None else o_cmp
        lse = torch.empty(nq, hq, dtype=torch.float32, device=q.device) if lse is None else lse
    return sel, o_cmp, lse


def prov_pointers(a: RefreshArgs, has_prov: bool, dummy: torch.Tensor) -> dict:
    """The provisional-token kernel arguments; without any, placeholders the kernels never
    read (HAS_PROV is a constexpr) but that still need a pointer of a valid dtype."""
    if has_prov:
        p = a.prov
        return {"prov_k": p.k, "prov_v": p.v, "prov_cidx": p.cidx, "prov_vis": p.vis}
    return {"prov_k": dummy, "prov_v": dummy, "prov_cidx": a.cmp_lens, "prov_vis": a.cmp_lens}
