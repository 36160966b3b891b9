"""Rotary position embeddings (model-spec §2.4).

Layout: the head dim is used as adjacent (real, imaginary) pairs — element 2i is the real part, 2i+1 the imaginary
part of pair i (interleaved, not half-split). Tables are [..., S, head_dim/2] float32 cos/sin; angles are computed in
float64 where the device supports it. :func:`apply_rope` rotates in float32 and returns float32, or the given dtype
through ``layers.per_token`` (one generated kernel on CUDA, token chunks elsewhere); :func:`norm_and_rotate` is the
self-attention's q/k RMSNorm and RoPE as one such step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layers import WanRMSNorm, high_precision_dtype, per_token, rms_norm_math

ROPE_THETA = 10000.0


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Pairs per axis (frame, row, column): 22/21/21 for head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


@dataclass(frozen=True)
class RopeTable:
    """cos / sin of the rotation angle per token and pair, float32, shape [..., S, head_dim/2]."""

    cos: torch.Tensor
    sin: torch.Tensor


def _axis_angles(n: int, pairs: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n, pairs] angles pos·θ^(-2j/D) with D = 2·pairs."""
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, 2 * pairs, 2, device=device, dtype=dtype).div(2 * pairs))
    return torch.outer(torch.arange(n, device=device, dtype=dtype), inv)


def rope_table_3d(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> RopeTable:
    """Table for a (frames, rows, cols) token grid in frame-major order; [S, head_dim/2] with S = F·H·W."""
    f, h, w = grid
    dtype = high_precision_dtype(device)
    pt, ph, pw = rope_axis_pairs(head_dim)
    angles = torch.cat([
        _axis_angles(f, pt, device, dtype)[:, None, None, :].expand(f, h, w, pt),
        _axis_angles(h, ph, device, dtype)[None, :, None, :].expand(f, h, w, ph),
        _axis_angles(w, pw, device, dtype)[None, None, :, :].expand(f, h, w, pw),
    ], dim=-1).reshape(f * h * w, pt + ph + pw)
    return RopeTable(cos=torch.cos(angles).float(), sin=torch.sin(angles).float())


def rope_table_1d(positions: torch.Tensor, head_dim: int) -> RopeTable:
    """Table for arbitrary (fractional) 1-D positions [..., S] -> [..., S, head_dim/2], all in float32.

    inv_freq_j = 10000^(-2j/head_dim), as the InfiniteTalk audio attention computes it.
    """
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=positions.device,
                                               dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = positions.float()[..., None] * inv
    return RopeTable(cos=angles.cos(), sin=angles.sin())


def apply_rope(x: torch.Tensor, table: RopeTable, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, S, H, D] by the table ([S, D/2] or [B, S, D/2]).

    Returns float32 [B, S, H, D]; with ``dtype``, the same values cast to ``dtype``, computed per token (no
    full-size float32 copy of x).
    """
    if dtype is None:
        return _rotate(x, table.cos, table.sin)
    heads = tuple(x.shape[-2:])
    return per_token(_rotate_flat, x.flatten(-2), rows=(table.cos, table.sin), consts=(heads, dtype),
                     dtype=dtype).unflatten(-1, heads)


def norm_and_rotate(norm: WanRMSNorm, x: torch.Tensor, table: RopeTable, heads: tuple[int, int]) -> torch.Tensor:
    """``apply_rope(norm(x).unflatten(-1, heads), table, x.dtype)`` (same values) as one per-token step:
    x [B, S, H·D] -> [B, S, H, D] of x's dtype."""
    if norm.native:
        return apply_rope(norm(x).unflatten(-1, heads), table, x.dtype)
    return per_token(_norm_rotate_flat, x, rows=(table.cos, table.sin),
                     consts=(norm.weight.to(x.dtype), norm.eps, heads)).unflatten(-1, heads)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


def _rotate_flat(rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int],
                 dtype: torch.dtype) -> torch.Tensor:
    return _rotate(rows.unflatten(-1, heads), cos, sin).flatten(-2).to(dtype)


def _norm_rotate_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor, eps: float,
                      heads: tuple[int, int]) -> torch.Tensor:
    return _rotate_flat(rms_norm_math(x, weight, eps), cos, sin, heads, x.dtype)
