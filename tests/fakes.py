"""Synthetic run directories that follow the run-directory contract (docs/design.md), for tests and examples.

`make_fake_run(root, ...)` writes one run (config.yaml, plan.json, status.json, evals.jsonl);
`make_laptop_grid(root, ...)` writes the 12-run S/B/L/XL x patch 2/4/8 grid of the laptop family whose FID
follows a known law, so that fits and figures can be checked against it.
"""

import json
from pathlib import Path

import numpy as np

SIZES = ("s", "b", "l", "xl")
PATCHES = (2, 4, 8)

# Gflops / params of the synthetic laptop family: the paper's Table 4 scaled down (a stand-in, not measured).
_PAPER_GFLOPS = {("s", 8): 0.36, ("s", 4): 1.41, ("s", 2): 6.06, ("b", 8): 1.42, ("b", 4): 5.56, ("b", 2): 23.01,
                 ("l", 8): 5.01, ("l", 4): 19.70, ("l", 2): 80.71, ("xl", 8): 7.39, ("xl", 4): 29.05,
                 ("xl", 2): 118.64}
_PAPER_PARAMS_M = {"s": 33, "b": 130, "l": 458, "xl": 675}


def make_fake_run(root, model="laptop_s", patch=4, block="adaln_zero", *, seed=0, gflops_per_img=None,
                  params=None, batch_img=64, steps=1000, evals=None, state="done", dataset="animal_mnist",
                  resolution=32, input_size=32, in_channels=1, device="cpu", files=("config", "plan", "status",
                  "evals"), extra_eval_lines=()) -> Path:
    """Write `<root>/runs/<run_id>/` and return its path.

    evals: list of dicts, each at least {"step", "fd"}; missing keys get the laptop defaults (domain features,
    1000 samples, DDPM, 100 steps, no guidance). `files` picks which files exist; `extra_eval_lines` are raw
    lines appended to evals.jsonl (to test malformed input).
    """
    size = model.split("_")[-1]
    family = "paper" if model.startswith("dit_") else "laptop"
    if gflops_per_img is None:
        gflops_per_img = _PAPER_GFLOPS.get((size, patch), 1.0) / (1.0 if family == "paper" else 1000.0)
    if params is None:
        params = int(_PAPER_PARAMS_M.get(size, 10) * (1e6 if family == "paper" else 1e4))
    run_id = f"{model}-p{patch}-{block}-{dataset}{resolution}-s{seed}-fake0000"
    path = Path(root) / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    plan = {"run_id": run_id, "model": model, "family": family, "patch": patch, "block": block, "seed": seed,
            "params": params, "gflops_per_img": gflops_per_img, "tokens": (input_size // patch) ** 2,
            "batch_img": batch_img, "steps": steps, "train_flops": gflops_per_img * 1e9 * batch_img * steps * 3,
            "dataset": dataset, "resolution": resolution, "input_size": input_size, "in_channels": in_channels,
            "num_classes": 10, "device": device}
    if "config" in files:
        (path / "config.yaml").write_text(f"model:\n  name: {model}\npatch: {patch}\nblock: {block}\nseed: {seed}\n")
    if "plan" in files:
        (path / "plan.json").write_text(json.dumps(plan, indent=2))
    if "status" in files:
        last = max([e["step"] for e in evals or []], default=0)
        (path / "status.json").write_text(json.dumps({"state": state, "step": last, "error": None}))
    if "evals" in files and (evals or extra_eval_lines):
        with open(path / "evals.jsonl", "w") as f:
            for e in evals or []:
                row = {"feature_extractor": "domain", "num_samples": 1000, "sampler": "ddpm", "sampling_steps": 100,
                       "cfg_scale": 1.0, "seed": 0, "wall_s": 1.0, "img_seen": e["step"] * batch_img, **e}
                row.setdefault("inception_score", None)
                row.setdefault("precision", None)
                row.setdefault("recall", None)
                kind = "fid" if row["feature_extractor"] == "inception" else "fd"
                if kind == "fid":  # `fid` only for Inception FID (docs/design.md, evals.jsonl)
                    row.setdefault("fid", row["fd"])
                row.setdefault("metric_name", f"{kind}{row['num_samples'] // 1000}k_{row['feature_extractor']}")
                row.setdefault("metrics", {row["metric_name"]: row["fd"]})
                row.setdefault("setting", f"{row['feature_extractor']}-n{row['num_samples']}-{row['sampler']}"
                                          f"{row['sampling_steps']}-cfg{row['cfg_scale']}-s{row['seed']}")
                f.write(json.dumps(row) + "\n")
            for line in extra_eval_lines:
                f.write(line + "\n")
    return path


def laptop_fd(gflops_per_img, step, noise=0.0, rng=None):
    """The synthetic law of the laptop grid: FD = 5 + 20 g^-0.3 (1 + 300 step^-0.6) (g in Mflops), x lognormal noise.

    Larger models learn faster per step and reach lower FID, as in the paper's Fig. 6, so the compute frontier
    moves from small to large models as compute grows.
    """
    g_mflops = np.asarray(gflops_per_img) * 1e3
    fd = 5.0 + 20.0 * g_mflops ** -0.3 * (1 + 300.0 * np.asarray(step, dtype=float) ** -0.6)
    if noise and rng is not None:
        fd = fd * np.exp(rng.normal(0.0, noise, np.shape(fd)))
    return fd


def make_laptop_grid(root, eval_steps=(250, 500, 1000, 2000, 4000, 8000), noise=0.03, seed=0,
                     sampling_study=(), blocks=("adaln_zero",)) -> list[Path]:
    """The 12-run laptop grid with FD from `laptop_fd`; `sampling_study` adds, at the last step, evals with
    those DDPM step counts (Fig. 10); extra `blocks` add the S/2..XL/2 runs with other block designs (Fig. 5)."""
    rng = np.random.default_rng(seed)
    paths = []
    block_penalty = {"adaln_zero": 1.0, "adaln": 1.15, "cross_attn": 1.25, "in_context": 1.6}
    for block in blocks:
        for size in SIZES:
            for patch in PATCHES:
                if block != blocks[0] and patch != 2:
                    continue
                g = _PAPER_GFLOPS[(size, patch)] / 1000.0
                evals = [{"step": s, "fd": float(laptop_fd(g, s, noise, rng)) * block_penalty.get(block, 1.0)}
                         for s in eval_steps]
                for k in sampling_study:
                    # fewer sampling steps -> worse FID (paper Fig. 10); the default 100 steps is the reference
                    fd = float(laptop_fd(g, eval_steps[-1], noise, rng)) * (1 + 8.0 / k) / (1 + 8.0 / 100)
                    evals.append({"step": eval_steps[-1], "fd": fd, "sampling_steps": k})
                paths.append(make_fake_run(root, f"laptop_{size}", patch, block, gflops_per_img=g,
                                           steps=eval_steps[-1], evals=evals))
    return paths


# The synthetic loss law of `loss_table`: L(N, D) = E + A / N^a + B / D^b, N in Gflops/img, D in images.
LOSS_LAW = {"E": 0.05, "A": 0.01, "a": 0.35, "B": 3.0, "b": 0.45}
FD_LAW = {"F": 2.0e5, "k": 2.5}   # FD = F L^k on the evaluated checkpoints


def loss_table(seed=0, sigma=0.005, steps=tuple(range(50, 1201, 50)), batch_img=32, eval_every=300, seeds=(0,),
               law=None, fd_sigma=0.03):
    """A results table (scaling.results columns) of the 12-model laptop grid whose held-out loss `val_mse_ema`
    follows LOSS_LAW x lognormal(sigma) at every logged step, and whose `fd` follows FD_LAW x lognormal(fd_sigma)
    at every `eval_every` steps (metric fd500_domain). `seeds` replicates every model."""
    import pandas as pd

    law = {**LOSS_LAW, **(law or {})}
    rng = np.random.default_rng(seed)
    rows = []
    for size in SIZES:
        for patch in PATCHES:
            g = _PAPER_GFLOPS[(size, patch)] / 1000.0
            for s0 in seeds:
                run_id = f"laptop_{size}-p{patch}-adaln_zero-animal_mnist16-s{s0}-synth000"
                for step in steps:
                    d = step * batch_img
                    loss = (law["E"] + law["A"] * g ** -law["a"] + law["B"] * d ** -law["b"]) * np.exp(
                        rng.normal(0, sigma))
                    row = {"run_id": run_id, "model": f"laptop_{size}", "family": "laptop", "patch": patch,
                           "block": "adaln_zero", "params": int(_PAPER_PARAMS_M[size] * 1e4), "gflops_per_img": g,
                           "batch_img": batch_img, "seed": s0, "step": step, "img_seen": d,
                           "train_flops": g * 1e9 * batch_img * step * 3, "val_mse_ema": loss}
                    if step % eval_every == 0:
                        row.update(fd=FD_LAW["F"] * loss ** FD_LAW["k"] * np.exp(rng.normal(0, fd_sigma)),
                                   metric_name="fd500_domain", metric_label="FD-500 (domain features)",
                                   feature_extractor="domain", num_samples=500)
                    rows.append(row)
    return pd.DataFrame(rows)


AXES_LAW = {"E": 0.05, "params": (40.0, 0.45), "tokens": (0.08, 0.6), "img_seen": (3.0, 0.5)}


def axes_table(sigma=0.0, seed=0):
    """4 widths x 3 patch sizes x 12 logged steps whose loss is AXES_LAW x lognormal(sigma): additive in
    parameters, tokens per image and images seen, so Gflops (their product) alone cannot describe it."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for params in (2.6e5, 1e6, 3.5e6, 4.9e6):  # 12 distinct products with the tokens: 12 sizes in Gflops
        for tokens in (4, 16, 64):
            for d in range(1600, 19201, 1600):
                loss = AXES_LAW["E"] + sum(A * v ** -a for v, (A, a) in zip(
                    (params, tokens, d), (AXES_LAW["params"], AXES_LAW["tokens"], AXES_LAW["img_seen"])))
                rows.append({"run_id": f"p{params:g}-t{tokens}", "params": params, "tokens": tokens,
                             "img_seen": d, "gflops_per_img": params * tokens * 2e-9,
                             "val_mse_ema": loss * np.exp(rng.normal(0, sigma))})
    return pd.DataFrame(rows)


def write_example_figures(out_dir="docs/figures") -> None:
    """docs/figures/: Fig. 8 from the paper's Table 4, and placeholder Fig. 6 / Fig. 9 from the synthetic
    laptop grid (example_*.png, marked as synthetic until real laptop-study results exist).

        python tests/fakes.py docs/figures
    """
    import shutil
    import tempfile

    from analysis.figures import fig6_steps, fig8_gflops, fig9_train_compute
    from scaling.results import collect, paper_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    try:
        out = fig8_gflops(paper_table(), tmp, n_boot=1000)
        out.fig.savefig(out_dir / "paper_fig8.png", dpi=110)
        make_laptop_grid(tmp / "root")
        df = collect([tmp / "root"])
        for name, out in (("example_fig6", fig6_steps(df, tmp)), ("example_fig9", fig9_train_compute(df, tmp))):
            out.fig.axes[0].text(0.02, 0.02, "synthetic placeholder data (tests/fakes.py),\nnot a measured result",
                                 transform=out.fig.axes[0].transAxes, fontsize=7, color="0.35", ha="left",
                                 va="bottom")
            out.fig.savefig(out_dir / f"{name}.png", dpi=110)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys

    write_example_figures(*sys.argv[1:])
