"""Loading the transformer from the quantized file formats users have, written here in their real layouts from the
float32 parity fixture: GGUF (city96 layout, written with ``gguf.GGUFWriter``) in float and block formats, scaled-fp8
files (``scale_weight`` / ``weight_scale`` + ``scaled_fp8`` marker) and ComfyUI-quantized files (``weight_scale`` /
``input_scale`` + ``_quantization_metadata`` header or ``.comfy_quant`` tensors). Each loaded model is compared with the
fixture's float32 output within a bound per format; weights taken as is are checked bit-exactly."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.fp8_optimization import QuantLinear, QuantMode, ops_for
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.wanvideo import checkpoint
from infinitetalk.wanvideo.checkpoint import LoadOptions, open_state_dict, settle_quant_mode
from infinitetalk.wanvideo.gguf_reader import ORIG_SHAPE_KEY, GGUFTensorReader
from parity import tensor_group

Q = gguf.GGMLQuantizationType
QK = 256
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PREFIX = "model.diffusion_model."
# relative L2 error of the output vs the float32 reference, measured: F32 2.7e-7, F16 4.2e-4, BF16 3.1e-3, Q8_0 9.8e-3,
# and with the simple K-quant encoders below Q6_K 3.2e-2, Q5_K 5.6e-2, Q4_K 0.12; Q4_0 0.15; fp8 e4m3 2.4e-2
GGUF_BOUND = {Q.F32: 1e-6, Q.F16: 1e-3, Q.BF16: 6e-3, Q.Q8_0: 2e-2, Q.Q6_K: 5e-2, Q.Q5_K: 8e-2, Q.Q4_K: 0.18,
              Q.Q4_0: 0.2}
FP8_BOUND = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # float32 results as the fixtures were made


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    path = fixtures_dir / "ref_tiny_1p.safetensors"
    tensors = load_file(str(path))
    config = json.loads(safe_open(str(path), "pt").metadata()["harness"])["config"]
    sd = tensor_group(tensors, "state_dict")
    return {"sd": sd, "t": tensors, "text_len": config["text_len"]}


def run(model, t) -> torch.Tensor:
    with torch.inference_mode():
        return model(x=t["inputs.x"][None], t=t["inputs.t"], context=t["inputs.context"][None],
                     clip_fea=t["inputs.clip_fea"], y=t["inputs.y"], audio=t["inputs.audio"][None],
                     ref_target_masks=t["inputs.ref_target_masks"])


def rel_error(model, ref) -> float:
    out, target = run(model, ref["t"]), ref["t"]["outputs.noise_pred"]
    assert torch.isfinite(out).all()
    return ((out - target).norm() / target.norm()).item()


def load(path, ref, mode="disabled", adapter=None):
    return load_infinitetalk(path, adapter, LoadOptions(dtype=torch.float32, text_len=ref["text_len"],
                                                        ops=ops_for(mode)))


# ---------------------------------------------------------------------------------------------- GGUF helpers

def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] (K % 256 == 0) -> Q6_K blocks [..., K / 256 * 210] (16 sub-blocks of 16, int8 scales)."""
    blocks = x.reshape(-1, QK).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(axis=-1) / 31.0
    d = (sub_scale.max(axis=-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)
    scales = np.clip(np.round(sub_scale / np.where(d32 > 0, d32, 1.0)[:, None]), -128, 127).astype(np.int8)
    step = d32[:, None] * scales.astype(np.float32)
    q = np.where(step[..., None] > 0, np.round(sub / np.where(step > 0, step, 1.0)[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    h = high.reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, scales.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def encode_k_with_mins(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 [..., K] -> Q4_K (bits 4) or Q5_K (bits 5) blocks: 8 sub-blocks of 32 with 6-bit scales and mins."""
    blocks = x.reshape(-1, QK).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    top = (1 << bits) - 1
    offset = np.maximum(-sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) + offset) / top
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (offset.max(axis=-1) / 63.0).astype(np.float16)
    d32, dm32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d32 > 0, d32, 1.0)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(offset / np.where(dm32 > 0, dm32, 1.0)[:, None]), 0, 63).astype(np.uint8)
    step = d32[:, None] * sc
    q = np.round((sub + (dm32[:, None] * mn)[..., None]) / np.where(step > 0, step, 1.0)[..., None])
    q = np.clip(np.where(step[..., None] > 0, q, 0), 0, top).astype(np.uint8)
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    packed = np.concatenate([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)
    parts = [d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed]
    if bits == 5:
        high = (q >> 4).reshape(n, 8, 32)
        parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(*x.shape[:-1], -1)


ENCODERS = {Q.Q6_K: encode_q6_k, Q.Q5_K: lambda a: encode_k_with_mins(a, 5),
            Q.Q4_K: lambda a: encode_k_with_mins(a, 4)}


def encode(array: np.ndarray, qtype) -> np.ndarray:
    if qtype in ENCODERS:
        return ENCODERS[qtype](array)
    return gguf.quants.quantize(array, qtype)


def write_gguf(sd: dict, path: Path, qtype, extra=None) -> dict[str, np.ndarray]:
    """City96-style GGUF: every matrix whose rows fit the block size in ``qtype``, 1-D tensors F32, the 5-D patch
    embedding flattened to 2-D (F16; F32 in an F32 file) with its torch shape in ``comfy.gguf.orig_shape.*``.
    Returns the stored bytes of the ``qtype`` tensors by name."""
    writer = gguf.GGUFWriter(str(path), arch="wan")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    stored = {}
    for name, tensor in sorted(sd.items()):
        array = tensor.float().numpy()
        if array.ndim > 4:
            writer.add_array(ORIG_SHAPE_KEY + name, list(array.shape))
            flat = array.reshape(array.shape[0], -1)
            writer.add_tensor(name, flat if qtype is Q.F32 else flat.astype(np.float16))
        elif array.ndim == 2 and array.shape[-1] % block == 0:
            stored[name] = encode(array, qtype)
            if qtype in (Q.F32, Q.F16):
                writer.add_tensor(name, stored[name])
            else:
                writer.add_tensor(name, stored[name], raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    for name, (array, raw) in (extra or {}).items():
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ------------------------------------------------------------------------------------------------------ GGUF

@pytest.mark.parametrize("qtype", list(GGUF_BOUND), ids=lambda q: q.name)
def test_gguf_types_load_and_match_reference(ref, tmp_path, qtype):
    path = tmp_path / f"wan_{qtype.name}.gguf"
    stored = write_gguf(ref["sd"], path, qtype)
    quantized = {"blocks.0.ffn.0.weight", "blocks.0.ffn.2.weight", "blocks.1.audio_cross_attn.q_linear.weight"}
    assert quantized <= set(stored)
    model = load(path, ref)
    params = dict(model.named_parameters())
    assert set(params) == set(ref["sd"])
    for name, data in stored.items():
        expected = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)))
        assert params[name].shape == ref["sd"][name].shape
        assert torch.equal(params[name], expected.reshape(params[name].shape)), name
    patch = ref["sd"]["patch_embedding.weight"]
    assert torch.equal(params["patch_embedding.weight"], patch if qtype is Q.F32 else patch.half().float())
    error = rel_error(model, ref)
    print(f"{qtype.name}: relative output error {error:.3g}")
    assert error <= GGUF_BOUND[qtype]
    if qtype is not Q.F32:
        assert error > 0


def test_gguf_dimension_order_and_original_shape(ref, tmp_path):
    """GGUF stores ne[0] = row length first: the raw dims are the torch shape reversed."""
    path = tmp_path / "wan.gguf"
    write_gguf(ref["sd"], path, Q.Q8_0)
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    reader = GGUFTensorReader(path)
    name = "blocks.0.ffn.0.weight"
    rows, cols = ref["sd"][name].shape
    assert rows != cols and tuple(raw[name].shape.tolist()) == (cols, rows)
    assert reader.shape(name) == (rows, cols) and reader.read(name).shape == (rows, cols)
    assert reader.ggml_type(name) is Q.Q8_0 and reader.dtype(name) == torch.float32
    assert reader.shape("patch_embedding.weight") == tuple(ref["sd"]["patch_embedding.weight"].shape)
    assert raw["patch_embedding.weight"].shape.size == 2
    assert reader.dtype("patch_embedding.weight") == torch.float16
    assert reader.metadata()["general.architecture"] == "wan"


def test_gguf_into_fp8_layers(ref, tmp_path):
    path = tmp_path / "wan_q8.gguf"
    write_gguf(ref["sd"], path, Q.Q8_0)
    model = load(path, ref, "fp8_e4m3fn_scaled")
    assert isinstance(model.blocks[0].self_attn.q, QuantLinear)
    assert model.blocks[0].self_attn.q.weight.dtype == E4M3
    assert rel_error(model, ref) <= FP8_BOUND


def test_gguf_bad_files_are_named(ref, tmp_path):
    small = {k: v for k, v in ref["sd"].items() if k.startswith(("patch_embedding", "blocks.0.norm3"))}
    ints = tmp_path / "int_tensor.gguf"
    write_gguf(small, ints, Q.F32, extra={"blocks.0.counter": (np.arange(8, dtype=np.int32), None)})
    with pytest.raises(ValueError, match=r"'blocks.0.counter' has GGML type I32"):
        open_state_dict([ints])
    q8k = tmp_path / "q8_k.gguf"
    rows = np.zeros((2, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), dtype=np.uint8)
    write_gguf(small, q8k, Q.F32, extra={"blocks.0.self_attn.q.weight": (rows, Q.Q8_K)})
    with pytest.raises(ValueError, match=r"'blocks.0.self_attn.q.weight' has GGML type Q8_K") as err:
        open_state_dict([q8k])
    assert str(q8k) in str(err.value) and "Q6_K" in str(err.value)
    good = tmp_path / "good.gguf"
    write_gguf(ref["sd"], good, Q.Q8_0)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        open_state_dict([truncated])


# ---------------------------------------------------------------------------------------------- fp8 files

def is_block_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("blocks.") and name.endswith(".weight") and tensor.dim() == 2


def quantize_per_tensor(w: torch.Tensor, dtype=E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / torch.finfo(dtype).max
    return (w.float() / scale).to(dtype), scale.reshape(())


def scaled_fp8_file(sd: dict, path: Path, scale_leaf: str = "scale_weight", dtype=E4M3, extra=()) -> dict:
    """A scaled-fp8 checkpoint (ComfyUI / Kijai style): fp8 block linears, per-tensor ``<layer>.<scale_leaf>``,
    the ``scaled_fp8`` marker, prefixed keys. ``extra`` names further weights to store in fp8 the same way."""
    out, scales = {}, {}
    for name, tensor in sd.items():
        if is_block_linear(name, tensor) or name in extra:
            layer = name[: -len(".weight")]
            out[name], scales[layer] = quantize_per_tensor(tensor, dtype)
            out[f"{layer}.{scale_leaf}"] = scales[layer]
        else:
            out[name] = tensor
    out["scaled_fp8"] = torch.empty(0, dtype=dtype)
    save_file({PREFIX + k: v for k, v in out.items()}, str(path))
    return out


@pytest.mark.parametrize("scale_leaf", ["scale_weight", "weight_scale"])
def test_scaled_fp8_loads_as_is(ref, tmp_path, scale_leaf):
    path = tmp_path / "wan_fp8_scaled.safetensors"
    stored = scaled_fp8_file(ref["sd"], path, scale_leaf, extra=("text_embedding.0.weight",))
    sd = open_state_dict([path])
    assert settle_quant_mode(sd, "disabled") is QuantMode.FP8_E4M3FN_SCALED
    assert settle_quant_mode(sd, "fp8_e5m2") is QuantMode.FP8_E5M2
    model = load(path, ref)
    layer = model.blocks[1].self_attn.o
    assert type(layer) is ops_for("fp8_e4m3fn_scaled").Linear
    n, k = layer.out_features, layer.in_features
    assert torch.equal(layer.weight[:n, :k].view(torch.uint8), stored["blocks.1.self_attn.o.weight"].view(torch.uint8))
    assert torch.equal(layer.scale_weight[:n], stored[f"blocks.1.self_attn.o.{scale_leaf}"].expand(n))
    text = stored["text_embedding.0.weight"].float() * stored[f"text_embedding.0.{scale_leaf}"]
    assert torch.equal(model.text_embedding[0].weight, text)
    error = rel_error(model, ref)
    print(f"scaled fp8 ({scale_leaf}): relative output error {error:.3g}")
    assert 0 < error <= FP8_BOUND


def test_scaled_fp8_requantized_for_other_modes(ref, tmp_path):
    path = tmp_path / "wan_fp8_scaled.safetensors"
    stored = scaled_fp8_file(ref["sd"], path)
    effective = stored["blocks.0.ffn.0.weight"].float() * stored["blocks.0.ffn.0.scale_weight"]
    e5m2 = load(path, ref, "fp8_e5m2_scaled")
    layer = e5m2.blocks[0].ffn[0]
    assert layer.weight.dtype == E5M2
    deq = layer.dequantized_weight()
    assert ((deq - effective).norm() / effective.norm()).item() < 0.05
    assert rel_error(e5m2, ref) <= 0.08
    fp4 = load(path, ref, "fp4_scaled")
    assert fp4.blocks[0].ffn[0].weight.dtype == torch.uint8 and rel_error(fp4, ref) <= 0.15


def test_unscaled_fp8_file_detects_plain_fp8(ref, tmp_path):
    path = tmp_path / "wan_fp8_e5m2.safetensors"
    sd = {k: (v.to(E5M2) if is_block_linear(k, v) else v) for k, v in ref["sd"].items()}
    save_file(sd, str(path))
    lazy = open_state_dict([path])
    assert checkpoint.fp8_storage(lazy) == E5M2 and not lazy.quant.scaled
    model = load(path, ref)
    layer = model.blocks[0].cross_attn.k_img
    assert type(layer) is ops_for("fp8_e5m2").Linear
    assert torch.equal(layer.weight[:layer.out_features, :layer.in_features].view(torch.uint8),
                       sd["blocks.0.cross_attn.k_img.weight"].view(torch.uint8))
    assert torch.all(layer.scale_weight == 1)


def test_later_unscaled_weight_drops_the_scale(ref, tmp_path):
    base = tmp_path / "wan_fp8_scaled.safetensors"
    scaled_fp8_file(ref["sd"], base)
    override = tmp_path / "override.safetensors"
    new_weight = ref["sd"]["blocks.0.self_attn.q.weight"] * 0.5
    save_file({"blocks.0.self_attn.q.weight": new_weight}, str(override))
    model = load(base, ref, adapter=override)
    q = model.blocks[0].self_attn.q
    assert ((q.dequantized_weight() - new_weight).norm() / new_weight.norm()).item() < 0.05


def comfy_quant_file(sd: dict, path: Path, how: str) -> dict:
    """ComfyUI-quantized checkpoint: fp8 weights + scalar ``weight_scale`` + ``input_scale``; formats in the
    ``_quantization_metadata`` header (``how`` = "header") or in ``.comfy_quant`` tensors with the fp8 bytes in
    uint8 containers (``how`` = "tensors")."""
    out, layers = {}, {}
    for name, tensor in sd.items():
        if not is_block_linear(name, tensor):
            out[name] = tensor
            continue
        layer = name[: -len(".weight")]
        weight, scale = quantize_per_tensor(tensor)
        out[name] = weight if how == "header" else weight.view(torch.uint8)
        out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale, torch.tensor(1.0)
        layers[PREFIX + layer] = {"format": "float8_e4m3fn"}
        if how == "tensors":
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file({PREFIX + k: v for k, v in out.items()}, str(path), metadata=metadata if how == "header" else None)
    return out


@pytest.mark.parametrize("how", ["header", "tensors"])
def test_comfy_quantized_file_loads_as_is(ref, tmp_path, how):
    path = tmp_path / f"wan_comfy_{how}.safetensors"
    stored = comfy_quant_file(ref["sd"], path, how)
    sd = open_state_dict([path])
    assert len(sd.quant.formats) == len(sd.quant.scales) == sd.quant.input_scales > 0
    assert sd["blocks.0.self_attn.k.weight"].dtype == E4M3
    model = load(path, ref)
    layer = model.blocks[1].audio_cross_attn.kv_linear
    assert type(layer) is ops_for("fp8_e4m3fn_scaled").Linear
    assert torch.equal(layer.weight[:layer.out_features, :layer.in_features].view(torch.uint8),
                       stored["blocks.1.audio_cross_attn.kv_linear.weight"].view(torch.uint8))
    error = rel_error(model, ref)
    assert 0 < error <= FP8_BOUND


def test_unsupported_comfy_format_is_named(ref, tmp_path):
    path = tmp_path / "wan_nvfp4.safetensors"
    sd = {PREFIX + k: v for k, v in ref["sd"].items()}
    layers = {PREFIX + "blocks.0.self_attn.q": {"format": "nvfp4"}, PREFIX + "blocks.0.self_attn.k":
              {"format": "float8_e4m3fn"}}
    save_file(sd, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with pytest.raises(ValueError, match=r"format 'nvfp4' \(layer 'blocks.0.self_attn.q'") as err:
        open_state_dict([path])
    assert str(path) in str(err.value)
