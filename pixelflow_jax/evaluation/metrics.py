"""Sample-quality metrics on Inception features, as the ADM (guided-diffusion) evaluation suite
computes them: FID / sFID (Fréchet distance of feature Gaussians), Inception Score, and
precision / recall of k-nearest-neighbour manifolds (k = 3).

Statistics and the Fréchet distance run in float64 numpy on the host (2048 x 2048 matrices);
pairwise distances for precision / recall run in float32 on the accelerator in blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IS_SPLIT_SIZE = 5000  # ADM scores consecutive chunks of 5000 samples (10 splits of 50k)
NEIGHBOURHOOD = 3  # ADM's k for the manifold radii
BLOCK = 10_000  # rows / columns of one pairwise-distance block (ADM's batch sizes)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64; covariance with N - 1 as np.cov."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those
    of the symmetric S1^(1/2) S2 S1^(1/2); symmetric eigendecompositions keep this stable where
    S1 S2 is near singular (ADM's scipy.linalg.sqrtm needs an epsilon retry there). Eigenvalues
    within round-off of 0, either sign, are 0 (without_round_off).
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(without_round_off(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    # A squared distance: round-off below 0 (identical sets give ~-1e-5) is 0.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def without_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """A symmetric matrix's eigenvalues, those within round-off of 0 (a singular covariance's zero
    eigenvalues, come out at +-1e-18) set to 0: the square root of a round-off of 2e-18 added 1.4e-9,
    and an FID from statistics of fewer images than dimensions sums ~1000 such roots."""
    largest = float(np.abs(eigenvalues).max(initial=0.0))
    round_off = len(eigenvalues) * np.finfo(np.float64).eps * largest
    return np.where(eigenvalues > round_off, eigenvalues, 0.0)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive chunks of split_size samples of exp(E_x KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        scores.append(np.exp((np.exp(part) * (part - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores))


@jax.jit
def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """|u_i - v_j|^2 for row blocks u (n, D), v (m, D), float32, clamped at 0 like ADM's."""
    cross = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(u * u, 1)[:, None] - 2 * cross + jnp.sum(v * v, 1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _smallest(distances: jax.Array, running: jax.Array, count: int) -> jax.Array:
    """The `count` smallest of each row of [running, distances], ascending."""
    merged = jnp.concatenate([running, distances], axis=1)
    return -jax.lax.top_k(-merged, count)[0]


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, block: int = BLOCK) -> np.ndarray:
    """(N,) squared distance of each feature to its k-th nearest other feature (the point itself
    is its own nearest, at distance 0)."""
    if len(features) <= k:  # every radius would stay infinite: all points inside every ball
        raise ValueError(f"precision and recall need more than {k} images in each set (a ball reaches an image's "
                         f"neighbour number {k}), got {len(features)}")
    features = jnp.asarray(features, jnp.float32)
    radii = []
    for start in range(0, len(features), block):
        rows = features[start:start + block]
        nearest = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
        for col in range(0, len(features), block):
            nearest = _smallest(_squared_distances(rows, features[col:col + block]), nearest, k + 1)
        radii.append(np.asarray(nearest[:, k]))
    return np.concatenate(radii)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD,
                     block: int = BLOCK) -> tuple[float, float]:
    """(precision, recall) as ADM: precision = share of samples inside some reference point's
    k-NN ball; recall = share of reference points inside some sample's k-NN ball. Distances are
    float32 where ADM's are float16 (a ~1e-3 difference; README, Evaluation)."""
    reference_radii = jnp.asarray(manifold_radii(reference, k, block))
    sample_radii = jnp.asarray(manifold_radii(samples, k, block))
    reference, samples = jnp.asarray(reference, jnp.float32), jnp.asarray(samples, jnp.float32)
    sample_in = np.zeros(len(samples), bool)
    reference_in = np.zeros(len(reference), bool)
    for s in range(0, len(samples), block):
        for r in range(0, len(reference), block):
            d = _squared_distances(samples[s:s + block], reference[r:r + block])
            sample_in[s:s + block] |= np.asarray(jnp.any(d <= reference_radii[None, r:r + block], axis=1))
            reference_in[r:r + block] |= np.asarray(jnp.any(d <= sample_radii[s:s + block, None], axis=0))
    return float(sample_in.mean()), float(reference_in.mean())
