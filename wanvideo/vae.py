"""Wan2.1 causal 3-D video VAE (z_dim 16, stride 4 x 8 x 8) with chunked causal caching and optional spatial tiling.

Module attribute names equal the keys of the official ``Wan2.1_VAE.pth`` (``encoder.*``, ``decoder.*``, ``conv1``,
``conv2``), so loading is "strip the ``model.`` prefix, strict ``load_state_dict``".

Layouts: video [B, 3, F, H, W] in [-1, 1] with F = 1 + 4k <-> normalised latents float32
[B, 16, 1 + (F - 1) // 4, H / 8, W / 8], ``latent = (mu - mean) * (1 / std)`` with the Wan2.1 constants.
The encoder runs on frame 0 alone, then on groups of 4 frames; the decoder one latent frame at a time. Every
temporal layer keeps the input frames the next chunk needs in a :class:`CausalCache`, so memory does not grow with
the video length and the result equals the full-sequence math exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..attention import AttentionBackend, AttentionMode, resolve
from .vae_tiling import TileGrid, TileSpec, tiled_apply

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN21_Z_DIM = 16
WAN22_Z_DIM = 48
# lightx2v "lightVAE": every width of the Wan2.1 VAE pruned by 0.75, so the decoder starts at 384 * 0.25 = 96 channels.
LIGHTVAE_DECODER_WIDTH = 96
PRECISIONS = ("fp16", "fp32", "bf16")


def parse_precision(precision: Union[str, torch.dtype]) -> torch.dtype:
    """The VAE loader's ``precision`` choice ("fp16" / "fp32" / "bf16") or a torch dtype -> torch dtype."""
    if isinstance(precision, torch.dtype):
        if precision not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"VAE precision {precision} is not supported; use float32, bfloat16 or float16")
        return precision
    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"unknown VAE precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return dtypes[precision]


# --------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE hyper-parameters (real model: dim 96, z_dim 16, dim_mult (1, 2, 4, 4), 2 res blocks)."""

    dim: int = 96
    z_dim: int = WAN21_Z_DIM
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along H and W (8 for the real model)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        """Frames per latent frame after the first (4 for the real model); also the encoder's chunk length."""
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Union[torch.Tensor, Sequence[int]]]) -> "VAEConfig":
        """Infer the config from key names and shapes (tensors or shape tuples) of an unprefixed VAE state dict."""
        shapes = _shapes(state_dict)
        check_wan21_vae(shapes)
        dim = shapes["encoder.conv1.weight"][0]
        decoder_out = shapes.get("decoder.head.0.gamma", (None,))[0]
        if decoder_out != dim:
            raise ValueError(f"VAE decoder width {decoder_out} does not match encoder width {dim}: a pruned or mixed "
                             "VAE file, not supported; use the original Wan2.1 VAE (Wan2_1_VAE_*.safetensors)")
        stages, temporal = _encoder_stages(shapes)
        counts = {len(stage) for stage in stages}
        if len(counts) != 1 or any(out % dim for out in (stage[-1] for stage in stages)):
            raise ValueError(f"unexpected Wan VAE encoder layout (res blocks per stage {sorted(counts)}, widths "
                             f"{[stage[-1] for stage in stages]}, base {dim}); the file is not a Wan2.1 VAE")
        return cls(dim=dim, z_dim=shapes["conv2.weight"][0], dim_mult=tuple(stage[-1] // dim for stage in stages),
                   num_res_blocks=counts.pop(), temporal_downsample=tuple(temporal))


def _shapes(state_dict: Mapping[str, Union[torch.Tensor, Sequence[int]]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}


def _encoder_stages(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[list[int]], list[bool]]:
    """Walk ``encoder.downsamples.N``: output widths of the res blocks per stage, and each resample's temporal flag."""
    indices = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
    stages: list[list[int]] = [[]]
    temporal: list[bool] = []
    for index in indices:
        prefix = f"encoder.downsamples.{index}."
        if prefix + "residual.2.weight" in shapes:
            stages[-1].append(shapes[prefix + "residual.2.weight"][0])
        elif prefix + "resample.1.weight" in shapes:
            temporal.append(prefix + "time_conv.weight" in shapes)
            stages.append([])
        else:
            keys = sorted(k for k in shapes if k.startswith(prefix))
            raise ValueError(f"unsupported VAE block {prefix}* (keys {keys}); attention in the down path is not "
                             "part of the Wan2.1 VAE")
    if not all(stages):
        raise ValueError("unexpected Wan VAE encoder layout: a stage without residual blocks")
    return stages, temporal


def check_wan21_vae(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise a ValueError naming the problem unless ``shapes`` (key -> shape) look like a Wan2.1 VAE state dict."""
    missing = [part for part in ("encoder.", "decoder.") if not any(k.startswith(part) for k in shapes)]
    if missing:
        sample = ", ".join(sorted(shapes)[:4])
        raise ValueError(f"not a VAE file: no {' / '.join(p + '*' for p in missing)} tensors (first keys: {sample}). "
                         "Select the Wan2.1 VAE (Wan2_1_VAE_bf16.safetensors or Wan2.1_VAE.pth)")
    for key in ("conv2.weight", "conv1.weight", "encoder.conv1.weight"):
        if key not in shapes:
            raise ValueError(f"VAE file lacks {key!r}: not a Wan2.1 VAE (the original layout has encoder.*, "
                             "decoder.*, conv1.*, conv2.*)")
    z_dim = shapes["conv2.weight"][0]
    if z_dim == WAN22_Z_DIM:
        raise ValueError("this is a Wan2.2 VAE (48 latent channels); InfiniteTalk runs on Wan2.1 latents "
                         "(16 channels): select the Wan2.1 VAE (Wan2_1_VAE_bf16.safetensors)")
    if z_dim != WAN21_Z_DIM:
        raise ValueError(f"VAE with {z_dim} latent channels is not a Wan2.1 VAE (16 channels); select "
                         "Wan2_1_VAE_bf16.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# layers


class CausalCache:
    """Per-run state of a chunked encode or decode: for each temporal layer, what the next chunk needs."""

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()

    def frames(self, layer: nn.Module) -> Optional[torch.Tensor]:
        return self._frames.get(layer)

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[layer] = frames

    def start(self, layer: nn.Module) -> bool:
        """True on the first call for ``layer`` (its input starts with frame 0), False afterwards."""
        first = layer not in self._started
        self._started.add(layer)
        return first


class CausalConv3d(nn.Conv3d):
    """3-D conv, causal in time: k_t - 1 past frames (zeros at the start, else the previous chunk's) and
    symmetric zero padding in H and W. [B, C, f, H, W] -> [B, C', f, H, W]."""

    def __init__(self, in_dim: int, out_dim: int, kernel: Union[int, tuple[int, int, int]]) -> None:
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(in_dim, out_dim, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.time_pad:
            past = cache.frames(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            cache.keep(self, x[:, :, -self.time_pad:].clone())
        return super().forward(x)


class RMSNorm(nn.Module):
    """``normalize(x, dim=1) * sqrt(C) * gamma`` over the channel dim of [B, C, ...]; gamma [C, 1, 1(, 1)]."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D layer to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = layer(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv2(SiLU(RMS2(conv1(SiLU(RMS1(x))))))``; shortcut is a 1x1x1 conv when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = self.shortcut(x, cache) if isinstance(self.shortcut, CausalConv3d) else x
        return _run(self.residual, x, cache) + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (head dim = C), plus the input."""

    def __init__(self, dim: int, attention: AttentionBackend) -> None:
        super().__init__()
        self.attention = attention
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        qkv = self.to_qkv(frames).reshape(b * t, 3, c, h * w).transpose(2, 3).unsqueeze(3)  # [bt, 3, hw, 1, c]
        out = self.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        out = self.proj(out.squeeze(2).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """x2 spatial down/up-sampling, optionally with the temporal x2 step (``time_conv``) and its frame-0 rule."""

    def __init__(self, dim: int, up: bool, temporal: bool) -> None:
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.up:
            if self.temporal:
                x = self._upsample_time(x, cache)
            return _per_frame(self.resample, x)
        x = _per_frame(self.resample, x)
        return self._downsample_time(x, cache) if self.temporal else x

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Frame 0 passes unchanged; output j >= 1 = time_conv over input frames 2j-2 .. 2j (no padding)."""
        outputs = []
        pending = cache.frames(self)
        if pending is None:
            outputs.append(x[:, :, :1])
            seq = x
        else:
            seq = torch.cat([pending, x], dim=2)
        count = (seq.shape[2] - 1) // 2
        if count:
            outputs.append(self.time_conv(seq[:, :, :2 * count + 1]))
        cache.keep(self, seq[:, :, 2 * count:].clone())
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Frame 0 passes unchanged; frames 1.. go through the causal time_conv (which never sees frame 0), each
        output frame's 2C channels becoming two frames (channels [0:C] the earlier one)."""
        head = None
        if cache.start(self):
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            y = self.time_conv(x, cache)
            b, c2, t, h, w = y.shape
            x = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return x if head is None else torch.cat([head, x], dim=2)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


class Encoder3d(nn.Module):
    """[B, 3, f, H, W] -> [B, 2 * z_dim, f', H / s, W / s] (mu | log_var before ``conv1``), one causal chunk."""

    def __init__(self, config: VAEConfig, attention: AttentionBackend) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1,) + config.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(config.dim_mult) - 1:
                blocks.append(Resample(out_dim, up=False, temporal=config.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*blocks)
        width = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(width, width), AttentionBlock(width, attention),
                                    ResidualBlock(width, width))
        self.head = nn.Sequential(RMSNorm(width, images=False), nn.SiLU(),
                                  CausalConv3d(width, config.z_dim * 2, 3))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _run(layers, x, cache)
        return x


class Decoder3d(nn.Module):
    """[B, z_dim, t, h, w] -> [B, 3, t', h * s, w * s] (before the clamp), one causal chunk."""

    def __init__(self, config: VAEConfig, attention: AttentionBackend) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1],) + tuple(reversed(mult))]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0], attention),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the previous stage's up-resample halved the width
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                blocks.append(Resample(out_dim, up=True, temporal=config.temporal_upsample[i]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _run(layers, x, cache)
        return x


# --------------------------------------------------------------------------------------------------------------------
# the model


def _latent_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) float32 [1, 16, 1, 1, 1] on ``device``."""
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, inv_std


def pad_to_causal_length(video: torch.Tensor, temporal_stride: int = 4) -> torch.Tensor:
    """Video [B, 3, F, H, W] -> [B, 3, 1 + k·stride, H, W] with the smallest such length >= F, repeating the last
    frame (the causal encoder takes 1 + 4k frames)."""
    frames = video.shape[2]
    target = 1 + -(-(frames - 1) // temporal_stride) * temporal_stride
    if target == frames:
        return video
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, target - frames, -1, -1)], dim=2)


def normalise_latents(mu: torch.Tensor) -> torch.Tensor:
    """Raw mu [B, 16, T, h, w] (any dtype) -> float32 ``(mu - mean) * (1 / std)``."""
    mean, inv_std = _latent_stats(mu.device)
    return (mu.float() - mean) * inv_std


def denormalise_latents(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, T, h, w] -> float32 ``latents / (1 / std) + mean`` (the decoder's input)."""
    mean, inv_std = _latent_stats(latents.device)
    return latents.float() / inv_std + mean


class WanVAE(nn.Module):
    """Wan2.1 video VAE. ``encode``: video -> normalised float32 latents; ``decode`` / ``decode_stream``: back.

    Compute runs in the dtype of the weights (fp32 / bf16 / fp16) on the weights' device; latent normalisation and
    returned tensors are float32. ``tiling`` (a :class:`TileSpec`, pixels) splits large frames into blended tiles.
    """

    def __init__(self, config: VAEConfig, attention: Optional[AttentionBackend] = None) -> None:
        super().__init__()
        if config.z_dim != WAN21_Z_DIM:
            raise ValueError(f"the Wan2.1 latent statistics need z_dim 16, got {config.z_dim}")
        attention = attention or resolve(AttentionMode.SDPA, "cpu", torch.float32)
        self.config = config
        self.encoder = Encoder3d(config, attention)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config, attention)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                        attention: Optional[AttentionBackend] = None) -> "WanVAE":
        """Build from an unprefixed state dict (config inferred from shapes), cast to ``dtype``, strict load."""
        config = VAEConfig.from_state_dict(state_dict)
        dtype = dtype or state_dict["encoder.conv1.weight"].dtype
        with torch.device("meta"):
            model = cls(config, attention)
        weights = {k: v.to(dtype) for k, v in state_dict.items()}
        try:
            model.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"VAE weights do not fit the Wan2.1 VAE layout inferred for {config}: {err}") from None
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"VAE {what} expects [B, {channels}, F, H, W], got {tuple(x.shape)}")
        if x.device != self.device:
            raise RuntimeError(f"VAE {what}: input is on {x.device} but the VAE weights are on {self.device}; "
                               "move the VAE (or the input) to the same device first")

    def _check_video(self, video: torch.Tensor) -> None:
        self._check_input(video, 3, "encode")
        frames, (h, w) = video.shape[2], video.shape[3:]
        step, cell = self.config.temporal_stride, self.config.spatial_stride
        if frames < 1 or (frames - 1) % step:
            shorter, longer = max(1, frames - (frames - 1) % step), frames + (1 - frames) % step
            raise ValueError(f"VAE encode needs 1 + {step}k frames, got {frames}; trim the video to {shorter} "
                             f"frames or pad it to {longer}")
        if h % cell or w % cell:
            raise ValueError(f"VAE encode needs H and W divisible by {cell}, got {h} x {w}; resize or crop the frames")

    def _grid(self, tiling: Optional[TileSpec], height: int, width: int) -> Optional[TileGrid]:
        """Tile plan for a latent grid of height x width cells; None when tiling is off or one tile covers it."""
        if tiling is None:
            return None
        grid = tiling.grid(height, width, self.config.spatial_stride)
        return grid if len(grid.tiles) > 1 else None

    def _encode_frames(self, x: torch.Tensor, chunked: bool) -> torch.Tensor:
        """Raw mu (compute dtype) of a video or tile: frame 0 alone, then groups of ``temporal_stride`` frames
        through one causal cache (``chunked=False``: all frames in one call)."""
        cache = CausalCache()
        step = self.config.temporal_stride
        bounds = [(0, 1)] + [(s, s + step) for s in range(1, x.shape[2], step)] if chunked else [(0, x.shape[2])]
        parts = [self.conv1(self.encoder(x[:, :, a:b], cache), cache)[:, :self.config.z_dim] for a, b in bounds]
        return torch.cat(parts, dim=2)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiling: Optional[TileSpec] = None, chunked: bool = True) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 1 + 4k, H and W multiples of 8) -> normalised mu, float32
        [B, 16, 1 + (F - 1) // 4, H / 8, W / 8]. ``chunked=False`` runs all frames at once (reference path;
        memory grows with F)."""
        self._check_video(video)
        x, cell = video.to(self.dtype), self.config.spatial_stride
        grid = self._grid(tiling, video.shape[3] // cell, video.shape[4] // cell)
        if grid is None:
            mu = self._encode_frames(x, chunked)
        else:
            mu = tiled_apply(lambda tile: self._encode_frames(tile, chunked), x, grid, cell, 1)
        return normalise_latents(mu)

    def _decode_chunks(self, z: torch.Tensor, chunked: bool) -> Iterator[torch.Tensor]:
        """Decoder outputs (compute dtype) for raw latents ``z``, one latent frame at a time through one cache."""
        cache = CausalCache()
        for chunk in ((z[:, :, t:t + 1] for t in range(z.shape[2])) if chunked else (z,)):
            yield self.decoder(chunk, cache)

    def decode_stream(self, latents: torch.Tensor, tiling: Optional[TileSpec] = None, clamp: bool = True,
                      chunked: bool = True) -> Iterator[torch.Tensor]:
        """Normalised latents [B, 16, T, h, w] -> iterator of float32 video chunks [B, 3, f, 8h, 8w] (f = 1 for
        latent frame 0, then 4 per latent frame), clamped to [-1, 1] unless ``clamp`` is False.

        Untiled, peak memory does not depend on T (frames are produced chunk by chunk). Tiled, the tiles run one
        after the other over all frames (working set: one tile) into a float32 output video, then yielded in the
        same chunks. ``chunked=False`` decodes all latent frames at once (reference path)."""
        self._check_input(latents, self.config.z_dim, "decode")
        return self._decode_frames(latents, self._grid(tiling, latents.shape[3], latents.shape[4]), clamp, chunked)

    @torch.no_grad()
    def _decode_frames(self, latents: torch.Tensor, grid: Optional[TileGrid], clamp: bool,
                       chunked: bool) -> Iterator[torch.Tensor]:
        z = self.conv2(denormalise_latents(latents).to(self.dtype), CausalCache())
        if grid is None:
            frames = (chunk.float() for chunk in self._decode_chunks(z, chunked))
        else:
            video = tiled_apply(lambda tile: torch.cat(list(self._decode_chunks(tile, chunked)), dim=2), z, grid, 1,
                                self.config.spatial_stride)
            step = self.config.temporal_stride
            frames = (video[:, :, a:a + (step if a else 1)] for a in [0, *range(1, video.shape[2], step)])
        for chunk in frames:
            yield chunk.clamp_(-1.0, 1.0) if clamp else chunk

    def decode(self, latents: torch.Tensor, tiling: Optional[TileSpec] = None, clamp: bool = True,
               chunked: bool = True) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> float32 video [B, 3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]."""
        return torch.cat(list(self.decode_stream(latents, tiling, clamp, chunked)), dim=2)


# --------------------------------------------------------------------------------------------------------------------
# loading


def _read_checkpoint(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(key -> shape, key -> tensor reader) of a .safetensors file (lazy) or a torch pickle (weights only, mmap)."""
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tensors = tensors.get("state_dict", tensors) if isinstance(tensors, dict) else {}
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        return _shapes(tensors), tensors.__getitem__
    handle = safe_open(str(path), framework="pt", device="cpu")
    return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}, handle.get_tensor


def load_vae(path: Union[str, Path], dtype: Union[str, torch.dtype] = torch.float32,
             attention: Optional[AttentionBackend] = None) -> WanVAE:
    """Load a Wan2.1 VAE file (.safetensors, or the original .pth) with or without a ``model.`` key prefix.

    ``dtype``: storage and compute dtype ("fp32" / "bf16" / "fp16" or a torch dtype). ``attention``: the back-end
    for the middle attention blocks (default: "sdpa" resolved for the CPU in ``dtype``). Wan2.2 VAEs, the pruned
    "lightVAE" and files that are not VAEs are rejected with a ValueError before any tensor is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE file not found: {path}")
    dtype = parse_precision(dtype)
    raw_shapes, read = _read_checkpoint(path)
    names = {(k[len("model."):] if k.startswith("model.") else k): k for k in raw_shapes}
    shapes = {name: raw_shapes[key] for name, key in names.items()}
    check_wan21_vae(shapes)
    if shapes.get("decoder.conv1.bias", (0,))[0] == LIGHTVAE_DECODER_WIDTH:
        raise ValueError(f"{path.name} is a pruned 'lightVAE' (decoder width {LIGHTVAE_DECODER_WIDTH}); it is not "
                         "supported: select the original Wan2.1 VAE (Wan2_1_VAE_bf16.safetensors)")
    state_dict = {name: read(key) for name, key in names.items()}
    attention = attention or resolve(AttentionMode.SDPA, "cpu", dtype)
    return WanVAE.from_state_dict(state_dict, dtype=dtype, attention=attention)
