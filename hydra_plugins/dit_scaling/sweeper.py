"""The grid sweeper (hydra/sweeper=grid, the default of conf/config.yaml): what makes a launch safe to start.

Before anything runs, the sweep is expanded (`hydra.sweeper.params` of the study, then the command line, crossed
as Hydra's basic sweeper does) and every grid point is composed and validated: a bad value stops the launch with
one line naming it and the allowed values (exit 2), before any job or file exists. A dry run prints the plan and
stops. Otherwise the launch is recorded (<hydra.sweep.dir>/multirun.yaml and launch.json), finished runs are skipped
(relaunching a finished grid submits nothing), and the rest go to the launcher wave by wave (points that share a run,
e.g. several eval settings of one model, never run at once). One line per point at the end, read from its run
directory, and the exit code: 0 done, 1 a job failed, 2 bad input, 3 unfinished, 4 submitted (SLURM, detached).
"""

import sys
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from scaling.config import config_to_dict
from scaling.grid import (Composer, check_placement, compose_points, config_dir_of, grid_overrides, group_dirs,
                          launcher_kind, one_line_error)
from scaling.jobs import EXIT_BAD_INPUT, LaunchExit, Point, analyze, job_value, point_state, summarize, waves
from scaling.plan import format_plan, plan_rows
from scaling.provenance import launch_record
from scaling.rundir import launched_points, write_json
from scaling.signals import active
from scaling.slurm import slurm_task
from scaling.squeue import SLURM_LIVE, have_slurm, slurm_states


class GridSweeper(Sweeper):
    def __init__(self, params: dict | None = None) -> None:
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        try:
            launcher_kind(config.hydra.launcher)
            # SLURM jobs run scaling.slurm.slurm_task: a module-level function that a job unpickles by reference
            self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                     task_function=slurm_task, config=config)
        except Exception as e:  # noqa: BLE001 - bad launcher settings: one line, before anything runs
            print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
            raise LaunchExit(EXIT_BAD_INPUT) from None

    # ------------------------------------------------------------------------- before anything runs

    def points(self, arguments: list[str]) -> list[Point]:
        """Every grid point composed, validated and placed; its state read from its run directory, or "queued"
        when an earlier launch's SLURM job for it has not started yet (a relaunch must not submit it twice)."""
        grid = grid_overrides(self.params, arguments, multirun=True)
        composer = Composer(self.hydra_context.config_loader, self.config, group_dirs(config_dir_of(self.config)))
        points = compose_points(composer, grid)
        kind = launcher_kind(self.config.hydra.launcher)
        check_placement(points, kind, OmegaConf.to_container(self.config.hydra.launcher, resolve=True))
        for p in points:
            p.state = point_state(p.cfg)
        if kind == "slurm" and not any(p.cfg.dry_run for p in points) and have_slurm():
            jobs = {}
            for root in dict.fromkeys(p.cfg.output_root for p in points if p.state not in ("done", "running")):
                for run_id, point in launched_points(root)[0].items():
                    if (point.get("outcome") or {}).get("job"):
                        jobs[run_id] = str(point["outcome"]["job"])
            live = slurm_states(sorted(set(jobs.values()))) if jobs else {}
            for p in points:
                if p.state not in ("done", "running") and live.get(jobs.get(p.run_id, "")) in SLURM_LIVE:
                    p.state = "queued"  # its job (from an earlier launch) is pending or starting
        return points

    def record(self, points: list[Point], outcomes: dict[str, dict] | None = None) -> Path:
        """This launch's records in <hydra.sweep.dir>: multirun.yaml (the composed config with the grid, as Hydra's
        sweepers write it) and launch.json (command line, git commit, versions, and every point with its run id,
        config and outcome: state, and SLURM job where submitted): the SLURM jobs read it to know the rest of the
        grid, scaling.status to show the points that have no run directory yet."""
        folder = Path(str(self.config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, folder / "multirun.yaml")
        write_json(folder / "launch.json", {
            **launch_record(), "config_name": str(self.config.hydra.job.config_name),
            "launcher": launcher_kind(self.config.hydra.launcher),
            "points": [{"overrides": p.overrides, "run_id": p.run_id, "output_root": p.cfg.output_root,
                        "state": p.state, "outcome": (outcomes or {}).get(p.run_id), "config": config_to_dict(p.cfg)}
                       for p in points]})
        return folder

    # ------------------------------------------------------------------------- the sweep

    def sweep(self, arguments: list[str]) -> Any:
        try:
            points = self.points(list(arguments))
        except Exception as e:  # noqa: BLE001 - every input error ends here, as one line
            print(f"error: {one_line_error(e, list(arguments))}", file=sys.stderr, flush=True)
            raise LaunchExit(EXIT_BAD_INPUT) from None
        if any(p.cfg.dry_run for p in points):
            launcher = OmegaConf.to_container(self.config.hydra.launcher, resolve=True)
            print(format_plan(plan_rows(points, launcher if launcher_kind(self.config.hydra.launcher) == "slurm"
                                        else None)), flush=True)
            return []
        stop = active()
        if stop is not None:  # a launch of many jobs: Ctrl-C and SIGTERM are this process's own again (the pool)
            stop.restore()
            if stop.signal is not None:
                print(f"[launch] {stop.name} before any job started: nothing launched", flush=True)
                raise LaunchExit(130)

        folder = self.record(points)
        print(f"[launch] {len(points)} points; records in {folder}", flush=True)
        for p in points:
            if p.state in ("done", "running", "queued"):
                print(f"[launch] {p.run_id}: {p.state}, skipped", flush=True)
        todo = [p for p in points if p.state not in ("done", "running", "queued")]
        outcomes = {p.run_id: "submitted" for p in points if p.state == "queued"}  # by an earlier launch
        eval_errors, returns, values = {}, [], {}
        try:
            for wave in waves(todo):
                results = self.launcher.launch([p.overrides for p in wave], initial_job_idx=len(returns))
                for p, r in zip(wave, results):
                    value = values[p.run_id] = job_value(r)
                    outcomes[p.run_id] = value.get("state", "")
                    if value.get("eval_error"):
                        eval_errors[p.run_id] = value["eval_error"]
                returns += results
                self.record(points, values)  # the job ids, as soon as they exist: a relaunch skips queued points
        except KeyboardInterrupt:
            print("[launch] interrupted" + (": the SLURM jobs keep running; follow them with python -m scaling.status"
                                            if launcher_kind(self.config.hydra.launcher) == "slurm" else ""), flush=True)
            summarize(points, outcomes, eval_errors)
            raise LaunchExit(130) from None
        code = summarize(points, outcomes, eval_errors)
        self.record(points, values)
        if any(p.cfg.analyze for p in points) and not any(o == "submitted" for o in outcomes.values()):
            for root in dict.fromkeys(p.cfg.output_root for p in points):
                analyze(root)
        if code:
            raise LaunchExit(code)
        return returns
