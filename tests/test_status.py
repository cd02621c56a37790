"""The status table: states from status.json and the lease (stale detection), the tail of the logs, the CLI."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path


from scaling.rundir import RunDir, append_jsonl, write_json, write_status
from scaling.rundir import last_jsonl_row, lease_is_stale
from scaling.status import age, eval_label, format_table, main, run_dirs, run_row

ROOT = Path(__file__).resolve().parent.parent


def make_run(root, run_id, state, step=0, steps=100, lock=None, metrics=(), evals=(), error=None) -> RunDir:
    run = RunDir(Path(root) / "runs" / run_id).create()
    write_json(run.plan, {"run_id": run_id, "steps": steps})
    write_status(run, state, step, error=error)
    if lock is not None:
        write_json(run.lock, lock)
    for row in metrics:
        append_jsonl(run.metrics, row)
    for row in evals:
        append_jsonl(run.evals, row)
    return run


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid until the kernel reuses it


def test_running_with_a_live_lease_is_running_and_a_dead_one_is_stale(tmp_path):
    here, now = socket.gethostname(), time.time()
    live = make_run(tmp_path, "a-live", "running", 10,
                    lock={"host": here, "pid": os.getpid(), "heartbeat": now, "slurm_job_id": "42_1"})
    dead = make_run(tmp_path, "b-dead-pid", "running", 10, lock={"host": here, "pid": dead_pid(), "heartbeat": now})
    quiet = make_run(tmp_path, "c-old-heartbeat", "running", 10,
                     lock={"host": "elsewhere", "pid": 1, "heartbeat": now - 3600})
    nolock = make_run(tmp_path, "d-no-lease", "running", 10)
    rows = {r.run_id: run_row(r) for r in (live, dead, quiet, nolock)}
    assert rows["a-live"]["state"] == "running" and rows["a-live"]["job"] == "42_1"
    assert rows["b-dead-pid"]["state"] == "stale"
    assert rows["c-old-heartbeat"]["state"] == "stale"
    assert rows["d-no-lease"]["state"] == "stale"
    assert run_row(quiet, stale_s=7200)["state"] == "running"  # within a longer staleness bound
    assert not lease_is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now}) and lease_is_stale(None)


def test_row_reads_step_total_loss_eval_and_rate(tmp_path):
    run = make_run(tmp_path, "r", "done", 300, steps=300,
                   metrics=[{"step": 100, "loss": 0.5, "img_per_s": 10.0, "time": 1.0},
                            {"step": 300, "loss": 0.25, "img_per_s": 12.5, "time": 2.0}],
                   evals=[{"step": 300, "fd": 41.234, "feature_extractor": "domain", "num_samples": 1000}])
    row = run_row(run)
    assert (row["state"], row["step"], row["steps"], row["loss"], row["img_per_s"]) == ("done", 300, 300, 0.25, 12.5)
    assert row["eval"] == "FD-1K(domain) 41.23 @300"
    assert eval_label({"step": 8, "fd": 19.5, "feature_extractor": "inception", "num_samples": 50000}) == \
        "FID-50K(inception) 19.50 @8"
    assert eval_label(None) == "" and eval_label({"fd": None}) == ""
    # an evals.jsonl row written before the fd key (every FD under "fid") still reads, and only the reference
    # Inception weights make an FID
    assert eval_label({"step": 8, "fid": 7.0, "feature_extractor": "domain", "num_samples": 500}) == \
        "FD-500(domain) 7.00 @8"
    assert eval_label({"step": 8, "fd": 7.0, "feature_extractor": "inception_offline", "num_samples": 1000}) == \
        "FD-1K(inception_offline) 7.00 @8"


def test_last_row_skips_a_torn_line_and_reads_only_the_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": i, "pad": "x" * 100}) + "\n" for i in range(2000)) + '{"step": 20')
    assert last_jsonl_row(path)["step"] == 1999
    assert last_jsonl_row(path, max_bytes=300)["step"] == 1999  # the cut first line of the tail is skipped
    assert last_jsonl_row(tmp_path / "missing.jsonl") is None


def test_table_shows_every_run_and_the_error_of_failed_ones(tmp_path):
    make_run(tmp_path, "x-failed", "failed", 7, error="ValueError: data.path='/gone' does not exist")
    make_run(tmp_path, "y-done", "done", 100)
    (tmp_path / "runs" / "z-not-a-run").mkdir()
    runs = run_dirs(tmp_path)
    assert [r.run_id for r in runs] == ["x-failed", "y-done"]
    text = format_table([run_row(r) for r in runs])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run_id", "state", "step"]
    assert lines[1].split()[:3] == ["x-failed", "failed", "7/100"]
    assert "x-failed: ValueError: data.path='/gone' does not exist" in text
    assert lines[-1] == "2 runs: 1 done, 1 failed"


def test_age_units():
    assert (age(None, 0), age(95, 100), age(0, 600), age(0, 3 * 3600)) == ("-", "5s ago", "10m ago", "3h ago")


def test_cli_prints_the_table_and_rejects_a_missing_root(tmp_path, capsys):
    make_run(tmp_path, "only", "preempted", 40)
    assert main([str(tmp_path)]) == 0
    assert re.search(r"^only\s+preempted\s+40/100\s", capsys.readouterr().out, re.M)
    assert main([str(tmp_path / "nope")]) == 2
    assert "output_root=" in capsys.readouterr().err


def test_cli_as_a_process_without_importing_torch(tmp_path):
    make_run(tmp_path, "only", "done", 100)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "scaling.status", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and re.search(r"^only\s+done\s+100/100\s", out.stdout, re.M)
    assert " torch\n" not in out.stderr  # the status of a running grid is quick to print
