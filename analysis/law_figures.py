"""Figures of the laws that forecast (analysis.laws, analysis.forecasts), each PNG + PDF + the CSV it plots.

    python -m analysis.law_figures results.csv -o figures/ [--loss val_mse_ema] [--fd fd]

One function per figure: loss curves, the compute envelope with its fit, isoFLOP profiles with their minima,
N_opt(C), predicted vs measured for the held-out checks, FD vs loss. The loss is a held-out diffusion loss of
the results table (scaling.valloss: `val_mse_ema` by default); model size is Gflops per image (analysis.laws).
A figure without data raises NoData; the CLI prints why and goes on, and writes laws.json beside the figures.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import (FigureOutput, NoData, _label_of, _new_figure, _runs_in_order, _style, draw_frontier,
                              draw_seed_band, legend_entries, log_axis, save)
from analysis.fits import _finite, bootstrap_frontier, frontier, predict, scaling_checks
from analysis.forecasts import Forecast, forecast_curve_end, forecast_fd, forecast_largest
from analysis.laws import bootstrap_joint_law, fd_metric, fit_fd_vs_loss, isoflop_profiles, one_row_per_step
from scaling.results import read_table, seed_means

LOSS_COL = "val_mse_ema"
# The loss law of the held-out forecasts: params and tokens as separate axes (analysis.laws.AxesLaw) where the
# table has both, fitted on the second half of each fitted run (the regime of the final values forecast);
# laws.json also keeps the Gflops law L(N, D) and the error at other fit_from values.
FORECAST_LAW = {"law": "axes", "fit_from": 0.5}
FIT_FROM_SCAN = (0.0, 0.25, 0.5, 0.75)
LOSS_LABEL = {"val_mse_ema": "held-out L_simple (eps MSE, EMA)", "val_mse_raw": "held-out L_simple (eps MSE, raw)"}


def _loss_rows(df: pd.DataFrame, loss_col: str) -> pd.DataFrame:
    if loss_col not in df.columns:
        raise NoData(f"the table has no {loss_col!r} column (runs trained without the held-out loss)")
    d = _finite(df, loss_col, "train_flops", "img_seen", "gflops_per_img")
    d = d[d["img_seen"] > 0]
    if d["run_id"].nunique() < 3:
        raise NoData(f"{loss_col}: fewer than 3 runs have held-out loss values")
    return d.drop_duplicates(["run_id", "img_seen"], keep="last")


def _legend_outside(fig) -> None:
    """Every labelled artist of the axes in one figure legend right of them (drawn in full, never clipped)."""
    fig.legend(*legend_entries(fig.axes[0]), loc="outside right center", fontsize=7.5, frameon=False)


def _per_run_curves(ax, d: pd.DataFrame, x_col: str, y_col: str, rows: list, kind: str = "curve") -> None:
    for run, g in _runs_in_order(d):
        g = g.sort_values(x_col)
        p = g.iloc[0]
        label = _label_of(g)
        style = _style(p["model"], p["patch"])
        ax.plot(g[x_col], g[y_col], label=label, gid=run, lw=1.3, ms=2.5, alpha=0.9, **style)
        rows += [{"kind": kind, "label": label, "run_id": run, x_col: x, y_col: y} for x, y in zip(g[x_col], g[y_col])]
        draw_seed_band(ax, g, x_col, y_col, style["color"], rows)


def loss_curves(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, name: str = "loss_curves") -> FigureOutput:
    """Held-out loss vs images seen, one curve per run (colour = size, line = patch), log-log."""
    d = _loss_rows(df, loss_col)
    fig, ax = _new_figure(7.5, 4.6)
    rows = []
    _per_run_curves(ax, d, "img_seen", loss_col, rows)
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Training images seen")
    ax.set_ylabel(LOSS_LABEL.get(loss_col, loss_col))
    ax.set_title("Held-out loss over training")
    _legend_outside(fig)
    return save(FigureOutput(name, fig, pd.DataFrame(rows)), out_dir)


def compute_envelope(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, n_boot: int = 300, seed: int = 0,
                     name: str = "loss_envelope") -> FigureOutput:
    """Every run's loss vs training compute, the envelope (lowest loss at each compute) and its fit
    E + A C^-alpha with the bootstrap band over runs."""
    d = _loss_rows(df, loss_col)
    fig, ax = _new_figure(7.5, 4.6)
    rows = []
    _per_run_curves(ax, d, "train_flops", loss_col, rows)
    front = frontier(d, "train_flops", loss_col)
    fitted = front["contested"]  # the points the fit takes (analysis.fits.contested_range)
    draw_frontier(ax, front, loss_col, "envelope", "envelope (lowest loss so far), fitted",
                  "envelope where one run alone reaches the compute (not fitted)", ms=5, mew=0.8)
    rows += [{"kind": "envelope" if f else "envelope_one_run", "label": "envelope", "run_id": r, "train_flops": c,
              loss_col: y} for r, c, y, f in zip(front["run_id"], front["train_flops"], front[loss_col], fitted)]
    x_pred = np.geomspace(front["train_flops"].min(), d["train_flops"].max() * 4, 60)
    boot = bootstrap_frontier(d, "train_flops", loss_col, n_boot=n_boot, seed=seed, floor=True, x_pred=x_pred)
    f, (lo, hi) = boot.fit, boot.ci["alpha"]
    floor = f"E = {f.E:.4g}" if f.E > 1e-6 * front[loss_col].min() else "E at its bound 0 (no floor identified)"
    ax.fill_between(boot.pred["x"], boot.pred["y_lo"], boot.pred["y_hi"], color="0.5", alpha=0.2, lw=0, gid="band",
                    label=f"{boot.level:.0%} band ({boot.n_boot} resamples of runs)")
    ax.plot(boot.pred["x"], boot.pred["y"], color="black", ls=(0, (5, 2)), lw=1.2, gid="envelope_fit",
            label=rf"E + A C$^{{-\alpha}}$: {floor}, $\alpha$ = {f.alpha:.3f} [{lo:.3f}, {hi:.3f}]")
    rows += [{"kind": "fit", "label": "fit", "run_id": None, "train_flops": x, loss_col: y, "lo": a, "hi": b}
             for x, y, a, b in boot.pred[["x", "y", "y_lo", "y_hi"]].itertuples(index=False)]
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Training compute (FLOPs = Gflops/img x 1e9 x images x 3)")
    ax.set_ylabel(LOSS_LABEL.get(loss_col, loss_col))
    ax.set_title("Compute envelope of the held-out loss")
    _legend_outside(fig)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits={"envelope": boot.to_dict()}), out_dir)


def isoflop_figure(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, budgets=None, n_boot: int = 200,
                   seed: int = 0, name: str = "isoflop_profiles") -> FigureOutput:
    """Per budget: loss vs model size (each run read at the budget), the parabola fitted around the best size
    (analysis.laws.parabola_optimum) over the sizes it was fitted to, and its minimum."""
    d = _loss_rows(df, loss_col)
    try:
        iso = isoflop_profiles(d, loss_col, budgets=budgets, n_boot=n_boot, seed=seed)
    except ValueError as e:
        raise NoData(str(e)) from None
    fig, ax = _new_figure(7.0, 4.6)
    colors = [f"C{i}" for i in range(10)]
    rows = []
    for i, (b, p) in enumerate(iso.profiles.groupby("budget", sort=True)):
        c = colors[i % 10]
        ax.plot(p[iso.size_col], p[loss_col], ls="none", marker="o", ms=4, color=c, gid=f"profile_{i}",
                label=f"C = {b:.2g} FLOPs")
        rows += [{"kind": "profile", "budget": b, "run_id": r, "size": s, loss_col: y}
                 for r, s, y in p[["run_id", iso.size_col, loss_col]].itertuples(index=False)]
        o = iso.optima[iso.optima["budget"] == b]
        if o.empty:
            continue
        o = o.iloc[0]
        xs = np.geomspace(o["fit_lo"], o["fit_hi"], 50)  # over the sizes it was fitted to
        ys = np.polyval([o["c2"], o["c1"], o["c0"]], np.log(xs))
        ax.plot(xs, ys, color=c, lw=1.0, alpha=0.8, gid=f"parabola_{i}")
        ax.plot([o["n_opt"]], [o["loss_opt"]], marker="*" if o["interior"] else "x", ms=11, color=c, mec="black",
                ls="none", gid=f"optimum_{i}")
        rows += [{"kind": "parabola", "budget": b, "run_id": None, "size": x, loss_col: y} for x, y in zip(xs, ys)]
        rows.append({"kind": "optimum" if o["interior"] else "edge_optimum", "budget": b, "run_id": None,
                     "size": o["n_opt"], loss_col: o["loss_opt"]})
    if iso.optima["interior"].any():  # legend entries only for what is drawn
        ax.plot([], [], marker="*", ls="none", color="0.3", mec="black", ms=11, label="interior minimum")
    if (~iso.optima["interior"]).any():
        ax.plot([], [], marker="x", ls="none", color="0.3", ms=9, label="no interior minimum (measured best)")
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Model size (Gflops per image)")
    ax.set_ylabel(LOSS_LABEL.get(loss_col, loss_col))
    ax.set_title("IsoFLOP profiles (parabola in log size around each budget's best)")
    _legend_outside(fig)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits={"isoflop": iso.to_dict()}), out_dir)


def n_opt_figure(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, budgets=None, n_boot: int = 200,
                 seed: int = 0, name: str = "n_opt_vs_compute") -> FigureOutput:
    """Compute-optimal size vs budget: isoFLOP optima (approach 2) with intervals and their power law, and the
    joint law's N_opt(C) (approach 3) with its exponent's interval."""
    d = _loss_rows(df, loss_col)
    try:
        iso = isoflop_profiles(d, loss_col, budgets=budgets, n_boot=n_boot, seed=seed)
        joint = bootstrap_joint_law(d, loss_col, n_boot=max(n_boot // 2, 10), seed=seed)
    except ValueError as e:
        raise NoData(str(e)) from None
    fig, ax = _new_figure(7.0, 4.6)
    o = iso.optima
    inner = o[o["interior"]]
    if not inner.empty:  # a legend entry only for what is drawn
        # the intervals as drawn lines of their own: a percentile interval over resampled runs need not contain
        # the optimum of all runs (a resample without the best size moves the parabola's window)
        ax.vlines(inner["budget"], inner["n_lo"], inner["n_hi"], color="C0", lw=1.2, gid="isoflop_intervals")
        for end in ("n_lo", "n_hi"):
            ax.plot(inner["budget"], inner[end], ls="none", marker="_", ms=8, color="C0")
        ax.plot(inner["budget"], inner["n_opt"], ls="none", marker="o", color="C0", gid="isoflop_optima",
                label=f"isoFLOP optimum ({iso.level:.0%} interval over runs)")
    edge = o[~o["interior"]]
    if not edge.empty:
        ax.plot(edge["budget"], edge["n_opt"], ls="none", marker="x", color="C0", gid="edge_optima",
                label="no interior minimum (measured best, not fitted)")
    cs = np.geomspace(o["budget"].min() / 3, o["budget"].max() * 10, 50)
    rows = [{"kind": "optimum" if r.interior else "edge_optimum", "train_flops": r.budget, "n_opt": r.n_opt,
             "n_lo": r.n_lo, "n_hi": r.n_hi} for r in o.itertuples(index=False)]
    if iso.fit is not None:
        lo, hi = iso.exponent_ci
        y = predict(iso.fit, cs)
        ax.plot(cs, y, color="C0", lw=1.2, gid="isoflop_law",
                label=rf"approach 2: N$_{{opt}}$ $\propto$ C$^{{{iso.exponent:.2f}}}$ [{lo:.2f}, {hi:.2f}]")
        rows += [{"kind": "approach2", "train_flops": c, "n_opt": v} for c, v in zip(cs, y)]
    law, (lo, hi) = joint.law, joint.ci["n_opt_exponent"]
    y3 = law.n_opt(cs)
    ax.plot(cs, y3, color="C3", ls="--", lw=1.2, gid="joint_law",
            label=rf"approach 3 (joint law): N$_{{opt}}$ $\propto$ C$^{{{law.n_opt_exponent:.2f}}}$ [{lo:.2f}, {hi:.2f}]")
    rows += [{"kind": "approach3", "train_flops": c, "n_opt": v} for c, v in zip(cs, y3)]
    sizes = d.groupby("run_id")["gflops_per_img"].first()
    ax.axhspan(sizes.min(), sizes.max(), color="0.85", alpha=0.4, lw=0, gid="grid_span", label="sizes trained")
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Training compute C (FLOPs)")
    ax.set_ylabel("Compute-optimal size (Gflops per image)")
    ax.set_title("Compute-optimal model size")
    _legend_outside(fig)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits={"isoflop": iso.to_dict(),
                                                                   "joint_law": joint.to_dict()}), out_dir)


CHECK_LABELS = {"forecast_largest": "largest models from the smallest", "forecast_fd": "FD through FD(loss)",
                "forecast_curve_end": "curve end from its first half"}


def predicted_vs_measured(forecasts: list[Forecast], out_dir, name: str = "predicted_vs_measured") -> FigureOutput:
    """Held-out points: predicted vs measured, the law (filled) against its naive baseline (open), one panel
    per check, with the median absolute errors in the panel titles."""
    if not forecasts:
        raise NoData("no held-out check could be run")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(forecasts) + 1.5, 4.2), layout="constrained")
    rows = []
    for i, fc in enumerate(forecasts):
        ax = fig.add_subplot(1, len(forecasts), i + 1)
        t, s = fc.table, fc.summary()
        lim = [min(t[["y_true", "y_pred", "y_naive"]].min()) / 1.1, max(t[["y_true", "y_pred", "y_naive"]].max()) * 1.1]
        ax.plot(lim, lim, color="0.5", lw=0.8, gid=f"identity_{i}", label="predicted = measured" if i == 0 else None)
        ax.plot(t["y_true"], t["y_pred"], ls="none", marker="o", color="C3", gid=f"law_{i}",
                label="law" if i == 0 else None)
        ax.plot(t["y_true"], t["y_naive"], ls="none", marker="o", mfc="none", color="0.3", gid=f"naive_{i}",
                label="naive baseline" if i == 0 else None)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        log_axis(ax.xaxis)
        log_axis(ax.yaxis)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(f"measured {fc.y_col}")
        ax.set_ylabel(f"predicted {fc.y_col}")
        check = CHECK_LABELS.get(fc.check, fc.check)
        if fc.law.get("law") == "axes":  # the largest-model check
            check += f"\nlaw in {', '.join(fc.law['terms'])}, from {fc.law['fit_from']:.0%} of each curve"
        if fc.check == "forecast_fd":
            check = check.replace("FD", fc.y_col.split("_")[0].upper().replace("FD", "FD-"), 1)
        ax.set_title(f"{check}\nmedian |err| {s['median_abs_rel_error']:.1%} "
                     f"vs naive {s['naive_median_abs_rel_error']:.1%}", fontsize=9)
        rows += [{"check": fc.check, "y_col": fc.y_col, **r} for r in t.to_dict("records")]
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fits = {}
    for f in forecasts:  # two FD forecasts (FD-250 and FD-500) are keyed by their columns
        fits[f.check if f.check not in fits else f"{f.check}[{f.y_col}]"] = f.summary()
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits=fits),
                out_dir)


def fd_vs_loss(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, fd_col: str = "fd", fit_runs=None,
               name: str = "fd_vs_loss") -> FigureOutput:
    """FD against held-out loss at the evaluated checkpoints, the law FD = A L^k fitted on `fit_runs` (default:
    every run) and drawn over all of them."""
    d = _loss_rows(df, loss_col)
    d = _finite(d, fd_col) if fd_col in d.columns else d.iloc[:0]
    if d.empty:
        raise NoData(f"no evaluated checkpoint has both {loss_col} and {fd_col}")
    seen = d if fit_runs is None else d[d["run_id"].isin(fit_runs)]
    law = fit_fd_vs_loss(seen, loss_col, fd_col)
    fig, ax = _new_figure(7.0, 4.6)
    rows = []
    for run, g in _runs_in_order(d):
        p = g.iloc[0]
        st = _style(p["model"], p["patch"])
        held = fit_runs is not None and run not in set(fit_runs)
        ax.plot(g[loss_col], g[fd_col], ls="none", marker=st["marker"], color=st["color"], ms=6,
                mfc="none" if held else st["color"], gid=run, label=_label_of(g) + (" (held out)" if held else ""))
        rows += [{"kind": "point", "label": _label_of(g), "run_id": run, "held_out": held, loss_col: x, fd_col: y}
                 for x, y in zip(g[loss_col], g[fd_col])]
    xs = np.geomspace(d[loss_col].min() * 0.97, d[loss_col].max() * 1.03, 50)
    ax.plot(xs, predict(law, xs), color="black", lw=1.1, gid="fd_law",
            label=rf"fit: FD = {law.A:.3g} L$^{{{-law.alpha:.2f}}}$ ({law.n} points)")
    rows += [{"kind": "fit", "label": "fit", "run_id": None, loss_col: x, fd_col: y}
             for x, y in zip(xs, predict(law, xs))]
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    metric = d["metric_label"].dropna().iloc[0] if "metric_label" in d and d["metric_label"].notna().any() else fd_col
    ax.set_xlabel(LOSS_LABEL.get(loss_col, loss_col))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric.split(' (')[0]} as a function of the held-out loss")
    _legend_outside(fig)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits={"fd_vs_loss": law.to_dict()}), out_dir)


def fit_from_scan(df: pd.DataFrame, loss_col: str = LOSS_COL) -> dict:
    """How the largest-model forecast depends on fit_from: {law: {fit_from: median |error|}} for the axes law and
    the Gflops law, so that the choice in FORECAST_LAW can be judged."""
    out = {}
    for law in ("axes", "joint"):
        for f in FIT_FROM_SCAN:
            try:
                s = forecast_largest(df, loss_col, law=law, fit_from=f).summary()
            except ValueError as e:
                out.setdefault(law, {})[str(f)] = str(e)
                continue
            out.setdefault(law, {})[str(f)] = s["median_abs_rel_error"]
    return out


def build_laws(df: pd.DataFrame, out_dir, loss_col: str = LOSS_COL, fd_col: str = "fd", n_boot: int = 200,
               seed: int = 0, budgets=None) -> tuple[list[FigureOutput], dict]:
    """Every law figure that has data, laws.json beside them (fits and held-out summaries).

    FD is fitted on one sample size: `fd_col` "fd" that mixes metrics (curves at FD-250, the final checkpoint
    also at FD-500) becomes the named column of the most common one (analysis.laws.fd_metric); every other named
    FD column of the table (e.g. fd500_domain, final checkpoints only) gets its own FD forecast, fitted on its
    own values, as `forecast_fd[<column>]`. Runs that differ in their seed alone are one grid point, their mean
    (scaling.results.seed_means), in every fit and figure."""
    out_dir = Path(out_dir)
    df = seed_means(df)
    fd_col = fd_metric(df, fd_col) if fd_col in df.columns else fd_col
    df = one_row_per_step(df, prefer_col=fd_col if fd_col in df.columns else None)
    same = set(df.loc[df[fd_col].notna(), "metric_name"].dropna()) if {fd_col, "metric_name"} <= set(df) else set()
    other_fd = [c for c in df.columns if c != fd_col and c not in same and c.startswith(("fd", "fid"))
                and any(ch.isdigit() for ch in c.split("_")[0]) and not c.endswith(("_seed_min", "_seed_max"))
                and df[c].notna().any()]
    checks, reasons = [], {}
    axes_ok = all(c in df.columns and df[c].nunique() >= 2 for c in ("params", "tokens"))
    law = FORECAST_LAW if axes_ok else {"law": "joint"}

    def with_law(forecast, *args):
        """The forecast with the axes law, or with the Gflops law where the fitted runs do not span both axes."""
        try:
            return forecast(df, loss_col, *args, **law)
        except ValueError as e:
            if law["law"] != "axes":
                raise
            reasons[f"{forecast.__name__}[axes]"] = str(e)
            return forecast(df, loss_col, *args, law="joint")

    runs = [("forecast_largest", lambda: with_law(forecast_largest))]
    if axes_ok:  # the Gflops law for comparison
        runs.append(("forecast_largest[gflops]", lambda: forecast_largest(df, loss_col, law="joint")))
    runs.append(("forecast_fd", lambda: with_law(forecast_fd, fd_col)))
    runs += [(f"forecast_fd[{c}]", lambda c=c: with_law(forecast_fd, c)) for c in other_fd]
    runs += [("forecast_curve_end", lambda: forecast_curve_end(df, loss_col))]
    for check, run in runs:
        try:
            checks.append((check, run()))
        except (ValueError, KeyError) as e:
            reasons[check] = str(e)
    keyed = dict(checks)
    checks = [c for k, c in checks if k != "forecast_largest[gflops]"]  # the figure: the laws in use
    fd_fit_runs = keyed["forecast_fd"].fitted_runs if "forecast_fd" in keyed else None
    makers = {"loss_curves": lambda: loss_curves(df, out_dir, loss_col),
              "envelope": lambda: compute_envelope(df, out_dir, loss_col, n_boot=n_boot, seed=seed),
              "isoflop": lambda: isoflop_figure(df, out_dir, loss_col, budgets, n_boot=n_boot, seed=seed),
              "n_opt": lambda: n_opt_figure(df, out_dir, loss_col, budgets, n_boot=n_boot, seed=seed),
              "predicted_vs_measured": lambda: predicted_vs_measured(checks, out_dir),
              "fd_vs_loss": lambda: fd_vs_loss(df, out_dir, loss_col, fd_col, fit_runs=fd_fit_runs)}
    outputs, fits = [], {"held_out": {k: c.to_dict() for k, c in keyed.items()}, "skipped_checks": reasons,
                         "fd_col": fd_col, "fit_from_scan": fit_from_scan(df, loss_col) if axes_ok else {},
                         "scaling_checks": scaling_checks(df, [c for c in (loss_col, fd_col, *other_fd)
                                                               if c in df.columns])}
    for key, make in makers.items():
        try:
            out = make()
        except ValueError as e:  # NoData, or a fit with too few points (a short study): say why, go on
            print(f"[law_figures] skipped {key}: {e}")
            fits.setdefault("skipped_figures", {})[key] = str(e)
            continue
        outputs.append(out)
        fits[key] = out.fits
        out.fig.clf()
        print(f"[law_figures] wrote {', '.join(str(p) for p in out.paths)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "laws.json").write_text(json.dumps(fits, indent=2, default=float) + "\n")
    for y, c in fits["scaling_checks"].items():
        if "skipped" in c:
            print(f"[law_figures] {y}: no correlation or ordering check: {c['skipped']}")
            continue
        exc = "; ".join(f"{e['expected_lower']} {e['values'][0]:.4g} not below {e['other']} {e['values'][1]:.4g}"
                        for e in c.get("exceptions", []))
        order = (f"; ordered by size and patch in {c['n_pairs'] - len(c['exceptions'])} of {c['n_pairs']} pairs"
                 + (f" ({exc})" if exc else "")) if "n_pairs" in c else \
            f"; ordering not checked: {c['ordering_skipped']}"
        ends = f" (runs end at up to {c['last_step_max']})" if c["last_step_max"] > c["step"] else ""
        print(f"[law_figures] {y} at step {c['step']}{ends}: Pearson r(log10 Gflops) = "
              f"{c['pearson_r_log10_gflops']:.3f} over {c['n_points']} points{order}")
    for k, c in keyed.items():
        s = c.summary()
        print(f"[law_figures] {k} ({c.y_col}): median |error| {s['median_abs_rel_error']:.1%} vs naive "
              f"{s['naive_median_abs_rel_error']:.1%} over {s['n_predicted']} held-out points")
    return outputs, fits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.law_figures", description=__doc__.splitlines()[0])
    ap.add_argument("source", help="results.csv/.parquet or an output root")
    ap.add_argument("-o", "--out", default="figures", help="output directory (default figures/)")
    ap.add_argument("--loss", default=LOSS_COL, help=f"held-out loss column (default {LOSS_COL})")
    ap.add_argument("--fd", default="fd", help="Frechet distance column (default fd)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default=None,
                    help="isoFLOP budgets in FLOPs, comma-separated (default: log-spaced where 3+ runs overlap)")
    args = ap.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    except ValueError:
        budgets = [-1.0]
    if budgets is not None and not all(b > 0 for b in budgets):
        print(f"error: --budgets {args.budgets}: not a comma-separated list of positive numbers of FLOPs "
              f"(e.g. 1e11,3e11)", file=sys.stderr)
        return 2
    try:
        df = read_table(args.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.loss not in df.columns or not df[args.loss].notna().any():
        print(f"[law_figures] skipped: {args.source} has no {args.loss} (runs trained without the held-out loss)")
        return 0
    build_laws(df, args.out, args.loss, args.fd, args.n_boot, args.seed, budgets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
