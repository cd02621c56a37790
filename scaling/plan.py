"""The dry run's plan: per grid point its parameters, Gflops, tokens, horizon, training FLOPs, GPU-hours of training
and of its scheduled evaluations, disk, and (on SLURM) the wall time of its job against the time limit, with its
state (read from its run directory), and the totals still to do. Closed-form Gflops: no model is built.
"""

import math

from scaling.config import RunConfig, make_plan
from scaling.evaluate import eval_steps, setting_key
from scaling.jobs import Point

# GPU-hours: model flops = 2 x multiply-adds, on an H100 SXM (989 dense bf16 TFLOP/s, NVIDIA datasheet) at an
# assumed 40% model-flops utilisation. An estimate for planning, stated wherever it is printed.
ASSUMED_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
CHECKPOINT_BYTES_PER_PARAM = 16  # fp32 weights, EMA weights and AdamW's two moments


def gpu_hours(flops: float) -> float:
    """Hours of one GPU for `flops` (multiply-adds counted once, as Gflops are), at the stated assumption."""
    return 2 * flops / (ASSUMED_PEAK_FLOPS * ASSUMED_MFU) / 3600


def checkpoint_steps(steps: int, ckpt_every: int) -> list[int]:
    return sorted({*range(ckpt_every, steps + 1, ckpt_every), steps})


def eval_cost(cfg: RunConfig, gflops_per_img: float) -> dict:
    """The scheduled evaluations of a run: how many, their sampling FLOPs (num_samples x sampling steps DiT
    forwards, two per step with guidance; VAE decoding and the feature network add a few percent, not counted)
    and the bytes of their samples' .npz (uint8 images)."""
    ec, tc = cfg.eval, cfg.train
    n = len(eval_steps(checkpoint_steps(tc.steps, tc.ckpt_every), tc.ckpt_every, ec.every_ckpt, tc.steps))
    forwards = ec.num_samples * ec.sampling_steps * (2 if ec.cfg_scale > 1 else 1)
    npz = ec.num_samples * cfg.data.image_size ** 2 * 3 if ec.export_npz else 0
    return {"evals": n, "eval_flops": n * forwards * gflops_per_img * 1e9, "npz_bytes": n * npz}


def plan_rows(points: list[Point], launcher: dict | None = None) -> list[dict]:
    """The plan of each point (closed-form Gflops: no model is built) with its GPU-hours of training and of its
    evals, its disk, its state, and with a SLURM launcher's settings the wall time of its job (the GPUs of one job
    at the stated utilisation) and how many requeues its time limit implies."""
    rows = []
    for p in points:
        plan = make_plan(p.cfg, count="closed_form")
        ev = eval_cost(p.cfg, plan["gflops_per_img"])
        ckpts = len(checkpoint_steps(p.cfg.train.steps, p.cfg.train.ckpt_every))
        row = {**plan, **ev, "gpu_hours": gpu_hours(plan["train_flops"]), "eval_gpu_hours": gpu_hours(ev["eval_flops"]),
               "disk_bytes": ckpts * plan["params"] * CHECKPOINT_BYTES_PER_PARAM + ev["npz_bytes"],
               "state": p.state, "eval": setting_key(p.cfg.eval)}
        if launcher and launcher.get("timeout_min"):
            gpus = max(1, (launcher.get("gpus_per_node") or 0) * (launcher.get("nodes") or 1))
            inline = row["eval_gpu_hours"] if p.cfg.eval.inline else 0.0
            row["job_hours"] = (row["gpu_hours"] + inline) / gpus
            row["requeues"] = max(0, math.ceil(row["job_hours"] * 60 / launcher["timeout_min"]) - 1)
        rows.append(row)
    return rows


def size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes / 1e3:.3g} kB"


def format_plan(rows: list[dict]) -> str:
    with_eval = len({r["eval"] for r in rows}) > 1  # e.g. the sampling study: one run, several eval settings
    with_job = all("job_hours" in r for r in rows)
    head = ("run_id", "params", "Gflops", "tokens", "batch x steps", "train_flops", "GPU-h", "evals", "eval GPU-h",
            "disk") + (("job h", "requeues") if with_job else ()) + ("state",) + (("eval",) if with_eval else ())
    body = [(r["run_id"], f"{r['params'] / 1e6:.2f}M", f"{r['gflops_per_img']:.4g}", str(r["tokens"]),
             f"{r['batch_img']} x {r['steps']}", f"{r['train_flops']:.3g}", f"{r['gpu_hours']:.3g}", str(r["evals"]),
             f"{r['eval_gpu_hours']:.3g}", size(r["disk_bytes"]))
            + ((f"{r['job_hours']:.3g}", str(r["requeues"])) if with_job else ()) + (r["state"],)
            + ((r["eval"],) if with_eval else ()) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    left = {0, len(head) - 1} if with_eval else {0}
    line = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    runs = {r["run_id"]: r for r in rows}  # a run shared by several points is trained once
    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    to_go = sum(r["gpu_hours"] for r in runs.values() if r["state"] in ("new", "partial", "failed", "preempted"))
    evals = sum(r["eval_gpu_hours"] for r in rows if r["state"] != "done")
    disk = sum(r["disk_bytes"] for r in runs.values()) + sum(r["npz_bytes"] for r in rows) - \
        sum(r["npz_bytes"] for r in runs.values())  # checkpoints once per run, samples once per eval setting
    lines = [line(head), *map(line, body),
             f"{len(rows)} points, {len(runs)} runs ({', '.join(f'{n} {s}' for s, n in states.items())});"
             f" {to_go:.3g} GPU-hours of training to go (runs not trained yet, in full) and {evals:.3g} of evaluation"
             f" (the scheduled evals of points not done); {size(disk)} of disk (every checkpoint with its optimizer"
             f" state, {CHECKPOINT_BYTES_PER_PARAM} bytes per parameter, and the samples' .npz). Assuming"
             f" {ASSUMED_MFU:.0%} of an H100's {ASSUMED_PEAK_FLOPS / 1e12:.0f} dense bf16 TFLOP/s and 2 flops per"
             f" multiply-add; train_flops = Gflops x batch x steps x 3 (paper Fig. 9); an eval = num_samples x"
             f" sampling steps DiT forwards (x2 with guidance), VAE decoding and features not counted."]
    if with_job:
        long = [r for r in rows if r["requeues"]]
        lines.append(f"SLURM: job h = the GPU-hours of training (and of inline evals) over the GPUs of one job; "
                     + (f"{len(long)} jobs exceed hydra.launcher.timeout_min and will be requeued (up to "
                        f"{max(r['requeues'] for r in long)} times; each resumes from its checkpoint)" if long else
                        "every job fits in hydra.launcher.timeout_min"))
    return "\n".join(lines)
