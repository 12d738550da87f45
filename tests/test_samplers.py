"""Every sampler, for every theory, against the exact denoiser of known data distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion.samplers import SAMPLERS, ancestral, dpmpp_2m, euler, get_sampler, grids, heun
from diffusion.schedules import DDPM
from diffusion.toy import GaussianMixture
from tests.theories import THEORIES

F64 = torch.float64
GAUSSIAN = GaussianMixture.gaussian([1.0, -2.0], [[0.5, 0.2], [0.2, 0.3]])
MIXTURE = GaussianMixture(
    [0.5, 0.3, 0.2],
    [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.1], [-0.1, 0.15]]],
)
DETERMINISTIC = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def _start(data: GaussianMixture, schedule, grid, z):
    """The exact marginal at the grid's first time, so only discretisation error remains."""
    k = schedule.at(grid[0])
    if data.means.shape[0] != 1:
        return data.sample_noisy(z.shape[0], k.alpha.item(), k.sigma.item(), torch.Generator().manual_seed(1))
    chol = torch.linalg.cholesky(k.alpha**2 * data.covs[0] + k.sigma**2 * torch.eye(data.dim, dtype=F64))
    return k.alpha * data.means[0] + z @ chol.T


def gaussian_error(theory: str, sampler, steps: int, grid: torch.Tensor | None = None) -> float:
    """A deterministic sampler with the exact (linear) denoiser of a Gaussian is an affine map
    x_T -> A x_T + b, so its output law N(b, A A^T) is read off exactly from 1 + D probes and
    compared with the exact law at the grid's last time (the data at t = 0). The grid is the
    theory's own of ``steps`` steps unless given."""
    make, grid_of = THEORIES[theory]
    schedule = make()
    grid = grid_of(steps) if grid is None else grid
    probes = torch.cat([torch.zeros(1, 2), torch.eye(2)]).to(F64)
    out = sampler(GAUSSIAN.denoiser(schedule), schedule, _start(GAUSSIAN, schedule, grid, probes), grid)
    k = schedule.at(grid[-1])
    mean, cov = k.alpha * GAUSSIAN.mean, k.alpha**2 * GAUSSIAN.cov + k.sigma**2 * torch.eye(2, dtype=F64)
    b, a = out[0], (out[1:] - out[0]).T
    return ((b - mean).norm() + (a @ a.T - cov).norm()).item()


ORDER = {"euler": 1, "heun": 2, "dpmpp_2m": 2}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("theory", THEORIES)
def test_each_solver_has_its_order_where_the_path_is_smooth(theory, sampler):
    """From t = 0.98 to 0.02 in n equal steps, both ends inside (0, 1) where every path is smooth and
    the SNR finite: the errors at 40 and 160 steps give the observed order log2(e40 / e160) / 2.
    Measured: Euler 0.97-0.99; Heun and DPM-Solver++(2M) 1.92-2.14, for every theory."""
    e40, e160 = (gaussian_error(theory, DETERMINISTIC[sampler], n, torch.linspace(0.98, 0.02, n + 1, dtype=F64))
                 for n in (40, 160))
    order = math.log2(e40 / e160) / 2
    assert abs(order - ORDER[sampler]) < 0.3, (order, e40, e160)


# Stable Diffusion's betas start 8.5x above Ho et al.'s, so on their path the last step, into
# t = 0, where sigma ~ sqrt(t) and every solver is first order (README, "A note on grids"), makes
# most of the error: there the second-order samplers' whole-trajectory gain over Euler is small.
FIRST_ORDER_LAST_STEP = {"ddpm-scaled-v-zero-snr"}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("theory", THEORIES)
def test_deterministic_error_falls_with_steps(theory, sampler):
    """Whole trajectories, t = 1 to 0 on each theory's grid. At 160 steps Euler is within 4 % of the
    covariance's norm (measured at most 3.1 %); Heun and DPM-Solver++(2M) are 10x below Euler's
    error (measured 16x-790x), 2x on the path whose last step dominates (measured 2.65x, 3.2x)."""
    errors = [gaussian_error(theory, DETERMINISTIC[sampler], n) for n in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2], errors
    if sampler == "euler":
        assert errors[2] < 0.04 * GAUSSIAN.cov.norm().item(), errors
    else:
        gain = 2 if theory in FIRST_ORDER_LAST_STEP else 10
        assert errors[2] < gaussian_error(theory, euler, 160) / gain, errors


# EDM's and VE's grids span sigma 80 (50) to 0.002 (0.01), 10.6 (8.5) in log sigma: at 10 steps Heun's
# steps at high noise are too long for it to beat Euler at 19 (measured 0.28 against 0.17 on EDM);
# from 20 steps on it does (0.051 against 0.085), as EDM's 18 steps are chosen to.
EQUAL_CALLS = [(theory, steps) for theory in THEORIES for steps in ((20, 40) if theory in ("edm", "ve") else (10, 20))]


@pytest.mark.parametrize(("theory", "steps"), EQUAL_CALLS)
def test_second_order_beats_euler_at_equal_model_evaluations(theory, steps):
    # Heun makes 2 calls a step but 1 on the last; DPM-Solver++(2M) makes 1.
    assert gaussian_error(theory, heun, steps) < gaussian_error(theory, euler, 2 * steps - 1)
    assert gaussian_error(theory, dpmpp_2m, steps) < gaussian_error(theory, euler, steps)


def _moments_error(data, theory, sampler, steps, n, seed=0, **kwargs):
    make, grid_of = THEORIES[theory]
    schedule, grid = make(), grid_of(steps)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x = sampler(data.denoiser(schedule), schedule, _start(data, schedule, grid, z), grid, **kwargs)
    return (x.mean(0) - data.mean).norm().item(), (torch.cov(x.T) - data.cov).norm().item() / data.cov.norm().item()


@pytest.mark.parametrize("theory", ["flow", "ddpm-linear-eps", "ddpm-scaled-v-zero-snr"])
def test_ancestral_error_falls_with_steps(theory):
    """Stochastic: Monte Carlo with common random numbers; its noise (~0.01) is far below the gaps."""
    errors = [_moments_error(GAUSSIAN, theory, ancestral, n, 40_000, generator=torch.Generator().manual_seed(2))[1]
              for n in (10, 40, 160)]
    assert errors[0] > 2 * errors[1] and errors[1] > 1.5 * errors[2], errors


SAMPLER_KWARGS = {
    "euler": {},
    "ddim": {"eta": 0.5, "generator": torch.Generator().manual_seed(3)},
    "ancestral": {"generator": torch.Generator().manual_seed(3)},
    "heun": {},
    "dpmpp_2m": {},
    "euler_ancestral": {"generator": torch.Generator().manual_seed(3)},
    "dpmpp_2m_sde": {"generator": torch.Generator().manual_seed(3)},
    "sde": {"generator": torch.Generator().manual_seed(3)},
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("theory", THEORIES)
def test_samples_reproduce_a_gaussian_mixture(theory, sampler):
    """Mean within 0.06 (5 Monte Carlo standard errors) and covariance within 6 % at 100 steps."""
    mean_error, cov_error = _moments_error(MIXTURE, theory, get_sampler(sampler), 100, 12_000, **SAMPLER_KWARGS[sampler])
    assert mean_error < 0.06 and cov_error < 0.06, (mean_error, cov_error)


def test_callback_sees_every_step_and_no_bar_is_printed_unless_asked(capsys):
    schedule, grid = THEORIES["flow"][0](), grids.uniform(5)
    seen = []
    x = torch.randn(8, 2, dtype=F64)
    for sampler in SAMPLERS.values():
        seen.clear()
        sampler(GAUSSIAN.denoiser(schedule), schedule, x, grid, callback=seen.append)
        assert [s.index for s in seen] == list(range(5)) and seen[-1].s == 0.0 and seen[0].total == 5
        assert seen[-1].x.shape == x.shape and seen[-1].x0_hat.shape == x.shape
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    euler(GAUSSIAN.denoiser(schedule), schedule, x, grid, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_model_sees_continuous_times_on_the_grid_and_a_batch_of_them():
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    schedule = THEORIES["flow"][0]()
    heun(model, schedule, torch.randn(3, 2), grids.uniform(4))
    assert all(t.shape == (3,) for t in calls)
    assert [round(t[0].item(), 6) for t in calls] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]


def test_unknown_sampler_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"sampler='dpm'.*'euler', 'ddim', 'ancestral', 'heun', 'dpmpp_2m'"):
        get_sampler("dpm")


@pytest.mark.parametrize(
    "grid,match",
    [
        (torch.tensor([1.0]), "at least 2 times"),
        (torch.tensor([0.0, 0.5, 1.0]), "strictly decreasing"),
        (torch.tensor([1.2, 0.0]), r"in \[0, 1\]"),
    ],
)
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        euler(lambda x, t: x, THEORIES["flow"][0](), torch.zeros(2, 2), grid)


@pytest.mark.parametrize("theory", ["flow", "ddpm-linear-eps", "ddpm-scaled-v-zero-snr", "trig"])
def test_karras_grid_is_uniform_in_the_rho_th_root_of_the_noise_level(theory):
    schedule = THEORIES[theory][0]()
    grid = grids.karras(12, schedule, sigma_min=0.05, sigma_max=10.0, rho=7.0)
    assert grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    k = schedule.at(grid[:-1])
    levels = (k.sigma / k.alpha) ** (1 / 7)
    expected = torch.linspace(10.0 ** (1 / 7), 0.05 ** (1 / 7), 12, dtype=F64)  # Karras et al. 2022, eq. 5
    torch.testing.assert_close(levels, expected, rtol=1e-9, atol=1e-9)


def test_karras_grid_caps_sigma_max_at_the_schedules_end():
    schedule = THEORIES["ddpm-linear-eps"][0]()
    end = schedule.at(1.0)
    grid = grids.karras(10, schedule, sigma_max=1e4)
    assert grid[0].item() == pytest.approx(1.0, abs=1e-12)
    assert (end.sigma / end.alpha).item() < 1e4


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_karras_grid_of_a_ddpm_model_stays_within_its_trained_steps(beta_schedule):
    """sigma_min is capped at the first training step's noise level, sqrt(beta_1 / (1 - beta_1)):
    0.0100 for Ho et al.'s betas, 0.0292 for Stable Diffusion's, as diffusers' Karras sigmas end."""
    schedule = DDPM(beta_schedule)
    beta_1 = schedule.betas[0].item()
    grid = grids.karras(10, schedule, sigma_min=0.002)
    k = schedule.at(grid[-2])
    assert (k.sigma / k.alpha).item() == pytest.approx(math.sqrt(beta_1 / (1 - beta_1)), rel=1e-9)
    assert grid[-2].item() == pytest.approx(1 / 1000, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_min .* is not below its sigma_max"):
        grids.karras(10, schedule, sigma_min=0.002, sigma_max=0.005)


def _ddpm_grid_faults(spacing: str, steps: int, n: int) -> list[str]:
    """What is wrong with ``grids.ddpm(steps, spacing, n)``, checked against each spacing's exact
    rational definition (Lin et al. 2024, Table 2) in integer arithmetic."""
    grid = grids.ddpm(steps, spacing, n)
    faults = []
    if grid.numel() != steps + 1:
        return [f"{grid.numel()} times, not {steps + 1}"]
    if not (grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())):
        faults.append("not strictly decreasing to 0")
    if (spacing == "trailing" or spacing == "linspace" and steps > 1) and grid[0] != 1:
        faults.append(f"starts at t = {grid[0].item()}, not 1")
    idx = (grid[:-1] * n).round().long().numpy() - 1  # training steps, t = (i + 1) / N
    if not torch.equal((torch.from_numpy(idx).double() + 1) / n, grid[:-1]) or idx.min() < 0 or idx.max() >= n:
        return [*faults, "times off the training steps"]
    k = np.arange(steps)
    if spacing == "leading":  # i = (steps - 1 - k) * (N // steps)
        ok = (idx == (steps - 1 - k) * (n // steps)).all()
    elif spacing == "trailing":  # i + 1 = N (steps - k) / steps, rounded: within 1/2
        ok = (np.abs(2 * steps * (idx + 1) - 2 * n * (steps - k)) <= steps).all()
    else:  # linspace: i = (N - 1) (steps - 1 - k) / (steps - 1), rounded
        div = max(steps - 1, 1)
        ok = (np.abs(2 * div * idx - 2 * (n - 1) * (steps - 1 - k)) <= div).all()
    return faults if ok else [*faults, "a step is not the training step nearest to its spacing's value"]


@pytest.mark.parametrize("num_train_steps", [1000, 500])
@pytest.mark.parametrize("spacing", grids.DDPM_SPACINGS)
def test_ddpm_grids_are_right_for_every_step_count(spacing, num_train_steps):
    """Every step count 1..N: steps + 1 times on the training steps, strictly decreasing to t = 0,
    each the training step nearest its spacing's exact value; "trailing" starts at t = 1, and so does
    "linspace" but for one step (diffusers' np.linspace of one value is its start, step 0).
    A float arange gave "trailing" one time too many for 62 of the counts 1..1000 (61, 103, 121, ...)."""
    n = num_train_steps
    faults = {steps: f for steps in range(1, n + 1) if (f := _ddpm_grid_faults(spacing, steps, n))}
    assert not faults, f"{len(faults)} step counts, e.g. {dict(list(faults.items())[:3])}"


def test_bad_grid_arguments_are_refused():
    with pytest.raises(ValueError, match=r"spacing='uniform'.*'leading', 'trailing', 'linspace'"):
        grids.ddpm(10, "uniform")
    with pytest.raises(ValueError, match="steps must be in 1..num_train_steps"):
        grids.ddpm(2000)
    with pytest.raises(ValueError, match="num_train_steps must be > 0"):
        grids.ddpm(10, num_train_steps=0)
    with pytest.raises(ValueError, match="steps_offset=1 applies to spacing='leading' only, not 'trailing'"):
        grids.ddpm(10, "trailing", steps_offset=1)
    with pytest.raises(ValueError, match="first of 1000 leading steps at training step 1000, past the last"):
        grids.ddpm(1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="shift must be > 0"):
        grids.shifted(10, 0.0)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        grids.karras(10, THEORIES["flow"][0](), sigma_min=1.0, sigma_max=0.5)
