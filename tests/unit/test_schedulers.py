"""Flow-matching schedulers: fixture grids and solver trajectories, registry, slicing, custom sigmas, SDE seeding."""
import math
import re

import numpy as np
import pytest
import torch

from infinitetalk.wanvideo import schedulers
from infinitetalk.wanvideo.schedulers import sigmas as grids
from infinitetalk.wanvideo.schedulers import (SCHEDULER_NAMES, SchedulerRequest, SchedulerUnavailableError,
                                              available_schedulers, build_scheduler, make_scheduler)

UI_NAMES = (
    "unipc", "unipc/beta", "dpm++", "dpm++/beta", "dpm++_sde", "dpm++_sde/beta", "euler", "euler/beta",
    "longcat_distill_euler", "deis", "lcm", "lcm/beta", "res_multistep", "er_sde", "flowmatch_causvid",
    "flowmatch_distill", "flowmatch_pusa", "multitalk", "sa_ode_stable", "rcm", "vibt_unipc",
)
SOLVER_NAMES = {"unipc": "unipc", "dpm++": "dpm++"}
GRID_KEY = re.compile(r"^outputs\.timesteps\.steps(\d+)_shift(\d+(?:\.\d+)?)$")


def _grid_keys(tensors):
    found = []
    for key in tensors:
        match = GRID_KEY.match(key)
        if match:
            found.append((key, int(match.group(1)), float(match.group(2))))
    return found


def test_infinitetalk_grid_matches_fixture_exactly(sampler_file):
    tensors, _ = sampler_file
    keys = _grid_keys(tensors)
    assert len(keys) >= 3
    for key, steps, shift in keys:
        grid = grids.infinitetalk_grid(steps, shift)
        ref_t = tensors[key]
        ref_s = tensors[key.replace("outputs.timesteps.", "outputs.sigmas.")]
        assert grid.timesteps.dtype == torch.float32
        assert torch.equal(grid.timesteps, ref_t[:-1]), key
        assert torch.equal(grid.sigmas, ref_s), key
        sched = make_scheduler("multitalk", steps, shift)
        assert torch.equal(sched.timesteps, ref_t[:-1]) and torch.equal(sched.sigmas, ref_s)


@pytest.mark.parametrize("solver", sorted(SOLVER_NAMES))
def test_wan21_solver_trajectory_matches_fixture(sampler_file, solver):
    tensors, meta = sampler_file
    runs = [run for run in meta["config"]["solvers"] if run["solver"] == solver]
    assert runs, f"no {solver} run in the fixture metadata"
    for run in runs:
        name = run["name"]
        sched = make_scheduler(SOLVER_NAMES[solver], run["steps"], run["shift"])
        assert sched.timesteps.dtype == torch.int64
        assert torch.equal(sched.timesteps, tensors[f"outputs.{name}.timesteps"])
        assert torch.equal(sched.sigmas, tensors[f"outputs.{name}.sigmas"])
        x = tensors[f"inputs.{name}.x_init"]
        outputs, ref = tensors[f"inputs.{name}.model_output"], tensors[f"outputs.{name}.x"]
        worst = (x - ref[0]).abs().max().item()
        for i in range(run["steps"]):
            x = sched.step(outputs[i], i, x)
            worst = max(worst, (x - ref[i + 1]).abs().max().item())
        assert worst <= 1e-5, f"{name}: max |x - ref| = {worst}"


def test_registry_names_are_the_ui_list_in_order():
    assert SCHEDULER_NAMES == UI_NAMES
    assert schedulers.DEFAULT_SCHEDULER == "unipc"
    assert available_schedulers() == UI_NAMES


def _toy(shape=(4, 3, 2, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _exact_denoiser(sched, x0):
    """Velocity that makes x0 the exact prediction at the scheduler's noise level: v = (x - x0) / sigma."""
    def denoise(x, timestep, i):
        return (x - x0) / sched.sigmas[i]
    return denoise


def _run(sched, denoise, x):
    for i in range(sched.num_steps):
        x = sched.step(denoise(x, sched.timesteps[i], i), i, x)
    return x


@pytest.mark.parametrize("name", UI_NAMES)
def test_every_name_reaches_x0_on_toy_problem(name):
    sched = make_scheduler(name, 4, 3.0, generator=torch.Generator().manual_seed(1))
    x0, noise = _toy()
    sigma0 = sched.sigmas[0]
    x = (1 - sigma0) * x0 + sigma0 * noise
    out = _run(sched, _exact_denoiser(sched, x0), x)
    sigma_end = float(sched.sigmas[-1])
    expected = x0 if sigma_end == 0 else (1 - sigma_end) * x0 + sigma_end * noise
    assert sched.sigmas.dtype == torch.float32 and sched.sigmas.numel() == sched.timesteps.numel() + 1
    assert torch.allclose(out, expected, atol=1e-4), f"{name}: {(out - expected).abs().max()}"


def test_unknown_name_raises_with_list():
    with pytest.raises(SchedulerUnavailableError, match="unknown scheduler 'heun'.*unipc.*vibt_unipc"):
        make_scheduler("heun", 4, 5.0)


def _nonlinear_run(name, seed, steps=4):
    sched = make_scheduler(name, steps, 5.0, generator=torch.Generator().manual_seed(seed))
    x, _ = _toy(seed=3)
    return _run(sched, lambda x, t, i: torch.tanh(x) + 0.1 * x, x)


@pytest.mark.parametrize("name", [n for n in schedulers.STOCHASTIC_SCHEDULERS])
def test_stochastic_schedulers_follow_the_seed(name):
    first, again, other = _nonlinear_run(name, 7), _nonlinear_run(name, 7), _nonlinear_run(name, 8)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="Generator"):
        make_scheduler(name, 4, 5.0)


def test_sde_draws_noise_from_generator_and_ode_does_not():
    gen = torch.Generator().manual_seed(11)
    sched = make_scheduler("dpm++_sde", 3, 5.0, generator=gen)
    state = gen.get_state().clone()
    x, _ = _toy()
    sched.step(torch.zeros_like(x), 0, x)
    assert not torch.equal(gen.get_state(), state)
    ode = make_scheduler("dpm++", 3, 5.0, generator=gen)
    state = gen.get_state().clone()
    ode.step(torch.zeros_like(x), 0, x)
    assert torch.equal(gen.get_state(), state)


def test_fresh_scheduler_per_run_has_no_leaked_state():
    x, _ = _toy(seed=5)
    denoise = lambda x, t, i: torch.sin(x)  # noqa: E731
    first = _run(make_scheduler("unipc", 6, 5.0), denoise, x)
    second = _run(make_scheduler("unipc", 6, 5.0), denoise, x)
    assert torch.equal(first, second)
    used = make_scheduler("unipc", 6, 5.0)
    used.step(denoise(x, None, 0), 0, x)
    with pytest.raises(RuntimeError, match="in order"):
        used.step(denoise(x, None, 0), 0, x)


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler", "multitalk", "flowmatch_distill", "deis",
                                  "flowmatch_pusa", "sa_ode_stable", "rcm", "vibt_unipc"])
def test_start_end_step_slicing(name):
    gen = torch.Generator()
    full = make_scheduler(name, 4 if name in ("flowmatch_distill", "rcm") else 8, 5.0, generator=gen)
    n = full.num_steps
    part = make_scheduler(name, n, 5.0, start_step=1, end_step=n - 1, generator=gen)
    assert torch.equal(part.timesteps, full.timesteps[1:n - 1])
    assert torch.equal(part.sigmas, full.sigmas[1:n])
    assert float(part.sigmas[-1]) > 0
    for start, end in ((n, -1), (2, 2), (0, n + 1)):
        with pytest.raises(ValueError, match="start_step|end_step"):
            make_scheduler(name, n, 5.0, start_step=start, end_step=end, generator=gen)


@pytest.mark.parametrize("name", ["unipc", "deis", "sa_ode_stable", "flowmatch_pusa"])
def test_end_step_stops_on_the_path(name):
    sched = make_scheduler(name, 8, 5.0, end_step=5)
    x0, noise = _toy()
    out = _run(sched, _exact_denoiser(sched, x0), (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise)
    sigma = sched.sigmas[-1]
    assert torch.allclose(out, (1 - sigma) * x0 + sigma * noise, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "deis", "sa_ode_stable", "flowmatch_pusa", "vibt_unipc"])
def test_denoise_strength_sets_start_step(name):
    gen = torch.Generator()
    full = make_scheduler(name, 10, 5.0, generator=gen)
    part = make_scheduler(name, 10, 5.0, denoise_strength=0.5, generator=gen)
    start = 10 - int(10 * 0.5) - 1
    assert part.num_steps == 10 - start
    assert torch.equal(part.timesteps, full.timesteps[start:]) and torch.equal(part.sigmas, full.sigmas[start:])
    rcm = make_scheduler("rcm", 4, 5.0, denoise_strength=0.5, generator=gen)
    assert torch.equal(rcm.sigmas, make_scheduler("rcm", 4, 5.0, generator=gen).sigmas[4 - int(4 * 0.5) - 1:])
    assert make_scheduler("euler", 10, 5.0, denoise_strength=1.0).num_steps == 10
    with pytest.raises(ValueError, match="denoise_strength"):
        make_scheduler("euler", 10, 5.0, denoise_strength=0.5, start_step=2)
    with pytest.raises(ValueError, match="denoise_strength"):
        make_scheduler("euler", 10, 5.0, denoise_strength=1.5)


def test_custom_sigmas_override_steps():
    custom = [1.0, 0.8, 0.5, 0.2, 0.0]
    for name in ("unipc", "dpm++", "euler", "lcm", "deis", "flowmatch_pusa", "sa_ode_stable", "rcm", "vibt_unipc"):
        sched = make_scheduler(name, 30, 5.0, sigmas=torch.tensor(custom), generator=torch.Generator())
        assert sched.num_steps == 4
        assert torch.equal(sched.sigmas, torch.tensor(custom, dtype=torch.float32))
        assert sched.timesteps.tolist() == [1000, 800, 500, 200]
    for bad in ([1.0], [0.5, 0.7, 0.0], [1.5, 0.0], [1.0, float("nan"), 0.0]):
        with pytest.raises(ValueError, match="custom sigmas"):
            make_scheduler("unipc", 4, 5.0, sigmas=bad)
    for fixed in ("multitalk", "flowmatch_causvid", "flowmatch_distill", "longcat_distill_euler"):
        with pytest.raises(ValueError, match="does not accept custom sigmas"):
            make_scheduler(fixed, 4, 5.0, sigmas=custom)


@pytest.mark.parametrize("base", ["unipc", "dpm++", "euler", "lcm"])
def test_beta_variants_respace_between_the_same_ends(base):
    steps = 7
    plain = make_scheduler(base, steps, 5.0, generator=torch.Generator())
    beta = make_scheduler(f"{base}/beta", steps, 5.0, generator=torch.Generator())
    s_plain, s_beta = plain.sigmas.double(), beta.sigmas.double()
    assert s_beta[0] == s_plain[0] and s_beta[steps - 1] == s_plain[steps - 1] and s_beta[-1] == 0
    assert (s_beta[1:] < s_beta[:-1]).all()
    assert (s_beta[1:steps - 1] - s_plain[1:steps - 1]).abs().max() > 1e-3
    # Beta(0.6, 0.6) is symmetric: the middle of an odd-length list is the midpoint of the ends
    mid = (s_plain[0] + s_plain[steps - 1]) / 2
    assert abs(float(s_beta[steps // 2]) - float(mid)) < 1e-6


def test_euler_grid_follows_flowmatch_euler_definition():
    steps, shift = 5, 3.0
    grid = grids.euler_grid(steps, shift)
    s_min = float(np.float32(shift * 0.001 / (1 + (shift - 1) * 0.001)))
    base = np.linspace(1000.0, 1000.0 * s_min, steps) / 1000
    expected = (shift * base / (1 + (shift - 1) * base)).astype(np.float32)
    assert np.allclose(grid.sigmas[:-1].numpy(), expected, atol=1e-6, rtol=0)
    assert torch.equal(grid.timesteps, grid.sigmas[:-1] * 1000)


def test_fixed_timestep_lists():
    distill = make_scheduler("flowmatch_distill", 4, 1.0)
    assert torch.allclose(distill.timesteps, torch.tensor([999.0, 750.0, 500.0, 250.0]), atol=1e-3)
    shifted = make_scheduler("flowmatch_distill", 4, 5.0)
    s = torch.tensor([0.999, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(shifted.timesteps.double(), 1000 * 5 * s / (1 + 4 * s), atol=1e-2)
    with pytest.raises(ValueError, match="4 steps"):
        make_scheduler("flowmatch_distill", 6, 5.0)
    causvid = make_scheduler("flowmatch_causvid", 6, 8.0)
    assert causvid.timesteps.tolist() == [999, 934, 862, 756, 603, 410]
    assert torch.allclose(causvid.sigmas, torch.tensor([0.999, 0.934, 0.862, 0.756, 0.603, 0.41, 0.0]))
    with pytest.raises(ValueError, match="1..9"):
        make_scheduler("flowmatch_causvid", 10, 5.0)
    small = build_scheduler(SchedulerRequest("flowmatch_causvid", 4, 5.0, transformer_dim=1536))
    assert small.timesteps.tolist() == [1000, 750, 500, 250]
    longcat = make_scheduler("longcat_distill_euler", 4, 1.0)
    assert torch.allclose(longcat.timesteps, torch.tensor([1000.0, 760.0, 500.0, 260.0]), atol=1e-3)


def test_bad_steps_and_shift_raise():
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        make_scheduler("euler", 4, 0.0)
    sched = make_scheduler("euler", 4, 5.0)
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.zeros(2, 3), 0, torch.zeros(3, 2))


@pytest.mark.parametrize("name", [n for n in schedulers.STOCHASTIC_SCHEDULERS if n != "vibt_unipc"])
def test_stochastic_schedulers_keep_the_noise_level(name):
    """With an exact x0 predictor, x at σ stays (1 - σ) x0 + σ · (unit Gaussian) — the SDE noise is scaled right."""
    steps, end = (4, 3) if name == "rcm" else (6, 4)
    sched = make_scheduler(name, steps, 3.0, end_step=end, generator=torch.Generator().manual_seed(4))
    x0, noise = _toy(shape=(16, 8, 16, 16), seed=9)
    sigma0 = sched.sigmas[0]
    out = _run(sched, _exact_denoiser(sched, x0), (1 - sigma0) * x0 + sigma0 * noise)
    sigma = float(sched.sigmas[-1])
    residual = (out - (1 - sigma) * x0) / sigma
    assert 0.05 < sigma < 0.95
    assert abs(residual.std().item() - 1.0) < 0.03 and abs(residual.mean().item()) < 0.03
    assert (residual - noise).abs().max() > 0.1


def test_unipc_orders_reach_x0_and_order_two_beats_order_one():
    from infinitetalk.wanvideo.schedulers.flow_unipc import FlowUniPCScheduler

    x0, noise = _toy(seed=6)
    errors = {}
    for order in (1, 2):
        sched = FlowUniPCScheduler(grids.unipc_grid(6, 5.0), order=order)
        x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise
        assert torch.allclose(_run(sched, _exact_denoiser(sched, x0), x), x0, atol=1e-5)
        # a smooth non-linear field: a higher order lands closer to a fine-step reference
        fine = grids.custom_grid(torch.linspace(0.9, 0.1, 401))
        coarse = grids.custom_grid(torch.linspace(0.9, 0.1, 9))
        field = lambda x, t, i: torch.sin(2 * x)  # noqa: E731
        ref = _run(FlowUniPCScheduler(fine, order=2), field, noise.clone())
        errors[order] = (_run(FlowUniPCScheduler(coarse, order=order), field, noise.clone()) - ref).abs().max()
    assert errors[2] < errors[1]
    with pytest.raises(ValueError, match="order"):
        FlowUniPCScheduler(grids.unipc_grid(4, 5.0), order=3)


def test_multitalk_cut_run_lands_on_the_cut_timestep():
    full = make_scheduler("multitalk", 6, 7.0)
    cut = make_scheduler("multitalk", 6, 7.0, start_step=1, end_step=4)
    x, _ = _toy()
    out = _run(cut, lambda x, t, i: -torch.ones_like(x), x.clone())
    travelled = (full.timesteps[1] - full.timesteps[4]) / 1000
    assert torch.allclose(out - x, travelled.expand_as(x), atol=1e-6)


def test_training_sigma_max_official_and_wrapper():
    assert grids.training_sigma_max(1.0) == float(np.float32(0.999))
    assert abs(grids.training_sigma_max(7.0) - 7 * 0.999 / (1 + 6 * 0.999)) < 1e-6
    wrapper = grids.flow_solver_grid(6, 7.0, grids.training_sigma_max(7.0))
    official = grids.unipc_grid(6, 7.0)
    assert wrapper.sigmas[0] > official.sigmas[0] and torch.equal(wrapper.sigmas[-1:], official.sigmas[-1:])


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("name", ["deis", "vibt_unipc"])
def test_diffusers_flow_grid_formula(name):
    steps, shift = 7, 3.0
    sched = make_scheduler(name, steps, shift, generator=torch.Generator())
    expected = np.array([_shift(k * 0.999 / steps, shift) for k in range(steps, 0, -1)])
    assert np.allclose(sched.sigmas[:-1].numpy(), expected, atol=1e-7, rtol=0) and float(sched.sigmas[-1]) == 0.0
    assert sched.timesteps.dtype == torch.int64
    assert sched.timesteps.tolist() == [int(np.float64(s) * 1000) for s in expected]


def test_sa_ode_pusa_and_rcm_grid_formulas():
    shift = 5.0
    linear = make_scheduler("sa_ode_stable", 6, shift)
    assert np.allclose(linear.sigmas.numpy(), [_shift(1 - i / 6, shift) for i in range(7)], atol=1e-7)
    cosine = make_scheduler("sa_ode_stable", 12, shift)
    ramp = [_shift(0.5 * (1 + math.cos(math.pi * i / 12)), shift) for i in range(13)]
    assert np.allclose(cosine.sigmas.numpy(), ramp, atol=1e-7) and float(cosine.sigmas[-1]) == 0.0
    assert torch.equal(cosine.timesteps, cosine.sigmas[:-1] * 1000)
    pusa = make_scheduler("flowmatch_pusa", 5, shift)
    assert np.allclose(pusa.sigmas.numpy(), [_shift(1 - i / 5, shift) for i in range(5)] + [0.0], atol=1e-7)
    assert torch.equal(pusa.timesteps, pusa.sigmas[:-1] * 1000)
    flow = [80 / 81] + [math.tan(t) / (1 + math.tan(t)) for t in (1.5, 1.4, 1.0)]
    for steps in (1, 2, 4):
        rcm = make_scheduler("rcm", steps, shift, generator=torch.Generator())
        assert np.allclose(rcm.sigmas.numpy(), flow[:steps] + [0.0], atol=1e-7)
        assert torch.equal(rcm.sigmas, make_scheduler("rcm", steps, 1.0, generator=torch.Generator()).sigmas)
    with pytest.raises(ValueError, match="1..4 step"):
        make_scheduler("rcm", 5, shift, generator=torch.Generator())


def test_lagrange_exp_weights_are_exact_and_match_deis_logrho_closed_forms():
    from infinitetalk.wanvideo.schedulers.exp_integrator import lagrange_exp_weights

    nodes = [0.3, -0.2, -0.9]
    weights = lagrange_exp_weights(0.3, 1.1, nodes)
    # exact for a quadratic: ∫ e^u (1 + 2u - u²/2) du = e^u (3 - u²/2 + 3u) … evaluated between the ends
    prim = lambda u: math.exp(u) * (1 + 2 * u - u * u / 2 - (2 - u) - 1)  # noqa: E731
    quad = sum(w * (1 + 2 * n - n * n / 2) for w, n in zip(weights, nodes))
    assert abs(quad - (prim(1.1) - prim(0.3))) < 1e-12
    assert abs(lagrange_exp_weights(-math.inf, 0.4, [0.1])[0] - math.exp(0.4)) < 1e-12
    # DEIS "logrho" (diffusers' DEISMultistepScheduler): antiderivatives in ρ of the log-ρ Lagrange basis
    rt, r0, r1, r2 = 0.3, 0.5, 0.8, 1.4
    lg = math.log

    def ind2(t, b, c):
        return t * (-lg(c) + lg(t) - 1) / (lg(b) - lg(c))

    def ind3(t, b, c, d):
        num = t * (lg(c) * (lg(d) - lg(t) + 1) - lg(d) * lg(t) + lg(d) + lg(t) ** 2 - 2 * lg(t) + 2)
        return num / ((lg(b) - lg(c)) * (lg(b) - lg(d)))

    order2 = lagrange_exp_weights(lg(r0), lg(rt), [lg(r0), lg(r1)])
    assert np.allclose(order2, [ind2(rt, r0, r1) - ind2(r0, r0, r1), ind2(rt, r1, r0) - ind2(r0, r1, r0)], atol=1e-12)
    order3 = lagrange_exp_weights(lg(r0), lg(rt), [lg(r0), lg(r1), lg(r2)])
    closed = [ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2), ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0),
              ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1)]
    assert np.allclose(order3, closed, atol=1e-12)
    with pytest.raises(ValueError, match="finite"):
        lagrange_exp_weights(0.0, 1.0, [0.5, -math.inf])


def test_deis_and_sa_solver_orders_converge_on_a_smooth_field():
    from infinitetalk.wanvideo.schedulers.deis import DEISScheduler
    from infinitetalk.wanvideo.schedulers.euler import FlowEulerScheduler
    from infinitetalk.wanvideo.schedulers.flow_unipc import FlowUniPCScheduler
    from infinitetalk.wanvideo.schedulers.sa_solver import SAODEScheduler

    _, noise = _toy(seed=6)
    field = lambda x, t, i: torch.sin(2 * x)  # noqa: E731
    ref = _run(FlowUniPCScheduler(grids.custom_grid(torch.linspace(0.9, 0.1, 801))), field, noise.clone())
    coarse = grids.custom_grid(torch.linspace(0.9, 0.1, 17))
    err = {}
    for label, sched in (("euler", FlowEulerScheduler(coarse)), ("deis1", DEISScheduler(coarse, order=1)),
                         ("deis2", DEISScheduler(coarse, order=2)), ("deis3", DEISScheduler(coarse, order=3)),
                         ("sa1", SAODEScheduler(coarse, 1, 1)), ("sa3", SAODEScheduler(coarse, 3, 3))):
        err[label] = (_run(sched, field, noise.clone()) - ref).abs().max().item()
    assert abs(err["deis1"] - err["euler"]) < 1e-5  # first-order DEIS is DDIM, which is Euler for flow matching
    assert err["deis3"] < err["deis2"] < 0.4 * err["deis1"]
    assert err["sa3"] < 0.2 * err["sa1"] and err["sa1"] < err["euler"]
    with pytest.raises(ValueError, match="order"):
        DEISScheduler(coarse, order=4)


@pytest.mark.parametrize("name", ["deis", "sa_ode_stable"])
def test_multistep_final_step_onto_zero_is_the_x0_prediction(name):
    sched = make_scheduler(name, 6, 5.0)
    x, _ = _toy(seed=2)
    field = lambda x, t, i: torch.tanh(x) + 0.3 * x  # noqa: E731
    for i in range(sched.num_steps - 1):
        x = sched.step(field(x, None, i), i, x)
    last = sched.num_steps - 1
    v = field(x, None, last)
    assert torch.allclose(sched.step(v, last, x), x - sched.sigmas[last] * v, atol=1e-6)


@pytest.mark.parametrize("name", ["deis", "sa_ode_stable", "flowmatch_pusa"])
def test_deterministic_new_schedulers_repeat_and_ignore_the_generator(name):
    x, _ = _toy(seed=5)
    field = lambda x, t, i: torch.sin(x)  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state().clone()
    first = _run(make_scheduler(name, 7, 5.0, generator=gen), field, x)
    assert torch.equal(first, _run(make_scheduler(name, 7, 5.0), field, x))
    assert torch.equal(gen.get_state(), state)


def test_pusa_shared_timestep_is_flow_euler_and_per_frame_raises():
    sched = make_scheduler("flowmatch_pusa", 4, 5.0)
    x, _ = _toy(seed=8)
    v = torch.cos(x)
    out = sched.step(v, 0, x)
    assert torch.equal(out, x + (sched.sigmas[1] - sched.sigmas[0]) * v)
    ones = build_scheduler(SchedulerRequest("flowmatch_pusa", 4, 5.0, frame_timestep_scales=(1.0, 1.0, 1.0)))
    assert torch.equal(ones.sigmas, sched.sigmas)
    with pytest.raises(ValueError, match="per-frame.*one timestep per"):
        build_scheduler(SchedulerRequest("flowmatch_pusa", 4, 5.0, frame_timestep_scales=(1.0, 0.0, 0.5)))
    with pytest.raises(ValueError, match="only apply to the flowmatch_pusa"):
        build_scheduler(SchedulerRequest("euler", 4, 5.0, frame_timestep_scales=(1.0,)))


def test_rcm_step_is_the_trigflow_consistency_update():
    seed = 21
    sched = make_scheduler("rcm", 4, 5.0, generator=torch.Generator().manual_seed(seed))
    x0, noise = _toy(seed=3)
    sigma, sigma_next = sched.sigmas[0], sched.sigmas[1]
    x = (1 - sigma) * x0 + sigma * noise
    out = sched.step((x - x0) / sigma, 0, x)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    t_next = torch.atan(sigma_next / (1 - sigma_next)).double()  # flow σ → TrigFlow t
    trig = torch.cos(t_next) * x0.double() + torch.sin(t_next) * eps.double()
    assert torch.allclose(out.double(), trig / (torch.cos(t_next) + torch.sin(t_next)), atol=1e-5)
    assert abs(float(t_next) - 1.5) < 1e-6


def test_vibt_bridge_step_noise_and_final_step():
    sched = make_scheduler("vibt_unipc", 5, 3.0, generator=torch.Generator().manual_seed(2))
    x0, noise = _toy(shape=(8, 8, 32, 32), seed=4)
    sigma, sigma_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    x = (1 - sigma) * x0 + sigma * noise
    v = (x - x0) / sigma
    residual = sched.step(v, 0, x) - (x + (sigma_next - sigma) * v)
    eta = math.sqrt((sigma - sigma_next) * sigma_next / sigma)
    assert abs(residual.std().item() / eta - 1.0) < 0.02 and abs(residual.mean().item()) < 0.02 * eta
    gen = torch.Generator().manual_seed(5)
    last = make_scheduler("vibt_unipc", 5, 3.0, start_step=4, generator=gen)
    state = gen.get_state().clone()
    assert torch.allclose(last.step(v, 0, x), x - last.sigmas[0] * v, atol=1e-6)
    assert torch.equal(gen.get_state(), state)
