"""Small building blocks of the Wan2.1 DiT: norms, time embedding, CLIP projection, modulation helpers.

Dtype contract (model-spec §2.8): norms are computed in float32 and return the input's dtype; the sinusoidal time
embedding is built in float64 (float32 where the device has no float64) and returned as float32; the modulate
step and the gated residual run in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def high_precision_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (not MPS), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: ``x / sqrt(mean(x²) + eps) · weight``, normalised in float32.

    Input [..., dim] of any float dtype; output of the input's dtype (the weight is cast to it, as the reference
    multiplies the cast-back normalised tensor by its weight).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights upcast), output cast back to the input's dtype. [..., dim] -> same."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


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
    return (normed.float() * (1 + scale) + shift).to(normed.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y·gate`` in float32, returned in ``x``'s dtype. x, y [B, S, dim]; gate float32 [B, 1, dim]."""
    return (x.float() + y.float() * gate).to(x.dtype)
