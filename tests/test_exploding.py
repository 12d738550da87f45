"""EDM and the VE SDE: their two definitions and input maps against the papers' formulas, against
diffusers' EDMEulerScheduler and k-diffusion's samplers, and trained from their configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hydra.utils import instantiate

from diffusion.objective import DiffusionObjective
from diffusion.samplers import dpmpp_2m, euler, grids, heun
from diffusion.schedules import EDM, DDPM, FlowMatching, VarianceExploding, check_theory, with_model_input
from diffusion.timesteps import LogNormalNoise, LogUniformNoise
from diffusion.toy import GaussianMixture
from diffusion.weighting import EDMWeighting, NoWeighting
from tests import kdiffusion
from tests.theories import THEORIES, TrigFlow

F64 = torch.float64
MIXTURE = GaussianMixture(
    [0.5, 0.3, 0.2],
    [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]],
    [[[0.1, 0.02], [0.02, 0.05]], [[0.05, 0.0], [0.0, 0.1]], [[0.06, -0.02], [-0.02, 0.04]]],
)


def _edm_paper(sigma, s=0.5):
    """EDM's preconditioning as Table 1 writes it."""
    c_skip = s**2 / (sigma**2 + s**2)
    c_out = sigma * s / torch.sqrt(sigma**2 + s**2)
    c_in = 1 / torch.sqrt(sigma**2 + s**2)
    return c_skip, c_out, c_in, torch.log(sigma) / 4


def test_edm_is_the_preconditioned_denoiser_of_the_paper():
    """D = c_skip x_t + c_out F(c_in x_t; c_noise) recovers x0 when F hits our target, the input
    map is (c_in x_t, c_noise), and the loss weight lambda(sigma) = 1 / c_out^2 is 1 on F."""
    schedule = EDM()
    check_theory(schedule)
    t = torch.linspace(0.05, 1, 20, dtype=F64)
    k = schedule.at(t)
    sigma = k.sigma
    c_skip, c_out, c_in, c_noise = _edm_paper(sigma)
    torch.testing.assert_close(sigma, 80 * t**7)
    x0, xT = torch.randn(20, 3, dtype=F64), torch.randn(20, 3, dtype=F64)
    x_t = k.like(x0).add_noise(x0, xT)
    target = k.like(x0).target(x0, xT)
    torch.testing.assert_close(c_skip[:, None] * x_t + c_out[:, None] * target, x0)
    torch.testing.assert_close(k.like(x0).split(x_t, target)[0], x0)
    x_in, noise_label = schedule.model_input(x_t, t)
    torch.testing.assert_close(x_in, c_in[:, None] * x_t)
    torch.testing.assert_close(noise_label, c_noise)
    lam = (sigma**2 + 0.5**2) / (sigma * 0.5) ** 2  # eq. 8
    torch.testing.assert_close(EDMWeighting(0.5)(k), lam * c_out**2)
    torch.testing.assert_close(EDMWeighting(0.5)(k), torch.ones_like(t))


def test_edm_loss_is_the_papers_loss_on_the_denoiser():
    """Our MSE on F with EDM's weight equals lambda(sigma) |D(x_t) - x0|^2 of Karras et al. (eq. 2, 8)."""
    schedule = EDM()
    objective = DiffusionObjective(schedule, LogNormalNoise(), EDMWeighting())
    network = torch.nn.Linear(4, 4).double()

    def backbone(x_in, noise_label):
        return network(x_in) * (1 + noise_label[:, None])

    model = with_model_input(backbone, schedule)
    x0 = torch.randn(16, 4, dtype=F64)
    out = objective(model, x0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws: the times, then the noise
    t = objective.time_distribution.sample(16, size=(1, 4), generator=g).to(F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    torch.testing.assert_close(out.t.to(F64), t)
    sigma = 80 * t**7
    c_skip, c_out, c_in, c_noise = _edm_paper(sigma)
    x_t = x0 + sigma[:, None] * noise
    denoised = c_skip[:, None] * x_t + c_out[:, None] * backbone(c_in[:, None] * x_t, c_noise)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    paper = (lam[:, None] * (denoised - x0) ** 2).mean(1)
    torch.testing.assert_close(out.per_sample.to(F64), paper, rtol=1e-5, atol=1e-6)


def test_log_normal_noise_levels_are_log_normal_for_any_theory():
    """ln(sigma / alpha) of the drawn times ~ N(-1.2, 1.2^2) (KS test), under EDM and under flow
    matching, whose times it maps through the bisection of t_at_log_snr."""
    for schedule in (EDM(), FlowMatching()):
        dist = LogNormalNoise()
        dist.bind(schedule)
        t = dist.sample(4000, generator=torch.Generator().manual_seed(1)).to(F64)
        k = schedule.at(t)
        levels = torch.log(k.sigma / k.alpha).numpy()
        assert scipy.stats.kstest(levels, scipy.stats.norm(-1.2, 1.2).cdf).pvalue > 0.01
    with pytest.raises(ValueError, match=r"call bind\(schedule\)"):
        LogNormalNoise().sample(4)


def test_ve_path_and_its_log_uniform_levels():
    """sigma(t)^2 = sigma_min^2 ((sigma_max / sigma_min)^2t - 1), the VE SDE's exact marginal from clean
    data, and ln sigma of the training draws ~ U(ln 0.01, ln 50)."""
    schedule = VarianceExploding()
    check_theory(schedule)
    t = torch.linspace(0, 1, 11, dtype=F64)
    expected = 0.01 * torch.sqrt((50 / 0.01) ** (2 * t) - 1)
    torch.testing.assert_close(schedule.sigma(t), expected, rtol=1e-12, atol=0)
    # d sigma^2 / dt = 2 log(r) sigma_min^2 r^2t: the VE SDE's diffusion coefficient squared.
    torch.testing.assert_close(2 * schedule.sigma(t[1:]) * schedule.sigma_dot(t[1:]),
                               2 * math.log(5000) * 0.01**2 * 5000 ** (2 * t[1:]))
    torch.testing.assert_close(schedule.t_at_log_snr(schedule.log_snr(t[1:])), t[1:])
    dist = LogUniformNoise()
    dist.bind(schedule)
    levels = torch.log(schedule.sigma(dist.sample(4000, generator=torch.Generator().manual_seed(2)).to(F64)))
    uniform = scipy.stats.uniform(math.log(0.01), math.log(50) - math.log(0.01))
    assert scipy.stats.kstest(levels.numpy(), uniform.cdf).pvalue > 0.01
    x = torch.randn(3, 2, 4, 4)
    x_in, label = schedule.model_input(x, torch.full((3,), 0.5))
    sigma = schedule.sigma(torch.tensor(0.5))
    torch.testing.assert_close(x_in, x / torch.sqrt(sigma**2 + 0.25))
    torch.testing.assert_close(label, torch.log(sigma / 2).expand(3))
    x_raw, _ = VarianceExploding(sigma_data=None).model_input(x, torch.full((3,), 0.5))
    assert torch.equal(x_raw, x)


def test_today_s_theories_keep_the_identity_input():
    backbone = object()
    for schedule in (FlowMatching(), DDPM(), TrigFlow()):
        assert with_model_input(backbone, schedule) is backbone
        assert schedule.prior_std(1.0) == pytest.approx(1.0, abs=1e-15)
    assert EDM().prior_std() == pytest.approx(math.sqrt(1 + 80**2))


def test_edm_euler_matches_diffusers_edm_euler_scheduler():
    """diffusers' EDMEulerScheduler (Karras sigmas, c_in, c_noise = log(sigma) / 4, c_skip / c_out on
    an 'epsilon' output, i.e. our F) and our euler on EDM's Karras grid, with the same network, agree
    in float64 step for step, the network's inputs included."""
    from diffusers import EDMEulerScheduler

    steps = 12
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    scheduler.set_timesteps(steps)
    torch.manual_seed(0)
    weight = torch.randn(4, 4, dtype=F64) / 2
    seen = {"ours": [], "theirs": []}

    def network(x_in, label, who):
        seen[who].append((x_in.clone(), label.clone()))
        return torch.tanh(x_in @ weight) * torch.cos(label)[:, None]

    x = torch.randn(8, 4, dtype=F64) * scheduler.init_noise_sigma
    theirs = x.clone()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(theirs, t)
        out = network(model_in, t.to(F64).expand(8), "theirs")
        theirs = scheduler.step(out, t, theirs).prev_sample
    schedule = EDM()
    grid = grids.karras(steps, schedule, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    torch.testing.assert_close(schedule.sigma(grid), scheduler.sigmas.to(F64), rtol=1e-6, atol=1e-12)
    ours = euler(with_model_input(lambda x_in, label: network(x_in, label, "ours"), schedule), schedule, x, grid)
    for (a_in, a_label), (b_in, b_label) in zip(seen["ours"], seen["theirs"]):
        torch.testing.assert_close(a_label, b_label, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a_in, b_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


KDIFFUSION = {"euler": (euler, "sample_euler"), "heun": (heun, "sample_heun"), "dpmpp_2m": (dpmpp_2m, "sample_dpmpp_2m")}


@pytest.mark.parametrize("theory", ["edm", "ve"])
@pytest.mark.parametrize("sampler", KDIFFUSION)
def test_samplers_equal_k_diffusion_on_a_variance_exploding_path(theory, sampler):
    """alpha = 1, so k-diffusion's sigma is ours and its denoiser our x0_hat: the same start gives the
    same trajectory, step by step, in float64, with the exact (nonlinear) denoiser of a mixture.
    Heun at EDM's 18 steps is the paper's Algorithm 1 (35 model evaluations)."""
    k_sampling = kdiffusion.sampling()
    ours_fn, theirs_name = KDIFFUSION[sampler]
    make, grid_of = THEORIES[theory]
    schedule, steps = make(), 18
    grid = grid_of(steps)
    sigmas = schedule.at(grid).sigma
    if theory == "edm":
        reference_sigmas = k_sampling.get_sigmas_karras(steps, 0.002, 80.0, 7.0, device="cpu").to(F64)
        torch.testing.assert_close(sigmas, reference_sigmas, rtol=1e-6, atol=1e-9)  # theirs is float32
    model = MIXTURE.denoiser(schedule)
    calls = {"ours": 0, "theirs": 0}

    def counted(x, t):
        calls["ours"] += 1
        return model(x, t)

    def denoise(x, sigma):
        calls["theirs"] += 1
        t = schedule.t_at_log_snr(-2 * torch.log(sigma[:1])).expand(x.shape[0])
        return schedule.at(t[:1]).split(x, model(x, t))[0]

    x = MIXTURE.sample_noisy(256, 1.0, sigmas[0].item(), torch.Generator().manual_seed(3))
    ours_steps, theirs_steps = [], []
    ours = ours_fn(counted, schedule, x, grid, callback=lambda info: ours_steps.append(info.x))
    theirs = getattr(k_sampling, theirs_name)(denoise, x, sigmas, disable=True,
                                              callback=lambda info: theirs_steps.append(info["x"]))
    for i in range(1, steps):  # k-diffusion reports x before each step, ours after
        torch.testing.assert_close(ours_steps[i - 1], theirs_steps[i], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    assert calls["ours"] == calls["theirs"] == (35 if sampler == "heun" else 18)


@pytest.mark.parametrize("theory", ["edm", "ve"])
def test_heun_converges_to_the_mixture(theory):
    """From the exact marginal at sigma_max: covariance within 10 % at EDM's 18 steps and 3 % at 40
    (measured 6.4 % and 1.3 % for EDM, whose narrow components need the steps), mean within 0.02."""
    make, grid_of = THEORIES[theory]
    schedule = make()
    errors = []
    for steps in (18, 40):
        grid = grid_of(steps)
        x = MIXTURE.sample_noisy(20_000, 1.0, schedule.at(grid[0]).sigma.item(), torch.Generator().manual_seed(4))
        out = heun(MIXTURE.denoiser(schedule), schedule, x, grid)
        assert (out.mean(0) - MIXTURE.mean).norm() < 0.02
        errors.append(((torch.cov(out.T) - MIXTURE.cov).norm() / MIXTURE.cov.norm()).item())
    assert errors[0] < 0.1 and errors[1] < 0.03 and errors[1] < errors[0], errors


@pytest.mark.parametrize("name", ["edm", "ve"])
def test_configs_compose_the_theory_and_set_the_backbones_time_scale(name, train_config):
    cfg = train_config(f"schedule={name}")
    assert cfg.backbone.time_scale == 1.0
    assert train_config(f"schedule={name}", "backbone.time_scale=2.0").backbone.time_scale == 2.0
    schedule = instantiate(cfg.schedule.schedule)
    objective = DiffusionObjective(schedule, instantiate(cfg.schedule.time_distribution),
                                   instantiate(cfg.schedule.weighting))
    assert isinstance(objective.weighting, EDMWeighting if name == "edm" else NoWeighting)
    grid = instantiate(cfg.schedule.grid)(18, schedule=schedule)
    levels = schedule.at(grid[:-1]).sigma
    low, high = (0.002, 80.0) if name == "edm" else (0.01, 50.0)
    assert levels[0].item() == pytest.approx(high, rel=1e-6) and levels[-1].item() == pytest.approx(low, rel=1e-9)
    if name == "ve":  # geometric
        ratios = (levels[1:] / levels[:-1]).numpy()
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
