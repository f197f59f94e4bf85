"""Native NSA checkpoints in SGLang's own Llama / Qwen2 model classes.

A native checkpoint (CONTRACTS.md section 5) carries, per layer L, beside the usual names:

    model.layers.L.self_attn.gate_proj.weight   [3*Hq, hidden]  (+ .bias)
    model.layers.L.self_attn.compress_k.weight  [Hkv, l]        (+ .bias [Hkv, D])
    model.layers.L.self_attn.compress_v.weight  [Hkv, l]        (+ .bias [Hkv, D])

SGLang's loaders do not know them (`gate_proj` would even be mistaken for the MLP's stacked
gate_up projection), so an AROUND hook on `load_weights` takes them out of the weight stream and
attaches them to each layer after the normal load:

- the attention module's forward computes the gates sigmoid(gate_proj(x)) [N, Hq, 3] from its
  input (the normed hidden state, like specsa.model) and leaves them on its RadixAttention
  (`layer.specsa_gates`) for the specsa backend, inside the same (graph-captured) forward;
- the learned compression weights go to `layer.specsa_cw` = (wk, bk, wv, bv), fp32.

No model class is replaced; a checkpoint without these names loads exactly as before.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

logger = logging.getLogger("specsa")

NSA_WEIGHT = re.compile(r"layers\.(\d+)\.self_attn\.(gate_proj|compress_k|compress_v)\.(weight|bias)$")
MODEL_CLASSES = ("sglang.srt.models.llama.LlamaForCausalLM",
                 "sglang.srt.models.qwen2.Qwen2ForCausalLM")


def load_weights_hook(original, model, weights, *args, **kwargs):
    extra: dict[str, torch.Tensor] = {}

    def rest():
        for name, w in weights:
            if NSA_WEIGHT.search(name):
                extra[name] = w
            else:
                yield name, w
    result = original(model, rest(), *args, **kwargs)
    if extra:
        attach(model, extra)
    return result


def _tp() -> tuple[int, int]:
    """(tensor-parallel size, this rank)."""
    try:
        from sglang.srt.distributed import (get_tensor_model_parallel_rank,
                                            get_tensor_model_parallel_world_size)
        return get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    except Exception:    # noqa: BLE001 - not initialised (tests): one rank
        return 1, 0


def _kv_rows(total: int, local: int, tp: int, rank: int) -> slice:
    """This rank's KV heads, as SGLang's attention splits them: contiguous blocks when there
    are at least as many KV heads as ranks, else each head replicated over tp / total ranks."""
    lo = rank * local if total >= tp else rank // (tp // total)
    return slice(lo, lo + local)


def attach(model, extra: dict[str, torch.Tensor]) -> None:
    """Attach gate / compression weights to the layers of a loaded SGLang model, sharded like
    the attention heads under tensor parallelism (gates per query head, compression per KV
    head)."""
    tp, rank = _tp()
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, w in extra.items():
        m = NSA_WEIGHT.search(name)
        per_layer.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = w
    layers = model.model.layers
    for i, ws in sorted(per_layer.items()):
        if i >= len(layers) or not hasattr(layers[i], "self_attn"):
            continue                      # another pipeline stage's layer
        attn = layers[i].self_attn
        radix = attn.attn
        ref = next(attn.parameters())
        dev, dtype = ref.device, ref.dtype
        hq, hkv = attn.num_heads, attn.num_kv_heads
        if "gate_proj.weight" in ws:
            wg = ws["gate_proj.weight"]
            if wg.shape[0] != 3 * hq * tp:
                raise ValueError(f"specsa: layer {i} gate_proj.weight has {wg.shape[0]} rows, "
                                 f"expected 3 * num_heads = {3 * hq * tp}")
            # rows 3h..3h+2 belong to query head h: this rank's heads are one block of rows
            rows = slice(3 * hq * rank, 3 * hq * (rank + 1))
            bg = ws.get("gate_proj.bias")
            _wrap_forward(attn, radix, wg[rows].to(dev, dtype),
                          None if bg is None else bg[rows].to(dev, dtype), hq)
        if "compress_k.weight" in ws or "compress_v.weight" in ws:
            try:
                wk, wv = ws["compress_k.weight"], ws["compress_v.weight"]
            except KeyError as e:
                raise ValueError(f"specsa: layer {i} has one of compress_k / compress_v only "
                                 f"(missing {e})") from None
            total_kv = attn.total_num_kv_heads if hasattr(attn, "total_num_kv_heads") \
                else hkv * tp
            if wk.shape[0] != total_kv or wv.shape != wk.shape:
                raise ValueError(f"specsa: layer {i} compress_k/compress_v weights "
                                 f"{tuple(wk.shape)}/{tuple(wv.shape)} must be "
                                 f"[Hkv={total_kv}, l]")
            kv = _kv_rows(total_kv, hkv, tp, rank)
            f32 = lambda x, dev=dev: None if x is None else x[kv].to(dev, torch.float32).contiguous()  # noqa: E731
            radix.specsa_cw = (f32(wk), f32(ws.get("compress_k.bias")), f32(wv),
                               f32(ws.get("compress_v.bias")))
    logger.warning("specsa: native NSA weights attached to %d layers (tensor-parallel rank %d "
                   "of %d)", len(per_layer), rank, tp)


def _wrap_forward(attn, radix, wg: torch.Tensor, bg: torch.Tensor | None, hq: int) -> None:
    orig = attn.forward

    def forward(positions, hidden_states, forward_batch, *args, **kwargs):
        # row 3*h + c of gate_proj is gate c (cmp, slc, win) of head h (CONTRACTS.md 5)
        radix.specsa_gates = torch.sigmoid(F.linear(hidden_states, wg, bg).float()).view(-1, hq, 3)
        return orig(positions, hidden_states, forward_batch, *args, **kwargs)
    attn.forward = forward


def layer_native(layer, gated: bool, learned: bool) -> tuple[torch.Tensor | None, tuple | None]:
    """(gates [N, Hq, 3] or None, cw or None) of a RadixAttention layer for this NSA mode, with
    an error naming the missing checkpoint weights."""
    gates = getattr(layer, "specsa_gates", None) if gated else None
    cw = getattr(layer, "specsa_cw", None) if learned else None
    if gated and gates is None:
        raise ValueError(f"specsa: combine=gated needs model.layers.{layer.layer_id}.self_attn."
                         "gate_proj.weight in the checkpoint (absent); serve it training-free "
                         "with SPECSA_NSA='combine=union,compress=mean'")
    if learned and cw is None:
        raise ValueError(f"specsa: compress=learned needs model.layers.{layer.layer_id}.self_attn."
                         "compress_k/compress_v weights in the checkpoint (absent)")
    return gates, cw
