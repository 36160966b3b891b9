"""The Multi/InfiniteTalk long-video loop: windows of F frames overlapping by M motion frames, each denoised with the
audio of its frames, decoded, colour-matched and streamed to a frame sink. Two variants (``LoopInputs.variant``).

InfiniteTalk variant, per window (workflow-spec §5.4, model-spec §4.4): fresh noise from the run's seeded CPU
generator; ``y`` = mask + VAE latent of [reference frame, zeros]; clean motion latents (the reference frame for the
first window, the last M decoded frames afterwards) pasted over the first latent frames before every model call and
after every update; a fresh scheduler; text/audio guidance; VAE decode; colour matching against the window's
reference frame; the frames not already emitted go to the sink. Only the motion frames survive a window (as a copy,
so the decoded window can be freed), so host RAM and VRAM stay flat over any video length.

MultiTalk variant (workflow-spec §5.5), otherwise the same: window 0 is conditioned on the first start image alone
and nothing is pasted over its latent; window k >= 1 takes ``y`` from the VAE latent of [the previous window's last
M frames, zeros] (mask 1 on latent frame 0 as above; the start image is not used again) and its first
``1 + (M-1)//4`` latent frames are the motion latents. Before the first step and after every step those frames of x
are set to ``(1 - t/1000) · motion + (t/1000) · ε`` (t: the timestep x is at, 0 after the last step; ε fresh from
the run's generator each time). Colour matching always targets the first start image.

Resume (``sink`` implementing :class:`~.frame_sink.ResumableSink`): before the first window the sink is given the
run's fingerprint and may hand back a :class:`~.resume.Checkpoint`; the loop then restores the motion frames and the
generator state and skips the finished windows, so the frames equal those of an uninterrupted run. After every
window the sink gets a new checkpoint.

Video-to-video (``LoopInputs.source``): window k starts from source latent frames ``[a, a + T)`` with
``a = k · ((F - M - 1) // 4 + 1)`` (last frame repeated past the end); with ``add_noise_to_samples`` (forced by
``denoise_strength < 1``) the start latent is ``noise · t0/1000 + (1 - t0/1000) · source`` (t0 = first timestep of
the window's sliced schedule), else the source itself. A ``noise_mask`` drives differential diffusion: after step i
of N (i < N - 1), latent cells whose mask value is ``<= i / N`` are reset to the source re-noised to the next noise
level, ``(1 - σ_{i+1}) · source + σ_{i+1} · noise`` (same noise as the start latent); cells above the threshold keep
the sampler's latent. Mask 1 = regenerate freely, 0 = keep the source, in between = follow the source for the first
``(1 - mask)`` share of the steps. The clean motion latents are pasted after the blend.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..wanvideo.model import pad_context
from ..wanvideo.sampling import PHASE_AFTER_STEP, PHASE_BEFORE_MODEL, SampleCallbacks, StepContext, StepReport, sample
from ..wanvideo.schedulers import SchedulerRequest, build_scheduler
from ..wanvideo.schedulers.sigmas import NUM_TRAIN_TIMESTEPS, FlowScheduler
from ..wanvideo.vae import WAN21_Z_DIM, WanVAE
from .colormatch import ColorMatch, match_colors
from .guidance import (PASS_COND, PASS_DROP_AUDIO, PASS_DROP_TEXT, PASS_UNCOND, GuidanceConfig,
                       make_guided_denoiser)
from .frame_sink import FrameSink, ResumableSink
from .resume import Checkpoint, run_fingerprint
from .windows import (Window, audio_windows, frames_before, noise_mask_window, plan_windows, source_latent_offset,
                      source_latent_window)

log = logging.getLogger(__name__)

MASK_CHANNELS = 4
MULTITALK = "multitalk"
INFINITETALK = "infinitetalk"
LOOP_VARIANTS = (MULTITALK, INFINITETALK)


@dataclass(frozen=True)
class SamplerSettings:
    """Scheduler and guidance of every window. ``cfg``/``audio_cfg`` are floats or per-step lists.

    ``denoise_strength`` < 1 starts every window at step ``steps - int(steps · strength) - 1`` (workflow-spec
    §2.19; not together with ``start_step``) and noises the V2V source; ``add_noise_to_samples`` noises it always.
    """

    scheduler: str = "multitalk"
    steps: int = 40
    shift: float = 7.0
    seed: int = 0
    start_step: int = 0
    end_step: int = -1
    cfg: float | Sequence[float] = 5.0
    audio_cfg: float | Sequence[float] = 4.0
    batched_cfg: bool = False
    denoise_strength: float = 1.0
    add_noise_to_samples: bool = False

    @property
    def noise_source(self) -> bool:
        """Whether V2V source latents are noised to the first timestep."""
        return self.add_noise_to_samples or self.denoise_strength < 1.0


@dataclass(frozen=True)
class SourceVideo:
    """Video-to-video source. latents: [16, T, H/8, W/8] float32 (WanVideoEncode of the source video, frame 0 alone
    then groups of 4). noise_mask: [F, H', W'] float in [0, 1] per video frame (1 = regenerate), or None."""

    latents: torch.Tensor
    noise_mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LoopInputs:
    """Everything one run needs; tensors on the CPU unless noted.

    start_images: [N, 3, H, W] in [-1, 1] (window k uses image min(k, N-1)); H, W multiples of 16.
    audio_features: per speaker [T, L, C] wav2vec2 features, one row per video frame.
    prompts: per-window positive text embeddings [L_i, text_dim] (window k uses min(k, n-1)); negative: [L, text_dim].
    clip_context: [1, 257, 1280] CLIP tokens of the reference image, or None.
    ref_target_masks: [3, H, W] speaker / speaker / background masks (needed for two speakers), or None.
    colormatch: colour matching of each window to its reference frame (disabled by default).
    source: video-to-video source latents (and noise mask), or None for image-to-video.
    variant: ``infinitetalk`` or ``multitalk`` (see the module docstring).
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
    colormatch: ColorMatch = ColorMatch()
    source: Optional[SourceVideo] = None
    variant: str = INFINITETALK


@dataclass
class LoopCallbacks:
    """Progress (window index, step index, steps per window, windows), cancellation, and latent previews
    ``on_preview(window index, step index, x0)`` with the step's x0 prediction [16, T_lat, h, w] float32 on the
    loop's device (motion latent frames included). ``before_model(step index)`` runs before every model call
    (e.g. per-step LoRA strengths)."""

    on_step: Optional[Callable[[int, int, int, int], None]] = None
    interrupted: Optional[Callable[[], bool]] = None
    on_preview: Optional[Callable[[int, int, torch.Tensor], None]] = None
    before_model: Optional[Callable[[int], None]] = None


@dataclass
class _WindowState:
    motion_pixels: torch.Tensor
    generator: torch.Generator
    conditioning: Optional[tuple[tuple[int, int], torch.Tensor]] = None


@dataclass(frozen=True)
class _Source:
    """One window's V2V source on the device: latents and noise [16, T, h, w], mask [1, T, h, w] or None."""

    latents: torch.Tensor
    noise: torch.Tensor
    mask: Optional[torch.Tensor]


def add_noise_to_samples(noise: torch.Tensor, source: torch.Tensor, timestep: float) -> torch.Tensor:
    """V2V start latent ``noise · t/1000 + (1 - t/1000) · source`` (t: DiT timestep in [0, 1000])."""
    fraction = float(timestep) / NUM_TRAIN_TIMESTEPS
    return noise * fraction + (1.0 - fraction) * source


def differential_blend(x: torch.Tensor, source: _Source, ctx: StepContext) -> torch.Tensor:
    """Differential diffusion after step ``ctx.step_index`` (see the module docstring); x [16, T, h, w]."""
    if source.mask is None or ctx.step_index >= ctx.num_steps - 1:
        return x
    keep_generated = source.mask > ctx.step_index / ctx.num_steps
    sigma = float(ctx.sigma)
    renoised = (1.0 - sigma) * source.latents + sigma * source.noise
    return torch.where(keep_generated, x, renoised)


def _check_source(source: SourceVideo, height: int, width: int, vae_stride: int) -> None:
    latents = source.latents
    grid = (height // vae_stride, width // vae_stride)
    if latents.dim() != 4 or latents.shape[0] != WAN21_Z_DIM or tuple(latents.shape[2:]) != grid:
        raise ValueError(f"V2V source latents must be [{WAN21_Z_DIM}, T, {grid[0]}, {grid[1]}] for {width}x{height} "
                         f"frames, got {tuple(latents.shape)}; resize the source video to the WanVideo Long I2V "
                         "node's width/height before WanVideo Encode")
    if source.noise_mask is not None and source.noise_mask.dim() != 3:
        raise ValueError(f"noise_mask must be [frames, height, width], got {tuple(source.noise_mask.shape)}")


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
    if inputs.source is not None:
        _check_source(inputs.source, height, width, vae_stride)
    if inputs.variant not in LOOP_VARIANTS:
        raise ValueError(f"unknown loop variant {inputs.variant!r}; choose one of {', '.join(LOOP_VARIANTS)}")


@dataclass(frozen=True)
class _Conditioning:
    """One window's image conditioning on the device: y [20, T, h, w]; motion latents [16, T_m, h, w] written over
    x's first latent frames (None: nothing is written); ``renoise``: MultiTalk writes them re-noised to x's timestep
    instead of clean; reference: the colour-match target [3, H, W] in [-1, 1] (CPU)."""

    y: torch.Tensor
    motion: Optional[torch.Tensor]
    renoise: bool
    reference: torch.Tensor


def _motion_writer(cond: _Conditioning, generator: torch.Generator
                   ) -> Optional[Callable[[torch.Tensor, StepContext], None]]:
    """What the latent hook does to x [16, T, h, w] in place: paste the clean motion latents before every model call
    and after every update (InfiniteTalk), or write them re-noised before the first step and after every step
    (MultiTalk, fresh noise from ``generator`` each time)."""
    motion = cond.motion
    if motion is None:
        return None
    frames = motion.shape[1]
    if not cond.renoise:
        def paste(x: torch.Tensor, ctx: StepContext) -> None:
            x[:, :frames] = motion
        return paste

    def renoise(x: torch.Tensor, ctx: StepContext) -> None:
        if ctx.phase == PHASE_BEFORE_MODEL and ctx.step_index > 0:
            return
        noise = torch.randn(motion.shape, generator=generator).to(x.device)
        x[:, :frames] = add_noise_to_samples(noise, motion, ctx.timestep)
    return renoise


def _check_checkpoint(checkpoint: Checkpoint, plan: list[Window], inputs: LoopInputs) -> None:
    """The checkpoint fits the plan (its motion frames matter only if a window is left to run)."""
    _, channels, height, width = inputs.start_images.shape
    shape = (inputs.motion_frame, channels, height, width)
    if not (1 <= checkpoint.next_window <= len(plan)
            and checkpoint.frames_written == frames_before(plan, checkpoint.next_window)
            and (checkpoint.next_window == len(plan) or tuple(checkpoint.motion_pixels.shape) == shape)):
        raise RuntimeError(f"the resume checkpoint (window {checkpoint.next_window}, {checkpoint.frames_written} "
                           f"frames, motion {tuple(checkpoint.motion_pixels.shape)}) does not fit this run's "
                           f"{len(plan)} windows; delete its run folder under output_path to start over")


class InfiniteTalkLoop:
    """Runs the windows of one video (either variant). ``model`` and ``vae`` are already on ``device``."""

    def __init__(self, model: torch.nn.Module, vae: WanVAE, settings: SamplerSettings, device: torch.device):
        self.model = model
        self.vae = vae
        self.settings = settings
        self.device = torch.device(device)

    @torch.no_grad()
    def run(self, inputs: LoopInputs, sink: FrameSink, callbacks: Optional[LoopCallbacks] = None) -> list[Window]:
        """Generate ``inputs.total_frames`` frames into ``sink`` (continuing a checkpointed run if a resumable sink
        has one); returns the window plan."""
        _check_inputs(inputs, self.vae.config.spatial_stride)
        callbacks = callbacks or LoopCallbacks()
        plan = plan_windows(inputs.total_frames, inputs.frame_window_size, inputs.motion_frame)
        state = _WindowState(motion_pixels=inputs.start_images[:1],
                             generator=torch.Generator("cpu").manual_seed(self.settings.seed))
        resumable = isinstance(sink, ResumableSink)
        first = self._resume(inputs, plan, state, sink, callbacks) if resumable else 0
        for window in plan[first:]:
            frames = self._window(inputs, window, state, callbacks, len(plan))
            end = window.emit_from + window.emit_count
            sink.write(((frames[window.emit_from:end] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu())
            state.motion_pixels = frames[end - inputs.motion_frame:end].clone()
            del frames
            if resumable:
                done = window.index + 1
                sink.commit(Checkpoint(next_window=done, frames_written=frames_before(plan, done),
                                       motion_pixels=state.motion_pixels, rng_state=state.generator.get_state()))
        return plan

    def _resume(self, inputs: LoopInputs, plan: list[Window], state: _WindowState, sink: ResumableSink,
                callbacks: LoopCallbacks) -> int:
        """Let the sink pick the run folder; restore a checkpoint's state. Returns the first window to run."""
        def fingerprint() -> dict:
            if callbacks.before_model is not None:
                callbacks.before_model(0)  # per-step LoRA weights as at step 0, as on a freshly loaded model
            return run_fingerprint(inputs, self.settings, self.model, self.vae)

        checkpoint = sink.open_run(inputs.variant, fingerprint)
        if checkpoint is None:
            return 0
        _check_checkpoint(checkpoint, plan, inputs)
        if checkpoint.next_window == len(plan):
            log.info("all %d windows of this run are already written; nothing to do", len(plan))
            return checkpoint.next_window
        state.motion_pixels = checkpoint.motion_pixels.float()
        state.generator.set_state(checkpoint.rng_state)
        log.info("resuming at window %d of %d (%d frames already written)", checkpoint.next_window + 1, len(plan),
                 checkpoint.frames_written)
        return checkpoint.next_window

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> latents [16, 1 + (F-1)//4, H/8, W/8] float32 on the device."""
        return self.vae.encode(pixels.to(self.device).permute(1, 0, 2, 3)[None])[0]

    def _conditioning(self, lead: torch.Tensor, num_frames: int) -> torch.Tensor:
        """y [20, T_lat, h, w]: mask (1 on latent frame 0) + latents of [lead frames [n, 3, H, W], zero frames up to
        ``num_frames``]."""
        clip = torch.cat([lead, lead.new_zeros(num_frames - lead.shape[0], *lead.shape[1:])])
        latents = self._encode(clip)
        mask = torch.zeros(MASK_CHANNELS, *latents.shape[1:], device=self.device)
        mask[:, 0] = 1.0
        return torch.cat([mask, latents])

    def _image_conditioning(self, state: _WindowState, image_index: int, image: torch.Tensor, window: Window
                            ) -> torch.Tensor:
        """y of [start image, zeros], encoded once per (image, window length)."""
        key = (image_index, window.num_frames)
        if state.conditioning is None or state.conditioning[0] != key:
            state.conditioning = (key, self._conditioning(image[None], window.num_frames))
        return state.conditioning[1]

    def _window_conditioning(self, inputs: LoopInputs, window: Window, state: _WindowState) -> _Conditioning:
        if inputs.variant == MULTITALK:
            first = inputs.start_images[0]
            if window.index == 0:
                return _Conditioning(self._image_conditioning(state, 0, first, window), None, False, first)
            y = self._conditioning(state.motion_pixels, window.num_frames)
            return _Conditioning(y, y[MASK_CHANNELS:, :window.motion_latent_frames], True, first)
        index = min(window.index, inputs.start_images.shape[0] - 1)
        reference = inputs.start_images[index]
        y = self._image_conditioning(state, index, reference, window)
        motion_source = state.motion_pixels if window.index else reference[None]
        motion = self._encode(motion_source)[:, :window.motion_latent_frames]
        return _Conditioning(y, motion, False, reference)

    def _scheduler(self, generator: torch.Generator) -> FlowScheduler:
        s = self.settings
        return build_scheduler(SchedulerRequest(name=s.scheduler, steps=s.steps, shift=s.shift, start_step=s.start_step,
                                                end_step=s.end_step, denoise_strength=s.denoise_strength), generator)

    def _source(self, inputs: LoopInputs, window: Window, noise: torch.Tensor) -> Optional[_Source]:
        """The window's V2V source latents, noise and mask on the device (None without a source)."""
        if inputs.source is None:
            return None
        offset = source_latent_offset(window.index, inputs.frame_window_size, inputs.motion_frame)
        latents = source_latent_window(inputs.source.latents, offset, window.latent_frames).float()
        mask = None
        if inputs.source.noise_mask is not None:
            mask = noise_mask_window(inputs.source.noise_mask, window.start, window.num_frames,
                                     tuple(latents.shape[1:])).to(self.device)
        return _Source(latents=latents.to(self.device), noise=noise, mask=mask)

    def _start_latent(self, noise: torch.Tensor, source: Optional[_Source], scheduler: FlowScheduler) -> torch.Tensor:
        if source is None:
            return noise
        if self.settings.noise_source:
            return add_noise_to_samples(noise, source.latents, scheduler.timesteps[0])
        return source.latents.clone()

    def _window(self, inputs: LoopInputs, window: Window, state: _WindowState, callbacks: LoopCallbacks,
                windows: int) -> torch.Tensor:
        """Denoise, decode and colour-match one window; returns its frames [F, 3, H, W] in [-1, 1] on the CPU."""
        cond = self._window_conditioning(inputs, window, state)
        y = cond.y
        noise = torch.randn(y.shape[0] - MASK_CHANNELS, *y.shape[1:], generator=state.generator).to(self.device)
        scheduler = self._scheduler(state.generator)
        source = self._source(inputs, window, noise)
        guidance = GuidanceConfig(text_scale=self.settings.cfg, audio_scale=self.settings.audio_cfg)
        denoise = make_guided_denoiser(_Predictor(self, inputs, window, y), guidance)
        write_motion = _motion_writer(cond, state.generator)

        def latent_hook(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            if source is not None and ctx.phase == PHASE_AFTER_STEP:
                x = differential_blend(x, source, ctx)
            if callbacks.before_model is not None and ctx.phase == PHASE_BEFORE_MODEL:
                callbacks.before_model(ctx.step_index)
            if write_motion is not None:
                write_motion(x, ctx)
            return x

        result = sample(denoise, self._start_latent(noise, source, scheduler), scheduler,
                        _sample_callbacks(callbacks, latent_hook, window.index, windows))
        frames = self.vae.decode(result.latent[None])[0].permute(1, 0, 2, 3)
        return match_colors(frames, cond.reference, inputs.colormatch).cpu()


def _sample_callbacks(callbacks: LoopCallbacks, hook: Callable[[torch.Tensor, StepContext], torch.Tensor],
                      window_index: int, windows: int) -> SampleCallbacks:
    """The step loop's callbacks for one window (no per-step report unless progress or previews are wanted)."""
    if callbacks.on_step is None and callbacks.on_preview is None:
        return SampleCallbacks(latent_hook=hook, interrupted=callbacks.interrupted)

    def report(step: StepReport) -> None:
        if callbacks.on_step is not None:
            callbacks.on_step(window_index, step.step_index, step.num_steps, windows)
        if callbacks.on_preview is not None:
            callbacks.on_preview(window_index, step.step_index, step.denoised)

    return SampleCallbacks(latent_hook=hook, on_step=report, interrupted=callbacks.interrupted)


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
