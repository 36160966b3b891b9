"""The MultiTalk variant of the long-video loop (workflow-spec §5.5) next to the InfiniteTalk one, on tiny real models.

MultiTalk: window 0 conditioned on the first start image with nothing pasted over its latent; later windows
conditioned on the previous window's last motion frames (not the start image), whose latents are written re-noised to
the current timestep before the first step and after every step (fresh generator noise, clean after the last step);
colour matching against the first start image. ``auto`` follows the adapter's type.
"""
from __future__ import annotations


import pytest
import torch

from infinitetalk.multitalk import pipeline
from infinitetalk.multitalk.colormatch import ColorMatch, srgb_to_lab
from infinitetalk.multitalk.frame_sink import MemorySink
from infinitetalk.multitalk.loop import (MASK_CHANNELS, InfiniteTalkLoop, LoopInputs, SamplerSettings, _check_inputs,
                                         _Conditioning, _motion_writer, _WindowState)
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.multitalk.windows import plan_windows
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.sampling import PHASE_AFTER_STEP, PHASE_BEFORE_MODEL, StepContext
from infinitetalk.wanvideo.vae import load_vae

HEIGHT, WIDTH = 32, 48

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(loop_model_files):
    folder, text_len = loop_model_files
    model = load_infinitetalk(folder / "infinitetalk.safetensors", None,
                              LoadOptions(dtype=torch.float32, text_len=text_len))
    return model, load_vae(folder / "vae.safetensors", "fp32")


def _inputs(model, variant: str, total: int = 13, images: int = 1, **extra) -> LoopInputs:
    gen = torch.Generator().manual_seed(21)
    acfg, text_dim = model.config.audio, model.config.text_dim
    start = torch.rand(images, 3, HEIGHT, WIDTH, generator=gen) * 2 - 1
    start[1:] = start[1:] * 0.3 - 0.6  # a second reference with clearly other colours
    return LoopInputs(start_images=start,
                      audio_features=[torch.randn(total + 3, acfg.audio_blocks, acfg.audio_channels, generator=gen)],
                      prompts=[torch.randn(5, text_dim, generator=gen)],
                      negative=torch.randn(4, text_dim, generator=gen),
                      total_frames=total, frame_window_size=9, motion_frame=5,
                      clip_context=torch.randn(1, 257, 1280, generator=gen), variant=variant, **extra)


def _loop(models, **settings) -> InfiniteTalkLoop:
    base = dict(scheduler="euler", steps=2, shift=5.0, seed=4, cfg=1.0, audio_cfg=1.0)
    return InfiniteTalkLoop(models[0], models[1], SamplerSettings(**{**base, **settings}), torch.device("cpu"))


def _context(step: int, phase: str, timestep: float) -> StepContext:
    return StepContext(step_index=step, num_steps=2, phase=phase, timestep=torch.tensor(timestep),
                       sigma=torch.tensor(timestep / 1000))


def test_multitalk_writes_renoised_motion_latents_at_the_right_moments():
    motion = torch.randn(16, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(9)
    write = _motion_writer(_Conditioning(torch.zeros(20, 5, 3, 4), motion, True, torch.zeros(3, 8, 8)), generator)
    expected = torch.Generator().manual_seed(9)
    x = torch.full((16, 5, 3, 4), 7.0)

    write(x, _context(0, PHASE_BEFORE_MODEL, 1000.0))  # before the first step: t0 = 1000 -> pure noise
    assert torch.equal(x[:, :2], torch.randn(motion.shape, generator=expected)) and torch.all(x[:, 2:] == 7.0)
    before = x.clone()
    write(x, _context(1, PHASE_BEFORE_MODEL, 500.0))  # before later steps: untouched, no noise drawn
    assert torch.equal(x, before)
    write(x, _context(0, PHASE_AFTER_STEP, 250.0))
    noise = torch.randn(motion.shape, generator=expected)
    assert torch.allclose(x[:, :2], 0.75 * motion + 0.25 * noise, atol=1e-6)
    write(x, _context(1, PHASE_AFTER_STEP, 0.0))  # after the last step: the clean motion latents
    torch.randn(motion.shape, generator=expected)
    assert torch.equal(x[:, :2], motion)
    assert torch.equal(generator.get_state(), expected.get_state())

    clean = _motion_writer(_Conditioning(torch.zeros(20, 5, 3, 4), motion, False, torch.zeros(3, 8, 8)), generator)
    x = torch.zeros(16, 5, 3, 4)
    clean(x, _context(1, PHASE_BEFORE_MODEL, 500.0))
    assert torch.equal(x[:, :2], motion) and torch.equal(generator.get_state(), expected.get_state())
    assert _motion_writer(_Conditioning(torch.zeros(20, 5, 3, 4), None, True, torch.zeros(3, 8, 8)), generator) is None


def test_window_conditioning_of_each_variant(models):
    loop = _loop(models)
    first, second = plan_windows(13, 9, 5)
    motion_pixels = torch.rand(5, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for variant in ("multitalk", "infinitetalk"):
        inputs = _inputs(models[0], variant, images=2)
        state = _WindowState(motion_pixels=motion_pixels, generator=torch.Generator())
        start = loop._window_conditioning(inputs, first, state)
        later = loop._window_conditioning(inputs, second, state)
        other_images = LoopInputs(**{**inputs.__dict__, "start_images": inputs.start_images.flip(0)})
        later_other = loop._window_conditioning(other_images, second, _WindowState(motion_pixels, torch.Generator()))
        assert torch.equal(start.y, loop._conditioning(inputs.start_images[:1], 9))
        assert torch.all(start.y[:MASK_CHANNELS, 0] == 1) and torch.all(later.y[:MASK_CHANNELS, 1:] == 0)
        motion_alone = loop._encode(motion_pixels)[:, :second.motion_latent_frames]
        if variant == "multitalk":
            assert start.motion is None and torch.equal(start.reference, inputs.start_images[0])
            assert torch.equal(later.y, loop._conditioning(motion_pixels, 9))  # previous frames, not the image
            assert torch.equal(later.y, later_other.y) and later.renoise
            assert torch.equal(later.motion, later.y[MASK_CHANNELS:, :2])
            assert torch.allclose(later.motion, motion_alone, atol=1e-5)  # causal VAE: y's head = motion latents
            assert torch.equal(later.reference, inputs.start_images[0])
        else:
            assert torch.allclose(start.motion, start.y[MASK_CHANNELS:, :1], atol=1e-5) and not start.renoise
            assert torch.equal(later.y, loop._conditioning(inputs.start_images[1:2], 9))
            assert not torch.equal(later.y, later_other.y)
            assert torch.equal(later.motion, motion_alone) and torch.equal(later.reference, inputs.start_images[1])


def test_multitalk_run_is_reproducible_and_differs_from_infinitetalk(models):
    loop = _loop(models)
    videos = {}
    for variant in ("multitalk", "infinitetalk"):
        sink = MemorySink()
        plan = loop.run(_inputs(models[0], variant), sink)
        videos[variant] = sink.result()
        assert [w.num_frames for w in plan] == [9, 9] and videos[variant].shape == (13, HEIGHT, WIDTH, 3)
    again = MemorySink()
    loop.run(_inputs(models[0], "multitalk"), again)
    assert torch.equal(again.result(), videos["multitalk"])
    assert not torch.allclose(videos["multitalk"][:9], videos["infinitetalk"][:9], atol=1e-4)  # window 0 too
    assert not torch.allclose(videos["multitalk"][9:], videos["infinitetalk"][9:], atol=1e-4)


def test_multitalk_colour_matches_every_window_to_the_first_start_image(models):
    loop = _loop(models, steps=1)
    colours = {}
    for variant in ("multitalk", "infinitetalk"):
        inputs = _inputs(models[0], variant, images=2, colormatch=ColorMatch("lab"))
        sink = MemorySink()
        loop.run(inputs, sink)
        colours[variant] = srgb_to_lab(sink.result()[9:].permute(0, 3, 1, 2)).mean((0, -2, -1))
    targets = [srgb_to_lab((image + 1) / 2).mean((-2, -1)) for image in inputs.start_images]
    assert (colours["multitalk"] - targets[0]).abs().max() < 3.0
    assert (colours["infinitetalk"] - targets[1]).abs().max() < 3.0
    assert (targets[0] - targets[1]).abs().max() > 10.0


def test_auto_follows_the_adapter_type_and_bad_modes_are_rejected():
    assert pipeline.check_loop_mode("auto", "InfiniteTalk") == "infinitetalk"
    assert pipeline.check_loop_mode("auto", "MultiTalk") == "multitalk"
    assert pipeline.check_loop_mode("multitalk", "InfiniteTalk") == "multitalk"
    assert pipeline.check_loop_mode("infinitetalk", "MultiTalk") == "infinitetalk"
    with pytest.raises(ValueError, match="auto needs"):
        pipeline.check_loop_mode("auto", "none")
    with pytest.raises(ValueError, match="unknown mode"):
        pipeline.check_loop_mode("longcat", "InfiniteTalk")
    with pytest.raises(ValueError, match="unknown mode"):
        pipeline.image_to_video_embeds(64, 64, 9, 5, None, mode="skyreels")


def test_loop_inputs_carry_the_resolved_variant():
    embeds = pipeline.image_to_video_embeds(48, 32, 9, 5, torch.rand(1, 32, 48, 3), clip_context=None, mode="auto")
    image_embeds = embeds.to_dict(vae=None)
    text = {"prompt_embeds": [torch.zeros(3, 8)], "negative_prompt_embeds": [torch.zeros(2, 8)]}
    audio = {"audio_features": [torch.zeros(20, 12, 768)]}
    assert pipeline.loop_inputs(image_embeds, text, audio).variant == "infinitetalk"
    assert pipeline.loop_inputs(image_embeds, text, audio, model_type="MultiTalk").variant == "multitalk"
    image_embeds["multitalk_mode"] = "multitalk"
    assert pipeline.loop_inputs(image_embeds, text, audio).variant == "multitalk"
    with pytest.raises(ValueError, match="unknown loop variant"):
        _check_inputs(LoopInputs(**{**pipeline.loop_inputs(image_embeds, text, audio).__dict__, "variant": "x"}), 8)
