"""Input pipelines: image folders with awkward files, a real (tiny) TFDS dataset, the demo set,
determinism, iterator checkpoints, per-process shards and global batches."""

import io
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from pixelflow_jax import storage
from pixelflow_jax.data import loader as loader_module
from pixelflow_jax.data.caption_data import CaptionRecordSource
from pixelflow_jax.data.demo_data import SHAPES, DemoSource, classify, demo_image
from pixelflow_jax.data.loader import (DataError, ImageFolderSource, ImageLoader, TfdsSource, build_dataset, make_source,
                                       to_global_batch)

R = 32


def batches(source, n, **kwargs):
    loader = ImageLoader(build_dataset(source, **{"batch_size": 4, "resolution": R, "seed": 0, **kwargs}))
    return [next(loader) for _ in range(n)], loader


@pytest.fixture(scope="module")
def awkward_folder(tmp_path_factory):
    """Two classes; class 'b' holds one image of every awkward kind."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(root / "a" / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), np.uint8), "RGBA").save(root / "b" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (50, 45), np.uint8), "L").save(root / "b" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), np.uint8), "CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).convert("P").save(root / "b" / "palette.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(root / "b" / "small.png")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(good, format="JPEG")
    (root / "b" / "corrupt.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])  # truncated
    (root / "b" / "notes.txt").write_text("not an image, not listed")
    return str(root)


def test_folder_with_awkward_images(awkward_folder):
    source = ImageFolderSource(awkward_folder)
    assert source.classes == ["a", "b"] and len(source) == 9
    seen, loader = batches(source, 9)  # 36 elements: every image several times
    for images, labels in seen:
        assert images.shape == (4, R, R, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32 and set(labels) <= {0, 1}
    assert 1 <= loader.skipped <= 36  # the truncated JPEG was met, skipped and counted each time


def test_folder_class_index_is_written_and_reused(awkward_folder, tmp_path):
    config = type("C", (), {"source": "folder", "root": awkward_folder})
    make_source(config, class_index_dir=str(tmp_path))
    written = (tmp_path / "class_index.json").read_text()
    assert '"b"' in written
    os.makedirs(os.path.join(awkward_folder, "0_new_class"), exist_ok=True)
    try:
        with pytest.raises(DataError, match="0_new_class"):
            make_source(config, class_index_dir=str(tmp_path))  # ids stay stable: a new class is an error
    finally:
        os.rmdir(os.path.join(awkward_folder, "0_new_class"))


def test_folder_classes_must_fit_the_model_and_hold_images(awkward_folder):
    config = type("C", (), {"source": "folder", "root": awkward_folder})
    with pytest.raises(DataError, match="has 2 classes but the model has model.num_classes = 1"):
        make_source(config, num_classes=1)
    assert make_source(config, num_classes=2).classes == ["a", "b"]
    os.makedirs(os.path.join(awkward_folder, "c_empty"))
    try:
        with pytest.raises(DataError, match=r"classes without images: \['c_empty'\]"):
            make_source(config, num_classes=10)
    finally:
        os.rmdir(os.path.join(awkward_folder, "c_empty"))


def test_missing_or_empty_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageFolderSource(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match="no images found in"):
        ImageFolderSource(str(tmp_path / "empty"))


def test_tiny_tfds_dataset_through_the_imagenet_path_locally_and_in_a_bucket(tmp_path, bucket):
    import tensorflow_datasets as tfds

    class TinyImagenet(tfds.core.GeneratorBasedBuilder):
        """A few JPEGs in ImageNet's feature layout, written as ArrayRecord without TensorFlow."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(1)
            for i in range(10):
                encoded = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), np.uint8)).save(encoded, format="JPEG")
                encoded.seek(0)
                yield i, {"image": encoded, "label": i % 3}

    TinyImagenet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = type("C", (), {"source": "tfds", "tfds_name": "tiny_imagenet", "split": "train",
                            "tfds_data_dir": str(tmp_path)})
    source = make_source(config)
    assert isinstance(source, TfdsSource) and len(source) == 10
    (images, labels), = batches(source, 1)[0]
    assert images.shape == (4, R, R, 3) and set(labels) <= {0, 1, 2}
    with pytest.raises(DataError, match="tfds build"):
        TfdsSource("tiny_imagenet", "validation", str(tmp_path))

    # The same files in a bucket, read in place (`data.tfds_data_dir=gs://...`).
    for folder, _, names in os.walk(tmp_path / "tiny_imagenet"):
        for name in names:
            storage.upload_file_atomically(os.path.join(folder, name),
                                           f"{bucket}/{os.path.relpath(os.path.join(folder, name), tmp_path)}")
    remote = TfdsSource("tiny_imagenet", "train", bucket)
    assert len(remote) == 10
    for i in range(10):
        np.testing.assert_array_equal(remote[i]["image"], source.source[i]["image"])
        assert remote[i]["label"] == source[i]["label"]


def test_an_array_record_that_cannot_read_a_bucket_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(loader_module, "installed_array_record_version", lambda: "0.8.2")
    for open_source in (lambda: CaptionRecordSource("gs://bucket/shards"),
                        lambda: TfdsSource("imagenet2012", "train", "gs://bucket/tfds")):
        with pytest.raises(DataError, match=r"gs://bucket/\S+ is in a bucket, but array-record 0.8.2 reads only "
                                            r"local files; install array-record>=0.8.3"):
            open_source()
    monkeypatch.setattr(loader_module, "installed_array_record_version", lambda: None)
    with pytest.raises(DataError, match="but array-record is not installed; install array-record>=0.8.3"):
        CaptionRecordSource("gs://bucket/shards")
    loader_module.check_array_record_reads("/local/shards")  # local files: any version reads them


def test_same_seed_same_batches_and_workers_agree():
    source = DemoSource(24, seed=3)
    first, _ = batches(source, 8)
    again, _ = batches(source, 8)
    with_workers, _ = batches(source, 8, num_workers=2)
    for (a, la), (b, lb), (c, lc) in zip(first, again, with_workers):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(la, lc)
    other, _ = batches(source, 1, seed=1)
    assert not np.array_equal(other[0][0], first[0][0])


def test_epochs_reshuffle_and_cover_the_data():
    source = DemoSource(12, seed=0)
    seen, _ = batches(source, 6)  # two epochs of 12
    labels = np.concatenate([l for _, l in seen])
    assert sorted(labels[:12]) == sorted(np.arange(12) % 10)  # each epoch sees every image once
    assert sorted(labels[12:]) == sorted(np.arange(12) % 10)
    assert not np.array_equal(labels[:12], labels[12:])  # in a new order


def test_a_loader_started_at_batch_k_reads_what_batch_k_onwards_were():
    source = DemoSource(20, seed=0)
    uninterrupted, _ = batches(source, 7)  # crosses an epoch (5 batches of 4)
    for process_count in (1, 2):  # a resumed run may have another number of processes
        resumed = [batches(source, 4, start_batch=3, process_index=i, process_count=process_count)[0]
                   for i in range(process_count)]
        for step, (images, labels) in enumerate(uninterrupted[3:]):
            np.testing.assert_array_equal(np.concatenate([r[step][0] for r in resumed]), images)
            np.testing.assert_array_equal(np.concatenate([r[step][1] for r in resumed]), labels)


class IndexSource:
    """Image i is labelled i, so a batch's labels say which records it read; its pixels are a ramp,
    so crops and flips show."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        y, x = np.mgrid[:R + 8, :R + 8]
        ramp = (7 * index + 3 * x + y) % 256
        return {"image": np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8), "label": index}


def test_processes_read_disjoint_rows_of_the_same_global_batches():
    one_process, _ = batches(IndexSource(), 6, batch_size=8)  # three epochs of 16
    parts = [batches(IndexSource(), 6, batch_size=8, process_index=i, process_count=2)[0] for i in range(2)]
    for step, (images, labels) in enumerate(one_process):
        # Process i holds rows [4i, 4i+4) of every global batch, crops and flips included.
        np.testing.assert_array_equal(np.concatenate([p[step][1] for p in parts]), labels)
        np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), images)
    read = np.concatenate([labels for _, labels in one_process[:2]])
    assert sorted(read.tolist()) == list(range(16))  # an epoch covers the data once
    with pytest.raises(DataError, match="global batch 8 is not divisible by the 3 processes"):
        batches(IndexSource(), 1, batch_size=8, process_count=3)


def test_demo_set_is_deterministic_and_classifiable():
    a, label_a = demo_image(7, seed=5)
    b, _ = demo_image(7, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, demo_image(7, seed=6)[0])
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    for resolution in (64, 32):
        drawn = [demo_image(i, seed=1, resolution=resolution) for i in range(150)]
        readings = [classify(image) for image, _ in drawn]
        assert [r.hue for r in readings] == [label for _, label in drawn]  # every hue read back
        assert [r.shape for r in readings] == [label % len(SHAPES) for _, label in drawn]  # and every outline
    assert classify(np.full((64, 64, 3), 128, np.uint8)) == (-1, -1)  # no foreground, no class


def test_global_batch_is_sharded_over_the_mesh():
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    images = np.arange(len(devices) * 2 * R * R * 3, dtype=np.uint8).reshape(len(devices) * 2, R, R, 3)
    labels = np.arange(len(devices) * 2, dtype=np.int32)
    g_images, g_labels = to_global_batch(images, labels, NamedSharding(mesh, P("data")))
    assert len(devices) == 8  # conftest fakes eight CPU devices
    assert g_images.shape == images.shape and len(g_images.addressable_shards) == len(devices)
    np.testing.assert_array_equal(np.asarray(g_images), images)
    np.testing.assert_array_equal(np.asarray(g_labels), labels)


def test_make_loader_reads_the_configured_demo_set(tmp_path):
    import configs.c2i as c2i
    from pixelflow_jax.data.loader import make_loader

    config = c2i.get_config("tiny")
    config.data.demo_num_images = 40
    loader = make_loader(config, batch_size=8)
    images, labels = next(loader)
    assert images.shape == (8, 64, 64, 3) and labels.dtype == np.int32
    assert [classify(image).hue for image in images] == labels.tolist()  # crop+flip keep the class
    assert [classify(image).shape for image in images] == (labels % len(SHAPES)).tolist()  # and the outline
    config.data.source = "nonsense"
    with pytest.raises(DataError, match="unknown config.data.source 'nonsense'"):
        make_loader(config, batch_size=8)
