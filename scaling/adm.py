"""The ADM evaluator's reference batches: the standard reference of published ImageNet FID-50K, IS, precision/recall.

A reference batch of the ADM evaluator (Dhariwal & Nichol 2021, openai/guided-diffusion `evaluations/`), e.g.
`VIRTUAL_imagenet256_labeled.npz`, is one .npz holding

    arr_0   (10000, H, W, 3) uint8   reference images (precision/recall are computed against their features)
    mu      (2048,)                  Inception pool3 mean      } the statistics FID is computed against, stored
    sigma   (2048, 2048)             Inception pool3 covariance} with the batch (of more images than arr_0 holds)
    mu_s, sigma_s                    spatial statistics for sFID (read, not used: see below)

`score_against_adm(samples, reference, space)` computes, in one pass over the samples' features:
FD against the stored (mu, sigma), IS of the samples, and precision/recall (k = 3) against the features of arr_0.
Every metric that depends on the reference is named with the reference tag `adm` (`fid50k_inception_adm`,
`precision50k_inception_adm`), never as the metrics against the project's own reference statistics
(`fid50k_inception`, scaling.evaluate); IS depends on no reference and keeps its name (`is50k_inception`).

The stored statistics come from the TensorFlow Inception graph; torch-fidelity's `inception-v3-compat` is a port of
that graph with the same weights, resize and normalisation. torch-fidelity's README ("Numerical Precision"): "the
values produced by torch-fidelity match reference implementations up to floating point's machine precision".
The ADM evaluator feeds the TF graph itself, so the two paths differ in the backend's arithmetic and in how
the images are resized to 299 px; `fd_reference_images` measures the FD between arr_0, featurised
here, and the stored statistics: small but not zero, since arr_0 is a subset of the images behind (mu, sigma).
sFID needs the 7 first channels of the `mixed_6/conv` spatial activations, a layer torch-fidelity's port does
not expose: it is not computed.

    python -m scaling.adm check VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
    python -m scaling.adm score samples.npz VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REFERENCE_TAG = "adm"
REQUIRED_KEYS = ("arr_0", "mu", "sigma")


@dataclass
class AdmReference:
    """One ADM reference batch: images (N, H, W, 3) uint8, stored pool3 statistics, where it came from."""
    images: np.ndarray
    mu: np.ndarray             # (2048,) float64
    sigma: np.ndarray          # (2048, 2048) float64
    path: str
    sha256: str

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def describe(self) -> dict:
        """What every output records about the reference it was scored against."""
        return {"kind": "adm_reference_batch", "tag": REFERENCE_TAG, "path": self.path, "file": Path(self.path).name,
                "sha256": self.sha256[:16], "num_images": int(len(self.images)), "resolution": self.resolution,
                "statistics": "stored mu/sigma (FID); arr_0 features (precision/recall)"}


def read_adm_reference(path) -> AdmReference:
    """Read a reference batch, with one-line ValueErrors for a file that is not one."""
    from scaling.evaluate import npz_array
    from scaling.features import file_sha256

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"reference batch {str(path)!r} is not a file; download the ADM evaluator's batch (e.g. "
                         f"VIRTUAL_imagenet256_labeled.npz, openai/guided-diffusion evaluations/README.md) on a "
                         f"machine with internet and give its local path")
    with np.load(p) as f:
        missing = [k for k in REQUIRED_KEYS if k not in f.files]
        if missing:
            raise ValueError(f"reference batch {str(path)!r} lacks {', '.join(missing)} (has {', '.join(f.files)}); "
                             f"allowed: an ADM reference batch with {', '.join(REQUIRED_KEYS)}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    images = npz_array(p, "arr_0")  # (N, H, W, 3) uint8, memory-mapped
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"reference batch {str(path)!r}: arr_0 is {images.dtype} {images.shape}; allowed: uint8 "
                         f"(N, H, W, 3)")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"reference batch {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match; "
                         f"allowed: mu (d,), sigma (d, d)")
    return AdmReference(images, mu, sigma, str(p), file_sha256(p))


def extract_features(images: np.ndarray, space, *, cuda: bool, batch_size: int = 64,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{layer: (N, d) features} of uint8 images (N, H, W, 3) in `space` (the FD layer, and the IS layer if any)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    from scaling.evaluate import UInt8Images
    from scaling.features import register_extractors

    register_extractors()
    layers = [space.fd_layer] + ([space.is_layer] if space.is_layer else [])
    extractor = create_feature_extractor(space.extractor, layers, cuda=cuda, verbose=False,
                                         feature_extractor_weights_path=space.weights_path)
    return get_featuresdict_from_dataset(UInt8Images(images), extractor, batch_size, cuda, save_cpu_ram=True,
                                         verbose=progress)


def reference_features(ref: AdmReference, space, *, cuda: bool, progress: bool = True) -> torch.Tensor:
    """FD-layer features of arr_0, cached under cache_dir()/adm by (reference file, weights) hashes."""
    from scaling.features import cache_dir, cached_tensor

    path = cache_dir() / "adm" / f"{Path(ref.path).stem}-{ref.sha256[:12]}-{space.backend}-w{space.weights_sha[:12]}.pt"
    return cached_tensor(path, lambda: extract_features(ref.images, space, cuda=cuda, progress=progress)[space.fd_layer])


def reference_radii(ref: AdmReference, space, *, cuda: bool, progress: bool = True) -> torch.Tensor:
    """k-NN radii of the FD-layer features of arr_0 (precision/recall's balls), cached beside the features: at
    50,000 images a 50,000 x 50,000 distance matrix, a minute of CPU per evaluation when not cached."""
    from scaling.evaluate import PRC_NEIGHBOURHOOD, knn_radii
    from scaling.features import cache_dir, cached_tensor

    path = (cache_dir() / "adm" / f"{Path(ref.path).stem}-{ref.sha256[:12]}-{space.backend}-w{space.weights_sha[:12]}"
                                  f"-prc-radii-k{PRC_NEIGHBOURHOOD}.pt")
    return cached_tensor(path, lambda: knn_radii(reference_features(ref, space, cuda=cuda, progress=progress)))


def fd_to_statistics(features: torch.Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FD between features (N, d) and stored statistics, through torch-fidelity's statistics -> metric step
    (eigenvalues of S_1 S_2, so no imaginary part from a matrix square root can leak into the result)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = {k: v.astype(np.float64) for k, v in fid_features_to_statistics(features.double()).items()}
    return fid_statistics_to_metric(stats, {"mu": mu, "sigma": sigma}, verbose=False)["frechet_inception_distance"]


def adm_metric_name(kind: str, backend: str, num_samples: int) -> str:
    """fid50k_inception_adm, precision50k_inception_adm, ...; 'is' keeps the plain name (no reference in it)."""
    from scaling.evaluate import metric_name

    name = metric_name(kind, backend, num_samples)
    return name if kind == "is" else f"{name}_{REFERENCE_TAG}"


def score_against_adm(samples: np.ndarray, ref: AdmReference, space, *, precision_recall: bool = True,
                      cuda: bool | None = None, progress: bool = True) -> dict:
    """Named metrics of uint8 samples (N, H, W, 3) against an ADM reference batch, and what they were computed
    with: {"metrics": {fid50k_inception_adm, is50k_inception, precision.., recall..}, "reference": .., ...}."""
    from scaling.evaluate import PRC_NEIGHBOURHOOD, inception_score
    from scaling.evaluate import precision_recall as prc

    if samples.shape[1:3] != ref.images.shape[1:3]:
        raise ValueError(f"samples are {samples.shape[1]}x{samples.shape[2]} px but the reference batch "
                         f"{Path(ref.path).name} is {ref.resolution}x{ref.resolution}; allowed: sample at "
                         f"{ref.resolution} px or use the reference batch of {samples.shape[1]} px")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    n = len(samples)
    feats = extract_features(samples, space, cuda=cuda, progress=progress)
    metrics = {adm_metric_name("fd", space.backend, n): fd_to_statistics(feats[space.fd_layer], ref.mu, ref.sigma)}
    if space.is_layer:
        metrics[adm_metric_name("is", space.backend, n)] = inception_score(feats[space.is_layer], min(10, n))[0]
    if precision_recall and min(n, len(ref.images)) > PRC_NEIGHBOURHOOD:
        real = reference_features(ref, space, cuda=cuda, progress=progress)
        p, r = prc(feats[space.fd_layer], real, real_radii=reference_radii(ref, space, cuda=cuda, progress=progress))
        metrics[adm_metric_name("precision", space.backend, n)] = p
        metrics[adm_metric_name("recall", space.backend, n)] = r
    return {"metrics": metrics, "reference": ref.describe(), "feature_extractor": space.backend,
            "feature_extractor_info": space.info, "feature_weights_sha": space.weights_sha[:16], "num_samples": n,
            "sfid": "not computed (needs Inception mixed_6/conv spatial features, not exposed by torch-fidelity)"}


def fd_reference_images(ref: AdmReference, space, *, cuda: bool | None = None, progress: bool = True) -> float:
    """FD between the batch's own images (featurised here) and its stored statistics: the agreement of this
    featurisation with the one that made the statistics, plus the subset's sampling error."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return fd_to_statistics(reference_features(ref, space, cuda=cuda, progress=progress), ref.mu, ref.sigma)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    from scaling.evaluate import npz_array
    from scaling.features import BACKENDS, MissingWeights, build_extractor

    p = argparse.ArgumentParser(prog="python -m scaling.adm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="FD between a reference batch's images, featurised here, and its stored "
                                         "statistics")
    score = sub.add_parser("score", help="score an ADM-layout samples .npz (arr_0) against a reference batch")
    score.add_argument("samples", help="samples .npz, arr_0 (N, H, W, 3) uint8")
    for sp in (check, score):
        sp.add_argument("reference", help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
        sp.add_argument("--backend", choices=BACKENDS[:2], default="inception",
                        help="feature space (default inception: torch-fidelity's FID Inception, FID proper)")
        sp.add_argument("--inception-weights", help="local torch-fidelity Inception weights file "
                                                    "(weights-inception-2015-12-05-6726825d.pth)")
    args = p.parse_args(argv)
    try:
        ref = read_adm_reference(args.reference)
        space = build_extractor(args.backend, inception_weights=args.inception_weights)
        if args.cmd == "check":
            out = {"fd_reference_images_vs_stored_statistics": fd_reference_images(ref, space),
                   "reference": ref.describe(), "feature_extractor": space.backend,
                   "feature_weights_sha": space.weights_sha[:16]}
        else:
            out = score_against_adm(npz_array(args.samples), ref, space)
            out["npz"] = args.samples
    except (ValueError, MissingWeights, FileNotFoundError) as e:
        print(f"python -m scaling.adm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
