"""Run directories -> one tidy results table (docs/design.md, "Results table").

One row per evaluated checkpoint and eval setting (plus one per other logged step with a held-out loss,
scaling.valloss.with_val_rows); a run with neither still gives one row (metrics empty,
`step` empty) so that a status view can list it. Analysis reads only this table and `scaling/reference/`.

    python -m scaling.results outputs/ [more_roots ...] [-o results.csv]

Units: `gflops_per_img` is the forward cost of one image in Gflops, one fused multiply-add counted as one flop
(the paper's convention); `train_flops` is in FLOPs (not Gflops):

    train_flops = gflops_per_img * 1e9 * batch_img * step * 3      (paper Fig. 9: forward + backward ~ 3 forwards)

`img_seen` comes from the eval row when it was logged, else batch_img * step.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from scaling.config import config_from_dict, point_id
from scaling.flops import train_flops
from scaling.rundir import RunDir, load_json, read_jsonl, read_jsonl_checked, read_status
from scaling.valloss import with_val_rows

# The table's columns in order (docs/design.md); named metrics from evals.jsonl `metrics` follow them.
COLUMNS = [
    "run_id", "model", "family", "patch", "block", "params", "gflops_per_img", "tokens", "batch_img",
    "step", "img_seen", "train_flops", "fd", "fid", "inception_score", "precision", "recall",
    "feature_extractor", "num_samples", "sampler", "sampling_steps", "cfg_scale", "dataset", "resolution",
    "metric_label", "metric_name", "seed", "eval_seed", "setting", "wall_s", "state", "last_step", "steps",
    "point_id", "feature_weights_sha",
]
_INT_COLUMNS = ["patch", "params", "tokens", "batch_img", "step", "img_seen", "num_samples", "sampling_steps",
                "resolution", "seed", "eval_seed", "last_step", "steps"]
_FLOAT_COLUMNS = ["gflops_per_img", "train_flops", "fd", "fid", "inception_score", "precision", "recall",
                  "cfg_scale", "wall_s"]
_EVAL_KEYS = ["fd", "inception_score", "precision", "recall", "feature_extractor", "num_samples", "sampler",
              "sampling_steps", "cfg_scale", "wall_s", "setting", "feature_weights_sha"]
_SETTING_KEYS = ("feature_extractor", "num_samples", "sampler", "sampling_steps", "cfg_scale")  # what an eval ran

REFERENCE_CSV = Path(__file__).resolve().parent / "reference" / "dit_table4.csv"


def samples_label(num_samples) -> str:
    """50000 -> "50K", 1000 -> "1K", 2500 -> "2.5K", 500 -> "500"."""
    n = int(num_samples)
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def metric_label(feature_extractor, num_samples) -> str:
    """Human label of the `fd` column for axes: names the feature space, so no number passes for Inception FID.

    inception -> "FID-50K (Inception)"; any other extractor -> "FD-1K (domain features)", a Frechet distance
    never called FID (as scaling.evaluate.metric_name: inception_offline weights are not the reference ones).
    """
    if feature_extractor is None or (isinstance(feature_extractor, float) and pd.isna(feature_extractor)):
        return ""
    n = samples_label(num_samples) if num_samples is not None and not pd.isna(num_samples) else "?"
    if feature_extractor == "inception":
        return f"FID-{n} (Inception)"
    return f"FD-{n} ({feature_extractor} features)"


# ----------------------------------------------------------------------------- reading run directories


def _run_dirs(root: Path) -> tuple[list[RunDir], int]:
    """Run directories under `root/runs/` with a plan.json (or `root` itself if it is one); count of the rest."""
    if (root / "plan.json").is_file():
        return [RunDir(root)], 0
    runs_root = root / "runs"
    if not runs_root.is_dir():
        return [], 0
    dirs = [p for p in sorted(runs_root.iterdir()) if p.is_dir()]
    with_plan = [RunDir(p) for p in dirs if (p / "plan.json").is_file()]
    return with_plan, len(dirs) - len(with_plan)


def _point_id(run: RunDir, plan: dict) -> str | None:
    """plan.json's point_id (the run id without the seed); for a run planned before that key, computed from its
    config.yaml; None without either (the run is a grid point of its own), with a warning if config.yaml is there
    but cannot be read."""
    if plan.get("point_id"):
        return str(plan["point_id"])
    if not run.config.is_file():
        return None
    try:
        return point_id(config_from_dict(OmegaConf.to_container(OmegaConf.load(run.config))))
    except Exception as e:  # noqa: BLE001 - no config.yaml, or one an older version wrote with other keys
        warnings.warn(f"{run.run_id}: no point_id in plan.json and none from config.yaml ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); the run is a grid point of its own, never "
                      f"averaged with other seeds")
        return None


def run_rows(run: RunDir) -> tuple[list[dict], list[str]]:
    """The table rows of one run directory, and what was skipped in it (each naming its file and line)."""
    plan, plan_problem = load_json(run.plan)
    if plan is not None and not isinstance(plan, dict):
        plan, plan_problem = None, f"{run.plan}: not a JSON object"
    plan = plan or {}
    status = read_status(run)
    evals, problems = read_jsonl_checked(run.evals)
    problems = [p for p in (plan_problem, status.get("problem")) if p] + problems
    base = {
        "run_id": plan.get("run_id", run.run_id), "model": plan.get("model"),
        "family": plan.get("family") or ("paper" if str(plan.get("model", "")).startswith("dit_") else "laptop"),
        "patch": plan.get("patch"), "block": plan.get("block"), "params": plan.get("params"),
        "gflops_per_img": plan.get("gflops_per_img"), "tokens": plan.get("tokens"),
        "batch_img": plan.get("batch_img"), "dataset": plan.get("dataset"),
        "resolution": plan.get("resolution", plan.get("input_size")), "seed": plan.get("seed"),
        "steps": plan.get("steps"), "state": status.get("state", "pending"), "last_step": status.get("step"),
        "point_id": _point_id(run, plan),
    }
    metrics = read_jsonl(run.metrics)  # held-out losses (val_*) join the table: scaling.valloss.with_val_rows
    if not evals:
        return with_val_rows([dict(base)], base, metrics), problems
    # One row per (step, setting); a checkpoint evaluated twice with one setting keeps the latest line.
    latest = {}
    for e in evals:
        if "step" not in e:
            problems.append(f"{run.evals}: a row without a step")
            continue
        key = (e["step"], e.get("setting") or json.dumps({k: e.get(k) for k in _SETTING_KEYS}, sort_keys=True))
        latest[key] = e
    rows = []
    for e in latest.values():
        row = dict(base)
        row.update({k: e.get(k) for k in _EVAL_KEYS})
        row["step"] = e["step"]
        row["fd"] = e.get("fd", e.get("fid"))  # evals.jsonl before the fd key held every FD under "fid"
        row["eval_seed"] = e.get("seed")
        row["img_seen"] = e.get("img_seen")
        if row["img_seen"] is None and base["batch_img"] is not None:
            row["img_seen"] = base["batch_img"] * e["step"]
        row["metric_label"] = metric_label(e.get("feature_extractor"), e.get("num_samples"))
        row["metric_name"] = e.get("metric_name")
        for name, value in (e.get("metrics") or {}).items():
            if name not in COLUMNS:
                row[name] = value
        rows.append(row)
    return with_val_rows(rows, base, metrics), problems


def tidy(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the table: fixed columns first, integer columns nullable, train_flops computed."""
    df = pd.DataFrame(rows)
    if "fd" not in df.columns and "fid" in df.columns:  # a table written before the fd column
        df["fd"] = df["fid"]
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    extra = sorted(c for c in df.columns if c not in COLUMNS)
    df = df[COLUMNS + extra].copy()
    for c in _FLOAT_COLUMNS + extra:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in _INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    df["point_id"] = df["point_id"].where(df["point_id"].notna(), df["run_id"])  # no point known: its own
    df["fid"] = df["fd"].where(df["feature_extractor"] == "inception")  # FID only with the Inception weights
    df["train_flops"] = train_flops(df["gflops_per_img"], df["batch_img"].astype("float64"),
                                    df["step"].astype("float64"))
    for c in ("run_id", "point_id", "model", "family", "block", "feature_extractor", "sampler", "dataset",
              "metric_label", "metric_name", "setting", "state", "feature_weights_sha"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df.sort_values(["run_id", "step", "setting"], na_position="first", kind="stable").reset_index(drop=True)


def collect(roots) -> pd.DataFrame:
    """Every run directory under one or more output roots -> one tidy DataFrame (columns: COLUMNS + metrics).

    Missing files are tolerated (a run with only plan.json gives one row with empty metrics); an unreadable file
    or a malformed evals.jsonl line is skipped with a warning naming the run, the file and the line; directories
    without plan.json are skipped with a warning. A run id found under two roots is kept once (the first wins).
    """
    if isinstance(roots, (str, Path)):
        roots = [roots]
    rows, no_plan, seen = [], 0, set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise ValueError(f"output root {str(root)!r} does not exist")
        runs, skipped = _run_dirs(root)
        no_plan += skipped
        for run in runs:
            run_rows_, problems = run_rows(run)
            for problem in problems:
                warnings.warn(f"{run.run_id}: skipped {problem}")
            if run_rows_[0]["run_id"] in seen:
                warnings.warn(f"run {run_rows_[0]['run_id']} found again under {root}; keeping the first copy")
                continue
            seen.add(run_rows_[0]["run_id"])
            rows.extend(run_rows_)
    if no_plan:
        warnings.warn(f"skipped {no_plan} run director(y/ies) without plan.json")
    return tidy(rows)


def mixed_feature_spaces(df: pd.DataFrame) -> str | None:
    """Why the table's FDs do not compare, or None: one feature extractor on one dataset and resolution (e.g. the
    domain classifier of animal_mnist at 16 px) with two weights files (`feature_weights_sha`, from evals.jsonl).
    Each weights file is its own feature space: a domain classifier trained on another CPU type gave FDs up to 5%
    apart (3% typically) on the same samples. Rows without a sha (tables written before the column) are not judged;
    other datasets or resolutions have their own classifier and are not compared."""
    keys = ["feature_extractor", "dataset", "resolution"]
    if not {*keys, "feature_weights_sha"} <= set(df.columns):
        return None
    d = df[df["feature_extractor"].notna() & df["feature_weights_sha"].notna()]
    for (backend, dataset, resolution), g in d.groupby(keys, sort=True, dropna=False):
        runs = g.groupby("feature_weights_sha", sort=True)["run_id"].unique()
        if len(runs) > 1:
            spaces = "; ".join(f"{sha}: {', '.join(sorted(r)[:3])}{f' and {len(r) - 3} more' if len(r) > 3 else ''}"
                               for sha, r in runs.items())
            return (f"the {backend} metrics of {dataset} at {resolution} px were measured with {len(runs)} different "
                    f"weights files, FDs in different feature spaces that do not compare ({spaces}); score the runs "
                    f"of the other weights again with this machine's: python -m scaling.evaluate "
                    f"<output_root>/runs/<run_id> --rescore")
    return None


# Columns averaged over the seeds of a grid point (seed_means): the eval metrics and every named metric or
# held-out loss column beyond COLUMNS. The rest (sizes, steps, settings) is equal across seeds by construction.
_SEED_MEAN_COLUMNS = ["fd", "fid", "inception_score", "precision", "recall", "wall_s"]
SEED_SPREAD_COLUMNS = ("fd", "val_mse_ema")


def seed_means(df: pd.DataFrame, spread_cols=SEED_SPREAD_COLUMNS) -> pd.DataFrame:
    """One run per grid point: runs that differ in their seed alone (one `point_id`) become one run whose metrics
    at each (step, setting) are the mean over the seeds that have that row. `n_seeds` counts those seeds and
    `<col>_seed_min` / `<col>_seed_max` keep the range of each of `spread_cols` (equal to the value for a point of
    one seed). A merged run's run_id is its point_id and its seed is empty; a point of one run keeps its rows.
    A table already merged is returned as is, so figures and laws can each call it."""
    problem = mixed_feature_spaces(df)
    if problem:
        raise ValueError(problem)
    d = df.copy()
    if "point_id" not in d.columns:  # a table built without run directories: every run is its own point
        d["point_id"] = d["run_id"]
    spread = [c for c in spread_cols if c in d.columns]
    runs_per_point = d.groupby("point_id", dropna=False)["run_id"].transform("nunique")
    if "n_seeds" in d.columns and (runs_per_point <= 1).all():
        return d
    single = d[runs_per_point <= 1].assign(n_seeds=1)
    for c in spread:
        single[f"{c}_seed_min"] = single[f"{c}_seed_max"] = single[c]
    many = d[runs_per_point > 1]
    if many.empty:
        return single
    mean_cols = [c for c in _SEED_MEAN_COLUMNS + [c for c in d.columns if c not in COLUMNS]
                 if c in d.columns and pd.api.types.is_numeric_dtype(d[c])]
    # A row's eval setting: its `setting` name, and its columns for rows an older evals.jsonl left unnamed (a
    # held-out-loss row has none of them: one such row per step)
    keys = [k for k in ("point_id", "step", "setting", *_SETTING_KEYS) if k in d.columns]
    g = many.groupby(keys, dropna=False, sort=False)
    merged = g.first()
    merged[mean_cols] = g[mean_cols].mean()
    merged["n_seeds"] = g["run_id"].nunique()
    for c in spread:
        merged[f"{c}_seed_min"], merged[f"{c}_seed_max"] = g[c].min(), g[c].max()
    merged = merged.reset_index()
    merged["run_id"] = merged["point_id"]
    if "seed" in merged.columns:
        merged["seed"] = pd.NA
    for c in ("setting", "feature_extractor", "sampler"):  # the group keys back to None where empty, as in tidy
        if c in merged.columns:
            merged[c] = merged[c].astype(object).where(merged[c].notna(), None)
    out = pd.concat([single, merged[single.columns]], ignore_index=True)
    for c in _INT_COLUMNS:
        if c in out.columns:
            out[c] = out[c].astype("Int64")
    order = [k for k in ("run_id", "step", "setting") if k in out.columns]
    return out.sort_values(order, na_position="first", kind="stable").reset_index(drop=True)


def paper_table(path=REFERENCE_CSV) -> pd.DataFrame:
    """The paper's 12 published points (Table 4, FID-50K at 400K steps) as a results table.

    Batch 256 and 400K steps (paper section 4), 250 DDPM steps, no guidance, Inception features, ImageNet 256.
    """
    ref = pd.read_csv(path)
    need = {"model", "patch", "params_m", "gflops", "tokens", "fid50k_400k"}
    if not need <= set(ref.columns):
        raise ValueError(f"{path} lacks columns {sorted(need - set(ref.columns))}; expected dit_table4.csv")
    batch_img, step = 256, 400_000
    rows = [{
        "run_id": f"{r.model}-p{r.patch}-paper", "model": r.model, "family": "paper", "patch": r.patch,
        "block": "adaln_zero", "params": r.params_m * 1e6, "gflops_per_img": r.gflops, "tokens": r.tokens,
        "batch_img": batch_img, "step": step, "img_seen": batch_img * step, "fd": r.fid50k_400k,
        "feature_extractor": "inception", "num_samples": 50_000, "sampler": "ddpm", "sampling_steps": 250,
        "cfg_scale": 1.0, "dataset": "imagenet", "resolution": 256, "setting": "paper",
        "metric_label": metric_label("inception", 50_000), "metric_name": "fid50k_inception", "state": "done",
        "last_step": step, "steps": step,
    } for r in ref.itertuples()]
    return tidy(rows)


def read_table(path) -> pd.DataFrame:
    """A results table from results.csv / .parquet, the reference dit_table4.csv, or an output root. A table whose
    FDs mix feature spaces (mixed_feature_spaces) raises: figures and fits read it through here or seed_means."""
    path = Path(path)
    if path.is_dir():
        df = collect([path])
    elif not path.is_file():
        raise ValueError(f"{str(path)!r} is neither a results file nor an output root")
    elif path.suffix == ".parquet":
        df = tidy(pd.read_parquet(path).to_dict("records"))
    elif path.suffix != ".csv":
        raise ValueError(f"{str(path)!r}: expected .csv, .parquet or a directory")
    else:
        df = pd.read_csv(path)
        if "fid50k_400k" in df.columns:
            return paper_table(path)
        df = tidy(df.to_dict("records"))
    problem = mixed_feature_spaces(df)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return df


def write_table(df: pd.DataFrame, out) -> list[Path]:
    """results.csv (and results.parquet next to it when pyarrow is installed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    written = [out]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    df.to_parquet(out.with_suffix(".parquet"), index=False)
    return written + [out.with_suffix(".parquet")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling.results", description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", help="output roots (each holding runs/<run_id>/)")
    ap.add_argument("-o", "--out", default="results.csv", help="CSV to write (default results.csv)")
    args = ap.parse_args(argv)
    try:
        df = collect(args.roots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no run directories (runs/<run_id>/plan.json) under {', '.join(args.roots)}", file=sys.stderr)
        return 2
    written = write_table(df, args.out)  # written even so: nothing is lost, and the figures and laws refuse it
    problem = mixed_feature_spaces(df)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    evaluated = df["fd"].notna().sum()
    print(f"{df['run_id'].nunique()} runs, {evaluated} evaluated rows -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
