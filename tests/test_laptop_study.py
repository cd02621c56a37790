"""The laptop study (sweeps/laptop.yaml, the README's main command) end to end at a reduced budget: the same
12-point grid, local pool and analysis, with a few steps and samples. It checks that every artefact the full study
commits to docs/laptop/ is produced and well formed, not the scaling claim (that needs the full budget)."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_launch
from scaling.flops import closed_form_gflops

ROOT = Path(__file__).resolve().parents[1]
GRID = {(m, p) for m in ("laptop_s", "laptop_b", "laptop_l", "laptop_xl") for p in (2, 4, 8)}
REDUCED = ["data.max_images=256", "train.batch_img=8", "train.steps=4", "train.ckpt_every=2", "train.log_every=2",
           "eval.num_samples=16", "eval.final_num_samples=32", "eval.num_ref=64", "eval.sampling_steps=2",
           "eval.batch_size=16", "wandb=disabled", "val.heldout_img=32"]


def launch(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_launch("--config-dir", "sweeps", "--config-name", "laptop", "-m", "analyze=true", *REDUCED,
                      f"output_root={root}", *extra, timeout=900)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("laptop")
    first = launch(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return root, first


def test_the_readme_main_command_is_this_sweep():
    readme = (ROOT / "README.md").read_text()
    assert "python -m scaling.launch --config-dir sweeps --config-name laptop -m analyze=true" in readme


@pytest.mark.slow
def test_every_grid_point_trains_and_is_evaluated_at_each_checkpoint(study):
    root, first = study
    assert first.stdout.count("[launch] started") == 12
    # The grid is analysed once, after its last job; no job analyses (each would redo the bootstraps: ~40 s a job
    # in the full study).
    assert first.stdout.count("Fig. 8 at step") == 1
    assert not [log.name for log in (root / "logs").glob("*.log") if "Fig. 8 at step" in log.read_text()]
    started = re.findall(r"started (laptop_[a-z]+-p\d)", first.stdout)
    assert started[0] == "laptop_xl-p2" and set(started[-2:]) <= {"laptop_s-p8", "laptop_s-p4", "laptop_b-p8"}
    status = subprocess.run([sys.executable, "-m", "scaling.status", str(root)], capture_output=True, text=True)
    assert status.stdout.strip().endswith("12 runs: 12 done"), status.stdout
    rows = read_csv(root / "analysis" / "results.csv")
    assert {(r["model"], int(r["patch"])) for r in rows} == GRID
    # the curve (FD-16) at both checkpoints, the final one also at FD-32 from the same draw, with KID beside FD
    assert sorted(int(r["step"]) for r in rows) == [2] * 12 + [4] * 24
    curve = [r for r in rows if r["metric_name"] == "fd16_domain"]
    final = [r for r in rows if r["metric_name"] == "fd32_domain"]
    assert len(curve) == 24 and len(final) == 12 and {int(r["step"]) for r in final} == {4}
    for r in rows:
        n = int(r["num_samples"])
        assert r["metric_label"] == f"FD-{n} (domain features)" and r["feature_extractor"] == "domain"
        assert math.isfinite(float(r[f"fd{n}_domain"])) and float(r[f"fd{n}_domain"]) > 0
        assert math.isfinite(float(r[f"kid{n}_domain"])) and math.isfinite(float(r["val_mse_ema"]))
        gflops = closed_form_gflops(r["model"], int(r["patch"]), input_size=16, in_channels=1)
        assert float(r["gflops_per_img"]) == pytest.approx(gflops, rel=1e-9)
        assert float(r["train_flops"]) == pytest.approx(gflops * 1e9 * 8 * int(r["step"]) * 3, rel=1e-9)


@pytest.mark.slow
def test_the_figures_and_fits_are_written_and_well_formed(study):
    root, _ = study
    out = root / "analysis"
    for name in ("fig6_fid_vs_steps", "fig8_fid_vs_gflops", "fig9_fid_vs_train_compute"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    fig6 = read_csv(out / "fig6_fid_vs_steps.csv")
    assert len({r["run_id"] for r in fig6}) == 12 and len(fig6) == 24  # the FD-16 curve at both checkpoints
    fig8 = [r for r in read_csv(out / "fig8_fid_vs_gflops.csv") if r["kind"] != "fit"]
    assert len(fig8) == 12 and {r["label"] for r in fig8} == {f"Laptop-{m[7:].upper()}/{p}" for m, p in GRID}
    fits = json.loads((out / "fits.json").read_text())
    assert fits["fig8"]["n_runs"] == 12 and fits["fig8"]["metric_label"] == "FD-32 (domain features)"
    assert -1.0 <= fits["fig8"]["pearson_r_log10_gflops"] <= 1.0
    assert fits["fig8"]["power_law"]["fit"]["n"] == 12


@pytest.mark.slow
def test_a_rerun_of_the_finished_study_skips_every_run(study):
    root, _ = study
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*") if p.is_file()}
    again = launch(root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "started" not in again.stdout and again.stdout.count("done, skipped") == 12, again.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*") if p.is_file()} == before
