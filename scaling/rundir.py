"""The run directory: the files every other part of the project reads (docs/design.md, "Run directory").

    <output_root>/runs/<run_id>/
      config.yaml  plan.json  status.json  metrics.jsonl  evals.jsonl  checkpoints/  samples/  lock.json

Every whole-file write is atomic (temporary file + rename), so a killed job never leaves half a JSON file
behind; JSONL files are append-only, a torn last line is skipped on read and dropped on resume. Every reader
survives garbage: a file that does not parse, or a row with the wrong types, is reported with its path (and line)
and treated as missing, so one bad file never stops the tools for a whole output root.

Temporary files are named `.<name>.<host>-<pid>.<random>.tmp` (checkpoints: `.tmp_<host>-<pid>_<random>.pt`), so
that a start-up can tell a dead writer's leftovers from a live writer's file (`clean_temporary`).
"""

import errno
import fcntl
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scaling.signals import ENVIRONMENT

STATES = ("pending", "running", "done", "failed", "preempted")
HOST = socket.gethostname()
LEASE_STALE_S = 600.0   # a lease on another host whose heartbeat is older than this is dead


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
    launches = property(lambda self: self.path / "launches.jsonl")  # one row per job start (scaling.provenance)
    guard = property(lambda self: self.path / "lock.guard")   # serialises taking the lease; never removed

    @property
    def run_id(self) -> str:
        return self.path.name

    def create(self) -> "RunDir":
        for d in (self.path, self.checkpoints, self.samples):
            d.mkdir(parents=True, exist_ok=True)
        return self


# ----------------------------------------------------------------------------- files


def temp_tag() -> str:
    """`<host>-<pid>`: who writes a temporary file (clean_temporary reads it back)."""
    return f"{HOST}-{os.getpid()}"


def warn(message: str) -> None:
    print(f"[rundir] {message}", file=sys.stderr, flush=True)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{temp_tag()}.", suffix=".tmp")
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


def load_json(path, strict: bool = False) -> tuple[object, str | None]:
    """(content, problem): content None when the file is missing or unreadable; problem names the file and what
    is wrong with it when it exists but does not parse. `strict`: an I/O error (EIO, ESTALE, EACCES) is raised
    rather than reported, for readers that must not mistake a failed read for garbage (the lease)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8")), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if strict and isinstance(e, OSError):
            raise
        return None, f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})"


def read_json(path, default=None):
    """The content of a JSON file, or `default` when it is missing or unreadable."""
    obj, _ = load_json(path)
    return default if obj is None else obj


def append_jsonl(path, obj) -> None:
    """Append one JSON line and fsync it, so a row that returned is on disk. A torn last line (a killed writer)
    is closed first, so the new row never glues onto it. Writers of one file on several nodes (eval jobs of one
    run) take turns under a POSIX lock of the file (NFS and Lustre pass it between hosts)."""
    line = json.dumps(obj, sort_keys=True, default=str)
    with open(path, "ab+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write((line + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def row_step(row: dict) -> int | None:
    """A row's `step` as an int, None when it is missing or of another type."""
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_jsonl_checked(path) -> tuple[list[dict], list[str]]:
    """Rows of a JSONL file, and one line for each line skipped ('<path> line 7: not JSON'): a torn write from a
    killed job, a hand edit, a line that is not an object, a `step` that is not an integer."""
    rows, problems = [], []
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return rows, problems
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path} line {number}: not JSON")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path} line {number}: not an object")
        elif "step" in row and row_step(row) is None:
            problems.append(f"{path} line {number}: step {row['step']!r} is not an integer")
        else:
            rows.append(row)
    return rows, problems


def read_jsonl(path) -> list[dict]:
    """All good rows of a JSONL file; malformed lines are skipped (read_jsonl_checked names them)."""
    return read_jsonl_checked(path)[0]


def last_jsonl_row(path, max_bytes: int = 65536) -> dict | None:
    """The last complete row of a JSONL file, reading only its tail (metrics.jsonl grows long)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line, or the cut first line of the tail
        if isinstance(row, dict):
            return row
    return None


def repair_jsonl(path, max_step: int) -> list[str]:
    """On resume: keep the good rows up to `max_step` (a resumed run replays later steps and logs them again),
    drop torn and malformed lines with a warning naming each; the problems found."""
    rows, problems = read_jsonl_checked(path)
    keep = [r for r in rows if (row_step(r) or 0) <= max_step]
    for p in problems:
        warn(f"dropped {p}")
    ends_torn = Path(path).is_file() and Path(path).stat().st_size and not Path(path).read_bytes().endswith(b"\n")
    if problems or len(keep) < len(rows) or ends_torn:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in keep))
    return problems


def clean_temporary(run: "RunDir", stale_s: float = LEASE_STALE_S) -> list[Path]:
    """Remove temporary files that no live process is writing; the paths removed. Call it holding the run's lease.

    checkpoints/.tmp_*: only the lease holder writes checkpoints, so any one not of this process is dead.
    Elsewhere in the run directory (status, lease, evals, samples, written by eval jobs too): a file whose
    writer was a process of this host that is gone, or one untouched for `stale_s` (another host's writer).
    """
    removed, now = [], time.time()
    for p in run.checkpoints.glob(".tmp_*") if run.checkpoints.is_dir() else []:
        if not p.name.startswith(f".tmp_{temp_tag()}_"):
            removed.append(p)
    mine = re.compile(rf"\.{re.escape(HOST)}-(\d+)[._]")  # a writer of this host (hostnames may hold dots)
    for folder in (run.path, run.samples):
        for p in folder.glob(".*.tmp") if folder.is_dir() else []:
            m = mine.search(p.name)
            try:
                dead_here = m is not None and not _pid_alive(int(m.group(1)))
                if dead_here or now - p.stat().st_mtime > stale_s:
                    removed.append(p)
            except FileNotFoundError:
                continue
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        warn(f"{run.run_id}: removed {len(removed)} temporary files of interrupted writes "
             f"({sum(1 for p in removed if p.parent == run.checkpoints)} in checkpoints/)")
    return removed


# ----------------------------------------------------------------------------- status


def slurm_job_label() -> str | None:
    """This process's SLURM job as squeue and scancel name it: `<array job>_<task>` for an array task (whose
    SLURM_JOB_ID is a number of its own: `scancel <that>` would name another job), else SLURM_JOB_ID. Read under the
    lock a thread holds while it hides the SLURM_* variables to submit an eval job (scaling.slurm)."""
    with ENVIRONMENT:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def launch_records(output_root) -> list[dict]:
    """Every launch record of the output root (<root>/launches/*/launch.json), oldest first."""
    records = []
    for record in sorted(Path(output_root).glob("launches/*/launch.json")):
        data, _ = load_json(record)
        if isinstance(data, dict):
            records.append(data)
    return records


def launched_points(output_root) -> tuple[dict[str, dict], list[str] | None]:
    """{run_id: its point in the newest launch record that names it}, and the newest launch's command line."""
    points, argv = {}, None
    for data in launch_records(output_root):
        argv = data.get("argv") or argv
        for p in data.get("points") or []:
            if isinstance(p, dict) and p.get("run_id"):
                points[p["run_id"]] = p
    return points, argv


def write_status(run: RunDir, state: str, step: int, error: str | None = None, **extra) -> None:
    if state not in STATES:
        raise ValueError(f"status state {state!r} is not one of {STATES}")
    status = {"state": state, "step": int(step), "error": error, "updated_at": time.time(), "host": HOST,
              "slurm_job": slurm_job_label(), **extra}
    write_json(run.status, status)


def read_status(run: RunDir) -> dict:
    """status.json with its types checked: state one of STATES, step an int, updated_at a number or None.

    A file that does not parse, or holds other types, reads as state "corrupt" with `problem` naming the file
    (the next launch resumes the run from its checkpoints and rewrites it)."""
    obj, problem = load_json(run.status)
    if obj is None and problem is None:
        return {"state": "pending", "step": 0, "error": None, "updated_at": None}
    if problem is None and not isinstance(obj, dict):
        problem = f"{run.status}: not a JSON object"
    status = dict(obj) if isinstance(obj, dict) else {}
    if problem is None and status.get("state") not in STATES:
        problem = f"{run.status}: state {status.get('state')!r} is not one of {', '.join(STATES)}"
    if problem is None and row_step(status) is None:
        problem = f"{run.status}: step {status.get('step')!r} is not an integer"
    updated = status.get("updated_at")
    status["updated_at"] = updated if isinstance(updated, (int, float)) and not isinstance(updated, bool) else None
    status["step"] = row_step(status) or 0
    if problem:
        status.update(state="corrupt", problem=problem)
    status.setdefault("error", None)
    return status


# ----------------------------------------------------------------------------- the lease


class RunLocked(RuntimeError):
    """Another live process holds the run's lease."""


class LeaseLost(RuntimeError):
    """This process's lease was taken over (it was suspended past the staleness limit, or lock.json was removed):
    it stops without writing another file of the run."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0 or -1, 0) would ask about a process group, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def process_start(pid: int) -> str | None:
    """An identity of process `pid` that a later process reusing the pid does not share: the boot id and the
    start time in clock ticks since boot (/proc/<pid>/stat field 22); None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{BOOT_ID}:{start}" if BOOT_ID else None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


BOOT_ID = _boot_id()


def lease_is_stale(info, stale_s: float = LEASE_STALE_S) -> bool:
    """Whether a lock.json content has no live holder.

    On this host the process table decides, whatever the heartbeat says: stale iff the pid is gone or is now
    another process (its start time differs from the recorded one). On another host only the heartbeat can:
    stale iff it is older than `stale_s`. A content that is not a lease (empty, garbage) is stale.
    """
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return True
    start = info.get("start")
    same_boot = not isinstance(start, str) or start.split(":")[0] == BOOT_ID or BOOT_ID is None
    if info.get("host") == HOST and same_boot:  # containers or nodes sharing a hostname differ in their boot id
        if not _pid_alive(info["pid"]):
            return True
        return start is not None and process_start(info["pid"]) not in (None, start)
    heartbeat = info.get("heartbeat")
    return not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > stale_s


def read_lease(run: RunDir, strict: bool = False) -> tuple[dict | None, str | None]:
    """(lock.json content or None, a problem naming the file when it exists but is not a lease). `strict`: an
    I/O error is raised, never taken for a missing or garbage lease (the lease's own reads)."""
    obj, problem = load_json(run.lock, strict=strict)
    if problem is None and obj is not None and not (isinstance(obj, dict) and isinstance(obj.get("pid"), int)):
        problem = f"{run.lock}: not a lease ({json.dumps(obj)[:60]})"
    return (obj if problem is None else None), problem


def lease_is_live(run: RunDir, stale_s: float = LEASE_STALE_S) -> bool:
    info, _ = read_lease(run)
    return info is not None and not lease_is_stale(info, stale_s)


_NO_FLOCK_WARNED = []


_THREAD_GUARDS: dict[str, threading.Lock] = {}
_THREAD_GUARDS_LOCK = threading.Lock()


@contextmanager
def _guarded(run: RunDir, timeout_s: float = 60.0):
    """Hold an exclusive POSIX record lock (fcntl) on `lock.guard` for a read-check-write of the lease.

    POSIX locks are what NFS (through its lock manager) and Lustre (mounted with `flock`) offer between hosts;
    on a filesystem without them the lease falls back to unguarded writes, with a warning. A mount that keeps
    locks per node (NFS `nolock`, Lustre `localflock`) cannot be told apart from here: it separates the
    processes of one node only. POSIX locks belong to a process, so threads of one process are kept apart by a
    lock of their own."""
    with _THREAD_GUARDS_LOCK:
        thread_guard = _THREAD_GUARDS.setdefault(str(run.guard), threading.Lock())
    with thread_guard:
        yield from _locked_guard(run, timeout_s)


def _locked_guard(run: RunDir, timeout_s: float):
    fd = os.open(run.guard, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    if not _NO_FLOCK_WARNED:
                        _NO_FLOCK_WARNED.append(True)
                        warn(f"{run.guard}: this filesystem has no POSIX locks ({e.strerror}); two launches racing "
                             f"for one run may both start")
                    break
                if e.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    raise RunLocked(f"could not lock {run.guard} within {timeout_s:g} s ({e.strerror})") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


class Lease:
    """The run's lease (lock.json), so that one process at a time trains a run.

    Taking it: under the guard lock, read lock.json; a live holder refuses (RunLocked), a stale, corrupt or
    absent lease is replaced by ours with an atomic write, so exactly one of any number of racing launches wins
    and lock.json is always a whole file. The lease records host, pid and the pid's start time (a reused pid is
    not the holder), a heartbeat refreshed by a thread every `beat_s` (whatever the training loop is doing: an
    eval, a checkpoint), a generation number and a random token. `check()` before each save, and the heartbeat,
    verify that lock.json still holds our token: a holder that was suspended past `stale_s` and lost its lease
    stops instead of writing (LeaseLost). With `step` set, the heartbeat also writes status.json "running" at
    that step, so the status never lags the run by more than a beat.
    """

    def __init__(self, run: RunDir, stale_s: float = LEASE_STALE_S, beat_s: float | None = None):
        self.run, self.stale_s = run, stale_s
        self.beat_s = beat_s if beat_s is not None else min(30.0, stale_s / 10)
        self.info: dict | None = None
        self.lost = False
        self.step: int | None = None            # set by the trainer: the heartbeat writes it to status.json
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lease":
        self.run.path.mkdir(parents=True, exist_ok=True)
        with self._mutex, _guarded(self.run):
            try:
                current, problem = read_lease(self.run, strict=True)
            except OSError as e:  # a failed read is not a stale lease: do not take it over
                raise RunLocked(f"cannot read the lease {self.run.lock} ({e.strerror}); not starting") from None
            if current is not None and not lease_is_stale(current, self.stale_s):
                raise RunLocked(f"run {self.run.run_id} is being trained by pid {current.get('pid')} on "
                                f"{current.get('host')} (lease {self.run.lock}); not starting a second copy")
            if problem:
                warn(f"{problem}; treated as a stale lease and taken over")
            generation = current.get("generation", 0) if current else 0
            self.info = {"host": HOST, "pid": os.getpid(), "start": process_start(os.getpid()),
                         "heartbeat": time.time(), "token": uuid.uuid4().hex,
                         "generation": (generation if isinstance(generation, int) else 0) + 1,
                         "slurm_job_id": slurm_job_label()}
            write_json(self.run.lock, self.info)
        return self

    def holder(self) -> dict | None:
        """lock.json's lease; an I/O error is raised (a failed read says nothing about who holds it)."""
        return read_lease(self.run, strict=True)[0]

    def owns(self) -> bool:
        try:
            current = self.holder()
        except OSError:
            return not self.lost  # unknown: trust what the last successful read said
        return bool(current) and current.get("token") == self.info["token"] and not self.lost

    def check(self) -> None:
        """Raise LeaseLost unless lock.json still holds this lease (an I/O error is raised as it is)."""
        current = self.holder()
        if self.lost or not current or current.get("token") != self.info["token"]:
            self.lost = True
            who = (f"pid {current.get('pid')} on {current.get('host')} (token {current.get('token')}, generation "
                   f"{current.get('generation')})") if current else "nobody (lock.json is gone or unreadable)"
            raise LeaseLost(f"the lease {self.run.lock} of generation {self.info['generation']} is now held by {who};"
                            f" this process stops without writing")

    def beat(self) -> None:
        """Refresh the heartbeat (and status.json's step), or notice that the lease was lost."""
        with self._mutex, _guarded(self.run):
            try:
                self.check()
            except LeaseLost:
                return
            self.info["heartbeat"] = time.time()
            write_json(self.run.lock, self.info)
            if self.step is not None:
                write_status(self.run, "running", self.step)

    def set_step(self, step: int) -> None:
        """status.json "running" at `step` now (at a checkpoint), and at every later heartbeat."""
        with self._mutex:
            self.step = step
            write_status(self.run, "running", step)

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.beat_s) and not self.lost:
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a full disk or a slow filesystem: try again next beat
                warn(f"heartbeat of {self.run.lock} failed: {type(e).__name__}: {e}")

    def start(self) -> "Lease":
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_forever, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread (before a final status is written, so no beat overwrites it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.step = None

    def write_final_status(self, state: str, step: int, **extra) -> bool:
        """Stop the heartbeat, then write a final status.json if this process still holds the lease (a holder that
        lost it must not overwrite the new holder's status); whether it was written."""
        self.stop_heartbeat()
        with self._mutex, _guarded(self.run):
            if not self.owns():
                warn(f"{self.run.status}: not written ({state}): this process no longer holds {self.run.lock}")
                return False
            write_status(self.run, state, step, **extra)
            return True

    def release(self) -> None:
        """Give the lease back (never raising: a failed release must not hide how the run ended; a lease left
        behind is stale once this process is gone)."""
        self.stop_heartbeat()
        if self.info is None:
            return
        try:
            with self._mutex, _guarded(self.run):
                if self.owns():
                    self.run.lock.unlink()
        except (OSError, RunLocked) as e:
            warn(f"could not release {self.run.lock}: {e}")

    @contextmanager
    def hold(self):
        """Acquire, beat while the block runs, release."""
        self.acquire().start()
        try:
            yield self
        finally:
            self.release()


def acquire_lease(run: RunDir, stale_s: float = LEASE_STALE_S) -> Lease:
    """The run's lease, taken (no heartbeat thread: `Lease(...).hold()` runs one)."""
    return Lease(run, stale_s).acquire()
