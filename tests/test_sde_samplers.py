"""The stochastic samplers (sde, euler_ancestral, dpmpp_2m_sde) for every theory: the exact law of
their samples against the data, k-diffusion's samplers and SiT's Euler–Maruyama step given the same
noise, per-sample noise, and their configs."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from diffusion import sampling_options
from diffusion.samplers import (DIFFUSION_FORMS, PerSampleNoise, ancestral, dpmpp_2m, dpmpp_2m_sde, euler,
                                euler_ancestral, get_sampler, grids, sde)
from tests import kdiffusion
from tests.conftest import compose_config
from tests.test_samplers import GAUSSIAN, MIXTURE, _start
from tests.theories import THEORIES

F64 = torch.float64
STOCHASTIC = {"sde": sde, "euler_ancestral": euler_ancestral, "dpmpp_2m_sde": dpmpp_2m_sde}


class ProbeNoise(PerSampleNoise):
    """The noise of probe rows: draw k is zero but for a 1 at row ``1 + D + k D + j``, column j."""

    def __init__(self, rows: int, dim: int):
        super().__init__(range(rows))
        self.dim, self.draws = dim, 0

    def randn(self, shape, *, device=None, dtype=None):
        out = torch.zeros(shape, dtype=dtype, device=device)
        for j in range(self.dim):
            out[1 + self.dim * (1 + self.draws) + j, j] = 1
        self.draws += 1
        return out


def exact_law_error(theory: str, sampler, steps: int, grid: torch.Tensor | None = None) -> float:
    """With the exact (linear) denoiser of a Gaussian, a stochastic sampler's output is affine in its
    start z and its noises z_k: ``b + A z + sum_k C_k z_k``. Probe rows read off b, A and every C_k
    (one noise draw per step at most), so the law N(b, A A^T + sum C_k C_k^T) is exact, no Monte
    Carlo. Returns the norm of its mean's and covariance's errors against the data (t = 0)."""
    make, grid_of = THEORIES[theory]
    schedule = make()
    grid = grid_of(steps) if grid is None else grid
    dim, n = GAUSSIAN.dim, grid.numel() - 1
    probes = torch.zeros(1 + dim * (1 + n), dim, dtype=F64)
    probes[1:1 + dim] = torch.eye(dim, dtype=F64)
    start = _start(GAUSSIAN, schedule, grid, probes)
    noise = ProbeNoise(probes.shape[0], dim)
    out = sampler(GAUSSIAN.denoiser(schedule), schedule, start, grid, generator=noise)
    assert noise.draws <= n
    b, columns = out[0], (out[1:] - out[0]).T  # (D, D * (1 + n)): [A, C_1, ..., C_n]
    k = schedule.at(grid[-1])
    mean, cov = k.alpha * GAUSSIAN.mean, k.alpha**2 * GAUSSIAN.cov + k.sigma**2 * torch.eye(dim, dtype=F64)
    return ((b - mean).norm() + (columns @ columns.T - cov).norm()).item()


def test_the_probes_give_the_law_of_the_samples():
    """The exact law against 200,000 samples of DPM-Solver++(2M) SDE at 5 steps (far from the data's, so
    the check has something to see): the covariance's error norm agrees within Monte Carlo error."""
    schedule, grid = THEORIES["ddpm-linear-v"][0](), grids.ddpm(5, "trailing")
    z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = dpmpp_2m_sde(GAUSSIAN.denoiser(schedule), schedule, _start(GAUSSIAN, schedule, grid, z), grid,
                     generator=torch.Generator().manual_seed(1))
    monte_carlo = ((x.mean(0) - GAUSSIAN.mean).norm() + (torch.cov(x.T) - GAUSSIAN.cov).norm()).item()
    assert exact_law_error("ddpm-linear-v", dpmpp_2m_sde, 5) == pytest.approx(monte_carlo, abs=0.01)
    assert monte_carlo > 0.05


THEORIES_TESTED = ["flow", "ddpm-linear-eps", "ddpm-linear-v", "trig", "ddpm-scaled-v-zero-snr"]


@pytest.mark.parametrize("sampler", STOCHASTIC)
@pytest.mark.parametrize("theory", THEORIES_TESTED)
def test_the_law_of_the_samples_converges_to_the_data(theory, sampler):
    """Exact laws at 25 and 100 steps on each theory's grid: each sampler is first order in law (the
    error falls at least 2.5x for 4x the steps; measured 2.8-9.7x), and within 12 % of the covariance's
    norm at 100 steps (measured 0.6-9.5 %, the most for Euler ancestral on DDPM's paths)."""
    e25, e100 = (exact_law_error(theory, STOCHASTIC[sampler], n) for n in (25, 100))
    assert e100 < e25 / 2.5 and e100 < 0.12 * GAUSSIAN.cov.norm().item(), (e25, e100)


@pytest.mark.parametrize("form", DIFFUSION_FORMS)
def test_every_diffusion_form_converges(form):
    """Flow matching for each form but SBDM, which is infinite at its t = 1; SBDM on DDPM's path.
    Measured: the error falls 2.6-4.6x from 25 to 100 steps, to 0.5-1.4 % of the covariance's norm."""
    theory = "ddpm-linear-eps" if form == "SBDM" else "flow"
    e25, e100 = (exact_law_error(theory, partial(sde, diffusion_form=form), n) for n in (25, 100))
    assert e100 < e25 / 2.5 and e100 < 0.1 * GAUSSIAN.cov.norm().item(), (e25, e100)


# --- against the references, given the same noise ------------------------------------------
def _ve_denoiser(model, schedule, grid):
    """k-diffusion's D(y, sigma_ve) for a path: ``x = alpha y`` at the grid time of ``sigma_ve``, x0_hat out."""
    coeffs = schedule.at(grid)
    levels = coeffs.sigma / coeffs.alpha

    def denoise(y, level):
        i = int(torch.argmin((levels - level[0]).abs()))
        k = schedule.at(grid[i])
        t = torch.full((y.shape[0],), grid[i].item(), dtype=F64)
        return k.split(k.alpha * y, model(k.alpha * y, t))[0]

    return denoise, levels


KDIFFUSION = {"euler_ancestral": "sample_euler_ancestral", "dpmpp_2m_sde": "sample_dpmpp_2m_sde"}
# Paths with alpha > 0 at the grid's start, since k-diffusion's levels sigma / alpha must be finite.
REFERENCE_GRIDS = {
    "flow": lambda n: torch.linspace(0.99, 0, n + 1, dtype=F64),
    "trig": lambda n: torch.linspace(0.99, 0, n + 1, dtype=F64),
    "ddpm-linear-eps": lambda n: grids.ddpm(n, "trailing"),
    "ddpm-linear-v": lambda n: grids.ddpm(n, "trailing"),
    "ddpm-cosine-x0": lambda n: grids.karras(n, THEORIES["ddpm-cosine-x0"][0]()),
    "edm": THEORIES["edm"][1],  # alpha = 1: k-diffusion's view is the path itself
    "ve": THEORIES["ve"][1],
}


@pytest.mark.parametrize("sampler", KDIFFUSION)
@pytest.mark.parametrize("theory", REFERENCE_GRIDS)
def test_trajectory_equals_k_diffusion_given_the_same_noise(theory, sampler):
    """In k-diffusion's variance-exploding view ``y = x / alpha``, ``sigma_ve = sigma / alpha``, the
    same noises (k-diffusion's noise_sampler draws from a generator seeded as ours) give the same
    trajectory, step by step, in float64, for the nonlinear denoiser of a Gaussian mixture."""
    k_sampling = kdiffusion.sampling()
    schedule, steps = THEORIES[theory][0](), 12
    grid = REFERENCE_GRIDS[theory](steps)
    model = MIXTURE.denoiser(schedule)
    x = _start(MIXTURE, schedule, grid, torch.zeros(64, 2, dtype=F64))
    ours = []
    out = STOCHASTIC[sampler](model, schedule, x, grid, generator=torch.Generator().manual_seed(5),
                              callback=lambda info: ours.append(info.x))
    denoise, levels = _ve_denoiser(model, schedule, grid)
    g = torch.Generator().manual_seed(5)
    theirs = []
    reference = getattr(k_sampling, KDIFFUSION[sampler])(
        denoise, x / schedule.at(grid[0]).alpha, levels, disable=True,
        noise_sampler=lambda *_: torch.randn(x.shape, generator=g, dtype=F64),
        callback=lambda info: theirs.append(info["x"]))
    alphas = schedule.at(grid).alpha
    for i in range(1, steps):  # k-diffusion reports x before each step, ours after
        torch.testing.assert_close(ours[i - 1], alphas[i] * theirs[i], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


def _sit_em(velocity_model, x, steps, form, norm, generator):
    """SiT's Euler–Maruyama sampler (transport/integrators.py, sde.sample) written directly in SiT's
    time u = 1 - t (u = 0 noise, u = 1 data), on its linear path x = u x0 + (1 - u) eps:
    ``x += (v + D score) du + sqrt(2 D) dW`` at u = 0, 1/n, ..., then its "Tweedie" last step
    ``x / alpha + sigma^2 / alpha score``. v and the score come from the velocity model's output,
    ``v_ours = eps - x0``, as SiT's get_score_from_velocity does."""
    du = 1 / steps

    def drift_and_score(x, u):
        v_ours = velocity_model(x, torch.full((x.shape[0],), 1 - u, dtype=F64))
        # x = u x0 + (1 - u) eps and v_ours = eps - x0  =>  eps = u v_ours + x.
        eps = u * v_ours + x
        return -v_ours, -eps / (1 - u)

    forms = {"constant": lambda u: norm, "sigma": lambda u: norm * (1 - u), "linear": lambda u: norm * (1 - u),
             "decreasing": lambda u: 0.25 * (norm * math.cos(math.pi * u) + 1) ** 2,
             "increasing-decreasing": lambda u: norm * math.sin(math.pi * u) ** 2}
    for i in range(steps - 1):
        u = i * du
        v, score = drift_and_score(x, u)
        dw = torch.randn(x.shape, generator=generator, dtype=F64) * math.sqrt(du)
        diffusion = forms[form](u)
        x = x + (v + diffusion * score) * du + math.sqrt(2 * diffusion) * dw
    u = (steps - 1) * du
    _, score = drift_and_score(x, u)
    return x / u + (1 - u) ** 2 / u * score


@pytest.mark.parametrize("form", [f for f in DIFFUSION_FORMS if f != "SBDM"])
def test_sde_is_sits_euler_maruyama_on_the_linear_path(form):
    """Flow matching's path is linear, so the slopes over a step are its derivatives and each step is
    SiT's exactly: the same samples given the same noise (SiT's forms read in its own time)."""
    schedule, steps, norm = THEORIES["flow"][0](), 20, 0.7
    model = MIXTURE.denoiser(schedule)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = sde(model, schedule, x, grids.uniform(steps), diffusion_form=form, diffusion_norm=norm,
               generator=torch.Generator().manual_seed(4))
    theirs = _sit_em(model, x, steps, form, norm, torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("theory", THEORIES)
def test_limits_are_the_deterministic_and_ancestral_samplers(theory):
    """No diffusion is Euler; eta = 0 is DPM-Solver++(2M); Euler ancestral is DDPM ancestral (DDIM,
    eta = 1) given the same noise, since Karras' sigma_up is the posterior's standard deviation."""
    make, grid_of = THEORIES[theory]
    schedule, grid = make(), grid_of(10)
    model = MIXTURE.denoiser(schedule)
    x = _start(MIXTURE, schedule, grid, torch.zeros(32, 2, dtype=F64))

    def run(sampler, **kwargs):
        return sampler(model, schedule, x, grid, generator=torch.Generator().manual_seed(9), **kwargs)

    close = partial(torch.testing.assert_close, rtol=1e-10, atol=1e-10)
    close(run(sde, diffusion_norm=0.0), euler(model, schedule, x, grid))
    close(run(dpmpp_2m_sde, eta=0.0), dpmpp_2m(model, schedule, x, grid))
    close(run(euler_ancestral), run(ancestral))
    close(run(euler_ancestral, eta=0.4), run(get_sampler("ddim"), eta=0.4))


# --- noise per sample ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", STOCHASTIC)
@pytest.mark.parametrize("theory", ["flow", "ddpm-linear-eps"])
def test_each_sample_depends_on_its_own_seed_only(theory, sampler):
    """A batch with PerSampleNoise gives each row exactly what sampling it alone gives."""
    make, grid_of = THEORIES[theory]
    schedule, grid = make(), grid_of(8)
    model, seeds = MIXTURE.denoiser(schedule), [3, 14, 15, 92]
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    batch = STOCHASTIC[sampler](model, schedule, x, grid, generator=PerSampleNoise(seeds))
    for i, seed in enumerate(seeds):
        alone = STOCHASTIC[sampler](model, schedule, x[i:i + 1], grid, generator=PerSampleNoise([seed]))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    assert len({tuple(row.tolist()) for row in batch}) == 4


# --- configs and bad input ----------------------------------------------------------------
@pytest.mark.parametrize("name", STOCHASTIC)
def test_each_sampler_config_builds_its_sampler_with_its_options(name, tmp_path):
    cfg = compose_config("sample", [f"sampler={name}"], tmp_path)
    options = sampling_options.sampler_group_options(cfg.sampler, cfg.sampler.name)
    assert cfg.sampler.name == name
    assert options == ({"diffusion_form": "sigma", "diffusion_norm": 1.0} if name == "sde" else {})
    schedule = THEORIES["flow"][0]()
    x = torch.randn(4, 2, dtype=F64)
    grid = grids.uniform(cfg.sampler.steps)
    expected = STOCHASTIC[name](GAUSSIAN.denoiser(schedule), schedule, x, grid, generator=torch.Generator().manual_seed(0))
    built = get_sampler(name, **options)(GAUSSIAN.denoiser(schedule), schedule, x, grid,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(built, expected, rtol=0, atol=0)


def test_an_overridden_option_reaches_the_sampler(tmp_path):
    cfg = compose_config("sample", ["sampler=sde", "sampler.diffusion_form=constant", "sampler.diffusion_norm=0"],
                         tmp_path)
    options = sampling_options.sampler_group_options(cfg.sampler, "sde")
    assert options == {"diffusion_form": "constant", "diffusion_norm": 0}
    schedule, grid, x = THEORIES["flow"][0](), grids.uniform(6), torch.randn(4, 2, dtype=F64)
    model = GAUSSIAN.denoiser(schedule)
    torch.testing.assert_close(get_sampler("sde", **options)(model, schedule, x, grid), euler(model, schedule, x, grid))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"sampler=sde has no option diffusion; its options: diffusion_form, diffusion_norm"):
        sampling_options.sampler_group_options({"name": "sde", "steps": 5, "diffusion": "sigma"}, "sde")
    with pytest.raises(ValueError, match="sampler=heun has no option eta; its options: none"):
        get_sampler("heun", eta=1.0)
    schedule, x = THEORIES["flow"][0](), torch.zeros(2, 2, dtype=F64)
    model = GAUSSIAN.denoiser(schedule)
    with pytest.raises(ValueError, match=r"diffusion_form='sbdm' is not supported; allowed values: 'sigma'"):
        sde(model, schedule, x, grids.uniform(4), diffusion_form="sbdm")
    with pytest.raises(ValueError, match="diffusion_norm=-1.0: must be a finite number >= 0"):
        sde(model, schedule, x, grids.uniform(4), diffusion_norm=-1.0)
    with pytest.raises(ValueError, match="diffusion_form='SBDM' is infinite at t = 1, where alpha = 0"):
        sde(model, schedule, x, grids.uniform(4), diffusion_form="SBDM")
    for sampler in (euler_ancestral, dpmpp_2m_sde):
        with pytest.raises(ValueError, match=r"eta=1.5: must be in \[0, 1\]"):
            sampler(model, schedule, x, grids.uniform(4), eta=1.5)
    sampling_options.check_eta(0.5, "dpmpp_2m_sde")
    with pytest.raises(ValueError, match="eta=0.5 applies to sampler=ddim, euler_ancestral, dpmpp_2m_sde only"):
        sampling_options.check_eta(0.5, "sde")
