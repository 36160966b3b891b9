"""Wan2.1 VAE: parity with the official implementation (fixture ref_vae_a), chunked causal caching, tiling, loading."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitetalk.wanvideo.vae import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, VAEConfig, WanVAE, load_vae,
                                       parse_precision)
from infinitetalk.wanvideo.vae_tiling import TileSpec, tile_spans
from parity import tensor_group

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_file(str(fixtures_dir / "ref_vae_a.safetensors"))


@pytest.fixture(scope="module")
def state_dict(fixture):
    return tensor_group(fixture, "state_dict")


@pytest.fixture(scope="module")
def vae_path(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "wan21_vae_tiny.safetensors"
    save_file(state_dict, str(path))
    return path


@pytest.fixture(scope="module")
def vae(vae_path):
    return load_vae(vae_path, "fp32")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _smooth_video(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3 * frames, height // 8, width // 8, generator=gen) * 2 - 1
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return fine.reshape(1, 3, frames, height, width)


# ------------------------------------------------------------------------------------------------------------- parity


def test_fixture_parity(vae, fixture):
    assert vae.config == VAEConfig(dim=8)
    latents = vae.encode(fixture["inputs.video"][None])
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 3, 4, 6)
    assert _max_diff(latents[0], fixture["outputs.latent_mu"]) <= 1e-5
    raw = vae.decode(fixture["outputs.latent_mu"][None], clamp=False)
    assert raw.shape == (1, 3, 9, 32, 48)
    assert _max_diff(raw[0], fixture["intermediates.decoded_raw"]) <= 5e-5
    assert raw.abs().max() > 1.0  # the fixture's raw output leaves [-1, 1]; the clamp below must matter
    decoded = vae.decode(fixture["outputs.latent_mu"][None])
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0
    assert _max_diff(decoded[0], fixture["outputs.decoded"]) <= 5e-5


def test_latent_constants_match_official(fixture):
    assert torch.equal(torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32), fixture["constants.mean"])
    assert torch.equal(torch.tensor(WAN21_LATENT_STD, dtype=torch.float32), fixture["constants.std"])


def test_load_with_model_prefix(state_dict, vae, fixture, tmp_path):
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.{k}": v for k, v in state_dict.items()}, str(path))
    prefixed = load_vae(path, torch.float32)
    ours = prefixed.state_dict()
    assert ours.keys() == state_dict.keys()
    assert all(torch.equal(ours[k], state_dict[k]) for k in state_dict)
    latents = prefixed.encode(fixture["inputs.video"][None, :, :5])
    assert _max_diff(latents[0], fixture["outputs.latent_mu"][:, :2]) <= 1e-5  # causal: a prefix of the video


def test_load_original_pth(state_dict, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(dict(state_dict), path)
    loaded = load_vae(path, "bf16").state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], state_dict[k].bfloat16()) for k in loaded)


# ------------------------------------------------------------------------------------------------ chunked causal cache


def test_chunked_equals_full_sequence_on_17_frames(vae):
    video = torch.rand(1, 3, 17, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    chunked = vae.encode(video)
    assert chunked.shape == (1, 16, 5, 2, 3)
    assert _max_diff(chunked, vae.encode(video, chunked=False)) <= 1e-5
    assert _max_diff(chunked[:, :, :3], vae.encode(video[:, :, :9])) <= 1e-5  # causality: later frames never leak back

    stream = list(vae.decode_stream(chunked, clamp=False))
    assert [chunk.shape[2] for chunk in stream] == [1, 4, 4, 4, 4]
    decoded = torch.cat(stream, dim=2)
    assert decoded.shape == (1, 3, 17, 16, 24) and decoded.dtype == torch.float32
    assert _max_diff(decoded, vae.decode(chunked, clamp=False, chunked=False)) <= 1e-5
    assert _max_diff(decoded[:, :, :5], vae.decode(chunked[:, :, :2], clamp=False)) <= 1e-5


def test_other_configuration_is_inferred_and_runs():
    config = VAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(False, True))
    torch.manual_seed(11)
    model = WanVAE(config).eval()
    state = model.state_dict()
    assert VAEConfig.from_state_dict(state) == config
    rebuilt = WanVAE.from_state_dict(state)
    video = torch.rand(2, 3, 5, 16, 12) * 2 - 1  # temporal stride 2, spatial stride 4
    latents = rebuilt.encode(video)
    assert latents.shape == (2, 16, 3, 4, 3)
    assert _max_diff(latents, rebuilt.encode(video, chunked=False)) <= 1e-5
    assert rebuilt.decode(latents).shape == (2, 3, 5, 16, 12)
    assert _max_diff(rebuilt.decode(latents), rebuilt.decode(latents, chunked=False)) <= 1e-5


# ------------------------------------------------------------------------------------------------------------- tiling


def _reshaped_weights(state_dict, keep_3x3) -> dict:
    """Attention output projections zeroed; 3x3 spatial kernels reduced to their centre tap except where
    ``keep_3x3(key)``: a VAE whose spatial receptive field is known exactly."""
    out = {}
    for key, value in state_dict.items():
        value = value.clone()
        if key.endswith("proj.weight"):
            value.zero_()
        elif value.dim() >= 4 and value.shape[-1] == 3 and not keep_3x3(key):
            centre = value[..., 1:2, 1:2].clone()
            value.zero_()
            value[..., 1:2, 1:2] = centre
        out[key] = value
    return out


def test_tile_planning():
    assert tile_spans(8, 6, 4) == ((0, 6), (2, 8))
    assert tile_spans(5, 6, 4) == ((0, 5),)
    assert tile_spans(60, 34, 16) == ((0, 34), (13, 47), (26, 60))
    grid = TileSpec(48, 48, 32, 32).grid(8, 10, 8)
    assert len(grid.tiles) == 4
    total = torch.zeros(64, 80)
    for ((y0, y1), (x0, x1)), weight in zip(grid.tiles, grid.weights(8, torch.device("cpu"))):
        assert weight.min() > 0
        total[y0 * 8:y1 * 8, x0 * 8:x1 * 8] += weight
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    with pytest.raises(ValueError, match="tile_x"):
        TileSpec(tile_x=128, tile_y=272, stride_x=128, stride_y=128)
    with pytest.raises(ValueError, match="latent cells"):
        TileSpec(tile_x=12, tile_y=272, stride_x=4, stride_y=128).grid(10, 10, 8)


def test_tiled_equals_untiled_for_pointwise_weights(state_dict):
    """No spatial mixing -> tiling must be exact: checks tile coordinates, per-tile causal caches and blending."""
    vae = WanVAE.from_state_dict(_reshaped_weights(state_dict, lambda key: False))
    spec = TileSpec(tile_x=48, tile_y=48, stride_x=32, stride_y=32)
    assert len(spec.grid(8, 8, 8).tiles) == 4  # 64 x 64 frame: 2 x 2 tiles
    video = _smooth_video(5, 64, 64, seed=3)
    latents = vae.encode(video)
    assert _max_diff(vae.encode(video, tiling=spec), latents) <= 1e-5
    tiled = list(vae.decode_stream(latents, tiling=spec, clamp=False))
    assert [chunk.shape[2] for chunk in tiled] == [1, 4]
    assert _max_diff(torch.cat(tiled, dim=2), vae.decode(latents, clamp=False)) <= 1e-5


def test_tiled_decode_close_to_untiled_without_seams(state_dict):
    """3x3 kernels kept at full resolution only (decoder receptive field: 8 pixels), 2 x 2 tiles on 64 x 64 with a
    32-pixel overlap. Far from tile edges the tiled output is exact; near the inner tile edges the tiles' own
    boundary errors are damped by the blend ramps (observed: a lone tile is off by 0.83 near its edge, the
    blended output by at most 0.086)."""
    full_res = ("decoder.head.", "decoder.upsamples.11.", "decoder.upsamples.12.", "decoder.upsamples.13.",
                "decoder.upsamples.14.")
    vae = WanVAE.from_state_dict(_reshaped_weights(state_dict, lambda key: key.startswith(full_res)))
    spec = TileSpec(tile_x=48, tile_y=48, stride_x=32, stride_y=32)
    latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = vae.decode(latents, clamp=False)
    diff = (vae.decode(latents, tiling=spec, clamp=False) - ref).abs().amax(dim=(0, 1, 2))  # [64, 64]
    # inner tile edges at pixels 16 (second tile starts) and 48 (first tile ends), on both axes
    near = torch.zeros(64, dtype=torch.bool)
    near[16 - 8:16 + 8] = near[48 - 8:48 + 8] = True
    far = ~near
    assert diff[far][:, far].max() <= 1e-5
    own_edge_error = _max_diff(vae.decode(latents[..., :, 0:6], clamp=False)[..., 40:48], ref[..., 40:48])
    assert own_edge_error > 0.05  # a hard cut at the tile edge would show this step
    assert diff.max() <= 0.5 * own_edge_error
    assert diff.max() <= 0.12


def test_tiled_close_to_untiled_with_fixture_weights(vae):
    """Random weights mix the whole tile (global attention, wide receptive field): tiles differ from the full
    frame everywhere, so only statistics are bounded (observed on 64 x 64: encode mean |diff| 0.03 vs latent std
    0.5; decode mean 0.07 vs std 0.41)."""
    spec = TileSpec(tile_x=48, tile_y=48, stride_x=32, stride_y=32)
    video = _smooth_video(5, 64, 64, seed=0)
    latents = vae.encode(video)
    tiled = vae.encode(video, tiling=spec)
    assert tiled.shape == latents.shape
    assert (tiled - latents).abs().mean() <= 0.15 * latents.std()
    decoded = vae.decode(latents, clamp=False)
    assert (vae.decode(latents, tiling=spec, clamp=False) - decoded).abs().mean() <= 0.25 * decoded.std()


# ------------------------------------------------------------------------------------------------- precision and errors


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_round_trip(vae_path, vae, fixture, precision):
    half = load_vae(vae_path, precision)
    assert all(p.dtype == parse_precision(precision) for p in half.parameters())
    video = fixture["inputs.video"][None]
    latents = half.encode(video)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert _max_diff(latents[0], fixture["outputs.latent_mu"]) <= 0.1
    decoded = half.decode(latents)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    assert decoded.abs().max() <= 1.0
    assert (decoded[0] - fixture["outputs.decoded"]).abs().mean() <= 0.02


def _zeros_file(path, config: VAEConfig, dtype=torch.float16, extra=None) -> None:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAE(config).state_dict().items()}
    tensors = {k: torch.zeros(shape, dtype=dtype) for k, shape in shapes.items()}
    tensors.update(extra or {})
    save_file(tensors, str(path))


def test_rejects_wan22_vae(tmp_path):
    path = tmp_path / "wan2.2_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(160, 12, 3, 3, 3),
               "decoder.conv1.weight": torch.zeros(1024, 48, 3, 3, 3),
               "conv1.weight": torch.zeros(96, 96, 1, 1, 1), "conv2.weight": torch.zeros(48, 48, 1, 1, 1)}, str(path))
    with pytest.raises(ValueError, match="Wan2.2"):
        load_vae(path, "bf16")


def test_rejects_light_vae(tmp_path):
    path = tmp_path / "lightvaew2_1.safetensors"
    _zeros_file(path, VAEConfig(dim=24))  # every width x 0.25: decoder.conv1 has 96 channels
    with pytest.raises(ValueError, match="lightVAE"):
        load_vae(path, "bf16")


def test_rejects_files_that_are_not_a_wan21_vae(tmp_path, state_dict):
    transformer = tmp_path / "transformer.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(8, 8), "head.head.weight": torch.zeros(4, 8)},
              str(transformer))
    with pytest.raises(ValueError, match="not a VAE"):
        load_vae(transformer, "fp32")
    encoder_only = tmp_path / "encoder_only.safetensors"
    save_file({k: v for k, v in state_dict.items() if not k.startswith("decoder.")}, str(encoder_only))
    with pytest.raises(ValueError, match="decoder"):
        load_vae(encoder_only, "fp32")
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in state_dict.items() if not k.startswith("decoder.upsamples.14.")}, str(truncated))
    with pytest.raises(ValueError, match="decoder.upsamples.14"):
        load_vae(truncated, "fp32")
    with pytest.raises(ValueError, match="precision"):
        load_vae(truncated, "fp8")


def test_bad_inputs_are_named(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match="\\[B, 3, F, H, W\\]"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="\\[B, 16, F, H, W\\]"):
        vae.decode(torch.zeros(1, 48, 2, 4, 4))


def test_pad_to_causal_length_repeats_the_last_frame():
    from infinitetalk.wanvideo.vae import pad_to_causal_length

    video = torch.arange(7, dtype=torch.float32).reshape(1, 1, 7, 1, 1).expand(1, 3, 7, 2, 2)
    padded = pad_to_causal_length(video)
    assert padded.shape[2] == 9 and torch.equal(padded[0, 0, :, 0, 0], torch.tensor([0., 1, 2, 3, 4, 5, 6, 6, 6]))
    assert pad_to_causal_length(padded) is padded
