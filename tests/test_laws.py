"""The forecasting laws on synthetic data with known exponents (tests/fakes.py: LOSS_LAW, FD_LAW).

Coverage and interval widths: test_interval_coverage_over_seeds (slow; 20 seeds, 100 bootstrap resamples of
runs, 95% intervals, 12 models x 24 logged points, lognormal noise 0.5% on the loss).
"""

import numpy as np
import pandas as pd
import pytest

from analysis.fits import bootstrap_frontier, fit_frontier
from analysis.laws import (FLOPS_PER_GFLOP_IMG, JointLaw, _grid_values, bootstrap_joint_law, default_budgets,
                           fit_axes_law, fit_fd_vs_loss, fit_joint_law, isoflop_profiles, loss_at_budget,
                           parabola_optimum)
from fakes import AXES_LAW, FD_LAW, LOSS_LAW, axes_table, loss_table

TRUE = JointLaw(**LOSS_LAW)


def test_joint_law_recovers_an_exact_law():
    df = loss_table(sigma=0.0)
    j = fit_joint_law(df["gflops_per_img"], df["img_seen"], df["val_mse_ema"])
    for k in ("E", "A", "a", "B", "b"):
        assert getattr(j, k) == pytest.approx(LOSS_LAW[k], rel=2e-3), k
    assert j.rmse_log < 1e-4 and j.n == len(df) and j.n_starts == 4 ** 5
    np.testing.assert_allclose(j.loss(df["gflops_per_img"], df["img_seen"]), df["val_mse_ema"], rtol=1e-4)


def test_joint_law_is_robust_to_broken_points():
    df = loss_table(sigma=0.002, seed=3)
    broken = df.sample(6, random_state=0).index
    df.loc[broken, "val_mse_ema"] *= 3.0  # six diverged evaluations out of 288
    j = fit_joint_law(df["gflops_per_img"], df["img_seen"], df["val_mse_ema"])
    assert j.a == pytest.approx(LOSS_LAW["a"], abs=0.02) and j.b == pytest.approx(LOSS_LAW["b"], abs=0.02)
    with pytest.raises(ValueError, match="2\\+ sizes"):
        fit_joint_law([1, 1, 1, 1, 1], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="L > 0"):
        fit_joint_law([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 1, 0, 1, 1])


def test_axes_law_recovers_params_tokens_and_data_exponents():
    df = axes_table()
    law = fit_axes_law(df, ("params", "tokens", "img_seen"), "val_mse_ema")
    assert law.E == pytest.approx(AXES_LAW["E"], rel=2e-3) and law.n == len(df) and law.n_starts == 4 ** 7
    for axis, A, a in zip(law.axes, law.A, law.a):
        assert (A, a) == pytest.approx(AXES_LAW[axis], rel=5e-3), axis
    np.testing.assert_allclose(law.loss(df), df["val_mse_ema"], rtol=1e-4)
    noisy = fit_axes_law(axes_table(sigma=0.005, seed=1), ("params", "tokens", "img_seen"), "val_mse_ema")
    assert noisy.a == pytest.approx((0.45, 0.6, 0.5), abs=0.06)
    # the grid of starts is scored in chunks: the same values whatever the chunk
    inits = np.random.default_rng(0).uniform(-3, 1, size=(50, 7))
    X, log_l = np.log(df[["params", "tokens", "img_seen"]].to_numpy().T), np.log(df["val_mse_ema"].to_numpy())
    np.testing.assert_allclose(_grid_values(inits, X, log_l, 1e-3, max_elements=1000),
                               _grid_values(inits, X, log_l, 1e-3), rtol=1e-12)
    # The joint law is the two-axis case of the same fitter: the same numbers either way.
    j = fit_joint_law(df["gflops_per_img"], df["img_seen"], df["val_mse_ema"])
    two = fit_axes_law(df, ("gflops_per_img", "img_seen"), "val_mse_ema")
    assert (j.E, j.A, j.a, j.B, j.b) == pytest.approx((two.E, *two.A[:1], *two.a[:1], two.A[1], two.a[1]))


def test_axes_law_refuses_what_it_cannot_fit():
    df = axes_table()
    with pytest.raises(ValueError, match="columns \\['patch_area'\\] are not in the table"):
        fit_axes_law(df, ("params", "patch_area"), "val_mse_ema")
    with pytest.raises(ValueError, match="2\\+ distinct values of every axis; got .* 1 of tokens"):
        fit_axes_law(df[df["tokens"] == 16], ("params", "tokens", "img_seen"), "val_mse_ema")
    bad = df.assign(params=df["params"].where(df.index > 0, 0.0))
    with pytest.raises(ValueError, match="every value > 0; not so in params"):
        fit_axes_law(bad, ("params", "img_seen"), "val_mse_ema")


def test_n_opt_of_the_joint_law_minimises_the_loss_at_fixed_compute():
    for c in (1e10, 1e12, 1e14):
        n = np.geomspace(1e-5, 10, 20001)
        loss = TRUE.loss(n, c / (FLOPS_PER_GFLOP_IMG * n))
        assert TRUE.n_opt(c) == pytest.approx(n[np.argmin(loss)], rel=2e-3)
    assert TRUE.n_opt_exponent == pytest.approx(0.45 / 0.8)


def test_parabola_optimum_and_edges():
    x = np.geomspace(1, 100, 7)
    n, interior, _, window = parabola_optimum(x, 1 + (np.log(x) - np.log(10)) ** 2)
    assert interior and n == pytest.approx(10) and window == pytest.approx((x[1], x[5]))  # 2 sizes each side
    assert parabola_optimum(x, 1 + (np.log(x) - np.log(10)) ** 2, neighbours=None)[3] == pytest.approx((1, 100))
    n, interior, _, window = parabola_optimum(x, 1 / x)  # falls all the way: the optimum is beyond the largest size
    assert not interior and n == pytest.approx(100) and window == pytest.approx((x[4], 100))
    with pytest.raises(ValueError, match="3\\+ sizes"):
        parabola_optimum([1, 2, 2], [3, 2, 1])
    with pytest.raises(ValueError, match="neighbours=0; allowed: an integer >= 1"):
        parabola_optimum(x, 1 / x, neighbours=0)


def test_parabola_is_fitted_around_the_measured_best():
    """The laptop isoFLOP profile at 1e12 FLOPs (docs/laptop/isoflop/isoflop_profiles.csv): XS is best, XXS and S
    are worse, but L, 37x larger, is far off the minimum's shape. Fitted to all six sizes, the parabola put its
    minimum just below XXS, the smallest size (not interior); fitted around XS (one size each side, as XXS is the
    smallest), it passes through XXS, XS and S and its minimum lies between XXS and XS."""
    size = [0.00048, 0.00103, 0.00264, 0.00579, 0.01017, 0.03776]
    loss = [0.07231, 0.07087, 0.08005, 0.08639, 0.09528, 0.11899]
    n_all, interior_all, (c0, c1, c2), _ = parabola_optimum(size, loss, neighbours=None)
    assert not interior_all and n_all == pytest.approx(0.00103)  # the measured best, reported as an edge
    assert np.exp(-c1 / (2 * c2)) < 0.00048
    n, interior, coef, window = parabola_optimum(size, loss)
    assert interior and 0.00048 < n < 0.00103 and window == pytest.approx((0.00048, 0.00264))
    np.testing.assert_allclose(np.polyval(coef[::-1], np.log(size[:3])), loss[:3], rtol=1e-9)
    # the best further in: two sizes each side (S best: from XXS to B)
    loss_s = [0.090, 0.081, 0.080, 0.0805, 0.085, 0.11]
    assert parabola_optimum(size, loss_s)[3] == pytest.approx((0.00048, 0.01017))
    # seeds: the best size is the one of the lowest mean (XS), not of the luckiest run (S's second seed, 0.0690)
    n2, interior2, _, window2 = parabola_optimum(size + [0.00264], loss + [0.0690])
    assert interior2 and window2 == pytest.approx((0.00048, 0.00264))


def test_loss_at_budget_interpolates_and_never_extrapolates():
    df = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "train_flops": [1.0, 100.0, 50.0, 200.0],
                       "gflops_per_img": [1, 1, 2, 2], "loss": [10.0, 1.0, 4.0, 2.0]})
    at = loss_at_budget(df, 10.0, "loss")
    assert at["run_id"].tolist() == ["a"] and at["loss"].iloc[0] == pytest.approx(10 ** 0.5)  # log-log midpoint
    assert loss_at_budget(df, 300.0, "loss").empty
    # a run trained to a budget stops at a whole step, just short of it: within 3% it reaches it, at its last value
    assert loss_at_budget(df, 102.0, "loss").set_index("run_id")["loss"].to_dict() == {"a": 1.0, "b": pytest.approx(
        4.0 * (2.0 / 4.0) ** (np.log(102.0 / 50) / np.log(4)))}
    assert loss_at_budget(df, 104.0, "loss")["run_id"].tolist() == ["b"]


def test_isoflop_optima_follow_the_law():
    df = loss_table(sigma=0.0, steps=tuple(range(25, 2401, 25)))
    iso = isoflop_profiles(df, "val_mse_ema", n_boot=20)
    inner = iso.optima[iso.optima["interior"]]
    assert len(inner) >= 3
    # a parabola on a discrete grid is biased where the profile is asymmetric (module docstring): fitted around
    # the best size, within 1.1% of the true optimum size here (fitted to all 12 sizes: 4.3%)
    np.testing.assert_allclose(inner["n_opt"], TRUE.n_opt(inner["budget"]), rtol=0.015)
    assert iso.exponent == pytest.approx(TRUE.n_opt_exponent, abs=0.1)
    assert (inner["n_lo"] <= inner["n_opt"] + 1e-12).all() and (inner["n_opt"] <= inner["n_hi"] + 1e-12).all()
    b = default_budgets(df)
    assert len(b) == 5 and all(len(loss_at_budget(df, x, "val_mse_ema")) >= 3 for x in b)


def test_fd_vs_loss_recovers_its_law_and_refuses_mixed_metrics():
    df = loss_table(fd_sigma=0.0)
    law = fit_fd_vs_loss(df, "val_mse_ema", "fd")
    assert -law.alpha == pytest.approx(FD_LAW["k"], rel=1e-6) and law.A == pytest.approx(FD_LAW["F"], rel=1e-4)
    mixed = df.copy()
    evaluated = mixed.index[mixed["fd"].notna()]
    mixed.loc[evaluated[::2], "metric_name"] = "fd1k_domain"
    with pytest.raises(ValueError, match="mixes metrics"):
        fit_fd_vs_loss(mixed, "val_mse_ema", "fd")


def _touching_runs(seed: int, sigma: float) -> pd.DataFrame:
    """10 runs whose curves touch the envelope L = 0.05 + 40 C^-0.2 once each, lognormal noise `sigma`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, c_touch in enumerate(np.geomspace(1e10, 1e14, 10)):
        for c in c_touch * np.geomspace(0.1 if i else 1.0, 10 if i < 9 else 1.0, 15):
            above = 1 + 0.3 * np.log10(c / c_touch) ** 2
            rows.append({"run_id": f"r{i}", "train_flops": c,
                         "loss": (0.05 + 40 * c ** -0.2 * above) * np.exp(rng.normal(0, sigma))})
    return pd.DataFrame(rows)


def test_envelope_fit_with_floor_on_an_exact_envelope():
    """Approach 1 on curves that touch E + A C^-alpha once each: the frontier fit with floor recovers it.

    Each run starts a decade below its touch, so the second run starts at 0.28x the first run's touch: until a
    second run has started (the third run's start, 7.7e9) the running minimum is that run's own early curve, up
    to 27% above the law. Fitted with it, the exponent and the floor came out 0.232 and 0.068 (true 0.2 and
    0.05); the fit keeps to contested_range."""
    df = _touching_runs(0, 0.002)
    exact = fit_frontier(df.assign(loss=0.05 + 40 * df["train_flops"] ** -0.2), metric_col="loss", floor=True)
    assert exact.alpha == pytest.approx(0.2, rel=1e-3) and exact.E == pytest.approx(0.05, rel=1e-3)
    clean = fit_frontier(_touching_runs(0, 0.0), metric_col="loss", floor=True)  # the scallops alone: 0.195
    assert clean.alpha == pytest.approx(0.2, abs=0.01) and clean.E == pytest.approx(0.05, abs=0.005)
    every = fit_frontier(_touching_runs(0, 0.0), metric_col="loss", floor=True, contested=False)
    assert every.alpha > 0.225 and every.E > 0.065  # the bias the range removes
    boot = bootstrap_frontier(df, metric_col="loss", floor=True, n_boot=100)
    lo, hi = boot.ci["alpha"]
    assert lo <= 0.2 <= hi and hi - lo < 0.15  # 0.131: resampling runs moves the contested range


@pytest.mark.slow
def test_interval_coverage_over_seeds():
    """95% intervals of the joint law's exponents and N_opt exponent (approach 3), of approach 2's N_opt
    exponent and of the envelope's (approach 1) cover the truth in >= 90% of 20 seeds. Median widths below."""
    truth = {"a": LOSS_LAW["a"], "b": LOSS_LAW["b"], "E": LOSS_LAW["E"], "n_opt_exponent": TRUE.n_opt_exponent,
             "isoflop": TRUE.n_opt_exponent, "envelope": 0.2}
    cover, widths = {k: 0 for k in truth}, {k: [] for k in truth}
    for seed in range(20):
        df = loss_table(seed=100 + seed)
        j = bootstrap_joint_law(df, "val_mse_ema", n_boot=100, seed=seed)
        ci = {k: j.ci[k] for k in ("a", "b", "E", "n_opt_exponent")}
        ci["isoflop"] = isoflop_profiles(df, "val_mse_ema", n_boot=100, seed=seed).exponent_ci
        ci["envelope"] = bootstrap_frontier(_touching_runs(seed, 0.005), metric_col="loss", floor=True,
                                            n_boot=100, seed=seed).ci["alpha"]
        for k, (lo, hi) in ci.items():
            cover[k] += lo <= truth[k] <= hi
            widths[k].append(hi - lo)
    report = {k: (cover[k], round(float(np.median(widths[k])), 4)) for k in truth}
    print("coverage of 20 seeds, median 95% interval width:", report)
    # measured: a 20/20 (width 0.011), b 19/20 (0.021), E 20/20 (0.0029), N_opt exponent 19/20 (0.015),
    # isoFLOP N_opt exponent 19/20 (0.43; 19/20 at 0.29 with each parabola fitted to all 12 sizes), envelope
    # exponent 20/20 (0.118; 16/20 at 0.085 when the fit took the frontier outside the contested range, biased to
    # 0.236 on average). The envelope's interval is conservative:
    # 0.118 is ~40 sd of its seed-to-seed spread (sd 0.003), since resampling runs measures which sizes were
    # trained, not noise; and the running minimum of noisy points still keeps those that fell low by chance
    # (mean 0.196 against 0.195 without noise here), a bias resampling runs does not see.
    assert all(report[k][0] >= 18 for k in truth), report
    # approach 2: each parabola fitted around the best size (laws.PARABOLA_NEIGHBOURS), its estimate's sd over
    # the 20 seeds 0.093, so a 95% interval of ~0.36 is what the noise asks; fitted to every size the interval
    # was 0.29 wide for an sd of 0.102
    assert report["n_opt_exponent"][1] < 0.05 and report["isoflop"][1] < 0.5, report
    assert report["envelope"][1] < 0.15, report
