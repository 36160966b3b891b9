"""Parity of the Wan2.1 I2V + InfiniteTalk transformer with the official implementation (model-spec §6).

Every output and intermediate stored in the fixtures is compared in float32 on the CPU (1 thread), max |diff| <= 1e-5.
Sizes come from the files (state-dict shapes + the ``harness`` metadata), never from constants.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from infinitetalk.attention import resolve
from infinitetalk.fp8_optimization import ops_for
from infinitetalk.multitalk.model import InfiniteTalkModel
from infinitetalk.wanvideo.config import AudioConfig, WanConfig
from infinitetalk.wanvideo.model import WanModel, pad_context

TOL = 1e-5
FIXTURES = ("ref_tiny_1p", "ref_tiny_2p")
TOP_LEVEL = ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "img_emb", "audio_proj",
             "head")
PER_BLOCK = ("", ".self_attn", ".cross_attn", ".audio_cross_attn", ".ffn")


@dataclass
class Fixture:
    sd: dict
    inputs: dict
    outputs: dict
    intermediates: dict
    config: dict


def read_fixture(path: Path) -> Fixture:
    tensors = load_file(str(path))
    groups: dict[str, dict] = {"state_dict": {}, "inputs": {}, "outputs": {}, "intermediates": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        groups[group][name] = value
    config = json.loads(safe_open(str(path), "pt").metadata()["harness"])["config"]
    return Fixture(groups["state_dict"], groups["inputs"], groups["outputs"], groups["intermediates"], config)


pytestmark = pytest.mark.usefixtures("one_thread")  # float32 results as the fixtures were made


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request, fixtures_dir) -> Fixture:
    return read_fixture(fixtures_dir / f"{request.param}.safetensors")


def build_model(fx: Fixture) -> InfiniteTalkModel:
    cfg = WanConfig.from_state_dict(fx.sd, text_len=fx.config["text_len"], num_heads=fx.config["num_heads"])
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32))
    model.load_state_dict(fx.sd, strict=True)
    return model.eval()


def model_args(fx: Fixture, masks: bool = True) -> dict:
    """The fixture inputs in this pack's batched tensor layout (batch 1)."""
    i = fx.inputs
    return dict(x=i["x"][None], t=i["t"], context=i["context"][None], clip_fea=i["clip_fea"], y=i["y"],
                audio=i["audio"][None], ref_target_masks=i["ref_target_masks"] if masks else None)


def run_with_hooks(model: torch.nn.Module, args: dict) -> tuple[torch.Tensor, dict]:
    captured: dict = {}
    names = list(TOP_LEVEL) + [f"blocks.{b}{n}" for b in range(len(model.blocks)) for n in PER_BLOCK]
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: captured.__setitem__(n, out)) for n in names]
    try:
        with torch.no_grad():
            out = model(**args)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def ours(captured: dict, name: str) -> torch.Tensor:
    """Map a fixture intermediate name to the captured module output (batch 1)."""
    if name.endswith((".self_attn.0", ".self_attn.1")):
        index = int(name[-1])
        value = captured[name[:-2]][index]
        return value[0] if index == 1 else value
    return captured[name]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def test_config_inferred_from_weights(fixture):
    cfg = WanConfig.from_state_dict(fixture.sd, text_len=fixture.config["text_len"])
    for field in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                  "intermediate_dim", "output_dim", "context_tokens", "audio_window", "vae_scale"):
        ours_value = getattr(cfg.audio if hasattr(cfg.audio, field) else cfg, field)
        assert ours_value == fixture.config[field], field
    assert cfg.patch_size == tuple(fixture.config["patch_size"])
    assert cfg.model_type == "i2v" and cfg.head_dim == cfg.dim // cfg.num_heads


def test_output_and_every_intermediate(fixture):
    model = build_model(fixture)
    out, captured = run_with_hooks(model, model_args(fixture))
    errors = {"outputs.noise_pred": max_err(out, fixture.outputs["noise_pred"])}
    assert fixture.intermediates, "fixture holds no intermediates"
    for name, ref in fixture.intermediates.items():
        errors[name] = max_err(ours(captured, name).reshape(ref.shape), ref)
    print("max abs errors:", json.dumps({k: f"{v:.3g}" for k, v in errors.items()}))
    assert out.dtype == torch.float32
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"above {TOL}: {bad}"


def test_batched_call_equals_single_calls(fixture):
    """Two different samples stacked in one call (CFG style) give the per-sample results."""
    model = build_model(fixture)
    a = model_args(fixture)
    b = dict(a, t=a["t"] * 0.5, context=a["context"].flip(1), audio=a["audio"] * 0.7, x=a["x"].flip(-1))
    with torch.no_grad():
        single = [model(**a), model(**b)]
        both = model(x=torch.cat([a["x"], b["x"]]), t=torch.cat([a["t"], b["t"]]),
                     context=pad_context([a["context"][0], b["context"][0]], model.config.text_len),
                     clip_fea=a["clip_fea"], y=torch.cat([a["y"], b["y"]]), audio=torch.cat([a["audio"], b["audio"]]),
                     ref_target_masks=a["ref_target_masks"])
    assert max_err(both[:1], fixture.outputs["noise_pred"]) <= TOL
    assert max_err(both, torch.cat(single)) <= TOL
    assert max_err(single[0], single[1]) > 1e-2


def test_speaker_masks_matter_only_for_two_speakers(fixture):
    model = build_model(fixture)
    swapped = model_args(fixture)
    swapped["ref_target_masks"] = swapped["ref_target_masks"][[1, 0, 2]]
    n_speakers = fixture.inputs["audio"].shape[0]
    with torch.no_grad():
        changed = max_err(model(**swapped), fixture.outputs["noise_pred"])
        if n_speakers == 1:
            without = model(**model_args(fixture, masks=False))
    if n_speakers == 1:
        assert changed <= TOL
        assert max_err(without, fixture.outputs["noise_pred"]) <= TOL
    else:
        assert changed > 1e-3
        with pytest.raises(ValueError, match="ref_target_masks"):
            model(**model_args(fixture, masks=False))


def test_clip_tokens_are_optional_for_i2v(fixture):
    model = build_model(fixture)
    args = model_args(fixture)
    with torch.inference_mode():
        without, with_clip = model(**dict(args, clip_fea=None)), model(**args)
    assert torch.isfinite(without).all() and not torch.allclose(without, with_clip)


def test_bad_inputs_are_named(fixture):
    model = build_model(fixture)
    args = model_args(fixture)
    with pytest.raises(ValueError, match="audio"):
        model(**dict(args, audio=None))
    with pytest.raises(ValueError, match="audio"):
        model(**dict(args, audio=args["audio"][:, :, 1:]))
    with pytest.raises(ValueError, match="clip_fea"):
        model(**dict(args, clip_fea=args["clip_fea"][..., :7]))
    with pytest.raises(ValueError, match="channels"):
        model(**dict(args, y=None))
    with pytest.raises(ValueError, match="context"):
        model(**dict(args, context=torch.zeros(1, model.config.text_len + 1, model.config.text_dim)))


def test_plain_wan_model_runs_and_rejects_audio(fixture):
    base_sd = {k: v for k, v in fixture.sd.items() if "audio" not in k and "norm_x" not in k}
    cfg = WanConfig.from_state_dict(base_sd, text_len=fixture.config["text_len"])
    assert cfg.audio is None
    model = WanModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32))
    model.load_state_dict(base_sd, strict=True)
    args = model_args(fixture)
    with torch.no_grad():
        out = model(**dict(args, audio=None, ref_target_masks=None))
    assert out.shape == fixture.outputs["noise_pred"].shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no audio adapter"):
        model(**args)


@pytest.mark.parametrize("heads, speakers", [(3, 2), (4, 1)])
def test_other_sizes_infer_config_and_run_batched(heads, speakers):
    """A configuration unlike the fixtures (sizes, heads, layers, latent grid): the config is recovered from the
    weights, and a batch of two gives the per-sample outputs."""
    torch.manual_seed(0)
    audio_cfg = AudioConfig(intermediate_dim=24, output_dim=32, context_tokens=3)
    cfg = WanConfig(dim=64 * heads, ffn_dim=96, num_heads=heads, num_layers=3, in_dim=36, out_dim=16, text_dim=48,
                    text_len=16, audio=audio_cfg)
    model = InfiniteTalkModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32)).eval()
    assert WanConfig.from_state_dict(model.state_dict(), text_len=16, num_heads=heads) == cfg
    frames, h, w = 3, 6, 10
    x, y = torch.randn(2, 16, frames, h, w), torch.randn(2, 20, frames, h, w)
    audio = torch.randn(2, speakers, 1 + 4 * (frames - 1), 5, 12, 768)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2], masks[1, :, w // 2:], masks[2, :2] = 1, 1, 1
    args = dict(t=torch.tensor([900.0, 300.0]), context=torch.randn(2, 11, 48), clip_fea=torch.randn(1, 257, 1280),
                ref_target_masks=masks)
    with torch.no_grad():
        both = model(x=x, y=y, audio=audio, **args)
        single = [model(x=x[i:i + 1], y=y[i:i + 1], audio=audio[i:i + 1],
                        **dict(args, t=args["t"][i:i + 1], context=args["context"][i:i + 1])) for i in range(2)]
    assert both.shape == (2, 16, frames, h, w) and torch.isfinite(both).all()
    assert max_err(both, torch.cat(single)) <= TOL


def test_text_to_video_model_runs_without_image_inputs():
    torch.manual_seed(1)
    cfg = WanConfig(dim=128, ffn_dim=64, num_heads=1, num_layers=1, in_dim=16, text_dim=32, model_type="t2v",
                    text_len=8)
    model = WanModel(cfg, ops_for("disabled"), resolve("sdpa", "cpu", torch.float32)).eval()
    assert not hasattr(model, "img_emb")
    assert WanConfig.from_state_dict(model.state_dict(), text_len=8, num_heads=1) == cfg
    with torch.no_grad():
        out = model(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()
