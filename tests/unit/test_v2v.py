"""Video-to-video in the long-video loop: per-window source latent slicing, add_noise_to_samples, noise-mask slicing
and differential-diffusion blending on small tensors, the LATENT socket conversion, and tiny-model loop runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitetalk.multitalk import pipeline
from infinitetalk.multitalk.frame_sink import MemorySink
from infinitetalk.multitalk.loop import (InfiniteTalkLoop, LoopInputs, SamplerSettings, SourceVideo, _check_inputs,
                                         _Source, add_noise_to_samples, differential_blend)
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.multitalk.windows import (noise_mask_window, plan_windows, source_latent_offset,
                                            source_latent_window)
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.sampling import PHASE_AFTER_STEP, StepContext
from infinitetalk.wanvideo.vae import load_vae

HEIGHT, WIDTH = 32, 48


pytestmark = pytest.mark.usefixtures("one_thread")  # float32 results as the fixtures were made


def test_source_latent_offset_follows_the_upstream_formula():
    assert [source_latent_offset(k, 81, 9) for k in range(4)] == [0, 18, 36, 54]
    assert [source_latent_offset(k, 81, 25) for k in range(3)] == [0, 14, 28]
    assert source_latent_offset(2, 84, 9) == 36  # window size rounds down to 81 first
    assert source_latent_offset(3, 9, 5) == 3


def test_source_window_repeats_the_last_latent_frame():
    latents = torch.arange(4, dtype=torch.float32)[None, :, None, None].expand(2, 4, 1, 1)
    assert source_latent_window(latents, 0, 3)[0, :, 0, 0].tolist() == [0, 1, 2]
    assert source_latent_window(latents, 2, 4)[0, :, 0, 0].tolist() == [2, 3, 3, 3]
    assert source_latent_window(latents, 9, 2)[0, :, 0, 0].tolist() == [3, 3]
    with pytest.raises(ValueError, match="source latents"):
        source_latent_window(torch.zeros(16, 0, 2, 2), 0, 1)


def test_noise_mask_is_sliced_by_frames_and_resized_to_the_latent_grid():
    mask = torch.zeros(20, 16, 24)
    mask[10:] = 1.0
    mask[:, :, :12] *= 0.5
    early = noise_mask_window(mask, 0, 9, (3, 2, 3))
    late = noise_mask_window(mask, 12, 9, (3, 2, 3))
    assert early.shape == (1, 3, 2, 3) and torch.equal(early, torch.zeros_like(early))
    assert torch.allclose(late[..., 0], torch.full_like(late[..., 0], 0.5))
    assert torch.allclose(late[..., 2], torch.ones_like(late[..., 2]))
    past_end = noise_mask_window(mask[:1] + 0.25, 40, 5, (2, 2, 3))
    assert torch.allclose(past_end[..., 2], torch.full_like(past_end[..., 2], 0.25))


def test_add_noise_to_samples_mixes_by_the_first_timestep():
    noise, source = torch.full((2, 2), 3.0), torch.full((2, 2), -1.0)
    assert torch.equal(add_noise_to_samples(noise, source, torch.tensor(1000.0)), noise)
    assert torch.equal(add_noise_to_samples(noise, source, 0.0), source)
    assert torch.allclose(add_noise_to_samples(noise, source, torch.tensor(250.0)), torch.full((2, 2), 0.0))


def test_differential_blend_resets_cells_below_the_step_threshold():
    source = _Source(latents=torch.full((1, 1, 1, 3), 2.0), noise=torch.full((1, 1, 1, 3), -2.0),
                     mask=torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3))
    x = torch.full((1, 1, 1, 3), 7.0)

    def after(step: int) -> list[float]:
        ctx = StepContext(step_index=step, num_steps=4, phase=PHASE_AFTER_STEP, timestep=torch.tensor(250.0),
                          sigma=torch.tensor(0.25))
        return differential_blend(x, source, ctx).flatten().tolist()

    renoised = 0.75 * 2.0 + 0.25 * -2.0
    assert after(0) == [renoised, 7.0, 7.0]
    assert after(2) == [renoised, renoised, 7.0]
    assert after(3) == [7.0, 7.0, 7.0]  # no blend after the last step
    no_mask = _Source(latents=source.latents, noise=source.noise, mask=None)
    ctx = StepContext(0, 4, PHASE_AFTER_STEP, torch.tensor(1.0), torch.tensor(0.1))
    assert differential_blend(x, no_mask, ctx) is x


def test_latent_socket_conversion_and_bad_sources():
    latents = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8)
    source = pipeline.source_video({"samples": latents, "noise_mask": torch.ones(HEIGHT, WIDTH)})
    assert source.latents.shape == (16, 3, 4, 6) and source.noise_mask.shape == (1, HEIGHT, WIDTH)
    assert pipeline.source_video({"samples": latents, "noise_mask": None}).noise_mask is None
    with pytest.raises(ValueError, match="WanVideo Encode"):
        pipeline.source_video({"samples": latents[0]})
    base = dict(start_images=torch.zeros(1, 3, HEIGHT, WIDTH), audio_features=[torch.zeros(9, 12, 768)],
                prompts=[torch.zeros(3, 8)], negative=torch.zeros(3, 8), total_frames=9)
    wrong_size = LoopInputs(**base, source=SourceVideo(latents=torch.zeros(16, 3, 8, 6)))
    with pytest.raises(ValueError, match="resize the source video"):
        _check_inputs(wrong_size, 8)


@pytest.fixture(scope="module")
def models(fixtures_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    prefix = "state_dict."
    ref = fixtures_dir / "ref_tiny_1p.safetensors"
    text_len = json.loads(safe_open(str(ref), "pt").metadata()["harness"])["config"]["text_len"]
    for name, src in (("infinitetalk", ref), ("vae", fixtures_dir / "ref_vae_a.safetensors")):
        tensors = load_file(str(src))
        save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                  str(folder / f"{name}.safetensors"))
    model = load_infinitetalk(folder / "infinitetalk.safetensors", None,
                              LoadOptions(dtype=torch.float32, text_len=text_len))
    return model, load_vae(folder / "vae.safetensors", "fp32")


def _inputs(model, total: int, source: SourceVideo) -> LoopInputs:
    gen = torch.Generator().manual_seed(11)
    acfg, text_dim = model.config.audio, model.config.text_dim
    return LoopInputs(start_images=torch.rand(1, 3, HEIGHT, WIDTH, generator=gen) * 2 - 1,
                      audio_features=[torch.randn(total, acfg.audio_blocks, acfg.audio_channels, generator=gen)],
                      prompts=[torch.randn(5, text_dim, generator=gen)],
                      negative=torch.randn(4, text_dim, generator=gen),
                      total_frames=total, frame_window_size=9, motion_frame=5,
                      clip_context=torch.randn(1, 257, 1280, generator=gen), source=source)


def _run(models, inputs: LoopInputs, settings: SamplerSettings) -> torch.Tensor:
    sink = MemorySink()
    InfiniteTalkLoop(*models, settings, torch.device("cpu")).run(inputs, sink)
    return sink.result()


def test_v2v_loop_runs_from_the_source_and_honours_the_noise_mask(models):
    total = 13
    latents = torch.randn(16, 3, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    settings = SamplerSettings(scheduler="euler", steps=4, shift=5.0, seed=4, cfg=1.0, audio_cfg=1.0,
                               denoise_strength=0.5)
    assert [w.num_frames for w in plan_windows(total, 9, 5)] == [9, 9]
    plain = _run(models, _inputs(models[0], total, SourceVideo(latents)), settings)
    assert plain.shape == (total, HEIGHT, WIDTH, 3) and torch.isfinite(plain).all()
    other = _run(models, _inputs(models[0], total, SourceVideo(latents.flip(1))), settings)
    assert not torch.allclose(plain, other, atol=1e-4)
    ones = _run(models, _inputs(models[0], total, SourceVideo(latents, torch.ones(total, HEIGHT, WIDTH))), settings)
    assert torch.equal(ones, plain)  # mask 1 everywhere = regenerate everything = no blend
    zeros = _run(models, _inputs(models[0], total, SourceVideo(latents, torch.zeros(2, 8, 8))), settings)
    assert not torch.allclose(zeros, plain, atol=1e-4)
    with pytest.raises(ValueError, match="denoise_strength < 1 sets start_step"):
        _run(models, _inputs(models[0], total, SourceVideo(latents)),
             SamplerSettings(**{**settings.__dict__, "start_step": 1}))
