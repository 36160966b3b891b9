"""Scheduler registry: the sampler's 21 ``scheduler`` choice strings (workflow-spec §4.6, upstream order) → factory.

``make_scheduler(name, steps, shift, ...)`` (or ``build_scheduler(SchedulerRequest(...), generator)``) returns a fresh
:class:`~.sigmas.FlowScheduler` with ``.timesteps`` [N] (what the DiT receives), ``.sigmas`` [N+1] float32 and
``.step(model_output, step_index, x)``. Build one per run/window; it holds the multistep history of that run only.
Unknown names raise :class:`SchedulerUnavailableError` naming the available ones.

Grids (see :mod:`.sigmas`): ``unipc*`` and ``dpm++*`` use Wan2.1's official grids (UniPC σ_max 0.999, DPM++
``get_sampling_sigmas`` σ_max 1; ComfyUI-WanVideoWrapper differs only by also shifting σ_max, see
:func:`.sigmas.training_sigma_max`); ``euler*`` / ``lcm*`` diffusers' FlowMatchEuler grid; ``res_multistep`` /
``er_sde`` 1000-entry DiffSynth-style picks; ``flowmatch_causvid`` / ``flowmatch_distill`` / ``longcat_distill_euler``
fixed lists; ``multitalk`` InfiniteTalk's own grid and update (only meaningful inside the long-video loop, see
``LOOP_ONLY_SCHEDULERS``). ``/beta`` variants re-space the shifted grid with Beta(0.6, 0.6) quantiles.
``deis`` (:mod:`.deis`) and ``vibt_unipc`` (ViBT bridge sampler) use diffusers' flow-sigma grid; ``sa_ode_stable``
(:mod:`.sa_solver`) the wrapper's linear/cosine grid; ``flowmatch_pusa`` is Pusa's grid with one shared timestep,
where Pusa's update is the flow Euler step (per-frame timesteps need a vectorised-timestep transformer and are
rejected); ``rcm`` rCM's 1-4 TrigFlow times converted to flow σ, with the LCM-style re-noising update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import sigmas as grids
from .deis import DEISScheduler
from .euler import (ERSDEScheduler, FlowEulerScheduler, FlowLCMScheduler, InfiniteTalkEulerScheduler, RCMScheduler,
                    ResMultistepScheduler, ViBTBridgeScheduler)
from .flow_dpm import FlowDPMSolverScheduler
from .flow_unipc import FlowUniPCScheduler
from .sa_solver import SAODEScheduler
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
STOCHASTIC_SCHEDULERS: Tuple[str, ...] = ("dpm++_sde", "dpm++_sde/beta", "lcm", "lcm/beta", "er_sde", "rcm",
                                           "vibt_unipc")


class SchedulerUnavailableError(ValueError):
    """A scheduler name that is not in the registry."""


@dataclass(frozen=True)
class SchedulerRequest:
    """What the sampler asks for. ``sigmas`` (custom [N+1] list) overrides ``steps``; ``end_step`` -1 = to the end.

    ``transformer_dim`` only matters for ``flowmatch_causvid`` (5120 = 14B table, else the 1.3B table).
    ``frame_timestep_scales`` is Pusa's per-latent-frame timestep multiplier list (``flowmatch_pusa`` only): all ones
    (or None) is the shared-timestep case this pack runs; anything else raises, see :func:`build_scheduler`.
    """

    name: str
    steps: int
    shift: float
    sigmas: Optional[SigmaInput] = None
    start_step: int = 0
    end_step: int = -1
    denoise_strength: float = 1.0
    transformer_dim: int = grids.DIM_14B
    frame_timestep_scales: Optional[Tuple[float, ...]] = None


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


def _deis(request, grid, generator):
    return DEISScheduler(grid)


def _sa_ode(request, grid, generator):
    return SAODEScheduler(grid)


def _rcm(request, grid, generator):
    return RCMScheduler(grid, generator)


def _vibt(request, grid, generator):
    return ViBTBridgeScheduler(grid, generator)


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
    "deis": (_grid_with_custom(grids.diffusers_flow_grid), _deis),
    "lcm": (_grid_with_custom(grids.euler_grid), _lcm),
    "lcm/beta": (_grid_with_custom(lambda n, s: grids.euler_grid(n, s, beta=True)), _lcm),
    "res_multistep": (_grid_with_custom(grids.res_multistep_grid), _res_multistep),
    "er_sde": (_grid_with_custom(grids.res_multistep_grid), _er_sde),
    "flowmatch_causvid": (_fixed_grid(lambda r: grids.causvid_grid(r.steps, r.transformer_dim)), _euler),
    "flowmatch_distill": (_fixed_grid(lambda r: grids.distill_grid(r.steps, r.shift)), _euler),
    "flowmatch_pusa": (_grid_with_custom(grids.pusa_grid), _euler),
    "multitalk": (_fixed_grid(lambda r: grids.infinitetalk_grid(r.steps, r.shift)), _multitalk),
    "sa_ode_stable": (_grid_with_custom(grids.sa_ode_grid), _sa_ode),
    "rcm": (_grid_with_custom(lambda n, s: grids.rcm_grid(n)), _rcm),
    "vibt_unipc": (_grid_with_custom(grids.diffusers_flow_grid), _vibt),
}


def available_schedulers() -> Tuple[str, ...]:
    """The implemented names, in the UI's order (what a node may offer)."""
    return tuple(name for name in SCHEDULER_NAMES if name in _IMPLEMENTED)


def _check_request(request: SchedulerRequest) -> None:
    if request.name not in _IMPLEMENTED:
        available = ", ".join(available_schedulers())
        raise SchedulerUnavailableError(f"unknown scheduler '{request.name}'; available schedulers: {available}")
    scales = request.frame_timestep_scales
    if scales is None:
        return
    if request.name != "flowmatch_pusa":
        raise ValueError(f"per-frame timestep scales only apply to the flowmatch_pusa scheduler, not '{request.name}'")
    if any(float(scale) != 1.0 for scale in scales):
        raise ValueError(
            "flowmatch_pusa: a per-frame (vectorised) timestep schedule needs a transformer that takes one timestep "
            "per latent frame (Pusa's model); this pack's Wan2.1 transformer takes one timestep per sample. Leave "
            f"every per-frame scale at 1 (got {list(scales)}) to run Pusa's shared-timestep flow Euler schedule")


def build_scheduler(request: SchedulerRequest, generator: Optional[torch.Generator] = None) -> FlowScheduler:
    """A fresh scheduler for one run/window: grid → denoise_strength/start/end slicing → solver object.

    ``generator`` (a seeded ``torch.Generator``) is required by ``STOCHASTIC_SCHEDULERS`` (``dpm++_sde*``, ``lcm*``,
    ``er_sde``, ``rcm``, ``vibt_unipc``); the others ignore it.
    """
    _check_request(request)
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
