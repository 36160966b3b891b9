"""The fp8 `_fast` producers at the Wan2.1 14B shapes: a per-token step and the per-token e4m3 quantization of its
output as one quant_triton pass, against the step as a generated kernel followed by quantize_rows_e4m3 (what runs
when the step cannot quantize for its consumer), per Triton warp count.

Usage (CUDA GPU with e4m3, compute capability 8.9+): python benchmarks/producer_quant_bench.py [--out DIR]
Steps: LayerNorm + modulation of x [1, 32760, 5120] bf16 (norm1 / norm2 before q/k/v and FFN up), the tanh GELU of
one FFN chunk [1, 8192, 13824], and the cross-attention's text + image output sum [1, 32760, 5120] before its o
projection (eager add then quantization, against both in one generated function, and against
quant_triton.sum_e4m3). Time: CUDA events, mean of --reps calls after 3 warm-up calls. Writes producer_quant_bench.md
to --out.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()
from infinitetalk import quant_triton as QT  # noqa: E402
from infinitetalk.compiled_kernels import fused  # noqa: E402
from infinitetalk.quant_formats import quantize_rows_e4m3  # noqa: E402
from infinitetalk.quant_gemm import quantized_output  # noqa: E402


@fused(dynamic_rows=True)
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = F.layer_norm(x.float(), x.shape[-1:], None, None, 1e-6).to(x.dtype)
    return (y.float() * (1 + scale) + shift).to(x.dtype)


@fused(dynamic_rows=True)
def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h.float(), approximate="tanh").to(h.dtype)


def attention_sum(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return text + image


def cuda_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    x = torch.randn(1, 32760, 5120, device="cuda").bfloat16()
    shift, scale = (torch.randn(1, 1, 5120, device="cuda") for _ in range(2))
    h = torch.randn(1, 8192, 13824, device="cuda").bfloat16()
    y = torch.randn(1, 32760, 5120, device="cuda").bfloat16()
    rows = [("LayerNorm + modulation, then quantization (2 generated kernels)",
             cuda_ms(lambda: quantize_rows_e4m3(layer_norm_modulate(x, shift, scale).reshape(-1, 5120), 0), opts.reps)),
            ("GELU, then quantization (2 generated kernels)",
             cuda_ms(lambda: quantize_rows_e4m3(gelu_tanh(h).reshape(-1, 13824), 0), opts.reps)),
            ("attention sum (eager add), then quantization (generated kernel)",
             cuda_ms(lambda: quantize_rows_e4m3((x + y).reshape(-1, 5120), 0), opts.reps)),
            ("attention sum quantized in one generated function",
             cuda_ms(lambda: quantized_output(attention_sum, x, y), opts.reps)),
            ("sum_e4m3 (one Triton pass)", cuda_ms(lambda: QT.sum_e4m3(x, y), opts.reps))]
    for warps in (2, 4, 8, 16, 32):
        rows.append((f"layer_norm_e4m3, {warps} warps",
                     cuda_ms(lambda: QT.layer_norm_e4m3(x, None, None, 1e-6, shift, scale, num_warps=warps), opts.reps)))
        rows.append((f"gelu_e4m3, {warps} warps", cuda_ms(lambda: QT.gelu_e4m3(h, "tanh", num_warps=warps), opts.reps)))
    text = (f"producer_quant_bench {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n| variant | ms |\n|---|---:|\n"
            + "".join(f"| {name} | {ms:.3f} |\n" for name, ms in rows))
    print(text)
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "producer_quant_bench.md").write_text(text)


if __name__ == "__main__":
    main()
