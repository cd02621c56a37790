"""Integration tests against a live SLURM cluster (start one with `sudo bash .ci/slurm.sh start`, see docs/slurm.md).

What they pin down, because the SLURM launcher relies on it: submitit jobs run the submitting venv's python and
return results; a job array runs every task, two one-CPU tasks side by side; a job requeued mid-run with
`scontrol requeue` (SIGTERM, then SIGKILL after KillWait, no checkpoint call) restarts and resumes from the state it
wrote itself; a USR2 (the time-limit / preemption signal submitit asks for) makes submitit call `checkpoint()` and
requeue the job, which restarts with the arguments `checkpoint()` returned.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

PROBE_TIMEOUT_S = 10
JOB_TIMEOUT_S = 30          # submit -> result for a job that needs no requeue
REQUEUE_JOB_TIMEOUT_S = 55  # submit -> result for a job requeued once (KillWait + cred_expire + rescheduling)
STEP_S = 0.5                # one unit of "work" in the counting jobs
FAILED_STATES = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}


def _cluster_problem() -> tuple[str | None, str]:
    """(reason to skip or None, default partition) from a quick `sinfo`."""
    start_hint = "start one with: sudo bash .ci/slurm.sh start"
    if shutil.which("sbatch") is None:
        return f"no SLURM cluster: sbatch is not on PATH ({start_hint})", ""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no SLURM cluster: sinfo did not answer within {PROBE_TIMEOUT_S} s ({start_hint})", ""
    if out.returncode != 0:
        return f"no SLURM cluster: sinfo failed: {out.stderr.strip()} ({start_hint})", ""
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state in ("idle", "mix") for _, state in rows):
        return f"no idle or mixed SLURM node (sinfo: {out.stdout.strip()!r}; {start_hint})", ""
    defaults = [part.rstrip("*") for part, _ in rows if part.endswith("*")]
    return None, defaults[0] if defaults else rows[0][0]


SKIP_REASON, PARTITION = _cluster_problem()
if SKIP_REASON is not None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import cloudpickle  # noqa: E402  (only once a cluster is known to be there)
import submitit  # noqa: E402

# The job's python cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---- functions that run inside the jobs ----------------------------------------------------------------------------

def double_and_describe(x: int) -> dict:
    return {"value": 2 * x, "python": sys.executable, "job_id": os.environ.get("SLURM_JOB_ID"),
            "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}


def nap_and_time(duration_s: float) -> tuple[float, float]:
    start_s = time.time()
    time.sleep(duration_s)
    return start_s, time.time()


class ResumableCount(submitit.helpers.Checkpointable):
    """Counts to `n_steps`, one step per STEP_S, saving the count after every step to `counter_path`.

    Every start appends {"restart_count", "count_at_start", "resumed_from"} to `counter_path`.starts.jsonl.
    `checkpoint()` (called by submitit on USR2) passes the saved count on as `resumed_from`.
    """

    def __call__(self, counter_path: str, n_steps: int, resumed_from: int | None = None) -> int:
        counter = Path(counter_path)
        count = int(counter.read_text()) if counter.exists() else 0
        with open(counter.with_suffix(".starts.jsonl"), "a") as log:
            log.write(json.dumps({"restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                                  "count_at_start": count, "resumed_from": resumed_from}) + "\n")
        while count < n_steps:
            time.sleep(STEP_S)
            count += 1
            tmp = counter.with_suffix(".tmp")
            tmp.write_text(str(count))
            tmp.replace(counter)
        return count

    def checkpoint(self, counter_path: str, n_steps: int, resumed_from: int | None = None):
        saved = int(Path(counter_path).read_text())
        return submitit.helpers.DelayedSubmission(self, counter_path, n_steps, resumed_from=saved)


# ---- helpers on the test side --------------------------------------------------------------------------------------

def _executor(folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder)
    assert executor.cluster == "slurm", f"submitit picked the {executor.cluster!r} executor, not slurm"
    executor.update_parameters(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1, mem_gb=1)
    return executor


def _scontrol_jobs(job_id: str | None = None) -> list[dict[str, str]]:
    """`scontrol show job` records (finished ones stay MinJobAge seconds); sacct needs accounting, absent here."""
    command = ["scontrol", "-o", "show", "job"] + ([job_id] if job_id else [])
    out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.stdout.splitlines()]


def _slurm_state(job_id: str) -> str:
    records = _scontrol_jobs(job_id)
    return records[0].get("JobState", "UNKNOWN") if records else "UNKNOWN"


def _other_jobs_ran_between(start_s: float, end_s: float, array_id: str) -> list[str]:
    """Ids of jobs outside our array that held the cluster during [start_s, end_s] (scontrol times: whole seconds)."""
    def epoch_s(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) if stamp[:1].isdigit() else float("inf")

    return [job["JobId"] for job in _scontrol_jobs()
            if job.get("ArrayJobId", job["JobId"]) != array_id and job["JobId"] != array_id
            and epoch_s(job.get("StartTime", "")) <= end_s + 1 and epoch_s(job.get("EndTime", "")) >= start_s - 1]


def _result(job, timeout_s: float):
    """job.result(), but failing with SLURM's view of the job instead of waiting forever (no sacct here)."""
    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        if job.done():
            return job.result()
        state = _slurm_state(job.job_id)
        if state in FAILED_STATES:
            time.sleep(1.0)  # a result written just before the end may still be on its way
            if job.done():
                return job.result()
            pytest.fail(f"SLURM job {job.job_id} ended {state} without a result; stderr:\n{job.stderr()}")
        time.sleep(0.5)
    job.cancel(check=False)
    pytest.fail(f"SLURM job {job.job_id} gave no result within {timeout_s} s (last state {state}); "
                f"stderr:\n{job.stderr()}")


def _wait_for_count(counter: Path, at_least: int, job, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if counter.exists() and counter.read_text() and int(counter.read_text()) >= at_least:
            return int(counter.read_text())
        time.sleep(0.2)
    job.cancel(check=False)
    pytest.fail(f"SLURM job {job.job_id} did not count to {at_least} within {timeout_s} s "
                f"(state {_slurm_state(job.job_id)}); stderr:\n{job.stderr()}")


def _starts(counter: Path) -> list[dict]:
    return [json.loads(line) for line in counter.with_suffix(".starts.jsonl").read_text().splitlines()]


def _idle_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%C"], capture_output=True, text=True, timeout=10)
    return sum(int(line.split("/")[1]) for line in out.stdout.split())  # %C = allocated/idle/other/total


def _wait_for_idle_cpus(n_cpus: int, timeout_s: float) -> bool:
    """True once `n_cpus` CPUs are idle (jobs of the previous test may still be completing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _idle_cpus() >= n_cpus:
            return True
        time.sleep(0.5)
    return False


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_submitted_function_returns_its_result_from_the_venv_python(tmp_path):
    job = _executor(tmp_path / "jobs").submit(double_and_describe, 21)
    result = _result(job, JOB_TIMEOUT_S)
    assert result["value"] == 42
    assert result["python"] == sys.executable  # the job ran this venv's interpreter
    assert result["job_id"] == job.job_id
    assert result["array_task_id"] is None


def test_job_array_of_two_runs_both_tasks(tmp_path):
    jobs = _executor(tmp_path / "jobs").map_array(double_and_describe, [1, 2])
    results = [_result(job, JOB_TIMEOUT_S) for job in jobs]
    assert [r["value"] for r in results] == [2, 4]
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    assert [r["array_task_id"] for r in results] == ["0", "1"]


def test_two_one_cpu_tasks_run_side_by_side(tmp_path):
    if not _wait_for_idle_cpus(2, timeout_s=15):
        pytest.skip("fewer than 2 idle CPUs in the partition for 15 s (other jobs running)")
    jobs = _executor(tmp_path / "jobs").map_array(nap_and_time, [3.0, 3.0])
    (start_a, end_a), (start_b, end_b) = [_result(job, JOB_TIMEOUT_S) for job in jobs]
    if not (start_a < end_b and start_b < end_a):
        others = _other_jobs_ran_between(min(start_a, start_b), max(end_a, end_b), jobs[0].job_id.split("_")[0])
        if others:
            pytest.skip(f"other jobs {others} held CPUs meanwhile; cannot tell whether ours could overlap")
        pytest.fail(f"the two one-CPU tasks ran one after the other on an otherwise idle cluster: "
                    f"[{start_a:.1f}, {end_a:.1f}] and [{start_b:.1f}, {end_b:.1f}]")


@pytest.mark.slow
def test_job_requeued_by_scontrol_resumes_from_its_saved_state(tmp_path):
    counter, n_steps = tmp_path / "count.txt", 28  # ~14 counted before SIGKILL
    job = _executor(tmp_path / "jobs").submit(ResumableCount(), str(counter), n_steps)
    _wait_for_count(counter, 4, job, JOB_TIMEOUT_S)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True, timeout=10)
    assert _result(job, REQUEUE_JOB_TIMEOUT_S) == n_steps
    first, second = _starts(counter)
    assert first == {"restart_count": 0, "count_at_start": 0, "resumed_from": None}
    assert second["restart_count"] == 1
    # Resumed from what the job saved before SIGKILL, not from zero and not past the end.
    assert 4 <= second["count_at_start"] < n_steps
    # scontrol requeue sends SIGTERM, which submitit ignores: checkpoint() is not called on this path.
    assert second["resumed_from"] is None


@pytest.mark.slow
def test_usr2_makes_submitit_checkpoint_and_requeue(tmp_path):
    counter, n_steps = tmp_path / "count.txt", 20
    job = _executor(tmp_path / "jobs").submit(ResumableCount(), str(counter), n_steps)
    _wait_for_count(counter, 4, job, JOB_TIMEOUT_S)
    # The signal SLURM sends slurm_signal_delay_s before the time limit (submitit's --signal=USR2@...).
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, capture_output=True, timeout=10)
    assert _result(job, REQUEUE_JOB_TIMEOUT_S) == n_steps
    first, second = _starts(counter)
    assert first["resumed_from"] is None
    assert second["restart_count"] == 1
    # The restarted call got the arguments checkpoint() returned, i.e. the count saved when USR2 arrived.
    assert second["resumed_from"] is not None and 4 <= second["resumed_from"] == second["count_at_start"]
