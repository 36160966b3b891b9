"""The sampler's run-time switches (quant_runtime.linear_runtime, attention.operand_checks):
fuse_qkv_projections runs q/k/v as one GEMM with the same results, force_contiguous_tensors reports layout copies once
and verifies attention operands, use_cublas_gemm switches the quantization helpers to eager torch ops."""
import logging

import pytest
import torch

from infinitetalk import compiled_kernels
from infinitetalk.attention import operand_checks, resolve
from infinitetalk.fp8_optimization import ops_for, projections
from infinitetalk.quant_runtime import LinearRuntime, linear_runtime
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

CPU = torch.device("cpu")


def layers(mode, n=3, dim=48, seed=0):
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        layer = ops_for(mode).Linear(dim, dim)
        weight = torch.randn(dim, dim) * dim ** -0.5
        layer.load_state_dict({"weight": weight, "bias": 0.1 * torch.randn(dim)}, strict=False)
        out.append(layer.eval())
    return out


@pytest.mark.parametrize("mode", ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled", "fp8_e4m3fn_scaled_fast"])
def test_fused_projections_equal_separate_calls_and_share_one_output(mode):
    qkv = layers(mode)
    x = torch.randn(2, 7, 48)
    separate = [layer(x) for layer in qkv]
    with linear_runtime(LinearRuntime(fuse_qkv=True)):
        fused = list(projections(qkv, x))
    storages = {t.untyped_storage().data_ptr() for t in fused}
    assert len(storages) == 1  # one GEMM output, sliced
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unfused = list(projections(qkv, x))  # switch off: one GEMM per layer
    assert len({t.untyped_storage().data_ptr() for t in unfused}) == 3
    for a, b in zip(unfused, separate):
        assert torch.equal(a, b)


def test_projections_are_computed_one_at_a_time():
    qkv = layers("disabled")
    calls = []
    for layer in qkv:
        layer.register_forward_hook(lambda m, a, out: calls.append(m))
    outputs = projections(qkv, torch.randn(1, 5, 48))
    assert calls == []
    next(outputs)
    assert calls == [qkv[0]]


def test_layers_with_hooks_are_not_fused():
    qkv = layers("disabled")
    qkv[1].register_forward_hook(lambda m, a, out: out * 2)
    x = torch.randn(1, 5, 48)
    with linear_runtime(LinearRuntime(fuse_qkv=True)):
        outputs = list(projections(qkv, x))
    assert len({t.untyped_storage().data_ptr() for t in outputs}) == 3
    assert torch.equal(outputs[1], 2 * qkv[1].__class__.forward(qkv[1], x))


def test_fused_model_forward_matches():
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=8, clip_dim=32,
                    audio=AudioConfig(intermediate_dim=16, output_dim=32, context_tokens=4))
    torch.manual_seed(0)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", CPU, torch.float32)).eval()
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, 2, 4, 4, generator=gen), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=gen))
    extra = {"clip_fea": torch.randn(1, 257, 32, generator=gen), "y": torch.randn(1, 20, 2, 4, 4, generator=gen),
             "audio": torch.randn(1, 1, 5, 5, 12, 768, generator=gen)}
    with torch.inference_mode():
        plain = model(*args, **extra)
        with linear_runtime(LinearRuntime(fuse_qkv=True)):
            fused = model(*args, **extra)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_layout_report_names_the_layer_once(caplog):
    layer = layers("fp8_e4m3fn_scaled", n=1)[0]
    layer.layer_name = "blocks.3.self_attn.q"
    x = torch.randn(7, 2, 48).transpose(0, 1)  # non-contiguous activations
    with caplog.at_level(logging.INFO, logger="infinitetalk.quant_runtime"):
        layer(x)
        assert not caplog.records
        with linear_runtime(LinearRuntime(report_layouts=True)):
            out = layer(x)
            layer(x)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "blocks.3.self_attn.q" in lines[0] and "made contiguous" in lines[0]
    torch.testing.assert_close(out, layer(x.contiguous()))


def test_attention_operand_checks_report_strided_inputs_once(caplog):
    backend = resolve("sdpa", CPU, torch.float32)
    q = torch.randn(1, 3, 10, 16).transpose(1, 2)  # [B, L, H, D] with strides of HND
    k = v = torch.randn(1, 10, 3, 16)
    with caplog.at_level(logging.INFO, logger="infinitetalk.attention"):
        with operand_checks():
            out = backend(q, k, v)
            backend(q, k, v)
    lines = [r.getMessage() for r in caplog.records if "force_contiguous_tensors" in r.getMessage()]
    assert len(lines) == 1 and "attention input q" in lines[0]
    torch.testing.assert_close(out, backend(q.contiguous(), k, v))


def test_cublas_only_switches_the_fused_helpers_to_eager():
    calls = []

    @compiled_kernels.fused()
    def probe(x):
        calls.append(torch.compiler.is_compiling())
        return x + 1

    x = torch.ones(3)
    with compiled_kernels.eager_kernels():
        probe(x)
    with linear_runtime(LinearRuntime(cublas_only=True)):
        probe(x)
    assert calls == [False, False]
    assert not compiled_kernels._EAGER.get()  # restored on exit
