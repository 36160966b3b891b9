"""Linear layers per quantization mode.

The model builds every quantizable Linear through ``ops.Linear(in_features, out_features, bias=True, device=None,
dtype=None)`` where ``ops = ops_for(mode)``; the module type then says what runs. Layers that must stay in high
precision are built with ``ops_for(QuantMode.DISABLED)``.

Forward contract of every Linear: input [..., in_features] of the compute dtype; output [..., out_features] of the
input's dtype. Weight stored row-major [out_features, in_features].
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class QuantMode(str, enum.Enum):
    """The loader's ``quantization`` choices, in UI order (upstream's list, then the FP4 ones)."""

    DISABLED = "disabled"
    FP8_E4M3FN = "fp8_e4m3fn"
    FP8_E4M3FN_FAST = "fp8_e4m3fn_fast"
    FP8_E4M3FN_SCALED = "fp8_e4m3fn_scaled"
    FP8_E4M3FN_SCALED_FAST = "fp8_e4m3fn_scaled_fast"
    FP8_E5M2 = "fp8_e5m2"
    FP8_E5M2_FAST = "fp8_e5m2_fast"
    FP8_E5M2_SCALED = "fp8_e5m2_scaled"
    FP8_E5M2_SCALED_FAST = "fp8_e5m2_scaled_fast"
    FP4_EXPERIMENTAL = "fp4_experimental"
    FP4_SCALED = "fp4_scaled"
    FP4_SCALED_FAST = "fp4_scaled_fast"

    @classmethod
    def parse(cls, value: str) -> "QuantMode":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown quantization {value!r}; choose one of: {choices}") from None


QUANT_MODES = tuple(m.value for m in QuantMode)


class CastLinear(nn.Linear):
    """Linear whose stored weight dtype may differ from the compute dtype: cast per call to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)


@dataclass(frozen=True)
class Ops:
    """Layer classes for one quantization mode."""

    mode: QuantMode
    Linear: type


def ops_for(mode: str | QuantMode) -> Ops:
    """Return the layer namespace for ``mode``."""
    parsed = mode if isinstance(mode, QuantMode) else QuantMode.parse(mode)
    return Ops(mode=parsed, Linear=CastLinear)
