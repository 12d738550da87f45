"""The two definitions of each theory and what the base class derives from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion.samplers import SAMPLERS, grids
from diffusion.schedules import DDPM, FlowMatching, Schedule
from diffusion.toy import GaussianMixture
from tests.conftest import CONF, ROOT, compose_config
from tests.theories import THEORIES, TrigFlow

F64 = torch.float64


def _times(n=257, lo=1e-3):
    return torch.linspace(lo, 1, n, dtype=F64)


@pytest.mark.parametrize("name", THEORIES)
def test_oracle_step_lands_on_the_data_definition(name):
    """With the exact model output, one deterministic step from x_t is x_s of the data definition."""
    schedule = THEORIES[name][0]()
    g = torch.Generator().manual_seed(0)
    x0, xT = (torch.randn(64, 3, 4, 4, generator=g, dtype=F64) for _ in range(2))
    t = torch.rand(64, generator=g, dtype=F64) * 0.999 + 0.001
    s = t * torch.rand(64, generator=g, dtype=F64)
    x_t = schedule.add_noise(x0, xT, t)
    oracle = schedule.target(x0, xT, t)
    x0_hat, xT_hat = schedule.split(x_t, oracle, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xT_hat, xT, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.step(x_t, oracle, t, s), schedule.add_noise(x0, xT, s), rtol=1e-12, atol=1e-12)


def test_flow_matching_coefficients():
    t = _times()
    k = FlowMatching().at(t)
    torch.testing.assert_close(k.alpha, 1 - t)
    torch.testing.assert_close(k.sigma, t)
    torch.testing.assert_close(k.target(torch.zeros(1), torch.ones(1)), torch.ones_like(t))  # target = xT - x0
    torch.testing.assert_close(k.c, -torch.ones_like(t))
    torch.testing.assert_close(FlowMatching().snr(t), (1 - t) ** 2 / t**2)


@pytest.mark.parametrize("prediction,c,d", [("eps", lambda a, s: 0 * a, lambda a, s: 1 + 0 * a),
                                            ("v", lambda a, s: -s, lambda a, s: a),
                                            ("x0", lambda a, s: 1 + 0 * a, lambda a, s: 0 * a)])
def test_ddpm_coefficients_on_the_training_steps(prediction, c, d):
    schedule = DDPM("linear", prediction)
    t = (torch.arange(1000, dtype=F64) + 1) / 1000  # step i sits at t = (i + 1) / N
    k = schedule.at(t)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    torch.testing.assert_close(k.alpha, abar.sqrt(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(k.sigma, (1 - abar).sqrt(), rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(k.c, c(k.alpha, k.sigma))
    torch.testing.assert_close(k.d, d(k.alpha, k.sigma))
    assert schedule.at(0.0).alpha.item() == 1.0 and schedule.at(0.0).sigma.item() == 0.0


def test_ddpm_path_is_variance_preserving_and_monotone_between_steps():
    schedule = DDPM("cosine", "v")
    t = torch.linspace(0, 1, 10007, dtype=F64)  # off the knots
    k = schedule.at(t)
    torch.testing.assert_close(k.alpha**2 + k.sigma**2, torch.ones_like(t))
    assert bool((k.alpha[1:] < k.alpha[:-1]).all())


def test_ddpm_float32_sigma_is_accurate_near_data():
    """sigma is computed in float64 and cast: 1 - alpha^2 in float32 would lose every digit."""
    t = torch.tensor([1e-3, 2e-3], dtype=torch.float32)
    s32 = DDPM().sigma(t)
    s64 = DDPM().sigma(t.double())
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-6, atol=0)


def test_zero_terminal_snr_reaches_pure_noise():
    schedule = DDPM("scaled_linear", "v", zero_terminal_snr=True)
    k = schedule.at(1.0)
    assert k.alpha.item() == pytest.approx(0.0, abs=1e-12) and k.sigma.item() == pytest.approx(1.0)
    assert schedule.log_snr(torch.tensor([1.0], dtype=F64)).item() == float("-inf")
    # The first step keeps its SNR (Lin et al. 2024, Algorithm 1).
    plain = DDPM("scaled_linear", "v")
    torch.testing.assert_close(schedule.alphas_cumprod[0], plain.alphas_cumprod[0])


def test_log_snr_is_twice_log_alpha_over_sigma():
    t = _times()
    schedule = DDPM("linear", "eps")
    abar = schedule.at(t).alpha ** 2
    torch.testing.assert_close(schedule.log_snr(t), torch.log(abar / (1 - abar)))


@pytest.mark.parametrize("name", THEORIES)
def test_t_at_log_snr_inverts_log_snr(name):
    schedule = THEORIES[name][0]()
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    torch.testing.assert_close(schedule.t_at_log_snr(schedule.log_snr(t)), t, rtol=1e-9, atol=1e-12)


def _readme_theory() -> Schedule:
    """The new theory of the README's "A new theory is a subclass of a few lines", run as written."""
    text = (ROOT / "README.md").read_text()
    block = text.split("A new theory is a subclass of a few lines:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(block, namespace)
    return namespace["TrigFlow"]()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_new_theory_of_the_readme_runs_every_sampler(sampler):
    """As the README promises: its few lines are a theory every sampler draws a Gaussian with.
    Mean within 0.03 (6 standard errors) and covariance within 6 % at 100 steps (Euler: 3 %)."""
    schedule = _readme_theory()
    torch.testing.assert_close(schedule.at(_times()).c, TrigFlow().at(_times()).c)  # v-prediction of the trig path
    data = GaussianMixture.gaussian([1.0, -2.0], [[0.5, 0.2], [0.2, 0.3]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 2, generator=g, dtype=F64)  # alpha(1) = cos(pi / 2) ~ 6e-17: pure noise
    kwargs = {"generator": g} if sampler in ("ddim", "ancestral") else {}
    out = SAMPLERS[sampler](data.denoiser(schedule), schedule, x, grids.uniform(100), **kwargs)
    assert (out.mean(0) - data.mean).norm() < 0.03
    assert (torch.cov(out.T) - data.cov).norm() < 0.06 * data.cov.norm()


DDPM_OPTIONS = sorted(p.stem for p in Path(CONF, "schedule").glob("ddpm*.yaml"))


@pytest.mark.parametrize("num_steps", [None, 500])
@pytest.mark.parametrize("option", DDPM_OPTIONS)
def test_a_ddpm_run_keeps_its_number_of_training_steps_in_one_key(option, num_steps, tmp_path):
    """schedule.schedule.num_steps is N; the training-time distribution and the sampling grid
    (the group's and the module's) read it, so one override changes all three."""
    from hydra.utils import instantiate

    overrides = [f"schedule={option}"] + ([f"schedule.schedule.num_steps={num_steps}"] if num_steps else [])
    cfg = compose_config("train", overrides, tmp_path)
    n = num_steps or 1000
    schedule = instantiate(cfg.schedule.schedule)
    times = instantiate(cfg.schedule.time_distribution).sample(4096, generator=torch.Generator().manual_seed(0))
    assert schedule.num_steps == n and len(schedule.betas) == n
    steps = times.double() * n - 1  # DiscreteUniform: t = (i + 1) / N, i in 0..N-1
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert steps.round().max() == n - 1 and steps.round().min() == 0
    for grid in (instantiate(cfg.schedule.grid), instantiate(cfg.model.sampling.grid)):
        assert torch.equal(grid(3), grids.ddpm(3, "trailing", n))  # 3 trailing steps differ for N = 500 and 1000
    assert not torch.equal(grids.ddpm(3, "trailing", 500), grids.ddpm(3, "trailing", 1000))


def test_coefficients_follow_the_sample_dtype_and_shape():
    schedule = FlowMatching()
    x = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16)
    t = torch.rand(4, dtype=F64)
    x_t = schedule.add_noise(x, torch.randn_like(x), t)
    assert x_t.dtype == torch.bfloat16 and x_t.shape == x.shape
    assert schedule.add_noise(x, x, 0.25).dtype == torch.bfloat16


# --- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan")])
def test_time_outside_unit_interval_is_refused(t):
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1\]"):
        FlowMatching().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, t]))


@pytest.mark.parametrize("kwargs", [{"prediction": "epsilon"}, {"prediction": "velocity"}])
def test_unknown_prediction_names_the_allowed_ones(kwargs):
    with pytest.raises(ValueError, match=r"prediction=.*allowed values: 'eps', 'v', 'x0'"):
        DDPM(**kwargs)
    with pytest.raises(ValueError, match=r"prediction=.*allowed values"):
        FlowMatching("noise")


def test_unknown_beta_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"beta_schedule='squaredcos'.*'linear', 'scaled_linear', 'cosine'"):
        DDPM("squaredcos")


@pytest.mark.parametrize(
    "betas,match",
    [
        (torch.linspace(0.02, 1e-4, 1000), "non-decreasing"),
        (torch.linspace(-0.01, 0.02, 1000), r"must lie in \(0, 1\]"),
        (torch.linspace(1e-4, 1.2, 1000), r"must lie in \(0, 1\]"),
        (torch.full((1000,), float("nan")), r"must lie in \(0, 1\]"),
        (torch.linspace(1e-4, 0.02, 10), "num_steps=1000"),
    ],
)
def test_bad_beta_tables_are_refused(betas, match):
    with pytest.raises(ValueError, match=match):
        DDPM(betas=betas)


def test_bad_beta_ends_are_refused():
    with pytest.raises(ValueError, match="non-decreasing"):
        DDPM("linear", beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="do not apply to beta_schedule='cosine'"):
        DDPM("cosine", beta_end=0.02)


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="prediction='v' or 'x0'"):
        DDPM("linear", "eps", zero_terminal_snr=True)


def test_a_singular_theory_is_refused_on_first_use():
    schedule = FlowMatching("eps")  # eps says nothing of x0 at t = 1 where alpha = 0
    with pytest.raises(ValueError, match="singular at t = 1"):
        schedule.at(0.5)


def test_a_theory_whose_t0_is_not_data_is_refused():
    class Shifted(Schedule):
        prediction = "eps"

        def alpha(self, t):
            return 0.9 - 0.9 * t

        def sigma(self, t):
            return 0.1 + 0.9 * t

    with pytest.raises(ValueError, match=r"t = 0 must be clean data"):
        Shifted().at(0.5)
