"""Triton kernels that make the fp8 row-wise GEMM's input inside the op producing it (a helper module of
:mod:`fp8_optimization`, imported only where Triton runs).

One program per token row reads the row once, computes the producing op in float32, rounds it to the activations'
dtype (as the unfused op's output would be), and writes it quantized per token as
``quant_formats.quantize_rows_e4m3`` does: scale = max(|row|, 1e-12) / 448, e4m3 = round(clamp(row · (1 / scale)))
(a multiply by the reciprocal, not a division: an exact division costs more than the rest of the pass).
So the unquantized activation is never written to memory.

    layer_norm_e4m3(x, weight, bias, eps, shift=None, scale=None) -> (e4m3 [M, C], float32 [M, 1])
        LayerNorm over C (float32 weight/bias [C] or None), rounded; with shift/scale (float32 [B, 1, C]) then
        ``·(1 + scale) + shift``, rounded again. x [B, S, C] bf16/fp16 with a contiguous last dim; M = B·S.
    gelu_e4m3(x, approximate) -> (e4m3 [M, C], float32 [M, 1])
        GELU with the tanh approximation of x [..., C] (contiguous rows), rounded.
    sum_e4m3(x, *others) -> (e4m3 [M, C], float32 [M, 1])
        x + others (each [..., C] of x's shape and dtype: the cross-attention's text and image outputs), rounded.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .quant_formats import E4M3
from .quant_formats import FP8_MAX as FORMAT_MAX
from .quant_formats import TINY as SCALE_FLOOR

FP8_MAX = tl.constexpr(FORMAT_MAX[E4M3])  # the same scale rule as quant_formats.quantize_rows_e4m3
TINY = tl.constexpr(SCALE_FLOOR)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _store_quantized(y, cols, mask, Out, OutScale, row, C):
    """Row ``row`` of float32 values y [BLOCK] (real where mask) -> e4m3 Out[row, :C] and OutScale[row]."""
    scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), 0), TINY) / FP8_MAX
    q = tl.minimum(tl.maximum(y * (1.0 / scale), -FP8_MAX), FP8_MAX)
    tl.store(Out + row.to(tl.int64) * C + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(OutScale + row, scale)


@triton.jit
def _layer_norm_e4m3(X, W, Bias, Shift, Scale, Out, OutScale, S, C, sxb, sxs, eps, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK: tl.constexpr):
    """Program r (token s = r % S of batch b = r // S) of X [B, S, C] (strides sxb, sxs, 1)."""
    row = tl.program_id(0)
    b, s = row // S, row % S
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + b.to(tl.int64) * sxb + s.to(tl.int64) * sxs + cols, mask=mask, other=0.0).to(tl.float32)
    centered = tl.where(mask, x - tl.sum(x, 0) / C, 0.0)
    y = centered * tl.math.rsqrt(tl.sum(centered * centered, 0) / C + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0)
    if HAS_B:
        y = y + tl.load(Bias + cols, mask=mask, other=0.0)
    y = y.to(X.dtype.element_ty).to(tl.float32)
    if HAS_MOD:
        mod = b * C + cols
        y = y * (1.0 + tl.load(Scale + mod, mask=mask, other=0.0)) + tl.load(Shift + mod, mask=mask, other=0.0)
        y = y.to(X.dtype.element_ty).to(tl.float32)
    _store_quantized(y, cols, mask, Out, OutScale, row, C)


@triton.jit
def _gelu_tanh_e4m3(X, Out, OutScale, C, BLOCK: tl.constexpr):
    """Program r: row r of X [M, C] (contiguous)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + row.to(tl.int64) * C + cols, mask=mask, other=0.0).to(tl.float32)
    z = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    t = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: no overflow
    tanh_abs = (1.0 - t) / (1.0 + t)
    y = (0.5 * x * (1.0 + tl.where(z >= 0, tanh_abs, -tanh_abs))).to(X.dtype.element_ty).to(tl.float32)
    _store_quantized(y, cols, mask, Out, OutScale, row, C)


@triton.jit
def _sum_e4m3(X, Y, Out, OutScale, C, BLOCK: tl.constexpr):
    """Program r: row r of X + Y (both [M, C], contiguous)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    offsets = row.to(tl.int64) * C + cols
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    y = (x + tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
    _store_quantized(y, cols, mask, Out, OutScale, row, C)


def _outputs(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def _warps(block: int) -> int:
    """Warps per row program, the fastest measured on an H100 (benchmarks/producer_quant_bench.py): 4 for rows up
    to 8192 elements (dim 5120), 16 above (the FFN's 13824)."""
    return 4 if block <= 8192 else 16


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device; the interpreter runs CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def layer_norm_e4m3(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                    num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. x [B, S, C] (or [S, C]) with stride 1 in C (other strides free); ``num_warps``
    overrides the tuned value (benchmarks)."""
    if x.dim() == 2:
        x = x[None]
    b, s, c = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    data, row_scale = _outputs(b * s, c, x.device)
    if b * s == 0:
        return data, row_scale
    shift, scale = (t.expand(b, 1, c).contiguous() if t is not None else None for t in (shift, scale))
    block = triton.next_power_of_2(c)
    with _on(x.device):
        _layer_norm_e4m3[(b * s,)](x, weight, bias, shift, scale, data, row_scale, s, c, x.stride(0), x.stride(1),
                                   eps, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=shift is not None,
                                   BLOCK=block, num_warps=num_warps or _warps(block))
    return data, row_scale


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.is_contiguous() else rows.contiguous()


def _row_kernel(kernel, rows: tuple[torch.Tensor, ...],
                num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel`` (one program per row, arguments: the input rows, Out, OutScale, C, BLOCK) over ``rows`` ([M, C]
    contiguous each) -> (e4m3 [M, C], float32 [M, 1])."""
    m, c = rows[0].shape
    data, row_scale = _outputs(m, c, rows[0].device)
    if m:
        block = triton.next_power_of_2(c)
        with _on(rows[0].device):
            kernel[(m,)](*rows, data, row_scale, c, BLOCK=block, num_warps=num_warps or _warps(block))
    return data, row_scale


def sum_e4m3(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring (more than one other: all but the last are added first, as the unfused sum)."""
    for other in others[:-1]:
        x = x + other
    return _row_kernel(_sum_e4m3, (_contiguous_rows(x), _contiguous_rows(others[-1])))


def gelu_e4m3(x: torch.Tensor, approximate: str, num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; ``approximate`` must be "tanh" (the FFN's GELU); ``num_warps`` overrides the tuned
    value (benchmarks)."""
    if approximate != "tanh":
        raise ValueError(f"gelu_e4m3 implements GELU with approximate='tanh', got {approximate!r}")
    return _row_kernel(_gelu_tanh_e4m3, (_contiguous_rows(x),), num_warps)
