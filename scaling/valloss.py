"""Held-out diffusion loss: a split of the training data that training never sees, and a deterministic loss on it.

The split: `val.heldout_img` images (default 256) drawn from the whole dataset by a permutation seeded with
`val.split_seed` (not the run's seed, so every run of a study holds out the same images) are removed from the
training set; training draws its batches from the rest (`TrainSplit`; `data.max_images` takes its strided subset
of the rest). The split changes what is trained, so it is part of the run id.

The loss (`HeldOut.losses`), on the EMA weights and optionally the raw ones, in fp32 with the model in eval mode
(no label dropout): every held-out image with its own label, at a fixed grid of `val.timesteps` timesteps
linspace(0.02 T, 0.98 T) (T = 1000: 20, 157, ..., 980), with noise drawn once from a generator seeded by
`val.noise_seed`. Nothing random is drawn at evaluation time, so the same weights give the same numbers to the
bit on one machine, and the training stream (global RNG) is untouched. Columns of metrics.jsonl (suffix `ema`
or `raw`):

    val_mse_<w>                  L_simple, the epsilon MSE per dim ([Ho] eq. 14), mean over images and the grid
    val_mse_<w>_t000_249 ...     the same per quarter of the timesteps (2 grid points each with 8)
    val_vlb_bpd_<w>              pixels: the variational bound in bits per dim on 256-level data ([Ho] eq. 5),
                                 estimated as L_T + L_0 + (T - 1) x the grid mean of the KL terms L_{t-1}
    val_vlb_npd_<w>              latents: the same bound in nats per dim with a continuous Gaussian decoder
    val_kl_bpd_<w>_t000_249 ...  the grid's KL terms per quarter (bits per dim; `npd` on latents)

The VLB needs a learned variance (DiT's default); without it only the MSE columns are written. Cost per
evaluation: (timesteps + 1) x heldout_img forward passes per weight set (2,304 with the defaults).
"""

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from scaling.data import DataConfig, build_dataset, strided_subset
from scaling.diffusion import Diffusion, mean_flat
from scaling.models import images_per_forward


@dataclass
class ValConfig:
    heldout_img: int = 256      # images held out of training for the validation loss; 0 = none (no val loss)
    split_seed: int = 0         # which images: one seeded permutation, the same for every run of a study
    every: int = 0              # steps between evaluations; 0 = at every metrics.jsonl row (train.log_every)
    per_decade: int = 0         # > 0: instead of `every`, at most this many rows per decade of steps, log-spaced
    timesteps: int = 8          # the fixed grid linspace(0.02 T, 0.98 T)
    noise_seed: int = 0         # the fixed noise
    raw: bool = False           # also evaluate the raw (non-EMA) weights
    batch_img: int = 256        # images per forward pass at most (on a CPU ~2,048 tokens: images_per_forward)


def check_config(cfg: ValConfig, log_every: int, ckpt_every: int = 0) -> None:
    """One-line ValueErrors for a config that cannot work (cheap: reads no data; split_indices checks the
    dataset's size)."""
    for key in ("heldout_img", "every", "per_decade"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"val.{key}={getattr(cfg, key)} must be >= 0")
    if cfg.every and cfg.per_decade:
        raise ValueError(f"val.every={cfg.every} and val.per_decade={cfg.per_decade}: set one of them (the other 0)")
    if cfg.per_decade and ckpt_every % log_every:
        raise ValueError(f"val.per_decade={cfg.per_decade} evaluates at checkpoints, which must be metrics rows: "
                         f"train.ckpt_every={ckpt_every} must be a multiple of train.log_every={log_every}")
    if cfg.timesteps < 1 or cfg.batch_img < 1:
        raise ValueError(f"val.timesteps={cfg.timesteps} and val.batch_img={cfg.batch_img} must be >= 1")
    if cfg.every and cfg.every % log_every:
        raise ValueError(f"val.every={cfg.every} must be a multiple of train.log_every={log_every} (the loss is "
                         f"written on metrics.jsonl rows)")


def split_indices(n: int, cfg: ValConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of a dataset of n images, both sorted; disjoint, covering range(n)."""
    if cfg.heldout_img > n // 2:
        raise ValueError(f"val.heldout_img={cfg.heldout_img} is more than half of the {n} images of the dataset")
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    return np.sort(perm[cfg.heldout_img:]), np.sort(perm[:cfg.heldout_img])


class TrainSplit(Dataset):
    """The training part of a dataset: index i of the split is image `indices[i]` of the full dataset."""

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        for key in ("num_classes", "channels", "input_size", "name", "class_names"):
            if hasattr(dataset, key):
                setattr(self, key, getattr(dataset, key))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def get(self, i: int, flip: bool = False):
        """(x, y) of image i, horizontally flipped when asked (latents: the latent of the flipped image)."""
        j = int(self.indices[i])
        if hasattr(self.dataset, "get"):
            return self.dataset.get(j, flip)
        x, y = self.dataset[j]
        return (x.flip(-1) if flip else x), y


def log_spaced(step: int, log_every: int, per_decade: int) -> bool:
    """Whether the metrics row of `step` (a multiple of log_every) is the first row in its bin of a log grid with
    `per_decade` bins per decade of steps: every row while rows are sparser than the grid, then at most
    `per_decade` rows per decade (a run of 43K steps logged every 25: 54 rows at 20 per decade, not 1,720). A pure
    function of the step, so a resumed run evaluates the same rows."""
    prev = step - log_every
    return prev <= 0 or math.floor(per_decade * math.log10(step)) > math.floor(per_decade * math.log10(prev))


def timestep_grid(num_timesteps: int, k: int) -> np.ndarray:
    """k timesteps evenly spaced from 2% to 98% of the chain (T = 1000, k = 8: 20, 157, 294, ..., 980)."""
    return np.round(np.linspace(0.02 * num_timesteps, 0.98 * num_timesteps, k)).astype(np.int64)


def bucket_name(t: int, num_timesteps: int) -> str:
    """The quarter of the chain timestep t falls in, as a column suffix: t000_249, t250_499, ..."""
    q = num_timesteps // 4
    lo = min(t // q, 3) * q
    hi = num_timesteps - 1 if lo == 3 * q else lo + q - 1
    width = len(str(num_timesteps - 1))
    return f"t{lo:0{width}d}_{hi:0{width}d}"


class HeldOut:
    """The held-out images, the timestep grid and the fixed noise of one run; `losses(...)` evaluates them."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, cfg: ValConfig, diffusion: Diffusion,
                 pixel_space: bool, device, steps: int, log_every: int = 1, ckpt_every: int = 0):
        self.cfg, self.diffusion, self.pixel_space, self.device, self.steps = cfg, diffusion, pixel_space, device, steps
        self.log_every, self.ckpt_every = log_every, ckpt_every  # train.log_every and ckpt_every, for val.per_decade
        items = [dataset[int(i)] for i in indices]
        self.x = torch.stack([x for x, _ in items]).float().to(device)                  # (n, C, H, W)
        self.y = torch.tensor([int(y) for _, y in items], dtype=torch.long, device=device)
        self.t = timestep_grid(diffusion.num_timesteps, cfg.timesteps)                  # (K,)
        g = torch.Generator().manual_seed(cfg.noise_seed)
        self.noise = torch.randn((len(self.t) + 1, *self.x.shape), generator=g).to(device)  # (K + 1, n, C, H, W)

    def due(self, step: int) -> bool:
        """Whether the metrics.jsonl row of `step` carries the held-out loss (log_every: the rows' interval)."""
        if self.x.shape[0] == 0:
            return False
        if step == self.steps:
            return True
        if self.cfg.per_decade:  # and at every checkpoint: each evaluated checkpoint has its loss beside its FD
            return log_spaced(step, self.log_every, self.cfg.per_decade) or bool(
                self.ckpt_every and step % self.ckpt_every == 0)
        return self.cfg.every == 0 or step % self.cfg.every == 0

    def log_row(self, step: int, ema: torch.nn.Module, model: torch.nn.Module | None = None) -> dict:
        """The columns for the metrics.jsonl row of `step` ({} when not due): EMA, and raw if val.raw."""
        if not self.due(step):
            return {}
        row = self.losses(ema, "ema")
        if self.cfg.raw and model is not None:
            row.update(self.losses(model, "raw"))
        return row

    @torch.no_grad()
    def _per_image(self, model, t: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mse, vlb term in bits/dim or None without learned sigma) at timestep t for every held-out image."""
        mse, vlb, n = [], [], self.x.shape[0]
        b = images_per_forward(model, self.x.device, self.cfg.batch_img)
        # a CPU's forwards of ~2,048 tokens in near-equal parts, else slices of val.batch_img
        parts = torch.arange(n).tensor_split(-(-n // b)) if b < self.cfg.batch_img else torch.arange(n).split(b)
        for idx in parts:
            x0, y, eps = self.x[idx], self.y[idx], noise[idx]                            # (B, C, H, W), (B,), ...
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
            xt = self.diffusion.q_sample(x0, tt, eps)
            out = model(xt, self.diffusion.model_timesteps(tt), y).float()               # (B, 2C, H, W)
            mse.append(mean_flat((eps - out[:, :x0.shape[1]]) ** 2))
            if self.diffusion.learn_sigma:
                vlb.append(self.diffusion.vlb_terms(out, x0, xt, tt) if t > 0 or self.pixel_space
                           else self._continuous_decoder_bits(out, x0, xt, tt))
        return torch.cat(mse), (torch.cat(vlb) if vlb else None)

    def _continuous_decoder_bits(self, out, x0, xt, t) -> torch.Tensor:
        """-log p(x_0 | x_1) under the model's Gaussian as a density (latents are continuous), in bits per dim."""
        p = self.diffusion.p_mean_variance(out, xt, t)
        nll = 0.5 * (math.log(2 * math.pi) + p["log_variance"] + (x0 - p["mean"]) ** 2 * torch.exp(-p["log_variance"]))
        return mean_flat(nll) / math.log(2.0)

    @torch.no_grad()
    def losses(self, model: torch.nn.Module, weights: str = "ema") -> dict:
        """val_* columns (module docstring) of `model` on the held-out set; the model's train/eval mode is kept."""
        was_training = model.training
        model.eval()
        try:
            T = self.diffusion.num_timesteps
            mse, kl = {}, {}
            for k, t in enumerate(self.t):
                m, v = self._per_image(model, int(t), self.noise[k])
                mse[int(t)] = m.double().mean().item()
                if v is not None:
                    kl[int(t)] = v.double().mean().item()
            row = {f"val_mse_{weights}": float(np.mean(list(mse.values())))}
            for name, ts in _buckets(self.t, T).items():
                row[f"val_mse_{weights}_{name}"] = float(np.mean([mse[t] for t in ts]))
            if kl:
                unit, scale = ("bpd", 1.0) if self.pixel_space else ("npd", math.log(2.0))
                _, decoder = self._per_image(model, 0, self.noise[-1])
                prior = self.diffusion.prior_bpd(self.x).double().mean().item()
                vlb = prior + decoder.double().mean().item() + (T - 1) * float(np.mean(list(kl.values())))
                row[f"val_vlb_{unit}_{weights}"] = vlb * scale
                for name, ts in _buckets(self.t, T).items():
                    row[f"val_kl_{unit}_{weights}_{name}"] = float(np.mean([kl[t] for t in ts])) * scale
            return row
        finally:
            model.train(was_training)


def _buckets(grid: np.ndarray, num_timesteps: int) -> dict:
    out = {}
    for t in grid:
        out.setdefault(bucket_name(int(t), num_timesteps), []).append(int(t))
    return out


def split_heldout(data_cfg: DataConfig, cfg: ValConfig, diffusion: Diffusion, pixel_space: bool, device,
                  steps: int, log_every: int = 1, ckpt_every: int = 0) -> tuple[Dataset, HeldOut]:
    """(the training set, the held-out set): the one call the training loop makes.

    The held-out images are drawn from the whole dataset, before `data.max_images` picks its evenly strided
    subset of the rest for training, so a quick run (max_images=256) and the full run hold out the same images."""
    if cfg.heldout_img == 0:
        return build_dataset(data_cfg), HeldOut([], np.array([], dtype=np.int64), cfg, diffusion, pixel_space,
                                                device, steps, log_every, ckpt_every)
    full = build_dataset(replace(data_cfg, max_images=None))
    train_idx, heldout_idx = split_indices(len(full), cfg)
    train_idx = train_idx[strided_subset(len(train_idx), data_cfg.max_images)]
    return TrainSplit(full, train_idx), HeldOut(full, heldout_idx, cfg, diffusion, pixel_space, device, steps,
                                                log_every, ckpt_every)


# ----------------------------------------------------------------------------- into the results table


def with_val_rows(rows: list[dict], base: dict, metrics: list[dict]) -> list[dict]:
    """The results-table rows of one run with its held-out losses: val_* columns of the metrics.jsonl row at each
    eval row's step are added to it, and every other logged step with val_* columns becomes a row of its own
    (no eval metrics) so that loss curves are in the table. The placeholder row of a run without evals is
    dropped once the run has such rows."""
    val = {}
    for m in metrics:
        cols = {k: v for k, v in m.items() if k.startswith("val_")}
        if cols and "step" in m:
            val[int(m["step"])] = {**cols, "img_seen": m.get("img_seen")}
    if not val:
        return rows
    out, seen = [], set()
    for r in rows:
        if r.get("step") is None:
            continue
        cols = val.get(int(r["step"]), {})
        out.append({**r, **{k: v for k, v in cols.items() if k != "img_seen"}})
        seen.add(int(r["step"]))
    for step, cols in sorted(val.items()):
        if step not in seen:
            out.append({**base, "step": step, **cols})
    return out
