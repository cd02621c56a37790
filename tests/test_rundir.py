import json
import os
import subprocess
import sys

import pytest
import torch

from scaling.checkpoint import checkpoint_path, list_steps, load_latest, save_checkpoint
from scaling.rundir import (RunDir, RunLocked, acquire_lease, append_jsonl, read_json, read_jsonl, read_status,
                            repair_jsonl, write_json, write_status)


def test_jsonl_skips_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2, "loss": 0.4})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a job killed mid-write
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_truncate_drops_rows_after_resume_point(tmp_path):
    path = tmp_path / "m.jsonl"
    for s in (10, 20, 30):
        append_jsonl(path, {"step": s})
    repair_jsonl(path, 20)
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]


def test_write_json_is_atomic_and_leaves_no_temp(tmp_path):
    write_json(tmp_path / "plan.json", {"a": 1})
    write_json(tmp_path / "plan.json", {"a": 2})
    assert read_json(tmp_path / "plan.json") == {"a": 2}
    assert os.listdir(tmp_path) == ["plan.json"]


def test_status_roundtrip_and_bad_state(tmp_path):
    run = RunDir(tmp_path / "r").create()
    assert read_status(run)["state"] == "pending"
    write_status(run, "failed", 7, error="ValueError: boom")
    st = read_status(run)
    assert (st["state"], st["step"], st["error"]) == ("failed", 7, "ValueError: boom")
    with pytest.raises(ValueError, match="finished"):
        write_status(run, "finished", 1)


def test_checkpoints_atomic_latest_and_corrupt_fallback(tmp_path):
    run = RunDir(tmp_path / "r").create()
    for step in (5, 10):
        save_checkpoint(run, {"step": step, "w": torch.full((3,), float(step))})
    (run.checkpoints / ".tmp_abc.pt").write_bytes(b"partial")  # an interrupted save
    assert list_steps(run) == [5, 10]
    assert read_json(run.checkpoints / "latest.json")["step"] == 10
    checkpoint_path(run, 10).write_bytes(b"not a checkpoint")  # e.g. disk full while copying
    assert load_latest(run)["step"] == 5


def test_checkpoint_loads_with_weights_only(tmp_path):
    run = RunDir(tmp_path / "r").create()
    path = save_checkpoint(run, {"step": 1, "rng": {"torch": torch.get_rng_state()}, "config": {"a": [1, 2]}})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"] == {"a": [1, 2]}


def test_lock_blocks_second_holder_and_recovers_stale(tmp_path):
    run = RunDir(tmp_path / "r").create()
    # A live process on this host holds the lease: a second taker is refused.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_json(run.lock, {"host": os.uname().nodename, "pid": holder.pid, "heartbeat": 1e18})
        with pytest.raises(RunLocked, match=str(holder.pid)):
            acquire_lease(run)
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone: the lease is stale and taken over.
    lease = acquire_lease(run)
    assert lease.info["pid"] == os.getpid()
    lease.release()
    assert not run.lock.exists()
    # A holder on another host that stopped beating long ago is stale too.
    write_json(run.lock, {"host": "elsewhere", "pid": 1, "heartbeat": 0})
    acquire_lease(run)
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
