"""Faults a long study meets: leases that must neither wedge nor double-train, non-finite steps, torn and garbage
files, stale temporary files, preemption checkpoints, signals at awkward moments, a full disk."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.chaos import chaos, dead_pid, race, summary_line
from helpers import run_launch
from scaling.checkpoint import checkpoint_path, list_steps, load_checkpoint, load_latest, save_checkpoint
from scaling.config import config_from_overrides, run_dir_for
from scaling.config import EvalConfig
from scaling.evaluate import eval_steps, missing_evals
from scaling.rundir import (Lease, LeaseLost, RunDir, RunLocked, acquire_lease, append_jsonl, clean_temporary,
                            lease_is_stale, process_start, read_jsonl, read_jsonl_checked, read_status, repair_jsonl,
                            write_json, write_status)
import scaling.train as scaling_train
from scaling.train import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def tiny(output_root, *extra):
    """A laptop model small enough that a step takes milliseconds on one CPU thread."""
    return ["model=laptop_s", "patch=8", "data.image_size=16", "data.max_images=512", "train.batch_img=8",
            "train.log_every=1", "train.ckpt_every=3", "eval.inline=false", "wandb=disabled",
            f"output_root={output_root}", *extra]


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- A, B, C: the lease


@pytest.mark.parametrize("content", ["", "{", "\x00\x00garbage", "[1, 2]", '{"pid": "x"}'])
def test_an_empty_or_garbage_lease_is_stale_and_taken_over_with_a_warning(tmp_path, capsys, content):
    run = RunDir(tmp_path / "r").create()
    run.lock.write_text(content)
    lease = acquire_lease(run)
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    assert str(run.lock) in capsys.readouterr().err  # the warning names the file
    lease.release()
    assert not run.lock.exists()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_launches_racing_for_a_lease_give_exactly_one_holder(tmp_path, stale):
    run = RunDir(tmp_path / "r").create()
    outcomes = race(run, racers=4, rounds=8, stale=stale)
    assert all(o == ["held", "locked", "locked", "locked"] for o in outcomes), outcomes


@pytest.mark.slow
def test_the_chaos_script_in_small(tmp_path):
    s = chaos(trials=2, races=4, seed=1, work=tmp_path)
    assert s["kills"] >= 2 and s["fresh_one_holder"] == s["stale_one_holder"] == 4, summary_line(s)
    for key in ("corrupt", "differ", "bad_rows", "temp_left", "not_done", "fresh_crashes", "stale_crashes"):
        assert s[key] == 0, summary_line(s)


def test_a_live_holder_on_this_host_is_never_stale_however_old_its_heartbeat(tmp_path):
    run = RunDir(tmp_path / "r").create()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for(lambda: process_start(holder.pid) is not None, 10, "the holder's /proc entry")
        info = {"host": socket.gethostname(), "pid": holder.pid, "start": process_start(holder.pid),
                "heartbeat": 0.0, "token": "t"}  # back-dated by decades
        write_json(run.lock, info)
        assert not lease_is_stale(info, stale_s=1.0)
        with pytest.raises(RunLocked, match=str(holder.pid)):
            acquire_lease(run, stale_s=1.0)
        # The same pid with another start time is another process (a reused pid): the lease is stale.
        assert lease_is_stale({**info, "start": "another-boot:1"}, stale_s=1.0)
    finally:
        holder.kill()
        holder.wait()
    assert lease_is_stale(info, stale_s=1e9)  # its process is gone: stale at once


def test_a_holder_on_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    now = time.time()
    assert not lease_is_stale({"host": "node7", "pid": 1, "heartbeat": now - 10, "token": "t"}, stale_s=60)
    assert lease_is_stale({"host": "node7", "pid": 1, "heartbeat": now - 120, "token": "t"}, stale_s=60)


def test_the_heartbeat_thread_beats_without_logging_and_writes_the_step(tmp_path):
    run = RunDir(tmp_path / "r").create()
    write_status(run, "running", 0)
    with Lease(run, stale_s=60, beat_s=0.05).hold() as lease:
        first = json.loads(run.lock.read_text())["heartbeat"]
        lease.step = 31
        wait_for(lambda: json.loads(run.lock.read_text())["heartbeat"] > first and read_status(run)["step"] == 31,
                 10, "a heartbeat")
        assert read_status(run)["state"] == "running"
    assert not run.lock.exists()


def test_a_holder_that_lost_its_lease_stops_instead_of_writing(tmp_path):
    run = RunDir(tmp_path / "r").create()
    lease = acquire_lease(run)
    lease.check()
    info = json.loads(run.lock.read_text())
    write_json(run.lock, {**info, "pid": info["pid"] + 1, "token": "someone-else", "generation": 2})
    with pytest.raises(LeaseLost, match="someone-else|generation 2"):
        lease.check()
    lease.beat()
    assert lease.lost  # the heartbeat noticed too, and did not overwrite the new holder's lease
    assert json.loads(run.lock.read_text())["token"] == "someone-else"
    lease.release()
    assert run.lock.exists()  # not ours to remove


def test_status_and_a_relaunch_survive_a_garbage_lease(tmp_path):
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=3"))
    train(cfg)
    run = run_dir_for(cfg)
    run.lock.write_text("")  # what a kill between create and write used to leave
    write_status(run, "running", 3)
    out = subprocess.run([sys.executable, "-m", "scaling.status", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert out.returncode == 0 and run.run_id in out.stdout and "stale" in out.stdout, out.stdout + out.stderr
    assert f"{run.lock}: unreadable" in out.stdout
    assert train(config_from_overrides(tiny(tmp_path, "train.steps=6")))["state"] == "done"
    assert read_status(run)["step"] == 6 and not run.lock.exists()


# ----------------------------------------------------------------------------- D: non-finite steps


def test_a_nan_gradient_is_never_checkpointed_and_the_last_finite_checkpoint_is_named(tmp_path, monkeypatch):
    """A gradient that turns NaN while the loss is finite (here made so at the 4th step by a hook on one weight:
    a diverging run's loss goes to inf first, which the loss check stops)."""
    build = scaling_train.build_model_for
    backwards = []

    def with_a_nan_gradient(cfg, plan):
        model = build(cfg, plan)
        weight = next(p for p in model.parameters() if p.requires_grad)
        weight.register_hook(lambda g: backwards.append(1) or (g * float("nan") if len(backwards) == 4 else g))
        return model

    monkeypatch.setattr(scaling_train, "build_model_for", with_a_nan_gradient)
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=20", "train.ckpt_every=1"))
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 4 .*step_0000003\.pt"):
        train(cfg)
    run = run_dir_for(cfg)
    steps = list_steps(run)
    assert steps == [1, 2, 3], "the steps before the blow-up are kept"
    for s in steps:
        ckpt = load_checkpoint(checkpoint_path(run, s))
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in ckpt[part].values()), (s, part)
    status = read_status(run)
    assert status["state"] == "failed" and status["step"] == steps[-1]  # the bad step was not applied
    assert f"step_{steps[-1]:07d}.pt" in status["error"] and "gradient norm" in status["error"]


def test_a_non_finite_checkpoint_on_disk_is_skipped_on_resume(tmp_path, capsys):
    run = RunDir(tmp_path / "r").create()
    save_checkpoint(run, {"step": 1, "model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}})
    save_checkpoint(run, {"step": 2, "model": {"w": torch.tensor([1.0, float("nan")])}, "ema": {"w": torch.ones(2)}})
    assert load_latest(run)["step"] == 1
    assert "non-finite" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_non_finite_or_non_positive_learning_rate_fails_before_anything_runs(tmp_path, value):
    out = run_launch(*tiny(tmp_path, f"train.lr={value}"))
    assert out.returncode == 2 and f"train.lr={float(value)}" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- E: torn and bad JSONL rows


def test_an_append_after_a_torn_line_does_not_glue_onto_it(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    append_jsonl(path, {"step": 2})
    rows, problems = read_jsonl_checked(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert problems == [f"{path} line 2: not JSON"]


def test_resume_repairs_a_torn_last_line_and_rows_with_bad_types(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    for s in (1, 2, 3):
        append_jsonl(path, {"step": s})
    with open(path, "a") as f:
        f.write('{"step": "x"}\n{"step": 4, "lo')
    problems = repair_jsonl(path, max_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert path.read_text().endswith("}\n")
    assert any("line 4" in p for p in problems) and any("line 5" in p for p in problems)


def test_a_run_with_a_torn_and_a_bad_metrics_row_resumes(tmp_path):
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=3"))
    train(cfg)
    run = run_dir_for(cfg)
    with open(run.metrics, "a") as f:
        f.write('{"step": "x"}\n{"step": 9, "lo')
    resumed = config_from_overrides(tiny(tmp_path, "train.steps=6"))
    assert train(resumed)["state"] == "done"
    assert [r["step"] for r in read_jsonl(run.metrics)] == [1, 2, 3, 4, 5, 6]
    assert read_jsonl_checked(run.metrics)[1] == []


# ----------------------------------------------------------------------------- F: garbage files in one run


@pytest.fixture(scope="module")
def garbage_root(tmp_path_factory):
    """Two finished runs; then one gets a garbage status.json and bad rows, the other an odd status."""
    root = tmp_path_factory.mktemp("garbage")
    args = [tiny(root, "train.steps=2", "patch=8"), tiny(root, "train.steps=2", "patch=4")]
    for a in args:
        train(config_from_overrides(a))
    bad, odd = (run_dir_for(config_from_overrides(a)) for a in args)
    bad.status.write_text("")
    append_jsonl(bad.evals, {"step": 2, "fid": "n/a", "setting": "x", "feature_extractor": "domain"})
    with open(bad.evals, "a") as f:
        f.write("not json\n")
    write_json(odd.status, {"state": "weird", "step": "x"})
    return root, args, bad, odd


def test_status_reports_each_garbage_file_per_run_and_exits_0(garbage_root):
    root, _, bad, odd = garbage_root
    out = subprocess.run([sys.executable, "-m", "scaling.status", str(root)], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    assert str(bad.status) in out.stdout and str(odd.status) in out.stdout, out.stdout
    assert f"{bad.evals} line 2" in out.stdout, out.stdout


def test_results_reports_each_garbage_file_per_run(garbage_root, tmp_path):
    root, _, bad, _ = garbage_root
    out = subprocess.run([sys.executable, "-m", "scaling.results", str(root), "-o", str(tmp_path / "t.csv")],
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    assert f"{bad.evals} line 2" in out.stderr and bad.run_id in out.stderr, out.stderr


def test_launch_survives_garbage_status_files(garbage_root):
    from scaling.jobs import Point, point_state
    from hydra_plugins.dit_scaling.local_launcher import largest_first

    root, args, bad, odd = garbage_root
    points = [Point(a, config_from_overrides(a), "") for a in args]
    assert [point_state(p.cfg) for p in points] == ["partial", "partial"]
    assert len(largest_first(points)) == 2
    dry = run_launch(*tiny(root, "train.steps=2"), "-m", "patch=4,8", "dry_run=true")
    assert dry.returncode == 0, dry.stderr


# ----------------------------------------------------------------------------- G: temporary files


def test_start_up_removes_stale_temporary_files_of_its_run_only(tmp_path):
    run = RunDir(tmp_path / "r").create()
    host, dead = socket.gethostname(), dead_pid()
    stale = [run.checkpoints / f".tmp_{host}-{dead}_abc.pt", run.path / f".lock.json.{host}-{dead}.x1.tmp",
             run.checkpoints / ".tmp_oldformat.pt"]
    live = [run.path / f".status.json.{host}-{os.getppid()}.x2.tmp",           # a live writer on this host
            run.path / ".evals.jsonl.elsewhere-5.x3.tmp"]                    # another host, written just now
    for p in stale + live:
        p.write_bytes(b"partial")
    removed = clean_temporary(run)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


def test_a_killed_save_leaves_temporary_files_that_the_next_start_removes(tmp_path):
    cfg = config_from_overrides(tiny(tmp_path, "train.steps=3"))
    train(cfg)
    run = run_dir_for(cfg)
    junk = [run.checkpoints / f".tmp_{socket.gethostname()}-{dead_pid()}_zz.pt", run.checkpoints / ".tmp_abc.pt"]
    for p in junk:
        p.write_bytes(b"x" * 1000)
    train(config_from_overrides(tiny(tmp_path, "train.steps=6")))
    assert not any(p.exists() for p in junk)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest.json", "step_0000003.pt", "step_0000006.pt"]


# ----------------------------------------------------------------------------- H: evaluation schedule by step


def test_the_eval_schedule_is_by_step_not_by_position():
    # Checkpoints every 300 steps, every 3rd evaluated, plus the final step.
    assert eval_steps([300, 600, 900], ckpt_every=300, every_ckpt=3, final_step=1200) == [900]
    assert eval_steps([300, 450, 600, 900], ckpt_every=300, every_ckpt=3, final_step=1200) == [900]
    assert eval_steps([300, 450, 600], ckpt_every=300, every_ckpt=3, final_step=600) == [600]  # the final step
    assert eval_steps([300, 450, 600], ckpt_every=300, every_ckpt=1, final_step=600) == [300, 600]  # not 450
    assert eval_steps([100_000, 200_000, 250_000, 400_000], ckpt_every=50_000, every_ckpt=8,
                      final_step=400_000) == [400_000]


def test_missing_evals_follow_the_schedule_of_the_run(tmp_path):
    run = RunDir(tmp_path / "r").create()
    for s in (300, 450, 600, 900):
        save_checkpoint(run, {"step": s})
    e = EvalConfig(every_ckpt=3)
    assert missing_evals(run.path, e, ckpt_every=300, final_step=1200) == [900]
    assert missing_evals(run.path, EvalConfig(every_ckpt=1), ckpt_every=300, final_step=900) == [300, 600, 900]


# ----------------------------------------------------------------------------- I, J: status and signals


def start_job(argv, log: Path, module="scaling.launch"):
    f = open(log, "w")  # a file, not a pipe: a full pipe would stall the job
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=ENV), f


def test_status_carries_the_step_at_every_checkpoint(tmp_path):
    argv = tiny(tmp_path, "train.steps=100000", "train.ckpt_every=5", "train.log_every=1000")
    run = run_dir_for(config_from_overrides(argv))
    proc, f = start_job(argv, tmp_path / "job.log")
    try:
        wait_for(lambda: len(list_steps(run)) >= 3, 120, "three checkpoints")
    finally:
        proc.kill()  # no chance to say anything
        proc.wait()
        f.close()
    status = read_status(run)
    assert status["state"] == "running" and status["step"] >= 15 and status["step"] % 5 == 0, status


def test_ctrl_c_on_a_single_launch_saves_and_marks_preempted(tmp_path):
    argv = tiny(tmp_path, "train.steps=100000", "train.ckpt_every=100000")
    run = run_dir_for(config_from_overrides(argv))
    proc, f = start_job(argv, tmp_path / "job.log")
    try:
        wait_for(lambda: len(read_jsonl(run.metrics)) >= 5, 120, "five steps")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        f.close()
    out = (tmp_path / "job.log").read_text()
    status = read_status(run)
    assert status["state"] == "preempted" and list_steps(run) == [status["step"]], out
    assert rc == 3 and "Traceback" not in out, out


def test_a_signal_during_start_up_is_not_lost(tmp_path):
    argv = tiny(tmp_path, "train.steps=100000", "train.ckpt_every=100000")
    run = run_dir_for(config_from_overrides(argv))
    proc, f = start_job(argv, tmp_path / "job.log")
    time.sleep(1.0)  # the launcher is still importing and composing: no run directory yet
    assert not run.status.exists()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        f.close()
    out = (tmp_path / "job.log").read_text()
    assert rc == 3 and read_status(run)["state"] == "preempted", out
    assert not run.lock.exists()


def test_sigterm_to_the_pool_reaches_its_jobs_and_waits_for_their_checkpoints(tmp_path):
    argv = [*tiny(tmp_path, "train.steps=100000", "train.ckpt_every=100000"), "-m", "patch=4,8",
            "hydra.launcher.parallel=2", "hydra.launcher.threads_per_job=1"]
    proc, f = start_job(argv, tmp_path / "pool.log")
    runs = lambda: [RunDir(p) for p in (tmp_path / "runs").glob("*")] if (tmp_path / "runs").is_dir() else []
    try:
        wait_for(lambda: len(runs()) == 2 and all(len(read_jsonl(r.metrics)) >= 3 for r in runs()), 180,
                 "both jobs training")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        f.close()
    out = (tmp_path / "pool.log").read_text()
    for r in runs():
        status = read_status(r)
        assert status["state"] == "preempted" and list_steps(r) == [status["step"]], out
        assert not r.lock.exists()
    assert rc != 0, out


def test_a_full_disk_at_save_gives_one_line_and_the_real_step(tmp_path, monkeypatch):
    from scaling import checkpoint

    cfg = config_from_overrides(tiny(tmp_path, "train.steps=9"))
    real_save = torch.save

    def full_after_first(obj, f, *a, **k):
        if obj.get("step") == 6:
            with open(f, "wb") as out:
                out.write(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_after_first)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1024)
    with pytest.raises(checkpoint.DiskFull) as e:
        train(cfg)
    run = run_dir_for(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on" in msg and "writing step 6" in msg
    assert "step 3 is intact" in msg
    status = read_status(run)
    assert status["state"] == "failed" and status["step"] == 6 and "no space left" in status["error"]
    assert list_steps(run) == [3] and not list(run.checkpoints.glob(".tmp*"))


def test_the_slurm_job_is_named_as_squeue_names_it(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r").create()
    monkeypatch.setenv("SLURM_JOB_ID", "33")  # an array task has a job id of its own...
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "32")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    lease = acquire_lease(run)
    write_status(run, "running", 5)
    assert lease.info["slurm_job_id"] == "32_1" and read_status(run)["slurm_job"] == "32_1"  # ...scancel 32 is all
    lease.release()
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    write_status(run, "done", 6)
    assert read_status(run)["slurm_job"] == "33"


@pytest.mark.slow
def test_a_signal_to_the_whole_job_with_wandb_offline_preempts_and_never_fails(tmp_path):
    """scontrol requeue signals every process of the job, wandb's service too: whatever its finish() raises then,
    the checkpoint and the preempted status come first and the run is not failed."""
    argv = tiny(tmp_path, "train.steps=100000", "train.ckpt_every=100000", "wandb=offline")
    run = run_dir_for(config_from_overrides(argv))
    with open(tmp_path / "job.log", "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "scaling.launch", *argv], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env={**ENV, "WANDB_MODE": "offline"},
                                start_new_session=True)
    try:
        wait_for(lambda: len(read_jsonl(run.metrics)) >= 5, 180, "five steps")
        os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as SLURM signals a job step
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "job.log").read_text()
    status = read_status(run)
    assert status["state"] == "preempted" and list_steps(run) == [status["step"]], out
    assert rc == 3, out
    assert any((run.path / "wandb").glob("offline-run-*")), "wandb wrote its offline run"


def test_a_stop_signal_is_recorded_and_ctrl_c_after_it_interrupts_at_once():
    from scaling.signals import stop_signals

    with stop_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and stop.requeue_handler() is None  # no handler before ours here
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
