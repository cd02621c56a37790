"""The grid as a table, read from the run directories alone (never from the scheduler).

    python -m scaling.status                      # outputs/ (the default output_root)
    python -m scaling.status /scratch/dit --watch 30

One row per grid point: state, step / total, latest training loss, latest eval (the metric names its feature
space), its eval jobs, img/s, last update and the SLURM job holding the run (as squeue names it: 32_1). Points
that a launch submitted but whose job has not started yet come from the launch records
(<output_root>/launches/*/launch.json) and show as queued. Works from a login node while the jobs run and after
they end; it only reads (one squeue call per refresh where SLURM is there), it never submits. A run whose
status.json says "running" but whose lease (lock.json) has no live holder shows as "stale": the job died without
a word (killed, node lost); relaunching the grid resumes it from its newest checkpoint. A file that does not
parse (status, plan, lease, eval rows) is named under the table with its run, never a crash.
"""

import argparse
import sys
import time
from pathlib import Path

from scaling.rundir import (LEASE_STALE_S, RunDir, last_jsonl_row, launched_points, lease_is_stale, load_json,
                            read_jsonl, read_jsonl_checked, read_lease, read_status)
from scaling.squeue import SLURM_LIVE, have_slurm, slurm_states

STALE_S = LEASE_STALE_S  # a lease on another host whose heartbeat is older than this is dead


def run_dirs(output_root) -> list[RunDir]:
    """Every run directory under output_root/runs/ that has a status or a plan, sorted by run id."""
    root = Path(output_root) / "runs"
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "status.json").is_file() or (p / "plan.json").is_file())]


def queued_row(point: dict, states: dict[str, str]) -> dict:
    """A grid point without a run directory: its job queued (or starting), or not submitted."""
    job = (point.get("outcome") or {}).get("job")
    state = states.get(str(job), "") if job else ""
    label = ("queued" if state == "PENDING" else "starting" if state in SLURM_LIVE else
             "lost" if job and state else "new")
    steps = ((point.get("config") or {}).get("train") or {}).get("steps")
    return {"run_id": point["run_id"], "state": label, "step": 0, "steps": steps, "loss": None, "img_per_s": None,
            "eval": "", "eval_jobs": "", "updated_at": None, "job": job, "error": None, "problems": []}


def eval_jobs_label(rows: list[dict], states: dict[str, str]) -> str:
    """'1 running, 2 done': the run's eval jobs (eval_jobs.jsonl) by what SLURM says of them now."""
    counts = {}
    for r in rows:
        state = states.get(str(r.get("job_id")), "")
        name = "queued" if state == "PENDING" else "running" if state in SLURM_LIVE else "ended"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def run_row(run: RunDir, stale_s: float = STALE_S, states: dict[str, str] | None = None) -> dict:
    status = read_status(run)
    plan, plan_problem = load_json(run.plan)
    plan = plan if isinstance(plan, dict) else {}
    lock, lock_problem = read_lease(run)
    live = lock is not None and not lease_is_stale(lock, stale_s)
    state = status["state"]
    if state == "running" and not live:
        state = "stale"
    evals, eval_problems = read_jsonl_checked(run.evals)
    metrics = last_jsonl_row(run.metrics)
    heartbeat = (lock or {}).get("heartbeat")
    times = [t for t in (status["updated_at"], heartbeat, (metrics or {}).get("time"))
             if isinstance(t, (int, float))]
    problems = [p for p in (status.get("problem"), plan_problem, lock_problem) if p] + eval_problems
    return {"run_id": run.run_id, "state": state, "step": status["step"], "steps": plan.get("steps"),
            "loss": _number((metrics or {}).get("loss")), "img_per_s": _number((metrics or {}).get("img_per_s")),
            "eval": eval_label(evals[-1] if evals else None), "updated_at": max(times) if times else None,
            "eval_jobs": eval_jobs_label(read_jsonl(run.path / "eval_jobs.jsonl"), states or {}),
            "job": (lock.get("slurm_job_id") if live else None) or status.get("slurm_job"), "error": status.get("error"),
            "problems": problems}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def eval_label(row: dict | None) -> str:
    """'FD-1K(domain) 41.20 @3000': the value, the feature space and sample count, and the step evaluated."""
    fd = _number(row.get("fd", row.get("fid"))) if row else None  # evals.jsonl rows before the fd key: "fid"
    if fd is None:
        return ""
    n = int(_number(row.get("num_samples")) or 0)
    samples = f"{n / 1000:g}K" if n >= 1000 else str(n)
    name = "FID" if row.get("feature_extractor") == "inception" else "FD"  # inception_offline: other weights
    return f"{name}-{samples}({row.get('feature_extractor')}) {fd:.2f} @{row.get('step')}"


def age(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0, int(now - t))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def format_table(rows: list[dict], now: float | None = None, argv: list[str] | None = None) -> str:
    now = time.time() if now is None else now
    head = ("run_id", "state", "step", "loss", "latest eval", "eval jobs", "img/s", "updated", "job")
    body = [(r["run_id"], r["state"], f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}",
             f"{r['loss']:.4f}" if r["loss"] is not None else "-", r["eval"] or "-", r.get("eval_jobs") or "-",
             f"{r['img_per_s']:.1f}" if r["img_per_s"] is not None else "-", age(r["updated_at"], now),
             str(r["job"] or "-")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in (head, *body)]
    lines += [f"  {r['run_id']}: {r['error']}" for r in rows if r["state"] == "failed" and r["error"]]
    lines += [f"  {r['run_id']}: skipped {p}" for r in rows for p in r.get("problems", [])]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if argv and any(r["state"] in ("failed", "stale", "preempted", "partial", "lost") for r in rows):
        lines.append("next: relaunch to resume the unfinished runs (finished ones are skipped): python -m scaling.launch "
                     + " ".join(argv[1:]))
    return "\n".join(lines)


def status_rows(output_root, stale_s: float = STALE_S) -> tuple[list[dict], list[str] | None]:
    """Every run directory's row and every launched point without one (queued), sorted by run id; one squeue call
    for the jobs they name."""
    runs = run_dirs(output_root)
    points, argv = launched_points(output_root)
    have = {r.run_id for r in runs}
    jobs = [str(p["outcome"]["job"]) for rid, p in points.items()
            if rid not in have and isinstance(p.get("outcome"), dict) and p["outcome"].get("job")]
    jobs += [str(r.get("job_id")) for run in runs for r in read_jsonl(run.path / "eval_jobs.jsonl")]
    states = slurm_states(sorted(set(jobs))) if jobs and have_slurm() else {}
    rows = [run_row(r, stale_s, states) for r in runs] + [queued_row(p, states) for rid, p in points.items()
                                                          if rid not in have]
    return sorted(rows, key=lambda r: r["run_id"]), argv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling.status", description=__doc__.splitlines()[0])
    ap.add_argument("output_root", nargs="?", default="outputs", help="holds runs/<run_id>/ (default outputs)")
    ap.add_argument("--stale-s", type=float, default=STALE_S,
                    help=f"a running run whose lease heartbeat is older than this shows as stale (default {STALE_S:g})")
    ap.add_argument("--watch", type=float, default=0, metavar="S", help="reprint every S seconds until Ctrl-C")
    args = ap.parse_args(argv)
    if not Path(args.output_root).is_dir():
        print(f"error: output_root={args.output_root!r} is not a directory", file=sys.stderr)
        return 2
    while True:
        rows, argv = status_rows(args.output_root, args.stale_s)
        if not rows and not args.watch:
            print(f"error: no runs under {Path(args.output_root) / 'runs'}", file=sys.stderr)
            return 2
        print(format_table(rows, argv=argv) if rows else f"no runs under {Path(args.output_root) / 'runs'} yet",
              flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        print()


if __name__ == "__main__":
    sys.exit(main())
