"""Evaluation: sample a checkpoint to disk, score the samples in a named feature space, append to evals.jsonl.

    evaluate_checkpoint(run_dir, step, eval_cfg)
      load_model (EMA weights) -> sample_to_npz (ADM batch .npz, resumable, sharded over ranks)
      -> compute_metrics (torch-fidelity's steps, one feature extractor: FD, IS, precision/recall, KID)
      -> one row in <run>/evals.jsonl per (step, setting)

Curves at a small N, the final checkpoint also at a large one (`eval.final_num_samples`, e.g. 250 and 500): every
checkpoint draws the first `num_samples` of one stream of `final_num_samples` samples (labels and noise of whole
batches, so a prefix of the stream is the same images whoever draws it); the final checkpoint draws the whole
stream, scored as the row of its own setting (fd500_domain) and, from its first `num_samples`, as the curve's row
(fd250_domain). The curve's setting key ends in `-of<final>`: its labels are not those of a plain 250-sample draw.

Every number carries its feature space and sample count in its name: `fid50k_inception` is FID in the paper's
sense (torch-fidelity's Inception weights); `fd1k_inception_offline`, `fd1k_domain`, `is1k_domain`,
`precision1k_domain`, `recall1k_domain` are Frechet distances / scores in other feature spaces (scaling.features).
The reference set is `num_ref` images of the training data (an evenly strided subset); its features and
statistics are cached under a key holding the backend's weights hash and the data's hash.

    python -m scaling.evaluate <run_dir> [--step S] [--num-samples N] [--backend B] [--sampler ddpm|ddim] ...
    python -m scaling.evaluate <run_dir> --rescore     # rows of other feature weights (another space) scored again
    python -m scaling.evaluate --npz samples.npz --dataset animal_mnist --image-size 32 --backend domain
"""

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from tqdm import tqdm

from scaling.checkpoint import checkpoint_path, list_steps, load_model
from scaling.config import (BACKENDS, DEFAULT_NUM_REF, PRC_NEIGHBOURHOOD, SAMPLERS, EvalConfig, config_from_dict,
                            validate_eval)
from scaling.data import (DATASETS, DataConfig, build_dataset, decode_latents, load_vae, read_latent_meta,
                          strided_subset)
from scaling.diffusion import Diffusion, sample
from scaling.models import images_per_forward
from scaling.rundir import RunDir, append_jsonl, read_jsonl, temp_tag

LABEL_SAMPLING = ("balanced", "uniform")        # class labels of the samples (sample_to_npz)
SAMPLING_PRECISIONS = ("fp32", "tf32", "bf16")  # the model forward while sampling (sample_to_npz)
SAMPLING_DEFAULTS = {"labels": "balanced", "precision": "fp32"}


def setting_key(cfg: EvalConfig) -> str:
    """Short stable key of an eval setting, e.g. 'domain-n1000-ddpm250-cfg1.0-s0' (rows are unique per step)."""
    key = f"{cfg.backend}-n{cfg.num_samples}-{cfg.sampler}{cfg.sampling_steps}-cfg{float(cfg.cfg_scale)}-s{cfg.seed}"
    if cfg.guide_channels is not None:
        key += f"-g{cfg.guide_channels}"
    if cfg.num_ref != DEFAULT_NUM_REF:
        key += f"-ref{cfg.num_ref}"
    if cfg.final_num_samples > cfg.num_samples:
        key += f"-of{cfg.final_num_samples}"
    return key


def stream_samples(cfg: EvalConfig) -> int:
    """The length of the sample stream every draw of this setting is a prefix of."""
    return max(cfg.num_samples, cfg.final_num_samples)


def final_setting(cfg: EvalConfig) -> Optional[EvalConfig]:
    """The setting of the final checkpoint's whole-stream draw (eval.final_num_samples), None when there is none."""
    if cfg.final_num_samples <= cfg.num_samples:
        return None
    return replace(cfg, num_samples=cfg.final_num_samples, final_num_samples=0)


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def metric_name(kind: str, backend: str, num_samples: int) -> str:
    """'fd' -> fid50k_inception for torch-fidelity's Inception, fd1k_domain etc. elsewhere (never 'fid')."""
    if kind == "fd":
        kind = "fid" if backend == "inception" else "fd"
    return f"{kind}{count_label(num_samples)}_{backend}"


# ----------------------------------------------------------------------------- sampling to disk


def batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch * 10_007 + 1) % (2**63)


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Label i is i % num_classes, shuffled by a permutation seeded by `seed`: every class equally often."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(num_samples) % num_classes)[perm]


def _dist():
    """(rank, world) of torch.distributed, (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.{temp_tag()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def concat_npz(path: Path, shards: list, keys: tuple) -> None:
    """Write `keys` of the .npz files `shards`, concatenated along axis 0, as one .npz (what np.savez writes),
    streaming one shard at a time: 50K images at 512 px are 39 GB, more than a node's memory twice over."""
    import zipfile

    tmp = path.with_name(f".{path.name}.{temp_tag()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in keys:
            heads = []
            for shard in shards:  # (dtype, shape) from each .npy header, without reading the array
                with zipfile.ZipFile(shard) as z, z.open(f"{key}.npy") as fp:
                    version = np.lib.format.read_magic(fp)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fp)
                heads.append((dtype, shape))
            header = {"descr": np.lib.format.dtype_to_descr(heads[0][0]), "fortran_order": False,
                      "shape": (sum(shape[0] for _, shape in heads), *heads[0][1][1:])}
            with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, header)
                for shard in shards:
                    with np.load(shard) as f:
                        out.write(np.ascontiguousarray(f[key], dtype=heads[0][0]).tobytes())
    os.replace(tmp, path)


def npz_array(path, key: str = "arr_0") -> np.ndarray:
    """`key` of an .npz as a read-only memory map when it is stored uncompressed (np.savez, concat_npz, the ADM
    reference batches), so 50K images are not read into memory at once; else the array itself."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as f:
                return f[key]
        with z.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fp)
            npy_header = fp.tell()
    with open(path, "rb") as f:  # the member's data starts after its local file header (30 bytes + name + extra)
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    offset = info.header_offset + 30 + name_len + extra_len + npy_header
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@torch.no_grad()
def sample_to_npz(model, diffusion_cfg, plan: dict, num_samples: int, *, sampler: str = "ddpm",
                  sampling_steps: int = 250, cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 256,
                  out_path, vae=None, latent_scale: float = 0.18215, guide_channels: Optional[int] = None,
                  labels: str = "balanced", precision: str = "fp32", device=None,
                  distributed: Optional[bool] = None, progress: bool = True,
                  stream: Optional[int] = None) -> Path:
    """Draw `num_samples` class-conditional samples into `out_path`, the ADM batch .npz:
    arr_0 (N, H, W, 3) uint8 (grey repeated to 3 channels), arr_1 (N,) int64 labels.

    labels: "balanced" (`balanced_labels`: every class equally often, the scaling study) or "uniform" (drawn
    uniformly at random per sample from one generator seeded by `seed`, as DiT's sample_ddp.py). precision: "fp32",
    "tf32" (fp32 with TF32 matmuls on GPUs, sample_ddp.py's default) or "bf16" (autocast of the model forward; the
    diffusion arithmetic and the VAE decode stay fp32). Batch b draws its noise from a generator seeded by
    (seed, b), so the result does not depend on interruptions or on the number of ranks. Each batch is written
    as a shard in `<out>.parts/`; a rerun skips shards that exist, then the shards are assembled and removed. With
    torch.distributed (distributed=None: when initialised) rank r draws batches r, r + world, ... and rank 0
    assembles after a barrier. Latent models are decoded through `vae`. `stream` (>= num_samples): the labels are
    the first num_samples of a stream of that many, so that with a batch_size dividing num_samples the draw is the
    first num_samples images of the `stream`-sample draw.
    """
    from scaling.features import to_uint8

    out_path = Path(out_path)
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialised")
    rank, world = (0, 1) if distributed is False else _dist()
    device = torch.device(device or next(model.parameters()).device)
    parts = out_path.with_name(out_path.name + ".parts")
    if labels not in LABEL_SAMPLING:
        raise ValueError(f"labels={labels!r}; allowed: {', '.join(LABEL_SAMPLING)}")
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(SAMPLING_PRECISIONS)}")
    spec = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed, "sampler": sampler,
            "sampling_steps": sampling_steps, "cfg_scale": float(cfg_scale), "guide_channels": guide_channels}
    spec.update({k: v for k, v in (("labels", labels), ("precision", precision)) if v != SAMPLING_DEFAULTS[k]})
    stream = num_samples if stream is None else stream
    if stream < num_samples:
        raise ValueError(f"stream={stream} is shorter than num_samples={num_samples}")
    if stream != num_samples:
        spec["stream"] = stream
    parts.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        spec_file = parts / "spec.json"
        if spec_file.is_file() and json.loads(spec_file.read_text()) != spec:
            print(f"[evaluate] {parts} holds shards of another setting; discarding them", file=sys.stderr)
            for f in parts.glob("batch_*.npz"):
                f.unlink()
        spec_file.write_text(json.dumps(spec, sort_keys=True))
    if world > 1:
        torch.distributed.barrier()

    diffusion = Diffusion(diffusion_cfg)
    model.eval()
    all_labels = (balanced_labels(stream, plan["num_classes"], seed) if labels == "balanced" else
                  torch.randint(0, plan["num_classes"], (stream,), generator=torch.Generator().manual_seed(seed)))
    all_labels = all_labels[:num_samples]
    num_batches = -(-num_samples // batch_size)
    mine = [b for b in range(rank, num_batches, world) if not (parts / f"batch_{b:06d}.npz").is_file()]
    shape = (plan["in_channels"], plan["input_size"], plan["input_size"])
    # model images per forward (guidance doubles each batch): fewer on a CPU for speed, the batch's noise kept
    per_forward = images_per_forward(model, device, batch_size * (2 if cfg_scale > 1.0 else 1))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    bar = tqdm(total=sum(min(batch_size, num_samples - b * batch_size) for b in mine), unit="img",
               desc=f"sample {sampler}{sampling_steps} (rank {rank} of {world})", disable=not progress or rank != 0)
    try:
        for b in mine:
            y = all_labels[b * batch_size:(b + 1) * batch_size].to(device)
            g = torch.Generator(device).manual_seed(batch_seed(seed, b))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                x = sample(model, diffusion, y, (len(y), *shape), sampler=sampler, num_steps=sampling_steps,
                           cfg_scale=cfg_scale, guide_channels=guide_channels, generator=g,
                           clip_denoised=plan.get("pixel_space", True),
                           forward_batch=per_forward)                          # (B, C, h, w) model space
            if not plan.get("pixel_space", True):
                x = decode_latents(vae, x, latent_scale)                        # (B, 3, H, W) in [-1, 1]
            images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()             # (B, H, W, 3) uint8
            _save_npz(parts / f"batch_{b:06d}.npz", arr_0=images, arr_1=y.cpu().numpy())
            bar.update(len(y))  # tqdm shows img/s and the ETA of this rank's share
    finally:
        bar.close()
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        missing = [b for b in range(num_batches) if not (parts / f"batch_{b:06d}.npz").is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} sample shards missing in {parts} (first: batch {missing[0]}); "
                               f"rerun to draw them")
        concat_npz(out_path, [parts / f"batch_{b:06d}.npz" for b in range(num_batches)], ("arr_0", "arr_1"))
        for b in range(num_batches):
            (parts / f"batch_{b:06d}.npz").unlink()
        (parts / "spec.json").unlink()
        parts.rmdir()
    if world > 1:
        torch.distributed.barrier()
    return out_path


def save_grid(images: np.ndarray, path, nrow: int = 8) -> None:
    """A PNG grid of uint8 images (N, H, W, 3)."""
    from torchvision.utils import save_image

    save_image(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, path, nrow=nrow)


# ----------------------------------------------------------------------------- metrics


class UInt8Images(Dataset):
    """uint8 images (N, H, W, 3), e.g. arr_0 of an ADM .npz, as torch-fidelity reads them: (3, H, W) uint8."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # a writable copy (of a memory map)


class ReferenceImages(Dataset):
    """Images `indices` of a pixel dataset as uint8 (3, H, W), read only when features are not cached."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from scaling.features import to_uint8

        return to_uint8(self.dataset[int(self.indices[i])][0][None])[0]


def pixel_data_config(data_cfg):
    """The pixel images behind a dataset: latents -> the image folder they were encoded from. The whole set
    (max_images, a quick-run subset, is dropped): the reference is the data distribution."""

    if data_cfg.name != "latents":
        return replace(data_cfg, max_images=None)
    meta = read_latent_meta(data_cfg)
    return DataConfig(name="image_folder", path=meta["source"], image_size=meta["image_size"])


def reference_set(data_cfg, num_ref: int):
    """(ReferenceImages of min(num_ref, len) evenly strided training images, sha256 of the whole dataset)."""
    from scaling.features import dataset_fingerprint

    dataset = build_dataset(data_cfg)
    return ReferenceImages(dataset, strided_subset(len(dataset), num_ref)), dataset_fingerprint(dataset)


def reference_key(data_cfg, space, num_ref: int, data_sha: str) -> str:
    """Cache name of the reference features: dataset, resolution, N, backend, weights hash, data hash."""
    return (f"ref-{data_cfg.name}{data_cfg.image_size}-n{num_ref}-{space.backend}-w{space.weights_sha[:12]}"
            f"-d{data_sha[:12]}")


class _WithoutLines:
    """A stderr that drops the lines starting with one of `prefixes` (progress bars pass through)."""

    def __init__(self, stream, prefixes):
        self.stream, self.prefixes, self.dropping = stream, tuple(prefixes), False

    def write(self, text: str) -> int:
        drop = text.startswith(self.prefixes) or (self.dropping and text == "\n")
        self.dropping = text.startswith(self.prefixes)
        return len(text) if drop else self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def compute_metrics(samples: Dataset, reference: Dataset, space, *, reference_key: Optional[str] = None,
                    isc: bool = True, prc: bool = True, kid: bool = False, batch_size: int = 64,
                    cuda: Optional[bool] = None, progress: bool = True) -> dict:
    """FD, IS, precision/recall and KID of `samples` against `reference`, each image featurised once.

    Both are Datasets of uint8 (3, H, W) images. With `reference_key` the reference features, FD statistics and
    k-NN radii are cached under cache_dir()/fidelity, so the reference is read and its radii (a 10,000 x 10,000
    distance matrix: 2.5 s of the 2.6 s precision/recall takes on a CPU core) computed once. The steps are
    torch-fidelity's calculate_metrics for one feature extractor, each through the same torch-fidelity function,
    so every number is the one calculate_metrics gives to the bit (tests/test_features.py). IS is None where the
    feature space has no class logits. Returns {fd, is, is_std, precision, recall, f_score, kid, kid_std}.
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                      get_cacheable_input_name)

    from scaling.features import cache_dir, cached_tensor, register_extractors

    register_extractors()
    n1, n2 = len(samples), len(reference)
    isc = isc and space.is_layer is not None
    cache = cache_dir() / "fidelity"
    kwargs = dict(input1=samples, input2=reference, cuda=torch.cuda.is_available() if cuda is None else cuda,
                  batch_size=batch_size, feature_extractor_weights_path=space.weights_path,
                  isc_splits=min(10, n1), kid_subset_size=min(1000, n1, n2),
                  save_cpu_ram=True,  # no DataLoader workers for in-memory images
                  cache=reference_key is not None, cache_root=str(cache), input2_cache_name=reference_key,
                  verbose=progress)
    layers = [space.fd_layer] + ([space.is_layer] if isc else [])
    # torch-fidelity prints every result as "Frechet Inception Distance", "Inception Score", ... whatever the
    # feature space: keep its progress bars, drop those lines (the caller logs the values under their names).
    unnamed = ["Frechet Inception Distance:", "Inception Score:", "Kernel Inception Distance:"]
    with contextlib.redirect_stderr(_WithoutLines(sys.stderr, unnamed)):
        extractor = create_feature_extractor(space.extractor, layers, **kwargs)
        fake = extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)
        real = extract_featuresdict_from_input_id_cached(2, extractor, **kwargs)
        stats = [fid_featuresdict_to_statistics_cached(f, get_cacheable_input_name(i, **kwargs), extractor,
                                                       space.fd_layer, **kwargs) for i, f in ((1, fake), (2, real))]
        out = {"fd": fid_statistics_to_metric(*stats, progress)["frechet_inception_distance"], "is": None,
               "is_std": None, "precision": None, "recall": None, "f_score": None, "kid": None, "kid_std": None}
        if isc:
            r = isc_featuresdict_to_metric(fake, space.is_layer, **kwargs)
            out.update({"is": r["inception_score_mean"], "is_std": r["inception_score_std"]})
        if kid:
            r = kid_featuresdict_to_metric(fake, real, space.fd_layer, **kwargs)
            out.update({"kid": r["kernel_inception_distance_mean"], "kid_std": r["kernel_inception_distance_std"]})
    if prc:
        f1, f2 = fake[space.fd_layer], real[space.fd_layer]
        radii = None if reference_key is None else cached_tensor(
            cache / f"{reference_key}-{space.extractor}-{space.fd_layer}-prc-radii-k{PRC_NEIGHBOURHOOD}.pt",
            lambda: knn_radii(f2))
        p, r = precision_recall(f1, f2, real_radii=radii)
        out.update({"precision": p, "recall": r, "f_score": 2 * p * r / max(1e-5, p + r)})  # torch-fidelity's
    return out


def frechet_distance(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FD between two feature sets (N, d), through the functions calculate_metrics uses (statistics -> metric):
    |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Heusel et al. 2017, eq. 6)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f) for f in (features_1, features_2)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def knn_radii(features: torch.Tensor, k: int = PRC_NEIGHBOURHOOD) -> torch.Tensor:
    """(N,) distance of each feature to its k-th nearest neighbour in the set (itself excluded), in torch-fidelity's
    batches and arithmetic (calc_cdist_part, kthvalue(k + 1)): the radius of its ball in precision/recall."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_prc import calc_cdist_part

    batch = DEFAULTS["prc_batch_size"]
    return torch.cat([calc_cdist_part(b, features, batch).kthvalue(k + 1).values for b in features.split(batch)])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PRC_NEIGHBOURHOOD, *,
                     real_radii: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): precision = share of fake features inside some real
    feature's k-NN ball; recall = share of real inside some fake's ball. torch-fidelity's computation
    (calculate_precision_recall_part, the same numbers to the bit), with the real set's radii given when known
    (`knn_radii(real, k)`: they depend on the reference alone, and are most of the cost)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_prc import calc_cdist_part

    batch = DEFAULTS["prc_batch_size"]
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k)
    recall = torch.cat([(calc_cdist_part(b, fake, batch) <= fake_radii).any(dim=1).float()
                        for b in real.split(batch)]).mean().item()
    precision = torch.cat([(calc_cdist_part(b, real, batch) <= real_radii).any(dim=1).float()
                           for b in fake.split(batch)]).mean().item()
    return precision, recall


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) || p(y)) per split, mean and std over splits (Salimans et al. 2016), through
    torch-fidelity (samples shuffled with its default seed 2020 before splitting)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    r = isc_features_to_metric(logits, splits=splits)
    return r["inception_score_mean"], r["inception_score_std"]


def named_metrics(raw: dict, backend: str, num_samples: int) -> dict:
    """{'fd1k_domain': .., 'is1k_domain': .., ...}: the values present, each named with its space and N."""
    kinds = {"fd": "fd", "is": "is", "precision": "precision", "recall": "recall", "kid": "kid", "kid_std": "kid_std"}
    return {metric_name(kind, backend, num_samples): raw[k] for k, kind in kinds.items() if raw.get(k) is not None}


# ----------------------------------------------------------------------------- checkpoints and evals.jsonl


def as_run(run_dir):
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def run_config(run_dir):
    """The RunConfig in a run's config.yaml."""
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(as_run(run_dir).config)))


def run_eval_config(run_dir) -> EvalConfig:
    """The eval settings in a run's config.yaml."""
    return run_config(run_dir).eval


def find_eval(run_dir, step: int, setting: str, weights_sha: Optional[str] = None) -> Optional[dict]:
    """The latest row of (step, setting), the one the results table keeps; with `weights_sha` (16 hex digits)
    None where that row was scored with other feature weights (another space: missing, to be scored again)."""
    rows = [r for r in read_jsonl(as_run(run_dir).evals) if r.get("step") == step and r.get("setting") == setting]
    if not rows or (weights_sha is not None and rows[-1].get("feature_weights_sha") not in (None, weights_sha)):
        return None
    return rows[-1]


def other_weights_steps(run_dir, settings, weights_sha: str) -> list[int]:
    """Steps where the latest row of one of `settings` (setting keys) was scored with other feature weights than
    `weights_sha` (16 hex digits): rows the results table keeps, in another feature space."""
    latest = {(r.get("step"), r.get("setting")): r for r in read_jsonl(as_run(run_dir).evals)}
    return sorted({step for (step, setting), r in latest.items() if step is not None and setting in settings
                   and r.get("feature_weights_sha") not in (None, weights_sha)})


def eval_steps(steps: list[int], ckpt_every: int, every_ckpt: int, final_step: int) -> list[int]:
    """The checkpoint steps due for evaluation: every `every_ckpt`-th of the regular interval (steps that are
    multiples of ckpt_every x every_ckpt) and the final step. By step, not by position, so a preemption
    checkpoint between two regular ones neither shifts the schedule nor is evaluated itself."""
    period = ckpt_every * every_ckpt
    return [s for s in sorted(steps) if s % period == 0 or s == final_step]


def missing_evals(run_dir, eval_cfg: EvalConfig, ckpt_every: int, final_step: int) -> list[int]:
    """Checkpoint steps due for evaluation (eval_steps) without a row for this setting, and the final step
    without the row of its whole-stream draw (final_setting)."""

    rows = read_jsonl(as_run(run_dir).evals)
    keys = {setting_key(eval_cfg)}
    done = {r.get("step") for r in rows if r.get("setting") in keys}
    due = eval_steps(list_steps(run_dir), ckpt_every, eval_cfg.every_ckpt, final_step)
    final = final_setting(eval_cfg)
    if final is not None and final_step in due and final_step in done:
        key = setting_key(final)
        if not any(r.get("step") == final_step and r.get("setting") == key for r in rows):
            done.discard(final_step)
    return [s for s in due if s not in done]


def evaluate_checkpoint(run_dir, step: int, eval_cfg: Optional[EvalConfig] = None, device=None, *,
                        distributed: bool = False, progress: bool = True, final_step: Optional[int] = None,
                        weights_sha: Optional[str] = None) -> dict:
    """Sample the EMA model of checkpoint `step`, score it and append the row to evals.jsonl; returns the row.

    A row for (step, setting) that exists is returned as is (no duplicates). eval_cfg=None uses the run's own
    eval settings. distributed=True shares the sampling over the torch.distributed ranks (all must call this).
    With eval.final_num_samples, the final step (`final_step`, default the run's train.steps) draws the whole
    stream and writes two rows: its own setting's (final_setting) and this setting's from the first num_samples;
    the returned row is this setting's. weights_sha (16 hex digits): a row scored with other feature weights counts
    as missing and is scored again (`--rescore`); the new row, appended, is the one the results table keeps.
    """
    from scaling.features import build_extractor

    run = as_run(run_dir)
    eval_cfg = eval_cfg or run_eval_config(run)
    validate_eval(eval_cfg)
    final = final_setting(eval_cfg)
    if final is not None and final_step is None:
        final_step = run_config(run).train.steps
    wanted = [eval_cfg] + ([final] if final is not None and step == final_step else [])
    todo = [e for e in wanted if find_eval(run, step, setting_key(e), weights_sha) is None]
    if not todo:
        return find_eval(run, step, setting_key(eval_cfg), weights_sha)
    rank = _dist()[0] if distributed else 0
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, plan = load_model(run.path, step)
    vae = None if plan.get("pixel_space", True) else load_vae(cfg.data.vae, device)
    run.samples.mkdir(parents=True, exist_ok=True)
    draw = wanted[-1]                                # the largest draw due here: the others are its prefixes
    key = setting_key(draw)
    npz = run.samples / f"samples_step{step:07d}_{key}.npz"
    e = draw
    sample_to_npz(model.to(device), cfg.diffusion, plan, e.num_samples, sampler=e.sampler,
                  sampling_steps=e.sampling_steps, cfg_scale=e.cfg_scale, seed=e.seed, batch_size=e.batch_size,
                  out_path=npz, vae=vae, latent_scale=cfg.data.latent_scale, guide_channels=e.guide_channels,
                  device=device, distributed=distributed, progress=progress, stream=stream_samples(eval_cfg))
    sample_s = time.perf_counter() - t0
    if rank != 0:
        torch.distributed.barrier()  # rank 0 scores and appends the row
        return find_eval(run, step, setting_key(eval_cfg), weights_sha) or {}
    del model
    images = np.load(npz)["arr_0"]                                               # (N, H, W, 3) uint8
    save_grid(images[:64], run.samples / f"eval_step{step:07d}_{key}.png")
    pixel_cfg = pixel_data_config(cfg.data)
    space = build_extractor(e.backend, pixel_cfg, inception_weights=e.inception_weights, progress=progress)
    ref, data_sha = reference_set(pixel_cfg, e.num_ref)
    img_seen = torch.load(checkpoint_path(run, step), map_location="cpu", weights_only=True, mmap=True)["img_seen"]
    rows = {}
    for e in todo:
        raw = compute_metrics(UInt8Images(images[:e.num_samples]), ref, space,
                              reference_key=reference_key(pixel_cfg, space, len(ref), data_sha),
                              prc=e.precision_recall, kid=e.kid, cuda=device.type == "cuda", progress=progress)
        k = setting_key(e)
        row = {"step": step, "img_seen": int(img_seen), "metrics": named_metrics(raw, e.backend, e.num_samples),
               "metric_name": metric_name("fd", e.backend, e.num_samples), "fd": raw["fd"],
               **({"fid": raw["fd"]} if e.backend == "inception" else {}),  # FID only with the Inception weights
               "inception_score": raw["is"], "precision": raw["precision"], "recall": raw["recall"],
               "kid": raw["kid"], "kid_std": raw["kid_std"],
               "feature_extractor": e.backend, "feature_extractor_info": space.info,
               "feature_weights_sha": space.weights_sha[:16], "num_samples": e.num_samples, "num_ref": len(ref),
               "stream_samples": stream_samples(eval_cfg),
               "sampler": e.sampler, "sampling_steps": e.sampling_steps, "cfg_scale": float(e.cfg_scale),
               "guide_channels": e.guide_channels, "seed": e.seed, "dataset": pixel_cfg.name,
               "resolution": pixel_cfg.image_size, "sample_wall_s": sample_s,
               "wall_s": time.perf_counter() - t0,   # since the draw began (rows of one draw share its sampling)
               "npz": str(npz) if e.export_npz else None, "setting": k, "time": time.time()}
        if progress:
            print(f"[evaluate] step {step} {k}: " + " | ".join(f"{n} {v:.4g}" for n, v in row["metrics"].items()),
                  file=sys.stderr, flush=True)
        existing = find_eval(run, step, k, weights_sha)  # another process may have finished it meanwhile
        if existing is None:
            append_jsonl(run.evals, row)
        rows[k] = existing or row
    if not draw.export_npz:
        npz.unlink()
    if distributed and _dist()[1] > 1:
        torch.distributed.barrier()
    return rows.get(setting_key(eval_cfg)) or find_eval(run, step, setting_key(eval_cfg), weights_sha)


# ----------------------------------------------------------------------------- CLI


def score_npz(npz_path, data_cfg, backend: str, *, num_ref: int = DEFAULT_NUM_REF, inception_weights=None,
              precision_recall: bool = True, kid: bool = False, progress: bool = True) -> dict:
    """Score an ADM-layout .npz from any codebase against a dataset; returns the named metrics."""
    from scaling.features import build_extractor

    images = np.load(npz_path)["arr_0"]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1] != data_cfg.image_size:
        raise ValueError(f"{npz_path}: images are {images.shape[1]}px but --image-size is {data_cfg.image_size}")
    space = build_extractor(backend, data_cfg, inception_weights=inception_weights, progress=progress)
    ref, data_sha = reference_set(data_cfg, num_ref)
    raw = compute_metrics(UInt8Images(images), ref, space, reference_key=reference_key(data_cfg, space, len(ref),
                                                                                       data_sha),
                          prc=precision_recall, kid=kid, progress=progress)
    return {"metrics": named_metrics(raw, backend, len(images)), "feature_extractor": backend,
            "feature_extractor_info": space.info, "num_samples": len(images), "num_ref": len(ref),
            "dataset": data_cfg.name, "resolution": data_cfg.image_size, "npz": str(npz_path)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaling.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="run directory (evaluates every checkpoint lacking an eval)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--num-samples", type=int)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--sampling-steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-ref", type=int)
    p.add_argument("--inception-weights")
    p.add_argument("--device", default=None)
    p.add_argument("--rescore", action="store_true", help="score again the checkpoints whose rows were measured with "
                   "other feature weights than this machine's (e.g. a domain classifier trained before the package "
                   "shipped one): their FDs are in another space")
    p.add_argument("--npz", help="score this .npz (ADM layout) against --dataset instead of a run")
    p.add_argument("--dataset", choices=DATASETS, default="animal_mnist")
    p.add_argument("--data-path", default=None)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    flags = {k: getattr(args, k) for k in ("num_samples", "backend", "sampler", "sampling_steps", "cfg_scale", "seed",
                                          "batch_size", "num_ref", "inception_weights") if getattr(args, k) is not None}
    if args.npz:
        data_cfg = DataConfig(name=args.dataset, path=args.data_path, image_size=args.image_size)
        out = score_npz(args.npz, data_cfg, flags.get("backend", "domain"),
                        num_ref=flags.get("num_ref", DEFAULT_NUM_REF), inception_weights=args.inception_weights)
        print(json.dumps(out, indent=1))
        return 0
    if not args.run_dir:
        p.error("give a run directory or --npz")
    if not as_run(args.run_dir).config.is_file():
        print(f"error: {args.run_dir} is not a run directory (no config.yaml); allowed: <output_root>/runs/<run_id>",
              file=sys.stderr)
        return 2
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    run_cfg = run_config(args.run_dir)
    eval_cfg = replace(run_cfg.eval, **flags)
    validate_eval(eval_cfg)
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    steps = [args.step] if args.step is not None else missing_evals(args.run_dir, eval_cfg, run_cfg.train.ckpt_every,
                                                                     run_cfg.train.steps)
    weights_sha = None
    if args.rescore:
        from scaling.features import build_extractor

        space = build_extractor(eval_cfg.backend, pixel_data_config(run_cfg.data),
                                inception_weights=eval_cfg.inception_weights)
        weights_sha = space.weights_sha[:16]
        if args.step is None:
            final = final_setting(eval_cfg)
            settings = {setting_key(eval_cfg)} | ({setting_key(final)} if final is not None else set())
            steps = sorted(set(steps) | set(other_weights_steps(args.run_dir, settings, weights_sha)))
    if not steps:
        print(f"[evaluate] nothing to do: every checkpoint has an eval for {setting_key(eval_cfg)}")
    for step in steps:
        row = evaluate_checkpoint(args.run_dir, step, eval_cfg, device=device, distributed=distributed,
                                  weights_sha=weights_sha)
        if _dist()[0] == 0:
            print(json.dumps({k: row.get(k) for k in ("step", "setting", "metrics", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
