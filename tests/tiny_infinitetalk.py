"""A random tiny InfiniteTalk transformer for the GPU tests: config (dim 256, 2 heads of 128, audio adapter), its
weights written to a safetensors file, and one forward's inputs (one speaker)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from infinitetalk.attention import resolve
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

TEXT_LEN = 16


def tiny_config(layers: int) -> WanConfig:
    """The tiny InfiniteTalk config with ``layers`` blocks."""
    return WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=layers, in_dim=36, out_dim=16, text_dim=64,
                     text_len=TEXT_LEN, clip_dim=64,
                     audio=AudioConfig(intermediate_dim=16, output_dim=64, context_tokens=4))


def write_weights(cfg: WanConfig, path: Path, seed: int = 0) -> Path:
    """Random weights of a ``cfg`` InfiniteTalk model (seeded) saved to ``path``; returns path."""
    torch.manual_seed(seed)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_inputs(cfg: WanConfig, latent_hw: tuple[int, int] = (8, 12), device: str = "cuda",
                seed: int = 1) -> dict[str, torch.Tensor]:
    """Forward inputs for 3 latent frames of ``latent_hw``: x, t, context (6 text tokens), clip_fea, y, audio."""
    gen = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    inputs = {"x": torch.randn(1, 16, 3, h, w, generator=gen), "t": torch.tensor([700.0]),
              "context": torch.randn(1, 6, cfg.text_dim, generator=gen),
              "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=gen),
              "y": torch.randn(1, cfg.in_dim - 16, 3, h, w, generator=gen),
              "audio": torch.randn(1, 1, 9, 5, 12, 768, generator=gen)}
    return {k: v.to(device) for k, v in inputs.items()}
