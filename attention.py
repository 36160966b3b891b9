"""Attention back-ends: one entry point, one layout contract.

Contract of every back-end returned by :func:`resolve`::

    backend(q, k, v, k_lens=None) -> out
    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (any strides), same dtype and device.
    k_lens: optional int tensor [B]: keys at positions >= k_lens[b] are ignored for batch b.
    out: [B, Lq, H, D], contiguous, dtype of q. Scale is 1/sqrt(D), no dropout, no causal mask.

The back-end owns every transpose and every ``.contiguous()`` its kernel needs; callers pass views freely.
The model receives a resolved back-end object when it is built; there is no global active back-end.
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class AttentionMode(str, enum.Enum):
    """The loader's ``attention_mode`` choices, in UI order (upstream's list, then the two added)."""

    SDPA = "sdpa"
    FLASH_ATTN_2 = "flash_attn_2"
    FLASH_ATTN_3 = "flash_attn_3"
    SAGEATTN = "sageattn"
    SAGEATTN_3 = "sageattn_3"
    RADIAL_SAGE_ATTENTION = "radial_sage_attention"
    SAGEATTN_COMPILED = "sageattn_compiled"
    SAGEATTN_ULTRAVICO = "sageattn_ultravico"
    COMFY = "comfy"
    SAGEATTN_3_FP4 = "sageattn_3_fp4"
    SAGEATTN_3_FP8 = "sageattn_3_fp8"

    @classmethod
    def parse(cls, value: str) -> "AttentionMode":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown attention_mode {value!r}; choose one of: {choices}") from None


ATTENTION_MODES = tuple(m.value for m in AttentionMode)

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A resolved attention kernel. ``requested`` is the UI mode, ``kernel`` names what really runs."""

    requested: AttentionMode
    kernel: str
    fn: KernelFn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_operands(q, k, v)
        return self.fn(q, k, v, k_lens)


def _check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, L, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")


def _key_mask(k_lens: torch.Tensor, lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [B, 1, Lq, Lk]: True where the key is kept."""
    keep = torch.arange(lk, device=device)[None, :] < k_lens.to(device)[:, None]
    return keep[:, None, None, :].expand(-1, 1, lq, lk)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch ``scaled_dot_product_attention`` in HND layout; output [B, Lq, H, D] contiguous."""
    mask = None if k_lens is None else _key_mask(k_lens, q.shape[1], k.shape[1], q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).contiguous()


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain softmax(q kᵀ / sqrt(D)) v in float32 (reference path for CPU tests)."""
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    logits = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        logits = logits.masked_fill(~_key_mask(k_lens, q.shape[1], k.shape[1], q.device), float("-inf"))
    out = torch.matmul(logits.softmax(dim=-1), vf)
    return out.transpose(1, 2).to(q.dtype).contiguous()


_KERNELS: dict[str, KernelFn] = {"sdpa": sdpa_attention, "math": math_attention}
_fallbacks_logged: set[tuple[str, str]] = set()


def _log_fallback_once(requested: AttentionMode, kernel: str, reason: str) -> None:
    key = (requested.value, kernel)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        log.warning("attention_mode %s is not available (%s); running %s instead", requested.value, reason, kernel)


def resolve(mode: str | AttentionMode, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """Choose the kernel for ``mode`` on ``device``/``dtype``; log once when a fallback is taken."""
    requested = mode if isinstance(mode, AttentionMode) else AttentionMode.parse(mode)
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        kernel = "math"
    else:
        kernel = "sdpa"
    if requested not in (AttentionMode.SDPA, AttentionMode.COMFY):
        _log_fallback_once(requested, kernel, "this back-end is not implemented yet")
    return AttentionBackend(requested=requested, kernel=kernel, fn=_KERNELS[kernel])
