"""The DiT's per-token float32 steps as generated kernels on a CUDA GPU (wanvideo.layers.per_token): each equals
its eager form within bf16 rounding, for batches of 1 and 2, odd token counts and strided inputs; it really runs
as a generated kernel, keeps no float32 copy of the activation in memory, and a whole model forward agrees with
the eager run, also in fp8 _fast where the norms and the GELU hand their Linears the input already quantized."""
import pytest
import torch

from infinitetalk.attention import resolve
from infinitetalk.compiled_kernels import eager_kernels, runs_compiled
from infinitetalk.fp8_optimization import takes_quantized_rows
from infinitetalk.wanvideo.layers import WanLayerNorm, WanRMSNorm, gated_residual, modulate
from infinitetalk.wanvideo.rope import apply_rope, norm_and_rotate, rope_table_3d
from tiny_infinitetalk import forward, load_on_cuda, tiny_config, tiny_inputs, write_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_STEP = 2.0 ** -7  # relative spacing of bf16 values: a kernel that sums in another order may differ by one


def _close(name: str, fused: torch.Tensor, eager: torch.Tensor) -> None:
    """Equal up to bf16 roundings of intermediate values that a generated reduction sums in another order."""
    assert fused.dtype == eager.dtype and fused.shape == eager.shape, name
    f, e = fused.float(), eager.float()
    assert torch.isfinite(f).all(), name
    assert float((f - e).norm() / e.norm()) < BF16_STEP / 2, name
    assert float((f - e).abs().max()) <= 4 * BF16_STEP * float(e.abs().max()), name


def _steps(x: torch.Tensor, grid: tuple[int, int, int], heads: tuple[int, int]):
    """(name, callable) of every fused step on x [B, S, H·D] (S = prod(grid))."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, dim = x.shape[0], x.shape[-1]
    shift, scale, gate = (0.5 * torch.randn(b, 1, dim, generator=gen, device="cuda") for _ in range(3))
    y = torch.randn(x.shape, generator=gen, device="cuda").bfloat16()
    plain, affine, rms = WanLayerNorm(dim).cuda(), WanLayerNorm(dim, elementwise_affine=True).cuda(), WanRMSNorm(dim)
    with torch.no_grad():
        affine.weight.uniform_(0.5, 1.5)
        affine.bias.uniform_(-0.5, 0.5)
        rms = rms.cuda()
        rms.weight.uniform_(0.5, 1.5)
    table = rope_table_3d(grid, heads[1], torch.device("cuda"))
    return [("layer_norm", lambda: affine(x)), ("modulated", lambda: plain.modulated(x, shift, scale)),
            ("modulate", lambda: modulate(x, shift, scale)), ("gated_residual", lambda: gated_residual(x, y, gate)),
            ("rms_norm", lambda: rms(x)), ("norm_and_rotate", lambda: norm_and_rotate(rms, x, table, heads)),
            ("apply_rope", lambda: apply_rope(x.unflatten(-1, heads), table, torch.bfloat16))]


@pytest.mark.parametrize("batch,grid,strided", [(1, (3, 7, 11), False), (2, (5, 9, 7), False), (2, (3, 5, 7), True)])
def test_fused_steps_equal_their_eager_form(batch, grid, strided):
    heads, tokens = (3, 64), grid[0] * grid[1] * grid[2]
    gen = torch.Generator(device="cuda").manual_seed(1)
    if strided:  # a [S, B, C] buffer seen as [B, S, C]: not contiguous
        x = torch.randn(tokens, batch, 192, generator=gen, device="cuda").bfloat16().transpose(0, 1)
    else:
        x = torch.randn(batch, tokens, 192, generator=gen, device="cuda").bfloat16()
    assert runs_compiled(x)
    for name, step in _steps(x, grid, heads):
        fused = step()
        with eager_kernels():
            eager = step()
        torch.cuda.synchronize()
        _close(name, fused, eager)


def test_a_fused_step_is_one_generated_kernel_without_float32_temporaries():
    dim, tokens = 5120, 4096
    x = torch.randn(1, tokens, dim, device="cuda").bfloat16()
    shift, scale = (torch.randn(1, 1, dim, device="cuda") for _ in range(2))
    norm = WanLayerNorm(dim).cuda()
    norm.modulated(x, shift, scale)  # compile outside the measurement
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = norm.modulated(x, shift, scale)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the CUDA profiler records nothing here (CUPTI is taken, e.g. by compute-sanitizer)")
    assert len(kernels) == 1 and kernels[0].startswith("triton"), kernels
    assert out.dtype == torch.bfloat16 and peak <= 1.05 * out.numel() * out.element_size(), peak


def test_model_forward_with_fused_steps_matches_the_eager_run(tmp_path):
    cfg = tiny_config(2)
    model = load_on_cuda(write_weights(cfg, tmp_path / "tiny.safetensors"), "disabled",
                         resolve("sdpa", "cuda", torch.bfloat16))
    inputs = tiny_inputs(cfg)
    fused = forward(model, inputs).float()
    with eager_kernels():
        eager = forward(model, inputs).float()
    assert torch.isfinite(fused).all()
    assert float((fused - eager).norm() / eager.norm()) < 5e-3


def test_fp8_model_with_producer_quantization_matches_the_eager_run(tmp_path, monkeypatch):
    """fp8 _fast on an fp8-GEMM GPU: the norms and the GELU hand their consumers QuantizedRows made in one
    quant_triton pass (6 per block, the cross-attention's text + image sum included); the output stays within fp8
    noise of the eager run, where every Linear quantizes its own bf16 input."""
    from infinitetalk.wanvideo import layers as wan_layers

    cfg = tiny_config(2)
    model = load_on_cuda(write_weights(cfg, tmp_path / "tiny.safetensors"), "fp8_e4m3fn_scaled_fast",
                         resolve("sdpa", "cuda", torch.bfloat16))
    if not takes_quantized_rows((model.blocks[0].ffn[0],), torch.zeros(1, 16, cfg.dim, device="cuda").bfloat16()):
        pytest.skip("this GPU has no fp8 row-wise GEMM")
    made, real = [], wan_layers.quantized_output
    monkeypatch.setattr(wan_layers, "quantized_output",
                        lambda math, x, *a, kernel=None: made.append(kernel) or real(math, x, *a, kernel=kernel))
    inputs = tiny_inputs(cfg)
    fused = forward(model, inputs).float()
    # per block, each one quant_triton pass: norm1+modulation, norm3, the attention sum, norm_x, norm2+modulation, GELU
    assert sorted(made) == sorted(["gelu_e4m3", "sum_e4m3"] * cfg.num_layers
                                  + ["layer_norm_e4m3"] * 4 * cfg.num_layers)
    with eager_kernels():
        eager = forward(model, inputs).float()
    assert len(made) == 6 * cfg.num_layers and torch.isfinite(fused).all()  # eager: no producer quantization
    assert float((fused - eager).norm() / eager.norm()) < 2e-2


@pytest.mark.parametrize("batch,strided", [(1, False), (2, True)])
def test_producer_kernels_equal_the_eager_step_then_quantization(batch, strided):
    """quant_triton's one-pass LayerNorm(+affine)(+modulation), GELU and sum quantization against the eager step
    followed by quantize_rows_e4m3 at the 14B widths: the same e4m3 codes except where a float32 reduction order
    flips a bf16 rounding (a few elements, one e4m3 step each)."""
    import torch.nn.functional as F

    from infinitetalk import quant_triton as QT
    from infinitetalk.quant_formats import quantize_rows_e4m3

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversion needs compute capability 8.9+")
    gen = torch.Generator(device="cuda").manual_seed(3)
    s, c = 1531, 5120
    x = torch.randn(s, batch, c, generator=gen, device="cuda").bfloat16().transpose(0, 1) if strided else \
        torch.randn(batch, s, c, generator=gen, device="cuda").bfloat16()
    w, b = (1 + 0.3 * torch.randn(c, generator=gen, device="cuda"), 0.2 * torch.randn(c, generator=gen, device="cuda"))
    shift, scale = (0.5 * torch.randn(batch, 1, c, generator=gen, device="cuda") for _ in range(2))
    plain = F.layer_norm(x.float(), (c,), None, None, 1e-6).bfloat16()
    hidden = 2 * torch.randn(batch, 777, 13824, generator=gen, device="cuda").bfloat16()
    cases = {"affine": (QT.layer_norm_e4m3(x, w, b, 1e-6), F.layer_norm(x.float(), (c,), w, b, 1e-6).bfloat16()),
             "modulated": (QT.layer_norm_e4m3(x, None, None, 1e-6, shift, scale),
                           (plain.float() * (1 + scale) + shift).bfloat16()),
             "gelu": (QT.gelu_e4m3(hidden, "tanh"), F.gelu(hidden, approximate="tanh")),
             "sum": (QT.sum_e4m3(x, plain), x + plain)}
    for name, ((data, row_scale), step) in cases.items():
        ref_data, ref_scale = quantize_rows_e4m3(step.reshape(-1, step.shape[-1]), 0)
        assert data.shape == ref_data.shape and row_scale.shape == ref_scale.shape, name
        assert float(((row_scale - ref_scale).abs() / ref_scale).max()) < 1e-2, name
        differ = (data.view(torch.uint8) != ref_data.view(torch.uint8)).float().mean()
        value, ref = data.float() * row_scale, ref_data.float() * ref_scale
        assert float(differ) < 0.01 and float((value - ref).norm() / ref.norm()) < 5e-3, (name, float(differ))
