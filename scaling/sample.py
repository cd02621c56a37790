"""Sample a DiT checkpoint with a named protocol into the ADM batch layout, decode, and optionally score it.

    python -m scaling.sample DiT-XL-2-256x256.pt --protocol paper_table2 --vae /models/sd-vae-ft-ema \\
        --out samples --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 -m scaling.sample ...      (or one SLURM task per GPU: the same command under srun)

The checkpoint is the public release's file (a bare state dict, e.g. DiT-XL-2-256x256.pt), a checkpoint of DiT's
own train.py, or one of this project's checkpoints (`<run>/checkpoints/step_<N>.pt`); the EMA weights are used
when the file has them. The architecture is read from the weights; `--model`/`--patch`/`--image-size` state what
the user expects, and a mismatch names the keys that differ. Latent models are decoded by the SD VAE
(`--vae ema|mse`, a local diffusers directory, or a hub id when online).

Protocols (PROTOCOLS) fix everything that moves a published number: sampler and steps, guidance scale and which
channels it acts on, class-label sampling, precision of the model and of the VAE decode, the quantisation.
Overriding one of them renames the protocol (`paper_table2+cfg_scale=4.0`), so no output claims a protocol it
did not follow. Sampling runs in chunks of `--batch-size` images; chunk b draws its noise from a generator
seeded by (seed, b) and labels are drawn per sample from `seed`, so the set of images depends on (seed, batch
size) and never on the number of GPUs; finished chunks are kept, so rerunning a killed command continues it.

Writes into --out: <tag>.npz (arr_0 (N, H, W, 3) uint8, arr_1 (N,) labels), <tag>.png (the first 64 as a grid),
<tag>.json (protocol, checkpoint, VAE, timing, and the metrics with the reference they were computed against).
"""

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from scaling.diffusion import DiffusionConfig
from scaling.evaluate import LABEL_SAMPLING, SAMPLERS, SAMPLING_PRECISIONS, npz_array, sample_to_npz, save_grid
from scaling.features import BACKENDS
from scaling.models import MODELS, build_model

QUANTISATION = "clamp(127.5 x + 128, 0, 255) truncated to uint8 (DiT sample_ddp.py; scaling.features.to_uint8)"
SD_VAE = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
RELEASE_LATENT_SCALE = 0.18215  # DiT sample.py / sample_ddp.py: vae.decode(z / 0.18215)


@dataclass(frozen=True)
class Protocol:
    """Everything about sampling that changes FID, written down."""
    name: str
    sampler: str                   # ddpm | ddim
    sampling_steps: int            # respaced steps
    cfg_scale: float               # 1.0 = no guidance
    guide_channels: Optional[int]  # guided epsilon channels: 3 = the release's forward_with_cfg, None = all
    labels: str                    # uniform (random per sample, as sample_ddp.py) | balanced (each class N/C times)
    precision: str                 # model forward: fp32 | tf32 (fp32 + TF32 matmuls) | bf16 (autocast)
    vae_precision: str             # VAE decode
    num_samples: int               # default N
    source: str                    # where the setting comes from


PROTOCOLS = {
    "paper_fid50k": Protocol("paper_fid50k", "ddpm", 250, 1.0, None, "uniform", "tf32", "fp32", 50_000,
                             "paper Figs. 6, 8, 9 and Table 4: 250 DDPM steps, no guidance; sample_ddp.py with "
                             "--cfg-scale 1.0 (its defaults: uniform random labels, fp32 with TF32 matmuls)"),
    "paper_table2": Protocol("paper_table2", "ddpm", 250, 1.5, 3, "uniform", "tf32", "fp32", 50_000,
                             "paper Table 2 (DiT-XL/2-G, 256 px: FID-50K 2.27): cfg 1.5 on the first 3 latent "
                             "channels as the release's forward_with_cfg, 250 DDPM steps, sample_ddp.py defaults"),
    "study": Protocol("study", "ddpm", 250, 1.0, None, "balanced", "fp32", "fp32", 50_000,
                      "this project's scaling-study evaluation (scaling.evaluate): no guidance, balanced labels"),
    "study_cfg1.5": Protocol("study_cfg1.5", "ddpm", 250, 1.5, None, "balanced", "fp32", "fp32", 50_000,
                             "this project's guided setting: cfg 1.5 on all epsilon channels (not the release's "
                             "3 of 4), balanced labels"),
}
OVERRIDABLE = ("sampler", "sampling_steps", "cfg_scale", "guide_channels", "labels", "precision")

# Cost model of a sampling run (`sampling_cost`). Multiply-adds per image of the SD VAE decoder (sd-vae-ft-ema's
# configuration, counted by fvcore like scaling.flops; its one 32x32 attention, ~1 G, is not counted).
VAE_DECODE_GFLOPS = {256: 310.6, 512: 1242.5}
# Assumptions, labelled as such: H100 SXM dense peak per precision (NVIDIA datasheet; fp32 = no tensor cores) and
# the share of it a sampling loop reaches (model flops utilisation).
H100_PEAK_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.0}
ASSUMED_MFU = 0.4


def with_overrides(protocol: Protocol, **changes) -> Protocol:
    """The protocol with `changes` (None = keep); a changed protocol says so in its name."""
    changes = {k: v for k, v in changes.items() if v is not None and v != getattr(protocol, k)}
    if not changes:
        return protocol
    label = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
    return replace(protocol, name=f"{protocol.name}+{label}", **changes)


def sampling_cost(gflops_per_img: float, num_samples: int, protocol: Protocol, image_size: int, *,
                  latent: bool = True, mfu: float = ASSUMED_MFU) -> dict:
    """Predicted FLOPs and H100 GPU-hours of a sampling run: Gflops x 2 (a multiply-add is 2 FLOPs) x samples x
    steps x (2 with guidance: conditional and unconditional halves), plus the VAE decode once per image, at the
    protocol's precision's peak x `mfu`."""
    forwards = protocol.sampling_steps * (2 if protocol.cfg_scale > 1.0 else 1)
    model_flops = 2 * gflops_per_img * 1e9 * forwards * num_samples
    vae_gflops = VAE_DECODE_GFLOPS.get(image_size, VAE_DECODE_GFLOPS[256] * (image_size / 256) ** 2)
    vae_flops = 2 * vae_gflops * 1e9 * num_samples if latent else 0.0
    peak = H100_PEAK_TFLOPS[protocol.precision] * 1e12
    return {"model_flops": model_flops, "vae_flops": vae_flops, "h100_peak_tflops": peak / 1e12, "assumed_mfu": mfu,
            "h100_gpu_hours": (model_flops + vae_flops) / (peak * mfu) / 3600}


@dataclass
class SampleConfig:
    checkpoint: str
    out: str = "samples"
    protocol: str = "paper_table2"
    model: Optional[str] = None        # dit_xl or DiT-XL/2; None: read from the weights
    patch: Optional[int] = None
    image_size: Optional[int] = None   # pixels; latent models see image_size / 8
    num_samples: Optional[int] = None  # None: the protocol's
    seed: int = 0
    batch_size: int = 32               # images per chunk (per GPU): chunk b is seeded by (seed, b)
    vae: Optional[str] = None          # ema | mse | directory | hub id; None: ema (release) or the run's VAE
    ref: Optional[str] = None          # ADM reference batch .npz, or "dataset" (a project run's training data)
    backend: str = "inception"         # feature space for scoring (scaling.features)
    inception_weights: Optional[str] = None
    num_ref: int = 10_000              # --ref dataset: reference images of the training data
    device: Optional[str] = None
    sampler: Optional[str] = None      # protocol overrides (None: keep the protocol's)
    sampling_steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    guide_channels: Optional[int] = None
    labels: Optional[str] = None
    precision: Optional[str] = None
    dry_run: bool = False              # load and check the checkpoint, print the plan and predicted cost, stop


def validate_sample(cfg: SampleConfig) -> None:
    """One-line ValueErrors naming the bad value and what is allowed (cheap: reads no weights)."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol={cfg.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if not Path(cfg.checkpoint).is_file():
        raise ValueError(f"checkpoint {cfg.checkpoint!r} is not a file; allowed: a DiT state dict (e.g. "
                         f"DiT-XL-2-256x256.pt) or a checkpoint of this project (<run>/checkpoints/step_N.pt)")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ValueError(f"--image-size={cfg.image_size}; allowed: an integer >= 1 (a multiple of 8 for latent models)")
    for key in ("num_samples", "batch_size", "sampling_steps", "num_ref"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')}={value}; allowed: an integer >= 1")
    if cfg.cfg_scale is not None and cfg.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale={cfg.cfg_scale}; allowed: >= 1.0 (1.0 = no guidance)")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend={cfg.backend!r}; allowed: {', '.join(BACKENDS)}")
    if cfg.ref not in (None, "dataset") and not Path(cfg.ref).is_file():
        raise ValueError(f"--ref={cfg.ref!r} is not a file; allowed: an ADM reference batch .npz (e.g. "
                         f"VIRTUAL_imagenet256_labeled.npz) or 'dataset'")


# ----------------------------------------------------------------------------- checkpoints


def parse_model(name: str) -> tuple[str, Optional[int]]:
    """'DiT-XL/2' -> ('dit_xl', 2) (the release's names); 'dit_xl' -> ('dit_xl', None)."""
    m = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", name)
    key, patch = (f"dit_{m.group(1).lower()}", int(m.group(2))) if m else (name, None)
    if key not in MODELS:
        raise ValueError(f"--model={name!r}; allowed: {', '.join(MODELS)} or DiT-S/2 .. DiT-XL/8")
    return key, patch


def read_checkpoint(path) -> tuple[dict, Optional[dict]]:
    """(state dict, project RunConfig dict or None): EMA weights when the file holds them (this project's
    checkpoints and those of DiT's train.py), else the file itself (the release: a bare state dict)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}; allowed: a state dict or a "
                         f"dict with 'ema' weights")
    if "ema" in ckpt:
        return ckpt["ema"], ckpt.get("config")
    if not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"checkpoint {str(path)!r} is neither a state dict nor has 'ema' weights (keys: "
                         f"{', '.join(list(ckpt)[:6])}); allowed: a DiT state dict or a dict with 'ema'")
    return ckpt, None


def describe_weights(sd: dict) -> dict:
    """The DiT a state dict was saved from, read off its shapes (adaLN-Zero layout of the release)."""
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        tokens = sd["pos_embed"].shape[1]
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    except (KeyError, ValueError):
        return {}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = round(tokens ** 0.5)
    name = next((k for k, v in MODELS.items() if (v["depth"], v["hidden_size"]) == (depth, hidden)), None)
    return {"name": name, "depth": depth, "hidden_size": hidden, "patch": patch, "input_size": grid * patch,
            "in_channels": in_channels, "learn_sigma": out == 2 * in_channels,
            "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1}


def model_for_weights(sd: dict, name: str, patch: int, input_size: int, *, block: str = "adaln_zero",
                      class_dropout: float = 0.1, source: str = "checkpoint") -> torch.nn.Module:
    """Build `name`/`patch` at `input_size` and load `sd` strictly (weights assigned, no init run); a mismatch is
    one ValueError line naming the differing keys and what the weights are."""
    info = describe_weights(sd)
    num_classes = info["num_classes"] + (class_dropout == 0) if info else 1000  # + the null class row
    with torch.device("meta"):
        model = build_model(name, patch, input_size=input_size, in_channels=info.get("in_channels", 4),
                            num_classes=num_classes, learn_sigma=info.get("learn_sigma", True), block=block,
                            class_dropout=class_dropout)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = [k for k in want if k not in got], [k for k in got if k not in want]
    shapes = [f"{k} {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]  # pos_embed first
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"{label}: {few(keys)}" for label, keys in (("missing keys", missing), ("unexpected keys",
                 unexpected), ("shape mismatch (weights vs model)", shapes)) if keys]
        looks = (f"; the weights are {info['name'] or 'depth %d width %d' % (info['depth'], info['hidden_size'])} "
                 f"patch {info['patch']} on {info['input_size']}x{info['input_size']} inputs") if info else ""
        raise ValueError(f"{source} does not fit {name}/{patch} on {input_size}x{input_size} inputs: "
                         f"{'; '.join(parts)}{looks}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass
class Loaded:
    model: torch.nn.Module
    plan: dict                 # in_channels, input_size, num_classes, pixel_space (what sample_to_npz reads)
    diffusion: DiffusionConfig
    kind: str                  # release | project
    model_tag: str             # e.g. DiT-XL-2-256
    image_size: int            # pixels of the samples
    vae: Optional[str]         # VAE to decode with (latent models)
    latent_scale: float
    run_config: Optional[dict]


def load_checkpoint_for_sampling(cfg: SampleConfig) -> Loaded:
    """The model of cfg.checkpoint with what sampling it needs; checks --model/--patch/--image-size."""
    sd, run_cfg = read_checkpoint(cfg.checkpoint)
    info = describe_weights(sd)
    if not info:
        raise ValueError(f"checkpoint {cfg.checkpoint!r} has no DiT adaLN-Zero weights (x_embedder, pos_embed, "
                         f"final_layer); allowed: a DiT checkpoint")
    if run_cfg is not None:  # this project's checkpoint: the run's config says what it is
        from scaling.config import config_from_dict

        rc = config_from_dict(run_cfg)
        name, patch, block, diffusion = rc.model.name, rc.patch, rc.block, rc.diffusion
        dropout = rc.model.class_dropout
        pixel = rc.data.name != "latents"
        vae, scale = rc.data.vae, rc.data.latent_scale
    else:
        name, patch, block, diffusion = info["name"], info["patch"], "adaln_zero", DiffusionConfig()
        dropout = 0.1  # the release trains with label dropout: its table has the null class
        pixel, vae, scale = False, SD_VAE["ema"], RELEASE_LATENT_SCALE
    if cfg.model is not None:
        name, given_patch = parse_model(cfg.model)
        patch = cfg.patch or given_patch or patch
    elif cfg.patch is not None:
        patch = cfg.patch
    if name is None:
        raise ValueError(f"checkpoint {cfg.checkpoint!r}: depth {info['depth']} width {info['hidden_size']} is no "
                         f"preset; allowed: --model one of {', '.join(MODELS)}")
    factor = 1 if pixel else 8
    if cfg.image_size is not None and cfg.image_size % factor:
        raise ValueError(f"--image-size={cfg.image_size}; allowed: a multiple of 8 (the SD VAE downsamples by 8), "
                         f"e.g. 256 or 512")
    input_size = cfg.image_size // factor if cfg.image_size else info["input_size"]
    model = model_for_weights(sd, name, patch, input_size, block=block, class_dropout=dropout,
                              source=f"checkpoint {cfg.checkpoint!r}")
    if cfg.vae is not None:
        vae = SD_VAE.get(cfg.vae, cfg.vae)
    plan = {"in_channels": model.in_channels, "input_size": input_size, "num_classes": model.num_classes,
            "pixel_space": pixel}
    diffusion = replace(diffusion, learn_sigma=model.learn_sigma)
    tag = f"DiT-{name[4:].upper()}-{patch}" if name.startswith("dit_") else f"{name}-{patch}"
    return Loaded(model, plan, diffusion, "project" if run_cfg is not None else "release",
                  f"{tag}-{input_size * factor}", input_size * factor, None if pixel else vae, scale, run_cfg)


# ----------------------------------------------------------------------------- sampling, scoring, records


def output_tag(loaded: Loaded, protocol: Protocol, cfg: SampleConfig, num_samples: int) -> str:
    """File stem of the outputs: model, checkpoint, protocol, N, seed, chunk size (each changes the images)."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", protocol.name)
    return f"{loaded.model_tag}-{Path(cfg.checkpoint).stem}-{name}-n{num_samples}-s{cfg.seed}-b{cfg.batch_size}"


def score(npz: Path, cfg: SampleConfig, loaded: Loaded, device: torch.device) -> dict:
    """Metrics of the samples against cfg.ref: an ADM reference batch (names end in _adm), or the project
    run's own training data (scaling.evaluate's reference; project checkpoints only)."""
    from scaling.features import build_extractor

    if cfg.ref == "dataset":
        from scaling.config import config_from_dict
        from scaling.evaluate import pixel_data_config, score_npz

        if loaded.run_config is None:
            raise ValueError("--ref=dataset needs a checkpoint of this project (its run names the data); "
                             "allowed for the release's weights: --ref PATH to an ADM reference batch")
        data_cfg = pixel_data_config(config_from_dict(loaded.run_config).data)
        out = score_npz(npz, data_cfg, cfg.backend, num_ref=cfg.num_ref, inception_weights=cfg.inception_weights)
        out["reference"] = {"kind": "dataset", "tag": "own", "dataset": data_cfg.name, "path": data_cfg.path,
                            "num_images": out["num_ref"], "statistics": "features of an evenly strided subset"}
        return out
    from scaling.adm import read_adm_reference, score_against_adm

    ref = read_adm_reference(cfg.ref)
    space = build_extractor(cfg.backend, inception_weights=cfg.inception_weights)
    return score_against_adm(npz_array(npz), ref, space, cuda=device.type == "cuda")


def run_sampling(cfg: SampleConfig) -> dict:
    """Sample, decode, write the .npz, grid and record; score when cfg.ref is set. Returns the record (on every
    rank; only rank 0 scores and writes). Shares the work over torch.distributed ranks when initialised."""
    from scaling.data import load_vae
    from scaling.evaluate import _dist
    from scaling.rundir import write_json

    validate_sample(cfg)
    t0 = time.perf_counter()
    rank, world = _dist()
    base = PROTOCOLS[cfg.protocol]
    protocol = with_overrides(base, **{k: getattr(cfg, k) for k in OVERRIDABLE})
    num_samples = cfg.num_samples or protocol.num_samples
    for key, allowed in (("sampler", SAMPLERS), ("labels", LABEL_SAMPLING), ("precision", SAMPLING_PRECISIONS)):
        if getattr(protocol, key) not in allowed:
            raise ValueError(f"--{key}={getattr(protocol, key)!r}; allowed: {', '.join(allowed)}")
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint_for_sampling(cfg)
    if protocol.cfg_scale > 1.0 and loaded.model.y_embedder.embedding_table.num_embeddings == loaded.model.num_classes:
        raise ValueError(f"--cfg-scale={protocol.cfg_scale}: this model has no null class (trained without label "
                         f"dropout); allowed: 1.0")
    predicted = None
    if cfg.dry_run or rank == 0:
        from scaling.flops import gflops_per_img

        gflops = gflops_per_img(loaded.model)
        cost = sampling_cost(gflops, num_samples, protocol, loaded.image_size, latent=loaded.vae is not None)
        predicted = {"model": loaded.model_tag, "checkpoint_kind": loaded.kind, "gflops_per_img": gflops,
                     "protocol": protocol.name, "num_samples": num_samples, **cost}
        print(f"[sample] plan: {json.dumps(predicted)}", file=sys.stderr, flush=True)
        if cfg.dry_run:
            return {"plan": predicted}
    vae = load_vae(loaded.vae, device) if loaded.vae else None
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = output_tag(loaded, protocol, cfg, num_samples)
    npz, record_path = out_dir / f"{tag}.npz", out_dir / f"{tag}.json"
    todo = not npz.is_file()
    parts = npz.with_name(npz.name + ".parts")  # sample_to_npz's finished chunks (a resumed run has some)
    drawn_before = min(num_samples, cfg.batch_size * len(list(parts.glob("batch_*.npz")))) if parts.is_dir() else 0
    if rank == 0:
        print(f"[sample] {loaded.model_tag} ({loaded.kind} weights) protocol {protocol.name}: {num_samples} images "
              f"in chunks of {cfg.batch_size} on {world} process(es) -> {npz}" + ("" if todo else " (exists)"),
              file=sys.stderr, flush=True)
    t_sample = time.perf_counter()
    if todo:
        sample_to_npz(loaded.model.to(device), loaded.diffusion, loaded.plan, num_samples, sampler=protocol.sampler,
                      sampling_steps=protocol.sampling_steps, cfg_scale=protocol.cfg_scale, seed=cfg.seed,
                      batch_size=cfg.batch_size, out_path=npz, vae=vae, latent_scale=loaded.latent_scale,
                      guide_channels=protocol.guide_channels, labels=protocol.labels, precision=protocol.precision,
                      device=device)
    sample_wall_s = time.perf_counter() - t_sample
    record = {"protocol": asdict(protocol), "protocol_base": base.name, "quantisation": QUANTISATION,
              "checkpoint": {"path": str(cfg.checkpoint), "kind": loaded.kind,
                             "bytes": Path(cfg.checkpoint).stat().st_size},
              "model": loaded.model_tag, "image_size": loaded.image_size, "vae": loaded.vae,
              "latent_scale": None if loaded.vae is None else loaded.latent_scale, "num_samples": num_samples,
              "seed": cfg.seed, "batch_size": cfg.batch_size, "world_size": world, "npz": str(npz),
              "grid": str(out_dir / f"{tag}.png"), "sample_wall_s": sample_wall_s if todo else None,
              "predicted": predicted, "metrics": None, "reference": None}
    if rank != 0:
        return record
    save_grid(np.array(npz_array(npz)[:64]), out_dir / f"{tag}.png")  # a copy: torch wants writable arrays
    if todo:
        record["img_per_s"] = (num_samples - drawn_before) / max(sample_wall_s, 1e-9)  # drawn by this call
        record["resumed_from_img"] = drawn_before
    if cfg.ref:
        scored = score(npz, cfg, loaded, device)
        record.update(metrics=scored["metrics"], reference=scored["reference"],
                      feature_extractor=scored["feature_extractor"],
                      feature_extractor_info=scored.get("feature_extractor_info"))
        print(f"[sample] {tag}: " + " | ".join(f"{k} {v:.4g}" for k, v in scored["metrics"].items()) +
              f" (reference: {scored['reference'].get('file') or scored['reference'].get('dataset')})",
              file=sys.stderr, flush=True)
    record["wall_s"] = time.perf_counter() - t0
    write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scaling.sample", description=__doc__.splitlines()[0],
                                epilog="Protocols: " + "; ".join(f"{k}: {v.source}" for k, v in PROTOCOLS.items()))
    d = SampleConfig(checkpoint="")
    p.add_argument("checkpoint", help="DiT weights: the release's file (e.g. DiT-XL-2-256x256.pt, a bare state "
                                      "dict), a DiT train.py checkpoint, or this project's step_N.pt (EMA used)")
    p.add_argument("--out", default=d.out, help="output directory for <tag>.npz/.png/.json (default: %(default)s)")
    p.add_argument("--protocol", default=d.protocol, choices=list(PROTOCOLS), help="named sampling protocol "
                   "(default: %(default)s; see below)")
    p.add_argument("--model", help="expected model: dit_s..dit_xl, laptop_*, or the release's DiT-XL/2 (default: "
                                   "read from the weights; a mismatch names the differing keys)")
    p.add_argument("--patch", type=int, help="expected patch size (default: read from the weights)")
    p.add_argument("--image-size", type=int, help="pixels, a multiple of 8 for latent models (default: from the "
                                                  "weights' position embedding, e.g. 256)")
    p.add_argument("--num-samples", type=int, help="images to draw (default: the protocol's, 50000)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds labels and each chunk's noise (default: 0)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per chunk and forward pass, per "
                   "GPU; part of the seeding, so keep it to resume (default: %(default)s)")
    p.add_argument("--vae", help="ema | mse (stabilityai/sd-vae-ft-*), a local diffusers AutoencoderKL directory, "
                                 "or a hub id (default: ema for the release, the run's VAE for project latents)")
    p.add_argument("--ref", help="score against this ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz), "
                                 "or 'dataset' (a project run's own training data); default: do not score")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="feature space for scoring (default: "
                   "inception, torch-fidelity's FID Inception)")
    p.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth (offline)")
    p.add_argument("--num-ref", type=int, default=d.num_ref, help="--ref dataset: reference images (default: "
                                                                   "%(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="check the checkpoint, print Gflops and the predicted "
                   f"H100 GPU-hours (assumed MFU {ASSUMED_MFU}), sample nothing")
    g = p.add_argument_group("protocol overrides (each renames the protocol, e.g. paper_table2+cfg_scale=4.0)")
    g.add_argument("--sampler", choices=SAMPLERS, help="ddpm (the paper) or ddim")
    g.add_argument("--sampling-steps", type=int, help="respaced steps (the paper: 250)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale, >= 1.0 (1.0 = none)")
    g.add_argument("--guide-channels", type=int, help="guided epsilon channels (the release: 3)")
    g.add_argument("--labels", choices=LABEL_SAMPLING, help="uniform random per sample, or balanced classes")
    g.add_argument("--precision", choices=SAMPLING_PRECISIONS, help="model forward: fp32, tf32 or bf16 autocast")
    return p


def parse_args(argv=None) -> SampleConfig:
    return SampleConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None) -> int:
    from scaling.train import setup_distributed

    cfg = parse_args(argv)
    try:
        validate_sample(cfg)
        _, world, local_rank = setup_distributed()
        if world > 1 and torch.cuda.is_available() and cfg.device is None:
            torch.cuda.set_device(local_rank)
        record = run_sampling(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m scaling.sample: error: {e}", file=sys.stderr)
        return 2
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    print(json.dumps({k: record[k] for k in ("plan", "npz", "metrics", "reference") if k in record}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
