"""Small building blocks of the Wan2.1 DiT: norms, time embedding, CLIP projection, modulation helpers.

Dtype contract (model-spec §2.8): norms are computed in float32 and return the input's dtype; the sinusoidal time
embedding is built in float64 (float32 where the device has no float64) and returned as float32; the modulate
step and the gated residual run in float32.

Speed and memory: every float32 step is per token and goes through :func:`per_token`. On CUDA (with Triton) a
step is one generated kernel over the whole tensor (``compiled_kernels.fused``): it reads its inputs once, keeps
the float32 values in registers and writes the output dtype; a norm and the modulation after it, or the q/k
RMSNorm and the RoPE after it, are one kernel. Elsewhere :func:`by_token_chunks` runs the same expression eagerly
over chunks of :data:`TOKEN_CHUNK` tokens. Either way no full-size float32 copy of an activation exists (a
[32760, 5120] one is 0.67 GB); the chunked results equal the unchunked expressions bit for bit. When the Linears
reading a step's result run the fp8 row-wise GEMM (fp8 ``_fast``), the LayerNorm steps and the FFN's GELU return it
quantized per token for them (``QuantizedRows``), made in the same pass by ``quant_triton`` on the GPU.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled_kernels import fused, runs_compiled
from ..fp8_optimization import takes_quantized_rows
from ..quant_gemm import QuantizedRows, quantized_output


TOKEN_CHUNK = 4096


def by_token_chunks(fn: Callable[..., torch.Tensor], dtype: torch.dtype, x: torch.Tensor,
                    *rows: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``fn(x, *rows).to(dtype)`` for a per-token ``fn`` of tensors [..., S, C] (dim -2 = tokens; ``rows`` have x's
    token count), computed over chunks of ``chunk`` (default :data:`TOKEN_CHUNK`) tokens into one output
    [..., S, C_out] of ``dtype``."""
    chunk = chunk or TOKEN_CHUNK
    tokens = x.shape[-2] if x.dim() >= 2 else 0
    if tokens <= chunk:
        return fn(x, *rows).to(dtype)
    out = None
    for start in range(0, tokens, chunk):
        part = fn(*(t[..., start:start + chunk, :] for t in (x, *rows)))
        if out is None:
            out = torch.empty((*part.shape[:-2], tokens, part.shape[-1]), dtype=dtype, device=part.device)
        out[..., start:start + part.shape[-2], :] = part
    return out


def per_token(math: Callable[..., torch.Tensor], x: torch.Tensor, rows: tuple[torch.Tensor, ...] = (),
              consts: tuple = (), dtype: Optional[torch.dtype] = None,
              consumers: Sequence[nn.Module] = ()) -> Union[torch.Tensor, QuantizedRows]:
    """``math(x, *rows, *consts)`` for a per-token ``math`` that returns ``dtype`` (default x's); ``rows`` are
    tensors with x's token dim (-2), ``consts`` anything broadcast over the tokens. One generated kernel where
    ``compiled_kernels.runs_compiled(x)``, else :func:`by_token_chunks`. When the Linears ``consumers`` (the
    result's only users) run the fp8 row-wise GEMM (``fp8_optimization.takes_quantized_rows``), the result comes
    quantized for them (``QuantizedRows``), in one pass where ``quant_triton`` has the step
    (:data:`_QUANTIZING_KERNELS`)."""
    if consumers and takes_quantized_rows(consumers, x):
        return quantized_output(math, x, *rows, *consts, kernel=_QUANTIZING_KERNELS.get(math))
    if runs_compiled(x):
        return _generated(math)(x, *rows, *consts)
    return by_token_chunks(lambda *parts: math(*parts, *consts), dtype or x.dtype, x, *rows)


@functools.cache
def _generated(math: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return fused(dynamic_rows=True)(math)


def high_precision_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (not MPS), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: ``x / sqrt(mean(x²) + eps) · weight``, normalised in float32.

    Input [..., dim] of any float dtype; output of the input's dtype (the weight is cast to it, as the reference
    multiplies the cast-back normalised tensor by its weight). With ``native`` set (the loader's
    ``rms_norm_function=pytorch``) it runs ``torch.nn.functional.rms_norm`` instead: one fused kernel with no
    float32 copy of x, numerics slightly different from the reference (the weight multiplies before the cast).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps, self.native = eps, False
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        return per_token(rms_norm_math, x, consts=(self.weight.to(x.dtype), self.eps))


def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm of x [..., dim]: normalised in float32, cast to x's dtype, times ``weight`` (x's
    dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights upcast), output cast back to the input's dtype. [..., dim] -> same."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, consumers: Sequence[nn.Module] = ()) -> Union[torch.Tensor, QuantizedRows]:
        """x [..., dim] -> x's dtype (quantized for ``consumers`` that take it, see :func:`per_token`)."""
        return per_token(_layer_norm_math, x, consts=self._affine(), consumers=consumers)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  consumers: Sequence[nn.Module] = ()) -> Union[torch.Tensor, QuantizedRows]:
        """``modulate(self(x), shift, scale)`` (same values) as one step: x [B, S, dim]; shift/scale float32
        [B, 1, dim]; returns x's dtype (quantized for ``consumers`` that take it, see :func:`per_token`)."""
        return per_token(_norm_modulate_math, x, consts=(*self._affine(), shift, scale), consumers=consumers)

    def _affine(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return weight, bias, self.eps


def _layer_norm_math(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)


def _modulate_math(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (normed.float() * (1 + scale) + shift).to(normed.dtype)


def _norm_modulate_math(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _modulate_math(_layer_norm_math(x, weight, bias, eps), shift, scale)


def _gated_residual_math(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (y.float() * gate + x).to(x.dtype)


class MLPProj(nn.Module):
    """CLIP token projection ``img_emb``: LayerNorm → Linear → GELU(erf) → Linear → LayerNorm (eps 1e-5).

    Input [B, N, in_dim]; output [B, N, out_dim] of the input's dtype. Keys ``proj.0`` … ``proj.4``.
    """

    def __init__(self, in_dim: int, out_dim: int, linear: type, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, eps=1e-5, elementwise_affine=True, device=device, dtype=dtype),
            linear(in_dim, in_dim, device=device, dtype=dtype),
            nn.GELU(),
            linear(in_dim, out_dim, device=device, dtype=dtype),
            WanLayerNorm(out_dim, eps=1e-5, elementwise_affine=True, device=device, dtype=dtype))

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_tokens)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep embedding [B] -> [B, dim] float32: ``[cos(t·ω), sin(t·ω)]``, ω_j = 10000^(-j/half), cos first."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    half = dim // 2
    hp = high_precision_dtype(position.device)
    pos = position.to(hp)
    omega = torch.pow(10000, -torch.arange(half, device=position.device, dtype=hp).div(half))
    angles = torch.outer(pos, omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``normed·(1 + scale) + shift`` in float32, returned in ``normed``'s dtype.

    normed [B, S, dim]; shift/scale float32 [B, 1, dim].
    """
    return per_token(_modulate_math, normed, consts=(shift, scale))


class FeedForward(nn.Sequential):
    """The block's FFN: ``0`` Linear dim -> ffn_dim, ``1`` GELU (tanh), ``2`` Linear ffn_dim -> dim.

    x [..., dim] (or its QuantizedRows, made for ``0``) -> [..., dim]. When ``2`` runs the fp8 row-wise GEMM the
    GELU output comes quantized for it, in one ``quant_triton`` pass (see :func:`per_token`); the GELU math is the
    same.
    """

    def forward(self, x: Union[torch.Tensor, QuantizedRows]) -> torch.Tensor:
        up, act, down = self
        hidden = up(x)
        if takes_quantized_rows((down,), hidden):
            kernel = "gelu_e4m3" if act.approximate == "tanh" else None
            return down(quantized_output(_gelu_math, hidden, act.approximate, kernel=kernel))
        return down(act(hidden))


def _gelu_math(hidden: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(hidden.float(), approximate=approximate).to(hidden.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y·gate`` in float32, returned in ``x``'s dtype. x, y [B, S, dim]; gate float32 [B, 1, dim]."""
    return per_token(_gated_residual_math, x, rows=(y,), consts=(gate,))


def summed(parts: Sequence[torch.Tensor], consumers: Sequence[nn.Module] = ()) -> Union[torch.Tensor, QuantizedRows]:
    """The sum of ``parts`` ([..., S, C] of one shape and dtype) in their dtype; when the Linears ``consumers`` run
    the fp8 row-wise GEMM (``fp8_optimization.takes_quantized_rows``), quantized for them in the same pass
    (``quant_triton.sum_e4m3`` on the GPU)."""
    if len(parts) > 1 and consumers and takes_quantized_rows(consumers, parts[0]):
        return quantized_output(_sum_math, *parts, kernel="sum_e4m3")
    return _sum_math(*parts)


def _sum_math(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    for other in others:
        x = x + other
    return x


# per-token steps whose quantized output one quant_triton kernel makes from the same arguments
_QUANTIZING_KERNELS = {_layer_norm_math: "layer_norm_e4m3", _norm_modulate_math: "layer_norm_e4m3"}


def use_native_rms_norm(model: nn.Module, enabled: bool) -> None:
    """Switch every :class:`WanRMSNorm` of ``model`` to ``torch.nn.functional.rms_norm`` (``enabled``) or back to
    the reference formula (the loader's ``rms_norm_function``: ``pytorch`` / ``default``)."""
    for module in model.modules():
        if isinstance(module, WanRMSNorm):
            module.native = enabled
