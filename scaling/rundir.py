"""The run directory: the files every other part of the project reads (docs/design.md, "Run directory").

    <output_root>/runs/<run_id>/
      config.yaml  plan.json  status.json  metrics.jsonl  evals.jsonl  checkpoints/  samples/  lock.json

Every whole-file write is atomic (temporary file + rename), so a killed job never leaves half a JSON file
behind; JSONL files are append-only and a torn last line is skipped on read.
"""

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATES = ("pending", "running", "done", "failed", "preempted")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / "config.yaml")
    plan = property(lambda self: self.path / "plan.json")
    status = property(lambda self: self.path / "status.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    evals = property(lambda self: self.path / "evals.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")
    lock = property(lambda self: self.path / "lock.json")

    @property
    def run_id(self) -> str:
        return self.path.name

    def create(self) -> "RunDir":
        for d in (self.path, self.checkpoints, self.samples):
            d.mkdir(parents=True, exist_ok=True)
        return self


def runs_under(output_root) -> list[RunDir]:
    """Every run directory under `output_root/runs/` (those with a plan.json), sorted by run_id."""
    root = Path(output_root) / "runs"
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if (p / "plan.json").is_file()]


# ----------------------------------------------------------------------------- files


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def append_jsonl(path, obj) -> None:
    """Append one JSON line and fsync it, so a row that returned is on disk."""
    line = json.dumps(obj, sort_keys=True, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_counting(path) -> tuple[list[dict], int]:
    """Rows of a JSONL file and the number of malformed lines skipped (a torn write from a killed job, a hand
    edit, a line that is not an object)."""
    rows, bad = [], 0
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad += 1
    except FileNotFoundError:
        pass
    return rows, bad


def read_jsonl(path) -> list[dict]:
    """All complete rows of a JSONL file; malformed lines are skipped."""
    return read_jsonl_counting(path)[0]


def truncate_jsonl(path, max_step: int) -> None:
    """Drop rows logged after `max_step`: a resumed run replays those steps and logs them again."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > max_step for r in rows):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if r.get("step", 0) <= max_step))


# ----------------------------------------------------------------------------- status


def write_status(run: RunDir, state: str, step: int, error: str | None = None, **extra) -> None:
    if state not in STATES:
        raise ValueError(f"status state {state!r} is not one of {STATES}")
    status = {"state": state, "step": int(step), "error": error, "updated_at": time.time(),
              "host": socket.gethostname(), **extra}
    write_json(run.status, status)


def read_status(run: RunDir) -> dict:
    return read_json(run.status, default={"state": "pending", "step": 0, "error": None, "updated_at": None})


# ----------------------------------------------------------------------------- lock (lease)


class RunLocked(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(info: dict, stale_s: float) -> bool:
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return True  # the holder died on this machine
    return time.time() - float(info.get("heartbeat", 0)) > stale_s  # holder elsewhere stopped beating


def acquire_lock(run: RunDir, stale_s: float = 600.0) -> dict:
    """Take the run's lease, so two launches of one run never both train it.

    The lease is `lock.json`, created with O_EXCL. A lease whose holder process is gone (same host) or whose
    heartbeat is older than `stale_s` (another host) is taken over. Raises RunLocked otherwise.
    """
    run.path.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
          "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    for _ in range(2):
        try:
            fd = os.open(run.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_json(run.lock, default={}) or {}
            if info.get("host") == me["host"] and info.get("pid") == me["pid"]:
                return me  # re-entrant within one process
            if not lock_is_stale(info, stale_s):
                raise RunLocked(f"run {run.run_id} is being trained by pid {info.get('pid')} on "
                                f"{info.get('host')} (lease {run.lock}); not starting a second copy")
            os.unlink(run.lock)  # stale: take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me
    raise RunLocked(f"could not take the lease {run.lock}")


def heartbeat(run: RunDir) -> None:
    info = read_json(run.lock, default=None)
    if info and info.get("pid") == os.getpid():
        info["heartbeat"] = time.time()
        write_json(run.lock, info)


def release_lock(run: RunDir) -> None:
    info = read_json(run.lock, default=None)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        os.unlink(run.lock)


@contextmanager
def run_lock(run: RunDir, stale_s: float = 600.0):
    acquire_lock(run, stale_s)
    try:
        yield
    finally:
        release_lock(run)
