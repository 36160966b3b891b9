"""The step loop and InfiniteTalk guidance: exact fixture trajectories (CFG 3/2 passes, APG), callbacks, cfg lists."""

import pytest
import torch

from infinitetalk.multitalk.guidance import (PASS_COND, PASS_DROP_AUDIO, PASS_DROP_TEXT, PASS_UNCOND, APGConfig,
                                             GuidanceConfig, GuidanceState, MomentumBuffer, combine_cfg,
                                             guidance_passes, make_guided_denoiser)
from infinitetalk.wanvideo.sampling import (PHASE_AFTER_STEP, PHASE_BEFORE_MODEL, SampleCallbacks,
                                            SamplingInterrupted, sample)
from infinitetalk.wanvideo.schedulers import make_scheduler

PASS_KEYS = {"cond": PASS_COND, "drop_text": PASS_DROP_TEXT, "uncond": PASS_UNCOND, "drop_audio": PASS_DROP_AUDIO}


class RecordedModel:
    """Stands in for the DiT: returns the fixture's recorded velocity of (step, pass) and records its inputs."""

    def __init__(self, tensors, name):
        prefix = f"inputs.{name}.v_"
        self.tables = {PASS_KEYS[key[len(prefix):]]: tensors[key] for key in tensors if key.startswith(prefix)}
        self.inputs, self.timesteps, self.passes = [], [], []

    def __call__(self, x, timestep, passes):
        step = len(self.inputs)
        self.inputs.append(x.clone())
        self.timesteps.append(timestep)
        self.passes.append(passes)
        return [self.tables[p][step] for p in passes]


def _motion_hook(motion):
    def hook(x, ctx):
        x[:, :motion.shape[1]] = motion
        return x
    return hook


def _guidance(traj):
    apg = None
    if traj["use_apg"]:
        apg = APGConfig(momentum=traj["apg_momentum"], norm_threshold=traj["apg_norm_threshold"])
    return GuidanceConfig(text_scale=traj["text_guide_scale"], audio_scale=traj["audio_guide_scale"], apg=apg)


def test_euler_trajectories_match_fixture_exactly(sampler_file):
    tensors, meta = sampler_file
    trajectories = meta["config"]["trajectories"]
    assert {t["name"] for t in trajectories} >= {"euler_cfg3", "euler_cfg2", "euler_apg3"}
    for traj in trajectories:
        name, steps = traj["name"], traj["steps"]
        model = RecordedModel(tensors, name)
        ref_x = tensors[f"outputs.{name}.x"]
        sched = make_scheduler("multitalk", steps, traj["shift"])
        denoise = make_guided_denoiser(model, _guidance(traj))
        result = sample(denoise, ref_x[0].clone(), sched,
                        SampleCallbacks(latent_hook=_motion_hook(tensors[f"inputs.{name}.motion_latent"])))
        assert len(model.inputs) == steps
        expected_passes = guidance_passes(traj["text_guide_scale"], traj["audio_guide_scale"])
        assert all(p == expected_passes for p in model.passes)
        assert set(expected_passes) == set(model.tables)
        assert torch.equal(torch.stack(model.timesteps), tensors[f"outputs.{name}.t"]), name
        for i in range(steps):
            assert torch.equal(model.inputs[i], ref_x[i]), f"{name}: DiT input at step {i} differs"
        assert result.latent.dtype == torch.float32
        assert torch.equal(result.latent, ref_x[steps]), f"{name}: max {(result.latent - ref_x[steps]).abs().max()}"


def test_apg_running_norms_match_reference_printout(sampler_file):
    tensors, meta = sampler_file
    traj = next(t for t in meta["config"]["trajectories"] if t["use_apg"])
    printed = meta["trajectory_notes"][traj["name"]]["apg_diff_norms_printed_by_reference"]
    model = RecordedModel(tensors, traj["name"])
    text, audio = MomentumBuffer(traj["apg_momentum"]), MomentumBuffer(traj["apg_momentum"])
    norms = []
    for i in range(traj["steps"]):
        cond, drop_text, uncond = (model.tables[p][i] for p in (PASS_COND, PASS_DROP_TEXT, PASS_UNCOND))
        norms.append(text.update(cond - drop_text).norm().item())
        norms.append(audio.update(drop_text - uncond).norm().item())
    assert len(norms) == len(printed)
    assert max(abs(a - b) for a, b in zip(norms, printed)) < 1e-3
    threshold = traj["apg_norm_threshold"]
    assert min(printed) < threshold < max(printed)


def test_guidance_passes_and_two_pass_text_cfg():
    assert guidance_passes(1.0, 1.0) == (PASS_COND,)
    assert guidance_passes(1.0, 2.0) == (PASS_COND, PASS_DROP_AUDIO)
    assert guidance_passes(5.0, 1.0) == (PASS_COND, PASS_DROP_TEXT)
    assert guidance_passes(5.0, 4.0) == (PASS_COND, PASS_DROP_TEXT, PASS_UNCOND)
    gen = torch.Generator().manual_seed(0)
    cond, drop_text, uncond = (torch.randn(4, 2, 3, 3, generator=gen) for _ in range(3))
    two = combine_cfg({PASS_COND: cond, PASS_DROP_TEXT: drop_text}, 5.0, 1.0)
    three = uncond + 5.0 * (cond - drop_text) + 1.0 * (drop_text - uncond)
    assert torch.allclose(two, three, atol=1e-5)
    assert torch.equal(combine_cfg({PASS_COND: cond}, 1.0, 1.0), cond)


def test_apg_removes_the_component_along_cond():
    gen = torch.Generator().manual_seed(1)
    cond, drop_audio = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    config = GuidanceConfig(text_scale=1.0, audio_scale=3.0, apg=APGConfig(momentum=0.0, norm_threshold=1e6))
    denoise = make_guided_denoiser(lambda x, t, passes: [cond, drop_audio], config)
    guided = denoise(cond, torch.tensor(500.0), 0)
    update = (guided - cond).double()
    assert abs(float((update * cond.double()).sum())) < 1e-4 * float(update.norm() * cond.norm())
    diff = (cond - drop_audio).double()
    unit = cond.double() / cond.double().norm()
    expected = 2.0 * (diff - (diff * unit).sum() * unit)
    assert torch.allclose(update, expected, atol=1e-5)


def test_apg_state_is_per_run():
    gen = torch.Generator().manual_seed(2)
    tables = [torch.randn(4, 4, 2, 3, 3, generator=gen) for _ in range(3)]
    config = GuidanceConfig(5.0, 4.0, APGConfig(momentum=-0.75, norm_threshold=3.0))

    def predict(x, t, passes):
        return [tables[k][int(t.item()) % 4] for k in range(len(passes))]

    def run(state=None):
        denoise = make_guided_denoiser(predict, config, state)
        return [denoise(torch.zeros(2, 3, 3), torch.tensor(float(i)), i) for i in range(3)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    shared = GuidanceState(momentum=-0.75)
    run(shared)
    carried = run(shared)
    assert not torch.equal(carried[0], first[0])


def test_per_step_cfg_list_changes_passes_and_short_list_raises():
    sched = make_scheduler("multitalk", 3, 5.0)
    seen = []

    def predict(x, t, passes):
        seen.append(passes)
        return [torch.zeros_like(x) for _ in passes]

    config = GuidanceConfig(text_scale=[1.0, 5.0, 5.0], audio_scale=[1.0, 1.0, 4.0])
    sample(make_guided_denoiser(predict, config), torch.randn(4, 2, 3, 3), sched)
    assert seen == [(PASS_COND,), (PASS_COND, PASS_DROP_TEXT), (PASS_COND, PASS_DROP_TEXT, PASS_UNCOND)]
    short = GuidanceConfig(text_scale=[5.0, 5.0], audio_scale=4.0)
    with pytest.raises(ValueError, match="cfg list has 2 entries"):
        sample(make_guided_denoiser(predict, short), torch.randn(4, 2, 3, 3), make_scheduler("multitalk", 3, 5.0))


def test_callbacks_order_progress_and_denoised():
    sched = make_scheduler("unipc", 4, 5.0)
    events, reports = [], []
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)

    def hook(x, ctx):
        events.append((ctx.phase, ctx.step_index, float(ctx.sigma)))
        return x

    def denoise(x, t, i):
        events.append(("model", i, float(t)))
        return (x - x0) / sched.sigmas[i]

    x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise
    result = sample(denoise, x, sched, SampleCallbacks(latent_hook=hook, on_step=reports.append))
    phases = [e[0] for e in events]
    assert phases == [PHASE_BEFORE_MODEL, "model", PHASE_AFTER_STEP] * 4
    assert [e[1] for e in events] == [i for i in range(4) for _ in range(3)]
    assert events[2][2] == float(sched.sigmas[1]) and events[-1][2] == 0.0
    assert [r.step_index for r in reports] == [0, 1, 2, 3] and all(r.num_steps == 4 for r in reports)
    assert all(torch.allclose(r.denoised, x0, atol=1e-5) for r in reports)
    assert torch.allclose(result.latent, x0, atol=1e-5) and torch.allclose(result.denoised, x0, atol=1e-5)


def test_interrupt_stops_between_steps():
    sched = make_scheduler("euler", 5, 5.0)
    calls = []

    def denoise(x, t, i):
        calls.append(i)
        return torch.zeros_like(x)

    with pytest.raises(SamplingInterrupted, match="step 3 of 5"):
        sample(denoise, torch.zeros(4, 1, 2, 2), sched, SampleCallbacks(interrupted=lambda: len(calls) == 2))
    assert calls == [0, 1]


def test_denoise_fn_shape_is_checked():
    with pytest.raises(RuntimeError, match="shape"):
        sample(lambda x, t, i: x[:1], torch.zeros(4, 1, 2, 2), make_scheduler("euler", 2, 5.0))
