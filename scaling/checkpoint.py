"""Checkpoints: plain dicts, written atomically, loaded with `torch.load(weights_only=True)`.

    checkpoints/step_<N>.pt   {"model", "ema", "opt", "step", "img_seen", "rng", "data", "config"}
    checkpoints/latest.json   {"step": N, "file": "step_<N>.pt"}   (a sidecar, also written atomically)

Resume = run the same command again: the newest readable, finite checkpoint is loaded and training continues.
"""

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from scaling.config import build_model_for, config_from_dict
from scaling.rundir import RunDir, read_json, temp_tag, write_json

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run: RunDir, step: int) -> Path:
    return run.checkpoints / f"step_{step:07d}.pt"


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space; the earlier checkpoints are intact."""


def free_bytes(path) -> int:
    return shutil.disk_usage(path).free


def save_checkpoint(run: RunDir, state: dict) -> Path:
    """Write `state` to checkpoints/step_<N>.pt via a temporary file and a rename, then point latest at it.

    A write that fails for lack of space (ENOSPC, or torch's "file write failed" with less free space left than
    the previous checkpoint's size) raises DiskFull with one line naming the folder, the step and the newest
    intact checkpoint; the temporary file is removed either way."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    path = checkpoint_path(run, step)
    fd, tmp = tempfile.mkstemp(dir=run.checkpoints, prefix=f".tmp_{temp_tag()}_", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)) and _out_of_space(e, run):
            intact = [s for s in list_steps(run) if s < step]
            raise DiskFull(f"no space left on {run.checkpoints} while writing step {step}; " + (
                f"the checkpoint of step {intact[-1]} is intact" if intact else "no earlier checkpoint exists")) \
                from None
        raise
    write_json(run.checkpoints / "latest.json", {"step": step, "file": path.name})
    return path


def _out_of_space(error: BaseException, run: RunDir) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    previous = [checkpoint_path(run, s) for s in list_steps(run)]
    needed = max((p.stat().st_size for p in previous if p.exists()), default=1 << 20)
    return free_bytes(run.checkpoints) < needed


def non_finite(state: dict, parts=("model", "ema")) -> list[str]:
    """Names of the floating-point tensors of `state[part]` holding NaN or inf ('model.blocks.0.attn.qkv.weight')."""
    return [f"{part}.{k}" for part in parts for k, v in (state.get(part) or {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def list_steps(run_dir) -> list[int]:
    """Steps of the checkpoints present, ascending (temporary files of an interrupted save are ignored)."""
    ckpt_dir = RunDir(run_dir).checkpoints if not isinstance(run_dir, RunDir) else run_dir.checkpoints
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name)))


def load_checkpoint(path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run: RunDir, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads and is finite; an unreadable one (disk full, killed mid-copy) or one
    holding NaN/inf weights (written by an older version) is skipped with a note."""
    for step in reversed(list_steps(run)):
        path = checkpoint_path(run, step)
        try:
            ckpt = load_checkpoint(path, map_location)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            print(f"[checkpoint] skipping unreadable {path}: {type(e).__name__}: {e}", flush=True)
            continue
        if bad := non_finite(ckpt):
            print(f"[checkpoint] skipping {path}: {len(bad)} non-finite tensors (first {bad[0]})", flush=True)
            continue
        return ckpt
    return None


def load_model(run_dir, step: int | None = None, which: str = "ema"):
    """(model in eval mode with the `which` weights, RunConfig, plan dict) for a run's checkpoint.

    `step=None` takes the newest checkpoint. Evaluation uses the EMA weights (paper section 4).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    steps = list_steps(run)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {run.checkpoints}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {run.checkpoints}; present: {steps}")
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r}; allowed: 'ema', 'model'")
    ckpt = load_checkpoint(checkpoint_path(run, step))
    cfg = config_from_dict(ckpt["config"])
    plan = read_json(run.plan)
    model = build_model_for(cfg, plan)
    model.load_state_dict(ckpt[which])
    return model.eval(), cfg, plan
