"""Per-layer throughput, error and weight bytes of every quantization mode at the Wan2.1 14B linear shapes.

Usage (GPU): python benchmarks/linear_bench.py --out DIR
Dry run of the logic on a CPU: python benchmarks/linear_bench.py --device cpu --m 64 --shapes 64x128 --reps 1

Each row: one layer ``y = x W^T + b`` with x [M, K] bf16 and W [N, K] drawn like trained weights (Gaussian rows
whose scales spread log-uniformly over 1e-3..1e-1), timed with CUDA events (median of --reps repetitions of 3
back-to-back calls, after --warmup calls; per-call weight dequantization and activation quantization included;
the ", input quantized by its producer" rows time a layer whose input arrives quantized, as the model's norms and
GELU hand it to q/k/v, the queries and the FFN, so there the GEMM is the layer). TFLOP/s = 2 M N K / time.
Error = ||y - ref|| / ||ref|| against F.linear in float32 on the bf16 weight (the bf16 row shows bf16's own error).
bytes/weight = weight plus scale storage per weight element. Writes linear_bench.json and linear_bench.md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()
from infinitetalk.fp8_optimization import QUANT_MODES, bytes_per_weight, ops_for  # noqa: E402
from infinitetalk.quant_formats import Kernel, quantize_rows_e4m3  # noqa: E402
from infinitetalk.quant_gemm import quantize_rows  # noqa: E402

WAN_SHAPES = "5120x5120,13824x5120,5120x13824"  # N x K: attention q/k/v/o, FFN up, FFN down
INNER = 3  # back-to-back calls per timed repetition


@dataclass
class Row:
    shape: str
    variant: str
    kernel: str
    ms: float
    tflops: float
    speedup: float
    rel_error: float
    bytes_per_weight: float
    setup_s: float


def _timer(device: torch.device) -> Callable[..., float]:
    """A function timing ``fn``: median over ``reps`` of the mean of ``inner`` back-to-back calls, in ms.

    Back-to-back calls keep the GPU queue full as consecutive layers of a model do, so the host-side cost of a
    call (guards, checks, launches) overlaps the previous call's kernels instead of being counted as GPU time.
    """
    def cuda_time(fn, warmup, reps, inner=INNER):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return statistics.median(times)

    def cpu_time(fn, warmup, reps, inner=INNER):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
        return statistics.median(times)

    return cuda_time if device.type == "cuda" else cpu_time


def _problem(n: int, k: int, m: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = torch.exp(torch.empty(n, 1, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    weight = (torch.randn(n, k, device=device, generator=gen) * scales).bfloat16()
    bias = (torch.randn(n, device=device, generator=gen) * 0.01).bfloat16()
    x = torch.randn(1, m, k, device=device, generator=gen).bfloat16()
    return weight, bias, x


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.reshape(ref.shape).float()
    if not torch.isfinite(y).all():
        return math.inf
    return float((y - ref).norm() / ref.norm())


def _variants(modes: list[str]) -> list[tuple[str, str, Optional[Kernel], Optional[bool]]]:
    """(label, mode, kernel override, use_fast_accum override) per benchmarked variant."""
    rows = [(mode, mode, None, None) for mode in modes if mode != "disabled"]
    if "fp8_e4m3fn_scaled_fast" in modes:
        rows += [("fp8_e4m3fn_scaled_fast, fast_accum off", "fp8_e4m3fn_scaled_fast", None, False),
                 ("fp8_e4m3fn_scaled_fast, tensor-wise", "fp8_e4m3fn_scaled_fast", Kernel.FP8_TENSORWISE, None)]
    if "fp4_scaled_fast" in modes:
        rows.append(("fp4_scaled_fast, fast_accum off", "fp4_scaled_fast", None, False))
    return rows


def bench_shape(n: int, k: int, args, device: torch.device) -> list[Row]:
    """Every variant at one weight shape [N, K]; the bf16 row first."""
    timer, flop = _timer(device), 2.0 * args.m * n * k
    weight, bias, x = _problem(n, k, args.m, device)
    ref = F.linear(x.float(), weight.float(), bias.float())
    shape = f"{args.m}x{k} . ({n}x{k})^T"
    dense = ops_for("disabled").Linear(k, n, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
        base_ms = timer(lambda: dense(x), args.warmup, args.reps)
        rows = [Row(shape, "bf16 (disabled)", "dense", base_ms, flop / base_ms / 1e9, 1.0, _rel(dense(x), ref), 2.0, 0.0)]
        for label, mode, override, fast_accum in _variants(args.modes):
            try:
                rows.append(_bench_variant(shape, label, mode, override, fast_accum, (weight, bias, x, ref), args,
                                           (timer, flop, base_ms)))
            except (RuntimeError, ValueError) as err:
                print(f"  {label}: FAILED {type(err).__name__}: {err}", flush=True)
                rows.append(Row(shape, label, f"failed: {type(err).__name__}", math.nan, math.nan, math.nan,
                                math.nan, math.nan, 0.0))
                continue
            if override is None and fast_accum is None and rows[-1].kernel == Kernel.FP8_ROWWISE.value:
                rows.append(_bench_variant(shape, f"{label}, input quantized by its producer", mode, None, None,
                                           (weight, bias, x, ref), args, (timer, flop, base_ms), producer=True))
            for r in rows[-2 if rows[-1].variant.endswith("producer") else -1:]:
                print(f"  {r.variant:38s} {r.kernel:14s} {r.ms:8.3f} ms  x{r.speedup:5.2f}  err {r.rel_error:.4f}",
                      flush=True)
        try:
            rows += _component_rows(shape, weight, x, args, timer, flop, base_ms)
        except (RuntimeError, ValueError) as err:
            print(f"  components: FAILED {type(err).__name__}: {err}", flush=True)
    return rows


def _bench_variant(shape, label, mode, override, fast_accum, problem, args, timing, producer=False) -> Row:
    """One layer of ``mode``; ``producer``: its input comes quantized per token by the op that made it (as the
    model runs q/k/v, the cross-attention and audio queries, FFN up and FFN down), so the time is the GEMM's."""
    weight, bias, x, ref = problem
    timer, flop, base_ms = timing
    t0 = time.perf_counter()
    layer = ops_for(mode).Linear.from_weight(weight, bias)
    layer.kernel_override = override
    if fast_accum is not None:
        layer.use_fast_accum = fast_accum
    kernel = override or ops_for(mode).kernel_for(x.device)
    if producer:
        x = quantize_rows(x.reshape(-1, x.shape[-1]), layer.k_pad - layer.in_features, tuple(x.shape[:-1]))
    y = layer(x)
    setup = time.perf_counter() - t0
    ms = timer(lambda: layer(x), args.warmup, args.reps)
    return Row(shape, label, kernel.value, ms, flop / ms / 1e9, base_ms / ms, _rel(y, ref), bytes_per_weight(layer),
               setup)


def _component_rows(shape, weight, x, args, timer, flop, base_ms) -> list[Row]:
    """Where the time of the fp8 paths goes: the bare row-wise GEMM, activation quantization, weight preparation."""
    if x.device.type != "cuda" or not ops_for("fp8_e4m3fn_scaled_fast").kernel_for(x.device) is Kernel.FP8_ROWWISE:
        return []
    layer = ops_for("fp8_e4m3fn_scaled_fast").Linear.from_weight(weight)
    rows2d = x.reshape(-1, x.shape[-1])
    a, scale_a = quantize_rows_e4m3(rows2d, 0)
    w8, scale_b = layer._fp8_operands()
    gemm = timer(lambda: torch._scaled_mm(a, w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16),
                 args.warmup, args.reps)
    quant = timer(lambda: quantize_rows_e4m3(rows2d, 0), args.warmup, args.reps)
    out = [Row(shape, "  component: row-wise _scaled_mm alone", "fp8_rowwise", gemm, flop / gemm / 1e9,
               base_ms / gemm, math.nan, math.nan, 0.0),
           Row(shape, "  component: per-token e4m3 quantization", "-", quant, math.nan, math.nan, math.nan, math.nan, 0.0)]
    for mode in ("fp8_e5m2_scaled_fast", "fp4_scaled_fast"):
        prep = ops_for(mode).Linear.from_weight(weight)
        ms = timer(prep._fp8_operands, args.warmup, args.reps)
        out.append(Row(shape, f"  component: {mode} weight -> e4m3", "-", ms, math.nan, math.nan, math.nan,
                       math.nan, 0.0))
    for mode in ("fp8_e4m3fn_scaled", "fp4_scaled"):
        prep = ops_for(mode).Linear.from_weight(weight)
        ms = timer(lambda: prep.dequantized_weight(torch.bfloat16), args.warmup, args.reps)
        out.append(Row(shape, f"  component: {mode} weight -> bf16", "-", ms, math.nan, math.nan, math.nan,
                       math.nan, 0.0))
    nvfp4 = ops_for("fp4_scaled_fast").Linear.from_weight(weight)
    for label, fn, fn_args in _alternatives(rows2d, nvfp4):
        try:
            ms = timer(lambda: fn(*fn_args), args.warmup, args.reps)
        except (RuntimeError, ValueError) as err:
            print(f"  {label}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        out.append(Row(shape, f"  alternative: {label}", "-", ms, math.nan, math.nan, math.nan, math.nan, 0.0))
    return out


def _scale_rows(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaling half of the per-token quantization (the run-3 formulation: amax computed eagerly before)."""
    scale = amax.float().clamp(min=1e-12) / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def _stacked_nvfp4_to_e4m3(packed, block_scale, global_scale):
    """Previous formulation of the NVFP4 -> e4m3 conversion: nibbles split with torch.stack."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    c = codes.to(torch.int32)
    e, m = (c >> 1) & 3, (c & 1).float()
    mag = torch.where(e == 0, 0.5 * m, (2.0 + m) * torch.exp2((e - 2).float()))
    vals = torch.where((c & 8) != 0, -mag, mag).view(packed.shape[0], -1, 16) * block_scale.float()[..., None]
    row_max = block_scale.float().amax(dim=1).clamp(min=1e-12)
    mult = (448.0 / 6.0) / row_max
    w8 = (vals * mult[:, None, None]).flatten(1).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return w8, (global_scale / mult)[None, :]


def _alternatives(rows2d: torch.Tensor, nvfp4_layer) -> list[tuple[str, Callable, tuple]]:
    """Other formulations of the two hottest generated kernels, compiled the same way (dynamic token dim)."""
    x = rows2d.clone()
    torch._dynamo.maybe_mark_dynamic(x, 0)
    scale_rows = torch.compile(_scale_rows, dynamic=False)

    def two_step(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_rows(t, torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True))

    multi = torch.compile(quantize_rows_e4m3.__wrapped__, dynamic=False, options={"triton.multi_kernel": 1})
    stacked = torch.compile(_stacked_nvfp4_to_e4m3, dynamic=False)
    weights = (nvfp4_layer.weight, nvfp4_layer.weight_scale, nvfp4_layer.weight_scale_2)
    return [("per-token quantization, eager amax + compiled scaling (run 3)", two_step, (x,)),
            ("per-token quantization, inductor multi_kernel", multi, (x, 0)),
            ("per-token amax alone (eager vector_norm inf)",
             lambda t: torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True), (x,)),
            ("NVFP4 -> e4m3 with torch.stack nibbles (runs 1-2)", stacked, weights)]


def _markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| shape | variant | kernel | ms | TFLOP/s | vs bf16 | rel. error | bytes/weight |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.variant} | {r.kernel} | {r.ms:.3f} | {r.tflops:.0f} | {r.speedup:.2f}x | "
                     f"{r.rel_error:.4f} | {r.bytes_per_weight:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="folder for linear_bench.json and linear_bench.md")
    parser.add_argument("--shapes", default=WAN_SHAPES, help="comma-separated NxK weight shapes")
    parser.add_argument("--m", type=int, default=32760, help="tokens (rows of the activation)")
    parser.add_argument("--modes", default=",".join(QUANT_MODES), help="comma-separated quantization modes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        print(f"{shape} on {card}", flush=True)
        rows += bench_shape(n, k, args, device)
    header = (f"linear_bench {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {card}, "
              f"torch {torch.__version__}, M = {args.m}")
    text = _markdown(rows, header)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "linear_bench.md").write_text(text)
        (args.out / "linear_bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
