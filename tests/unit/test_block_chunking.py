"""The block's FFN, its cross-attention queries, the q/k rotation and the float32 norms / modulation / gated
residuals run over token chunks (wanvideo.model.FFN_CHUNK_TOKENS and CROSS_ATTN_CHUNK_TOKENS,
wanvideo.layers.TOKEN_CHUNK) to bound activation memory when they run eagerly (CPU, or no Triton); the results
equal the unchunked expressions, and the fused steps (a norm with its modulation, the q/k RMSNorm with its RoPE)
equal the composed ones."""
import pytest
import torch

from infinitetalk.attention import resolve
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.wanvideo import layers as wan_layers
from infinitetalk.wanvideo import model as wan_model
from infinitetalk.wanvideo.config import WanConfig
from infinitetalk.wanvideo.layers import WanLayerNorm, WanRMSNorm, gated_residual, modulate
from infinitetalk.wanvideo.model import BlockContext, WanAttentionBlock
from infinitetalk.wanvideo.rope import apply_rope, norm_and_rotate, rope_table_3d


@pytest.mark.parametrize("mode,dtype", [("disabled", torch.float32), ("disabled", torch.bfloat16),
                                        ("fp8_e4m3fn_scaled", torch.bfloat16)])
def test_chunked_ffn_equals_one_pass(monkeypatch, mode, dtype):
    cfg = WanConfig(dim=64, ffn_dim=160, num_heads=2, num_layers=1, text_dim=32, clip_dim=32)
    torch.manual_seed(0)
    block = WanAttentionBlock(cfg, ops_for(mode), resolve("sdpa", "cpu", torch.float32)).to(dtype).eval()
    grid = (3, 4, 5)
    x = torch.randn(2, 60, cfg.dim).to(dtype)
    e0 = 0.1 * torch.randn(2, 6, cfg.dim)
    ctx = BlockContext(grid=grid, rope=rope_table_3d(grid, cfg.head_dim, torch.device("cpu")),
                       context=torch.randn(2, 257 + 7, cfg.dim).to(dtype), n_img=257)
    with torch.inference_mode():
        whole = block(x, e0, ctx)
        monkeypatch.setattr(wan_model, "FFN_CHUNK_TOKENS", 16)  # 60 tokens -> chunks of 16, 16, 16, 12
        monkeypatch.setattr(wan_model, "CROSS_ATTN_CHUNK_TOKENS", 13)
        monkeypatch.setattr(wan_layers, "TOKEN_CHUNK", 11)
        chunked = block(x, e0, ctx)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [4096, 7])
def test_in_place_helpers_keep_the_roundings_of_the_expressions(monkeypatch, chunk):
    monkeypatch.setattr(wan_layers, "TOKEN_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 50, 64, generator=gen).bfloat16() for _ in range(2))
    shift, scale, gate = (torch.randn(2, 1, 64, generator=gen) for _ in range(3))
    assert torch.equal(modulate(x, shift, scale), (x.float() * (1 + scale) + shift).bfloat16())
    assert torch.equal(gated_residual(x, y, gate), (x.float() + y.float() * gate).bfloat16())
    rms = WanRMSNorm(64)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(rms(x), normed * rms.weight.bfloat16())
    layer_norm = WanLayerNorm(64, elementwise_affine=True)
    expected_ln = torch.nn.functional.layer_norm(xf, (64,), layer_norm.weight, layer_norm.bias, 1e-6).bfloat16()
    assert torch.equal(layer_norm(x), expected_ln)
    grid = (2, 5, 5)
    rope = rope_table_3d(grid, 32, torch.device("cpu"))
    q = torch.randn(1, 50, 2, 32, generator=gen)
    pairs = q.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rope.cos.unsqueeze(-2), rope.sin.unsqueeze(-2)
    expected = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    assert torch.equal(apply_rope(q, rope), expected)


def test_chunked_rotation_to_a_dtype_equals_the_cast_float32_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    grid = (3, 4, 5)
    table = rope_table_3d(grid, 32, torch.device("cpu"))
    q = torch.randn(2, 60, 3, 32, generator=gen).bfloat16()
    monkeypatch.setattr(wan_layers, "TOKEN_CHUNK", 16)
    out = apply_rope(q, table, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, apply_rope(q, table).bfloat16())


@pytest.mark.parametrize("chunk", [4096, 7])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_steps_equal_the_composed_ones(monkeypatch, chunk, affine):
    monkeypatch.setattr(wan_layers, "TOKEN_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 64, generator=gen).bfloat16()
    shift, scale = (torch.randn(2, 1, 64, generator=gen) for _ in range(2))
    norm = WanLayerNorm(64, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    assert torch.equal(norm.modulated(x, shift, scale), modulate(norm(x), shift, scale))
    rms = WanRMSNorm(64)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    table = rope_table_3d((2, 3, 5), 32, torch.device("cpu"))
    expected = apply_rope(rms(x).unflatten(-1, (2, 32)), table, x.dtype)
    out = norm_and_rotate(rms, x, table, (2, 32))
    assert out.shape == (2, 30, 2, 32) and out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_native_rms_norm_switch_is_close_to_the_reference_and_changes_the_kernel():
    """rms_norm_function=pytorch: torch's rms_norm, within bf16 rounding of the official formula."""
    from infinitetalk.wanvideo.layers import use_native_rms_norm

    norm = WanRMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    holder = torch.nn.Sequential(norm)
    x = torch.randn(3, 10, 64).bfloat16()
    reference = norm(x)
    use_native_rms_norm(holder, True)
    native = norm(x)
    use_native_rms_norm(holder, False)
    assert native.dtype == torch.bfloat16 and not torch.equal(native, reference)
    torch.testing.assert_close(native.float(), reference.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(norm(x), reference)


def test_chunked_block_traces_under_torch_compile(monkeypatch):
    """WanVideoTorchCompileSettings compiles the blocks: the chunked code paths must trace (dynamo, eager backend)
    and give the eager result."""
    cfg = WanConfig(dim=64, ffn_dim=160, num_heads=2, num_layers=1, text_dim=32, clip_dim=32)
    torch.manual_seed(0)
    block = WanAttentionBlock(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32)).eval()
    grid = (3, 4, 5)
    x, e0 = torch.randn(1, 60, cfg.dim), 0.1 * torch.randn(1, 6, cfg.dim)
    ctx = BlockContext(grid=grid, rope=rope_table_3d(grid, cfg.head_dim, torch.device("cpu")),
                       context=torch.randn(1, 257 + 7, cfg.dim), n_img=257)
    monkeypatch.setattr(wan_model, "FFN_CHUNK_TOKENS", 16)
    monkeypatch.setattr(wan_model, "CROSS_ATTN_CHUNK_TOKENS", 13)
    monkeypatch.setattr(wan_layers, "TOKEN_CHUNK", 11)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(x, e0, ctx)
        compiled = torch.compile(block, backend="eager")(x, e0, ctx)
        torch.testing.assert_close(compiled, block(x, e0, ctx), rtol=1e-6, atol=1e-6)
    reasons = {str(r.reason).splitlines()[0] for r in explained.break_reasons}
    assert all("torch.compiler.disable" in r for r in reasons), reasons  # only the attention call breaks the graph
