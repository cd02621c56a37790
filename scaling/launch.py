"""Launch the study: one job per grid point, each training one run (with its evals) into its run directory.

    python -m scaling.launch                                              # one run: the embedded default
    python -m scaling.launch -m model=laptop_s,laptop_b patch=4,8         # a grid, on this machine
    python -m scaling.launch --config-dir sweeps --config-name laptop -m  # a named study (sweeps/*.yaml)
    python -m scaling.launch -m model=dit_s,dit_b,dit_l,dit_xl patch=2,4,8 dry_run=true   # plan only
    python -m scaling.launch -m ... hydra/launcher=slurm                  # the same grid as SLURM jobs
    python -m scaling.launch -m ... analyze=true                          # then results table + figures

Before anything runs, the sweep is expanded here exactly as Hydra's basic sweeper would expand it
(`hydra.sweeper.params` of the config, then the command line), and every grid point is composed and validated:
a bad value stops the launch with one line naming it and the allowed values (exit 2), before any job exists.
Finished runs (done, with every eval) are skipped, so relaunching a finished grid submits nothing; the other
points are handed to the launcher named by `hydra/launcher`:

- local (default): `parallel` jobs at once on this machine, each in its own process
  (`python -m scaling.launch <the point's overrides>`), one GPU each, or the CPU;
- slurm (scaling/slurm.py): hydra-submitit-launcher's SLURM launcher (conf/hydra/launcher/slurm.yaml); a job
  saves on USR2 and is requeued by submitit, the requeued job resumes from the checkpoint. With
  `eval.inline=false`, eval jobs are submitted from here as checkpoints appear, one job per run at a time, so
  training never waits for sampling.

Exit code: 0 when every point is done, 1 when a job failed (its status.json says failed, with the error),
2 for bad input, 3 when some point is not finished (held by another launch, or preempted).
"""

import sys

from scaling.signals import install_early

if __name__ == "__main__":  # `python -m scaling.launch`: stop signals are recorded before the slow imports below
    install_early()            # (the only statement between imports: a job stopped while starting still saves)

import importlib.util
import netrc
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType, ValueType
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from scaling.config import (CONF_DIR, SWEEPS_DIR, LocalLauncherConfig, RunConfig, data_spec, make_plan,
                            register_configs, run_dir_for, run_id, studies, validate)
from scaling.evaluate import setting_key
from scaling.jobs import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNFINISHED, Point, first_line, mark_failed,
                          point_state, run_single, waves)
from scaling.rundir import last_jsonl_row, read_status
from scaling.signals import stop_signals
from scaling.slurm import run_slurm
from scaling.train import format_duration

LAUNCHERS = ("local", "slurm")
LAUNCH_OPTIONS = ("analyze",)    # options of this command, not of a run: `analyze=true`

# GPU-hours of the dry run: model flops = 2 x multiply-adds, on an H100 SXM (989 dense bf16 TFLOP/s, NVIDIA
# datasheet) at an assumed 40% model-flops utilisation. An estimate for planning, stated wherever it is printed.
ASSUMED_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
PROGRESS_S = 60.0                # how often the local pool prints where its running jobs are


@dataclass
class LaunchArgs:
    multirun: bool = False
    config_dir: str | None = None     # a directory searched before conf/ (sweeps/)
    config_name: str = "config"
    overrides: list[str] = field(default_factory=list)
    analyze: bool = False


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> LaunchArgs:
    args, rest = LaunchArgs(), list(argv)
    while rest:
        a = rest.pop(0)
        if a in ("-m", "--multirun"):
            args.multirun = True
        elif a in ("-cd", "--config-dir", "-cn", "--config-name") or a.startswith(("--config-dir=", "--config-name=")):
            key, _, value = a.partition("=")
            if not value:
                if not rest:
                    raise ValueError(f"{a} needs a value")
                value = rest.pop(0)
            if key in ("-cd", "--config-dir"):
                if not Path(value).is_dir():
                    raise ValueError(f"--config-dir={value!r} is not a directory")
                args.config_dir = str(Path(value).resolve())
            else:
                args.config_name = value.removesuffix(".yaml")
        elif a.startswith("-"):
            raise ValueError(f"unknown option {a!r}; allowed: -m/--multirun, --config-dir/-cd DIR, "
                             f"--config-name/-cn NAME, -h/--help")
        elif a.split("=", 1)[0] in LAUNCH_OPTIONS:
            key, _, value = a.partition("=")
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{a}: {key} takes true or false")
            setattr(args, key, value.lower() == "true")
        else:
            args.overrides.append(a)
    return args


# ----------------------------------------------------------------------------- composition and the grid


def make_hydra(args: LaunchArgs):
    """Hydra's config loader over conf/ (and --config-dir first, as `python app.py --config-dir` does)."""
    register_configs()
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(str(CONF_DIR))
    search_path.append("dit-scaling-studies", f"file://{SWEEPS_DIR}",  # --config-name laptop without --config-dir
                       anchor=SearchPathQuery(provider="main"))
    if args.config_dir:
        search_path.prepend("command-line", f"file://{args.config_dir}")
    return Hydra.create_main_hydra2(task_name="scaling", config_search_path=search_path)


def compose_master(hydra, args: LaunchArgs):
    """The config with the hydra node (launcher, sweeper params), before any sweep is expanded."""

    cfg = hydra.compose_config(args.config_name, args.overrides, run_mode=RunMode.MULTIRUN,
                               with_log_configuration=False)
    HydraConfig.instance().set_config(cfg)
    return cfg


def expand_grid(hydra, master, args: LaunchArgs) -> list[list[str]]:
    """Override lists, one per grid point: `hydra.sweeper.params` then the command line, crossed.

    The same expansion as Hydra's BasicSweeper (its own `split_arguments`), so the grid printed and validated
    here is the grid that runs. Without -m, a sweep is an error rather than a silent single run.
    """

    parser = OverridesParser.create(config_loader=hydra.config_loader)
    from_config = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    task = list(master.hydra.overrides.task)  # the command line without hydra.* (those are in the master already)
    parsed = parser.parse_overrides(from_config + task)
    if not args.multirun:
        pinned = {o.get_key_element() for o in parser.parse_overrides(task) if not o.is_sweep_override()}
        swept = [o for o in parsed if o.is_sweep_override() and o.get_key_element() not in pinned]
        if swept:
            raise ValueError(f"{swept[0].input_line} is a sweep; add -m to launch the grid")
        return [task]
    return [list(point) for point in BasicSweeper.split_arguments(parsed, None)[0]]


class Composer:
    """Grid points' RunConfigs (typed; validated by the caller), composed by Hydra's config loader.

    Composing is most of a dry run's time (~0.3 s a point): a point is composed once per distinct set of its
    config-group and structural overrides (model=dit_b, +key=..., hydra.*), and its plain value overrides
    (patch=2, eval.sampling_steps=64) are then set on a copy, as Hydra itself applies them after composing.
    tests/test_launch.py checks that both ways give the same config for every point of every study."""

    def __init__(self, hydra, master, group_dirs: list[Path]):
        self.hydra, self.master, self.group_dirs = hydra, master, group_dirs
        self.parser = OverridesParser.create()
        self.composed: dict[tuple, dict] = {}

    def is_value(self, o) -> bool:
        key = o.key_or_group
        return (o.type == OverrideType.CHANGE and o.package is None and not key.startswith("hydra")
                and o.value_type == ValueType.ELEMENT and isinstance(o.value(), (str, int, float, bool, type(None)))
                and not any((d / key).is_dir() for d in self.group_dirs))

    def point(self, overrides: list[str], fast: bool = True):
        parsed = self.parser.parse_overrides(list(overrides))
        structural = {o.key_or_group for o in parsed if not self.is_value(o)}  # train.lr=1 ++train.lr=2: Hydra's
        values = [o for o in parsed if fast and self.is_value(o) and o.key_or_group not in structural]
        rest = tuple(o.input_line for o in parsed if o not in values)
        if rest not in self.composed:
            cfg = self.hydra.config_loader.load_sweep_config(self.master, list(rest))
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            self.composed[rest] = OmegaConf.to_container(cfg)
        # `+key=value` appends past the schema; merging into RunConfig again rejects any key it does not have.
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), self.composed[rest])
        for o in values:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
        return OmegaConf.to_object(cfg)


def launcher_of(master) -> tuple[str, LocalLauncherConfig | None]:
    name = master.hydra.runtime.choices.get("hydra/launcher")
    if name not in LAUNCHERS:
        raise ValueError(f"hydra/launcher={name}: not a launcher of this project; allowed: {', '.join(LAUNCHERS)}")
    if name == "slurm":
        return name, None

    local = OmegaConf.to_object(master.hydra.launcher)  # typed by its schema (config.register_configs)
    for key in ("parallel", "threads_per_job"):
        if getattr(local, key) < 0:
            raise ValueError(f"hydra.launcher.{key}={getattr(local, key)} must be >= 0 (0 = automatic)")
    return name, local


def prepare(args: LaunchArgs):
    """Everything that can fail on bad input: (hydra, master config, launcher, local launcher config, points)."""

    check_config_name(args)
    hydra = make_hydra(args)
    master = compose_master(hydra, args)
    launcher, local = launcher_of(master)
    grid, points = expand_grid(hydra, master, args), []
    swept = [i for i in range(len(grid[0])) if len({tuple(point)[i] for point in grid}) > 1]
    composer = Composer(hydra, master, group_dirs(args))
    for overrides in grid:
        try:
            cfg = composer.point(overrides)
            validate(cfg)
        except ValueError as e:
            where = " ".join(overrides[i] for i in swept)
            message = one_line_error(e, overrides)
            raise ValueError(f"{message} (grid point {where})" if where else message) from None
        points.append(Point(overrides, cfg, run_id(cfg)))
    check_placement(points, launcher, master)
    return hydra, master, launcher, local, points


def group_dirs(args: LaunchArgs) -> list[Path]:
    """Where config groups live: --config-dir, conf/, sweeps/."""
    return [Path(d) for d in (args.config_dir, CONF_DIR, SWEEPS_DIR) if d]


def check_config_name(args: LaunchArgs) -> None:
    """--config-name names conf/config.yaml, a study in sweeps/, or a file in --config-dir."""

    if not any((d / f"{args.config_name}.yaml").is_file() for d in group_dirs(args)):
        extra = f", or a .yaml file in {args.config_dir}" if args.config_dir else ""
        raise ValueError(f"--config-name={args.config_name}: no such config or study; allowed: config (the default), "
                         f"{', '.join(studies())}{extra}")


def wandb_key_here() -> bool:
    """Whether wandb can log in on this machine: WANDB_API_KEY, or a ~/.netrc entry for its host (wandb login)."""

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_placement(points: list[Point], launcher: str, master) -> None:
    """Checks that depend on where the jobs run: CUDA on this machine (local) or in the job's request (SLURM),
    the wandb key here (local: an error) or in the job's environment (SLURM: a warning). A dry run plans for
    another machine: only warnings. Also warns once for a dry run whose data is not here."""
    dry = any(p.cfg.dry_run for p in points)
    problems = []
    if any(p.cfg.train.device == "cuda" for p in points):
        if launcher == "local" and not torch.cuda.is_available():
            problems.append("train.device=cuda but this machine has no CUDA device and the local launcher runs the "
                            "jobs here; allowed: auto, cpu (or hydra/launcher=slurm)")
        if launcher == "slurm":
            requested = master.hydra.launcher
            gres = str((requested.get("additional_parameters") or {}).get("gres", "")) + str(requested.get("gres") or "")
            if not (requested.get("gpus_per_node") or requested.get("gpus_per_task") or "gpu" in gres):
                problems.append("train.device=cuda but the SLURM jobs request no GPU (hydra.launcher.gpus_per_node "
                                "is 0 and no gres); allowed: hydra.launcher.gpus_per_node>=1, or train.device=cpu")
    if any(p.cfg.wandb.mode == "online" for p in points) and not wandb_key_here():
        message = ("wandb=online but no wandb API key here (WANDB_API_KEY, or `wandb login`); allowed: set one, or "
                   "wandb=offline (sync later with `wandb sync`)")
        if launcher == "slurm":
            print(f"warning: {message}; the SLURM jobs need it in their environment", file=sys.stderr, flush=True)
        else:
            problems.append(message)
    for message in problems[:1]:
        if not dry:
            raise ValueError(message)
        print(f"warning: {message} (a dry run plans only)", file=sys.stderr, flush=True)
    if dry:
        for data in {(p.cfg.data.name, p.cfg.data.path, p.cfg.data.image_size): p.cfg.data for p in points}.values():
            if data_spec(data, require_data=False).get("nominal"):
                print(f"warning: data.path={data.path} is not on this machine; planned from data.image_size="
                      f"{data.image_size} and data.num_classes={data.num_classes}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one-line errors


_MISSING_OPTION = re.compile(r"Could not find '(?P<group>[^']+)/(?P<option>[^'/]+)'")


def one_line_error(e: BaseException, overrides: list[str] = ()) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line naming the bad value and the allowed values."""

    text = str(e)
    if isinstance(e, MissingConfigException) and (m := _MISSING_OPTION.search(text)):
        group, option = m["group"], m["option"]

        top = group.split("/")[0]
        if top != "hydra" and (CONF_DIR / top).is_dir() and group != top:  # model=DiT-XL/2: '/' is not a group
            group, option = top, f"{group[len(top) + 1:]}/{option}"
        options = re.findall(r"^\t(\S+)$", text.split(f"Available options in '{group}':", 1)[-1].split(
            "Config search path:")[0], flags=re.M)
        if group == "hydra/launcher":
            options = list(LAUNCHERS)
        allowed = f"; allowed: {', '.join(options)}" if options else ""
        hint = " (the patch size is its own key: model=dit_xl patch=2)" if group == "model" and "/" in option else ""
        return f"{group}={option}: no such {group.split('/')[-1]} config{allowed}{hint}"
    if isinstance(e, AssertionError) and any(o.startswith("hydra.sweeper.params.") for o in overrides):
        bad = next(o for o in overrides if o.startswith("hydra.sweeper.params."))
        return (f"{bad}: this config has no hydra.sweeper.params to add to; allowed: the sweep on the command line "
                f"(-m {bad.removeprefix('hydra.sweeper.params.')}), or a study file whose hydra.sweeper.params "
                f"holds the grid")
    if isinstance(e, OverrideParseException):
        return f"cannot parse override {_parse_failure(overrides)}: {first_line(text)}"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        e = cause  # "Could not override 'trian.steps'": the cause names the key and its parent
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and getattr(e, "full_key", None):
        parent = getattr(e, "parent_node", None)
        allowed = [k for k in (parent.keys() if parent is not None else []) if k not in ("hydra", "_target_")]
        return f"unknown key {e.full_key!r}" + (f"; allowed: {', '.join(map(str, allowed))}" if allowed else "")
    if isinstance(e, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
        override = text.removeprefix("Error merging override ").strip()
        return f"{override}: {first_line(str(cause))}"
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or text.rsplit(":", 1)[-1].strip()
        return f"{key} is required here (give {key}=...)"
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None)
        return f"{key}: {first_line(text)}" if key else first_line(text)
    return first_line(text) if isinstance(e, ValueError) else f"{type(e).__name__}: {first_line(text)}"


def _parse_failure(overrides) -> str:
    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException:
            return repr(text)
    return "(from the config's hydra.sweeper.params)"


# ----------------------------------------------------------------------------- the dry run


def plan_rows(points: list[Point]) -> list[dict]:
    """The plan of each point (closed-form Gflops: no model is built) with its GPU-hours and state."""

    rows = []
    for p in points:
        plan = make_plan(p.cfg, count="closed_form")
        gpu_hours = 2 * plan["train_flops"] / (ASSUMED_PEAK_FLOPS * ASSUMED_MFU) / 3600
        rows.append({**plan, "gpu_hours": gpu_hours, "state": p.state, "eval": setting_key(p.cfg.eval)})
    return rows


def format_plan(rows: list[dict]) -> str:
    with_eval = len({r["eval"] for r in rows}) > 1  # e.g. the sampling study: one run, several eval settings
    head = ("run_id", "params", "Gflops", "tokens", "batch x steps", "train_flops", "GPU-h", "state") + \
        (("eval",) if with_eval else ())
    body = [(r["run_id"], f"{r['params'] / 1e6:.2f}M", f"{r['gflops_per_img']:.4g}", str(r["tokens"]),
             f"{r['batch_img']} x {r['steps']}", f"{r['train_flops']:.3g}", f"{r['gpu_hours']:.3g}", r["state"])
            + ((r["eval"],) if with_eval else ()) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    runs = {r["run_id"]: r for r in rows}  # a run shared by several points is trained once
    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    to_go = sum(r["gpu_hours"] for r in runs.values() if r["state"] in ("new", "partial", "failed", "preempted"))
    return "\n".join([line(head), *map(line, body),
                      f"{len(rows)} points, {len(runs)} runs ({', '.join(f'{n} {s}' for s, n in states.items())});"
                      f" {to_go:.3g} GPU-hours of training to go (runs not trained yet, in full; evals not included)"
                      f", assuming {ASSUMED_MFU:.0%} of an H100's {ASSUMED_PEAK_FLOPS / 1e12:.0f} dense bf16 TFLOP/s"
                      f" and 2 flops per multiply-add. train_flops = Gflops x batch x steps x 3 (paper Fig. 9)."])


# ----------------------------------------------------------------------------- local launcher


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(local: LocalLauncherConfig, gpus: list[str], cpus: int) -> list[dict]:
    """One environment per concurrent job: its GPU, or its share of the CPU threads."""
    if gpus:
        n = local.parallel or len(gpus)
        if n > len(gpus):
            raise ValueError(f"hydra.launcher.parallel={n} but only {len(gpus)} GPUs are visible; "
                             f"allowed: 0..{len(gpus)}")
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus[:n]]
    n = local.parallel or 1
    threads = str(local.threads_per_job or max(1, cpus // n))
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * n


def job_command(args: LaunchArgs, overrides: list[str]) -> list[str]:
    """The command that runs one point in its own process: this module without -m."""
    cmd = [sys.executable, "-m", "scaling.launch"]
    if args.config_dir:
        cmd += ["--config-dir", args.config_dir]
    return cmd + ["--config-name", args.config_name, *overrides]


def run_local(args: LaunchArgs, points: list[Point], slots: list[dict], log_dir: Path) -> dict[str, int]:
    """Run the points' jobs, len(slots) at a time; {run_id: exit code}. Ctrl-C or SIGTERM to this process stops
    them cleanly: each job gets SIGTERM, saves a checkpoint at its next step and is marked preempted, and this
    process waits for them before it returns."""
    queue, running, codes = list(points), {}, {}
    free = list(range(len(slots)))
    t_start = t_progress = time.monotonic()
    quiet = len(slots) > 1  # several jobs at once: each writes to its log file, this process prints one line each
    if quiet:
        log_dir.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.signal(s, signal.default_int_handler)  # SIGTERM or SIGUSR2 to the pool: as Ctrl-C
                for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        while queue or running:
            while queue and free:
                p, slot = queue.pop(0), free.pop(0)
                log = open(log_dir / f"{p.run_id}.log", "a") if quiet else None
                proc = subprocess.Popen(job_command(args, p.overrides), env={**os.environ, **slots[slot]},
                                        stdout=log, stderr=subprocess.STDOUT if log else None,
                                        start_new_session=True)
                running[proc] = (p, slot, log)
                print(f"[launch] started {p.run_id}" + (f" (log {log.name})" if log else ""), flush=True)
            time.sleep(0.2)
            for proc in [q for q in running if q.poll() is not None]:
                p, slot, log = running.pop(proc)
                codes[p.run_id] = proc.returncode
                free.append(slot)
                if log:
                    log.close()
                print(f"[launch] {p.run_id}: exit {proc.returncode}", flush=True)
            if quiet and running and time.monotonic() - t_progress >= PROGRESS_S:
                t_progress = time.monotonic()
                print(progress_line([p for p, _, _ in running.values()], len(codes), len(points),
                                    t_progress - t_start), flush=True)
    except KeyboardInterrupt:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second SIGTERM must not cut the wait short
        print(f"[launch] interrupted: stopping {len(running)} jobs (each saves at its next step)", flush=True)
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc, (p, _, log) in running.items():
            codes[p.run_id] = proc.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return codes


def largest_first(points: list[Point]) -> list[Point]:
    """The points by training FLOPs left to do, largest first: with a pool of N slots the grid then ends when its
    largest job ends, not when a large job started last does (the 12-point grid in grid order ran laptop-XL/2,
    ~40% of the work, last)."""

    def flops_to_go(p: Point) -> float:
        plan = make_plan(p.cfg, count="closed_form")
        run = run_dir_for(p.cfg)
        done = read_status(run)["step"]
        return plan["train_flops"] * max(0, p.cfg.train.steps - done) / max(1, p.cfg.train.steps)

    return sorted(points, key=flops_to_go, reverse=True)  # stable: equal costs keep the grid's order


def progress_line(running: list[Point], finished: int, total: int, elapsed_s: float) -> str:
    """One line for a pool whose jobs log to files: jobs finished, and each running job's step, rate and ETA
    (from the last row of its metrics.jsonl)."""

    parts = []
    for p in running:
        name, steps = f"{p.cfg.model.name}/{p.cfg.patch}", p.cfg.train.steps
        last = last_jsonl_row(run_dir_for(p.cfg).metrics)
        if last is None:
            parts.append(f"{name} starting")
            continue
        rate = last.get("img_per_s") or 0.0
        left_s = (steps - last["step"]) * p.cfg.train.batch_img / rate if rate > 0 else None
        parts.append(f"{name} step {last['step']}/{steps} ({rate:.0f} img/s"
                     + (f", ETA {format_duration(left_s)})" if left_s is not None else ")"))
    return (f"[launch] {finished}/{total} jobs finished after {format_duration(elapsed_s)}; running: "
            + "; ".join(parts) + " (ETAs count training steps, not evals)")


def run_local_grid(args: LaunchArgs, todo: list[Point], slots: list[dict]) -> dict[str, str]:
    """The points wave by wave (a run is never in two jobs at once); {run_id: outcome} of failed jobs."""

    outcomes = {}
    for wave in waves(todo):
        wave = largest_first([p for p in wave if point_state(p.cfg) not in ("done", "running")])
        codes = run_local(args, wave, slots, Path(wave[0].cfg.output_root) / "logs") if wave else {}
        for p in wave:
            rc = codes.get(p.run_id, 0)
            if rc in (0, EXIT_UNFINISHED):
                continue
            outcomes[p.run_id] = f"failed: exit {rc}"
            run = run_dir_for(p.cfg)
            if rc < 0 and read_status(run)["state"] == "running":  # killed before it could say so
                mark_failed(run, RuntimeError(f"the job process was killed by signal {-rc}"))
    return outcomes


# ----------------------------------------------------------------------------- after the sweep


def summarize(points: list[Point], outcomes: dict, eval_errors: dict) -> int:
    """One line per grid point from its run directory (the source of truth), then the exit code."""

    with_eval = len({setting_key(p.cfg.eval) for p in points}) > 1
    code = 0
    for p in points:
        p.state = point_state(p.cfg)
        note = outcomes.get(p.run_id, "")
        if p.state == "failed" or p.run_id in eval_errors or note.startswith("failed"):
            code = EXIT_FAILED
        elif p.state != "done" and code == 0:
            code = EXIT_UNFINISHED
        extra = eval_errors.get(p.run_id) or (note.removeprefix("failed: ") if note and note != p.state else "")
        label = p.run_id + (f" [{setting_key(p.cfg.eval)}]" if with_eval else "")
        print(f"[launch] {label}: {p.state}" + (f" ({extra})" if extra else ""), flush=True)
    return code


def analyze(output_root: str) -> None:
    """The results table and the figures of the output root, in <output_root>/analysis/ (where installed)."""

    out = Path(output_root) / "analysis"
    table = out / "results.csv"
    steps = [("scaling.results", [str(output_root), "-o", str(table)]),
             ("analysis.figures", [str(table), "-o", str(out)]),
             ("analysis.law_figures", [str(table), "-o", str(out)])]  # the forecasting laws, with a held-out loss
    for module, argv in steps:
        if importlib.util.find_spec(module) is None:
            print(f"[launch] analyze: {module} is not available; skipped", flush=True)
            return
        rc = subprocess.call([sys.executable, "-m", module, *argv])
        if rc:
            print(f"[launch] analyze: python -m {module} exited {rc}", flush=True)
            return


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        # Stop signals are recorded from here on (under `python -m scaling.launch`, from before the imports at the
        # top: install_early): a job of the pool or of SLURM stopped while starting still says "preempted".
        with stop_signals() as stop:
            return run(sys.argv[1:] if argv is None else list(argv), stop)
    finally:
        GlobalHydra.instance().clear()  # leave no Hydra state behind in a process that calls main()


def run(argv: list[str], stop=None) -> int:
    """The launch; `stop` (scaling.signals.StopSignals) records signals while the config is composed."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    args = None
    try:
        args = parse_args(argv)
        hydra, master, launcher, local, points = prepare(args)
        for p in points:
            p.state = point_state(p.cfg)
        slots = local_slots(local, visible_gpus(), os.cpu_count() or 1) if launcher == "local" else None
    except Exception as e:  # noqa: BLE001 - every input error ends here, as one line
        print(f"error: {one_line_error(e, args.overrides if args else argv)}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if any(p.cfg.dry_run for p in points):
        print(format_plan(plan_rows(points)))
        return 0
    if not args.multirun and launcher == "local":  # one point, in this process (what each local job runs)
        return run_single(points[0])
    if stop is not None:  # a launch of many jobs: Ctrl-C and SIGTERM are this process's own again (run_local)
        stop.restore()
        if stop.signal is not None:
            print(f"[launch] {stop.name} before any job started: nothing launched", flush=True)
            return 130

    for p in points:
        if p.state in ("done", "running"):
            print(f"[launch] {p.run_id}: {p.state}, skipped", flush=True)
    todo = [p for p in points if p.state not in ("done", "running")]
    outcomes, eval_errors = {}, {}
    try:
        if todo and launcher == "local":
            outcomes = run_local_grid(args, todo, slots)
        elif todo:

            outcomes, eval_errors = run_slurm(hydra, master, todo)
    except KeyboardInterrupt:
        print("[launch] interrupted" + (": the SLURM jobs keep running; relaunch to follow them again"
                                        if launcher == "slurm" else ""), flush=True)
        summarize(points, outcomes, eval_errors)
        return 130
    code = summarize(points, outcomes, eval_errors)
    if args.analyze:
        for root in dict.fromkeys(p.cfg.output_root for p in points):
            analyze(root)
    return code


if __name__ == "__main__":
    from scaling.launch import main as launch_main  # the importable module, not a second copy named __main__:
    sys.exit(launch_main())                          # SLURM jobs unpickle its functions by reference
