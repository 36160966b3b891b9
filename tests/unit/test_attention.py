"""Attention back-ends on the CPU: every mode's path against a float64 reference, the layout contract the
dispatcher gives each kernel, key padding, self-tests of registered kernels, logging, the Triton 8-bit kernel's
numerics under Triton's interpreter."""
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from infinitetalk import attention as A
from infinitetalk import attention_kernels as ext
from infinitetalk.attention import (ATTENTION_MODES, AttentionMode, KernelSpec, Layout, build_backend,
                                    math_attention, register_external, resolve)
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.audio_attention import SingleStreamMutiAttention
from infinitetalk.quant_formats import quantize_rows_e4m3
from infinitetalk.wanvideo.config import AudioConfig, WanConfig

CPU = torch.device("cpu")
LOGGER = "infinitetalk.attention"


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test resolves from scratch and leaves no registered external kernel behind."""
    A.clear_cache()
    yield
    A._EXTERNAL.clear()
    A.clear_cache()


def reference(q, k, v, k_lens=None):
    """float64 softmax(q kᵀ/√d) v per batch element over its first k_lens[b] keys; [B, Lq, H, D] float64."""
    outs = []
    for b in range(q.shape[0]):
        n = k.shape[1] if k_lens is None else int(k_lens[b])
        qb, kb, vb = (t[b].double().transpose(0, 1) for t in (q, k[:, :n], v[:, :n]))
        weights = torch.softmax(qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        outs.append((weights @ vb).transpose(0, 1))
    return torch.stack(outs)


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def strided_inputs(b=2, lq=1001, lk=77, h=3, d=16, seed=0, dtype=torch.float32):
    """q a transposed slice, k/v interleaved slices of one buffer (the fused-kv layout of the model)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq + 3, d, generator=gen).to(dtype).transpose(1, 2)[:, 3:]
    kv = torch.randn(b, lk, 2, h, d, generator=gen).to(dtype)
    return q, kv[:, :, 0], kv[:, :, 1]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is 4 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 16, dtype=t.dtype)
    offset = next(i for i in range(1, 16) if (flat.data_ptr() + i * t.element_size()) % 16)
    view = flat[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


# ---------------------------------------------------------------------------------------- every mode on CPU

@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_every_mode_on_cpu_matches_the_reference(mode):
    backend = resolve(mode, "cpu", torch.float32)
    assert backend.kernel == "math"
    q, k, v = strided_inputs()
    assert not (q.is_contiguous() or k.is_contiguous())
    cases = [(q, k, v, None), (q, k, v, torch.tensor([77, 30])), (q[:, ::2], k[:, 1:], v[:, 1:], None),
             (q[:1, :500], k[:1], v[:1], torch.tensor([1])),
             (misaligned(q.contiguous()), misaligned(k.contiguous()), v, torch.tensor([5, 77]))]
    for cq, ck, cv, lens in cases:
        out = backend(cq, ck, cv, lens)
        assert out.shape == cq.shape and out.is_contiguous() and out.dtype == torch.float32
        assert rel(out, reference(cq, ck, cv, lens)) < 1e-5


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_every_mode_in_bf16_on_cpu_runs_torch_sdpa(mode):
    backend = resolve(mode, "cpu", torch.bfloat16)
    assert backend.kernel == "sdpa"
    q, k, v = strided_inputs(lq=257, dtype=torch.bfloat16)
    lens = torch.tensor([60, 77])
    out = backend(q, k, v, lens)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert rel(out, reference(q, k, v, lens)) < 1e-2


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="sageattn_3_fp8") as err:
        resolve("sageattn_4", "cpu", torch.float32)
    assert all(mode in str(err.value) for mode in ATTENTION_MODES)


def test_describe_and_kernel_name_the_kernel_that_runs():
    backend = resolve("sageattn", "cpu", torch.float32)
    q, k, v = strided_inputs(lq=20)
    assert backend.kernel == backend.kernel_for(q, k, v) == "math"
    text = backend.describe()
    assert "runs math" in text and "sageattn" in text and "sage2" in text
    assert backend.kernel_for(q.bfloat16(), k.bfloat16(), v.bfloat16()) == "sdpa"


def test_fallback_logs_one_line_once_naming_package_and_install(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = resolve("sageattn", "cpu", torch.float32)
        second = resolve(AttentionMode.SAGEATTN, CPU, torch.float32)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert first is second and len(records) == 1
    line = records[0].getMessage()
    assert "\n" not in line and "running math" in line
    assert "sageattention is not installed" in line and "pip install sageattention" in line


def test_sdpa_mode_on_cpu_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resolve("sdpa", "cpu", torch.float32)
        resolve("sdpa", "cpu", torch.bfloat16)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_mapped_modes_say_what_runs_instead():
    assert "radial sparse mask is not implemented" in " ".join(
        A._ROUTES[AttentionMode.RADIAL_SAGE_ATTENTION].note.split())
    assert "no FP8 kernel" in A._ROUTES[AttentionMode.SAGEATTN_3_FP8].note
    for mode in ATTENTION_MODES:
        names = A._ROUTES[AttentionMode(mode)].own + A._ROUTES[AttentionMode(mode)].rest
        assert names[-2:] == ("math", "sdpa"), "every mode must end in kernels that take every shape"
        assert all(A._spec(name) is not None for name in names if name != "comfy")


def test_bad_operands_raise_clear_errors():
    backend = resolve("sdpa", "cpu", torch.float32)
    q, k, v = strided_inputs(lq=8)
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        backend(q[0], k, v)
    with pytest.raises(ValueError, match="shape mismatch"):
        backend(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match="dtype mismatch"):
        backend(q, k.double(), v)
    with pytest.raises(ValueError, match="k_lens"):
        backend(q, k, v, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="k_lens"):
        backend(q, k, v, torch.tensor([78, 3]))


def test_math_kernel_in_chunks_equals_one_pass():
    q, k, v = strided_inputs(lq=333, lk=50)
    lens = torch.tensor([50, 9])
    whole = math_attention(q, k, v, lens)
    chunked = math_attention(q, k, v, lens, chunk_elements=1000)
    assert torch.allclose(whole, chunked, atol=1e-6) and rel(chunked, reference(q, k, v, lens)) < 1e-5


# ----------------------------------------------------------------------------------------- audio attention

def audio_module(mode: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=1, text_dim=32, clip_dim=32,
                    audio=AudioConfig(intermediate_dim=24, output_dim=40, context_tokens=6))
    return SingleStreamMutiAttention(cfg, ops_for("disabled"), resolve(mode, "cpu", torch.float32)), cfg


def float64_backend() -> A.AttentionBackend:
    spec = KernelSpec("float64_loop", "float64 per-batch loop", lambda q, k, v, n: reference(q, k, v, n).float(),
                      devices=("cpu",), dtypes=(torch.float32,), max_head_dim=1 << 20, masked=True)
    return build_backend(AttentionMode.SDPA, (spec,))


@pytest.mark.parametrize("mode", ["sdpa", "sageattn", "flash_attn_3", "comfy", "sageattn_3_fp4"])
@pytest.mark.parametrize("two_speakers", [False, True])
def test_audio_cross_attention_paths(mode, two_speakers):
    module, cfg = audio_module(mode)
    grid, b = (3, 4, 5), 2
    s = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, cfg.dim, generator=gen)
    audio = torch.randn(b * grid[0], cfg.audio.context_tokens, cfg.audio.output_dim, generator=gen)
    positions = torch.rand(b, s, generator=gen) * cfg.audio.class_range if two_speakers else None
    with torch.no_grad():
        out = module(x, audio, grid, positions)
        module.attention = float64_backend()
        expected = module(x, audio, grid, positions)
    assert out.shape == x.shape and rel(out, expected.double()) < 1e-5


# -------------------------------------------------------------------------------- the dispatcher's contract

def checked_math(layout: Layout, masked: bool = False, dtype=torch.float32, mutate_k: bool = False):
    """math_attention behind assertions of what the dispatcher promises a kernel with this contract."""
    def run(q, k, v, k_lens):
        for t in (q, k, v):
            assert t.is_contiguous() and t.data_ptr() % 16 == 0 and t.dtype == dtype
        assert masked or k_lens is None
        if mutate_k:
            k.sub_(k.mean(dim=2 if layout is Layout.HND else 1, keepdim=True))
        if layout is Layout.HND:
            return math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), k_lens).transpose(1, 2)
        return math_attention(q, k, v, k_lens)

    return run


def spec(name, layout=Layout.NHD, masked=False, dtypes=(torch.float32,), mutate_k=False, **kw):
    return KernelSpec(name, name, checked_math(layout, masked, dtypes[0], mutate_k), devices=("cpu",),
                      dtypes=dtypes, layout=layout, masked=masked, mutates_k=mutate_k, **kw)


@pytest.mark.parametrize("layout", [Layout.NHD, Layout.HND])
@pytest.mark.parametrize("mutate_k", [False, True])
def test_kernels_get_contiguous_aligned_operands_in_their_layout(layout, mutate_k):
    backend = build_backend(AttentionMode.SAGEATTN, (spec("k", layout, mutate_k=mutate_k),))
    q, k, v = strided_inputs(lq=101, lk=33)
    for cq, ck, cv in [(q, k, v), (misaligned(q.contiguous()), misaligned(k.contiguous()), misaligned(v.contiguous())),
                       (q.contiguous(), k.contiguous(), v.contiguous())]:
        k_before = ck.clone()
        lens = torch.tensor([33, 20])
        out = backend(cq, ck, cv, lens)
        assert torch.equal(ck, k_before), "the caller's k must never be written"
        assert out.is_contiguous() and rel(out, reference(cq, ck, cv, lens)) < 1e-5


def test_shapes_a_kernel_cannot_take_go_to_the_next_kernel():
    narrow = spec("narrow", head_dims=(16,))
    picky = spec("picky", accepts=lambda q, k, v: q.shape[1] % 2 == 0)
    backend = build_backend(AttentionMode.SDPA, (picky, narrow, spec("wide", max_head_dim=1 << 20)))
    assert backend.fallbacks == ("narrow", "wide")
    for lq, d, expected in [(100, 16, "picky"), (101, 16, "narrow"), (101, 24, "wide"), (100, 24, "picky")]:
        q, k, v = strided_inputs(lq=lq, d=d)
        assert backend.kernel_for(q, k, v) == expected
        assert rel(backend(q, k, v), reference(q, k, v)) < 1e-5


def test_calls_with_few_keys_go_to_the_next_kernel_unless_it_is_the_last():
    long_only = spec("long_only", min_keys=64)
    backend = build_backend(AttentionMode.SAGEATTN, (long_only, spec("exact")))
    for lk, expected in [(63, "exact"), (64, "long_only"), (200, "long_only")]:
        q, k, v = strided_inputs(lq=30, lk=lk)
        assert backend.kernel_for(q, k, v) == expected
        assert rel(backend(q, k, v), reference(q, k, v)) < 1e-5
    assert "fewer than 64 keys" in backend.describe()
    alone = build_backend(AttentionMode.SAGEATTN, (long_only,))  # e.g. its self-test: nothing else to run
    assert alone.kernel_for(*strided_inputs(lq=30, lk=20)) == "long_only"


def test_rows_e4m3_come_from_the_kernel_that_takes_the_call():
    """AttentionBackend.rows_e4m3: the e4m3 rows and scale of the kernel that runs this call when it writes them
    (KernelSpec.run_rows, given its prepared contiguous operands); None when that kernel does not (here: a call
    with fewer keys than the 8-bit kernel takes goes to the exact kernel), so the caller runs the back-end."""
    def rows(q, k, v):
        assert all(t.is_contiguous() for t in (q, k, v))
        out = math_attention(q, k, v)
        data, scale = quantize_rows_e4m3(out.reshape(-1, out.shape[2] * out.shape[3]), 0)
        return data.view(out.shape), scale

    backend = build_backend(AttentionMode.SAGEATTN, (spec("long_only", min_keys=64, run_rows=rows), spec("exact")))
    q, k, v = strided_inputs(lq=30, lk=64)
    data, scale = backend.rows_e4m3(q, k, v)
    assert data.dtype == torch.float8_e4m3fn and data.shape == (2 * 30, q.shape[2] * q.shape[3])
    assert rel(data.float() * scale, backend(q, k, v).reshape(data.shape)) < 0.035
    assert backend.rows_e4m3(*strided_inputs(lq=30, lk=63)) is None
    assert resolve("sdpa", "cpu", torch.float32).rows_e4m3(q, k, v) is None


def test_float32_is_cast_to_bf16_only_for_half_modes():
    half = spec("half", dtypes=(torch.bfloat16,))
    q, k, v = strided_inputs(lq=64, lk=40, d=32)
    cast = build_backend(AttentionMode.SAGEATTN, (half, spec("f32")))
    assert cast.kernel_for(q, k, v) == "half"
    out = cast(q, k, v)
    assert out.dtype == torch.float32 and 1e-6 < rel(out, reference(q, k, v)) < 2e-2
    exact = build_backend(AttentionMode.SDPA, (half, spec("f32")))
    assert exact.kernel_for(q, k, v) == "f32" and rel(exact(q, k, v), reference(q, k, v)) < 1e-5


def test_key_padding_without_mask_support_runs_per_batch_slices():
    backend = build_backend(AttentionMode.SDPA, (spec("nomask"), spec("masked", masked=True)))
    q, k, v = strided_inputs(b=3, lq=50, lk=64)
    lens = torch.tensor([64, 1, 17])
    out = backend(q, k, v, lens)
    assert backend.kernel_for(q, k, v) == "nomask" and rel(out, reference(q, k, v, lens)) < 1e-5
    assert torch.equal(backend(q, k, v, torch.tensor([64, 64, 64])), backend(q, k, v))


# --------------------------------------------------------------------------- self-tests of registered kernels

def comfy_style(q, k, v, heads):
    """ComfyUI's optimized_attention calling convention: [B, L, heads·D] in and out."""
    b, lq, _ = q.shape
    split = [t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v)]
    return math_attention(*split).reshape(b, lq, -1)


def test_registered_comfy_attention_is_self_tested_and_used():
    register_external("comfy", comfy_style)
    backend = resolve("comfy", "cpu", torch.float32)
    assert backend.kernel == "comfy:comfy_style" and "ComfyUI" in backend.describe()
    q, k, v = strided_inputs()
    lens = torch.tensor([77, 12])
    assert rel(backend(q, k, v, lens), reference(q, k, v, lens)) < 1e-5


@pytest.mark.parametrize("broken, reason", [
    (lambda q, k, v, h: torch.zeros_like(q), "self-test error"),
    (lambda q, k, v, h: q[:, :, :1] @ k.transpose(1, 2), "self-test raised"),
    (lambda q, k, v, h: comfy_style(q, k.mul_(2.0), v, h), "modified its input k"),
])
def test_a_registered_kernel_that_fails_its_self_test_is_not_used(broken, reason, caplog):
    register_external("comfy", broken)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        backend = resolve("comfy", "cpu", torch.float32)
    assert backend.kernel == "math"
    assert reason in backend.describe() and reason in caplog.records[-1].getMessage()


def test_register_external_only_takes_comfy():
    with pytest.raises(ValueError, match="comfy"):
        register_external("sageattn", comfy_style)
    with pytest.raises(ValueError, match="callable"):
        register_external("comfy", "optimized_attention")


def test_comfy_mode_without_comfyui_runs_sdpa_and_says_so():
    backend = resolve("comfy", "cpu", torch.float32)
    assert backend.kernel == "math" and "no ComfyUI attention is registered" in backend.describe()


# ------------------------------------------------------------------------------ package probes, Triton kernel

def fake_sageattention(root: Path, version: str, fake_binding: bool, v2: bool = True) -> None:
    """A minimal installed ``sageattention`` distribution (metadata and the modules the probe inspects)."""
    pkg = root / "sageattention"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def sageattn(*a, **k):\n    raise RuntimeError('no GPU')\n"
                                     + ("sageattn_qk_int8_pv_fp16_cuda = sageattn\n" if v2 else ""))
    binding = ("def qk_int8_sv_f8_accum_f32_fuse_v_scale_attn_inst_buf(*a):\n    return None\n" if fake_binding
               else "class _Op:\n    pass\nqk_int8_sv_f8_accum_f32_fuse_v_scale_attn_inst_buf = _Op()\n")
    (pkg / "sm90_compile.py").write_text(binding)
    dist = root / f"sageattention-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sageattention\nVersion: {version}\n")


@pytest.mark.parametrize("version, fake_binding, v2, bad, probe_says", [
    ("2.2.0", True, True, True, None),
    ("2.2.0", False, True, False, None),
    ("2.1.1", True, True, False, None),
    ("1.0.6", False, False, False, "is SageAttention 1"),
])
def test_sageattention_probes(tmp_path, monkeypatch, version, fake_binding, v2, bad, probe_says):
    fake_sageattention(tmp_path, version, fake_binding, v2)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sageattention", "sageattention.sm90_compile"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    ext.load.cache_clear()
    try:
        assert ext.installed("sageattention") and ext.dist_version("sageattention") == version
        assert ext.sage2_hopper_release_bug(version) is bad
        said = ext.sage_probe(2)(CPU)
        assert (said is None) if probe_says is None else (probe_says in said)
        assert (ext.sage_probe(1)(CPU) is None) is (not v2)
    finally:
        ext.load.cache_clear()


TRITON_CHECK = """
import json, math, sys
import torch
sys.path.insert(0, {tools!r})
import packimport
packimport.register()
from infinitetalk import attention_triton as T
from infinitetalk.attention import math_attention, relative_error
gen = torch.Generator().manual_seed(0)
heads_first = lambda x: x.float().transpose(1, 2).flatten(0, 1)


def attend(q, k, v):
    out = T.fp8_attention(q, k, v)
    ref = math_attention(q.float(), k.float(), v.float())
    return dict(out_err=relative_error(out, ref), finite=bool(torch.isfinite(out).all()))


for b, lq, lk, h, d in [(1, 300, 200, 2, 64), (2, 130, 257, 1, 128), (1, 70, 40, 1, 64)]:
    q = torch.randn(b, h, lq, d, generator=gen).bfloat16().transpose(1, 2).contiguous()
    k, v = (torch.randn(b, lk, h, d, generator=gen) for _ in range(2))
    k, v = (k + 3 * torch.randn(d, generator=gen)).bfloat16(), v.bfloat16()  # k: a channel offset, to be removed
    t = T.quantize(q, k, v)
    k_back = t.k.float() * t.k_scale.repeat_interleave(T.PAD, 1)[..., None]
    k_ref = heads_first(k - k.float().mean(1, keepdim=True))
    a = torch.arange(t.vt.shape[-1])
    r = a % 32
    sigma = a - r + (r & 16) + ((r >> 2) & 3) * 2 + ((r >> 1) & 1) * 8 + (r & 1)  # key held at position a
    position = torch.empty_like(sigma)
    position[sigma] = a  # where key j is held
    vt = t.vt.float()[..., position]  # Vᵀ in key order
    v_back = vt[..., :lk].transpose(-1, -2) * t.v_scale[:, None, :]
    exact = (sorted(sigma.tolist()) == a.tolist() and t.k_scale.shape == (b * h, t.k.shape[1] // T.PAD)
             and not t.k[:, lk:].any() and not vt[..., lk:].any() and t.q is q)  # Q is quantized in the kernel
    out = T.fp8_attention(q, k, v)
    print(json.dumps(dict(case="shapes", k_err=relative_error(k_back[:, :lk], k_ref),
                          v_err=relative_error(v_back, heads_first(v)),
                          exact=bool(exact and out.is_contiguous() and out.shape == q.shape
                                     and out.dtype == q.dtype), **attend(q, k, v))))

# K blocks of very different magnitude: keys 0..127 are 100x larger than the rest but orthogonal to every query
# (they score 0); the small keys carry the attention. One scale per head would round them to a few levels.
lq, lk, d = 100, 300, 64
q = torch.cat([torch.zeros(1, lq, 1, d // 2), torch.randn(1, lq, 1, d // 2, generator=gen)], -1)
k = torch.randn(1, lk, 1, d, generator=gen)
k[:, :128, :, d // 2:] = 0
k[:, :128, :, :d // 2] *= 100
k[:, 128:, :, :d // 2] = 0
q, k, v = q.bfloat16(), k.bfloat16(), torch.randn(1, lk, 1, d, generator=gen).bfloat16()
scales = T.quantize(q, k, v).k_scale[0]
print(json.dumps(dict(case="blocks", scale_ratio=float(scales[0] / scales[1:].max()), **attend(q, k, v))))

# every raw score strongly negative (q·k/√D about −100) with 127 padded keys; constant K without padded keys
# (all scores 0, every K block zero: the scale floor); a single key
u = torch.randn(d, generator=gen)
q = (3 * u + 0.5 * torch.randn(1, 90, 2, d, generator=gen)).bfloat16()
k = (-3 * u + torch.randn(1, 129, 2, d, generator=gen)).bfloat16()
print(json.dumps(dict(case="negative", **attend(q, k, torch.randn(1, 129, 2, d, generator=gen).bfloat16()))))
k = torch.randn(1, 1, 2, d, generator=gen).expand(1, 256, 2, d).bfloat16().contiguous()
print(json.dumps(dict(case="constant", **attend(q, k, torch.randn(1, 256, 2, d, generator=gen).bfloat16()))))
k, v = (torch.randn(1, 1, 2, d, generator=gen).bfloat16() for _ in range(2))
print(json.dumps(dict(case="one key", **attend(q, k, v))))

# the output written as e4m3 rows with one scale (max |v| / 448) for the output projection's fp8 GEMM; "outlier v":
# one channel of v 50x larger, so every other channel's output sits far below the scale's range
for name, boost in (("rows", 1.0), ("rows outlier v", 50.0)):
    q, k, v = (torch.randn(2, 257, 2, 64, generator=gen) for _ in range(3))
    v[..., 0] *= boost
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    data, scale = T.fp8_attention_rows(q, k, v)
    out = T.fp8_attention(q, k, v).float().reshape(2 * 257, 128)
    back = data.float().reshape(2 * 257, 128) * scale
    small = [c for c in range(128) if c % 64]  # the channels that were not boosted
    print(json.dumps(dict(case=name, err=relative_error(back, out), err_small=relative_error(back[:, small],
                          out[:, small]), amax=float(data.float().abs().max()),
                          exact=bool(data.dtype == torch.float8_e4m3fn and data.shape == q.shape
                                     and data.is_contiguous() and scale.shape == (2 * 257, 1)
                                     and scale.is_contiguous() and scale.dtype == torch.float32
                                     and torch.allclose(scale, v.float().abs().amax() / 448)))))
"""


@pytest.fixture(scope="module")
def triton_interpreted():
    """The results of TRITON_CHECK, run once in a subprocess under TRITON_INTERPRET=1: {case: [result, ...]}."""
    if not ext.installed("triton"):
        pytest.skip("needs the triton package (its interpreter runs on CPU)")
    tools = str(Path(__file__).resolve().parents[2] / "tools")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(TRITON_CHECK.format(tools=tools))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    cases: dict[str, list[dict]] = {}
    for line in run.stdout.strip().splitlines():
        row = json.loads(line)
        cases.setdefault(row.pop("case"), []).append(row)
    return cases


def test_triton_8bit_attention_numerics_in_the_interpreter(triton_interpreted):
    rows = triton_interpreted["shapes"]
    assert len(rows) == 3
    for row in rows:
        # K minus its mean (one scale per 128-key block) ~1 %, e4m3 V (round to nearest even, emulated in the
        # interpreter) ~2.5 %; the output adds INT8 Q (one scale per row, in the kernel) and e4m3 P: ~4 %. exact: Vᵀ's
        # permuted key order, zero padding, shapes, the output's layout, q taken as is (no copy).
        assert row["k_err"] < 0.015 and row["v_err"] < 0.032, row
        assert row["finite"] and row["out_err"] < 0.05 and row["exact"], row


def test_triton_8bit_attention_scales_k_per_block(triton_interpreted):
    """Keys 100x apart in magnitude between the first 128-key block and the rest: each block keeps its own scale,
    so the small keys, which carry the attention, keep their resolution: 4.4 % here (one scale per head: 51 %)."""
    (row,) = triton_interpreted["blocks"]
    assert 20 < row["scale_ratio"] < 200, row
    assert row["finite"] and row["out_err"] < 0.06, row


@pytest.mark.parametrize("case", ["rows", "rows outlier v"])
def test_triton_8bit_attention_writes_e4m3_rows(triton_interpreted, case):
    """fp8_attention_rows: the same attention as e4m3 [B, Lq, H, D] with one scale per call (max |v| / 448, since an
    output is a convex combination of the values), as [B·Lq, 1] float32 for the fp8 row-wise GEMM. Its values are
    the output within one e4m3 rounding (~2.6 %), also for channels 50x below the largest v (e4m3's relative
    precision reaches 1/28672 of its range), and never past ±448."""
    (row,) = triton_interpreted[case]
    assert row["exact"] and row["amax"] <= 448, row
    assert 0.005 < row["err"] < 0.035 and row["err_small"] < 0.035, row


@pytest.mark.parametrize("case", ["negative", "constant", "one key"])
def test_triton_8bit_attention_padded_keys_and_extreme_scores(triton_interpreted, case):
    """Padded keys score real 0 and are removed from l at the end: rows whose raw scores are all far below 0 (K
    minus its mean brings their maximum back to >= 0), all-zero K blocks (every score 0, no padding) and a single
    key (127 padded keys) stay finite and match float32 math."""
    (row,) = triton_interpreted[case]
    assert row["finite"] and row["out_err"] < 0.05, row
