"""Spatial tiling for the Wan2.1 VAE: overlapping tiles run one by one and blended linearly in the overlaps.

Tiles are planned on the latent grid (the only grid where encoder and decoder tiles line up); sizes are given in
pixels, like the ``tile_x / tile_y / tile_stride_x / tile_stride_y`` widgets of the upstream encode/decode nodes.
Blending weights are separable linear ramps over each overlap, normalised so that they sum to 1 at every position.
Tiles run one after the other over all frames (each with its own causal state), so the working set is one tile's.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

Span = tuple[int, int]


@dataclass(frozen=True)
class TileSpec:
    """Tile size and stride in pixels (upstream defaults 272 / 272 / 144 / 128); a stride must be below its tile."""

    tile_x: int = 272
    tile_y: int = 272
    stride_x: int = 144
    stride_y: int = 128

    def __post_init__(self) -> None:
        for axis in ("x", "y"):
            tile, stride = getattr(self, f"tile_{axis}"), getattr(self, f"stride_{axis}")
            if stride <= 0 or tile <= stride:
                raise ValueError(f"VAE tiling: tile_{axis} ({tile}) must be larger than tile_stride_{axis} ({stride}) "
                                 "and the stride positive; raise the tile size or lower the stride")

    def grid(self, height: int, width: int, spatial_stride: int) -> "TileGrid":
        """Plan tiles over a latent grid of ``height`` x ``width`` (pixel sizes divided by ``spatial_stride``)."""
        tile_h, stride_h = _latent_units(self.tile_y, self.stride_y, spatial_stride, "y")
        tile_w, stride_w = _latent_units(self.tile_x, self.stride_x, spatial_stride, "x")
        return TileGrid(height, width, tile_spans(height, tile_h, stride_h), tile_spans(width, tile_w, stride_w))


def _latent_units(tile: int, stride: int, spatial_stride: int, axis: str) -> tuple[int, int]:
    tile_l, stride_l = tile // spatial_stride, stride // spatial_stride
    if stride_l < 1 or tile_l <= stride_l:
        raise ValueError(f"VAE tiling: tile_{axis} {tile} / tile_stride_{axis} {stride} pixels give {tile_l} / "
                         f"{stride_l} latent cells (÷{spatial_stride}); the tile must cover more cells than the "
                         f"stride and the stride at least one: use multiples of {spatial_stride} with tile > stride")
    return tile_l, stride_l


def tile_spans(size: int, tile: int, stride: int) -> tuple[Span, ...]:
    """Half-open spans of length ``tile`` covering [0, size), evenly spread with steps <= ``stride``."""
    if size <= tile:
        return ((0, size),)
    count = math.ceil((size - tile) / stride) + 1
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return tuple((start, start + tile) for start in starts)


def _axis_weights(spans: tuple[Span, ...], unit: int, device: torch.device) -> list[torch.Tensor]:
    """Per-span float32 weights at resolution ``unit`` per cell: linear ramps over overlaps, summing to 1."""
    raw = []
    for i, (start, end) in enumerate(spans):
        pos = torch.arange((end - start) * unit, dtype=torch.float32, device=device) + 0.5
        weight = torch.ones_like(pos)
        if i > 0 and spans[i - 1][1] > start:
            weight = weight * (pos / ((spans[i - 1][1] - start) * unit)).clamp(max=1.0)
        if i + 1 < len(spans) and spans[i + 1][0] < end:
            weight = weight * (pos.flip(0) / ((end - spans[i + 1][0]) * unit)).clamp(max=1.0)
        raw.append(weight)
    total = torch.zeros(spans[-1][1] * unit, dtype=torch.float32, device=device)
    for (start, end), weight in zip(spans, raw):
        total[start * unit:end * unit] += weight
    return [weight / total[start * unit:end * unit] for (start, end), weight in zip(spans, raw)]


@dataclass(frozen=True)
class TileGrid:
    """Tiles on a latent grid: row spans ``ys`` and column spans ``xs`` (half-open, latent cells)."""

    height: int
    width: int
    ys: tuple[Span, ...]
    xs: tuple[Span, ...]

    @property
    def tiles(self) -> list[tuple[Span, Span]]:
        """All (row span, column span) pairs, row-major."""
        return list(itertools.product(self.ys, self.xs))

    def weights(self, unit: int, device: torch.device) -> list[torch.Tensor]:
        """Blend weights per tile, float32 [h * unit, w * unit] on ``device``; they sum to 1 over the frame."""
        wy, wx = _axis_weights(self.ys, unit, device), _axis_weights(self.xs, unit, device)
        return [a[:, None] * b[None, :] for a, b in itertools.product(wy, wx)]


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: TileGrid, in_unit: int,
                out_unit: int) -> torch.Tensor:
    """Run ``fn`` on one tile at a time (all frames) and blend: peak memory is one tile's, plus the output.

    ``x``: [B, C, F, H, W] with H, W = ``grid`` sizes times ``in_unit``; ``fn`` maps a tile of h x w cells to
    [B, C', F', h * out_unit, w * out_unit] with fresh causal state per call. Returns float32 [B, C', F', H', W'].
    """
    out = None
    weights = grid.weights(out_unit, x.device)
    for index, ((y0, y1), (x0, x1)) in enumerate(grid.tiles):
        part = fn(x[..., y0 * in_unit:y1 * in_unit, x0 * in_unit:x1 * in_unit])
        if out is None:
            out = part.new_zeros(*part.shape[:3], grid.height * out_unit, grid.width * out_unit, dtype=torch.float32)
        out[..., y0 * out_unit:y1 * out_unit, x0 * out_unit:x1 * out_unit] += part.float() * weights[index]
    return out
