"""Launch the study: a Hydra application; one job per grid point, each training one run (with its evals).

    python -m scaling.launch                                              # one run: the embedded default
    python -m scaling.launch -m model=laptop_s,laptop_b patch=4,8         # a grid, on this machine
    python -m scaling.launch --config-name laptop -m analyze=true         # a named study (sweeps/*.yaml)
    python -m scaling.launch -m model=dit_s,dit_b,dit_l,dit_xl patch=2,4,8 dry_run=true   # plan only
    python -m scaling.launch -m ... hydra/launcher=slurm                  # the same grid as SLURM jobs
    python -m scaling.launch --cfg job | --cfg hydra | --info | --help    # inspect, as in any Hydra app

With -m, the project's sweeper (hydra_plugins/dit_scaling/sweeper.py) composes and validates every grid point
before anything starts, prints the dry-run plan, skips finished runs and hands the rest to the launcher named by
`hydra/launcher`: local (a process pool on this machine, each job being this command for one point) or slurm
(hydra-submitit-launcher's job arrays; submits and returns). Without -m, one point runs in this process; the
callback `CheckFirst` validates it before Hydra writes anything.

Exit code: 0 done, 1 a job failed, 2 bad input, 3 some point unfinished, 4 submitted to SLURM (detached).
"""

import sys

from scaling.signals import install_early

if __name__ == "__main__":  # `python -m scaling.launch`: stop signals are recorded before the slow imports below
    install_early()            # (the only statement between imports: a job stopped while starting still saves)

import os
import string
import traceback
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaling.config import CONF_DIR, config_from_dict, register_configs, run_dir_for, run_id, validate
from scaling.grid import (check_config_name, check_placement, grid_overrides, group_dirs, launcher_kind,
                          one_line_error)
from scaling.jobs import (EXIT_BAD_INPUT, EXIT_DONE, EXIT_FAILED, LaunchExit, Point, analyze, hydra_dir, point_state,
                          run_single)
from scaling.plan import format_plan, plan_rows
from scaling.provenance import record_launch
from scaling.signals import stop_signals

register_configs()  # RunConfig and the plugins' schemas, before Hydra composes anything


def single_point(config: DictConfig) -> Point:
    """The one point of a launch without -m, validated; a study's grid without -m, or the SLURM launcher without
    -m (Hydra runs a single run in this process), is refused."""
    kind = launcher_kind(config.hydra.launcher)
    if kind == "slurm":
        raise ValueError("hydra/launcher=slurm submits a grid: add -m (without it the run would be here, in this "
                         "process)")
    task = list(config.hydra.overrides.task)
    grid_overrides(OmegaConf.to_container(config.hydra.sweeper.get("params")), task, multirun=False)
    run_keys = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
    cfg = config_from_dict(OmegaConf.to_container(run_keys, resolve=True))
    validate(cfg)
    point = Point(task, cfg, run_id(cfg))
    check_placement([point], kind, {})
    return point


class CheckFirst(Callback):
    """hydra.callbacks.check_first (conf/config.yaml): a single run is validated, and a dry run planned, before
    Hydra creates its output folder: bad input writes nothing."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            point = single_point(config)
        except Exception as e:  # noqa: BLE001 - every input error ends here, as one line
            print(f"error: {one_line_error(e, list(config.hydra.overrides.task))}", file=sys.stderr, flush=True)
            raise LaunchExit(EXIT_BAD_INPUT) from None
        if point.cfg.dry_run:
            point.state = point_state(point.cfg)
            print(format_plan(plan_rows([point])), flush=True)
            raise LaunchExit(EXIT_DONE)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(task_cfg: DictConfig) -> Any:
    """One grid point in this process: `python -m scaling.launch` without -m, and each job of the local pool
    (SLURM jobs run scaling.slurm.slurm_task)."""
    cfg = OmegaConf.to_object(task_cfg)
    rank0 = int(os.environ.get("RANK") or 0) == 0  # under torchrun, one process records and analyses
    if rank0:
        record_launch(run_dir_for(cfg).create(), hydra_dir())
    try:
        code = run_single(Point(list(HydraConfig.get().overrides.task), cfg, run_id(cfg)))
    except Exception:  # noqa: BLE001 - a fault the job could not name: its traceback, exit 1 (not "bad input")
        traceback.print_exc()
        raise LaunchExit(EXIT_FAILED) from None
    if cfg.analyze and code == EXIT_DONE and rank0:
        analyze(cfg.output_root, [cfg.train.budget_flops])
    if code:
        raise LaunchExit(code)


def config_name_of(argv: list[str]) -> tuple[str | None, str | None]:
    """--config-name and --config-dir as Hydra reads them (-cn/-cd, with '=' or a separate value)."""
    found = {"name": None, "dir": None}
    flags = {"--config-name": "name", "-cn": "name", "--config-dir": "dir", "-cd": "dir"}
    for i, a in enumerate(argv):
        key, eq, value = a.partition("=")
        if key in flags:
            found[flags[key]] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found["name"], found["dir"]


_FLAGS = {"-m": 0, "--multirun": 0, "-r": 0, "--run": 0, "--resolve": 0, "-cn": 1, "--config-name": 1, "-cd": 1,
          "--config-dir": 1, "-cp": 1, "--config-path": 1, "-c": 1, "--cfg": 1, "-p": 1, "--package": 1}


def flags_first(argv: list[str]) -> list[str]:
    """Hydra's flags before the overrides, wherever they were typed (`... patch=4,8 -m` as `-m ... patch=4,8`):
    Hydra's argparse takes the overrides as one positional list and refuses a flag after them."""
    flags, rest, i = [], [], 0
    while i < len(argv):
        n = _FLAGS.get(argv[i].split("=", 1)[0] if argv[i].startswith("--") else argv[i])
        if n is None or ("=" in argv[i] and argv[i].startswith("--")):
            (flags if n is not None else rest).append(argv[i])
            i += 1
        else:
            flags += argv[i:i + 1 + n]
            i += 1 + n
    return flags + rest


def app_help(argv: list[str]) -> str:
    """`--help`: the template of conf/hydra/help/dit_scaling.yaml filled as Hydra fills it ($APP_CONFIG_GROUPS,
    $CONFIG with the command line's overrides), without Hydra's listing of every group, which composes each one
    (~1 s of a 2-core machine, more than the rest of the answer)."""
    name, config_dir = config_name_of(argv)
    overrides = [a for a in flags_first(argv) if not a.startswith("-") and "=" in a]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name or "config", overrides=overrides)
    groups = {}
    for root in group_dirs(config_dir):
        for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
            groups.setdefault(d.name, set()).update(f.stem for f in d.glob("*.yaml"))
    listing = "\n".join(f"{g}: {', '.join(sorted(opts))}" for g, opts in sorted(groups.items()) if opts)
    help_cfg = OmegaConf.to_container(OmegaConf.create({"hydra": {"help": OmegaConf.load(
        CONF_DIR / "hydra" / "help" / "dit_scaling.yaml")}}), resolve=True)["hydra"]["help"]
    text = help_cfg["template"].replace("${hydra.help.header}", help_cfg["header"]).replace(
        "${hydra.help.footer}", help_cfg["footer"])
    return string.Template(text).safe_substitute(APP_CONFIG_GROUPS=listing, CONFIG=OmegaConf.to_yaml(
        cfg, resolve="--resolve" in argv))


def main(argv: list[str] | None = None) -> int:
    """`python -m scaling.launch ARGS` (and `dit-launch`): Hydra's command line, the project's exit codes. What
    Hydra or OmegaConf reject while composing (an unknown key, group option or override syntax) ends as one line
    naming it, exit 2; the project's own checks end the same way from the sweeper or CheckFirst."""
    argv = sys.argv[1:] if argv is None else list(argv)
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    if any(a in ("-h", "--help") for a in argv):
        try:
            print(app_help(argv))
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            print(f"error: {one_line_error(e, argv)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        finally:
            GlobalHydra.instance().clear()
        return EXIT_DONE
    name, config_dir = config_name_of(argv)
    if name is not None and not any(a in ("-h", "--help", "--hydra-help") for a in argv):
        try:
            check_config_name(name, config_dir)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    saved = sys.argv
    sys.argv = [saved[0] if saved else "scaling.launch", *flags_first(argv)]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it rejects, instead of printing it: one line below
    try:
        # Stop signals are recorded from here on (under `python -m scaling.launch`, from before the imports at the
        # top: install_early): a job of the pool or of SLURM stopped while starting still says "preempted".
        with stop_signals():
            app()
        return EXIT_DONE
    except LaunchExit as e:
        return int(e.code)
    except SystemExit as e:  # --help, --hydra-help (0); argparse refusing an option (2)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT if e.code else EXIT_DONE
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # the command line, rejected while composing
        print(f"error: {one_line_error(e, argv)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        sys.argv = saved
        GlobalHydra.instance().clear()  # leave no Hydra state behind in a process that calls main()


if __name__ == "__main__":
    from scaling.launch import main as launch_main  # the importable module, not a second copy named __main__
    sys.exit(launch_main())
