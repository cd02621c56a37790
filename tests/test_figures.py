import json
import warnings

import numpy as np
import pandas as pd
import pytest

from analysis.figures import (PAPER_LABEL, NoData, fig5_blocks, fig6_steps, fig8_gflops, fig9_train_compute,
                              fig10_sampling_compute, headline_setting, log_axis, main, model_label)
from analysis.fits import contested_range
from fakes import make_fake_run, make_laptop_grid
from helpers import drawn_legend_texts
from scaling.results import REFERENCE_CSV, collect, paper_table


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """The synthetic 12-run laptop grid with a sampling study and four block designs for the /2 models."""
    root = tmp_path_factory.mktemp("laptop")
    make_laptop_grid(root, sampling_study=(10, 25, 50, 250),
                     blocks=("adaln_zero", "adaln", "cross_attn", "in_context"))
    return collect([root])


@pytest.fixture(scope="module")
def paper():
    return paper_table()


def _lines(out):
    """gid -> (x, y) of every line drawn on the figure's axes."""
    return {ln.get_gid(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in out.fig.axes[0].get_lines() if ln.get_gid()}


def _check_files(out):
    png, pdf, csv = out.paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    back = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(back, out.data.reset_index(drop=True), check_dtype=False)
    return back


def _check_series(out, csv, x, y, key="run_id"):
    lines = _lines(out)
    for run, g in csv.groupby(key):
        lx, ly = lines[run]
        np.testing.assert_allclose(lx, g[x].to_numpy(float))
        np.testing.assert_allclose(ly, g[y].to_numpy(float))


def test_model_labels():
    assert model_label("dit_xl", 2) == "DiT-XL/2"
    assert model_label("laptop_xl", 2, "laptop") == "Laptop-XL/2"
    assert model_label("laptop_s", 8) == "Laptop-S/8"


def test_fig6_on_laptop_grid(laptop, tmp_path):
    out = fig6_steps(laptop, tmp_path)
    csv = _check_files(out)
    assert csv["run_id"].nunique() == 12 and len(csv) == 12 * 6  # adaLN-Zero only, main eval setting only
    _check_series(out, csv, "step", "fd")
    ax = out.fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "FD-1K (domain features)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "Laptop-S/8" and labels[-1] == "Laptop-XL/2" and len(labels) == 12


def test_fig6_on_reference(paper, tmp_path):
    out = fig6_steps(paper, tmp_path)
    csv = _check_files(out)
    assert len(csv) == 12 and set(csv["step"]) == {400_000}
    assert out.fig.axes[0].get_ylabel() == "FID-50K (Inception)"


def test_fig8_reference_reproduces_paper(paper, tmp_path):
    out = fig8_gflops(paper, tmp_path, n_boot=200)
    csv = _check_files(out)
    pts = csv[csv["kind"] == "point"]
    ref = pd.read_csv(REFERENCE_CSV)
    assert len(pts) == 12
    np.testing.assert_allclose(sorted(zip(pts["gflops_per_img"], pts["fd"])),
                               sorted(zip(ref["gflops"], ref["fid50k_400k"])))
    assert set(pts["label"]) == {f"DiT-{m.split('_')[1].upper()}/{p}" for m, p in zip(ref["model"], ref["patch"])}
    _check_series(out, pts, "gflops_per_img", "fd")
    fit = csv[csv["kind"] == "fit"]
    lines = _lines(out)
    np.testing.assert_allclose(lines["fit"][1], fit["fd"])
    assert (fit["fd_lo"] <= fit["fd"]).all() and (fit["fd"] <= fit["fd_hi"]).all()
    assert round(out.fits["pearson_r_log10_gflops"], 2) == -0.93
    assert "= -0.93" in out.fig.axes[0].get_title()
    assert out.fits["step"] == 400_000
    lo, hi = out.fits["power_law"]["ci"]["alpha"]
    assert lo < out.fits["power_law"]["fit"]["alpha"] < hi
    ax = out.fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_fig8_laptop_with_paper_overlay(laptop, tmp_path):
    out = fig8_gflops(laptop, tmp_path, overlay_paper=True, n_boot=100)
    csv = _check_files(out)
    assert out.fits["step"] == 8000  # the largest step every run reached
    assert len(csv[csv["kind"] == "point"]) == 12 and len(csv[csv["kind"] == "paper"]) == 12
    lines = _lines(out)
    np.testing.assert_allclose(lines["paper"][1], csv.loc[csv["kind"] == "paper", "fd"])
    texts = [t.get_text() for leg in out.fig.axes[0].findobj(lambda a: a.__class__.__name__ == "Legend")
             for t in leg.get_texts()]
    assert PAPER_LABEL in texts
    ylabel = out.fig.axes[0].get_ylabel()
    assert ylabel == "FD-1K (domain features)" and "FID" not in ylabel
    assert out.fits["pearson_r_log10_gflops"] < -0.8
    assert out.fits["held_out_largest"]["held_out"][0]["run_id"].startswith("laptop_xl-p2-adaln_zero")


def test_fig8_default_step_is_common_to_all_runs(tmp_path):
    for i, size in enumerate(("s", "b", "l")):
        steps = [100, 200, 300] if size != "l" else [100, 200]
        make_fake_run(tmp_path, f"laptop_{size}", 4, evals=[{"step": s, "fd": 100.0 / (i + 1) / s} for s in steps])
    out = fig8_gflops(collect(tmp_path), tmp_path / "figs", n_boot=20)
    assert out.fits["step"] == 200
    with pytest.raises(NoData, match="at least 3 runs evaluated at step 300"):
        fig8_gflops(collect(tmp_path), tmp_path / "figs", step=300)


def test_fig9_on_laptop_grid(laptop, tmp_path):
    out = fig9_train_compute(laptop, tmp_path, n_boot=30)
    csv = _check_files(out)
    ckpt = csv[csv["kind"] == "checkpoint"]
    assert len(ckpt) == 72
    np.testing.assert_allclose(ckpt["train_flops"], [laptop.set_index(["run_id", "step", "setting"]).loc[
        (r, s, "domain-n1000-ddpm100-cfg1.0-s0"), "train_flops"] for r, s in zip(ckpt["run_id"], ckpt["step"])])
    _check_series(out, ckpt, "train_flops", "fd")
    front = csv[csv["kind"] == "frontier"]
    np.testing.assert_allclose(_lines(out)["frontier"][1], front["fd"])
    assert (np.diff(front["fd"]) < 0).all()
    # the fit keeps to the compute two runs reach; the rest of the frontier is drawn apart, not fitted
    lo, hi = contested_range(ckpt["train_flops"], ckpt["run_id"])
    one = csv[csv["kind"] == "frontier_one_run"]
    assert front["train_flops"].between(lo, hi).all() and not one["train_flops"].between(lo, hi).any()
    assert out.fits["frontier_points_fitted"] == len(front) == out.fits["frontier_power_law"]["fit"]["n"]
    assert out.fits["frontier_points"] == len(front) + len(one)
    assert 0.1 < out.fits["frontier_power_law"]["fit"]["alpha"] < 1.0
    assert sum(out.fits["compute_optimal"]["fraction_best"].values()) == pytest.approx(1.0)
    # two runs whose compute does not overlap: no contested range, the figure is drawn and the fit skipped
    two = laptop[laptop["run_id"].isin(laptop["run_id"].unique()[:2])].copy()
    first = two["run_id"] == two["run_id"].iloc[0]
    two.loc[first, "train_flops"] *= 1e6
    apart = fig9_train_compute(two, tmp_path / "apart", n_boot=5)
    assert "frontier_power_law" not in apart.fits and "a fit needs 2+" in apart.fits["frontier_power_law_skipped"]


def test_fig9_on_reference(paper, tmp_path):
    out = fig9_train_compute(paper, tmp_path, n_boot=20)
    csv = _check_files(out)
    assert len(csv[csv["kind"] == "checkpoint"]) == 12


def test_fig10_sampling_study(laptop, paper, tmp_path):
    out = fig10_sampling_compute(laptop, tmp_path)
    csv = _check_files(out)
    assert csv["run_id"].nunique() == 12 and sorted(set(csv["sampling_steps"])) == [10, 25, 50, 100, 250]
    np.testing.assert_allclose(csv["sampling_gflops"], [
        laptop.loc[laptop["run_id"] == r, "gflops_per_img"].iloc[0] * k
        for r, k in zip(csv["run_id"], csv["sampling_steps"])])
    _check_series(out, csv, "sampling_gflops", "fd")
    with pytest.raises(NoData, match="sampling step counts"):
        fig10_sampling_compute(paper, tmp_path)


def test_fig5_block_designs(laptop, paper, tmp_path):
    out = fig5_blocks(laptop, tmp_path)
    csv = _check_files(out)
    assert set(csv["block"]) == {"adaln_zero", "adaln", "cross_attn", "in_context"}
    assert csv["run_id"].str.startswith("laptop_xl-p2").all()  # the largest model with several designs
    _check_series(out, csv, "step", "fd")
    with pytest.raises(NoData, match="2\\+ block designs"):
        fig5_blocks(paper, tmp_path)


def test_cli_reference_builds_fig8_and_fits(tmp_path, capsys):
    assert main([str(REFERENCE_CSV), "-o", str(tmp_path), "--n-boot", "50"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fig8_fid_vs_gflops.csv", "fig8_fid_vs_gflops.pdf", "fig8_fid_vs_gflops.png", "fits.json"]
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert round(fits["fig8"]["pearson_r_log10_gflops"], 2) == -0.93
    assert "Pearson r(metric, log10 Gflops) = -0.93" in capsys.readouterr().out


def test_cli_output_root_skips_figures_without_data(tmp_path, capsys):
    root = tmp_path / "out"
    make_laptop_grid(root, eval_steps=(100, 200, 400))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(root), "-o", str(tmp_path / "figs"), "--n-boot", "20", "--overlay-paper"]) == 0
    printed = capsys.readouterr().out
    assert "skipped fig5: no model was trained with 2+ block designs" in printed
    assert "skipped fig10" in printed
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"fig6_fid_vs_steps.png", "fig8_fid_vs_gflops.pdf", "fig9_fid_vs_train_compute.csv", "fits.json"} <= names
    fits = json.loads((tmp_path / "figs" / "fits.json").read_text())
    assert set(fits) == {"fig8", "fig9"}


@pytest.mark.parametrize("make", [fig6_steps, fig8_gflops, fig9_train_compute, fig10_sampling_compute, fig5_blocks])
def test_every_plotted_model_is_named_in_a_drawn_legend(laptop, tmp_path, make):
    """Read the legends back from the saved figure's objects: each plotted run's label is in a legend that is
    drawn (matplotlib >= 3.10 clips a legend kept through ax.add_artist to the axes, so Fig. 8 lost its 12)."""
    out = make(laptop, tmp_path, **({"n_boot": 30} if make in (fig8_gflops, fig9_train_compute) else {}))
    labels = set(out.data["label"].dropna()) - {"fit", "frontier fit"}
    if "kind" in out.data.columns:
        labels = set(out.data.loc[out.data["kind"].isin(["point", "checkpoint"]), "label"]) or labels
    texts = drawn_legend_texts(out.fig)
    assert labels and labels <= set(texts), sorted(labels - set(texts))


def test_fig8_takes_the_final_checkpoints_larger_sample_and_fig6_the_curves(tmp_path):
    """The laptop study's layout: FD-250 at every checkpoint, FD-500 at the last one (eval.final_num_samples)."""
    for i, (size, patch) in enumerate((("s", 4), ("b", 4), ("l", 4), ("xl", 4))):
        evals = [{"step": s, "fd": 400.0 / (i + 1) / s ** 0.5, "num_samples": 250,
                  "metric_name": "fd250_domain"} for s in (150, 300, 450, 600)]
        evals.append({"step": 600, "fd": 300.0 / (i + 1) / 600 ** 0.5, "num_samples": 500,
                      "metric_name": "fd500_domain"})
        make_fake_run(tmp_path, f"laptop_{size}", patch, evals=evals, steps=600)
    df = collect([tmp_path])
    assert set(headline_setting(df)["num_samples"]) == {500}
    assert set(headline_setting(df, step=300)["num_samples"]) == {250}  # FD-500 exists only at step 600
    f8 = fig8_gflops(df, tmp_path / "figs", n_boot=20)
    assert f8.fits["metric_label"] == "FD-500 (domain features)" and f8.fits["step"] == 600
    f6 = fig6_steps(df, tmp_path / "figs")
    assert len(f6.data) == 16 and sorted(set(f6.data["step"])) == [150, 300, 450, 600]


def test_seeds_of_a_grid_point_are_drawn_as_their_mean_and_range(tmp_path):
    """Three seeds of laptop-S/4 enter Fig. 8 as one point, their mean, with an error bar from the lowest to the
    highest seed and a legend entry; Fig. 6 shades the same range along the curve; the correlation counts grid
    points, not runs."""
    from analysis.figures import build_all
    from scaling.results import seed_means

    for seed, scale in ((0, 1.0), (1, 1.2), (2, 0.7)):
        make_fake_run(tmp_path, "laptop_s", 4, seed=seed, gflops_per_img=0.0026,
                      evals=[{"step": s, "fd": scale * 3000.0 / s ** 0.5} for s in (100, 400)])
    for i, (size, g) in enumerate((("b", 0.01), ("l", 0.04), ("xl", 0.05))):
        make_fake_run(tmp_path, f"laptop_{size}", 4, gflops_per_img=g,
                      evals=[{"step": s, "fd": 2000.0 / (i + 2) / s ** 0.5} for s in (100, 400)])
    df = collect([tmp_path])
    assert build_all(df, tmp_path / "all", n_boot=20)[1]["fig8"]["n_runs"] == 4  # merged before every figure
    f6, f8 = fig6_steps(seed_means(df), tmp_path), fig8_gflops(seed_means(df), tmp_path, n_boot=20)
    point = f8.data[(f8.data["kind"] == "point") & (f8.data["label"] == "Laptop-S/4")].iloc[0]
    assert point["fd"] == pytest.approx(3000.0 / 20 * (1.0 + 1.2 + 0.7) / 3)
    assert (point["fd_seed_min"], point["fd_seed_max"], point["n_seeds"]) == pytest.approx((105.0, 180.0, 3))
    bars = [c for c in f8.fig.axes[0].containers if str(c.lines[2][0].get_gid()).endswith("_seeds")]
    assert len(bars) == 1
    segment = bars[0].lines[2][0].get_segments()[0]
    np.testing.assert_allclose(segment[:, 1], [105.0, 180.0])
    assert "mean and range over 3 seeds" in drawn_legend_texts(f8.fig)
    band = [c for c in f6.fig.axes[0].collections if str(c.get_gid()).endswith("_seeds")]
    assert len(band) == 1 and "range over 3 seeds" in drawn_legend_texts(f6.fig)
    ys = band[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.7 * 3000.0 / 20) and ys.max() == pytest.approx(1.2 * 3000.0 / 10)

    # A second grid point with 2 seeds: the legend says how many seeds the ranges have, not the largest count
    make_fake_run(tmp_path, "laptop_b", 4, seed=1, gflops_per_img=0.01,
                  evals=[{"step": s, "fd": 0.9 * 2000.0 / 2 / s ** 0.5} for s in (100, 400)])
    merged = seed_means(collect([tmp_path]))
    f6, f8 = fig6_steps(merged, tmp_path / "two"), fig8_gflops(merged, tmp_path / "two", n_boot=20)
    assert "mean and range over 2-3 seeds" in drawn_legend_texts(f8.fig)
    texts = drawn_legend_texts(f6.fig)
    assert "range over 2-3 seeds" in texts and sum(t.startswith("range over") for t in texts) == 1


def drawn_tick_labels(lo, hi, width=3.5, height=3.0, axis="x") -> list:
    """The tick labels a log_axis shows for data from lo to hi in a figure of width x height inches, drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([lo, hi], [lo, hi])
    which = ax.xaxis if axis == "x" else ax.yaxis
    log_axis(which)
    fig.canvas.draw()
    v0, v1 = sorted(which.get_view_interval())
    return [t for v, t in zip(which.get_majorticklocs(), which.get_majorticklabels()) if v0 <= v <= v1 and t.get_text()]


def texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


@pytest.mark.parametrize("lo,hi,width", [(3.3e11, 2e13, 3.5), (1e11, 1e12, 3.5), (5e10, 3e13, 3.5),
                                         (4e-4, 4e-2, 3.5), (50, 5000, 3.5), (1e9, 1e13, 3.5), (1e6, 1e16, 3.5),
                                         (0.071, 0.079, 3.0), (0.0712, 0.0718, 3.5)])
def test_log_axis_tick_labels_do_not_overlap(lo, hi, width):
    """n_opt_vs_compute's compute axis (3.3e11 to 2e13 FLOPs, ~3.5 in wide beside its legend) printed "5e+11",
    "1e+12" and "2e+12" into one another: 2 and 5 times a power of ten are labelled only where they fit."""
    shown = drawn_tick_labels(lo, hi, width)
    assert len(shown) >= 2, texts(shown)
    boxes = sorted((t.get_window_extent() for t in shown), key=lambda b: b.x0)
    gaps = [b.x0 - a.x1 for a, b in zip(boxes, boxes[1:])]
    assert min(gaps) > 0, texts(shown)


def test_log_axis_labels_2_and_5_where_they_fit():
    def labels(width, lo, hi):
        return texts(drawn_tick_labels(lo, hi, width))

    assert labels(8.0, 4e-4, 4e-2) == ["0.0005", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05"]  # + margins
    assert labels(2.5, 4e-4, 4e-2) == ["0.001", "0.01"]  # too narrow for 2 and 5
    assert labels(3.5, 0.07, 0.11) == ["0.07", "0.08", "0.09", "0.1"]  # a tenth of a decade: every multiple
    assert labels(3.5, 0.071, 0.079) == ["0.072", "0.074", "0.076", "0.078"]  # narrower: round numbers
    assert len(labels(1.0, 0.071, 0.079)) <= 1  # no room for two labels: none overlapping
    assert labels(8.0, 1e-4, 1e2) == ["0.0001", "0.001", "0.01", "0.1", "1", "10", "100"]  # 6 decades: 10^k only
    exponents = [int(t.split("e+")[1]) for t in labels(3.5, 1e6, 1e16)]  # too many powers of ten: every k-th
    assert len(exponents) >= 3 and len({b - a for a, b in zip(exponents, exponents[1:])} - {0}) == 1
    assert exponents[1] - exponents[0] >= 2


def test_log_axis_y_labels_fit_the_axis_height():
    assert texts(drawn_tick_labels(0.05, 0.5, width=4.0, height=4.0, axis="y")) == ["0.05", "0.1", "0.2", "0.5"]
    # an inch: no room for four stacked labels
    assert texts(drawn_tick_labels(0.05, 0.5, width=4.0, height=1.0, axis="y")) == ["0.1"]
