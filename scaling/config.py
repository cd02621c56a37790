"""The whole-run config tree, its validation, the run id and the plan (derived quantities).

The model, data, diffusion and wandb modules own their config dataclasses (`ModelConfig` in models.py, ...);
the training, evaluation and local-launcher settings live here (`TrainConfig`, `EvalConfig`,
`LocalLauncherConfig`), with their validation, so that this module sits below the training job, the evaluation
and the launch that use it (no import cycle). `RunConfig` composes them. Hydra builds a `RunConfig` from conf/
and the command line (scaling.launch); library code receives plain dataclasses, never Hydra objects.
"""

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import OmegaConf

from scaling.data import DataConfig, describe
from scaling.diffusion import DiffusionConfig
from scaling.flops import closed_form_gflops, closed_form_params, count_params, gflops_per_img, train_flops
from scaling.models import BLOCKS, MODELS, ModelConfig, build_model
from scaling.rundir import RunDir
from scaling.tracking import MODES as WANDB_MODES
from scaling.tracking import WandbConfig
from scaling.valloss import ValConfig, check_config as check_val

# Settings that do not change what is trained: excluded from the run id, so that e.g. a longer horizon
# (constant learning rate) or another checkpoint interval continues the same run.
_NOT_TRAINING = {"train": ("steps", "budget_flops", "ckpt_every", "log_every", "grid_every", "num_workers",
                           "device"),
                 # the held-out split (val.heldout_img, val.split_seed) decides the training data: in the run id
                 "val": ("every", "per_decade", "timesteps", "noise_seed", "raw", "batch_img")}


# ----------------------------------------------------------------------------- training

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    steps: int = 400_000         # horizon in optimizer steps (images = steps x batch_img)
    batch_img: int = 256         # global batch, split evenly across ranks
    lr: float = 1e-4             # AdamW, constant (paper section 4)
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False     # decay min(ema_decay, (1 + step) / (10 + step)): for runs much shorter than
                                 # the EMA horizon 1 / (1 - decay), where the EMA would still hold the init
    grad_clip: float = 0.0       # max global grad norm; 0 = off
    precision: str = "auto"      # auto = bf16 autocast on GPUs that support it, else fp32
    device: str = "auto"         # auto | cpu | cuda
    compile: bool = False        # torch.compile the model (the checkpoint always holds the plain weights)
    ckpt_every: int = 50_000     # steps between checkpoints (one is always written at the end)
    log_every: int = 100         # steps between metrics.jsonl rows
    grid_every: int = 0          # steps between EMA sample grids; 0 = at checkpoints no inline eval draws at (an eval
                                 # writes samples/eval_step*.png from its own samples)
    num_workers: int = 0         # data loader processes (0: in-process, right for the in-memory datasets)
    budget_flops: float = 0.0    # > 0: a compute horizon in FLOPs that sets steps (scaling.config.budget_steps)


# ----------------------------------------------------------------------------- evaluation

SAMPLERS = ("ddpm", "ddim")
BACKENDS = ("inception", "inception_offline", "domain")  # scaling.features builds each
PRC_NEIGHBOURHOOD = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019; ADM's evaluator uses k = 3)
DEFAULT_NUM_REF = 10_000


@dataclass
class EvalConfig:
    backend: str = "domain"              # inception | inception_offline | domain (scaling.features)
    num_samples: int = 1000              # generated images per evaluation (the paper: 50,000)
    sampler: str = "ddpm"                # ddpm | ddim
    sampling_steps: int = 250            # respaced steps (the paper: 250 DDPM steps)
    cfg_scale: float = 1.0               # classifier-free guidance scale; 1.0 = off (the scaling study)
    guide_channels: Optional[int] = None  # channels guided (None = all epsilon channels)
    seed: int = 0                        # sampling seed: labels and noise of every batch derive from it
    batch_size: int = 256                # images per sampling batch (per rank)
    inline: bool = True                  # evaluate right after each checkpoint in local runs
    every_ckpt: int = 1                  # evaluate the checkpoints at multiples of k x train.ckpt_every, and the last
    inception_weights: Optional[str] = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    precision_recall: bool = True
    kid: bool = False
    export_npz: bool = True              # keep the samples .npz (ADM batch layout) in <run>/samples/
    num_ref: int = DEFAULT_NUM_REF       # reference images from the training set (all when fewer)
    final_num_samples: int = 0           # > num_samples: the final checkpoint draws this many (its own row) and
                                         # every checkpoint's num_samples are the first of that one stream


def validate_eval(cfg: EvalConfig) -> None:
    """One-line ValueErrors naming the bad value and the allowed values."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"eval.backend={cfg.backend!r}; allowed: {', '.join(BACKENDS)}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"eval.sampler={cfg.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    for key in ("num_samples", "sampling_steps", "batch_size", "every_ckpt", "num_ref"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
            raise ValueError(f"eval.{key}={getattr(cfg, key)!r}; allowed: an integer >= 1")
    if cfg.cfg_scale < 1.0:
        raise ValueError(f"eval.cfg_scale={cfg.cfg_scale}; allowed: >= 1.0 (1.0 = no guidance)")
    if cfg.inception_weights is not None and not Path(cfg.inception_weights).is_file():
        raise ValueError(f"eval.inception_weights={cfg.inception_weights!r} is not a file; allowed: the path of "
                         f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or null (download, online)")
    if cfg.guide_channels is not None and cfg.guide_channels < 1:
        raise ValueError(f"eval.guide_channels={cfg.guide_channels}; allowed: None or >= 1")
    if cfg.final_num_samples < 0 or 0 < cfg.final_num_samples < cfg.num_samples:
        raise ValueError(f"eval.final_num_samples={cfg.final_num_samples}; allowed: 0 (off) or >= eval.num_samples="
                         f"{cfg.num_samples}")
    if cfg.final_num_samples > cfg.num_samples and cfg.num_samples % cfg.batch_size:
        raise ValueError(f"eval.batch_size={cfg.batch_size} does not divide eval.num_samples={cfg.num_samples}: with "
                         f"eval.final_num_samples the draws of every checkpoint are whole batches of one stream; "
                         f"allowed: a divisor of eval.num_samples")
    if cfg.precision_recall and min(cfg.num_samples, cfg.num_ref) <= PRC_NEIGHBOURHOOD:
        raise ValueError(f"eval.num_samples={cfg.num_samples}, eval.num_ref={cfg.num_ref}: precision/recall with "
                         f"k={PRC_NEIGHBOURHOOD} needs more than {PRC_NEIGHBOURHOOD} of each; allowed: >= "
                         f"{PRC_NEIGHBOURHOOD + 1}, or eval.precision_recall=false")


# ----------------------------------------------------------------------------- launching


@dataclass
class GridSweeperConfig:             # hydra/sweeper=grid (conf/config.yaml): compose, validate, plan, skip, launch
    _target_: str = "hydra_plugins.dit_scaling.sweeper.GridSweeper"
    params: dict[str, str] = field(default_factory=dict)  # a study's grid, crossed with the command line's sweeps


@dataclass
class LocalLauncherConfig:           # conf/hydra/launcher/local.yaml
    _target_: str = "hydra_plugins.dit_scaling.local_launcher.LocalPoolLauncher"
    parallel: int = 0                # jobs at once; 0 = one per visible GPU, or 1 without a GPU
    threads_per_job: int = 0         # CPU threads per job without a GPU; 0 = CPU cores / parallel


@dataclass
class SlurmLauncherConfig(SlurmQueueConf):  # conf/hydra/launcher/slurm.yaml: hydra-submitit-launcher's keys, plus
    _target_: str = "hydra_plugins.dit_scaling.slurm_launcher.GridSlurmLauncher"
    wait: bool = False               # false: submit and return (exit 4); true: follow every job to its end
    evals_from_jobs: bool = True     # eval.inline=false: each training job submits its evals as SLURM jobs
    eval_timeout_min: int = 240      # the eval jobs' resources (one task; the training job's partition etc.)
    eval_gpus_per_node: Optional[int] = None  # None = as the training jobs, at most 1
    eval_cpus_per_task: Optional[int] = None  # None = as the training jobs
    eval_mem_gb: Optional[int] = None         # None = as the training jobs
    parallel: int = 0                # the local pool's keys, ignored here: one study file runs on both launchers
    threads_per_job: int = 0


# ----------------------------------------------------------------------------- the run


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: int = 4
    block: str = "adaln_zero"     # adaln_zero | adaln | in_context | cross_attn (paper Fig. 5)
    seed: int = 0
    output_root: str = "outputs"
    sweep: str = "default"        # the study this run belongs to: the wandb group
    dry_run: bool = False         # print the plan of the grid and stop
    analyze: bool = False         # after the grid: the results table and the figures in <output_root>/analysis/
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
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), d))


def _shipped(name: str) -> Path:
    """conf/ or sweeps/: the copy inside the installed package (a wheel, setup.py), else the repository's."""
    package = Path(__file__).resolve().parent
    return next((p for p in (package / name, package.parent / name) if p.is_dir()), package.parent / name)


CONF_DIR = _shipped("conf")        # the config groups
SWEEPS_DIR = _shipped("sweeps")    # the studies: --config-name laptop finds sweeps/laptop.yaml


def studies() -> list[str]:
    """The study names a user can give to --config-name (sweeps/*.yaml)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def register_configs() -> None:
    """Register RunConfig as Hydra's `base_config` schema: every key in conf/ and on the command line is typed.

    Also the schemas of the project's Hydra plugins (hydra_plugins/dit_scaling): the grid sweeper, and the local
    and SLURM launchers that conf/hydra/launcher/*.yaml extend, so that their keys are typed too.
    """
    store = ConfigStore.instance()
    store.store(name="base_config", node=RunConfig)
    store.store(group="hydra/sweeper", name="grid", node=GridSweeperConfig)
    store.store(group="hydra/launcher", name="local_schema", node=LocalLauncherConfig)
    store.store(group="hydra/launcher", name="slurm_schema", node=SlurmLauncherConfig)


def config_from_overrides(overrides: list[str]) -> RunConfig:
    """Compose conf/config.yaml with command-line overrides (`model=dit_b patch=2 train.steps=10`)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(composed)


# ----------------------------------------------------------------------------- derived quantities


def data_spec(data: DataConfig, require_data: bool = True) -> dict:
    """What the model sees, without loading the data: in_channels, input_size, num_classes, pixel_space."""
    return describe(data, require_data)


def family(model_name: str) -> str:
    return "paper" if model_name.startswith("dit_") else "laptop"


def _training_digest(cfg: RunConfig, with_seed: bool) -> str:
    d = config_to_dict(cfg)
    keep = {k: d[k] for k in ("model", "patch", "block", "seed", "data", "diffusion", "train", "val")
            if with_seed or k != "seed"}
    for group, keys in _NOT_TRAINING.items():
        keep[group] = {k: v for k, v in keep[group].items() if k not in keys}
    keep["shape"] = MODELS.get(cfg.model.name)  # a preset whose depth/width/heads change names a new run
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]


def run_id(cfg: RunConfig) -> str:
    """Readable name + short hash of everything that changes training (not the horizon or logging)."""
    return (f"{cfg.model.name}-p{cfg.patch}-{cfg.block}-{cfg.data.name}{cfg.data.image_size}-s{cfg.seed}-"
            f"{_training_digest(cfg, with_seed=True)}")


def point_id(cfg: RunConfig) -> str:
    """The grid point a run is a seed of: its run id without the seed, in the name and in the hash. Runs that
    differ in their seed alone share it (the analysis averages them: scaling.results.seed_means)."""
    return (f"{cfg.model.name}-p{cfg.patch}-{cfg.block}-{cfg.data.name}{cfg.data.image_size}-"
            f"{_training_digest(cfg, with_seed=False)}")


def run_dir_for(cfg: RunConfig) -> RunDir:
    return RunDir(Path(cfg.output_root) / "runs" / run_id(cfg))


def build_model_for(cfg: RunConfig, spec: dict):
    return build_model(cfg.model.name, cfg.patch, input_size=spec["input_size"], in_channels=spec["in_channels"],
                       num_classes=spec["num_classes"], learn_sigma=cfg.model.learn_sigma, block=cfg.block,
                       class_dropout=cfg.model.class_dropout)


def budget_steps(cfg: RunConfig) -> int:
    """The step count of a compute budget: steps = budget_flops / (gflops_per_img x 1e9 x batch_img x 3), the
    project's one FLOP convention solved for steps, rounded to the nearest step (at least 1). Gflops come from the
    closed form (no model is built; within 0.5% of fvcore's count, which plan.json's train_flops uses), so the
    plan's train_flops can differ from the budget by that and by the rounding; the plan shows both."""
    spec = data_spec(cfg.data, require_data=False)
    g = closed_form_gflops(cfg.model.name, cfg.patch, spec["input_size"], spec["in_channels"], block=cfg.block,
                           learn_sigma=cfg.model.learn_sigma)
    return max(1, round(cfg.train.budget_flops / train_flops(g, cfg.train.batch_img, 1)))


def make_plan(cfg: RunConfig, device: str = "cpu", world_size: int = 1, count: str = "fvcore") -> dict:
    """params, gflops_per_img, tokens, batch_img, steps, train_flops, ... for plan.json and the dry run.

    train_flops = gflops_per_img x 1e9 x batch_img x steps x 3 (paper Fig. 9: forward + backward ~ 3 forwards),
    with one multiply-add counted as one flop as in the paper. `count="closed_form"` skips building the model
    (the dry run: the closed form agrees with fvcore within 0.5%, tests/test_flops.py).
    """
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
        "run_id": run_id(cfg), "point_id": point_id(cfg), "model": cfg.model.name, "family": family(cfg.model.name),
        "patch": cfg.patch, "block": cfg.block, "seed": cfg.seed, "sweep": cfg.sweep, "params": int(params),
        "gflops_per_img": float(gflops), "gflops_counter": count, "tokens": (spec["input_size"] // cfg.patch) ** 2,
        "batch_img": tc.batch_img, "steps": tc.steps, "img_total": tc.batch_img * tc.steps,
        "budget_flops": tc.budget_flops or None,
        "train_flops": train_flops(float(gflops), tc.batch_img, tc.steps),
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
    if not (math.isfinite(tc.lr) and tc.lr > 0):
        raise ValueError(f"train.lr={tc.lr} must be a finite number > 0")
    for key in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(tc, key)) and getattr(tc, key) >= 0):
            raise ValueError(f"train.{key}={getattr(tc, key)} must be a finite number >= 0")
    if tc.num_workers < 0:
        raise ValueError(f"train.num_workers={tc.num_workers} must be >= 0 (0 = load in the training process)")
    if tc.precision not in PRECISIONS:
        raise ValueError(f"train.precision={tc.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if tc.device not in DEVICES:
        raise ValueError(f"train.device={tc.device!r}; allowed: {', '.join(DEVICES)}")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if tc.budget_flops < 0:
        raise ValueError(f"train.budget_flops={tc.budget_flops} must be >= 0 (0: train.steps is the horizon)")
    validate_eval(cfg.eval)
    check_val(cfg.val, tc.log_every, tc.ckpt_every)
    _check_writable(cfg.output_root)


_WRITABLE: set[str] = set()


def _check_writable(output_root: str) -> None:
    """Whether runs can be created under output_root: a probe directory is made and removed in its nearest existing
    ancestor (os.access says yes to root for /proc), once per root and process."""
    if output_root in _WRITABLE:
        return
    p = Path(output_root).resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():  # a file in the way: even root cannot create directories under it
        raise ValueError(f"output_root={output_root!r} is not writable ({p} is a file, not a directory)")
    try:
        tempfile.TemporaryDirectory(dir=p, prefix=".dit-scaling-probe-").cleanup()
    except OSError as e:
        raise ValueError(f"output_root={output_root!r} is not writable (cannot create a directory in {p}: "
                         f"{e.strerror})") from None
    _WRITABLE.add(output_root)
