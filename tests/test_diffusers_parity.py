"""Our tables, grids and sampler trajectories against diffusers' schedulers, in float64."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffusion.samplers import ancestral, ddim, dpmpp_2m, euler, grids
from diffusion.schedules import DDPM, FlowMatching
from diffusion.timesteps import FluxShift, time_shift
from tests.reference import (
    BETA_ENDS,
    DIFFUSERS_BETA_NAMES,
    DIFFUSERS_PREDICTIONS,
    diffusers_float64,
    toy_model,
)

# diffusers' DPM-Solver calls np.array on a tensor with a keyword torch does not take.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BETAS = list(DIFFUSERS_BETA_NAMES)
SHAPE = (3, 2, 4, 4)


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scheduler(cls, beta: str, prediction: str = "eps", zero_terminal_snr: bool = False, **kwargs):
    with diffusers_float64():
        return cls(
            beta_schedule=DIFFUSERS_BETA_NAMES[beta],
            prediction_type=DIFFUSERS_PREDICTIONS[prediction],
            rescale_betas_zero_snr=zero_terminal_snr,
            **BETA_ENDS[beta],
            **kwargs,
        )


def _run_diffusers(scheduler, schedule: DDPM, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """The standard diffusers loop; the model sees our continuous t of each integer timestep."""
    with diffusers_float64():
        for ts in scheduler.timesteps:
            out = toy_model(x, schedule.timestep_to_t(ts).expand(x.shape[0]))
            x = scheduler.step(out, ts, x, **step_kwargs).prev_sample
    return x


def _grid_of(scheduler, schedule: DDPM) -> torch.Tensor:
    return torch.cat([schedule.timestep_to_t(scheduler.timesteps), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("beta", BETAS)
def test_beta_and_alpha_bar_tables_equal_diffusers(beta, zero_terminal_snr):
    prediction = "v" if zero_terminal_snr else "eps"
    ours = DDPM(beta, prediction, zero_terminal_snr=zero_terminal_snr, **BETA_ENDS[beta])
    ref = _scheduler(DDPMScheduler, beta, prediction, zero_terminal_snr)
    assert ref.betas.dtype == torch.float64
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-12, atol=1e-15)
    # And the stock (float32) library agrees at float32 resolution.
    stock = DDPMScheduler(
        beta_schedule=DIFFUSERS_BETA_NAMES[beta], rescale_betas_zero_snr=zero_terminal_snr, **BETA_ENDS[beta]
    )
    torch.testing.assert_close(ours.alphas_cumprod.float(), stock.alphas_cumprod, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_spacings_equal_diffusers_timesteps_for_every_step_count(spacing, scheduler):
    """Every step count 1..1000. diffusers' "trailing" takes its count from a float arange and returns
    one timestep too many, a training step -1, for 62 of them (61, 103, 121, ...); there its other
    timesteps are compared. Ours are its values, rounding included, so grids match step for step."""
    ref = scheduler(timestep_spacing=spacing)
    one_too_many = []
    for steps in range(1, 1001):
        ref.set_timesteps(steps)
        timesteps = ref.timesteps.double()
        if timesteps.numel() == steps + 1:
            assert timesteps[-1] == -1, steps
            one_too_many.append(steps)
            timesteps = timesteps[:-1]
        expected = torch.cat([(timesteps + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
        assert torch.equal(grids.ddpm(steps, spacing), expected), steps
    if spacing == "trailing":
        assert len(one_too_many) == 62 and one_too_many[:3] == [61, 103, 121], one_too_many
    else:
        assert one_too_many == []


@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_leading_steps_offset_equals_diffusers(steps):
    ref = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    expected = torch.cat([(ref.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(grids.ddpm(steps, "leading", steps_offset=1), expected)


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("beta", BETAS)
def test_ddim_trajectory_equals_diffusers(beta, prediction, spacing, offset):
    schedule = DDPM(beta, prediction, **BETA_ENDS[beta])
    ref = _scheduler(DDIMScheduler, beta, prediction, clip_sample=False, set_alpha_to_one=True,
                     timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(10)
    x = _x_T()
    expected = _run_diffusers(ref, schedule, x, eta=0.0)
    ours = euler(toy_model, schedule, x, _grid_of(ref, schedule))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_eta_equals_diffusers_given_the_same_noise(prediction):
    schedule = DDPM("scaled_linear", prediction, **BETA_ENDS["scaled_linear"])
    ref = _scheduler(DDIMScheduler, "scaled_linear", prediction, clip_sample=False, set_alpha_to_one=True,
                     timestep_spacing="trailing")
    # diffusers' DDIM steps to `timestep - N // steps`, the next grid point only when steps divides N.
    ref.set_timesteps(20)
    x, eta = _x_T(), 0.6
    # Our sampler draws one noise tensor per step but the last (to t = 0), in order.
    twin = torch.Generator().manual_seed(5)
    noises = [torch.randn(SHAPE, generator=twin, dtype=torch.float64) for _ in range(19)] + [torch.zeros(SHAPE, dtype=torch.float64)]
    with diffusers_float64():
        expected = x
        for ts, noise in zip(ref.timesteps, noises):
            out = toy_model(expected, schedule.timestep_to_t(ts).expand(SHAPE[0]))
            expected = ref.step(out, ts, expected, eta=eta, variance_noise=noise).prev_sample
    ours = ddim(toy_model, schedule, x, _grid_of(ref, schedule), eta=eta, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("beta", ["linear", "cosine"])
def test_ancestral_equals_diffusers_ddpm_scheduler(beta, prediction):
    schedule = DDPM(beta, prediction, **BETA_ENDS[beta])
    ref = _scheduler(DDPMScheduler, beta, prediction, clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(25)
    x = _x_T()
    expected = _run_diffusers(ref, schedule, x, generator=torch.Generator().manual_seed(3))
    ours = ancestral(toy_model, schedule, x, _grid_of(ref, schedule), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [6, 10, 20])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("beta", BETAS)
def test_dpmpp_2m_trajectory_equals_diffusers(beta, prediction, steps):
    schedule = DDPM(beta, prediction, **BETA_ENDS[beta])
    ref = _scheduler(DPMSolverMultistepScheduler, beta, prediction, algorithm_type="dpmsolver++",
                     solver_order=2, solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(steps)
    x = _x_T()
    expected = _run_diffusers(ref, schedule, x)
    ours = dpmpp_2m(toy_model, schedule, x, _grid_of(ref, schedule))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_matching_euler_equals_diffusers(steps, shift):
    with diffusers_float64():
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(steps)
        x = _x_T()
        expected = x
        for ts, sigma in zip(ref.timesteps, ref.sigmas):
            expected = ref.step(toy_model(expected, sigma.expand(SHAPE[0])), ts, expected).prev_sample
    grid = ref.sigmas.double()
    # diffusers' grid is the shift map applied to linspace(1, sigma_min, steps), then 0, where its
    # sigma_min is the smallest training sigma (1/1000) already shifted once.
    base = torch.linspace(1.0, time_shift(torch.tensor(1e-3, dtype=torch.float64), shift).item(), steps, dtype=torch.float64)
    torch.testing.assert_close(grid[:-1], time_shift(base, shift), rtol=1e-12, atol=1e-12)
    ours = euler(toy_model, FlowMatching(), x, grid)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (128, 96), (48, 80)])
def test_flux_resolution_shift_equals_diffusers(height, width):
    rule = FluxShift(patch_size=2)
    tokens = (height // 2) * (width // 2)
    assert rule.mu(tokens) == pytest.approx(calculate_shift(tokens), rel=1e-12)
    with diffusers_float64():
        ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        ref.set_timesteps(10, mu=calculate_shift(tokens))
    base = torch.linspace(1.0, 1e-3, 10, dtype=torch.float64)
    torch.testing.assert_close(ref.sigmas[:-1].double(), time_shift(base, rule(height, width)), rtol=1e-12, atol=1e-12)
