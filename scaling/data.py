"""Datasets the model trains on: two embedded sets, ImageNet-style folders and cached VAE latents.

    name          source                                                  x (what the model sees)
    animal_mnist  10,000 silhouettes 28x28, 10 classes, in the animal-mnist  (1, S, S) in [-1, 1]
                  package (MIT): the laptop default, no download
    digits        scikit-learn's 1,797 digits 8x8, 10 classes (CC BY 4.0)  (1, S, S) in [-1, 1]
    image_folder  root/<class>/<image>, ADM/DiT center crop to S           (3, S, S) in [-1, 1]
    latents       an image folder encoded once by the SD VAE (the paper's   (4, S/8, S/8) scaled latents
                  setting; `python -m scaling.encode`)

S = `DataConfig.image_size`. Every dataset yields `(x, y)`: x float32 `(C, H, W)`, y an int class label, and has
`num_classes`, `channels`, `input_size` (the spatial size the model sees), `name` and `class_names`.
Flips are not applied here: the training loop flips with a seeded generator so that a resumed run replays the
same augmentation (`random_flip` for pixel batches). Flipping a latent tensor is not the latent of the flipped
image, so the latent cache also stores the latents of flipped images and `LatentDataset.get(i, flip)` returns
them; the loop calls `dataset.get(i, flip)` where a dataset has it.
"""

import argparse
import codecs
import gzip
import importlib.resources
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

DATASETS = ("animal_mnist", "digits", "image_folder", "latents")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VAE_DOWNSAMPLE = 8  # the SD VAE has 4 encoder blocks, 3 of which halve the resolution

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

PROVENANCE = """\
animal_mnist: 10,000 animal silhouettes, 28x28 grey levels 0..255, 10 classes x 1,000 (bear, bird, cat, cow,
dog, elephant, giraffe, horse, sheep, zebra), shipped inside the PyPI package `animal-mnist` 0.4 (Sina Mohammadi,
MIT licence) as gzip'd numpy pickles animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz. The package
does not name the labels; the order above is its README's (alphabetical) and matches the images by eye. Read
with a restricted unpickler that only rebuilds numpy arrays.
digits: scikit-learn's load_digits, 1,797 handwritten digits, 8x8, 17 grey levels 0..16, 10 classes; a copy of
the test set of the UCI "Optical Recognition of Handwritten Digits" data (Alpaydin & Kaynak, 1998, CC BY 4.0)
shipped inside scikit-learn (BSD-3-Clause).
Both are resized once at load to image_size with antialiased bilinear interpolation and mapped to [-1, 1]."""


@dataclass
class DataConfig:
    name: str = "animal_mnist"          # animal_mnist | digits | image_folder | latents
    path: Optional[str] = None          # image_folder: root/<class>/<image>; latents: the encoded directory
    image_size: int = 32                # pixels after resize / center crop (latents: of the encoded images)
    flip: bool = True                   # random horizontal flips, applied by the training loop
    vae: str = "stabilityai/sd-vae-ft-ema"  # local diffusers directory or hub id (latents only)
    latent_scale: float = 0.18215       # SD VAE latent scaling factor (DiT train.py, LDM)
    max_images: Optional[int] = None    # use an evenly strided subset of this many images (quick runs)
    num_classes: Optional[int] = None   # expected classes (ImageNet: 1000): checked against the data when it is
                                        # there, and used to plan (dry run) on a machine without the data


# ----------------------------------------------------------------------------- validation and spec


def check_config(cfg: DataConfig) -> None:
    """Raise a one-line ValueError for a config that cannot give a dataset (cheap: reads no images)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r}; allowed: {', '.join(DATASETS)}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
        raise ValueError(f"data.image_size={cfg.image_size!r} must be a positive integer")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise ValueError(f"data.max_images={cfg.max_images} must be >= 1 or None")
    if cfg.latent_scale <= 0:
        raise ValueError(f"data.latent_scale={cfg.latent_scale} must be > 0")
    if cfg.name == "latents" and cfg.image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"data.image_size={cfg.image_size} must be divisible by {VAE_DOWNSAMPLE} for the VAE "
                         f"latents (e.g. 256 -> 32x32x4 latents)")
    if cfg.name in ("image_folder", "latents"):
        if not cfg.path:
            raise ValueError(f"data.path is required for data.name={cfg.name} "
                             f"({'root/<class>/<image>' if cfg.name == 'image_folder' else 'encoded latents'})")
        if not Path(cfg.path).exists():
            raise ValueError(f"data.path={cfg.path!r} does not exist")


def describe(cfg: DataConfig, require_data: bool = True) -> dict:
    """What the model sees, without loading the data: in_channels, input_size, num_classes, pixel_space.

    With `require_data=False` (planning on a machine that does not hold the data, e.g. the paper grid's dry run
    on a laptop) a folder or latent directory that is not there is described from the config alone, with
    `nominal: True`; `data.num_classes` must then be set.
    """
    if not require_data and cfg.name in ("image_folder", "latents") and not (cfg.path and Path(cfg.path).exists()):
        if cfg.name == "latents" and cfg.image_size % VAE_DOWNSAMPLE:
            raise ValueError(f"data.image_size={cfg.image_size} must be a multiple of {VAE_DOWNSAMPLE} for the VAE "
                             f"latents (e.g. 256 -> 32x32x4 latents)")
        if cfg.num_classes is None:
            raise ValueError(f"data.num_classes must be set to plan data.name={cfg.name} without its data.path")
        latent = cfg.name == "latents"
        return {"in_channels": 4 if latent else 3, "input_size": cfg.image_size // (VAE_DOWNSAMPLE if latent else 1),
                "num_classes": cfg.num_classes, "pixel_space": not latent, "nominal": True}
    check_config(cfg)
    if cfg.name in ("animal_mnist", "digits"):
        spec = {"in_channels": 1, "input_size": cfg.image_size, "num_classes": 10, "pixel_space": True}
    elif cfg.name == "image_folder":
        classes = class_folders(cfg.path)
        _first_image_file(cfg.path, classes)  # raises when no class folder holds an image
        spec = {"in_channels": 3, "input_size": cfg.image_size, "num_classes": len(classes), "pixel_space": True}
    else:
        meta = read_latent_meta(cfg)
        spec = {"in_channels": meta["channels"], "input_size": meta["latent_size"],
                "num_classes": len(meta["class_names"]), "pixel_space": False}
    if cfg.num_classes is not None and cfg.num_classes != spec["num_classes"]:
        raise ValueError(f"data.num_classes={cfg.num_classes} but {cfg.path or cfg.name} has {spec['num_classes']} "
                         f"classes")
    return spec


def build_dataset(cfg: DataConfig) -> Dataset:
    """The training set named by `cfg` (see the module docstring); fails fast on a broken folder."""
    check_config(cfg)
    if cfg.name == "animal_mnist":
        return load_animal_mnist(cfg.image_size, cfg.max_images)
    if cfg.name == "digits":
        return load_digits(cfg.image_size, cfg.max_images)
    if cfg.name == "image_folder":
        folder = ImageFolder(cfg.path, cfg.image_size, cfg.max_images)
        folder.check_readable()
        return folder
    return LatentDataset(cfg)


def strided_subset(n: int, max_images: Optional[int]) -> np.ndarray:
    """Indices of an evenly strided subset: keeps the class balance of data stored sorted by class."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    return np.arange(max_images) * n // max_images


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of x (N, C, H, W) horizontally with probability 0.5, drawn from `generator`."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5  # (N,)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- embedded datasets


class InMemoryImages(Dataset):
    """A small image set held as one tensor: x (N, C, S, S) float32 in [-1, 1], y (N,) int64."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str, class_names: tuple):
        self.x, self.y = x, y
        self.name, self.class_names = name, tuple(class_names)
        self.num_classes = len(self.class_names)
        self.channels, self.input_size = x.shape[1], x.shape[-1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _to_model_range(images: np.ndarray, max_value: float, image_size: int) -> torch.Tensor:
    """(N, H, W) grey levels in [0, max_value] -> (N, 1, S, S) float32 in [-1, 1], antialiased bilinear."""
    x = torch.from_numpy(images.astype(np.float32) / max_value * 2 - 1)[:, None]  # (N, 1, H, W)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(-1, 1).contiguous()


def load_animal_mnist(image_size: int = 32, max_images: Optional[int] = None) -> InMemoryImages:
    """The embedded default; provenance in PROVENANCE."""
    try:
        root = importlib.resources.files("animal_mnist").joinpath("data", "Animal_MNIST")
    except ModuleNotFoundError:
        raise ValueError("data.name=animal_mnist needs the animal-mnist package: pip install --no-deps animal-mnist "
                         "(the data files only; its tensorflow requirement is never used)") from None
    with root.joinpath("animal_data_version_3.gz").open("rb") as f:
        images = restricted_load(gzip.GzipFile(fileobj=f), "animal_data_version_3.gz")  # (10000, 28, 28) uint8
    with root.joinpath("animal_label_version_3.gz").open("rb") as f:
        labels = restricted_load(gzip.GzipFile(fileobj=f), "animal_label_version_3.gz")  # (10000,) int64
    keep = strided_subset(len(labels), max_images)
    x = _to_model_range(images[keep], 255.0, image_size)
    return InMemoryImages(x, torch.from_numpy(labels[keep].astype(np.int64)), "animal_mnist", ANIMAL_CLASSES)


def load_digits(image_size: int = 16, max_images: Optional[int] = None) -> InMemoryImages:
    """scikit-learn's digits (no download: the file ships with scikit-learn); provenance in PROVENANCE."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    keep = strided_subset(len(bunch.target), max_images)
    x = _to_model_range(bunch.images[keep], 16.0, image_size)  # 17 grey levels 0..16
    return InMemoryImages(x, torch.from_numpy(bunch.target[keep].astype(np.int64)), "digits",
                          tuple(str(d) for d in range(10)))


def _numpy_globals() -> dict:
    """The numpy functions that rebuild an ndarray, under the module names numpy 1.x and 2.x pickle them."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.multiarray import _reconstruct, scalar  # numpy 1.x
        from numpy.core.numeric import _frombuffer
    found = {}
    for core in ("numpy.core", "numpy._core"):
        found[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        found[(f"{core}.multiarray", "scalar")] = scalar
        found[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # pickle protocol 5
    return found


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only: any global other than those that rebuild an ndarray is refused, so a
    tampered data file cannot run code (a plain pickle.load would call whatever the file names)."""

    def find_class(self, module: str, name: str):
        allowed = {**_numpy_globals(),
                   ("numpy", "ndarray"): np.ndarray,
                   ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}  # protocol <= 2 pickles spell bytes this way
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a data pickle; allowed: "
                                         f"{', '.join(f'{m}.{n}' for m, n in allowed)}")
        return allowed[(module, name)]


def restricted_load(fileobj, source: str = "pickle") -> np.ndarray:
    """One numpy array (no object dtype) from a pickle stream, through RestrictedUnpickler."""
    arr = RestrictedUnpickler(fileobj).load()
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise pickle.UnpicklingError(f"{source}: expected a numeric numpy array, got {type(arr).__name__}")
    return arr


# ----------------------------------------------------------------------------- image folders


def class_folders(root) -> list[str]:
    """Sorted names of the class folders of an ImageNet-style root (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data.path={str(root)!r} is not a directory (expected root/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data.path={str(root)!r} has no class folders (expected root/<class>/<image>)")
    return classes


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under one class folder, recursively, in sorted order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if _is_image(f)]
    return files


def _first_image_file(root, classes: list[str]) -> Path:
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(Path(root) / c, followlinks=True):
            for f in filenames:
                if _is_image(f):
                    return Path(dirpath) / f
    raise ValueError(f"data.path={str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                     f"{len(classes)} class folders")


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's center crop, as DiT uses it: halve with a BOX filter while the short side is >= 2 x image_size,
    resize with BICUBIC so the short side is image_size, then crop the center. PIL image -> (S, S, C) uint8."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H, W, C)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def load_image(path, image_size: int) -> torch.Tensor:
    """One file -> (3, S, S) float32 in [-1, 1]; raises for an unreadable file."""
    from PIL import Image

    with Image.open(path) as im:
        arr = center_crop_arr(im.convert("RGB"), image_size)  # (S, S, 3) uint8
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """root/<class>/<image>; labels are indices into the sorted class folder names.

    An unreadable image is replaced by the next readable one (its label comes with it), logged once with its
    path and counted in `num_corrupt`, so one bad file in 1.28M never stops a run. With DataLoader workers
    each worker keeps its own count.
    """

    def __init__(self, root, image_size: int, max_images: Optional[int] = None):
        self.root, self.input_size, self.name, self.channels = Path(root), image_size, "image_folder", 3
        self.class_names = tuple(class_folders(root))
        self.num_classes = len(self.class_names)
        files, labels = [], []
        for label, c in enumerate(tqdm(self.class_names, desc="scan classes", unit="class", leave=False,
                                       disable=self.num_classes < 100)):
            found = _image_files(self.root / c)
            if not found:
                raise ValueError(f"data.path={str(root)!r}: class folder {c!r} holds no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            files += found
            labels += [label] * len(found)
        keep = strided_subset(len(files), max_images)
        self.files = [files[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.corrupt: set[int] = set()

    @property
    def num_corrupt(self) -> int:
        return len(self.corrupt)

    def __len__(self) -> int:
        return len(self.files)

    def check_readable(self, first: int = 8) -> None:
        """Open the first few images: a folder of unreadable files fails here, before training starts."""
        errors = []
        for path in self.files[:first]:
            try:
                load_image(path, self.input_size)
                return
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for broken files
                errors.append(f"{path}: {type(e).__name__}: {e}")
        raise ValueError(f"data.path={str(self.root)!r}: none of the first {len(errors)} images can be read "
                         f"(first error: {errors[0]})")

    def item(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(x, y, j): the image at i, or at the next readable index j when i is unreadable."""
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            if j in self.corrupt:
                continue
            try:
                return load_image(self.files[j], self.input_size), self.labels[j], j
            except Exception as e:  # any decode failure: skip the file, never crash the run
                self.corrupt.add(j)
                log.warning("skipping unreadable image %s (%s: %s); %d skipped so far", self.files[j],
                            type(e).__name__, e, len(self.corrupt))
        raise ValueError(f"data.path={str(self.root)!r}: no readable image among {n} files")

    def __getitem__(self, i: int):
        x, y, _ = self.item(i)
        return x, y


# ----------------------------------------------------------------------------- VAE latents


def load_vae(name_or_path: str, device="cpu"):
    """A diffusers AutoencoderKL from a local directory, or a hub id when the hub (or its cache) is reachable."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("the latent path needs diffusers: pip install 'dit-scaling[latents]'") from e
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.vae={name_or_path!r} cannot be loaded ({first[:200]}); give a local directory "
                         f"with a diffusers AutoencoderKL (config.json + weights, e.g. from `huggingface-cli "
                         f"download stabilityai/sd-vae-ft-ema --local-dir DIR` on a machine with internet) or a "
                         f"hub id with network access") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float = 0.18215) -> torch.Tensor:
    """Scaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w) float32 in [-1, 1] (LDM: x = D(z / scale))."""
    dtype = next(vae.parameters()).dtype
    return vae.decode(z.to(dtype) / scale).sample.float().clamp(-1, 1)


def read_latent_meta(cfg: DataConfig) -> dict:
    """meta.json of an encoded directory, checked against cfg (image size, scale)."""
    meta_path = Path(cfg.path) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"data.path={cfg.path!r} holds no encoded latents (meta.json); encode an image folder "
                         f"first: python -m scaling.encode --path ROOT --out {cfg.path}")
    meta = json.loads(meta_path.read_text())
    if meta["image_size"] != cfg.image_size:
        raise ValueError(f"data.image_size={cfg.image_size} but the latents in {cfg.path!r} were encoded at "
                         f"image_size {meta['image_size']}; allowed: {meta['image_size']}")
    if not np.isclose(meta["latent_scale"], cfg.latent_scale):
        raise ValueError(f"data.latent_scale={cfg.latent_scale} but the latents in {cfg.path!r} were scaled by "
                         f"{meta['latent_scale']}; allowed: {meta['latent_scale']}")
    return meta


class LatentDataset(Dataset):
    """Cached latents (written by `scaling.encode.encode_latents`), read through a memory map.

    `dataset[i]` is the latent of image i; `dataset.get(i, flip=True)` the latent of its horizontal flip.
    """

    def __init__(self, cfg: DataConfig):
        self.root, self.name = Path(cfg.path), "latents"
        self.meta = read_latent_meta(cfg)
        self.class_names = tuple(self.meta["class_names"])
        self.num_classes, self.channels = len(self.class_names), self.meta["channels"]
        self.input_size, self.image_size = self.meta["latent_size"], self.meta["image_size"]
        self.scale, self.vae = self.meta["latent_scale"], self.meta["vae"]
        self.index = strided_subset(self.meta["count"], cfg.max_images)
        self.labels = np.load(self.root / "labels.npy")[self.index]  # (N,) int64
        self._arrays = None  # (latents, flipped latents) memmaps, opened lazily in each process

    def __getstate__(self):  # DataLoader workers reopen the memmaps instead of copying them
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int, flip: bool = False):
        if self._arrays is None:
            self._arrays = tuple(np.load(self.root / f, mmap_mode="r")
                                 for f in ("latents.npy", "latents_flipped.npy"))
        z = self._arrays[int(bool(flip))][self.index[i]]  # (4, h, w) float16
        return torch.from_numpy(z.astype(np.float32)), int(self.labels[i])

    def __getitem__(self, i: int):
        return self.get(i, False)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m scaling.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("describe", help="print what the model sees for a dataset, and where it comes from")
    info.add_argument("--name", default="animal_mnist", choices=DATASETS)
    info.add_argument("--path", default=None)
    info.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    print(json.dumps(describe(DataConfig(name=args.name, path=args.path, image_size=args.image_size))))
    if args.name in ("animal_mnist", "digits"):
        print(PROVENANCE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
