"""The launcher on a live SLURM cluster (`sudo bash .ci/slurm.sh start`, docs/slurm.md): by default a grid is
submitted and the launch returns (exit 4) while its jobs run; the training jobs submit their eval jobs, and the
last job writes the results table and figures; the laptop study file runs unchanged on SLURM; with
hydra.launcher.wait=true a 2x2 laptop grid reaches done with its evals (run as their own SLURM jobs); relaunching it
submits nothing; a job preempted mid-run by USR2 is requeued, resumes, and ends with the weights of an
uninterrupted run; a job the cluster requeues (scontrol requeue) is followed to its end; a two-task job trains one
run with DDP."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.image_size=16", "data.max_images=256", "train.batch_img=8", "train.log_every=1", "wandb=disabled",
        "val.heldout_img=32"]
# One CPU and a little memory per job: the test cluster is one 2-core node. timeout_min < 12.5 makes submitit count
# every USR2 as a time limit, so max_num_timeout (20 in conf/hydra/launcher/slurm.yaml) must allow the requeue.
DETACHED = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
SLURM = [*DETACHED, "hydra.launcher.wait=true"]  # the launch follows its jobs to the end


def _cluster_problem() -> str | None:
    hint = "start one with: sudo bash .ci/slurm.sh start"
    if shutil.which("sbatch") is None:
        return f"no SLURM cluster: sbatch is not on PATH ({hint})"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return f"no SLURM cluster: sinfo did not answer within 10 s ({hint})"
    if out.returncode != 0:
        return f"no SLURM cluster: sinfo failed: {out.stderr.strip()} ({hint})"
    if not any(s in ("idle", "mix") for s in out.stdout.split()):
        return f"no idle or mixed SLURM node (sinfo: {out.stdout.strip()!r}; {hint})"
    return None


SKIP_REASON = _cluster_problem()
if SKIP_REASON is not None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from scaling.checkpoint import checkpoint_path, list_steps, load_checkpoint  # noqa: E402
from scaling.config import config_from_overrides, run_dir_for  # noqa: E402
from scaling.rundir import RunDir, read_jsonl, read_status  # noqa: E402
from scaling.train import train  # noqa: E402
from helpers import run_launch  # noqa: E402


def launch(*argv, timeout=360):
    return run_launch(*argv, timeout=timeout, env={"OMP_NUM_THREADS": "1"})


def launch_until_training(overrides: list[str], output_root: Path, log: Path,
                          min_steps: int = 30) -> tuple[subprocess.Popen, str]:
    """The grid launched on SLURM in the background (its output in `log`), once its job has logged `min_steps`
    training steps: (the launch process, the job id)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "scaling.launch", "-m", *overrides, *SLURM], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    job_id, rows = None, 0
    while time.time() - t0 < 180 and (job_id is None or rows < min_steps):
        time.sleep(0.2)
        job_id = job_id or next(iter(re.findall(r"^\[launch\] job (\S+): ", log.read_text(), re.M)), None)
        rows = sum(len(read_jsonl(p)) for p in output_root.glob("runs/*/metrics.jsonl"))
    if job_id is None or rows < min_steps:
        proc.kill()
        raise AssertionError(f"no job with {min_steps} steps logged within 180 s:\n{log.read_text()}")
    return proc, job_id


def job_dirs(output_root: Path) -> set[str]:
    folder = output_root / "slurm" / ".submitit"
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 2.0):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if predicate():
            return time.time() - t0
        time.sleep(poll_s)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


def test_a_detached_grid_finishes_with_its_eval_jobs_and_analysis_and_no_launcher_alive(tmp_path):
    """The launch returns while its jobs are queued or running; the training jobs submit their eval jobs; the
    last job to end writes results.csv and the figures; scaling.status follows it all from outside. The study file
    is the laptop study's, unchanged: its local-pool keys (parallel, threads_per_job) do not break SLURM."""
    tiny = [o for o in TINY if not o.startswith("wandb=")]  # wandb offline, the default: eval jobs log to it too
    argv = ["--config-name", "laptop", "-m", "model=laptop_s,laptop_b", "patch=8", *tiny, "val.every=3",
            "train.ckpt_every=3", "train.steps=6",
            "eval.inline=false", "eval.num_samples=16", "eval.num_ref=64", "eval.sampling_steps=5",
            "eval.batch_size=16", "eval.final_num_samples=0", "analyze=true", f"output_root={tmp_path}", *DETACHED]
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    t0 = time.time()
    first = run_launch(*argv, timeout=120, env=env)
    launch_s = time.time() - t0
    assert first.returncode == 4, first.stdout + first.stderr[-3000:]  # 4: submitted, not finished
    assert launch_s < 30 and "follow the study with: python -m scaling.status" in first.stdout
    train_jobs = re.findall(r"^\[launch\] job (\S+): ", first.stdout, re.M)
    assert len(train_jobs) == 2 and first.stdout.count("(submitted)") == 2, first.stdout
    status = subprocess.run([sys.executable, "-m", "scaling.status", str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert status.returncode == 0 and status.stdout.count("laptop_") == 2, status.stdout  # every point, queued too
    # at once: each point's training job is queued or running (skipped), or has ended with its eval job pending
    # (no skip line, and "evals (submitted)" at the end: on a slow VM the 6 steps were done before this launch had
    # started), or its eval job ended too while this launch ran (a fast VM: "done", exit 0 once both are);
    # none submitted twice
    again = run_launch(*argv, timeout=120, env=env)
    ends = {m: [ln for ln in again.stdout.splitlines() if ln.startswith(f"[launch] {m}-")][-1:]
            for m in ("laptop_s", "laptop_b")}
    all_done = all(lines and lines[0].endswith((": done", ": done (submitted)")) for lines in ends.values())
    assert again.returncode in (3, 4) or (again.returncode == 0 and all_done), again.stdout + again.stderr[-3000:]
    assert "[launch] job " not in again.stdout and "[launch] eval job " not in again.stdout, again.stdout
    for model in ("laptop_s", "laptop_b"):
        lines = [ln for ln in again.stdout.splitlines() if ln.startswith(f"[launch] {model}-")]
        assert any(ln.endswith((", skipped", ": evals (submitted)", ": done", ": done (submitted)"))
                   for ln in lines), again.stdout
    table = tmp_path / "analysis" / "results.csv"
    wall_s = wait_for(table.is_file, 400, "results.csv from the last job") + launch_s
    wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), 60,
             "an empty queue")
    runs = [RunDir(p) for p in sorted((tmp_path / "runs").iterdir())]
    assert len(runs) == 2
    for run in runs:
        assert read_status(run)["state"] == "done" and sorted(r["step"] for r in read_jsonl(run.evals)) == [3, 6]
        eval_jobs = read_jsonl(run.path / "eval_jobs.jsonl")  # submitted by the training job, not by a launcher
        assert eval_jobs and sorted(s for r in eval_jobs for s in r["steps"]) == [3, 6]
        for job in eval_jobs:  # each eval job started wandb (offline) on its own and ended without an error
            log = (tmp_path / "slurm" / ".submitit" / job["job_id"] / f"{job['job_id']}_0_log.err").read_text()
            assert "Traceback" not in log and "[wandb] could not start" not in log, log[-3000:]
        assert read_jsonl(run.launches)[0]["slurm_job"] in train_jobs  # the run names the job and launch it came from
    assert (tmp_path / "analysis" / "fig6_fid_vs_steps.png").is_file()
    record = sorted((tmp_path / "launches").glob("*/launch.json"))[0]  # the launch whose jobs ran the study
    assert (record.parent / "analyzed.json").is_file() and (record.parent / "multirun.yaml").is_file()
    again = run_launch(*argv, timeout=120, env=env)  # everything done: nothing submitted, exit 0
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2, again.stdout + again.stderr
    print(f"detached grid: launch returned in {launch_s:.1f} s; results after {wall_s:.0f} s")


def test_grid_reaches_done_with_evals_and_a_relaunch_submits_nothing(tmp_path):
    argv = ["-m", "model=laptop_s,laptop_b", "patch=4,8", *TINY, "train.ckpt_every=3", "train.steps=6",
            "eval.inline=false", "eval.num_samples=16", "eval.num_ref=64", "eval.sampling_steps=5",
            "eval.batch_size=16", f"output_root={tmp_path}", *SLURM]
    t0 = time.time()
    first = launch(*argv)
    first_s = time.time() - t0
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    train_jobs = re.findall(r"^\[launch\] job (\S+): ", first.stdout, re.M)
    eval_jobs = re.findall(r"^\[launch\] eval job (\S+): ", first.stdout, re.M)
    assert len(train_jobs) == 4 and len(eval_jobs) >= 4, first.stdout  # evals ran as SLURM jobs of their own
    runs = [RunDir(p) for p in sorted((tmp_path / "runs").iterdir())]
    assert len(runs) == 4
    for run in runs:
        assert read_status(run)["state"] == "done"
        assert list_steps(run) == [3, 6]
        assert sorted(r["step"] for r in read_jsonl(run.evals)) == [3, 6]
        assert all(r["feature_extractor"] == "domain" and r["num_samples"] == 16 for r in read_jsonl(run.evals))
    assert set(train_jobs + eval_jobs) <= job_dirs(tmp_path)

    before = job_dirs(tmp_path)
    t0 = time.time()
    again = launch(*argv, timeout=120)
    again_s = time.time() - t0
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4, again.stdout + again.stderr
    assert "job " not in again.stdout and job_dirs(tmp_path) == before  # nothing submitted
    print(f"grid: {first_s:.0f} s; relaunch: {again_s:.0f} s")


def test_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(tmp_path):
    overrides = ["model=laptop_s", "patch=8", *TINY, "train.steps=800", "train.ckpt_every=100000",
                 "eval.inline=false", "eval.every_ckpt=1000", "val.every=100"]  # the held-out loss at 8 rows, not 800
    out_root, log = tmp_path / "slurm_run", tmp_path / "launch.log"
    t0 = time.time()
    proc, job_id = launch_until_training([*overrides, f"output_root={out_root}"], out_root, log)
    try:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)  # preemption / time limit
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        proc.kill()
    wall_s = time.time() - t0

    cfg = config_from_overrides([*overrides, f"output_root={out_root}"])
    run = run_dir_for(cfg)
    assert read_status(run)["state"] == "done"
    saved_on_signal = [s for s in list_steps(run) if s != 800]
    assert len(saved_on_signal) == 1 and 30 <= saved_on_signal[0] < 800  # a checkpoint written at the signal
    job_log = (out_root / "slurm" / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    assert f"resumed from step {saved_on_signal[0]}" in job_log  # the requeued job resumed from it
    assert [r["step"] for r in read_jsonl(run.metrics)] == list(range(1, 801))

    reference = config_from_overrides([*overrides, f"output_root={tmp_path / 'straight'}"])
    assert train(reference)["state"] == "done"  # the same run, uninterrupted, in this process (one thread)
    a = load_checkpoint(checkpoint_path(run, 800))
    b = load_checkpoint(checkpoint_path(run_dir_for(reference), 800))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(a[key][k].equal(b[key][k]) for k in a[key]), key
    print(f"preempted run: {wall_s:.0f} s, signal at step {saved_on_signal[0]}")


def test_job_requeued_by_the_cluster_is_followed_to_the_end(tmp_path):
    """`scontrol requeue` (what PreemptMode=REQUEUE does): SIGTERM, training saves and returns, SLURM restarts the
    job; the launch must follow the next attempt instead of reporting the first one's "preempted". With wandb
    offline (the laptop default): the signal path never fails the run, the weights are those of an uninterrupted
    run, and the offline folders of the two attempts hold every step once, in one wandb run."""
    from test_tracking import read_attempts

    tiny = [o for o in TINY if not o.startswith("wandb=")]
    overrides = ["model=laptop_s", "patch=8", *tiny, "wandb=offline", "train.steps=800", "train.ckpt_every=100000",
                 "eval.inline=false", "eval.every_ckpt=1000", "val.every=100", f"output_root={tmp_path}"]
    log = tmp_path / "launch.log"
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "scaling.launch", "-m", *overrides, *SLURM], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        job_id = None
        wait_for(lambda: (job_id or re.search(r"^\[launch\] job (\S+): ", log.read_text(), re.M)) and
                 sum(len(read_jsonl(p)) for p in tmp_path.glob("runs/*/metrics.jsonl")) >= 30, 180,
                 "30 steps logged", poll_s=0.2)
        job_id = re.search(r"^\[launch\] job (\S+): ", log.read_text(), re.M)[1]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        proc.kill()
    out = log.read_text()
    assert f"job {job_id}: requeued by SLURM, following it" in out and out.strip().endswith(": done"), out
    run = run_dir_for(config_from_overrides(overrides))
    assert read_status(run)["state"] == "done"
    assert [r["step"] for r in read_jsonl(run.metrics)] == list(range(1, 801))
    reference = config_from_overrides([*overrides[:-1], f"output_root={tmp_path / 'straight'}", "wandb=disabled"])
    assert train(reference)["state"] == "done"  # the same run, uninterrupted, in this process (one thread)
    a, b = load_checkpoint(checkpoint_path(run, 800)), load_checkpoint(checkpoint_path(run_dir_for(reference), 800))
    for key in ("model", "ema"):
        assert all(a[key][k].equal(b[key][k]) for k in a[key]), key
    attempts = read_attempts(run.path)
    # one wandb run: a folder per training attempt and one of the eval job (the final step's FD-500). The first
    # attempt may be requeued before wandb wrote anything (an empty folder): the next one replays its rows.
    files = [x["file"] for x in attempts]
    assert len(attempts) == 3 and all(x["run"].run_id == run.run_id for x in attempts[1:]), files
    assert attempts[0]["run"] is None or attempts[0]["run"].run_id == run.run_id
    logged = [r["step"] for x in attempts for r in x["history"] if "loss" in r]
    assert sorted(set(logged)) == list(range(1, 801)), (len(logged), logged[:5])  # every step, across the requeue
    assert [r["step"] for x in attempts for r in x["history"] if "fd500_domain" in r] == [800]
    print(f"requeued run: {time.time() - t0:.0f} s")


def test_a_job_with_two_tasks_trains_one_run_with_ddp(tmp_path):
    """tasks_per_node=2: submitit starts two processes, training reads their ranks from submitit's environment and
    trains one run with DDP (gloo on CPUs here; one task per GPU on a GPU node)."""
    overrides = ["model=laptop_s", "patch=8", *TINY, "train.steps=20", "train.ckpt_every=10", "eval.inline=false",
                 "eval.every_ckpt=1000", f"output_root={tmp_path}"]
    proc = launch("-m", *overrides, *SLURM, "hydra.launcher.tasks_per_node=2", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (job_id,) = re.findall(r"^\[launch\] job (\S+): ", proc.stdout, re.M)
    run = run_dir_for(config_from_overrides(overrides))
    plan = json.loads(run.plan.read_text())
    assert plan["world_size"] == 2 and read_status(run)["state"] == "done" and list_steps(run) == [10, 20]
    assert [r["step"] for r in read_jsonl(run.metrics)] == list(range(1, 21))  # rank 0 alone writes
    for task in (0, 1):  # both processes ran the job to its end
        log = (tmp_path / "slurm" / ".submitit" / job_id / f"{job_id}_{task}_log.out").read_text()
        assert "Job completed successfully" in log, (task, log[-2000:])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fails on purpose by asking for a missing GPU")
def test_a_failing_job_is_failed_in_its_run_directory_and_the_launch_exits_1(tmp_path):
    """Hydra's job runner keeps a task's exception in its result: the run directory and the exit code must tell."""
    overrides = ["model=laptop_s", "patch=8", *TINY, "train.steps=20", "train.lr=100", "train.grad_clip=0",
                 f"output_root={tmp_path}"]  # diverges at step 3
    proc = launch("-m", *overrides, *SLURM, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert re.search(r": failed \(FloatingPointError: loss is inf at step 3", proc.stdout), proc.stdout
    status = read_status(run_dir_for(config_from_overrides(overrides)))
    assert status["state"] == "failed" and status["error"].startswith("FloatingPointError: loss is inf at step 3")


def test_a_one_cpu_job_runs_torch_with_one_thread_and_names_its_job_as_squeue(tmp_path):
    overrides = ["model=laptop_s", "patch=8", *TINY, "train.steps=2", "train.ckpt_every=2", "eval.inline=false",
                 "eval.num_samples=16", "eval.num_ref=64", "eval.sampling_steps=2", "eval.batch_size=16",
                 f"output_root={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-m", "scaling.launch", "-m", *overrides, *SLURM], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (job_id,) = re.findall(r"^\[launch\] job (\S+): ", proc.stdout, re.M)
    run = run_dir_for(config_from_overrides(overrides))
    assert json.loads(run.plan.read_text())["cpu_threads"] == 1  # the node has 2 cores; the job has 1
    assert read_status(run)["slurm_job"] == job_id  # e.g. 32_0, as the launch printed it and squeue shows it
