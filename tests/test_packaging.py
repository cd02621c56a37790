"""A wheel (`pip install .`, not editable) ships the configs and the studies and runs the main commands."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_runs_the_paper_dry_run_and_a_laptop_step_outside_the_repository(tmp_path):
    # sdist first, then the wheel from the unpacked sdist: what an install from a source archive does
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    (sdist,) = tmp_path.glob("dit_scaling-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("dit_scaling-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"scaling/conf/config.yaml", "scaling/conf/model/dit_xl.yaml", "scaling/sweeps/laptop.yaml",
            "scaling/sweeps/paper.yaml", "scaling/reference/domain/domain-animal_mnist16-s0.pt",
            "scaling/reference/domain/domain-animal_mnist16-s0.json"} <= names
    entry_points = zipfile.ZipFile(wheel).read("dit_scaling-0.1.0.dist-info/entry_points.txt").decode()
    assert all(f"{cmd} = " in entry_points for cmd in ("dit-launch", "dit-status", "dit-results", "dit-figures"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                                       text=True, timeout=600)
    where = run("-c", "import scaling.config as c; print(c.__file__); print(c.CONF_DIR); print(c.SWEEPS_DIR)")
    assert where.stdout.split() == [str(site / "scaling" / "config.py"), str(site / "scaling" / "conf"),
                                    str(site / "scaling" / "sweeps")], where.stderr
    dry = run("-m", "scaling.launch", "-m", "model=dit_s,dit_b,dit_l,dit_xl", "patch=2,4,8", "dry_run=true")
    assert dry.returncode == 0 and "12 points, 12 runs" in dry.stdout, dry.stderr
    step = run("-m", "scaling.launch", "--config-name", "laptop", "-m", "model=laptop_s", "patch=8",
               "train.steps=1", "eval.num_samples=16", "eval.final_num_samples=32", "eval.batch_size=16",
               "eval.num_ref=200", f"output_root={tmp_path / 'out'}")
    assert step.returncode == 0 and step.stdout.strip().endswith(": done"), step.stdout + step.stderr
    assert len(list((tmp_path / "out" / "runs").glob("laptop_s-p8-*/checkpoints/step_0000001.pt"))) == 1
    # its FD in the shipped classifier's space, as on every machine
    (evals,) = (tmp_path / "out" / "runs").glob("laptop_s-p8-*/evals.jsonl")
    shipped = json.loads((ROOT / "scaling" / "reference" / "domain" / "domain-animal_mnist16-s0.json").read_text())
    assert {json.loads(line)["feature_weights_sha"] for line in evals.read_text().splitlines()} == {
        shipped["weights_sha256"][:16]}
