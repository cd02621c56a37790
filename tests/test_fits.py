import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from analysis.fits import (bootstrap_fit, bootstrap_frontier, compute_optimal_model, contested_range, fit_frontier,
                           fit_power_law, frontier, held_out, last_common_rows, pearson_log, predict, predict_band,
                           scaling_checks)
from scaling.results import paper_table


def test_exact_power_law_is_recovered():
    x = np.geomspace(1e15, 1e20, 9)  # FLOPs-sized x must not overflow
    y = 3e4 * x ** -0.27
    fit = fit_power_law(x, y)
    assert fit.alpha == pytest.approx(0.27, abs=1e-6)
    assert fit.A == pytest.approx(3e4, rel=1e-4)
    assert fit.E == 0.0 and not fit.floor
    np.testing.assert_allclose(predict(fit, x), y, rtol=1e-6)


def test_noisy_power_law_exponent_is_close():
    rng = np.random.default_rng(1)
    x = np.geomspace(1, 1000, 40)
    y = 7.0 * x ** -0.4 * np.exp(rng.normal(0, 0.05, x.size))
    assert fit_power_law(x, y).alpha == pytest.approx(0.4, abs=0.03)


def test_huber_fit_is_robust_to_one_outlier():
    x = np.geomspace(1, 100, 12)
    y = 50.0 * x ** -0.5
    y[-1] *= 4.0  # one broken evaluation at the largest model
    ols_alpha = -np.polyfit(np.log(x), np.log(y), 1)[0]
    assert abs(ols_alpha - 0.5) > 0.08  # plain least squares is pulled away ...
    assert fit_power_law(x, y).alpha == pytest.approx(0.5, abs=0.02)  # ... the Huber fit is not


def test_floor_fit_recovers_the_floor():
    rng = np.random.default_rng(2)
    x = np.geomspace(1, 1e4, 25)
    y = 2.0 + 40.0 * x ** -0.6
    exact = fit_power_law(x, y, floor=True)
    assert exact.E == pytest.approx(2.0, rel=1e-3)
    assert exact.alpha == pytest.approx(0.6, rel=1e-3)
    noisy = fit_power_law(x, y * np.exp(rng.normal(0, 0.01, x.size)), floor=True)
    assert noisy.E == pytest.approx(2.0, abs=0.15)
    # without a floor the same data gives a visibly wrong (too flat) exponent
    assert fit_power_law(x, y).alpha < 0.45


def test_bad_input_raises():
    with pytest.raises(ValueError, match="x > 0 and y > 0"):
        fit_power_law([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match="at least 3 distinct x"):
        fit_power_law([1, 2, 2], [3, 2, 2], floor=True)
    with pytest.raises(ValueError, match="differ in length"):
        fit_power_law([1, 2, 3], [1, 2])


def test_bootstrap_interval_covers_true_exponent():
    """Known power law with lognormal noise: the 95% interval covers alpha in >= 27 of 30 seeds."""
    alpha, n_runs = 0.4, 16
    covered, widths = 0, []
    for seed in range(30):
        rng = np.random.default_rng(1000 + seed)
        x = np.geomspace(1, 1000, n_runs)
        df = pd.DataFrame({"run_id": [f"r{i}" for i in range(n_runs)], "x": x,
                           "y": 5.0 * x ** -alpha * np.exp(rng.normal(0, 0.1, n_runs))})
        boot = bootstrap_fit(df, "x", "y", n_boot=200, seed=seed)
        lo, hi = boot.ci["alpha"]
        covered += lo <= alpha <= hi
        widths.append(hi - lo)
    assert covered >= 27
    assert 0.02 < np.median(widths) < 0.2  # an interval, not the whole line


def test_bootstrap_resamples_runs_not_rows():
    # Two runs, each with 10 checkpoints at its own x. Resampling runs picks the same run twice half the time
    # (one distinct x: unfittable); resampling rows almost never would.
    df = pd.DataFrame({"run_id": ["a"] * 10 + ["b"] * 10, "x": [1.0] * 10 + [10.0] * 10,
                       "y": np.r_[np.full(10, 5.0), np.full(10, 2.0)] * np.exp(np.linspace(-0.01, 0.01, 20))})
    boot = bootstrap_fit(df, "x", "y", n_boot=400, seed=0)
    assert boot.n_groups == 2
    assert 0.35 < boot.n_failed / boot.n_boot < 0.65
    assert len(boot.samples) == boot.n_boot - boot.n_failed


def test_bootstrap_band_contains_fit():
    x = np.geomspace(1, 100, 10)
    df = pd.DataFrame({"run_id": range(10), "x": x, "y": 3 * x ** -0.3 * np.exp(np.sin(np.arange(10)) * 0.05)})
    boot = bootstrap_fit(df, "x", "y", n_boot=100, x_pred=[1, 10, 100])
    band = predict_band(boot, [1, 10, 100])
    pd.testing.assert_frame_equal(band, boot.pred)
    assert (band["y_lo"] <= band["y"]).all() and (band["y"] <= band["y_hi"]).all()
    with pytest.raises(ValueError, match="group_col='seed'"):
        bootstrap_fit(df, "x", "y", group_col="seed")


def test_pearson_reproduces_paper_fig8():
    df = paper_table()
    r = pearson_log(df, "gflops_per_img", "fd")
    assert round(r, 2) == -0.93
    assert r == pytest.approx(pearsonr(np.log10(df["gflops_per_img"]), df["fd"]).statistic, abs=1e-12)


def test_scaling_checks_on_table_4_and_an_exception():
    """Table 4 (FID-50K at 400K steps): r = -0.93 and no exception in the 17 neighbour pairs (3 sizes pairs at
    each of 3 patches, 2 patch pairs at each of 4 sizes). With XL/4's FID made L/4's + 1, that pair is named."""
    df = paper_table()
    c = scaling_checks(df, ["fd"])["fd"]
    assert (c["step"], c["n_points"], round(c["pearson_r_log10_gflops"], 2)) == (400000, 12, -0.93)
    assert c["n_pairs"] == 17 and c["exceptions"] == []
    df.loc[(df["model"] == "dit_xl") & (df["patch"] == 4), "fd"] = 45.64 + 1
    (e,) = scaling_checks(df, ["fd"])["fd"]["exceptions"]
    assert (e["expected_lower"], e["other"], e["values"]) == ("dit_xl/4", "dit_l/4", [46.64, 45.64])
    assert e["rel_gap"] == pytest.approx(1 / 45.64)
    df.loc[(df["model"] == "dit_b") & (df["patch"] == 2), "fd"] = 68.38  # a tie with B/4 is an exception too
    assert len(scaling_checks(df, ["fd"])["fd"]["exceptions"]) == 2


def test_checks_read_the_last_step_every_run_reached():
    df = pd.DataFrame({"run_id": ["a", "a", "a", "b", "b", "c", "c"], "step": [1, 2, 3, 1, 2, 2, 4],
                       "gflops_per_img": [1, 1, 1, 2, 2, 4, 4], "loss": [5, 4, 3, 4, 3, np.nan, 1.0]})
    assert last_common_rows(df, "loss").empty  # c has no finite loss at step 2
    df.loc[5, "loss"] = 2.0
    last = last_common_rows(df, "loss")
    assert last["run_id"].tolist() == ["a", "b", "c"] and last["step"].tolist() == [2, 2, 2]
    c = scaling_checks(df, ["loss"])["loss"]
    assert (c["step"], c["last_step_max"]) == (2, 4)  # c's step 4 is later than any step all three share
    assert c["ordering_skipped"] == "no model and patch columns" and "exceptions" not in c
    assert c["pearson_r_log10_gflops"] == pytest.approx(-1.0)
    assert scaling_checks(df.iloc[:5], ["loss"]) == {"loss": {"skipped": "2 runs have a loss at a common step; 3+ "
                                                                         "needed"}}
    flat = df.assign(loss=1.0)  # a constant has no correlation: said, never a NaN in laws.json
    assert scaling_checks(flat, ["loss"]) == {"loss": {"skipped": "loss or gflops_per_img is the same for every "
                                                                  "run at step 2"}}


def test_ordering_compares_one_block_design_at_a_time_and_refuses_duplicates():
    df = paper_table()
    other = df.assign(block="in_context", fd=df["fd"] * 1.5, run_id=df["run_id"] + "-ic")
    other.loc[other["model"] == "dit_s", "params"] = np.nan  # no size: in the patch pairs only
    c = scaling_checks(pd.concat([df, other], ignore_index=True), ["fd"])["fd"]
    assert c["n_pairs"] == 17 + (3 * 2 + 4 * 2) and c["exceptions"] == [] and c["n_points"] == 24
    nan_patch = pd.concat([df, df.iloc[[0]].assign(patch=np.nan, run_id="x")], ignore_index=True)
    assert scaling_checks(nan_patch, ["fd"])["fd"]["n_pairs"] == 17  # a row without a patch is left out
    seeds = pd.concat([df, df.iloc[[0]].assign(run_id="dit_b-p2-s1")], ignore_index=True)
    c = scaling_checks(seeds, ["fd"])["fd"]
    assert c["pearson_r_log10_gflops"] < -0.9 and "exceptions" not in c
    assert c["ordering_skipped"].startswith("1 grid points have two or more rows, e.g. dit_b/2 (")
    assert "allowed: one row per model, patch and block" in c["ordering_skipped"]


def test_frontier_is_the_running_minimum():
    df = pd.DataFrame({"run_id": ["s", "s", "s", "l", "l", "l"],
                       "train_flops": [1, 2, 4, 3, 6, 12], "fd": [50, 40, 35, 45, 30, 20]})
    f = frontier(df)
    assert list(zip(f["run_id"], f["train_flops"], f["fd"])) == [("s", 1, 50), ("s", 2, 40), ("s", 4, 35),
                                                                   ("l", 6, 30), ("l", 12, 20)]
    # invariant on random data: each frontier point is the best of everything at or below its compute
    rng = np.random.default_rng(0)
    r = pd.DataFrame({"run_id": rng.integers(0, 5, 200), "train_flops": rng.uniform(1, 100, 200),
                      "fd": rng.uniform(1, 100, 200)})
    f = frontier(r)
    assert (np.diff(f["fd"]) < 0).all() and (np.diff(f["train_flops"]) >= 0).all()
    for c, y in zip(f["train_flops"], f["fd"]):
        assert y == r.loc[r["train_flops"] <= c, "fd"].min()


def test_frontier_fit_recovers_the_envelope():
    # one run per envelope point lies on y = 10 c^-0.3; other checkpoints lie 50% above it
    c = np.geomspace(1e12, 1e16, 12)
    rows = [{"run_id": f"on{i}", "train_flops": ci, "fd": 10 * ci ** -0.3 * 1e4} for i, ci in enumerate(c)]
    rows += [{"run_id": f"off{i}", "train_flops": ci * 1.3, "fd": 1.5 * 10 * (ci * 1.3) ** -0.3 * 1e4}
             for i, ci in enumerate(c)]
    df = pd.DataFrame(rows)
    assert len(frontier(df)) == 12
    assert fit_frontier(df).alpha == pytest.approx(0.3, abs=1e-6)
    # a resample missing an envelope run lets a point above the envelope onto the frontier: the interval
    # widens around the true exponent but still holds it
    boot = bootstrap_frontier(df, n_boot=100, seed=0)
    lo, hi = boot.ci["alpha"]
    # (0.106 wide: the first envelope run, alone at its compute, is outside the contested range and not fitted)
    assert lo < 0.3 <= hi + 1e-6 and hi - lo < 0.12
    assert boot.fit.alpha == pytest.approx(0.3, abs=1e-6)


def test_contested_range_is_where_two_distinct_runs_reach():
    c = [1, 2, 4, 3, 6, 12, 0.5, 1]
    g = ["s", "s", "s", "l", "l", "l", "t", "t"]
    assert contested_range(c, g) == (1.0, 4.0)  # second-lowest first point (s), second-highest last (s)
    assert contested_range(c[:3] * 2, g[:3] * 2) == (np.inf, -np.inf)  # one run, twice (a bootstrap resample): empty
    with pytest.raises(ValueError, match="1 points have no run"):
        contested_range(c, g[:-1] + [None])
    assert frontier(pd.DataFrame({"run_id": g, "train_flops": c, "fd": [50, 40, 35, 45, 30, 20, 60, 55]}))[
        "contested"].tolist() == [False, True, True, True, False, False]  # t at 0.5; s 1-4; l at 6, 12 beyond 4
    with pytest.raises(ValueError, match="at least 2 distinct x"):  # one run: nothing contested to fit
        fit_frontier(pd.DataFrame({"run_id": ["s"] * 3, "train_flops": [1, 2, 4], "fd": [50, 40, 35]}))
    df = pd.DataFrame({"run_id": g, "train_flops": c, "fd": [50, 40, 35, 45, 30, 20, 60, 55]})
    with pytest.raises(ValueError, match="group_col='seed' is not a column"):
        fit_frontier(df, group_col="seed")
    assert fit_frontier(df.drop(columns="run_id"), contested=False).alpha > 0


def _two_runs(noise=0.0, seed=0):
    """A small model better at low compute, a 4x larger one better at high compute.

    FID = a (1 + 6000 / step) with a = 35 (small), 20 (large); at equal compute the large run has made 4x fewer
    steps, so the curves cross at step 18000 of the small run, i.e. 7.68e11 x 18000 = 1.38e16 FLOPs.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for run, g, a in (("small", 1.0, 35.0), ("large", 4.0, 20.0)):
        for step in (1e3, 2e3, 4e3, 8e3, 16e3, 32e3, 64e3):
            c = g * 1e9 * 256 * step * 3
            fid = a * (1 + 6e3 / step) * np.exp(rng.normal(0, noise))
            rows.append({"run_id": run, "model": run, "patch": 2, "train_flops": c, "fd": fid})
    return pd.DataFrame(rows)


def test_compute_optimal_model():
    df = _two_runs()
    low = compute_optimal_model(df, 4e15, n_boot=50)
    assert low.best == "small" and low.table.loc[0, "fraction_best"] == 1.0
    high = compute_optimal_model(df, 4.5e16, n_boot=50)
    assert high.best == "large" and high.table["run_id"].tolist() == ["large", "small"]
    noisy = compute_optimal_model(_two_runs(noise=0.05, seed=3), 4.5e16, n_boot=200, seed=1)
    assert noisy.table["fraction_best"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="budget=1e\\+20 is outside every run's compute range"):
        compute_optimal_model(df, 1e20)


def test_compute_optimal_uncertainty_grows_where_curves_cross():
    df = _two_runs(noise=0.08, seed=4)
    far = compute_optimal_model(df, 4.5e16, n_boot=300, seed=0)   # large model clearly ahead
    cross = [compute_optimal_model(df, b, n_boot=300, seed=0) for b in np.geomspace(1e16, 2e16, 6)]
    assert far.table.set_index("run_id").loc["large", "fraction_best"] > 0.9
    assert min(max(c.table["fraction_best"]) for c in cross) < 0.9


def test_held_out_largest_model():
    x = np.geomspace(1, 200, 8)
    df = pd.DataFrame({"run_id": [f"m{i}" for i in range(8)], "g": x, "fd": 100 * x ** -0.35})
    h = held_out(df, "g", "fd")
    assert h.table["run_id"].tolist() == ["m7"]
    assert h.max_abs_rel_error < 1e-6
    assert h.fit.n == 7
    df.loc[7, "fd"] *= 1.2  # the largest model underperforms the law by 20%
    h = held_out(df, "g", "fd")
    assert h.table["rel_error"].iloc[0] == pytest.approx(1 / 1.2 - 1, rel=1e-4)
    assert held_out(df, "g", "fd", holdout=["m0", "m1"]).table["run_id"].tolist() == ["m0", "m1"]
    with pytest.raises(ValueError, match="holdout=\\['zz'\\] not found"):
        held_out(df, "g", "fd", holdout="zz")
