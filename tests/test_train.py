"""The training job: bit-exact resume, preemption by signal, NaN handling, progress, loss falls."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaling.checkpoint import checkpoint_path, list_steps, load_checkpoint
from scaling.config import config_from_overrides, run_dir_for
from scaling.rundir import read_json, read_jsonl, read_status
from scaling.train import batch_indices, train

ROOT = Path(__file__).resolve().parent.parent


def tiny(output_root, *extra):
    """A laptop model small enough that a step takes milliseconds on one CPU thread."""
    return ["model=laptop_s", "patch=8", "data.image_size=16", "data.max_images=512", "train.batch_img=8",
            "train.log_every=1", "train.ckpt_every=3", "eval.inline=false", "wandb=disabled", "val.heldout_img=32",
            f"output_root={output_root}", *extra]


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    epoch0 = sum((batch_indices(s, b, n, seed=1) for s in range(2)), []) + batch_indices(2, b, n, seed=1)[:2]
    assert sorted(epoch0) == list(range(n))
    assert batch_indices(3, b, n, seed=1) == batch_indices(3, b, n, seed=1)
    assert batch_indices(0, b, n, seed=1) != batch_indices(0, b, n, seed=2)


def test_resume_is_bit_exact(tmp_path):
    straight = config_from_overrides(tiny(tmp_path / "a", "train.steps=6"))
    assert train(straight)["state"] == "done"

    first = config_from_overrides(tiny(tmp_path / "b", "train.steps=3"))
    assert train(first)["state"] == "done"  # "killed" after 3 steps: only its checkpoint survives
    resumed = config_from_overrides(tiny(tmp_path / "b", "train.steps=6"))
    assert run_dir_for(resumed) == run_dir_for(first)  # the horizon is not part of the run id
    assert train(resumed)["state"] == "done"

    a = load_checkpoint(checkpoint_path(run_dir_for(straight), 6))
    b = load_checkpoint(checkpoint_path(run_dir_for(resumed), 6))
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    assert a["opt"]["state"][0]["exp_avg_sq"].equal(b["opt"]["state"][0]["exp_avg_sq"])
    losses = lambda cfg: [r["loss"] for r in read_jsonl(run_dir_for(cfg).metrics)]
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6


def test_run_directory_contract(tmp_path):
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=3"))
    train(cfg)
    run = run_dir_for(cfg)
    plan = read_json(run.plan)
    for key in ("params", "gflops_per_img", "tokens", "batch_img", "steps", "train_flops", "dataset", "device"):
        assert key in plan, key
    assert plan["train_flops"] == pytest.approx(plan["gflops_per_img"] * 1e9 * 8 * 3 * 3)
    assert plan["tokens"] == (16 // 8) ** 2
    row = read_jsonl(run.metrics)[-1]
    assert {"step", "img_seen", "loss", "lr", "grad_norm", "img_per_s"} <= row.keys()
    assert row["img_seen"] == 24
    assert list_steps(run) == [3]
    assert (run.samples / "grid_step_0000003.png").is_file()  # no inline eval drew here: the job draws a grid
    assert read_status(run)["state"] == "done"
    assert run.config.read_text().startswith("model:")
    assert not run.lock.exists()  # the lease is released


def test_nan_loss_fails_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from scaling import diffusion

    real = diffusion.Diffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(diffusion.Diffusion, "training_losses", poisoned)
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=6"))
    with pytest.raises(FloatingPointError, match="at step 5"):
        train(cfg)
    run = run_dir_for(cfg)
    status = read_status(run)
    assert status["state"] == "failed" and "step 5" in status["error"]
    assert list_steps(run) == [3]


def test_sigusr2_saves_exits_cleanly_and_rerun_matches(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = tiny(tmp_path / "sig", "train.steps=400", "train.ckpt_every=1000", "train.log_every=1", "val.every=100")
    proc = subprocess.Popen([sys.executable, "-m", "scaling.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = config_from_overrides(args)
    run = run_dir_for(cfg)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run.metrics)) < 20:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    status = read_status(run)
    assert status["state"] == "preempted", out
    stopped_at = status["step"]
    assert 20 <= stopped_at < 400 and list_steps(run) == [stopped_at]
    assert "img/s" in out and "ETA" in out  # the progress line on a non-terminal

    rerun = subprocess.run([sys.executable, "-m", "scaling.train", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from step {stopped_at}" in rerun.stdout

    straight = config_from_overrides(tiny(tmp_path / "straight", "train.steps=400", "train.ckpt_every=1000",
                                          "val.every=100"))
    train(straight)
    a = load_checkpoint(checkpoint_path(run, 400))
    b = load_checkpoint(checkpoint_path(run_dir_for(straight), 400))
    assert states_equal(a["ema"], b["ema"])


@pytest.mark.slow
def test_loss_falls_fd_falls_and_grids_are_written(tmp_path):
    cfg = config_from_overrides(["model=laptop_b", "patch=4", "train.steps=300", "train.batch_img=32",
                                 "train.log_every=25", "train.ckpt_every=150", "eval.num_samples=200",
                                 "eval.sampling_steps=10", "eval.num_ref=2000",
                                 "wandb=disabled", f"output_root={tmp_path}"])
    train(cfg)
    run = run_dir_for(cfg)
    rows = read_jsonl(run.metrics)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    # Each evaluated checkpoint's grid comes from the eval's own draw; no second sampling for a grid.
    assert sorted(p.name[:16] for p in run.samples.glob("eval_step*.png")) == ["eval_step0000150", "eval_step0000300"]
    assert not list(run.samples.glob("grid_step_*.png"))
    evals = read_jsonl(run.evals)
    assert [r["step"] for r in evals] == [150, 300]
    first, last = evals
    assert last["fd"] < first["fd"] and "fid" not in last, evals  # in the domain feature space: FD, not FID
    assert first["feature_extractor"] == "domain" and "fd200_domain" in first["metrics"]


def test_ema_warmup_follows_the_model_early_and_reaches_the_decay():
    from scaling.train import ema_decay_at

    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, warmup=True) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999, warmup=True) == 0.999


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_to_done(tmp_path):
    args = tiny(tmp_path, "train.steps=6")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "scaling.train",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done at step 6") == 2  # both ranks return the final status
    run = run_dir_for(config_from_overrides(args))
    assert read_json(run.plan)["world_size"] == 2 and list_steps(run) == [3, 6]
    assert read_jsonl(run.metrics)[-1]["img_seen"] == 6 * 8  # the global batch is split over the ranks
