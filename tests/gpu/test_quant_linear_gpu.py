"""Quantized Linear layers on a CUDA GPU: real ``_scaled_mm`` kernels, kernel choice, layouts from views.

Meant to run under ``compute-sanitizer --tool memcheck`` as well (small shapes only).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from infinitetalk.fp8_optimization import QUANT_MODES, assign_layer_names, ops_for
from infinitetalk.quant_formats import Kernel, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUANTIZED = [m for m in QUANT_MODES if m != "disabled"]
FAST = [m for m in QUANTIZED if m.endswith("_fast")]
WITH_FP8_OPERANDS = [m for m in QUANTIZED if m != "fp4_experimental"]
# weight-format error plus (fp8 GEMMs) the per-token e4m3 activation rounding, on trained-like weights
LIMITS = {"e4m3": 0.03, "e5m2": 0.06, "fp4_scaled": 0.085, "fp4_experimental": 0.12}


def _limit(mode: str, kernel: Kernel) -> float:
    key = next(k for k in LIMITS if k in mode)
    return LIMITS[key] + (0.012 if kernel is not Kernel.DENSE else 0.0)


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _expected_kernel(mode: str) -> Kernel:
    cap = _capability()
    if mode not in FAST:
        return Kernel.DENSE
    if mode == "fp4_scaled_fast" and cap >= (10, 0):
        return Kernel.NVFP4_NATIVE
    return Kernel.FP8_ROWWISE if cap >= (9, 0) or cap == (8, 9) else Kernel.DENSE


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    w = torch.randn(n, k, generator=gen) * scales[:, None]
    return w.cuda(), (torch.randn(n, generator=gen) * 0.01).cuda()


def _inputs(*shape: int, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)


@pytest.mark.parametrize("mode", QUANTIZED)
def test_mode_selects_its_fastest_correct_kernel(mode):
    assert ops_for(mode).kernel_for("cuda") is _expected_kernel(mode)


@pytest.mark.parametrize("mode", QUANTIZED)
def test_every_mode_on_cfg_batches_transposes_and_slices(mode):
    w, b = _weights(72, 200)  # N and K need padding to 16
    layer = ops_for(mode).Linear.from_weight(w, b)
    x = _inputs(3, 50, 200)
    ref = F.linear(x.float(), w, b)
    y = layer(x)
    assert y.shape == (3, 50, 72) and y.dtype == torch.bfloat16
    assert relative_error(y, ref) <= _limit(mode, _expected_kernel(mode))
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)
    sliced = torch.cat([x, x], dim=-1)[..., 200:]
    assert torch.equal(layer(transposed), y)
    assert torch.equal(layer(sliced), y)
    assert relative_error(layer(x[:2]), y[:2]) < 5e-3  # another M may pick another GEMM algorithm


@pytest.mark.parametrize("kernel", [Kernel.FP8_ROWWISE, Kernel.FP8_TENSORWISE])
@pytest.mark.parametrize("mode", WITH_FP8_OPERANDS)
def test_every_fp8_operand_format_through_real_scaled_mm(mode, kernel):
    if _capability() < (9, 0) and _capability() != (8, 9):
        pytest.skip("fp8 GEMMs need compute capability 8.9 or 9.0+")
    w, b = _weights(96, 256, seed=2)
    layer = ops_for(mode).Linear.from_weight(w, b)
    layer.kernel_override = kernel
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = _inputs(2, 33, 256, dtype=dtype, seed=3)
        y = layer(x)
        assert y.dtype == dtype
        assert relative_error(y, F.linear(x.float(), w, b)) <= _limit(mode, kernel)


@pytest.mark.parametrize("corrupt,message", [
    (lambda w: w.t().contiguous().t(), r"stored row-major \[N, K\]"),
    (lambda w: torch.cat([w.reshape(-1), w.reshape(-1)])[16:16 + w.numel()].view(w.shape), "256-byte aligned"),
])
def test_bad_weight_layout_is_a_python_error_not_a_cuda_error(corrupt, message):
    if _capability() < (9, 0) and _capability() != (8, 9):
        pytest.skip("fp8 GEMMs need compute capability 8.9 or 9.0+")
    w, b = _weights(64, 128)
    model = torch.nn.ModuleDict({"ffn": ops_for("fp8_e4m3fn_scaled_fast").Linear.from_weight(w, b)})
    assign_layer_names(model)
    model["ffn"].weight.data = corrupt(model["ffn"].weight.data)
    with pytest.raises(ValueError, match=message) as info:
        model["ffn"](_inputs(2, 16, 128))
    assert str(info.value).startswith("ffn (fp8_rowwise GEMM)")
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fp8_e5m2_scaled_fast", "fp4_scaled_fast", "fp4_experimental"])
def test_move_to_gpu_and_state_dict_round_trip(mode):
    cls = ops_for(mode).Linear
    w, b = _weights(48, 96)
    layer = cls.from_weight(w.cpu(), b.cpu()).to("cuda").to(torch.bfloat16)
    assert all(getattr(layer, name).is_cuda for name in layer.storage_names) and layer.bias.dtype == torch.bfloat16
    assert layer.weight.dtype != torch.bfloat16
    x = _inputs(2, 9, 96)
    y = layer(x)
    fresh = cls(96, 48, device="cuda", dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    gpu_quantized = cls.from_weight(w, b.bfloat16())  # quantized on the GPU instead of the CPU
    differing = (gpu_quantized.weight.view(torch.uint8) != layer.weight.view(torch.uint8)).float().mean().item()
    assert differing < 1e-3


@pytest.mark.parametrize("mode", ["disabled", "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast", "fp8_e5m2_fast",
                                  "fp4_scaled_fast"])
@pytest.mark.parametrize("fuse", [True, False])
def test_qkv_projections_match_separate_layers(mode, fuse):
    """projections: with fuse_qkv_projections one GEMM over q/k/v, without it one shared activation quantization
    for the fp8 GEMM kernels; N and K need padding."""
    from infinitetalk.fp8_optimization import projections
    from infinitetalk.quant_runtime import LinearRuntime, linear_runtime

    layers = []
    for seed in range(3):
        w, b = _weights(72, 200, seed=seed)
        if mode == "disabled":
            layer = ops_for(mode).Linear(200, 72, device="cuda", dtype=torch.bfloat16)
            layer.load_state_dict({"weight": w, "bias": b})
        else:
            layer = ops_for(mode).Linear.from_weight(w.bfloat16(), b.bfloat16())
        layers.append(layer)
    x = _inputs(2, 33, 200)
    separate = [layer(x) for layer in layers]
    with linear_runtime(LinearRuntime(fuse_qkv=fuse)):
        together = list(projections(layers, x))
    torch.cuda.synchronize()
    for a, b in zip(together, separate):
        assert a.shape == b.shape and relative_error(a, b) < 1e-2
    if "fast" in mode and not fuse:  # the same quantized rows and GEMMs as the separate calls
        assert all(torch.equal(a, b) for a, b in zip(together, separate))


def test_cublas_only_runs_no_generated_kernel():
    """use_cublas_gemm: the quantization helpers run eagerly (dynamo compiles no new frame)."""
    from torch._dynamo.utils import counters

    from infinitetalk.quant_runtime import LinearRuntime, linear_runtime

    w, b = _weights(48, 176, seed=5)  # a weight shape no other test compiles for
    layer = ops_for("fp8_e4m3fn_scaled_fast").Linear.from_weight(w.bfloat16(), b.bfloat16())
    x = _inputs(9, 176)
    before = sum(counters["frames"].values())
    with linear_runtime(LinearRuntime(cublas_only=True)):
        eager = layer(x)
    assert sum(counters["frames"].values()) == before
    compiled = layer(x)
    assert sum(counters["frames"].values()) > before
    assert relative_error(eager, compiled) < 1e-2
