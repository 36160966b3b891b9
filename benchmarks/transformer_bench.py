"""One forward of the 14B-shaped InfiniteTalk transformer at 832x480, 81 frames: bf16 (and quantized modes) against
a float32 run on the same GPU, with time and peak memory.

Usage (GPU, about 80 GB of GPU memory for the float32 reference):
    python benchmarks/transformer_bench.py --out DIR
CPU dry run of the logic: python benchmarks/transformer_bench.py --device cpu --dim 256 --ffn 512 --heads 2
    --layers 2 --latent 3,8,8 --text 16 --reps 1

Weights: random, drawn once in bf16 on the device with a fixed seed (Linear / Conv weights N(0, 1/fan_in), biases
0.01·N(0, 1), norm weights 1 + 0.1·N(0, 1), modulation N(0, 1/dim)), in the real state-dict layout (every key of the
Wan2.1 I2V 14B model plus the InfiniteTalk adapter). Every mode builds its model through the real loader
(``wanvideo.checkpoint.load_model``) from that one state dict, so the float32 and bf16 models hold the same
values and the quantized modes quantize them at load. Inputs: latent x, image conditioning y, 512 text tokens, 257
CLIP tokens, one speaker's wav2vec2 windows; t = 500. The float32 run has TF32 off.

A mode spec ``quant_mode[:attention_mode][+fuse_qkv]`` runs with that attention mode (default sdpa) and, with
``+fuse_qkv``, the sampler's ``fuse_qkv_projections`` switch on. Per mode: ``ms`` is the median wall time of --reps
forwards (each ended by a device synchronize) after one warm-up forward, whose own time is ``first forward ms``
(kernel compilation and self-tests included where nothing is cached yet); ``peak GiB`` is torch max_memory_allocated
during the timed forwards; ``weights GiB`` is the model's parameter and buffer bytes; rel. error = ‖out − out_fp32‖
/ ‖out_fp32‖ over the whole output. Writes transformer_bench.json and transformer_bench.md to --out; with
--profile also profile_<mode>.txt per mode: the GPU time of one more forward per kernel (torch.profiler).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()
from infinitetalk.attention import resolve  # noqa: E402
from infinitetalk.fp8_optimization import ops_for  # noqa: E402
from infinitetalk.quant_runtime import LinearRuntime, linear_runtime, matmul_precision  # noqa: E402
from infinitetalk.multitalk.model import InfiniteTalkModel  # noqa: E402
from infinitetalk.wanvideo.checkpoint import LazyStateDict, LoadOptions, load_model  # noqa: E402
from infinitetalk.wanvideo.config import AudioConfig, WanConfig  # noqa: E402
from random_models import random_state, state_as_checkpoint  # noqa: E402


@dataclass
class Row:
    mode: str
    attention: str
    ms: float
    peak_gib: float
    weights_gib: float
    rel_error: float
    first_ms: float


def make_inputs(cfg: WanConfig, latent: tuple[int, int, int], text: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    f, h, w = latent
    acfg = cfg.audio

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    return {"x": randn(1, cfg.out_dim, f, h, w), "t": torch.tensor([500.0], device=device),
            "context": randn(1, text, cfg.text_dim), "clip_fea": randn(1, 257, cfg.clip_dim),
            "y": randn(1, cfg.in_dim - cfg.out_dim, f, h, w),
            "audio": randn(1, 1, 4 * (f - 1) + 1, acfg.audio_window, acfg.audio_blocks, acfg.audio_channels)}


def forward(model, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs["clip_fea"], y=inputs["y"],
                     audio=inputs["audio"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, inputs: dict, device: torch.device, reps: int) -> tuple[torch.Tensor, float, float, float]:
    """(output, median ms, peak GiB over the timed forwards, ms of the first forward: with kernel compilation and
    the attention self-test when nothing is cached yet)."""
    start = time.perf_counter()
    out = forward(model, inputs)
    _sync(device)
    first = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        del out
        start = time.perf_counter()
        out = forward(model, inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return out, statistics.median(times), peak, first


def profile_forward(model, inputs: dict, path: Path) -> None:
    """Write the per-kernel GPU time of one forward (torch.profiler, top 60 by device time) to ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        forward(model, inputs)
        _sync(next(model.parameters()).device)
    path.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))


def build(state: LazyStateDict, dtype: torch.dtype, mode: str, attention: str, device: torch.device):
    """(model loaded from ``state`` through the real loader, name of the attention kernel that runs)."""
    backend = resolve(attention, device, dtype)
    options = LoadOptions(dtype=dtype, device=str(device), ops=ops_for(mode), attention=backend)
    return load_model(InfiniteTalkModel, state, options), backend.kernel


def weights_gib(model) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def run(opts: argparse.Namespace) -> list[Row]:
    device = torch.device(opts.device)
    cfg = WanConfig(dim=opts.dim, ffn_dim=opts.ffn, num_heads=opts.heads, num_layers=opts.layers,
                    audio=AudioConfig())
    latent = tuple(int(v) for v in opts.latent.split(","))
    state = state_as_checkpoint(random_state(cfg, device), device)
    inputs = make_inputs(cfg, latent, opts.text, device)
    rows, ref = [], None
    if opts.reference_attention != "none":
        with matmul_precision(tf32=False):
            model, kernel = build(state, torch.float32, "disabled", opts.reference_attention, device)
            ref, ms, peak, first = measure(model, inputs, device, 1)
            rows.append(Row("float32 reference", kernel, ms, peak, weights_gib(model), 0.0, first))
            print(rows[-1], flush=True)
            del model
    for spec in opts.modes.split(","):
        spec, fuse, _ = spec.partition("+fuse_qkv")
        mode, _, attention = spec.partition(":")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model, kernel = build(state, torch.bfloat16, mode, attention or "sdpa", device)
        with linear_runtime(LinearRuntime(fuse_qkv=bool(fuse))):
            out, ms, peak, first = measure(model, inputs, device, opts.reps)
        mode += fuse
        if opts.profile and opts.out:
            opts.out.mkdir(parents=True, exist_ok=True)
            with linear_runtime(LinearRuntime(fuse_qkv=bool(fuse))):
                profile_forward(model, inputs, opts.out / f"profile_{mode}_{attention or 'sdpa'}.txt")
        err = float("nan") if ref is None else (
            torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        rows.append(Row(mode, kernel, ms, peak, weights_gib(model), err, first))
        print(rows[-1], flush=True)
        del model, out
    return rows


def table(rows: list[Row]) -> str:
    head = ("| mode | attention kernel | ms / forward | first forward ms | peak GiB | weights GiB | rel. error vs fp32 |\n"
            "|---|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(f"| {r.mode} | {r.attention} | {r.ms:.0f} | {r.first_ms:.0f} | {r.peak_gib:.1f} | "
                          f"{r.weights_gib:.1f} | {r.rel_error:.4f} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--latent", default="21,60,104", help="latent frames, height, width (832x480x81)")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--modes", default="disabled,fp8_e4m3fn_scaled,fp8_e4m3fn_scaled_fast,fp4_scaled,"
                                           "fp4_scaled_fast", help="quant_mode[:attention_mode][+fuse_qkv],...")
    parser.add_argument("--reference-attention", default="sdpa",
                        help="attention mode of the float32 reference run; none skips it (it needs about 110 GB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="write profile_<mode>.txt per mode to --out")
    opts = parser.parse_args()
    rows = run(opts)
    text = table(rows)
    print(text)
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu"
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "card": card,
                "torch": torch.__version__, "args": vars(opts) | {"out": str(opts.out)}}
        (opts.out / "transformer_bench.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                                                   indent=1))
        (opts.out / "transformer_bench.md").write_text(f"{json.dumps(meta)}\n\n{text}")


if __name__ == "__main__":
    main()
