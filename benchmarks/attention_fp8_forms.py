"""The pack's Triton 8-bit attention, form by form, against cuDNN at the Wan2.1 14B shapes (sm_90 GPU).

Usage: python benchmarks/attention_fp8_forms.py [--tokens 32760,75600] [--out DIR]   (writes attention_fp8_forms.json)

For q, k, v = [1, L, 40, 128] bf16 (the inputs of benchmarks/attention_bench.py), each row times one kernel form of
``attention_triton`` (median CUDA-event time of --reps calls after --warmup): the whole call (quantization +
attention), the attention kernel alone on operands quantized once (the plain form's kernel quantizes Q itself, so
its kernel time includes Q's quantization), and, in rows of their own, each form's separate quantization passes.
Forms: ``ws`` and ``plain`` (the two shipped forms; ``form_for`` says which one this card uses at each length) and
``ws_s3`` (``ws`` with 3 pipeline stages, measured at 1.31x before but not bit-identical to the plain form: a race
check).
rel. error: ‖out − ref‖ / ‖ref‖ over --ref-rows query rows against float32 math, on Gaussian inputs and on the
"outliers" inputs (4 of the 128 channels of q and k scaled by 5). vs plain: the same measure against the plain
form's output (the forms do the same arithmetic in another order, so anything above ~1e-5 is a bug).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.errors import TritonError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_bench as bench  # noqa: E402 (registers the pack as `infinitetalk`)
from infinitetalk import attention_triton as T  # noqa: E402
from infinitetalk.attention import relative_error  # noqa: E402

FORMS = {"ws": T.WS_FORM, "plain": T.PLAIN_FORM, "ws_s3": dataclasses.replace(T.WS_FORM, stages=3)}


def cudnn(q, k, v):
    """torch SDPA's cuDNN back-end on [B, L, H, D] operands."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


def measure(tokens: int, args, device: torch.device) -> list[dict]:
    """Rows of one sequence length: cuDNN, every form, the quantization alone."""
    inputs = {kind: bench.make_inputs(tokens, args.heads, 128, kind, device) for kind in ("gaussian", "outliers")}
    rows_idx = torch.linspace(0, tokens - 1, min(args.ref_rows, tokens), device=device).long()
    refs = {kind: bench.reference_rows(*qkv, rows_idx) for kind, qkv in inputs.items()}
    q, k, v = inputs["gaussian"]
    flop = 4.0 * args.heads * tokens * tokens * 128

    def timed(fn):
        return bench.time_call(fn, device, args.warmup, args.reps)

    def errors(fn):
        return {kind: relative_error(fn(*qkv)[:, rows_idx], refs[kind]) for kind, qkv in inputs.items()}

    base = dict(tokens=tokens, form="cudnn", ms=timed(lambda: cudnn(q, k, v)), kernel_ms=None,
                err=errors(cudnn), vs_plain=None)
    rows = [base]
    plain_out = T.fp8_attention(q, k, v, T.PLAIN_FORM)
    for name, form in FORMS.items():
        row = dict(tokens=tokens, form=name)
        try:
            row["err"] = errors(lambda a, b, c: T.fp8_attention(a, b, c, form))
            row["vs_plain"] = relative_error(T.fp8_attention(q, k, v, form), plain_out.float())
            row["ms"] = timed(lambda: T.fp8_attention(q, k, v, form))
            quantized, out = T.quantize(q, k, v, form), torch.empty_like(q)
            row["kernel_ms"] = timed(lambda: T.attend(quantized, tokens, out, form))
            del quantized, out
        except (RuntimeError, ValueError, TritonError) as failure:
            row["failed"] = f"{type(failure).__name__}: {failure}"[:300]
        rows.append(row)
    for name, form in (("ws: Q, K, V", T.WS_FORM), ("plain: K, V", T.PLAIN_FORM)):
        rows.append(dict(tokens=tokens, form=f"quantization passes only ({name})", kernel_ms=None, err=None,
                         vs_plain=None, ms=timed(lambda form=form: T.quantize(q, k, v, form))))
    for row in rows:
        if row.get("ms") is not None:
            row["tflops"] = flop / row["ms"] / 1e9
            row["vs_cudnn"] = base["ms"] / row["ms"]
    return rows


def markdown(rows: list[dict], env: list[str], chosen: dict) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["## attention_fp8_forms: the Triton 8-bit attention's forms against cuDNN", "", *env,
             "- form_for(this card, D=128, L keys): " + ", ".join(f"{n}: {c}" for n, c in chosen.items()), "",
             "| tokens | form | ms | kernel ms | TFLOP/s | vs cuDNN | err gaussian | err outliers | vs plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['tokens']} | {r['form']} | FAILED: {r['failed']} | | | | | | |")
            continue
        err = r.get("err") or {}
        lines.append(f"| {r['tokens']} | {r['form']} | {r['ms']:.2f} | {num(r.get('kernel_ms'), '.2f')} | "
                     f"{r['tflops']:.0f} | {r['vs_cudnn']:.3f}x | {num(err.get('gaussian'), '.4f')} | "
                     f"{num(err.get('outliers'), '.4f')} | {num(r.get('vs_plain'), '.1e')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="32760,75600", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ref-rows", type=int, default=1024, help="query rows of the float32 reference")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for attention_fp8_forms.json")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False
    env = bench.environment(device)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    chosen = {n: next(name for name, form in FORMS.items() if form == T.form_for(device, 128, n)) for n in tokens_list}
    print("\n".join(env) + f"\n- form_for: {chosen}", flush=True)
    rows = []
    with torch.inference_mode():
        for tokens in tokens_list:
            rows += measure(tokens, args, device)
            torch.cuda.empty_cache()
    text = markdown(rows, env, chosen)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_fp8_forms.json").write_text(json.dumps(dict(env=env, form_for=chosen,
                                                                                 rows=rows), indent=1))


if __name__ == "__main__":
    main()
