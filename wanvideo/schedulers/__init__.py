"""Scheduler registry: the sampler's 21 ``scheduler`` choice strings (workflow-spec §4.6, upstream order) → factory.

``make_scheduler(name, steps, shift, ...)`` (or ``build_scheduler(SchedulerRequest(...), generator)``) returns a fresh
:class:`~.sigmas.FlowScheduler` with ``.timesteps`` [N] (what the DiT receives), ``.sigmas`` [N+1] float32 and
``.step(model_output, step_index, x)``. Build one per run/window; it holds the multistep history of that run only.
Names that this version does not implement raise :class:`SchedulerUnavailableError` naming the available ones.

Grids (see :mod:`.sigmas`): ``unipc*`` and ``dpm++*`` use Wan2.1's official grids (UniPC σ_max 0.999, DPM++
``get_sampling_sigmas`` σ_max 1; ComfyUI-WanVideoWrapper differs only by also shifting σ_max, see
:func:`.sigmas.training_sigma_max`); ``euler*`` / ``lcm*`` diffusers' FlowMatchEuler grid; ``res_multistep`` /
``er_sde`` 1000-entry DiffSynth-style picks; ``flowmatch_causvid`` / ``flowmatch_distill`` / ``longcat_distill_euler``
fixed lists; ``multitalk`` InfiniteTalk's own grid and update (only meaningful inside the long-video loop, see
``LOOP_ONLY_SCHEDULERS``). ``/beta`` variants re-space the shifted grid with Beta(0.6, 0.6) quantiles.
Not available yet: ``deis``, ``flowmatch_pusa``, ``sa_ode_stable``, ``rcm``, ``vibt_unipc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import sigmas as grids
from .euler import (ERSDEScheduler, FlowEulerScheduler, FlowLCMScheduler, InfiniteTalkEulerScheduler,
                    ResMultistepScheduler)
from .flow_dpm import FlowDPMSolverScheduler
from .flow_unipc import FlowUniPCScheduler
from .sigmas import FlowGrid, FlowScheduler, SigmaInput

SCHEDULER_NAMES: Tuple[str, ...] = (
    "unipc", "unipc/beta",
    "dpm++", "dpm++/beta",
    "dpm++_sde", "dpm++_sde/beta",
    "euler", "euler/beta",
    "longcat_distill_euler",
    "deis",
    "lcm", "lcm/beta",
    "res_multistep",
    "er_sde",
    "flowmatch_causvid",
    "flowmatch_distill",
    "flowmatch_pusa",
    "multitalk",
    "sa_ode_stable",
    "rcm",
    "vibt_unipc",
)
DEFAULT_SCHEDULER = "unipc"
LOOP_ONLY_SCHEDULERS: Tuple[str, ...] = ("multitalk",)
STOCHASTIC_SCHEDULERS: Tuple[str, ...] = ("dpm++_sde", "dpm++_sde/beta", "lcm", "lcm/beta", "er_sde")


class SchedulerUnavailableError(ValueError):
    """A scheduler name that is unknown or not implemented in this version."""


@dataclass(frozen=True)
class SchedulerRequest:
    """What the sampler asks for. ``sigmas`` (custom [N+1] list) overrides ``steps``; ``end_step`` -1 = to the end.

    ``transformer_dim`` only matters for ``flowmatch_causvid`` (5120 = 14B table, else the 1.3B table).
    """

    name: str
    steps: int
    shift: float
    sigmas: Optional[SigmaInput] = None
    start_step: int = 0
    end_step: int = -1
    denoise_strength: float = 1.0
    transformer_dim: int = grids.DIM_14B


Factory = Callable[[SchedulerRequest, FlowGrid, Optional[torch.Generator]], FlowScheduler]
GridMaker = Callable[[SchedulerRequest], FlowGrid]


def _no_custom_sigmas(request: SchedulerRequest) -> None:
    if request.sigmas is not None:
        raise ValueError(f"scheduler '{request.name}' has a fixed timestep list and does not accept custom sigmas; "
                         "disconnect the sigmas input or pick another scheduler")


def _grid_with_custom(maker: Callable[[int, float], FlowGrid]) -> GridMaker:
    def make(request: SchedulerRequest) -> FlowGrid:
        if request.sigmas is not None:
            return grids.custom_grid(request.sigmas)
        return maker(request.steps, request.shift)
    return make


def _fixed_grid(maker: GridMaker) -> GridMaker:
    def make(request: SchedulerRequest) -> FlowGrid:
        _no_custom_sigmas(request)
        return maker(request)
    return make


def _unipc(request, grid, generator):
    return FlowUniPCScheduler(grid)


def _dpm(request, grid, generator):
    return FlowDPMSolverScheduler(grid, sde="_sde" in request.name, generator=generator)


def _euler(request, grid, generator):
    return FlowEulerScheduler(grid)


def _lcm(request, grid, generator):
    return FlowLCMScheduler(grid, generator)


def _res_multistep(request, grid, generator):
    return ResMultistepScheduler(grid)


def _er_sde(request, grid, generator):
    return ERSDEScheduler(grids.offset_first_sigma(grid), generator)


def _multitalk(request, grid, generator):
    full = grids.infinitetalk_grid(request.steps, request.shift)
    end = full.num_steps if request.end_step == -1 else request.end_step
    all_t = torch.cat([full.timesteps, torch.zeros(1)])
    return InfiniteTalkEulerScheduler(grid, final_timestep=all_t[end])


_IMPLEMENTED: Dict[str, Tuple[GridMaker, Factory]] = {
    "unipc": (_grid_with_custom(grids.unipc_grid), _unipc),
    "unipc/beta": (_grid_with_custom(lambda n, s: grids.unipc_grid(n, s, beta=True)), _unipc),
    "dpm++": (_grid_with_custom(grids.dpm_grid), _dpm),
    "dpm++/beta": (_grid_with_custom(lambda n, s: grids.dpm_grid(n, s, beta=True)), _dpm),
    "dpm++_sde": (_grid_with_custom(grids.dpm_grid), _dpm),
    "dpm++_sde/beta": (_grid_with_custom(lambda n, s: grids.dpm_grid(n, s, beta=True)), _dpm),
    "euler": (_grid_with_custom(grids.euler_grid), _euler),
    "euler/beta": (_grid_with_custom(lambda n, s: grids.euler_grid(n, s, beta=True)), _euler),
    "longcat_distill_euler": (_fixed_grid(lambda r: grids.longcat_distill_grid(r.steps, r.shift)), _euler),
    "lcm": (_grid_with_custom(grids.euler_grid), _lcm),
    "lcm/beta": (_grid_with_custom(lambda n, s: grids.euler_grid(n, s, beta=True)), _lcm),
    "res_multistep": (_grid_with_custom(grids.res_multistep_grid), _res_multistep),
    "er_sde": (_grid_with_custom(grids.res_multistep_grid), _er_sde),
    "flowmatch_causvid": (_fixed_grid(lambda r: grids.causvid_grid(r.steps, r.transformer_dim)), _euler),
    "flowmatch_distill": (_fixed_grid(lambda r: grids.distill_grid(r.steps, r.shift)), _euler),
    "multitalk": (_fixed_grid(lambda r: grids.infinitetalk_grid(r.steps, r.shift)), _multitalk),
}
_NOT_YET = {
    "deis": "not implemented yet",
    "flowmatch_pusa": "not available in this version",
    "sa_ode_stable": "not available in this version",
    "rcm": "not available in this version",
    "vibt_unipc": "not available in this version",
}


def available_schedulers() -> Tuple[str, ...]:
    """The implemented names, in the UI's order (what a node may offer)."""
    return tuple(name for name in SCHEDULER_NAMES if name in _IMPLEMENTED)


def _check_name(name: str) -> None:
    if name in _IMPLEMENTED:
        return
    available = ", ".join(available_schedulers())
    if name in _NOT_YET:
        raise SchedulerUnavailableError(
            f"scheduler '{name}' is {_NOT_YET[name]} in this pack; available schedulers: {available}")
    raise SchedulerUnavailableError(f"unknown scheduler '{name}'; available schedulers: {available}")


def build_scheduler(request: SchedulerRequest, generator: Optional[torch.Generator] = None) -> FlowScheduler:
    """A fresh scheduler for one run/window: grid → denoise_strength/start/end slicing → solver object.

    ``generator`` (a seeded ``torch.Generator``) is required by ``STOCHASTIC_SCHEDULERS`` (``dpm++_sde*``, ``lcm*``,
    ``er_sde``); the others ignore it.
    """
    _check_name(request.name)
    make_grid, factory = _IMPLEMENTED[request.name]
    full = make_grid(request)
    start = grids.denoise_start_step(full.num_steps, request.denoise_strength, request.start_step)
    return factory(request, grids.slice_grid(full, start, request.end_step), generator)


def make_scheduler(name: str, steps: int, shift: float, *, sigmas: Optional[SigmaInput] = None, start_step: int = 0,
                   end_step: int = -1, denoise_strength: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> FlowScheduler:
    """Shorthand for :func:`build_scheduler` with the 14B defaults; see :class:`SchedulerRequest`."""
    request = SchedulerRequest(name=name, steps=steps, shift=shift, sigmas=sigmas, start_step=start_step,
                               end_step=end_step, denoise_strength=denoise_strength)
    return build_scheduler(request, generator)


__all__ = [
    "DEFAULT_SCHEDULER", "FlowGrid", "FlowScheduler", "LOOP_ONLY_SCHEDULERS", "SCHEDULER_NAMES",
    "STOCHASTIC_SCHEDULERS", "SchedulerRequest", "SchedulerUnavailableError", "available_schedulers",
    "build_scheduler", "make_scheduler",
]
