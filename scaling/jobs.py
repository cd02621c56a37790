"""What the local pool and the SLURM launch share: a grid point, its state read from its run directory, and
running one point (training, then the evals that are due) as a job does.

    scaling.launch (the command) -> scaling.jobs (one point) <- scaling.slurm (the same points as SLURM jobs)
"""

import errno
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus

from scaling.checkpoint import DiskFull
from scaling.config import RunConfig, run_dir_for
from scaling.evaluate import evaluate_checkpoint, missing_evals, setting_key
from scaling.rundir import (LeaseLost, RunDir, RunLocked, launch_records, lease_is_live, read_lease, read_status,
                            write_status)
from scaling.train import mirror_eval, train

# Exit codes of `python -m scaling.launch` (docs/launching.md).
EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNFINISHED, EXIT_SUBMITTED = 0, 1, 2, 3, 4


class LaunchExit(SystemExit):
    """The launch ends with this exit code, decided by the project (Hydra's own exits are plain SystemExit: the
    launcher's main() reads those as Hydra rejecting the command line, exit 2)."""


@dataclass
class Point:
    """One grid point: the overrides that compose it, its config and its run directory."""
    overrides: list[str]
    cfg: RunConfig
    run_id: str
    state: str = "new"               # new | partial | evals | done | running | failed | preempted (point_state)


def first_line(text: str) -> str:
    """The first line of an error message (for one-line reports)."""
    return text.strip().splitlines()[0] if text.strip() else ""


# ----------------------------------------------------------------------------- state of a point


def point_state(cfg: RunConfig) -> str:
    """new | partial | evals (trained, evals missing) | done | running (a live lease) | failed | preempted.

    A run whose status.json is unreadable is "partial": its launch resumes it from its checkpoints."""
    run = run_dir_for(cfg)
    if not run.status.is_file():
        return "new"
    status = read_status(run)
    if status["state"] == "running" and lease_is_live(run):
        return "running"
    if status["state"] != "done" or status["step"] < cfg.train.steps:
        return status["state"] if status["state"] in ("failed", "preempted") else "partial"
    return "evals" if missing_evals(run.path, cfg.eval, cfg.train.ckpt_every, cfg.train.steps) else "done"


# ----------------------------------------------------------------------------- one job


def run_point(cfg: RunConfig, evals_here: bool = True) -> dict:
    """Train one grid point (resuming, or returning at once when done) and run its missing evals.

    A failure leaves status.json "failed" with the error and is raised again; a run whose lease another
    process holds is left alone (state "locked"). `evals_here=False` leaves non-inline evals to the caller
    (the SLURM launch submits them as their own jobs).
    """
    run = run_dir_for(cfg)
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    try:
        status = train(cfg)
        if evals_here and status["state"] == "done" and not cfg.eval.inline and rank == 0:
            evaluate_missing(cfg)
            status = read_status(run)
    except RunLocked as e:
        print(f"[launch] {run.run_id}: {e}", flush=True)
        return {"state": "locked", "error": str(e), "run_id": run.run_id}
    except Exception as e:
        if rank == 0 and not isinstance(e, LeaseLost):
            mark_failed(run, e)
        raise
    return {**status, "run_id": run.run_id}


def mark_failed(run: RunDir, error: BaseException) -> None:
    """status.json = failed with the error, unless the job already said so (with its real step) or another live
    process holds the run's lease."""
    status = read_status(run)
    if status["state"] == "failed":
        return
    holder, _ = read_lease(run)
    if holder and lease_is_live(run) and holder.get("pid") != os.getpid():
        return
    try:
        write_status(run, "failed", status["step"], error=f"{type(error).__name__}: {error}")
    except OSError as e:  # e.g. the disk that failed the job is still full: the job's own error is what counts
        print(f"[launch] could not write {run.status}: {e}", file=sys.stderr, flush=True)


def evaluate_missing(cfg: RunConfig, only: list[int] | None = None) -> int:
    """Evaluate every checkpoint of the run that is due for evaluation and lacks this eval setting (of `only`, when
    given: an eval job's share); the number evaluated."""
    use_cpu_allocation()  # an eval job on SLURM
    run_path = run_dir_for(cfg).path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = [s for s in missing_evals(run_path, cfg.eval, cfg.train.ckpt_every, cfg.train.steps)
             if only is None or s in only]
    for step in steps:
        print(f"[launch] evaluating {run_path.name} step {step} ({cfg.eval.num_samples} samples)", flush=True)
        mirror_eval(cfg, evaluate_checkpoint(run_path, step, cfg.eval, device))  # into the run's wandb history
    return len(steps)


def use_cpu_allocation() -> int | None:
    """Inside a SLURM job, torch uses the job's CPUs (SLURM_CPUS_PER_TASK), not every core of the node as it
    otherwise would (no OMP_NUM_THREADS is set, and task/none binds nothing): two 1-CPU jobs on one node ran at
    25-180 img/s where one alone ran ~1500. The thread count set, or None outside a SLURM job."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit():
        return None
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = cpus  # and for the processes it starts
    torch.set_num_threads(int(cpus))
    return int(cpus)


def job_return(overrides: list[str], value: dict) -> JobReturn:
    """What a launcher hands back to the sweeper for one grid point: the point's state (and job) as a finished
    Hydra job's return value."""
    ret = JobReturn(overrides=list(overrides), task_name="launch", status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


def job_value(ret: JobReturn) -> dict:
    """What a launcher returned for a job: a dict with its state, or `failed: <error>` for a job that raised."""
    try:
        value = ret.return_value
    except Exception as e:  # noqa: BLE001 - the job raised: its run directory says failed
        return {"state": f"failed: {type(e).__name__}: {first_line(str(e))}"}
    return value if isinstance(value, dict) else {"state": "done"}


def hydra_dir() -> str | None:
    """The Hydra output folder of this job (its .hydra/ holds the composed config and overrides), if any."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def waves(points: list[Point]) -> list[list[Point]]:
    """Points that share a run (e.g. several eval settings of one trained model) go in successive waves, so
    no two jobs of one run ever run at once."""
    seen, out = {}, []
    for p in points:
        k = seen[p.run_id] = seen.get(p.run_id, -1) + 1
        if k == len(out):
            out.append([])
        out[k].append(p)
    return out


def run_single(point: Point) -> int:
    """One point in this process. The faults a job can meet and name (a full disk, a non-finite step, a lost
    lease) end in one line; anything else keeps its traceback."""
    try:
        status = run_point(point.cfg)
    except (DiskFull, FloatingPointError, LeaseLost) as e:
        print(f"error: {point.run_id}: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {point.run_id}: no space left on the device of {e.filename or run_dir_for(point.cfg).path} "
              f"({e.strerror}); the checkpoints already written are intact", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"[launch] {point.run_id}: interrupted (its status says where it stopped)", flush=True)
        return 130
    print(f"[launch] {status['run_id']}: {status['state']}", flush=True)
    return 0 if status["state"] == "done" else EXIT_FAILED if status["state"] == "failed" else EXIT_UNFINISHED


# ----------------------------------------------------------------------------- after the grid


def summarize(points: list[Point], outcomes: dict, eval_errors: dict) -> int:
    """One line per grid point from its run directory (the source of truth), then the exit code: 1 when a job or
    an eval failed, else 4 when jobs were submitted and left to run (SLURM, detached), else 3 when a point is not
    done, else 0."""

    with_eval = len({setting_key(p.cfg.eval) for p in points}) > 1
    failed = submitted = unfinished = False
    for p in points:
        p.state = point_state(p.cfg)
        note = outcomes.get(p.run_id, "")
        if p.state != "done" and note.startswith("submitted"):  # e.g. a failed run resubmitted: it resumes
            submitted = True
        elif p.state == "failed" or p.run_id in eval_errors or note.startswith("failed"):
            failed = True
        elif p.state != "done":
            unfinished = True
        extra = eval_errors.get(p.run_id) or (note.removeprefix("failed: ") if note and note != p.state else "")
        label = p.run_id + (f" [{setting_key(p.cfg.eval)}]" if with_eval else "")
        print(f"[launch] {label}: {p.state}" + (f" ({extra})" if extra else ""), flush=True)
    return EXIT_FAILED if failed else EXIT_SUBMITTED if submitted else EXIT_UNFINISHED if unfinished else EXIT_DONE


def swept_budgets(output_root) -> list[float]:
    """The training budgets (train.budget_flops > 0, FLOPs) of every point of every launch into the output root:
    the budgets of its isoFLOP profiles (a later launch that adds seeds at one budget keeps the others)."""
    budgets = set()
    for record in launch_records(output_root):
        for p in record.get("points") or []:
            train = ((p.get("config") or {}).get("train") or {}) if isinstance(p, dict) else {}
            if float(train.get("budget_flops") or 0) > 0:
                budgets.add(float(train["budget_flops"]))
    return sorted(budgets)


def analyze(output_root: str, budgets=()) -> bool:
    """The results table and the figures of the output root, in <output_root>/analysis/ (where installed); whether
    every step succeeded. The isoFLOP profiles are read at the budgets swept into the root (swept_budgets) and
    `budgets` (a single run's own)."""
    budgets = sorted(set(swept_budgets(output_root)) | {float(b) for b in budgets if b > 0})

    out = Path(output_root) / "analysis"
    table = out / "results.csv"
    laws = ["--budgets", ",".join(repr(b) for b in budgets)] if budgets else []
    # the table first; then the figures and the forecasting laws (with a held-out loss) from it, at once (two
    # processes: they only read the table, and each takes ~10-25 s on a CPU core)
    for wave in ([("scaling.results", [str(output_root), "-o", str(table)])],
                 [("analysis.figures", [str(table), "-o", str(out)]),
                  ("analysis.law_figures", [str(table), "-o", str(out), *laws])]):
        missing = [m for m, _ in wave if importlib.util.find_spec(m) is None]
        if missing:
            print(f"[launch] analyze: {missing[0]} is not available; skipped", flush=True)
            return False
        procs = [(m, subprocess.Popen([sys.executable, "-m", m, *argv])) for m, argv in wave]
        failed = [(m, rc) for m, p in procs if (rc := p.wait())]
        for m, rc in failed:
            print(f"[launch] analyze: python -m {m} exited {rc}", flush=True)
        if failed:
            return False
    return True
