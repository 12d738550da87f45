"""Training-time distributions, loss weightings and the objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hydra.utils import instantiate
from scipy import stats

from diffusion.objective import DiffusionObjective
from diffusion.schedules import DDPM, FlowMatching
from diffusion.timesteps import DiscreteUniform, FluxShift, LogitNormal, SD3Shift, Uniform, time_shift
from diffusion.weighting import MinSNR, NoWeighting
from tests.conftest import CONF, compose_config
from tests.reference import DIFFUSERS_PREDICTIONS
from tests.theories import THEORIES, TrigFlow

N = 20_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_is_uniform():
    t = Uniform().sample(N, generator=_gen())
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3
    t = Uniform(0.2, 0.6).sample(N, generator=_gen())
    assert 0.2 <= t.min() and t.max() <= 0.6


def test_discrete_uniform_draws_the_ddpm_training_steps():
    t = DiscreteUniform(1000).sample(N, generator=_gen())
    steps = t * 1000 - 1
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    counts = torch.bincount(steps.round().long(), minlength=1000)
    assert counts.numel() == 1000 and steps.min() >= 0
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_has_the_logit_normal_law(mean, std):
    t = LogitNormal(mean, std).sample(N, generator=_gen())
    cdf = lambda x: stats.norm.cdf((torch.logit(torch.as_tensor(x)).numpy() - mean) / std)  # noqa: E731
    assert stats.kstest(t.double().numpy(), cdf).pvalue > 1e-3


def test_time_shift_map():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, 1.0), t)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:] > shifted[:-1]).all())
    assert bool((shifted[1:-1] > t[1:-1]).all())  # shift > 1 moves mass towards noise
    # FLUX's exp(mu) / (exp(mu) + 1/t - 1) is the same map.
    mu = 0.8
    torch.testing.assert_close(time_shift(t[1:], math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / t[1:] - 1))


def test_resolution_shifts():
    assert SD3Shift(32)(64, 64) == pytest.approx(2.0)  # 512 px from a 256 px base: sqrt(4)
    assert FluxShift()(32, 32) == pytest.approx(math.exp(0.5))  # 256 tokens: base_shift
    assert FluxShift()(128, 128) == pytest.approx(math.exp(1.15))  # 4096 tokens: max_shift


def test_a_resolution_dependent_shift_applies_the_rule_of_the_batch_size():
    base = LogitNormal().sample(64, generator=_gen(1))
    shifted = LogitNormal(shift=SD3Shift(32)).sample(64, size=(64, 64), generator=_gen(1))
    torch.testing.assert_close(shifted, time_shift(base, 2.0))
    with pytest.raises(ValueError, match=r"pass size=\(height, width\)"):
        LogitNormal(shift=SD3Shift()).sample(4)


@pytest.mark.parametrize("make", [lambda: Uniform(0.7, 0.3), lambda: Uniform(shift=0.0), lambda: LogitNormal(std=0),
                                  lambda: DiscreteUniform(0), lambda: MinSNR(gamma=-1)])
def test_bad_distribution_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()


# --- loss weighting ---------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_equals_the_published_formula(prediction, gamma):
    """Hang et al. 2023, as diffusers' training scripts write it: min(SNR, gamma) / SNR for eps,
    / (SNR + 1) for v, and min(SNR, gamma) for x0; SNR from diffusers' own compute_snr."""
    schedule = DDPM("scaled_linear", prediction, beta_start=0.00085, beta_end=0.012)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=DIFFUSERS_PREDICTIONS[prediction])
    timesteps = torch.arange(0, 1000, 7)
    snr = compute_snr(reference, timesteps).double()
    clipped = snr.clamp(max=gamma)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
    ours = MinSNR(gamma)(schedule.at(schedule.timestep_to_t(timesteps)))
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=1e-7)  # diffusers' SNR is float32


def test_min_snr_for_flow_matching_and_the_end_points():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    w = MinSNR(5.0)(FlowMatching().at(t))
    snr = (1 - t) ** 2 / t**2
    # velocity: det = 1, so the x0 error is t times the velocity error.
    torch.testing.assert_close(w[1:], snr[1:].clamp(max=5) * t[1:] ** 2)
    assert w[0] == 0  # x0 is exact at t = 0 whatever the velocity error: weight 0, not nan
    eps = MinSNR(5.0)(DDPM().at(torch.tensor([0.0], dtype=torch.float64)))
    assert eps.item() == 0.0
    assert torch.equal(NoWeighting()(FlowMatching().at(t)), torch.ones_like(t))


@pytest.mark.parametrize("schedule", [DDPM("linear", "x0"), FlowMatching("x0"), DDPM("linear", "eps"), DDPM("linear", "v")])
def test_min_snr_is_finite_at_t0_where_sigma_over_det_is_0_over_0(schedule):
    """Uniform times can be exactly 0 over a long run; x0-prediction has det = -sigma = 0 there."""
    t = torch.tensor([0.0, 1e-3], dtype=torch.float64)
    w = MinSNR(5.0)(schedule.at(t))
    assert bool(torch.isfinite(w).all()), w
    if schedule.prediction == "x0":  # x0 error = output error: weight min(SNR, gamma) = gamma near data
        assert w.tolist() == [5.0, 5.0]
    if isinstance(schedule, DDPM):  # min-SNR refuses flow matching (zero SNR at t = 1), below
        loss = DiffusionObjective(schedule, weighting=MinSNR())(lambda x, tt: torch.zeros_like(x), torch.randn(2, 3), t=t.float())
        assert torch.isfinite(loss.loss)


ZERO_TERMINAL_SNR = [DDPM("scaled_linear", "v", zero_terminal_snr=True), DDPM("linear", "x0", zero_terminal_snr=True),
                     FlowMatching(), FlowMatching("x0"), TrigFlow()]


@pytest.mark.parametrize("schedule", ZERO_TERMINAL_SNR, ids=repr)
def test_min_snr_refuses_a_schedule_whose_snr_reaches_zero(schedule):
    """min(SNR, gamma) = 0 at t = 1: the step from pure noise would never be trained."""
    end = schedule.at(torch.tensor([1.0], dtype=torch.float64))
    assert MinSNR(5.0)(end).item() < 1e-30  # why: the terminal weight is 0 (TrigFlow: cos(pi / 2)^2 ~ 4e-33)
    assert NoWeighting()(end).item() == 1.0
    with pytest.raises(ValueError, match=r"MinSNR\(gamma=5.0\) cannot train .*SNR at t = 1 is .*Use NoWeighting"):
        DiffusionObjective(schedule, weighting=MinSNR(5.0))
    DiffusionObjective(schedule, weighting=NoWeighting())  # the alternative the message gives


@pytest.mark.parametrize("schedule", [DDPM("linear", "eps"), DDPM("cosine", "v"), DDPM("scaled_linear", "v"),
                                      DDPM("linear", "x0")], ids=repr)
def test_min_snr_trains_a_schedule_whose_terminal_snr_is_above_zero(schedule):
    """Down to the cosine table's 2.4e-9 (its clipped last beta), the terminal step keeps its min-SNR weight."""
    objective = DiffusionObjective(schedule, weighting=MinSNR(5.0))
    assert objective.weighting(schedule.at(torch.tensor([1.0], dtype=torch.float64))).item() > 1e-9


SCHEDULE_OPTIONS = sorted(p.stem for p in Path(CONF, "schedule").glob("*.yaml"))


@pytest.mark.parametrize("option", SCHEDULE_OPTIONS)
def test_every_schedule_option_builds_its_objective(option, tmp_path):
    node = compose_config("train", [f"schedule={option}"], tmp_path).schedule
    DiffusionObjective(instantiate(node.schedule), instantiate(node.time_distribution), instantiate(node.weighting))


def test_min_snr_with_zero_terminal_snr_is_refused_from_the_config(tmp_path):
    """ddpm_v (min-SNR-5) turned to zero terminal SNR; ddpm_v_zero_snr itself trains with plain MSE."""
    node = compose_config("train", ["schedule=ddpm_v", "+schedule.schedule.zero_terminal_snr=true"], tmp_path).schedule
    with pytest.raises(ValueError, match="cannot train.*zero_terminal_snr=false"):
        DiffusionObjective(instantiate(node.schedule), weighting=instantiate(node.weighting))


# --- the objective ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule,weighting", [(FlowMatching(), NoWeighting()), (DDPM(prediction="v"), MinSNR()),
                                                (DDPM("cosine", "x0"), MinSNR())])
def test_objective_is_zero_for_the_oracle_and_the_weighted_mse_otherwise(schedule, weighting):
    x0 = torch.randn(6, 3, 8, 8, generator=_gen())
    noise = torch.randn(6, 3, 8, 8, generator=_gen(1))
    t = torch.rand(6, generator=_gen(2)) * 0.98 + 0.01
    objective = DiffusionObjective(schedule, Uniform(), weighting)
    target = schedule.target(x0, noise, t)
    oracle = objective(lambda x_t, tt: target, x0, t=t, noise=noise)
    assert oracle.loss.item() == pytest.approx(0.0, abs=1e-10)
    zero = objective(lambda x_t, tt: torch.zeros_like(x_t), x0, t=t, noise=noise)
    expected = (target**2).flatten(1).mean(1) * weighting(schedule.at(t))
    torch.testing.assert_close(zero.per_sample, expected)
    torch.testing.assert_close(zero.loss, expected.mean())


def test_objective_feeds_the_model_x_t_and_t():
    schedule, seen = DDPM(), {}
    x0 = torch.randn(4, 2, 4, 4)

    def model(x_t, t):
        seen.update(x_t=x_t, t=t)
        return x_t

    out = DiffusionObjective(schedule, DiscreteUniform())(model, x0, generator=_gen())
    assert seen["t"].shape == (4,) and torch.equal(seen["t"], out.t)
    assert seen["x_t"].shape == x0.shape


def test_objective_refuses_a_model_output_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"model output has shape \(4, 1, 4, 4\), expected the input's \(4, 2, 4, 4\)"):
        DiffusionObjective(FlowMatching())(lambda x, t: x[:, :1], torch.randn(4, 2, 4, 4))


@pytest.mark.parametrize("theory", ["flow", "ddpm-linear-eps", "ddpm-cosine-x0", "trig", "edm", "ve"])
def test_a_shift_moves_the_log_snr_by_the_same_amount_in_every_theory(theory):
    """shift_times(t, s) has log-SNR log_snr(t) - 2 log s, wherever that lies in the theory's range;
    on the flow path it is SD3's map exactly (the same floats), on TrigFlow the closed form
    (2 / pi) atan(s tan(pi t / 2))."""
    schedule = THEORIES[theory][0]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    shifted = schedule.shift_times(t, 3.0)
    inside = shifted < 1  # DDPM's log-SNR ends at t = 1; beyond, the shift stops there
    assert bool(inside[:10].all())
    torch.testing.assert_close(schedule.log_snr(shifted[inside]), schedule.log_snr(t[inside]) - 2 * math.log(3.0),
                               rtol=1e-9, atol=1e-9)
    if theory == "flow":
        assert torch.equal(shifted, time_shift(t, 3.0))
    if theory == "trig":
        torch.testing.assert_close(shifted, 2 / math.pi * torch.atan(3.0 * torch.tan(math.pi * t / 2)))
    ends = schedule.shift_times(torch.tensor([0.0, 1.0], dtype=torch.float64), 3.0)
    assert ends.tolist() == [0.0, 1.0]


def test_the_shift_of_a_time_distribution_and_of_a_grid_acts_on_the_bound_theory():
    from diffusion.samplers import grids
    from diffusion.schedules import DDPM

    schedule = DDPM("cosine", "v")
    base = LogitNormal()
    shifted = LogitNormal(shift=2.0)
    DiffusionObjective(schedule, shifted)  # binds it
    t = shifted.sample(256, generator=_gen(3))
    torch.testing.assert_close(t, schedule.shift_times(base.sample(256, generator=_gen(3)), 2.0))
    grid = grids.shifted(10, 2.0, schedule=schedule)
    torch.testing.assert_close(grid, schedule.shift_times(grids.uniform(10), 2.0))
    assert torch.equal(grids.shifted(10, 2.0), time_shift(grids.uniform(10), 2.0))  # no theory: SD3's map


def test_a_shifted_grid_is_reachable_from_the_config(train_config):
    from diffusion import cli
    from diffusion.samplers import grids

    cfg = train_config("schedule=ddpm", "schedule.grid._target_=diffusion.samplers.grids.shifted",
                       "~schedule.grid.spacing", "~schedule.grid.num_train_steps", "+schedule.grid.shift=3.0")
    module = cli.build_module(cfg)
    torch.testing.assert_close(module.sampling.grid(8), grids.shifted(8, 3.0, schedule=module.schedule))
