"""Per-step metadata of the Triton NSA path inside SGLang, in static buffers built on the
device.

Decode and TARGET_VERIFY forwards have a fixed shape per batch size (every request carries T
new tokens: 1 for decode, `speculative_num_draft_tokens` for verification), so everything the
kernels read lives in buffers allocated once per (mode, batch size) and rewritten in place
before every forward by one kernel launch (`DeviceStepMetadata.fill_from_pool`,
kernels/stage/step_metadata.py; the torch ops of `DeviceStepMetadata.fill` are its reference): no
host sync, so the host can prepare a step while the GPU still runs the previous phase, and a
CUDA graph captured around the layers replays with the new step's metadata. Eager forwards use
the very same buffers, so CPU tests (Triton interpreter) exercise the code the graphs run.

Inputs per step, on the device: the committed length P of each request (SGLang's seq_lens),
the draft trees as parent arrays (a chain for decode and topk 1; recovered from the EAGLE
tree's first-child / next-sibling links otherwise) and SGLang's req_to_token rows.

Layout contract with the kernels (docs/CONTRACTS.md section 4): SGLang's token pool of one
layer, [size + page_size, Hkv, D], is read as pages [num_pages, page_size, Hkv, D]; a token's
flat pool slot is page * page_size + offset, which is exactly SGLang's slot index, and the
block table entry of logical page j is req_to_token[r, j * page_size] // page_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specsa.verifier import NSAVerifier
from specsa.config import NSAConfig, VerifyKnobs
from specsa.device_metadata import DeviceStepMetadata
from specsa.schedule import default_schedule
from specsa.verify_layer import StepTensors


def block_table_from(rows: torch.Tensor, page_size: int, width: int) -> torch.Tensor:
    """[B, width] int32 page ids of the requests' logical pages, from their req_to_token rows
    (device op, no host sync)."""
    rows = rows[:, ::page_size][:, :width]
    bt = torch.div(rows, page_size, rounding_mode="floor").to(torch.int32)
    if bt.shape[1] < width:
        bt = torch.nn.functional.pad(bt, (0, width - bt.shape[1]))
    return bt


def qlen_only_verify_mask(max_bs: int, draft_tokens: int, device):
    """SGLang's target-verify mask in QLEN_ONLY layout (T x T per request), marked unread: the
    SpecSA backends take tree visibility from the draft's parent links, never from the mask,
    and SGLang otherwise builds a FULL_MASK of bs x (context_len + T) x T bools per step."""
    from sglang.srt.layers.attention.verify_mask import VerifyMask
    from sglang.srt.speculative.eagle_utils import TreeMaskMode

    return VerifyMask(buffer=torch.ones(max_bs * draft_tokens * draft_tokens, dtype=torch.bool,
                                        device=device),
                      mode=TreeMaskMode.QLEN_ONLY, max_bs=max_bs, is_read=False)


@dataclass
class StepBuffers:
    """The static metadata of one (mode, batch size): the device metadata and its verifier."""

    meta: DeviceStepMetadata
    verifier: NSAVerifier
    tensors: StepTensors      # what verify_layer reads (views of `meta`)

    @property
    def num_tokens(self) -> int:
        return self.meta.num_queries

    @property
    def group_size(self) -> int:
        return self.meta.c


class StepMetadataBuilder:
    """Allocates `StepBuffers` per (mode, batch size) and fills them for each step."""

    def __init__(self, nsa: NSAConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, page_size: int, table_width: int, margin: int, device,
                 knobs: VerifyKnobs = VerifyKnobs()):
        self.knobs = knobs
        self.nsa, self.params = nsa, nsa.params
        self.hq, self.hkv, self.head_dim, self.scale = num_q_heads, num_kv_heads, head_dim, scale
        self.page_size, self.width, self.margin = page_size, table_width, margin
        self.device = torch.device(device)
        self._bufs: dict[tuple[str, int, int], StepBuffers] = {}

    def buffers(self, mode: str, bs: int, t: int) -> StepBuffers:
        key = (mode, bs, t)
        if key not in self._bufs:
            k = self.knobs
            verifier = NSAVerifier(self.nsa, self.hq, self.hkv, self.head_dim,
                                   device=self.device, scale=self.scale, graph_buffers=True)
            meta = verifier.prepare_on_device(
                bs, t, self.width, self.page_size,
                schedule=k.schedule or default_schedule(bs * t), precision=k.precision,
                group_size=k.group_size, margin=self.margin)
            self._bufs[key] = StepBuffers(meta, verifier, meta.step_tensors(verifier))
        return self._bufs[key]

    def fill_step(self, buf: StepBuffers, seq_lens: torch.Tensor, decode: bool,
                  req_to_token: torch.Tensor, pool_idx: torch.Tensor,
                  links: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepBuffers:
        """Rewrite `buf` in place for one step (one kernel launch, no host sync): SGLang's
        seq_lens [>= bs] (decode: they count the token being decoded), the requests' rows of
        req_to_token through pool_idx [>= bs], and EAGLE's (next_token, next_sibling) links
        [raw <= bs, T] of the first raw requests or None (chains; the rows beyond raw are
        CUDA-graph padding and keep the chain too)."""
        buf.meta.fill_from_pool(seq_lens, decode, req_to_token, pool_idx, self.params.window,
                                links)
        return buf
