"""Quantized Linear layers on the CPU: formats, packing, the operand contract, loading, error bounds."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from cpu_scaled_mm import rowwise_scaled_mm_on_cpu

from infinitetalk.fp8_optimization import (QUANT_MODES, CastLinear, MXFP4Linear, NVFP4Linear, QuantMode,
                                           assign_layer_names, bytes_per_weight, ops_for)
from infinitetalk.quant_kernel_choice import select_kernel, self_test
from infinitetalk.quant_formats import (E4M3, GemmOperands, Kernel, check_operands, e2m1_decode, e2m1_encode,
                                        quantize_nvfp4, relative_error, swizzle_block_scales)


QUANTIZED = [m for m in QUANT_MODES if m != "disabled"]
FAST = [m for m in QUANTIZED if ops_for(m).Linear.kernels[0] is not Kernel.DENSE]


CPU_GEMMS = [Kernel.FP8_TENSORWISE] + ([Kernel.FP8_ROWWISE] if rowwise_scaled_mm_on_cpu() else [])


def trained_like(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose scales spread log-uniformly over two orders of magnitude (like trained weights)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    return torch.randn(n, k, generator=gen) * scales[:, None]


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_every_mode_has_its_own_class():
    assert QUANT_MODES[0] == "disabled" and QUANT_MODES[-3:] == ("fp4_experimental", "fp4_scaled", "fp4_scaled_fast")
    assert ops_for("disabled").Linear is CastLinear
    classes = {ops_for(m).Linear for m in QUANTIZED}
    assert len(classes) == len(QUANTIZED)
    for mode in QUANTIZED:
        assert ops_for(mode).Linear.mode is QuantMode(mode)
    with pytest.raises(ValueError, match="unknown quantization 'fp3'"):
        ops_for("fp3")


# ------------------------------------------------------------------------------------------------ formats

def test_e2m1_codes_match_the_format():
    values = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 100.0, -0.5, -6.0, -0.1])
    expected = [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7, 9, 15, 0]
    assert e2m1_encode(values).tolist() == expected
    grid = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == grid + [-g for g in grid]


def test_nvfp4_nibbles_and_scales_hand_computed():
    row = torch.zeros(1, 32)
    row[0, :6] = torch.tensor([12.0, -6.0, 3.0, 1.0, 0.5, 0.75])
    packed, block_scale, global_scale = quantize_nvfp4(row)
    # global = amax / (448 * 6) = 12 / 2688; block 0 scale = 12 / 6 / global = 448 (E4M3 0x7E); values / 2:
    # 6 -> 0x7, -3 -> 0xD, 1.5 -> 0x3, 0.5 -> 0x1, 0.25 -> 0 (tie to even), 0.375 -> 0.5 -> 0x1.
    assert global_scale.item() == pytest.approx(12 / 2688)
    assert packed[0, :8].tolist() == [0xD7, 0x13, 0x10, 0, 0, 0, 0, 0]
    assert packed[0, 8:].tolist() == [0] * 8
    assert block_scale.view(torch.uint8)[0, 0].item() == 0x7E
    layer = NVFP4Linear.from_weight(row)
    assert torch.equal(layer.weight[0], packed[0]) and layer.weight.shape == (16, 16)
    assert layer.weight_scale_2.item() == pytest.approx(12 / 2688)
    expected = torch.tensor([12.0, -6.0, 3.0, 1.0, 0.0, 1.0])
    assert torch.allclose(layer.dequantized_weight()[0, :6], expected, rtol=1e-6, atol=0)


def test_mxfp4_nibbles_and_exponent_hand_computed():
    row = torch.zeros(1, 64)
    row[0, :4] = torch.tensor([6.0, -3.0, 1.5, 0.5])
    row[0, 32:34] = torch.tensor([0.75, -0.125])
    layer = MXFP4Linear.from_weight(row)
    # block 0: amax 6 -> E8M0 exponent floor(log2 6) - 2 = 0 -> biased 127; codes 0x7, 0xD, 0x3, 0x1.
    # block 1: amax 0.75 -> exponent -3 (scale 1/8): 0.75 * 8 = 6 -> 0x7, -0.125 * 8 = -1 -> 0xA.
    assert layer.weight[0, :2].tolist() == [0xD7, 0x13] and layer.weight[0, 16].item() == 0xA7
    assert layer.weight_scale[0].tolist() == [127, 124]
    assert torch.equal(layer.dequantized_weight()[0], row[0])


def test_swizzled_scale_layout_matches_the_cublas_formula():
    scale = torch.arange(200 * 10, dtype=torch.int32).remainder(251).to(torch.uint8).view(200, 10)
    flat = swizzle_block_scales(scale).reshape(-1)
    assert flat.numel() == 256 * 12
    cols_padded = 12
    for r in range(200):
        for c in range(10):
            tile = (r // 128) * (cols_padded // 4) + c // 4
            offset = tile * 512 + (r % 32) * 16 + (r % 128) // 32 * 4 + c % 4
            assert flat[offset].item() == scale[r, c].item()


@pytest.mark.parametrize("mode", QUANTIZED)
def test_round_trip_within_format_bounds(mode):
    w = trained_like(48, 96)
    layer = ops_for(mode).Linear.from_weight(w)
    deq = layer.dequantized_weight()
    assert deq.shape == w.shape
    err = (deq - w).abs()
    if mode.startswith("fp8"):
        half_ulp = 2.0 ** -4 if "e4m3" in mode else 2.0 ** -3
        smallest = 2.0 ** -10 if "e4m3" in mode else 2.0 ** -17
        scale = layer.scale_weight[:48, None]
        assert (err <= half_ulp * w.abs() + smallest * scale + 1e-12).all()
    else:
        block = 16 if mode != "fp4_experimental" else 32
        if mode == "fp4_experimental":
            unit = torch.exp2(layer.weight_scale[:48].float() - 127)
        else:
            unit = layer.weight_scale[:48].float() * layer.weight_scale_2
        unit = unit.repeat_interleave(block, dim=1)[:, :96]
        # rounding error <= half the widest grid gap (1 unit); values beyond 6 units saturate at 6 units
        assert (err <= torch.maximum(unit, w.abs() - 6 * unit) * (1 + 1e-6)).all()
        assert (deq.abs() <= 6 * unit * (1 + 1e-6)).all()


@pytest.mark.parametrize("mode,limit", [("fp8_e4m3fn", 0.03), ("fp8_e4m3fn_scaled", 0.03), ("fp8_e5m2", 0.06),
                                        ("fp8_e5m2_scaled", 0.06), ("fp4_scaled", 0.085), ("fp4_experimental", 0.12)])
def test_relative_output_error(mode, limit):
    w, bias = trained_like(256, 512), inputs(256) * 0.01
    x = inputs(2, 64, 512, seed=2)
    ref = F.linear(x.double(), w.double(), bias.double())
    y = ops_for(mode).Linear.from_weight(w, bias)(x)
    assert relative_error(y, ref) <= limit


@pytest.mark.parametrize("mode,limit", [("fp8_e4m3fn_fast", 0.04), ("fp8_e4m3fn_scaled_fast", 0.04),
                                        ("fp8_e5m2_scaled_fast", 0.065), ("fp4_scaled_fast", 0.095)])
def test_relative_output_error_of_fp8_gemm_paths(mode, limit):
    w, bias = trained_like(256, 512), inputs(256) * 0.01
    x = inputs(2, 64, 512, seed=2)
    ref = F.linear(x.double(), w.double(), bias.double())
    layer = ops_for(mode).Linear.from_weight(w, bias)
    for kernel in CPU_GEMMS:  # the CPU emulation of _scaled_mm runs the same operands as the GPU
        layer.kernel_override = kernel
        assert relative_error(layer(x), ref) <= limit, kernel


def test_bytes_per_weight():
    n = k = 256
    w = trained_like(n, k)
    fp8 = bytes_per_weight(ops_for("fp8_e4m3fn_scaled").Linear.from_weight(w))
    nvfp4 = bytes_per_weight(ops_for("fp4_scaled").Linear.from_weight(w))
    mxfp4 = bytes_per_weight(ops_for("fp4_experimental").Linear.from_weight(w))
    assert fp8 == pytest.approx(1 + 4 / k)
    assert nvfp4 == pytest.approx(0.5 + 1 / 16 + 4 / (n * k))
    assert mxfp4 == pytest.approx(0.5 + 1 / 32)
    assert nvfp4 / fp8 < 0.6


# ---------------------------------------------------------------------------------------- operand contract

def _rowwise_operands(**changes) -> GemmOperands:
    m, k, n = 8, 32, 16
    a = torch.randn(m, k).to(E4M3)
    w = torch.randn(n, k).to(E4M3)
    fields = dict(layer_name="blocks.0.ffn.0", kernel=Kernel.FP8_ROWWISE, a=a, b=w.t(), scale_a=torch.ones(m, 1),
                  scale_b=torch.ones(1, n), bias=torch.zeros(n, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
    fields.update(changes)
    return GemmOperands(**fields)


def _offset_view(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    start = (-flat.data_ptr()) % 64 + 1
    view = flat[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    view.copy_(t)
    return view


def test_contract_accepts_the_correct_layout():
    check_operands(_rowwise_operands())


@pytest.mark.parametrize("change,message", [
    (lambda op: {"a": torch.randn(32, 16).to(E4M3).t()}, "row-major contiguous"),
    (lambda op: {"b": op.b.contiguous()}, r"stored row-major \[N, K\]"),
    (lambda op: {"a": _offset_view(op.a)}, "not 16-byte aligned"),
    (lambda op: {"b": _offset_view(op.b.t()).t()}, "weight data pointer"),
    (lambda op: {"a": torch.randn(8, 24).to(E4M3), "b": torch.randn(16, 24).to(E4M3).t()}, "multiples of 16"),
    (lambda op: {"scale_a": torch.ones(8)}, r"scale_a must be torch.float32 of shape \(8, 1\)"),
    (lambda op: {"scale_b": torch.ones(16, 1)}, r"scale_b must be torch.float32 of shape \(1, 16\)"),
    (lambda op: {"scale_b": torch.ones(1, 32)[:, ::2]}, r"scale_b must be"),
    (lambda op: {"bias": torch.zeros(16)}, "bias must be contiguous"),
    (lambda op: {"a": op.a.to(torch.float8_e5m2)}, "operands must both be"),
])
def test_contract_rejects_each_bad_operand(change, message):
    op = _rowwise_operands()
    with pytest.raises(ValueError, match=message) as info:
        check_operands(_rowwise_operands(**change(op)))
    assert "blocks.0.ffn.0" in str(info.value)


@pytest.mark.parametrize("corrupt,message", [
    (lambda w: w.t().contiguous().t(), r"stored row-major \[N, K\]"),
    (_offset_view, "weight data pointer"),
])
def test_layer_refuses_a_corrupted_weight_layout(corrupt, message):
    layer = ops_for("fp8_e4m3fn_scaled_fast").Linear.from_weight(trained_like(32, 64), layer_name="blocks.3.self_attn.q")
    layer.weight.data = corrupt(layer.weight.data)
    layer.kernel_override = Kernel.FP8_TENSORWISE
    with pytest.raises(ValueError, match=message) as info:
        layer(inputs(2, 5, 64))
    assert "blocks.3.self_attn.q" in str(info.value)


@pytest.mark.parametrize("mode", QUANTIZED)
def test_cfg_batches_and_strided_inputs(mode):
    layer = ops_for(mode).Linear.from_weight(trained_like(40, 48), inputs(40) * 0.1)  # N, K need padding
    kernels = [Kernel.DENSE] + (CPU_GEMMS if mode in FAST else [])
    base = inputs(3, 7, 48, seed=3)
    for kernel in kernels:
        layer.kernel_override = kernel
        y = layer(base)
        assert y.shape == (3, 7, 40)
        if kernel is not Kernel.FP8_TENSORWISE:  # one activation scale per token: batching changes nothing
            single = torch.cat([layer(base[i:i + 1]) for i in range(3)])
            assert torch.allclose(y, single, atol=1e-6) and torch.allclose(layer(base[:2]), single[:2], atol=1e-6)
        transposed = base.transpose(0, 1).contiguous().transpose(0, 1)
        sliced = torch.cat([base, base], dim=-1)[..., 48:]
        assert torch.equal(layer(transposed), y) and torch.equal(layer(sliced), y)


# ------------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("mode", QUANTIZED)
def test_state_dict_round_trip_bit_exact(mode):
    cls = ops_for(mode).Linear
    layer = cls.from_weight(trained_like(40, 64), inputs(40))
    state = layer.state_dict()
    fresh = cls(64, 40, device="meta")
    fresh.load_state_dict(state, assign=True)
    for name, tensor in state.items():
        assert torch.equal(getattr(fresh, name).view(torch.uint8), tensor.view(torch.uint8)), name
    x = inputs(2, 3, 64)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_high_precision_safetensors_loaded_tensor_by_tensor(tmp_path, device):
    ops = ops_for("fp4_scaled")
    with torch.device(device):
        model = torch.nn.ModuleDict({"q": ops.Linear(64, 32), "o": ops.Linear(32, 64, bias=False)})
    weights = {"q.weight": trained_like(32, 64).bfloat16(), "q.bias": inputs(32).bfloat16(),
               "o.weight": trained_like(64, 32, seed=5).bfloat16()}
    save_file(weights, tmp_path / "ckpt.safetensors")
    with safe_open(tmp_path / "ckpt.safetensors", "pt") as f:
        for key in sorted(f.keys()):  # a meta-built model takes the tensors quantized on their device
            result = model.load_state_dict({key: f.get_tensor(key)}, strict=False, assign=device == "meta")
            assert not result.unexpected_keys
    assert not any(t.is_meta for t in model.state_dict().values())
    expected = ops.Linear.from_weight(weights["q.weight"].float(), weights["q.bias"])
    assert torch.equal(model["q"].weight, expected.weight)
    assert torch.equal(model["q"].weight_scale.view(torch.uint8), expected.weight_scale.view(torch.uint8))
    strict = torch.nn.ModuleDict({"q": ops.Linear(64, 32), "o": ops.Linear(32, 64, bias=False)})
    strict.load_state_dict(weights)  # strict: no missing scale keys for a high-precision checkpoint
    assert torch.equal(strict["o"].weight, model["o"].weight)


def test_scaled_fp8_checkpoint_taken_as_is(tmp_path):
    w8 = trained_like(32, 64).mul(1000).clamp(-448, 448).to(E4M3)
    save_file({"x.weight": w8, "x.scale_weight": torch.tensor([0.01]), "x.bias": inputs(32)},
              tmp_path / "scaled.safetensors")
    model = torch.nn.ModuleDict({"x": ops_for("fp8_e4m3fn_scaled").Linear(64, 32)})
    with safe_open(tmp_path / "scaled.safetensors", "pt") as f:
        for key in sorted(f.keys()):  # scale_weight arrives before weight
            model.load_state_dict({key: f.get_tensor(key)}, strict=False)
    layer = model["x"]
    assert torch.equal(layer.weight[:32].view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(layer.scale_weight[:32], torch.full((32,), 0.01))
    assert torch.equal(layer.dequantized_weight(), w8.float() * 0.01)
    fp4 = ops_for("fp4_scaled").Linear(64, 32)
    fp4.load_state_dict({"weight": w8, "scale_weight": torch.tensor(0.01), "bias": inputs(32)})
    assert relative_error(fp4.dequantized_weight(), w8.float() * 0.01) < 0.085
    with pytest.raises(RuntimeError, match="together with its fp8 weight"):
        fp4.load_state_dict({"scale_weight": torch.tensor(0.01)}, strict=False)
    with pytest.raises(RuntimeError, match="needs its scale_weight in the same load call"):
        ops_for("fp8_e5m2_scaled").Linear(64, 32).load_state_dict({"weight": w8}, strict=False)


def test_strict_load_reports_wrong_keys_and_shapes():
    layer = ops_for("fp8_e4m3fn_scaled").Linear(64, 32)
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        layer.load_state_dict({"weight": trained_like(32, 64)})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        layer.load_state_dict({"weight": trained_like(32, 64), "bias": inputs(32), "extra": inputs(3)})
    with pytest.raises(RuntimeError, match=r"expected a float or fp8 weight of shape \(32, 64\)"):
        layer.load_state_dict({"weight": trained_like(32, 65), "bias": inputs(32)})
    packed = ops_for("fp4_scaled").Linear(64, 32)
    with pytest.raises(RuntimeError, match="Missing key.*weight_scale"):
        packed.load_state_dict({"weight": torch.zeros(32, 32, dtype=torch.uint8), "bias": inputs(32)})


def test_dtype_conversions_keep_the_format():
    layer = ops_for("fp4_scaled_fast").Linear.from_weight(trained_like(32, 64), inputs(32))
    before = {name: getattr(layer, name).clone() for name in layer.storage_names}
    model = torch.nn.Sequential(layer).to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    for name, tensor in before.items():
        assert getattr(layer, name).dtype == tensor.dtype
        assert torch.equal(getattr(layer, name).view(torch.uint8), tensor.view(torch.uint8))
    assert model(inputs(2, 64).bfloat16()).dtype == torch.bfloat16


def test_layer_names_come_from_the_model():
    ops = ops_for("fp8_e4m3fn_fast")
    model = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([torch.nn.ModuleDict({"q": ops.Linear(16, 16)})]),
                                 "head": ops_for("disabled").Linear(16, 16)})
    assert model["head"].layer_name == "CastLinear"
    assign_layer_names(model)
    assert model["blocks"][0]["q"].layer_name == "blocks.0.q" and model["head"].layer_name == "head"
    with pytest.raises(ValueError, match="blocks.0.q: input last dim 8"):
        model["blocks"][0]["q"](inputs(2, 8))


# ------------------------------------------------------------------------------------------ kernel choice

def test_cpu_falls_back_to_dequantize_with_one_log_line(caplog):
    ops = ops_for("fp8_e5m2_scaled_fast")
    layer = ops.Linear.from_weight(trained_like(16, 32))
    with caplog.at_level(logging.WARNING):
        kernels = {ops.kernel_for("cpu", torch.float64) for _ in range(3)}
        y = layer(inputs(4, 32).double())
    assert kernels == {Kernel.DENSE} and y.dtype == torch.float64
    lines = [r.getMessage() for r in caplog.records if "fp8_e5m2_scaled_fast" in r.getMessage()]
    assert len(lines) == 1 and "fp8_rowwise skipped (needs a CUDA GPU" in lines[0] and "running dense" in lines[0]
    assert ops_for("disabled").kernel_for("cpu") is Kernel.DENSE


class _SwappedScales(ops_for("fp8_e4m3fn_scaled_fast").Linear):
    """A deliberately wrong layer: hands the fp8 GEMM its channel scales in reversed order."""

    def _fp8_operands(self):
        return self.weight, self.scale_weight.flip(0).view(1, -1).contiguous()


class _BrokenDense(_SwappedScales):
    """A deliberately wrong layer: its dense GEMM output has its channels reversed."""

    kernels = (Kernel.DENSE,)

    def _run_dense(self, rows):
        return super()._run_dense(rows).flip(-1)


def test_self_test_refuses_numerically_wrong_paths():
    assert self_test(ops_for("fp8_e4m3fn_scaled_fast").Linear, Kernel.FP8_TENSORWISE, torch.device("cpu"),
                     torch.float32) is None
    reason = self_test(_SwappedScales, Kernel.FP8_TENSORWISE, torch.device("cpu"), torch.float32)
    assert reason is not None and "differs from the float32 reference" in reason
    with pytest.raises(RuntimeError, match="no kernel is numerically correct"):
        select_kernel(_BrokenDense, torch.device("cpu"), torch.float32)


def test_matmul_precision_sets_and_restores_the_flags():
    from infinitetalk.quant_runtime import matmul_precision

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, getattr(matmul, "allow_fp16_accumulation", None))
    with matmul_precision(tf32=True, fp16_accumulation=True):
        assert matmul.allow_tf32 and cudnn.allow_tf32
        if before[2] is not None:
            assert matmul.allow_fp16_accumulation
    with matmul_precision(tf32=False):
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    assert (matmul.allow_tf32, cudnn.allow_tf32, getattr(matmul, "allow_fp16_accumulation", None)) == before
