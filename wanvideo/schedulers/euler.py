"""Single-step flow-matching schedulers: Euler (σ and timestep forms), flow LCM / rCM, ViBT bridge, RES multistep.

All take the velocity ``v = noise - x0`` (the DiT's flow prediction) and work on float32 latents of any layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sigmas import NUM_TRAIN_TIMESTEPS, FlowGrid, FlowScheduler, scheduler_noise


class FlowEulerScheduler(FlowScheduler):
    """Euler in σ: ``x_{i+1} = x_i + (σ_{i+1} - σ_i) · v`` (diffusers FlowMatchEulerDiscreteScheduler.step)."""

    name = "euler"

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        return x.to(torch.float32) + (sigma_next - sigma) * model_output


class InfiniteTalkEulerScheduler(FlowScheduler):
    """InfiniteTalk's update (fixtures §5.2), bit-exact in float32.

    ``dt = (t_i - t_{i+1}) / 1000`` (difference first, then the division; t_N = 1000 · σ_N) and
    ``x_{i+1} = x_i + (-v) · dt``. ``final_timestep`` is t_N when the grid was cut early (default 1000 · σ_N).
    """

    name = "multitalk"

    def __init__(self, grid: FlowGrid, final_timestep: Optional[torch.Tensor] = None):
        super().__init__(grid)
        last = grid.sigmas[-1:] * NUM_TRAIN_TIMESTEPS if final_timestep is None else final_timestep.reshape(1)
        self._t_all = torch.cat([grid.timesteps.to(torch.float32), last.to(torch.float32)])

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        dt = (self._t_all[step_index] - self._t_all[step_index + 1]) / NUM_TRAIN_TIMESTEPS
        return x + (-model_output) * dt


class FlowLCMScheduler(FlowScheduler):
    """Flow-matching LCM: ``x0 = x - σ_i · v``, then re-noised to ``σ_{i+1}`` with fresh seeded noise.

    ``x_{i+1} = σ_{i+1} · ε + (1 - σ_{i+1}) · x0`` with ε ~ N(0, 1) drawn from ``generator`` (float32, on the
    generator's device) whenever σ_{i+1} > 0; a step that lands on σ = 0 returns x0 and draws nothing.
    """

    name = "lcm"

    def __init__(self, grid: FlowGrid, generator: Optional[torch.Generator]):
        super().__init__(grid)
        if generator is None:
            raise ValueError(f"{self.name}: the scheduler re-noises every step and needs a seeded torch.Generator")
        self._generator = generator

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        x0 = x.to(torch.float32) - sigma * model_output
        if float(sigma_next) <= 0.0:
            return x0
        noise = scheduler_noise(x0.shape, self._generator, x0.device)
        return sigma_next * noise + (1.0 - sigma_next) * x0


class RCMScheduler(FlowLCMScheduler):
    """rCM few-step sampler (Zheng et al. 2025, arXiv:2510.08431), converted from TrigFlow to flow matching.

    rCM samples in TrigFlow (``x = cos t · x0 + sin t · ε``): ``x0 = c_skip x + c_out F``, then
    ``x ← cos t' · x0 + sin t' · ε'`` with fresh noise. Dividing by ``cos t' + sin t'`` maps it onto the flow latent
    with σ = sin t / (sin t + cos t), where the same update is exactly the LCM one: ``x0 = x - σ v``, re-noised to
    ``σ_{i+1}`` with seeded noise (none on the final step). The times are :func:`.sigmas.rcm_grid`.
    """

    name = "rcm"


class ViBTBridgeScheduler(FlowScheduler):
    """ViBT Brownian-bridge sampler (Vision Bridge Transformer), what the wrapper's ``vibt_unipc`` runs.

    With bridge time t = σ and ``Δ = σ_{i+1} - σ_i`` (< 0): ``x_{i+1} = x_i + Δ · v + η · noise_scale · ε`` where
    ``η = sqrt(-Δ σ_{i+1} / σ_i)`` is the Brownian-bridge posterior standard deviation and ε comes from the seeded
    generator (float32, on the generator's device); the step onto σ = 0 has η = 0 and draws nothing. Only the grid
    is UniPC's (:func:`.sigmas.diffusers_flow_grid`); there is no UniPC predictor/corrector. The wrapper takes the
    bridge time as ``(int timestep + 1) / 1000``; here it is σ itself, so sliced and custom grids stay exact. With a
    noise-to-data model (this pack's) the bridge noise leaves intermediate latents noisier than the flow marginal,
    exactly as upstream's ``vibt_unipc`` does.
    """

    name = "vibt_unipc"

    def __init__(self, grid: FlowGrid, generator: Optional[torch.Generator], noise_scale: float = 1.0):
        super().__init__(grid)
        if generator is None:
            raise ValueError("vibt_unipc: the bridge sampler draws noise every step and needs a seeded torch.Generator")
        if noise_scale < 0:
            raise ValueError(f"vibt_unipc: noise_scale must be >= 0, got {noise_scale}")
        self._generator = generator
        self.noise_scale = noise_scale

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        out = x.to(torch.float32) + (sigma_next - sigma) * model_output
        if sigma_next <= 0.0:
            return out
        eta = math.sqrt((sigma - sigma_next) * sigma_next / sigma) * self.noise_scale
        return out + eta * scheduler_noise(out.shape, self._generator, out.device)


def _phi1(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t) / t


def _phi2(t: torch.Tensor) -> torch.Tensor:
    return (_phi1(t) - 1.0) / t


class ResMultistepScheduler(FlowScheduler):
    """RES second-order multistep (Zhang et al., arXiv:2308.02157), as ComfyUI's ``res_multistep`` (eta 0).

    In log-σ time ``τ = -log σ``: the first step and any step that lands on σ = 0 are Euler steps; otherwise with
    ``h = τ_{i+1} - τ_i``, ``c2 = (τ_{i-1} - τ_i) / h``, ``b1 = φ1(-h) - φ2(-h) / c2``, ``b2 = φ2(-h) / c2``:
    ``x_{i+1} = e^{-h} x_i + h (b1 · x0_i + b2 · x0_{i-1})`` with ``x0 = x - σ v``.
    """

    name = "res_multistep"

    def __init__(self, grid: FlowGrid):
        super().__init__(grid)
        self._prev_x0: Optional[torch.Tensor] = None

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        x0 = x - sigma * model_output
        if float(sigma_next) <= 0.0 or self._prev_x0 is None:
            out = x + model_output * (sigma_next - sigma)
        else:
            tau, tau_next = -torch.log(sigma), -torch.log(sigma_next)
            tau_prev = -torch.log(self.sigmas[step_index - 1])
            h = tau_next - tau
            c2 = (tau_prev - tau) / h
            phi1, phi2 = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            out = torch.exp(-h) * x + h * (b1 * x0 + b2 * self._prev_x0)
        self._prev_x0 = x0
        return out


def _er_noise_scaler(lam: torch.Tensor) -> torch.Tensor:
    return lam * ((lam ** 0.3).exp() + 10.0)


class ERSDEScheduler(FlowScheduler):
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (Cui et al., arXiv:2309.06169), flow form.

    For the flow latent ``α = 1 - σ`` and ``λ = σ / α``; with the noise scaler ``f(λ) = λ (e^{λ^0.3} + 10)`` and
    ``r = f(λ_{i+1}) / f(λ_i)``: ``x ← (α_{i+1}/α_i) r x + α_{i+1} (1 - r) x0`` plus the 2nd/3rd-stage corrections
    from earlier x0 predictions (integrals over 200 points), plus ``α_{i+1} sqrt(λ_{i+1}² - λ_i² r²) ε`` with ε from
    the seeded generator. A step landing on σ = 0 returns x0. The grid's first σ must be < 1 (see
    :func:`.sigmas.er_sde_grid`).
    """

    name = "er_sde"
    max_stage = 3
    integration_points = 200

    def __init__(self, grid: FlowGrid, generator: Optional[torch.Generator]):
        super().__init__(grid)
        if generator is None:
            raise ValueError("er_sde: the SDE solver draws noise every step and needs a seeded torch.Generator")
        if float(grid.sigmas[0]) >= 1.0:
            raise ValueError("er_sde: the first sigma must be below 1 (λ = σ / (1 - σ) is infinite at 1)")
        self._generator = generator
        self._lambdas = grid.sigmas / (1 - grid.sigmas)
        self._prev_x0: Optional[torch.Tensor] = None
        self._prev_d: Optional[torch.Tensor] = None

    def _corrections(self, x, x0, i, lam_s, lam_t, alpha_t):
        dt = lam_t - lam_s
        step = -dt / self.integration_points
        pos = lam_t + torch.arange(self.integration_points, dtype=torch.float32) * step
        scaled = _er_noise_scaler(pos)
        d = (x0 - self._prev_x0) / (lam_s - self._lambdas[i - 1])
        x = x + alpha_t * (dt + torch.sum(1 / scaled) * step * _er_noise_scaler(lam_t)) * d
        if i >= 2 and self._prev_d is not None:
            s_u = torch.sum((pos - lam_s) / scaled) * step
            u = (d - self._prev_d) / ((lam_s - self._lambdas[i - 2]) / 2)
            x = x + alpha_t * ((dt ** 2) / 2 + s_u * _er_noise_scaler(lam_t)) * u
        self._prev_d = d
        return x

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma_s, sigma_t = self.sigmas[step_index], self.sigmas[step_index + 1]
        x0 = x - sigma_s * model_output
        if float(sigma_t) <= 0.0:
            out = x0
        else:
            lam_s, lam_t = self._lambdas[step_index], self._lambdas[step_index + 1]
            alpha_t = 1 - sigma_t
            r = _er_noise_scaler(lam_t) / _er_noise_scaler(lam_s)
            out = (alpha_t / (1 - sigma_s)) * r * x + alpha_t * (1 - r) * x0
            if step_index >= 1 and self._prev_x0 is not None:
                out = self._corrections(out, x0, step_index, lam_s, lam_t, alpha_t)
            noise = scheduler_noise(x.shape, self._generator, x.device)
            out = out + alpha_t * noise * torch.nan_to_num((lam_t ** 2 - lam_s ** 2 * r ** 2).sqrt(), nan=0.0)
        self._prev_x0 = x0
        return out
