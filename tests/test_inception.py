"""The FID Inception (JAX) against a float64 torch-functional reference written here from the
architecture (torchvision's Inception-v3 with pytorch-fid's TensorFlow patches), through the
converter, on random weights in pytorch-fid's state-dict layout."""

import io
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_dir
from pixelflow_jax.checkpoints.checkpoint import CheckpointError


# ------------------------------------------------------------------ reference, NCHW float64 torch


def conv(sd, name, x, stride=1, padding=0):
    y = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    y = F.batch_norm(y, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], training=False, eps=1e-3)
    return F.relu(y)


def tf_average_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def block_a(sd, n, x):
    return torch.cat([conv(sd, f"{n}.branch1x1", x),
                      conv(sd, f"{n}.branch5x5_2", conv(sd, f"{n}.branch5x5_1", x), padding=2),
                      conv(sd, f"{n}.branch3x3dbl_3", conv(sd, f"{n}.branch3x3dbl_2",
                                                           conv(sd, f"{n}.branch3x3dbl_1", x), padding=1), padding=1),
                      conv(sd, f"{n}.branch_pool", tf_average_pool(x))], 1)


def block_b(sd, n, x):
    double = conv(sd, f"{n}.branch3x3dbl_2", conv(sd, f"{n}.branch3x3dbl_1", x), padding=1)
    return torch.cat([conv(sd, f"{n}.branch3x3", x, stride=2), conv(sd, f"{n}.branch3x3dbl_3", double, stride=2),
                      F.max_pool2d(x, 3, stride=2)], 1)


def block_c(sd, n, x):
    seven = conv(sd, f"{n}.branch7x7_1", x)
    seven = conv(sd, f"{n}.branch7x7_3", conv(sd, f"{n}.branch7x7_2", seven, padding=(0, 3)), padding=(3, 0))
    double = conv(sd, f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
        double = conv(sd, f"{n}.branch7x7dbl_{i}", double, padding=pad)
    return torch.cat([conv(sd, f"{n}.branch1x1", x), seven, double,
                      conv(sd, f"{n}.branch_pool", tf_average_pool(x))], 1)


def block_d(sd, n, x):
    three = conv(sd, f"{n}.branch3x3_2", conv(sd, f"{n}.branch3x3_1", x), stride=2)
    seven = conv(sd, f"{n}.branch7x7x3_1", x)
    seven = conv(sd, f"{n}.branch7x7x3_3", conv(sd, f"{n}.branch7x7x3_2", seven, padding=(0, 3)), padding=(3, 0))
    return torch.cat([three, conv(sd, f"{n}.branch7x7x3_4", seven, stride=2), F.max_pool2d(x, 3, stride=2)], 1)


def block_e(sd, n, x, max_pool):
    three = conv(sd, f"{n}.branch3x3_1", x)
    double = conv(sd, f"{n}.branch3x3dbl_2", conv(sd, f"{n}.branch3x3dbl_1", x), padding=1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else tf_average_pool(x)
    return torch.cat([conv(sd, f"{n}.branch1x1", x),
                      conv(sd, f"{n}.branch3x3_2a", three, padding=(0, 1)),
                      conv(sd, f"{n}.branch3x3_2b", three, padding=(1, 0)),
                      conv(sd, f"{n}.branch3x3dbl_3a", double, padding=(0, 1)),
                      conv(sd, f"{n}.branch3x3dbl_3b", double, padding=(1, 0)),
                      conv(sd, f"{n}.branch_pool", pooled)], 1)


def reference_features(sd, images_299):
    """(pool, spatial, logits without the fc bias) for uint8-valued NHWC 299 x 299 images."""
    x = (torch.from_numpy(images_299).double().permute(0, 3, 1, 2) - 128) / 128
    x = conv(sd, "Conv2d_2b_3x3", conv(sd, "Conv2d_2a_3x3", conv(sd, "Conv2d_1a_3x3", x, stride=2)), padding=1)
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(conv(sd, "Conv2d_4a_3x3", conv(sd, "Conv2d_3b_1x1", x)), 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(sd, name, x)
    x = block_b(sd, "Mixed_6a", x)
    x = block_c(sd, "Mixed_6b", x)
    x = block_c(sd, "Mixed_6c", x)
    spatial = conv(sd, "Mixed_6d.branch1x1", x)[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)  # NHWC order
    for name in ("Mixed_6d", "Mixed_6e"):
        x = block_c(sd, name, x)
    x = block_e(sd, "Mixed_7c", block_e(sd, "Mixed_7b", block_d(sd, "Mixed_7a", x), False), True)
    pool = x.mean((2, 3))
    return pool.numpy(), spatial.numpy(), (pool @ sd["fc.weight"].T).numpy()


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def random_state_dict():
    """Random weights in pytorch-fid's layout; He-scaled so activations stay O(1) through 20 layers."""
    from flax import nnx, traverse_util

    from pixelflow_jax.evaluation.inception import InceptionV3
    from pixelflow_jax.evaluation.inception_convert import torch_key

    rng = np.random.default_rng(0)
    abstract = nnx.eval_shape(InceptionV3)
    sd = {"fc.bias": torch.zeros(1008, dtype=torch.float64)}
    for path, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items():
        key, _ = torch_key(tuple(str(p) for p in path))
        if key.endswith("conv.weight"):
            kh, kw, cin, cout = leaf.shape
            value = rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
        elif key == "fc.weight":
            value = rng.standard_normal(leaf.shape[::-1]) / np.sqrt(2048)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, leaf.shape)
        else:
            value = rng.normal(0, 0.1, leaf.shape)
        sd[key] = torch.from_numpy(value)
        if key.endswith("running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return sd


def test_forward_equals_float64_reference_through_the_converter(random_state_dict, tmp_path):
    from pixelflow_jax.evaluation.inception_convert import load_inception

    path = tmp_path / "pt_inception.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in random_state_dict.items()}, path)
    model = load_inception(str(path))
    images = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3)).astype(np.float32)
    got = model(images, resize=False)
    expected = reference_features(random_state_dict, images.astype(np.float64))
    for name, g, e in zip(("pool", "spatial", "logits"), got, expected):
        g = np.asarray(g, np.float64)
        assert g.shape == e.shape, name
        assert np.linalg.norm(g - e) / np.linalg.norm(e) <= 1e-4, name
    assert expected[1].shape == (2, 17 * 17 * 7)


def test_resize_is_tensorflow_legacy_bilinear():
    """align_corners=False without half-pixel centres: 2 -> 4 pixels samples 0, 0.5, 1, 1.5 (clamped)."""
    from pixelflow_jax.evaluation.inception import legacy_bilinear_matrix

    np.testing.assert_allclose(legacy_bilinear_matrix(2, 4) @ np.array([10.0, 20.0]), [10, 15, 20, 20])
    np.testing.assert_allclose(legacy_bilinear_matrix(4, 2) @ np.array([1.0, 2, 3, 4]), [1, 3])  # 0 and 2
    assert np.allclose(legacy_bilinear_matrix(256, 299).sum(axis=1), 1)
    # TensorFlow computes the source coordinate in float32: i * float32(in / out).
    weights = legacy_bilinear_matrix(256, 299)
    for i in (1, 150, 297):
        source = np.float32(i) * np.float32(256 / 299)
        low = int(np.floor(source))
        assert weights[i, low + 1] == np.float32(source - np.float32(low)), i


def test_resize_to_input_resizes_rows_and_columns_each_by_their_own_size():
    """Non-square images: rows by the height's weights, columns by the width's, as TensorFlow's
    resize_bilinear samples pixel (y * H / 299, x * W / 299), written here pixel by pixel in float64."""
    from pixelflow_jax.evaluation.inception import INPUT_SIZE, resize_to_input

    images = np.random.default_rng(2).integers(0, 256, (2, 3, 5, 3)).astype(np.uint8)

    def taps(i, size):  # (low, high, weight of high) of output index i
        source = float(np.float32(i) * np.float32(size / INPUT_SIZE))
        low = int(np.floor(source))
        return low, min(low + 1, size - 1), source - low

    expected = np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3))
    for y in range(INPUT_SIZE):
        y0, y1, fy = taps(y, 3)
        row = images[:, y0].astype(np.float64) * (1 - fy) + images[:, y1] * fy  # (2, 5, 3)
        x0, x1, fx = (np.array(v) for v in zip(*(taps(x, 5) for x in range(INPUT_SIZE))))
        expected[:, y] = row[:, x0] * (1 - fx)[:, None] + row[:, x1] * fx[:, None]
    got = np.asarray(resize_to_input(images))
    # The graph's input size: 300 (and the expected array of INPUT_SIZE) gives every later shape alike.
    assert got.shape == expected.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_images_of_any_size_are_resized_to_299_before_the_network():
    """By default the model resizes (the evaluation passes its images as they are): a 32 x 32 batch
    reaches Mixed_6d at 17 x 17, so sFID's features are ADM's 17 * 17 * 7 (shapes only, traced)."""
    import jax
    from flax import nnx

    from pixelflow_jax.evaluation.inception import InceptionV3

    graphdef, state = nnx.split(nnx.eval_shape(InceptionV3))
    shapes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                            jax.ShapeDtypeStruct((2, 32, 32, 3), np.uint8))
    assert [s.shape for s in shapes] == [(2, 2048), (2, 17 * 17 * 7), (2, 1008)]


def test_bad_weights_are_refused_with_the_reason(random_state_dict, tmp_path):
    from pixelflow_jax.evaluation.inception_convert import load_inception

    with pytest.raises(CheckpointError, match="download https://github.com/mseitzer/pytorch-fid"):
        load_inception(str(tmp_path / "absent.pth"))
    broken = {k: v for k, v in random_state_dict.items() if not k.startswith("Mixed_7c.branch_pool")}
    broken["extra.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken.pth holds weights that are not the FID Inception's(.|\n)*5 of "
                                              r"its \d+ tensors missing: .*Mixed_7c\.branch_pool\.conv\.weight(.|\n)*"
                                              r"1 tensor the FID Inception does not have, e.g. \['extra\.weight'\]"):
        load_inception(str(tmp_path / "broken.pth"))
    # Tensors of other shapes are named with both shapes, five of them, and how many more there are.
    misshapen = {k: torch.zeros(5) if k.startswith("Mixed_5b.") and k.endswith("running_var") else v
                 for k, v in random_state_dict.items()}  # its 7 convolutions' variances
    torch.save(misshapen, tmp_path / "misshapen.pth")
    with pytest.raises(CheckpointError) as error:
        load_inception(str(tmp_path / "misshapen.pth"))
    lines = str(error.value).splitlines()
    assert lines[0].endswith("misshapen.pth holds weights that are not the FID Inception's (pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth):"), lines
    assert len(lines) == 7 and lines[-1] == "  2 more of other shapes", lines
    assert "  Mixed_5b.branch1x1.bn.running_var: shape (5,) does not fit Mixed_5b.branch1x1.bn_var (64,)" in lines
    # A wrong file lacks every tensor: the message was a line per tensor (473 lines)
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(50)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as error:
        load_inception(str(tmp_path / "other.pth"))
    assert len(str(error.value).splitlines()) <= 3 and "tensors missing" in str(error.value), str(error.value)
    assert re.search(r"\n  (\d+) of its \1 tensors missing: ([\w.]+, ){5}\.\.\.\n", str(error.value)), str(error.value)
    with pytest.raises(CheckpointError, match=r"model.pt holds a PixelFlow model's weights, not the FID Inception's: "
                                              r"pass pytorch-fid's pt_inception"):
        load_inception(os.path.join(fixture_dir("c2i_tiny"), "model.pt"))
    np.savez(tmp_path / "reference.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))  # the wrong one of three files
    with pytest.raises(CheckpointError, match=r"cannot read \S+reference.npz as a PyTorch checkpoint .*; the Inception "
                                              r"weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                              r"\(https://github.com/mseitzer/pytorch-fid/"):
        load_inception(str(tmp_path / "reference.npz"))


def test_a_refusal_at_five_of_a_kind_names_them_all_and_no_more(random_state_dict):
    """Five missing or misshapen tensors, the most a refusal names of each, are named without a
    '...' or a '0 more of other shapes' after them; of four unexpected tensors the first three."""
    from pixelflow_jax.evaluation.inception_convert import inception_params

    weights = {k: v.numpy() for k, v in random_state_dict.items() if not k.startswith("Mixed_7c.branch_pool.")}
    missing = {k for k in random_state_dict if k.startswith("Mixed_7c.branch_pool.") and "num_batches" not in k}
    misshapen = sorted(k for k in weights if k.startswith("Mixed_5b.") and k.endswith("running_var"))[:5]
    weights.update({k: np.zeros(5) for k in misshapen})
    weights.update({f"extra.{i}": np.zeros(1) for i in range(4)})
    with pytest.raises(CheckpointError) as error:
        inception_params(weights)
    lines = str(error.value).splitlines()
    assert len(missing) == 5 and len(lines) == 8, lines
    named_missing = re.fullmatch(r"  5 of its \d+ tensors missing: (.*)", lines[1]).group(1)
    assert set(named_missing.split(", ")) == missing, lines[1]
    assert sorted(line.split(":")[0].strip() for line in lines[2:7]) == misshapen, lines
    assert lines[7] == "  4 tensors the FID Inception does not have, e.g. ['extra.0', 'extra.1', 'extra.2']"


# ------------------------------------------------------------------------------ --mode=eval


@pytest.fixture(scope="module")
def weights_file(random_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in random_state_dict.items()}, path)
    return str(path)


def test_a_batch_larger_than_the_file_is_cut_to_its_images(weights_file, tmp_path, monkeypatch):
    """12 images padded to --config.eval.batch_size=1000000 ran the host out of memory."""
    from pixelflow_jax.evaluation import features as inception_features

    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=np.zeros((12, 8, 8, 3), np.uint8))
    batches = []

    def inception(graphdef, params, images):
        batches.append(images.shape[0])
        return [np.zeros((images.shape[0], 2))] * len(inception_features.FEATURES)

    monkeypatch.setattr(inception_features, "_inception", inception)
    named = []
    progress = inception_features.Progress
    monkeypatch.setattr(inception_features, "Progress", lambda total, what, unit: named.append(what) or
                        progress(total, what, unit, interactive=False))
    features = inception_features.FeatureExtractor(weights_file, 100_000)(samples)
    assert batches == [16] and features["pool"].shape == (12, 2)  # a multiple of the 8 devices
    # With its folder: an evaluation against another job's samples.npz reads two files of that name.
    assert named == [f"Inception features of {tmp_path.name}/samples.npz"]


def test_the_progress_line_names_an_images_file_with_its_folder():
    from pixelflow_jax.evaluation.features import progress_name

    assert progress_name("runs/a/samples.npz") == "a/samples.npz"
    assert progress_name("gs://bucket/job/samples.npz") == "job/samples.npz"
    assert progress_name("samples.npz") == "samples.npz"


@pytest.mark.slow  # ~75 s on 2 cores: several evaluations, each with its Inception compile
def test_eval_identical_sets_shifted_sets_stored_statistics_and_the_feature_cache(weights_file, tmp_path,
                                                                                  monkeypatch):
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.evaluation import features as inception_features

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    samples, reference = str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz")
    np.savez(samples, arr_0=images)
    np.savez_compressed(reference, arr_0=images)  # compressed: streamed all the same
    workdir = str(tmp_path / "run")
    # batch_size 4 rounds up to the 8 fake devices: one padded batch per file.
    same = evaluate.evaluate(samples, reference, weights_file, workdir, batch_size=4)
    assert abs(same["fid"]) < 1e-4 and abs(same["sfid"]) < 1e-4  # rounding of rank-5 covariances
    assert same["precision"] == same["recall"] == 1.0 and same["num_samples"] == 6

    # A second evaluation of the same files reads the cached features: no Inception forward.
    extractor = inception_features.FeatureExtractor(weights_file, 4)
    monkeypatch.setattr(inception_features.FeatureExtractor, "__call__", lambda self, path: pytest.fail("not cached"))
    cached = inception_features.cached_features(extractor, samples, os.path.join(workdir, "eval_features"))
    monkeypatch.undo()
    np.testing.assert_array_equal(cached["pool"], extractor(samples)["pool"])

    darker = str(tmp_path / "darker.npz")
    np.savez(darker, arr_0=(images // 2).astype(np.uint8))
    shifted = evaluate.evaluate(darker, reference, weights_file, workdir, batch_size=4)
    assert shifted["fid"] > 1e-2 and shifted["sfid"] > 1e-2

    # Stored statistics in the reference (as ADM's reference batches carry) take precedence.
    features = inception_features.cached_features(inception_features.FeatureExtractor(weights_file, 4), darker,
                                        os.path.join(workdir, "eval_features"))
    from pixelflow_jax.evaluation import metrics

    mu, sigma = metrics.gaussian_statistics(features["pool"])
    mu_s, sigma_s = metrics.gaussian_statistics(features["spatial"])
    with_stats = str(tmp_path / "reference_with_stats.npz")
    np.savez(with_stats, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stored = evaluate.evaluate(darker, with_stats, weights_file, workdir, batch_size=4)
    assert abs(stored["fid"]) < 1e-4 and abs(stored["sfid"]) < 1e-4  # darker vs its own statistics


def test_eval_of_a_sampling_workdir_reads_its_samples_without_being_told(weights_file, tmp_path, monkeypatch, caplog):
    from configs import c2i
    from pixelflow_jax.evaluation import evaluate

    config = c2i.get_config("tiny")
    config.eval.reference, config.eval.inception_weights, config.eval.batch_size = "", weights_file, 8
    with pytest.raises(ValueError, match="set --config.eval.reference, --config.eval.samples"):
        evaluate.run(config, str(tmp_path))  # no samples.npz here
    # A job stopped before its last image: no samples.npz yet (it was told to set --config.eval.samples).
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "settings.json").write_text(json.dumps({"num_images": 400}))
    for named in ("", str(tmp_path / "samples.npz")):  # named as the README's command does: it was 'not found'
        config.eval.samples = named
        with pytest.raises(ValueError, match=r"this workdir's sampling job \(.*settings.json\) has not written "
                                             r".*samples.npz yet: it packs its images there once all 400 are sampled. "
                                             r"Rerun its --mode=sample command"):
            evaluate.run(config, str(tmp_path))
    config.eval.samples = ""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "reference.npz", arr_0=images)
    config.eval.reference = str(tmp_path / "reference.npz")
    # A job extended to 400 images and stopped part-way: its samples.npz is still the earlier 4's.
    with pytest.raises(ValueError, match=r"samples.npz holds 4 images, but this workdir's sampling job asks for 400 "
                                         r".*it has not finished. Rerun its --mode=sample command"):
        evaluate.run(config, str(tmp_path))
    # Named on purpose, as the README's eval command names the workdir's own file: evaluated, with a warning.
    config.eval.samples = str(tmp_path / "samples.npz")
    with monkeypatch.context() as patched, caplog.at_level("WARNING"):
        patched.setattr(evaluate, "evaluate", lambda *_: dict.fromkeys(evaluate.METRICS, 0.0))
        evaluate.run(config, str(tmp_path))
    assert "asks for 400 " in caplog.text and "(evaluated anyway, as --config.eval.samples names it)" in caplog.text
    config.eval.samples = ""
    (tmp_path / "samples" / "settings.json").write_text(json.dumps({"num_images": 4}))  # the job finished
    results = evaluate.run(config, str(tmp_path))
    assert results["num_samples"] == 4 and abs(results["fid"]) < 1e-3  # identical sets (rank-3 covariances)


def test_a_full_disk_loses_neither_the_inception_passes_nor_the_metrics(weights_file, tmp_path, monkeypatch, caplog,
                                                                        capsys):
    """The feature cache written to a full disk raised an OSError traceback after the samples'
    Inception pass, and the reference was never evaluated; now the cache is skipped with a warning,
    the metrics are printed, and eval.json that cannot be written is one error naming the fix."""
    import errno

    from configs import c2i
    from pixelflow_jax import storage
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.storage import writes

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    config = c2i.get_config("tiny")
    config.eval.samples = config.eval.reference = str(tmp_path / "samples.npz")
    config.eval.inception_weights, config.eval.batch_size = weights_file, 8
    write_local = writes.write_local_atomically

    def disk_full(path, *args, **kwargs):  # room for the probe of the workdir (an empty file), nothing more
        if os.path.basename(path).endswith((".npz", ".json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_local(path, *args, **kwargs)

    monkeypatch.setattr(writes, "write_local_atomically", disk_full)
    workdir = tmp_path / "run"
    with caplog.at_level("WARNING"), pytest.raises(storage.StorageError, match=(
            rf"^cannot write {workdir}/eval.json \(OSError: \[Errno 28\] No space left on device\); free space, and "
            r"rerun the same command to record them \(the metrics are printed above\)$")):
        evaluate.run(config, str(workdir))
    assert "fid: " in capsys.readouterr().out
    assert caplog.text.count("could not cache the features of") == 2, caplog.text
    assert "OSError: [Errno 28] No space left on device): the evaluation goes on" in caplog.text


def test_eval_refuses_missing_files_naming_the_fix(weights_file, tmp_path):
    from pixelflow_jax.evaluation import evaluate

    np.savez(tmp_path / "a.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(CheckpointError, match="download https://github.com/mseitzer/pytorch-fid"):
        evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), str(tmp_path / "none.pth"), str(tmp_path))
    with pytest.raises(ValueError, match="--config.eval.reference .*none.npz is not found: ADM's ImageNet 256 "
                                         "reference batch is https://.*VIRTUAL_imagenet256_labeled.npz; any .npz"):
        evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "none.npz"), weights_file, str(tmp_path))
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a torch file")
    np.savez(tmp_path / "four.npz", arr_0=np.full((4, 8, 8, 3), 128, np.uint8))  # (black images are refused)
    with pytest.raises(CheckpointError, match="damaged.pth"):  # read after the checks of the file names
        evaluate.evaluate(str(tmp_path / "four.npz"), str(tmp_path / "four.npz"), str(damaged), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # a failed evaluation leaves no workdir it made


def test_an_npz_named_without_the_ending_numpy_savez_added_is_named_with_it(tmp_path):
    """np.savez("runs/reference", ...) writes runs/reference.npz: --config.eval.reference=runs/reference
    was "not found", and its fix the ADM reference's URL."""
    from pixelflow_jax.evaluation import evaluate

    np.savez(tmp_path / "reference", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for samples, reference, name in ((tmp_path / "reference.npz", tmp_path / "reference", "eval.reference"),
                                     (tmp_path / "reference", tmp_path / "reference.npz", "eval.samples")):
        with pytest.raises(ValueError, match=re.escape(f"--config.{name} {tmp_path / 'reference'} is not found (numpy."
                                                       f"savez added .npz to the name it was given: pass "
                                                       f"{tmp_path / 'reference'}.npz)")):
            evaluate.check_inputs(str(samples), str(reference), str(tmp_path / "weights.pth"), str(tmp_path))


def test_eval_files_in_a_bucket_that_does_not_exist_name_the_bucket(gcs_emulator, tmp_path):
    """A typo in the bucket's name read as the file missing inside it ("is not found")."""
    from pixelflow_jax.evaluation import evaluate

    np.savez(tmp_path / "a.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    missing = "is in the bucket gs://no-such-bucket, which does not exist (a typo?"
    with pytest.raises(ValueError, match=re.escape(f"--config.eval.reference gs://no-such-bucket/ref.npz {missing}")):
        evaluate.check_input_files(str(tmp_path / "a.npz"), "gs://no-such-bucket/ref.npz", "unused.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"Inception weights gs://no-such-bucket/w.pth {missing}")):
        evaluate.check_input_files(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "gs://no-such-bucket/w.pth")


@pytest.mark.slow
def test_release_converts_into_a_bucket_samples_and_evaluates_there(weights_file, bucket, tmp_path):
    """Everything in a bucket (a local GCS emulator): the release checkpoint converted into it,
    sampled from there into a workdir there with the evaluation of its samples.npz (inputs read from
    the bucket too), and a rerun after losing an image samples only that image."""
    import subprocess
    import sys

    from conftest import REPO, fixture_dir, run_converter
    from pixelflow_jax import storage

    checkpoint, workdir = f"{bucket}/checkpoints/c2i_tiny", f"{bucket}/run"
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    # --overwrite of an output in a bucket is refused before the conversion, not after it (minutes at XL).
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={checkpoint}", "--overwrite")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: --overwrite cannot replace {checkpoint}: an object store has no atomic rename, so a failed conversion "
        "would lose the old folder; delete it first or choose another path"), result.stderr[-3000:]
    assert "converting" not in result.stderr
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.random.default_rng(4).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    storage.upload_file_atomically(str(reference), f"{bucket}/inputs/reference.npz")
    storage.upload_file_atomically(weights_file, f"{bucket}/inputs/inception.pth")
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", "--mode=sample", f"--workdir={workdir}",
               f"--config.sample.checkpoint={checkpoint}", "--config.sample.num_images=4",
               "--config.sample.steps_per_stage=1", f"--config.eval.reference={bucket}/inputs/reference.npz",
               f"--config.eval.inception_weights={bucket}/inputs/inception.pth", "--config.eval.batch_size=8"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a URL was taken for a local folder"
    results = storage.read_json(f"{workdir}/eval.json")
    assert results["num_samples"] == 4 and results["samples"] == f"{workdir}/samples.npz"
    assert set(results) >= {"fid", "sfid", "inception_score", "precision", "recall"} and "fid:" in result.stdout
    assert "fid:" not in result.stderr  # printed once, not logged again
    assert storage.list_files(f"{workdir}/samples") == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                        "sampling_runs.jsonl", "settings.json"]
    first = np.load(io.BytesIO(storage.read_bytes(f"{workdir}/samples.npz")))["arr_0"]

    storage.remove(f"{workdir}/samples/000002.png")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 4 images to sample (3 already on disk)" in result.stderr
    # The bucket has no append: the jobs' log is rewritten whole, the first job's line kept.
    jobs = [json.loads(line) for line in storage.read_text(f"{workdir}/samples/sampling_runs.jsonl").splitlines()]
    assert [job["num_images"] for job in jobs] == [4, 4] and all(job["checkpoint"] == checkpoint for job in jobs)
    again = np.load(io.BytesIO(storage.read_bytes(f"{workdir}/samples.npz")))["arr_0"]
    assert np.abs(again.astype(int) - first.astype(int)).max() <= 1
