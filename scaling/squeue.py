"""What SLURM says about jobs, read-only: one `squeue` call for many jobs, `scontrol` for one (a cluster without
accounting has no sacct). Light on purpose: scaling.status uses it from a login node.
"""

import re
import shutil
import subprocess

SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
SLURM_LIVE = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED",
              "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}


def have_slurm() -> bool:
    return shutil.which("squeue") is not None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """JobState of several jobs in one squeue call ("GONE" for those SLURM no longer lists); array tasks as 32_1,
    one line each (`-r`: a pending array is otherwise listed once as 32_[0-3])."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode:  # squeue refuses the whole list when one id is unknown to it: one query each
        return {j: slurm_state(j) for j in job_ids}
    listed = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)
    return {j: listed.get(j, "GONE") for j in job_ids}


def slurm_state(job_id: str) -> str:
    """The job's JobState from scontrol; "GONE" once SLURM has forgotten it (MinJobAge after its end)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode and "Invalid job id" in out.stderr:
        return "GONE"
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m[1] if m else "UNKNOWN"
