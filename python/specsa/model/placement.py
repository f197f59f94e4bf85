"""`device` and `dtype` of a model, read off one weight: the decoder and the EAGLE head are
moved and cast as a whole, so the one weight each always has speaks for all of them."""
from __future__ import annotations

import torch


class WeightPlacement:
    """Mixin for an nn.Module: `device` / `dtype` of the weight `_placement_weight` returns."""

    def _placement_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._placement_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self._placement_weight().dtype
