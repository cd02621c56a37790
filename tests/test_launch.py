"""The launcher: grid expansion, validation before submission (one-line errors, nothing touched), the dry run
against the paper's Gflops, the state of a grid point, the local pool, failure and lease handling, eval jobs."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import hydra_master, run_launch
from hydra_plugins.dit_scaling import local_launcher
from hydra_plugins.dit_scaling.local_launcher import local_slots, run_local
from scaling import jobs, slurm
from scaling.config import LocalLauncherConfig, config_from_overrides, run_dir_for, run_id
from scaling.evaluate import setting_key
from scaling.grid import Composer, grid_overrides, group_dirs
from scaling.jobs import Point, point_state, run_point, summarize, waves
from scaling.launch import config_name_of, flags_first, main
from scaling.plan import plan_rows
from scaling.rundir import RunDir, RunLocked, append_jsonl, read_jsonl, read_status, write_json, write_status

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "scaling" / "reference" / "dit_table4.csv"
TINY = ["model=laptop_s", "data.image_size=16", "data.max_images=256", "train.batch_img=8", "train.log_every=1",
        "train.ckpt_every=3", "train.steps=6", "eval.num_samples=16", "eval.num_ref=64", "eval.sampling_steps=5",
        "eval.batch_size=16", "wandb=disabled", "val.heldout_img=32"]


cli = run_launch


@pytest.fixture(autouse=True)
def no_hydra_state_left():
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def add_checkpoints(run: RunDir, steps) -> None:
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    for s in steps:
        (run.checkpoints / f"step_{s:07d}.pt").write_bytes(b"")  # list_steps reads names only


# ----------------------------------------------------------------------------- command line and grid


def test_config_name_and_dir_are_read_as_hydra_reads_them():
    assert config_name_of(["-m", "--config-dir", "sweeps", "-cn", "laptop.yaml", "patch=2"]) == ("laptop.yaml", "sweeps")
    assert config_name_of(["--config-name=paper", "-cd=x"]) == ("paper", "x")
    assert config_name_of(["patch=2"]) == (None, None)
    # flags typed after the overrides reach Hydra first, with their values
    assert flags_first(["patch=4,8", "-m", "--config-name", "laptop", "dry_run=true", "--cfg=job"]) == \
        ["-m", "--config-name", "laptop", "--cfg=job", "patch=4,8", "dry_run=true"]


def test_hydra_flags_show_the_config_the_launcher_settings_and_the_help(capsys):
    assert main(["--cfg", "job", "model=laptop_b", "patch=8"]) == 0
    job = capsys.readouterr().out
    assert "patch: 8" in job and "name: laptop_b" in job and "hydra:" not in job
    assert main(["--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]) == 0
    hydra_cfg = capsys.readouterr().out
    assert "GridSlurmLauncher" in hydra_cfg and "partition: gpu" in hydra_cfg and "cpus_per_task: 8" in hydra_cfg
    assert main(["--cfg", "job", "--resolve", "output_root=/tmp/x", "--config-name", "laptop"]) == 0
    assert "sweep: laptop" in capsys.readouterr().out
    info = cli("--info", "searchpath")  # Hydra prints it through its logging: a process, as a user runs it
    assert info.returncode == 0 and "dit-scaling-studies" in info.stdout, info  # sweeps/: --config-name laptop
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for study in sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")):
        assert f"  {study} " in help_text, study  # every study is named, with what it is
    for group in ("model: dit_b, dit_l", "data: animal_mnist", "wandb: disabled, offline, online"):
        assert group in help_text, group
    assert "Exit codes: 0 done, 1 a job failed, 2 bad input, 3 some point unfinished, 4 submitted" in help_text


def _grid(config_name: str, task: list[str], multirun: bool = True) -> list[list[str]]:
    _, master = hydra_master(config_name)
    return grid_overrides(dict(master.hydra.sweeper.params), task, multirun)


def test_grid_is_the_sweep_file_crossed_with_the_command_line():
    laptop = _grid("laptop", [])
    assert len(laptop) == 12 and laptop[0] == ["model=laptop_s", "patch=2"] and laptop[-1] == ["model=laptop_xl",
                                                                                               "patch=8"]
    assert len(_grid("laptop", ["patch=4"])) == 4          # pinned on the command line
    assert {p[1] for p in _grid("laptop", ["patch=2,8"])} == {"patch=2", "patch=8"}
    assert _grid("config", ["model=dit_s,dit_b", "seed=1"]) == [["model=dit_s", "seed=1"], ["model=dit_b", "seed=1"]]
    assert _grid("laptop", ["model=laptop_b", "patch=8"], multirun=False) == [["model=laptop_b", "patch=8"]]
    with pytest.raises(ValueError, match=r"patch=2,4,8 is a sweep; add -m"):
        _grid("laptop", ["model=laptop_b"], multirun=False)
    sampling = _grid("laptop_sampling", [])
    assert len(sampling) == 72 and sampling[0][-1] == "eval.sampling_steps=16"
    with pytest.raises(ValueError, match=r"patch=interval\(2,8\): an interval sweep; allowed: a list of values"):
        _grid("config", ["patch=interval(2,8)"])


def test_waves_never_put_one_run_twice_in_a_wave():
    pts = [Point([], None, rid) for rid in ("a", "b", "a", "c", "a")]
    assert [[p.run_id for p in w] for w in waves(pts)] == [["a", "b", "c"], ["a"], ["a"]]


# ----------------------------------------------------------------------------- dry run


def dry_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith("dit_")]


def paper_table() -> dict:
    return {(r["model"], int(r["patch"])): r for r in csv.DictReader(open(REFERENCE))}


def fake_latents(path: Path) -> Path:
    """An encoded-latents directory as far as planning reads it: 256 px ImageNet -> 32x32x4, 1000 classes."""
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"image_size": 256, "latent_size": 32, "channels": 4,
                                                "latent_scale": 0.18215, "class_names": [f"n{i}" for i in range(1000)]}))
    return path


def test_dry_run_of_the_paper_sweep_matches_table_4(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out_root = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["-cd", "sweeps", "-cn", "paper", "-m", "dry_run=true", f"data.path={fake_latents(tmp_path / 'lat')}",
               f"output_root={out_root}"])
    wall_s = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0 and wall_s < 30
    rows, paper = dry_rows(out), paper_table()
    assert len(rows) == 12
    for cells in rows:
        model, patch = re.match(r"(dit_\w+)-p(\d+)-", cells[0]).groups()
        ref = paper[(model, int(patch))]
        assert float(cells[2]) == pytest.approx(float(ref["gflops"]), rel=0.01), cells     # Gflops
        assert float(cells[1].rstrip("M")) == pytest.approx(float(ref["params_m"]), rel=0.01), cells
        assert int(cells[3]) == int(ref["tokens"]) and cells[4:7] == ["256", "x", "400000"] and cells[-1] == "new"
    assert "12 points, 12 runs (12 new)" in out and "Assuming 40% of an H100" in out
    assert not out_root.exists()  # a dry run writes nothing


def test_dry_run_of_the_bare_command_plans_the_paper_grid_without_its_data(tmp_path, capsys):
    rc = main(["-m", "model=dit_s,dit_b,dit_l,dit_xl", "patch=2,4,8", "dry_run=true", f"output_root={tmp_path}"])
    out = capsys.readouterr().out
    rows, paper = dry_rows(out), paper_table()
    assert rc == 0 and len(rows) == 12 and list(tmp_path.iterdir()) == []
    for cells in rows:  # model=dit_* selects the paper's setting: 32x32x4 latents, batch 256, 400K steps
        model, patch = re.match(r"(dit_\w+)-p(\d+)-", cells[0]).groups()
        ref = paper[(model, int(patch))]
        assert float(cells[2]) == pytest.approx(float(ref["gflops"]), rel=0.01), cells
        assert float(cells[1].rstrip("M")) == pytest.approx(float(ref["params_m"]), rel=0.01), cells
        assert cells[4:7] == ["256", "x", "400000"]
    total = float(re.search(r"; ([\d.]+) GPU-hours of training to go", out)[1])
    assert 100 < total < 200  # the 12 runs of the paper: a few days of an 8-GPU node


def test_gpu_hours_follow_the_stated_assumption():
    cfg = config_from_overrides(["model=dit_xl", "patch=2", "train=paper"])
    row = plan_rows([Point([], cfg, "x")])[0]
    flops = row["gflops_per_img"] * 1e9 * 256 * 400_000 * 3
    assert row["train_flops"] == pytest.approx(flops)
    assert row["gpu_hours"] == pytest.approx(2 * flops / (989e12 * 0.40) / 3600)
    assert 30 < row["gpu_hours"] < 80  # DiT-XL/2 for 400K steps at batch 256: days of one H100, not weeks
    # FID-50K at each of the 8 scheduled checkpoints: 50K samples x 250 DDPM steps of DiT-XL/2 forwards
    assert row["evals"] == 8
    assert row["eval_gpu_hours"] == pytest.approx(2 * 8 * 50_000 * 250 * row["gflops_per_img"] * 1e9 / (989e12 * 0.4)
                                                  / 3600)
    # every checkpoint keeps weights, EMA and AdamW's moments (16 bytes a parameter); each eval a 50K x 256^2 x 3 npz
    assert row["disk_bytes"] == 8 * row["params"] * 16 + 8 * 50_000 * 256 * 256 * 3
    assert 9.8e9 < 50_000 * 256 * 256 * 3 < 9.9e9  # the issue's ~9.8 GB per FID-50K sample file
    slurm_row = plan_rows([Point([], cfg, "x")], {"timeout_min": 1440, "gpus_per_node": 1, "nodes": 1})[0]
    assert slurm_row["job_hours"] == pytest.approx(row["gpu_hours"]) and slurm_row["requeues"] == 2  # 51 h / 24 h
    eight = plan_rows([Point([], cfg, "x")], {"timeout_min": 1440, "gpus_per_node": 8, "nodes": 1})[0]
    assert eight["requeues"] == 0


def test_point_state_from_the_run_directory(tmp_path):
    cfg = config_from_overrides([*TINY, f"output_root={tmp_path}"])
    run = run_dir_for(cfg)
    assert point_state(cfg) == "new"
    run.create()
    write_status(run, "running", 3)
    write_json(run.lock, {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})
    assert point_state(cfg) == "running"
    run.lock.unlink()
    assert point_state(cfg) == "partial"  # running without a live lease: died, resume it
    write_status(run, "failed", 3, error="boom")
    assert point_state(cfg) == "failed"
    write_status(run, "done", 6)
    add_checkpoints(run, [3, 6])
    assert point_state(cfg) == "evals"
    for step in (3, 6):
        append_jsonl(run.evals, {"step": step, "setting": setting_key(cfg.eval)})
    assert point_state(cfg) == "done"
    longer = config_from_overrides([*TINY, f"output_root={tmp_path}", "train.steps=9"])
    assert point_state(longer) == "partial"  # same run, a longer horizon: resume


# ----------------------------------------------------------------------------- bad input: one line, nothing touched


# Each kind of bad input the launcher must refuse, run as the command line it is (a process).
BAD_INPUT = {
    "unknown model": (["-m", "model=laptop_s,dit_q"], ["model=dit_q", "allowed: dit_b, dit_l, dit_s, dit_xl, laptop_b"]),
    "patch not dividing": (["-m", "patch=4,3", "data.image_size=32"], ["patch=3 does not divide the input size 32",
                                                                       "allowed: [1, 2, 4, 8, 16]", "grid point patch=3"]),
    "typo'd key": (["trian.steps=3"], ["unknown key 'trian'", "allowed: model, patch, block"]),
    "dataset path not given": (["data=imagenet"], ["data.path is required"]),
    "dataset path missing": (["data=imagenet", "data.path=/nonexistent/train"],
                             ["data.path='/nonexistent/train' does not exist"]),
    "unknown launcher": (["-m", "hydra/launcher=pbs"], ["hydra/launcher=pbs", "allowed: local, slurm, slurm_cpu"]),
    "num_samples <= 0": (["eval.num_samples=0"], ["eval.num_samples=0", "allowed: an integer >= 1"]),
    "cfg scale < 1": (["eval.cfg_scale=0.5"], ["eval.cfg_scale=0.5", "allowed: >= 1.0"]),
}
# More of the same kinds, through main() in this process (the same code path, without a python start each).
BAD_INPUT_IN_PROCESS = {
    "unknown model, single run": (["model=dit_q"], ["model=dit_q", "allowed: dit_b"]),
    "patch not an integer": (["patch=four"], ["patch=four", "Integer"]),
    "patch zero": (["patch=0"], ["patch=0 does not divide", "allowed: [1, 2, 4, 8, 16]"]),
    "typo'd nested key": (["train.stpes=3"], ["unknown key 'train.stpes'", "allowed: steps, batch_img"]),
    "appended unknown key": (["+train.speed=3"], ["unknown key 'train.speed'", "allowed: steps"]),
    "unknown launcher key": (["-m", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu"],
                             ["unknown key 'hydra.launcher.partiton'", "partition"]),
    "launcher of hydra, not of the project": (["-m", "hydra/launcher=basic"], ["BasicLauncher: not a launcher of this project",
                                                                               "allowed: hydra/launcher=local"]),
    "bad local parallel": (["-m", "hydra.launcher.parallel=-1"], ["hydra.launcher.parallel=-1 must be >= 0"]),
    "sweep without -m": (["patch=4,8"], ["patch=4,8 is a sweep; add -m"]),
    "study grid without -m": (["--config-name", "laptop"], ["model=laptop_s,laptop_b,laptop_l,laptop_xl is a sweep"]),
    "slurm without -m": (["hydra/launcher=slurm"], ["hydra/launcher=slurm submits a grid: add -m"]),
    "unparsable override": (["model=dit_s,"], ["cannot parse override 'model=dit_s,'"]),
    "negative sampling steps": (["eval.sampling_steps=-5"], ["eval.sampling_steps=-5", "allowed: an integer >= 1"]),
    "precision fp16": (["train.precision=fp16"], ["train.precision='fp16'", "allowed: auto, bf16, fp32"]),
    "device gpu": (["train.device=gpu"], ["train.device='gpu'", "allowed: auto, cpu, cuda"]),
    "device tpu": (["train.device=tpu"], ["train.device='tpu'", "allowed: auto, cpu, cuda"]),
    "cuda on a machine without one": (["train.device=cuda"], ["train.device=cuda", "no CUDA device"]),
    "wandb mode typo": (["wandb.mode=onlin"], ["wandb.mode='onlin'", "allowed: offline, online, disabled"]),
    "wandb online without a key": (["wandb=online"], ["wandb=online", "no wandb API key"]),
    "inception weights missing": (["eval.inception_weights=/nope.pth"], ["eval.inception_weights='/nope.pth'",
                                                                         "is not a file"]),
    "negative weight decay": (["train.weight_decay=-1"], ["train.weight_decay=-1.0", ">= 0"]),
    "negative workers": (["train.num_workers=-1"], ["train.num_workers=-1", ">= 0"]),
    "lr nan": (["train.lr=nan"], ["train.lr=nan", "finite"]),
    "lr inf": (["train.lr=inf"], ["train.lr=inf", "finite"]),
    "output root in /proc": (["output_root=/proc/x"], ["output_root='/proc/x' is not writable"]),
    "unknown study": (["--config-name", "papr"], ["--config-name=papr", "allowed: config", "laptop", "paper"]),
    "model with its patch": (["model=DiT-XL/2"], ["model=DiT-XL/2: no such model config", "patch=2"]),
    "sweeper params of a config without a grid": (["-m", "hydra.sweeper.params.patch=4"],
                                                  ["hydra.sweeper.params.patch: not an axis", "-m patch=a,b"]),
    "latent image size not a multiple of 8": (["model=dit_xl", "data.image_size=250", "data.path=/nope",
                                               "dry_run=true"], ["data.image_size=250", "multiple of 8"]),
    "bad value at the last grid point": (["-m", "data.image_size=16", "patch=2,4,8,3"],
                                         ["patch=3 does not divide", "grid point patch=3"]),
}


def existing_output_root(root: Path) -> Path:
    out = root / "out"
    existing = RunDir(out / "runs" / "laptop_s-p4-existing").create()
    write_status(existing, "done", 6)
    append_jsonl(existing.metrics, {"step": 6, "loss": 0.5})
    return out


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every bad command line run as a process, two at a time, against an output root holding a run."""
    root = tmp_path_factory.mktemp("bad_input")
    out = existing_output_root(root)
    (root / "afile").write_text("not a directory")
    cases = {**BAD_INPUT, "unwritable output_root": ([f"output_root={root / 'afile' / 'out'}"],
                                                     ["not writable", "afile is a file"])}
    before = snapshot(root)

    def run(item):
        name, (argv, _) = item
        argv = argv if any(a.startswith("output_root=") for a in argv) else [*argv, f"output_root={out}"]
        return name, cli(*argv, timeout=300)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(pool.map(run, cases.items()))
    return cases, results, before, snapshot(root)


@pytest.mark.parametrize("name", [*BAD_INPUT, "unwritable output_root"])
def test_bad_input_fails_in_one_line_before_anything_runs(bad_input_results, name):
    cases, results, before, after = bad_input_results
    proc, expected = results[name], cases[name][1]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert "[launch]" not in proc.stdout and "[train]" not in proc.stdout
    assert after == before  # the existing run is untouched and nothing new was written


@pytest.mark.parametrize("name", BAD_INPUT_IN_PROCESS)
def test_more_bad_input_fails_in_one_line(tmp_path, capsys, monkeypatch, name):
    argv, expected = BAD_INPUT_IN_PROCESS[name]
    out = existing_output_root(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    assert main([*argv] + ([] if any(a.startswith("output_root=") for a in argv) else [f"output_root={out}"])) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- local pool


def test_local_slots_one_job_per_gpu_or_a_share_of_the_cpu():
    assert local_slots(LocalLauncherConfig(), ["0", "1", "2"], 16) == [{"CUDA_VISIBLE_DEVICES": g} for g in "012"]
    assert len(local_slots(LocalLauncherConfig(parallel=2), ["0", "1", "2"], 16)) == 2
    with pytest.raises(ValueError, match=r"parallel=4 but only 3 GPUs .* allowed: 0..3"):
        local_slots(LocalLauncherConfig(parallel=4), ["0", "1", "2"], 16)
    cpu = local_slots(LocalLauncherConfig(parallel=2), [], 8)
    assert len(cpu) == 2 and cpu[0]["OMP_NUM_THREADS"] == "4" and cpu[0]["CUDA_VISIBLE_DEVICES"] == ""
    assert local_slots(LocalLauncherConfig(), [], 8)[0]["OMP_NUM_THREADS"] == "8"


def test_local_pool_runs_a_bounded_number_of_jobs_each_on_its_own_gpu(tmp_path, monkeypatch):
    record = tmp_path / "record"
    record.mkdir()
    job = ("import os, sys, time; name, code = sys.argv[1], int(sys.argv[2]); t0 = time.time(); time.sleep(0.6); "
           "open(os.path.join(sys.argv[3], name), 'w').write(f\"{t0} {time.time()} {os.environ['CUDA_VISIBLE_DEVICES']}\");"
           " sys.exit(code)")
    points = [Point([f"r{i}", str(code)], None, f"r{i}") for i, code in enumerate([0, 1, 0, 3, 0])]
    commands = {p.run_id: [sys.executable, "-c", job, *p.overrides, str(record)] for p in points}
    codes = run_local(commands, points, [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}],
                      tmp_path / "logs")
    assert codes == {"r0": 0, "r1": 1, "r2": 0, "r3": 3, "r4": 0}
    spans = [tuple(map(float, (record / p.run_id).read_text().split()[:2])) + ((record / p.run_id).read_text().split()[2],)
             for p in points]
    for t, *_ in spans:  # at most two at once, and jobs running together hold different GPUs
        running = [s for s in spans if s[0] <= t < s[1]]
        assert len(running) <= 2 and len({s[2] for s in running}) == len(running)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"r{i}.log" for i in range(5)]


# ----------------------------------------------------------------------------- one job: failures and the lease


def test_a_failing_job_leaves_status_failed_with_its_error(tmp_path, monkeypatch):
    cfg = config_from_overrides([*TINY, f"output_root={tmp_path}"])

    def broken(cfg):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(jobs, "train", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_point(cfg)
    status = read_status(run_dir_for(cfg))
    assert status["state"] == "failed" and status["error"] == "RuntimeError: CUDA error: out of memory"


def test_a_run_held_by_another_launch_is_left_alone(tmp_path, monkeypatch):
    cfg = config_from_overrides([*TINY, f"output_root={tmp_path}"])
    run = run_dir_for(cfg).create()
    write_status(run, "running", 4)
    lease = {"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time()}
    write_json(run.lock, lease)
    before = snapshot(run.path)

    def locked(cfg):
        raise RunLocked("run is being trained by another pid")

    monkeypatch.setattr(jobs, "train", locked)
    assert run_point(cfg)["state"] == "locked"
    jobs.mark_failed(run, ValueError("must not be written: the other holder is alive"))
    assert snapshot(run.path) == before


# ----------------------------------------------------------------------------- SLURM pieces without a cluster


class FakeJob:
    def __init__(self, job_id, error=None):
        self.job_id, self.error, self.finished = job_id, error, False

    def done(self):
        return self.finished

    def results(self):
        if self.error:
            raise RuntimeError(self.error)
        return [3]


class FakeExecutor:
    def __init__(self, error=None):
        self.jobs, self.error = [], error

    def submit(self, fn, cfg, steps, launch_dir=None):
        assert isinstance(fn, slurm.EvalJob) and steps
        self.jobs.append(FakeJob(str(len(self.jobs)), self.error))
        return self.jobs[-1]


@pytest.fixture
def slurm_says_running(monkeypatch):
    monkeypatch.setattr(slurm, "slurm_state", lambda job_id: "RUNNING")
    monkeypatch.setattr(slurm, "slurm_states", lambda job_ids: {j: "RUNNING" for j in job_ids})


def test_eval_jobs_one_at_a_time_per_run_until_every_checkpoint_has_its_eval(tmp_path, slurm_says_running):
    pts = [Point([], config_from_overrides([*TINY, f"output_root={tmp_path}", f"seed={seed}", "eval.inline=false"]),
                 name) for seed, name in ((0, "a"), (1, "b"))]
    for p in pts:
        add_checkpoints(run_dir_for(p.cfg), [3])
    ex = FakeExecutor()
    jobs = slurm.EvalJobs(ex, pts)
    jobs.poll()
    assert len(ex.jobs) == 2
    jobs.poll()
    assert len(ex.jobs) == 2  # in flight: nothing resubmitted
    add_checkpoints(run_dir_for(pts[0].cfg), [6])  # a new checkpoint while run a's eval job runs
    append_jsonl(run_dir_for(pts[0].cfg).evals, {"step": 3, "setting": setting_key(pts[0].cfg.eval)})
    ex.jobs[0].finished = True
    jobs.poll()
    assert len(ex.jobs) == 3 and jobs.in_flight["a"][1] == [6] and jobs.in_flight["b"][2] is ex.jobs[1]
    ex.jobs[2].finished = True  # ends without writing step 6: reported once, not resubmitted forever
    jobs.poll()
    assert jobs.failed == {"a": "eval job ended but steps [6] still lack " + setting_key(pts[0].cfg.eval)}
    assert len(ex.jobs) == 3


def test_eval_job_failure_is_reported(tmp_path, slurm_says_running):
    cfg = config_from_overrides([*TINY, f"output_root={tmp_path}", "eval.inline=false"])
    add_checkpoints(run_dir_for(cfg), [3])
    ex = FakeExecutor(error="CUDA out of memory")
    jobs = slurm.EvalJobs(ex, [Point([], cfg, "r")])
    jobs.poll()
    ex.jobs[0].finished = True
    assert jobs.drain() == {"r": "eval job 0 failed: CUDA out of memory"}


def test_summary_exit_codes(tmp_path, capsys):
    cfgs = [config_from_overrides([*TINY, f"output_root={tmp_path}", f"seed={s}"]) for s in range(3)]
    pts = [Point([], c, run_id(c)) for c in cfgs]
    for c, state in zip(cfgs, ("done", "done", "failed")):
        run = run_dir_for(c).create()
        write_status(run, state, 6)
        add_checkpoints(run, [3, 6])
        for s in (3, 6):
            append_jsonl(run.evals, {"step": s, "setting": setting_key(c.eval)})
    assert summarize(pts[:2], {}, {}) == 0
    assert summarize(pts, {}, {}) == 1
    assert summarize(pts[:2], {pts[0].run_id: "failed: job 4_0 ended (CANCELLED)"}, {}) == 1
    assert summarize(pts[:2], {}, {pts[1].run_id: "eval job 9 failed: boom"}) == 1
    assert summarize(pts, {pts[2].run_id: "submitted"}, {}) == 4  # the failed run resubmitted: it resumes
    write_status(run_dir_for(cfgs[1]), "preempted", 3)
    assert summarize(pts[:2], {}, {}) == 3
    assert "job 4_0 ended (CANCELLED)" in capsys.readouterr().out


@pytest.mark.parametrize("launcher", ["slurm", "slurm_cpu"])
def test_slurm_launcher_defaults_reach_sbatch(tmp_path, launcher):
    from omegaconf import OmegaConf

    from scaling.grid import launcher_kind

    _, master = hydra_master("laptop", [f"hydra/launcher={launcher}", f"output_root={tmp_path}"])
    assert launcher_kind(master.hydra.launcher) == "slurm"  # the laptop study's pool keys do not break SLURM
    params = OmegaConf.to_container(master.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("GridSlurmLauncher") and params["max_num_timeout"] == 20
    assert params["parallel"] == 2 and params["wait"] is False
    script = slurm.slurm_executor(params)._executor._make_submission_file_text("true", "uid")
    assert "parallel" not in script and "wait" not in script
    if launcher == "slurm_cpu":  # a CPU partition: no gres line at all, the job's CPUs for torch
        assert "gpus" not in script and "gres" not in script and "#SBATCH --cpus-per-task=2\n" in script
        evals = slurm.slurm_executor(slurm.eval_params(params))._executor._make_submission_file_text("true", "uid")
        assert "gpus" not in evals and "#SBATCH --job-name=dit-scaling-eval\n" in evals
        return
    evals = slurm.slurm_executor(slurm.eval_params({**params, "eval_timeout_min": 30}))._executor
    evals = evals._make_submission_file_text("true", "uid")
    for flag in ("--gpus-per-node=1", "--ntasks-per-node=1", "--time=30", "--job-name=dit-scaling-eval"):
        assert f"#SBATCH {flag}\n" in evals, flag
    assert params["submitit_folder"] == f"{tmp_path}/slurm/.submitit/%j"
    script = slurm.slurm_executor(params)._executor._make_submission_file_text("true", "uid")
    for flag in ("--signal=USR2@120", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64GB",
                 "--time=1440", "--job-name=dit-scaling"):
        assert f"#SBATCH {flag}\n" in script, flag


# ----------------------------------------------------------------------------- end to end on this machine


@pytest.mark.slow
def test_local_grid_trains_evaluates_and_a_relaunch_skips_it(tmp_path):
    argv = ["-m", *TINY, "patch=4,8", f"output_root={tmp_path}", "hydra.launcher.parallel=2"]
    first = cli(*argv)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for path in runs:
        run = RunDir(path)
        assert read_status(run)["state"] == "done"
        assert [r["step"] for r in read_jsonl(run.evals)] == [3, 6]
        assert (tmp_path / "logs" / f"{run.run_id}.log").is_file()
    before = snapshot(tmp_path / "runs")
    again = cli(*argv, "analyze=true")  # nothing to run; then the results table and the figures
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2 and "started" not in again.stdout, \
        first.stdout + "\n=====\n" + again.stdout
    assert snapshot(tmp_path / "runs") == before
    with open(tmp_path / "analysis" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["patch"], r["step"]) for r in rows if r["fd"]) == [("4", "3"), ("4", "6"), ("8", "3"), ("8", "6")]
    assert len(rows) == 12 and all(r["val_mse_ema"] for r in rows)  # + the held-out loss at every logged step
    assert (tmp_path / "analysis" / "fig6_fid_vs_steps.csv").is_file()
    table = subprocess.run([sys.executable, "-m", "scaling.status", str(tmp_path)], capture_output=True, text=True)
    assert table.stdout.strip().endswith("2 runs: 2 done")


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_job_that_fails_at_run_time_is_failed_and_the_launch_exits_nonzero(tmp_path):
    proc = cli("-m", *TINY, "train.lr=100", "train.grad_clip=0", f"output_root={tmp_path}")  # diverges at step 3
    assert proc.returncode == 1
    (path,) = (tmp_path / "runs").iterdir()
    status = read_status(RunDir(path))
    assert status["state"] == "failed" and status["error"].startswith("FloatingPointError: loss is inf at step 3")
    assert re.search(r": failed \(exit 1\)$", proc.stdout.strip())


@pytest.mark.slow
def test_two_launches_of_one_run_do_not_both_train_it(tmp_path):
    argv = [*TINY, "patch=8", "train.steps=100000", "train.ckpt_every=100000", "eval.inline=false",
            f"output_root={tmp_path}"]
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the first launch
        first = subprocess.Popen([sys.executable, "-m", "scaling.launch", *argv], cwd=ROOT, stdout=f,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "runs").glob("*/metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        second = cli(*argv, timeout=180)  # the same run while the first trains it
        first.send_signal(signal.SIGTERM)  # then stop the first: it saves at the next step
        first.wait(timeout=120)
    finally:
        first.kill()
    out = log.read_text()
    assert second.returncode == 3 and "being trained by pid" in second.stdout, second.stdout + second.stderr
    assert first.returncode == 3 and out.strip().endswith(": preempted"), out
    (path,) = (tmp_path / "runs").iterdir()
    steps = [r["step"] for r in read_jsonl(RunDir(path).metrics)]
    assert steps == list(range(1, len(steps) + 1))  # one trainer: every step logged once, in order
    assert read_status(RunDir(path))["step"] == steps[-1]


def test_eval_submission_refused_is_reported_without_looping(tmp_path, slurm_says_running):
    cfg = config_from_overrides([*TINY, f"output_root={tmp_path}", "eval.inline=false"])
    add_checkpoints(run_dir_for(cfg), [3])
    done = config_from_overrides([*TINY, f"output_root={tmp_path}", "eval.inline=false", "seed=1"])  # nothing due
    ex = FakeExecutor()

    def refuse(*a):
        raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account")

    ex.submit = refuse
    assert slurm.EvalJobs(ex, [Point([], cfg, "r"), Point([], done, "d")]).drain() == \
        {"r": "eval submission failed: sbatch: error: Batch job submission failed: Invalid account"}


def test_the_local_pool_starts_the_largest_jobs_first_counting_steps_already_done(tmp_path):
    def point(model, patch, steps=1000):
        cfg = config_from_overrides([f"model={model}", f"patch={patch}", f"train.steps={steps}",
                                     f"output_root={tmp_path}"])
        return Point([], cfg, run_id(cfg))

    s8, b4, xl2 = point("laptop_s", 8), point("laptop_b", 4), point("laptop_xl", 2)
    assert [p.run_id for p in local_launcher.largest_first([s8, xl2, b4])] == [xl2.run_id, b4.run_id, s8.run_id]
    write_status(run_dir_for(xl2.cfg), "preempted", 999)  # 1 step of laptop-XL/2 left: less than all of S/8
    assert [p.run_id for p in local_launcher.largest_first([s8, xl2, b4])] == [b4.run_id, s8.run_id, xl2.run_id]
    # equal FLOPs (an isoFLOP budget): the tiny model's many steps take longest and start first
    l4, xxs4 = point("laptop_l", 4, 552), point("laptop_xxs", 4, 43_013)
    assert [p.run_id for p in local_launcher.largest_first([l4, xxs4])] == [xxs4.run_id, l4.run_id]


def test_the_progress_line_names_each_running_job_with_its_step_rate_and_eta(tmp_path):
    cfg = config_from_overrides(["model=laptop_b", "patch=4", "train.steps=600", "train.batch_img=32",
                                 f"output_root={tmp_path}"])
    idle = config_from_overrides(["model=laptop_s", "patch=8", f"output_root={tmp_path}"])
    run = run_dir_for(cfg)
    run.path.mkdir(parents=True)
    append_jsonl(run.metrics, {"step": 100, "img_per_s": 64.0})
    append_jsonl(run.metrics, {"step": 200, "img_per_s": 32.0})  # 400 steps x 32 img / 32 img/s = 400 s left
    line = local_launcher.progress_line([Point([], cfg, run_id(cfg)), Point([], idle, run_id(idle))], 3, 12, 125.0)
    assert line.startswith("[launch] 3/12 jobs finished after 2m05s; running: ")
    assert "laptop_b/4 step 200/600 (32 img/s, ETA 6m40s)" in line and "laptop_s/8 starting" in line


def test_checks_that_depend_on_where_the_jobs_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    out = f"output_root={tmp_path / 'out'}"
    # SLURM: the key may live in the jobs' environment (a warning); CUDA must be in the jobs' request (an error).
    assert main(["-m", "hydra/launcher=slurm", "wandb=online", "dry_run=true", out]) == 0
    err = capsys.readouterr().err
    assert "warning: wandb=online" in err and "SLURM jobs need it" in err
    assert main(["-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "train.device=cuda", out]) == 2
    assert "the SLURM jobs request no GPU" in capsys.readouterr().err
    # A dry run plans for another machine: data that is not here is a warning, and the plan is printed.
    assert main(["model=dit_xl", "patch=2", "data.path=/nope", "dry_run=true", out]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ("warning: data.path=/nope is not on this machine; planned from data.image_size=256"
                                    " and data.num_classes=1000")
    assert "dit_xl-p2" in captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--config-name", "paper", "-m"], ["--config-name", "sampling", "-m"],
                                  ["--config-name", "laptop", "-m", "+train.extra=1"],
                                  ["--config-name", "laptop_blocks", "-m"],
                                  ["-m", "model=laptop_s,dit_b", "patch=2,8", "train.lr=3e-4", "data.flip=false"],
                                  ["-m", "patch=2,8", "train.lr=0.1", "++train.lr=0.2"]],
                         ids=["paper", "sampling", "laptop+append", "laptop_blocks", "command-line grid",
                              "a key set twice"])
def test_composing_once_per_group_choice_gives_the_configs_of_full_composition(argv):
    name = argv[argv.index("--config-name") + 1] if "--config-name" in argv else "config"
    task = [a for a in argv if a not in ("-m", "--config-name", name)]
    hydra_overrides = [a for a in task if a.lstrip("+").startswith("hydra")]
    loader, master = hydra_master(name, task)
    grid = grid_overrides(dict(master.hydra.sweeper.params), [a for a in task if a not in hydra_overrides], True)
    composer = Composer(loader, master, group_dirs(None))
    sample = grid[:: max(1, len(grid) // 12)]  # every point of a 12-point grid; 12 of the 72-point one
    if "+train.extra=1" in argv:  # an appended key is not in the schema: both ways refuse it
        with pytest.raises(Exception, match="extra"):
            composer.point(sample[0])
        with pytest.raises(Exception, match="extra"):
            composer.point(sample[0], fast=False)
        return
    fast = [composer.point(overrides) for overrides in sample]
    models = {o for p in sample for o in p if o.startswith("model=")} or {"the config's model"}
    assert len(composer.composed) == len(models)  # one composition per model: patch etc. are set on a copy
    full = Composer(loader, master, group_dirs(None))
    for overrides, cfg in zip(sample, fast):
        assert cfg == full.point(overrides, fast=False), overrides
