"""Time, TFLOP/s and error of every attention mode (and every torch / pack kernel) at the Wan2.1 14B shapes.

Usage (GPU): python benchmarks/attention_bench.py            (writes attention_bench.md/.json to $OUT if set)
Dry run of the logic on a CPU: python benchmarks/attention_bench.py --device cpu --tokens 300 --heads 2 --reps 1

Each row: self-attention q, k, v = [1, L, H, 128] bf16, contiguous NHD (the model's layout), L = 32760 (480p, 81
frames) and 75600 (720p), H = 40. Time: median of --reps CUDA-event timings of one call after --warmup calls (the
first call of a kernel compiles / tunes). TFLOP/s = 4·H·L²·D / time. rel. error = ‖out − ref‖ / ‖ref‖ over
--ref-rows query rows spread over the sequence, ref = softmax(q kᵀ/√D) v in float32 from the same bf16 inputs.
Inputs: "gaussian" q, k, v ~ N(0, 1); "outliers": the same with 4 of the 128 channels of q and k scaled by 5 (as
real activations have a few large channels). "vs cuDNN": speed relative to the sdpa_cudnn row of the same inputs.
Mode rows show the kernel ``attention.resolve`` picked for the mode on this card; modes that share a kernel share
its measurement.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()
from infinitetalk import attention as A  # noqa: E402
from infinitetalk.attention import ATTENTION_MODES, AttentionMode, build_backend, resolve  # noqa: E402

# kernels timed on their own as well (when this card and install can run them): the torch back-ends, the pack's own
EXTRA_KERNELS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn_3", "flash_attn_2", "sage2", "sage1",
                 "triton_fp8")
OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 5.0


@dataclass
class Row:
    tokens: int
    inputs: str
    label: str
    kernel: str
    ms: float
    tflops: float
    vs_cudnn: float
    rel_error: float


def make_inputs(tokens: int, heads: int, dim: int, kind: str, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, dim, generator=gen, device=device, dtype=torch.float32)
               for _ in range(3))
    if kind == "outliers":
        q[..., :OUTLIER_CHANNELS] *= OUTLIER_SCALE
        k[..., :OUTLIER_CHANNELS] *= OUTLIER_SCALE
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def reference_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """float32 attention output of the selected query rows: [1, len(rows), H, D]."""
    return A.math_attention(q[:, rows].float(), k.float(), v.float())


def time_call(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def candidates(device: torch.device) -> list[tuple[str, A.AttentionBackend]]:
    """(label, back-end): every UI mode, then every extra kernel this card and install can run on its own."""
    out = [(f"mode {mode}", resolve(mode, device, torch.bfloat16)) for mode in ATTENTION_MODES]
    for name in EXTRA_KERNELS:
        spec = A._KERNELS[name]
        why = A._unavailable(spec, device, torch.bfloat16, True)
        if why is None:
            out.append((f"kernel {name}", build_backend(AttentionMode.SAGEATTN, (spec, A._KERNELS["sdpa"]))))
        else:
            print(f"  kernel {name}: not run ({why})", flush=True)
    return out


def bench_inputs(tokens: int, kind: str, args, device: torch.device) -> list[Row]:
    q, k, v = make_inputs(tokens, args.heads, args.head_dim, kind, device)
    rows_idx = torch.linspace(0, tokens - 1, min(args.ref_rows, tokens), device=device).long()
    ref = reference_rows(q, k, v, rows_idx)
    flop = 4.0 * args.heads * tokens * tokens * args.head_dim
    measured: dict[str, tuple[float, float]] = {}
    rows = []
    for label, backend in candidates(device):
        kernel = backend.kernel_for(q, k, v)
        if kernel not in measured:
            try:
                out = backend(q, k, v)
                err = A.relative_error(out[:, rows_idx], ref)
                del out
                measured[kernel] = (time_call(lambda: backend(q, k, v), device, args.warmup, args.reps), err)
            except (RuntimeError, ValueError) as failure:
                print(f"  {label}: FAILED {type(failure).__name__}: {failure}", flush=True)
                measured[kernel] = (math.nan, math.nan)
        ms, err = measured[kernel]
        rows.append(Row(tokens, kind, label, kernel, ms, flop / ms / 1e9, math.nan, err))
        print(f"  {tokens:6d} {kind:9s} {label:34s} {kernel:16s} {ms:9.2f} ms {flop / ms / 1e9:7.0f} TFLOP/s "
              f"err {err:.4f}", flush=True)
    cudnn = measured.get("sdpa_cudnn", (math.nan, math.nan))[0]
    for row in rows:
        row.vs_cudnn = cudnn / row.ms
    return rows


def environment(device: torch.device) -> list[str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    card = (f"{torch.cuda.get_device_name(device)} (cc {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
            if device.type == "cuda" else "CPU (dry run)")
    return [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- card: {card}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"triton {version('triton')}",
            f"- sageattention {version('sageattention')}, sageattn3 {version('sageattn3')}, "
            f"flash-attn {version('flash-attn')}, flash_attn_3 {version('flash_attn_3')}",
            f"- command: {' '.join(sys.argv)}"]


def markdown(rows: list[Row], env: list[str]) -> str:
    lines = ["## attention_bench: attention kernels at the Wan2.1 14B shapes (issue 5)", "", *env, "",
             "| tokens | inputs | mode / kernel | runs | ms | TFLOP/s | vs cuDNN | rel. error |",
             "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.tokens} | {r.inputs} | {r.label} | {r.kernel} | {r.ms:.2f} | {r.tflops:.0f} | "
                     f"{r.vs_cudnn:.2f}x | {r.rel_error:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", default="32760,75600", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--inputs", default="gaussian,outliers")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ref-rows", type=int, default=2048, help="query rows of the float32 reference")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for attention_bench.md/.json")
    args = parser.parse_args()
    device = A._normalise(args.device)
    env = environment(device)
    print("\n".join(env), flush=True)
    rows = []
    with torch.inference_mode():
        for tokens in (int(t) for t in args.tokens.split(",")):
            for kind in args.inputs.split(","):
                rows += bench_inputs(tokens, kind, args, device)
    text = markdown(rows, env)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_bench.md").write_text(text)
        (out / "attention_bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
