"""The producer kernels of quant_triton (LayerNorm / modulation / GELU / a sum, then per-token e4m3 quantization in one
pass) against the eager step followed by quant_formats.quantize_rows_e4m3, run on the CPU under Triton's
interpreter (in a subprocess with TRITON_INTERPRET=1). The interpreter's own float8 cast is coarser than the GPU's
round-to-nearest (about 5.5 % error instead of 2.7 %), so values are compared within two e4m3 steps: enough to
catch a wrong row, batch, stride or formula; the row scales (amax of the same bf16 values) must agree closely. The
GPU test compares the GPU kernels with the eager step exactly."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infinitetalk import attention_kernels as ext

CHECK = """
import json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, {tools!r})
import packimport
packimport.register()
from infinitetalk import quant_triton as QT
from infinitetalk.quant_formats import quantize_rows_e4m3
gen = torch.Generator().manual_seed(0)


def compare(case, got, step):
    data, scale = got
    ref_data, ref_scale = quantize_rows_e4m3(step.reshape(-1, step.shape[-1]), 0)
    value, ref = data.float() * scale, ref_data.float() * ref_scale
    print(json.dumps(dict(case=case, shape=list(data.shape) == list(ref_data.shape), dtype=str(data.dtype),
                          scale_err=float(((scale - ref_scale).abs() / ref_scale).max()),
                          value_err=float((value - ref).norm() / ref.norm()),
                          worst=float(((value - ref).abs() / (ref_scale * 448)).max()))))


for b, s, c, strided in [(1, 37, 160, False), (2, 21, 96, True)]:
    x = torch.randn(s, b, c, generator=gen).bfloat16().transpose(0, 1) if strided else \\
        torch.randn(b, s, c, generator=gen).bfloat16()
    w, bias = 1 + 0.3 * torch.randn(c, generator=gen), 0.2 * torch.randn(c, generator=gen)
    shift, scale = 0.5 * torch.randn(b, 1, c, generator=gen), 0.5 * torch.randn(b, 1, c, generator=gen)
    plain = F.layer_norm(x.float(), (c,), None, None, 1e-6).bfloat16()
    affine = F.layer_norm(x.float(), (c,), w, bias, 1e-6).bfloat16()
    modulated = (plain.float() * (1 + scale) + shift).bfloat16()
    compare("layer_norm", QT.layer_norm_e4m3(x, w, bias, 1e-6), affine)
    compare("modulated", QT.layer_norm_e4m3(x, None, None, 1e-6, shift, scale), modulated)
    h = 2 * torch.randn(b, s, 3 * c, generator=gen).bfloat16()
    compare("gelu", QT.gelu_e4m3(h, "tanh"), F.gelu(h, approximate="tanh"))
    text, image = (torch.randn(b, s, c, generator=gen).bfloat16() for _ in range(2))
    compare("sum", QT.sum_e4m3(text, image), text + image)
"""


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    if not ext.installed("triton"):
        pytest.skip("needs the triton package (its interpreter runs on CPU)")
    tools = str(Path(__file__).resolve().parents[2] / "tools")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECK.format(tools=tools))],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines()]


def test_producer_kernels_equal_the_eager_step_then_quantization(interpreted):
    assert [r["case"] for r in interpreted] == ["layer_norm", "modulated", "gelu", "sum"] * 2
    for r in interpreted:
        assert r["shape"] and r["dtype"] == "torch.float8_e4m3fn", r
        assert r["scale_err"] < 2e-2, r  # amax of the same values, up to a bf16 step in each of its two roundings
        assert r["value_err"] < 0.08 and r["worst"] <= 0.16, r  # two e4m3 steps of the top binade: 2·32/448
