"""The SLURM launcher (hydra/launcher=slurm): hydra-submitit-launcher's, changed where a study needs it.

Its `launch` submits one job array per wave and, by default, returns at once (detached): the jobs need nothing
outside the cluster to finish the study. Each training job evaluates inline or submits its own eval jobs as its
checkpoints appear (scaling.slurm.JobEvals), and whichever job ends the study last writes the results table and the
figures when the launch asked for analyze=true (scaling.slurm.finish_study). A later wave (points that share a run)
waits for the earlier one through a SLURM dependency. hydra.launcher.wait=true follows every job to its end
instead, as hydra-submitit-launcher does, but without sacct (scontrol; a cluster without accounting has none) and
through requeues, with the eval jobs submitted from the launch.

A job runs hydra-submitit-launcher's own `__call__` (compose the point, run it through Hydra's `run_job`), whose task
is scaling.slurm.slurm_task.
"""

from pathlib import Path
from typing import Sequence

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from scaling.config import run_dir_for
from scaling.evaluate import missing_evals
from scaling.grid import Composer, compose_points, config_dir_of, group_dirs
from scaling.jobs import Point, first_line, job_return, point_state
from scaling.slurm import EvalJobs, eval_params, live_eval_steps, slurm_executor, submit_and_wait, submit_evals


class GridSlurmLauncher(SlurmLauncher):
    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.previous_array: str | None = None  # the last wave's job array: the next wave starts after it

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        params, wait = self.params, bool(self.params.get("wait"))
        composer = Composer(self.hydra_context.config_loader, self.config, group_dirs(config_dir_of(self.config)))
        points = compose_points(composer, [list(o) for o in job_overrides])
        launch_dir = str(self.config.hydra.sweep.dir)
        values = {p.run_id: {"state": point_state(p.cfg)} for p in points}
        evals_only = [p for p in points if values[p.run_id]["state"] == "evals" and not p.cfg.eval.inline]
        train = [p for p in points if values[p.run_id]["state"] not in ("done", "running") and p not in evals_only]

        if evals_only and not wait:  # trained runs whose evals are missing (an eval job failed, or a new setting)
            executor = slurm_executor(eval_params(params))
            for p in evals_only:
                c = p.cfg
                try:
                    live = live_eval_steps(c)
                    due = [s for s in missing_evals(run_dir_for(c).path, c.eval, c.train.ckpt_every, c.train.steps)
                           if s not in live]
                    job = submit_evals(executor, c, due, launch_dir) if due else None
                except Exception as e:  # noqa: BLE001 - sbatch or squeue refused: reported with the point
                    values[p.run_id] = {"state": f"failed: eval submission: {first_line(str(e))}"}
                    continue
                if job is not None:
                    print(f"[launch] eval job {job.job_id}: {p.run_id} steps {due}", flush=True)
                values[p.run_id] = {"state": "submitted" if due or live else "evals",
                                    "job": job.job_id if job is not None else None}
        try:
            jobs = self.submit(train, initial_job_idx, dependency=None if wait else self.previous_array)
        except Exception as e:  # noqa: BLE001 - sbatch refused: nothing of this wave runs
            message = f"failed: submission: {first_line(str(e))}"
            print(f"[launch] {message}", flush=True)
            return [job_return(p.overrides, {"state": message} if p in train else values[p.run_id]) for p in points]
        for p, job in zip(train, jobs):
            values[p.run_id] = {"state": "submitted", "job": job.job_id}
        if jobs:
            root = Path(train[0].cfg.output_root)
            print(f"[launch] logs: {Path(params['submitit_folder'].replace('%j', '<job id>'))}/; follow the study with: "
                  f"python -m scaling.status {root} --watch 60", flush=True)
        if wait:
            values.update(self.follow(points, dict(zip(jobs, train))))
        return [job_return(p.overrides, values[p.run_id]) for p in points]

    def submit(self, points: list[Point], initial_job_idx: int, dependency: str | None) -> list:
        """One job array of the points (hydra-submitit-launcher's arguments to its own `__call__`)."""
        if not points:
            return []
        executor = slurm_executor(self.params)
        if dependency:
            extra = dict(self.params.get("additional_parameters") or {})
            executor.update_parameters(slurm_additional_parameters={**extra, "dependency": f"afterany:{dependency}"})
        n = len(points)
        job_params = [(list(p.overrides), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                       Singleton.get_state()) for i, p in enumerate(points)]
        with submitit.helpers.clean_env():  # launched from inside a job (an interactive allocation): not its SLURM_*
            jobs = executor.map_array(self, *zip(*job_params))
        self.previous_array = str(jobs[0].job_id).split("_")[0]
        for p, job in zip(points, jobs):
            print(f"[launch] job {job.job_id}: {p.run_id}", flush=True)
        assert len(jobs) == n
        return jobs

    def follow(self, points: list[Point], jobs: dict) -> dict:
        """wait=true: every training job to its end (through requeues), the eval jobs submitted from here as
        checkpoints appear; {run_id: value}."""
        evals = EvalJobs(slurm_executor(eval_params(self.params)), points, launch_dir=None)
        with evals.watching():
            outcomes = submit_and_wait(jobs)
        errors = evals.drain()
        return {p.run_id: {"state": outcomes.get(p.run_id, point_state(p.cfg)),
                           **({"eval_error": errors[p.run_id]} if p.run_id in errors else {})} for p in points}
