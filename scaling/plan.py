"""The dry run's plan: per grid point its parameters, Gflops, tokens, horizon, training FLOPs, GPU-hours and state
(read from its run directory), and the totals still to do. Closed-form Gflops: no model is built.
"""

from scaling.config import make_plan
from scaling.evaluate import setting_key
from scaling.jobs import Point

# GPU-hours: model flops = 2 x multiply-adds, on an H100 SXM (989 dense bf16 TFLOP/s, NVIDIA datasheet) at an
# assumed 40% model-flops utilisation. An estimate for planning, stated wherever it is printed.
ASSUMED_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40


def plan_rows(points: list[Point]) -> list[dict]:
    """The plan of each point (closed-form Gflops: no model is built) with its GPU-hours and state."""

    rows = []
    for p in points:
        plan = make_plan(p.cfg, count="closed_form")
        gpu_hours = 2 * plan["train_flops"] / (ASSUMED_PEAK_FLOPS * ASSUMED_MFU) / 3600
        rows.append({**plan, "gpu_hours": gpu_hours, "state": p.state, "eval": setting_key(p.cfg.eval)})
    return rows


def format_plan(rows: list[dict]) -> str:
    with_eval = len({r["eval"] for r in rows}) > 1  # e.g. the sampling study: one run, several eval settings
    head = ("run_id", "params", "Gflops", "tokens", "batch x steps", "train_flops", "GPU-h", "state") + \
        (("eval",) if with_eval else ())
    body = [(r["run_id"], f"{r['params'] / 1e6:.2f}M", f"{r['gflops_per_img']:.4g}", str(r["tokens"]),
             f"{r['batch_img']} x {r['steps']}", f"{r['train_flops']:.3g}", f"{r['gpu_hours']:.3g}", r["state"])
            + ((r["eval"],) if with_eval else ()) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    runs = {r["run_id"]: r for r in rows}  # a run shared by several points is trained once
    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    to_go = sum(r["gpu_hours"] for r in runs.values() if r["state"] in ("new", "partial", "failed", "preempted"))
    return "\n".join([line(head), *map(line, body),
                      f"{len(rows)} points, {len(runs)} runs ({', '.join(f'{n} {s}' for s, n in states.items())});"
                      f" {to_go:.3g} GPU-hours of training to go (runs not trained yet, in full; evals not included)"
                      f", assuming {ASSUMED_MFU:.0%} of an H100's {ASSUMED_PEAK_FLOPS / 1e12:.0f} dense bf16 TFLOP/s"
                      f" and 2 flops per multiply-add. train_flops = Gflops x batch x steps x 3 (paper Fig. 9)."])
