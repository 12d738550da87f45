"""Learned variance (diffusion/variance.py, sampler=ddpm_learned): the Gaussian pieces against
torch.distributions and scipy, the posterior against Bayes' rule and diffusers, the hybrid loss
against a direct computation of ADM's ``mse + vb``, its stop-gradient, the sampler against diffusers'
DDPMScheduler(variance_type="learned_range") given the same noise, and exactly in law on Gaussian
data, and from the command line: training, sampling, a converted DiT checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from diffusion import cli
from diffusion.objective import DiffusionObjective
from diffusion.samplers import ClassifierFreeGuidance, get_sampler, grids
from diffusion.schedules import DDPM, FlowMatching
from diffusion.timesteps import DiscreteUniform
from diffusion.training.module import DiffusionModule
from diffusion.variance import (
    HybridObjective,
    PosteriorTable,
    discretized_gaussian_log_likelihood,
    make_objective,
    normal_kl,
)
from diffusion.weighting import NoWeighting
from tests.conftest import compose_config, logged_losses

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the Gaussian pieces ----------------------------------------------------------------------------
def test_normal_kl_is_torch_distributions_kl():
    g = _gen()
    m1, m2, lv1, lv2 = (torch.randn(500, generator=g, dtype=F64) * 2 for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


def test_the_decoder_log_likelihood_is_the_normal_mass_of_each_bin():
    """256 levels on [-1, 1], bins of width 2 / 255, the end bins open (scipy's normal CDF)."""
    g = _gen(1)
    levels = torch.randint(0, 256, (2000,), generator=g)
    levels[:5], levels[5:10] = 0, 255  # the open end bins
    x = levels.to(F64) / 127.5 - 1
    mean = x + torch.randn(2000, generator=g, dtype=F64) * 0.05
    log_scale = torch.empty(2000, dtype=F64).uniform_(-6, 0, generator=g)
    lower = np.where(levels.numpy() == 0, -np.inf, x.numpy() - 1 / 255)
    upper = np.where(levels.numpy() == 255, np.inf, x.numpy() + 1 / 255)
    scale = np.exp(log_scale.numpy())
    # The mass in the tail where it is not a difference of two numbers near 1 (as scipy's sf).
    mass = np.where(x.numpy() > mean.numpy(), norm.sf(lower, mean.numpy(), scale) - norm.sf(upper, mean.numpy(), scale),
                    norm.cdf(upper, mean.numpy(), scale) - norm.cdf(lower, mean.numpy(), scale))
    expected = torch.from_numpy(np.log(np.maximum(mass, 1e-12)))
    assert (mass > 1e-12).mean() > 0.8 and (mass < 0.5).mean() > 0.3  # the comparison sees both kinds of bins
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), expected, rtol=1e-9, atol=1e-9)


def _bayes_posterior(abar: torch.Tensor, abar_prev: torch.Tensor, x0, x_t):
    """q(x_prev | x_t, x0) from x_prev | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev) and
    x_t | x_prev ~ N(sqrt(a) x_prev, 1 - a), a = abar / abar_prev: precisions add."""
    a = abar / abar_prev
    precision = 1 / (1 - abar_prev) + a / (1 - a)
    variance = 1 / precision
    mean = variance * (abar_prev.sqrt() * x0 / (1 - abar_prev) + a.sqrt() * x_t / (1 - a))
    return mean, variance


@pytest.mark.parametrize("kept", [None, [0, 3, 250, 500, 998, 999], [7, 40, 41, 600]])
def test_the_posterior_is_bayes_rule_over_the_kept_steps(kept):
    """Over a respaced chain too: skipping steps composes their Gaussians, so the kept steps' alphas_cumprod
    alone give the posterior between them."""
    schedule = DDPM("cosine")
    table = PosteriorTable.from_schedule(schedule, kept)
    steps = torch.arange(1000) if kept is None else torch.tensor(kept)
    g = _gen(2)
    x0, x_t = torch.randn(2, len(steps), 3, generator=g, dtype=F64)
    index = torch.arange(len(steps))
    abar = schedule.alphas_cumprod[steps]
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    mean, log_var = table.posterior(x0, x_t, index)
    ref_mean, ref_var = _bayes_posterior(abar[1:, None], abar_prev[1:, None], x0[1:], x_t[1:])
    torch.testing.assert_close(mean[1:], ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_var[1:], ref_var.log().expand_as(ref_mean), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-12, atol=1e-12)  # the step to the data returns x0
    assert table.posterior_log_variance_clipped[0] == table.posterior_log_variance_clipped[1]  # ADM's clip
    torch.testing.assert_close(table.betas, 1 - abar / abar_prev, rtol=0, atol=0)


def test_the_model_log_variance_is_diffusers_learned_range():
    schedule = DDPM()
    table = PosteriorTable.from_schedule(schedule)
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=F64)
    g = _gen(3)
    for i in (1, 2, 10, 500, 999):
        v = torch.rand(4, generator=g, dtype=F64) * 2 - 1
        ours = table.model_log_variance(v, torch.full((4,), i))
        torch.testing.assert_close(ours.flatten(), sched._get_variance(i, v), rtol=1e-12, atol=1e-12)
    # v = -1 is beta~, v = 1 is beta
    ones = torch.ones(1, dtype=F64)
    torch.testing.assert_close(table.model_log_variance(-ones, torch.tensor([7])).flatten(),
                               table.posterior_variance[7:8].log())
    torch.testing.assert_close(table.model_log_variance(ones, torch.tensor([7])).flatten(), table.betas[7:8].log())


# -- the hybrid loss --------------------------------------------------------------------------------
def _fixed_model(output: torch.Tensor):
    def model(x, t, return_variance=False):
        assert return_variance
        return output

    return model


def _reference_loss(schedule: DDPM, x0, noise, steps, output, vlb_weight):
    """ADM's training_losses for learned_range variance, written directly: MSE on eps, plus
    lambda N times the KL (or at step 0 the decoder NLL, by scipy) in bits per dimension."""
    n, c = schedule.num_steps, x0.shape[1]
    losses = []
    for b, i in enumerate(steps.tolist()):
        abar = schedule.alphas_cumprod[i]
        abar_prev = schedule.alphas_cumprod[i - 1] if i > 0 else torch.tensor(1.0, dtype=F64)
        beta = 1 - abar / abar_prev
        x_t = abar.sqrt() * x0[b] + (1 - abar).sqrt() * noise[b]
        eps, v = output[b, :c], output[b, c:]
        x0_hat = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        coef_x0, coef_xt = beta * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
        posterior_var = lambda j: schedule.betas[j] * (1 - schedule.alphas_cumprod[j - 1]) / (1 - schedule.alphas_cumprod[j])  # noqa: E731
        beta_tilde = posterior_var(max(i, 1))  # ADM's clip at step 0
        frac = (v + 1) / 2
        model_var = torch.exp(frac * beta.log() + (1 - frac) * beta_tilde.log())
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        if i > 0:
            true = Normal(coef_x0 * x0[b] + coef_xt * x_t, beta_tilde.sqrt())
            vb = kl_divergence(true, Normal(model_mean, model_var.sqrt())).mean() / math.log(2)
        else:
            xs, m, s = x0[b].numpy(), model_mean.numpy(), model_var.sqrt().numpy()
            lower = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
            upper = np.where(xs > 0.999, np.inf, xs + 1 / 255)
            vb = torch.tensor(-np.log(norm.cdf(upper, m, s) - norm.cdf(lower, m, s)).mean() / math.log(2))
        losses.append(((eps - noise[b]) ** 2).mean() + vlb_weight * n * vb)
    return torch.stack(losses)


@pytest.mark.parametrize("num_steps,vlb_weight", [(1000, 0.001), (100, 0.01)])
def test_the_hybrid_loss_is_mse_plus_lambda_n_times_the_vlb_term_in_bits(num_steps, vlb_weight):
    schedule = DDPM(num_steps=num_steps)
    objective = HybridObjective(schedule, DiscreteUniform(num_steps), NoWeighting(), vlb_weight=vlb_weight)
    g = _gen(4)
    x0 = (torch.randint(0, 256, (4, 2, 4, 4), generator=g) / 127.5 - 1).to(F64)  # data on the 256 levels
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    steps = torch.tensor([0, 1, num_steps // 2, num_steps - 1])
    output = torch.cat([noise + 0.1 * torch.randn(x0.shape, generator=g, dtype=F64),
                        torch.rand(x0.shape, generator=g, dtype=F64) * 2 - 1], dim=1)
    out = objective(_fixed_model(output), x0, t=(steps + 1).to(F64) / num_steps, noise=noise)
    expected = _reference_loss(schedule, x0, noise, steps, output, vlb_weight)
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-5, atol=1e-6)
    assert ((expected - ((output[:, :2] - noise) ** 2).flatten(1).mean(1))[:2] > 0.05).all()  # the VLB term counts


def test_times_off_the_steps_move_to_the_nearest_step():
    schedule = DDPM(num_steps=10)
    objective = HybridObjective(schedule, DiscreteUniform(10), NoWeighting())
    x0 = torch.zeros(4, 1, 2, 2)
    output = torch.zeros(4, 2, 2, 2)
    out = objective(_fixed_model(output), x0, t=torch.tensor([0.0, 0.0625, 0.46, 1.0]), noise=torch.ones_like(x0))
    torch.testing.assert_close(out.t, torch.tensor([0.1, 0.1, 0.5, 1.0]))


def test_the_vlb_term_trains_the_variance_channels_only():
    """The stop-gradient on the mean: the VLB term's gradient is zero on the prediction channels and not
    on the variance channels; the hybrid loss's gradient on the prediction is the MSE's alone."""
    schedule = DDPM()
    objective = HybridObjective(schedule, DiscreteUniform(), NoWeighting())
    g = _gen(5)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 300, 1000]) / 1000
    output = torch.randn(3, 4, 4, 4, generator=g).requires_grad_()
    x_t = schedule.add_noise(x0, noise, t)
    vlb = objective.vlb_term(x0, x_t, output[:, :2], output[:, 2:], t)
    (grad,) = torch.autograd.grad(vlb.sum(), output)
    assert grad[:, :2].abs().max() == 0 and (grad[:, 2:].flatten(1).abs().amax(1) > 0).all()
    hybrid = objective(_fixed_model(output), x0, t=t, noise=noise).loss
    plain = DiffusionObjective(schedule)(lambda x, t: output[:, :2], x0, t=t, noise=noise).loss
    (g_hybrid,), (g_plain,) = torch.autograd.grad(hybrid, output), torch.autograd.grad(plain, output)
    torch.testing.assert_close(g_hybrid[:, :2], g_plain[:, :2], rtol=0, atol=0)
    assert g_plain[:, 2:].abs().max() == 0 and g_hybrid[:, 2:].abs().max() > 0


def test_without_learned_variance_the_objective_is_the_plain_one_bit_for_bit():
    from diffusion.backbones.registry import build_dit

    schedule = DDPM()
    plain = make_objective(build_dit("dit_tiny", in_channels=1), schedule, DiscreteUniform(), NoWeighting())
    assert type(plain) is DiffusionObjective
    untrained = make_objective(build_dit("dit_tiny", in_channels=1, learn_sigma=True), FlowMatching(), DiscreteUniform(),
                               NoWeighting(), vlb_weight=0)  # SiT's untrained head
    assert type(untrained) is DiffusionObjective
    # With lambda = 0 the hybrid loss is the plain loss of the prediction channels, to the bit.
    g = _gen(6)
    x0, noise, output = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t = torch.tensor([1, 2, 500, 1000]).float() / 1000
    hybrid = HybridObjective(schedule, vlb_weight=0.0)(_fixed_model(output), x0, t=t, noise=noise)
    reference = DiffusionObjective(schedule)(lambda x, t: output[:, :2], x0, t=t, noise=noise)
    assert torch.equal(hybrid.per_sample, reference.per_sample)


def test_learned_variance_on_another_theory_is_refused():
    from diffusion.backbones.registry import build_dit

    with pytest.raises(ValueError, match=r"learn_sigma=true trains a learned variance .* defined on the discrete beta "
                                         r"table of a DDPM schedule; the schedule is FlowMatching.*model.vlb_weight=0"):
        make_objective(build_dit("dit_tiny", in_channels=1, learn_sigma=True), FlowMatching(), DiscreteUniform(),
                       NoWeighting())
    with pytest.raises(ValueError, match="vlb_weight must be >= 0"):
        HybridObjective(DDPM(), vlb_weight=-1.0)


# -- the sampler ------------------------------------------------------------------------------------
def _test_model(n: int):
    """eps and v as smooth functions of (x, step), the same for our t = (i + 1) / N and diffusers' step i."""

    def outputs(x, step):
        s = torch.as_tensor(step, dtype=x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
        eps = torch.tanh(0.5 * x + torch.sin(s / 37))
        v = torch.cos(x + s / n) * 0.9
        return torch.cat([eps, v], dim=1)

    def ours(x, t, return_variance=False):
        assert return_variance
        return outputs(x, (t.double() * n).round() - 1)

    return ours, outputs


@pytest.mark.parametrize("steps,spacing,clip", [(1000, "linspace", False), (10, "linspace", False), (7, "trailing", True)])
def test_the_sampler_is_diffusers_learned_range_step_by_step(steps, spacing, clip):
    """Given the same noise (float64): diffusers' DDPMScheduler with variance_type="learned_range" on custom
    timesteps, whose betas it also recomputes from the kept steps' alphas_cumprod, as ADM respaces. The
    last step returns x0_hat (ADM); diffusers adds noise there when the last kept step is not 0 (trailing),
    so that step is compared with its pred_original_sample."""
    n = 1000
    schedule = DDPM(num_steps=n)
    grid = grids.ddpm(steps, spacing, n)
    kept = ((grid[:-1] * n).round() - 1).long().tolist()
    ours_model, outputs = _test_model(n)
    sched = DDPMScheduler(num_train_timesteps=n, variance_type="learned_range", clip_sample=clip)
    sched.set_timesteps(timesteps=kept)
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=F64)
    x = torch.randn(3, 2, 4, 4, generator=_gen(7), dtype=F64) * (1 if clip else 0.5)
    theirs, g = x.clone(), _gen(8)
    trajectory = []
    for i in sched.timesteps.tolist():
        step = sched.step(outputs(theirs, i), i, theirs, generator=g)
        theirs = step.prev_sample
        trajectory.append(theirs)
    theirs = trajectory[-1] = step.pred_original_sample
    seen = []
    ours = get_sampler("ddpm_learned")(ours_model, schedule, x, grid, clip_denoised=clip, generator=_gen(8),
                                       callback=lambda info: seen.append(info.x))
    assert len(seen) == len(trajectory) == steps
    for a, b in zip(seen, trajectory):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    # The learned variance matters: a fixed-variance ancestral step from the same point lands elsewhere.
    assert (get_sampler("ancestral")(lambda x, t: ours_model(x, t, True)[:, :2], schedule, x, grid,
                                     generator=_gen(8)) - ours).abs().max() > 1e-3


def test_the_sampler_is_exact_in_law_on_gaussian_data():
    """Data N(mu, diag(s^2)); the exact denoiser E[x0 | x_t] and the exact reverse variance of the respaced
    chain, beta~' + coef_x0'^2 Var[x0 | x_t], reached through v between beta~' and beta'. Then ancestral
    sampling is exact for any number of steps: 12 steps give the data's mean and variance."""
    n, steps = 1000, 12
    schedule = DDPM(num_steps=n)
    mu = torch.tensor([0.5, -1.0, 0.0], dtype=F64).reshape(1, 3, 1, 1)
    s2 = torch.tensor([0.8, 0.25, 0.04], dtype=F64).reshape(1, 3, 1, 1)
    grid = grids.ddpm(steps, "linspace", n)
    kept = ((grid[:-1] * n).round() - 1).long().flip(0)  # increasing
    abar_all = torch.cumprod(1 - torch.linspace(1e-4, 0.02, n, dtype=F64), 0)  # Ho et al.'s linear betas
    by_step = {}
    for k, i in enumerate(kept.tolist()):
        abar, abar_prev = abar_all[i], abar_all[kept[k - 1]] if k > 0 else torch.tensor(1.0, dtype=F64)
        beta = 1 - abar / abar_prev
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
        coef = abar_prev.sqrt() * beta / (1 - abar)
        x0_var = s2 * (1 - abar) / (abar * s2 + 1 - abar)
        true_var = beta_tilde + coef**2 * x0_var
        frac = (true_var.log() - beta_tilde.log()) / (beta.log() - beta_tilde.log()) if k > 0 else torch.zeros_like(s2)
        by_step[i] = (abar, 2 * frac - 1)

    def model(x, t, return_variance=False):
        abar, v = by_step[int((t[0].item() * n).__round__()) - 1]
        a, sig = abar.sqrt(), (1 - abar).sqrt()
        x0_hat = mu + a * s2 / (a**2 * s2 + sig**2) * (x - a * mu)
        return torch.cat([(x - a * x0_hat) / sig, v.expand_as(x)], dim=1)

    num = 20_000
    x = torch.randn(num, 3, 1, 1, generator=_gen(9), dtype=F64)
    out = get_sampler("ddpm_learned")(model, schedule, x, grid, generator=_gen(10))
    mean, var = out.mean(0, keepdim=True), out.var(0, keepdim=True)
    torch.testing.assert_close(mean, mu, rtol=0, atol=5 * float(s2.max().sqrt()) / num**0.5)
    torch.testing.assert_close(var / s2, torch.ones_like(s2), rtol=0, atol=5 * (2 / num) ** 0.5)
    # With the posterior variance beta~' alone (v = -1), 12 steps lose variance: the test sees it.
    by_step = {i: (abar, -torch.ones_like(v)) for i, (abar, v) in by_step.items()}
    small = get_sampler("ddpm_learned")(model, schedule, x, grid, generator=_gen(10)).var(0, keepdim=True)
    assert ((small / s2)[0, :2] < 1 - 10 * (2 / num) ** 0.5).all()


def test_guidance_moves_the_prediction_and_keeps_the_conditional_variance():
    def model(x, t, cond, return_variance=False):
        c = cond.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.cat([x * c, x + c], dim=1) if return_variance else x * c

    x, t = torch.randn(2, 3, 2, 2, generator=_gen(11)), torch.ones(2)
    cond, null = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    out = ClassifierFreeGuidance(model, cond, null, 4.0)(x, t, return_variance=True)
    u, c = model(x, t, null, True), model(x, t, cond, True)
    torch.testing.assert_close(out[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(out[:, 3:], c[:, 3:])
    torch.testing.assert_close(ClassifierFreeGuidance(model, cond, null, 4.0)(x, t), out[:, :3])  # the default path


def test_the_sampler_refuses_grids_off_the_steps_models_without_variance_and_other_theories():
    schedule = DDPM(num_steps=1000)
    model, _ = _test_model(1000)
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"ddpm_learned steps over the training steps .* times off the steps"):
        get_sampler("ddpm_learned")(model, schedule, x, grids.uniform(3))
    with pytest.raises(ValueError, match=r"ddpm_learned is defined on the discrete beta table .* FlowMatching"):
        get_sampler("ddpm_learned")(model, FlowMatching(), x, grids.uniform(4))
    with pytest.raises(ValueError, match=r"returns 2 x 2 channels .* got shape \(1, 2, 2, 2\)"):
        get_sampler("ddpm_learned")(lambda x, t, return_variance: x, schedule, x, grids.uniform(4))
    from diffusion.backbones.registry import build_dit

    module = DiffusionModule(build_dit("dit_tiny", in_channels=2), schedule, image_shape=(2, 4, 4))
    with pytest.raises(ValueError, match=r"sampler=ddpm_learned needs a model with learned variance .* DiT has none"):
        module.sample(2, sampler="ddpm_learned", steps=2, grid=grids.uniform)


# -- from the command line --------------------------------------------------------------------------
def test_the_unet_returns_the_variance_channels_only_when_asked():
    from diffusion.backbones.registry import build_unet

    model = build_unet("unet_tiny", in_channels=2, learn_sigma=True)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)  # zero-initialised: give the channels signal
    x, t = torch.randn(2, 2, 8, 8, generator=_gen(13)), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        full, prediction = model(x, t, return_variance=True), model(x, t)
    assert full.shape == (2, 4, 8, 8) and full[:, 2:].abs().max() > 1e-3
    torch.testing.assert_close(prediction, full[:, :2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"return_variance=True\) needs a model built with learn_sigma=True"):
        build_unet("unet_tiny", in_channels=2)(x, t, return_variance=True)


def test_train_with_learn_sigma_then_sample_with_the_learned_variance(train_config, tmp_path):
    cfg = train_config("schedule=ddpm", "backbone.learn_sigma=true", "trainer.max_steps=3")
    cli.train(cfg)
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = cli.load_module(ckpt)
    assert type(model.objective) is HybridObjective and model.objective.vlb_weight == 0.001
    assert model.backbone.learn_sigma
    out = tmp_path / "samples"
    cli.sample(compose_config("sample", [f"ckpt={ckpt}", "sampler=ddpm_learned", "steps=4", "num=3", "cfg_scale=2",
                                         f"out={out}", "progress=false", "device=cpu"], tmp_path))
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 3)
    record = (out / "samples.json").read_text()
    assert '"sampler": "ddpm_learned"' in record


def test_learn_sigma_with_flow_matching_is_refused_before_the_run_is_written(train_config, tmp_path):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="learn_sigma=true trains a learned variance .* FlowMatching"):
        cli.train(train_config("schedule=fm", "backbone.learn_sigma=true"))
    assert not (tmp_path / "run").exists()


def test_a_converted_dit_samples_as_the_official_dit_with_diffusers_learned_range(tmp_path):
    """The converted checkpoint through our sampler against diffusers' DiT (the official forward) through
    DDPMScheduler(variance_type="learned_range") on the same kept steps, given the same noise (float32)."""
    from tests.test_convert import CHANNELS, GRID, PATCH, converted, diffusers_reference, official_state

    state = official_state()
    model = cli.load_module(converted(tmp_path, state))
    assert model.run_config["model"]["sampling"]["sampler"] == "ddpm_learned"  # the DiT recipe samples so
    reference = diffusers_reference(state)
    labels = torch.tensor([0, 3])
    grid = grids.ddpm(5, "linspace", 1000)
    ours = model.sample(2, labels, sampler="ddpm_learned", steps=5, grid=lambda steps: grid, generator=_gen(12),
                        cfg_scale=1.0, decode=False)
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(timesteps=((grid[:-1] * 1000).round() - 1).long().tolist())
    g = _gen(12)
    x = torch.randn(2, CHANNELS, GRID * PATCH, GRID * PATCH, generator=g)
    with torch.no_grad():
        for i in sched.timesteps:
            x = sched.step(reference(x, i.expand(2), labels).sample, i, x, generator=g).prev_sample
    assert x.abs().max() > 0.1
    torch.testing.assert_close(ours, x, rtol=1e-3, atol=1e-3)  # float32, and a random model: |x0_hat| ~ 100
    assert type(model.objective) is HybridObjective  # fine-tuning trains the variance too


def test_a_checkpoint_from_before_the_hybrid_loss_loads_with_the_objective_it_was_trained_with(tmp_path):
    """A run config without model.vlb_weight (an older checkpoint: a SiT conversion on flow matching with its
    variance head) was trained without the VLB term: it loads with vlb_weight 0, not refused."""
    from tests.test_convert import converted, official_state

    path = converted(tmp_path, official_state(zero_variance=True), "SiT-tiny.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["run_config"]["model"]["vlb_weight"] == 0  # convert.py writes it for SiT
    del checkpoint["run_config"]["model"]["vlb_weight"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    model = cli.load_module(tmp_path / "old.ckpt")
    assert type(model.objective) is DiffusionObjective and model.backbone.learn_sigma
    assert model.run_config["model"]["vlb_weight"] == 0.0
