"""Held-out checks: does a law predict what it was not fitted on better than a naive guess?

Three checks over the tidy results table, each against the naive baseline a reader would use without a law:

  forecast_largest    fit on the runs of the `n_fit` smallest models (by Gflops), predict the final value of
                      every larger run; naive: "no better than the largest fitted model" (its value at the same
                      number of images).
  forecast_fd         the same split, FD predicted through the loss: a loss law (joint or axes) predicts the
                      held-out run's loss, FD(loss) fitted on the small runs only turns it into FD; naive as
                      above, on FD.
  forecast_curve_end  fit the first half of every run's curve (by images seen; its first 10%, the transient,
                      left out), predict its last point; naive: "the last value seen".

Errors are relative, (predicted - true) / true, on the value and, where the law has a floor E, on the reducible
part L - E (a law can get the loss within 1% merely because E dominates it; L - E shows whether it predicts the
part that scaling changes). Summaries give median absolute errors of the law and of the baseline.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.fits import _finite, fit_power_law, predict
from analysis.laws import fit_axes_law, fit_fd_vs_loss, fit_joint_law


@dataclass
class Forecast:
    check: str                # forecast_largest | forecast_fd | forecast_curve_end
    y_col: str
    table: pd.DataFrame       # run_id, size, x, y_true, y_pred, y_naive, rel_error, naive_rel_error (+ excess_*)
    fitted_runs: list
    law: dict                 # the fitted law(s), as dicts

    def summary(self) -> dict:
        t = self.table
        out = {"check": self.check, "y_col": self.y_col, "n_predicted": int(len(t)),
               "n_fitted_runs": len(self.fitted_runs),
               "median_abs_rel_error": float(t["rel_error"].abs().median()),
               "naive_median_abs_rel_error": float(t["naive_rel_error"].abs().median())}
        if "excess_rel_error" in t.columns:
            out["median_abs_excess_rel_error"] = float(t["excess_rel_error"].abs().median())
            out["naive_median_abs_excess_rel_error"] = float(t["naive_excess_rel_error"].abs().median())
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "law": self.law, "rows": self.table.to_dict("records")}


def _errors(table: pd.DataFrame, floor) -> pd.DataFrame:
    """rel_error and naive_rel_error; with a floor (scalar or per row) also the errors on y - floor."""
    t = table.copy()
    t["rel_error"] = (t["y_pred"] - t["y_true"]) / t["y_true"]
    t["naive_rel_error"] = (t["y_naive"] - t["y_true"]) / t["y_true"]
    if floor is not None and np.any(np.asarray(floor) > 0):
        t["floor"] = floor
        excess = t["y_true"] - t["floor"]
        t["excess_rel_error"] = (t["y_pred"] - t["y_true"]) / excess
        t["naive_excess_rel_error"] = (t["y_naive"] - t["y_true"]) / excess
    return t


def split_by_size(df: pd.DataFrame, n_fit: int = 9, size_col: str = "gflops_per_img",
                  group_col: str = "run_id") -> tuple[list, list]:
    """(runs of the n_fit smallest distinct sizes, runs of the larger sizes); seeds of one size stay together."""
    sizes = df.groupby(group_col)[size_col].first()
    distinct = np.sort(sizes.unique())
    if distinct.size <= n_fit:
        raise ValueError(f"n_fit={n_fit} leaves nothing to predict: the table has {distinct.size} model sizes")
    small = set(distinct[:n_fit])
    return sorted(sizes.index[sizes.isin(small)]), sorted(sizes.index[~sizes.isin(small)])


def _value_at(g: pd.DataFrame, x_col: str, y_col: str, x: float) -> float:
    """A run's value at x: log-log interpolation between its points, its end value outside them."""
    g = g.sort_values(x_col)
    return float(np.exp(np.interp(np.log(x), np.log(g[x_col].to_numpy(float)), np.log(g[y_col].to_numpy(float)))))


def _naive_largest(d, fit_runs, size_col, x_col, y_col, group_col, x) -> float:
    fitted = d[d[group_col].isin(fit_runs)]
    top = fitted[fitted[size_col] == fitted[size_col].max()]
    return float(np.mean([_value_at(g, x_col, y_col, x) for _, g in top.groupby(group_col)]))


def _last_rows(d: pd.DataFrame, x_col: str, group_col: str) -> pd.DataFrame:
    return d.sort_values(x_col).groupby(group_col, sort=True).tail(1)


def late_points(d: pd.DataFrame, fit_from: float, x_col: str = "img_seen", group_col: str = "run_id") -> pd.DataFrame:
    """Each run's points with x >= fit_from x its last x (fit_from 0: every point)."""
    if not 0.0 <= fit_from < 1.0:
        raise ValueError(f"fit_from={fit_from}; allowed: 0 <= fit_from < 1 (a fraction of each run's length)")
    return d[d[x_col] >= fit_from * d.groupby(group_col)[x_col].transform("max")]


def _loss_law(fitted: pd.DataFrame, y_col: str, law: str, axes, size_col: str, x_col: str):
    """(predict(frame) -> array, floor E, law as a dict) of the loss law fitted on `fitted`."""
    if law == "joint":
        j = fit_joint_law(fitted[size_col], fitted[x_col], fitted[y_col])
        return (lambda f: j.loss(f[size_col], f[x_col])), j.E, j.to_dict()
    if law == "axes":
        j = fit_axes_law(fitted, axes or DEFAULT_AXES, y_col)
        return j.loss, j.E, j.to_dict()
    raise ValueError(f"law={law!r}; allowed: joint, axes")


DEFAULT_AXES = ("params", "tokens", "img_seen")   # the transformer, the patch, the images seen


def forecast_largest(df: pd.DataFrame, y_col: str, n_fit: int = 9, law: str = "joint",
                     size_col: str = "gflops_per_img", x_col: str = "img_seen", group_col: str = "run_id",
                     axes=None, fit_from: float = 0.0) -> Forecast:
    """Fit on the n_fit smallest models, predict the final value of the larger ones.

    law="joint": L(N, D) (N = size_col) fitted to the small runs' logged points (a loss curve);
    law="axes": the additive law over `axes` (default params, tokens and images seen: AxesLaw);
    law="power": y = A N^-alpha fitted to the small runs' values at the held-out runs' final x (one point per
    run, e.g. FD at one step). fit_from: the curve laws see each fitted run's points from that fraction of its
    length on (0.5: its second half, the regime of the final values the forecast is about).
    """
    if law not in ("joint", "axes", "power"):
        raise ValueError(f"law={law!r}; allowed: joint, axes, power")
    d = _finite(df, size_col, x_col, y_col)
    d = d[d[x_col] > 0]
    fit_runs, held = split_by_size(d, n_fit, size_col, group_col)
    fitted = late_points(d[d[group_col].isin(fit_runs)], fit_from, x_col, group_col)
    last = _last_rows(d[d[group_col].isin(held)], x_col, group_col)
    if law == "power":
        x_end = float(last[x_col].max())
        at = fitted.groupby(group_col).apply(lambda g: pd.Series({size_col: g[size_col].iloc[0],
                                                                  y_col: _value_at(g, x_col, y_col, x_end)}))
        p = fit_power_law(at[size_col], at[y_col])
        pred, floor, law_dict = predict(p, last[size_col]), None, p.to_dict()
    else:
        loss_of, floor, law_dict = _loss_law(fitted, y_col, law, axes, size_col, x_col)
        pred = loss_of(last)
    table = pd.DataFrame({"run_id": last[group_col].to_numpy(), "size": last[size_col].to_numpy(float),
                          "x": last[x_col].to_numpy(float), "y_true": last[y_col].to_numpy(float),
                          "y_pred": np.asarray(pred, dtype=float),
                          "y_naive": [_naive_largest(d, fit_runs, size_col, x_col, y_col, group_col, x)
                                      for x in last[x_col]]})
    return Forecast("forecast_largest", y_col, _errors(table, floor), fit_runs,
                    {**law_dict, "law": law, "fit_from": fit_from})


def forecast_fd(df: pd.DataFrame, loss_col: str, fd_col: str = "fd", n_fit: int = 9,
                size_col: str = "gflops_per_img", x_col: str = "img_seen", group_col: str = "run_id",
                law: str = "joint", axes=None, fit_from: float = 0.0) -> Forecast:
    """FD of the larger models at their last evaluation, through the loss: the loss law (`law`, `axes`,
    `fit_from` as in forecast_largest) on the small runs' loss curves, then FD(loss) fitted on the small runs'
    evaluated checkpoints only (one metric_name)."""
    curves = _finite(df, size_col, x_col, loss_col)
    curves = curves[curves[x_col] > 0]
    evals = _finite(curves, fd_col)
    fit_runs, held = split_by_size(curves, n_fit, size_col, group_col)
    small = late_points(curves[curves[group_col].isin(fit_runs)], fit_from, x_col, group_col)
    loss_of, _, law_dict = _loss_law(small, loss_col, law, axes, size_col, x_col)
    fd_law = fit_fd_vs_loss(evals[evals[group_col].isin(fit_runs)], loss_col, fd_col)
    last = _last_rows(evals[evals[group_col].isin(held)], x_col, group_col)
    loss_pred = loss_of(last)
    table = pd.DataFrame({"run_id": last[group_col].to_numpy(), "size": last[size_col].to_numpy(float),
                          "x": last[x_col].to_numpy(float), "y_true": last[fd_col].to_numpy(float),
                          "y_pred": predict(fd_law, loss_pred), "loss_true": last[loss_col].to_numpy(float),
                          "loss_pred": loss_pred,
                          "y_naive": [_naive_largest(evals, fit_runs, size_col, x_col, fd_col, group_col, x)
                                      for x in last[x_col]]})
    return Forecast("forecast_fd", fd_col, _errors(table, None), fit_runs,
                    {"loss_law": {**law_dict, "law": law, "fit_from": fit_from}, "fd_vs_loss": fd_law.to_dict()})


def forecast_curve_end(df: pd.DataFrame, y_col: str, frac: float = 0.5, x_col: str = "img_seen",
                       group_col: str = "run_id", min_points: int = 4, transient: float = 0.1) -> Forecast:
    """Per run: fit y = E + B x^-b to the points with transient x_max <= x <= frac x_max, predict y at x_max;
    naive: the last value seen. The first `transient` of a run is left out of the fit: there the optimizer and
    the EMA are still starting (in the laptop study step 50 of 600 has an EMA decay of 0.85 against 0.97 at step
    300, and the held-out loss falls 16-38% between its first two rows), which a single power law does not
    describe. Runs with
    fewer than `min_points` points in the fitted part are skipped (a floor needs 3+, and a 4th point to check
    it); raises when no run has enough."""
    if min_points < 3:
        raise ValueError(f"min_points={min_points}: a curve with a floor needs 3+ points")
    if not 0.0 <= transient < frac:
        raise ValueError(f"transient={transient}; allowed: 0 <= transient < frac={frac}")
    d = _finite(df, x_col, y_col)
    d = d[d[x_col] > 0]
    rows, laws = [], {}
    for run, g in d.groupby(group_col, sort=True):
        g = g.sort_values(x_col).drop_duplicates(x_col, keep="last")
        x_end = g[x_col].iloc[-1]
        seen = g[g[x_col] <= frac * x_end]
        fitted = seen[seen[x_col] >= transient * x_end]
        if len(fitted) < min_points:
            continue
        p = fit_power_law(fitted[x_col], fitted[y_col], floor=True)
        laws[run] = p.to_dict()
        rows.append({"run_id": run, "x": float(x_end), "x_seen": float(seen[x_col].iloc[-1]),
                     "x_fit_from": float(fitted[x_col].iloc[0]), "y_true": float(g[y_col].iloc[-1]),
                     "y_pred": float(predict(p, x_end)), "y_naive": float(seen[y_col].iloc[-1]), "floor": p.E})
    if not rows:
        raise ValueError(f"no run has {min_points}+ points of {y_col} between {transient:.0%} and {frac:.0%} of its "
                         f"curve")
    table = pd.DataFrame(rows)
    return Forecast("forecast_curve_end", y_col, _errors(table, table["floor"].to_numpy()), sorted(laws),
                    {"transient": transient, "frac": frac, "runs": laws})
