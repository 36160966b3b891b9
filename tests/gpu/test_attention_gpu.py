"""Attention back-ends on a CUDA GPU (skipped without one): every mode resolves without a CUDA error, names what
runs, and matches float32 math on transposed, sliced, misaligned and padded inputs at Wan-like shapes.

Small shapes only, so the file can run under ``compute-sanitizer --tool memcheck``.
"""
import dataclasses
import math

import pytest
import torch

from infinitetalk import attention as A
from infinitetalk import attention_kernels as ext
from infinitetalk.attention import ATTENTION_MODES, math_attention, relative_error, resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
EIGHT_BIT = {"sage2", "sage1", "triton_fp8"}


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def bound(kernel: str) -> float:
    """Relative error allowed against float32 math for a bf16 call on Gaussian inputs."""
    if kernel.startswith("comfy:"):
        return 0.08
    return A._KERNELS[kernel].tolerance


def inputs(b=2, lq=1000, lk=77, h=4, d=128, dtype=torch.bfloat16, seed=0):
    """q a transposed slice, k/v slices of one interleaved buffer (the model's fused-kv layout), on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq + 3, d, generator=gen).to(dtype).to(CUDA).transpose(1, 2)[:, 3:]
    kv = torch.randn(b, lk, 2, h, d, generator=gen).to(dtype).to(CUDA)
    return q, kv[:, :, 0], kv[:, :, 1]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element (2 bytes for bf16) past a 256-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def reference(q, k, v, k_lens=None):
    return math_attention(q.float(), k.float(), v.float(), k_lens)


@pytest.fixture(scope="module", autouse=True)
def fresh():
    A.clear_cache()
    yield
    A.clear_cache()


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_every_mode_resolves_and_matches_math(mode):
    backend = resolve(mode, CUDA, torch.bfloat16)
    torch.cuda.synchronize()  # a mode that cannot run here must have fallen back without a CUDA error
    assert backend.kernel in backend.describe()
    q, k, v = inputs()
    cases = {"strided": (q, k, v, None), "padded keys": (q, k, v, torch.tensor([77, 40], device=CUDA)),
             "self-attention, odd length": (q, q[:, :999], q[:, 1:], None),
             "sliced": (q[:, ::2], k[:, 5:], v[:, 5:], None),
             "misaligned": (misaligned(q.contiguous()), misaligned(k.contiguous()), v, None)}
    for name, (cq, ck, cv, lens) in cases.items():
        kernel = backend.kernel_for(cq, ck, cv)
        out = backend(cq, ck, cv, lens)
        torch.cuda.synchronize()
        assert out.shape == cq.shape and out.is_contiguous() and out.dtype == torch.bfloat16, name
        err = relative_error(out, reference(cq, ck, cv, None if lens is None else lens.cpu()))
        assert err < bound(kernel), f"{mode} / {name}: {kernel} error {err:.4f}"


@pytest.mark.parametrize("mode", ["sdpa", "sageattn", "flash_attn_3"])
def test_float32_inputs(mode):
    backend = resolve(mode, CUDA, torch.float32)
    q, k, v = inputs(dtype=torch.float32, lq=300)
    out = backend(q, k, v)
    assert out.dtype == torch.float32
    kernel = backend.kernel_for(q, k, v)
    if mode == "sdpa":
        assert kernel == "sdpa_efficient"  # no float32 cast in the sdpa mode
    assert relative_error(out, reference(q, k, v)) < (1e-3 if mode == "sdpa" else bound(kernel))


def test_sdpa_picks_cudnn_on_hopper_and_guards_lengths():
    if capability() not in ((9, 0), (10, 0), (10, 3)):
        pytest.skip("cuDNN attention is preferred on sm_90/sm_100 only")
    backend = resolve("sdpa", CUDA, torch.bfloat16)
    assert backend.kernel == "sdpa_cudnn"
    q, k, v = inputs(lq=1024, lk=512)
    assert backend.kernel_for(q, k, v) == "sdpa_cudnn"
    odd = inputs(lq=1000, lk=77)
    fixed = (torch.backends.cudnn.version() or 0) > A.ext.CUDNN_SEQ_FIX
    assert backend.kernel_for(*odd) == ("sdpa_cudnn" if fixed else "sdpa_flash")


@pytest.mark.parametrize("head_dim", [80, 384])
def test_head_dims_of_clip_and_vae(head_dim):
    backend = resolve("sageattn", CUDA, torch.bfloat16)
    q, k, v = inputs(b=3, lq=257, lk=257, h=1 if head_dim == 384 else 4, d=head_dim)
    out = backend(q, k, v)
    assert relative_error(out, reference(q, k, v)) < bound(backend.kernel_for(q, k, v))


def test_audio_attention_shapes():
    """InfiniteTalk audio cross-attention: B·F rows, each frame's tokens attend to its own audio tokens."""
    backend = resolve("sageattn", CUDA, torch.bfloat16)
    frames, tokens, heads = 7, 30 * 52 // 4, 4
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, frames * tokens, heads, 128, generator=gen).bfloat16().to(CUDA)
    kv = torch.randn(frames, 32, 2, heads, 128, generator=gen).bfloat16().to(CUDA)
    qf = q.reshape(frames, tokens, heads, 128)
    out = backend(qf, kv[:, :, 0], kv[:, :, 1])
    kernel = backend.kernel_for(qf, kv[:, :, 0], kv[:, :, 1])
    assert relative_error(out, reference(qf, kv[:, :, 0], kv[:, :, 1])) < bound(kernel)


def test_sage3_modes_name_what_runs_off_blackwell():
    if capability() in ((12, 0), (12, 1)):
        pytest.skip("SageAttention 3 can run here")
    for mode in ("sageattn_3", "sageattn_3_fp4"):
        backend = resolve(mode, CUDA, torch.bfloat16)
        assert backend.kernel != "sage3_fp4" and "sage3_fp4: needs sm_120" in backend.describe()


def test_callers_k_is_never_modified():
    q, k, v = inputs(lq=256, lk=256)
    k = k.contiguous()
    before = k.clone()
    for mode in ATTENTION_MODES:
        resolve(mode, CUDA, torch.bfloat16)(q, k, v)
    torch.cuda.synchronize()
    assert torch.equal(k, before)


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
@pytest.mark.parametrize("outliers", [False, True])
def test_triton_8bit_kernel(outliers):
    """The pack's own 8-bit kernel (sm_90 only). Bounds: SageAttention 2's measured error on Gaussian inputs."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk import attention_triton as T

    q, k, v = (t.contiguous() for t in inputs(b=1, lq=2000, lk=2000, h=4))
    if outliers:  # a few large channels in q and k, as real activations have
        q[..., :4] *= 8
        k[..., :4] *= 8
        k += 2
    out = T.fp8_attention(q, k, v)
    torch.cuda.synchronize()
    err = relative_error(out, reference(q, k, v))
    assert err < (0.08 if outliers else 0.05), err
    assert math.isfinite(err) and out.is_contiguous()


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
@pytest.mark.parametrize("lq, lk, d", [(1000, 777, 128), (300, 64, 64)])
def test_triton_8bit_kernel_batched_strided_odd_lengths(lq, lk, d):
    """The 8-bit kernel on B=2 transposed / sliced inputs with odd lengths (padded queries and keys): finite, within
    5 % of float32 math, contiguous in q's dtype; strided inputs (the kernel reads the strided q itself) give the
    contiguous inputs' result."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk import attention_triton as T

    q, k, v = inputs(b=2, lq=lq, lk=lk, h=4, d=d)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    ref = reference(qc, kc, vc)
    out, strided = T.fp8_attention(qc, kc, vc), T.fp8_attention(q, k, v)
    torch.cuda.synchronize()
    assert out.shape == qc.shape and out.is_contiguous() and out.dtype == qc.dtype
    assert bool(torch.isfinite(out).all())
    assert relative_error(out, ref) < 0.05, relative_error(out, ref)
    assert relative_error(strided, out) < 1e-5


def extreme_inputs(case: str, lq=700, h=4, d=128):
    """q, k, v on the GPU (bf16) for :func:`test_triton_8bit_kernel_block_scales_and_extreme_scores`."""
    gen = torch.Generator().manual_seed(1)
    if case == "blocks":  # keys 0..127 100x larger than the rest, and orthogonal to every query
        q = torch.cat([torch.zeros(1, lq, h, d // 2), torch.randn(1, lq, h, d // 2, generator=gen)], -1)
        k = torch.randn(1, 1000, h, d, generator=gen)
        k[:, :128, :, d // 2:] = 0
        k[:, :128, :, :d // 2] *= 100
        k[:, 128:, :, :d // 2] = 0
    elif case == "negative":  # every raw score q·k/√D about −100, 119 padded keys
        u = torch.randn(d, generator=gen)
        q = 3 * u + 0.5 * torch.randn(1, lq, h, d, generator=gen)
        k = -3 * u + torch.randn(1, 777, h, d, generator=gen)
    else:  # one key, 127 padded keys
        q, k = torch.randn(1, lq, h, d, generator=gen), torch.randn(1, 1, h, d, generator=gen)
    return tuple(t.bfloat16().to(CUDA) for t in (q, k, torch.randn(k.shape, generator=gen)))


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
@pytest.mark.parametrize("case", ["blocks", "negative", "one key"])
def test_triton_8bit_kernel_block_scales_and_extreme_scores(case):
    """K scaled per 128-key block: a block 100x larger than the rest leaves the small keys their resolution (one
    scale per head: ~50 % error). Padded keys (real score 0) are removed from l exactly, also where every raw score
    is far below 0: finite and close to float32 math."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk import attention_triton as T

    q, k, v = extreme_inputs(case)
    ref = reference(q, k, v)
    out = T.fp8_attention(q, k, v)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(out).all())
    assert relative_error(out, ref) < 0.06, relative_error(out, ref)


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
def test_triton_8bit_kernel_inside_the_infinitetalk_model():
    """The 8-bit kernel inside a (small, random) InfiniteTalk transformer: self-attention, text + CLIP
    cross-attention and the per-frame audio attention all go through it (``min_keys`` 0: ``sageattn`` itself sends
    short key sequences to the exact kernel); the output stays within 5 % of the same model on SDPA."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk.attention import AttentionMode, build_backend
    from infinitetalk.fp8_optimization import ops_for
    from infinitetalk.multitalk.model import InfiniteTalkModel
    from tiny_infinitetalk import tiny_config, tiny_inputs

    cfg = tiny_config(2)
    every_call = dataclasses.replace(A._KERNELS["triton_fp8"], min_keys=0)
    eight_bit = build_backend(AttentionMode.SAGEATTN, (every_call, A._KERNELS["sdpa"]))
    torch.manual_seed(0)
    exact = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", CUDA, torch.bfloat16)).to(CUDA).bfloat16()
    fast = InfiniteTalkModel(cfg, ops_for("disabled"), eight_bit).to(CUDA).bfloat16()
    fast.load_state_dict(exact.state_dict())
    args = tiny_inputs(cfg, latent_hw=(32, 32))
    with torch.inference_mode():
        ref, out = exact(**args), fast(**args)
    assert eight_bit.kernel_for(*(torch.empty(1, 768, 2, 128, device=CUDA, dtype=torch.bfloat16),) * 3) == \
        "triton_fp8"
    assert bool(torch.isfinite(out).all())
    err = relative_error(out, ref)
    assert 0 < err < 0.05, err


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
def test_triton_8bit_kernel_writes_e4m3_rows_for_the_output_projection():
    """fp8_attention_rows on B=2 strided inputs with odd lengths: e4m3 [B, Lq, H, D] and one scale per call
    (max |v| / 448) as [B·Lq, 1]; data · scale is the output within one e4m3 rounding, never past ±448."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk import attention_triton as T

    q, k, v = inputs(b=2, lq=1000, lk=777, h=4, d=128)
    data, scale = T.fp8_attention_rows(q, k, v)
    out = T.fp8_attention(q, k, v).float().reshape(2000, 512)
    torch.cuda.synchronize()
    assert data.dtype == torch.float8_e4m3fn and data.shape == q.shape and data.is_contiguous()
    assert scale.shape == (2000, 1) and scale.is_contiguous() and torch.allclose(scale, v.float().abs().amax() / 448)
    assert float(data.float().abs().max()) <= 448
    assert 0.005 < relative_error(data.float().reshape(2000, 512) * scale, out) < 0.035


@pytest.mark.skipif(not ext.installed("triton"), reason="needs triton")
def test_fp8_model_takes_the_attention_kernels_e4m3_rows(tmp_path):
    """fp8 _fast with the 8-bit kernel: each block's self-attention writes its output as e4m3 rows for the o
    projection (AttentionBackend.rows_e4m3, no quantization pass); the model output stays within fp8 noise of the
    same model whose o projection quantizes the bf16 attention output itself."""
    if capability() != (9, 0):
        pytest.skip("the Triton 8-bit kernel targets sm_90")
    from infinitetalk.attention import AttentionMode, build_backend
    from tiny_infinitetalk import forward, load_on_cuda, tiny_config, tiny_inputs, write_weights

    calls = []

    def counted_rows(q, k, v):
        calls.append(tuple(q.shape))
        return ext.triton_fp8_rows(q, k, v)

    cfg = tiny_config(2)
    path = write_weights(cfg, tmp_path / "tiny.safetensors")
    every_call = dataclasses.replace(A._KERNELS["triton_fp8"], min_keys=0, run_rows=counted_rows)
    models = [load_on_cuda(path, "fp8_e4m3fn_scaled_fast", build_backend(AttentionMode.SAGEATTN,
                                                                          (spec, A._KERNELS["sdpa"])))
              for spec in (every_call, dataclasses.replace(every_call, run_rows=None))]
    args = tiny_inputs(cfg)
    rows, plain = (forward(model, args).float() for model in models)
    assert len(calls) == cfg.num_layers  # one per block: the self-attention
    assert bool(torch.isfinite(rows).all())
    assert 0 < relative_error(rows, plain) < 0.03


def test_sageattn_runs_short_key_calls_on_an_exact_kernel():
    """The 8-bit kernel only takes calls with at least TRITON_FP8_MIN_KEYS keys (self-attention); the text, CLIP and
    audio cross-attention (257 to 512 keys, and 32 per frame) run the next kernel, which is faster there."""
    backend = resolve("sageattn", torch.device("cuda"), torch.bfloat16)
    if backend.kernel != "triton_fp8":
        pytest.skip(f"sageattn runs {backend.kernel} here")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 900, 4, 128, generator=gen, device="cuda").bfloat16()
    for keys, expected_8bit in [(32, False), (512, False), (A.TRITON_FP8_MIN_KEYS, True)]:
        k, v = (torch.randn(2, keys, 4, 128, generator=gen, device="cuda").bfloat16() for _ in range(2))
        assert (backend.kernel_for(q, k, v) == "triton_fp8") is expected_8bit, keys
        out = backend(q, k, v)
        assert relative_error(out, math_attention(q, k, v)) < (0.08 if expected_8bit else 0.01), keys
