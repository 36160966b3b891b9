"""Random-weight models of the real shapes, built in memory through the real loader (for the GPU benchmarks).

    random_state(cfg, device) -> {key: bf16 tensor}: every key of InfiniteTalkModel(cfg) (Wan2.1 I2V + adapter)
    state_as_checkpoint(tensors, device) -> LazyStateDict: those tensors as if read from a file
    random_vae(device, dtype) -> WanVAE: the full-size Wan2.1 VAE (dim 96) with random weights

Weights: Linear / Conv weights N(0, 1/fan_in), biases 0.01·N(0, 1), 1-D weights (norms) 1 + 0.1·N(0, 1),
modulation N(0, 1/dim), drawn in bf16 on the device with a fixed seed.
"""
from __future__ import annotations

from pathlib import Path

import torch

import packimport

packimport.register()
from infinitetalk.attention import resolve  # noqa: E402
from infinitetalk.fp8_optimization import ops_for  # noqa: E402
from infinitetalk.multitalk.model import InfiniteTalkModel  # noqa: E402
from infinitetalk.wanvideo.checkpoint import LazyStateDict, LazyTensor  # noqa: E402
from infinitetalk.wanvideo.config import WanConfig  # noqa: E402
from infinitetalk.wanvideo.vae import VAEConfig, WanVAE  # noqa: E402


class MemoryReader:
    """A ``wanvideo.checkpoint.TensorReader`` over tensors already in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.path = tensors, Path("<random state dict in memory>")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def metadata(self) -> dict[str, str]:
        return {}


def random_state(cfg: WanConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Every parameter of InfiniteTalkModel(cfg) as a random bf16 tensor on ``device``."""
    with torch.device("meta"):
        model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32))
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, meta in model.state_dict().items():
        value = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.bfloat16)
        if "modulation" in name:
            value *= cfg.dim ** -0.5
        elif name.endswith("bias"):
            value *= 0.01
        elif meta.dim() == 1:
            value = 1 + 0.1 * value
        else:
            value *= meta.shape[1:].numel() ** -0.5
        state[name] = value
    return state


def state_as_checkpoint(tensors: dict[str, torch.Tensor], device: torch.device) -> LazyStateDict:
    """``tensors`` as the lazy state dict ``open_state_dict`` would return for a file holding them on ``device``."""
    reader = MemoryReader(tensors)
    return LazyStateDict({k: LazyTensor(reader, k, reader.shape(k), reader.dtype(k)) for k in tensors},
                         device=str(device))


def random_vae(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> WanVAE:
    """The full-size Wan2.1 VAE with torch's default random initialisation, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(VAEConfig(), resolve("sdpa", device, dtype))
    return vae.to(dtype).eval().requires_grad_(False)
