"""Scaling fits over the results table: power laws in log space, bootstrap over runs, frontier, held-out check.

All functions are pure: they take arrays or the tidy table (scaling.results) and return small dataclasses.

Model (an assumption, as in the scaling-law literature): metric = E + A * x^(-alpha), with E = 0 unless a floor
is fitted. Fitted in log space, residual log(y) - log(E + A x^-alpha), with a Huber loss so that one bad
evaluation cannot move the exponent much.
"""

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from tqdm import tqdm


@dataclass(frozen=True)
class PowerLawFit:
    E: float             # floor (0 without floor)
    A: float             # scale, in units of y * x^alpha
    alpha: float         # exponent: y falls as x^-alpha
    floor: bool
    n: int               # points fitted
    rmse_log: float      # root-mean-square residual in natural-log space
    huber_scale: float   # Huber threshold in log space (0.1 ~ a 10% deviation)

    @property
    def log_A(self) -> float:
        return float(np.log(self.A))

    def to_dict(self) -> dict:
        return asdict(self)


def predict(fit: PowerLawFit, x) -> np.ndarray:
    """E + A * x^-alpha, computed through logs so that x in FLOPs (1e20) does not overflow."""
    x = np.asarray(x, dtype=float)
    return fit.E + np.exp(fit.log_A - fit.alpha * np.log(x))


def _check_xy(x, y, floor: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"power-law fit needs x > 0 and y > 0; got min x {x.min():g}, min y {y.min():g}")
    need = 3 if floor else 2
    if np.unique(x).size < need:
        raise ValueError(f"power-law fit (floor={floor}) needs at least {need} distinct x values; got "
                         f"{np.unique(x).size}")
    return x, y


def _ols_loglog(log_u, log_y) -> tuple[float, float]:
    """Closed-form start: log y = c - alpha log u."""
    slope, c = np.polyfit(log_u, log_y, 1)
    return float(c), float(-slope)


def fit_power_law(x, y, floor: bool = False, huber_scale: float = 0.1, starts=None) -> PowerLawFit:
    """Fit y = E + A x^-alpha in log space with a Huber loss (scipy least_squares), best of several starts.

    Without floor E = 0 and the model is a line in log-log, so the Huber problem is convex and one start (the
    closed-form least-squares line) suffices. With floor, E is bounded to [0, min y) and the starts are
    E = 0, 0.3, 0.6, 0.9 x min y, each with the log-log line of y - E as its (log A, alpha), plus `starts`:
    extra (log A at x = geometric mean of x, alpha, E) triples (the bootstrap passes the full-data fit).
    """
    x, y = _check_xy(x, y, floor)
    x0 = float(np.exp(np.mean(np.log(x))))  # fit in u = x / x0 so that log A is well scaled
    log_u, log_y = np.log(x / x0), np.log(y)
    y_min = float(y.min())
    e_max = y_min * (1 - 1e-9)

    def residual(p):
        c, alpha, e = p[0], p[1], (p[2] if floor else 0.0)
        return log_y - np.log(e + np.exp(c - alpha * log_u))

    def jacobian(p):
        c, alpha, e = p[0], p[1], (p[2] if floor else 0.0)
        term = np.exp(c - alpha * log_u)
        m = e + term
        cols = [-term / m, term * log_u / m] + ([-1.0 / m] if floor else [])
        return np.stack(cols, axis=1)

    if floor:
        inits = []
        for frac in (0.0, 0.3, 0.6, 0.9):
            e = frac * y_min
            c, alpha = _ols_loglog(log_u, np.log(y - e))
            inits.append([c, alpha, e])
        bounds = ([-np.inf, -np.inf, 0.0], [np.inf, np.inf, e_max])
    else:
        inits = [list(_ols_loglog(log_u, log_y))]
        bounds = (-np.inf, np.inf)
    for s in (starts or ()) if floor else ():
        inits.append([s[0], s[1], min(max(s[2], 0.0), e_max * 0.999)])
    best = None
    for p0 in inits:
        res = least_squares(residual, p0, jac=jacobian, bounds=bounds, loss="huber", f_scale=huber_scale)
        if best is None or res.cost < best.cost:
            best = res
    c, alpha = float(best.x[0]), float(best.x[1])
    e = float(best.x[2]) if floor else 0.0
    r = residual(best.x)
    # A in the units of x: A x^-alpha = exp(c) (x / x0)^-alpha  =>  A = exp(c) x0^alpha
    return PowerLawFit(E=e, A=float(np.exp(c + alpha * np.log(x0))), alpha=alpha, floor=floor, n=int(x.size),
                       rmse_log=float(np.sqrt(np.mean(r ** 2))), huber_scale=huber_scale)


def _start_of(fit: PowerLawFit, x) -> list[float]:
    """(log A, alpha, E) of a fit in the parametrisation fit_power_law uses for these x."""
    x0 = float(np.exp(np.mean(np.log(np.asarray(x, dtype=float)))))
    return [fit.log_A - fit.alpha * np.log(x0), fit.alpha, fit.E]


# ----------------------------------------------------------------------------- bootstrap over runs


@dataclass
class BootstrapFit:
    fit: PowerLawFit                 # fit on all the data
    samples: pd.DataFrame            # E, A, alpha of each bootstrap fit
    ci: dict                         # name -> (lo, hi) percentile interval at `level`
    level: float
    n_boot: int
    n_groups: int
    n_failed: int                    # resamples that could not be fitted (too few distinct x)
    pred: pd.DataFrame = field(default=None)  # x, y, y_lo, y_hi on `x_pred` when given

    def to_dict(self) -> dict:
        return {"fit": self.fit.to_dict(), "ci": {k: list(v) for k, v in self.ci.items()}, "level": self.level,
                "n_boot": self.n_boot, "n_groups": self.n_groups, "n_failed": self.n_failed}


def predict_band(boot: BootstrapFit, x, level: float | None = None) -> pd.DataFrame:
    """The fit on all data and the pointwise percentile band of the bootstrap fits at x."""
    level = boot.level if level is None else level
    x = np.asarray(x, dtype=float)
    log_x = np.log(x)[None, :]
    s = boot.samples
    curves = s["E"].to_numpy()[:, None] + np.exp(np.log(s["A"].to_numpy())[:, None] - s["alpha"].to_numpy()[:, None] * log_x)
    q = (1 - level) / 2
    return pd.DataFrame({"x": x, "y": predict(boot.fit, x), "y_lo": np.quantile(curves, q, axis=0),
                         "y_hi": np.quantile(curves, 1 - q, axis=0)})


def resample_groups(df: pd.DataFrame, group_col: str, n_boot: int, seed: int = 0, desc: str = "bootstrap"):
    """Yield `n_boot` resamples of df made of whole groups (runs) drawn with replacement (the bootstrap's unit
    is the run: checkpoints of one run are not independent)."""
    if group_col not in df.columns:
        raise ValueError(f"group_col={group_col!r} is not a column; allowed: {', '.join(map(str, df.columns))}")
    codes, groups = pd.factorize(df[group_col])
    members = [np.flatnonzero(codes == g) for g in range(len(groups))]
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(n_boot), desc=desc, leave=False, disable=n_boot < 500):
        pick = rng.integers(0, len(groups), len(groups))
        yield df.iloc[np.concatenate([members[g] for g in pick])]


def _bootstrap(df, group_col, n_boot, seed, level, statistic, desc) -> tuple[PowerLawFit, pd.DataFrame, dict, int, int]:
    """Resample whole groups (runs) with replacement, apply `statistic(frame, start)` -> PowerLawFit to each."""
    if group_col not in df.columns:
        raise ValueError(f"group_col={group_col!r} is not a column; allowed: {', '.join(map(str, df.columns))}")
    full = statistic(df, None)
    n_groups = df[group_col].nunique()
    rows, failed = [], 0
    for sample in resample_groups(df, group_col, n_boot, seed, desc):
        try:
            f = statistic(sample, full)
        except ValueError:
            failed += 1
            continue
        rows.append((f.E, f.A, f.alpha))
    samples = pd.DataFrame(rows, columns=["E", "A", "alpha"])
    q = (1 - level) / 2
    ci = {k: (float(samples[k].quantile(q)), float(samples[k].quantile(1 - q))) for k in ("E", "A", "alpha")}
    return full, samples, ci, n_groups, failed


def bootstrap_fit(df: pd.DataFrame, x_col: str, y_col: str, group_col: str = "run_id", n_boot: int = 1000,
                  seed: int = 0, floor: bool = False, level: float = 0.95, x_pred=None,
                  huber_scale: float = 0.1) -> BootstrapFit:
    """Power-law fit of y_col vs x_col with percentile CIs from resampling whole runs (groups), not rows."""
    d = _finite(df, x_col, y_col)

    def statistic(frame, start):
        starts = [_start_of(start, frame[x_col])] if start is not None else None
        return fit_power_law(frame[x_col], frame[y_col], floor=floor, huber_scale=huber_scale, starts=starts)

    full, samples, ci, n_groups, failed = _bootstrap(d, group_col, n_boot, seed, level, statistic, "bootstrap fit")
    boot = BootstrapFit(full, samples, ci, level, n_boot, n_groups, failed)
    if x_pred is not None:
        boot.pred = predict_band(boot, x_pred)
    return boot


def _finite(df, *cols) -> pd.DataFrame:
    for c in cols:
        if c not in df.columns:
            raise ValueError(f"column {c!r} is not in the table; allowed: {', '.join(map(str, df.columns))}")
    d = df.copy()
    for c in cols:
        d[c] = pd.to_numeric(d[c], errors="coerce").astype(float)
    return d[np.isfinite(d[list(cols)]).all(axis=1)]


def pearson_log(df: pd.DataFrame, x_col: str, y_col: str) -> float:
    """Pearson correlation of y (as is) with log10 x: paper Fig. 8 reports -0.93 for FID vs log10 Gflops."""
    d = _finite(df, x_col, y_col)
    if len(d) < 3:
        raise ValueError(f"Pearson correlation needs at least 3 points with finite {x_col} and {y_col}; got {len(d)}")
    return float(np.corrcoef(np.log10(d[x_col].to_numpy()), d[y_col].to_numpy())[0, 1])


def common_step(df: pd.DataFrame, x_col: str = "step", group_col: str = "run_id"):
    """The largest `x_col` that every run's rows share; None where they share none."""
    per_run = [set(g[x_col]) for _, g in df.groupby(group_col)]
    common = set.intersection(*per_run) if per_run else set()
    return max(common) if common else None


def last_common_rows(df: pd.DataFrame, y_col: str, x_col: str = "step", group_col: str = "run_id") -> pd.DataFrame:
    """Each run's row at the largest `x_col` at which every run has a finite `y_col` (for a grid trained for equal
    steps, its final step; for runs of other lengths, no later than the shortest); empty where there is none."""
    d = _finite(df, x_col, y_col)
    step = common_step(d, x_col, group_col)
    if step is None:
        return d.iloc[:0]
    return d[d[x_col] == step].groupby(group_col, sort=True).first().reset_index()


def _point(row) -> str:
    return f"{row.model}/{float(row.patch):g}"


def ordering_exceptions(last: pd.DataFrame, y_col: str, size_col: str = "params") -> dict:
    """Is y lower for the larger transformer at every patch size and for the smaller patch at every transformer?
    Over `last` (one row per grid point: model, patch, size_col, y_col, and block where the table has it), each
    pair of neighbours is compared within a block design: the models of one patch ordered by `size_col` (rows
    without it take part in the patch pairs only), the patches of one model. {"n_pairs", "exceptions":
    [{"expected_lower", "other", "values", "rel_gap"}]}, rel_gap = (expected_lower - other) / other >= 0.
    ValueError where a grid point has two rows (seeds not averaged, or variants other than the block)."""
    d = _finite(last, "patch", y_col)
    keys = ["model", "patch"] + (["block"] if "block" in d.columns else [])
    dup = d[d.duplicated(keys, keep=False)]
    if not dup.empty:
        runs = f" ({', '.join(map(str, dup['run_id'].head(2)))})" if "run_id" in dup.columns else ""
        raise ValueError(f"{dup[keys].drop_duplicates().shape[0]} grid points have two or more rows, e.g. "
                         f"{_point(dup.iloc[0])}{runs}; allowed: one row per model, patch and block (average seeds: "
                         "scaling.results.seed_means)")
    pairs = []
    for _, b in (d.groupby("block", dropna=False) if "block" in d.columns else [(None, d)]):
        sized = b[np.isfinite(pd.to_numeric(b[size_col], errors="coerce"))] if size_col in b.columns else b.iloc[:0]
        for _, g in sized.groupby("patch"):
            g = g.sort_values(size_col, kind="stable")
            pairs += list(zip(g.iloc[1:].itertuples(), g.iloc[:-1].itertuples()))   # (larger, smaller)
        for _, g in b.groupby("model"):
            g = g.sort_values("patch", kind="stable")
            pairs += list(zip(g.iloc[:-1].itertuples(), g.iloc[1:].itertuples()))   # (smaller patch, larger)
    exceptions = []
    for lower, other in pairs:
        a, b = getattr(lower, y_col), getattr(other, y_col)
        if not a < b:
            exceptions.append({"expected_lower": _point(lower), "other": _point(other),
                               "values": [float(a), float(b)], "rel_gap": float((a - b) / b)})
    return {"n_pairs": len(pairs), "exceptions": exceptions}


def scaling_checks(df: pd.DataFrame, y_cols, x_col: str = "step", group_col: str = "run_id") -> dict:
    """For each of `y_cols` (a loss, FDs), at the largest step at which every run has a value (last_common_rows):
    Pearson r(y, log10 Gflops) over the grid points and the ordering by size and by patch (ordering_exceptions).
    {y_col: {"step", "last_step_max" (the latest step of any run with a value), "n_points",
    "pearson_r_log10_gflops", "n_pairs", "exceptions"}}; a check that cannot be made gives its reason instead:
    {"skipped": why} for the column, "ordering_skipped" for the ordering alone."""
    out = {}
    for y in y_cols:
        try:
            last = last_common_rows(df, y, x_col, group_col)
            if len(last) < 3:
                raise ValueError(f"{len(last)} runs have a {y} at a common step; 3+ needed")
            if min(_finite(last, "gflops_per_img", y)[["gflops_per_img", y]].nunique()) < 2:
                raise ValueError(f"{y} or gflops_per_img is the same for every run at step {last[x_col].iloc[0]:g}")
            r = pearson_log(last, "gflops_per_img", y)
        except ValueError as e:
            out[y] = {"skipped": str(e)}
            continue
        c = {"step": int(last[x_col].iloc[0]), "last_step_max": int(_finite(df, x_col, y)[x_col].max()),
             "n_points": int(len(last)), "pearson_r_log10_gflops": r}
        try:
            c.update(ordering_exceptions(last, y) if {"model", "patch"} <= set(last.columns) else
                     {"ordering_skipped": "no model and patch columns"})
        except ValueError as e:
            c["ordering_skipped"] = str(e)
        out[y] = c
    return out


# ----------------------------------------------------------------------------- compute-optimal frontier


def frontier(df: pd.DataFrame, compute_col: str = "train_flops", metric_col: str = "fd",
             group_col: str | None = "run_id") -> pd.DataFrame:
    """The compute-optimal frontier: checkpoints (sorted by compute) that reach a new lowest metric.

    Every point on it is the best any run achieved with at most that much training compute. With `group_col`
    (when it is a column), a boolean column `contested`: the point lies inside contested_range, where the
    envelope fits take their points.
    """
    d = _finite(df, compute_col, metric_col)
    d = d[d[compute_col] > 0].sort_values([compute_col, metric_col], kind="stable")
    front = d[_new_minimum(d[metric_col].to_numpy())].reset_index(drop=True)
    if group_col is not None and group_col in d.columns:
        lo, hi = contested_range(d[compute_col], d[group_col])
        front["contested"] = front[compute_col].between(lo, hi)
    return front


def _new_minimum(metric_sorted: np.ndarray) -> np.ndarray:
    """Mask of entries lower than every entry before them (the running minimum's steps)."""
    prev_best = np.concatenate([[np.inf], np.minimum.accumulate(metric_sorted)[:-1]])
    return metric_sorted < prev_best


def contested_range(compute, groups) -> tuple[float, float]:
    """From the second-lowest first checkpoint of the distinct runs to the second-highest last one: outside it only
    one run has points (below: the smallest model's early, transient steps, below its optimum; beyond: the
    largest model's tail, where no other size competes), so the frontier there is one run's own curve, above the
    compute-optimal law, and it pulls a fitted exponent and floor up (on the synthetic envelope of
    tests/test_laws.py, alpha 0.232 and E 0.068 for a true 0.2 and 0.05 without noise; 0.195 and 0.047 inside the
    range). Inside it, stretches where runs do not overlap are kept (a hull, not a count). Empty (inf, -inf) with
    fewer than two runs, so a bootstrap resample of one run is not fitted. The envelope fits use this range; the
    frontier itself is every running minimum."""
    compute = np.asarray(compute, dtype=float)
    groups = pd.Series(np.asarray(groups, dtype=object))
    if groups.isna().any():
        raise ValueError(f"{int(groups.isna().sum())} points have no run (group) value; every point needs one")
    codes, uniques = pd.factorize(groups)
    if len(uniques) < 2:
        return np.inf, -np.inf
    first = np.full(len(uniques), np.inf)
    last = np.full(len(uniques), -np.inf)
    np.minimum.at(first, codes, compute)
    np.maximum.at(last, codes, compute)
    return float(np.sort(first)[1]), float(np.sort(last)[-2])


def _frontier_arrays(c, m, groups, contested: bool) -> tuple[np.ndarray, np.ndarray]:
    """(compute, metric) of the frontier, in numpy (pandas per bootstrap resample would dominate the run time);
    with `contested`, only its points inside contested_range."""
    order = np.lexsort((m, c))
    keep = _new_minimum(m[order])
    fc, fm = c[order][keep], m[order][keep]
    if contested:
        lo, hi = contested_range(c, groups)
        inside = (fc >= lo) & (fc <= hi)
        fc, fm = fc[inside], fm[inside]
    return fc, fm


def fit_frontier(df: pd.DataFrame, compute_col: str = "train_flops", metric_col: str = "fd",
                 floor: bool = False, huber_scale: float = 0.1, starts=None, group_col: str = "run_id",
                 contested: bool = True) -> PowerLawFit:
    """Power-law fit of the frontier points: metric = E + A * compute^-alpha; with `contested` (default) only the
    points inside contested_range (none with fewer than two runs: the fit then raises)."""
    if contested and group_col not in df.columns:
        raise ValueError(f"group_col={group_col!r} is not a column (the contested range needs the runs); allowed: "
                         f"{', '.join(map(str, df.columns))}, or contested=False")
    front = frontier(df, compute_col, metric_col, group_col if contested else None)
    if contested:
        front = front[front["contested"]]
    return fit_power_law(front[compute_col], front[metric_col], floor=floor, huber_scale=huber_scale, starts=starts)


def bootstrap_frontier(df: pd.DataFrame, compute_col: str = "train_flops", metric_col: str = "fd",
                       group_col: str = "run_id", n_boot: int = 500, seed: int = 0, floor: bool = False,
                       level: float = 0.95, x_pred=None, contested: bool = True) -> BootstrapFit:
    """The frontier fit with CIs from resampling whole runs: each resample recomputes the frontier (and the
    contested range, over its distinct runs), then fits it."""
    d = _finite(df, compute_col, metric_col)
    d = d[d[compute_col] > 0]

    def statistic(frame, start):
        c, m = _frontier_arrays(frame[compute_col].to_numpy(), frame[metric_col].to_numpy(),
                                frame[group_col].to_numpy(), contested)
        if c.size < 2:  # e.g. a resample of one distinct run: no contested range
            raise ValueError(f"{c.size} frontier point(s) in the contested compute range; a fit needs 2+")
        starts = [_start_of(start, c)] if start is not None else None
        return fit_power_law(c, m, floor=floor, starts=starts)

    full, samples, ci, n_groups, failed = _bootstrap(d, group_col, n_boot, seed, level, statistic,
                                                     "bootstrap frontier")
    boot = BootstrapFit(full, samples, ci, level, n_boot, n_groups, failed)
    if x_pred is not None:
        boot.pred = predict_band(boot, x_pred)
    return boot


@dataclass
class ComputeOptimal:
    budget: float
    best: str                  # run id with the lowest metric at the budget
    table: pd.DataFrame        # run_id, model, patch, metric_at_budget, fraction_best (sorted, best first)
    n_boot: int

    def to_dict(self) -> dict:
        return {"budget": self.budget, "best": self.best, "n_boot": self.n_boot,
                "fraction_best": dict(zip(self.table["run_id"], self.table["fraction_best"].round(4)))}


def _interp_loglog(log_c, log_y, log_b) -> float:
    return float(np.exp(np.interp(log_b, log_c, log_y)))


def compute_optimal_model(df: pd.DataFrame, budget: float, compute_col: str = "train_flops",
                          metric_col: str = "fd", group_col: str = "run_id", n_boot: int = 500,
                          seed: int = 0) -> ComputeOptimal:
    """Which run reaches the lowest metric with `budget` training compute, and how sure that is.

    Each run's metric at the budget is read off its own checkpoints by linear interpolation in log-log (no
    extrapolation: runs whose checkpoints do not bracket the budget are not candidates). Uncertainty: a
    residual bootstrap. Each run's learning curve is smoothed by a power law with floor in compute; log
    residuals pooled over runs are resampled onto the smooth curves, the interpolation is redone, and the
    fraction of resamples in which each run is best is reported. Near a crossing of two curves the observed
    best (`best`, from the raw checkpoints) and the most frequent bootstrap winner (centred on the smooth
    curves) can differ: read that as "no clear winner at this budget".
    """
    d = _finite(df, compute_col, metric_col)
    d = d[d[compute_col] > 0]
    log_b = float(np.log(budget))
    cand = []
    for run, g in d.groupby(group_col, sort=True):
        g = g.sort_values(compute_col).drop_duplicates(compute_col)
        c = g[compute_col].to_numpy()
        if c.min() <= budget <= c.max():
            cand.append((run, g))
    if not cand:
        raise ValueError(f"budget={budget:.3g} is outside every run's compute range "
                         f"[{d[compute_col].min():.3g}, {d[compute_col].max():.3g}]")
    curves, residuals = [], []
    for run, g in cand:
        c, y = g[compute_col].to_numpy(), g[metric_col].to_numpy()
        if np.unique(c).size >= 4:
            smooth = predict(fit_power_law(c, y, floor=True), c)
        elif np.unique(c).size >= 2:
            smooth = predict(fit_power_law(c, y), c)
        else:
            smooth = y
        curves.append((np.log(c), np.log(y), np.log(smooth)))
        residuals.append(np.log(y) - np.log(smooth))
    pooled = np.concatenate(residuals)
    point = np.array([_interp_loglog(lc, ly, log_b) for lc, ly, _ in curves])
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(cand))
    for _ in range(n_boot):
        vals = [_interp_loglog(lc, ls + rng.choice(pooled, ls.size), log_b) for lc, _, ls in curves]
        wins[int(np.argmin(vals))] += 1
    first = lambda g, col: g[col].iloc[0] if col in g.columns else None  # noqa: E731
    table = pd.DataFrame({
        "run_id": [run for run, _ in cand], "model": [first(g, "model") for _, g in cand],
        "patch": [first(g, "patch") for _, g in cand], "metric_at_budget": point,
        "fraction_best": wins / max(n_boot, 1),
    }).sort_values("metric_at_budget", kind="stable").reset_index(drop=True)
    return ComputeOptimal(float(budget), str(table["run_id"].iloc[0]), table, n_boot)


# ----------------------------------------------------------------------------- held-out check


@dataclass
class HeldOut:
    fit: PowerLawFit           # fitted without the held-out run(s)
    table: pd.DataFrame        # run_id, x, y_true, y_pred, rel_error for the held-out rows

    @property
    def max_abs_rel_error(self) -> float:
        return float(self.table["rel_error"].abs().max())

    def to_dict(self) -> dict:
        return {"fit": self.fit.to_dict(), "held_out": self.table.to_dict("records"),
                "max_abs_rel_error": self.max_abs_rel_error}


def held_out(df: pd.DataFrame, x_col: str, y_col: str, holdout="largest", group_col: str = "run_id",
             floor: bool = False) -> HeldOut:
    """Fit on the other runs, predict the held-out one(s): the extrapolation test of a scaling law.

    holdout: "largest" (the run with the largest x), a run id, or a list of run ids.
    rel_error = (predicted - true) / true.
    """
    d = _finite(df, x_col, y_col)
    if isinstance(holdout, str) and holdout == "largest":
        held = [d.loc[d[x_col].idxmax(), group_col]]
    else:
        held = [holdout] if isinstance(holdout, str) else list(holdout)
        unknown = [h for h in held if h not in set(d[group_col])]
        if unknown:
            raise ValueError(f"holdout={unknown!r} not found in {group_col}; allowed: 'largest' or one of "
                             f"{sorted(map(str, set(d[group_col])))}")
    is_held = d[group_col].isin(held)
    fit = fit_power_law(d.loc[~is_held, x_col], d.loc[~is_held, y_col], floor=floor)
    h = d[is_held]
    pred = predict(fit, h[x_col].to_numpy())
    table = pd.DataFrame({"run_id": h[group_col].to_numpy(), "x": h[x_col].to_numpy(),
                          "y_true": h[y_col].to_numpy(), "y_pred": pred})
    table["rel_error"] = (table["y_pred"] - table["y_true"]) / table["y_true"]
    return HeldOut(fit, table)
