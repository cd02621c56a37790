"""Feature backends: the offline Inception reproduces the TorchScript pool3, the domain classifier ships for the
laptop data (else trains and is cached) and orders distributions as FD should, missing weights fail with one
actionable line, cache keys follow the data."""

import json
import os
import warnings
from dataclasses import replace

import pytest
import torch
from torch_fidelity.utils import create_feature_extractor

from scaling import features
from scaling.data import DataConfig, build_dataset, load_animal_mnist
from scaling.evaluate import UInt8Images, compute_metrics, frechet_distance, reference_key
from scaling.features import (INCEPTION_FILE, DomainExtractor, InceptionOfflineExtractor, MissingWeights,
                              _atomic_save, build_extractor, dataset_fingerprint, domain_code_version, domain_data_sha,
                              fid_helper_torchscript, file_sha256, from_uint8, main, offline_inception_weights,
                              shipped_domain_path, to_uint8, train_domain)

SIZE = 16  # the domain classifier of the tests: animal_mnist at 16 px, the laptop study's (shipped)


@pytest.fixture(scope="module")
def domain():
    return build_extractor("domain", DataConfig(image_size=SIZE), progress=False)


@pytest.fixture(scope="module")
def animals():
    return load_animal_mnist(SIZE)


def as_npz_images(x: torch.Tensor) -> UInt8Images:
    return UInt8Images(to_uint8(x).permute(0, 2, 3, 1).numpy())  # (N, H, W, 3) uint8, as in an ADM .npz


def test_uint8_conversion():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(u[:, 0], u[:, 2])
    back = from_uint8(to_uint8(torch.linspace(-1, 1, 64).view(1, 1, 8, 8)), 1)
    assert back.shape == (1, 1, 8, 8) and (back - torch.linspace(-1, 1, 64).view(1, 1, 8, 8)).abs().max() <= 1 / 127.5


def test_inception_offline_matches_torchscript_pool3():
    space = build_extractor("inception_offline")
    assert space.is_layer is None and space.fd_layer == "2048"
    fe = create_feature_extractor(space.extractor, ["2048"], cuda=False,
                                  feature_extractor_weights_path=space.weights_path, verbose=False)
    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours = fe(images)[0]                                                   # torch-fidelity's path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
            ts = torch.jit.load(str(fid_helper_torchscript()), map_location="cpu")
        theirs = ts(images.float() / 128 - 1)                                  # its input range (-1, 0.992)
    assert ours.shape == theirs.shape == (3, 2048)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().mean() > 0.05  # real activations, not zeros


def test_inception_offline_has_no_classifier_head():
    with pytest.raises(ValueError, match="not on the list"):
        InceptionOfflineExtractor(InceptionOfflineExtractor.NAME, ["logits_unbiased"])
    with pytest.raises(ValueError, match="no Inception Score"):
        InceptionOfflineExtractor.get_default_feature_layer_for_metric("isc")


def test_missing_inception_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    with pytest.raises(MissingWeights) as e:
        build_extractor("inception", inception_weights=str(tmp_path / "nope.pth"))
    msg = str(e.value)
    assert "\n" not in msg and INCEPTION_FILE in msg and "eval.inception_weights=" in msg and "nope.pth" in msg

    def offline(url, dst, progress=True):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeights) as e:
        build_extractor("inception")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be downloaded" in msg and INCEPTION_FILE in msg
    assert "eval.backend=inception_offline" in msg


def test_inception_backend_loads_a_local_weights_file(tmp_path):
    # A state dict in torch-fidelity's layout (the offline weights plus a head) stands in for the real file.
    own = InceptionOfflineExtractor(InceptionOfflineExtractor.NAME, ["2048"],
                                    feature_extractor_weights_path=offline_inception_weights()).state_dict()
    own = {k: v for k, v in own.items()}
    own["fc.weight"], own["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / INCEPTION_FILE
    torch.save(own, path)
    space = build_extractor("inception", inception_weights=str(path))
    assert (space.extractor, space.fd_layer, space.is_layer) == ("inception-v3-compat", "2048", "logits_unbiased")
    fe = create_feature_extractor(space.extractor, ["2048", "logits_unbiased"], cuda=False,
                                  feature_extractor_weights_path=space.weights_path, verbose=False)
    assert fe.fc.weight.shape == (1008, 2048)


def test_the_laptop_domain_classifier_is_the_shipped_one_and_current(domain, cache_dir):
    # One FD feature space on every machine: the shipped weights, used as they are (nothing trained or cached),
    # and trained by today's code on today's data (else train_domain would silently train another space: a
    # change to DomainNet, fit_domain or DOMAIN_TRAIN must retrain them with `train-domain --ship`).
    assert domain.backend == "domain" and domain.is_layer == "logits" and domain.fd_layer == "features"
    path = shipped_domain_path(DataConfig(image_size=SIZE), 0)
    assert domain.weights_path == str(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["code_version"] == domain_code_version()
    data = build_dataset(DataConfig(image_size=SIZE))
    assert meta["data_sha"] == domain_data_sha(data.x, data.y)
    assert meta["weights_sha256"] == file_sha256(path) == domain.weights_sha
    assert meta["held_out_accuracy"] == domain.info["held_out_accuracy"] > 0.85
    assert meta["num_held_out"] == 1000 and meta["image_size"] == SIZE
    assert not list((cache_dir / "features").glob(f"domain-animal_mnist{SIZE}-*"))


def test_a_stale_shipped_classifier_is_not_used(tmp_path, monkeypatch, capsys):
    # Shipped weights of other data or code, or a damaged file: trained into the cache instead, once, with a line
    # saying why.
    monkeypatch.setenv("DIT_SCALING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(features, "SHIPPED_DOMAIN_DIR", tmp_path / "shipped")
    cfg = DataConfig(name="digits", image_size=16)
    shipped = train_domain(cfg, 0, progress=False, out=shipped_domain_path(cfg, 0))
    assert shipped.parent == tmp_path / "shipped"
    assert train_domain(cfg, 0, progress=False) == shipped            # current: used, nothing trained
    meta_file = shipped.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    for stale in ({"code_version": "0" * 12}, {"data_sha": "0" * 64}, {"weights_sha256": "0" * 64}):
        meta_file.write_text(json.dumps({**meta, **stale}))
        capsys.readouterr()
        cached = train_domain(cfg, 0, progress=False)
        assert cached.parent == tmp_path / "cache" / "features" and file_sha256(cached) == meta["weights_sha256"]
        assert "does not match" in capsys.readouterr().err
    mtime = os.stat(cached).st_mtime_ns
    assert train_domain(cfg, 0, progress=False) == cached and os.stat(cached).st_mtime_ns == mtime  # cached once
    meta_file.write_text("{not json")
    assert train_domain(cfg, 0, progress=False) == cached


def test_the_code_version_ignores_docstrings():
    def a(x):
        """One text."""
        return x + 1

    def b(x):
        """Another text, longer."""
        return x + 1

    def c(x):
        return x + 2

    assert features._code(a).replace("'a'", "'b'") == features._code(b) != features._code(c).replace("'c'", "'b'")


def test_the_same_weights_saved_twice_have_the_same_bytes(tmp_path):
    # The weights file's sha names the feature space in every eval row and cache key: two fresh machines training
    # the same classifier (the same tensors) must agree on it, whatever file names or processes saved them.
    weights = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}
    a, b = tmp_path / "one" / "domain.pt", tmp_path / "two" / "other-name.pt"
    _atomic_save(weights, a)
    _atomic_save({k: v.clone() for k, v in weights.items()}, b)
    assert a.read_bytes() == b.read_bytes() and file_sha256(a) == file_sha256(b)
    assert torch.equal(torch.load(b, weights_only=True)["w"], weights["w"])


def test_domain_cli_reports_the_classifier_in_use(domain, capsys):
    main(["train-domain", "--dataset", "animal_mnist", "--image-size", str(SIZE)])
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == domain.weights_path and out["held_out_accuracy"] > 0.85


def test_domain_extractor_rejects_other_image_sizes(domain):
    fe = DomainExtractor(DomainExtractor.NAME, ["features"], feature_extractor_weights_path=domain.weights_path)
    assert fe(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))[0].shape == (2, 128)
    with pytest.raises(ValueError, match="trained at 16x16"):
        fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_fd_orders_real_mode_dropped_and_noised(domain, animals):
    """Real vs real (disjoint halves) < samples of half the classes < noised images; precision/recall split the
    two failures: mode dropping costs recall, noise costs precision."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(animals), generator=g)
    ref, real = perm[:500], perm[500:1000]
    rest = perm[1000:]
    half_classes = rest[animals.y[rest] < 5][:500]
    noised = (animals.x[real] + 1.0 * torch.randn(animals.x[real].shape, generator=g)).clamp(-1, 1)
    reference = as_npz_images(animals.x[ref])
    scores = {name: compute_metrics(as_npz_images(x), reference, domain, kid=name != "half", progress=False,
                                    cuda=False)
              for name, x in (("real", animals.x[real]), ("half", animals.x[half_classes]), ("noised", noised))}
    fd = {k: v["fd"] for k, v in scores.items()}
    assert fd["real"] < fd["half"] < fd["noised"], fd
    assert scores["half"]["recall"] < scores["real"]["recall"] - 0.2
    assert scores["half"]["precision"] > 0.8
    assert scores["noised"]["precision"] < scores["real"]["precision"] - 0.2
    assert scores["half"]["is"] < scores["real"]["is"]  # five classes: lower IS analogue
    assert abs(scores["real"]["kid"]) < scores["noised"]["kid"] and scores["half"]["kid"] is None

    # The one-pass torch-fidelity number is the Frechet distance of the extractor's features.
    fe = DomainExtractor(DomainExtractor.NAME, ["features"], feature_extractor_weights_path=domain.weights_path)
    with torch.no_grad():
        f_real, f_ref = (fe(to_uint8(animals.x[i]))[0] for i in (real, ref))
    assert frechet_distance(f_real, f_ref) == pytest.approx(fd["real"], rel=1e-6)


class CountingImages(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images, self.reads = images, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return self.images[i]


def test_reference_features_are_cached_under_a_key_of_weights_and_data(domain, animals, cache_dir):
    data_cfg = DataConfig(image_size=SIZE)
    small = load_animal_mnist(SIZE, max_images=200)
    sha = dataset_fingerprint(small)
    key = reference_key(data_cfg, domain, 200, sha)
    assert key == reference_key(data_cfg, domain, 200, dataset_fingerprint(load_animal_mnist(SIZE, max_images=200)))

    changed = load_animal_mnist(SIZE, max_images=200)
    changed.x[0, 0, 0, 0] += 0.5  # one pixel of the reference data
    assert dataset_fingerprint(changed) != sha
    assert reference_key(data_cfg, domain, 200, dataset_fingerprint(changed)) != key
    assert reference_key(data_cfg, replace(domain, weights_sha="0" * 64), 200, sha) != key  # other weights
    assert reference_key(data_cfg, domain, 100, sha) != key and reference_key(replace(data_cfg, image_size=32),
                                                                              domain, 200, sha) != key

    reference = CountingImages(as_npz_images(small.x))
    samples = as_npz_images(animals.x[-100:])
    first = compute_metrics(samples, reference, domain, reference_key=key, progress=False, cuda=False)
    reads = reference.reads
    assert reads >= 200  # every image (torch-fidelity also peeks at the first one)
    second = compute_metrics(samples, reference, domain, reference_key=key, progress=False, cuda=False)
    assert reference.reads == reads and second == first  # then served from the cache, not read again
    radii = list((cache_dir / "fidelity").glob(f"{key}-*-prc-radii-k3.pt"))
    assert len(radii) == 1 and torch.load(radii[0]).shape == (200,)  # the reference's k-NN radii too


def test_compute_metrics_gives_torch_fidelity_numbers_to_the_bit(domain, animals):
    # compute_metrics runs calculate_metrics' steps itself (to reuse the reference's k-NN radii): every number
    # must stay the one torch-fidelity's calculate_metrics gives, or the committed studies would move.
    import torch_fidelity

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(animals), generator=g)
    reference = as_npz_images(animals.x[perm[:300]])
    for n in (60, 120):  # real images not in the reference, every other one noised
        x = animals.x[perm[-n:]].clone()
        x[::2] = (x[::2] + 0.5 * torch.randn(x[::2].shape, generator=g)).clamp(-1, 1)
        samples = as_npz_images(x)
        ours = compute_metrics(samples, reference, domain, kid=True, progress=False, cuda=False)
        theirs = torch_fidelity.calculate_metrics(
            input1=samples, input2=reference, cuda=False, fid=True, isc=True, prc=True, kid=True,
            feature_extractor=domain.extractor, feature_layer_isc="logits", feature_layer_fid="features",
            feature_layer_kid="features", feature_layer_prc="features",
            feature_extractor_weights_path=domain.weights_path, prc_neighborhood=3, isc_splits=10,
            kid_subset_size=n, save_cpu_ram=True, cache=False, verbose=False)
        assert ours == {"fd": theirs["frechet_inception_distance"], "is": theirs["inception_score_mean"],
                        "is_std": theirs["inception_score_std"], "precision": theirs["precision"],
                        "recall": theirs["recall"], "f_score": theirs["f_score"],
                        "kid": theirs["kernel_inception_distance_mean"],
                        "kid_std": theirs["kernel_inception_distance_std"]}
        assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # not a degenerate match


def test_the_domain_classifier_trains_to_the_same_weights_whatever_the_threads(tmp_path, monkeypatch):
    """Its weights are the FD feature space: a job with 2 threads trained other weights than one with 1 (another
    summation order in the convolutions' gradients), so two jobs of one study could measure FD in two spaces."""
    monkeypatch.setenv("DIT_SCALING_CACHE", str(tmp_path))
    threads, shas = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            shas.append(file_sha256(train_domain(DataConfig(name="digits", image_size=16), 0, progress=False,
                                                 force=True)))
            assert torch.get_num_threads() == n  # as before the training
    finally:
        torch.set_num_threads(threads)
    assert shas[0] == shas[1]
