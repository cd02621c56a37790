"""Compute budgets as horizons (train.budget_flops) and the isoFLOP sweep's plan."""

import re

import pytest

from helpers import run_launch
from scaling import jobs
from scaling.config import budget_steps, config_from_overrides, config_to_dict, make_plan, run_id, validate
from scaling.jobs import swept_budgets
from scaling.rundir import write_json


@pytest.mark.parametrize("model,patch", [("laptop_s", 4), ("laptop_xl", 2)])
def test_budget_sets_steps_by_the_flop_convention(model, patch):
    cfg = config_from_overrides([f"model={model}", f"patch={patch}", "train.budget_flops=1e12"])
    plan = make_plan(cfg)  # fvcore Gflops, as a training run writes plan.json
    assert cfg.train.steps == budget_steps(cfg) == plan["steps"]
    # steps come from the closed-form Gflops (within 0.5% of fvcore's), rounded to a whole step
    one_step = plan["gflops_per_img"] * 1e9 * plan["batch_img"] * 3
    assert abs(plan["train_flops"] - 1e12) <= 0.5 * one_step + 0.005 * 1e12
    assert plan["budget_flops"] == 1e12
    assert run_id(cfg) == run_id(config_from_overrides([f"model={model}", f"patch={patch}"]))  # a horizon


def test_no_budget_keeps_steps_and_a_negative_one_fails():
    cfg = config_from_overrides(["model=laptop_b", "patch=4", "train.steps=123"])
    assert cfg.train.steps == 123 and make_plan(cfg, count="closed_form")["budget_flops"] is None
    cfg = config_from_overrides(["model=laptop_b", "patch=4", "train.budget_flops=-1"])
    with pytest.raises(ValueError, match="train.budget_flops=-1.0 must be >= 0"):
        validate(cfg)


def test_isoflop_sweep_plan(tmp_path):
    r = run_launch("--config-dir", "sweeps", "--config-name", "laptop_isoflop", "-m", "dry_run=true",
                   f"output_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "30 points, 6 runs" in lines[-1]
    head = re.split(r"\s{2,}", lines[0].strip())
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in lines[1:-1]]
    budgets = {b: set() for b in (1e12, 1.2e12, 1.4e12, 1.7e12, 2e12)}  # only where the sizes span the optimum
    for row in rows:
        flops = float(row[head.index("train_flops")])
        b = min(budgets, key=lambda b: abs(flops / b - 1))
        assert abs(flops / b - 1) < 0.005  # rounding to whole steps: 276 steps of laptop-L/4 at 1e12
        budgets[b].add(row[0])
    assert all(len(v) == 6 for v in budgets.values())  # every size at every budget
    assert {r[0].split("-")[0] for r in rows} == {"laptop_xxs", "laptop_xs", "laptop_s", "laptop_m", "laptop_b",
                                                  "laptop_l"}
    assert {r[0].split("-")[1] for r in rows} == {"p4"}


def test_the_analysis_reads_the_profiles_at_every_budget_swept_into_the_root(monkeypatch, tmp_path):
    root = tmp_path / "iso"
    for n, budgets in enumerate([(1e11, 3e11, 0.0), (3e11, 3.3333333e11)]):  # a later launch adds one budget
        points = [{"run_id": f"r{i}", "config": config_to_dict(config_from_overrides(
            [f"train.budget_flops={b}", f"output_root={root}"]))} for i, b in enumerate(budgets)]
        write_json(root / "launches" / f"t{n}" / "launch.json", {"argv": [], "points": points})
    assert swept_budgets(root) == [1e11, 3e11, 3.3333333e11]
    calls, waited, exit_codes = [], [], {}

    class Proc:  # subprocess.Popen, recorded
        def __init__(self, argv):
            calls.append(argv)
            self.module = argv[2]

        def wait(self):
            waited.append(self.module)
            return exit_codes.get(self.module, 0)

    monkeypatch.setattr(jobs.subprocess, "Popen", Proc)
    assert jobs.analyze(str(root), [1e12, 0.0])  # a single run's own budget joins them
    assert [c[2] for c in calls] == ["scaling.results", "analysis.figures", "analysis.law_figures"]
    assert calls[-1][-2:] == ["--budgets", "100000000000.0,300000000000.0,333333330000.0,1000000000000.0"]
    calls.clear()
    assert jobs.analyze(str(tmp_path / "plain")) and "--budgets" not in calls[-1]
    # figures and laws run at once; one failing fails the analysis, and the other is still waited for
    calls.clear(), waited.clear()
    exit_codes["analysis.figures"] = 1
    assert not jobs.analyze(str(root))
    assert waited == ["scaling.results", "analysis.figures", "analysis.law_figures"]
    exit_codes["scaling.results"] = 2  # a table that failed: nothing is drawn from it
    calls.clear()
    assert not jobs.analyze(str(root)) and [c[2] for c in calls] == ["scaling.results"]
