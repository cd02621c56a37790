"""The whole-run config tree, its validation, the run id and the plan (derived quantities).

Each module owns its config dataclass (`ModelConfig` in models.py, `DataConfig` in data.py, ...); `RunConfig`
only composes them. Hydra builds a `RunConfig` from conf/ and the command line (scaling.launch); library code
receives plain dataclasses, never Hydra objects.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scaling.data import DataConfig
from scaling.diffusion import DiffusionConfig
from scaling.evaluate import EvalConfig
from scaling.models import BLOCKS, MODELS, ModelConfig
from scaling.rundir import RunDir
from scaling.tracking import WandbConfig
from scaling.train import TrainConfig
from scaling.valloss import ValConfig, check_config as check_val

# Settings that do not change what is trained: excluded from the run id, so that e.g. a longer horizon
# (constant learning rate) or another checkpoint interval continues the same run.
_NOT_TRAINING = {"train": ("steps", "budget_flops", "ckpt_every", "log_every", "grid_every", "num_workers",
                           "device"),
                 "val": ("every", "timesteps", "noise_seed", "raw", "batch_img")}  # the split is training data


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: int = 4
    block: str = "adaln_zero"     # adaln_zero | adaln | in_context | cross_attn (paper Fig. 5)
    seed: int = 0
    output_root: str = "outputs"
    sweep: str = "default"        # the study this run belongs to: the wandb group
    dry_run: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    val: ValConfig = field(default_factory=ValConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if self.train.budget_flops > 0 and self.model.name in MODELS:  # a compute horizon sets the step count
            self.train.steps = budget_steps(self)


def config_to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a typed RunConfig from a plain dict (a checkpoint's or config.yaml); unknown keys fail."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), d))


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """Register RunConfig as Hydra's `base_config` schema: every key in conf/ and on the command line is typed.

    Also the local launcher's schema (conf/hydra/launcher/local.yaml extends it), so that its keys are typed too.
    """
    from hydra.core.config_store import ConfigStore

    from scaling.launch import LocalLauncherConfig  # launch.py imports this module only inside functions

    ConfigStore.instance().store(name="base_config", node=RunConfig)
    ConfigStore.instance().store(group="hydra/launcher", name="local_schema", node=LocalLauncherConfig)


def config_from_overrides(overrides: list[str]) -> RunConfig:
    """Compose conf/config.yaml with command-line overrides (`model=dit_b patch=2 train.steps=10`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(composed)


# ----------------------------------------------------------------------------- derived quantities


def data_spec(data: DataConfig, require_data: bool = True) -> dict:
    """What the model sees, without loading the data: in_channels, input_size, num_classes, pixel_space."""
    from scaling.data import describe

    return describe(data, require_data)


def family(model_name: str) -> str:
    return "paper" if model_name.startswith("dit_") else "laptop"


def run_id(cfg: RunConfig) -> str:
    """Readable name + short hash of everything that changes training (not the horizon or logging)."""
    d = config_to_dict(cfg)
    keep = {k: d[k] for k in ("model", "patch", "block", "seed", "data", "diffusion", "train", "val")}
    for group, keys in _NOT_TRAINING.items():
        keep[group] = {k: v for k, v in keep[group].items() if k not in keys}
    from scaling.models import MODELS

    keep["shape"] = MODELS.get(cfg.model.name)  # a preset whose depth/width/heads change names a new run
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}-p{cfg.patch}-{cfg.block}-{cfg.data.name}{cfg.data.image_size}-s{cfg.seed}-{digest}"


def run_dir_for(cfg: RunConfig) -> RunDir:
    return RunDir(Path(cfg.output_root) / "runs" / run_id(cfg))


def build_model_for(cfg: RunConfig, spec: dict):
    from scaling.models import build_model

    return build_model(cfg.model.name, cfg.patch, input_size=spec["input_size"], in_channels=spec["in_channels"],
                       num_classes=spec["num_classes"], learn_sigma=cfg.model.learn_sigma, block=cfg.block,
                       class_dropout=cfg.model.class_dropout)


def budget_steps(cfg: RunConfig) -> int:
    """The step count of a compute budget: steps = budget_flops / (gflops_per_img x 1e9 x batch_img x 3), the
    project's one FLOP convention solved for steps, rounded to the nearest step (at least 1). Gflops come from the
    closed form (no model is built; within 0.5% of fvcore's count, which plan.json's train_flops uses), so the
    plan's train_flops can differ from the budget by that and by the rounding; the plan shows both."""
    from scaling.flops import closed_form_gflops

    spec = data_spec(cfg.data, require_data=False)
    g = closed_form_gflops(cfg.model.name, cfg.patch, spec["input_size"], spec["in_channels"], block=cfg.block,
                           learn_sigma=cfg.model.learn_sigma)
    return max(1, round(cfg.train.budget_flops / (g * 1e9 * cfg.train.batch_img * 3)))


def make_plan(cfg: RunConfig, device: str = "cpu", world_size: int = 1, count: str = "fvcore") -> dict:
    """params, gflops_per_img, tokens, batch_img, steps, train_flops, ... for plan.json and the dry run.

    train_flops = gflops_per_img x 1e9 x batch_img x steps x 3 (paper Fig. 9: forward + backward ~ 3 forwards),
    with one multiply-add counted as one flop as in the paper. `count="closed_form"` skips building the model
    (the dry run: the closed form agrees with fvcore within 0.5%, tests/test_flops.py).
    """
    from scaling.flops import closed_form_gflops, closed_form_params, count_params, gflops_per_img

    spec = data_spec(cfg.data, require_data=count == "fvcore")  # the dry run plans without the data
    if count == "fvcore":
        model = build_model_for(cfg, spec)
        params = count_params(model)
        gflops = gflops_per_img(model, spec["input_size"], spec["in_channels"])
    elif count == "closed_form":
        params = closed_form_params(cfg.model.name, cfg.patch, spec["input_size"], spec["in_channels"],
                                    spec["num_classes"], block=cfg.block, learn_sigma=cfg.model.learn_sigma)
        gflops = closed_form_gflops(cfg.model.name, cfg.patch, spec["input_size"], spec["in_channels"],
                                    block=cfg.block, learn_sigma=cfg.model.learn_sigma)
    else:
        raise ValueError(f"count={count!r}; allowed: fvcore, closed_form")
    tc = cfg.train
    return {
        "run_id": run_id(cfg), "model": cfg.model.name, "family": family(cfg.model.name), "patch": cfg.patch,
        "block": cfg.block, "seed": cfg.seed, "sweep": cfg.sweep, "params": int(params),
        "gflops_per_img": float(gflops), "gflops_counter": count, "tokens": (spec["input_size"] // cfg.patch) ** 2,
        "batch_img": tc.batch_img, "steps": tc.steps, "img_total": tc.batch_img * tc.steps,
        "budget_flops": tc.budget_flops or None,
        "train_flops": float(gflops) * 1e9 * tc.batch_img * tc.steps * 3,
        "dataset": cfg.data.name, "resolution": cfg.data.image_size, "heldout_img": cfg.val.heldout_img, **spec,
        "device": device, "world_size": world_size,
    }


# ----------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> None:
    """Every check that can fail before a job starts; each raises a one-line ValueError naming the value."""
    if cfg.model.name not in MODELS:
        raise ValueError(f"model={cfg.model.name!r} is not a model; allowed: {', '.join(MODELS)}")
    if cfg.block not in BLOCKS:
        raise ValueError(f"block={cfg.block!r}; allowed: {', '.join(BLOCKS)}")
    spec = data_spec(cfg.data, require_data=not cfg.dry_run)  # raises for a missing dataset path, bad image size
    if cfg.patch < 1 or spec["input_size"] % cfg.patch:
        divisors = [p for p in (1, 2, 4, 8, 16) if spec["input_size"] % p == 0]
        raise ValueError(f"patch={cfg.patch} does not divide the input size {spec['input_size']} "
                         f"(data {cfg.data.name} at image_size {cfg.data.image_size}); allowed: {divisors}")
    tc = cfg.train
    for key in ("steps", "batch_img", "ckpt_every", "log_every"):
        if getattr(tc, key) <= 0:
            raise ValueError(f"train.{key}={getattr(tc, key)} must be > 0")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={tc.ema_decay} must be in [0, 1)")
    if tc.budget_flops < 0:
        raise ValueError(f"train.budget_flops={tc.budget_flops} must be >= 0 (0: train.steps is the horizon)")
    if tc.lr <= 0:
        raise ValueError(f"train.lr={tc.lr} must be > 0")
    from scaling.evaluate import validate_eval

    validate_eval(cfg.eval)
    check_val(cfg.val, tc.log_every)
    _check_writable(cfg.output_root)


def _check_writable(output_root: str) -> None:
    p = Path(output_root).resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():  # a file in the way: even root cannot create directories under it
        raise ValueError(f"output_root={output_root!r} is not writable ({p} is a file, not a directory)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"output_root={output_root!r} is not writable ({p} denies writing)")
