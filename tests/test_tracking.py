"""wandb as a dashboard sees it: real offline runs, read back from the .wandb files wandb wrote, across a requeue and
an eval in a separate call; and wandb failures in the save-and-requeue path, which never fail a run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scaling.jobs
import scaling.train
from scaling.checkpoint import list_steps
from scaling.config import config_from_overrides, run_dir_for
from scaling.evaluate import metric_name, setting_key
from scaling.jobs import evaluate_missing
from scaling.flops import train_flops
from scaling.rundir import append_jsonl, read_json, read_status
from scaling.tracking import STEP_BLOCK, latest_eval_metrics, reserve_steps
from scaling.train import train

torch.set_num_threads(1)
BATCH = 8


def tiny(output_root, *extra):
    """A laptop model small enough that a step takes milliseconds on one CPU thread, mirrored to wandb offline."""
    return ["model=laptop_s", "patch=8", "data.image_size=16", "data.max_images=512", f"train.batch_img={BATCH}",
            "train.log_every=1", "train.ckpt_every=3", "val.heldout_img=32", "wandb=offline",
            f"output_root={output_root}", *extra]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode (the test session disables it), with its own config and cache folders."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def fake_evaluate_checkpoint(run_dir, step, eval_cfg=None, device=None, **_):
    """An eval row as evaluate_checkpoint appends it, without sampling (FD = 1000 / step, named as the real one)."""
    name = metric_name("fd", eval_cfg.backend, eval_cfg.num_samples)
    row = {"step": step, "img_seen": step * BATCH, "metrics": {name: 1000.0 / step}, "metric_name": name,
           "fd": 1000.0 / step, "setting": setting_key(eval_cfg), "feature_extractor": eval_cfg.backend,
           "num_samples": eval_cfg.num_samples}
    append_jsonl(Path(run_dir) / "evals.jsonl", row)
    return row


# ----------------------------------------------------------------------------- reading what wandb wrote


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's transaction log (a leveldb-style log of 32 KiB blocks, after a 7-byte
    ':W&B' header) of `wandb_internal_pb2.Record` messages. wandb's own reader is private (in wandb-core); this
    one lives in the test on purpose."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding to the end of the block
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first; middle / last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def read_attempts(run_path: Path) -> list[dict]:
    """Each offline folder of the run, in order of start time (the order `wandb sync` uploads them in): its run
    record, metric definitions, history rows (with `_step`) and summary updates. A process stopped within a second
    of its start may leave a folder with no record at all (run None): wandb had not written any yet."""
    out = []
    for f in (run_path / "wandb").glob("offline-run-*/run-*.wandb"):
        a = {"file": f, "run": None, "metrics": [], "history": [], "summary": {}}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                a["run"] = r.run
            elif kind == "metric":
                a["metrics"].append(r.metric)
            elif kind == "history":
                a["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                     for i in r.history.item})
            elif kind == "summary":
                a["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                     for i in r.summary.update})
        out.append(a)
    return sorted(out, key=lambda a: (a["file"].parent.name.split("-")[2],  # offline-run-<start, to the second>-...
                                      a["run"].start_time.seconds if a["run"] else 0,
                                      a["run"].start_time.nanos if a["run"] else 0))


# ----------------------------------------------------------------------------- the test on a real offline run


def test_every_training_step_and_every_eval_reach_one_wandb_history_across_a_requeue(tmp_path, monkeypatch,
                                                                                      wandb_offline):
    monkeypatch.setattr(scaling.train, "evaluate_checkpoint", fake_evaluate_checkpoint)
    monkeypatch.setattr(scaling.jobs, "evaluate_checkpoint", fake_evaluate_checkpoint)
    real_update_ema, calls = scaling.train.update_ema, []

    def preempt_at_step_5(*args):
        real_update_ema(*args)
        calls.append(1)
        if len(calls) == 5:  # the scheduler's signal, as SLURM sends it before a requeue
            os.kill(os.getpid(), signal.SIGUSR2)

    # Attempt 1: inline evals; preempted at step 5 (after the eval of step 3).
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=9", "eval.inline=true", "eval.num_samples=20"))
    run = run_dir_for(cfg)
    monkeypatch.setattr(scaling.train, "update_ema", preempt_at_step_5)
    assert train(cfg)["state"] == "preempted" and list_steps(run) == [3, 5]
    # An eval job of another setting, a separate call while the run waits in the queue: step 3.
    other = config_from_overrides(tiny(tmp_path, "train.steps=9", "eval.inline=false", "eval.num_samples=30"))
    assert evaluate_missing(other) == 1
    # Attempt 2, a new process in SLURM's requeue: resumes at 5, evaluates 6 and 9 inline.
    monkeypatch.setattr(scaling.train, "update_ema", real_update_ema)
    assert train(cfg)["state"] == "done"
    # The eval job again: steps 6 and 9, logged after training logged step 9.
    assert evaluate_missing(other) == 2

    attempts = read_attempts(run.path)
    assert len(attempts) == 5, [a["file"] for a in attempts]  # 2 training attempts, 3 evals of the eval job
    assert all(a["run"].run_id == run.run_id and a["run"].resume for a in attempts)  # one wandb run, resumed
    for a in attempts:
        assert any(m.glob_name == "*" and m.step_metric == "step" for m in a["metrics"]), a["file"]
    rows = [r for a in attempts for r in a["history"]]
    internal = [r["_step"] for r in rows]
    assert internal == sorted(set(internal)), internal  # wandb's _step grows across the folders: none overwritten

    plan = read_json(run.plan)
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train_rows) == list(range(1, 10))
    for step, r in train_rows.items():
        assert r["train_flops"] == pytest.approx(train_flops(plan["gflops_per_img"], BATCH, step))
    evals = sorted((name, r["step"], r[name]) for r in rows for name in ("fd20_domain", "fd30_domain") if name in r)
    assert evals == [("fd20_domain", s, 1000.0 / s) for s in (3, 6, 9)] + \
                    [("fd30_domain", s, 1000.0 / s) for s in (3, 6, 9)]
    assert all("train_flops" in r and r["img_seen"] == r["step"] * BATCH for r in rows if "fd30_domain" in r)
    final = {k: v for a in attempts for k, v in a["summary"].items()}
    assert final["fd20_domain"] == final["fd30_domain"] == 1000.0 / 9
    assert final["params"] == plan["params"]

    # The documented upload finds every folder of the run (no network is needed to list them).
    out = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run.path / "wandb")],
                         capture_output=True, text=True, env=os.environ, timeout=120)
    listed = out.stdout + out.stderr
    assert out.returncode == 0 and "Would sync 5 run(s)" in listed, listed
    assert all(a["file"].name in listed for a in attempts), listed


def test_the_summary_holds_each_metric_of_the_newest_evaluated_step():
    rows = [{"step": 9, "metrics": {"fd1k_domain": 9.0}},
            {"step": 3, "metrics": {"fd1k_domain": 3.0, "is1k_domain": 1.0}},  # an older step, evaluated later
            {"step": 6, "metrics": {"fd1k_domain": 6.0, "precision1k_domain": None}}]
    assert latest_eval_metrics(rows) == {"fd1k_domain": 9.0, "is1k_domain": 1.0}


def test_step_blocks_are_never_handed_out_twice(tmp_path):
    counter = tmp_path / "wandb" / "next_step"
    first = reserve_steps(counter, 0)
    second = reserve_steps(counter, 0)
    assert (first, second) == (0, STEP_BLOCK)
    assert reserve_steps(counter, 10 * STEP_BLOCK) == 10 * STEP_BLOCK  # online: wandb's resume step comes first
    counter.write_text("garbage")
    assert reserve_steps(counter, 7) == 7


# ----------------------------------------------------------------------------- signals never fail a run


def test_wandb_raising_in_the_save_and_requeue_path_never_fails_the_run(tmp_path, monkeypatch, capsys,
                                                                        wandb_offline):
    """The wandb service dies with the requeue signal: every call from then on raises (the row logged before the
    checkpoint, finish after it). The checkpoint and the preempted status come first, the failures are reported,
    and a sample grid is no part of that path."""
    import wandb.sdk.wandb_run

    cfg = config_from_overrides(tiny(tmp_path, "train.steps=1000", "train.ckpt_every=1000", "eval.inline=false"))
    run = run_dir_for(cfg)
    real_log, at_finish = wandb.sdk.wandb_run.Run.log, []

    def log(self, data, *args, **kwargs):
        if data.get("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        if data.get("step", 0) >= 4:
            raise ConnectionResetError("Connection lost")
        return real_log(self, data, *args, **kwargs)

    def finish(self, *args, **kwargs):
        at_finish.append((read_status(run)["state"], list_steps(run)))
        raise ConnectionResetError("Connection lost")

    def grid(*args, **kwargs):
        raise RuntimeError("no grid while stopping")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", finish)
    monkeypatch.setattr(scaling.train, "save_sample_grid", grid)
    status = train(cfg)
    assert status["state"] == "preempted" and status["step"] == 4 and list_steps(run) == [4]
    assert at_finish == [("preempted", [4])]  # finish ran after the checkpoint and the status, and only once
    err = capsys.readouterr().err
    assert "ConnectionResetError: Connection lost" in err and "wandb logging stops" in err
    assert "finish failed, ignored" in err
