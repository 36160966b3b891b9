"""The pack's Triton 8-bit attention against cuDNN at the Wan2.1 14B shapes (sm_90 GPU), call by call.

Usage: python benchmarks/attention_fp8_kernel.py [--tokens 32760,75600] [--out DIR]   (writes attention_fp8_kernel.json)

For q, k, v = [1, L, 40, 128] bf16 (the inputs of benchmarks/attention_bench.py), median CUDA-event times of --reps
calls after --warmup, cuDNN and the 8-bit kernel interleaved call by call (so a clock change hits both): cuDNN SDPA,
the whole 8-bit call (quantization + attention), the attention kernel alone on operands quantized once (it quantizes
Q itself, so its time includes Q's quantization), the K/V quantization passes alone, and, for the fp8 output
projection, the call followed by a per-token e4m3 quantization of its output against the call writing e4m3 rows
itself (``fp8_attention_rows``).
rel. error: ‖out − ref‖ / ‖ref‖ over --ref-rows query rows against float32 math, on Gaussian inputs and on the
"outliers" inputs (4 of the 128 channels of q and k scaled by 5).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_bench as bench  # noqa: E402 (registers the pack as `infinitetalk`)
from infinitetalk import attention_triton as T  # noqa: E402
from infinitetalk.attention import relative_error  # noqa: E402
from infinitetalk.quant_formats import quantize_rows_e4m3  # noqa: E402


def cudnn(q, k, v):
    """torch SDPA's cuDNN back-end on [B, L, H, D] operands."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


def interleaved(fns: dict, device: torch.device, warmup: int, reps: int) -> dict:
    """Median milliseconds of one call of each function, the functions taking turns call by call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(bench.time_call(fn, device, 0, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def measure(tokens: int, args, device: torch.device) -> list[dict]:
    """Rows of one sequence length: cuDNN, the whole 8-bit call, its kernel alone, its K/V quantization alone."""
    inputs = {kind: bench.make_inputs(tokens, args.heads, 128, kind, device) for kind in ("gaussian", "outliers")}
    rows_idx = torch.linspace(0, tokens - 1, min(args.ref_rows, tokens), device=device).long()
    refs = {kind: bench.reference_rows(*qkv, rows_idx) for kind, qkv in inputs.items()}
    q, k, v = inputs["gaussian"]
    flop = 4.0 * args.heads * tokens * tokens * 128

    def errors(fn):
        return {kind: relative_error(fn(*qkv)[:, rows_idx], refs[kind]) for kind, qkv in inputs.items()}

    quantized, out = T.quantize(q, k, v), torch.empty_like(q)

    def then_quantized():  # what the fp8 output projection does with a bf16 attention output
        return quantize_rows_e4m3(T.fp8_attention(q, k, v).view(tokens, -1), 0)

    ms = interleaved({"cudnn": lambda: cudnn(q, k, v), "8-bit call": lambda: T.fp8_attention(q, k, v),
                      "8-bit kernel alone": lambda: T.attend(quantized, tokens, out),
                      "K/V quantization alone": lambda: T.quantize(q, k, v),
                      "8-bit call, then per-token e4m3 quantization": then_quantized,
                      "8-bit call writing e4m3 rows": lambda: T.fp8_attention_rows(q, k, v)},
                     device, args.warmup, args.reps)
    def rows_as_output(rows_fn):
        def run(a, b, c):
            data, scale = rows_fn(a, b, c)
            return (data.float().view(tokens, -1) * scale).view(a.shape)
        return run

    err = {"cudnn": errors(cudnn), "8-bit call": errors(T.fp8_attention),
           "8-bit call, then per-token e4m3 quantization": errors(rows_as_output(
               lambda a, b, c: quantize_rows_e4m3(T.fp8_attention(a, b, c).view(tokens, -1), 0))),
           "8-bit call writing e4m3 rows": errors(rows_as_output(T.fp8_attention_rows))}
    rows = []
    for name, t in ms.items():
        row = dict(tokens=tokens, what=name, ms=t, err=err.get(name))
        if name not in ("K/V quantization alone", "8-bit call, then per-token e4m3 quantization",
                        "8-bit call writing e4m3 rows"):
            row.update(tflops=flop / t / 1e9, vs_cudnn=ms["cudnn"] / t)
        rows.append(row)
    return rows


def markdown(rows: list[dict], env: list[str]) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["## attention_fp8_kernel: the Triton 8-bit attention against cuDNN", "", *env, "",
             "| tokens | what | ms | TFLOP/s | vs cuDNN | err gaussian | err outliers |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = r.get("err") or {}
        lines.append(f"| {r['tokens']} | {r['what']} | {r['ms']:.2f} | {num(r.get('tflops'), '.0f')} | "
                     f"{num(r.get('vs_cudnn'), '.3f')}x | {num(err.get('gaussian'), '.4f')} | "
                     f"{num(err.get('outliers'), '.4f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="32760,75600", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ref-rows", type=int, default=1024, help="query rows of the float32 reference")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for attention_fp8_kernel.json")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False
    env = bench.environment(device)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    print("\n".join(env), flush=True)
    rows = []
    with torch.inference_mode():
        for tokens in tokens_list:
            rows += measure(tokens, args, device)
            torch.cuda.empty_cache()
    text = markdown(rows, env)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_fp8_kernel.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
