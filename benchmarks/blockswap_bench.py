"""Block swap cost at the Wan2.1 14B / InfiniteTalk shapes: per-forward time, peak VRAM and host memory.

Usage (GPU): python benchmarks/blockswap_bench.py --out DIR
Reduced: python benchmarks/blockswap_bench.py --layers 8 --grid 21,15,26 --out DIR
CPU dry run of the logic: python benchmarks/blockswap_bench.py --device cpu --dim 256 --ffn 512 --layers 4
    --grid 1,2,4 --context 16 --reps 1 --swaps 0,2,4 --streams 1,4

What one forward is: the stack of ``--layers`` InfiniteTalk blocks (self-attention, text+image cross-attention,
audio cross-attention, FFN) at dim 5120 / 40 heads / FFN 13824, random weights, over one CFG branch of the token
grid (21x30x52 = 32760 tokens for 832x480, 81 frames), bf16 activations. The embeddings and the head are not
included. For each quantization mode, each ``blocks_to_swap`` and each number of copy streams it attaches a
:class:`BlockSwapper` (WanVideoEnhancedBlockSwap arguments, auto tuning off, ``--bandwidth-target``, default 0.8
-> prefetch 2), times one first forward and then ``--reps`` forwards (wall clock with a device synchronize,
median), and reads the peak VRAM over the timed forwards (torch max_memory_allocated), the host arena size and the process RSS.
Writes blockswap_bench.json and blockswap_bench.md to --out and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
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
from infinitetalk.blockswap import BlockSwapper, block_nbytes, plan_block_swap  # noqa: E402
from infinitetalk.fp8_optimization import CastLinear, QuantLinear, ops_for  # noqa: E402
from infinitetalk.multitalk.model import AudioBlockContext, InfiniteTalkBlock  # noqa: E402
from infinitetalk.wanvideo.config import AudioConfig, WanConfig  # noqa: E402
from infinitetalk.wanvideo.rope import rope_table_3d  # noqa: E402

N_IMG = 257


@dataclass
class Row:
    mode: str
    blocks_to_swap: int
    streams: int
    ms: float
    first_ms: float
    vs_resident: float
    peak_vram_gib: float
    slots_gib: float
    host_arena_gib: float
    rss_gib: float
    attach_s: float


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _build_blocks(cfg: WanConfig, mode: str, device: torch.device) -> torch.nn.ModuleList:
    """``cfg.num_layers`` InfiniteTalk blocks on ``device`` with random weights: Linear weights N(0, 1/K) stored in
    the mode's format (bf16 for 'disabled'), biases 0.01·N(0, 1), norms and modulation float32."""
    ops, attention = ops_for(mode), resolve("sdpa", device, torch.bfloat16)
    blocks = torch.nn.ModuleList()
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(cfg.num_layers):
        with torch.device(device):
            block = InfiniteTalkBlock(cfg, ops, attention)
        for module in block.modules():
            if isinstance(module, (CastLinear, QuantLinear)):
                k, n = module.in_features, module.out_features
                weight = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * k ** -0.5
                with torch.no_grad():
                    if isinstance(module, QuantLinear):
                        module.load_weight(weight)
                    else:
                        module.weight = torch.nn.Parameter(weight, requires_grad=False)
                    module.bias = torch.nn.Parameter(0.01 * torch.randn(n, generator=gen, device=device,
                                                                        dtype=torch.bfloat16), requires_grad=False)
        blocks.append(block.requires_grad_(False).eval())
    return blocks


def _inputs(cfg: WanConfig, grid: tuple[int, int, int], context_len: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, tokens, cfg.dim, generator=gen, device=device, dtype=torch.bfloat16)
    e0 = 0.1 * torch.randn(1, 6, cfg.dim, generator=gen, device=device)
    acfg = cfg.audio
    audio = torch.randn(grid[0], acfg.context_tokens, acfg.output_dim, generator=gen, device=device,
                        dtype=torch.bfloat16)
    context = torch.randn(1, N_IMG + context_len, cfg.dim, generator=gen, device=device, dtype=torch.bfloat16)
    ctx = AudioBlockContext(grid=grid, rope=rope_table_3d(grid, cfg.head_dim, device), context=context, n_img=N_IMG,
                            audio=audio, n_speakers=1, masks=None, audio_scale=1.0)
    return x, e0, ctx


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(blocks, inputs, device) -> float:
    x, e0, ctx = inputs
    start = time.perf_counter()
    with torch.inference_mode():
        for block in blocks:
            x = block(x, e0, ctx)
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _measure(blocks, inputs, device, mode, count, streams, reps, bandwidth_target) -> Row:
    args = {"blocks_to_swap": count, "auto_hardware_tuning": False, "num_cuda_streams": streams,
            "bandwidth_target": bandwidth_target}
    plan = plan_block_swap(args, [block_nbytes(b) for b in blocks], 1 << 50, 0)
    start = time.perf_counter()
    swapper = BlockSwapper.attach(blocks, plan, device)
    _sync(device)
    attach_s = time.perf_counter() - start
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        first = _forward(blocks, inputs, device)
        times = [_forward(blocks, inputs, device) for _ in range(reps)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        return Row(mode, count, streams if count else 0, statistics.median(times), first, float("nan"), peak,
                   swapper.slot_bytes / 2**30, swapper.host_bytes / 2**30, _rss_gib(), attach_s)
    finally:
        swapper.detach()


def run(opts: argparse.Namespace) -> list[Row]:
    device = torch.device(opts.device)
    cfg = WanConfig(dim=opts.dim, ffn_dim=opts.ffn, num_heads=opts.dim // 128, num_layers=opts.layers,
                    audio=AudioConfig())
    grid = tuple(int(v) for v in opts.grid.split(","))
    swaps = sorted({min(int(v), opts.layers) for v in opts.swaps.split(",")})
    streams = [int(v) for v in opts.streams.split(",")]
    rows = []
    for mode in opts.modes.split(","):
        blocks = _build_blocks(cfg, mode, device)
        inputs = _inputs(cfg, grid, opts.context, device)
        _forward(blocks, inputs, device)  # warm-up: kernels, autotuning, allocator
        mode_rows = []
        for count in swaps:
            for n in streams if count else streams[:1]:
                row = _measure(blocks, inputs, device, mode, count, n, opts.reps, opts.bandwidth_target)
                mode_rows.append(row)
                print(f"{mode} swap {count} streams {row.streams}: {row.ms:.1f} ms, first {row.first_ms:.1f} ms, "
                      f"peak {row.peak_vram_gib:.2f} GiB, rss {row.rss_gib:.1f} GiB", flush=True)
        base = next(r.ms for r in mode_rows if r.blocks_to_swap == 0) if 0 in swaps else float("nan")
        for row in mode_rows:
            row.vs_resident = row.ms / base
        rows += mode_rows
        del blocks, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def block_peaks(opts: argparse.Namespace) -> list[tuple[str, float]]:
    """Activation peak (GiB above weights and inputs) of one block forward, per stretch of code: each leaf module
    and the code between two leaf modules (``before <module>``), from ``max_memory_allocated`` between hooks."""
    device = torch.device(opts.device)
    cfg = WanConfig(dim=opts.dim, ffn_dim=opts.ffn, num_heads=opts.dim // 128, num_layers=1, audio=AudioConfig())
    blocks = _build_blocks(cfg, opts.modes.split(",")[0], device)
    inputs = _inputs(cfg, tuple(int(v) for v in opts.grid.split(",")), opts.context, device)
    _forward(blocks, inputs, device)
    base, peaks = torch.cuda.memory_allocated(device), []

    def record(label: str) -> None:
        torch.cuda.synchronize(device)
        peaks.append((label, (torch.cuda.max_memory_allocated(device) - base) / 2**30))
        torch.cuda.reset_peak_memory_stats(device)

    for name, module in blocks[0].named_modules():
        if name and not list(module.children()):
            module.register_forward_pre_hook(lambda m, a, n=name: record(f"before {n}"))
            module.register_forward_hook(lambda m, a, o, n=name: record(n))
    torch.cuda.reset_peak_memory_stats(device)
    _forward(blocks, inputs, device)
    record("after the block")
    return sorted(peaks, key=lambda p: -p[1])


def table(rows: list[Row]) -> str:
    head = ("| mode | blocks_to_swap | streams | ms / forward | vs resident | first forward ms | peak VRAM GiB | "
            "slots GiB | host arena GiB | process RSS GiB | attach s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            "---:|---:|\n")
    return head + "".join(
        f"| {r.mode} | {r.blocks_to_swap} | {r.streams or '-'} | {r.ms:.1f} | {r.vs_resident:.3f}x | "
        f"{r.first_ms:.1f} | {r.peak_vram_gib:.2f} | {r.slots_gib:.2f} | {r.host_arena_gib:.2f} | {r.rss_gib:.1f} | "
        f"{r.attach_s:.1f} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--grid", default="21,30,52", help="latent frames, rows, cols after patchify")
    parser.add_argument("--context", type=int, default=512, help="text tokens (plus 257 CLIP tokens)")
    parser.add_argument("--modes", default="disabled,fp8_e4m3fn_scaled,fp4_scaled")
    parser.add_argument("--swaps", default="0,10,20,40")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bandwidth-target", type=float, default=0.8,
                        help="WanVideoEnhancedBlockSwap bandwidth_target: prefetch depth ceil(1/target), slots +1")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--where", action="store_true",
                        help="instead: where one block of the first mode peaks in VRAM (top 8 stretches of code)")
    opts = parser.parse_args()
    if opts.where:
        for label, gib in block_peaks(opts)[:8]:
            print(f"{label:45s} {gib:.2f} GiB")
        return
    rows = run(opts)
    card = torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    header = (f"card: {card}; torch {torch.__version__}; {stamp}; layers {opts.layers}, grid {opts.grid}, "
              f"reps {opts.reps}; peak host RSS {peak_rss:.1f} GiB\n\n")
    text = header + table(rows)
    print(text)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "blockswap_bench.md").write_text(text)
        (opts.out / "blockswap_bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in
                                                                            vars(opts).items()},
                                                                   "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
