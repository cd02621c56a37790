"""wandb mirror of metrics.jsonl and evals.jsonl: optional, offline by default, never the source of truth.

Runs of one sweep share a wandb group; the run's wandb id is its run_id, so every process that writes to a run
(the training job, each requeued attempt, an eval job) continues the same wandb run. History rows carry `step`
and `train_flops` as values and every metric is defined against `step` (`define_metric`), so a panel plots a
training metric or an eval (`fd1k_domain`, `fid50k_inception`) against step, or against train_flops, whatever
order the rows were logged in: an eval job scores step 2000 after training logged step 9000. The summary carries
params, Gflops and the latest metrics (an eval's of the newest evaluated step) so that a dashboard can plot FID
against Gflops across the group (README, "Dashboards").

Offline, each process writes a folder of its own, `<run>/wandb/offline-run-<time>-<run_id>[-k]`; wandb's
internal `_step` must then grow across them, or a sync of the later folders would overwrite the earlier
history: the processes take their `_step` values from a counter in `<run>/wandb/next_step` (blocks of
STEP_BLOCK, under a file lock), so a killed process loses at most the rest of its block, never a value another
used. `wandb sync <run>/wandb` then uploads the folders in order of start time into one run (docs/slurm.md).

Nothing here fails a run: a wandb call that raises (its service dies with the signal of a requeue) is reported
once on stderr and the mirror stops for the process. The rows such a process logged may be lost with its service
(SLURM signals every process of the job, wandb's too): `<run>/wandb/mirrored_through` holds the last training step
of a process whose wandb session ended cleanly, and the next attempt replays the metrics.jsonl rows after it
(`replay`), so the history holds every step (a row the killed service did write may appear twice).
No API key is ever written by this module.
"""

import errno
import fcntl
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scaling.flops import train_flops
from scaling.rundir import atomic_write_text, read_jsonl

MODES = ("offline", "online", "disabled")
STEP_BLOCK = 1000  # wandb _step values a process reserves at once (one locked write of the counter per block)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled  (online needs WANDB_API_KEY in the environment)
    project: str = "dit-scaling"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


def reserve_steps(counter: Path, at_least: int, n: int = STEP_BLOCK) -> int:
    """The first of `n` wandb `_step` values that no other process of the run has taken or will take: the
    counter file holds the next free value; read, advance and fsync under an exclusive lock."""
    counter.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without POSIX locks: unguarded, as scaling.rundir's lease falls back
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        text = os.read(fd, 64).decode("ascii", errors="replace").strip()
        start = max(int(text) if text.isdigit() else 0, at_least)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{start + n}\n".encode())
        os.fsync(fd)
        return start
    finally:
        os.close(fd)  # releases the lock


def latest_eval_metrics(rows: list[dict]) -> dict:
    """{metric: value} of evals.jsonl rows, each metric taken from the newest step that has it."""
    out = {}
    for row in sorted(rows, key=lambda r: (r.get("step", 0), r.get("time", 0))):
        out.update({k: v for k, v in (row.get("metrics") or {}).items() if isinstance(v, (int, float))})
    return out


class Tracker:
    """A thin mirror: `log(row)` (metrics.jsonl), `log_eval(row)` (evals.jsonl) and `summary(d)` go to wandb when it
    is on, and nowhere otherwise."""

    def __init__(self, cfg: WandbConfig, run_id: str, group: str, run_dir, config: dict, plan: dict, rank: int = 0):
        if cfg.mode not in MODES:
            raise ValueError(f"wandb.mode={cfg.mode!r}; allowed: {', '.join(MODES)}")
        self.run = self._failed = None  # _failed: a run whose calls raised, finished last by finish()
        if cfg.mode == "disabled" or rank != 0:
            return
        import wandb

        self.run_dir, self.plan = Path(run_dir), plan
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, name=run_id, id=run_id, resume="allow",
            tags=list(cfg.tags), mode=cfg.mode, dir=str(run_dir), config={**config, "plan": plan},
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._next_step = self._end_step = 0
        self.logged_through = 0  # the last training step this process logged
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # every panel's x axis: the training step
        self.summary({k: plan[k] for k in ("params", "gflops_per_img", "tokens", "model", "patch", "block", "family")
                      if k in plan})

    def _step(self) -> int:
        if self._next_step >= self._end_step:
            self._next_step = reserve_steps(self.run_dir / "wandb" / "next_step",
                                            max(self._next_step, self.run.starting_step))
            self._end_step = self._next_step + STEP_BLOCK
        self._next_step += 1
        return self._next_step - 1

    def _log(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in values.items() if v is not None}, step=self._step(), commit=True)
        except Exception as e:  # noqa: BLE001 - a mirror: metrics.jsonl and evals.jsonl hold everything
            self._stop(e)

    def _train_flops(self, step: int) -> float | None:
        if "gflops_per_img" in self.plan and "batch_img" in self.plan:
            return train_flops(self.plan["gflops_per_img"], self.plan["batch_img"], step)
        return None

    def log(self, row: dict) -> None:
        """A metrics.jsonl row: its numbers, and train_flops at its step."""
        if self.run is not None:
            self._log({**{k: v for k, v in row.items() if isinstance(v, (int, float))},
                       "train_flops": self._train_flops(int(row["step"]))})
            self.logged_through = max(self.logged_through, int(row["step"]))

    def replay(self, up_to_step: int) -> int:
        """Log the metrics.jsonl rows that no clean wandb session has mirrored (after `mirrored_through`, up to the
        step training resumes from): those of an attempt whose wandb service died with it. The rows logged."""
        if self.run is None:
            return 0
        marker = self.run_dir / "wandb" / "mirrored_through"
        text = marker.read_text().strip() if marker.is_file() else "0"
        done = int(text) if text.isdigit() else 0
        rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl")
                if isinstance(r.get("step"), int) and done < r["step"] <= up_to_step]
        for row in rows:
            self.log(row)
        self.logged_through = max(self.logged_through, done)
        return len(rows)

    def log_eval(self, row: dict) -> None:
        """An evals.jsonl row: its named metrics at its step (and img_seen, train_flops), whenever it comes; the
        summary then holds each metric of the newest evaluated step."""
        if self.run is None:
            return
        step = int(row["step"])
        self._log({**{k: v for k, v in (row.get("metrics") or {}).items() if isinstance(v, (int, float))},
                   "step": step, "img_seen": row.get("img_seen"), "train_flops": self._train_flops(step)})
        self.summary(latest_eval_metrics(read_jsonl(self.run_dir / "evals.jsonl")))

    def summary(self, values: dict) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(values)
            except Exception as e:  # noqa: BLE001
                self._stop(e)

    def finish(self) -> None:
        clean = self._failed is None
        run, self.run, self._failed = self.run or self._failed, None, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001 - e.g. wandb's service died with the signal
                print(f"[wandb] finish failed, ignored: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return
            if clean and self.logged_through:  # every training step up to here reached wandb's files
                atomic_write_text(self.run_dir / "wandb" / "mirrored_through", f"{self.logged_through}\n")

    def _stop(self, error: Exception) -> None:
        print(f"[wandb] {type(error).__name__}: {error}; wandb logging stops here for this process (metrics.jsonl "
              f"and evals.jsonl hold every row)", file=sys.stderr, flush=True)
        self.run, self._failed = None, self.run  # finish() ends it, after what the caller saves first
