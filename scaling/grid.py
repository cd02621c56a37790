"""The grid of a launch: the sweep expanded, every point composed and validated before any job exists.

Used by the grid sweeper (hydra_plugins/dit_scaling/sweeper.py) with Hydra's own config loader, and by the
single-run path of `python -m scaling.launch`. A bad value anywhere in the grid becomes one line naming it and the
allowed values (`one_line_error`), and the launch stops with exit 2 before anything is written.
"""

import itertools
import netrc
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from scaling.config import CONF_DIR, SWEEPS_DIR, RunConfig, data_spec, run_id, studies, validate
from scaling.jobs import Point, first_line

LAUNCHERS = ("local", "slurm", "slurm_cpu")   # conf/hydra/launcher/


# ----------------------------------------------------------------------------- the sweep


def expand(parsed: list[Override]) -> list[list[str]]:
    """Override lists, one per grid point: every discrete sweep crossed with the others, in the order given (the
    study file's hydra.sweeper.params, then the command line); a later value of a key replaces an earlier one, as
    in Hydra's basic sweeper. Ranges and intervals are for optimising sweepers: refused."""
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ValueError(f"{o.input_line}: an {o.value_type.name.lower().replace('_', ' ')}; allowed: a list of values "
                                 f"(key=a,b,c or key=choice(a,b) or key=range(1,4))")
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(point) for point in itertools.product(*axes.values())]


def grid_overrides(params: dict | None, task: list[str], multirun: bool) -> list[list[str]]:
    """The grid of a launch: `hydra.sweeper.params` (a study's grid) then the command line, crossed. Without -m,
    a study's grid that the command line does not pin to one point is an error rather than a silent single run."""
    parser = OverridesParser.create()
    from_config = [f"{k}={v}" for k, v in (params or {}).items()]
    parsed = parser.parse_overrides(from_config + list(task))
    if not multirun:
        pinned = {o.get_key_element() for o in parser.parse_overrides(list(task)) if not o.is_sweep_override()}
        swept = [o for o in parsed if o.is_sweep_override() and o.get_key_element() not in pinned]
        if swept:
            raise ValueError(f"{swept[0].input_line} is a sweep; add -m to launch the grid")
        return [list(task)]
    return expand(parsed)


class Composer:
    """Grid points' RunConfigs (typed; validated by the caller), composed by Hydra's config loader.

    Composing is most of a dry run's time (~0.3 s a point): a point is composed once per distinct set of its
    config-group and structural overrides (model=dit_b, +key=..., hydra.*), and its plain value overrides
    (patch=2, eval.sampling_steps=64) are then set on a copy, as Hydra itself applies them after composing.
    tests/test_launch.py checks that both ways give the same config for every point of every study."""

    def __init__(self, config_loader, master: DictConfig, group_dirs: list[Path]):
        self.config_loader, self.master, self.group_dirs = config_loader, master, group_dirs
        self.parser = OverridesParser.create()
        self.composed: dict[tuple, dict] = {}

    def is_value(self, o: Override) -> bool:
        key = o.key_or_group
        return (o.type == OverrideType.CHANGE and o.package is None and not key.startswith("hydra")
                and o.value_type == ValueType.ELEMENT and isinstance(o.value(), (str, int, float, bool, type(None)))
                and not any((d / key).is_dir() for d in self.group_dirs))

    def point(self, overrides: list[str], fast: bool = True) -> RunConfig:
        parsed = self.parser.parse_overrides(list(overrides))
        structural = {o.key_or_group for o in parsed if not self.is_value(o)}  # train.lr=1 ++train.lr=2: Hydra's
        values = [o for o in parsed if fast and self.is_value(o) and o.key_or_group not in structural]
        rest = tuple(o.input_line for o in parsed if o not in values)
        if rest not in self.composed:
            cfg = self.config_loader.load_sweep_config(self.master, list(rest))
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            self.composed[rest] = OmegaConf.to_container(cfg)
        # `+key=value` appends past the schema; merging into RunConfig again rejects any key it does not have.
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), self.composed[rest])
        for o in values:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
        return OmegaConf.to_object(cfg)


def compose_points(composer: Composer, grid: list[list[str]]) -> list[Point]:
    """Every grid point composed and validated; the first bad one raises a one-line ValueError naming the value
    and the grid point."""
    swept = [i for i in range(len(grid[0])) if len({tuple(point)[i] for point in grid}) > 1] if grid else []
    points = []
    for overrides in grid:
        try:
            cfg = composer.point(overrides)
            validate(cfg)
        except ValueError as e:
            where = " ".join(overrides[i] for i in swept)
            message = one_line_error(e, overrides)
            raise ValueError(f"{message} (grid point {where})" if where else message) from None
        points.append(Point(list(overrides), cfg, run_id(cfg)))
    return points


# ----------------------------------------------------------------------------- where the configs are


def config_dir_of(master: DictConfig) -> str | None:
    """The --config-dir of this launch (Hydra's "command-line" config source), or None."""
    for source in master.hydra.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            return source.path
    return None


def group_dirs(config_dir: str | None) -> list[Path]:
    """Where config groups live: --config-dir, conf/, sweeps/."""
    return [Path(d) for d in (config_dir, CONF_DIR, SWEEPS_DIR) if d]


def check_config_name(config_name: str, config_dir: str | None) -> None:
    """--config-name names conf/config.yaml, a study in sweeps/, or a file in --config-dir."""
    name = config_name.removesuffix(".yaml")
    if not any((d / f"{name}.yaml").is_file() for d in group_dirs(config_dir)):
        extra = f", or a .yaml file in {config_dir}" if config_dir else ""
        raise ValueError(f"--config-name={config_name}: no such config or study; allowed: config (the default), "
                         f"{', '.join(studies())}{extra}")


def launcher_kind(launcher_cfg: DictConfig) -> str:
    """'local' or 'slurm', from the launcher's class; any other launcher is refused (it would skip the grid's
    checks or the local pool's one-GPU-per-job placement)."""
    target = str(launcher_cfg.get("_target_", ""))
    if target.endswith(".LocalPoolLauncher"):
        return "local"
    if target.endswith(".GridSlurmLauncher"):
        return "slurm"
    raise ValueError(f"hydra.launcher._target_={target}: not a launcher of this project; allowed: hydra/launcher="
                     f"{', hydra/launcher='.join(LAUNCHERS)}")


# ----------------------------------------------------------------------------- checks that depend on the launcher


def wandb_key_here() -> bool:
    """Whether wandb can log in on this machine: WANDB_API_KEY, or a ~/.netrc entry for its host (wandb login)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_placement(points: list[Point], kind: str, launcher_cfg: dict) -> None:
    """Checks that depend on where the jobs run: CUDA on this machine (local) or in the job's request (SLURM),
    the wandb key here (local: an error) or in the job's environment (SLURM: a warning). A dry run plans for
    another machine: only warnings. Also warns once for a dry run whose data is not here."""
    dry = any(p.cfg.dry_run for p in points)
    problems = []
    if any(p.cfg.train.device == "cuda" for p in points):
        if kind == "local" and not torch.cuda.is_available():
            problems.append("train.device=cuda but this machine has no CUDA device and the local launcher runs the "
                            "jobs here; allowed: auto, cpu (or hydra/launcher=slurm)")
        if kind == "slurm":
            gres = str((launcher_cfg.get("additional_parameters") or {}).get("gres", "")) + \
                str(launcher_cfg.get("gres") or "")
            if not (launcher_cfg.get("gpus_per_node") or launcher_cfg.get("gpus_per_task") or "gpu" in gres):
                problems.append("train.device=cuda but the SLURM jobs request no GPU (hydra.launcher.gpus_per_node "
                                "is 0 and no gres); allowed: hydra.launcher.gpus_per_node>=1, or train.device=cpu")
    if any(p.cfg.wandb.mode == "online" for p in points) and not wandb_key_here():
        message = ("wandb=online but no wandb API key here (WANDB_API_KEY, or `wandb login`); allowed: set one, or "
                   "wandb=offline (sync later with `wandb sync`)")
        if kind == "slurm":
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
    if isinstance(e, ConfigCompositionException) and (m := re.match(r"Ambiguous value for argument '([^']+)'", text)):
        return f"{m[1]} is a sweep; add -m to launch the grid (or quote it: key='a,b', or a list: key=[a,b])"
    if isinstance(e, OverrideParseException):
        return f"cannot parse override {_parse_failure(overrides)}: {first_line(text)}"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        e = cause  # "Could not override 'trian.steps'": the cause names the key and its parent
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and getattr(e, "full_key", None):
        parent = getattr(e, "parent_node", None)
        allowed = [k for k in (parent.keys() if parent is not None else []) if k not in ("hydra", "_target_")]
        if str(e.full_key).startswith("hydra.sweeper.params."):
            key = str(e.full_key).removeprefix("hydra.sweeper.params.")
            return (f"hydra.sweeper.params.{key}: not an axis of this study's grid; allowed: +hydra.sweeper.params."
                    f"{key}='a,b' (a new axis), or the sweep on the command line: -m {key}=a,b")
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
