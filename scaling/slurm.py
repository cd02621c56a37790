"""The SLURM half of `python -m scaling.launch` (hydra/launcher=slurm): training jobs as job arrays through
hydra-submitit-launcher, eval jobs beside them through submitit, and the launch waiting on both.

A job's end is learned from its result file or from `scontrol` (a cluster without accounting has no sacct, which
submitit alone would wait on). Each job runs `scaling.jobs.slurm_task` (training) or
`scaling.jobs.evaluate_missing` (evals), so what a job does is the same as in a local run.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time

from scaling.jobs import Point, evaluate_missing, first_line, point_state, slurm_task, waves

EVAL_POLL_S = 60.0               # how often the launch looks for new checkpoints to evaluate
JOB_POLL_S = 5.0                 # how often it checks whether a job is over
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}


def slurm_executor(params: dict):
    """A submitit executor with the parameters of hydra.launcher (as hydra-submitit-launcher builds its own)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", "_target_")})
    return executor


class EvalJobs:
    """Eval jobs for grid points whose checkpoints lack their eval setting: at most one job in flight per run
    (evals.jsonl has one writer at a time), a new one as new checkpoints appear (`poll`); a run whose eval job
    failed, or left its checkpoints unevaluated, gets no more eval jobs within this launch."""

    def __init__(self, executor, points: list[Point]):
        self.executor, self.points = executor, [p for p in points if not p.cfg.eval.inline]
        self.in_flight = {}   # run_id -> (setting, steps, job)
        self.submitted = {}   # (run_id, setting) -> steps sent to the last job
        self.failed = {}      # run_id -> error
        self.lock = threading.Lock()

    def poll(self) -> None:
        from scaling.config import run_dir_for
        from scaling.evaluate import missing_evals, setting_key

        with self.lock:
            for run_id, (key, steps, job) in list(self.in_flight.items()):
                if job_ended(job):
                    del self.in_flight[run_id]
                    self._collect(run_id, job)
            for p in self.points:
                key, path = setting_key(p.cfg.eval), run_dir_for(p.cfg).path
                if p.run_id in self.in_flight or p.run_id in self.failed:
                    continue
                missing = missing_evals(path, p.cfg.eval, p.cfg.train.ckpt_every, p.cfg.train.steps)
                if stuck := sorted(set(missing) & self.submitted.get((p.run_id, key), set())):
                    self.failed[p.run_id] = f"eval job ended but steps {stuck} still lack {key}"
                    print(f"[launch] {p.run_id}: {self.failed[p.run_id]}", flush=True)
                elif missing:
                    job = self.executor.submit(evaluate_missing, p.cfg)
                    self.in_flight[p.run_id] = (key, missing, job)
                    self.submitted[(p.run_id, key)] = set(missing)
                    print(f"[launch] eval job {job.job_id}: {p.run_id} steps {missing} ({key})", flush=True)

    def _collect(self, run_id, job) -> None:
        try:
            job_result(job)
        except Exception as e:  # noqa: BLE001 - reported with the run, the launch goes on
            self.failed[run_id] = f"eval job {job.job_id} failed: {first_line(str(e))}"
            print(f"[launch] {run_id}: {self.failed[run_id]}", flush=True)

    def drain(self) -> dict[str, str]:
        """Poll until no eval job is in flight and none is due; {run_id: error} of the failures."""
        while True:
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - sbatch refused: no more submissions, wait for those in flight
                from scaling.config import run_dir_for
                from scaling.evaluate import missing_evals

                for p in self.points:
                    if p.run_id not in self.in_flight and missing_evals(run_dir_for(p.cfg).path, p.cfg.eval,
                                                                        p.cfg.train.ckpt_every, p.cfg.train.steps):
                        self.failed.setdefault(p.run_id, f"eval submission failed: {first_line(str(e))}")
            if not self.in_flight:
                return self.failed
            time.sleep(2.0)

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(EVAL_POLL_S):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - a failed sbatch now is retried at the next poll
                print(f"[launch] eval poll: {type(e).__name__}: {first_line(str(e))}", flush=True)


def run_slurm(hydra, master, todo: list[Point]) -> tuple[dict, dict]:
    """Training jobs through hydra-submitit-launcher's SLURM launcher, eval jobs beside them; waits for all.

    Each wave of training jobs is one job array; a point whose run is trained by then only gets eval jobs.
    Returns ({run_id: job outcome}, {run_id: eval error}).
    """
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(master.hydra.launcher, resolve=True)
    one_gpu = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": min(params["gpus_per_node"] or 0, 1),
               "name": f"{params['name']}-eval"}
    evals = EvalJobs(slurm_executor({**params, **one_gpu}), todo)
    launcher, outcomes, stop = None, {}, threading.Event()
    threading.Thread(target=evals.watch, args=(stop,), daemon=True).start()
    try:
        for wave in waves(todo):
            states = {p.run_id: point_state(p.cfg) for p in wave}  # a run trained by an earlier wave: evals only
            train = [p for p in wave if states[p.run_id] not in ("done", "running")
                     and not (states[p.run_id] == "evals" and not p.cfg.eval.inline)]
            if not train:
                continue
            launcher = launcher or Plugins.instance().instantiate_launcher(
                hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(master)),
                task_function=slurm_task, config=master)
            outcomes.update(submit_and_wait(launcher, slurm_executor(params), train))
    finally:
        stop.set()
    return outcomes, evals.drain()


def submit_and_wait(launcher, executor, points: list[Point]) -> dict[str, str]:
    """One job array of Hydra jobs (what hydra-submitit-launcher's `launch` does), waiting on every job even
    when one fails, so that a crash in one run does not hide the others; {run_id: outcome}."""
    from hydra.core.singleton import Singleton

    n = len(points)
    try:
        jobs = executor.map_array(launcher, [p.overrides for p in points], ["hydra.sweep.dir"] * n, list(range(n)),
                                  [f"job_id_for_{i}" for i in range(n)], [Singleton.get_state()] * n)
    except Exception as e:  # noqa: BLE001 - sbatch refused: nothing of this wave runs
        msg = f"failed: submission: {first_line(str(e))}"
        print(f"[launch] {msg}", flush=True)
        return {p.run_id: msg for p in points}
    for p, job in zip(points, jobs):
        print(f"[launch] job {job.job_id}: {p.run_id}", flush=True)
    outcomes, pending = {}, dict(zip(jobs, points))
    while pending:
        for job in [j for j in pending if job_ended(j)]:
            try:
                outcome = _job_outcome(job_result(job))
            except Exception as e:  # noqa: BLE001 - killed, out of memory, node lost: the run dir keeps its state
                outcome = f"failed: {first_line(str(e))}"
            if outcome == "preempted" and requeued(job):
                # SIGTERM then a requeue by SLURM (scontrol requeue, PreemptMode=REQUEUE): training saved and
                # returned; the next attempt resumes and will write its own result.
                print(f"[launch] job {job.job_id}: requeued by SLURM, following it", flush=True)
                for task in job._sub_jobs or [job]:  # one result file per task (DDP: one per rank)
                    task.paths.result_pickle.unlink(missing_ok=True)
                continue
            outcomes[pending.pop(job).run_id] = outcome
        if pending:
            time.sleep(JOB_POLL_S)
    return outcomes


def requeued(job, settle_s: float = 60.0) -> bool:
    """Whether SLURM put a job that returned back into the queue (once its state has left COMPLETING)."""
    deadline = time.time() + settle_s
    state = slurm_state(job.job_id)
    while state in ("COMPLETING", "UNKNOWN") and time.time() < deadline:
        time.sleep(1.0)
        state = slurm_state(job.job_id)
    return state in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED")


def slurm_state(job_id: str) -> str:
    """The job's JobState from scontrol; "GONE" once SLURM has forgotten it (MinJobAge after its end)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode and "Invalid job id" in out.stderr:
        return "GONE"
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m[1] if m else "UNKNOWN"


def job_ended(job) -> bool:
    """Whether a submitit job is over: its result file is there, or SLURM says it ended without one (cancelled,
    killed, out of memory). submitit alone learns the latter from sacct, which a cluster without accounting
    (the test cluster, docs/slurm.md) lacks, and would wait forever."""
    return job.done() or slurm_state(job.job_id) in SLURM_ENDED | {"GONE"}


def job_result(job):
    """The result of a job that `job_ended`, or an error naming how it ended."""
    for _ in range(10):  # the result file may land a moment after SLURM marks the job over
        if job.done():
            return job.results()[0]
        time.sleep(1.0)
    raise RuntimeError(f"job {job.job_id} ended ({slurm_state(job.job_id)}) without a result; see "
                       f"{job.paths.stderr}")


def _job_outcome(ret) -> str:
    from hydra.core.utils import JobStatus

    if ret.status == JobStatus.COMPLETED:
        return ret.return_value.get("state", "done") if isinstance(ret.return_value, dict) else "done"
    return f"failed: {type(ret._return_value).__name__}: {first_line(str(ret._return_value))}"
