"""Gaussian diffusion against closed forms computed independently here (float64 where it matters)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from helpers import randomize_
from scaling.diffusion import (Diffusion, DiffusionConfig, discretized_gaussian_log_likelihood, guided, make_betas,
                               sample, space_timesteps)
from scaling.models import build_model, in_chunks

LOG2 = math.log(2.0)


def base(learn_sigma=True, schedule="linear", T=1000):
    return Diffusion(DiffusionConfig(schedule=schedule, num_timesteps=T, learn_sigma=learn_sigma))


class Fixed(torch.nn.Module):
    """Returns a fixed output regardless of the input."""

    num_classes = 10

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, y):
        return self.out


class Labelled(torch.nn.Module):
    """A smooth function of (x, t, y) whose output differs per label; records every call."""

    num_classes = 10

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        yy = (y.to(x.dtype) + 1).reshape(-1, 1, 1, 1)
        tt = (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)
        eps = 0.3 * torch.tanh(x) * yy + 0.1 * tt
        v = torch.sin(x + yy) * 0.5
        return torch.cat([eps, v], dim=1) if self.learn_sigma else eps


class Oracle(torch.nn.Module):
    """The exact epsilon for the single-point data set x0 = c, at the original timestep t it is called with."""

    num_classes = 10

    def __init__(self, diffusion, c, learn_sigma=True):
        super().__init__()
        self.abar = torch.from_numpy(diffusion.alphas_cumprod)
        self.c, self.learn_sigma = c, learn_sigma

    def forward(self, x, t, y):
        abar = self.abar[t].to(x.dtype).reshape(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.c) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.learn_sigma else eps


# ---------------------------------------------------------------------- config and schedules


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="'quadratic'.*linear, cosine"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="num_timesteps=1"):
        DiffusionConfig(num_timesteps=1)


def test_schedules():
    b = make_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and np.all(np.diff(b) > 0)
    assert make_betas("linear", 250)[0] == pytest.approx(4e-4)  # ADM scales both ends by 1000/T
    T, s = 1000, 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = f[1:] / f[0]
    d = base(schedule="cosine")
    np.testing.assert_allclose(d.alphas_cumprod[:-5], abar[:-5], rtol=1e-10)  # the last betas are capped at 0.999
    assert d.betas.max() == pytest.approx(0.999)


# ---------------------------------------------------------------------- forward process and posterior


def test_q_sample_closed_form_and_moments():
    d = base()
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    t = torch.tensor([300])
    noise = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    abar = np.prod(1 - d.betas[:301])
    expected = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    xs = d.q_sample(x0.expand(n, -1, -1, -1), t.expand(n), torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64))
    torch.testing.assert_close(xs.mean(0), math.sqrt(abar) * x0[0], atol=5 * math.sqrt((1 - abar) / n), rtol=0)
    torch.testing.assert_close(xs.var(0), torch.full_like(x0[0], 1 - abar), rtol=0.02, atol=0)


def test_posterior_matches_bayes_rule():
    d = base()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 500, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        # Product of q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) and q(x_{t-1} | x_0).
        beta = d.betas[ti]
        abar_prev = np.prod(1 - d.betas[:ti])
        prec = (1 - beta) / beta + 1 / (1 - abar_prev)
        expected_mean = (math.sqrt(1 - beta) / beta * xt[i] + math.sqrt(abar_prev) / (1 - abar_prev) * x0[i]) / prec
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-10, atol=1e-10)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        assert log_var[i].item() == pytest.approx(math.log(1 / prec), rel=1e-10)
    # At t = 0 the posterior variance is 0 and its log is clipped to the value at t = 1.
    _, var0, log_var0 = d.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.item() == 0.0 and log_var0.item() == pytest.approx(math.log(d.posterior_variance[1]))


def test_p_mean_variance_learned_and_fixed():
    d = base()
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1).expand(3, 2, 4, 4)
    t = torch.tensor([5, 5, 5])
    out = d.p_mean_variance(torch.cat([eps, v], 1), xt, t)
    lo, hi = math.log(d.posterior_variance[5]), math.log(d.betas[5])
    assert out["log_variance"][0].unique().item() == pytest.approx(lo)
    assert out["log_variance"][1].unique().item() == pytest.approx((lo + hi) / 2)
    assert out["log_variance"][2].unique().item() == pytest.approx(hi)
    abar = np.prod(1 - d.betas[:6])
    torch.testing.assert_close(out["pred_x0"], (xt - math.sqrt(1 - abar) * eps) / math.sqrt(abar))
    clipped = d.p_mean_variance(torch.cat([eps, v], 1) * 30, xt, t, clip_denoised=True)["pred_x0"]
    assert clipped.abs().max() <= 1.0 and clipped.abs().max() == 1.0
    fixed = base(learn_sigma=False).p_mean_variance(eps, xt, t)
    assert fixed["log_variance"].unique().item() == pytest.approx(hi)  # "fixed large": beta_t
    torch.testing.assert_close(fixed["mean"], out["mean"])
    with pytest.raises(ValueError, match="needs 4 channels"):
        d.p_mean_variance(eps, xt, t)


# ---------------------------------------------------------------------- losses


def test_vlb_at_t0_is_discretized_gaussian_nll():
    d = base()
    levels = np.array([0, 1, 100, 127, 128, 200, 254, 255], dtype=np.float64)
    x0 = torch.from_numpy(levels / 127.5 - 1).reshape(1, 2, 2, 2)
    noise = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64).reshape(1, 2, 2, 2)
    eps_out = torch.linspace(0.4, -0.4, 8, dtype=torch.float64).reshape(1, 2, 2, 2)
    v_out = torch.linspace(-0.9, 0.9, 8, dtype=torch.float64).reshape(1, 2, 2, 2)
    losses = d.training_losses(Fixed(torch.cat([eps_out, v_out], 1)), x0, torch.tensor([0]), torch.tensor([3]), noise)
    # Independent reference, in numpy + scipy.
    b0 = d.betas[0]
    x, e, n, v = (a.numpy().ravel() for a in (x0, eps_out, noise, v_out))
    xt = math.sqrt(1 - b0) * x + math.sqrt(b0) * n
    pred_x0 = (xt - math.sqrt(b0) * e) / math.sqrt(1 - b0)
    mean = pred_x0  # at t = 0, abar_{-1} = 1: the posterior mean is x0 itself
    post_var1 = d.betas[1] * (1 - (1 - b0)) / (1 - (1 - b0) * (1 - d.betas[1]))
    frac = (v + 1) / 2
    std = np.exp(0.5 * (frac * math.log(b0) + (1 - frac) * math.log(post_var1)))
    upper, lower = norm.cdf((x + 1 / 255 - mean) / std), norm.cdf((x - 1 / 255 - mean) / std)
    prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    expected = -np.log(prob).mean() / LOG2
    assert losses["vlb"].item() == pytest.approx(expected, rel=1e-8)
    assert losses["mse"].item() == pytest.approx(((n - e) ** 2).mean(), rel=1e-12)
    assert losses["loss"].item() == pytest.approx(losses["mse"].item() + expected, rel=1e-8)


def test_discretized_gaussian_edges_use_tails():
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([0.3, -0.2], dtype=torch.float64)
    log_scale = torch.full((2,), math.log(0.5), dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert lp[0].item() == pytest.approx(norm.logcdf((-1 + 1 / 255 - 0.3) / 0.5), rel=1e-10)
    assert lp[1].item() == pytest.approx(norm.logsf((1 - 1 / 255 + 0.2) / 0.5), rel=1e-10)


def test_vlb_at_t_is_gaussian_kl_in_bits():
    d = base()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    out = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([7, 400])
    vlb = d.training_losses(Fixed(out), x0, t, torch.tensor([0, 1]), noise)["vlb"]
    xt = d.q_sample(x0, t, noise)
    q_mean, _, q_log_var = d.q_posterior_mean_variance(x0, xt, t)
    p = d.p_mean_variance(out, xt, t)
    var1, var2 = q_log_var.exp(), p["log_variance"].exp()
    kl = 0.5 * (torch.log(var2 / var1) + (var1 + (q_mean - p["mean"]) ** 2) / var2 - 1)  # KL of two Gaussians
    torch.testing.assert_close(vlb, kl.mean(dim=(1, 2, 3)) / LOG2, rtol=1e-10, atol=1e-12)


def test_decoder_term_on_a_cpu_only_where_t_is_0_same_bits_and_gradients(monkeypatch):
    """On a CPU vlb_terms evaluates the decoder NLL for the rows at t = 0 only: the values and the gradients are
    those of the every-row form (torch.where over both terms, the form accelerators keep) to the bit."""
    import scaling.diffusion as diffusion_module

    d = base()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 4, 4, generator=g)
    raw = torch.randn(8, 2, 4, 4, generator=g)
    rows = []
    real = diffusion_module.discretized_gaussian_log_likelihood
    monkeypatch.setattr(diffusion_module, "discretized_gaussian_log_likelihood",
                        lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    for t in (torch.tensor([0, 5, 0, 999, 300, 0, 1, 2]), torch.tensor([3, 5, 9, 999, 300, 7, 1, 2])):
        xt = d.q_sample(x0, t, noise)
        out = raw.clone().requires_grad_(True)
        vlb = d.vlb_terms(out, x0, xt, t)
        (grad,) = torch.autograd.grad(vlb.sum(), out)
        ref_out = raw.clone().requires_grad_(True)
        q_mean, _, q_log_var = d.q_posterior_mean_variance(x0, xt, t)
        p = d.p_mean_variance(ref_out, xt, t)
        kl = (0.5 * (-1.0 + p["log_variance"] - q_log_var + torch.exp(q_log_var - p["log_variance"])
                     + (q_mean - p["mean"]) ** 2 * torch.exp(-p["log_variance"]))).mean(dim=(1, 2, 3)) / LOG2
        nll = -real(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3)) / LOG2
        ref = torch.where(t == 0, nll, kl)
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_out)
        assert torch.equal(vlb, ref) and torch.equal(grad, ref_grad)
    assert rows == [3]  # 3 rows at t = 0 in the first batch, none computed for the second


def test_vlb_trains_only_the_variance_and_mse_only_epsilon():
    d = base()
    a = torch.nn.Parameter(torch.tensor(0.7))
    b = torch.nn.Parameter(torch.tensor(0.2))

    class Model(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            return torch.cat([a * x, b * torch.ones_like(x)], 1)

    x0 = torch.randn(4, 2, 3, 3)
    losses = d.training_losses(Model(), x0, torch.tensor([0, 3, 50, 900]), torch.zeros(4, dtype=torch.long))
    assert {k: v.shape for k, v in losses.items()} == {k: (4,) for k in ("loss", "mse", "vlb")}
    ga, gb = torch.autograd.grad(losses["vlb"].sum(), [a, b], allow_unused=True, retain_graph=True)
    assert (ga is None or ga == 0) and gb.abs() > 0
    ga, gb = torch.autograd.grad(losses["mse"].sum(), [a, b], allow_unused=True)
    assert ga.abs() > 0 and (gb is None or gb == 0)


def test_oracle_training_loss_has_zero_mse():
    d = base()
    x0 = torch.full((6, 2, 4, 4), 0.3, dtype=torch.float64)
    losses = d.training_losses(Oracle(d, 0.3), x0, torch.tensor([0, 1, 10, 100, 500, 999]), torch.zeros(6).long())
    assert losses["mse"].max().item() < 1e-20
    fixed = base(learn_sigma=False)
    losses = fixed.training_losses(Oracle(fixed, 0.3, learn_sigma=False), x0, torch.tensor([0, 1, 10, 100, 500, 999]),
                                   torch.zeros(6).long())
    assert losses["mse"].max().item() < 1e-20 and torch.equal(losses["vlb"], torch.zeros(6, dtype=torch.float64))
    assert torch.equal(losses["loss"], losses["mse"])


def test_prior_bpd_is_analytic_kl():
    for schedule in ("linear", "cosine"):
        d = base(schedule=schedule)
        x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 2, 3, 1)
        abar = np.prod(1 - d.betas)
        m, s2 = math.sqrt(abar) * x0, 1 - abar
        expected = (0.5 * (s2 + m ** 2 - 1 - math.log(s2))).mean(dim=(1, 2, 3)) / LOG2
        torch.testing.assert_close(d.prior_bpd(x0), expected, rtol=1e-10, atol=1e-15)
    assert d.prior_bpd(x0).max() < 1e-4  # x_T is nearly N(0, I) for a good schedule


# ---------------------------------------------------------------------- respacing


def test_space_timesteps():
    kept = space_timesteps(1000, 250)
    assert kept == [round(i * 999 / 249) for i in range(250)] and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "250") == kept
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,5") == [round(i * 49 / 9) for i in range(10)] + [50 + round(i * 49 / 4)
                                                                                       for i in range(5)]
    with pytest.raises(ValueError, match="ddim37"):
        space_timesteps(1000, "ddim37")
    with pytest.raises(ValueError, match="1001"):
        space_timesteps(1000, 1001)


def test_respacing_keeps_alpha_bar_and_maps_timesteps():
    d = base(schedule="cosine")
    for n in (250, "ddim25", 7):
        r = d.respace(n)
        kept = space_timesteps(1000, n)
        np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-8, atol=1e-12)
        assert list(r.timestep_map) == kept and r.num_timesteps == len(kept)
    same = d.respace(1000)
    np.testing.assert_allclose(same.betas, d.betas, rtol=1e-12, atol=0)
    assert list(same.timestep_map) == list(range(1000))
    twice = d.respace(100).respace(10)  # composes: the map still points at original steps
    np.testing.assert_allclose(twice.alphas_cumprod, d.alphas_cumprod[twice.timestep_map], rtol=1e-8, atol=1e-12)
    assert set(twice.timestep_map) <= set(d.respace(100).timestep_map)


def test_respaced_model_sees_original_timesteps():
    model = Labelled()
    sample(model, base(), torch.tensor([1, 2]), (2, 2, 3, 3), num_steps=10, generator=torch.Generator().manual_seed(0))
    seen = [t[0].item() for _, t, _ in model.calls]
    assert seen == space_timesteps(1000, 10)[::-1]


# ---------------------------------------------------------------------- guidance


def test_guidance():
    model = Labelled()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([10, 20, 30])
    y = torch.tensor([0, 5, 9])
    assert guided(model, 1.0) is model
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    model.calls.clear()
    out = guided(model, 4.0)(x, t, y)
    assert len(model.calls) == 1 and model.calls[0][0] == 6 and model.calls[0][2].tolist() == [0, 5, 9, 10, 10, 10]
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    out3 = guided(model, 4.0, guide_channels=3)(x, t, y)
    torch.testing.assert_close(out3[:, :3], out[:, :3])
    assert torch.equal(out3[:, 3:], cond[:, 3:]) and not torch.allclose(out3[:, :3], cond[:, :3])
    with pytest.raises(ValueError, match="cfg_scale=0.5"):
        guided(model, 0.5)
    with pytest.raises(ValueError, match="guide_channels=5"):
        guided(model, 2.0, guide_channels=5)(x, t, y)


def test_sample_with_guidance_matches_manual_guided_model():
    model = Labelled()
    y, shape = torch.tensor([1, 4]), (2, 4, 3, 3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    a = sample(model, base(), y, shape, sampler="ddim", num_steps=8, cfg_scale=1.5, guide_channels=3, noise=noise)
    b = sample(guided(model, 1.5, 3), base(), y, shape, sampler="ddim", num_steps=8, noise=noise)
    c = sample(model, base(), y, shape, sampler="ddim", num_steps=8, noise=noise)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------- samplers


def test_ddim_eta0_is_deterministic_given_noise():
    model, y, shape = Labelled(), torch.tensor([1, 2]), (2, 2, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    a = sample(model, base(), y, shape, sampler="ddim", num_steps=20, noise=noise,
               generator=torch.Generator().manual_seed(1))
    b = sample(model, base(), y, shape, sampler="ddim", num_steps=20, noise=noise,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample(model, base(), y, shape, sampler="ddim", num_steps=20, eta=1.0, noise=noise,
               generator=torch.Generator().manual_seed(1))
    d = sample(model, base(), y, shape, sampler="ddim", num_steps=20, eta=1.0, noise=noise,
               generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)


def test_ddpm_is_reproducible_from_the_generator():
    model, y, shape = Labelled(), torch.tensor([1, 2]), (2, 2, 4, 4)

    def run(seed, **kw):
        return sample(model, base(), y, shape, num_steps=20, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    assert run(0, clip_denoised=True).shape == shape


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_oracle_samples_land_on_the_data_point(schedule, learn_sigma):
    d = base(learn_sigma=learn_sigma, schedule=schedule)
    c, shape = -0.4, (3, 2, 4, 4)
    model = Oracle(d, c, learn_sigma)
    y = torch.zeros(3, dtype=torch.long)
    for sampler, steps in (("ddpm", 250), ("ddim", 50), ("ddim", "ddim20")):
        x = sample(model, d, y, shape, sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(7))
        assert (x - c).abs().max().item() < 1e-3, (sampler, steps)


def test_sample_rejects_bad_arguments():
    model, y, shape = Labelled(), torch.tensor([1]), (1, 2, 2, 2)
    with pytest.raises(ValueError, match="sampler='euler'.*ddpm, ddim"):
        sample(model, base(), y, shape, sampler="euler")
    with pytest.raises(ValueError, match="eta=-1"):
        sample(model, base(), y, shape, sampler="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="cfg_scale=0.9"):
        sample(model, base(), y, shape, cfg_scale=0.9)
    with pytest.raises(ValueError, match="at least 2 steps"):
        sample(model, base(), y, shape, num_steps=1)


# ---------------------------------------------------------------------- reference implementation


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_match_diffusers_schedulers(sampler, eta):
    """diffusers' DDPM (learned_range variance) and DDIM schedulers over the same "leading" timesteps."""
    diffusers = pytest.importorskip("diffusers")
    d, steps, shape = base(), 25, (2, 2, 4, 4)
    model, y = Labelled(learn_sigma=True), torch.tensor([3, 7])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    ours = sample(model, d, y, shape, sampler=sampler, num_steps=f"ddim{steps}", eta=eta, noise=noise,
                  generator=torch.Generator().manual_seed(9))
    common = dict(num_train_timesteps=1000, trained_betas=d.betas.tolist(), clip_sample=False)
    if sampler == "ddpm":
        scheduler = diffusers.DDPMScheduler(variance_type="learned_range", **common)
    else:
        scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
    scheduler.set_timesteps(steps)
    assert sorted(scheduler.timesteps.tolist()) == space_timesteps(1000, f"ddim{steps}")
    x, g = noise.clone(), torch.Generator().manual_seed(9)
    for t in scheduler.timesteps:
        out = model(x, t.expand(shape[0]), y)
        if sampler == "ddpm":
            x = scheduler.step(out, int(t), x, generator=g).prev_sample
        else:
            x = scheduler.step(out[:, :2], int(t), x, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_forward_chunks_change_samples_at_float_rounding_only(cfg_scale):
    # scaling.models.images_per_forward splits a CPU sampling batch into forwards of ~2,048 tokens: the noise and
    # labels must stay the whole batch's (the same images); only the matmuls' rounding may differ.
    net = randomize_(build_model("laptop_l", 2, input_size=16, in_channels=1, num_classes=10), std=0.05).eval()
    sizes = []

    def model(x, t, y):
        sizes.append(x.shape[0])
        return net(x, t, y)

    model.num_classes = net.num_classes
    y, shape = torch.arange(20) % 10, (20, 1, 16, 16)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kw = dict(sampler="ddim", num_steps=5, cfg_scale=cfg_scale, clip_denoised=True)  # as pixel-space sampling
    whole = sample(model, base(), y, shape, generator=g(), **kw)
    guided_ = cfg_scale > 1
    assert sizes == [40 if guided_ else 20] * 5
    for forward_batch, parts in ((8, [8] * 5 if guided_ else [7, 7, 6]), (12, [10] * 4 if guided_ else [10, 10])):
        sizes.clear()
        chunked = sample(model, base(), y, shape, generator=g(), forward_batch=forward_batch, **kw)
        assert sizes == parts * 5, (forward_batch, sizes[:5])
        # 5 guided steps amplify the rounding of other matmul shapes: ~1e-4 on CPUs with AMX, less on others
        assert torch.allclose(chunked, whole, rtol=0, atol=1e-3), (forward_batch, (chunked - whole).abs().max())
    other = sample(net, base(), y.roll(1), shape, generator=g(), forward_batch=8, **kw)
    assert (other - whole).abs().max() > 1e-1  # the tolerance is far below what other labels change


def test_in_chunks_splits_evenly():
    sizes = []
    fn = in_chunks(lambda x, t, y: (sizes.append(len(x)), x * 2)[1], 32)
    x = torch.arange(250.0)
    assert torch.equal(fn(x, x, x), x * 2) and sizes == [32, 32] + [31] * 6
    sizes.clear()
    fn(x[:32], x[:32], x[:32])
    assert sizes == [32]
