import json

import numpy as np
import pandas as pd
import pytest

from analysis.figures import NoData
from analysis.figures import main as figures_main
from analysis.fits import pearson_log
from analysis.forecasts import forecast_curve_end
from analysis.law_figures import (build_laws, compute_envelope, fd_vs_loss, isoflop_figure, loss_curves, main,
                                  predicted_vs_measured)
from analysis.laws import fd_metric, one_row_per_step
from fakes import loss_table
from helpers import drawn_legend_texts

NAMES = ["loss_curves", "loss_envelope", "isoflop_profiles", "n_opt_vs_compute", "predicted_vs_measured",
         "fd_vs_loss"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("laws")
    outputs, fits = build_laws(loss_table(seed=5, steps=tuple(range(100, 1201, 100))), out_dir, n_boot=10)
    return out_dir, {o.name: o for o in outputs}, fits


def test_every_figure_is_written_with_the_data_it_plots(built):
    out_dir, outs, fits = built
    assert sorted(outs) == sorted(NAMES)
    for name, out in outs.items():
        png, pdf, csv = out.paths
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
        back = pd.read_csv(csv, keep_default_na=False, na_values=[""])
        pd.testing.assert_frame_equal(back, out.data.reset_index(drop=True), check_dtype=False)
    laws = json.loads((out_dir / "laws.json").read_text())
    assert set(laws["held_out"]) == {"forecast_largest", "forecast_fd", "forecast_curve_end"}
    assert laws["n_opt"]["joint_law"]["law"]["n_opt_exponent"] == pytest.approx(0.45 / 0.8, abs=0.03)


def test_the_forecast_law_has_params_and_tokens_as_axes_where_the_table_has_them(tmp_path):
    df = loss_table(seed=6, steps=tuple(range(100, 1201, 100)))
    df["tokens"] = (16 // df["patch"]) ** 2
    _, fits = build_laws(df, tmp_path, n_boot=10)
    held = fits["held_out"]
    assert held["forecast_largest"]["law"]["law"] == "axes" and held["forecast_largest"]["law"]["fit_from"] == 0.5
    assert set(held["forecast_largest"]["law"]["terms"]) == {"params", "tokens", "img_seen"}
    assert held["forecast_largest[gflops]"]["law"]["law"] == "joint"  # kept beside it for comparison
    assert held["forecast_fd"]["law"]["loss_law"]["law"] == "axes"
    scan = fits["fit_from_scan"]
    assert set(scan) == {"axes", "joint"} and set(scan["axes"]) == {"0.0", "0.25", "0.5", "0.75"}
    assert scan["axes"]["0.5"] == pytest.approx(held["forecast_largest"]["median_abs_rel_error"])
    # The loss of this table follows a law in Gflops, which forecasts it within 2% from every point.
    assert scan["joint"]["0.0"] < 0.02
    pv = pd.read_csv(tmp_path / "predicted_vs_measured.csv")
    assert (pv["check"] == "forecast_largest").sum() == 3  # one panel per law in use, not the comparison


def test_the_forecasts_fall_back_to_the_gflops_law_where_the_fitted_runs_do_not_span_the_axes(tmp_path):
    df = loss_table(seed=6, steps=tuple(range(100, 1201, 100)))
    largest = df.groupby("run_id")["gflops_per_img"].first().nlargest(3).index
    df["tokens"] = np.where(df["run_id"].isin(largest), 64, 16)  # the 9 fitted runs: one tokens value
    _, fits = build_laws(df, tmp_path, n_boot=10)
    assert fits["held_out"]["forecast_largest"]["law"]["law"] == "joint"
    assert "2+ distinct values of every axis" in fits["skipped_checks"]["forecast_largest[axes]"]


def test_every_model_is_named_in_a_drawn_legend(tmp_path):
    """build_laws clears each figure once saved, so these are drawn again here."""
    df = loss_table(seed=5, steps=tuple(range(100, 1201, 100)))
    outs = {o.name: o for o in (loss_curves(df, tmp_path), compute_envelope(df, tmp_path, n_boot=10),
                                fd_vs_loss(df, tmp_path), isoflop_figure(df, tmp_path, n_boot=10),
                                predicted_vs_measured([forecast_curve_end(df, "val_mse_ema")], tmp_path))}
    for name in ("loss_curves", "loss_envelope", "fd_vs_loss"):
        out = outs[name]
        models = set(out.data.loc[out.data["kind"].isin(["curve", "point"]), "label"])
        texts = " | ".join(drawn_legend_texts(out.fig))
        assert len(models) == 12 and all(m in texts for m in models), name
    env = outs["loss_envelope"]
    fitted = env.data[env.data["kind"] == "envelope"]
    assert len(fitted) == env.fits["envelope"]["fit"]["n"] and (env.data["kind"] == "envelope_one_run").any()
    lines = {ln.get_gid(): ln for ln in outs["loss_curves"].fig.axes[0].get_lines()}
    for run, g in outs["loss_curves"].data.groupby("run_id"):
        np.testing.assert_allclose(lines[run].get_ydata(), g["val_mse_ema"])
    iso = outs["isoflop_profiles"]
    texts = drawn_legend_texts(iso.fig)
    assert sum(t.startswith("C = ") for t in texts) == iso.data["budget"].nunique()
    assert "law" in drawn_legend_texts(outs["predicted_vs_measured"].fig)


def test_csvs_hold_the_minima_and_every_check(built):
    _, outs, _ = built
    iso = outs["isoflop_profiles"]
    assert len(iso.data[iso.data["kind"] == "optimum"]) >= 3  # interior minima on the synthetic grid
    pv = outs["predicted_vs_measured"].data
    assert set(pv["check"]) == {"forecast_largest", "forecast_fd", "forecast_curve_end"}


def test_a_short_study_skips_what_it_cannot_fit(tmp_path, capsys):
    outputs, fits = build_laws(loss_table(steps=(4,), eval_every=4), tmp_path, n_boot=5)  # one point per run
    assert "loss_curves" in {o.name for o in outputs}
    assert fits["skipped_figures"] and fits["skipped_checks"]  # each with its reason, none raised
    assert "[law_figures] skipped" in capsys.readouterr().out


def test_no_loss_column_is_no_data(tmp_path):
    df = loss_table(steps=(300, 600)).drop(columns=["val_mse_ema"])
    with pytest.raises(NoData, match="no 'val_mse_ema' column"):
        loss_curves(df, tmp_path)
    with pytest.raises(NoData, match="no evaluated checkpoint has both"):
        fd_vs_loss(loss_table(steps=(100, 200)), tmp_path)


@pytest.mark.slow
def test_cli(tmp_path, capsys):
    loss_table(seed=6, steps=tuple(range(200, 1201, 200)), eval_every=600).to_csv(tmp_path / "results.csv",
                                                                                   index=False)
    assert main([str(tmp_path / "results.csv"), "-o", str(tmp_path / "figs"), "--n-boot", "10"]) == 0
    printed = capsys.readouterr().out
    assert "forecast_largest (val_mse_ema): median |error|" in printed
    assert "val_mse_ema at step 1200: Pearson r(log10 Gflops) = -0.9" in printed
    assert "ordered by size and patch in " in printed and " of 17 pairs" in printed
    assert main([str(tmp_path / "results.csv"), "--budgets", "1e11,lots"]) == 2
    assert "--budgets 1e11,lots: not a comma-separated list of positive numbers of FLOPs" in capsys.readouterr().err
    assert main([str(tmp_path / "results.csv"), "--budgets", "1e11,-3e11"]) == 2
    assert main([str(tmp_path / "results.csv"), "-o", str(tmp_path / "b"), "--n-boot", "10", "--budgets",
                 "3e10,1e11,3e11"]) == 0
    iso = json.loads((tmp_path / "b" / "laws.json").read_text())["isoflop"]["isoflop"]
    assert [o["budget"] for o in iso["optima"]] == [3e10, 1e11, 3e11]
    # `launch ... analyze=true` runs the paper figures' CLI, then this one, into one folder
    assert figures_main([str(tmp_path / "results.csv"), "-o", str(tmp_path / "all"), "--n-boot", "10"]) == 0
    assert main([str(tmp_path / "results.csv"), "-o", str(tmp_path / "all"), "--n-boot", "10"]) == 0
    assert {"fig8_fid_vs_gflops.png", "isoflop_profiles.png", "laws.json"} <= {p.name for p in
                                                                             (tmp_path / "all").iterdir()}
    laws = json.loads((tmp_path / "figs" / "laws.json").read_text())
    # 3 points in the first half of each curve: too few for a curve with a floor, so that check says why
    assert "no run has 4+ points of val_mse_ema" in laws["skipped_checks"]["forecast_curve_end"]


def curves_at_250_final_at_500(seed=5) -> pd.DataFrame:
    """The laptop study's layout (eval.final_num_samples): FD-250 at every evaluated step, and at the last step a
    second row, FD-500 of the same checkpoint (its own setting), sharing the step's held-out loss."""
    df = loss_table(seed=seed, steps=tuple(range(100, 1201, 100)))
    ev = df["fd"].notna()
    df.loc[ev, ["metric_name", "metric_label", "num_samples"]] = ["fd250_domain", "FD-250 (domain features)", 250]
    df["fd250_domain"] = df["fd"]
    last = df[ev & (df["step"] == df["step"].max())].copy()
    last["fd"] = last["fd"] * 0.8  # FD-500 sits below FD-250 (FD's bias falls with N)
    last[["metric_name", "metric_label", "num_samples", "fd250_domain"]] = ["fd500_domain",
                                                                            "FD-500 (domain features)", 500, np.nan]
    last["fd500_domain"] = last["fd"]
    return pd.concat([df, last], ignore_index=True)


def test_fd_laws_use_one_sample_size_and_the_final_size_gets_its_own_forecast(tmp_path):
    df = curves_at_250_final_at_500()
    assert fd_metric(df) == "fd250_domain" and fd_metric(df, "fd500_domain") == "fd500_domain"
    one = one_row_per_step(df, prefer_col="fd250_domain")
    assert not one.duplicated(["run_id", "step"]).any() and len(one) == df[["run_id", "step"]].drop_duplicates().shape[0]
    last = one[one["step"] == one["step"].max()]
    assert last["fd500_domain"].notna().all() and (last["fd"] == last["fd250_domain"]).all()
    assert (last["metric_name"] == "fd250_domain").all()

    outputs, fits = build_laws(df, tmp_path, n_boot=10)
    assert fits["fd_col"] == "fd250_domain"
    held = fits["held_out"]
    assert {"forecast_largest", "forecast_fd", "forecast_fd[fd500_domain]", "forecast_curve_end"} <= set(held)
    assert held["forecast_fd"]["y_col"] == "fd250_domain" and held["forecast_fd[fd500_domain]"]["n_predicted"] == 3
    # FD(loss) of the curves is fitted on the 9 small runs' FD-250 points only (4 evaluated steps each)
    assert fits["fd_vs_loss"]["fd_vs_loss"]["n"] == 9 * 4
    pv = pd.read_csv(tmp_path / "predicted_vs_measured.csv")
    assert set(pv["y_col"]) >= {"fd250_domain", "fd500_domain", "val_mse_ema"}
    # the grid's own checks at its last step: r(., log10 Gflops) and the ordering, for the loss and each FD
    checks = fits["scaling_checks"]
    assert set(checks) == {"val_mse_ema", "fd250_domain", "fd500_domain"}
    last = df[df["step"] == 1200]
    for y, c in checks.items():
        at = last.dropna(subset=[y]).drop_duplicates("run_id")
        assert (c["step"], c["n_points"], c["n_pairs"]) == (1200, 12, 17)
        assert c["pearson_r_log10_gflops"] == pytest.approx(pearson_log(at, "gflops_per_img", y), abs=1e-12)
    # the synthetic loss law falls with Gflops
    assert checks["val_mse_ema"]["pearson_r_log10_gflops"] < -0.9
    assert json.loads((tmp_path / "laws.json").read_text())["scaling_checks"] == json.loads(json.dumps(checks))


def test_one_fd_metric_is_left_alone():
    df = loss_table(seed=1)
    assert fd_metric(df) == "fd"
    one = one_row_per_step(df, prefer_col="fd")
    pd.testing.assert_frame_equal(one.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
