"""Torch stand-ins for the Triton / CUDA-JIT / sgl-kernel ops that SGLang 0.5.17 reaches on an
out-of-tree CPU platform (test harness only; installed by `register()` only when
SGLANG_PLATFORM=specsa_cpu). Each one says which 0.5.17 call site needs it. They are plain
Python loops over the batch: fine for tiny CPU tests, never used on CUDA.
"""
from __future__ import annotations

import sys
import threading
import types

import torch


# -- mem_cache ----------------------------------------------------------------------------

def assign_req_to_token_pool_func(req_pool_indices, req_to_token, start_offset, end_offset,
                                  out_cache_loc, batch_size):
    off = 0
    for i in range(batch_size):
        s, e, r = int(start_offset[i]), int(end_offset[i]), int(req_pool_indices[i])
        req_to_token[r, s:e] = out_cache_loc[off:off + e - s].to(req_to_token.dtype)
        off += e - s


def move_kv_cache_impl(self, tgt_loc, src_loc):
    """MHATokenToKVPool._move_kv_cache_impl (Triton tiled copy) for the tree-path compaction."""
    if tgt_loc.numel() == 0:
        return
    for kb, vb in zip(self.k_buffer, self.v_buffer):
        kb[tgt_loc] = kb[src_loc]
        vb[tgt_loc] = vb[src_loc]


# -- speculative kernels ------------------------------------------------------------------

def assign_extend_cache_locs_func(req_pool_indices, req_to_token, start_offset, end_offset,
                                  batch_size, draft_token_num, device):
    outs = [req_to_token[int(r), int(s):int(e)].to(torch.int64)
            for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist())]
    return torch.cat(outs) if outs else torch.empty((0,), dtype=torch.int64, device=device)


class DraftCacheLocsLauncher:
    """Stands in for the Triton kernel object `assign_draft_cache_locs_contiguous`, which
    eagle_worker_common.prepare_for_draft launches as `kernel[(bs,)](...)`."""

    def __getitem__(self, grid):
        return self

    def __call__(self, req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk,
                 num_steps):
        n = topk * num_steps
        for b, (r, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out_cache_loc[b * n:(b + 1) * n] = req_to_token[r, s:s + n]


class ExtendCacheLocsLauncher:
    """Stands in for the Triton kernel `assign_extend_cache_locs` that spec_utils.
    move_accept_tokens_to_target_kvcache launches as `kernel[(bs,)](...)` (tree compaction)."""

    def __getitem__(self, grid):
        return self

    def __call__(self, req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                 pool_len, bs_upper=None):
        off = 0
        for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
            out_cache_loc[off:off + e - s] = req_to_token[r, s:e]
            off += e - s


def verify_tree_greedy_func(predicts, accept_index, accept_token_num, candidates,
                            retrieve_index, retrieve_next_token, retrieve_next_sibling,
                            target_predict, topk=-1):
    bs = candidates.shape[0]
    ns = accept_index.shape[1]
    tp = target_predict.reshape(-1)
    for b in range(bs):
        last = int(retrieve_index[b, 0])
        accept_index[b, 0] = last
        n_acc, cur = 0, 0
        for _ in range(1, ns):
            cur = int(retrieve_next_token[b, cur])
            target = int(tp[last])
            matched = False
            while cur != -1:
                if int(candidates[b, cur]) == target:
                    predicts[last] = target
                    n_acc += 1
                    last = int(retrieve_index[b, cur])
                    accept_index[b, n_acc] = last
                    matched = True
                    break
                cur = int(retrieve_next_sibling[b, cur])
            if not matched:
                break
        accept_token_num[b] = n_acc
        predicts[last] = tp[last]
    return predicts, accept_index, accept_token_num


def fill_bonus_tokens_func(accept_tokens, accept_lens, bonus_tokens, accept_stride, batch_size):
    flat = accept_tokens.reshape(-1)
    for b in range(batch_size):
        bonus_tokens[b] = flat[accept_stride * b + int(accept_lens[b]) - 1]


def fill_accept_out_cache_loc_func(accept_index, out_cache_loc, accept_out_cache_loc, size):
    flat = accept_index.reshape(-1)[:size]
    keep = flat[flat > -1]
    accept_out_cache_loc[: keep.numel()] = out_cache_loc[keep]


def _tree_parents(parent_list, selected, topk, n):
    """Node index (0 = root, i = selected[i-1] + 1) of each node's parent, as the CUDA
    build_tree_kernel_efficient derives it from EAGLE's parent_list / top_scores_index."""
    sel = selected.tolist()
    plist = parent_list.tolist()
    pos_of = {s: i + 1 for i, s in enumerate(sel)}
    parents = [-1] * n
    for i in range(1, n):
        ptb = sel[i - 1] // topk
        parents[i] = 0 if ptb == 0 else pos_of.get(plist[ptb], -2)
    return parents


def build_tree_kernel_efficient_torch(parent_list, selected_index, verified_seq_len, tree_mask,
                                      positions, retrieve_index, retrieve_next_token,
                                      retrieve_next_sibling, topk, depth, draft_token_num,
                                      tree_mask_mode):
    """Python port of sgl_build_tree_kernel_efficient (kernels/ops/speculative/spec_tree.py has
    the Triton twin, same semantics): retrieve_* links, positions and the tree mask."""
    n = draft_token_num
    bs = verified_seq_len.shape[0]
    seq = verified_seq_len.tolist()
    mask_off = 0
    for b in range(bs):
        parents = _tree_parents(parent_list[b] if parent_list.numel() else parent_list.new_zeros(0),
                                selected_index[b], topk, n)
        retrieve_index[b] = torch.arange(b * n, (b + 1) * n)
        for i in range(n - 1, 0, -1):          # reverse: the first child ends up first
            p = parents[i]
            if p < 0:
                continue
            nxt = int(retrieve_next_token[b, p])
            retrieve_next_token[b, p] = i
            if nxt != -1:
                retrieve_next_sibling[b, i] = nxt
        depth_of = [0] * n
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            anc[i, i] = True
            p = parents[i]
            while p >= 0 and p != i:
                anc[i, p] = True
                if p == 0:
                    break
                p = parents[p]
            depth_of[i] = int(anc[i].sum()) - 1
        positions[b * n:(b + 1) * n] = torch.tensor(depth_of) + seq[b]
        if tree_mask_mode == 0:      # FULL_MASK: rows of seq_len (all True) + n tree columns
            width = seq[b] + n
            rows = tree_mask[mask_off:mask_off + n * width].view(n, width)
            rows[:, :seq[b]] = True
            rows[:, seq[b]:] = anc.to(tree_mask.device)
            mask_off += n * width
        elif tree_mask_mode == 1:    # QLEN_ONLY
            tree_mask[b * n * n:(b + 1) * n * n] = anc.reshape(-1).to(tree_mask.device)
        else:
            raise NotImplementedError("specsa CPU harness: bit-packed tree masks are not supported")


# -- sampled tree verification ------------------------------------------------------------
# eagle_utils.eagle_sample (0.5.17) verifies a batch with any sampled request through
# `from sgl_kernel import top_k_renorm_prob, top_p_renorm_prob,
# tree_speculative_sampling_target_only`: CUDA ops that do not even import without a GPU.
# The torch versions below keep SGLang's semantics; `eagle_sample_cpu` (AROUND hook on
# eagle_sample) puts them where that import finds them for the duration of the call.

def top_k_renorm_prob(probs, top_ks):
    """Keep each row's top_ks[i] largest probabilities (rank order, ties to the lower token
    id, as the torch sampler of the AR path), zero the rest, renormalise."""
    probs = probs.float()
    srt, idx = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    srt = torch.where(rank < top_ks.view(-1, 1).to(rank.dtype), srt, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, idx, srt)
    return out / out.sum(dim=-1, keepdim=True)


def top_p_renorm_prob(probs, top_ps):
    """Keep the most likely tokens up to and including the one where the cumulative
    probability reaches top_ps[i] (the AR torch sampler's rule), zero the rest, renormalise."""
    probs = probs.float()
    srt, idx = probs.sort(dim=-1, descending=True, stable=True)
    before = torch.cumsum(srt, dim=-1) - srt
    srt = torch.where(before > top_ps.view(-1, 1).to(srt.dtype), 0.0, srt)
    out = torch.zeros_like(probs).scatter_(-1, idx, srt)
    return out / out.sum(dim=-1, keepdim=True)


def _sample_index(weights: torch.Tensor, coin: float) -> int:
    """Inverse-CDF draw from unnormalised non-negative weights with a uniform coin in [0, 1)."""
    w = weights.double()
    cdf = torch.cumsum(w, dim=0)
    i = int(torch.searchsorted(cdf, torch.tensor([coin * float(cdf[-1])], dtype=cdf.dtype),
                               right=True)[0])
    nz = (w > 0).nonzero()
    if i >= w.numel() or w[i] <= 0:          # rounding at the top end: the last possible token
        i = int(nz[-1]) if nz.numel() else w.numel() - 1
    return i


def tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, candidates,
                                          retrive_index, retrive_next_token,
                                          retrive_next_sibling, uniform_samples,
                                          uniform_samples_for_final_sampling, target_probs,
                                          draft_probs, threshold_single=1.0, threshold_acc=1.0,
                                          deterministic=True):
    """sgl_kernel's tree speculative sampling (target-only: drafts are point proposals).

    Per request, from the root, level by level: one coin u per level; the children of the last
    accepted node are tried in sibling order, accumulating their target probabilities, and the
    first child whose running sum reaches u (or whose probability alone reaches
    threshold_single) is accepted; that is, a token drawn from the target distribution by
    inverse CDF over the siblings first. A rejected child's target probability is copied into
    draft_probs at the parent's row. When no child is accepted (or the tree ends), the next
    token is drawn from relu(target - draft_probs) at the last accepted node: the target
    distribution without the rejected siblings. With threshold_single = threshold_acc = 1
    (SGLang's defaults) every emitted token follows the target distribution exactly.
    Writes predicts [bs * n] (token after each accepted node, at its retrive_index),
    accept_index [bs, steps] and accept_token_num [bs] (drafts accepted, bonus excluded)."""
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    coins = uniform_samples.reshape(bs, n).tolist()
    final = uniform_samples_for_final_sampling.reshape(-1).tolist()
    cand, ridx = candidates.tolist(), retrive_index.tolist()
    nxt, sib = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    tp = target_probs.reshape(bs, n, -1)
    dp = draft_probs.reshape(bs, n, -1)
    for b in range(bs):
        last = ridx[b][0]
        accept_index[b, 0] = last
        n_acc, cur, row, coin, acc = 0, 0, 0, coins[b][0], 0.0
        for _ in range(1, steps):
            cur = nxt[b][cur]
            while cur != -1:
                tok = cand[b][cur]
                p = float(tp[b, row, tok])
                acc += p
                if coin <= acc / threshold_acc or p >= threshold_single:
                    predicts[last] = tok
                    n_acc += 1
                    last = ridx[b][cur]
                    accept_index[b, n_acc] = last
                    row, coin, acc = cur, coins[b][cur], 0.0
                    break
                dp[b, row, tok] = tp[b, row, tok]
                cur = sib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = n_acc
        q = tp[b, row].double()
        if n_acc != steps - 1:                  # the bonus after a full path has no rejections
            q = (q - dp[b, row].double()).clamp(min=0.0)
        predicts[last] = _sample_index(q, final[b])
    return predicts, accept_index, accept_token_num


class _TorchSglKernel(types.ModuleType):
    """What eagle_sample's sampled branch imports from sgl_kernel, in torch."""

    def __init__(self):
        super().__init__("sgl_kernel")
        self.top_k_renorm_prob = top_k_renorm_prob
        self.top_p_renorm_prob = top_p_renorm_prob
        self.tree_speculative_sampling_target_only = tree_speculative_sampling_target_only


_SGL_KERNEL = _TorchSglKernel()
_sgl_kernel_lock = threading.Lock()


def eagle_sample_cpu(original, verify_input, batch, logits_output, *args, **kwargs):
    """AROUND hook on eagle_utils.eagle_sample: an all-greedy batch runs SGLang's code as is
    (greedy tree verification through verify_tree_greedy_func); a batch with sampled
    requests runs it with the torch ops above bound as `sgl_kernel` for the call (SGLang
    imports them inside the function; the real sgl_kernel needs CUDA). Penalties, logit bias,
    grammar masks, temperature and coins stay SGLang's own code."""
    if batch.forward_mode.is_idle() or batch.sampling_info.is_all_greedy:
        return original(verify_input, batch, logits_output, *args, **kwargs)
    with _sgl_kernel_lock:
        saved = sys.modules.get("sgl_kernel")
        sys.modules["sgl_kernel"] = _SGL_KERNEL
        try:
            return original(verify_input, batch, logits_output, *args, **kwargs)
        finally:
            if saved is None:
                sys.modules.pop("sgl_kernel", None)
            else:
                sys.modules["sgl_kernel"] = saved


def _gloo_groups(*args, **kwargs):
    """BEFORE init_model_parallel_group: on this platform tensor-parallel groups talk through
    torch.distributed (gloo) only. SGLang's own CPU engine skips PyNccl and the custom
    all-reduce by platform checks that an out-of-tree platform does not pass."""
    kwargs["use_pynccl"] = False
    kwargs["use_custom_allreduce"] = False
    return args, kwargs


def install(HookRegistry, HookType) -> None:
    """Register the CPU stand-ins (call only on the specsa_cpu platform)."""
    R = HookRegistry.register
    R("sglang.srt.distributed.parallel_state.init_model_parallel_group", _gloo_groups,
      HookType.BEFORE)
    # eagle_utils.py:723: sampled verification imports CUDA ops from sgl_kernel (torch above).
    R("sglang.srt.speculative.eagle_utils.eagle_sample", eagle_sample_cpu, HookType.AROUND)
    # utils/common.py:1304 decides Triton by backend name only (not torch_native -> Triton);
    # write_cache_indices and compute_position would launch Triton for backend "specsa".
    R("sglang.srt.utils.common.support_triton", lambda backend: False, HookType.REPLACE)
    from sglang.srt.mem_cache.allocation import get_last_loc_torch
    R("sglang.srt.mem_cache.allocation.get_last_loc",
      lambda a, b, c: get_last_loc_torch(a, b, c), HookType.REPLACE)
    R("sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
      assign_req_to_token_pool_func, HookType.REPLACE)
    R("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._move_kv_cache_impl",
      move_kv_cache_impl, HookType.REPLACE)
    # eagle_utils.py:371: on OOT no branch matches and the buffers come back unfilled.
    R("sglang.srt.speculative.eagle_utils.verify_tree_greedy_func",
      verify_tree_greedy_func, HookType.REPLACE)
    # cache_locs.py:432 returns None on OOT (no platform hook in 0.5.17).
    R("sglang.kernels.ops.speculative.cache_locs.assign_extend_cache_locs_func",
      assign_extend_cache_locs_func, HookType.REPLACE)
    R("sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func",
      fill_bonus_tokens_func, HookType.REPLACE)
    R("sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func",
      fill_accept_out_cache_loc_func, HookType.REPLACE)
    # eagle_utils.build_tree_kernel_efficient calls the CUDA JIT op on any non-CPU/NPU/XPU
    # platform (an undefined name on OOT); replace the kernel call, keep SGLang's wrapper.
    import sglang.srt.speculative.eagle_utils as eu
    eu.sgl_build_tree_kernel_efficient = build_tree_kernel_efficient_torch
    # eagle_worker_common.prepare_for_draft launches a Triton kernel object (kernel[grid](...)),
    # which a HookRegistry function wrapper cannot stand in for.
    import sglang.srt.speculative.eagle_worker_common as ewc
    ewc.assign_draft_cache_locs_contiguous = DraftCacheLocsLauncher()
    import sglang.srt.speculative.spec_utils as su
    su.assign_extend_cache_locs = ExtendCacheLocsLauncher()
    # overlap_utils.py:386 (overlap scheduling) gathers the speculative extras with a Triton
    # kernel object
    R("sglang.srt.managers.overlap_utils.gather_spec_extras", gather_spec_extras_torch,
      HookType.REPLACE)
    _cpu_streams()


def gather_spec_extras_torch(indices, topk_p_buf, topk_index_buf, output_tokens_buf,
                             hidden_states_buf):
    """Rows `indices` of each speculative-extras buffer (the Triton kernel's gather)."""
    idx = indices.to(torch.long)
    return (topk_p_buf[idx], topk_index_buf[idx], output_tokens_buf[idx],
            None if hidden_states_buf is None else hidden_states_buf[idx])


def _cpu_streams() -> None:
    """SGLang's overlap scheduler records tensors on the device's current stream
    (overlap_utils.py:376), which CPU tensors refuse; CPU streams run in order, so there is
    nothing to record."""
    record = torch.Tensor.record_stream

    def record_stream(self, stream):
        if isinstance(stream, torch.cpu.Stream):
            return None
        return record(self, stream)
    torch.Tensor.record_stream = record_stream
