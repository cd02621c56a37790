"""What a training step of the laptop models costs on one CPU core, with the decoder term of the VLB computed for
every row of the batch (the form before, which accelerators keep) and for the rows at t = 0 only (what
Diffusion.vlb_terms does on a CPU now: the same values and gradients to the bit).

    python -m benchmarks.train_cpu                 # writes benchmarks/results/train_cpu.txt (~2 min on 2 cores)
    python -m benchmarks.train_cpu --out -         # print only

A step as scaling.train takes it, on random 16x16x1 images in [-1, 1] at batch 32 (the laptop study's): timesteps
drawn uniformly, training_losses (mse + vlb), backward, gradient clipping, fused AdamW, the EMA update. Both forms
train the same model from the same weights on the same batches, alternating step by step so that a change of
the machine's speed falls on both; the weights after the last step are compared bit for bit. One thread; the
median step time over `--steps`; the 1-minute load average is printed with the results.
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench import cpu_name
from scaling.diffusion import Diffusion, DiffusionConfig, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from scaling.models import build_model
from scaling.train import update_ema

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("laptop_xxs", "laptop_xs", "laptop_s", "laptop_b")
BATCH = 32


class EveryRow(Diffusion):
    """The decoder NLL for every row, then selected at t = 0: vlb_terms before, and on accelerators now."""

    def vlb_terms(self, model_out, x0, xt, t):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        p = self.p_mean_variance(model_out, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class Trainer:
    def __init__(self, name: str, diffusion: Diffusion):
        torch.manual_seed(0)
        self.model = build_model(name, 4, input_size=16, in_channels=1, num_classes=10, learn_sigma=True,
                                 block="adaln_zero", class_dropout=0.1)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0, fused=True)
        self.diffusion = diffusion

    def step(self, x, y, t, noise, seed: int) -> float:
        torch.manual_seed(seed)  # the label dropout's draw: the same for both forms
        t0 = time.perf_counter()
        loss = self.diffusion.training_losses(self.model, x, t, y, noise=noise)["loss"].mean()
        loss.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0).item()
        self.opt.step()
        update_ema(self.ema, self.params, 0.999)
        return time.perf_counter() - t0


def rows(steps: int) -> list[str]:
    out = []
    cfg = DiffusionConfig()
    for name in MODELS:
        before, after = Trainer(name, EveryRow(cfg)), Trainer(name, Diffusion(cfg))
        g = torch.Generator().manual_seed(1)
        times = {"before": [], "after": []}
        for i in range(steps + 10):
            x = torch.rand(BATCH, 1, 16, 16, generator=g) * 2 - 1
            y, t = torch.randint(0, 10, (BATCH,), generator=g), torch.randint(0, 1000, (BATCH,), generator=g)
            noise = torch.randn(BATCH, 1, 16, 16, generator=g)
            for key, trainer in (("before", before), ("after", after)) if i % 2 else (("after", after),
                                                                                        ("before", before)):
                s = trainer.step(x, y, t, noise, seed=i)
                if i >= 10:  # 10 untimed steps first
                    times[key].append(s)
        same = all(torch.equal(a, b) for a, b in zip(before.params, after.params))
        b_ms, a_ms = (statistics.median(times[k]) * 1e3 for k in ("before", "after"))
        out.append(f"{name + '/4':<14}{b_ms:>10.2f}{a_ms:>10.2f}{b_ms / a_ms:>8.2f}x   {same}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per form and model (default 200)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cpu.txt"), help="'-': print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    head = [f"# benchmarks/train_cpu.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu_name()}), "
            f"one thread, batch {BATCH}, median of {args.steps} steps; torch {torch.__version__}",
            f"{'model':<14}{'every row':>10}{'t=0 rows':>10}{'':>9}   weights identical after the last step",
            f"{'':<14}{'ms/step':>10}{'ms/step':>10}"]
    body = rows(args.steps)
    text = "\n".join(head + body + [f"# 1-minute load average at the end: {os.getloadavg()[0]:.2f}"]) + "\n"
    print(text, end="")
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
