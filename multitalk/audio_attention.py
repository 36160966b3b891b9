"""InfiniteTalk audio cross-attention (model-spec §3.3): frame-local attention to audio tokens, speaker maps and the
two-speaker class RoPE.

Layouts: video tokens [B, S, dim] in frame-major order, S = F·Hp·Wp; audio tokens [B·F, N_a, C] (the N_a tokens of
latent frame f of batch element b at row b·F + f); speaker masks [3, Hp·Wp] over frame-0 token positions
(speaker 1, speaker 2, background).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend
from ..fp8_optimization import Ops
from ..wanvideo.config import AudioConfig, WanConfig
from ..wanvideo.model import Activation
from ..wanvideo.rope import apply_rope, rope_table_1d

MAP_CHUNK_ELEMENTS = 1 << 26


def token_masks(ref_target_masks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[3, h, w] pixel/latent masks -> [3, Hp·Wp] float32 0/1 token masks (nearest resize, then > 0)."""
    if ref_target_masks.dim() != 3:
        raise ValueError(f"ref_target_masks must be [3, H, W] (speaker 1, speaker 2, background), "
                         f"got {tuple(ref_target_masks.shape)}")
    resized = F.interpolate(ref_target_masks[None].float(), size=grid[1:], mode="nearest")[0]
    return (resized > 0).flatten(1).float()


def speaker_map(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], masks: torch.Tensor) -> torch.Tensor:
    """Per-token affinity to each mask class, [B, n_cls, S] float32.

    q, k [B, S, heads, head_dim] (after RoPE); masks [n_cls, Hp·Wp]. For each token and head: softmax over the
    frame-0 keys of q·k/√d, summed over each mask's keys and divided by the mask's size; then the mean over heads
    taken as the reference does (two head halves averaged). An empty mask gives a zero row.
    """
    b, s, h, d = q.shape
    n0 = grid[1] * grid[2]
    half = h // 2 or h
    qf = (q.float() * (1.0 / math.sqrt(d))).transpose(1, 2)[:, : 2 * half if h > 1 else h]
    k0 = k[:, :n0].float().transpose(1, 2)[:, : qf.shape[1]]
    weights = masks.float().t()
    rows = max(1, MAP_CHUNK_ELEMENTS // max(1, b * qf.shape[1] * n0))
    per_head = torch.cat([torch.matmul(torch.matmul(qf[:, :, i:i + rows], k0.transpose(-1, -2)).softmax(-1), weights)
                          for i in range(0, s, rows)], dim=2)
    per_head = per_head / masks.float().sum(-1).clamp_min(1.0)
    halves = per_head.split(half, dim=1)
    return (sum(part.mean(1) for part in halves) / len(halves)).transpose(1, 2)


def _scale(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Min-max normalise v [B, S] per row into [lo, hi] (eps 1e-8, as the reference)."""
    vmin, vmax = v.min(dim=-1, keepdim=True).values, v.max(dim=-1, keepdim=True).values
    return (v - vmin) / (vmax - vmin + 1e-8) * (hi - lo) + lo


def speaker_positions(smap: torch.Tensor, audio_cfg: AudioConfig) -> torch.Tensor:
    """Class-RoPE query positions [B, S] from a speaker map [B, 3, S].

    Speaker 1 rows scaled to [0, interval], speaker 2 to [range - interval, range], background = range // 2; each
    token takes the value of its arg-max class.
    """
    rng, step = audio_cfg.class_range, audio_cfg.class_interval
    candidates = torch.stack([_scale(smap[:, 0], 0, step), _scale(smap[:, 1], rng - step, rng),
                              torch.full_like(smap[:, 0], float(rng // 2))], dim=1)
    return candidates.gather(1, smap.argmax(dim=1, keepdim=True))[:, 0]


def audio_key_positions(n_tokens: int, audio_cfg: AudioConfig, device: torch.device) -> torch.Tensor:
    """Class-RoPE key positions [n_tokens]: first half speaker 1 (interval / 2), second half speaker 2."""
    rng, step = audio_cfg.class_range, audio_cfg.class_interval
    pos = torch.full((n_tokens,), (rng - step + rng) / 2, device=device, dtype=torch.float32)
    pos[: n_tokens // 2] = (0 + step) / 2
    return pos


class SingleStreamMutiAttention(nn.Module):
    """Audio cross-attention ``audio_cross_attn`` (keys ``q_linear``, ``kv_linear``, ``proj``).

    Frame-local: the Hp·Wp tokens of latent frame f attend only to frame f's audio tokens, as one batched
    attention call over B·F batch rows.
    """

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__()
        if cfg.audio is None:
            raise ValueError("audio cross-attention needs WanConfig.audio (the adapter sizes)")
        self.audio_cfg, self.attention = cfg.audio, attention
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_linear = ops.Linear(cfg.dim, cfg.dim)
        self.kv_linear = ops.Linear(cfg.audio.output_dim, cfg.dim * 2)
        self.proj = ops.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Activation, audio: torch.Tensor, grid: tuple[int, int, int],
                q_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, S, dim] (or its QuantizedRows); audio [B·F, N_a, C]; q_positions [B, S] enables class RoPE (two
        speakers).

        Returns [B, S, dim] in x's dtype.
        """
        b, s, dim = x.shape
        frames, heads = grid[0], (self.num_heads, self.head_dim)
        q = self.q_linear(x).unflatten(-1, heads)
        kv = self.kv_linear(audio).unflatten(-1, (2, *heads))
        k, v = kv[:, :, 0], kv[:, :, 1]
        if q_positions is not None:
            q = apply_rope(q, rope_table_1d(q_positions, self.head_dim), x.dtype)
            k_pos = audio_key_positions(audio.shape[1], self.audio_cfg, audio.device)
            k = apply_rope(k, rope_table_1d(k_pos, self.head_dim), x.dtype)
        out = self.attention(q.reshape(b * frames, s // frames, *heads), k, v)
        return self.proj(out.reshape(b, s, dim))
