import numpy as np
import pandas as pd
import pytest

from fakes import make_fake_run
from scaling.results import (COLUMNS, REFERENCE_CSV, collect, main, metric_label, mixed_feature_spaces, paper_table,
                             read_table, seed_means, write_table)


def test_metric_label_names_the_feature_space():
    assert metric_label("inception", 50_000) == "FID-50K (Inception)"
    assert metric_label("inception_offline", 1000) == "FD-1K (inception_offline features)"
    assert metric_label("domain", 1000) == "FD-1K (domain features)"
    assert metric_label("domain", 2500) == "FD-2.5K (domain features)"
    assert metric_label("domain", 500) == "FD-500 (domain features)"
    assert "FID" not in metric_label("domain", 50_000)
    assert metric_label(None, None) == ""


def _runs(root):
    make_fake_run(root, "laptop_b", 2, evals=[
        {"step": 100, "fd": 90.0}, {"step": 200, "fd": 60.0},
        {"step": 200, "fd": 30.0, "feature_extractor": "inception", "num_samples": 50_000, "sampling_steps": 250},
    ], batch_img=32, gflops_per_img=0.25)
    make_fake_run(root, "laptop_s", 8, files=("plan",))  # only plan.json: no status, no evals
    make_fake_run(root, "laptop_l", 4, evals=[{"step": 50, "fd": 120.0}],
                  extra_eval_lines=['{"step": 60, "fd": 1', "not json", "[1, 2]"])


def test_collect_one_row_per_checkpoint_and_setting(tmp_path):
    _runs(tmp_path)
    with pytest.warns(UserWarning) as caught:
        df = collect([tmp_path])
    skipped = sorted(str(w.message).split("evals.jsonl ")[-1] for w in caught)
    assert skipped == ["line 2: not JSON", "line 3: not JSON", "line 4: not an object"]  # file and line named
    assert all(str(w.message).startswith("laptop_l-p4") for w in caught)  # and the run
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS
    assert df["run_id"].nunique() == 3
    b = df[df["model"] == "laptop_b"].sort_values(["step", "fd"])
    assert len(b) == 3
    assert b["step"].tolist() == [100, 200, 200]
    # train_flops = gflops x 1e9 x batch x step x 3, in FLOPs
    np.testing.assert_allclose(b["train_flops"], 0.25e9 * 32 * np.array([100, 200, 200]) * 3)
    assert b["img_seen"].tolist() == [3200, 6400, 6400]
    assert sorted(b["metric_label"]) == ["FD-1K (domain features)", "FD-1K (domain features)", "FID-50K (Inception)"]
    assert b["family"].unique().tolist() == ["laptop"]
    # named metrics from evals.jsonl become columns
    assert "fd1k_domain" in df.columns and b["fd1k_domain"].notna().sum() == 2


def test_run_without_evals_still_appears(tmp_path):
    _runs(tmp_path)
    with pytest.warns(UserWarning):
        df = collect([tmp_path])
    s = df[df["model"] == "laptop_s"]
    assert len(s) == 1
    assert pd.isna(s["fd"].iloc[0]) and pd.isna(s["step"].iloc[0])
    assert s["state"].iloc[0] == "pending"  # no status.json yet
    assert s["params"].iloc[0] > 0 and s["gflops_per_img"].iloc[0] > 0


def test_reevaluated_checkpoint_keeps_latest_line(tmp_path):
    make_fake_run(tmp_path, "laptop_s", 4, evals=[{"step": 100, "fd": 50.0}, {"step": 100, "fd": 40.0}])
    df = collect(tmp_path)
    assert df["fd"].tolist() == [40.0]


def test_several_roots_and_bad_root(tmp_path):
    make_fake_run(tmp_path / "a", "laptop_s", 4, evals=[{"step": 10, "fd": 5.0}])
    make_fake_run(tmp_path / "b", "laptop_b", 4, evals=[{"step": 10, "fd": 4.0}])
    (tmp_path / "b" / "runs" / "half_created").mkdir()
    with pytest.warns(UserWarning, match="without plan.json"):
        df = collect([tmp_path / "a", tmp_path / "b"])
    assert sorted(df["model"]) == ["laptop_b", "laptop_s"]
    with pytest.raises(ValueError, match="does not exist"):
        collect([tmp_path / "missing"])


def test_cli_writes_csv_that_reads_back(tmp_path, capsys):
    make_fake_run(tmp_path, "laptop_xl", 2, evals=[{"step": 10, "fd": 5.0}, {"step": 20, "fd": 3.0}])
    out = tmp_path / "out" / "results.csv"
    assert main([str(tmp_path), "-o", str(out)]) == 0
    assert "1 runs, 2 evaluated rows" in capsys.readouterr().out
    back = read_table(out)
    direct = collect(tmp_path)
    pd.testing.assert_frame_equal(back[COLUMNS], direct[COLUMNS], check_dtype=False)
    # an output root reads the same as its CSV
    pd.testing.assert_frame_equal(read_table(tmp_path)[COLUMNS], direct[COLUMNS])


def test_paper_table_from_reference():
    reference_csv = REFERENCE_CSV
    df = paper_table(reference_csv)
    ref = pd.read_csv(reference_csv)
    assert len(df) == 12 and set(df["metric_label"]) == {"FID-50K (Inception)"}
    xl2 = df[(df["model"] == "dit_xl") & (df["patch"] == 2)].iloc[0]
    assert xl2["fd"] == xl2["fid"] == 19.47 and xl2["gflops_per_img"] == 118.64  # Inception: FD is FID
    assert xl2["train_flops"] == pytest.approx(118.64e9 * 256 * 400_000 * 3)
    np.testing.assert_allclose(sorted(df["fd"]), sorted(ref["fid50k_400k"]))
    # read_table recognises the reference CSV
    pd.testing.assert_frame_equal(read_table(reference_csv), df)


def test_write_table_roundtrip(tmp_path):
    df = paper_table()
    written = write_table(df, tmp_path / "r.csv")
    assert written[0].is_file()
    assert written[0].read_text().splitlines()[0].startswith("run_id,model,family,patch,block,params")
    pd.testing.assert_frame_equal(read_table(written[0])[COLUMNS], df[COLUMNS], check_dtype=False)


def test_read_table_rejects_other_files(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hi")
    with pytest.raises(ValueError, match="expected .csv"):
        read_table(p)
    with pytest.raises(ValueError, match="neither a results file"):
        read_table(tmp_path / "nope.csv")


def test_fid_only_for_inception_and_legacy_tables_read(tmp_path):
    _runs(tmp_path)
    with pytest.warns(UserWarning):
        df = collect([tmp_path])
    b = df[df["model"] == "laptop_b"].set_index("feature_extractor")
    assert b.loc["inception", "fid"] == b.loc["inception", "fd"] == 30.0
    assert b.loc["domain", "fid"].isna().all() and b.loc["domain", "fd"].notna().all()
    # a table (or evals.jsonl) from before the fd column held every Frechet distance under "fid"
    legacy = df.drop(columns=["fd"])
    legacy["fid"] = df["fd"]
    back = read_table(write_table(legacy, tmp_path / "old.csv")[0])
    pd.testing.assert_series_equal(back["fd"], df["fd"])
    assert back.loc[back["feature_extractor"] == "domain", "fid"].isna().all()


def test_point_id_is_the_run_id_without_the_seed():
    from scaling.config import config_from_overrides, point_id, run_id

    seeds = [config_from_overrides(["model=laptop_s", "patch=4", f"seed={s}"]) for s in (0, 1)]
    other_lr = config_from_overrides(["model=laptop_s", "patch=4", "train.lr=2e-4"])
    assert run_id(seeds[0]) != run_id(seeds[1]) and point_id(seeds[0]) == point_id(seeds[1])
    assert point_id(other_lr) != point_id(seeds[0])  # a different run that is not a seed of the same point
    assert point_id(seeds[0]).startswith("laptop_s-p4-adaln_zero-") and "-s0-" not in point_id(seeds[0])


def _seed_grid(root):
    """laptop_s/4 at seeds 0, 1, 2 and laptop_b/4 at seed 0; plan.json without point_id (as runs planned before
    it), so the point comes from config.yaml."""
    for seed, fd in ((0, 300.0), (1, 330.0), (2, 270.0)):
        make_fake_run(root, "laptop_s", 4, seed=seed, evals=[{"step": 100, "fd": fd + 100}, {"step": 200, "fd": fd}])
    make_fake_run(root, "laptop_b", 4, evals=[{"step": 100, "fd": 250.0}, {"step": 200, "fd": 200.0}])
    return collect([root])


def test_seed_means_makes_one_run_of_a_grid_points_seeds(tmp_path):
    from scaling.results import seed_means

    df = _seed_grid(tmp_path)
    s = df[df["model"] == "laptop_s"]
    assert s["run_id"].nunique() == 3 and s["point_id"].nunique() == 1
    m = seed_means(df)
    assert m["run_id"].nunique() == 2 and len(m) == 4
    s = m[m["model"] == "laptop_s"].set_index("step")
    assert s["run_id"].iloc[0] == df.loc[df["model"] == "laptop_s", "point_id"].iloc[0] and s["seed"].isna().all()
    assert s.loc[200, "fd"] == pytest.approx(300.0) and s.loc[100, "fd"] == pytest.approx(400.0)
    assert (s.loc[200, "fd_seed_min"], s.loc[200, "fd_seed_max"], s.loc[200, "n_seeds"]) == (270.0, 330.0, 3)
    b = m[m["model"] == "laptop_b"]
    assert list(b["fd"]) == [250.0, 200.0] and list(b["n_seeds"]) == [1, 1] and list(b["fd_seed_max"]) == [250.0, 200.0]
    assert b["run_id"].iloc[0] == df.loc[df["model"] == "laptop_b", "run_id"].iloc[0]  # one seed: its own run
    pd.testing.assert_frame_equal(seed_means(m), m)  # already merged: as is
    alone = seed_means(df[df["model"] == "laptop_b"])
    assert alone.drop(columns=["n_seeds", "fd_seed_min", "fd_seed_max"]).equals(df[df["model"] == "laptop_b"])


def test_seed_means_keeps_unnamed_eval_settings_apart(tmp_path):
    """evals.jsonl rows without a `setting` name (as older versions wrote them) are told apart by what the eval ran:
    FD-250 and FD-500 of one checkpoint are averaged over the seeds each, never with each other."""
    from scaling.results import seed_means

    for seed, shift in ((0, 0.0), (1, 10.0)):
        make_fake_run(tmp_path, "laptop_s", 4, seed=seed, evals=[
            {"step": 100, "fd": 300.0 + shift, "num_samples": 250, "setting": None},
            {"step": 100, "fd": 200.0 + shift, "num_samples": 500, "setting": None}])
    df = collect([tmp_path])
    assert df["setting"].isna().all() and len(df) == 4
    m = seed_means(df).set_index("num_samples")
    assert len(m) == 2 and list(m["n_seeds"]) == [2, 2]
    assert (m.loc[250, "fd"], m.loc[500, "fd"]) == (305.0, 205.0)
    assert (m.loc[500, "fd_seed_min"], m.loc[500, "fd_seed_max"]) == (200.0, 210.0)
    assert m["setting"].map(lambda v: v is None).all()  # empty as in the table, not NaN


def test_fds_of_two_classifier_weights_are_refused_by_the_analysis_not_lost(tmp_path, capsys):
    # Seeds 1-2 evaluated on another machine, whose domain classifier was other weights: FD-1K in two spaces,
    # up to 5% apart on the same samples. The table keeps the weights' sha and is written (nothing is lost); the
    # figures and fits (read_table, seed_means) refuse to compare or average them, naming the weights and runs.
    for seed, sha in ((0, "aaaa"), (1, "bbbb"), (2, "bbbb")):
        make_fake_run(tmp_path, "laptop_s", 4, seed=seed, evals=[{"step": 100, "fd": 50.0 + seed,
                                                                   "feature_weights_sha": sha}])
    make_fake_run(tmp_path, "laptop_b", 4, evals=[{"step": 100, "fd": 30.0, "feature_weights_sha": "cccc",
                                                  "feature_extractor": "inception", "num_samples": 50_000}])
    df = collect(tmp_path)
    assert sorted(df["feature_weights_sha"]) == ["aaaa", "bbbb", "bbbb", "cccc"]
    problem = mixed_feature_spaces(df)
    assert problem.startswith("the domain metrics of animal_mnist at 32 px were measured with 2 different weights")
    assert "aaaa: laptop_s-p4-adaln_zero-animal_mnist32-s0-fake0000" in problem and "bbbb: " in problem
    out = tmp_path / "results.csv"
    assert main([str(tmp_path), "-o", str(out)]) == 0 and out.is_file()
    assert "warning: the domain metrics of animal_mnist at 32 px were measured with 2" in capsys.readouterr().err
    assert "scaling.evaluate <output_root>/runs/<run_id> --rescore" in mixed_feature_spaces(df)
    with pytest.raises(ValueError, match="results.csv: the domain metrics of animal_mnist at 32 px were measured"):
        read_table(out)
    with pytest.raises(ValueError, match="different weights files"):
        read_table(tmp_path)
    with pytest.raises(ValueError, match="different weights files"):
        seed_means(df)
    # one space per extractor (Inception's own sha beside the domain's) and tables before the column: accepted
    one = df[df["feature_weights_sha"] != "aaaa"]
    assert mixed_feature_spaces(one) is None and seed_means(one)["n_seeds"].max() == 2
    assert mixed_feature_spaces(df.drop(columns="feature_weights_sha")) is None
    assert mixed_feature_spaces(df.assign(feature_weights_sha=None)) is None
    # another dataset has its own classifier: two shas, one per dataset, compare nothing
    make_fake_run(tmp_path / "two", "laptop_s", 4, evals=[{"step": 100, "fd": 5.0, "feature_weights_sha": "aaaa"}])
    make_fake_run(tmp_path / "two", "laptop_b", 4, dataset="digits", evals=[{"step": 100, "fd": 6.0,
                                                                            "feature_weights_sha": "dddd"}])
    assert mixed_feature_spaces(collect(tmp_path / "two")) is None
