"""Resuming an interrupted long run from its output folder (tiny real models, real PNG files on disk).

An interrupted-then-resumed run gives bit-identical frames to a straight run (both loop variants, also with freshly
reloaded models, leftovers of the unfinished window removed); a finished run is reused; any change of the inputs or
settings starts a fresh run folder and the log names what changed; checkpoints round-trip exactly and are written
atomically; the weight digest sees weight, dtype and LoRA schedule changes.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from infinitetalk.multitalk.frame_sink import PngSink
from infinitetalk.multitalk.loop import InfiniteTalkLoop, LoopCallbacks, LoopInputs, SamplerSettings
from infinitetalk.multitalk.model import load_infinitetalk
from infinitetalk.multitalk.resume import (CHECKPOINT_FILE, RUN_FILE, Checkpoint, atomic_write, load_checkpoint,
                                           module_digest, save_checkpoint)
from infinitetalk.wanvideo.checkpoint import LoadOptions
from infinitetalk.wanvideo.lora import LoraAdapter, LoraPatch
from infinitetalk.wanvideo.sampling import SamplingInterrupted
from infinitetalk.wanvideo.vae import load_vae

HEIGHT, WIDTH = 32, 48
TOTAL = 17  # windows of 9 frames overlapping by 5: 9 + 4 + 4 frames

pytestmark = pytest.mark.usefixtures("one_thread")



def _load(loop_model_files):
    folder, text_len = loop_model_files
    model = load_infinitetalk(folder / "infinitetalk.safetensors", None, LoadOptions(dtype=torch.float32,
                                                                                     text_len=text_len))
    return model, load_vae(folder / "vae.safetensors", "fp32")


@pytest.fixture(scope="module")
def models(loop_model_files):
    return _load(loop_model_files)


def _inputs(model, variant: str, total: int = TOTAL) -> LoopInputs:
    gen = torch.Generator().manual_seed(11)
    acfg, text_dim = model.config.audio, model.config.text_dim
    return LoopInputs(start_images=torch.rand(1, 3, HEIGHT, WIDTH, generator=gen) * 2 - 1,
                      audio_features=[torch.randn(total + 3, acfg.audio_blocks, acfg.audio_channels, generator=gen)],
                      prompts=[torch.randn(5, text_dim, generator=gen)],
                      negative=torch.randn(4, text_dim, generator=gen),
                      total_frames=total, frame_window_size=9, motion_frame=5,
                      clip_context=torch.randn(1, 257, 1280, generator=gen), variant=variant)


def _run(models, inputs, settings, root: Path, callbacks=None) -> PngSink:
    sink = PngSink(root)
    InfiniteTalkLoop(models[0], models[1], settings, torch.device("cpu")).run(inputs, sink, callbacks)
    return sink


def _frames(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("frame_*.png"))}


def _motion(folder: Path) -> torch.Tensor:
    with safe_open(str(folder / CHECKPOINT_FILE), "pt") as handle:
        return handle.get_tensor("motion_pixels")


def _stop_at_poll(n: int):
    """``interrupted`` callback that cancels at the n-th poll (one poll before every step)."""
    counter = itertools.count()
    return lambda: next(counter) >= n


@pytest.mark.parametrize("variant, scheduler", [("infinitetalk", "multitalk"), ("multitalk", "dpm++_sde")])
def test_interrupted_then_resumed_run_equals_a_straight_run(models, loop_model_files, tmp_path, variant, scheduler):
    settings = SamplerSettings(scheduler=scheduler, steps=2, shift=5.0, seed=5, cfg=1.0, audio_cfg=1.0)
    inputs = _inputs(models[0], variant)
    straight = _run(models, inputs, settings, tmp_path / "straight")
    assert len(_frames(straight.folder)) == TOTAL

    root = tmp_path / "resumed"
    with pytest.raises(SamplingInterrupted):  # cancelled at the first step of window 3 (2 steps per window)
        _run(models, inputs, settings, root, LoopCallbacks(interrupted=_stop_at_poll(4)))
    (folder,) = root.iterdir()
    assert folder.name.endswith(f"_{variant}_output") and len(_frames(folder)) == 13
    (folder / "frame_00013.png").write_bytes(b"half a frame")  # what a crash inside window 3 may leave
    (folder / (CHECKPOINT_FILE + ".tmp")).write_bytes(b"half a checkpoint")

    ran = []
    fresh_models = _load(loop_model_files)  # as after a crash: the same files loaded again
    resumed = _run(fresh_models, inputs, settings, root,
                   LoopCallbacks(on_step=lambda window, step, steps, windows: ran.append((window, step))))
    assert resumed.folder == folder and ran == [(2, 0), (2, 1)]
    assert _frames(folder) == _frames(straight.folder)
    assert torch.equal(_motion(folder), _motion(straight.folder))
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png") == sorted([RUN_FILE, CHECKPOINT_FILE])


def test_changed_inputs_start_a_fresh_folder_and_a_finished_run_is_reused(models, tmp_path, caplog):
    settings = SamplerSettings(scheduler="euler", steps=1, shift=5.0, seed=1, cfg=1.0, audio_cfg=1.0)
    inputs = _inputs(models[0], "infinitetalk", total=13)
    root = tmp_path / "out"
    first = _run(models, inputs, settings, root)
    frames = _frames(first.folder)

    ran = []
    again = _run(models, inputs, settings, root, LoopCallbacks(on_step=lambda *step: ran.append(step)))
    assert again.folder == first.folder and ran == [] and _frames(first.folder) == frames

    other_audio = [inputs.audio_features[0] + 0.5]
    changes = {"seed": (inputs, SamplerSettings(**{**settings.__dict__, "seed": 2})),
               "audio_features": (LoopInputs(**{**inputs.__dict__, "audio_features": other_audio}), settings),
               "variant": (LoopInputs(**{**inputs.__dict__, "variant": "multitalk"}), settings)}
    folders = {first.folder}
    for name, (changed_inputs, changed_settings) in changes.items():
        with caplog.at_level(logging.INFO, logger="infinitetalk.multitalk.resume"):
            caplog.clear()
            sink = _run(models, changed_inputs, changed_settings, root)
        assert sink.folder not in folders and len(_frames(sink.folder)) == 13
        assert name in caplog.text and "starting a fresh run folder" in caplog.text
        folders.add(sink.folder)
    assert sink.folder.name.endswith("_multitalk_output")
    assert _frames(first.folder) == frames  # the old run was not touched
    assert set(root.iterdir()) == folders


def test_a_run_with_missing_frames_is_not_resumed(models, tmp_path):
    settings = SamplerSettings(scheduler="euler", steps=1, shift=5.0, seed=1, cfg=1.0, audio_cfg=1.0)
    inputs = _inputs(models[0], "multitalk", total=9)
    root = tmp_path / "out"
    first = _run(models, inputs, settings, root)
    (first.folder / "frame_00003.png").unlink()
    second = _run(models, inputs, settings, root)
    assert second.folder != first.folder and len(_frames(second.folder)) == 9


def test_a_finished_run_shorter_than_the_motion_frames_is_reused(models, tmp_path):
    settings = SamplerSettings(scheduler="euler", steps=1, shift=5.0, seed=1, cfg=1.0, audio_cfg=1.0)
    inputs = _inputs(models[0], "infinitetalk", total=3)  # one window, fewer frames than motion_frame (5)
    first = _run(models, inputs, settings, tmp_path)
    again = _run(models, inputs, settings, tmp_path)
    assert again.folder == first.folder and len(_frames(first.folder)) == 3


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.randn(7, generator=generator)
    motion = torch.randn(3, 5, 2, 4, generator=generator).permute(1, 0, 2, 3)  # not contiguous, like decoded frames
    checkpoint = Checkpoint(next_window=2, frames_written=13, motion_pixels=motion, rng_state=generator.get_state())
    save_checkpoint(tmp_path, checkpoint, "abc")
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    loaded = load_checkpoint(tmp_path, "abc")
    assert (loaded.next_window, loaded.frames_written) == (2, 13) and torch.equal(loaded.motion_pixels, motion)
    restored = torch.Generator().manual_seed(0)
    restored.set_state(loaded.rng_state)
    assert torch.equal(torch.randn(4, generator=restored), torch.randn(4, generator=generator))
    with pytest.raises(RuntimeError, match="another run"):
        load_checkpoint(tmp_path, "other")
    assert load_checkpoint(tmp_path / "missing", "abc") is None

    atomic_write(tmp_path / "x.json", b"old")
    atomic_write(tmp_path / "x.json", b"new")
    assert (tmp_path / "x.json").read_bytes() == b"new" and not list(tmp_path.glob("*.tmp"))


def test_weight_digest_sees_weights_dtype_and_lora_schedules():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8))
    same = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8))
    same.load_state_dict(net.state_dict())
    base = module_digest(net)
    assert module_digest(same) == base
    with torch.no_grad():
        same[0].weight.mul_(1.001)
    assert module_digest(same) != base
    assert module_digest(torch.nn.Sequential(*net).to(torch.float64)) != base

    lora = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8))
    lora.load_state_dict(net.state_dict())
    patch = LoraPatch("0.weight", up=torch.ones(8, 2), down=torch.ones(2, 6), alpha_scale=0.5)
    lora[0].add_module("lora_0", LoraAdapter(patch, (1.0, 0.5), lora[0].weight))
    with_lora = module_digest(lora)
    assert with_lora != base
    lora[0].lora_0.schedule = (1.0, 0.25)
    assert module_digest(lora) != with_lora
