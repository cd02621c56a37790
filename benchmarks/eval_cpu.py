"""What an evaluation of the laptop study costs on a CPU core, before and after two changes: the reference's k-NN
radii computed once per reference (scaling.evaluate.compute_metrics caches them: knn_radii; the same numbers to
the bit), and sampling forwards of ~2,048 tokens instead of the whole batch (scaling.models.images_per_forward;
the same images, the outputs equal up to float rounding).

    python -m benchmarks.eval_cpu                 # writes benchmarks/results/eval_cpu.txt (~3 min on 2 cores)
    python -m benchmarks.eval_cpu --out -         # print only

Precision/recall: 250 generated vs 10,000 reference features of 128 dims (the domain space's, at the laptop
study's N), random normal features, torch-fidelity's arithmetic (calc_cdist_part, kthvalue), one process.
Forward: img/s of one no-grad forward of each laptop model (random weights) over a batch of 250 images at
16x16x1, the study's sampling batch, whole vs in the chunks images_per_forward gives, and the largest difference
between the two outputs, while another process runs the same forwards, not in step (`--parallel 2`: the study
runs two jobs at once, which share the caches and memory bus that the chunks spare). Median of `--repeats`
timings after one untimed call, one thread per process; the 1-minute load average is printed with the results.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from scaling.evaluate import knn_radii, precision_recall
from scaling.models import FAMILY_MODELS, build_model, images_per_forward, in_chunks

ROOT = Path(__file__).resolve().parents[1]
BATCH = 250


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def prc_rows(repeats: int) -> list[str]:
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(1)
    real = torch.randn(10_000, 128, generator=g)
    fake = torch.randn(BATCH, 128, generator=g) * 1.1
    theirs_s, theirs = timed(lambda: prc_features_to_metric(fake, real, prc_neighborhood=3, save_cpu_ram=True,
                                                            verbose=False), repeats)
    radii_s, radii = timed(lambda: knn_radii(real), repeats)
    known_s, known = timed(lambda: precision_recall(fake, real, real_radii=radii), repeats)
    same = (theirs["precision"], theirs["recall"]) == known
    return [f"torch-fidelity (prc_features_to_metric, radii of both sets each time): {theirs_s:.3f} s",
            f"the reference's radii alone (once per reference, then cached):      {radii_s:.3f} s",
            f"with the reference's radii known (compute_metrics after the first): {known_s:.3f} s "
            f"({theirs_s / known_s:.0f}x less)",
            f"precision {known[0]:.4f}, recall {known[1]:.4f}: the same to the bit as torch-fidelity's: {same}"]


def forward_rows(repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    rows = [f"{'model':<12} {'tokens/img':>10} {'whole img/s':>12} {'chunk':>6} {'chunked img/s':>14} {'speed-up':>9}"
            f" {'max |diff|':>10}"]
    for name in FAMILY_MODELS["laptop"]:
        for patch in (2, 4, 8):
            model = build_model(name, patch, input_size=16, in_channels=1, num_classes=10).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                n = images_per_forward(model, "cpu", BATCH)
                whole_s, whole = timed(lambda: model(x, t, y), repeats)
                chunk_s, chunked = timed(lambda: in_chunks(model, n)(x, t, y), repeats)
            rows.append(f"{name + '/' + str(patch):<12} {(16 // patch) ** 2:>10} {BATCH / whole_s:>12.0f} {n:>6} "
                        f"{BATCH / chunk_s:>14.0f} {whole_s / chunk_s:>8.2f}x "
                        f"{(whole - chunked).abs().max().item():>10.1e}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parallel", type=int, default=2, help="processes doing the forwards at once (1: a quiet core)")
    p.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)  # a background process of --parallel
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_cpu.txt"),
                   help="output file, or - to print only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.busy:
        while True:
            forward_rows(args.repeats)
    load = os.getloadavg()[0]
    prc = prc_rows(args.repeats)
    others = [subprocess.Popen([sys.executable, "-m", "benchmarks.eval_cpu", "--busy"], cwd=ROOT)
              for _ in range(args.parallel - 1)]
    try:
        forwards = forward_rows(args.repeats)
    finally:
        for o in others:
            o.kill()
    text = "\n".join([
        f"# benchmarks/eval_cpu.py: one thread per process, median of {args.repeats}, torch {torch.__version__}, "
        f"1-min load {load:.2f} at the start, {os.getloadavg()[0]:.2f} after the forwards", "",
        f"## Precision/recall of {BATCH} vs 10,000 features of 128 dims (one process)", *prc, "",
        f"## One no-grad forward of {BATCH} images at 16x16x1 (random weights), {args.parallel} process(es) at once",
        *forwards]) + "\n"
    print(text, end="")
    if args.out != "-":
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
