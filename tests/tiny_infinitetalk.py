"""A random tiny InfiniteTalk transformer for the GPU tests: config (dim 256, 2 heads of 128, audio adapter), its
weights written to a safetensors file, one forward's inputs (one speaker), loading it on CUDA through the real
loader, one forward, and a WanVideoEnhancedBlockSwap plan for its blocks."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from infinitetalk.attention import AttentionBackend, resolve
from infinitetalk.blockswap import SwapPlan, block_nbytes, plan_block_swap
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.checkpoint import LoadOptions, load_model, open_state_dict
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


def weights_and_inputs(folder: Path, layers: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random weights of the tiny config with ``layers`` blocks written into ``folder``, and one forward's inputs."""
    cfg = tiny_config(layers)
    return write_weights(cfg, folder / f"tiny{layers}.safetensors"), tiny_inputs(cfg)


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


def load_on_cuda(path: Path, mode: str, attention: AttentionBackend) -> InfiniteTalkModel:
    """The weights at ``path`` loaded on CUDA in bf16 with quantization ``mode`` and ``attention``."""
    options = LoadOptions(dtype=torch.bfloat16, device="cuda", text_len=TEXT_LEN, ops=ops_for(mode),
                          attention=attention)
    return load_model(InfiniteTalkModel, open_state_dict([path], "cuda"), options)


def forward(model: InfiniteTalkModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One inference forward of ``model`` on :func:`tiny_inputs`."""
    with torch.inference_mode():
        return model(inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs["clip_fea"], y=inputs["y"],
                     audio=inputs["audio"])


def enhanced_plan(blocks, count: int, streams: int, **extra) -> SwapPlan:
    """WanVideoEnhancedBlockSwap arguments (auto tuning off, bandwidth_target 0.5, ``extra`` on top) planned for
    ``blocks`` with unlimited free VRAM."""
    args = {"blocks_to_swap": count, "auto_hardware_tuning": False, "num_cuda_streams": streams,
            "bandwidth_target": 0.5, **extra}
    return plan_block_swap(args, [block_nbytes(b) for b in blocks], 1 << 40, 0)
