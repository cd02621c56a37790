"""The SLURM side of the launch: executors with the launcher's settings, eval jobs, following jobs without sacct,
and the study's end (analysis) run by the last job, so that a detached launch needs no process outside the jobs.

hydra_plugins/dit_scaling/slurm_launcher.py submits the training jobs (job arrays through hydra-submitit-launcher).
With eval.inline=false each training job submits its evals as their own jobs (`JobEvals`, resources from
hydra.launcher.eval_*) as its checkpoints appear; a launch that waits (hydra.launcher.wait=true) submits them
itself instead (`EvalJobs`). A job's end is learned from its result file or from `scontrol` (a cluster without
accounting has no sacct, which submitit alone would wait on).
"""

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import submitit
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from scaling.config import RunConfig, config_from_dict, run_dir_for
from scaling.evaluate import missing_evals, setting_key
from scaling.jobs import (Point, analyze, evaluate_missing, first_line, hydra_dir, job_value, point_state,
                          run_point, use_cpu_allocation)
from scaling.provenance import record_launch
from scaling.rundir import append_jsonl, load_json, read_jsonl, write_json
from scaling.signals import ENVIRONMENT
from scaling.squeue import SLURM_ENDED, SLURM_LIVE, slurm_state, slurm_states

EVAL_POLL_S = 60.0               # how often a training job (or a waiting launch) looks for checkpoints to evaluate
JOB_POLL_S = 5.0                 # how often a waiting launch looks for its jobs' result files (no scheduler call)
SQUEUE_S = 60.0                  # how often it asks SLURM (one squeue call for all its jobs) which ended without one
# keys of hydra.launcher that are the project's (scaling.config.SlurmLauncherConfig), not submitit's
PROJECT_KEYS = ("wait", "evals_from_jobs", "eval_timeout_min", "eval_gpus_per_node", "eval_cpus_per_task",
                "eval_mem_gb", "parallel", "threads_per_job", "_target_")


def slurm_executor(params: dict):
    """A submitit executor with the parameters of hydra.launcher (as hydra-submitit-launcher builds its own)."""
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", *PROJECT_KEYS)})
    return executor


def eval_params(params: dict) -> dict:
    """The eval jobs' settings: the training jobs' (partition, account, setup, ...) with one task on one node, at
    most one GPU, and the eval_* resources where given."""
    out = {**params, "nodes": 1, "tasks_per_node": 1, "name": f"{params.get('name', 'dit-scaling')}-eval",
           "timeout_min": params.get("eval_timeout_min") or params["timeout_min"],
           "gpus_per_node": min(params.get("gpus_per_node") or 0, 1) if params.get("eval_gpus_per_node") is None
           else params["eval_gpus_per_node"]}
    if params.get("eval_cpus_per_task"):
        out["cpus_per_task"] = params["eval_cpus_per_task"]
    if params.get("eval_mem_gb"):
        out["mem_gb"] = params["eval_mem_gb"]
    if not out["gpus_per_node"]:
        out["gpus_per_node"] = None  # no gres line at all: a CPU partition refuses gpu:0
    return out


# ----------------------------------------------------------------------------- the training job


def slurm_task(task_cfg) -> dict:
    """The Hydra task of a SLURM training job (hydra-submitit-launcher calls it with the composed config): the
    run, with its eval jobs submitted from here as checkpoints appear (eval.inline=false, a detached launch), then
    the study's end if this job ends it."""
    use_cpu_allocation()
    cfg = OmegaConf.to_object(task_cfg)
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    params = OmegaConf.to_container(hydra.launcher, resolve=True) if hydra is not None else {}
    launch_dir = str(hydra.sweep.dir) if hydra is not None else None
    rank = int(os.environ.get("SLURM_PROCID") or 0)
    if rank:
        return run_point(cfg, evals_here=False)
    record_launch(run_dir_for(cfg).create(), hydra_dir())
    if not cfg.eval.inline and params.get("evals_from_jobs") and not params.get("wait"):
        with JobEvals(cfg, params, launch_dir):
            result = run_point(cfg, evals_here=False)
    else:
        result = run_point(cfg, evals_here=False)
    if launch_dir and not params.get("wait"):  # a waiting launch runs the analysis itself
        finish_study(Path(launch_dir))
    return result


# ----------------------------------------------------------------------------- eval jobs


class EvalJob(submitit.helpers.Checkpointable):
    """An eval job: the given checkpoints of one run in one eval setting (skipping any evaluated meanwhile), then
    the study's end if this was its last piece of work. Requeued by submitit when preempted or out of time."""

    def __call__(self, cfg: RunConfig, steps: list[int], launch_dir: str | None = None) -> int:
        use_cpu_allocation()
        n = evaluate_missing(cfg, steps)
        if launch_dir:
            finish_study(Path(launch_dir))
        return n


# Variables of the submitting process that must not reach an eval job: wandb's service address (a socket of the
# training job's node; an eval job that inherits it fails to start wandb), besides submitit's own list (SLURM_*,
# SUBMITIT_*, the distributed-training variables).
NOT_INHERITED = ("WANDB_SERVICE", "WANDB_RUN_ID", "WANDB_START_METHOD")


def submit_evals(executor, cfg: RunConfig, steps: list[int], launch_dir: str | None):
    """Submit one eval job (from a login node or from inside a job: the parent job's SLURM_* environment is not
    passed on) and note it in the run's eval_jobs.jsonl; the submitit job."""
    with ENVIRONMENT, submitit.helpers.clean_env(extra_names=NOT_INHERITED):
        job = executor.submit(EvalJob(), cfg, list(steps), launch_dir)
    append_jsonl(run_dir_for(cfg).path / "eval_jobs.jsonl", {"job_id": job.job_id, "steps": list(steps),
                                                               "setting": setting_key(cfg.eval), "time": time.time()})
    return job


def live_eval_steps(cfg: RunConfig) -> set[int]:
    """Steps of this eval setting that an eval job still queued or running will evaluate (eval_jobs.jsonl, one
    squeue-like query for all of them)."""
    rows = [r for r in read_jsonl(run_dir_for(cfg).path / "eval_jobs.jsonl") if r.get("setting") == setting_key(cfg.eval)]
    if not rows:
        return set()
    states = slurm_states([str(r["job_id"]) for r in rows])
    return {s for r in rows if states.get(str(r["job_id"])) in SLURM_LIVE for s in r.get("steps", [])}


class JobEvals:
    """Inside a training job: eval jobs for its checkpoints as they appear (every EVAL_POLL_S, and once more at
    the end), each step submitted once."""

    def __init__(self, cfg: RunConfig, params: dict, launch_dir: str | None):
        self.cfg, self.launch_dir = cfg, launch_dir
        self.executor = slurm_executor(eval_params(params))
        try:
            self.submitted: set[int] = live_eval_steps(cfg)  # a requeued attempt: its evals already queued
        except Exception as e:  # noqa: BLE001 - squeue did not answer: training goes on, steps may be sent twice
            print(f"[launch] eval jobs of earlier attempts unknown ({type(e).__name__}: {first_line(str(e))})",
                  flush=True)
            self.submitted = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def poll(self) -> None:
        c = self.cfg
        due = [s for s in missing_evals(run_dir_for(c).path, c.eval, c.train.ckpt_every, c.train.steps)
               if s not in self.submitted]
        if due:
            job = submit_evals(self.executor, c, due, self.launch_dir)
            self.submitted |= set(due)
            print(f"[launch] eval job {job.job_id}: {run_dir_for(c).run_id} steps {due} ({setting_key(c.eval)})",
                  flush=True)

    def _watch(self) -> None:
        while not self.stop.wait(EVAL_POLL_S):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - sbatch refused now: tried again at the next poll and at the end
                print(f"[launch] eval submission: {type(e).__name__}: {first_line(str(e))}", flush=True)

    def __enter__(self) -> "JobEvals":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.poll()  # the final checkpoint's eval
        except Exception as e:  # noqa: BLE001 - the run is saved; a relaunch submits the evals still missing
            print(f"[launch] eval submission failed: {type(e).__name__}: {first_line(str(e))}; relaunch the study "
                  f"to submit the evals still missing", flush=True)


def finish_study(launch_dir: Path) -> bool:
    """The end of a detached study, run by whichever job ends it: when every point of the launch is done (trained,
    every eval written) and the launch asked for analyze=true, the results table and the figures are written into
    each output root, once (a lock and a marker in the launch folder). Whether it ran them."""
    record, _ = load_json(launch_dir / "launch.json")
    points = (record or {}).get("points") or []
    if not points or not any(p["config"].get("analyze") for p in points):
        return False
    if any(point_state(config_from_dict(p["config"])) != "done" for p in points):
        return False
    with open(launch_dir / "analysis.lock", "a") as guard:
        fcntl.lockf(guard, fcntl.LOCK_EX)
        marker = launch_dir / "analyzed.json"
        if marker.is_file():
            return False
        if all([analyze(root) for root in dict.fromkeys(p["output_root"] for p in points)]):
            write_json(marker, {"time": time.time()})  # once; a failed step is tried again by the next job
    return True


class EvalJobs:
    """Eval jobs for grid points whose checkpoints lack their eval setting: at most one job in flight per run
    (evals.jsonl has one writer at a time), a new one as new checkpoints appear (`poll`); a run whose eval job
    failed, or left its checkpoints unevaluated, gets no more eval jobs within this launch."""

    def __init__(self, executor, points: list[Point], launch_dir: str | None = None):
        self.executor, self.points = executor, [p for p in points if not p.cfg.eval.inline]
        self.launch_dir = launch_dir
        self.in_flight = {}   # run_id -> (setting, steps, job)
        self.submitted = {}   # (run_id, setting) -> steps sent to the last job
        self.failed = {}      # run_id -> error
        self.lock = threading.Lock()
        self.states, self.asked = {}, float("-inf")  # what squeue said of the jobs in flight, and when

    def poll(self) -> None:
        with self.lock:
            flying = [str(job.job_id) for _, _, job in self.in_flight.values() if not job.done()]
            if flying and time.monotonic() - self.asked >= SQUEUE_S:  # one squeue call a minute, at most
                self.states, self.asked = slurm_states(flying), time.monotonic()
            for run_id, (key, steps, job) in list(self.in_flight.items()):
                if job_ended(job, self.states):
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
                    job = submit_evals(self.executor, p.cfg, missing, self.launch_dir)
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

    @contextmanager
    def watching(self):
        """Poll in a thread while the body waits on the training jobs."""
        stop = threading.Event()
        thread = threading.Thread(target=self.watch, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()



# ----------------------------------------------------------------------------- following jobs (wait=true)


def submit_and_wait(jobs_by_point: dict) -> dict[str, str]:
    """Wait on every submitted job even when one fails, so that a crash in one run does not hide the others;
    {run_id: outcome}. A job that SLURM requeues (scontrol requeue, preemption) is followed to its end. Result
    files are looked for every JOB_POLL_S; SLURM is asked once every SQUEUE_S, one squeue call for all jobs."""
    outcomes, pending, states, asked = {}, dict(jobs_by_point), {}, 0.0
    while pending:
        if time.monotonic() - asked >= SQUEUE_S:  # the scheduler: once a minute, one call for every job
            states, asked = slurm_states([str(j.job_id) for j in pending]), time.monotonic()
        for job in [j for j in pending if job_ended(j, states)]:
            try:
                outcome = job_value(job_result(job)).get("state", "done")
            except Exception as e:  # noqa: BLE001 - killed, out of memory, node lost: the run dir keeps its state
                outcome = f"failed: {first_line(str(e))}"
            if outcome == "preempted" and requeued(job):
                # SIGTERM then a requeue by SLURM (scontrol requeue, PreemptMode=REQUEUE): training saved and
                # returned; the next attempt resumes and will write its own result.
                print(f"[launch] job {job.job_id}: requeued by SLURM, following it", flush=True)
                for task in [job.task(i) for i in range(job.num_tasks)]:  # one result file per task (DDP: per rank)
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


def job_ended(job, states: dict[str, str] | None = None) -> bool:
    """Whether a submitit job is over: its result file is there, or SLURM says it ended without one (cancelled,
    killed, out of memory; from `states`, one squeue call for many jobs, or scontrol for this one). submitit alone
    learns the latter from sacct, which a cluster without accounting (the test cluster, docs/slurm.md) lacks, and
    would wait forever."""
    if job.done():
        return True
    state = states.get(str(job.job_id)) if states is not None else slurm_state(job.job_id)
    if state == "GONE" and states is not None:  # not in squeue's answer: scontrol, for this job alone, decides
        state = slurm_state(job.job_id)
    return state in SLURM_ENDED | {"GONE"}


def job_result(job):
    """The result of a job that `job_ended`, or an error naming how it ended."""
    for _ in range(10):  # the result file may land a moment after SLURM marks the job over
        if job.done():
            return job.results()[0]
        time.sleep(1.0)
    raise RuntimeError(f"job {job.job_id} ended ({slurm_state(job.job_id)}) without a result; see "
                       f"{job.paths.stderr}")
