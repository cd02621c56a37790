"""Held-out checks on synthetic grids that follow a known law: the law must beat the naive baselines."""

import numpy as np
import pandas as pd
import pytest

from analysis.forecasts import forecast_curve_end, forecast_fd, forecast_largest, split_by_size
from fakes import LOSS_LAW, axes_table, loss_table


def test_split_by_size_keeps_seeds_together():
    df = loss_table(seeds=(0, 1), steps=(100, 200))
    fit, held = split_by_size(df, n_fit=9)
    assert len(fit) == 18 and len(held) == 6
    sizes = df.groupby("run_id")["gflops_per_img"].first()
    assert sizes[fit].max() < sizes[held].min()
    with pytest.raises(ValueError, match="n_fit=12 leaves nothing to predict"):
        split_by_size(df, n_fit=12)


def test_forecast_largest_loss_beats_the_largest_fitted_model():
    fc = forecast_largest(loss_table(seed=1), "val_mse_ema")
    s = fc.summary()
    assert s["n_predicted"] == 3 and s["n_fitted_runs"] == 9
    assert sorted(r.split("-adaln")[0] for r in fc.table["run_id"]) == ["laptop_l-p2", "laptop_xl-p2", "laptop_xl-p4"]
    assert s["median_abs_rel_error"] < 0.02  # 0.5% noise: the law extrapolates 3x in Gflops within 2%
    assert s["median_abs_rel_error"] < 0.5 * s["naive_median_abs_rel_error"]
    assert s["median_abs_excess_rel_error"] < 0.5 * s["naive_median_abs_excess_rel_error"]
    assert fc.law["E"] == pytest.approx(LOSS_LAW["E"], rel=0.2)
    # the naive guess is the largest fitted model's final loss, which is higher than any larger model's
    assert (fc.table["y_naive"] > fc.table["y_true"]).all()


def test_forecast_largest_with_params_and_tokens_as_separate_axes():
    df = axes_table(sigma=0.003, seed=2)
    axes = forecast_largest(df, "val_mse_ema", law="axes").summary()
    gflops = forecast_largest(df, "val_mse_ema", law="joint").summary()
    assert axes["n_predicted"] == gflops["n_predicted"] == 3
    late = forecast_largest(df, "val_mse_ema", law="axes", fit_from=0.5)
    # Gflops is the product of the two axes: a law in Gflops alone misses a loss additive in them.
    assert axes["median_abs_rel_error"] < 0.01 < gflops["median_abs_rel_error"]
    assert late.summary()["median_abs_rel_error"] < 0.01 and late.law["fit_from"] == 0.5
    assert late.law["terms"]["tokens"]["a"] == pytest.approx(0.6, abs=0.1)
    with pytest.raises(ValueError, match="fit_from=1.0; allowed: 0 <= fit_from < 1"):
        forecast_largest(df, "val_mse_ema", law="axes", fit_from=1.0)
    with pytest.raises(ValueError, match="law='power'; allowed: joint, axes$"):
        forecast_fd(df.assign(fd=1.0), "val_mse_ema", "fd", law="power")


def test_forecast_largest_power_law_on_one_point_per_run():
    df = loss_table(sigma=0.0).query("step == 1200").copy()
    df["y"] = 100 * df["gflops_per_img"] ** -0.4
    fc = forecast_largest(df, "y", law="power")
    np.testing.assert_allclose(fc.table["y_pred"], fc.table["y_true"], rtol=1e-6)
    assert "excess_rel_error" not in fc.table.columns  # no floor: L - E is L itself
    with pytest.raises(ValueError, match="law='chinchilla'; allowed: joint, axes, power"):
        forecast_largest(df, "y", law="chinchilla")


def test_forecast_fd_through_the_loss():
    df = loss_table(seed=2, fd_sigma=0.02)
    fc = forecast_fd(df, "val_mse_ema", "fd")
    s = fc.summary()
    assert s["n_predicted"] == 3 and fc.table["x"].eq(1200 * 32).all()  # the last evaluated checkpoint
    assert s["median_abs_rel_error"] < 0.1 and s["median_abs_rel_error"] < 0.5 * s["naive_median_abs_rel_error"]
    assert -fc.law["fd_vs_loss"]["alpha"] == pytest.approx(2.5, abs=0.3)


def test_forecast_curve_end_beats_the_last_value_seen():
    fc = forecast_curve_end(loss_table(seed=4, sigma=0.002), "val_mse_ema")
    s = fc.summary()
    assert s["n_predicted"] == 12
    assert (fc.table["x_seen"] == 600 * 32).all() and (fc.table["x"] == 1200 * 32).all()
    assert (fc.table["x_fit_from"] == 150 * 32).all()  # steps 50 and 100 (< 10% of 1200): the transient
    assert s["median_abs_rel_error"] < 0.01 and s["median_abs_rel_error"] < 0.5 * s["naive_median_abs_rel_error"]
    assert s["median_abs_excess_rel_error"] < 0.5 * s["naive_median_abs_excess_rel_error"]
    two_points = pd.DataFrame({"run_id": ["a", "a"], "img_seen": [300, 600], "fd": [50.0, 40.0]})
    with pytest.raises(ValueError, match="no run has 4\\+ points of fd between 10% and 50% of its curve"):
        forecast_curve_end(two_points, "fd")
    with pytest.raises(ValueError, match="transient=0.5; allowed: 0 <= transient < frac=0.5"):
        forecast_curve_end(two_points, "fd", transient=0.5)
