"""The transformer loads into every quantization mode from a real high-precision safetensors file: block linears
store the quantized format, high-precision layers stay as they are, and the output stays close to float32."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.fp8_optimization import QUANT_MODES, QuantLinear, ops_for
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.wanvideo.checkpoint import LoadOptions
from parity import tensor_group

BOUND = {"fp8_e4m3fn": 0.04, "fp8_e5m2": 0.07, "fp4": 0.15}


@pytest.fixture(scope="module")
def fixture(fixtures_dir, tmp_path_factory):
    ref = fixtures_dir / "ref_tiny_1p.safetensors"
    tensors = load_file(str(ref))
    config = json.loads(safe_open(str(ref), "pt").metadata()["harness"])["config"]
    path = tmp_path_factory.mktemp("q") / "model.safetensors"
    save_file(tensor_group(tensors, "state_dict"), str(path))
    return path, tensors, config["text_len"]


def _forward(model, t):
    with torch.inference_mode():
        return model([t["inputs.x"]][0][None], t["inputs.t"], t["inputs.context"][None], clip_fea=t["inputs.clip_fea"],
                     y=t["inputs.y"], audio=t["inputs.audio"][None], ref_target_masks=t["inputs.ref_target_masks"])


@pytest.mark.parametrize("mode", [m for m in QUANT_MODES if m != "disabled"])
def test_every_quantization_mode_loads_and_stays_close(fixture, mode):
    path, t, text_len = fixture
    model = load_infinitetalk(path, None, LoadOptions(dtype=torch.float32, text_len=text_len, ops=ops_for(mode)))
    q = model.blocks[0].self_attn.q
    assert isinstance(q, QuantLinear) and q.layer_name == "blocks.0.self_attn.q"
    assert q.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)
    assert not isinstance(model.head.head, QuantLinear) and model.patch_embedding.weight.dtype == torch.float32
    out = _forward(model, t)
    ref = t["outputs.noise_pred"]
    error = ((out - ref).norm() / ref.norm()).item()
    bound = BOUND["fp4"] if mode.startswith("fp4") else BOUND["_".join(mode.split("_")[:2])]
    assert 0 < error < bound, (mode, error)
