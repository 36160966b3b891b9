"""DPM-Solver++ (Lu et al., arXiv:2211.01095) for flow matching: 2M midpoint, and its SDE variant.

Flow latent ``x = α x0 + σ ε`` with ``α = 1 - σ``, ``λ = log α - log σ``, ``h = λ_{i+1} - λ_i``; the velocity becomes
``x0 = x - σ v``. The first step and the last step are first order (DDIM-like); the others use the two latest x0
predictions with ``r = h_prev / h``, ``D1 = (x0_i - x0_{i-1}) / r``. The SDE variant (``sde-dpmsolver++``) adds
``σ_{i+1} sqrt(1 - e^{-2h}) ε`` with ε drawn from the seeded generator at every step (float32, on the generator's
device). Scalars are float32 0-d tensors as in Wan2.1's ``FlowDPMSolverMultistepScheduler`` (fixtures §5.3).
"""
from __future__ import annotations

from typing import Optional

import torch

from .sigmas import FlowGrid, FlowScheduler, scheduler_noise


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowDPMSolverScheduler(FlowScheduler):
    """DPM-Solver++(2M) midpoint; ``sde=True`` gives SDE-DPM-Solver++(2M), which needs ``generator``."""

    name = "dpm++"

    def __init__(self, grid: FlowGrid, *, sde: bool = False, generator: Optional[torch.Generator] = None):
        super().__init__(grid)
        if sde and generator is None:
            raise ValueError("dpm++_sde: the SDE solver draws noise every step and needs a seeded torch.Generator")
        self.sde = sde
        self._generator = generator
        self._prev_x0: Optional[torch.Tensor] = None

    def _first_order(self, x, x0, i, noise):
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s)
        if not self.sde:
            return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        return ((sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def _second_order(self, x, x0, i, noise):
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h, h_0 = _lambda(sigma_t) - lambda_s0, lambda_s0 - _lambda(sigma_s1)
        r0 = h_0 / h
        d0, d1 = x0, (1.0 / r0) * (x0 - self._prev_x0)
        if not self.sde:
            return ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        return ((sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
                + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        x0 = x - self.sigmas[step_index] * model_output
        noise = scheduler_noise(model_output.shape, self._generator, x.device) if self.sde else None
        if self._prev_x0 is None or step_index == self.num_steps - 1:
            out = self._first_order(x, x0, step_index, noise)
        else:
            out = self._second_order(x, x0, step_index, noise)
        self._prev_x0 = x0
        return out
