"""Gaussian diffusion with ADM conventions (paper section 3.1): schedules, loss, respacing, samplers, guidance.

References, cited by equation number below:
  [Ho]  Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
  [ND]  Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021.
  [DN]  Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (ADM), NeurIPS 2021.
  [DDIM] Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021.

Conventions (those of ADM as configured by the public DiT code):
- The model predicts epsilon; with learned sigma it also outputs v in [-1, 1] that interpolates the log variance
  between the two bounds of [ND] eq. 15.
- loss = L_simple + L_vlb ([ND] eq. 16 with lambda = 1, the "MSE" loss type, no rescaling of L_vlb by T/1000);
  L_vlb sees the predicted mean through a stop-gradient so it only trains the variance ([ND] section 3.1).
- Without learned sigma the variance is fixed to beta_t ("fixed large", [Ho] section 3.2; ADM's and DiT's choice),
  and the loss is L_simple alone.
- Schedule constants are float64 numpy arrays; they are cast to the dtype of the data when used.
- A respaced diffusion keeps `timestep_map`: the model is always called with the original timestep indices.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from scaling.models import in_chunks

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"      # linear (ADM: 1e-4..0.02 at T=1000) | cosine ([ND] eq. 17)
    num_timesteps: int = 1000     # T used for training
    learn_sigma: bool = True      # model outputs 2C channels: epsilon and the variance interpolation v

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps={self.num_timesteps}; allowed: an integer >= 2")


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """beta_1..beta_T as float64, shape (T,)."""
    if schedule == "linear":
        # [Ho] section 4: 1e-4..0.02 for T=1000; ADM scales both ends by 1000/T so other T keep the same shape.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        # [ND] eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008; betas capped at 0.999.
        def f(t):
            return math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, num_steps: int | str) -> list[int]:
    """Which of the T original timesteps a respaced sampler keeps (ADM's `space_timesteps`), sorted.

    `num_steps`: an int N (N steps evenly spread over [0, T-1], both ends kept, rounded to integers),
    a string "N" or "N1,N2,..." (the range is cut into equal sections, each spread evenly), or "ddimN"
    (a fixed integer stride, as in [DDIM]: 0, s, 2s, ... with exactly N steps).
    """
    if isinstance(num_steps, str) and num_steps.startswith("ddim"):
        desired = int(num_steps[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"num_steps={num_steps!r}: no integer stride gives exactly {desired} of {num_timesteps} "
                         f"steps; allowed: ddimN where N = len(range(0, {num_timesteps}, stride)) for some stride")
    counts = [int(c) for c in num_steps.split(",")] if isinstance(num_steps, str) else [int(num_steps)]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"num_steps={num_steps!r}: cannot take {count} steps from a section of {size}; "
                             f"allowed: 1..{size} per section")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def _gather(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a tensor of like's dtype and device, shape (N, 1, ..., 1) to broadcast against like."""
    values = torch.from_numpy(arr).to(like.dtype).to(like.device)[t]
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))  # (N, ...) -> (N,)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data on 256 levels in [-1, 1] under N(mean, e^(2 log_scale)) binned at +-1/255 ([Ho] eq. 13).

    The outermost bins extend to -inf / +inf. Uses the exact normal CDF (ADM uses a tanh approximation).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)              # log P(z < upper): the bin of x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)              # log P(z > lower): the bin of x = +1
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


class Diffusion:
    """The forward process q and the model's reverse process p over `num_timesteps` steps.

    `Diffusion(cfg)` builds the training diffusion; `respace(n)` returns one over a subset of its steps.
    """

    def __init__(self, cfg: DiffusionConfig, betas: np.ndarray | None = None, timestep_map: np.ndarray | None = None):
        self.cfg = cfg
        self.learn_sigma = cfg.learn_sigma
        self.betas = make_betas(cfg.schedule, cfg.num_timesteps) if betas is None else np.asarray(betas, np.float64)
        self.num_timesteps = len(self.betas)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        assert len(self.timestep_map) == self.num_timesteps and (self.betas > 0).all() and (self.betas <= 1).all()

        b = self.betas
        self.alphas_cumprod = np.cumprod(1.0 - b)                                   # abar_t, [Ho] eq. 4
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])        # abar_{t-1}, abar_0 := 1
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # q(x_{t-1} | x_t, x_0) = N(mu~, beta~): [Ho] eq. 6-7.
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # beta~ is 0 at the first step; ADM clips its log to beta~ of the second step.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(ab_prev) / (1.0 - ab)               # multiplies x_0
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab)  # multiplies x_t
        # Fixed "large" variance beta_t ([Ho] section 3.2), with beta~ at the first step as ADM does.
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], b[1:]))

    # ------------------------------------------------------------------ forward process q

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps ([Ho] eq. 4)."""
        return _gather(np.sqrt(self.alphas_cumprod), t, x0) * x0 + _gather(np.sqrt(1 - self.alphas_cumprod), t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) ([Ho] eq. 6-7)."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt), _gather(self.posterior_log_variance_clipped, t, xt)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, shape (N,): the prior term L_T of [Ho] eq. 5."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean = _gather(np.sqrt(self.alphas_cumprod), t, x0) * x0
        log_var = _gather(np.log(1.0 - self.alphas_cumprod), t, x0).expand_as(x0)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))) / math.log(2.0)

    # ------------------------------------------------------------------ reverse process p

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep indices the model was trained on, for indices t of this (respaced) diffusion."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def p_mean_variance(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from the raw model output (N, 2C, ...) with learned sigma, else (N, C, ...)."""
        model_out = model_out.to(xt.dtype)
        C = xt.shape[1]
        if self.learn_sigma:
            if model_out.shape[1] != 2 * C:
                raise ValueError(f"model output {tuple(model_out.shape)}: learned sigma needs {2 * C} channels")
            eps, v = model_out[:, :C], model_out[:, C:]
            # [ND] eq. 15: log Sigma = v' log beta_t + (1 - v') log beta~_t, with v' = (v + 1) / 2 in [0, 1].
            frac = (v + 1) / 2
            log_variance = (frac * _gather(np.log(self.betas), t, xt)
                            + (1 - frac) * _gather(self.posterior_log_variance_clipped, t, xt))
        else:
            if model_out.shape[1] != C:
                raise ValueError(f"model output {tuple(model_out.shape)}: fixed variance needs {C} channels")
            eps = model_out
            log_variance = _gather(self.fixed_log_variance, t, xt).expand_as(xt)
        # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), inverting [Ho] eq. 4.
        pred_x0 = (_gather(np.sqrt(1.0 / self.alphas_cumprod), t, xt) * xt
                   - _gather(np.sqrt(1.0 / self.alphas_cumprod - 1), t, xt) * eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)  # mu_theta = mu~(x_t, x0_hat), [Ho] eq. 7
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (_gather(np.sqrt(1.0 / self.alphas_cumprod), t, xt) * xt - x0) / _gather(
            np.sqrt(1.0 / self.alphas_cumprod - 1), t, xt)

    # ------------------------------------------------------------------ training

    def vlb_terms(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_{t-1} of [Ho] eq. 5 in bits per dim, shape (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretized Gaussian decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        p = self.p_mean_variance(model_out, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        first = t == 0

        def nll(rows):
            return -mean_flat(discretized_gaussian_log_likelihood(
                x0[rows], p["mean"][rows], 0.5 * p["log_variance"][rows])) / math.log(2.0)

        if x0.device.type != "cpu":  # every row, selected: choosing rows would wait for the device
            return torch.where(first, nll(slice(None)), kl)
        # On a CPU the decoder term only where t = 0 (~3% of a training batch): its normal CDFs and their gradients
        # cost a tiny model's step 13% (laptop-XXS/4 trains 1.15x faster, B/4 1.03x: benchmarks/train_cpu.py),
        # and the values and gradients are the same to the bit.
        return kl.index_put((first,), nll(first)) if bool(first.any()) else kl

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses, each of shape (N,): loss = mse + vlb ([ND] eq. 16, lambda = 1, as DiT).

        mse = L_simple ([Ho] eq. 14, mean over dims); vlb = L_vlb term at t in bits/dim with the predicted
        mean detached, so it trains only the variance ([ND] section 3.1); zero without learned sigma.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        model_out = model(xt, self.model_timesteps(t), y).to(x0.dtype)
        C = x0.shape[1]
        mse = mean_flat((noise - model_out[:, :C]) ** 2)
        if self.learn_sigma:
            frozen = torch.cat([model_out[:, :C].detach(), model_out[:, C:]], dim=1)
            vlb = self.vlb_terms(frozen, x0, xt, t)
        else:
            vlb = torch.zeros_like(mse)
        return {"loss": mse + vlb, "mse": mse, "vlb": vlb}

    # ------------------------------------------------------------------ respacing

    def respace(self, num_steps: int | str) -> "Diffusion":
        """A diffusion over the kept steps t_1 < ... < t_n with beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}, so the
        marginals q(x_{t_i} | x_0) are unchanged ([ND] section 4)."""
        kept = space_timesteps(self.num_timesteps, num_steps)
        if len(kept) < 2:
            raise ValueError(f"num_steps={num_steps!r} keeps {len(kept)} step; allowed: at least 2 steps")
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return Diffusion(self.cfg, betas=betas, timestep_map=self.timestep_map[kept])


# ---------------------------------------------------------------------- guidance and sampling


def guided(model, cfg_scale: float, guide_channels: int | None = None):
    """model_fn(x, t, y) with classifier-free guidance (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u).

    One batched forward over [x; x] with labels [y; null], null = model.num_classes. Guidance applies to the first
    `guide_channels` output channels (all epsilon channels when None; the public DiT code guides 3 of 4), the other
    channels (the rest of epsilon and v) come from the conditional half. cfg_scale 1.0 returns the model itself.
    """
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale={cfg_scale}; allowed: >= 1.0 (1.0 = no guidance)")
    if cfg_scale == 1.0:
        return model

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        g = C if guide_channels is None else guide_channels
        if not 1 <= g <= C:
            raise ValueError(f"guide_channels={guide_channels}; allowed: None or 1..{C}")
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)]))
        cond, uncond = out.chunk(2)                         # (2N, C', ...) -> 2 x (N, C', ...)
        eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, g:]], dim=1)

    return model_fn


@torch.no_grad()
def sample(model, diffusion: Diffusion, y: torch.Tensor, shape: tuple, *, sampler: str = "ddpm",
           num_steps: int | str = 250, cfg_scale: float = 1.0, eta: float = 0.0, guide_channels: int | None = None,
           clip_denoised: bool = False, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           progress: bool = False, forward_batch: int | None = None) -> torch.Tensor:
    """Draw x_0 of `shape` (model space) for labels y by DDPM ancestral sampling or DDIM over `num_steps` steps.

    All randomness comes from `generator` (on y's device). `noise` overrides the initial x_T. clip_denoised clips
    the predicted x_0 to [-1, 1] (pixel data; latents use False as DiT). forward_batch: the most images a model
    forward takes (None: the whole batch in one; guidance doubles each batch, so it then splits the batch into
    parts of forward_batch // 2), for speed only: the noise stays the whole batch's
    (scaling.models.images_per_forward). Putting the model in eval mode is the caller's job.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if eta < 0:
        raise ValueError(f"eta={eta}; allowed: >= 0 (0 = deterministic DDIM)")
    spaced = diffusion.respace(num_steps)
    model_fn = guided(model, cfg_scale, guide_channels)
    if forward_batch is not None:
        model_fn = in_chunks(model_fn, max(1, forward_batch // (1 if cfg_scale == 1.0 else 2)))
    device = y.device

    dtype = torch.float32 if noise is None else noise.dtype

    def randn():
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    x = randn() if noise is None else noise.to(device)
    for i in tqdm(range(spaced.num_timesteps - 1, -1, -1), disable=not progress, desc=f"{sampler} {num_steps}"):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        p = spaced.p_mean_variance(model_fn(x, spaced.model_timesteps(t), y), x, t, clip_denoised)
        if sampler == "ddpm":
            # x_{t-1} = mu_theta + sigma_t z ([Ho] Algorithm 2), no noise at the last step.
            x = p["mean"] + (torch.exp(0.5 * p["log_variance"]) * randn() if i > 0 else 0.0)
        else:
            # [DDIM] eq. 12 with sigma_t of eq. 16 scaled by eta; eps recomputed from the (possibly clipped) x_0.
            eps = spaced.eps_from_x0(x, t, p["pred_x0"])
            ab, ab_prev = spaced.alphas_cumprod[i], spaced.alphas_cumprod_prev[i]
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
            x = math.sqrt(ab_prev) * p["pred_x0"] + math.sqrt(1 - ab_prev - sigma ** 2) * eps
            if sigma > 0 and i > 0:
                x = x + sigma * randn()
    return x
