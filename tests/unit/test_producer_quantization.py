"""Activations quantized by the step that produces them (wanvideo.layers.per_token with consumers, the FFN's GELU):
where the consuming Linears run the fp8 row-wise GEMM (forced here through ``kernel_override``; the CPU's
``_scaled_mm`` emulates it), the norms hand them ``QuantizedRows`` and the model output equals the run where each
Linear quantizes its own input. Other layers never receive them."""
import pytest
import torch
from cpu_scaled_mm import rowwise_scaled_mm_on_cpu

from infinitetalk.attention import resolve
from infinitetalk.fp8_optimization import QuantLinear, ops_for, takes_quantized_rows
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.quant_formats import Kernel
from infinitetalk.quant_gemm import QuantizedRows, quantize_rows
from infinitetalk.wanvideo import layers as wan_layers
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

CPU = torch.device("cpu")


def _model(mode: str) -> InfiniteTalkModel:
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=8, clip_dim=32,
                    audio=AudioConfig(intermediate_dim=16, output_dim=32, context_tokens=4))
    torch.manual_seed(0)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", CPU, torch.float32)).eval()
    quantized = InfiniteTalkModel(cfg, ops_for(mode), resolve("sdpa", CPU, torch.float32))
    quantized.load_state_dict(model.state_dict())
    for layer in quantized.modules():
        if isinstance(layer, QuantLinear):
            layer.kernel_override = Kernel.FP8_ROWWISE
    return quantized.to(torch.bfloat16).eval()


def _forward(model: InfiniteTalkModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, 2, 4, 4, generator=gen), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=gen))
    extra = {"clip_fea": torch.randn(1, 257, 32, generator=gen), "y": torch.randn(1, 20, 2, 4, 4, generator=gen),
             "audio": torch.randn(1, 1, 5, 5, 12, 768, generator=gen)}
    with torch.inference_mode():
        return model(*args, **extra)


@pytest.mark.skipif(not rowwise_scaled_mm_on_cpu(), reason="this torch's CPU _scaled_mm has no row-wise scales")
def test_producers_quantize_for_fp8_layers_and_the_output_is_unchanged(monkeypatch):
    model = _model("fp8_e4m3fn_scaled_fast")
    made = []
    real = wan_layers.quantized_output

    def counting(math, x, *args, kernel=None):
        made.append(math.__name__)
        return real(math, x, *args, kernel=kernel)

    monkeypatch.setattr(wan_layers, "quantized_output", counting)
    fused = _forward(model)
    # per block: norm1+modulation (q/k/v), norm3 (text/image q), the text + image attention sum (cross-attention o),
    # norm_x (audio q), norm2+modulation (FFN up), GELU
    assert sorted(made) == sorted(["_norm_modulate_math", "_layer_norm_math", "_sum_math", "_layer_norm_math",
                                   "_norm_modulate_math", "_gelu_math"] * 2)
    monkeypatch.setattr(wan_layers, "takes_quantized_rows", lambda layers, x: False)
    assert torch.equal(fused, _forward(model))


def test_layers_that_do_not_run_the_fp8_rowwise_gemm_get_plain_activations():
    model = _model("fp8_e4m3fn_scaled")  # weight-only fp8: dequantize, then a bf16 GEMM
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.kernel_override = None
    x = torch.randn(1, 7, 64).bfloat16()
    assert not takes_quantized_rows((model.blocks[0].self_attn.q,), x)
    fast = ops_for("fp8_e4m3fn_scaled_fast").Linear(40, 64)  # K = 40 is padded to 48: the layer pads its input
    fast.kernel_override = Kernel.FP8_ROWWISE
    assert not takes_quantized_rows((fast,), torch.randn(3, 40).bfloat16())
    hooked = ops_for("fp8_e4m3fn_scaled_fast").Linear(64, 64)
    hooked.kernel_override = Kernel.FP8_ROWWISE
    assert takes_quantized_rows((hooked,), x)
    hooked.register_forward_hook(lambda m, a, out: out)  # e.g. an unmerged LoRA: it needs the activation itself
    assert not takes_quantized_rows((hooked,), x)


def test_quantized_rows_given_to_a_dense_layer_raise_with_the_layer_name():
    layer = ops_for("fp8_e4m3fn_scaled").Linear(64, 32)
    layer.layer_name = "blocks.3.ffn.2"
    rows = quantize_rows(torch.randn(5, 64).bfloat16(), 0, (5,))
    assert isinstance(rows, QuantizedRows) and rows.shape == (5, 64)
    with pytest.raises(ValueError, match="blocks.3.ffn.2: got activations quantized"):
        layer(rows)
