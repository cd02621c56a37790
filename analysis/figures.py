"""The paper's scaling figures from the results table, each saved as PNG + PDF + the CSV of what it plots.

    python -m analysis.figures results.csv -o figures/ [--step S] [--overlay-paper]
    python -m analysis.figures outputs/ -o figures/              # collect the run directories first
    python -m analysis.figures --reference -o figures/           # Fig. 8 from the paper's Table 4 alone

With a held-out loss in the table (runs trained with scaling/valloss.py) the CLI also writes the law figures and
laws.json of analysis.law_figures (isoFLOP profiles, N_opt(C), held-out forecasts).

One function per figure (paper numbering): Fig. 5 block designs, Fig. 6 FID vs training steps, Fig. 8 FID vs
Gflops, Fig. 9 FID vs training compute, Fig. 10 FID vs sampling compute. A figure without data raises NoData
(the CLI prints the reason and goes on). Axes name the metric's feature space (`metric_label`), so a laptop
figure is never mistaken for Inception FID-50K. fits.json holds the fit parameters and bootstrap intervals.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.fits import (bootstrap_fit, bootstrap_frontier, common_step, compute_optimal_model, frontier, held_out,
                          pearson_log)
from scaling.results import REFERENCE_CSV, paper_table, read_table, seed_means

SIZES = ("XXXS", "XXS", "XS", "S", "M", "B", "L", "XL")
SIZE_COLORS = {"XXXS": "#bcbd22", "XXS": "#17becf", "XS": "#9467bd", "S": "#1f77b4", "M": "#8c564b", "B": "#2ca02c",
               "L": "#ff7f0e", "XL": "#d62728"}
PATCH_STYLES = {2: "-", 4: "--", 8: ":"}
PATCH_MARKERS = {2: "o", 4: "s", 8: "^"}
BLOCK_LABELS = {"adaln_zero": "adaLN-Zero", "adaln": "adaLN", "cross_attn": "Cross-Attention",
                "in_context": "In-Context"}
BLOCK_COLORS = {"adaln_zero": "#d62728", "adaln": "#9467bd", "cross_attn": "#2ca02c", "in_context": "#1f77b4"}
PAPER_LABEL = "paper (FID-50K, Inception, 400K steps)"
SETTING_COLS = ["feature_extractor", "num_samples", "sampler", "sampling_steps", "cfg_scale"]


class NoData(ValueError):
    """A figure has nothing to plot; the message says why."""


@dataclass
class FigureOutput:
    name: str
    fig: Figure
    data: pd.DataFrame          # exactly the plotted values (also in <name>.csv)
    paths: list = field(default_factory=list)
    fits: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- labels and selection


def size_of(model: str) -> str:
    """"dit_xl" -> "XL", "laptop_s" -> "S"."""
    return str(model).split("_")[-1].upper()


def model_label(model: str, patch, family: str | None = None) -> str:
    """"DiT-XL/2" for the paper family, "Laptop-XL/2" for the laptop family."""
    fam = family or ("paper" if str(model).startswith("dit_") else "laptop")
    return f"{'DiT' if fam == 'paper' else 'Laptop'}-{size_of(model)}/{int(patch)}"


def _order_key(model, patch) -> tuple:
    s = size_of(model)
    return (SIZES.index(s) if s in SIZES else len(SIZES), -int(patch))


def _style(model, patch) -> dict:
    return {"color": SIZE_COLORS.get(size_of(model), "#555555"), "ls": PATCH_STYLES.get(int(patch), "-."),
            "marker": PATCH_MARKERS.get(int(patch), "D")}


def evaluated(df: pd.DataFrame) -> pd.DataFrame:
    d = df[df["fd"].notna() & df["step"].notna()].copy()
    d["step"] = d["step"].astype("int64")
    return d


def main_setting(df: pd.DataFrame, vary: tuple = ()) -> pd.DataFrame:
    """Evaluated rows of the most common eval setting (extractor, samples, sampler, steps, cfg), so that one
    figure never mixes metrics; `vary` names setting columns left free (Fig. 10 varies sampling_steps)."""
    d = evaluated(df)
    if d.empty:
        raise NoData("no evaluated checkpoints (no row has an fd value)")
    keys = [c for c in SETTING_COLS if c not in vary]
    counts = d.groupby(keys, dropna=False).size().sort_values(ascending=False, kind="stable")
    best = counts.index[0] if len(keys) > 1 else (counts.index[0],)
    mask = np.ones(len(d), dtype=bool)
    for k, v in zip(keys, best):
        mask &= (d[k].isna() if pd.isna(v) else d[k] == v).to_numpy()
    return d[mask]


def headline_setting(df: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """Evaluated rows of the setting with the most samples among those that evaluated 3+ runs (at `step` when
    given): the final checkpoint's FD-500 where the curves are at FD-250 (eval.final_num_samples); else
    main_setting's rows. Fig. 8 compares models at one step, at the largest N the study has there."""
    d = evaluated(df)
    if d.empty:
        raise NoData("no evaluated checkpoints (no row has an fd value)")
    key = d[SETTING_COLS].apply(lambda r: "|".join(map(str, r)), axis=1)   # one string per setting (NaN-safe)
    rows = key.value_counts()
    at = key if step is None else key[d["step"] == int(step)]
    best, best_key = None, None
    for k, idx in at.groupby(at).groups.items():
        g = d.loc[idx]
        if g["run_id"].nunique() < 3:
            continue
        n = g["num_samples"].iloc[0]
        rank = (float(n) if pd.notna(n) else -1.0, int(rows[k]))  # the most samples, then the most rows
        if best_key is None or rank > best_key:
            best, best_key = k, rank
    if best is None:
        return main_setting(df)
    return d[(key == best).to_numpy()]


def main_block(d: pd.DataFrame) -> pd.DataFrame:
    """Rows of one block design: adaLN-Zero when present (the grid's design), else the most common."""
    blocks = d["block"].dropna()
    if blocks.empty:
        return d
    block = "adaln_zero" if (blocks == "adaln_zero").any() else blocks.value_counts().index[0]
    return d[d["block"] == block]


def _metric(d: pd.DataFrame) -> tuple[str, str]:
    """(axis label, short name) of the plotted metric, e.g. ("FD-1K (domain features)", "FD-1K")."""
    labels = [x for x in d["metric_label"].dropna().unique() if x]
    label = " / ".join(labels) if labels else "FID"
    return label, label.split(" (")[0]


def evaluated_step(d: pd.DataFrame) -> int:
    """The largest step at which every run has an eval (the default step of Fig. 8)."""
    step = common_step(d)
    if step is None:
        raise NoData("no step at which every run was evaluated; pass --step")
    return int(step)


def _steps_formatter(v, _pos) -> str:
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}K" if v >= 1e3 else f"{v:g}"


def _plain_formatter(v, _pos) -> str:
    return f"{v:g}"


class ReadableLogLocator(LogLocator):
    """Powers of ten, and 2 and 5 times them within ~2 decades where their labels fit the axis (every multiple, or
    evenly spaced round numbers, on an axis too short in range for two of those), every k-th power of ten where
    even those do not fit; decided when the figure is drawn, from the axis's length after the layout (a legend
    beside the axes narrows them) and the labels' length in characters."""

    def __init__(self, formatter=_plain_formatter):
        super().__init__(base=10, subs=(1.0,))
        self._format = formatter

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        if lo <= 0:
            return super().tick_values(vmin, vmax)
        span = np.log10(hi / lo)
        if span < 2.5:
            # 1, 2 and 5 times powers of ten; where that leaves fewer than 2 labels, every multiple; on a range of
            # less than ~3x, evenly spaced round numbers: the first of these with 2+ labels that fit
            candidates = [LogLocator(base=10, subs=(1.0, 2.0, 5.0)), LogLocator(base=10, subs=np.arange(1.0, 10.0))]
            if span < 0.5:
                candidates += [MaxNLocator(nbins=n, steps=[1, 2, 2.5, 5, 10]) for n in (5, 3, 2, 1)]
            for locator in candidates:
                ticks = np.asarray(locator.tick_values(lo, hi))
                labels = [self._format(v, None) for v in ticks if lo <= v <= hi]
                if len(labels) >= 2 and self._room(labels) >= 1:
                    return ticks
        decades = np.asarray(super().tick_values(vmin, vmax))
        room = self._room([self._format(v, None) for v in decades if lo <= v <= hi])
        if room >= 1:
            return decades
        # every k-th power of ten, k as small as lets the labels fit (LogLocator's own stride for numticks)
        shown = max(int(np.sum((decades >= lo) & (decades <= hi)) * room), 2)
        return LogLocator(base=10, subs=(1.0,), numticks=shown).tick_values(vmin, vmax)

    def _room(self, labels: list[str]) -> float:
        """The axis's length over the length these labels need (>= 1: they fit)."""
        if self.axis is None or len(labels) < 2:
            return np.inf
        horizontal = self.axis is self.axis.axes.xaxis
        box = self.axis.axes.get_window_extent()
        font_px = FontProperties(size=rcParams["xtick.labelsize" if horizontal else "ytick.labelsize"]
                                 ).get_size_in_points() * self.axis.figure.dpi / 72
        # a label needs ~0.62 em a character side by side and ~1.6 em stacked, plus ~1 em between neighbours
        need = (sum(0.62 * len(t) + 1.0 for t in labels) if horizontal else 2.6 * len(labels)) * font_px
        return (box.width if horizontal else box.height) / need


def log_axis(axis, formatter=_plain_formatter) -> None:
    """Log scale with readable ticks (ReadableLogLocator), labelled by `formatter`."""
    axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
    axis.set_major_locator(ReadableLogLocator(formatter))
    axis.set_major_formatter(FuncFormatter(formatter))
    axis.set_minor_formatter(NullFormatter())


def _runs_in_order(d: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    groups = list(d.groupby("run_id", sort=True))
    return sorted(groups, key=lambda kv: _order_key(kv[1]["model"].iloc[0], kv[1]["patch"].iloc[0]))


def seed_range(g: pd.DataFrame, y_col: str) -> dict:
    """{"n_seeds": n} for the rows `g` of a grid point merged from n >= 2 seeds (scaling.results.seed_means) that
    carry the seeds' range of `y_col` (`<y_col>_seed_min`, `_max`); {} for a point of one seed."""
    if "n_seeds" not in g or int(g["n_seeds"].max()) < 2 or f"{y_col}_seed_min" not in g:
        return {}
    return {"n_seeds": int(g["n_seeds"].max())}


def draw_seed_band(ax, g: pd.DataFrame, x_col: str, y_col: str, color, rows: list | None = None) -> None:
    """The min-max range over seeds of a merged grid point's curve, shaded in its colour (gid <run>_seeds); the
    first band of the axes is named in the legend. Nothing for a point of one seed."""
    spread = seed_range(g, y_col)
    if not spread:
        return
    bands = [c for c in ax.collections if _is_seed_range(c)]
    run = g["run_id"].iloc[0]
    band = ax.fill_between(g[x_col], g[f"{y_col}_seed_min"], g[f"{y_col}_seed_max"], color=color, alpha=0.18,
                           lw=0, gid=f"{run}_seeds")
    band.n_seeds = spread["n_seeds"]
    first = bands[0] if bands else band  # the one named in the legend, for every band's count of seeds
    first.set_label(f"range over {seeds_phrase([b.n_seeds for b in bands + [band]])}")
    if rows is not None:
        rows += [{"kind": "seed_range", "label": _label_of(g), "run_id": run, x_col: x, f"{y_col}_seed_min": lo,
                  f"{y_col}_seed_max": hi, **spread}
                 for x, lo, hi in zip(g[x_col], g[f"{y_col}_seed_min"], g[f"{y_col}_seed_max"])]


def seeds_phrase(counts) -> str:
    """'3 seeds', or '2-3 seeds' where the grid points of a figure have different numbers of seeds."""
    lo, hi = int(min(counts)), int(max(counts))
    return f"{hi} seeds" if lo == hi else f"{lo}-{hi} seeds"


def _is_seed_range(artist) -> bool:
    """Drawn by draw_seed_band or Fig. 8's error bars (an errorbar container has no gid of its own)."""
    return str(artist.get_gid() if hasattr(artist, "get_gid") else None).endswith("_seeds")


def legend_entries(ax) -> tuple[list, list]:
    """The axes' labelled artists, the seeds' range (draw_seed_band) after the models."""
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(handles)), key=lambda i: _is_seed_range(handles[i]))
    return [handles[i] for i in order], [labels[i] for i in order]


def _label_of(g: pd.DataFrame) -> str:
    r = g.iloc[0]
    return model_label(r["model"], r["patch"], r["family"])


def _new_figure(width=7.0, height=4.6) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    return fig, ax


def save(out: FigureOutput, out_dir) -> FigureOutput:
    """<name>.png (150 dpi), <name>.pdf and <name>.csv under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out.paths = [out_dir / f"{out.name}.{ext}" for ext in ("png", "pdf", "csv")]
    # "tight": the model legends sit outside the axes, right of the plot
    out.fig.savefig(out.paths[0], dpi=150, bbox_inches="tight")
    out.fig.savefig(out.paths[1], bbox_inches="tight")
    out.data.to_csv(out.paths[2], index=False)
    return out


# ----------------------------------------------------------------------------- Fig. 6: FID vs steps


def fig6_steps(df: pd.DataFrame, out_dir, name: str = "fig6_fid_vs_steps", logx: bool | None = None) -> FigureOutput:
    """Paper Fig. 6: metric vs training steps, one curve per run (colour = size, line style = patch), log y."""
    d = main_block(main_setting(df))
    fig, ax = _new_figure()
    rows = []
    for run, g in _runs_in_order(d):
        g = g.sort_values("step")
        label = _label_of(g)
        r = g.iloc[0]
        style = _style(r["model"], r["patch"])
        ax.plot(g["step"], g["fd"], label=label, gid=run, lw=1.6, ms=3.5, **style)
        rows += [{"label": label, "run_id": run, "step": s, "fd": f} for s, f in zip(g["step"], g["fd"])]
        draw_seed_band(ax, g, "step", "fd", style["color"], rows)
    steps = d["step"][d["step"] > 0]
    if logx is None:
        logx = len(steps) > 0 and steps.max() / max(steps.min(), 1) > 30
    if logx:
        log_axis(ax.xaxis, _steps_formatter)
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
    log_axis(ax.yaxis)
    metric, short = _metric(d)
    ax.set_xlabel("Training steps")
    ax.set_ylabel(metric)
    ax.set_title(f"{short} over training (Fig. 6)")
    ax.legend(*legend_entries(ax), loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return save(FigureOutput(name, fig, pd.DataFrame(rows)), out_dir)


# ----------------------------------------------------------------------------- Fig. 8: FID vs Gflops


def fig8_gflops(df: pd.DataFrame, out_dir, step: int | None = None, overlay_paper: bool = False,
                n_boot: int = 1000, seed: int = 0, name: str = "fig8_fid_vs_gflops") -> FigureOutput:
    """Paper Fig. 8: metric vs forward Gflops at one step, log-log, with the Pearson correlation of the metric
    with log10 Gflops and a power-law fit with its bootstrap band (resampling runs), at the largest sample size
    evaluated on 3+ runs (headline_setting)."""
    d = main_block(headline_setting(df, step))
    step = evaluated_step(d) if step is None else int(step)
    d = d[d["step"] == step]
    if d["run_id"].nunique() < 3:
        raise NoData(f"Fig. 8 needs at least 3 runs evaluated at step {step}; found {d['run_id'].nunique()}")
    metric, short = _metric(d)
    r = pearson_log(d, "gflops_per_img", "fd")
    g_lo, g_hi = d["gflops_per_img"].min(), d["gflops_per_img"].max()
    x_pred = np.geomspace(g_lo / 1.5, g_hi * 1.5, 60)
    boot = bootstrap_fit(d, "gflops_per_img", "fd", n_boot=n_boot, seed=seed, x_pred=x_pred)
    fits = {"step": step, "metric_label": metric, "pearson_r_log10_gflops": r, "n_runs": int(d["run_id"].nunique()),
            "power_law": boot.to_dict()}
    if d["run_id"].nunique() >= 4:
        fits["held_out_largest"] = held_out(d, "gflops_per_img", "fd").to_dict()

    fig, ax = _new_figure(6.4, 4.8)
    band, fit = boot.pred, boot.fit
    lo, hi = boot.ci["alpha"]
    ax.fill_between(band["x"], band["y_lo"], band["y_hi"], color="0.6", alpha=0.25, lw=0, gid="band",
                    label=f"{int(boot.level * 100)}% bootstrap band ({boot.n_boot} resamples of runs)")
    ax.plot(band["x"], band["y"], color="0.25", lw=1.2, gid="fit",
            label=rf"fit: {short} = {fit.A:.3g} G$^{{-{fit.alpha:.2f}}}$, $\alpha$ CI [{lo:.2f}, {hi:.2f}]")
    rows = [{"kind": "fit", "label": "fit", "run_id": None, "gflops_per_img": x, "fd": y, "fd_lo": a, "fd_hi": b}
            for x, y, a, b in band[["x", "y", "y_lo", "y_hi"]].itertuples(index=False)]
    models, seeds = [], []
    for run, g in _runs_in_order(d):
        p = g.iloc[0]
        st = _style(p["model"], p["patch"])
        label = _label_of(g)
        models.append(ax.plot([p["gflops_per_img"]], [p["fd"]], ls="none", marker=st["marker"], color=st["color"],
                              ms=7, mec="black", mew=0.5, gid=run, label=label)[0])
        spread = seed_range(g, "fd")
        if spread:  # the seeds' range; the point is their mean
            bar = ax.errorbar([p["gflops_per_img"]], [p["fd"]], yerr=[[p["fd"] - p["fd_seed_min"]],
                              [p["fd_seed_max"] - p["fd"]]], fmt="none", ecolor=st["color"], elinewidth=1.2, capsize=3)
            bar.lines[2][0].set_gid(f"{run}_seeds")  # the bar itself (a container has no gid)
            seeds.append(bar)
            spread.update(fd_seed_min=p["fd_seed_min"], fd_seed_max=p["fd_seed_max"])
        rows.append({"kind": "point", "label": label, "run_id": run, "gflops_per_img": p["gflops_per_img"],
                     "fd": p["fd"], **spread})
    if overlay_paper and not d["run_id"].str.endswith("-paper").all():  # not when plotting the paper itself
        ref = paper_table()
        ax.plot(ref["gflops_per_img"], ref["fd"], ls="none", marker="o", mfc="none", mec="black", ms=8, mew=1.0,
                gid="paper", label=PAPER_LABEL)
        rows += [{"kind": "paper", "label": model_label(m, p, "paper"), "run_id": run, "gflops_per_img": g, "fd": f}
                 for run, m, p, g, f in ref[["run_id", "model", "patch", "gflops_per_img", "fd"]].itertuples(index=False)]
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Transformer Gflops per image (forward, multiply-add = 1 flop)")
    ax.set_ylabel(metric)
    ax.set_title(f"{short} vs model compute at {_steps_formatter(step, None)} steps (Fig. 8)\n"
                 f"Pearson r({short}, log10 Gflops) = {r:.2f}", fontsize=10)
    # The models in a figure legend right of the axes, the fit in the axes' own legend. (A second ax.legend kept
    # through ax.add_artist is clipped to the axes by matplotlib >= 3.10: outside them it was never drawn.)
    fig.legend(handles=models, loc="outside right center", fontsize=8, frameon=False)
    if seeds:
        seeds[0].set_label(f"mean and range over {seeds_phrase(d.loc[d['n_seeds'] > 1, 'n_seeds'])}")
    ax.legend(handles=[h for h in ax.get_legend_handles_labels()[0] if h not in models], loc="lower left",
              fontsize=7.5, frameon=True, framealpha=0.9)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits=fits), out_dir)


# ----------------------------------------------------------------------------- Fig. 9: FID vs training compute


def draw_frontier(ax, front: pd.DataFrame, y_col: str, gid: str, label: str, one_run_label: str, ms: float,
                  mew: float) -> None:
    """A frontier's points (analysis.fits.frontier, against train_flops): those its fit takes (`contested`) in
    black as `gid`, the rest, one run's own curve where no other run reaches the compute, in grey as
    `<gid>_one_run`."""
    fitted = front["contested"]
    ax.plot(front.loc[fitted, "train_flops"], front.loc[fitted, y_col], ls="none", marker="o", ms=ms, mfc="none",
            mec="black", mew=mew, gid=gid, label=label)
    if (~fitted).any():
        ax.plot(front.loc[~fitted, "train_flops"], front.loc[~fitted, y_col], ls="none", marker="o", ms=ms,
                mfc="none", mec="0.6", mew=mew, gid=f"{gid}_one_run", label=one_run_label)


def fig9_train_compute(df: pd.DataFrame, out_dir, n_boot: int = 500, seed: int = 0,
                       name: str = "fig9_fid_vs_train_compute") -> FigureOutput:
    """Paper Fig. 9: metric vs training compute (Gflops x batch x steps x 3, in FLOPs) for every checkpoint,
    one curve per run, with the compute-optimal frontier and its power-law fit (CI from resampling runs)."""
    d = main_block(main_setting(df))
    d = d[d["train_flops"] > 0]
    if d.empty:
        raise NoData("no checkpoint with training compute > 0")
    metric, short = _metric(d)
    front = frontier(d)
    fig, ax = _new_figure(8.0, 4.8)
    rows = []
    for run, g in _runs_in_order(d):
        g = g.sort_values("step")
        p = g.iloc[0]
        label = _label_of(g)
        ax.plot(g["train_flops"], g["fd"], label=label, gid=run, lw=1.4, ms=3.5, alpha=0.9,
                **_style(p["model"], p["patch"]))
        rows += [{"kind": "checkpoint", "label": label, "run_id": run, "step": s, "train_flops": c, "fd": f}
                 for s, c, f in zip(g["step"], g["train_flops"], g["fd"])]
    fitted = front["contested"]  # the points the fit takes (analysis.fits.contested_range)
    draw_frontier(ax, front, "fd", "frontier", "compute-optimal frontier",
                  "frontier where one run alone reaches the compute (not fitted)", ms=8, mew=1.0)
    rows += [{"kind": "frontier" if fit else "frontier_one_run", "label": _label_of(front.iloc[[i]]), "run_id": r,
              "step": s, "train_flops": c, "fd": f}
             for i, (r, s, c, f, fit) in enumerate(zip(front["run_id"], front["step"], front["train_flops"],
                                                        front["fd"], fitted))]
    fits = {"metric_label": metric, "frontier_points": int(len(front)), "frontier_points_fitted": int(fitted.sum())}
    if front.loc[fitted, "train_flops"].nunique() >= 2:
        x_pred = np.geomspace(front["train_flops"].min(), d["train_flops"].max(), 60)
        boot = bootstrap_frontier(d, n_boot=n_boot, seed=seed, x_pred=x_pred)
        lo, hi = boot.ci["alpha"]
        ax.plot(boot.pred["x"], boot.pred["y"], color="black", ls=(0, (5, 2)), lw=1.3, gid="frontier_fit",
                label=rf"frontier fit: $\alpha$ = {boot.fit.alpha:.3f} [{lo:.3f}, {hi:.3f}]")
        rows += [{"kind": "frontier_fit", "label": "frontier fit", "run_id": None, "train_flops": x, "fd": y}
                 for x, y in boot.pred[["x", "y"]].itertuples(index=False)]
        fits["frontier_power_law"] = boot.to_dict()
        budget = float(d.groupby("run_id")["train_flops"].max().median())  # half the runs reach it
        try:
            fits["compute_optimal"] = compute_optimal_model(d, budget, n_boot=n_boot, seed=seed).to_dict()
        except ValueError as e:
            fits["compute_optimal"] = {"budget": budget, "skipped": str(e)}
    else:
        fits["frontier_power_law_skipped"] = (f"{int(fitted.sum())} frontier point(s) inside the compute range two "
                                              f"or more runs share (analysis.fits.contested_range); a fit needs 2+")
    ax.set_xscale("log")
    log_axis(ax.yaxis)
    ax.set_xlabel("Training compute (FLOPs = Gflops/img x 1e9 x batch x steps x 3)")
    ax.set_ylabel(metric)
    ax.set_title(f"{short} vs training compute (Fig. 9)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return save(FigureOutput(name, fig, pd.DataFrame(rows), fits=fits), out_dir)


# ----------------------------------------------------------------------------- Fig. 10: sampling compute


def fig10_sampling_compute(df: pd.DataFrame, out_dir, name: str = "fig10_fid_vs_sampling_compute") -> FigureOutput:
    """Paper Fig. 10: metric vs sampling compute (Gflops/img x sampling steps), for runs evaluated with several
    sampling step counts at one checkpoint (each run's latest such checkpoint)."""
    d = main_block(main_setting(df, vary=("sampling_steps",)))
    d = d[d["sampling_steps"].notna()]
    picked = []
    for run, g in d.groupby("run_id"):
        multi = g.groupby("step")["sampling_steps"].nunique()
        multi = multi[multi >= 2]
        if len(multi):
            picked.append(g[g["step"] == multi.index.max()])
    if not picked:
        raise NoData("no run was evaluated with 2+ sampling step counts at one checkpoint (the sampling study)")
    d = pd.concat(picked)
    d = d.assign(sampling_gflops=d["gflops_per_img"] * d["sampling_steps"].astype(float))
    metric, short = _metric(d)
    fig, ax = _new_figure()
    rows = []
    for run, g in _runs_in_order(d):
        g = g.sort_values("sampling_steps")
        p = g.iloc[0]
        label = f"{_label_of(g)} @ {_steps_formatter(p['step'], None)}"
        ax.plot(g["sampling_gflops"], g["fd"], label=label, gid=run, lw=1.4, ms=4, **_style(p["model"], p["patch"]))
        rows += [{"label": label, "run_id": run, "step": p["step"], "sampling_steps": k, "sampling_gflops": c, "fd": f}
                 for k, c, f in zip(g["sampling_steps"], g["sampling_gflops"], g["fd"])]
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("Sampling compute (Gflops per image = Gflops/img x sampling steps)")
    ax.set_ylabel(metric)
    ax.set_title(f"{short} vs sampling compute (Fig. 10)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return save(FigureOutput(name, fig, pd.DataFrame(rows)), out_dir)


# ----------------------------------------------------------------------------- Fig. 5: block designs


def fig5_blocks(df: pd.DataFrame, out_dir, name: str = "fig5_block_designs") -> FigureOutput:
    """Paper Fig. 5: metric vs training steps for each block design, for the largest model trained with 2+
    designs (the paper compares them on DiT-XL/2)."""
    d = main_setting(df)
    d = d[d["block"].notna()]
    configs = d.groupby(["model", "patch"])["block"].nunique()
    configs = configs[configs >= 2]
    if configs.empty:
        raise NoData("no model was trained with 2+ block designs")
    gflops = d.groupby(["model", "patch"])["gflops_per_img"].max()
    model, patch = max(configs.index, key=lambda k: gflops[k])
    d = d[(d["model"] == model) & (d["patch"] == patch)]
    metric, short = _metric(d)
    fig, ax = _new_figure(6.4, 4.4)
    rows = []
    for run, g in sorted(d.groupby("run_id"), key=lambda kv: kv[1]["fd"].min(), reverse=True):
        g = g.sort_values("step")
        block = g["block"].iloc[0]
        label = BLOCK_LABELS.get(block, block)
        ax.plot(g["step"], g["fd"], label=label, gid=run, color=BLOCK_COLORS.get(block, "#555555"), marker="o",
                ms=3.5, lw=1.6)
        rows += [{"label": label, "block": block, "run_id": run, "step": s, "fd": f}
                 for s, f in zip(g["step"], g["fd"])]
    steps = d["step"][d["step"] > 0]
    if len(steps) and steps.max() / max(steps.min(), 1) > 30:
        log_axis(ax.xaxis, _steps_formatter)
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
    log_axis(ax.yaxis)
    ax.set_xlabel("Training steps")
    ax.set_ylabel(metric)
    ax.set_title(f"Block designs, {model_label(model, patch, d['family'].iloc[0])} (Fig. 5)")
    ax.legend(loc="upper right", fontsize=8)
    return save(FigureOutput(name, fig, pd.DataFrame(rows)), out_dir)


# ----------------------------------------------------------------------------- everything + CLI


def build_all(df: pd.DataFrame, out_dir, step: int | None = None, overlay_paper: bool = False,
              only_fig8: bool = False, n_boot: int = 1000, seed: int = 0) -> tuple[list[FigureOutput], dict]:
    """Every figure that has data, fits.json beside them; prints a one-line reason for each skipped figure. Runs
    that differ in their seed alone enter every figure and fit as one grid point, their mean, with their range
    drawn (scaling.results.seed_means)."""
    out_dir = Path(out_dir)
    df = seed_means(df)
    makers = {"fig8": lambda: fig8_gflops(df, out_dir, step=step, overlay_paper=overlay_paper, n_boot=n_boot,
                                          seed=seed)}
    if not only_fig8:
        makers = {"fig5": lambda: fig5_blocks(df, out_dir), "fig6": lambda: fig6_steps(df, out_dir), **makers,
                  "fig9": lambda: fig9_train_compute(df, out_dir, n_boot=max(n_boot // 2, 1), seed=seed),
                  "fig10": lambda: fig10_sampling_compute(df, out_dir)}
    outputs, fits = [], {}
    for key, make in makers.items():
        try:
            out = make()
        except NoData as e:
            print(f"[figures] skipped {key}: {e}")
            continue
        outputs.append(out)
        fits[key] = out.fits
        out.fig.clf()
        print(f"[figures] wrote {', '.join(str(p) for p in out.paths)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fits.json").write_text(json.dumps({k: v for k, v in fits.items() if v}, indent=2, default=float) + "\n")
    print(summary(fits))
    return outputs, fits


def summary(fits: dict) -> str:
    lines = []
    f8 = fits.get("fig8") or {}
    if f8:
        pl = f8["power_law"]
        lo, hi = pl["ci"]["alpha"]
        lines.append(f"Fig. 8 at step {f8['step']}: Pearson r(metric, log10 Gflops) = {f8['pearson_r_log10_gflops']:.2f} "
                     f"over {f8['n_runs']} runs; power law alpha = {pl['fit']['alpha']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] ({int(pl['level'] * 100)}% bootstrap over runs)")
        if "held_out_largest" in f8:
            h = f8["held_out_largest"]["held_out"][0]
            lines.append(f"  held out {h['run_id']}: predicted {h['y_pred']:.3g}, true {h['y_true']:.3g} "
                         f"(relative error {h['rel_error']:+.1%})")
    f9 = fits.get("fig9") or {}
    if "frontier_power_law" in f9:
        pl = f9["frontier_power_law"]
        lo, hi = pl["ci"]["alpha"]
        fitted = f9.get("frontier_points_fitted", f9["frontier_points"])
        lines.append(f"Fig. 9 frontier ({f9['frontier_points']} points, {fitted} fitted): "
                     f"alpha = {pl['fit']['alpha']:.3f} [{lo:.3f}, {hi:.3f}]")
        co = f9.get("compute_optimal", {})
        if "best" in co:
            lines.append(f"  compute-optimal at {co['budget']:.3g} FLOPs: {co['best']} "
                         f"(best in {co['fraction_best'][co['best']]:.0%} of bootstraps)")
    return "\n".join(lines) if lines else "no fits"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", help="results.csv/.parquet, an output root, or dit_table4.csv")
    ap.add_argument("-o", "--out", default="figures", help="output directory (default figures/)")
    ap.add_argument("--step", type=int, default=None, help="step of Fig. 8 (default: largest step all runs reached)")
    ap.add_argument("--overlay-paper", action="store_true", help="overlay the paper's 12 points on Fig. 8")
    ap.add_argument("--reference", action="store_true", help="Fig. 8 from scaling/reference/dit_table4.csv alone")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.source is None and not args.reference:
        ap.error("give a results table / output root, or --reference")
    reference = args.reference or Path(args.source).resolve() == REFERENCE_CSV
    try:
        df = paper_table() if args.reference else read_table(args.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: {args.source} holds no runs", file=sys.stderr)
        return 2
    build_all(df, args.out, step=args.step, overlay_paper=args.overlay_paper, only_fig8=reference,
              n_boot=args.n_boot, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
