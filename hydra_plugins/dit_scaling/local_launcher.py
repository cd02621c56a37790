"""The local launcher (hydra/launcher=local): the grid's jobs as processes on this machine, `parallel` at a time.

Each job is `python -m scaling.launch <its overrides>` in its own process, so a job that crashes does not take the
launch down and each job gets its own GPU (or its share of the CPU threads); the largest jobs start first, and a
progress line every minute names each running job's step, rate and ETA. Neither of Hydra's local launchers does
all of this: its basic launcher runs the jobs one after another inside the launching process, and submitit_local
starts every job at once on the same GPUs. Ctrl-C or SIGTERM stops every job at its next step (each saves and is
marked preempted) and waits for them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from scaling.config import LocalLauncherConfig, make_plan, run_dir_for
from scaling.grid import Composer, compose_points, config_dir_of, group_dirs
from scaling.jobs import EXIT_UNFINISHED, Point, job_return, mark_failed, point_state
from scaling.rundir import last_jsonl_row, read_status
from scaling.train import format_duration

PROGRESS_S = 60.0                # how often the pool prints where its running jobs are
# A training step's cost on one core of the 2-core VM (for the order of the jobs only): ~12 ms of work whatever the
# model (optimizer, EMA, data, Python; laptop-XXS/4 trains 2,400 img/s), plus its FLOPs at ~23 GFLOP/s (laptop-L/4
# and XL/2 at batch 32).
STEP_OVERHEAD_S, CORE_FLOPS_PER_S = 0.012, 2.3e10


class LocalPoolLauncher(Launcher):
    def __init__(self, parallel: int = 0, threads_per_job: int = 0) -> None:
        self.local = LocalLauncherConfig(parallel=parallel, threads_per_job=threads_per_job)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.slots()  # a bad `parallel` fails now, before the sweeper starts anything

    def slots(self) -> list[dict]:
        for key in ("parallel", "threads_per_job"):
            if getattr(self.local, key) < 0:
                raise ValueError(f"hydra.launcher.{key}={getattr(self.local, key)} must be >= 0 (0 = automatic)")
        return local_slots(self.local, visible_gpus(), os.cpu_count() or 1)

    def job_command(self, overrides: Sequence[str], job_num: int) -> list[str]:
        """The command that runs one point in its own process: the launcher without -m, its Hydra records in the
        launch's folder (<sweep dir>/<job number>/.hydra). analyze=false: the sweeper analyses the grid once, after
        its last job (a job that analysed too would redo the table, figures and bootstraps at each job's end)."""
        cmd = [sys.executable, "-m", "scaling.launch"]
        if config_dir := config_dir_of(self.config):
            cmd += ["--config-dir", config_dir]
        run_dir = Path(str(self.config.hydra.sweep.dir)) / str(job_num)
        return cmd + ["--config-name", str(self.config.hydra.job.config_name), *overrides, "analyze=false",
                      f"hydra.run.dir={run_dir}"]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run one wave of the grid (no two points of one run: the sweeper's waves); a JobReturn per point, whose
        value is the point's state once its job ended."""
        composer = Composer(self.hydra_context.config_loader, self.config, group_dirs(config_dir_of(self.config)))
        points = compose_points(composer, [list(o) for o in job_overrides])
        numbers = {p.run_id: initial_job_idx + i for i, p in enumerate(points)}
        todo = largest_first([p for p in points if point_state(p.cfg) not in ("done", "running")])
        commands = {p.run_id: self.job_command(p.overrides, numbers[p.run_id]) for p in todo}
        codes = run_local(commands, todo, self.slots(), Path(todo[0].cfg.output_root) / "logs") if todo else {}
        returns = []
        for p in points:
            rc = codes.get(p.run_id, 0)
            if rc < 0 and read_status(run_dir_for(p.cfg))["state"] == "running":  # killed before it could say so
                mark_failed(run_dir_for(p.cfg), RuntimeError(f"the job process was killed by signal {-rc}"))
            state = point_state(p.cfg)
            ok = rc in (0, EXIT_UNFINISHED)
            returns.append(job_return(p.overrides, {"run_id": p.run_id, "state": state if ok else f"failed: exit {rc}"}))
        return returns


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(local: LocalLauncherConfig, gpus: list[str], cpus: int) -> list[dict]:
    """One environment per concurrent job: its GPU, or its share of the CPU threads."""
    if gpus:
        n = local.parallel or len(gpus)
        if n > len(gpus):
            raise ValueError(f"hydra.launcher.parallel={n} but only {len(gpus)} GPUs are visible; "
                             f"allowed: 0..{len(gpus)}")
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus[:n]]
    n = local.parallel or 1
    threads = str(local.threads_per_job or max(1, cpus // n))
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * n


def run_local(commands: dict[str, list[str]], points: list[Point], slots: list[dict], log_dir: Path) -> dict[str, int]:
    """Run the points' jobs (`commands[run_id]`), len(slots) at a time; {run_id: exit code}. Ctrl-C or SIGTERM to
    this process stops them cleanly: each job gets SIGTERM, saves a checkpoint at its next step and is marked
    preempted, and this process waits for them before it re-raises; a second Ctrl-C makes them stop at once (at
    their last checkpoint), still awaited."""
    queue, running, codes = list(points), {}, {}
    free = list(range(len(slots)))
    t_start = t_progress = time.monotonic()
    quiet = len(slots) > 1  # several jobs at once: each writes to its log file, this process prints one line each
    if quiet:
        log_dir.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.signal(s, signal.default_int_handler)  # SIGTERM or SIGUSR2 to the pool: as Ctrl-C
                for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        while queue or running:
            while queue and free:
                p, slot = queue.pop(0), free.pop(0)
                log = open(log_dir / f"{p.run_id}.log", "a") if quiet else None
                proc = subprocess.Popen(commands[p.run_id], env={**os.environ, **slots[slot]},
                                        stdout=log, stderr=subprocess.STDOUT if log else None,
                                        start_new_session=True)
                running[proc] = (p, slot, log)
                print(f"[launch] started {p.run_id}" + (f" (log {log.name})" if log else ""), flush=True)
            time.sleep(0.2)
            for proc in [q for q in running if q.poll() is not None]:
                p, slot, log = running.pop(proc)
                codes[p.run_id] = proc.returncode
                free.append(slot)
                if log:
                    log.close()
                print(f"[launch] {p.run_id}: exit {proc.returncode}", flush=True)
            if quiet and running and time.monotonic() - t_progress >= PROGRESS_S:
                t_progress = time.monotonic()
                print(progress_line([p for p, _, _ in running.values()], len(codes), len(points),
                                    t_progress - t_start), flush=True)
    except BaseException as e:  # Ctrl-C, SIGTERM, or a fault of the pool itself: no job is left behind
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second SIGTERM must not cut the wait short
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        print(f"[launch] {what}: stopping {len(running)} jobs (each saves at its next step)", flush=True)
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        pending = {proc: p for proc, (p, _, _) in running.items()}
        while pending:
            try:
                for proc in [q for q in pending if q.poll() is not None]:
                    codes[pending.pop(proc).run_id] = proc.returncode
                time.sleep(0.2)
            except KeyboardInterrupt:  # Ctrl-C again: the jobs stop at once (a job's second signal), still awaited
                print(f"[launch] interrupted again: {len(pending)} jobs stop now, at their last checkpoint",
                      flush=True)
                for proc in pending:
                    proc.send_signal(signal.SIGINT)
        for _, _, log in running.values():
            if log:
                log.close()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return codes


def largest_first(points: list[Point]) -> list[Point]:
    """The points by estimated time left, longest first: with a pool of N slots the grid then ends when its longest
    job ends, not when a long job started last does (the 12-point grid in grid order ran laptop-XL/2, ~40% of the
    work, last). The estimate is steps x (a fixed cost per step + the step's FLOPs at a CPU core's rate): by FLOPs
    alone the isoFLOP study's waves, equal in FLOPs, started laptop-XXS/4 (43K steps, the longest job, its steps
    costing more than their FLOPs) last and ended each wave with one core idle."""

    def seconds_to_go(p: Point) -> float:
        flops_per_step = make_plan(p.cfg, count="closed_form")["train_flops"] / max(1, p.cfg.train.steps)
        steps = max(0, p.cfg.train.steps - read_status(run_dir_for(p.cfg))["step"])
        return steps * (STEP_OVERHEAD_S + flops_per_step / CORE_FLOPS_PER_S)

    return sorted(points, key=seconds_to_go, reverse=True)  # stable: equal costs keep the grid's order


def progress_line(running: list[Point], finished: int, total: int, elapsed_s: float) -> str:
    """One line for a pool whose jobs log to files: jobs finished, and each running job's step, rate and ETA
    (from the last row of its metrics.jsonl)."""

    parts = []
    for p in running:
        name, steps = f"{p.cfg.model.name}/{p.cfg.patch}", p.cfg.train.steps
        last = last_jsonl_row(run_dir_for(p.cfg).metrics)
        if last is None:
            parts.append(f"{name} starting")
            continue
        rate = last.get("img_per_s") or 0.0
        left_s = (steps - last["step"]) * p.cfg.train.batch_img / rate if rate > 0 else None
        parts.append(f"{name} step {last['step']}/{steps} ({rate:.0f} img/s"
                     + (f", ETA {format_duration(left_s)})" if left_s is not None else ")"))
    return (f"[launch] {finished}/{total} jobs finished after {format_duration(elapsed_s)}; running: "
            + "; ".join(parts) + " (ETAs count training steps, not evals)")
