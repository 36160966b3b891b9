"""The block-swap seed matrix on CUDA (skipped without a GPU): {0, 20, 40 of 40 blocks swapped} x {1, 4, 16 copy
streams} x {bf16, fp8_e4m3fn_scaled, fp4_scaled} x {sdpa, sageattn}. Every case must give the resident run's output
bit for bit. The model is a reduced-size 40-block InfiniteTalk transformer (dim 256, 2 heads of 128, 72 tokens)
written to a safetensors file by the test and loaded with the real loader, so that the whole matrix fits a run
under ``compute-sanitizer --tool memcheck`` (the layouts, slots and streams are those of the full size; only the
tensors are smaller). ``sageattn`` runs the pack's 8-bit Triton kernel where the card can run it (the kernel
``sageattn`` uses when it is the fastest), else whatever ``resolve('sageattn')`` picks."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from infinitetalk import attention as A
from infinitetalk.attention import AttentionMode, build_backend, resolve
from infinitetalk.blockswap import BlockSwapper, block_nbytes, plan_block_swap
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.checkpoint import LoadOptions, load_model, open_state_dict
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
LAYERS = 40
TEXT_LEN = 16
MODES = ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled"]
ATTENTION = ["sdpa", "sageattn"]


def attention_backend(name: str) -> A.AttentionBackend:
    """``sdpa``: the resolved mode. ``sageattn``: the pack's 8-bit kernel first (then SDPA for shapes it does not
    take) where this card can run it, else the resolved mode."""
    if name == "sageattn":
        spec = A._KERNELS["triton_fp8"]
        if A._unavailable(spec, CUDA, torch.bfloat16, True) is None:
            return build_backend(AttentionMode.SAGEATTN, (spec, A._KERNELS["sdpa"]))
    return resolve(name, CUDA, torch.bfloat16)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=LAYERS, in_dim=36, out_dim=16, text_dim=64,
                    text_len=TEXT_LEN, clip_dim=64,
                    audio=AudioConfig(intermediate_dim=16, output_dim=64, context_tokens=4))
    torch.manual_seed(0)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32))
    path = tmp_path_factory.mktemp("swap_matrix") / "tiny40.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(1, 16, 3, 8, 12, generator=gen), "t": torch.tensor([700.0]),
              "context": torch.randn(1, 6, cfg.text_dim, generator=gen),
              "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=gen),
              "y": torch.randn(1, cfg.in_dim - 16, 3, 8, 12, generator=gen),
              "audio": torch.randn(1, 1, 9, 5, 12, 768, generator=gen)}
    return path, {k: v.to(CUDA) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def models(weights):
    """(mode, attention) -> (model on CUDA in bf16, resident output), built on first use."""
    path, inputs = weights
    built = {}

    def get(mode: str, attention: str):
        if (mode, attention) not in built:
            built.clear()  # one model at a time keeps the run small
            options = LoadOptions(dtype=torch.bfloat16, device="cuda", text_len=TEXT_LEN, ops=ops_for(mode),
                                  attention=attention_backend(attention))
            model = load_model(InfiniteTalkModel, open_state_dict([path], "cuda"), options)
            built[(mode, attention)] = (model, _forward(model, inputs))
        return built[(mode, attention)]

    return get


def _forward(model, inputs):
    with torch.inference_mode():
        return model(inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs["clip_fea"], y=inputs["y"],
                     audio=inputs["audio"])


@pytest.mark.parametrize("streams", [1, 4, 16], ids=lambda s: f"streams{s}")
@pytest.mark.parametrize("count", [0, 20, 40], ids=lambda c: f"swap{c}")
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", MODES)
def test_seed_matrix_case_is_bit_identical_to_resident(weights, models, mode, attention, count, streams):
    model, ref = models(mode, attention)
    args = {"blocks_to_swap": count, "auto_hardware_tuning": False, "num_cuda_streams": streams,
            "bandwidth_target": 0.5}
    plan = plan_block_swap(args, [block_nbytes(b) for b in model.blocks], 1 << 40, 0)
    swapper = BlockSwapper.attach(model.blocks, plan, CUDA)
    try:
        for _ in range(2):
            out = _forward(model, weights[1])
            assert torch.isfinite(out).all()
            assert torch.equal(out, ref)
        assert swapper.stats.passes == (2 if count else 0)
        assert len(plan.swapped) == count
    finally:
        swapper.detach()
    model.to(CUDA)
