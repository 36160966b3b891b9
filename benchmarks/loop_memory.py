"""Host RSS (and VRAM on CUDA) of the InfiniteTalk long-video loop, window by window, on the tiny models.

Writes the tiny transformer + adapter + VAE (``tools/make_tiny_models.py``) into a temporary models folder, runs the
loop for ``--windows`` windows (9-frame windows overlapping by 5, 128x128 frames by default, few steps, two guidance
passes, Lab colour matching) with frames streamed to PNG files (``--sink memory`` keeps them in RAM instead, to show
what growth looks like), and records the process's resident set size after every window
(psutil when installed, else ``VmRSS`` of /proc/self/status) twice: as found, and "live" after ``gc.collect()`` and
glibc's ``malloc_trim(0)`` (free heap pages that malloc keeps for reuse make the as-found value jitter by a few tens
of MiB from window to window without any growth). The run passes when the live RSS from window 2 to the last window
stays within ``--tolerance`` (default 2 %) of its minimum; on CUDA the same holds for allocated VRAM.

``--model 14b`` runs the real-sized models instead (GPU): the 14B-shaped transformer with the adapter and the
full-size VAE, random weights built in memory (``tools/random_models.py``), in bf16 with ``--quantization``.

Usage: ``python benchmarks/loop_memory.py [--windows 20] [--steps 2] [--device cpu] [--sink png] [--out r.json]``
Real size: ``python benchmarks/loop_memory.py --model 14b --device cuda --width 832 --height 480 --window 33
--motion 9 --quantization fp8_e4m3fn_scaled``
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import packimport  # noqa: E402

packimport.register()

from make_tiny_models import ADAPTER, TRANSFORMER, VAE, make_tiny_models  # noqa: E402

from infinitetalk.multitalk.colormatch import ColorMatch  # noqa: E402
from infinitetalk.multitalk.frame_sink import MemorySink, PngSink  # noqa: E402
from infinitetalk.multitalk.loop import InfiniteTalkLoop, LoopCallbacks, LoopInputs, SamplerSettings  # noqa: E402
from infinitetalk.attention import resolve  # noqa: E402
from infinitetalk.fp8_optimization import ops_for  # noqa: E402
from infinitetalk.multitalk.model import InfiniteTalkModel  # noqa: E402
from infinitetalk.multitalk.pipeline import ModelRequest, load_transformer  # noqa: E402
from infinitetalk.wanvideo.checkpoint import LoadOptions, load_model  # noqa: E402
from infinitetalk.wanvideo.config import AudioConfig, WanConfig  # noqa: E402
from infinitetalk.wanvideo.vae import load_vae  # noqa: E402
from random_models import random_state, random_vae, state_as_checkpoint  # noqa: E402

MIB = 2 ** 20


def host_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process().memory_info().rss
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the resident set size: install psutil or run on Linux (/proc/self/status)")


def release_free_heap() -> bool:
    """Collect garbage and hand glibc's free heap pages back to the OS (``malloc_trim(0)``); False off glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@dataclass
class WindowSample:
    """Memory after one window: host RSS as found (``rss``) and after releasing free heap pages (``rss_live``),
    CUDA allocated and peak-reserved bytes (0 on the CPU), wall time."""

    window: int
    frames: int
    rss: int
    rss_live: int
    vram: int
    vram_peak: int
    seconds: float


class ProbeSink:
    """A frame sink (PNG files, or RAM to show what growth looks like) that records memory after every window."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        self.device = device
        self.samples: list[WindowSample] = []
        self.started = time.perf_counter()

    def write(self, frames: torch.Tensor) -> None:
        self.inner.write(frames)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        rss = host_rss()
        release_free_heap()
        self.samples.append(WindowSample(
            window=len(self.samples) + 1, frames=self.inner.frame_count, rss=rss, rss_live=host_rss(),
            vram=torch.cuda.memory_allocated(self.device) if cuda else 0,
            vram_peak=torch.cuda.max_memory_reserved(self.device) if cuda else 0,
            seconds=time.perf_counter() - self.started))

    def result(self) -> Optional[torch.Tensor]:
        return None


def loop_inputs(model, args: argparse.Namespace) -> LoopInputs:
    """Random conditioning for ``args.windows`` full windows of ``args.height`` x ``args.width`` frames."""
    gen = torch.Generator().manual_seed(0)
    total = args.window + (args.windows - 1) * (args.window - args.motion)
    acfg, cfg = model.config.audio, model.config
    return LoopInputs(start_images=torch.rand(1, 3, args.height, args.width, generator=gen) * 2 - 1,
                      audio_features=[torch.randn(total, acfg.audio_blocks, acfg.audio_channels, generator=gen)],
                      prompts=[torch.randn(12, cfg.text_dim, generator=gen)],
                      negative=torch.randn(10, cfg.text_dim, generator=gen), total_frames=total,
                      frame_window_size=args.window, motion_frame=args.motion,
                      clip_context=torch.randn(1, 257, cfg.clip_dim, generator=gen), colormatch=ColorMatch("lab"))


def spread(values: list[int]) -> float:
    """(max - min) / min."""
    return (max(values) - min(values)) / min(values)


def real_size_models(device: torch.device, quantization: str):
    """The 14B-shaped transformer (bf16 compute, ``quantization`` storage) and the full-size VAE (bf16) on
    ``device``, random weights."""
    dtype = torch.bfloat16
    options = LoadOptions(dtype=dtype, device=str(device), ops=ops_for(quantization),
                          attention=resolve("sdpa", device, dtype))
    cfg = WanConfig(audio=AudioConfig())
    model = load_model(InfiniteTalkModel, state_as_checkpoint(random_state(cfg, device), device), options)
    return model, random_vae(device, dtype)


def tiny_models(work: Path, device: torch.device):
    make_tiny_models(work / "models", roles=["transformer", "adapter", "vae"])
    model = load_transformer(ModelRequest(work / "models" / TRANSFORMER, work / "models" / ADAPTER, "fp32"), device)
    vae = load_vae(work / "models" / VAE, "fp32")
    return model.to(device), vae.to(device)


def run(args: argparse.Namespace, work: Path) -> list[WindowSample]:
    device = torch.device(args.device)
    model, vae = (real_size_models(device, args.quantization) if args.model == "14b"
                  else tiny_models(work, device))
    settings = SamplerSettings(scheduler="euler", steps=args.steps, shift=5.0, seed=1, cfg=1.0, audio_cfg=2.0)
    sink = ProbeSink(PngSink(work / "frames") if args.sink == "png" else MemorySink(), device)
    InfiniteTalkLoop(model, vae, settings, device).run(loop_inputs(model, args), sink, LoopCallbacks())
    return sink.samples


def report(samples: list[WindowSample], args: argparse.Namespace) -> dict:
    """Print the table and return the summary (flat = spread from window 2 on within the tolerance)."""
    base = samples[1]
    print("| window | frames written | RSS as found (MiB) | live RSS (MiB) | live vs window 2 | VRAM alloc (MiB) | "
          "VRAM peak reserved (MiB) | elapsed (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        print(f"| {s.window} | {s.frames} | {s.rss / MIB:.1f} | {s.rss_live / MIB:.1f} | "
              f"{100 * (s.rss_live - base.rss_live) / base.rss_live:+.2f} % | {s.vram / MIB:.1f} | "
              f"{s.vram_peak / MIB:.1f} | {s.seconds:.1f} |")
    tail = samples[1:]
    live_spread, found_spread = spread([s.rss_live for s in tail]), spread([s.rss for s in tail])
    vram_spread = spread([s.vram for s in tail]) if tail[0].vram else 0.0
    flat = live_spread <= args.tolerance and vram_spread <= args.tolerance
    print(f"\nwindows 2..{len(samples)}: live RSS spread {100 * live_spread:.2f} %, RSS-as-found spread "
          f"{100 * found_spread:.2f} %, VRAM spread {100 * vram_spread:.2f} % (limit {100 * args.tolerance:.1f} % "
          f"on live RSS and VRAM) -> {'FLAT' if flat else 'GROWS'}")
    return {"flat": flat, "live_rss_spread": live_spread, "found_rss_spread": found_spread,
            "vram_spread": vram_spread, "samples": [asdict(s) for s in samples]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--sink", choices=("png", "memory"), default="png",
                        help="png: frames streamed to files (RAM must stay flat); memory: all frames kept (grows)")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--model", choices=("tiny", "14b"), default="tiny")
    parser.add_argument("--quantization", default="disabled", help="storage of the 14b transformer's blocks")
    parser.add_argument("--window", type=int, default=9, help="frame_window_size (4k+1)")
    parser.add_argument("--motion", type=int, default=5, help="motion_frame")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the samples as JSON here")
    args = parser.parse_args(argv)
    if args.windows < 3:
        parser.error("--windows must be at least 3 (window 1 is warm-up)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.model} model ({args.quantization}), "
          f"{args.windows} windows of {args.window} frames (motion {args.motion}), {args.width}x{args.height}, "
          f"{args.steps} steps, threads {args.threads}, {args.sink} sink")
    with tempfile.TemporaryDirectory() as tmp:
        summary = report(run(args, Path(tmp)), args)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0 if summary["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
