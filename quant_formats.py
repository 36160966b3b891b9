"""Number formats of the quantized Linear layers (FP8 E4M3/E5M2, NVFP4, MXFP4) and the operand contract of their GEMMs.

Kernel module: imports only torch. Used by :mod:`fp8_optimization`; every function here is pure (no state).
:func:`check_operands` is the one check that runs right before every GEMM of a quantized layer.

Layouts (weights are row-major ``[N, K]`` = ``[out_features, in_features]``, blocks run along K):

* FP8: ``q`` float8 ``[N, K]``, ``scale`` float32 ``[N]``; value = ``q * scale[n]``. A per-tensor scale is the same
  number repeated.
* E2M1 (the 4-bit element of both FP4 formats): sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0..7. Two codes per byte, element ``2j`` in the LOW nibble and ``2j + 1`` in
  the high nibble (NVIDIA ``__nv_fp4x2_e2m1`` / ``torch.float4_e2m1fn_x2`` order): packed ``uint8 [N, K / 2]``.
* NVFP4: packed E2M1 ``[N, K/2]``; block scale float8_e4m3fn ``[N, K/16]`` (one per 16 values, row-major, not
  swizzled); global scale float32 ``[1]``; value = ``e2m1 * block_scale * global``. 4.5 bits per weight.
* MXFP4 (OCP MX): packed E2M1 ``[N, K/2]``; E8M0 block scale stored as its biased exponent ``uint8 [N, K/32]``;
  value = ``e2m1 * 2 ** (e - 127)``. 4.25 bits per weight.

K must already be padded to the block size (16 for FP8 and NVFP4, 32 for MXFP4).

Functions marked ``@fused`` (:mod:`compiled_kernels`) run as ``torch.compile``-generated kernels on CUDA (so a
dequantize or an activation quantization reads its input about once) and as plain eager torch on other devices.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from .compiled_kernels import fused

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
TINY = 1e-12  # floor of every scale: an all-zero row or block gets this, not 0
# Scale-code offsets tried per NVFP4 block: 0 maps the block's amax to 6; positive offsets give coarser, larger scales.
_NVFP4_SEARCH = (-2, -1, 0, 1, 2, 3, 4, 5, 6)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------- FP8

def quantize_fp8(w: torch.Tensor, dtype: torch.dtype, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (float8 ``dtype`` [N, K], float32 scale [N]); per-row amax (or one tensor amax) maps to the max."""
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    scale = amax.clamp(min=TINY) / FP8_MAX[dtype]
    q = (w / scale[:, None]).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q, scale.contiguous()


@fused()
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 [N, K] and float32 [N] -> ``dtype`` [N, K] (one rounding, from float32)."""
    return (q.float() * scale[:, None]).to(dtype)


@fused(dynamic_rows=True)
def quantize_rows_e4m3(x: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantization: [M, K] -> (e4m3 [M, K + k_pad] contiguous, float32 [M, 1]).

    Each row's amax maps to 448; the caller's tensor is never modified; padding columns are zero. On CUDA the
    row reduction and the scaling run as one generated kernel (measured faster than an eager amax followed by a
    generated scaling kernel: benchmarks/RESULTS.md).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=TINY) / FP8_MAX[E4M3]
    q = (xf / scale).clamp(-FP8_MAX[E4M3], FP8_MAX[E4M3])
    if k_pad:
        q = F.pad(q, (0, k_pad))
    return q.to(E4M3), scale


@fused(dynamic_rows=True)
def quantize_tensor_e4m3(x: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor activation quantization: [M, K] -> (e4m3 [M, K + k_pad], float32 scale of shape [])."""
    xf = x.float()
    scale = xf.abs().amax().clamp(min=TINY) / FP8_MAX[E4M3]
    q = (xf / scale).clamp(-FP8_MAX[E4M3], FP8_MAX[E4M3])
    if k_pad:
        q = F.pad(q, (0, k_pad))
    return q.to(E4M3), scale


@fused()
def e5m2_to_e4m3(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E5M2 [N, K] with float32 [N] scales -> (E4M3 [N, K], float32 [1, N]) for an E4M3 GEMM.

    Each row is multiplied by a power of two that brings its amax to at most 448, so every E5M2 value above
    E4M3's subnormal step converts exactly (E5M2 has fewer mantissa bits than E4M3).
    """
    wf = q.float()
    amax = wf.abs().amax(dim=1).clamp(min=TINY)
    factor = torch.exp2(torch.floor(torch.log2(FP8_MAX[E4M3] / amax)))
    w8 = (wf * factor[:, None]).clamp(-FP8_MAX[E4M3], FP8_MAX[E4M3]).to(E4M3)
    return w8, (scale / factor)[None, :]


# ---------------------------------------------------------------------------------------------------------- E2M1

def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale) to E2M1 codes, uint8, ties to even, saturating at 6."""
    a = v.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
           + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
           + (a > 5.0).to(torch.uint8))
    sign = ((v < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits) -> float32 values."""
    c = codes.to(torch.int32)
    e = (c >> 1) & 3
    m = (c & 1).float()
    mag = torch.where(e == 0, 0.5 * m, (2.0 + m) * torch.exp2((e - 2).float()))
    return torch.where((c & 8) != 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K even) -> uint8 [N, K/2]; element 2j in the low nibble, 2j+1 in the high nibble."""
    pairs = codes.view(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] (inverse of :func:`pack_nibbles`): code j = nibble j % 2 of byte j // 2.

    Written as one indexed expression (no stack/concat), so a generated kernel reads each byte per output element.
    """
    n, half = packed.shape
    doubled = packed[:, :, None].expand(n, half, 2).reshape(n, 2 * half)
    shift = (torch.arange(2 * half, device=packed.device) % 2 * 4).to(torch.uint8)
    return (doubled >> shift) & 0x0F


# --------------------------------------------------------------------------------------------------------- NVFP4

def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 [1]: amax / (448 * 6), so the largest block scale uses the top of the E4M3 range (1.0 for zeros)."""
    amax = w.float().abs().amax()
    return torch.where(amax > 0, amax / (FP8_MAX[E4M3] * E2M1_MAX), torch.ones_like(amax)).reshape(1)


def _lowest_error(candidates: Iterable[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Per block, the candidate ``(error, *tensors)`` with the smallest error (the first one on ties)."""
    best = None
    for candidate in candidates:
        if best is None:
            best = candidate
            continue
        better = candidate[0] < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    return best


def quantize_nvfp4(w: torch.Tensor, search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] (K % 16 == 0) -> (packed uint8 [N, K/2], e4m3 block scales [N, K/16], float32 global [1]).

    With ``search``, each block tries the E4M3 scale codes around amax / 6 and keeps the one with the smallest
    squared error (the encoding stays standard NVFP4; only the choice of scale differs).
    """
    n, k = w.shape
    blocks = w.float().view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    g = nvfp4_global_scale(w)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    base = (amax / (E2M1_MAX * g)).clamp(max=FP8_MAX[E4M3]).to(E4M3).view(torch.uint8).to(torch.int32)
    def candidate(offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        code = (base + offset).clamp(1, 126).to(torch.uint8)
        scale = code.view(E4M3).float() * g
        codes = e2m1_encode(blocks / scale)
        return ((e2m1_decode(codes) * scale - blocks) ** 2).sum(dim=-1, keepdim=True), codes, code

    _, codes, code = _lowest_error(candidate(o) for o in (_NVFP4_SEARCH if search else (0,)))
    return pack_nibbles(codes.view(n, k)), code.view(E4M3).view(n, k // NVFP4_BLOCK).contiguous(), g


def _nvfp4_values(packed: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 values times their block scale, float32 [N, K/16, 16]."""
    n = packed.shape[0]
    vals = e2m1_decode(unpack_nibbles(packed)).view(n, -1, NVFP4_BLOCK)
    return vals * block_scale.float()[..., None]


@fused()
def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 tensors -> ``dtype`` [N, K]."""
    vals = _nvfp4_values(packed, block_scale) * global_scale
    return vals.flatten(1).to(dtype)


@fused()
def nvfp4_to_e4m3(packed: torch.Tensor, block_scale: torch.Tensor,
                  global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 tensors -> (E4M3 [N, K], float32 row scales [1, N]) for an FP8 GEMM.

    The largest block scale of each row maps to 448 / 6, so the row fits E4M3 exactly in range; products of a
    3-bit and a 1-bit mantissa may round once more (about 1 % relative error on the weight).
    """
    bs = block_scale.float()
    row_max = bs.amax(dim=1).clamp(min=TINY)
    mult = (FP8_MAX[E4M3] / E2M1_MAX) / row_max
    vals = _nvfp4_values(packed, block_scale) * mult[:, None, None]
    w8 = vals.flatten(1).clamp(-FP8_MAX[E4M3], FP8_MAX[E4M3]).to(E4M3)
    return w8, (global_scale / mult)[None, :]


@fused(dynamic_rows=True)
def quantize_nvfp4_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations [M, K] (K % 16 == 0) -> NVFP4 (packed, block scales, global) with amax / 6 block scales."""
    m, k = x.shape
    blocks = x.float().view(m, k // NVFP4_BLOCK, NVFP4_BLOCK)
    g = nvfp4_global_scale(x)
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / (E2M1_MAX * g)).clamp(max=FP8_MAX[E4M3]).to(E4M3)
    codes = e2m1_encode(blocks / scale.float().clamp(min=TINY) / g)
    return pack_nibbles(codes.view(m, k)), scale.view(m, k // NVFP4_BLOCK), g


def swizzle_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """Block scales [R, C] -> the cuBLAS 1-D block-scaling layout, [round_up(R, 128), round_up(C, 4)] contiguous.

    The padded matrix is cut into 128 x 4 tiles (row-block-major); inside a tile, element (r, c) sits at
    ``(r % 32) * 16 + (r % 128) // 32 * 4 + c % 4``.
    """
    r, c = scale.shape
    rp, cp = round_up(r, 128), round_up(c, 4)
    padded = torch.zeros((rp, cp), dtype=torch.uint8, device=scale.device)
    padded[:r, :c] = scale.view(torch.uint8)
    tiles = padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp).contiguous().view(scale.dtype)


# --------------------------------------------------------------------------------------------------------- MXFP4

def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] (K % 32 == 0) -> (packed uint8 [N, K/2], E8M0 biased exponents uint8 [N, K/32]).

    Each block tries the OCP exponent floor(log2(amax)) - 2 and the next one up (which avoids clipping values
    above 6) and keeps the one with the smaller squared error.
    """
    n, k = w.shape
    blocks = w.float().view(n, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    _, exp = torch.frexp(amax)
    first = torch.where(amax > 0, exp - 1 - 2, torch.full_like(exp, -127))
    def candidate(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = e.clamp(-127, 127)
        scale = torch.exp2(e.float())
        codes = e2m1_encode(blocks / scale)
        return ((e2m1_decode(codes) * scale - blocks) ** 2).sum(dim=-1, keepdim=True), codes, e

    _, codes, exp = _lowest_error(candidate(e) for e in (first, first + 1))
    biased = (exp + 127).to(torch.uint8).view(n, k // MXFP4_BLOCK)
    return pack_nibbles(codes.view(n, k)), biased.contiguous()


@fused()
def dequantize_mxfp4(packed: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 tensors -> ``dtype`` [N, K]."""
    n = packed.shape[0]
    vals = e2m1_decode(unpack_nibbles(packed)).view(n, -1, MXFP4_BLOCK)
    scale = torch.exp2(exponents.to(torch.float32) - 127.0)
    return (vals * scale[..., None]).flatten(1).to(dtype)


# -------------------------------------------------------------------------------------- GEMM operand contract

class Kernel(str, enum.Enum):
    """What computes a quantized layer's GEMM."""

    DENSE = "dense"                    # weight dequantized to the compute dtype, F.linear
    FP8_ROWWISE = "fp8_rowwise"        # e4m3 x e4m3 _scaled_mm, scales (M, 1) per token and (1, N) per channel
    FP8_TENSORWISE = "fp8_tensorwise"  # e4m3 x e4m3 _scaled_mm, scalar scales; channel scales applied after
    NVFP4_NATIVE = "nvfp4_native"      # NVFP4 x NVFP4 _scaled_mm with swizzled 1x16 block scales (sm_100+)


@dataclass(frozen=True)
class GemmOperands:
    """Operands of one GEMM ``out = a @ b (+ bias)`` as handed to the kernel.

    a: activations [M, K] row-major (NVFP4: packed uint8 [M, K/2]); b: ``weight.t()``, the column-major [K, N] view
    of a row-major [N, K] weight; scale_a / scale_b: the recipe's scales; bias: [N] or None.
    """

    layer_name: str
    kernel: Kernel
    a: torch.Tensor
    b: torch.Tensor
    scale_a: Optional[torch.Tensor] = None
    scale_b: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    out_dtype: torch.dtype = torch.bfloat16


def _expected_scale_shapes(op: GemmOperands, m: int, k: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if op.kernel is Kernel.FP8_ROWWISE:
        return (m, 1), (1, n)
    if op.kernel is Kernel.FP8_TENSORWISE:
        return (), ()
    cols = round_up(k // NVFP4_BLOCK, 4)
    return (round_up(m, 128), cols), (round_up(n, 128), cols)


def check_operands(op: GemmOperands) -> None:
    """Raise ValueError naming the layer unless ``op`` satisfies the kernel's layout contract.

    Contract: a 2-D, contiguous, 16-byte aligned; b = w.t() of a contiguous row-major weight, 256-byte aligned on
    CUDA (16 on CPU), never made contiguous after the transpose; for ``_scaled_mm`` kernels K and N multiples of
    16, operand dtypes of the recipe, scales contiguous, 16-byte aligned, of the exact recipe shapes and dtype;
    bias [N] contiguous in the output dtype; everything on one device.
    """
    def fail(message: str) -> None:
        raise ValueError(f"{op.layer_name} ({op.kernel.value} GEMM): {message}")

    a, b = op.a, op.b
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        fail(f"operands must be activations [M, K] and a weight view [K, N]; got {tuple(a.shape)} and "
             f"{tuple(b.shape)}")
    if not a.is_contiguous():
        fail(f"activations [M, K] must be row-major contiguous, got strides {a.stride()}; reshape the input to "
             "2-D and make it contiguous before the kernel")
    if not b.t().is_contiguous():
        fail(f"the weight must be stored row-major [N, K] and passed as its .t() view, got a [K, N] operand with "
             f"strides {b.stride()} (a transposed-contiguous weight, or .contiguous() called after the transpose)")
    weight_align = 256 if b.is_cuda else 16
    for label, tensor, align in (("activation", a, 16), ("weight", b, weight_align)):
        if tensor.data_ptr() % align:
            fail(f"{label} data pointer is not {align}-byte aligned (offset {tensor.data_ptr() % align}); an offset "
                 "view of a flat buffer was passed, copy it into an aligned allocation")
    tensors = [t for t in (a, b, op.scale_a, op.scale_b, op.bias) if t is not None]
    if len({t.device for t in tensors}) != 1:
        fail(f"operands are on different devices: {sorted({str(t.device) for t in tensors})}")
    if op.bias is not None and (op.bias.shape != (b.shape[1],) or op.bias.dtype != op.out_dtype
                                or not op.bias.is_contiguous()):
        fail(f"bias must be contiguous [{b.shape[1]}] of the output dtype {op.out_dtype}, got "
             f"{tuple(op.bias.shape)} {op.bias.dtype}")
    if op.kernel is Kernel.DENSE:
        if not a.dtype == b.dtype == op.out_dtype:
            fail(f"dense GEMM needs one dtype, got a {a.dtype}, b {b.dtype}, out {op.out_dtype}")
        return
    _check_scaled(op, fail)


def _check_scaled(op: GemmOperands, fail) -> None:
    a, b = op.a, op.b
    packed = op.kernel is Kernel.NVFP4_NATIVE
    m, k, n = a.shape[0], a.shape[1] * (2 if packed else 1), b.shape[1]
    if k % 16 or n % 16:
        fail(f"K={k} and N={n} must be multiples of 16; pad the weight once at load")
    operand_dtype = torch.uint8 if packed else E4M3
    if a.dtype != operand_dtype or b.dtype != operand_dtype:
        fail(f"operands must both be {operand_dtype}, got {a.dtype} and {b.dtype}")
    if op.bias is not None and op.out_dtype == torch.float32:
        fail("a bias with float32 output is not supported by _scaled_mm; add it after the GEMM")
    scale_dtype = E4M3 if packed else torch.float32
    for label, scale, shape in zip(("scale_a", "scale_b"), (op.scale_a, op.scale_b),
                                   _expected_scale_shapes(op, m, k, n)):
        if scale is None or tuple(scale.shape) != shape or scale.dtype != scale_dtype:
            got = None if scale is None else (tuple(scale.shape), scale.dtype)
            fail(f"{label} must be {scale_dtype} of shape {shape}, got {got}")
        if not scale.is_contiguous() or scale.data_ptr() % 16:
            fail(f"{label} must be contiguous and 16-byte aligned (a sliced scale vector gives wrong results)")


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64 (inf when y has non-finite values)."""
    y64, r64 = y.double(), ref.double()
    if not torch.isfinite(y64).all():
        return math.inf
    return float((y64 - r64).norm() / r64.norm().clamp(min=TINY))
