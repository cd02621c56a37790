"""Encode an image folder into SD VAE latents as a cluster job: shards, each resumable, merged into one directory.

    python -m scaling.encode --path ROOT --out OUT --image-size 256          one process: every shard in turn
    sbatch --array=0-63 --gpus-per-task=1 --wrap "python -m scaling.encode --path ROOT --out OUT \\
        --num-shards 64"                                          SLURM array: task k encodes shard k
    torchrun --nproc_per_node=8 -m scaling.encode --path ROOT --out OUT --num-shards 64   rank r: r, r + 8, ...

The images are cut into batches of `batch_size` on one global grid (batch j = images jB .. jB + B - 1) and the
batches into `num_shards` contiguous shards, so every image is encoded in the same batch whatever the number of
shards or processes: a sharded encode gives the same bytes as a one-process one. While running, OUT.parts/
(beside OUT) holds

    spec.json                       settings, image count, shards: a rerun with other settings is refused
    shard_00003-of-00064/           latents.npy, latents_flipped.npy, labels.npy (this shard's rows, memory maps),
                                    progress.json (batches done, written after each batch is flushed to disk)
    shard_00003-of-00064/done.json  the shard is complete and is never encoded again

A killed shard resumes at its first unfinished batch. The process that finds every shard done merges them, in
order, into the layout scaling.data.LatentDataset reads (latents.npy, latents_flipped.npy (N, 4, S/8, S/8)
float16, labels.npy, meta.json), written as a temporary directory then renamed to OUT, and removes OUT.parts;
merge.lock keeps a second process from merging at the same time (after a merge was killed: --merge).

Precision: `auto` is bf16 autocast on GPUs, fp32 on CPUs (the one used is recorded in meta.json). Measured on the
CPU with randomly initialised weights of the SD VAE's configuration (4 images, 256 px): bf16 autocast moves the
latents by 1.5% of their RMS (RMS of the difference), 7% at the worst element; on the 32-channel test VAE at
16 px by 9% (tests/test_encode.py asserts < 15%). Random weights say little about the trained sd-vae-ft-ema,
whose bf16 tolerance on a GPU is not measured yet: use --precision fp32 where latents must match an fp32 encoding.
"""

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scaling.data import VAE_DOWNSAMPLE, DataConfig, ImageFolder, check_config, load_vae
from scaling.rundir import read_json, write_json

PRECISIONS = ("auto", "fp32", "bf16")
SETTINGS = ("image_size", "latent_scale", "vae", "source", "max_images")  # an existing encoding must match these


@dataclass
class EncodeConfig:
    path: str                       # image folder root/<class>/<image>
    out: str                        # output directory (data.path of data.name=latents)
    image_size: int = 256
    vae: str = DataConfig.vae
    latent_scale: float = DataConfig.latent_scale
    max_images: Optional[int] = None
    batch_size: int = 64            # images per VAE forward; part of the batch grid (keep it to resume)
    num_shards: int = 1
    shard: Optional[int] = None     # None: from SLURM_ARRAY_TASK_ID, else torchrun's RANK, else every shard
    num_workers: int = 4
    device: str = "auto"
    precision: str = "auto"         # auto (bf16 on GPUs) | fp32 | bf16
    merge: bool = False             # merge even if merge.lock exists (a killed merge)


def shard_batches(num_images: int, batch_size: int, num_shards: int, shard: int) -> range:
    """Batches (of the global grid) in `shard`: contiguous, every batch in exactly one shard."""
    num_batches = -(-num_images // batch_size)
    return range(shard * num_batches // num_shards, (shard + 1) * num_batches // num_shards)


def my_shards(cfg: EncodeConfig) -> list[int]:
    """The shards this process encodes: --shard, SLURM_ARRAY_TASK_ID, torchrun's RANK (every WORLD_SIZE-th), or all."""
    if cfg.shard is not None:
        return [cfg.shard]
    if "SLURM_ARRAY_TASK_ID" in os.environ and cfg.num_shards > 1:
        return [int(os.environ["SLURM_ARRAY_TASK_ID"])]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return list(range(int(os.environ.get("RANK", "0")), cfg.num_shards, world))


def parts_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def shard_dir(out, shard: int, num_shards: int) -> Path:
    return parts_dir(out) / f"shard_{shard:05d}-of-{num_shards:05d}"


def resolve(cfg: EncodeConfig) -> tuple[torch.device, Optional[torch.dtype]]:
    """(device, autocast dtype or None)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision={cfg.precision!r}; allowed: {', '.join(PRECISIONS)}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if bf16 else None


def latent_bytes(num_images: int, channels: int, image_size: int) -> int:
    """Bytes of an encoding: two float16 latents (image and flip) and an int64 label per image."""
    side = image_size // VAE_DOWNSAMPLE
    return num_images * (2 * channels * side * side * 2 + 8)


def check_encode(cfg: EncodeConfig, folder: ImageFolder, channels: int, precision: str) -> dict:
    """Up-front checks (one-line ValueErrors): shard numbers, and free disk for the shards plus the merged copy.
    Returns the spec of this encode."""
    if cfg.num_shards < 1 or cfg.batch_size < 1:
        raise ValueError(f"--num-shards={cfg.num_shards}, --batch-size={cfg.batch_size}; allowed: integers >= 1")
    bad = [s for s in my_shards(cfg) if not 0 <= s < cfg.num_shards]
    if bad:
        raise ValueError(f"shard {bad[0]} of --num-shards={cfg.num_shards}; allowed: 0..{cfg.num_shards - 1}")
    n = len(folder)
    need = 2 * latent_bytes(n, channels, cfg.image_size)  # the shards, and the merged copy while merging
    parts = parts_dir(cfg.out)
    have = sum(f.stat().st_size for f in parts.rglob("*.npy")) if parts.is_dir() else 0
    probe = Path(cfg.out).resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need - have > free:
        raise ValueError(f"--out={cfg.out!r} needs {need / 1e9:.1f} GB free for {n:,} images ({need / 2e9:.1f} GB of "
                         f"latents, and as much again while the shards are merged); {free / 1e9:.1f} GB free on "
                         f"{probe}")
    return {"image_size": cfg.image_size, "latent_scale": cfg.latent_scale, "vae": cfg.vae,
            "source": str(Path(cfg.path).resolve()), "max_images": cfg.max_images, "count": n, "channels": channels,
            "batch_size": cfg.batch_size, "num_shards": cfg.num_shards, "precision": precision}


class _Indexed(Dataset):
    """(image, label, index used, index asked) for the indices `order` of a folder (unreadable files replaced)."""

    def __init__(self, folder: ImageFolder, order: range):
        self.folder, self.order = folder, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        x, y, j = self.folder.item(self.order[k])
        return x, y, j, self.order[k]


@torch.no_grad()
def encode_shard(cfg: EncodeConfig, folder: ImageFolder, vae, spec: dict, shard: int, device, dtype) -> Path:
    """Encode one shard into its directory, resuming at its first unfinished batch; done.json when complete."""
    d = shard_dir(cfg.out, shard, cfg.num_shards)
    if (d / "done.json").is_file():
        return d
    batches = shard_batches(len(folder), cfg.batch_size, cfg.num_shards, shard)
    lo, hi = batches.start * cfg.batch_size, min(batches.stop * cfg.batch_size, len(folder))
    side, c = cfg.image_size // VAE_DOWNSAMPLE, spec["channels"]
    d.mkdir(parents=True, exist_ok=True)
    done = read_json(d / "progress.json", {"batches_done": 0, "corrupt": []})
    mode = "r+" if done["batches_done"] else "w+"
    z, z_flip = (np.lib.format.open_memmap(d / f, mode=mode, dtype=np.float16, shape=(hi - lo, c, side, side))
                 for f in ("latents.npy", "latents_flipped.npy"))
    labels = np.lib.format.open_memmap(d / "labels.npy", mode=mode, dtype=np.int64, shape=(hi - lo,))
    start = lo + done["batches_done"] * cfg.batch_size
    loader = DataLoader(_Indexed(folder, range(start, hi)), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        shuffle=False)
    bar = tqdm(total=hi - lo, initial=start - lo, unit="img", desc=f"encode shard {shard}/{cfg.num_shards}")
    for x, y, used, asked in loader:
        x = x.to(device)                                                        # (B, 3, S, S)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            mean = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean     # (2B, 4, S/8, S/8)
        mean = (mean.float() * cfg.latent_scale).cpu().numpy().astype(np.float16)
        if mean.shape[1:] != z.shape[1:]:
            raise ValueError(f"--vae={cfg.vae!r} gives latents {tuple(mean.shape[1:])} at image_size "
                             f"{cfg.image_size}; expected {z.shape[1:]} (a VAE that downsamples by 8)")
        b, i = x.shape[0], int(asked[0]) - lo
        z[i:i + b], z_flip[i:i + b], labels[i:i + b] = mean[:b], mean[b:], y.numpy()
        z.flush(), z_flip.flush(), labels.flush()
        done["batches_done"] += 1
        done["corrupt"] += [str(folder.files[int(a)]) for a, u in zip(asked, used) if int(a) != int(u)]
        write_json(d / "progress.json", done)  # after the rows are on disk: a kill loses at most this batch
        bar.update(b)  # img/s and ETA of this shard
    bar.close()
    write_json(d / "done.json", {"images": hi - lo, "first": lo, "corrupt": done["corrupt"]})
    return d


def merge_shards(cfg: EncodeConfig, spec: dict, class_names) -> Optional[Path]:
    """Concatenate the finished shards into OUT (atomically) and remove OUT.parts; None when shards are missing
    or another process holds merge.lock."""
    dirs = [shard_dir(cfg.out, k, cfg.num_shards) for k in range(cfg.num_shards)]
    if not all((d / "done.json").is_file() for d in dirs):
        return None
    lock = parts_dir(cfg.out) / "merge.lock"
    if cfg.merge:
        lock.unlink(missing_ok=True)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"[encode] {lock} exists: another process is merging (after a killed merge: --merge)", file=sys.stderr)
        return None
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n, c, side = spec["count"], spec["channels"], cfg.image_size // VAE_DOWNSAMPLE
    for name, dtype, shape in (("latents.npy", np.float16, (n, c, side, side)),
                               ("latents_flipped.npy", np.float16, (n, c, side, side)), ("labels.npy", np.int64, (n,))):
        merged = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
        row = 0
        for d in tqdm(dirs, desc=f"merge {name}", unit="shard", disable=len(dirs) < 8):
            part = np.load(d / name, mmap_mode="r")
            merged[row:row + len(part)] = part
            row += len(part)
        merged.flush()
        del merged
    corrupt = [f for d in dirs for f in read_json(d / "done.json")["corrupt"]]
    meta = {"image_size": cfg.image_size, "latent_size": side, "channels": c, "count": n,
            "latent_scale": cfg.latent_scale, "vae": cfg.vae, "posterior": "mean", "dtype": "float16",
            "files": {"latents": "latents.npy", "flipped": "latents_flipped.npy", "labels": "labels.npy"},
            "class_names": list(class_names), "source": spec["source"], "max_images": cfg.max_images,
            "num_corrupt": len(corrupt), "corrupt_files": corrupt[:1000], "precision": spec["precision"],
            "batch_size": cfg.batch_size, "num_shards": cfg.num_shards}
    write_json(tmp / "meta.json", meta)
    if out.exists():
        out.rmdir()  # empty (checked before encoding)
    os.replace(tmp, out)
    shutil.rmtree(parts_dir(out))
    return out


def encode_latents(cfg: EncodeConfig) -> Optional[Path]:
    """Encode this process's shards of cfg.path into cfg.out, and merge when every shard is done. Returns OUT
    once it is complete (an existing encoding with the same settings is returned as is), None while shards of
    other processes are still missing."""
    check_config(DataConfig(name="latents", path=cfg.path, image_size=cfg.image_size, latent_scale=cfg.latent_scale,
                            max_images=cfg.max_images))
    out = Path(cfg.out)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        same = {"image_size": cfg.image_size, "latent_scale": cfg.latent_scale, "vae": cfg.vae,
                "source": str(Path(cfg.path).resolve()), "max_images": cfg.max_images}
        if all(meta.get(k) == v for k, v in same.items()):
            return out
        raise ValueError(f"--out={str(out)!r} holds latents of other settings ({ {k: meta.get(k) for k in same} }); "
                         f"remove it or choose another directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={str(out)!r} exists and is not an encoding (no meta.json); remove it or choose "
                         f"another directory")
    folder = ImageFolder(cfg.path, cfg.image_size, cfg.max_images)  # raises when no class folder holds images
    folder.check_readable()
    device, dtype = resolve(cfg)
    vae = load_vae(cfg.vae, device)
    spec = check_encode(cfg, folder, vae.config.latent_channels, "bf16" if dtype else "fp32")
    spec_file = parts_dir(out) / "spec.json"
    old = read_json(spec_file)
    if old is not None and old != spec:
        diff = {k: old.get(k) for k in spec if old.get(k) != spec[k]}
        raise ValueError(f"{parts_dir(out)} holds an unfinished encode with {diff}; allowed: the same settings "
                         f"(to resume it), or remove {parts_dir(out)}")
    write_json(spec_file, spec)  # spec["precision"] is the resolved one: fp32 or bf16
    t0 = time.perf_counter()
    for shard in my_shards(cfg):
        encode_shard(cfg, folder, vae, spec, shard, device, dtype)
    print(f"[encode] shards {my_shards(cfg)} of {cfg.num_shards} done in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return merge_shards(cfg, spec, folder.class_names)


def build_parser(prog: str = "python -m scaling.encode") -> argparse.ArgumentParser:
    d = EncodeConfig(path="", out="")
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="image folder root/<class>/<image>")
    p.add_argument("--out", required=True, help="output directory (data.path for data.name=latents)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="pixels, a multiple of 8 (default 256)")
    p.add_argument("--vae", default=d.vae, help="local diffusers AutoencoderKL directory or hub id")
    p.add_argument("--latent-scale", type=float, default=d.latent_scale, help="latent scaling (default 0.18215)")
    p.add_argument("--max-images", type=int, default=None, help="an evenly strided subset of this many images")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per VAE forward (keep it to resume)")
    p.add_argument("--num-shards", type=int, default=d.num_shards, help="shards the images are cut into (default 1)")
    p.add_argument("--shard", type=int, default=None, help="encode this shard only (default: SLURM_ARRAY_TASK_ID, "
                                                           "torchrun's RANK, or every shard)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers decoding images")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="auto: bf16 autocast on GPUs")
    p.add_argument("--merge", action="store_true", help="merge even if merge.lock exists (after a killed merge)")
    return p


def main(argv=None, prog: str = "python -m scaling.encode") -> int:
    cfg = EncodeConfig(**vars(build_parser(prog).parse_args(argv)))
    try:
        out = encode_latents(cfg)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if out is None:
        print(f"[encode] waiting for other shards; the last one to finish merges into {cfg.out}")
        return 0
    print(json.dumps({k: v for k, v in json.loads((out / "meta.json").read_text()).items()
                      if k not in ("class_names", "corrupt_files")}, indent=1))
    print(f"train on it with: data=imagenet_latents data.path={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
