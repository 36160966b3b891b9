"""Peak host memory while loading a 14B-shaped InfiniteTalk checkpoint (issue 3: at most 1.15x the file size).

Writes a safetensors file with every key and shape of Wan2.1 I2V 14B + the InfiniteTalk adapter (dim 5120, ffn 13824,
``--layers`` blocks, default 40 = the real model), bf16 random weights (streamed to disk tensor by tensor, never
all in memory), then loads it with ``load_infinitetalk`` in a fresh child process per quantization mode (``bf16``:
``disabled``; ``fp8_e4m3fn_scaled``: quantized at load), reads one byte of every 4 KiB page of every weight (weights
taken as is stay memory-mapped from the file and count as resident only once touched) and reports the child's peak
RSS (``ru_maxrss``), its RSS after imports (baseline), the file size and the ratios. Usage:

    python benchmarks/load_memory.py --layers 6 [--dir /tmp] [--keep] [--modes disabled fp8_e4m3fn_scaled]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()

from infinitetalk.attention import resolve  # noqa: E402
from infinitetalk.fp8_optimization import QuantMode, ops_for  # noqa: E402
from infinitetalk.multitalk.model import InfiniteTalkModel, load_infinitetalk  # noqa: E402
from infinitetalk.wanvideo.checkpoint import LoadOptions  # noqa: E402
from infinitetalk.wanvideo.config import AudioConfig, WanConfig  # noqa: E402

TARGET = 1.15
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def checkpoint_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the 14B I2V transformer with the InfiniteTalk adapter and ``layers`` blocks."""
    cfg = WanConfig(num_layers=layers, audio=AudioConfig())
    with torch.device("meta"):
        model = InfiniteTalkModel(cfg, ops_for(QuantMode.DISABLED), resolve("sdpa", "cpu", torch.bfloat16))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16) -> int:
    """Stream a safetensors file of random ``dtype`` tensors (N(0, 1/fan_in)) to ``path``; returns its size."""
    header, offset = {}, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, shape in shapes.items():
            fan_in = max(1, int(torch.Size(shape[1:]).numel()))
            tensor = torch.empty(shape, dtype=torch.float32).normal_(generator=gen).mul_(fan_in ** -0.5).to(dtype)
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return path.stat().st_size


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def touch_every_page(tensors) -> int:
    """Read one byte per 4 KiB page of every tensor, so memory-mapped weights count as resident (as they will once
    the model runs)."""
    total = 0
    for tensor in tensors:
        if tensor.numel():
            total += int(tensor.reshape(-1).view(torch.uint8)[::4096].sum())
    return total


def child(path: Path, mode: str) -> None:
    """Load ``path`` once in ``mode``, touch every weight page and print JSON: baseline and peak RSS (bytes), load
    seconds, weight bytes."""
    baseline = _rss_kib() * 1024
    start = time.perf_counter()
    model = load_infinitetalk(path, None, LoadOptions(dtype=torch.bfloat16, ops=ops_for(mode)))
    seconds = time.perf_counter() - start
    tensors = [*model.parameters(), *model.buffers()]
    touch_every_page(tensors)
    weights = sum(t.numel() * t.element_size() for t in tensors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "baseline": baseline, "peak": peak, "seconds": seconds, "weights": weights,
                      "layer_type": type(model.blocks[0].self_attn.q).__name__}))


def measure(path: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(path), "--mode", mode], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"loading in mode {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peak RSS while loading a 14B-shaped InfiniteTalk checkpoint")
    parser.add_argument("--layers", type=int, default=40, help="transformer blocks (40 = the real 14B model)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the file")
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument("--modes", nargs="+", default=["disabled", "fp8_e4m3fn_scaled"])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.mode)
        return 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = args.dir / f"wan14b_infinitetalk_{args.layers}layers_bf16.safetensors"
    start = time.perf_counter()
    size = write_random_safetensors(path, checkpoint_shapes(args.layers))
    print(f"wrote {path} ({size / 2**30:.2f} GiB, {args.layers} blocks) in {time.perf_counter() - start:.0f} s")
    ok = True
    try:
        print("| mode | layer | load s | weights GiB | baseline RSS GiB | peak RSS GiB | peak / file | "
              "(peak - baseline) / file |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for mode in args.modes:
            r = measure(path, mode)
            ratio = r["peak"] / size
            ok = ok and ratio <= TARGET
            print(f"| {mode} | {r['layer_type']} | {r['seconds']:.1f} | {r['weights'] / 2**30:.2f} | "
                  f"{r['baseline'] / 2**30:.2f} | {r['peak'] / 2**30:.2f} | {ratio:.3f} | "
                  f"{(r['peak'] - r['baseline']) / size:.3f} |")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print(f"target: peak RSS <= {TARGET} x file size: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
