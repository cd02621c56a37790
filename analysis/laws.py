"""Laws that forecast: isoFLOP profiles and the compute-optimal size, the joint law L(N, D), FD as a function of
loss, and held-out checks of each forecast against a naive baseline.

Pure functions over the tidy results table (scaling.results) or over arrays; small dataclasses out. The compute
envelope is `analysis.fits.bootstrap_frontier(..., floor=True)`: E + A C^-alpha over every run's curve, fitted
inside the compute range two or more runs share (`analysis.fits.contested_range`).

Model size. A DiT's cost is set by its Gflops per image, not its parameter count (the patch size changes the
Gflops at fixed parameters: paper section 4), so the size axis N of this module is `gflops_per_img` and the data
axis D is `img_seen`. With the project's one FLOP convention (scaling.config.make_plan)

    train_flops C = gflops_per_img x 1e9 x img_seen x 3,   i.e.  C = K N D  with  K = FLOPS_PER_GFLOP_IMG = 3e9,

so at a budget C a model of size N sees D = C / (K N) images.

Joint law (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^a + B / D^b, fitted as in the replication of
Besiroglu et al. 2024: Huber loss (delta 1e-3) on log L of the log-sum-exp form, L-BFGS from a grid of starting
points, the best kept; intervals from resampling whole runs. Its compute-optimal size (minimising L at C = K N D):

    N_opt(C) = (a A / (b B))^(1 / (a + b)) (C / K)^(b / (a + b))                                    (approach 3)

IsoFLOP profiles (approach 2): each run's curve is read at a budget by log-log interpolation between its own
logged points (never extrapolated; a run that stops within 3% short of a budget, rounding its steps, is read at
its last point); a parabola in log N fitted to the profile's best size and its neighbours (parabola_optimum) gives
the budget's optimum. A parabola is biased where the profile is asymmetric about its minimum, the more so the
wider the sizes it is fitted to, which is why approach 3 is also given.
"""

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from analysis.fits import PowerLawFit, _finite, fit_power_law, resample_groups

FLOPS_PER_GFLOP_IMG = 3e9   # train_flops / (gflops_per_img x img_seen): 1e9 flops per Gflop x 3 passes
HUBER_DELTA = 1e-3          # Besiroglu et al. 2024 (as Hoffmann et al. 2022)
PARABOLA_NEIGHBOURS = 2     # an isoFLOP parabola is fitted to the best size and up to 2 sizes each side, as many
                            # on both: on exact synthetic profiles (tests/test_laws.py) the optima's largest error
                            # was 1.1% (every size: 4.3%), under 0.5% noise the N_opt exponent's interval is wider
                            # (0.43 vs 0.29): fewer sizes where the best is near an edge of the sweep


def _interval(values, level: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    q = (1 - level) / 2
    return (float(np.quantile(v, q)), float(np.quantile(v, 1 - q)))


# ----------------------------------------------------------------------------- joint law L(N, D)


@dataclass(frozen=True)
class JointLaw:
    """L(N, D) = E + A / N^a + B / D^b (N in the units of the size column, D in images)."""
    E: float
    A: float
    a: float
    B: float
    b: float
    n: int = 0                 # points fitted
    n_starts: int = 0          # starting points tried
    rmse_log: float = float("nan")

    def loss(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + np.exp(np.log(self.A) - self.a * np.log(N)) + np.exp(np.log(self.B) - self.b * np.log(D))

    def n_opt(self, C) -> np.ndarray:
        """Compute-optimal size at training compute C (FLOPs) under C = K N D (module docstring, approach 3)."""
        C = np.asarray(C, dtype=float)
        return (self.a * self.A / (self.b * self.B)) ** (1 / (self.a + self.b)) * \
            (C / FLOPS_PER_GFLOP_IMG) ** (self.b / (self.a + self.b))

    @property
    def n_opt_exponent(self) -> float:
        return self.b / (self.a + self.b)

    def to_dict(self) -> dict:
        return {**asdict(self), "n_opt_exponent": self.n_opt_exponent}


@dataclass(frozen=True)
class AxesLaw:
    """L = E + sum_k A_k / x_k^a_k over named columns of the results table, e.g. ("params", "tokens",
    "img_seen"): the joint law with its size split into the two things a DiT grid varies, the transformer
    (parameters) and the patch (tokens per image). Gflops is about their product, so a law in Gflops alone
    gives laptop-XL/4 (0.052 Gflops) the loss of a bigger model than B/2 (0.042), where it is worse."""
    E: float
    axes: tuple
    A: tuple
    a: tuple
    n: int = 0
    n_starts: int = 0
    rmse_log: float = float("nan")

    def loss(self, frame) -> np.ndarray:
        """The law at the rows of `frame` (a DataFrame or a mapping holding every axis)."""
        total = self.E
        for axis, A, a in zip(self.axes, self.A, self.a):
            total = total + np.exp(np.log(A) - a * np.log(np.asarray(frame[axis], dtype=float)))
        return np.asarray(total, dtype=float)

    def to_dict(self) -> dict:
        return {"E": self.E, "terms": {ax: {"A": A, "a": a} for ax, A, a in zip(self.axes, self.A, self.a)},
                "n": self.n, "n_starts": self.n_starts, "rmse_log": self.rmse_log}


def _additive_objective(p, X, log_l, delta):
    """Huber(delta) of LSE(c_k - a_k log x_k ..., e) - log L, summed, and its gradient (p = c_1, a_1, ..., e)."""
    c, a = p[0:-1:2], p[1:-1:2]
    terms = np.concatenate([c[:, None] - a[:, None] * X, np.full((1, X.shape[1]), p[-1])])   # (K + 1, n)
    top = terms.max(axis=0)
    expd = np.exp(terms - top)
    total = expd.sum(axis=0)
    r = top + np.log(total) - log_l                                                          # log-sum-exp - log L
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum()
    w = expd / total * np.where(small, r, delta * np.sign(r))                                # softmax x dHuber/dr
    grad = np.empty_like(p)
    grad[0:-1:2], grad[1:-1:2], grad[-1] = w[:-1].sum(axis=1), -(w[:-1] * X).sum(axis=1), w[-1].sum()
    return value, grad


def _grid_values(inits: np.ndarray, X, log_l, delta, max_elements: int = 4_000_000) -> np.ndarray:
    """The objective at every starting point, (S, 2K + 1) -> (S,), in chunks of starts that keep the (starts,
    K + 1, points) array under `max_elements` (a 4^7 grid on 18K points would otherwise take tens of GB)."""
    chunk = max(1, max_elements // (X.shape[0] + 1) // X.shape[1])
    out = np.empty(inits.shape[0])
    for lo in range(0, inits.shape[0], chunk):
        part = inits[lo:lo + chunk]
        c, a = part[:, 0:-1:2], part[:, 1:-1:2]                                               # (S, K)
        terms = np.concatenate([c[:, :, None] - a[:, :, None] * X[None],
                                part[:, None, [-1]].repeat(X.shape[1], 2)], axis=1)          # (S, K + 1, n)
        top = terms.max(axis=1)
        r = np.abs(top + np.log(np.exp(terms - top[:, None]).sum(axis=1)) - log_l)
        out[lo:lo + chunk] = np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)).sum(axis=1)
    return out


def _fit_additive(xs, L, starts=(), delta: float = HUBER_DELTA, grid: int = 4, n_local: int = 12):
    """The one fitter of the additive laws: L = E + sum_k A_k / x_k^a_k, Huber on log L (Besiroglu et al. 2024),
    L-BFGS from the `n_local` best of a grid of starting points (`grid` values of each parameter, all scored at
    once) and from `starts` ((E, [A_k], [a_k]) in physical units, e.g. the full-data fit when bootstrapping).
    Each x_k is scaled by its geometric mean inside the fit so that one grid suits any units; exponents are
    bounded to [0, 5]. Returns (E, A, a, n_starts, rmse_log)."""
    X = np.log(np.stack([np.asarray(x, dtype=float).ravel() for x in xs]))                   # (K, n)
    x0 = X.mean(axis=1)
    X = X - x0[:, None]
    log_l = np.log(np.asarray(L, dtype=float).ravel())
    K, lmin = X.shape[0], float(log_l.min())
    span = np.linspace(0, 1, grid)
    axes = [lmin - 4.0 + 4.0 * span, 0.05 + 1.45 * span] * K + [lmin + np.log(0.05 + 0.9 * span)]
    inits = np.array(list(itertools.product(*axes)))
    if inits.shape[0] > n_local:
        inits = inits[np.argsort(_grid_values(inits, X, log_l, delta), kind="stable")[:n_local]]
    extra = [np.array([v for A, a, m in zip(As, as_, x0) for v in (np.log(A) - a * m, a)] + [np.log(max(E, 1e-12))])
             for E, As, as_ in starts]  # physical units -> the scaled parametrisation
    bounds = [(None, None), (0.0, 5.0)] * K + [(None, None)]
    best = None
    for p0 in list(inits) + extra:
        res = minimize(_additive_objective, p0, args=(X, log_l, delta), jac=True, method="L-BFGS-B", bounds=bounds)
        if best is None or res.fun < best.fun:
            best = res
    p = best.x
    a = p[1:-1:2]
    A = np.exp(p[0:-1:2] + a * x0)
    E = float(np.exp(p[-1]))
    pred = E + np.exp(np.log(A)[:, None] - a[:, None] * (X + x0[:, None])).sum(axis=0)
    rmse = float(np.sqrt(np.mean((np.log(pred) - log_l) ** 2)))
    return E, [float(v) for v in A], [float(v) for v in a], int(grid ** (2 * K + 1) + len(extra)), rmse


def _check_law_inputs(cols: dict, L) -> None:
    n = {k: np.asarray(v).size for k, v in cols.items()}
    if len(set(n.values()) | {np.asarray(L).size}) > 1:
        raise ValueError(f"the law's columns differ in length: {n} and L {np.asarray(L).size}")
    bad = [k for k, v in {**cols, "L": L}.items() if np.any(np.asarray(v, dtype=float) <= 0)]
    if bad:
        raise ValueError(f"the law needs every value > 0; not so in {', '.join(bad)}")
    few = [k for k, v in cols.items() if np.unique(np.asarray(v)).size < 2]
    if few or np.asarray(L).size < 2 * len(cols) + 1:
        raise ValueError(f"the law needs {2 * len(cols) + 1}+ points and 2+ distinct values of every axis; got "
                         f"{np.asarray(L).size} points, " + ", ".join(f"{np.unique(np.asarray(v)).size} of {k}"
                                                                       for k, v in cols.items()))


def fit_joint_law(N, D, L, starts=None, delta: float = HUBER_DELTA, grid: int = 4, n_local: int = 12) -> JointLaw:
    """Fit L = E + A / N^a + B / D^b (Besiroglu et al. 2024): Huber on log L, L-BFGS, best of many starts
    (`_fit_additive`; `starts`: JointLaw objects, e.g. the full-data fit when bootstrapping)."""
    N, D, L = (np.asarray(v, dtype=float).ravel() for v in (N, D, L))
    if not (N.shape == D.shape == L.shape):
        raise ValueError(f"N, D and L differ in length: {N.size}, {D.size}, {L.size}")
    if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0):
        raise ValueError("the joint law needs N > 0, D > 0 and L > 0")
    if np.unique(N).size < 2 or np.unique(D).size < 2 or N.size < 5:
        raise ValueError(f"the joint law needs 5+ points over 2+ sizes and 2+ data sizes; got {N.size} points, "
                         f"{np.unique(N).size} sizes, {np.unique(D).size} data sizes")
    E, (A, B), (a, b), n_starts, rmse = _fit_additive(
        [N, D], L, [(s.E, [s.A, s.B], [s.a, s.b]) for s in starts or ()], delta, grid, n_local)
    return JointLaw(E=E, A=A, a=a, B=B, b=b, n=int(N.size), n_starts=n_starts, rmse_log=rmse)


def fit_axes_law(df: pd.DataFrame, axes, loss_col: str, starts=None, delta: float = HUBER_DELTA, grid: int = 4,
                 n_local: int = 12) -> AxesLaw:
    """Fit L = E + sum_k A_k / x_k^a_k over the columns `axes` of `df` (AxesLaw), as fit_joint_law does."""
    axes = tuple(axes)
    missing = [c for c in (*axes, loss_col) if c not in df.columns]
    if missing:
        raise ValueError(f"the law's columns {missing} are not in the table; allowed: {sorted(df.columns)}")
    d = _finite(df, *axes, loss_col)
    cols = {c: d[c].to_numpy(float) for c in axes}
    _check_law_inputs(cols, d[loss_col].to_numpy(float))
    E, A, a, n_starts, rmse = _fit_additive(list(cols.values()), d[loss_col],
                                            [(s.E, s.A, s.a) for s in starts or ()], delta, grid, n_local)
    return AxesLaw(E=E, axes=axes, A=tuple(A), a=tuple(a), n=int(len(d)), n_starts=n_starts, rmse_log=rmse)


@dataclass
class JointLawFit:
    law: JointLaw                    # fit on all the data
    samples: pd.DataFrame            # E, A, a, B, b, n_opt_exponent of each bootstrap fit
    ci: dict                         # name -> (lo, hi) percentile interval at `level`
    level: float
    n_boot: int
    n_failed: int

    def to_dict(self) -> dict:
        return {"law": self.law.to_dict(), "ci": {k: list(v) for k, v in self.ci.items()}, "level": self.level,
                "n_boot": self.n_boot, "n_failed": self.n_failed}


def bootstrap_joint_law(df: pd.DataFrame, loss_col: str, size_col: str = "gflops_per_img",
                        data_col: str = "img_seen", group_col: str = "run_id", n_boot: int = 200, seed: int = 0,
                        level: float = 0.95, n_local: int = 12, boot_local: int = 2) -> JointLawFit:
    """The joint law fitted to every logged point, with intervals from resampling whole runs (each resample
    starts from the full-data fit and the `boot_local` best points of the grid)."""
    d = _finite(df, size_col, data_col, loss_col)
    d = d[d[data_col] > 0]
    law = fit_joint_law(d[size_col], d[data_col], d[loss_col], n_local=n_local)
    rows, failed = [], 0
    for frame in resample_groups(d, group_col, n_boot, seed):
        try:
            f = fit_joint_law(frame[size_col], frame[data_col], frame[loss_col], starts=[law],
                              n_local=boot_local)
        except ValueError:
            failed += 1
            continue
        rows.append((f.E, f.A, f.a, f.B, f.b, f.n_opt_exponent))
    samples = pd.DataFrame(rows, columns=["E", "A", "a", "B", "b", "n_opt_exponent"])
    ci = {k: _interval(samples[k], level) for k in samples.columns}
    return JointLawFit(law, samples, ci, level, n_boot, failed)


# ----------------------------------------------------------------------------- isoFLOP profiles (approach 2)


def loss_at_budget(df: pd.DataFrame, budget: float, loss_col: str, compute_col: str = "train_flops",
                   size_col: str = "gflops_per_img", group_col: str = "run_id", rtol: float = 0.03) -> pd.DataFrame:
    """One row per run whose logged points bracket `budget`: run_id, size, loss (log-log interpolation). A run
    whose last point falls short of the budget by less than `rtol` counts as reaching it, at its last value: a run
    trained to a budget (train.budget_flops) stops at the nearest whole step of the closed-form Gflops (within 0.5%
    of fvcore's), e.g. laptop-B/4 at 9.95e10 FLOPs for 1e11; half a step of a 20-step run is 2.5%."""
    return _at_budget(_curves(df, loss_col, compute_col, size_col, group_col), budget, loss_col, size_col,
                      group_col, rtol)


def _curves(df, loss_col, compute_col, size_col, group_col) -> list[tuple]:
    """(run, size, compute, log compute, log loss) of each run, its points in order of compute: the part of
    loss_at_budget that does not depend on the budget (a bootstrap reads 5 budgets off each resample)."""
    curves = []
    for run, g in df.groupby(group_col, sort=True):
        c, y = g[compute_col].to_numpy(float), g[loss_col].to_numpy(float)
        order = np.argsort(c)
        c, y = c[order], y[order]
        curves.append((run, float(g[size_col].iloc[0]), c, np.log(c), np.log(y)))
    return curves


def _at_budget(curves, budget, loss_col, size_col, group_col, rtol: float = 0.03) -> pd.DataFrame:
    rows = [{group_col: run, size_col: size, loss_col: float(np.exp(np.interp(np.log(budget), log_c, log_y)))}
            for run, size, c, log_c, log_y in curves if c.size >= 2 and c[0] <= budget <= c[-1] * (1 + rtol)]
    return pd.DataFrame(rows, columns=[group_col, size_col, loss_col])


def parabola_optimum(size, loss, neighbours: int | None = PARABOLA_NEIGHBOURS) -> tuple[float, bool, np.ndarray,
                                                                                      tuple[float, float]]:
    """(size at the minimum, interior?, coefficients, sizes fitted) of loss = c0 + c1 x + c2 x^2, x = log size,
    fitted to the measured best size (the lowest mean loss of its runs, e.g. seeds) and up to `neighbours` sizes on
    each side of it, as many on both sides (every size: None).

    A parabola is the minimum's local (second-order) shape: fitted across a wide sweep it follows the far sizes,
    and an asymmetric profile pulls its vertex off the measured minimum, even outside it (the laptop isoFLOP
    study at 1e12 FLOPs: XS best, XXS and S worse, yet the parabola over all six sizes, 79x in Gflops, put its
    minimum below XXS). interior: the sweep spans the optimum (the lowest measured loss is not at the smallest or
    largest size), the parabola opens upwards and its minimum lies strictly inside the sizes fitted; otherwise the
    size returned is the measured best (the optimum is at or beyond an edge of the sweep) and the parabola is the
    one through the 3 sizes nearest it."""
    x, y = np.log(np.asarray(size, dtype=float)), np.asarray(loss, dtype=float)
    sizes, which = np.unique(x, return_inverse=True)
    if sizes.size < 3:
        raise ValueError(f"an isoFLOP parabola needs 3+ sizes at the budget; got {sizes.size}")
    best = sizes[np.argmin(np.bincount(which, weights=y) / np.bincount(which))]  # by the mean of a size's runs
    if neighbours is not None:
        if neighbours < 1:
            raise ValueError(f"neighbours={neighbours!r}; allowed: an integer >= 1, or None for every size")
        i = int(np.searchsorted(sizes, best))
        k = min(neighbours, i, sizes.size - 1 - i)  # as many sizes on each side: centred on the best
        lo = i - k if k else min(max(i - 1, 0), sizes.size - 3)  # at an edge: the 3 nearest sizes (for the plot)
        sizes = sizes[lo:lo + max(2 * k + 1, 3)]
    keep = (x >= sizes[0]) & (x <= sizes[-1])
    c2, c1, c0 = np.polyfit(x[keep], y[keep], 2)
    window = (float(np.exp(sizes[0])), float(np.exp(sizes[-1])))
    spans = x.min() < best < x.max()
    if spans and c2 > 0 and sizes[0] < -c1 / (2 * c2) < sizes[-1]:
        return float(np.exp(-c1 / (2 * c2))), True, np.array([c0, c1, c2]), window
    return float(np.exp(best)), False, np.array([c0, c1, c2]), window


def default_budgets(df: pd.DataFrame, compute_col: str = "train_flops", group_col: str = "run_id",
                    n: int = 5) -> np.ndarray:
    """n budgets log-spaced strictly inside [3rd-smallest first logged compute, 3rd-largest last logged compute],
    so that 3+ runs can reach each one (the parabola needs 3 sizes)."""
    first = np.sort(df.groupby(group_col)[compute_col].min().to_numpy())
    last = np.sort(df.groupby(group_col)[compute_col].max().to_numpy())
    if first.size < 3:
        raise ValueError(f"isoFLOP profiles need 3+ runs; got {first.size}")
    lo, hi = first[2], last[-3]
    if not lo < hi:
        raise ValueError("no budget is reached by 3+ runs: the runs' compute ranges do not overlap enough")
    return np.geomspace(lo, hi, n + 2)[1:-1]


@dataclass
class IsoFlop:
    profiles: pd.DataFrame        # budget, run_id, size, loss: each run read at each budget
    optima: pd.DataFrame          # budget, n_opt, interior, n_lo, n_hi (bootstrap), loss_opt, c0, c1, c2, and
                                  # fit_lo, fit_hi: the sizes the parabola was fitted between
    fit: PowerLawFit | None       # N_opt = A C^-alpha (alpha < 0: N_opt grows with C), on the interior optima
    exponent_ci: tuple            # interval of -alpha (the exponent of N_opt in C)
    level: float
    n_boot: int
    size_col: str = "gflops_per_img"
    samples: pd.DataFrame = field(default=None)  # exponent of each bootstrap resample
    neighbours: int | None = PARABOLA_NEIGHBOURS  # sizes each side of the best that each parabola was fitted to

    @property
    def exponent(self) -> float:
        return float(-self.fit.alpha) if self.fit else float("nan")

    def to_dict(self) -> dict:
        return {"optima": self.optima.to_dict("records"), "n_opt_exponent": self.exponent,
                "n_opt_exponent_ci": list(self.exponent_ci), "level": self.level, "n_boot": self.n_boot,
                "parabola_neighbours": self.neighbours,
                "size_col": self.size_col, "fit": self.fit.to_dict() if self.fit else None}


def _optima(d, budgets, loss_col, compute_col, size_col, group_col, neighbours) -> tuple[pd.DataFrame, pd.DataFrame]:
    profiles, optima = [], []
    curves = _curves(d, loss_col, compute_col, size_col, group_col)
    for b in budgets:
        p = _at_budget(curves, b, loss_col, size_col, group_col)
        p.insert(0, "budget", b)
        profiles.append(p)
        if p[size_col].nunique() < 3:
            continue
        n_opt, interior, coef, (fit_lo, fit_hi) = parabola_optimum(p[size_col], p[loss_col], neighbours)
        loss_opt = float(np.polyval(coef[::-1], np.log(n_opt))) if interior else float(p[loss_col].min())
        optima.append({"budget": b, "n_opt": n_opt, "interior": interior, "loss_opt": loss_opt,
                       "c0": coef[0], "c1": coef[1], "c2": coef[2], "fit_lo": fit_lo, "fit_hi": fit_hi})
    return pd.concat(profiles, ignore_index=True), pd.DataFrame(
        optima, columns=["budget", "n_opt", "interior", "loss_opt", "c0", "c1", "c2", "fit_lo", "fit_hi"])


def _n_opt_law(optima: pd.DataFrame) -> PowerLawFit:
    inner = optima[optima["interior"]]
    return fit_power_law(inner["budget"], inner["n_opt"])


def isoflop_profiles(df: pd.DataFrame, loss_col: str, budgets=None, compute_col: str = "train_flops",
                     size_col: str = "gflops_per_img", group_col: str = "run_id", n_boot: int = 200,
                     seed: int = 0, level: float = 0.95, neighbours: int | None = PARABOLA_NEIGHBOURS) -> IsoFlop:
    """Approach 2: per budget, loss vs size across runs, its parabola's optimum (parabola_optimum: fitted to the
    best size and `neighbours` sizes each side; with a bootstrap interval over runs), and N_opt(C) = G C^beta
    fitted to the interior optima (beta with its bootstrap interval)."""
    d = _finite(df, compute_col, size_col, loss_col)
    d = d[d[compute_col] > 0]
    budgets = default_budgets(d, compute_col, group_col) if budgets is None else np.asarray(budgets, dtype=float)
    profiles, optima = _optima(d, budgets, loss_col, compute_col, size_col, group_col, neighbours)
    if optima.empty:
        raise ValueError("no budget has 3+ sizes whose curves reach it; no isoFLOP optimum")
    fit = _n_opt_law(optima) if optima["interior"].sum() >= 2 else None
    per_budget = {b: [] for b in optima["budget"]}
    exps = []
    for frame in resample_groups(d, group_col, n_boot, seed):
        try:
            _, opt = _optima(frame, optima["budget"], loss_col, compute_col, size_col, group_col, neighbours)
        except ValueError:
            continue
        for b, n in zip(opt["budget"], opt["n_opt"]):
            per_budget[b].append(n)
        if fit is not None and opt["interior"].sum() >= 2:
            try:
                exps.append(-_n_opt_law(opt).alpha)
            except ValueError:
                pass
    bands = [_interval(per_budget[b], level) for b in optima["budget"]]
    optima["n_lo"], optima["n_hi"] = [lo for lo, _ in bands], [hi for _, hi in bands]
    return IsoFlop(profiles, optima, fit, _interval(exps, level), level, n_boot, size_col,
                   pd.DataFrame({"exponent": exps}), neighbours)


# ----------------------------------------------------------------------------- FD as a function of loss


def fd_metric(df: pd.DataFrame, fd_col: str = "fd") -> str:
    """The column of one FD sample size to fit FD on: `fd_col` when it holds one metric, else the named column
    (e.g. fd250_domain) of its most common metric_name, the N of every evaluated checkpoint (the curves)."""
    if fd_col != "fd" or "metric_name" not in df.columns:
        return fd_col
    names = df.loc[df[fd_col].notna(), "metric_name"].dropna()
    if names.nunique() <= 1:
        return fd_col
    counts = names.value_counts(sort=False)
    name = str(counts.index[np.argmax(counts.to_numpy())])   # the most common; on a tie the first seen
    if name not in df.columns:
        raise ValueError(f"{fd_col} mixes metrics {sorted(names.unique())} and the table has no {name!r} column")
    return name


def one_row_per_step(df: pd.DataFrame, prefer_col: str | None = None) -> pd.DataFrame:
    """One row per (run_id, step): the rows of one step (one per eval setting, e.g. FD-250 and FD-500 of the
    final checkpoint) merged, each column taking the first non-empty value, the rows with `prefer_col` first. A
    loss curve then counts every step once, and each named metric column (fd250_domain, fd500_domain) keeps its
    values. Rows without a step (runs without evals) are kept as they are."""
    if df.empty or "step" not in df.columns:
        return df
    keys = ["run_id", "step"]
    d = df[df["step"].notna()]
    if not d.duplicated(keys).any():
        return df
    order = d.assign(_pos=np.arange(len(d))).groupby(keys, sort=False)["_pos"].min()  # first appearance
    if prefer_col is not None and prefer_col in d.columns:
        d = d.assign(_later=d[prefer_col].isna()).sort_values("_later", kind="stable").drop(columns="_later")
    merged = d.groupby(keys, sort=False, dropna=False).first()
    merged = merged.loc[order.sort_values().index].reset_index()
    merged = merged[[c for c in df.columns if c in merged.columns]]
    return pd.concat([merged, df[df["step"].isna()]], ignore_index=True)


def fit_fd_vs_loss(df: pd.DataFrame, loss_col: str, fd_col: str = "fd") -> PowerLawFit:
    """FD = A L^k (a line in log-log; k = -alpha of the fit), Huber, on the rows given.

    Fit it only on runs a forecast may see. One FD sample size and feature space: mixing FD-500 and FD-1K (whose
    bias differs) raises."""
    d = _finite(df, loss_col, fd_col)
    if "metric_name" in d.columns and d["metric_name"].nunique() > 1:
        raise ValueError(f"FD vs loss mixes metrics {sorted(d['metric_name'].unique())}; select one metric_name")
    return fit_power_law(d[loss_col], d[fd_col])
