"""The Wan2.1 DiT (model-spec §2): attention layers, block, head and :class:`WanModel`.

Module attribute names equal the official state-dict keys, so an official checkpoint loads with a strict
``load_state_dict`` after prefix stripping. Every Linear inside the blocks is built with the ``ops.Linear`` class
handed to the constructor (quantizable); embeddings and head use the plain high-precision Linear. Attention runs
through the :class:`~attention.AttentionBackend` handed to the constructor. The model never moves weights between
devices; activations are created on the device of the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..attention import AttentionBackend
from ..fp8_optimization import Ops, QuantMode, ops_for, projections, takes_quantized_rows
from ..quant_gemm import QuantizedRows
from .config import WanConfig
from .layers import (FeedForward, MLPProj, WanLayerNorm, WanRMSNorm, by_token_chunks, gated_residual,
                     sinusoidal_embedding_1d, summed)
from .rope import RopeTable, norm_and_rotate, rope_table_3d

FFN_CHUNK_TOKENS = 8192  # the FFN runs over token chunks of this size: its [S, ffn_dim] hidden state never exists whole
CROSS_ATTN_CHUNK_TOKENS = 8192  # the text/image cross-attention's queries run over token chunks of this size
KeysValues = tuple[torch.Tensor, torch.Tensor]
# an attention input [B, S, dim], or its per-token fp8 quantization made by the step that produced it
# (layers.per_token with consumers), when the projections reading it run the fp8 row-wise GEMM
Activation = Union[torch.Tensor, QuantizedRows]


@dataclass(frozen=True)
class BlockContext:
    """Per-call inputs shared by all blocks.

    grid: token grid (F, H, W) after patchify; rope: 3-D RoPE table [S, head_dim/2];
    context: [B, n_img + text_len, dim] in the compute dtype (CLIP tokens first); n_img: number of CLIP tokens.
    """

    grid: tuple[int, int, int]
    rope: RopeTable
    context: torch.Tensor
    n_img: int


class WanSelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the full dim and 3-D RoPE. x [B, S, dim] -> [B, S, dim]."""

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attention = cfg.num_heads, cfg.head_dim, attention
        self.q = ops.Linear(cfg.dim, cfg.dim)
        self.k = ops.Linear(cfg.dim, cfg.dim)
        self.v = ops.Linear(cfg.dim, cfg.dim)
        self.o = ops.Linear(cfg.dim, cfg.dim)
        self.norm_q = WanRMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = WanRMSNorm(cfg.dim, eps=cfg.eps)

    def qkv(self, x: Activation, rope: RopeTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected q, k (normed, rotated) and v, each [B, S, heads, head_dim] in x's dtype."""
        heads = (self.num_heads, self.head_dim)
        outputs = projections((self.q, self.k, self.v), x)
        q = norm_and_rotate(self.norm_q, next(outputs), rope, heads)
        k = norm_and_rotate(self.norm_k, next(outputs), rope, heads)
        return q, k, next(outputs).unflatten(-1, heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over all keys and the output projection: [B, S, heads, head_dim] -> [B, S, dim]. Where ``o``
        runs the fp8 row-wise GEMM and the attention kernel writes its output quantized for it
        (``AttentionBackend.rows_e4m3``), ``o`` takes those rows: no separate quantization pass."""
        if takes_quantized_rows((self.o,), q.flatten(2)):
            rows = self.attention.rows_e4m3(q, k, v)
            if rows is not None:
                return self.o(QuantizedRows(*rows, tuple(q.shape[:2]), q.dtype))
        return self.o(self.attention(q, k, v).flatten(2))

    def forward(self, x: Activation, rope: RopeTable) -> torch.Tensor:
        return self.attend(*self.qkv(x, rope))


class WanT2VCrossAttention(WanSelfAttention):
    """Cross-attention to the text tokens (the same layers as self-attention, no RoPE, as in the official code).
    x [B, S, dim], context [B, L, dim] -> [B, S, dim].

    Split in two so the block can run the queries over token chunks: :meth:`keys_values` projects the context once,
    :meth:`queries` attends any subset of query tokens to it (every query token is independent).
    """

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def _project(self, context: torch.Tensor, k: nn.Module, v: nn.Module, norm: nn.Module) -> KeysValues:
        keys, values = projections((k, v), context)
        return self._heads(norm(keys)), self._heads(values)

    def keys_values(self, context: torch.Tensor, n_img: int = 0) -> list[KeysValues]:
        """Keys and values [B, L, heads, head_dim] of the text tokens ``context[:, n_img:]``."""
        return [self._project(context[:, n_img:], self.k, self.v, self.norm_k)]

    def queries(self, x: Activation, keys_values: Sequence[KeysValues]) -> torch.Tensor:
        """x [B, s, dim] -> [B, s, dim]: the attention outputs over each (keys, values) pair, summed, then ``o`` (in
        fp8 ``_fast``, the sum is quantized for ``o`` in the same pass)."""
        q = self._heads(self.norm_q(self.q(x)))
        return self.o(summed([self.attention(q, k, v).flatten(2) for k, v in keys_values], consumers=(self.o,)))

    def forward(self, x: Activation, context: torch.Tensor, n_img: int = 0,
                keys_values: Optional[Sequence[KeysValues]] = None) -> torch.Tensor:
        """x [B, s, dim] -> [B, s, dim]; ``keys_values`` (from :meth:`keys_values`) skips projecting the context."""
        return self.queries(x, keys_values if keys_values is not None else self.keys_values(context, n_img))


class WanI2VCrossAttention(WanT2VCrossAttention):
    """Text + CLIP-image cross-attention; the two attention outputs are summed before ``o``.

    context [B, n_img + L, dim] with the n_img CLIP tokens first; n_img 0 (no CLIP tokens given) skips the image
    branch, as the upstream pack allows.
    """

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__(cfg, ops, attention)
        self.k_img = ops.Linear(cfg.dim, cfg.dim)
        self.v_img = ops.Linear(cfg.dim, cfg.dim)
        self.norm_k_img = WanRMSNorm(cfg.dim, eps=cfg.eps)

    def keys_values(self, context: torch.Tensor, n_img: int = 0) -> list[KeysValues]:
        """Text keys/values, then (n_img > 0) those of the CLIP tokens ``context[:, :n_img]``."""
        text = super().keys_values(context, n_img)
        if n_img == 0:
            return text
        return text + [self._project(context[:, :n_img], self.k_img, self.v_img, self.norm_k_img)]


class WanAttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (model-spec §2.3).

    x [B, S, dim] compute dtype; e0 [B, 6, dim] float32. Subclasses add work after the cross-attention through
    :meth:`after_cross_attn`, fed by the second value :meth:`self_attention` returns.
    """

    self_attn_cls: type = WanSelfAttention

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__()
        self.norm1 = WanLayerNorm(cfg.dim, cfg.eps)
        self.self_attn = self.self_attn_cls(cfg, ops, attention)
        self.norm3 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        cross_cls = WanI2VCrossAttention if cfg.model_type == "i2v" else WanT2VCrossAttention
        self.cross_attn = cross_cls(cfg, ops, attention)
        self.norm2 = WanLayerNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(ops.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                               ops.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def self_attention(self, u: Activation, ctx: BlockContext) -> tuple[torch.Tensor, Any]:
        """Self-attention output [B, S, dim] and an extra value for :meth:`after_cross_attn` (None here)."""
        return self.self_attn(u, ctx.rope), None

    def after_cross_attn(self, x: torch.Tensor, extra: Any, ctx: BlockContext) -> torch.Tensor:
        """Hook between the cross-attention and the FFN; identity in the plain Wan block."""
        return x

    def forward(self, x: torch.Tensor, e0: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        qkv = (self.self_attn.q, self.self_attn.k, self.self_attn.v)
        y, extra = self.self_attention(self.norm1.modulated(x, shift1, scale1, qkv), ctx)
        x = gated_residual(x, y, gate1)
        x = self.cross_attention(x, ctx)
        x = self.after_cross_attn(x, extra, ctx)
        return self.feed_forward(x, shift2, scale2, gate2)

    def cross_attention(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """``x + cross_attn(norm3(x), context)`` [B, S, dim]: the context is projected once, the queries run over
        chunks of :data:`CROSS_ATTN_CHUNK_TOKENS` tokens (per-token math, so equal to the whole; at 832x480x81 this
        keeps the normed input, q, the attention outputs and the projection to one chunk each)."""
        keys_values = self.cross_attn.keys_values(ctx.context, ctx.n_img)
        queries = (self.cross_attn.q,)
        return by_token_chunks(lambda part: part + self.cross_attn(self.norm3(part, queries), ctx.context,
                                                                   ctx.n_img, keys_values),
                               x.dtype, x, chunk=CROSS_ATTN_CHUNK_TOKENS)

    def feed_forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     gate: torch.Tensor) -> torch.Tensor:
        """``x + gate·ffn(modulate(norm2(x)))`` [B, S, dim], over chunks of :data:`FFN_CHUNK_TOKENS` tokens (every
        op is per token, so the result equals the unchunked one; at 832x480x81 the activation peak drops by the
        [S, 13824] hidden state and the float32 temporaries)."""
        def step(part: torch.Tensor) -> torch.Tensor:
            return gated_residual(part, self.ffn(self.norm2.modulated(part, shift, scale, (self.ffn[0],))), gate)

        return by_token_chunks(step, x.dtype, x, chunk=FFN_CHUNK_TOKENS)


class Head(nn.Module):
    """Output head in float32: x [B, S, dim], e [B, dim] float32 -> [B, S, prod(patch)·out_dim] float32."""

    def __init__(self, cfg: WanConfig, linear: type) -> None:
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = linear(cfg.dim, cfg.patch_volume * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


def pad_context(contexts: Sequence[torch.Tensor], text_len: int) -> torch.Tensor:
    """Stack text-encoder outputs [L_i, text_dim] (L_i <= text_len) into [B, text_len, text_dim], zero rows last."""
    out = contexts[0].new_zeros(len(contexts), text_len, contexts[0].shape[-1])
    for i, c in enumerate(contexts):
        if c.dim() != 2 or c.shape[0] > text_len or c.shape[1] != out.shape[-1]:
            raise ValueError(f"text context {i} has shape {tuple(c.shape)}; expected [L <= {text_len}, "
                             f"{out.shape[-1]}] (truncate the prompt to text_len tokens)")
        out[i, : c.shape[0]] = c
    return out


class WanModel(nn.Module):
    """Wan2.1 DiT (T2V or I2V): ``WanModel(cfg, ops, attention)``; ops from ``fp8_optimization.ops_for`` (block
    Linears), attention from ``attention.resolve``. Built on the meta device and filled by ``wanvideo.checkpoint``.

    ``KEEP_FP32``: substrings of parameter names stored and used in float32 whatever the base dtype.
    ``NOT_QUANTIZED``: substrings of parameter names never stored in a quantized format.
    """

    KEEP_FP32: tuple[str, ...] = ("time_embedding.", "time_projection.", "modulation", "head.", "norm")
    NOT_QUANTIZED: tuple[str, ...] = ("patch_embedding", "text_embedding", "time_embedding", "time_projection",
                                      "img_emb", "modulation", "head.", "norm", "bias", "audio_proj")
    block_cls: type = WanAttentionBlock

    def __init__(self, cfg: WanConfig, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__()
        hp = ops_for(QuantMode.DISABLED).Linear
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(hp(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            hp(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(hp(cfg.freq_dim, cfg.dim), nn.SiLU(), hp(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), hp(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([self.block_cls(cfg, ops, attention) for _ in range(cfg.num_layers)])
        self.head = Head(cfg, hp)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg.clip_dim, cfg.dim, hp)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype of the block stack (the dtype the patch embedding is stored in)."""
        return self.patch_embedding.weight.dtype

    def embed_video(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C_x, T, H, W] (+ y [B, C_y, T, H, W]) -> tokens [B, S, dim] in the compute dtype and grid."""
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"x must be [B, C, T, H, W], got {tuple(x.shape)}")
        if y is not None:
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y {tuple(y.shape)} does not match x {tuple(x.shape)} in batch/T/H/W")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"latent channels (x + y) = {x.shape[1]}, but this model takes {cfg.in_dim}; "
                             f"{'pass y (mask + image latent)' if y is None else 'check y'}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent T/H/W {tuple(x.shape[2:])} must be multiples of the patch {cfg.patch_size}")
        tokens = self.patch_embedding(x.to(self.compute_dtype))
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid

    def embed_time(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [1] -> (e [B, dim], e0 [B, 6, dim]), both float32."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != batch:
            raise ValueError(f"t has {t.shape[0]} timesteps for a batch of {batch}")
        e = self.time_embedding(sinusoidal_embedding_1d(self.config.freq_dim, t))
        return e, self.time_projection(e).unflatten(1, (6, self.config.dim))

    def embed_context(self, context: torch.Tensor, clip_fea: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """context [B, L <= text_len, text_dim] (+ clip_fea [B, N, clip_dim]) -> ([B, N + text_len, dim], N)."""
        cfg, dt = self.config, self.compute_dtype
        if context.dim() != 3 or context.shape[1] > cfg.text_len or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B, L <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] < cfg.text_len:
            context = torch.cat([context, context.new_zeros(context.shape[0], cfg.text_len - context.shape[1],
                                                            cfg.text_dim)], dim=1)
        text = self.text_embedding(context.to(dt))
        if cfg.model_type == "t2v" or clip_fea is None:
            return text, 0
        if clip_fea.dim() != 3 or clip_fea.shape[-1] != cfg.clip_dim:
            raise ValueError(f"clip_fea must be [B, N, {cfg.clip_dim}] CLIP vision tokens, got {tuple(clip_fea.shape)}")
        img = self.img_emb(clip_fea.to(dt)).expand(text.shape[0], -1, -1)
        return torch.cat([img, text], dim=1), img.shape[1]

    def block_context(self, grid: tuple[int, int, int], context: torch.Tensor, n_img: int,
                      extras: dict[str, Any]) -> BlockContext:
        """Build the shared block inputs; the plain Wan model takes no audio / speaker masks."""
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise ValueError(f"{type(self).__name__} has no audio adapter; {', '.join(given)} must be None "
                             f"(load an InfiniteTalk adapter to use audio)")
        rope = rope_table_3d(grid, self.config.head_dim, context.device)
        return BlockContext(grid=grid, rope=rope, context=context, n_img=n_img)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, pt·ph·pw·C] (C fastest) -> [B, C, F·pt, H·ph, W·pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        u = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(tokens.shape[0], -1, f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                audio: Optional[torch.Tensor] = None, ref_target_masks: Optional[torch.Tensor] = None,
                audio_scale: Optional[float] = None) -> torch.Tensor:
        """Predict the flow velocity.

        x [B, 16, T, H, W] noisy latent; t [B] (or [1]) timesteps in [0, 1000]; context [B, L, text_dim] text-encoder
        output, L <= text_len (zero rows are appended up to text_len; see :func:`pad_context`);
        clip_fea [B or 1, 257, 1280] CLIP tokens (I2V); y [B, in_dim - 16, T, H, W] mask + image latent (I2V);
        audio [B, n_spk, 4(T-1)+1, window, 12, 768] wav2vec2 windows (InfiniteTalk only);
        ref_target_masks [3, H, W] speaker / speaker / background masks (InfiniteTalk only);
        audio_scale: factor on every block's audio cross-attention output (InfiniteTalk only; None = 1 = official).
        Returns [B, out_dim, T, H, W] float32. Inputs must be on the model's device (the model moves nothing);
        they are cast to the compute dtype.
        """
        tokens, grid = self.embed_video(x, y)
        e, e0 = self.embed_time(t, tokens.shape[0])
        context, n_img = self.embed_context(context, clip_fea)
        if context.shape[0] != tokens.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != latent batch {tokens.shape[0]}")
        extras = {"audio": audio, "ref_target_masks": ref_target_masks, "audio_scale": audio_scale}
        ctx = self.block_context(grid, context, n_img, extras)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx)
        return self.unpatchify(self.head(tokens, e), grid).float()
