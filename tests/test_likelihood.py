"""The probability-flow likelihood of every theory against closed forms: a Gaussian (full and diagonal
covariance) and a Gaussian mixture with their exact denoisers, whose marginal densities scipy gives at
every time; Hutchinson's estimator, its fixed probes and its per-sample seeds; our ODE integrators
against exact solutions and torchdiffeq; dequantisation and bits per dimension against the exact
probabilities of discretised data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from diffusion.likelihood import (
    bits_per_dim,
    clock,
    dequantize,
    log_likelihood,
    path_derivatives,
    pf_ode_drift,
    standard_prior,
    time_at_clock,
)
from diffusion.ode import dopri5, integrate, rk4
from diffusion.samplers import PerSampleNoise
from diffusion.schedules import DDPM
from diffusion.toy import GaussianMixture
from tests.theories import THEORIES, TrigFlow

F64 = torch.float64
GAUSSIAN = GaussianMixture.gaussian([1.0, -2.0], [[0.5, 0.2], [0.2, 0.3]])
DIAGONAL = GaussianMixture.gaussian([0.5, -1.0, 2.0], np.diag([0.4, 0.1, 0.9]).tolist())
MIXTURE = GaussianMixture(
    [0.5, 0.3, 0.2],
    [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.1], [-0.1, 0.15]]],
)
T_MIN = 1e-3
#: Theories whose t = 1 is pure noise (alpha(1) = 0): there the standard prior is the exact law.
PURE_NOISE_AT_ONE = ("flow", "flow-x0", "trig", "ddpm-scaled-v-zero-snr")


def marginal_log_density(data: GaussianMixture, schedule, t: float):
    """x -> log p_t(x) in closed form: x_t ~ sum_k w_k N(alpha m_k, alpha^2 S_k + sigma^2 I) (scipy)."""
    k = schedule.at(torch.tensor(t, dtype=F64))
    a, s = k.alpha.item(), k.sigma.item()
    comps = [multivariate_normal(a * m.numpy(), a**2 * c.numpy() + s**2 * np.eye(data.dim))
             for m, c in zip(data.means, data.covs)]

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        terms = np.stack([np.log(w) + np.atleast_1d(c.logpdf(x.numpy())) for w, c in zip(data.weights.tolist(), comps)])
        return torch.from_numpy(logsumexp(terms, axis=0))

    return log_prob


def exact_prior_likelihood(data, theory, x, **kwargs):
    schedule = THEORIES[theory][0]()
    prior = marginal_log_density(data, schedule, 1.0)
    got = log_likelihood(data.denoiser(schedule), schedule, x, t_min=T_MIN, prior=prior, **kwargs)
    return got, marginal_log_density(data, schedule, T_MIN)(x)


# --- the likelihood of every theory --------------------------------------------------------------
@pytest.mark.parametrize("theory", THEORIES)
def test_gaussian_likelihood_with_exact_trace_is_the_closed_form(theory):
    """Full covariance, points in and far out of the bulk: the ODE's log-density at t_min is the marginal's
    (measured error at rtol = atol = 1e-8: 2e-8; EDM, whose x grows to sigma_max = 80, 6e-6)."""
    x = torch.cat([GAUSSIAN.sample(4, torch.Generator().manual_seed(0)), torch.tensor([[3.0, 1.0]], dtype=F64)])
    got, expected = exact_prior_likelihood(GAUSSIAN, theory, x, trace="exact", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 if theory == "edm" else 1e-6)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_image_shaped_data_has_the_likelihood_of_its_flat_values(trace):
    """(B, 1, 2, 2) images of a 4-D Gaussian: the same numbers as the flat (B, 4) data, sample for sample,
    with the same probes (the divergence runs over every dimension of a sample, never across samples)."""
    data = GaussianMixture.gaussian([0.2, -0.4, 0.1, 0.5], (0.3 * torch.eye(4, dtype=F64) + 0.05).tolist())
    schedule = THEORIES["ddpm-linear-v"][0]()
    flat = data.sample(3, torch.Generator().manual_seed(13))
    denoiser = data.denoiser(schedule)

    def image_model(x, t):
        return denoiser(x.reshape(x.shape[0], 4), t).reshape(x.shape)

    kwargs = dict(t_min=T_MIN, trace=trace, method="rk4", steps=30)
    images = log_likelihood(image_model, schedule, flat.reshape(3, 1, 2, 2), generator=PerSampleNoise([1, 2, 3]),
                            **kwargs)
    torch.testing.assert_close(images, log_likelihood(denoiser, schedule, flat, generator=PerSampleNoise([1, 2, 3]),
                                                      **kwargs), rtol=0, atol=1e-10)
    if trace == "exact":  # and the closed form, the exact marginal at t = 1 as the prior
        exact = log_likelihood(image_model, schedule, flat.reshape(3, 1, 2, 2), t_min=T_MIN, trace="exact",
                               prior=lambda x: marginal_log_density(data, schedule, 1.0)(x.reshape(3, 4)))
        torch.testing.assert_close(exact, marginal_log_density(data, schedule, T_MIN)(flat), rtol=0, atol=1e-4)


@pytest.mark.parametrize("theory", ["flow", "ddpm-linear-eps", "ddpm-cosine-x0"])
def test_diagonal_gaussian_in_three_dimensions_with_rk4(theory):
    """RK4 in 50 equal steps of the clock (measured error < 5e-8; 3e-9 at 100 steps: fourth order)."""
    x = DIAGONAL.sample(4, torch.Generator().manual_seed(1))
    got, expected = exact_prior_likelihood(DIAGONAL, theory, x, trace="exact", method="rk4", steps=50)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("theory", THEORIES)
def test_gaussian_mixture_likelihood_is_the_mixtures_density(theory):
    """A non-linear ODE: the mixture's exact log-density at t_min, points between and inside the modes
    (measured error at rtol = atol = 1e-7: below 1e-6; EDM 1.2e-5)."""
    x = torch.cat([MIXTURE.sample(3, torch.Generator().manual_seed(2)), torch.tensor([[0.0, 0.5]], dtype=F64)])
    got, expected = exact_prior_likelihood(MIXTURE, theory, x, trace="exact", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 if theory == "edm" else 1e-5)


@pytest.mark.parametrize("theory", PURE_NOISE_AT_ONE)
def test_the_standard_prior_is_exact_where_t_one_is_pure_noise(theory):
    """No prior given: N(0, (alpha^2 + sigma^2) I) at t = 1 is N(0, I), the exact law there; and at a small
    t_min the result is the data's own density (scipy at t = 0) to about sigma(t_min)^2."""
    schedule = THEORIES[theory][0]()
    x = GAUSSIAN.sample(4, torch.Generator().manual_seed(3))
    got = log_likelihood(GAUSSIAN.denoiser(schedule), schedule, x, t_min=1e-5, trace="exact", rtol=1e-8, atol=1e-8)
    data = torch.from_numpy(multivariate_normal(GAUSSIAN.mean.numpy(), GAUSSIAN.cov.numpy()).logpdf(x.numpy()))
    torch.testing.assert_close(got, data, rtol=0, atol=1e-4)


def test_the_standard_prior_of_a_variance_preserving_path_is_the_unit_gaussian():
    x = torch.randn(3, 4, dtype=F64)
    for t_max in (0.5, 1.0):
        expected = torch.from_numpy(multivariate_normal(np.zeros(4), np.eye(4)).logpdf(x.numpy()))
        torch.testing.assert_close(standard_prior(DDPM(), t_max)(x), expected)
    # Flow matching at t = 0.5: alpha^2 + sigma^2 = 0.5.
    expected = torch.from_numpy(multivariate_normal(np.zeros(4), 0.5 * np.eye(4)).logpdf(x.numpy()))
    torch.testing.assert_close(standard_prior(THEORIES["flow"][0](), 0.5)(x), expected)


def test_a_shorter_interval_gives_the_marginal_at_its_ends():
    """t_min = 0.2, t_max = 0.7 on DDPM with the exact marginal at 0.7 as the prior: the marginal at 0.2."""
    schedule = DDPM("linear", "eps")
    x = GAUSSIAN.sample(3, torch.Generator().manual_seed(4))
    got = log_likelihood(GAUSSIAN.denoiser(schedule), schedule, x, t_min=0.2, t_max=0.7, trace="exact",
                         rtol=1e-8, atol=1e-8, prior=marginal_log_density(GAUSSIAN, schedule, 0.7))
    torch.testing.assert_close(got, marginal_log_density(GAUSSIAN, schedule, 0.2)(x), rtol=0, atol=1e-6)


# --- Hutchinson's estimator ------------------------------------------------------------------------
def test_hutchinson_with_fixed_rademacher_probes_takes_two_values_about_the_exact_one():
    """For a Gaussian the drift is affine, dx/dt = A(t) x + b(t), so a probe e held over the whole integration
    estimates e^T (int A) e. In 2-D the Rademacher probes +-(1, 1) and +-(1, -1) give tr M + s and tr M - s
    (M = int A), each with probability 1/2, symmetric about the exact value: redrawn at each step they would
    scatter instead."""
    schedule = THEORIES["ddpm-linear-v"][0]()
    x = GAUSSIAN.sample(1, torch.Generator().manual_seed(5)).expand(200, 2).contiguous()
    model = GAUSSIAN.denoiser(schedule)
    exact = log_likelihood(model, schedule, x[:1], t_min=T_MIN, trace="exact", rtol=1e-8, atol=1e-8)
    hutch = log_likelihood(model, schedule, x, t_min=T_MIN, trace="hutchinson", rtol=1e-8, atol=1e-8,
                           generator=torch.Generator().manual_seed(6))
    values = hutch - exact
    high, low = values[values > 0], values[values < 0]
    assert 60 < high.numel() < 140 and high.numel() + low.numel() == 200  # Binomial(200, 1/2): +-5.6 std
    assert float(high.std()) < 1e-6 and float(low.std()) < 1e-6  # two points, not a spread
    assert float(high.mean()) > 0.05  # the two values really differ (the covariance is not diagonal)
    assert float(high.mean() + low.mean()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_on_a_mixture(probe):
    """The mean of 300 single-probe estimates is the exact log-density within 4 standard errors, and
    averaging 4 probes shrinks the spread by about 2 (measured 2.1 and 1.9)."""
    theory = "flow"
    x = MIXTURE.sample(1, torch.Generator().manual_seed(7)).expand(300, 2).contiguous()
    one, expected = exact_prior_likelihood(MIXTURE, theory, x, probe=probe, generator=torch.Generator().manual_seed(8))
    error = one - expected
    assert abs(float(error.mean())) < 4 * float(error.std()) / math.sqrt(300), (error.mean(), error.std())
    assert float(error.std()) > 0.01
    four, _ = exact_prior_likelihood(MIXTURE, theory, x[:100], probe=probe, num_probes=4,
                                     generator=torch.Generator().manual_seed(9))
    ratio = float(error.std()) / float((four - expected[:100]).std())
    assert 1.4 < ratio < 2.8, ratio


def test_per_sample_seeds_make_a_sample_independent_of_its_batch():
    """With a PerSampleNoise and fixed steps a sample's estimate depends on its own seed alone."""
    schedule = THEORIES["trig"][0]()
    model = MIXTURE.denoiser(schedule)
    x = MIXTURE.sample(3, torch.Generator().manual_seed(10))
    kwargs = dict(t_min=T_MIN, method="rk4", steps=20)
    batch = log_likelihood(model, schedule, x, generator=PerSampleNoise([11, 12, 13]), **kwargs)
    alone = log_likelihood(model, schedule, x[2:], generator=PerSampleNoise([13]), **kwargs)
    torch.testing.assert_close(batch[2:], alone, rtol=0, atol=1e-12)
    # In 2-D a Rademacher probe is one of 4, so another seed may draw the same one; 4 seeds do not all.
    others = [log_likelihood(model, schedule, x[2:], generator=PerSampleNoise([s]), **kwargs) for s in range(14, 18)]
    assert not all(torch.allclose(other, alone) for other in others)


# --- the path's derivatives, the drift and the clock -----------------------------------------------
@pytest.mark.parametrize("theory", THEORIES)
def test_the_drift_is_the_score_form_of_the_probability_flow_ode(theory):
    """dx/dt = (alpha'/alpha) x - sigma^2 (sigma'/sigma - alpha'/alpha) grad log p_t(x) (Song et al. 2021 in
    the (alpha, sigma) form; Kingma et al. 2021), with the Gaussian's score -C^-1 (x - alpha mu) in closed
    form and alpha', sigma' by central differences."""
    schedule = THEORIES[theory][0]()
    x = GAUSSIAN.sample(5, torch.Generator().manual_seed(12))
    t, h = 0.3715, 1e-6  # inside one of DDPM's linear pieces (a difference across a knot would average two)
    k = schedule.at(t)
    a, s = k.alpha.item(), k.sigma.item()
    a_dot, s_dot = ((f(torch.tensor(t + h, dtype=F64)) - f(torch.tensor(t - h, dtype=F64))).item() / (2 * h)
                    for f in (schedule.alpha, schedule.sigma))
    cov = a**2 * GAUSSIAN.cov + s**2 * torch.eye(2, dtype=F64)
    score = -torch.linalg.solve(cov, (x - a * GAUSSIAN.mean).T).T
    expected = (a_dot / a) * x - s**2 * (s_dot / s - a_dot / a) * score
    torch.testing.assert_close(pf_ode_drift(GAUSSIAN.denoiser(schedule), schedule, x, t), expected, rtol=1e-6, atol=1e-6)



def test_path_derivatives_by_autograd_match_closed_forms():
    t = torch.tensor([0.1, 0.37, 0.9], dtype=F64)
    alpha_dot, sigma_dot = path_derivatives(TrigFlow(), t)  # no alpha_dot: autograd
    torch.testing.assert_close(alpha_dot, -math.pi / 2 * torch.sin(math.pi * t / 2))
    torch.testing.assert_close(sigma_dot, math.pi / 2 * torch.cos(math.pi * t / 2))
    ddpm = DDPM("linear", "eps", num_steps=10)
    alpha_dot, sigma_dot = path_derivatives(ddpm, t)
    knots = torch.cat([torch.ones(1, dtype=F64), ddpm.alphas_cumprod.sqrt()])  # alpha at k / N
    i = (t * 10).floor().long()
    slope = 10 * (knots[i + 1] - knots[i])
    torch.testing.assert_close(alpha_dot, slope)
    alpha = ddpm.alpha(t)
    torch.testing.assert_close(sigma_dot, -alpha * slope / ddpm.sigma(t))  # sigma = sqrt(1 - alpha^2)


@pytest.mark.parametrize("theory", THEORIES)
def test_the_clock_rises_and_inverts(theory):
    schedule = THEORIES[theory][0]()
    t = torch.linspace(0, 1, 201, dtype=F64)
    u = clock(schedule, t)
    assert u[0] == 0 and u[-1] == pytest.approx(1 if theory in PURE_NOISE_AT_ONE else u[-1].item())
    assert bool((u[1:] > u[:-1]).all())
    for s in (1e-3, 0.31, 0.77):
        assert time_at_clock(schedule, clock(schedule, s).item()) == pytest.approx(s, abs=1e-12)


# --- the integrators -------------------------------------------------------------------------------
def _decay(t, y):
    return (-t * y[0], torch.cos(torch.full_like(y[1], t)))  # y0 = exp(-t^2 / 2) y0(0), y1 = sin t


def test_rk4_is_fourth_order_and_dopri5_meets_its_tolerance():
    y0 = (torch.tensor([1.0, 2.0], dtype=F64), torch.zeros(2, dtype=F64))
    exact = (torch.tensor([1.0, 2.0], dtype=F64) * math.exp(-4.5), torch.full((2,), math.sin(3.0), dtype=F64))

    def error(y):
        return max(float((a - b).abs().max()) for a, b in zip(y, exact))

    e20, e40 = error(rk4(_decay, y0, 0.0, 3.0, 20).y), error(rk4(_decay, y0, 0.0, 3.0, 40).y)
    assert 3.6 < math.log2(e20 / e40) < 4.4
    for tol in (1e-4, 1e-8):
        sol = dopri5(_decay, y0, 0.0, 3.0, rtol=tol, atol=tol)
        assert error(sol.y) < 30 * tol and sol.nfe == 2 + 6 * (sol.steps + sol.rejected)
    back = dopri5(_decay, exact, 3.0, 0.0, rtol=1e-9, atol=1e-9).y  # backwards in time
    assert max(float((a - b).abs().max()) for a, b in zip(back, y0)) < 1e-7


def test_dopri5_agrees_with_torchdiffeq_on_a_nonlinear_system():
    torchdiffeq = pytest.importorskip("torchdiffeq")  # dev-only, the reference
    mu = torch.tensor([0.5, 1.0, 2.0], dtype=F64)[:, None]

    def van_der_pol(t, y):
        x, v = y[0][:, 0:1], y[0][:, 1:2]
        return (torch.cat([v, mu * (1 - x**2) * v - x], dim=1),)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    ours = dopri5(van_der_pol, (y0,), 0.0, 4.0, rtol=1e-9, atol=1e-9).y[0]
    ref = torchdiffeq.odeint(lambda t, y: van_der_pol(float(t), (y,))[0], y0, torch.tensor([0.0, 4.0], dtype=F64),
                             method="dopri5", rtol=1e-11, atol=1e-11)[-1]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    rk = integrate(van_der_pol, (y0,), 0.0, 4.0, method="rk4", steps=400).y[0]
    torch.testing.assert_close(rk, ref, rtol=0, atol=1e-6)


# --- bits per dimension ----------------------------------------------------------------------------
def test_dequantize_puts_each_byte_in_its_own_bin_of_width_one_128th():
    k = torch.arange(256, dtype=F64).repeat(40)
    x = dequantize((k / 127.5 - 1)[:, None], torch.Generator().manual_seed(0))[:, 0]
    low, high = k / 128 - 1, (k + 1) / 128 - 1
    assert bool(((x >= low) & (x < high)).all())
    u = (x - low) * 128  # uniform on [0, 1): mean 1/2, variance 1/12
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def test_a_uniform_density_on_the_cube_is_eight_bits():
    d = 12
    assert float(bits_per_dim(torch.tensor([-d * math.log(2.0)]), d)) == pytest.approx(8.0, abs=1e-12)
    # On [0, 1] data (data_range=1) the same uniform byte has density 1: still 8 bits.
    assert float(bits_per_dim(torch.tensor([0.0]), d, data_range=1.0)) == pytest.approx(8.0, abs=1e-12)


def test_bits_per_dim_of_dequantised_data_is_the_exact_discrete_entropy_bound():
    """Bytes of a discretised Gaussian (diagonal, wide against a bin): their exact probabilities (normal
    CDF over each bin, per dimension) give -log2 P(k) / D, which the dequantised bound E_u[-log2 p(x)] / D + 7
    approaches from above within w^2 / (24 s^2) nats (~3e-5). The training-scale constant log2(127.5) would be
    0.0056 bits off: the test tells them apart."""
    mean, std = np.array([0.1, -0.2, 0.3]), np.array([0.3, 0.25, 0.35])
    k = np.array([[140, 90, 170], [128, 100, 150], [110, 120, 180]])
    edges = k / 128 - 1
    exact = -(np.log2(norm.cdf(edges + 1 / 128, mean, std) - norm.cdf(edges, mean, std))).sum(1) / 3
    images = torch.from_numpy(np.repeat(k, 4000, axis=0) / 127.5 - 1)
    x = dequantize(images, torch.Generator().manual_seed(1)).numpy()
    log_px = torch.from_numpy(norm.logpdf(x, mean, std).sum(1))
    bound = bits_per_dim(log_px, 3).numpy().reshape(3, 4000).mean(1)
    np.testing.assert_allclose(bound, exact, atol=2e-3)
    assert not np.allclose(bound - 7 + math.log2(127.5), exact, atol=2e-3)


# --- refused inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"t_min": 0.0}, r"t_min=0.0 must lie in \(0, 1\)"),
    ({"t_min": 1.0}, r"t_min=1.0 must lie in \(0, 1\)"),
    ({"t_min": 0.5, "t_max": 0.5}, r"t_max=0.5 must lie in \(t_min, 1\]"),
    ({"t_min": 0.1, "t_max": 1.5}, r"t_max=1.5 must lie"),
    ({"t_min": 0.1, "trace": "frobenius"}, r"trace='frobenius' is not supported; allowed values: 'hutchinson', 'exact'"),
    ({"t_min": 0.1, "probe": "sphere"}, r"probe='sphere' is not supported; allowed values: 'rademacher', 'gaussian'"),
    ({"t_min": 0.1, "method": "euler"}, r"method='euler' is not supported; allowed values: 'dopri5', 'rk4'"),
    ({"t_min": 0.1, "method": "rk4", "steps": 0}, r"steps=0: the number of RK4 steps"),
    ({"t_min": 0.1, "num_probes": 0}, r"num_probes=0: Hutchinson's estimator needs"),
    ({"t_min": 0.1, "generator": PerSampleNoise([1])}, r"PerSampleNoise of 1 seeds for 2 samples"),
    ({"t_min": 0.1, "rtol": 0.0}, r"rtol must be > 0"),
])
def test_bad_arguments_are_refused_with_what_to_do(kwargs, match):
    schedule = THEORIES["flow"][0]()
    with pytest.raises(ValueError, match=match):
        log_likelihood(GAUSSIAN.denoiser(schedule), schedule, torch.zeros(2, 2, dtype=F64), **kwargs)


def test_bad_data_is_refused():
    schedule = THEORIES["flow"][0]()
    model = GAUSSIAN.denoiser(schedule)
    with pytest.raises(ValueError, match=r"x0 must be a batch \(B, \.\.\.\)"):
        log_likelihood(model, schedule, torch.zeros(2, dtype=F64), t_min=0.1)
    with pytest.raises(ValueError, match="x0 must hold finite floating-point values"):
        log_likelihood(model, schedule, torch.tensor([[0.0, float("nan")]]), t_min=0.1)
    with pytest.raises(ValueError, match="num_dims=0"):
        bits_per_dim(torch.zeros(1), 0)
