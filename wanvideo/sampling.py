"""The one denoising step loop of the pack.

``sample(denoise_fn, x, scheduler, callbacks)`` runs ``scheduler.num_steps`` steps: before every model call and after
every update an optional latent hook may rewrite ``x`` (InfiniteTalk pastes its clean motion latents there; MultiTalk
pastes re-noised ones; V2V blends a mask), after every step ``on_step`` gets the new latent and the x0 prediction
(progress bars, previews), and ``interrupted`` is polled before every step. Guidance (how many passes, how they are
combined) lives in the ``denoise_fn`` the caller builds (``multitalk.guidance``); the model knows nothing of steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedulers.sigmas import NUM_TRAIN_TIMESTEPS, FlowScheduler

PHASE_BEFORE_MODEL = "before_model"
PHASE_AFTER_STEP = "after_step"

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``denoise_fn(x, timestep, step_index) -> v``: x is the latent as the DiT receives it (layout of ``sample``'s x),
timestep a 0-d CPU tensor (``scheduler.timesteps[step_index]``), v the guided flow velocity with x's shape."""


class SamplingInterrupted(RuntimeError):
    """Raised by :func:`sample` when ``callbacks.interrupted()`` answers True (the user cancelled)."""


@dataclass(frozen=True)
class StepContext:
    """Where the latent handed to a hook lives: step index, phase, and its noise level (σ and t = DiT timestep).

    Phase ``before_model``: x is about to be denoised at ``timesteps[i]`` / ``sigmas[i]``. Phase ``after_step``: x was
    just moved to ``sigmas[i + 1]`` (timestep ``timesteps[i + 1]``, or 1000 · σ past the last step).
    """

    step_index: int
    num_steps: int
    phase: str
    timestep: torch.Tensor
    sigma: torch.Tensor


@dataclass(frozen=True)
class StepReport:
    """Given to ``on_step`` after step ``step_index``: the updated latent (after the hook) and the x0 prediction."""

    step_index: int
    num_steps: int
    latent: torch.Tensor
    denoised: torch.Tensor


@dataclass(frozen=True)
class SampleCallbacks:
    """Optional per-step callbacks. ``latent_hook(x, ctx) -> x`` may modify x in place or return a new tensor."""

    latent_hook: Optional[Callable[[torch.Tensor, StepContext], torch.Tensor]] = None
    on_step: Optional[Callable[[StepReport], None]] = None
    interrupted: Optional[Callable[[], bool]] = None


@dataclass(frozen=True)
class SampleResult:
    """``latent``: the final latent (after the last hook); ``denoised``: the x0 prediction of the last step."""

    latent: torch.Tensor
    denoised: torch.Tensor


def _context(scheduler: FlowScheduler, index: int, phase: str) -> StepContext:
    """StepContext for the latent at grid position ``index`` (0..N)."""
    sigma = scheduler.sigmas[index]
    if index < scheduler.num_steps:
        timestep = scheduler.timesteps[index]
    else:
        timestep = sigma * NUM_TRAIN_TIMESTEPS
    step = index if phase == PHASE_BEFORE_MODEL else index - 1
    return StepContext(step_index=step, num_steps=scheduler.num_steps, phase=phase, timestep=timestep, sigma=sigma)


def sample(denoise_fn: DenoiseFn, x: torch.Tensor, scheduler: FlowScheduler,
           callbacks: Optional[SampleCallbacks] = None) -> SampleResult:
    """Denoise ``x`` (any layout, e.g. [C, T, H, W] float32, at ``scheduler.sigmas[0]``) over the scheduler's grid.

    Per step i: hook(before_model) → ``v = denoise_fn(x, t_i, i)`` → ``x = scheduler.step(v, i, x)`` →
    hook(after_step) → on_step. Returns the final latent (x's dtype and device) and the last x0 prediction.
    """
    callbacks = callbacks or SampleCallbacks()
    hook = callbacks.latent_hook
    denoised = x
    for i in range(scheduler.num_steps):
        if callbacks.interrupted is not None and callbacks.interrupted():
            raise SamplingInterrupted(f"sampling interrupted before step {i + 1} of {scheduler.num_steps}")
        if hook is not None:
            x = hook(x, _context(scheduler, i, PHASE_BEFORE_MODEL))
        v = denoise_fn(x, scheduler.timesteps[i], i)
        if v.shape != x.shape:
            raise RuntimeError(f"denoise_fn returned shape {tuple(v.shape)} for a latent of shape {tuple(x.shape)}")
        v = v.to(x.dtype)
        if callbacks.on_step is not None or i == scheduler.num_steps - 1:
            denoised = scheduler.denoised(v, i, x)
        x = scheduler.step(v, i, x)
        if hook is not None:
            x = hook(x, _context(scheduler, i + 1, PHASE_AFTER_STEP))
        if callbacks.on_step is not None:
            callbacks.on_step(StepReport(step_index=i, num_steps=scheduler.num_steps, latent=x, denoised=denoised))
    return SampleResult(latent=x, denoised=denoised)
