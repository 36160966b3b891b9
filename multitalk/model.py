"""InfiniteTalk: the Wan2.1 I2V DiT with the audio adapter (model-spec §3).

:class:`InfiniteTalkModel` adds ``audio_proj`` (:class:`AudioProjModel`) and uses :class:`InfiniteTalkBlock`, which
adds ``norm_x`` and ``audio_cross_attn`` between the text/image cross-attention and the FFN. Its self-attention
also returns the speaker map used by the two-speaker class RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..attention import AttentionBackend
from ..fp8_optimization import Ops, QuantMode, ops_for
from ..wanvideo import checkpoint
from ..wanvideo.config import AudioConfig, WanConfig
from ..wanvideo.layers import WanLayerNorm
from ..wanvideo.model import Activation, BlockContext, WanAttentionBlock, WanModel, WanSelfAttention
from ..wanvideo.rope import RopeTable
from .audio_attention import SingleStreamMutiAttention, speaker_map, speaker_positions, token_masks

MAX_SPEAKERS = 2


@dataclass(frozen=True)
class AudioBlockContext(BlockContext):
    """:class:`BlockContext` plus audio tokens [B·F, N_a, C] (compute dtype), the speaker count and the speaker
    token masks [3, Hp·Wp] (None: no speaker map is computed; allowed for one speaker only)."""

    audio: Optional[torch.Tensor] = None
    n_speakers: int = 1
    masks: Optional[torch.Tensor] = None
    audio_scale: float = 1.0


class AudioProjModel(nn.Module):
    """``audio_proj``: wav2vec2 windows -> per-latent-frame audio context tokens.

    first [N, 1, window, 12, 768] (video frame 0) and latter [N, F-1, window + vae_scale - 1, 12, 768]
    -> [N, F, context_tokens, output_dim] float32 (final LayerNorm eps 1e-5 in float32).
    """

    def __init__(self, acfg: AudioConfig, linear: type) -> None:
        super().__init__()
        frame = acfg.audio_blocks * acfg.audio_channels
        self.context_tokens, self.output_dim = acfg.context_tokens, acfg.output_dim
        self.proj1 = linear(acfg.audio_window * frame, acfg.intermediate_dim)
        self.proj1_vf = linear(acfg.latter_window * frame, acfg.intermediate_dim)
        self.proj2 = linear(acfg.intermediate_dim, acfg.intermediate_dim)
        self.proj3 = linear(acfg.intermediate_dim, acfg.context_tokens * acfg.output_dim)
        self.norm = WanLayerNorm(acfg.output_dim, eps=1e-5, elementwise_affine=True)

    def forward(self, first: torch.Tensor, latter: torch.Tensor) -> torch.Tensor:
        first = torch.relu(self.proj1(first.flatten(2)))
        latter = torch.relu(self.proj1_vf(latter.flatten(2)))
        hidden = torch.relu(self.proj2(torch.cat([first, latter], dim=1)))
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        return self.norm(tokens.float())


def audio_windows(audio: torch.Tensor, acfg: AudioConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Split wav2vec2 windows [N, 1 + vae_scale·(F-1), window, 12, 768] into the audio_proj inputs.

    Returns first [N, 1, window, 12, 768] and latter [N, F-1, window + vae_scale - 1, 12, 768]: per later latent
    frame, the first video frame's slots 0..mid, the middle frames' slot mid, the last frame's slots mid..end.
    """
    n, frames, *rest = audio.shape
    mid = acfg.audio_window // 2
    groups = audio[:, 1:].reshape(n, (frames - 1) // acfg.vae_scale, acfg.vae_scale, *rest)
    parts = [groups[:, :, :1, : mid + 1], groups[:, :, 1:-1, mid:mid + 1], groups[:, :, -1:, mid:]]
    return audio[:, :1], torch.cat([p.flatten(2, 3) for p in parts], dim=2)


class InfiniteTalkSelfAttention(WanSelfAttention):
    """Self-attention that also returns the speaker map [B, 3, S] (float32) when masks are given, else None."""

    def forward(self, x: Activation, rope: RopeTable, grid: tuple[int, int, int] = (0, 0, 0),
                masks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        q, k, v = self.qkv(x, rope)
        with torch.no_grad():
            smap = None if masks is None else speaker_map(q, k, grid, masks)
        return self.attend(q, k, v), smap


class InfiniteTalkBlock(WanAttentionBlock):
    """Wan block + ``norm_x`` (affine LayerNorm) + ``audio_cross_attn``, added after the cross-attention, no gate."""

    self_attn_cls = InfiniteTalkSelfAttention

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__(cfg, ops, attention)
        self.audio_cfg = cfg.audio
        self.norm_x = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.audio_cross_attn = SingleStreamMutiAttention(cfg, ops, attention)

    def self_attention(self, u: Activation, ctx: AudioBlockContext) -> tuple[torch.Tensor, Any]:
        """Self-attention output and the speaker map [B, 3, S] (None without masks)."""
        return self.self_attn(u, ctx.rope, ctx.grid, ctx.masks)

    def after_cross_attn(self, x: torch.Tensor, extra: Any, ctx: AudioBlockContext) -> torch.Tensor:
        """x + audio cross-attention of norm_x(x); class RoPE from the speaker map when there are two speakers."""
        positions = speaker_positions(extra, self.audio_cfg) if ctx.n_speakers > 1 else None
        audio_attn = self.audio_cross_attn
        normed = self.norm_x(x, (audio_attn.q_linear,))
        return torch.add(x, audio_attn(normed, ctx.audio, ctx.grid, positions), alpha=ctx.audio_scale)


class InfiniteTalkModel(WanModel):
    """Wan2.1 I2V DiT with the InfiniteTalk / MultiTalk audio adapter. Same forward as :class:`WanModel`;
    ``audio`` is required, ``ref_target_masks`` is required for two speakers."""

    block_cls = InfiniteTalkBlock

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        if cfg.audio is None:
            raise ValueError("InfiniteTalkModel needs the audio adapter (audio_proj.* and blocks.N.audio_cross_attn.* "
                             "keys are missing); load the InfiniteTalk adapter file together with the base model")
        if cfg.model_type != "i2v":
            raise ValueError("InfiniteTalk needs a Wan2.1 image-to-video base (blocks.N.cross_attn.k_img keys); the "
                             "given base is a text-to-video model")
        super().__init__(cfg, ops, attention)
        self.audio_proj = AudioProjModel(cfg.audio, ops_for(QuantMode.DISABLED).Linear)

    def _check_audio(self, audio: Optional[torch.Tensor], grid: tuple[int, int, int], batch: int) -> torch.Tensor:
        acfg = self.config.audio
        frames = 1 + acfg.vae_scale * (grid[0] - 1)
        expected = (frames, acfg.audio_window, acfg.audio_blocks, acfg.audio_channels)
        if audio is None or audio.dim() != 6 or tuple(audio.shape[2:]) != expected:
            got = None if audio is None else tuple(audio.shape)
            raise ValueError(f"InfiniteTalk needs audio [B, n_speakers, {', '.join(map(str, expected))}] for "
                             f"{grid[0]} latent frames (zeros for the unconditional pass), got {got}")
        if audio.shape[0] not in (1, batch) or not 1 <= audio.shape[1] <= MAX_SPEAKERS:
            raise ValueError(f"audio batch {audio.shape[0]} must be 1 or {batch}, speakers {audio.shape[1]} must "
                             f"be 1..{MAX_SPEAKERS}")
        return audio.expand(batch, *audio.shape[1:])

    def block_context(self, grid: tuple[int, int, int], context: torch.Tensor, n_img: int,
                      extras: dict[str, Any]) -> AudioBlockContext:
        """Shared block inputs plus the projected audio tokens [B·F, n_spk·tokens, C] and speaker masks."""
        base = super().block_context(grid, context, n_img, {})
        batch = context.shape[0]
        audio = self._check_audio(extras["audio"], grid, batch)
        n_spk = audio.shape[1]
        first, latter = audio_windows(audio.flatten(0, 1).to(self.compute_dtype), self.config.audio)
        tokens = self.audio_proj(first, latter).to(self.compute_dtype)
        tokens = tokens.unflatten(0, (batch, n_spk)).permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)
        masks = extras["ref_target_masks"]
        if masks is None and n_spk > 1:
            raise ValueError("two-speaker audio needs ref_target_masks [3, H, W] (speaker 1, speaker 2, background)")
        masks = None if masks is None else token_masks(masks, grid)
        scale = 1.0 if extras["audio_scale"] is None else float(extras["audio_scale"])
        return AudioBlockContext(grid=grid, rope=base.rope, context=context, n_img=n_img, audio=tokens,
                                 n_speakers=n_spk, masks=masks, audio_scale=scale)


def load_infinitetalk(base_paths: Union[str, Path, Sequence[Union[str, Path]]],
                      adapter_path: Optional[Union[str, Path]], options: checkpoint.LoadOptions) -> InfiniteTalkModel:
    """Load a Wan2.1 I2V base (one file or shards) with the InfiniteTalk adapter merged on top (``adapter_path``
    None: the base file already contains the adapter). Returns the model in ``options.dtype`` on CPU / the
    requested device, weights memory-mapped and materialised tensor by tensor."""
    paths = [base_paths] if isinstance(base_paths, (str, Path)) else list(base_paths)
    if adapter_path is not None:
        paths.append(adapter_path)
    return checkpoint.load_model(InfiniteTalkModel, checkpoint.open_state_dict(paths, options.device), options)
