"""InfiniteTalk text/audio classifier-free guidance and adaptive projected guidance (model-spec §4.5).

Passes (the caller maps them to model inputs): ``cond`` = prompt + audio, ``drop_text`` = negative prompt + audio,
``uncond`` = negative prompt + zero audio, ``drop_audio`` = prompt + zero audio. With text scale g_t and audio scale
g_a (``math.isclose(g, 1)`` counts as 1):

* g_t = 1, g_a = 1 → one pass, ``v = v_cond``;
* g_t = 1 → ``cond, drop_audio``: ``v = v_da + g_a (v_cond - v_da)``;
* g_a = 1 → ``cond, drop_text``: ``v = v_dt + g_t (v_cond - v_dt)`` (the official loop spends a third pass here whose
  term is multiplied by 1; the result is the same up to float rounding);
* otherwise → ``cond, drop_text, uncond``: ``v = v_u + g_t (v_cond - v_dt) + g_a (v_dt - v_u)``.

APG (arXiv:2410.02416): each difference goes through its own momentum buffer (``run = diff + momentum · run``), is
rescaled to an L2 norm (over the last 4 dims, [C, T, H, W]) of at most ``norm_threshold``, and only its part orthogonal
to ``v_cond`` is kept (projection in float64, plus ``eta`` × the parallel part); ``v = v_cond + (g_t - 1) APG(text)
+ (g_a - 1) APG(audio)``. The buffers live in a :class:`GuidanceState` made for one sampling run (one window).
All formulas are evaluated in the official order, so float32 results are bit-identical to the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..wanvideo.sampling import DenoiseFn

PASS_COND = "cond"
PASS_DROP_TEXT = "drop_text"
PASS_UNCOND = "uncond"
PASS_DROP_AUDIO = "drop_audio"
APG_DIMS = (-1, -2, -3, -4)

Scale = Union[float, Sequence[float]]
PredictFn = Callable[[torch.Tensor, torch.Tensor, Tuple[str, ...]], Sequence[torch.Tensor]]
"""``predict(x, timestep, passes) -> [v per pass]``: one DiT output per requested pass, in the order asked (the caller
may run them one by one or stacked in one batch — ``batched_cfg``)."""


@dataclass(frozen=True)
class APGConfig:
    """Adaptive projected guidance settings (InfiniteTalk's ``--use_apg`` defaults)."""

    momentum: float = -0.75
    norm_threshold: float = 55.0
    eta: float = 0.0


@dataclass(frozen=True)
class GuidanceConfig:
    """Text and audio guidance scales, each a float or a per-step list (indexed by the run's step index)."""

    text_scale: Scale = 5.0
    audio_scale: Scale = 4.0
    apg: Optional[APGConfig] = None

    def scales(self, step_index: int) -> Tuple[float, float]:
        """(g_t, g_a) for this step."""
        return _scale_at(self.text_scale, step_index, "cfg"), _scale_at(self.audio_scale, step_index, "audio_cfg")


def _scale_at(scale: Scale, step_index: int, what: str) -> float:
    if isinstance(scale, (int, float)):
        return float(scale)
    values = list(scale)
    if step_index >= len(values):
        raise ValueError(f"the {what} list has {len(values)} entries but step {step_index + 1} needs one; give one "
                         "value per sampling step (or a single number)")
    return float(values[step_index])


class MomentumBuffer:
    """APG running average ``run = update + momentum · run`` (starts at 0)."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running: Optional[torch.Tensor] = None

    def update(self, value: torch.Tensor) -> torch.Tensor:
        """Fold ``value`` in and return the new running value."""
        if self.running is None:
            self.running = value.clone()
        else:
            self.running = value + self.momentum * self.running
        return self.running


@dataclass
class GuidanceState:
    """Per-run guidance state: the two APG momentum buffers (text and audio differences)."""

    momentum: float = APGConfig.momentum
    text: MomentumBuffer = field(init=False)
    audio: MomentumBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.text = MomentumBuffer(self.momentum)
        self.audio = MomentumBuffer(self.momentum)


def guidance_passes(text_scale: float, audio_scale: float) -> Tuple[str, ...]:
    """The passes one step needs for these scales (see the module docstring)."""
    text_on, audio_on = not math.isclose(text_scale, 1.0), not math.isclose(audio_scale, 1.0)
    if text_on and audio_on:
        return PASS_COND, PASS_DROP_TEXT, PASS_UNCOND
    if text_on:
        return PASS_COND, PASS_DROP_TEXT
    if audio_on:
        return PASS_COND, PASS_DROP_AUDIO
    return (PASS_COND,)


def combine_cfg(preds: Mapping[str, torch.Tensor], text_scale: float, audio_scale: float) -> torch.Tensor:
    """Classifier-free guidance from the passes of :func:`guidance_passes` (official order of operations)."""
    passes = guidance_passes(text_scale, audio_scale)
    cond = preds[PASS_COND]
    if passes == (PASS_COND,):
        return cond
    if PASS_UNCOND in passes:
        drop_text, uncond = preds[PASS_DROP_TEXT], preds[PASS_UNCOND]
        return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
    if PASS_DROP_TEXT in passes:
        drop_text = preds[PASS_DROP_TEXT]
        return drop_text + text_scale * (cond - drop_text)
    drop_audio = preds[PASS_DROP_AUDIO]
    return drop_audio + audio_scale * (cond - drop_audio)


def _project(v0: torch.Tensor, v1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Parallel and orthogonal parts of v0 w.r.t. v1 over the last 4 dims, computed in float64, cast back."""
    dtype = v0.dtype
    v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=list(APG_DIMS))
    parallel = (v0 * v1).sum(dim=list(APG_DIMS), keepdim=True) * v1
    return parallel.to(dtype), (v0 - parallel).to(dtype)


def adaptive_projected_guidance(diff: torch.Tensor, pred_cond: torch.Tensor, buffer: Optional[MomentumBuffer],
                                apg: APGConfig) -> torch.Tensor:
    """APG update for one guidance difference; ``diff``/``pred_cond`` [..., C, T, H, W] float32, same shape."""
    if diff.ndim < len(APG_DIMS):
        raise ValueError(f"APG expects latents with at least 4 dims [C, T, H, W], got shape {tuple(diff.shape)}")
    if buffer is not None:
        diff = buffer.update(diff)
    if apg.norm_threshold > 0:
        ones = torch.ones_like(diff)
        diff_norm = diff.norm(p=2, dim=list(APG_DIMS), keepdim=True)
        diff = diff * torch.minimum(ones, apg.norm_threshold / diff_norm)
    parallel, orthogonal = _project(diff, pred_cond)
    return orthogonal + apg.eta * parallel


def combine_apg(preds: Mapping[str, torch.Tensor], text_scale: float, audio_scale: float, apg: APGConfig,
                state: GuidanceState) -> torch.Tensor:
    """APG guidance from the passes of :func:`guidance_passes`; updates ``state``'s momentum buffers."""
    passes = guidance_passes(text_scale, audio_scale)
    cond = preds[PASS_COND]
    if passes == (PASS_COND,):
        return cond
    if PASS_DROP_AUDIO in passes:
        diff = cond - preds[PASS_DROP_AUDIO]
        return cond + (audio_scale - 1) * adaptive_projected_guidance(diff, cond, state.audio, apg)
    drop_text = preds[PASS_DROP_TEXT]
    guided = cond + (text_scale - 1) * adaptive_projected_guidance(cond - drop_text, cond, state.text, apg)
    if PASS_UNCOND in passes:
        audio_diff = drop_text - preds[PASS_UNCOND]
        guided = guided + (audio_scale - 1) * adaptive_projected_guidance(audio_diff, cond, state.audio, apg)
    return guided


def make_guided_denoiser(predict: PredictFn, config: GuidanceConfig,
                         state: Optional[GuidanceState] = None) -> DenoiseFn:
    """A ``denoise_fn`` for :func:`wanvideo.sampling.sample`: asks ``predict`` for the passes this step needs and
    combines them. Give each sampling run (window) a fresh ``state`` (made here when None) so APG momentum does not
    leak between windows."""
    if state is None:
        state = GuidanceState(config.apg.momentum if config.apg is not None else APGConfig.momentum)

    def denoise(x: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        text_scale, audio_scale = config.scales(step_index)
        passes = guidance_passes(text_scale, audio_scale)
        outputs = predict(x, timestep, passes)
        if len(outputs) != len(passes):
            raise RuntimeError(f"predict returned {len(outputs)} outputs for the {len(passes)} passes {passes}")
        preds = dict(zip(passes, outputs))
        if config.apg is None:
            return combine_cfg(preds, text_scale, audio_scale)
        return combine_apg(preds, text_scale, audio_scale, config.apg, state)

    return denoise
