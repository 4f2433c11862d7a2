"""FID, Inception Score and precision/recall against float64 references written as ADM's
evaluator computes them (scipy sqrtm, softmax KL, brute-force k-NN); and --mode=eval's checks of
its inputs and outputs, on a stand-in Inception that compiles in a moment."""

import functools
import io
import json
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import linalg

from pixelflow_jax.evaluation import evaluate, metrics, npz_images
from pixelflow_jax.evaluation import features as inception_features
from pixelflow_jax.software_versions import job_environment


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


def test_gaussian_statistics_are_the_mean_and_the_unbiased_covariance():
    features = random_features(np.random.default_rng(2), 50, 8)  # few samples: 1/N and 1/(N-1) differ by 2%
    mean, covariance = metrics.gaussian_statistics(features)
    centred = features - features.sum(axis=0) / 50
    np.testing.assert_allclose(mean, features.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(covariance, centred.T @ centred / 49, rtol=1e-10)


def test_float32_features_get_statistics_of_float64_arithmetic():
    """The evaluation's features are float32: their mean summed in float32 is off by ~1e-7."""
    features = random_features(np.random.default_rng(4), 500, 8).astype(np.float32) + 100
    mean, covariance = metrics.gaussian_statistics(features)
    wide = features.astype(np.float64)
    np.testing.assert_allclose(mean, wide.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(covariance, np.cov(wide, rowvar=False), rtol=1e-10)


def test_a_covariance_rounded_below_zero_adds_nothing_to_the_frechet_distance():
    """A stored covariance rounded in float16 has eigenvalues a little below 0 (the stored statistics'
    check lets -1e-4 of the largest entry pass): ADM's sqrtm(...).real takes 0 for their square roots,
    not the root of their size."""
    rotation = np.linalg.qr(np.random.default_rng(6).standard_normal((4, 4)))[0]
    sigma1 = rotation @ np.diag([2.0, 1.0, 0.5, 0.25]) @ rotation.T
    sigma2 = rotation @ np.diag([1.0, 3.0, 0.5, -1e-4]) @ rotation.T
    mu = np.zeros(4)
    expected = adm_frechet_distance(mu, sigma1, mu, sigma2)
    assert metrics.frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu, sigma2, mu, sigma1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_singular_covariances_equals_its_closed_form():
    """Covariances of one eigenbasis, each of rank 60 in 256 dimensions (fewer images than features),
    overlapping in 30 directions: tr((S1 S2)^(1/2)) is sum(sqrt(a * b)) exactly. The square roots of the
    ~200 zero eigenvalues' round-off (1e-18 each) put the distance 1e-8 (relative) below it."""
    rng = np.random.default_rng(10)
    rotation = np.linalg.qr(rng.standard_normal((256, 256)))[0]
    a, b = np.zeros(256), np.zeros(256)
    a[:60], b[30:90] = rng.random(60) * 5 + 0.1, rng.random(60) * 5 + 0.1
    sigma_a, sigma_b = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    mu_a, mu_b = rng.normal(size=256), rng.normal(size=256)
    exact = np.sum((mu_a - mu_b) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert metrics.frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(exact, rel=1e-13)
    assert metrics.frechet_distance(mu_b, sigma_b, mu_a, sigma_a) == pytest.approx(exact, rel=1e-13)


def test_statistics_of_different_sizes_are_refused_by_their_shapes():
    """A mean of one value broadcast against 3 without a word."""
    with pytest.raises(ValueError, match=r"of different sizes: mu \(3,\) vs \(1,\), sigma \(3, 3\) vs \(3, 3\)"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(1), np.eye(3))
    with pytest.raises(ValueError, match=r"of different sizes: mu \(3,\) vs \(3,\), sigma \(3, 3\) vs \(2, 2\)"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_identical_sets_give_zero_and_a_shift_gives_more():
    rng = np.random.default_rng(1)
    features = random_features(rng, 1000, 32)
    stats = metrics.gaussian_statistics(features)
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-9
    # 8 samples of 2048 dimensions (an evaluation of 8 images): round-off put identical sets below 0.
    few = [metrics.gaussian_statistics(random_features(np.random.default_rng(seed), 8, 2048)) for seed in range(3)]
    assert all(metrics.frechet_distance(*stats, *stats) >= 0 for stats in few)
    shifted = [metrics.frechet_distance(*stats, *metrics.gaussian_statistics(features + s)) for s in (0.1, 0.3)]
    assert 0 < shifted[0] < shifted[1]
    assert shifted[0] == pytest.approx(32 * 0.1**2, rel=1e-9)  # a pure shift adds |shift|^2


def numpy_inception_score(logits, split_size):
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):  # consecutive chunks, the last one maybe partial
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores)


def test_inception_score_equals_numpy_reference():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((23, 10)) * 3
    assert metrics.inception_score(logits, split_size=7) == pytest.approx(numpy_inception_score(logits, 7), rel=1e-12)
    assert metrics.inception_score(np.zeros((10, 5))) == pytest.approx(1.0)  # uniform: score 1


def test_inception_score_of_large_or_float32_logits_is_that_of_float64_arithmetic():
    """Softmax is shifted by each row's largest logit (exp(800) is inf), and float32 logits are
    scored in float64 (float32 arithmetic is off by ~1e-7)."""
    logits = np.random.default_rng(3).standard_normal((23, 10)).astype(np.float32) * 3
    expected = numpy_inception_score(logits.astype(np.float64), 7)
    assert metrics.inception_score(logits, split_size=7) == pytest.approx(expected, rel=1e-13)
    assert metrics.inception_score(logits.astype(np.float64) + 800, split_size=7) == pytest.approx(expected, rel=1e-9)


def test_inception_score_splits_into_adms_chunks_of_5000_by_default():
    """ADM scores 50k samples as 10 chunks of 5000 and averages: one score over all samples is
    another number (here each chunk is sharper than the last, and the chunks' classes differ)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((12_000, 4)) * np.repeat([1.0, 3.0, 6.0], [5000, 5000, 2000])[:, None]
    logits[5000:10_000, 0] += 4.0
    expected = numpy_inception_score(logits, 5000)
    assert metrics.inception_score(logits) == pytest.approx(expected, rel=1e-10)
    assert abs(numpy_inception_score(logits, len(logits)) - expected) > 0.1  # the split matters here


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
    # Closed balls, as ADM's `distance <= radius`: 4 copies of one image in either set have radius 0
    # and hold the copies of that image in the other set (the same shapes as above: no new compile).
    reference_dup = np.concatenate([np.repeat(reference[:1], 4, axis=0), reference[4:]])
    samples_dup = np.concatenate([np.repeat(reference[:1], 4, axis=0), samples[4:]])
    got = metrics.precision_recall(reference_dup, samples_dup, block=64)
    assert got == pytest.approx(brute_force_precision_recall(reference_dup, samples_dup), abs=1e-12)
    # Another k: both sets' balls reach neighbour number k.
    assert metrics.precision_recall(reference, samples, k=6, block=64) == pytest.approx(
        brute_force_precision_recall(reference, samples, k=6), abs=1e-12)
    # With k or fewer images a set's balls never close (ADM's np.partition raises): an error, not 0 and 1.
    with pytest.raises(ValueError, match="need more than 3 images in each set .* got 3"):
        metrics.precision_recall(reference, samples[:3], block=64)


def test_squared_distances_are_never_below_zero():
    """|u|^2 - 2 u.v + |v|^2 in float32 puts a point's distance to itself at -0.05 for features near
    5 in 2048 dimensions; ADM clamps at 0, and so a ball of radius 0 holds the point's copies."""
    features = jnp.asarray(np.random.default_rng(0).standard_normal((64, 2048)) * 3 + 5, jnp.float32)
    assert float(metrics._squared_distances(features, features).min()) == 0.0


def test_pairwise_distances_ask_for_full_float32_matmuls():
    """On a GPU or TPU, jnp.dot's default precision multiplies in TF32 or bfloat16 (1e-3 relative),
    which moves points across the k-NN balls' edges; the CPU computes float32 either way, so the
    precision asked for is checked in the traced program."""
    def products(jaxpr):  # the dot_generals of a program, inside the jit it is traced as too
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for inner in eqn.params.values():
                if hasattr(inner, "jaxpr"):
                    yield from products(inner.jaxpr)

    rows = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    found = list(products(jax.make_jaxpr(metrics._squared_distances)(rows, rows).jaxpr))
    assert found and all(eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for eqn in found)


# ------------------------------------------------------------------ --mode=eval on a stand-in Inception


class TinyInception(nnx.Module):
    """(pool, spatial, logits) from a linear map of each image's mean colours and their squares;
    its weights are a (6, 8) .npy file, so other weights give other features."""

    def __init__(self, weights):
        self.weights = nnx.Param(jnp.asarray(weights, jnp.float32))

    def __call__(self, images):
        x = images / 255.0
        pool = jnp.concatenate([x.mean((1, 2)), (x * x).mean((1, 2))], -1) @ self.weights[...]
        return pool, pool[:, :4], pool


@pytest.fixture
def tiny_inception(tmp_path, monkeypatch):
    """The path of the stand-in's weights file, which FeatureExtractor now loads."""
    from pixelflow_jax.evaluation import inception_convert

    monkeypatch.setattr(inception_convert, "load_inception", lambda path: TinyInception(np.load(path)))
    path = str(tmp_path / "inception.npy")
    np.save(path, np.random.default_rng(0).standard_normal((6, 8)))
    return path


def images_npz(path, seed, size=8, count=6, **arrays):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8),
             **arrays)
    return str(path)


def test_inception_weights_overwritten_in_place_are_not_served_from_the_feature_cache(tiny_inception, tmp_path):
    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    workdir = str(tmp_path / "run")
    first = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    mtime = os.stat(tiny_inception).st_mtime_ns
    np.save(tiny_inception, np.random.default_rng(1).standard_normal((6, 8)))  # same size, other weights
    os.utime(tiny_inception, ns=(mtime, mtime + 10**9))  # a distinct time even on a coarse clock
    again = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    fresh = evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "fresh"), batch_size=8)
    assert again["fid"] == fresh["fid"] != first["fid"]
    # Other weights of the same size and modification time (cp -p, a tar's or rsync -t's times): served stale
    np.save(tiny_inception, np.random.default_rng(2).standard_normal((6, 8)))
    os.utime(tiny_inception, ns=(mtime, mtime + 10**9))
    third = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    assert third["fid"] == evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "fresh_3"),
                                             batch_size=8)["fid"] != again["fid"]


def test_weights_changed_between_the_fingerprints_slices_are_known_by_their_time(tiny_inception, tmp_path, monkeypatch):
    """The fingerprint reads three slices of a large file (the Inception's 95 MB): weights changed
    between them, written at another time, are other weights by the modification time in the key."""
    from pixelflow_jax import storage

    monkeypatch.setattr(storage.reads, "FINGERPRINT_SLICE", 16)  # the stand-in's 512-byte .npy read in slices
    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    workdir = str(tmp_path / "run")
    first = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    weights, fingerprint = np.load(tiny_inception), storage.file_fingerprint(tiny_inception)
    mtime = os.stat(tiny_inception).st_mtime_ns
    weights[0, 0] += 1.0  # bytes 128-135 of the file, before its middle slice at 256
    np.save(tiny_inception, weights)
    os.utime(tiny_inception, ns=(mtime, mtime + 10**9))
    assert storage.file_fingerprint(tiny_inception) == fingerprint
    again = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    assert again["fid"] == evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "fresh"),
                                             batch_size=8)["fid"] != first["fid"]


def test_the_processes_of_a_distributed_evaluation_share_the_images_out_and_gather_every_feature(
        tiny_inception, tmp_path, monkeypatch):
    """Every process of a --distributed evaluation computed every image's features (each as long as
    one host alone). Here 5 images over 4 processes (blocks of 2, 2, 1 and none), the other
    processes played by running the extractor as each of them in turn."""
    from jax.experimental import multihost_utils

    samples = images_npz(tmp_path / "samples.npz", 1, count=5)
    extract = inception_features.FeatureExtractor(tiny_inception, 8)
    alone = extract(samples)
    blocks, gathered = [], iter(())

    def allgather(padded):  # as jax stacks each process's value: every call is one feature, in FEATURES order
        if np.ndim(padded) == 0:  # the processes' flags of damage found: none
            return np.zeros(4, np.int32)
        blocks.append(padded)
        return next(gathered)

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    for index in range(4):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        assert inception_features.rows_of_this_process(5) == [(0, 2), (2, 4), (4, 5), (5, 5)][index]
        gathered = iter([np.zeros((4, 2, width), np.float32) for width in extract.widths.values()])
        extract(samples)
    by_feature = [np.stack(blocks[i::len(inception_features.FEATURES)]) for i in range(len(inception_features.FEATURES))]
    gathered = iter(by_feature)  # what the four processes gave, as process 1 receives it
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    shared = extract(samples)
    for name in inception_features.FEATURES:
        assert shared[name].shape == alone[name].shape
        np.testing.assert_allclose(shared[name], alone[name], rtol=1e-6, atol=1e-6)


def as_process_1_of_2_asking_the_sync_point(monkeypatch) -> list[int]:
    """The passes this process (1 of a --distributed job of 2) asks jax's preemption sync point
    about, none answered yet; the other process's gathered values are taken to be this one's."""
    from jax.experimental import multihost_utils

    from pixelflow_jax import multihost

    asked = []
    monkeypatch.setattr(multihost, "_last_pass_asked", [0])
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda passes: asked.append(passes) or False)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: np.stack([value, value]))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    return asked


def test_every_process_asks_the_sync_point_in_as_many_rounds_numbered_on_from_the_last_pass(
        tiny_inception, tmp_path, monkeypatch):
    """33 images over 2 processes on 8 devices: blocks of 17 and 16 images, 3 and 2 batches of 8.
    Process 1 asks jax's sync point in 3 rounds too (it asked in none: a SIGTERM was ignored), and
    the rounds number on from the sampling job's last batch (that --mode=sample ends with the
    evaluation), the second file's from the first's: jax's sync point is one past the furthest
    process's latest pass, which a count from 1 again would meet late or never."""
    from pixelflow_jax import multihost

    samples = images_npz(tmp_path / "samples.npz", 1, count=33)
    reference = images_npz(tmp_path / "reference.npz", 2, count=33)
    asked = as_process_1_of_2_asking_the_sync_point(monkeypatch)
    multihost.stop_if_preempted(5)  # as sample_run asks at a job's 5th and last batch
    extract = inception_features.FeatureExtractor(tiny_inception, 8)
    assert extract(samples)["pool"].shape == (33, 8)
    assert asked == [5, 6, 7, 8]
    extract(reference)
    assert asked == [5, 6, 7, 8, 9, 10, 11]


def test_a_sigterm_after_the_reference_pass_stops_the_evaluation_before_its_metrics(
        tiny_inception, tmp_path, monkeypatch):
    """jax sets the sync point one past the furthest process's latest pass: a SIGTERM to a process
    of a --distributed evaluation that came after the reference's last Inception round, or while
    its features were read from the cache (where no round asks), set it at a pass no process asked
    again, and the job ran on to its end. Every process now asks once more before the metrics,
    and stops there at one pass, whether the features were computed or read from the cache."""
    from jax.experimental import multihost_utils

    from pixelflow_jax import multihost
    from pixelflow_jax.command_line import Terminated

    samples = images_npz(tmp_path / "samples.npz", 1, count=9)
    reference = images_npz(tmp_path / "reference.npz", 2, count=9)
    sync_point = [None]
    monkeypatch.setattr(multihost, "_last_pass_asked", [0])
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)  # one process plays every process
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda passes: passes == sync_point[0])
    features_of = inception_features.cached_features

    def sigterm_after_the_reference(extract, path, cache_dir):
        features = features_of(extract, path, cache_dir)
        if path == reference:  # as jax sets it: one past the latest pass asked
            sync_point[0] = multihost._last_pass_asked[0] + 1
        return features

    monkeypatch.setattr(evaluate, "cached_features", sigterm_after_the_reference)
    for cached in (False, True):  # the features computed, then read from the cache the first run wrote
        with pytest.raises(Terminated):
            evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "run"), batch_size=4)
        assert (tmp_path / "run" / "eval_features").is_dir()


def test_a_block_found_damaged_still_asks_the_sync_point_in_every_round(tiny_inception, tmp_path, monkeypatch):
    """Process 1 finds the CRC error in its last batch (the second of its 3 rounds). Raised at
    once, its process waited in the gather of the damage flags while the others went on asking
    jax's sync point, where a SIGTERM would stop them and leave it waiting."""
    samples = images_npz(tmp_path / "samples.npz", 1, size=64, count=33)
    with np.load(samples) as f:
        images = f["arr_0"].tobytes()
    data = bytearray(open(samples, "rb").read())
    data[data.find(images) + len(images) - 1] ^= 0xFF
    open(samples, "wb").write(bytes(data))
    asked = as_process_1_of_2_asking_the_sync_point(monkeypatch)
    with pytest.raises(ValueError, match=r"samples.npz is damaged \(BadZipFile: Bad CRC-32"):
        inception_features.FeatureExtractor(tiny_inception, 8)(samples)
    assert asked == [1, 2, 3]


# A --mode=eval process on the stand-in Inception. With SIGTERM set, both processes hold their second
# batch of the first file for 3 s, and process 1 sends itself a SIGTERM there: jax's notifier looks for
# a SIGTERM once a second, so the sync point is agreed while both have asked pass 2: it is pass 3.
EVAL_ON_THE_STAND_IN = """
import os, runpy, signal, sys, time
sys.path.insert(0, "tests")
import numpy as np
from test_metrics import TinyInception
from pixelflow_jax.evaluation import features as inception_features, inception_convert

SIGTERM = {sigterm}
inception_convert.load_inception = lambda path: TinyInception(np.load(path))
inception, batches = inception_features._inception, []


def slowly(*args):
    batches.append(1)
    if SIGTERM and len(batches) == 2:
        if "--process_id=1" in sys.argv:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)
    return inception(*args)


inception_features._inception = slowly
sys.argv = sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow  # 20-35 s on 2 cores: two jobs of two processes
def test_a_sigterm_to_one_process_of_a_distributed_evaluation_stops_every_process_at_one_batch(
        tiny_inception, tmp_path):
    """jax's preemption service holds SIGTERM in a --distributed job: a SIGTERM to one process of an
    evaluation was caught and ignored, and the job ran on to its end. Its processes take blocks of
    different batch counts (9 images over 2 processes: 5 and 4, 3 and 2 batches of 2), and a SIGTERM at
    process 1's last batch sets the sync point at the batch after it, which process 0 has and process
    1 has not. Both must stop at one batch (a process that stops alone leaves the other in the gather),
    exit 143 and leave no eval.json; the same command then finishes the job, with the metrics of one
    process."""
    import subprocess
    import sys

    from conftest import REPO, cpu_devices
    from pixelflow_jax.command_line import EXIT_TERMINATED
    from test_train import MULTIPROCESS_GUARD, run_two_processes

    samples = images_npz(tmp_path / "samples.npz", 1, count=9)
    reference = images_npz(tmp_path / "reference.npz", 2, count=9)
    alone = evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "alone"), batch_size=2)
    workdir = tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1, one_process=False),
           "PYTHONPATH": os.pathsep.join(filter(None, [MULTIPROCESS_GUARD, os.environ.get("PYTHONPATH")]))}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # only process 0 would write it (see test_train)

    def evaluation(sigterm):
        def start(address):
            return [subprocess.Popen(
                [sys.executable, "-c", EVAL_ON_THE_STAND_IN.format(sigterm=sigterm), "main.py",
                 "--config=configs/c2i.py:tiny", f"--workdir={workdir}", "--mode=eval", "--compilation_cache=off",
                 f"--config.eval.samples={samples}", f"--config.eval.reference={reference}",
                 f"--config.eval.inception_weights={tiny_inception}", "--config.eval.batch_size=2", "--distributed",
                 f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        return start

    errors = run_two_processes(evaluation(True), exit_code=EXIT_TERMINATED)
    for err in errors:
        assert err.rstrip().splitlines()[-1] == ("stopped: terminated (SIGTERM); the features of files already "
                                                 "through the Inception are cached: rerun the same command to go on")
    assert not (workdir / "eval.json").exists() and not (workdir / "eval_history.jsonl").exists()
    run_two_processes(evaluation(False))
    with open(workdir / "eval.json") as f:
        two = json.load(f)
    for name in (*evaluate.METRICS, "num_samples", "num_reference"):
        assert two[name] == pytest.approx(alone[name], rel=1e-6, abs=1e-9), name


def test_every_process_evaluates_the_samples_process_0_chose_or_stops_with_its_refusal(tmp_path, monkeypatch):
    """A sampling job's evaluation: process 1, whose host showed it the samples.npz process 0 had just
    written late, refused alone ("has not written samples.npz yet") while process 0 went on; one
    that saw what process 0 refused (an unfinished job's file) went on alone."""
    import ml_collections

    workdir = tmp_path / "run"
    (workdir / "samples").mkdir(parents=True)
    (workdir / "samples" / "settings.json").write_text(json.dumps({"num_images": 6}))
    own = images_npz(workdir / "samples.npz", 1)
    config = ml_collections.ConfigDict(dict(eval=dict(samples="", reference=images_npz(tmp_path / "ref.npz", 2),
                                                      inception_weights="unused", batch_size=8)))
    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate", lambda samples, *_: evaluated.append(samples) or
                        dict.fromkeys(evaluate.METRICS, 0.0))
    sent = as_process_of_2(monkeypatch, 0)
    evaluate.run(config, str(workdir))
    assert evaluated == [own] and sent[0].tolist() == [0, 1]  # not refused, the workdir's own samples

    with monkeypatch.context() as patched:
        as_process_of_2(patched, 1, sent_by_process_0=sent[0])
        hidden_from_this_process(patched, own, looks=1)
        evaluate.run(config, str(workdir))
    assert evaluated == [own, own]

    as_process_of_2(monkeypatch, 1, sent_by_process_0=np.array([1, 0], np.int32))
    with pytest.raises(ValueError, match=rf"process 0 refused to evaluate the samples of {workdir} \(its error says "):
        evaluate.run(config, str(workdir))
    assert len(evaluated) == 2


# Process 1's file system never shows it the samples' cached features, and the reference's only from
# its second look (NFS caches listings).
CACHE_HIDDEN_ON_PROCESS_1 = """
import sys
from pixelflow_jax import storage

if "--process_id=1" in sys.argv:
    looks = []

    def hiding(check):
        def seen(path):
            name = storage.basename(path)
            if "/eval_features/" in path and (name.startswith("samples.npz.") or not looks):
                looks.append(name)
                return False
            return check(path)
        return seen

    storage.exists, storage.isfile = hiding(storage.exists), hiding(storage.isfile)
"""


@pytest.mark.slow  # 10-20 s on 2 cores: a job of two processes
def test_two_processes_of_which_one_sees_the_feature_cache_late_or_never_take_one_path(tiny_inception, tmp_path):
    """Each process looked in the feature cache for itself: process 1, not seeing the files process 0
    read, ran the Inception alone and waited in the gather for process 0, which had moved on. Now
    both read the reference's cache (process 1 once it sees it) and both compute the samples' again,
    with the metrics of one process."""
    import subprocess
    import sys

    from conftest import REPO, cpu_devices
    from test_train import MULTIPROCESS_GUARD, run_two_processes

    samples = images_npz(tmp_path / "samples.npz", 1, count=9)
    reference = images_npz(tmp_path / "reference.npz", 2, count=9)
    workdir = tmp_path / "run"
    alone = evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=2)  # caches both
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1, one_process=False),
           "PYTHONPATH": os.pathsep.join(filter(None, [MULTIPROCESS_GUARD, os.environ.get("PYTHONPATH")]))}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # only process 0 would write it (see test_train)

    def start(address):
        return [subprocess.Popen(
            [sys.executable, "-c", CACHE_HIDDEN_ON_PROCESS_1 + EVAL_ON_THE_STAND_IN.format(sigterm=False), "main.py",
             "--config=configs/c2i.py:tiny", f"--workdir={workdir}", "--mode=eval", "--compilation_cache=off",
             f"--config.eval.samples={samples}", f"--config.eval.reference={reference}",
             f"--config.eval.inception_weights={tiny_inception}", "--config.eval.batch_size=2", "--distributed",
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]

    errors = run_two_processes(start)
    assert "process 1 of 2 could not read the cached features" in errors[0]
    for err in errors:
        assert f"features of {reference} from" in err and f"features of {samples} from" not in err
    with open(workdir / "eval.json") as f:
        two = json.load(f)
    for name in (*evaluate.METRICS, "num_samples", "num_reference"):
        assert two[name] == pytest.approx(alone[name], rel=1e-6, abs=1e-9), name


def test_damage_that_one_process_finds_in_its_block_stops_every_process(tiny_inception, tmp_path, monkeypatch):
    """A stored .npz's CRC is checked where its member's data ends: only the process whose block
    holds the last images could find a flipped byte, and the others then waited in the gather."""
    from jax.experimental import multihost_utils

    samples = images_npz(tmp_path / "samples.npz", 1, size=64, count=6)  # larger than zipfile's read-ahead
    with np.load(samples) as f:
        images = f["arr_0"].tobytes()
    data = bytearray(open(samples, "rb").read())
    data[data.find(images) + len(images) - 1] ^= 0xFF
    open(samples, "wb").write(bytes(data))
    extract = inception_features.FeatureExtractor(tiny_inception, 8)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: np.array([0, 1], np.int32))
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # rows 3-5: it reads to the end, where the CRC is
    with pytest.raises(ValueError, match=r"samples.npz is damaged \(BadZipFile: Bad CRC-32"):
        extract(samples)
    monkeypatch.setattr(jax, "process_index", lambda: 0)  # rows 0-2: fine here, stopped with process 1
    with pytest.raises(ValueError, match=r"samples.npz: process 1 of 2 found it damaged \(see that error\)"):
        extract(samples)


def test_processes_reading_other_copies_of_the_evaluations_files_stop_together_before_the_inception(
        tiny_inception, tmp_path, monkeypatch):
    """Each process reads its block of each .npz, and the Inception weights, from its own host's
    copy: a stale samples.npz of 9 images beside process 0's 10 gave blocks of one size, and the
    job wrote process 0's metrics of its images, process 1's stale ones and a padding row without a
    word (9 against 8 crashed in gloo's gather: "Received data size doesn't match"); so did another
    10 images. Copies of the same content (another modification time) pass."""
    import socket

    from conftest import as_process_0_of_2_after_process_1

    class CheckingTheWorkdir(Exception):
        """The job got past its checks of the input files."""

    def check_workdir(workdir):  # (with two fake processes it would wait for process 0's file)
        raise CheckingTheWorkdir

    monkeypatch.setattr(evaluate, "check_shared_workdir", check_workdir)
    samples, reference = str(tmp_path / "samples.npz"), images_npz(tmp_path / "reference.npz", 2, count=10)
    weights = np.load(tiny_inception)
    check = lambda: evaluate.check_inputs(samples, reference, tiny_inception, str(tmp_path / "run"))
    host = socket.gethostname()
    for host_1_count, host_1_seed, host_1_weights, differing in (
            (9, 1, weights, rf"--config.eval.samples {samples} \(images: process 0: 10, process 1: 9\)"),
            (10, 3, weights, rf"--config.eval.samples {samples} \(images: process 0: 10, process 1: 10\)"),
            (10, 1, weights + 1, rf"--config.eval.inception_weights {tiny_inception}\. "),
            (10, 1, weights, None)):
        with monkeypatch.context() as patched:
            images_npz(samples, host_1_seed, count=host_1_count)
            np.save(tiny_inception, host_1_weights)
            as_process_0_of_2_after_process_1(patched, check, CheckingTheWorkdir)
            images_npz(samples, 1, count=10)  # process 0's copies
            np.save(tiny_inception, weights)
            if differing is None:
                with pytest.raises(CheckingTheWorkdir):
                    check()
                continue
            with pytest.raises(ValueError, match=rf"the processes of this job read different copies of their inputs: "
                                                 rf"process 1 of 2 \(on {re.escape(host)}\) reads other content "
                                                 rf"than process 0 \(on {re.escape(host)}\) in {differing}"):
                check()


class RecordedExtractor:
    """A FeatureExtractor whose runs are recorded; each gives the features the real one gave alone."""

    def __init__(self, extract, path):
        self.weights_id, self.widths, self.features, self.runs = extract.weights_id, extract.widths, extract(path), []

    def __call__(self, path):
        self.runs.append(path)
        return self.features


def as_process_of_2(monkeypatch, index, sent_by_process_0=None, failed_elsewhere=0):
    """This process is `index` of 2: process 0's broadcast of an array gives `sent_by_process_0` (on
    process 0 its own value, recorded in the list returned), that of one flag (a file replaced while
    read) 0, and the other process reports `failed_elsewhere`."""
    from jax.experimental import multihost_utils

    sent = []

    def broadcast(value):
        if np.ndim(value) == 0:
            return value if index == 0 else np.zeros_like(value)
        sent.append(np.asarray(value))
        return value if index == 0 else sent_by_process_0

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: np.roll(np.array([flag, failed_elsewhere], np.int32), index))
    return sent


def hidden_from_this_process(monkeypatch, cache, looks=None):
    """The cache file is not there for this process's first `looks` existence checks (None: any)."""
    from pixelflow_jax import storage

    counted = {"looks": 0}

    def hiding(check):
        def seen(path):
            if path == cache and (looks is None or counted["looks"] < looks):
                counted["looks"] += 1
                return False
            return check(path)
        return seen

    for name in ("exists", "isfile"):
        monkeypatch.setattr(storage, name, hiding(getattr(storage, name)))


def images_placed(root, tmp_path, name, seed):
    """The path under `root` (a folder or a gs:// prefix) of an .npz of images moved there whole (images_npz)."""
    from pixelflow_jax import storage

    local, path = images_npz(tmp_path / f"seed{seed}.npz", seed), storage.join(root, name)
    if storage.is_url(path):
        storage.upload_file_atomically(local, path)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local, path)
    return path


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_the_feature_cache_keeps_one_entry_per_images_file(tiny_inception, tmp_path, request, where):
    """The features of samples sampled again at the same path were cached beside the old samples'
    for good (~1 GB at 50k images each): an entry written for a file's current content now removes
    that file's earlier ones, and leaves the reference's and another folder's file of the same name."""
    from pixelflow_jax import storage

    root = request.getfixturevalue("bucket") if where == "bucket" else str(tmp_path)
    cache_dir = storage.join(root, "run", "eval_features")
    extract = inception_features.FeatureExtractor(tiny_inception, 8)
    placed = functools.partial(images_placed, root, tmp_path)
    samples, reference, namesake = placed("samples.npz", 1), placed("reference.npz", 2), placed("other/samples.npz", 3)
    for path in (samples, reference, namesake):
        inception_features.cached_features(extract, path, cache_dir)
    before = set(storage.list_files(cache_dir))
    assert len(before) == 3
    if where == "local":
        os.utime(samples, ns=(0, 10**9))  # old samples' time, so that the new ones' differs on any clock
    placed("samples.npz", 4)  # the same size, new images
    features = inception_features.cached_features(extract, samples, cache_dir)
    after = set(storage.list_files(cache_dir))
    assert len(after) == 3 and len(after - before) == 1 and len(before - after) == 1, (before, after)
    (new_entry,) = after - before
    with storage.open_file(storage.join(cache_dir, new_entry)) as file, np.load(file) as cached:
        np.testing.assert_array_equal(cached["pool"], features["pool"])
    np.testing.assert_array_equal(features["pool"], extract(samples)["pool"])


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_cache_entries_an_earlier_version_named_go_with_the_next_entry_of_their_name(tiny_inception, tmp_path,
                                                                                  request, where):
    """Entries named NAME.KEY.npz (versions before 2026-12-02), which this version never reads,
    stayed for good (~1 GB at 50k images each): writing an entry of a file now removes those of its
    name, and leaves another name's, a writer's temporary and files of other patterns; an images
    file named as another's entries begin (NAME.PATH) removes none of them."""
    from pixelflow_jax import storage

    root = request.getfixturevalue("bucket") if where == "bucket" else str(tmp_path)
    cache_dir = storage.join(root, "run", "eval_features")
    extract = inception_features.FeatureExtractor(tiny_inception, 8)
    samples = images_placed(root, tmp_path, "samples.npz", 1)
    earlier = ["samples.npz.0123456789abcdef.npz", "samples.npz.fedcba9876543210.npz"]
    kept = ["reference.npz.0123456789abcdef.npz", ".samples.npz.0123456789abcdef.npz.tmp-host-12-3f2a",
            "samples.npz.0123456789ABCDEF.npz", "samples.npz.0123abcd.npz", "samples.npz.0123456789abcdef.npz.1",
            "xsamples.npz.0123456789abcdef.npz"]
    for name in earlier + kept:
        storage.write_atomically(storage.join(cache_dir, name), b"features")
    inception_features.cached_features(extract, samples, cache_dir)
    entry = storage.basename(inception_features.cache_file(cache_dir, samples,
                                                           inception_features.feature_cache_key(extract, samples)))
    assert set(storage.list_files(cache_dir)) == {entry, *kept}
    lookalike = images_placed(root, tmp_path, inception_features.cache_entry_prefix(samples).removesuffix("."), 2)
    inception_features.cached_features(extract, lookalike, cache_dir)
    assert entry in storage.list_files(cache_dir)


def test_features_cached_by_another_features_version_are_computed_again(tiny_inception, tmp_path, monkeypatch):
    """FEATURES_VERSION is raised when the features' computation changes: an entry an earlier version
    cached holds the old computation's features, and is neither served nor kept."""
    samples, cache_dir = images_npz(tmp_path / "samples.npz", 1), str(tmp_path / "eval_features")
    extract = RecordedExtractor(inception_features.FeatureExtractor(tiny_inception, 8), samples)
    inception_features.cached_features(extract, samples, cache_dir)
    inception_features.cached_features(extract, samples, cache_dir)
    assert extract.runs == [samples]  # the second served from the cache
    earlier_entry = os.listdir(cache_dir)
    monkeypatch.setattr(inception_features, "FEATURES_VERSION", inception_features.FEATURES_VERSION + 1)
    inception_features.cached_features(extract, samples, cache_dir)
    assert extract.runs == [samples, samples]
    assert len(os.listdir(cache_dir)) == 1 and os.listdir(cache_dir) != earlier_entry


def test_a_folder_in_the_place_of_a_feature_cache_entry_is_named_before_the_inception_pass(tiny_inception, tmp_path):
    """A folder where a file's features are to be cached could not take them once computed: named at
    once, the Inception not run."""
    samples, cache_dir = images_npz(tmp_path / "samples.npz", 1), str(tmp_path / "eval_features")
    extract = RecordedExtractor(inception_features.FeatureExtractor(tiny_inception, 8), samples)
    entry = inception_features.cache_file(cache_dir, samples, inception_features.feature_cache_key(extract, samples))
    os.makedirs(entry)
    with pytest.raises(ValueError, match=re.escape(f"{entry} is a folder, where the evaluation caches the features of "
                                                   f"{samples}: move it away")):
        inception_features.cached_features(extract, samples, cache_dir)
    assert extract.runs == []


@pytest.mark.parametrize("failing", ["remove", "list_files"])
def test_earlier_cache_entries_that_cannot_be_removed_do_not_stop_the_evaluation(tiny_inception, tmp_path,
                                                                                  monkeypatch, caplog, failing):
    """Removing the samples' earlier cache entry (or listing the cache to find it) fails after the
    Inception passes: only a cache, so the metrics are still computed and recorded, with a warning."""
    from pixelflow_jax import storage

    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    workdir = str(tmp_path / "run")
    evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    images_npz(samples, 3)  # sampled again: a new entry, and the earlier one to remove
    cache_dir = os.path.join(workdir, "eval_features")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    real = getattr(storage, failing)
    with monkeypatch.context() as patched, caplog.at_level("WARNING"):
        patched.setattr(storage, failing, lambda path, *a, **k: (denied if path.startswith(cache_dir) else real)(
            path, *a, **k))
        results = evaluate.evaluate(samples, reference, tiny_inception, workdir, batch_size=8)
    assert results["fid"] == evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "fresh"),
                                               batch_size=8)["fid"]
    assert "Permission denied" in caplog.text and "earlier cached features of" in caplog.text
    assert len(os.listdir(cache_dir)) == 3  # the reference's entry and the samples' two


class ReplacedOnRead:
    """A FeatureExtractor whose file a sampling job replaces (moves `replacement` onto it) as its read begins."""

    def __init__(self, extract, replacement):
        self.extract, self.replacement = extract, replacement
        self.weights_id, self.widths = extract.weights_id, extract.widths

    def __call__(self, path):
        os.replace(self.replacement, path)
        return self.extract(path)


@pytest.mark.parametrize("replacement", ["whole", "damaged"])
def test_samples_replaced_while_their_features_are_computed_are_neither_used_nor_cached(
        tiny_inception, tmp_path, replacement):
    """A sampling job moved a new samples.npz into place while an evaluation read the old one: the
    evaluation scored the new file's images (or, read from a bucket by several processes, a mix of
    both) and cached them under the old file's key; or, where the read came out damaged (a bucket's
    file read to its end), said to write the file again. Now it says what happened and caches nothing."""
    samples, cache_dir = images_npz(tmp_path / "samples.npz", 1), str(tmp_path / "run" / "eval_features")
    new = images_npz(tmp_path / "new.npz", 2)
    if replacement == "damaged":
        data = bytearray(open(new, "rb").read())
        data[300] ^= 0xFF  # the CRC check at the member's end fails
        open(new, "wb").write(bytes(data))
    os.utime(samples, ns=(0, 10**9))  # the old file's time, so that the new one's differs on any clock
    extract = ReplacedOnRead(inception_features.FeatureExtractor(tiny_inception, 8), new)
    with pytest.raises(ValueError, match=rf"^{re.escape(samples)} was replaced while its images were read \(by a "
                                         r"sampling job\?\): its features are neither used nor cached; evaluate it "
                                         r"again once it stays as it is$"):
        inception_features.cached_features(extract, samples, cache_dir)
    assert not os.path.exists(cache_dir) or os.listdir(cache_dir) == []


@pytest.mark.parametrize("replaced", ["samples", "reference"])
def test_a_file_replaced_after_its_features_were_read_is_not_scored(tiny_inception, tmp_path, monkeypatch, replaced):
    """A sampling job moved its new samples.npz into place while the reference's features were
    computed: the metrics of the earlier images went into eval.json under the file's name, after
    the job had removed the eval.json it outdated. So did a reference's replaced once its features
    were read (another run's samples sampled again, a download over it), whose stored statistics
    (FID's) are read after them: FID could come from the new file, precision and recall from the old."""
    import ml_collections

    files = {"samples": images_npz(tmp_path / "samples.npz", 1), "reference": images_npz(tmp_path / "reference.npz", 2)}
    new = images_npz(tmp_path / "new.npz", 3)
    features_of = inception_features.cached_features

    def replaced_once_its_features_were_read(extract, path, cache_dir):
        features = features_of(extract, path, cache_dir)
        if path == files[replaced]:
            os.replace(new, path)
        return features

    monkeypatch.setattr(evaluate, "cached_features", replaced_once_its_features_were_read)
    config = ml_collections.ConfigDict(dict(eval=dict(samples=files["samples"], reference=files["reference"],
                                                      inception_weights=tiny_inception, batch_size=8)))
    with pytest.raises(ValueError, match=rf"^{re.escape(files[replaced])} was replaced while it was evaluated \(by a "
                                         r"sampling job\?\): the metrics are not recorded; evaluate it again$"):
        evaluate.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "eval.json").exists()


def test_every_process_of_a_distributed_evaluation_follows_what_process_0_found_in_the_feature_cache(
        tiny_inception, tmp_path, monkeypatch):
    """Each process looked in the cache for itself: one that did not see the file yet (NFS caches
    listings) ran the Inception while the other read the cache, and waited in the gather for a peer
    that never came; one that saw a cache process 0 did not skipped the pass the others made."""
    samples = images_npz(tmp_path / "samples.npz", 1)
    cache_dir = str(tmp_path / "run" / "eval_features")
    extract = RecordedExtractor(inception_features.FeatureExtractor(tiny_inception, 8), samples)
    sent = as_process_of_2(monkeypatch, 0)
    inception_features.cached_features(extract, samples, cache_dir)  # none cached yet: computed, and cached
    inception_features.cached_features(extract, samples, cache_dir)
    assert len(extract.runs) == 1 and [int(row[0]) for row in sent] == [inception_features.ABSENT, inception_features.CACHED]
    (cache,) = (os.path.join(cache_dir, name) for name in os.listdir(cache_dir))

    # Process 1, whose file system shows it the cache file a moment late: read, no Inception pass.
    as_process_of_2(monkeypatch, 1, sent_by_process_0=sent[1])
    hidden_from_this_process(monkeypatch, cache, looks=1)
    features = inception_features.cached_features(extract, samples, cache_dir)
    assert len(extract.runs) == 1
    for name in inception_features.FEATURES:
        np.testing.assert_array_equal(features[name], extract.features[name])

    # Process 0 found no cache (it had not seen it yet): process 1, which sees one, computes with it.
    as_process_of_2(monkeypatch, 1, sent_by_process_0=sent[0])
    inception_features.cached_features(extract, samples, cache_dir)
    assert len(extract.runs) == 2


def test_a_cache_that_one_process_cannot_read_is_computed_again_by_every_process(
        tiny_inception, tmp_path, monkeypatch, caplog):
    """Process 1 does not see the cache file process 0 read, even after the wait: both run the
    Inception (process 0 too, where it used to return its cached features and leave process 1
    waiting in the gather alone)."""
    from pixelflow_jax import multihost

    monkeypatch.setattr(multihost, "SHARED_CHECK_WAIT_S", 0.2)
    samples = images_npz(tmp_path / "samples.npz", 1)
    cache_dir = str(tmp_path / "run" / "eval_features")
    extract = RecordedExtractor(inception_features.FeatureExtractor(tiny_inception, 8), samples)
    sent = as_process_of_2(monkeypatch, 0)
    inception_features.cached_features(extract, samples, cache_dir)
    (cache,) = (os.path.join(cache_dir, name) for name in os.listdir(cache_dir))

    as_process_of_2(monkeypatch, 0, failed_elsewhere=1)
    inception_features.cached_features(extract, samples, cache_dir)
    assert len(extract.runs) == 2 and "process 1 of 2 could not read the cached features" in caplog.text

    caplog.clear()
    as_process_of_2(monkeypatch, 1, sent_by_process_0=np.array([inception_features.CACHED, *sent[0][1:]], np.int32))
    hidden_from_this_process(monkeypatch, cache)
    inception_features.cached_features(extract, samples, cache_dir)
    assert len(extract.runs) == 3 and f"process 1 does not see {cache}" in caplog.text


@pytest.mark.parametrize("stored,message", [
    (dict(mu=np.array([0.0, np.nan]), sigma=np.eye(2)), "its stored mu holds NaN or inf"),
    (dict(mu_s=np.zeros(2), sigma_s=np.array([[1.0, np.inf], [0.0, 1.0]])), "its stored sigma_s holds NaN or inf"),
    (dict(sigma=np.eye(2)), "holds the statistic sigma without mu"),
    (dict(mu=np.zeros(10), sigma=np.eye(10)), r"its stored mu has shape \(10,\), not \(2048,\)"),
    # An FID of 2.2e4 came out of these, without a word.
    (dict(mu=np.zeros(2048), sigma=-np.eye(2048)), "its stored sigma is not a covariance matrix"),
    (dict(mu=np.zeros(2048), sigma=np.triu(np.ones((2048, 2048)))), "its stored sigma is not a covariance matrix"),
    # A traceback (TypeError in isfinite; numpy's ValueError without the file), or taken as complex FID statistics.
    (dict(mu=np.array(["0"] * 2048), sigma=np.eye(2048)), "its stored mu holds <U1 values, not the floating-point"),
    (dict(mu=np.array([None] * 2048), sigma=np.eye(2048)), r"its stored mu cannot be read \(ValueError: Object"),
    (dict(mu=np.zeros(2048, complex), sigma=np.eye(2048)), "its stored mu holds complex128 values"),
    # sFID's pair is checked as FID's is.
    (dict(mu_s=np.zeros(2023)), "holds the statistic mu_s without sigma_s"),
    (dict(mu_s=np.zeros(2023), sigma_s=-np.eye(2023)), "its stored sigma_s is not a covariance matrix"),
])
def test_reference_statistics_that_are_not_finite_or_half_there_are_refused(tmp_path, stored, message):
    reference = images_npz(tmp_path / "reference.npz", 0, **stored)
    with pytest.raises(ValueError, match=f"{reference}.*{message}"):
        evaluate.reference_statistics(reference, dict(pool=np.eye(3, 2), spatial=np.eye(3, 2)))


def test_a_damaged_stored_statistic_is_named_with_its_file_not_a_traceback(tmp_path):
    """zipfile's BadZipFile (a CRC error) is no ValueError: --mode=eval printed a traceback."""
    reference = images_npz(tmp_path / "reference.npz", 0, mu=np.zeros(2048), sigma=np.eye(2048))
    data = bytearray(open(reference, "rb").read())
    data[data.index(b"sigma.npy") + 5000] ^= 0xFF  # inside sigma's values, which the header check never reads
    open(reference, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=rf"{reference}: its stored sigma cannot be read \(BadZipFile: Bad CRC-32"):
        evaluate.stored_statistics(reference)


def test_non_finite_features_or_metrics_are_errors_and_never_reach_eval_json(tiny_inception, tmp_path, monkeypatch):
    import ml_collections

    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    workdir = str(tmp_path / "run")
    config = ml_collections.ConfigDict(dict(eval=dict(samples=samples, reference=reference,
                                                      inception_weights=tiny_inception, batch_size=8)))
    with monkeypatch.context() as patch:  # a NaN from anywhere: the last check before eval.json
        patch.setattr(metrics, "inception_score", lambda logits: float("nan"))
        with pytest.raises(ValueError, match="inception_score came out NaN or inf"):
            evaluate.run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "eval.json"))

    np.save(tiny_inception, np.full((6, 8), np.nan))  # broken weights: features refused, not cached
    with pytest.raises(ValueError, match=f"features of {samples} hold NaN or inf: check the Inception weights"):
        evaluate.run(config, str(tmp_path / "broken"))
    assert not (tmp_path / "broken" / "eval_features").exists()


def test_samples_and_reference_at_different_resolutions_get_a_warning(tiny_inception, tmp_path, caplog):
    reference = images_npz(tmp_path / "reference.npz", 2, size=8)
    wide = tmp_path / "samples_8x12.npz"  # as high as the reference, wider
    np.savez(wide, arr_0=np.random.default_rng(1).integers(0, 256, (6, 8, 12, 3), dtype=np.uint8))
    for samples, size in ((images_npz(tmp_path / "samples_8.npz", 1), None),
                          (images_npz(tmp_path / "samples_16.npz", 1, size=16), "16x16"), (str(wide), "8x12")):
        caplog.clear()
        evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "run"), batch_size=8)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == ([] if size is None else [
            f"the samples {samples} are {size} px but the reference {reference} holds 8x8 px images: the metrics "
            "compare different resolutions (both are resized to 299 px for the Inception)"])


def test_a_workdir_that_cannot_be_written_fails_before_any_work(tiny_inception, tmp_path, monkeypatch):
    from pixelflow_jax import storage
    from pixelflow_jax.evaluation import inception_convert

    samples = images_npz(tmp_path / "samples.npz", 1)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(inception_convert, "load_inception", lambda path: pytest.fail("work before the check"))
    with pytest.raises(storage.StorageError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        evaluate.evaluate(samples, samples, tiny_inception, str(tmp_path / "file"), batch_size=8)


def test_an_input_one_process_finds_missing_or_wrong_stops_every_process_with_it(tiny_inception, tmp_path,
                                                                                  monkeypatch):
    """Each process checks the files it sees: process 1, whose host lacked the reference, stopped
    alone while process 0 went on into its next collective, and said only that a peer was gone."""
    samples = images_npz(tmp_path / "samples.npz", 1)
    workdir = str(tmp_path / "run")
    as_process_of_2(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"--config.eval.reference .*nowhere.npz is not found"):
        evaluate.check_inputs(samples, str(tmp_path / "nowhere.npz"), tiny_inception, workdir)
    as_process_of_2(monkeypatch, 0, failed_elsewhere=1)  # the files are fine here, not on process 1
    with pytest.raises(ValueError, match=r"^process 1 of 2 stopped checking the evaluation's input files \(its error "
                                         r"says why\)$"):
        evaluate.check_inputs(samples, samples, tiny_inception, workdir)


def test_an_npz_without_arr_0_names_the_arrays_it_has(tmp_path):
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"has no arr_0 array of images \(its arrays: images, labels\); write "
                                         r"the images as arr_0"):
        npz_images.npz_image_count(str(tmp_path / "images.npz"))
    import torch  # a torch file is a zip too: its hundreds of members were listed as arrays

    torch.save({f"w{i}": torch.zeros(1) for i in range(50)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt is a zip archive but not an .npz \(it holds model/data.pkl and "
                                         r"\d+ more files\); pass the .npz of images"):
        npz_images.npz_image_count(str(tmp_path / "model.pt"))


def test_damaged_images_or_cache_files_are_named_or_computed_again(tiny_inception, tmp_path, caplog):
    """A CRC error or a cut-off arr_0 was a zipfile traceback or a reshape error naming no file; a
    damaged feature cache a numpy traceback."""
    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    data = bytearray(open(samples, "rb").read())
    data[300] ^= 0xFF  # inside arr_0's data: the zip's CRC no longer matches
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{damaged} is damaged .*CRC"):
        list(npz_images.npz_batches(str(damaged), 4))
    with zipfile.ZipFile(samples) as archive:
        header_and_half = archive.read("arr_0.npy")[:128 + 3 * 8 * 8 * 3]
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as archive:
        archive.writestr("arr_0.npy", header_and_half)
    with pytest.raises(ValueError, match=f"{short} is truncated: arr_0 ends after 3 of its 6 images"):
        list(npz_images.npz_batches(str(short), 4))

    workdir = tmp_path / "run"
    first = evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=8)
    for cache in (workdir / "eval_features").iterdir():
        cache.write_bytes(b"garbage")
    again = evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=8)
    assert again["fid"] == first["fid"] and "cannot be read" in caplog.text

    # Files that read but are not the features of these images: cut, altered, of another width.
    for alter, problem in ((lambda f: f[:4], r"hold pool of shape \(4, \d+\), not \(6, \d+\)"),
                           (lambda f: np.where(f > 0, np.nan, f), "hold NaN or inf in pool"),
                           (lambda f: f[:, :3], r"hold pool of shape \(6, 3\)")):
        for cache in (workdir / "eval_features").iterdir():
            with np.load(cache) as f:
                features = dict(f)
            np.savez(cache, **{**features, "pool": alter(features["pool"])})
        caplog.clear()
        again = evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=8)
        assert again["fid"] == first["fid"] and re.search(problem, caplog.text), caplog.text
    cache = next((workdir / "eval_features").iterdir())
    cache.unlink()
    cache.mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(str(cache))} is a folder, where the evaluation caches"):
        evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=8)


def test_a_damaged_compressed_npz_is_named_not_a_zlib_traceback(tmp_path):
    """np.savez_compressed's deflate stream, damaged, raises zlib.error (no OSError): --mode=eval
    printed a traceback, for the images' header or a stored statistic."""
    path = tmp_path / "images.npz"
    np.savez_compressed(path, arr_0=np.zeros((40, 32, 32, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    data = open(path, "rb").read()
    with zipfile.ZipFile(path) as archive:
        starts = {info.filename: info.header_offset + 30 + len(info.filename) for info in archive.infolist()}
    for member, read, message in (("arr_0.npy", npz_images.npz_image_count, " is damaged"),
                                  ("sigma.npy", evaluate.stored_statistics, ": its stored sigma cannot be read")):
        damaged = bytearray(data)
        start = starts[member] + 10  # inside the first deflate block
        damaged[start:start + 20] = bytes(b ^ 0x5A for b in damaged[start:start + 20])
        (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=rf"damaged.npz{message} \(error: Error -3 while decompressing data"):
            read(str(tmp_path / "damaged.npz"))


def test_every_evaluation_is_kept_in_the_history_and_other_images_of_the_same_size_are_not_served_from_cache(
        tiny_inception, tmp_path):
    import ml_collections

    workdir = str(tmp_path / "run")
    reference = images_npz(tmp_path / "reference.npz", 2)
    samples = images_npz(tmp_path / "samples.npz", 1)
    config = ml_collections.ConfigDict(dict(eval=dict(samples=samples, reference=reference,
                                                      inception_weights=tiny_inception, batch_size=8)))
    first = evaluate.run(config, workdir)
    stat = os.stat(samples)
    images_npz(samples, 3)  # other images, the same size, and (a copy keeping times) the same mtime
    os.utime(samples, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = evaluate.run(config, workdir)
    assert second["fid"] != first["fid"]
    history = [json.loads(line) for line in open(os.path.join(workdir, "eval_history.jsonl"))]
    assert [h["fid"] for h in history] == [first["fid"], second["fid"]]
    assert json.load(open(os.path.join(workdir, "eval.json")))["fid"] == second["fid"]


def test_eval_reports_the_image_counts_it_read_from_each_file(tiny_inception, tmp_path, caplog):
    """num_samples and num_reference are the images read, each from its own file: here a sampling job
    asks for 10 images and its samples.npz, named on purpose, holds the 7 sampled so far."""
    import ml_collections

    job = tmp_path / "run"
    (job / "samples").mkdir(parents=True)
    (job / "samples" / "settings.json").write_text(json.dumps({"num_images": 10}))
    samples = images_npz(job / "samples.npz", 1, count=7)
    reference = images_npz(tmp_path / "reference.npz", 2, count=9)
    config = ml_collections.ConfigDict(dict(eval=dict(samples=samples, reference=reference,
                                                      inception_weights=tiny_inception, batch_size=8)))
    with caplog.at_level("WARNING"):
        results = evaluate.run(config, str(job))
    assert "holds 7 images, but this workdir's sampling job asks for 10" in caplog.text
    assert (results["num_samples"], results["num_reference"]) == (7, 9)
    recorded = json.loads((job / "eval.json").read_text())
    assert (recorded["num_samples"], recorded["num_reference"]) == (7, 9)
    assert recorded["features_version"] == inception_features.FEATURES_VERSION


def test_eval_json_records_the_digests_of_its_files_its_batch_the_cache_and_the_software(tiny_inception, tmp_path):
    """eval.json named the files by path only: a samples.npz or reference written again since
    left no way to tell which images a number came from, nor which batch and versions computed it."""
    import zipfile
    import zlib

    import ml_collections

    workdir = str(tmp_path / "run")
    reference = images_npz(tmp_path / "reference.npz", 2)
    samples = images_npz(tmp_path / "samples.npz", 1)
    config = ml_collections.ConfigDict(dict(eval=dict(samples=samples, reference=reference,
                                                      inception_weights=tiny_inception, batch_size=8)))
    first = evaluate.run(config, workdir)
    images_crc = lambda path: f"{zlib.crc32(zipfile.ZipFile(path).read('arr_0.npy')):08x}"
    assert (first["samples_crc32"], first["reference_crc32"]) == (images_crc(samples), images_crc(reference))
    assert first["reference_statistics_crc32"] == {}  # none stored: FID's came from its images
    assert first["batch_size"] == 8 and first["features_from_cache"] == {"samples": False, "reference": False}
    assert first["environment"]["packages"]["numpy"] == np.__version__
    assert first["environment"]["devices"]["backend"] == "cpu" and first["command"]
    assert first["environment"]["settings"] == job_environment()["settings"]
    second = evaluate.run(config, workdir)  # the same files: their features read from the cache
    assert second["features_from_cache"] == {"samples": True, "reference": True}
    history = [json.loads(line) for line in open(os.path.join(workdir, "eval_history.jsonl"))]
    assert [line["features_from_cache"]["samples"] for line in history] == [False, True]
    assert json.load(open(os.path.join(workdir, "eval.json")))["samples_crc32"] == images_crc(samples)


def test_eval_json_says_of_each_file_alone_whether_its_features_were_cached_and_names_the_references_statistics(
        tmp_path):
    """The samples' features computed and the reference's read from the cache (a new samples.npz
    against the reference of an earlier evaluation), and statistics stored in the reference only:
    each field follows its own file, which two runs over the same pair could not tell apart."""
    from types import SimpleNamespace

    samples = images_npz(tmp_path / "samples.npz", 1)
    reference = images_npz(tmp_path / "reference.npz", 2, mu=np.zeros(3), sigma=np.eye(3))
    extract = SimpleNamespace(batch_size=16, computed={samples})
    record = evaluate.what_produced_the_metrics(extract, (samples, 0xAB), (reference, 0x12345678))
    assert record["features_from_cache"] == {"samples": False, "reference": True}
    assert (record["samples_crc32"], record["reference_crc32"]) == ("000000ab", "12345678")
    assert record["reference_statistics_crc32"] == evaluate.stored_statistics_crc32(reference)
    assert set(record["reference_statistics_crc32"]) == {"mu", "sigma"} and record["batch_size"] == 16


def test_the_stored_statistics_of_a_reference_are_named_with_their_crc32(tmp_path):
    import zipfile
    import zlib

    path = images_npz(tmp_path / "reference.npz", 0, mu=np.zeros(3), sigma=np.eye(3))
    crc = lambda member: f"{zlib.crc32(zipfile.ZipFile(path).read(member)):08x}"
    assert evaluate.stored_statistics_crc32(path) == {"mu": crc("mu.npy"), "sigma": crc("sigma.npy")}
    assert evaluate.statistics_stored_in(path) == ["mu", "sigma"]


def test_eval_reports_precision_as_the_samples_share_and_recall_as_the_references(tiny_inception, tmp_path):
    """Samples all near one reference image: every sample lies in the reference's manifold
    (precision 1), while the samples' tiny balls hold few reference images (recall low)."""
    import ml_collections

    reference = images_npz(tmp_path / "reference.npz", 2, count=20)
    near_one = np.load(reference)["arr_0"][:1].astype(int) + np.random.default_rng(4).integers(-1, 2, (20, 8, 8, 3))
    np.savez(tmp_path / "samples.npz", arr_0=np.clip(near_one, 0, 255).astype(np.uint8))
    config = ml_collections.ConfigDict(dict(eval=dict(samples=str(tmp_path / "samples.npz"), reference=reference,
                                                      inception_weights=tiny_inception, batch_size=8)))
    results = evaluate.run(config, str(tmp_path / "run"))
    assert results["precision"] == 1.0 and results["recall"] <= 0.2, results


def test_each_metric_of_eval_is_computed_from_the_features_it_belongs_to(tiny_inception, tmp_path, monkeypatch):
    """Fixed features per file, so each reported number can be recomputed from its own inputs:
    FID and sFID compare the two sets, the Inception Score is the samples' alone."""
    import ml_collections

    rng = np.random.default_rng(6)
    features = {name: {"pool": random_features(rng, 40, 6, shift=shift), "spatial": random_features(rng, 40, 5),
                       "logits": rng.normal(size=(40, 7)) * scale}
                for name, shift, scale in (("samples.npz", 0.0, 1.0), ("reference.npz", 0.4, 3.0))}
    monkeypatch.setattr(evaluate, "cached_features", lambda extract, path, cache_dir: features[os.path.basename(path)])
    for name in features:
        images_npz(tmp_path / name, 7, count=40)
    config = ml_collections.ConfigDict(dict(eval=dict(samples=str(tmp_path / "samples.npz"),
                                                      reference=str(tmp_path / "reference.npz"),
                                                      inception_weights=tiny_inception, batch_size=8)))
    results = evaluate.run(config, str(tmp_path / "run"))
    samples, reference = features["samples.npz"], features["reference.npz"]
    statistics = lambda kind: (*metrics.gaussian_statistics(samples[kind]),
                               *metrics.gaussian_statistics(reference[kind]))
    assert results["fid"] == pytest.approx(adm_frechet_distance(*statistics("pool")), rel=1e-8)
    assert results["sfid"] == pytest.approx(adm_frechet_distance(*statistics("spatial")), rel=1e-8)
    assert results["inception_score"] == metrics.inception_score(samples["logits"]) != metrics.inception_score(
        reference["logits"])
    assert (results["precision"], results["recall"]) == metrics.precision_recall(reference["pool"], samples["pool"])


def test_a_sampling_job_that_ends_with_an_evaluation_reads_its_inputs_before_sampling(tmp_path):
    """Only the files' existence was checked: a damaged reference or weights file stopped the job
    after hours of sampling."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not a torch file")
    good = images_npz(tmp_path / "reference.npz", 2)
    statistics = images_npz(tmp_path / "statistics.npz", 2, mu=np.zeros(10), sigma=np.eye(10))
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((6, 8, 8, 3), np.float32))
    for reference, error, message in ((str(floats), ValueError, "must be uint8 images"),
                                      (statistics, ValueError, "stored mu has shape"),
                                      (good, CheckpointError, "inception.pth")):
        with pytest.raises(error, match=message):
            evaluate.check_inputs(None, reference, str(weights), str(tmp_path / "run"))
    (tmp_path / "weights_folder").mkdir()
    with pytest.raises(CheckpointError, match=r"weights_folder is a folder, not the weights file: download"):
        evaluate.check_inputs(None, good, str(tmp_path / "weights_folder"), str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"inception.pth/ not found \(the / at its end names a folder, and "
                                              r".*inception.pth is a file: drop the /\): download"):
        evaluate.check_inputs(None, good, f"{weights}/", str(tmp_path / "run"))  # a shell's completion
    with pytest.raises(ValueError, match="set --config.eval.reference, --config.eval.samples, "
                                         "--config.eval.inception_weights"):
        evaluate.check_inputs("", "", "", str(tmp_path / "run"))
    # A sampling job's folder of PNGs given as the samples: the .npz it packed them into is named
    job = tmp_path / "job"
    (job / "samples").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"samples is a folder, not an .npz file; a sampling job packs its images into "
                                         r"WORKDIR/samples.npz, and other images go into one with numpy.savez"):
        evaluate.check_inputs(str(job / "samples"), good, str(weights), str(tmp_path / "run"))
    images_npz(job / "samples.npz", 2)
    for folder in (job, job / "samples", f"{job / 'samples'}/"):  # with the / a shell completes a folder with
        with pytest.raises(ValueError, match=rf"is a folder, not an .npz file \(pass {job / 'samples.npz'}, the "
                                             r"images a sampling job packed\)"):
            evaluate.check_inputs(str(folder), good, str(weights), str(tmp_path / "run"))
    # A shell's completion left a / after the file's name: it was only 'not found'
    for samples, reference in ((f"{job / 'samples.npz'}/", good), (str(job / "samples.npz"), f"{good}/")):
        with pytest.raises(ValueError, match=rf"{re.escape(samples if samples.endswith('/') else reference)} is not "
                                             rf"found.* \(the / at its end names a folder, and .*\.npz is a file: drop "
                                             r"the /\)$"):
            evaluate.check_inputs(samples, reference, str(weights), str(tmp_path / "run"))


def test_a_reference_holding_the_samples_own_images_is_said_to_measure_nothing(tiny_inception, tmp_path, caplog):
    """samples.npz given as the reference too printed FID 0, precision and recall 1 without a word."""
    import shutil

    samples = images_npz(tmp_path / "samples.npz", 1)
    shutil.copy(samples, tmp_path / "copy.npz")
    for reference, same in ((samples, True), (str(tmp_path / "copy.npz"), True),
                            (images_npz(tmp_path / "other.npz", 2), False)):
        caplog.clear()
        evaluate.evaluate(samples, reference, tiny_inception, str(tmp_path / "run"), batch_size=8)
        assert ("hold the same images (their shapes and CRCs agree): the metrics are those of a perfect match"
                in caplog.text) == same, caplog.text


def test_a_samples_npz_past_its_jobs_count_is_unfinished_and_a_record_without_a_count_is_no_job(tmp_path):
    """A samples.npz of more images than the workdir's job records is no finished output of that job
    either (a check of fewer images only passed it, and its extra images were scored)."""
    (tmp_path / "samples").mkdir()
    images_npz(tmp_path / "samples.npz", 1, count=6)
    for asked in (6, 4, 8):
        (tmp_path / "samples" / "settings.json").write_text(json.dumps({"num_images": asked}))
        if asked == 6:
            assert evaluate.samples_to_evaluate("", str(tmp_path)) == str(tmp_path / "samples.npz")
            continue
        with pytest.raises(ValueError, match=f"samples.npz holds 6 images, but this workdir's sampling job asks for "
                                             f"{asked} .*it has not finished"):
            evaluate.samples_to_evaluate("", str(tmp_path))
    # A settings.json that records no count (damaged, or another program's) is no job to compare with.
    for text in ("{}", '["num_images"]', '{"num_images": null}', '{"num_images": "six"}', '{"num_images": 4'):
        (tmp_path / "samples" / "settings.json").write_text(text)
        assert evaluate.samples_to_evaluate("", str(tmp_path)) == str(tmp_path / "samples.npz")


def test_another_workdirs_unfinished_samples_npz_is_evaluated_with_a_warning_as_this_ones(tmp_path, caplog):
    """The samples.npz of a sampling job extended and stopped part-way, named from another workdir (an
    evaluation of its own, one per reference), scored the earlier, smaller set without a word: the
    job's own workdir warned of it."""
    job = tmp_path / "fid_run"
    (job / "samples").mkdir(parents=True)
    samples = images_npz(job / "samples.npz", 1, count=6)
    elsewhere = str(tmp_path / "eval_run")
    for asked, warned in ((6, False), (12, True)):
        (job / "samples" / "settings.json").write_text(json.dumps({"num_images": asked}))
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert evaluate.samples_to_evaluate(samples, elsewhere) == samples
        assert (f"samples.npz holds 6 images, but the sampling job of {job} asks for 12" in caplog.text) == warned
        assert ("evaluated anyway, as --config.eval.samples names it" in caplog.text) == warned
    renamed = images_npz(job / "more.npz", 1, count=6)  # no sampling job writes another name
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "samples").write_text("a file, in a folder no sampling job worked in")
    beside_a_file = images_npz(tmp_path / "notes" / "samples.npz", 1, count=6)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert evaluate.samples_to_evaluate(renamed, elsewhere) == renamed
        assert evaluate.samples_to_evaluate(beside_a_file, elsewhere) == beside_a_file
    assert not caplog.text


def test_stored_reference_statistics_are_used_and_missing_ones_computed(tmp_path, monkeypatch):
    """A reference .npz with mu / sigma gives FID its own statistics, not those of its images'
    features; without mu_s / sigma_s the sFID statistics come from the spatial features."""
    monkeypatch.setattr(evaluate, "STATISTICS_SHAPES", {"mu": (3,), "sigma": (3, 3), "mu_s": (2,), "sigma_s": (2, 2)})
    rng = np.random.default_rng(8)
    mu, sigma = rng.normal(size=3), np.diag([1.0, 2.0, 3.0])
    reference = images_npz(tmp_path / "reference.npz", 0, mu=mu, sigma=sigma)
    features = dict(pool=rng.normal(size=(10, 3)), spatial=rng.normal(size=(10, 2)))
    (got_mu, got_sigma), (mu_s, sigma_s) = evaluate.reference_statistics(reference, features)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.testing.assert_allclose(mu_s, features["spatial"].mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma_s, np.cov(features["spatial"].T), rtol=1e-12)
    # With mu_s / sigma_s stored too, sFID takes them, not the spatial features' statistics.
    stored_s = dict(mu_s=rng.normal(size=2), sigma_s=np.diag([4.0, 5.0]))
    reference = images_npz(tmp_path / "reference.npz", 0, mu=mu, sigma=sigma, **stored_s)
    (got_mu, _), (mu_s, sigma_s) = evaluate.reference_statistics(reference, features)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(mu_s, stored_s["mu_s"])
    np.testing.assert_array_equal(sigma_s, stored_s["sigma_s"])


def test_statistics_stored_in_float16_or_float32_are_covariances_still(tmp_path, monkeypatch):
    """Rounding a singular covariance (fewer images than features) to float16 puts its zero
    eigenvalues at -5e-4 of its largest entry: float16 statistics were refused as 'not a
    covariance matrix', though they move FID by a few millionths. A negative one still is refused."""
    monkeypatch.setattr(evaluate, "STATISTICS_SHAPES", {"mu": (64,), "sigma": (64, 64)})
    mu, sigma = metrics.gaussian_statistics(np.random.default_rng(9).random((20, 64)))
    for dtype in (np.float16, np.float32):
        stored = evaluate.stored_statistics(images_npz(tmp_path / "reference.npz", 0, mu=mu.astype(dtype),
                                                       sigma=sigma.astype(dtype)))
        np.testing.assert_array_equal(stored["sigma"], sigma.astype(dtype))
    negative = sigma - 0.01 * np.abs(sigma).max() * np.eye(64)  # a variance below 0, past float16's rounding
    with pytest.raises(ValueError, match="its stored sigma is not a covariance matrix"):
        evaluate.stored_statistics(images_npz(tmp_path / "reference.npz", 0, mu=mu.astype(np.float16),
                                              sigma=negative.astype(np.float16)))


def test_statistics_computed_in_float32_arithmetic_are_covariances_still(tmp_path):
    """A covariance of 500 images' correlated features computed in float32 (a torch or jax script's
    own reference statistics) has zero eigenvalues at -2e-6 of its largest entry, stored in float32
    or float64: refused as 'not a covariance matrix'. One with a variance clearly below 0 still is."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 2048)) * 0.1 + rng.random((500, 2048)) * 0.3
    centred = np.maximum(features, 0).astype(np.float32)
    centred -= centred.mean(0)
    sigma = (centred.T @ centred) / np.float32(499)
    mu = np.zeros(2048, np.float32)
    for dtype in (np.float32, np.float64):
        evaluate.stored_statistics(images_npz(tmp_path / "reference.npz", 0, mu=mu, sigma=sigma.astype(dtype)))
    negative = sigma.astype(np.float64) - 1e-3 * np.abs(sigma).max() * np.eye(2048)
    with pytest.raises(ValueError, match="its stored sigma is not a covariance matrix"):
        evaluate.stored_statistics(images_npz(tmp_path / "reference.npz", 0, mu=mu, sigma=negative))


def test_npz_batches_from_a_middle_row_read_every_row_once_in_order(tmp_path):
    """A process's block [first, stop) read in batches smaller than the block: the skip to `first`
    happens once, the last batch is partial, and rows after `stop` are not read."""
    path = images_npz(tmp_path / "images.npz", 3, size=4, count=11)
    with np.load(path) as f:
        images = f["arr_0"]
    for compressed in (False, True):
        if compressed:
            np.savez_compressed(path, arr_0=images)
        batches = list(npz_images.npz_batches(path, 3, first=2, stop=10))
        assert [len(b) for b in batches] == [3, 3, 2]
        np.testing.assert_array_equal(np.concatenate(batches), images[2:10])
        np.testing.assert_array_equal(np.concatenate(list(npz_images.npz_batches(path, 4))), images)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_arr_0_shorter_than_its_header_says_is_truncated_after_the_rows_it_holds_for_every_block(tmp_path,
                                                                                                    compression):
    """A header of 10 images over the data of 6, read as the blocks of a distributed job read it: a
    block that begins past the data (its skip came up short) named the end at its own first row, and
    a skip that stopped short could have looped for good."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10, 8, 8, 3)})
    path = str(tmp_path / "short.npz")
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("arr_0.npy", header.getvalue() + np.full((6, 8, 8, 3), 9, np.uint8).tobytes())
    for first, stop in ((0, 10), (4, 10), (8, 10), (8, 9)):
        with pytest.raises(ValueError, match=r"short.npz is truncated: arr_0 ends after 6 of its 10 images"):
            list(npz_images.npz_batches(path, 2, first, stop))


def test_the_feature_batch_rounds_up_to_a_multiple_of_the_devices(tiny_inception, tmp_path):
    """batch_size 3 on 8 devices is 8 (rounded down it was 0); every image's features come back,
    the padding rows of the last batch dropped."""
    extract = inception_features.FeatureExtractor(tiny_inception, 3)
    assert extract.batch_size == 8 and inception_features.FeatureExtractor(tiny_inception, 9).batch_size == 16
    path = images_npz(tmp_path / "images.npz", 4, count=11)
    features = extract(path)
    with np.load(path) as f:
        expected = np.asarray(TinyInception(np.load(tiny_inception))(jnp.asarray(f["arr_0"], jnp.float32))[0])
    np.testing.assert_allclose(features["pool"], expected, rtol=1e-5, atol=1e-6)


def test_floats_cast_to_uint8_without_scaling_are_refused_before_any_work(tiny_inception, tmp_path):
    """x.astype(np.uint8) of images in [0, 1] or [-1, 1] leaves 0 and 1 (and -1 as 255): evaluated
    as near-black images, with an FID of hundreds and no word; floats that never reach 1 or -1 cast
    to black images. Black-and-white images pass."""
    floats = np.random.default_rng(0).random((20, 8, 8, 3))
    floats[:, 0, 0], floats[:, 0, 1] = 1.0, 0.0  # white and black pixels exactly (black in [-1, 1] casts to 255)
    reference = images_npz(tmp_path / "reference.npz", 1)
    for name, images, values in (("unit", floats, "[0, 1]"), ("signed", floats * 2 - 1, "[0, 1, 255]")):
        np.savez(tmp_path / f"{name}.npz", arr_0=images.astype(np.float32).astype(np.uint8))
        with pytest.raises(ValueError, match=re.escape(f"{name}.npz: its first 16 images hold only the pixel values "
                                                       f"{values}: floats in [0, 1] or [-1, 1] cast to uint8 without "
                                                       "scaling them to 0-255? Write them again from the floats: "
                                                       "convert images in [0, 1] with (x * 255)")):
            evaluate.check_inputs(str(tmp_path / f"{name}.npz"), reference, tiny_inception, str(tmp_path / "run"))
    # given as the reference too
    with pytest.raises(ValueError, match=re.escape("unit.npz: its first 16 images hold only the pixel values [0, 1]")):
        evaluate.check_inputs(reference, str(tmp_path / "unit.npz"), tiny_inception, str(tmp_path / "run"))
    # Floats that never reach 1 or -1 exactly (a tanh's or sigmoid's, unclipped) cast to black images alone:
    # they passed, and scored as a set of black images.
    open_interval = np.random.default_rng(1).uniform(0.01, 0.99, (20, 8, 8, 3))
    for name, images in (("open_unit", open_interval), ("open_signed", open_interval * 2 - 1)):
        np.savez(tmp_path / f"{name}.npz", arr_0=images.astype(np.float32).astype(np.uint8))
        with pytest.raises(ValueError, match=re.escape(f"{name}.npz: its first 16 images are black (every pixel 0): "
                                                       "floats in [0, 1] or [-1, 1] cast to uint8 without scaling "
                                                       "them to 0-255? Write them again from the floats: convert")
                           + r".*\); or the model draws only black: look at its images$"):
            evaluate.check_inputs(str(tmp_path / f"{name}.npz"), reference, tiny_inception, str(tmp_path / "run"))
    np.savez(tmp_path / "ink.npz", arr_0=((floats[:6] > 0.5) * 255.0).astype(np.uint8))  # black and white images
    evaluate.check_inputs(str(tmp_path / "ink.npz"), reference, tiny_inception, str(tmp_path / "run"))
    # One black image (a night sky) among the first 16 is no black file.
    night = np.random.default_rng(2).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    night[0] = 0
    np.savez(tmp_path / "night.npz", arr_0=night)
    evaluate.check_inputs(str(tmp_path / "night.npz"), reference, tiny_inception, str(tmp_path / "run"))


def test_a_file_of_k_images_is_refused_before_any_work(tmp_path):
    """Precision and recall need more than k = 3 images (a ball reaches neighbour number 3): a file
    of 3 is refused when its header is read, 4 pass."""
    with pytest.raises(ValueError, match=r"holds 3 images: precision and recall need more than 3"):
        npz_images.npz_image_count(images_npz(tmp_path / "three.npz", 0, count=3))
    assert npz_images.npz_image_count(images_npz(tmp_path / "four.npz", 0, count=4)) == 4


def test_rgb_images_1_3_or_4_pixels_high_are_not_taken_for_channels_first():
    """(N, 3, W, 3) is RGB images 3 pixels high as much as anything: only a last axis of other than 3
    makes a channel count of 1, 3 or 4 on axis 1 channels first."""
    for height in sorted(npz_images.CHANNELS_FIRST_FIXES):
        npz_images.check_images("strips.npz", (5, height, 8, 3), False, np.dtype(np.uint8))
        with pytest.raises(ValueError, match=rf"got channels first \(5, {height}, 8, 8\)"):
            npz_images.check_images("planes.npz", (5, height, 8, 8), False, np.dtype(np.uint8))


def test_images_in_0_1_converted_as_if_in_minus_1_1_get_a_warning(tiny_inception, tmp_path, caplog):
    """((x + 1) * 127.5) of images in [0, 1] leaves every pixel at 127 or above: washed-out images,
    scored without a word. A statistical sign, not a proof (a set of bright images may hold no
    darker pixel), so a warning that names the conversion, not a refusal."""
    reference = images_npz(tmp_path / "reference.npz", 2)
    unit = np.random.default_rng(0).random((20, 8, 8, 3))
    np.savez(tmp_path / "washed.npz", arr_0=((unit + 1) * 127.5).round().astype(np.uint8))
    unit[0, 0, 0, 0] = 0.0  # a black pixel, which astype truncates to 127: as washed out
    np.savez(tmp_path / "washed_cast.npz", arr_0=((unit + 1) * 127.5).astype(np.uint8))
    darker = ((unit + 1) * 127.5).round().astype(np.uint8)
    darker[0, 0, 0, 0] = 126  # one pixel below 127: not what the conversion makes
    np.savez(tmp_path / "darker.npz", arr_0=darker)
    with caplog.at_level("WARNING"):
        for name in ("washed", "washed_cast", "darker"):
            evaluate.check_inputs(str(tmp_path / f"{name}.npz"), reference, tiny_inception, str(tmp_path / "run"))
        evaluate.check_inputs(images_npz(tmp_path / "samples.npz", 1), reference, tiny_inception, str(tmp_path / "run"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{tmp_path / name}: its first 16 images hold no pixel value below {low}: images in "
                        "[0, 1] converted as if in [-1, 1], with (x + 1) * 127.5? Write them again with "
                        "(x * 255).round().clip(0, 255).astype(np.uint8); they are evaluated as they are"
                        for name, low in (("washed.npz", 128), ("washed_cast.npz", 127))], warnings


def test_samples_holding_a_reference_batchs_statistics_against_a_reference_without_are_said_swapped(
        tiny_inception, tmp_path, caplog, monkeypatch):
    """ADM's reference batches carry mu and sigma, sample batches do not: given the other way round,
    precision and recall traded places and the Inception Score was the reference's, without a word."""
    statistics = dict(mu=np.zeros(2048), sigma=np.eye(2048))
    reference_batch = images_npz(tmp_path / "VIRTUAL_reference.npz", 2, **statistics)
    samples = images_npz(tmp_path / "samples.npz", 1)
    # (the stand-in Inception's features are 8 wide: the stored 2048-d statistics are not compared with them)
    monkeypatch.setattr(evaluate, "reference_statistics", lambda path, features: (
        metrics.gaussian_statistics(features["pool"]), metrics.gaussian_statistics(features["spatial"])))
    for given_samples, given_reference, warned in ((reference_batch, samples, True), (samples, reference_batch, False),
                                                   (reference_batch, reference_batch, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate.evaluate(given_samples, given_reference, tiny_inception, str(tmp_path / "run"), batch_size=8)
        swapped = [r.getMessage() for r in caplog.records if "swapped" in r.getMessage()]
        assert swapped == ([f"the samples {reference_batch} hold stored statistics (mu, sigma), as ADM's reference "
                            f"batches do, and the reference {samples} holds none: are the two swapped? Precision and "
                            "recall trade places and the Inception Score is that of the other set when they are "
                            "(--config.eval.samples is the generated images, --config.eval.reference the real "
                            "ones)"] if warned else []), swapped


def test_a_rerun_removes_what_an_evaluation_killed_while_writing_left(tiny_inception, tmp_path):
    """A kill while the feature cache (about 1 GB for 50k images) or eval.json was written left its
    temporary file, and no later evaluation removed it; another writer's, still running, is kept."""
    samples, reference = images_npz(tmp_path / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    workdir = tmp_path / "run"
    (workdir / "eval_features").mkdir(parents=True)
    killed = [workdir / "eval_features" / ".samples.npz.0123456789abcdef.npz.tmp-999999999-x",
              workdir / ".eval.json.tmp-999999999-y"]
    running = workdir / "eval_features" / f".reference.npz.0123456789abcdef.npz.tmp-{os.getpid()}-z"
    for path in (*killed, running):
        path.write_bytes(b"PK partial")
    evaluate.evaluate(samples, reference, tiny_inception, str(workdir), batch_size=8)
    assert not any(path.exists() for path in killed) and running.exists()


def test_an_evaluation_whose_stdout_cannot_be_written_keeps_its_eval_json(tmp_path, monkeypatch, caplog):
    """A log redirected to a full disk: the metrics' first line raised OSError before eval.json was
    written, and the evaluation's work was lost."""
    from conftest import c2i_config

    results = {name: 0.5 for name in evaluate.METRICS}
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: results)
    monkeypatch.setattr("sys.stdout", open("/dev/full", "w", buffering=1))  # as PYTHONUNBUFFERED=1 in containers
    paths = {name: str(tmp_path / f"{name}.npz") for name in ("eval.samples", "eval.reference")}
    evaluate.run(c2i_config(**paths, **{"eval.inception_weights": str(tmp_path / "w.pth")}), str(tmp_path / "job"))
    assert json.loads((tmp_path / "job" / evaluate.EVAL_JSON).read_text()) == results
    assert any("stdout cannot be written" in r.getMessage() for r in caplog.records)


def test_the_other_processes_stop_with_process_0_when_it_cannot_write_eval_json(tmp_path, monkeypatch):
    """Process 1 of 2, whose process 0 failed to write eval.json (a full disk): it stops with that
    failure, not with a success of its own while the job's record is missing."""
    import ml_collections
    from jax.experimental import multihost_utils

    metrics_computed = {name: 1.0 for name in evaluate.METRICS}
    monkeypatch.setattr(evaluate, "samples_chosen_by_process_0", lambda samples, workdir: samples)
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: metrics_computed)  # the Inception's part: tested above
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: np.array([1, flag], np.int32))
    config = ml_collections.ConfigDict(dict(eval=dict(samples=str(tmp_path / "samples.npz"),
                                                      reference=str(tmp_path / "reference.npz"),
                                                      inception_weights=str(tmp_path / "inception.npz"), batch_size=8)))
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^process 0 of 2 stopped writing .*/run/eval.json \(its error says why\)$"):
        evaluate.run(config, str(workdir))
    assert not (workdir / "eval.json").exists()


def test_eval_json_names_the_sampling_job_whose_samples_it_scored(tiny_inception, tmp_path, caplog):
    """A teacher's eval.json of each student's samples named their CRC, not the checkpoint (its
    step), weights and seed they were sampled with; the job's settings.json said so, beside them only.
    A file of no sampling job records null; a settings.json of an older version, its missing fields null."""
    from conftest import c2i_config

    job = tmp_path / "grade_a"
    (job / "samples").mkdir(parents=True)
    samples, reference = images_npz(job / "samples.npz", 1), images_npz(tmp_path / "reference.npz", 2)
    settings = dict(checkpoint="/runs/student_a/checkpoints/2", checkpoint_fingerprint="5c2f4bb039bbf24b",
                    weights="ema", seed=0, num_images=6, solver="euler", steps_per_stage=[3, 3], cfg_scale=2.4,
                    labels=list(range(6)))
    (job / "samples" / "settings.json").write_text(json.dumps(settings))
    evaluate.run(c2i_config(**{"eval.reference": reference, "eval.inception_weights": tiny_inception,
                               "eval.batch_size": 8}), str(job))
    recorded = json.loads((job / "eval.json").read_text())["sampling_job"]
    assert recorded == dict(settings=str(job / "samples" / "settings.json"),
                            **{key: settings[key] for key in evaluate.SAMPLING_JOB_FIELDS})

    other = evaluate.evaluate(images_npz(tmp_path / "mine.npz", 3), reference, tiny_inception, str(tmp_path / "b"), 8)
    assert other["sampling_job"] is None
    del settings["checkpoint_fingerprint"]
    (job / "samples" / "settings.json").write_text(json.dumps(settings))
    assert evaluate.evaluate(samples, reference, tiny_inception, str(job), 8)["sampling_job"]["checkpoint_fingerprint"] \
        is None
    (job / "samples" / "settings.json").write_text("[1")
    with caplog.at_level("WARNING"):
        damaged = evaluate.evaluate(samples, reference, tiny_inception, str(job), 8)["sampling_job"]
    assert set(damaged) == {"settings", "unreadable"} and "cannot be read as a sampling job's settings" in caplog.text


def test_eval_json_records_how_many_images_the_sampling_job_before_it_sampled_itself(tiny_inception, tmp_path):
    """Images found on disk by a sampling job were scored as if it had sampled them (a student's
    forged PNGs in a folder the teacher sampled in place); --mode=eval samples nothing: null."""
    from conftest import c2i_config

    reference = images_npz(tmp_path / "reference.npz", 2)
    config = c2i_config(**{"eval.samples": images_npz(tmp_path / "samples.npz", 1), "eval.reference": reference,
                           "eval.inception_weights": tiny_inception, "eval.batch_size": 8})
    assert evaluate.run(config, str(tmp_path / "a"), images_sampled_by_this_job=2)["images_sampled_by_this_job"] == 2
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["images_sampled_by_this_job"] == 2
    evaluate.run(config, str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["images_sampled_by_this_job"] is None
