"""The InfiniteTalk long-video loop: windows of F frames overlapping by M motion frames, each denoised with the
audio of its frames and conditioned on the reference image, decoded and streamed to a frame sink.

Per window (workflow-spec §5.4, model-spec §4.4): fresh noise from the run's seeded CPU generator; ``y`` = mask +
VAE latent of [reference frame, zeros]; clean motion latents (the reference frame for the first window, the last M
decoded frames afterwards) pasted over the first latent frames before every model call and after every update; a
fresh scheduler; text/audio guidance; VAE decode; the frames not already emitted go to the sink. Only the motion
frames survive a window, so host RAM and VRAM stay flat over any video length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..wanvideo.model import pad_context
from ..wanvideo.sampling import SampleCallbacks, StepContext, StepReport, sample
from ..wanvideo.schedulers import SchedulerRequest, build_scheduler
from ..wanvideo.vae import WanVAE
from .guidance import (PASS_COND, PASS_DROP_AUDIO, PASS_DROP_TEXT, PASS_UNCOND, GuidanceConfig,
                       make_guided_denoiser)
from .frame_sink import FrameSink
from .windows import Window, audio_windows, plan_windows

MASK_CHANNELS = 4


@dataclass(frozen=True)
class SamplerSettings:
    """Scheduler and guidance of every window. ``cfg``/``audio_cfg`` are floats or per-step lists."""

    scheduler: str = "multitalk"
    steps: int = 40
    shift: float = 7.0
    seed: int = 0
    start_step: int = 0
    end_step: int = -1
    cfg: float | Sequence[float] = 5.0
    audio_cfg: float | Sequence[float] = 4.0
    batched_cfg: bool = False


@dataclass(frozen=True)
class LoopInputs:
    """Everything one run needs; tensors on the CPU unless noted.

    start_images: [N, 3, H, W] in [-1, 1] (window k uses image min(k, N-1)); H, W multiples of 16.
    audio_features: per speaker [T, L, C] wav2vec2 features, one row per video frame.
    prompts: per-window positive text embeddings [L_i, text_dim] (window k uses min(k, n-1)); negative: [L, text_dim].
    clip_context: [1, 257, 1280] CLIP tokens of the reference image, or None.
    ref_target_masks: [3, H, W] speaker / speaker / background masks (needed for two speakers), or None.
    """

    start_images: torch.Tensor
    audio_features: Sequence[torch.Tensor]
    prompts: Sequence[torch.Tensor]
    negative: torch.Tensor
    total_frames: int
    frame_window_size: int = 81
    motion_frame: int = 9
    clip_context: Optional[torch.Tensor] = None
    ref_target_masks: Optional[torch.Tensor] = None
    audio_scale: float = 1.0


@dataclass
class LoopCallbacks:
    """Progress (window index, step index, steps per window, windows) and cancellation."""

    on_step: Optional[Callable[[int, int, int, int], None]] = None
    interrupted: Optional[Callable[[], bool]] = None


@dataclass
class _WindowState:
    motion_pixels: torch.Tensor
    generator: torch.Generator


def _check_inputs(inputs: LoopInputs, vae_stride: int) -> None:
    _, channels, height, width = inputs.start_images.shape
    if channels != 3 or height % 16 or width % 16:
        raise ValueError(f"the start image must be RGB with width and height divisible by 16, got {width}x{height}; "
                         "resize it (e.g. to 832x480) before the InfiniteTalk node")
    if not inputs.audio_features:
        raise ValueError("no audio features: connect MultiTalkWav2VecEmbeds to the sampler")
    if len(inputs.audio_features) > 1 and inputs.ref_target_masks is None:
        raise ValueError("two speakers need ref_target_masks [3, H, W]; none were given")
    if height % (2 * vae_stride) or width % (2 * vae_stride):
        raise ValueError(f"frame size {width}x{height} does not fit the VAE stride {vae_stride} and patch size 2")


class InfiniteTalkLoop:
    """Runs the windows of one video. ``model`` and ``vae`` are already on ``device``."""

    def __init__(self, model: torch.nn.Module, vae: WanVAE, settings: SamplerSettings, device: torch.device):
        self.model = model
        self.vae = vae
        self.settings = settings
        self.device = torch.device(device)

    def run(self, inputs: LoopInputs, sink: FrameSink, callbacks: Optional[LoopCallbacks] = None) -> list[Window]:
        """Generate ``inputs.total_frames`` frames into ``sink``; returns the window plan that was run."""
        _check_inputs(inputs, self.vae.config.spatial_stride)
        callbacks = callbacks or LoopCallbacks()
        plan = plan_windows(inputs.total_frames, inputs.frame_window_size, inputs.motion_frame)
        state = _WindowState(motion_pixels=inputs.start_images[:1],
                             generator=torch.Generator("cpu").manual_seed(self.settings.seed))
        for window in plan:
            frames = self._window(inputs, window, state, callbacks, len(plan))
            sink.write(((frames[window.emit_from:window.emit_from + window.emit_count] + 1) / 2).clamp(0, 1)
                       .permute(0, 2, 3, 1).cpu())
            state.motion_pixels = frames[window.emit_from + window.emit_count - inputs.motion_frame:
                                         window.emit_from + window.emit_count]
        return plan

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> latents [16, 1 + (F-1)//4, H/8, W/8] float32 on the device."""
        return self.vae.encode(pixels.to(self.device).permute(1, 0, 2, 3)[None])[0]

    def _conditioning(self, reference: torch.Tensor, window: Window) -> torch.Tensor:
        """y [20, T_lat, h, w]: mask (1 on latent frame 0) + latents of [reference, F-1 zero frames]."""
        clip = torch.cat([reference[None], reference.new_zeros(window.num_frames - 1, *reference.shape)])
        latents = self._encode(clip)
        mask = torch.zeros(MASK_CHANNELS, *latents.shape[1:], device=self.device)
        mask[:, 0] = 1.0
        return torch.cat([mask, latents])

    def _window(self, inputs: LoopInputs, window: Window, state: _WindowState, callbacks: LoopCallbacks,
                windows: int) -> torch.Tensor:
        """Denoise and decode one window; returns its frames [F, 3, H, W] in [-1, 1] on the CPU."""
        reference = inputs.start_images[min(window.index, inputs.start_images.shape[0] - 1)]
        y = self._conditioning(reference, window)
        motion_source = state.motion_pixels if window.index else reference[None]
        motion = self._encode(motion_source)[:, :window.motion_latent_frames]
        noise = torch.randn(y.shape[0] - MASK_CHANNELS, *y.shape[1:], generator=state.generator)
        scheduler = build_scheduler(SchedulerRequest(
            name=self.settings.scheduler, steps=self.settings.steps, shift=self.settings.shift,
            start_step=self.settings.start_step, end_step=self.settings.end_step), state.generator)
        predict = _Predictor(self, inputs, window, y)
        guidance = GuidanceConfig(text_scale=self.settings.cfg, audio_scale=self.settings.audio_cfg)
        denoise = make_guided_denoiser(predict, guidance)

        def paste_motion(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            x[:, :motion.shape[1]] = motion
            return x

        def report(step: StepReport) -> None:
            if callbacks.on_step is not None:
                callbacks.on_step(window.index, step.step_index, step.num_steps, windows)

        result = sample(denoise, noise.to(self.device), scheduler,
                        SampleCallbacks(latent_hook=paste_motion, on_step=report, interrupted=callbacks.interrupted))
        return self.vae.decode(result.latent[None])[0].permute(1, 0, 2, 3).cpu()


class _Predictor:
    """The guidance passes of one window, mapped to DiT inputs (run one by one, or stacked with batched_cfg)."""

    def __init__(self, loop: InfiniteTalkLoop, inputs: LoopInputs, window: Window, y: torch.Tensor):
        device, text_len = loop.device, loop.model.config.text_len
        prompt = inputs.prompts[min(window.index, len(inputs.prompts) - 1)]
        self.model, self.batched = loop.model, loop.settings.batched_cfg
        self.text = {"pos": pad_context([prompt], text_len).to(device),
                     "neg": pad_context([inputs.negative], text_len).to(device)}
        speakers = torch.stack([audio_windows(f, window.start, window.num_frames) for f in inputs.audio_features])
        self.audio = {"on": speakers[None].to(device), "off": torch.zeros_like(speakers[-1:])[None].to(device)}
        self.y = y[None]
        self.clip = None if inputs.clip_context is None else inputs.clip_context.to(device)
        self.masks = None if inputs.ref_target_masks is None else inputs.ref_target_masks.to(device)
        self.audio_scale = inputs.audio_scale

    PASSES = {PASS_COND: ("pos", "on"), PASS_DROP_TEXT: ("neg", "on"), PASS_UNCOND: ("neg", "off"),
              PASS_DROP_AUDIO: ("pos", "off")}

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, passes: Sequence[str]) -> list[torch.Tensor]:
        groups: dict[str, list[str]] = {}
        for name in passes:
            key = self.PASSES[name][1] if self.batched else name
            groups.setdefault(key, []).append(name)
        outputs: dict[str, torch.Tensor] = {}
        for names in groups.values():
            text = torch.cat([self.text[self.PASSES[n][0]] for n in names])
            audio = self.audio[self.PASSES[names[0]][1]].expand(len(names), -1, -1, -1, -1, -1)
            batch = len(names)
            t = timestep.reshape(1).float().to(x.device).expand(batch)
            out = self.model(x[None].expand(batch, *x.shape), t, text, clip_fea=self.clip,
                             y=self.y.expand(batch, *self.y.shape[1:]), audio=audio,
                             ref_target_masks=self.masks if audio.shape[1] > 1 else None,
                             audio_scale=self.audio_scale)
            outputs.update(zip(names, out))
        return [outputs[name] for name in passes]
