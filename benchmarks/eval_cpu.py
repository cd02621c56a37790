"""What precision/recall costs in an evaluation of the laptop study on one CPU core, with the reference's k-NN
radii computed at every evaluation (torch-fidelity's calculate_metrics) and computed once per reference
(scaling.evaluate.compute_metrics caches them: knn_radii); the numbers are the same to the bit.

    python -m benchmarks.eval_cpu                 # writes benchmarks/results/eval_cpu.txt (~30 s)
    python -m benchmarks.eval_cpu --out -         # print only

250 generated vs 10,000 reference features of 128 dims (the domain space's, at the laptop study's N), random
normal features, torch-fidelity's arithmetic (calc_cdist_part, kthvalue). Median of `--repeats` timings after one
untimed call, one thread; the 1-minute load average is printed with the results.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from scaling.evaluate import knn_radii, precision_recall

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_cpu.txt"),
                   help="output file, or - to print only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(1)
    real = torch.randn(10_000, 128, generator=g)
    fake = torch.randn(250, 128, generator=g) * 1.1
    load = os.getloadavg()[0]
    theirs_s, theirs = timed(lambda: prc_features_to_metric(fake, real, prc_neighborhood=3, save_cpu_ram=True,
                                                            verbose=False), args.repeats)
    radii_s, radii = timed(lambda: knn_radii(real), args.repeats)
    known_s, known = timed(lambda: precision_recall(fake, real, real_radii=radii), args.repeats)
    same = (theirs["precision"], theirs["recall"]) == known
    text = "\n".join([
        f"# benchmarks/eval_cpu.py: one thread, median of {args.repeats}, torch {torch.__version__}, 1-min load "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "precision/recall of 250 vs 10,000 features of 128 dims",
        f"  torch-fidelity (prc_features_to_metric, radii of both sets each time): {theirs_s:.3f} s",
        f"  the reference's radii alone (once per reference, then cached):      {radii_s:.3f} s",
        f"  with the reference's radii known (compute_metrics after the first): {known_s:.3f} s "
        f"({theirs_s / known_s:.0f}x less)",
        f"  precision {known[0]:.4f}, recall {known[1]:.4f}: the same to the bit as torch-fidelity's: {same}"]) + "\n"
    print(text, end="")
    if args.out != "-":
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
