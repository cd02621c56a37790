"""The metric functions torch-fidelity runs for us, against independent float64 computations."""

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist
from scipy.special import log_softmax, softmax

from scaling.evaluate import (count_label, frechet_distance, inception_score, knn_radii, metric_name, named_metrics,
                              precision_recall)


def fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a^1/2 S_b S_a^1/2)^1/2, all by symmetric eigendecompositions."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def correlated(rng, n, d, shift, scale):
    return rng.normal(shift, scale, size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)


@pytest.mark.parametrize("n, d", [(600, 16), (24, 64)])  # N > d and N < d (rank-deficient covariances)
def test_frechet_distance_matches_float64_reference(n, d):
    rng = np.random.default_rng(n + d)
    a, b = rng.normal(size=(n, d)), correlated(rng, n + 9, d, 0.3, 1.5)
    got = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(fd_reference(a, b), rel=1e-6)
    if n > d:  # scipy's sqrtm of the (full-rank) product agrees too
        s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        sq = scipy.linalg.sqrtm(s_a @ s_b).real
        ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * sq)
        assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n, d", [(600, 16), (24, 64)])
def test_frechet_distance_of_identical_sets_is_zero(n, d):
    a = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    fd = frechet_distance(torch.from_numpy(a), torch.from_numpy(a))
    if n > d:
        assert abs(fd) < 1e-6
    else:
        # torch-fidelity takes tr sqrt(S S) from the eigenvalues of the product; its d - N + 1 zero eigenvalues
        # come out as +-1e-13 and their square roots add ~1e-6 relative to tr S. Bound it relative to tr S.
        assert abs(fd) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_grows_with_a_mean_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 8))
    fds = [frechet_distance(torch.from_numpy(a), torch.from_numpy(rng.normal(size=(400, 8)) + s)) for s in (0, 1, 2)]
    assert fds[0] < fds[1] < fds[2]
    assert fds[2] == pytest.approx(8 * 4, rel=0.15)  # |mu shift|^2 = d s^2 dominates


def pr_reference(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force: the k-th nearest other point (index k after the point itself at distance 0) sets the radius."""
    r_real = np.sort(cdist(real, real), axis=1)[:, k]
    r_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)                                    # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(axis=1).mean()   # fake inside some real ball
    recall = (d <= r_fake[:, None]).any(axis=0).mean()      # real inside some fake ball
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_match_brute_force_knn(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(150, 5))
    fake = np.concatenate([rng.normal(size=(60, 5)), rng.normal(3.0, 0.5, size=(40, 5))])  # part off-manifold
    p, r = precision_recall(torch.from_numpy(fake), torch.from_numpy(real), k=3)
    p_ref, r_ref = pr_reference(fake, real, k=3)
    # torch-fidelity averages in float32; 1e-6 still pins the exact count (steps of 1/100 and 1/150)
    assert (p, r) == (pytest.approx(p_ref, abs=1e-6), pytest.approx(r_ref, abs=1e-6))
    assert p < 0.8  # the 40 shifted fakes lie off the real manifold: not a vacuous match


def test_precision_recall_are_torch_fidelitys_to_the_bit_with_or_without_known_radii():
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(4)
    real = torch.from_numpy(rng.normal(size=(400, 16)).astype(np.float32))
    fake = torch.from_numpy(rng.normal(0.3, 1.2, size=(90, 16)).astype(np.float32))
    theirs = prc_features_to_metric(fake, real, prc_neighborhood=3, save_cpu_ram=True, verbose=False)
    radii = knn_radii(real)
    assert torch.allclose(radii, torch.from_numpy(np.sort(cdist(real, real), axis=1)[:, 3]).float(), atol=1e-5)
    for known in (None, radii):
        assert precision_recall(fake, real, real_radii=known) == (theirs["precision"], theirs["recall"])
    assert 0.2 < theirs["precision"] < 0.95 and 0.2 < theirs["recall"] < 0.95  # a real split, not 0 or 1


def test_precision_recall_see_mode_dropping():
    rng = np.random.default_rng(3)
    real = np.concatenate([rng.normal(-4, 1, size=(100, 2)), rng.normal(4, 1, size=(100, 2))])
    one_mode = rng.normal(-4, 1, size=(200, 2))
    p, r = precision_recall(torch.from_numpy(one_mode), torch.from_numpy(real))
    assert p > 0.9 and r < 0.6


def is_reference(logits: np.ndarray, splits: int, seed: int = 2020) -> tuple[float, float]:
    """Shuffle as torch-fidelity does (RandomState(2020).permutation), then exp(mean KL(p(y|x) || p(y))) per split."""
    n = len(logits)
    x = logits[np.random.RandomState(seed).permutation(n)].astype(np.float64)
    p, log_p = softmax(x, axis=1), log_softmax(x, axis=1)
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        p_y = part.mean(axis=0)
        scores.append(np.exp((part * (log_part - np.log(p_y))).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n, splits", [(200, 10), (95, 4)])
def test_inception_score_matches_float64_reference(n, splits):
    logits = np.random.default_rng(n).normal(0, 3, size=(n, 10)).astype(np.float32)
    mean, std = inception_score(torch.from_numpy(logits), splits=splits)
    ref_mean, ref_std = is_reference(logits, splits)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-7)


def test_inception_score_bounds():
    assert inception_score(torch.zeros(100, 10), splits=5)[0] == pytest.approx(1.0)  # no class information
    confident = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).float() * 60
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # K balanced sure classes


def test_metric_names_carry_feature_space_and_count():
    assert metric_name("fd", "inception", 50_000) == "fid50k_inception"
    assert metric_name("fd", "domain", 1000) == "fd1k_domain"
    assert metric_name("fd", "inception_offline", 1000) == "fd1k_inception_offline"
    assert metric_name("is", "domain", 1000) == "is1k_domain"
    assert (count_label(500), count_label(2000), count_label(1500)) == ("500", "2k", "1500")
    raw = {"fd": 3.0, "is": None, "precision": 0.5, "recall": 0.25, "kid": None}
    assert named_metrics(raw, "inception_offline", 1000) == {"fd1k_inception_offline": 3.0,
                                                             "precision1k_inception_offline": 0.5,
                                                             "recall1k_inception_offline": 0.25}
