"""Timestep / sigma grids for the flow-matching schedulers.

A flow-matching latent at noise level ``sigma`` is ``x = (1 - sigma) * x0 + sigma * noise``; the DiT is called with a
timestep ``t`` (``sigma * 1000`` for every grid here) and predicts the velocity ``v = noise - x0``.

Every grid is a :class:`FlowGrid`: ``timesteps`` ``[N]`` (what the DiT receives, float32 or int64 as the reference
scheduler produces them) and ``sigmas`` ``[N + 1]`` float32 on the CPU (``sigmas[i]`` is the noise level of the input to
step ``i``, ``sigmas[N]`` where the last step lands, 0 unless the grid was cut with ``end_step``). Grids are built once
per run/window; nothing here keeps state. :class:`FlowScheduler` is the base every solver derives from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_ALPHA = 0.6
BETA_BETA = 0.6
CAUSVID_14B_TIMESTEPS = (999, 934, 862, 756, 603, 410, 250, 140, 74)
CAUSVID_1_3B_TIMESTEPS = (1000, 750, 500, 250)
DISTILL_TIMESTEPS = (999, 750, 500, 250)
LONGCAT_DISTILL_STEPS = 50
DIFFSYNTH_SIGMA_MIN = 0.003 / 1.002
DIM_14B = 5120
SNR_OFFSET = 1e-4
SA_ODE_LINEAR_MAX_STEPS = 10
RCM_SIGMA_MAX = 80.0
RCM_TRIGFLOW_TIMES = (1.5, 1.4, 1.0)

SigmaInput = Union[torch.Tensor, Sequence[float], np.ndarray]


@dataclass(frozen=True)
class FlowGrid:
    """``timesteps`` [N] (DiT input, float32 or int64) and ``sigmas`` [N+1] float32 on the CPU."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __post_init__(self) -> None:
        if self.timesteps.ndim != 1 or self.sigmas.ndim != 1:
            raise ValueError("FlowGrid: timesteps and sigmas must be 1-D tensors")
        if self.sigmas.numel() != self.timesteps.numel() + 1:
            raise ValueError(
                f"FlowGrid: sigmas must be one longer than timesteps, got {self.sigmas.numel()} sigmas for "
                f"{self.timesteps.numel()} timesteps")
        if self.timesteps.numel() < 1:
            raise ValueError("FlowGrid: a grid needs at least one step")

    @property
    def num_steps(self) -> int:
        """Number of solver steps (DiT evaluations of one guidance pass)."""
        return int(self.timesteps.numel())


def shift_sigmas(sigmas, shift: float):
    """Resolution shift ``shift * s / (1 + (shift - 1) * s)`` in the dtype of ``sigmas`` (numpy or torch)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_steps(steps: int, shift: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")


def infinitetalk_grid(steps: int, shift: float) -> FlowGrid:
    """InfiniteTalk's own grid (model-spec §4.5, fixtures §5.1), bit-exact in float32.

    ``t = linspace(1000, 1, steps)`` (float32) followed by 0, each warped by ``t' = 1000 * shift(t / 1000)``.
    timesteps [steps] float32 (t'_0 .. t'_{N-1}); sigmas [steps+1] float32 = t' / 1000 (last one 0).
    """
    _check_steps(steps, shift)
    base = np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32)
    t = torch.cat([torch.from_numpy(base), torch.zeros(1, dtype=torch.float32)])
    t = shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift) * NUM_TRAIN_TIMESTEPS
    return FlowGrid(timesteps=t[:-1].clone(), sigmas=t / NUM_TRAIN_TIMESTEPS)


def training_sigma_max(shift: float = 1.0) -> float:
    """σ_max of the Wan2.1 solvers' 1000-step training table (float32), shifted by the constructor's ``shift``.

    Wan2.1 builds its solvers with ``shift=1`` (→ float32(0.999)); ComfyUI-WanVideoWrapper passes the sampler's shift
    to the constructor as well, which moves σ_max to float32(shift(0.999)).
    """
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(torch.float32)
    return float(shift_sigmas(table, shift)[0].item())


def beta_sigmas(sigmas: np.ndarray, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> np.ndarray:
    """Beta-distributed spacing between the ends of ``sigmas`` (Lee et al. 2024, arXiv:2407.12173); float64 [N].

    ``s_i = s_min + ppf_Beta(alpha, beta)(1 - i / (N - 1)) * (s_max - s_min)`` with ``s_max = sigmas[0]``,
    ``s_min = sigmas[-1]``.
    """
    from scipy.stats import beta as beta_dist  # imported lazily: only the "/beta" schedulers need scipy

    sigmas = np.asarray(sigmas, dtype=np.float64)
    s_min, s_max = float(sigmas[-1]), float(sigmas[0])
    quantiles = 1 - np.linspace(0, 1, sigmas.shape[0])
    ppf = np.array([beta_dist.ppf(q, alpha, beta) for q in quantiles], dtype=np.float64)
    return np.array([s_min + p * (s_max - s_min) for p in ppf], dtype=np.float64)


def flow_solver_grid(steps: int, shift: float, sigma_max: float, *, beta: bool = False) -> FlowGrid:
    """Wan2.1 UniPC / DPM++ grid (fixtures §5.3).

    ``s = linspace(sigma_max, 0, steps + 1)[:-1]`` (float64), shifted, optionally beta-spaced; timesteps = int64
    truncation of ``s * 1000``; sigmas = float32 ``[s, 0]``.
    """
    _check_steps(steps, shift)
    s = np.linspace(sigma_max, 0.0, steps + 1).copy()[:-1]
    s = shift_sigmas(s, shift)
    if beta:
        s = beta_sigmas(s)
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return FlowGrid(timesteps=timesteps, sigmas=sigmas)


def unipc_grid(steps: int, shift: float, *, beta: bool = False) -> FlowGrid:
    """``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)`` as Wan2.1 builds it (σ_max 0.999)."""
    return flow_solver_grid(steps, shift, training_sigma_max(1.0), beta=beta)


def dpm_grid(steps: int, shift: float, *, beta: bool = False) -> FlowGrid:
    """Wan2.1 ``get_sampling_sigmas(steps, shift)`` passed to ``FlowDPMSolverMultistepScheduler`` (σ_max 1)."""
    return flow_solver_grid(steps, shift, 1.0, beta=beta)


def euler_grid(steps: int, shift: float, *, beta: bool = False) -> FlowGrid:
    """diffusers ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`` (also the flow LCM grid).

    The constructor's shifted 1000-entry table gives σ_max = 1 and σ_min = float32(shift(1/1000)); the grid is
    ``shift(linspace(1000 σ_max, 1000 σ_min, steps) / 1000)`` in float64, optionally beta-spaced, then float32.
    timesteps = float32 σ * 1000.
    """
    _check_steps(steps, shift)
    table = torch.from_numpy(np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    table = shift_sigmas(table / NUM_TRAIN_TIMESTEPS, shift)
    s_max, s_min = table[0].item(), table[-1].item()
    s = np.linspace(s_max * NUM_TRAIN_TIMESTEPS, s_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    s = shift_sigmas(s, shift)
    if beta:
        s = beta_sigmas(s)
    sig = torch.from_numpy(s).to(torch.float32)
    return FlowGrid(timesteps=sig * NUM_TRAIN_TIMESTEPS, sigmas=torch.cat([sig, torch.zeros(1)]))


def longcat_distill_grid(steps: int, shift: float) -> FlowGrid:
    """LongCat distill Euler grid: every ``50 / steps``-th of the 50 distilled timesteps 1000, 980, … 20, shifted."""
    _check_steps(steps, shift)
    if steps > LONGCAT_DISTILL_STEPS:
        raise ValueError(f"longcat_distill_euler supports at most {LONGCAT_DISTILL_STEPS} steps, got {steps}")
    distill = (torch.arange(1, LONGCAT_DISTILL_STEPS + 1, dtype=torch.float32)
               * (NUM_TRAIN_TIMESTEPS // LONGCAT_DISTILL_STEPS)).round().long()
    picks = torch.floor(torch.linspace(0, LONGCAT_DISTILL_STEPS, steps + 1)[:-1]).to(torch.int64)
    s = (torch.flip(distill, [0])[picks].float() / NUM_TRAIN_TIMESTEPS).numpy().astype(np.float32)
    sig = torch.from_numpy(shift_sigmas(s, shift).astype(np.float32))
    return FlowGrid(timesteps=sig * NUM_TRAIN_TIMESTEPS, sigmas=torch.cat([sig, torch.zeros(1)]))


def distill_grid(steps: int, shift: float) -> FlowGrid:
    """``flowmatch_distill``: the 4 timesteps 999/750/500/250 of a 1000-step shifted DiffSynth table (float32).

    ``t_k = 1000 * shift(linspace(1, 0, 1001)[1000 - k])`` for k in 999, 750, 500, 250 (= k exactly at shift 1).
    """
    _check_steps(steps, shift)
    if steps != len(DISTILL_TIMESTEPS):
        raise ValueError(f"flowmatch_distill is only defined for {len(DISTILL_TIMESTEPS)} steps, got {steps}")
    table = shift_sigmas(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], shift) * NUM_TRAIN_TIMESTEPS
    table = torch.cat([table, torch.zeros(1)])
    t = table[NUM_TRAIN_TIMESTEPS - torch.tensor(DISTILL_TIMESTEPS, dtype=torch.long)]
    return FlowGrid(timesteps=t, sigmas=torch.cat([t / NUM_TRAIN_TIMESTEPS, torch.zeros(1)]))


def causvid_grid(steps: int, transformer_dim: int = DIM_14B) -> FlowGrid:
    """``flowmatch_causvid``: fixed int64 timesteps (14B: 999 … 74, at most 9 steps; 1.3B: 1000/750/500/250, 4 steps).

    The shift does not apply. sigmas = timesteps / 1000 followed by 0.
    """
    table = CAUSVID_14B_TIMESTEPS if transformer_dim == DIM_14B else CAUSVID_1_3B_TIMESTEPS
    if transformer_dim != DIM_14B and steps != len(CAUSVID_1_3B_TIMESTEPS):
        raise ValueError(f"flowmatch_causvid for the 1.3B model is only defined for 4 steps, got {steps}")
    if int(steps) != steps or not 1 <= steps <= len(table):
        raise ValueError(f"flowmatch_causvid supports 1..{len(table)} steps for this model, got {steps}")
    t = torch.tensor(table[:steps], dtype=torch.int64)
    return FlowGrid(timesteps=t, sigmas=torch.cat([t / NUM_TRAIN_TIMESTEPS, torch.zeros(1)]))


def diffusers_flow_grid(steps: int, shift: float) -> FlowGrid:
    """diffusers' ``use_flow_sigmas`` grid (DEISMultistepScheduler / UniPCMultistepScheduler with ``flow_shift``).

    ``s = 1 - linspace(1, 1/1000, steps + 1)`` (float64), shifted, reversed, last (0) dropped: ``s_k = shift(k·0.999 /
    steps)`` for k = steps … 1; timesteps = int64 truncation of ``s * 1000``; sigmas = float32 ``[s, 0]``.
    """
    _check_steps(steps, shift)
    s = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)
    s = np.flip(shift_sigmas(s, shift))[:-1].copy()
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return FlowGrid(timesteps=timesteps, sigmas=torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32)))


def pusa_grid(steps: int, shift: float) -> FlowGrid:
    """``flowmatch_pusa``: Pusa's DiffSynth-style grid ``shift(linspace(1, 0, steps + 1)[:-1])`` (float32), then 0.

    timesteps = float32 σ * 1000.
    """
    _check_steps(steps, shift)
    sig = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1], shift)
    return FlowGrid(timesteps=sig * NUM_TRAIN_TIMESTEPS, sigmas=torch.cat([sig, torch.zeros(1)]))


def sa_ode_grid(steps: int, shift: float) -> FlowGrid:
    """``sa_ode_stable`` grid: ``u = linspace(0, 1, steps + 1)``; σ = ``1 - u`` for at most 10 steps, else the cosine
    ramp ``(1 + cos(π u)) / 2``; shifted in float64, then float32 (first σ 1, last 0). timesteps = float32 σ * 1000.
    """
    _check_steps(steps, shift)
    u = np.linspace(0.0, 1.0, steps + 1)
    base = 1.0 - u if steps <= SA_ODE_LINEAR_MAX_STEPS else 0.5 * (1.0 + np.cos(np.pi * u))
    sig = torch.from_numpy(shift_sigmas(base, shift).astype(np.float32))
    return FlowGrid(timesteps=sig[:-1] * NUM_TRAIN_TIMESTEPS, sigmas=sig)


def trigflow_to_flow_sigma(t: float) -> float:
    """TrigFlow time ``t`` (x = cos t · x0 + sin t · ε) → flow-matching σ = sin t / (sin t + cos t)."""
    return math.sin(t) / (math.sin(t) + math.cos(t))


def rcm_grid(steps: int) -> FlowGrid:
    """rCM few-step grid (1-4 steps): TrigFlow times ``[atan(80), 1.5, 1.4, 1.0][:steps]`` then 0, as flow σ.

    σ = :func:`trigflow_to_flow_sigma` in float64, then float32 (``atan(80)`` → 80/81); timesteps = float32 σ * 1000.
    The shift does not apply. Source: rCM's Wan2.1 inference script (NVlabs/rcm ``wan2pt1_t2v_rcm_infer.py``:
    ``sigma_max`` 80, mid times 1.5/1.4/1.0 "for better visual quality"; an earlier revision used 1.3/1.0/0.6).
    ComfyUI-WanVideoWrapper uses ``sigma_max`` 120 (first σ 120/121) with the same mid times.
    """
    if int(steps) != steps or not 1 <= steps <= len(RCM_TRIGFLOW_TIMES) + 1:
        raise ValueError(f"rcm is a 1..{len(RCM_TRIGFLOW_TIMES) + 1} step distilled sampler, got {steps} steps; "
                         "use 1-4 steps or connect custom sigmas")
    times = [math.atan(RCM_SIGMA_MAX), *RCM_TRIGFLOW_TIMES[:steps - 1]]
    sig = torch.tensor([trigflow_to_flow_sigma(t) for t in times] + [0.0], dtype=torch.float64).to(torch.float32)
    return FlowGrid(timesteps=sig[:-1] * NUM_TRAIN_TIMESTEPS, sigmas=sig)


def res_multistep_grid(steps: int, shift: float) -> FlowGrid:
    """``res_multistep`` / ``er_sde`` grid: ``steps`` picks (index round(i·1000/steps)) of linspace(1, 0.003/1.002, 1000), then 0.

    The list is shifted in float32; timesteps = float32 σ * 1000.
    """
    _check_steps(steps, shift)
    full = torch.linspace(1.0, DIFFSYNTH_SIGMA_MIN, NUM_TRAIN_TIMESTEPS)
    stride = NUM_TRAIN_TIMESTEPS / steps
    picks = [float(full[int(round(i * stride))]) for i in range(steps)] + [0.0]
    sig = shift_sigmas(torch.tensor(picks, dtype=torch.float32), shift)
    return FlowGrid(timesteps=sig[:-1] * NUM_TRAIN_TIMESTEPS, sigmas=sig)


def offset_first_sigma(grid: FlowGrid, offset: float = SNR_OFFSET) -> FlowGrid:
    """Move a first σ of 1 (infinite λ = σ / (1 - σ)) to ``1 - offset``, as ComfyUI does for log-SNR samplers.

    The first timestep follows (float32 σ · 1000, int64 when the grid's timesteps are integers).
    """
    if float(grid.sigmas[0]) < 1.0:
        return grid
    sig = grid.sigmas.clone()
    sig[0] = 1.0 - offset
    t = grid.timesteps.clone()
    t[0] = (sig[0] * NUM_TRAIN_TIMESTEPS).to(t.dtype)
    return FlowGrid(timesteps=t, sigmas=sig)


def custom_grid(sigmas: SigmaInput) -> FlowGrid:
    """User sigmas (the sampler's SIGMAS input): [N+1] values in [0, 1], strictly decreasing.

    timesteps = int64 truncation of ``sigmas[:-1] * 1000`` (as the wrapper does); sigmas float32.
    """
    if isinstance(sigmas, torch.Tensor):
        sig = sigmas.detach().to(device="cpu", dtype=torch.float32).flatten()
    else:
        sig = torch.from_numpy(np.asarray(sigmas, dtype=np.float32)).flatten()
    if sig.numel() < 2:
        raise ValueError(f"custom sigmas need at least 2 values (start and end), got {sig.numel()}")
    if not torch.isfinite(sig).all() or (sig < 0).any() or (sig > 1).any():
        raise ValueError(f"custom sigmas must be finite flow-matching noise levels in [0, 1], got {sig.tolist()}")
    if not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"custom sigmas must be strictly decreasing, got {sig.tolist()}")
    return FlowGrid(timesteps=(sig[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64), sigmas=sig)


def denoise_start_step(steps: int, denoise_strength: float, start_step: int = 0) -> int:
    """First step index for ``denoise_strength`` < 1: ``steps - int(steps * strength) - 1`` (workflow-spec §2.19).

    Returns ``start_step`` unchanged when the strength is 1; raises if both are set.
    """
    if not 0.0 <= denoise_strength <= 1.0:
        raise ValueError(f"denoise_strength must be within [0, 1], got {denoise_strength}")
    if denoise_strength >= 1.0:
        return start_step
    if start_step != 0:
        raise ValueError("denoise_strength < 1 sets start_step itself; leave start_step at 0 or denoise_strength at 1")
    return max(0, steps - int(steps * denoise_strength) - 1)


def slice_grid(grid: FlowGrid, start_step: int = 0, end_step: Optional[int] = -1) -> FlowGrid:
    """Keep steps ``[start_step, end_step)`` (``end_step`` -1 or None = to the end); sigmas stay one longer.

    The sliced grid ends at ``sigmas[end_step]`` (not 0 when the run stops early), as the wrapper slices it.
    """
    n = grid.num_steps
    end = n if end_step is None or end_step == -1 else end_step
    if int(start_step) != start_step or start_step < 0:
        raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
    if start_step >= n:
        raise ValueError(f"start_step ({start_step}) must be < steps ({n}); the run would have no steps")
    if int(end) != end or end > n or end < -1:
        raise ValueError(f"end_step ({end_step}) must be -1 or within 1..steps ({n})")
    if start_step >= end:
        raise ValueError(f"start_step ({start_step}) must be less than end_step ({end_step})")
    return FlowGrid(timesteps=grid.timesteps[start_step:end].clone(), sigmas=grid.sigmas[start_step:end + 1].clone())


class FlowScheduler:
    """Base of every scheduler: a :class:`FlowGrid` plus ``step``; steps must be taken in order, once each.

    Build a fresh object for every run/window (multistep history lives on the object and must not leak).
    ``step(model_output, step_index, x)``: ``model_output`` is the (guided) velocity ``v`` with the shape of ``x``
    (any layout, e.g. [C, T, H, W] or [B, C, T, H, W]); returns the latent at ``sigmas[step_index + 1]`` in ``x``'s
    dtype.
    """

    name = "flow"

    def __init__(self, grid: FlowGrid):
        self.grid = grid
        self._next_step = 0

    @property
    def timesteps(self) -> torch.Tensor:
        """[N] what the DiT receives at each step."""
        return self.grid.timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        """[N+1] float32 noise levels."""
        return self.grid.sigmas

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    def denoised(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        """x0 prediction ``x - sigma_i * v`` (previews, the sampler's denoised output)."""
        return x - self.sigmas[step_index] * model_output

    def step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        """Advance ``x`` from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``."""
        if step_index != self._next_step:
            raise RuntimeError(
                f"{self.name}: step {step_index} requested but step {self._next_step} is next; steps must run in "
                "order once each (build a fresh scheduler for every run/window)")
        if model_output.shape != x.shape:
            raise ValueError(f"{self.name}: model output shape {tuple(model_output.shape)} does not match the "
                             f"latent shape {tuple(x.shape)}")
        out = self._step(model_output, step_index, x)
        self._next_step += 1
        return out.to(x.dtype)

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def scheduler_noise(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) noise drawn on the generator's device (the seeded CPU generator) and moved to ``device``."""
    if generator is None:
        raise ValueError("this scheduler is stochastic and needs a seeded torch.Generator (pass generator=...)")
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)
