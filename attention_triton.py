"""8-bit attention in Triton for sm_90 (a helper kernel module of :mod:`attention`).

Recipe (SageAttention-2-like: INT8 Q·Kᵀ, FP8 P·V):

- Q: INT8 with one scale per row; 1/√D and log2 e are folded into Q's per-row factor. K: minus its mean over the
  whole sequence (every score of a query row moves by the same amount, so softmax is unchanged; and a row's scores
  then average to 0, so its largest is >= 0 up to rounding), INT8 with one scale per block of 128 keys (the kernel's key tile), so
  a block of small keys keeps its resolution next to large ones. V: e4m3 with one scale per channel, stored
  transposed (Vᵀ, keys contiguous).
- Kernel: online softmax in base 2 in float32. The int32 scores are read as float32 by adding the bits of 1.5·2²³
  (exact for |score| < 2²²), so no int-to-float instruction runs. Per key tile, c = Q's row factor · the block's K
  scale (per row) turns an offset score f into the real score (f − 1.5·2²³)·c; the running max m is kept in real
  units and P = 448·2^(f·c − (1.5·2²³·c + m − log2 448)) costs one FMA per score. P rounded to e4m3 is the
  register operand of the e4m3 P·V GEMM, whose fresh float32 result is added to the rescaled accumulator
  (two-level accumulation); l sums the float32 P.
- Sequences are padded to 128 with zero rows and the loop runs over whole key blocks: a padded key scores exactly
  real 0 (so it never raises m above a row's real maximum, which is >= 0), its P is known from the last tile's
  numbers and is removed from l at the end (no masked tail block).
- Kernel tiling: 64 query rows per program (4 warps, one warp group; two programs per SM), 128-key tiles, 3 pipeline
  stages. Each program quantizes its own Q rows before the key loop (Q is never written back). The loop is software
  pipelined: it issues tile j+1's Q·Kᵀ before tile j's softmax (the last tile's scores are computed once more and not
  used). P's columns are permuted so that the P·V GEMM takes P from the score registers without shuffles (Vᵀ is
  stored in the matching key order).
- Quantization: one pass over K and V for statistics (K channel sum, V channel max |v|), one tiny kernel reducing
  them per head, then one pass each writing K (and its block scales) and Vᵀ.

    fp8_attention(q, k, v) -> out
    q [B, Lq, H, D], k/v [B, Lk, H, D]: fp16/bf16, NHD with a contiguous last dim, D in {64, 128};
    out [B, Lq, H, D] contiguous in q's dtype.

``attention.resolve`` uses it only after its self-test against float32 math passes and only where it beats the
next exact kernel. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (numerics checks without a
GPU); there e4m3 rounding is done in float32 bits first, because the interpreter's own cast rounds wrongly.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

PAD = 128  # key padding of the quantized buffers: the kernel's key tile and the block of the K scales
LOG2E = 1.4426950408889634
STATS_ROWS, STATS_STEPS = 64, 16  # the statistics pass: rows per step, steps per program
FP8_MAX = tl.constexpr(448.0)
INT8_MAX = tl.constexpr(127.0)
LOG2_FP8_MAX = tl.constexpr(math.log2(448.0))  # P = 448 · 2^(s − m): the full e4m3 range
MAGIC_I = tl.constexpr(0x4B400000)  # bits of 1.5·2²³: int32 s + MAGIC_I read as float32 is 1.5·2²³ + s
MAGIC_F = tl.constexpr(12582912.0)
M_START = tl.constexpr(-1.0e30)  # the running max before the first tile: finite, so exp2(M_START − m) is 0, no NaN


# the kernel's tiling. H100, Triton 3.6, self-attention [1, L, 40, 128] (2026-11-26): this software-pipelined 64 x 128
# form beat the former warp-specialized 128 x 128 form (a TMA producer and two consumer warp groups) at 32760 and at
# 75600 keys, and a sweep of block_m 64/128, 4/8 warps and 2-4 stages found nothing faster
BLOCK_M, WARPS, STAGES = 64, 4, 3


@dataclass(frozen=True)
class Quantized:
    """The attention kernel's operands (LKP: Lk padded to a multiple of 128; padded rows are zero). ``q``: the
    caller's q [B, Lq, H, D] (fp16/bf16, not copied); the kernel quantizes each row to INT8 with one scale per row
    (:func:`_quant_rows`, factor = row scale · log2 e / √D) before its key loop. ``k`` INT8 [B·H, LKP, D] of K minus
    its mean over the Lk keys, over ``k_scale``; ``k_scale`` float32 [B·H, LKP / 128] = max |k − mean| over the
    block's real keys / 127 (a block of zeros: a tiny positive floor); ``vt`` e4m3 [B·H, D, LKP] (Vᵀ over
    ``v_scale``, keys permuted as :func:`_perm_p`); ``v_scale`` float32 [B·H, D]. A real base-2 score is q · k (as
    integers) · Q's row factor · k_scale[key // 128]."""

    q: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    vt: torch.Tensor
    v_scale: torch.Tensor


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _to_fp8(x, INTERP: tl.constexpr):
    """x (|x| <= 448) -> e4m3, round to nearest even. INTERP: rounded in float32 bits first (subnormals: to
    multiples of 2⁻⁹ by adding 1.5·2¹⁴)."""
    if INTERP:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 0.015625, (x + 24576.0) - 24576.0, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_int8(y):
    """y (|y| <= 127) -> INT8, round half away from zero."""
    return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)


@triton.jit
def _perm_p(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Columns of x [ROWS, COLS] reordered: in every 32, column 16h + 4q + 2a + b takes column 16h + 8a + 2q + b.
    For P this makes the wgmma accumulator layout of the scores, register for register, the 8-bit A-operand
    layout of the P·V GEMM (no shuffles); Vᵀ is stored in the same key order."""
    return tl.reshape(tl.permute(tl.reshape(x, [ROWS, COLS // 32, 2, 2, 4, 2]), [0, 1, 2, 4, 3, 5]), [ROWS, COLS])


@triton.jit
def _load_rows(X, bh, H, rows, L, sb, sl, sh, D: tl.constexpr):
    """float32 tile [len(rows), D] of head ``bh`` (= b·H + h) of X [B, L, H, D] (strides sb, sl, sh; last dim
    contiguous); rows >= L read as zero."""
    b, h = (bh // H).to(tl.int64), bh % H
    cols = tl.arange(0, D)
    x = tl.load(X + b * sb + h * sh + rows[:, None] * sl + cols[None, :], mask=rows[:, None] < L, other=0.0)
    return x.to(tl.float32)


# ------------------------------------------------------------------------------------------------ quantization
@triton.jit
def _kv_stats(K, V, Part, Lk, H, skb, skl, skh, svb, svl, svh, D: tl.constexpr, ROWS: tl.constexpr,
              STEPS: tl.constexpr):
    """Program (blk, b·h): ROWS·STEPS rows of K and V [B, Lk, H, D] -> Part [B·H, NB, 2, D] (K channel sum, V
    channel max |v|)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_max = tl.zeros([D], tl.float32)
    for step in range(STEPS):
        rows = (blk * STEPS + step) * ROWS + tl.arange(0, ROWS)
        k_sum += tl.sum(_load_rows(K, bh, H, rows, Lk, skb, skl, skh, D), 0)
        v_max = tl.maximum(v_max, tl.max(tl.abs(_load_rows(V, bh, H, rows, Lk, svb, svl, svh, D)), 0))
    out = Part + (bh.to(tl.int64) * tl.num_programs(0) + blk) * 2 * D + cols
    tl.store(out, k_sum)
    tl.store(out + D, v_max)


@triton.jit
def _kv_reduce(Part, KMean, VScale, Lk, NB, D: tl.constexpr):
    """Program b·h: Part [B·H, NB, 2, D] -> KMean [B·H, D] and VScale [B·H, D] (max |v| / 448)."""
    bh = tl.program_id(0)
    cols = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_max = tl.zeros([D], tl.float32)
    for i in range(NB):
        part = Part + (bh * NB + i) * 2 * D + cols
        k_sum += tl.load(part)
        v_max = tl.maximum(v_max, tl.load(part + D))
    tl.store(KMean + bh * D + cols, k_sum / Lk)
    tl.store(VScale + bh * D + cols, tl.maximum(v_max, 1e-30) / FP8_MAX)


@triton.jit
def _quant_rows(x, mult):
    """x float32 [R, D] -> (INT8 [R, D] with one scale per row, float32 [R] factor = row scale · mult); the scale is
    max |x| / 127 over the row (a row of zeros: 1e-30 / 127)."""
    amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-30)
    return _to_int8(x * ((1.0 / amax) * INT8_MAX)[:, None]), amax / INT8_MAX * mult


@triton.jit
def _quant_k(X, Out, KMean, KScale, L, LP, H, sb, sl, sh, D: tl.constexpr, ROWS: tl.constexpr):
    """Program (blk, b·h): block ``blk`` of ROWS keys of K [B, L, H, D] minus KMean[b·h] -> KScale[b·h, blk]
    (max |k − mean| over the block's keys < L, over 127; floor 1e-30 / 127) and INT8 Out [B·H, LP, D] (rows >= L
    zero)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    y = _load_rows(X, bh, H, rows, L, sb, sl, sh, D) - tl.load(KMean + bh * D + cols)[None, :]
    y = tl.where(rows[:, None] < L, y, 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(y), 1), 0), 1e-30)
    tl.store(KScale + bh * tl.num_programs(0) + blk, amax / INT8_MAX)
    y = tl.minimum(tl.maximum(y * (INT8_MAX / amax), -INT8_MAX), INT8_MAX)
    tl.store(Out + (bh.to(tl.int64) * LP + rows[:, None]) * D + cols[None, :], _to_int8(y))


@triton.jit
def _quant_v(X, Out, VScale, L, LP, H, sb, sl, sh, D: tl.constexpr, ROWS: tl.constexpr, INTERP: tl.constexpr):
    """Program (blk, b·h): ROWS rows of V [B, L, H, D] over VScale[b·h] (per channel) -> e4m3 Vᵀ Out [B·H, D, LP]
    in the key order of :func:`_perm_p` (keys >= L zero)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    y = _load_rows(X, bh, H, rows, L, sb, sl, sh, D) / tl.load(VScale + bh * D + cols)[None, :]
    y = _to_fp8(tl.trans(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)), INTERP)
    y = _perm_p(y, D, ROWS)
    tl.store(Out + (bh.to(tl.int64) * D + cols[:, None]) * LP + rows[None, :], y)


# ------------------------------------------------------------------------------------------------ attention
@triton.jit
def _attn_fwd(Q, K, KS, Vt, VScale, Out, OutScale, Lq, Lk, LKP, H, sqb, sql, sqh, sob, sol, soh, qmult,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERP: tl.constexpr):
    """Program (BM query rows, b·h) over the operands of :class:`Quantized` (Q: the caller's q [B, Lq, H, D] with
    strides sqb, sql, sqh, quantized here with :func:`_quant_rows`, factor · ``qmult``; K: k, KS: k_scale, Vt: vt,
    VScale: v_scale; BN = the K scale's block); writes Out [B, Lq, H, D] (strides sob, sol, soh). OutScale: None,
    or a float32 pointer to the one scale of an e4m3 Out (Out = output / scale, saturated to ±448)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    nbh = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    k_desc = tl.make_tensor_descriptor(K, [nbh * LKP, D], [D, 1], [BN, D])
    v_desc = tl.make_tensor_descriptor(Vt, [nbh * D, LKP], [LKP, 1], [D, BN])
    q, qs = _quant_rows(_load_rows(Q, bh, H, rows, Lq, sqb, sql, sqh, D), qmult)
    k_scales = KS + bh * (LKP // BN)
    last = LKP // BN - 1
    ks = tl.load(k_scales)  # the K scale of the tile whose scores are in s
    s = tl.dot(q, tl.trans(k_desc.load([bh * LKP, 0])))  # int32 scores of the first tile
    m_i = tl.full([BM], M_START, tl.float32)  # running max of the real base-2 scores
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in tl.range(0, LKP, BN):
        # per row: c, the real base-2 score of one integer unit; −1.5·2²³·c; log2 448 − 1.5·2²³·c (off the score path)
        c = qs * ks
        neg_off, bias = c * -MAGIC_F, tl.fma(c, -MAGIC_F, LOG2_FP8_MAX)
        nxt = tl.minimum(start // BN + 1, last)  # the next tile; after the last, the last again (scores unused)
        ks = tl.load(k_scales + nxt)
        f = (s + MAGIC_I).to(tl.float32, bitcast=True)  # = 1.5·2²³ + score, exact
        s = tl.dot(q, tl.trans(k_desc.load([bh * LKP + nxt * BN, 0])))  # issued before this tile's softmax
        m_new = tl.maximum(m_i, tl.fma(tl.max(f, 1), c, neg_off))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(tl.fma(f, c[:, None], (bias - m_new)[:, None]))  # 448 · 2^(score − m)
        l_i = l_i * alpha + tl.sum(p, 1)
        p8 = _perm_p(_to_fp8(p, INTERP), BM, BN)
        acc = acc * alpha[:, None] + tl.dot(p8, v_desc.load([bh * D, start]).T)
        m_i = m_new
    # the padded keys (zero rows of K and V, all in the last tile) scored f = 1.5·2²³ there: remove their P from l,
    # computed from the last tile's c (ks is still its scale) and the final m as in the loop, bit for bit. Real 0 is
    # part of that tile's max, so this P is at most ~448; without padded keys it is not used (it would overflow if m
    # were far below 0).
    c = qs * ks
    pad_p = tl.math.exp2(tl.fma(tl.full([BM], MAGIC_F, tl.float32), c, tl.fma(c, -MAGIC_F, LOG2_FP8_MAX) - m_i))
    l_i = tl.where(LKP > Lk, l_i - (LKP - Lk) * pad_p, l_i)
    cols = tl.arange(0, D)
    v_scale = tl.load(VScale + bh * D + cols)
    if OutScale is not None:
        v_scale = v_scale / tl.load(OutScale)
    out = acc * (v_scale[None, :] / l_i[:, None])
    if OutScale is not None:
        out = _to_fp8(tl.minimum(tl.maximum(out, -FP8_MAX), FP8_MAX), INTERP)
    b, h = (bh // H).to(tl.int64), bh % H
    tl.store(Out + b * sob + h * soh + rows[:, None] * sol + cols[None, :], out.to(Out.dtype.element_ty),
             mask=rows[:, None] < Lq)


# ------------------------------------------------------------------------------------------------ host side
def _interpreting() -> bool:
    return bool(getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret)


def _padded(n: int) -> int:
    return triton.cdiv(n, PAD) * PAD


def _q_mult(head_dim: int) -> float:
    """Q's row factor per unit of row scale: log2 e / √D (base-2 softmax of q·k / √D)."""
    return LOG2E / math.sqrt(head_dim)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Quantized:
    """The operands (:class:`Quantized`) of q [B, Lq, H, D], k/v [B, Lk, H, D] (last dim contiguous)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    lkp, bh, dev = _padded(lk), b * h, q.device
    nb = triton.cdiv(lk, STATS_ROWS * STATS_STEPS)
    part = torch.empty(bh, nb, 2, d, dtype=torch.float32, device=dev)
    _kv_stats[(nb, bh)](k, v, part, lk, h, *k.stride()[:3], *v.stride()[:3], D=d, ROWS=STATS_ROWS,
                        STEPS=STATS_STEPS, num_warps=4)
    k_mean, v_scale = (torch.empty(bh, d, dtype=torch.float32, device=dev) for _ in range(2))
    _kv_reduce[(bh,)](part, k_mean, v_scale, lk, nb, D=d, num_warps=1)
    ki = torch.empty(bh, lkp, d, dtype=torch.int8, device=dev)
    k_scale = torch.empty(bh, lkp // PAD, dtype=torch.float32, device=dev)
    _quant_k[(lkp // PAD, bh)](k, ki, k_mean, k_scale, lk, lkp, h, *k.stride()[:3], D=d, ROWS=PAD, num_warps=8)
    vt = torch.empty(bh, d, lkp, dtype=torch.float8_e4m3fn, device=dev)
    _quant_v[(lkp // PAD, bh)](v, vt, v_scale, lk, lkp, h, *v.stride()[:3], D=d, ROWS=PAD, INTERP=_interpreting(),
                               num_warps=8)
    return Quantized(q, ki, k_scale, vt, v_scale)


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global memory Triton asks for at launch (the kernel's TMA descriptors), on the current CUDA device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attend(t: Quantized, lk: int, out: torch.Tensor, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the quantized operands ``t`` (``lk`` real keys), written into ``out`` [B, Lq, H, D] (last dim
    contiguous); returns out. ``out_scale``: for an e4m3 ``out``, a float32 tensor whose first element is the scale
    (out = attention output / scale, saturated)."""
    bh, lkp, d = t.k.shape

    def launch():
        triton.set_allocator(_scratch)  # runs in a copy of the caller's context: its allocator stays as it was
        _attn_fwd[(triton.cdiv(out.shape[1], BLOCK_M), bh)](
            t.q, t.k, t.k_scale, t.vt, t.v_scale, out, out_scale, out.shape[1], lk, lkp, out.shape[2],
            *t.q.stride()[:3], *out.stride()[:3], _q_mult(d), D=d, BM=BLOCK_M, BN=PAD, INTERP=_interpreting(),
            num_warps=WARPS, num_stages=STAGES)

    contextvars.copy_context().run(launch)
    return out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √D) v with 8-bit operands. q [B, Lq, H, D], k/v [B, Lk, H, D]: fp16/bf16 on one device,
    NHD with a contiguous last dim, D in {64, 128}. Returns [B, Lq, H, D] contiguous in q's dtype."""
    _check(q, k, v)
    with _running_on(q.device):
        return attend(quantize(q, k, v), k.shape[1], torch.empty(q.shape, dtype=q.dtype, device=q.device))


def fp8_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_attention` written as the e4m3 activations of an fp8 row-wise GEMM (the output projection):
    (data e4m3 [B, Lq, H, D] contiguous, scale float32 [B·Lq, 1] contiguous), output ≈ data · scale per row.

    One scale for every row: max |v| over the whole call / 448. An attention output is a convex combination of its
    values, so |output| <= max |v| per head and channel, and data needs no pass over the output to find its range
    (rounding of P can put a value a few percent above it: saturated). e4m3 keeps its 3 significant bits down to
    1/28672 of that range (2⁻⁶ against 448), so a row far smaller than the largest v loses little against a per-row
    scale."""
    _check(q, k, v)
    with _running_on(q.device):
        t = quantize(q, k, v)
        scale = t.v_scale.amax().reshape(1, 1)  # v_scale: max |v| / 448 per head and channel
        data = attend(t, k.shape[1], torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device), scale)
    return data, scale.expand(q.shape[0] * q.shape[1], 1).contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    b, lq, h, d = q.shape
    if d not in (64, 128) or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp8_attention takes fp16/bf16 with head dim 64 or 128, got {q.dtype} and {d}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d) or k.shape[1] < 1:
        raise ValueError(f"fp8_attention needs k and v [B, Lk >= 1, H, D] matching q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if {t.dtype for t in (q, k, v)} != {q.dtype} or {t.device for t in (q, k, v)} != {q.device}:
        raise ValueError("fp8_attention needs q, k, v of one dtype on one device")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("fp8_attention needs q, k, v with a contiguous last dim; call .contiguous() first")


@contextlib.contextmanager
def _running_on(device: torch.device):
    """Triton launches on the current CUDA device: make it ``device``. A Triton compile or resource failure becomes a
    RuntimeError, which the caller's fallback handles."""
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    except TritonError as err:
        raise RuntimeError(f"the Triton 8-bit attention kernel cannot run here ({type(err).__name__}: {err})") from err
