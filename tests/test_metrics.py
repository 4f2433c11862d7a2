"""FID, Inception Score and precision/recall against float64 references written as ADM's
evaluator computes them (scipy sqrtm, softmax KL, brute-force k-NN)."""

import numpy as np
import pytest
from scipy import linalg

from pixelflow_jax.evaluation import metrics


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def random_features(rng, count, dim, rank=None, shift=0.0):
    mixing = rng.standard_normal((rank or dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((count, rank or dim)) @ mixing + shift


@pytest.mark.parametrize("count,rank,tolerance", [
    (2000, None, 1e-8),  # well conditioned
    (2000, 40, 1e-5),  # rank 40 of 64: singular covariances (ADM retries sqrtm with an epsilon)
    (50, None, 1e-5),  # fewer samples than dimensions: rank-deficient estimates
])
def test_frechet_distance_equals_scipy_reference(count, rank, tolerance):
    rng = np.random.default_rng(0)
    stats_a = metrics.gaussian_statistics(random_features(rng, count, 64, rank))
    stats_b = metrics.gaussian_statistics(random_features(rng, count, 64, rank, shift=0.1))
    expected = adm_frechet_distance(*stats_a, *stats_b)
    assert metrics.frechet_distance(*stats_a, *stats_b) == pytest.approx(expected, rel=tolerance)


def test_identical_sets_give_zero_and_a_shift_gives_more():
    rng = np.random.default_rng(1)
    features = random_features(rng, 1000, 32)
    stats = metrics.gaussian_statistics(features)
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-9
    shifted = [metrics.frechet_distance(*stats, *metrics.gaussian_statistics(features + s)) for s in (0.1, 0.3)]
    assert 0 < shifted[0] < shifted[1]
    assert shifted[0] == pytest.approx(32 * 0.1**2, rel=1e-9)  # a pure shift adds |shift|^2


def test_inception_score_equals_numpy_reference():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((23, 10)) * 3
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, 23, 7):  # chunks of 7, the last one partial
        part = preds[i:i + 7]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert metrics.inception_score(logits, split_size=7) == pytest.approx(np.mean(scores), rel=1e-12)
    assert metrics.inception_score(np.zeros((10, 5))) == pytest.approx(1.0)  # uniform: score 1


def brute_force_precision_recall(reference, samples, k=3):
    def radii(points):
        d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    d = ((samples[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
    precision = (d <= radii(reference)[None, :]).any(1).mean()
    recall = (d <= radii(samples)[:, None]).any(0).mean()
    return precision, recall


def test_precision_recall_equals_brute_force_knn():
    """Blocks of 64 rows/columns over 300 reference and 200 sample points, so the running k-NN
    merge across column blocks and the partial last blocks are exercised."""
    rng = np.random.default_rng(3)
    reference = random_features(rng, 300, 16)
    samples = random_features(rng, 200, 16, shift=0.3) * 1.3
    got = metrics.precision_recall(reference, samples, block=64)
    expected = brute_force_precision_recall(reference, samples)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(reference, reference, block=64) == (1.0, 1.0)
