"""8-bit attention in Triton for sm_90 (a helper kernel module of :mod:`attention`).

Recipe (SageAttention-2-like): Q·Kᵀ in INT8 with one scale per 64 query rows and per 64 key rows of each head
(K minus its mean over the sequence first, which leaves softmax unchanged), softmax in base 2 in float32, P·V in
FP8 e4m3 (P scaled by 448, V with one scale per channel) with float32 accumulation promoted after every key block
(``max_num_imprecise_acc``). ``attention.resolve`` uses it only after its self-test against float32 math passes
and only where it beats the next exact kernel.

P·V is computed transposed, as Oᵀ += Vᵀ·Pᵀ, so the FP8 P tile is the shared-memory operand of the GEMM. With P
as the register operand (O += P·V), Triton 3.6 on an H200 returned non-finite outputs for every tile configuration
tried, while the same kernel was exact under the interpreter (benchmarks/RESULTS.md, attention section).

    fp8_attention(q, k, v) -> out
    q [B, Lq, H, D], k/v [B, Lk, H, D]: fp16/bf16, NHD, contiguous, D in {64, 128}; out [B, Lq, H, D] in q's dtype.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (numerics checks without a GPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SCALE_ROWS = 64  # rows of one Q or K scale block (per head)
PAD = 128  # sequence padding of the quantized buffers (a multiple of every BLOCK_M / BLOCK_N below)
LOG2E = 1.4426950408889634
FP8_MAX = 448.0


@triton.jit
def _quant_int8(X, Out, Scale, Mean, L, LP, H, stride_b, stride_l, stride_h, multiplier,
                D: tl.constexpr, ROWS: tl.constexpr, SMOOTH: tl.constexpr):
    """One program: ROWS rows of one (b, h) of X [B, L, H, D] -> int8 Out [B, H, LP, D], Scale [B, H, LP/ROWS]."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    valid = rows[:, None] < L
    x = tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_l + cols[None, :], mask=valid,
                other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(valid, x - tl.load(Mean + bh * D + cols)[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30) / 127.0
    y = x / scale
    q = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
    tl.store(Out + bh * LP * D + rows[:, None] * D + cols[None, :], q)
    tl.store(Scale + bh * (LP // ROWS) + blk, scale * multiplier)


@triton.jit
def _quant_v_fp8(V, Out, VScale, L, LP, H, stride_b, stride_l, stride_h, D: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows of one (b, h) of V [B, L, H, D] divided by VScale [B, H, D] -> e4m3 Out [B, H, D, LP] (Vᵀ)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    x = tl.load(V + b * stride_b + h * stride_h + rows[:, None] * stride_l + cols[None, :],
                mask=rows[:, None] < L, other=0.0).to(tl.float32)
    y = x / tl.load(VScale + bh * D + cols)[None, :]
    tl.store(Out + bh * D * LP + cols[None, :] * LP + rows[:, None], y.to(tl.float8e4nv))


@triton.jit
def _attn_blocks(acc_t, l_i, m_i, q, q_scale, K, Vt, KS, bh, lo, hi, Lk, LKP,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, MASK: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of head ``bh``, accumulating Oᵀ [D, BLOCK_M]; keys >= Lk masked
    when MASK."""
    cols = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + bh * LKP * D + keys[:, None] * D + cols[None, :])
        k_scale = tl.load(KS + bh * (LKP // ROWS) + keys // ROWS)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        if MASK:
            s = tl.where(keys[None, :] < Lk, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p8 = (tl.math.exp2(s - m_new[:, None]) * 448.0).to(tl.float8e4nv)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p8.to(tl.float32), 1)
        vt = tl.load(Vt + bh * D * LKP + cols[:, None] * LKP + keys[None, :])
        acc_t = tl.dot(vt, tl.trans(p8), acc_t * alpha[None, :], max_num_imprecise_acc=BLOCK_N)
        m_i = m_new
    return acc_t, l_i, m_i


@triton.jit
def _attn_fwd(Q, QS, K, KS, Vt, VS, Out, Lq, Lk, LQP, LKP, H, stride_ob, stride_ol, stride_oh, LEN_KEY,
              D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h); writes Out [B, Lq, H, D] (NHD strides)."""
    start, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = start * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q = tl.load(Q + bh * LQP * D + rows[:, None] * D + cols[None, :])
    q_scale = tl.load(QS + bh * (LQP // ROWS) + rows // ROWS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([D, BLOCK_M], tl.float32)
    full = (Lk // BLOCK_N) * BLOCK_N
    acc_t, l_i, m_i = _attn_blocks(acc_t, l_i, m_i, q, q_scale, K, Vt, KS, bh, 0, full, Lk, LKP, D, BLOCK_N,
                                   ROWS, False)
    if full < Lk:
        acc_t, l_i, m_i = _attn_blocks(acc_t, l_i, m_i, q, q_scale, K, Vt, KS, bh, full, full + BLOCK_N, Lk,
                                       LKP, D, BLOCK_N, ROWS, True)
    v_scale = tl.load(VS + bh * D + cols)
    out = tl.trans(acc_t) * v_scale[None, :] / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + cols[None, :],
             out.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)


_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 3))]
_attn_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["D", "LEN_KEY"])(_attn_fwd)
_INTERPRETER_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64}


def _interpreting() -> bool:
    return bool(getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret)


def _quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """INT8 Q and K [B, H, LP, D] with per-64-row scales (Q's carries softmax scale · log2 e), e4m3 Vᵀ
    [B, H, D, LKP] and its per-channel scales [B, H, D]."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    lqp, lkp = triton.cdiv(lq, PAD) * PAD, triton.cdiv(lk, PAD) * PAD
    dev = q.device
    qi = torch.empty(b, h, lqp, d, dtype=torch.int8, device=dev)
    ki = torch.empty(b, h, lkp, d, dtype=torch.int8, device=dev)
    qs = torch.empty(b, h, lqp // SCALE_ROWS, dtype=torch.float32, device=dev)
    ks = torch.empty(b, h, lkp // SCALE_ROWS, dtype=torch.float32, device=dev)
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()
    v_scale = (torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32) / FP8_MAX).clamp_min(1e-30)
    v_scale = v_scale.contiguous()
    vt = torch.empty(b, h, d, lkp, dtype=torch.float8_e4m3fn, device=dev)
    sm = LOG2E / math.sqrt(d)
    _quant_int8[(lqp // SCALE_ROWS, b * h)](q, qi, qs, qs, lq, lqp, h, q.stride(0), q.stride(1), q.stride(2), sm,
                                            D=d, ROWS=SCALE_ROWS, SMOOTH=False)
    _quant_int8[(lkp // SCALE_ROWS, b * h)](k, ki, ks, k_mean, lk, lkp, h, k.stride(0), k.stride(1), k.stride(2),
                                            1.0, D=d, ROWS=SCALE_ROWS, SMOOTH=True)
    _quant_v_fp8[(lkp // SCALE_ROWS, b * h)](v, vt, v_scale, lk, lkp, h, v.stride(0), v.stride(1), v.stride(2),
                                             D=d, ROWS=SCALE_ROWS)
    return qi, qs, ki, ks, vt, v_scale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v with 8-bit operands. q [B, Lq, H, D], k/v [B, Lk, H, D] fp16/bf16 NHD
    contiguous, D in {64, 128}; returns [B, Lq, H, D] contiguous in q's dtype."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if d not in (64, 128) or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp8_attention takes fp16/bf16 with head dim 64 or 128, got {q.dtype} and {d}")
    qi, qs, ki, ks, vt, v_scale = _quantize(q, k, v)
    out = torch.empty_like(q)
    args = (qi, qs, ki, ks, vt, v_scale, out, lq, lk, qi.shape[2], ki.shape[2], h, out.stride(0), out.stride(1),
            out.stride(2), min(triton.next_power_of_2(lk), 16384))
    if _interpreting():
        grid = (qi.shape[2] // _INTERPRETER_CONFIG["BLOCK_M"], b * h)
        _attn_fwd[grid](*args, D=d, ROWS=SCALE_ROWS, **_INTERPRETER_CONFIG)
    else:
        _attn_fwd_tuned[lambda meta: (qi.shape[2] // meta["BLOCK_M"], b * h)](*args, D=d, ROWS=SCALE_ROWS)
    return out
