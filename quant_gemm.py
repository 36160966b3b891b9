"""The GEMM calls of the quantized Linears (a helper module of :mod:`fp8_optimization`): the activation operand,
activations quantized per token (by the layer, or by the op that produced them), and the one ``torch._scaled_mm``
call, which validates its operands first (``quant_formats.check_operands``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .compiled_kernels import fused, runs_compiled
from .quant_formats import GemmOperands, Kernel, check_operands, quantize_rows_e4m3
from .quant_runtime import report_layout


@dataclass(frozen=True)
class QuantizedRows:
    """Activations [..., K] quantized per token for the fp8 row-wise GEMM: ``data`` e4m3 [M, K_pad] contiguous
    (zero columns past K), ``scale`` float32 [M, 1] (value = data · scale), ``lead`` the leading shape
    (M = prod(lead)), ``dtype`` the activations' dtype (the GEMM's output dtype)."""

    data: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, self.data.shape[1])

    @property
    def device(self) -> torch.device:
        return self.data.device


def gemm_rows(x: torch.Tensor, layer_name: str) -> torch.Tensor:
    """x [..., K] as the GEMM's activation operand: [M, K], contiguous, 16-byte aligned (a copy only when x is not;
    reported under ``force_contiguous_tensors``)."""
    rows = x.reshape(-1, x.shape[-1])
    if not x.is_contiguous() or rows.data_ptr() % 16:
        report_layout(layer_name, x, "made contiguous and 16-byte aligned")
    if not rows.is_contiguous():
        return rows.contiguous()
    return rows.clone() if rows.data_ptr() % 16 else rows


def quantize_rows(rows: torch.Tensor, k_pad: int, lead: tuple[int, ...]) -> QuantizedRows:
    """rows [M, K] (contiguous) quantized per token, K padded with ``k_pad`` zero columns."""
    data, scale = quantize_rows_e4m3(rows, k_pad)
    return QuantizedRows(data, scale, lead, rows.dtype)


def quantized_output(math: Callable[..., torch.Tensor], x: torch.Tensor, *args,
                     kernel: Optional[str] = None) -> QuantizedRows:
    """``math(x, *args)`` (a per-token step returning [..., K] in x's dtype) quantized per token.

    ``kernel``: the name of the :mod:`quant_triton` function computing the same step and quantization from the same
    arguments in one pass, used where ``compiled_kernels.runs_compiled(x)`` (the unquantized result is never
    written to memory). Otherwise ``math`` and the quantization run as generated kernels (two passes) or eagerly.
    The values equal quantizing the step's result (up to the order of a float32 reduction)."""
    if kernel is not None and runs_compiled(x):
        from . import quant_triton

        data, scale = getattr(quant_triton, kernel)(x, *args)
    else:
        data, scale = _quantizing(math)(x, *args)
    return QuantizedRows(data, scale, tuple(x.shape[:-1]), x.dtype)


@functools.cache
def _quantizing(math: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def step_then_quantize(x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        y = math(x, *args)
        return quantize_rows_e4m3(y.reshape(-1, y.shape[-1]), 0)

    return fused(dynamic_rows=True)(step_then_quantize)


def fp8_rowwise_gemm(name: str, a: QuantizedRows, w8: torch.Tensor, scale_b: torch.Tensor,
                     bias: Optional[torch.Tensor], use_fast_accum: bool) -> torch.Tensor:
    """Per-token e4m3 activations ``a`` x e4m3 weight ``w8`` [n_pad, k_pad] (passed transposed, column-major) with
    float32 channel scales [1, n_pad] -> [M, n_pad] of ``a.dtype``; the bias ([n_pad], ``a.dtype``) is fused into
    the GEMM except for float32 outputs."""
    fuse_bias = a.dtype != torch.float32
    op = GemmOperands(name, Kernel.FP8_ROWWISE, a.data, w8.t(), a.scale, scale_b, bias if fuse_bias else None,
                      a.dtype)
    y = scaled_mm(op, use_fast_accum)
    return y if fuse_bias or bias is None else y + bias


def scaled_mm(op: GemmOperands, use_fast_accum: bool) -> torch.Tensor:
    """The only ``torch._scaled_mm`` call: validates ``op`` first; returns [M, N] of ``op.out_dtype``."""
    check_operands(op)
    a, b = op.a, op.b
    if op.kernel is Kernel.NVFP4_NATIVE:
        a, b = a.view(torch.float4_e2m1fn_x2), b.t().view(torch.float4_e2m1fn_x2).t()
    out = torch._scaled_mm(a, b, scale_a=op.scale_a, scale_b=op.scale_b, bias=op.bias, out_dtype=op.out_dtype,
                           use_fast_accum=use_fast_accum)
    return out[0] if isinstance(out, tuple) else out
