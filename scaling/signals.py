"""Stop signals, recorded from the first moment of a job and acted on at the next step boundary.

SLURM sends SIGUSR2 before a time limit or a preemption and SIGTERM on scancel; a person types Ctrl-C (SIGINT);
the local pool forwards SIGTERM. The training loop saves a checkpoint, marks the run preempted and returns.
The handlers are installed by the launcher before any slow import (torch, Hydra), so a signal that arrives while
the job is still starting is not lost: the loop sees it before its first step. A second Ctrl-C interrupts at once.

This module imports nothing heavy on purpose: `python -m scaling.launch` installs it first.
"""

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records the first stop signal; `previous` keeps the handlers that were there before (submitit's, under
    SLURM: the loop calls it after saving, and it requeues the job)."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # Ctrl-C after any stop signal: stop now, without waiting for the step to end
        if self.signal is None:
            self.signal = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; a job run from a thread keeps its parent's
        for s in SIGNALS:
            self.previous[s] = signal.signal(s, self._record)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requeue_handler(self):
        """The handler to call after saving, or None: one installed before ours for the signal received (submitit's
        requeue under SLURM); never for Ctrl-C, and never Python's defaults."""
        previous = self.previous.get(self.signal)
        if self.signal == signal.SIGINT or not callable(previous) or previous is signal.default_int_handler:
            return None
        return previous

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


_ACTIVE: list[StopSignals] = []

# Held while a thread alters os.environ (an eval job submitted from a training job, without the job's SLURM_*):
# the training loop takes it before handing a stop signal to submitit's requeue handler, which reads them.
ENVIRONMENT = threading.Lock()


def install_early() -> StopSignals:
    """Install the process's StopSignals now, for the rest of the process (`python -m scaling.launch` calls it
    before its slow imports); later `stop_signals()` entries share it."""
    if not _ACTIVE:
        stop = StopSignals()
        stop.install()
        _ACTIVE.append(stop)
    return _ACTIVE[-1]


def active() -> StopSignals | None:
    """The process's StopSignals, if installed (the launcher hands Ctrl-C and SIGTERM back to itself before it
    starts a pool of jobs, which it then stops cleanly)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def stop_signals():
    """The process's StopSignals: installed on first entry (and restored on its exit), shared by nested entries,
    so that the launcher's early install and the training loop see the same record."""
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    stop = StopSignals()
    stop.install()
    _ACTIVE.append(stop)
    try:
        yield stop
    finally:
        _ACTIVE.pop()
        stop.restore()
