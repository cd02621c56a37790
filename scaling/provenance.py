"""What a run was launched with: the git commit of the code, the command line, the versions of the libraries that
change numbers, and the machine (GPU model, host, SLURM job). One row per job start in the run directory's
launches.jsonl, and the same record in each launch's launch.json (<output_root>/launches/<time>/).
"""

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from scaling.rundir import RunDir, append_jsonl, slurm_job_label

PACKAGES = ("dit-scaling", "torch", "hydra-core", "omegaconf", "submitit", "hydra-submitit-launcher", "torch-fidelity",
            "numpy", "wandb", "matplotlib", "pandas")
SOURCE = Path(__file__).resolve().parent.parent  # the checkout (editable install) or site-packages (a wheel)


def git_commit(where: Path = SOURCE) -> dict:
    """{commit, dirty} of the checkout the code runs from, or {commit: None} when it is not one (a wheel)."""
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return {"commit": None}
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def versions() -> dict:
    """Installed versions of the packages that matter, Python's, and CUDA's as torch was built with."""
    out = {"python": platform.python_version(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"host": socket.gethostname(), "gpus": gpus, "slurm_job": slurm_job_label()}


def launch_record(argv: list[str] | None = None) -> dict:
    """Everything above for this process, with the command line it was started with."""
    return {"time": time.time(), "argv": list(sys.argv if argv is None else argv), "git": git_commit(),
            "versions": versions(), **machine()}


def record_launch(run: RunDir, hydra_dir: str | None) -> dict:
    """Append this job's launch record to the run's launches.jsonl, with the Hydra folder of the launch that
    started it (its .hydra/ holds the composed config and the overrides)."""
    row = {**launch_record(), "hydra_dir": hydra_dir}
    append_jsonl(run.launches, row)
    return row
