"""Transformer configuration, inferred from checkpoint shapes.

:meth:`WanConfig.from_state_dict` is the only code in the pack that looks at state-dict keys or shapes to decide the
architecture. It accepts any mapping ``key -> object with .shape`` (real tensors, or the lazy entries of
:mod:`wanvideo.checkpoint`), with keys already stripped of ``model.diffusion_model.`` style prefixes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

HEAD_DIM = 128
FREQ_DIM = 256
EPS = 1e-6
TEXT_LEN = 512
AUDIO_BLOCKS = 12
AUDIO_CHANNELS = 768
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class AudioConfig:
    """InfiniteTalk / MultiTalk audio adapter sizes (model-spec §3.1).

    ``audio_blocks`` × ``audio_channels`` is one wav2vec2 frame (12 layer outputs × 768), fixed by the reference.
    """

    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32
    audio_window: int = 5
    vae_scale: int = 4
    audio_blocks: int = AUDIO_BLOCKS
    audio_channels: int = AUDIO_CHANNELS
    class_range: int = 24
    class_interval: int = 4

    @property
    def latter_window(self) -> int:
        """Window slots per later latent frame (audio_window + vae_scale - 1 = 8)."""
        return self.audio_window + self.vae_scale - 1


@dataclass(frozen=True)
class WanConfig:
    """Wan2.1 DiT hyper-parameters (model-spec §1.1). ``audio`` is None for a plain Wan model."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    model_type: str = "i2v"
    freq_dim: int = FREQ_DIM
    eps: float = EPS
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = TEXT_LEN
    clip_dim: int = 1280
    audio: Optional[AudioConfig] = None

    def __post_init__(self) -> None:
        if self.model_type not in ("i2v", "t2v"):
            raise ValueError(f"WanConfig.model_type must be 'i2v' or 't2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"WanConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.text_len < 1:
            raise ValueError(f"WanConfig.text_len must be positive, got {self.text_len}")

    @property
    def head_dim(self) -> int:
        """dim // num_heads (128 in every released model)."""
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        """pt·ph·pw: latent values per token and channel."""
        return math.prod(self.patch_size)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], *, text_len: int = TEXT_LEN,
                        num_heads: Optional[int] = None) -> "WanConfig":
        """Infer the architecture from shapes of an official-key state dict (prefixes already stripped).

        ``text_len`` (512 for every released model) is not stored in the weights; ``num_heads`` defaults to
        dim // 128 (head_dim 128 in every released model).
        """
        if "patch_embedding.weight" not in sd or "head.head.weight" not in sd:
            raise ValueError("not a Wan2.1 transformer state dict: 'patch_embedding.weight' or 'head.head.weight' "
                             "is missing")
        dim, in_dim, *patch = _shape(sd, "patch_embedding.weight")
        if len(patch) != 3:
            raise ValueError(f"patch_embedding.weight must be 5-D [dim, in_dim, pt, ph, pw], "
                             f"got {[dim, in_dim, *patch]}")
        head_out = _shape(sd, "head.head.weight")[0]
        if head_out % math.prod(patch):
            raise ValueError(f"head.head.weight rows {head_out} are not a multiple of the patch volume {patch}")
        layers = {int(m.group(1)) for k in sd for m in [_BLOCK_KEY.match(k)] if m}
        if not layers or layers != set(range(len(layers))):
            raise ValueError(f"transformer blocks must be numbered 0..N-1, found {sorted(layers)[:8]}")
        return cls(
            dim=dim,
            ffn_dim=_shape(sd, "blocks.0.ffn.0.weight")[0],
            num_heads=num_heads if num_heads is not None else max(1, dim // HEAD_DIM),
            num_layers=len(layers),
            in_dim=in_dim,
            out_dim=head_out // math.prod(patch),
            text_dim=_shape(sd, "text_embedding.0.weight")[1],
            model_type="i2v" if "blocks.0.cross_attn.k_img.weight" in sd else "t2v",
            freq_dim=_shape(sd, "time_embedding.0.weight")[1],
            patch_size=tuple(patch),
            text_len=text_len,
            clip_dim=_shape(sd, "img_emb.proj.1.weight")[1] if "img_emb.proj.1.weight" in sd else 1280,
            audio=_audio_from_state_dict(sd, dim),
        )


def _shape(sd: Mapping[str, Any], key: str) -> list[int]:
    if key not in sd:
        raise ValueError(f"Wan2.1 transformer key {key!r} is missing from the state dict")
    return [int(s) for s in sd[key].shape]


def _audio_from_state_dict(sd: Mapping[str, Any], dim: int) -> Optional[AudioConfig]:
    """Adapter sizes from the ``audio_proj.*`` shapes, or None when the adapter is absent."""
    if "audio_proj.proj1.weight" not in sd:
        return None
    frame = AUDIO_BLOCKS * AUDIO_CHANNELS
    inter, first_in = _shape(sd, "audio_proj.proj1.weight")
    latter_in = _shape(sd, "audio_proj.proj1_vf.weight")[1]
    output_dim = _shape(sd, "audio_proj.norm.weight")[0]
    proj3_out = _shape(sd, "audio_proj.proj3.weight")[0]
    if first_in % frame or latter_in % frame or proj3_out % output_dim:
        raise ValueError(f"audio_proj shapes do not fit wav2vec2 frames of {AUDIO_BLOCKS}x{AUDIO_CHANNELS}: "
                         f"proj1 in {first_in}, proj1_vf in {latter_in}, proj3 out {proj3_out}, norm {output_dim}")
    window = first_in // frame
    kv_shape = _shape(sd, "blocks.0.audio_cross_attn.kv_linear.weight")
    if kv_shape != [2 * dim, output_dim]:
        raise ValueError(f"the audio adapter does not fit this transformer: blocks.0.audio_cross_attn.kv_linear is "
                         f"{kv_shape}, expected [{2 * dim}, {output_dim}] for dim {dim}; use the adapter made for "
                         f"this base model")
    return AudioConfig(intermediate_dim=inter, output_dim=output_dim, context_tokens=proj3_out // output_dim,
                       audio_window=window, vae_scale=latter_in // frame - window + 1)
