"""Input pipelines: image folders with awkward files, a real (tiny) TFDS dataset, the demo set,
determinism, iterator checkpoints, per-process shards and global batches."""

import collections
import io
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from conftest import REPO, free_port
from pixelflow_jax import storage
from pixelflow_jax.data import decoding, sources
from pixelflow_jax.data import loader as loader_module
from pixelflow_jax.data.caption_data import CaptionRecordSource
from pixelflow_jax.data.demo_data import SHAPES, DemoSource, classify, demo_image
from pixelflow_jax.data.loader import ImageLoader, ProcessRows, build_dataset, to_global_batch
from pixelflow_jax.data.sources import (IMAGE_EXTENSIONS, DataError, ImageFolderSource, TfdsSource, make_source,
                                        record_class_index)

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
    assert 1 <= loader.skipped.count <= 36  # the truncated JPEG was met, skipped and counted each time


def test_only_process_0_writes_the_class_index(awkward_folder, tmp_path, monkeypatch):
    """Every process of a --distributed run opens the folder: one writes class_index.json (every
    process rewriting one shared file at once could leave it cut short for a resume to refuse)."""
    config = type("C", (), {"source": "folder", "root": awkward_folder})
    source = make_source(config, class_index_dir=str(tmp_path))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    record_class_index(config, source, str(tmp_path), ids_learned=False)
    assert not (tmp_path / "class_index.json").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    record_class_index(config, source, str(tmp_path), ids_learned=False)
    assert (tmp_path / "class_index.json").exists()


def test_folder_class_index_is_written_and_reused(awkward_folder, tmp_path):
    config = type("C", (), {"source": "folder", "root": awkward_folder})
    record_class_index(config, make_source(config, class_index_dir=str(tmp_path)), str(tmp_path), ids_learned=True)
    written = (tmp_path / "class_index.json").read_text()
    assert '"b"' in written
    os.makedirs(os.path.join(awkward_folder, "0_new_class"), exist_ok=True)
    Image.new("RGB", (8, 8)).save(os.path.join(awkward_folder, "0_new_class", "x.png"))
    try:
        with pytest.raises(DataError, match=rf"has class folders \['0_new_class'\] that {tmp_path}/class_index.json "
                                            r"does not list: the run's checkpoints learned its class ids"):
            make_source(config, class_index_dir=str(tmp_path))  # ids stay stable: a new class is an error
        # Before a checkpoint has learned the ids (a run killed before its first save), they follow the folders.
        (tmp_path / "class_index.json").write_text(written.replace('"b"', '"gone"'))
        source = make_source(config, class_index_dir=str(tmp_path), ids_learned=False)
        assert source.classes == ["0_new_class", "a", "b"]
        record_class_index(config, source, str(tmp_path), ids_learned=False)
        assert '"0_new_class"' in (tmp_path / "class_index.json").read_text()
    finally:
        shutil.rmtree(os.path.join(awkward_folder, "0_new_class"))
    (tmp_path / "class_index.json").write_text(written.replace('"b"', '"gone"'))  # a class folder moved away
    with pytest.raises(DataError, match=r"lacks class folders \['gone'\] that .*class_index.json lists"):
        make_source(config, class_index_dir=str(tmp_path))
    # Damaged or edited by hand: tracebacks (JSONDecodeError, KeyError) that named neither the file nor a fix.
    # A list with no folder, or with one folder under two ids, is no list a run wrote either.
    for content in ("garbage", "{}", '{"classes": "a"}', "[]", '{"classes": []}', '{"classes": ["a", "b", "a"]}'):
        (tmp_path / "class_index.json").write_text(content)
        with pytest.raises(DataError, match=r"class_index.json is damaged \(\w+Error: .*\): it holds the class ids "
                                            r"this run's checkpoints learned. Put back .* or delete it"):
            make_source(config, class_index_dir=str(tmp_path))


def test_a_symbolic_link_loop_in_an_image_folder_is_named(tmp_path):
    os.makedirs(tmp_path / "root" / "c")
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "c" / "a.png")
    os.symlink(tmp_path / "root" / "c", tmp_path / "root" / "c" / "loop")
    with pytest.raises(DataError, match=r"root/c/loop is a symbolic link to .*root/c, a folder that holds it"):
        ImageFolderSource(str(tmp_path / "root"))
    os.remove(tmp_path / "root" / "c" / "loop")
    os.symlink(tmp_path / "root" / "c", tmp_path / "root" / "alias")  # a second name for a folder: no loop
    assert len(ImageFolderSource(str(tmp_path / "root")).records) == 2
    os.symlink(tmp_path / "root", tmp_path / "root" / "c" / "up")  # to the root, above the class folder
    with pytest.raises(DataError, match=r"root/(alias|c)/up is a symbolic link to \S*root, a folder that holds"):
        ImageFolderSource(str(tmp_path / "root"))  # was named as root/alias/up/alias, a link that is no loop


def test_file_and_folder_names_that_are_not_utf8_train_and_pack(tmp_path):
    """Names from a zip archive made on Windows (latin-1 bytes) stopped every run and pack with
    "'utf-8' codec can't encode character '\\udce9'", naming no file."""
    from pixelflow_jax.data.caption_shards import pack

    classes, captioned = tmp_path / "classes", tmp_path / "captioned"
    for folder in (os.path.join(bytes(classes), b"caf\xe9"), os.path.join(bytes(classes), b"b"), bytes(captioned)):
        os.makedirs(folder)
    pixels = encoded(np.zeros((8, 8, 3), np.uint8))
    for path in (b"caf\xe9/\xff.png", b"b/ok.png"):
        open(os.path.join(bytes(classes), path), "wb").write(pixels)
    open(os.path.join(bytes(captioned), b"caf\xe9.png"), "wb").write(pixels)
    open(os.path.join(bytes(captioned), b"caf\xe9.txt"), "wb").write(b"a cup of coffee")
    config = type("C", (), {"source": "folder", "root": str(classes)})
    source = make_source(config, class_index_dir=str(tmp_path))
    record_class_index(config, source, str(tmp_path), ids_learned=True)
    assert source.classes == ["b", "caf\udce9"] and len(source.listing) == 16
    assert make_source(type("C", (), {"source": "folder", "root": str(classes)}),
                       class_index_dir=str(tmp_path)).classes == source.classes  # the class index reads back
    assert decoding.DecodedSource(source, 8)[1]["label"] == 1
    assert pack(str(captioned), str(tmp_path / "shards"))["records"] == 1
    assert CaptionRecordSource(str(tmp_path / "shards"))[0]["name"].endswith("(" + str(captioned) + "/caf\\xe9.png)")


def test_captions_in_a_class_folder_are_named_with_the_config_that_reads_them(tmp_path, caplog):
    """A captioned folder (NAME.jpg + NAME.txt, img2dataset's 00000/ folders) given to a class config
    trained one class of all its images, the captions counted only as files that are not images."""
    root = tmp_path / "captioned"
    (root / "00000").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(root / "00000" / f"{name}.jpg")
        (root / "00000" / f"{name}.txt").write_text("a red disk")
    (root / "00000" / "notes.txt").write_text("no image of this name")
    with caplog.at_level(logging.WARNING):
        ImageFolderSource(str(root))
    assert (f"3 files in the class folders of {root} are not read (their names do not end in an image extension: "
            f"{' '.join(IMAGE_EXTENSIONS)}), e.g. {root / '00000' / 'a.txt'}; 2 of them are captions beside their "
            f"images (NAME.txt beside NAME.jpg), which a class-conditional model does not read: a text-to-image model "
            "trains on them, --config=configs/t2i.py") in caplog.text


def test_files_an_image_folder_does_not_read_are_counted_and_respelled_classes_named(tmp_path, caplog):
    """Images beside the class folders, files without an image extension and links to nothing were
    left out without a word; a class folder renamed only from NFC to NFD (a macOS copy) read as two other classes."""
    root = tmp_path / "root"
    for name in ("ni\u00f1o", "b"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "x.jfif", format="JPEG")  # a JPEG extension read now
    Image.new("RGB", (8, 8)).save(root / "b" / "y.PNG")  # an image in any case of its extension, and not counted
    (root / "b" / "photo.heic").write_bytes(b"")
    (root / "b" / "moved.jpg").symlink_to(tmp_path / "elsewhere.jpg")  # a link to a file moved away
    (root / "b" / ".#notes.txt").symlink_to("user@host.4242")  # Emacs's lock, hidden: neither read nor counted
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(str(root))
    assert len(source.records) == 3
    assert (f"1 entries under {root} are not read: they are neither files nor folders, e.g. {root / 'b' / 'moved.jpg'} "
            f"(a symbolic link to {tmp_path / 'elsewhere.jpg'}, which does not exist)") in caplog.text
    assert "1 files in the class folders of" in caplog.text and "e.g. " + str(root / "b" / "photo.heic") in caplog.text
    assert f"1 images in {root} itself are not read (e.g. loose.png)" in caplog.text
    (root / "ni\u00f1o").rename(root / "nin\u0303o")
    with pytest.raises(DataError, match=r"differ only in how their accented letters are encoded, NFC or NFD"):
        ImageFolderSource(str(root), classes=source.classes)


def test_a_datasets_top_folder_of_split_folders_given_as_the_image_folder_is_refused_naming_the_train_split(tmp_path):
    """data.root=mydata, which holds train/<class>/ and val/<class>/, trained a two-class model on
    "train" vs "val" (class folders are read at any depth), the validation images among them: with
    model.num_classes=2 not a word in the log."""
    root = tmp_path / "mydata"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    with pytest.raises(DataError, match=re.escape(
            f"{root}'s class folders ['train', 'val'] are named like a dataset's splits and hold folders, not images: "
            f"{root} looks like the dataset's top folder, with the class folders a level down. Set "
            f"--config.data.root={root / 'train'} (its class folders: cat, dog)") + r"\Z"):
        ImageFolderSource(str(root))
    assert ImageFolderSource(str(root / "train")).classes == ["cat", "dog"]
    # Classes that happen to have such names hold their images: they train
    for split in ("train", "val"):
        Image.new("RGB", (8, 8)).save(root / split / "1.png")
    assert ImageFolderSource(str(root)).classes == ["train", "val"]


def split_layout(root, splits: dict) -> None:
    """root/<split>/<folder>/0.png for each split's folders, and root/<split>/<file> for its loose files."""
    for split, entries in splits.items():
        for entry in entries:
            if "." in entry.lstrip("."):
                (root / split).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(root / split / entry, "PNG")
            else:
                (root / split / entry).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(root / split / entry / "0.png")


@pytest.mark.parametrize("splits,named", [
    (("training", "validation"), "training"), (("test", "train", "valid"), "train"), (("dev", "train"), "train"),
    (("eval", "train"), "train"), (("testing", "training"), "training"), (("Train", "Val"), "Train"),
    (("test", "val"), "test"),  # no training split: the first
])
def test_every_layout_of_split_folders_is_refused_naming_its_training_split(tmp_path, splits, named):
    """The split names datasets use (any case), each: the refusal names the one to train on."""
    split_layout(tmp_path, {split: ["cat", "dog"] for split in splits})
    with pytest.raises(DataError, match=re.escape(f"Set --config.data.root={tmp_path / named} (its class folders: "
                                                  "cat, dog)")):
        ImageFolderSource(str(tmp_path))


def test_a_folder_of_loose_images_alone_is_named_a_folder_without_class_folders(tmp_path):
    """No class folders: the split check leaves them to this error (all() of no names is True, so
    without its guard it looked for the training split among none, an IndexError)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match=re.escape(f"no images found in class folders of {tmp_path} (the images in "
                                                  f"{tmp_path} itself are not read")):
        ImageFolderSource(str(tmp_path))


def test_split_folders_name_ten_class_folders_and_leave_hidden_ones_out(tmp_path):
    classes = [f"class_{i:02d}" for i in range(11)]
    split_layout(tmp_path / "ten", {"train": [".cache", *classes[:10]], "val": ["x"]})
    with pytest.raises(DataError, match=re.escape(f"(its class folders: {', '.join(classes[:10])})") + r"\Z"):
        ImageFolderSource(str(tmp_path / "ten"))
    split_layout(tmp_path / "eleven", {"train": classes, "val": ["x"]})
    with pytest.raises(DataError, match=re.escape(f"(its class folders: {', '.join(classes[:10])}, ...)") + r"\Z"):
        ImageFolderSource(str(tmp_path / "eleven"))


@pytest.mark.parametrize("layout", [
    {"train": ["cat"], "photos": ["cat"]},  # one class of another name: no dataset's splits
    {"train": ["cat", "1.png"], "val": ["cat"]},  # one split holds images: it is a class
    {"train": ["cat", "1.PNG"], "val": ["cat", "1.PNG"]},  # an image's extension in capitals
])
def test_class_folders_that_are_not_all_splits_of_folders_train(tmp_path, layout):
    split_layout(tmp_path, layout)
    assert ImageFolderSource(str(tmp_path)).classes == sorted(layout)


def test_a_class_folder_that_is_a_link_to_nothing_is_an_error_naming_it(tmp_path):
    """A class folder linked to a disk not mounted (root/b -> /mnt/disk2/b) was left out without a
    word: the run trained one class fewer, every later class under the id one lower, and wrote that
    class list to its class index."""
    root = tmp_path / "root"
    for name in ("a", "c"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "x.png")
    (root / "b").symlink_to(tmp_path / "unmounted" / "b")
    with pytest.raises(DataError, match=re.escape(
            f"{root / 'b'} is a symbolic link to {tmp_path / 'unmounted' / 'b'}, which does not exist: a class "
            "folder that cannot be read (its class id would go to the next folder). Mend the link (mount the "
            "disk it leads to) or remove it") + r"\Z"):  # one link: no count
        ImageFolderSource(str(root))
    (root / "d").symlink_to(tmp_path / "unmounted" / "d")
    with pytest.raises(DataError, match=re.escape(f"or remove it (2 such links in {root})")):
        ImageFolderSource(str(root))
    (root / "d").unlink()
    (root / ".b").symlink_to(tmp_path / "gone")  # a hidden name is no class, linked or not
    (root / "cover.jpg").symlink_to(tmp_path / "unmounted" / "cover.jpg")  # nor a loose image's
    (root / "b").unlink()
    assert ImageFolderSource(str(root)).classes == ["a", "c"]


def test_images_with_transparent_pixels_are_counted_and_the_first_named(tmp_path, caplog):
    """The alpha channel is dropped (as torchvision's loader does), so a logo on a transparent
    background trains as the colour stored under it, often black, while its caption may say "on a
    white background": this happened without a word in the log."""
    (tmp_path / "a").mkdir()
    rgb = np.full((8, 8, 3), 200, np.uint8)
    alpha = np.full((8, 8), 255, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a" / "0_opaque_rgba.png")
    alpha[:4] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a" / "1_logo.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).convert("LA").save(tmp_path / "a" / "2_grey_alpha.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "a" / "3_palette.gif", transparency=palette.getpixel((0, 0)))  # its colour transparent
    Image.fromarray(rgb).save(tmp_path / "a" / "4_plain.jpg")
    Image.fromarray(rgb).save(tmp_path / "a" / "5_colour_key.png", transparency=(200, 200, 200))  # PNG's tRNS
    source = ImageFolderSource(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        decoded = decoding.DecodedSource(source, 8)
        assert [int(decoded[i]["transparent"]) for i in range(len(source))] == [0, 1, 1, 1, 0, 1]
    named = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert named == [f"{tmp_path / 'a' / '1_logo.png'} has transparent pixels, which train as the colour stored "
                     "under them (often black), as the alpha channel is dropped: flatten such images onto a "
                     "background first where that matters (further ones are counted, not named)"], named
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [(images, _)], loader = batches(source, 1, batch_size=6)
        loader.close()
    assert loader.transparent.count == 4
    assert ("so far, 4 images drawn had transparent pixels (trained as the colour under them, the alpha channel "
            "dropped)") in caplog.text


@pytest.mark.parametrize("center_crop", [False, True])
def test_images_smaller_than_the_resolution_are_counted_and_the_first_named(tmp_path, caplog, center_crop):
    """An image whose shorter side is below data.resolution is upscaled to it (as the release
    does), so a folder of 32 px images trained at 64 px trains on blurred pixels: a resolution
    set above every image's size happened without a word in the log. The size named is the file's
    (1_small.png, longer than 16:1, is cut to 9 x 144 before it is resized)."""
    (tmp_path / "a").mkdir()
    for name, size in (("0_large.png", (20, 12)), ("1_small.png", (9, 200)), ("2_also_small.png", (7, 7))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "a" / name)
    source = ImageFolderSource(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        decoded = decoding.DecodedSource(source, 10, center_crop=center_crop)
        assert [int(decoded[i]["upscaled"]) for i in range(len(source))] == [0, 1, 1]
    named = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert named == [f"{tmp_path / 'a' / '1_small.png'} is 9 x 200 px, below data.resolution (10 px) on its shorter "
                     "side: it is upscaled, which trains the model on blurred pixels; where many images are, set "
                     "--config.data.resolution to their size (further ones are counted, not named)"], named
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [_, _], loader = batches(source, 2, batch_size=6, resolution=10, center_crop=center_crop)
        loader.close()
    assert loader.upscaled.count == 8  # counted over both batches: the count is made once
    assert ("so far, 8 of the 12 images drawn (67%) were smaller than data.resolution (10 px) and upscaled"
            in caplog.text), caplog.text


def test_images_whose_exif_orientation_is_not_applied_are_counted_and_the_first_named(tmp_path, caplog):
    """The EXIF orientation is not applied (as in the release), so a phone's photos, stored
    sideways with a tag that says to turn them, trained sideways without a word in the log."""
    (tmp_path / "a").mkdir()
    for name, orientation in (("0_upright.jpg", 1), ("1_phone.jpg", 6), ("2_mirrored.jpg", 2), ("3_no_tag.jpg", None),
                              ("4_bad_tag.jpg", 0)):
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        Image.new("RGB", (16, 12), (90, 90, 200)).save(tmp_path / "a" / name, exif=exif.tobytes())
    # a damaged EXIF block spoils no image: it trains, not counted
    Image.new("RGB", (16, 12)).save(tmp_path / "a" / "5_damaged_exif.jpg", exif=b"Exif\x00\x00damaged")
    Image.new("RGB", (16, 12)).save(tmp_path / "a" / "6_not_tiff_exif.png", exif=b"Exif\x00\x00M")  # getexif raises
    source = ImageFolderSource(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        decoded = decoding.DecodedSource(source, 8)
        assert [int(decoded[i]["exif_oriented"]) for i in range(len(source))] == [0, 1, 1, 0, 0, 0, 0]
        assert [int(decoded[i]["skipped"]) for i in range(len(source))] == [0] * 7
    named = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert named == [f"{tmp_path / 'a' / '1_phone.jpg'} has an EXIF orientation (6: turn 90 degrees clockwise to "
                     "show) that is not applied, as in the release: it trains as stored, sideways or mirrored; turn "
                     "such images upright first where that matters, e.g. with PIL.ImageOps.exif_transpose (further "
                     "ones are counted, not named)"], named
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [_], loader = batches(source, 1, batch_size=6, resolution=8)
        loader.close()
    assert loader.exif_oriented.count == 2
    assert ("so far, 2 images drawn had an EXIF orientation that was not applied (trained as stored, sideways or "
            "mirrored)") in caplog.text, caplog.text


def test_pils_warning_of_a_damaged_exif_block_is_not_printed():
    """PIL warns "Corrupt EXIF data" as exif_orientation reads such a block, which spoils no image:
    decoding filters the warning out at import. pytest resets the filters for each test, so a
    fresh process reads an image of a block cut short."""
    cut_short = r"b'Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff'"
    script = ("import io\nfrom PIL import Image\nfrom pixelflow_jax.data import decoding\nbuffer = io.BytesIO()\n"
              f"Image.new('RGB', (16, 12)).save(buffer, 'JPEG', exif={cut_short})\n"
              "assert decoding.exif_orientation(decoding.opened(buffer.getvalue())) == 1\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "EXIF" not in result.stderr, result.stderr


def test_the_exif_orientation_words_name_what_pil_does_to_show_the_stored_pixels():
    """Each orientation's words in the warning are checked against PIL's exif_transpose: a word
    swapped (clockwise for anticlockwise, one diagonal for the other) would tell a user to turn
    the images the wrong way, and no test read the words of orientations other than 6."""
    from PIL import ImageOps

    stored = np.arange(6, dtype=np.uint8).reshape(2, 3)  # no symmetry: each operation gives other pixels
    operations = {"mirror left to right": np.fliplr, "turn 180 degrees": lambda a: np.rot90(a, 2),
                  "mirror top to bottom": np.flipud, "mirror along the diagonal from the top left": np.transpose,
                  "mirror along the diagonal from the top right": lambda a: np.rot90(a, 2).T,
                  "turn 90 degrees clockwise": lambda a: np.rot90(a, -1), "turn 90 degrees anticlockwise": np.rot90}
    assert sorted(decoding.ORIENTATION_WORDS) == [2, 3, 4, 5, 6, 7, 8]
    for orientation, words in decoding.ORIENTATION_WORDS.items():
        exif = Image.Exif()
        exif[decoding.EXIF_ORIENTATION_TAG] = orientation
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, "PNG", exif=exif.tobytes())
        shown = np.asarray(ImageOps.exif_transpose(decoding.opened(buffer.getvalue())))
        assert np.array_equal(shown, operations[words.removesuffix(" to show")](stored)), (orientation, words)


def test_an_image_of_every_problem_is_named_for_each_and_a_record_without_a_name_by_its_index(caplog):
    """The three warnings are once per process each, not once among them: a small, transparent,
    turned image is named three times. A record without a name of its own (a list of records, as
    TFDS gives) is named by its index, as an unreadable one is."""
    rgba = np.zeros((6, 6, 4), np.uint8)  # every pixel transparent, below the resolution
    exif = Image.Exif()
    exif[decoding.EXIF_ORIENTATION_TAG] = 8
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG", exif=exif.tobytes())
    source = [{"image": buffer.getvalue(), "label": 0}]
    with caplog.at_level(logging.WARNING):
        decoded = decoding.DecodedSource(source, 8)[0]
    assert [int(decoded[kind]) for kind in ("transparent", "upscaled", "exif_oriented")] == [1, 1, 1]
    named = [r.getMessage() for r in caplog.records]
    assert [m.split(" ", 3)[:3] for m in named] == [["record", "0", "has"], ["record", "0", "is"],
                                                     ["record", "0", "has"]], named
    assert "transparent pixels" in named[0] and "upscaled" in named[1] and "EXIF orientation (8: turn 90 degrees " \
        "anticlockwise to show)" in named[2], named


def test_a_nearly_opaque_pixel_and_a_one_bit_pngs_transparent_colour_are_transparent_pixels():
    """An alpha of 254 is not opaque either, and a 1-bit PNG keeps a transparent colour (tRNS) as
    grey and RGB ones do."""
    rgba = np.full((2, 2, 4), 255, np.uint8)
    assert not decoding.has_transparent_pixels(decoding.opened(encoded(rgba)))
    rgba[1, 1, 3] = 254
    assert decoding.has_transparent_pixels(decoding.opened(encoded(rgba)))
    one_bit = io.BytesIO()
    Image.fromarray(np.array([[0, 255], [255, 255]], np.uint8)).convert("1").save(one_bit, "PNG", transparency=0)
    pil = decoding.opened(one_bit.getvalue())
    assert pil.mode == "1" and decoding.has_transparent_pixels(pil)


def test_a_cielab_tiffs_a_channel_is_a_colour_not_transparency():
    """A scan saved in CIELAB (mode LAB) has bands L, A, B, whose A is the green-red axis: read as
    alpha, every such image was named and counted as having transparent pixels."""
    lab = io.BytesIO()
    Image.fromarray(np.full((2, 2, 3), (200, 30, 30), np.uint8)).convert("LAB").save(lab, "TIFF")
    pil = decoding.opened(lab.getvalue())
    assert pil.mode == "LAB" and not decoding.has_transparent_pixels(pil)
    assert decoding.rgb_of(pil).mode == "RGB"


def test_a_16_bit_grey_pngs_transparent_grey_value_is_a_transparent_pixel_only_where_a_pixel_has_it():
    """PIL opens a 16-bit grey PNG as mode I;16 with its tRNS value in info, and its convert() to
    RGBA leaves every pixel opaque: such an image was never counted as transparent."""
    grey = np.array([[0, 1000], [40000, 65535]], np.uint16)
    for transparent_value, transparent in ((1000, True), (1001, False)):
        file = io.BytesIO()
        Image.fromarray(grey).save(file, "PNG", transparency=transparent_value)
        pil = decoding.opened(file.getvalue())
        assert pil.mode == "I;16" and pil.info["transparency"] == transparent_value
        assert decoding.has_transparent_pixels(pil) is transparent


def png_16_bit_rgb(samples: np.ndarray, transparent_colour) -> bytes:
    """A 16-bit RGB PNG with a tRNS chunk, which PIL cannot write: one IHDR, tRNS and IDAT chunk,
    every row with PNG's Sub filter (each byte less the one 6 bytes, a pixel, before it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = samples.shape
    rows = samples.astype(">u2").view(np.uint8).reshape(height, width * 6)
    filtered = np.concatenate([rows[:, :6], rows[:, 6:] - rows[:, :-6]], axis=1)  # uint8: modulo 256
    scanlines = b"".join(b"\x01" + row.tobytes() for row in filtered)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *transparent_colour)) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def test_a_16_bit_rgb_pngs_transparent_colour_is_a_transparent_pixel_only_where_a_pixel_has_it():
    """PIL opens a 16-bit RGB PNG as 8-bit RGB (each sample's high byte) and compares those with the
    16-bit tRNS colour: a pixel of that colour stayed opaque (the image trained without a word), and
    for a colour below 256 the pixels whose high bytes equal it came out transparent instead."""
    samples = np.array([[[0x1234, 0x5678, 0x9ABC], [0x1234, 0x5678, 0x9ABD], [65535, 0, 0]],
                        [[0x0012, 0x0056, 0x009A], [0x1212, 0x5656, 0x9A9A], [0, 0, 0]]], np.uint16)
    for colour, transparent_at in (((0x1234, 0x5678, 0x9ABC), [(0, 0)]), ((0x0012, 0x0056, 0x009A), [(1, 0)]),
                                   ((0x1234, 0x5678, 0x9ABE), [])):
        pil = decoding.opened(png_16_bit_rgb(samples, colour))
        assert decoding.has_transparent_pixels(pil) is bool(transparent_at), colour
        alpha = np.asarray(pil.getchannel("A")) if "A" in pil.getbands() else np.full(samples.shape[:2], 255)
        assert list(zip(*np.nonzero(alpha < 255))) == transparent_at, colour
        np.testing.assert_array_equal(np.asarray(decoding.rgb_of(pil)), samples >> 8)  # 8 bits, as PIL reads it


def test_every_image_extension_the_readme_lists_is_read_and_decoded(tmp_path):
    """Each extension the README names, saved in the format Pillow gives it, reads as the image it holds."""
    import re

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    extensions = re.search(r"Files ending in `([^`]+)`", readme).group(1).split()
    assert tuple(extensions) == IMAGE_EXTENSIONS, "README.md's list is not the loader's IMAGE_EXTENSIONS"
    (tmp_path / "a").mkdir()
    for extension in extensions:
        image = Image.new("L", (8, 8), 90) if extension == ".pgm" else Image.new("RGB", (8, 8), (90, 90, 90))
        image.save(tmp_path / "a" / f"x{extension}", format=Image.registered_extensions()[extension])
    source = ImageFolderSource(str(tmp_path))
    assert sorted(os.path.splitext(path)[1] for path, _ in source.records) == sorted(extensions)
    decoded = [decoding.DecodedSource(source, 8, expand_ratio=1.0)[i] for i in range(len(source))]
    assert [d["skipped"] for d in decoded] == [0] * len(extensions)
    assert all(d["image"].shape == (8, 8, 3) and np.abs(d["image"].astype(int) - 90).max() <= 2 for d in decoded)


def test_folder_classes_must_fit_the_model_and_hold_images(awkward_folder, caplog):
    config = type("C", (), {"source": "folder", "root": awkward_folder})
    with pytest.raises(DataError, match="has 2 classes but the model has model.num_classes = 1"):
        make_source(config, num_classes=1)
    assert make_source(config, num_classes=2).classes == ["a", "b"]
    assert "never train" not in caplog.text
    assert make_source(config, num_classes=10).num_classes == 2  # previews of classes 2-9 would show what never
    # trained: named, and previews cycle over the 2
    assert "has 2 classes but the model has model.num_classes = 10: classes 2 to 9 never train " \
           "(--config.model.num_classes=2 fits the folder, in a new --workdir)" in caplog.text
    assert make_source(config, num_classes=3).num_classes == 2  # one class short is named too
    assert "has 2 classes but the model has model.num_classes = 3: classes 2 to 2 never train" in caplog.text
    os.makedirs(os.path.join(awkward_folder, "c_empty"))
    try:
        with pytest.raises(DataError, match=r"classes without images: \['c_empty'\]"):
            make_source(config, num_classes=10)
    finally:
        os.rmdir(os.path.join(awkward_folder, "c_empty"))


def test_classes_without_images_are_named_up_to_ten_with_dots_past_ten(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    names = [f"e{i:02d}" for i in range(11)]
    for name in names[:10]:
        os.makedirs(tmp_path / name)
    with pytest.raises(DataError, match=re.escape(f"classes without images: {names[:10]} (no file ending in")):
        ImageFolderSource(str(tmp_path))
    os.makedirs(tmp_path / names[10])
    with pytest.raises(DataError, match=re.escape(f"classes without images: {names[:10]} ... (no file ending in")):
        ImageFolderSource(str(tmp_path))


def test_missing_or_empty_folder_names_the_path(tmp_path, caplog):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageFolderSource(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match=r"no images found in class folders of .*empty \(expected "
                                        r".*empty/<class>/<image>"):
        ImageFolderSource(str(tmp_path / "empty"))
    Image.new("RGB", (4, 4)).save(tmp_path / "empty" / "0.png")  # images beside the class folders, not in them
    with pytest.raises(DataError, match=r"the images in .*empty itself are not read: put each class's images in a "
                                        r"subfolder .*empty/<class>/"), caplog.at_level(logging.WARNING):
        ImageFolderSource(str(tmp_path / "empty"))
    assert "itself are not read" not in caplog.text  # said once, by the error, not also by a warning above it
    with pytest.raises(DataError, match=r"^--config.data.root is not set"):
        ImageFolderSource("")


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
    # Example i is 40 + i pixels high and labelled i % 3: each record keeps its own label.
    assert all(source[i]["label"] == (source[i]["image"].shape[0] - 40) % 3 for i in range(10))
    with pytest.raises(DataError, match=r"has no records in split 'validation' .*: its splits are train "
                                        r"\(10 records\)"):
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


def test_an_empty_tfds_split_names_where_it_was_looked_for(monkeypatch, tmp_path):
    """With the default data dir (data.tfds_data_dir='') the error read "in  is empty", naming no place."""
    import tensorflow_datasets as tfds

    class EmptyBuilder:
        info = type("Info", (), {"splits": {"train": type("Split", (), {"num_examples": 0})}})

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            return []

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: EmptyBuilder())
    for data_dir, where in (("", r"the default TFDS data dir \(~/tensorflow_datasets\)"),
                            (str(tmp_path), str(tmp_path))):
        with pytest.raises(DataError, match=f"^TFDS dataset 'imagenet2012' in {where} has no records in split 'train': "
                                            r"its splits are train \(0 records\)"):
            TfdsSource("imagenet2012", "train", data_dir)


def build_tfds(data_dir, class_name: str, features: dict, example) -> None:
    """Builds a 6-record TFDS dataset of `features` under data_dir (ArrayRecord, no TensorFlow);
    `example(i)` is record i. TFDS registers the builder by class_name in snake case
    (LabelsPast -> labels_past) for the whole session, so each test names its own."""
    import tensorflow_datasets as tfds

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def generate_examples(self):
        return ((i, example(i)) for i in range(6))

    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,),
                   {"VERSION": tfds.core.Version("1.0.0"), "_info": info, "_split_generators": split_generators,
                    "_generate_examples": generate_examples})
    builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_a_tfds_dataset_must_hold_images_and_labels_that_fit_the_models_classes(tmp_path, caplog):
    """Labels from model.num_classes on made every step NaN (skipped, the run learning nothing),
    and a dataset without labels failed 64 draws in a row once training."""
    import tensorflow_datasets as tfds

    image = lambda i: io.BytesIO(encoded(np.full((8, 8, 3), i, np.uint8)))  # (arrays: TFDS encodes with TensorFlow)
    build_tfds(tmp_path, "LabelsPastTheModel", {"image": tfds.features.Image(),
                                                "label": tfds.features.ClassLabel(num_classes=30)},
               lambda i: {"image": image(i), "label": 20 + i})
    config = type("C", (), {"source": "tfds", "tfds_name": "labels_past_the_model", "split": "train",
                            "tfds_data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"^TFDS dataset 'labels_past_the_model' has 30 classes but the model has "
                                        r"model.num_classes = 10: .* Set --config.model.num_classes=30"):
        make_source(config, num_classes=10)
    assert len(make_source(config, num_classes=30)) == 6 and "never train" not in caplog.text
    assert make_source(config, num_classes=40).num_classes == 30  # what training previews cycle over
    assert "has 30 classes but the model has model.num_classes = 40: classes 30 to 39 never train" in caplog.text

    build_tfds(tmp_path, "CaptionedNotLabelled", {"image": tfds.features.Image(), "caption": tfds.features.Text()},
               lambda i: {"image": image(i), "caption": f"picture {i}"})
    with pytest.raises(DataError, match=r"'captioned_not_labelled' in \S+ has no 'label' feature \(its features: "
                                        r"image, caption\)"):
        TfdsSource("captioned_not_labelled", "train", str(tmp_path))


def test_a_tfds_split_name_or_data_dir_mistake_is_named_with_its_fix_not_a_rebuild(tmp_path):
    """A built dataset read with a split typo, an empty slice or its own folder as the data dir
    was told to run `tfds build` (hours for ImageNet; into the dataset's folder, for the last)."""
    import tensorflow_datasets as tfds

    build_tfds(tmp_path, "BuiltOnce",
               {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=2)},
               lambda i: {"image": io.BytesIO(encoded(np.full((8, 8, 3), i, np.uint8))), "label": i % 2})
    assert len(TfdsSource("built_once", "train[:50%]", str(tmp_path))) == 3
    for split in ("trian", "train[:0]", "train[:9]"):
        with pytest.raises(DataError, match=rf"^TFDS dataset 'built_once' in {tmp_path} has no records in split "
                                            rf"'{re.escape(split)}' \(.+\): its splits are train \(6 records\); set "
                                            r"--config.data.split to one of them or a slice") as error:
            TfdsSource("built_once", split, str(tmp_path))
        assert "tfds build" not in str(error.value)
    listing = sorted(os.listdir(tmp_path / "built_once" / "1.0.0"))
    for inside in (tmp_path / "built_once", tmp_path / "built_once" / "1.0.0"):
        with pytest.raises(DataError, match=rf"{inside} is the dataset's own folder, not the data dir holding it: set "
                                            rf"--config.data.tfds_data_dir={tmp_path}$"):
            TfdsSource("built_once", "train", str(inside))
    assert sorted(os.listdir(tmp_path / "built_once" / "1.0.0")) == listing  # nothing built inside it
    os.makedirs(tmp_path / "imagenet2012" / "5.1.0")  # a registered dataset: said instead of its build command
    with pytest.raises(DataError, match=rf"not built under {tmp_path}/imagenet2012/5.1.0: \S+ is the dataset's own "
                                        r"folder, not the data dir holding it: set "
                                        rf"--config.data.tfds_data_dir={tmp_path}$"):
        TfdsSource("imagenet2012", "train", str(tmp_path / "imagenet2012" / "5.1.0"))
    assert os.listdir(tmp_path / "imagenet2012" / "5.1.0") == []
    with pytest.raises(DataError, match=r"^no TFDS dataset is named 'imagenet_2012': .* Check --config.data.tfds_name "
                                        r"\(close names: imagenet2012"):
        TfdsSource("imagenet_2012", "train", str(tmp_path))
    with pytest.raises(DataError, match=r"named 'imagenet_2012/downsampled_64x64:5.1.0': .*\(close names: "
                                        r"imagenet2012"):
        TfdsSource("imagenet_2012/downsampled_64x64:5.1.0", "train", str(tmp_path))  # matched by its name alone


def test_a_dataset_folder_is_found_down_to_its_config_and_version_folders():
    """TFDS lays a dataset out as DATA_DIR/NAME[/CONFIG]/VERSION: a data dir ending in any of those
    three names the dataset's folder; one in the working directory names '.' as the data dir."""
    hint = sources.dataset_folder_hint
    for data_dir in ("/data/cifar10_corrupted", "/data/cifar10_corrupted/brightness_1",
                     "/data/cifar10_corrupted/brightness_1/1.0.0/"):
        assert hint("cifar10_corrupted/brightness_1:1.0.0", data_dir).endswith("set --config.data.tfds_data_dir=/data")
    assert hint("imagenet2012", "imagenet2012/5.1.0").endswith("--config.data.tfds_data_dir=.")
    assert hint("imagenet2012", "/data/imagenet2012/a/b/5.1.0") == ""  # deeper than TFDS's layout: some other folder
    assert hint("imagenet2012", None) == hint("imagenet2012", "/data") == ""


def test_an_array_record_that_cannot_read_a_bucket_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(sources, "installed_array_record_version", lambda: "0.8.2")
    for open_source in (lambda: CaptionRecordSource("gs://bucket/shards"),
                        lambda: TfdsSource("imagenet2012", "train", "gs://bucket/tfds")):
        with pytest.raises(DataError, match=r"gs://bucket/\S+ is in a bucket, but array-record 0.8.2 reads only "
                                            r"local files; install array-record>=0.8.3"):
            open_source()
    monkeypatch.setattr(sources, "installed_array_record_version", lambda: None)
    with pytest.raises(DataError, match="but array-record is not installed; install array-record>=0.8.3"):
        CaptionRecordSource("gs://bucket/shards")
    sources.check_array_record_reads("/local/shards")  # local files: any version reads them


def test_data_in_a_bucket_that_does_not_exist_names_the_bucket(gcs_emulator):
    """A typo in the bucket's name read as the folder missing inside it."""
    missing = "is in the bucket gs://no-such-bucket, which does not exist (a typo?"
    for open_source, fix in ((lambda: sources.ImageFolderSource("gs://no-such-bucket/images"),
                              "; set --config.data.root to a folder of class subfolders"),
                             (lambda: CaptionRecordSource("gs://no-such-bucket/shards"),
                              "; set --config.data.root to the folder that"),
                             (lambda: TfdsSource("imagenet2012", "train", "gs://no-such-bucket/tfds"),
                              "; build the dataset there with")):
        with pytest.raises(DataError, match=re.escape(missing) + ".*" + re.escape(fix)):
            open_source()


def test_array_record_from_0_8_3_on_reads_a_bucket_comparing_versions_as_numbers(monkeypatch):
    """0.8.3 is the first version that opens gs:// itself, so it must not be refused; versions
    compare number by number (0.10 is after 0.8), not as text."""
    for version in ("0.8.3", "0.8.10", "0.10.0", "1.0"):
        monkeypatch.setattr(sources, "installed_array_record_version", lambda: version)
        sources.check_array_record_reads("gs://bucket/shards")
    for version in ("0.8.2", "0.7.99"):
        monkeypatch.setattr(sources, "installed_array_record_version", lambda: version)
        with pytest.raises(DataError, match=f"array-record {version} reads only local files"):
            sources.check_array_record_reads("gs://bucket/shards")


def test_an_output_counts_as_inside_a_folder_source_only_where_the_source_reads(tmp_path):
    """The folder itself and any folder under it that a source reads would make a pack's shards
    (or a run's files) data; a hidden folder or lost+found under it is not read, and a sibling
    whose name merely starts alike is outside it."""
    folder = str(tmp_path / "data")
    assert sources.read_with_folder(folder, folder) and sources.read_with_folder(folder + "/", folder)
    assert sources.read_with_folder(f"{folder}/shards/new", folder)
    assert not sources.read_with_folder(f"{folder}/.cache/shards", folder)
    assert not sources.read_with_folder(f"{folder}/lost+found", folder)
    assert not sources.read_with_folder(f"{folder}_shards", folder)
    assert sources.read_with_folder("gs://bucket/data/", "gs://bucket/data")


def test_an_image_folders_listing_follows_its_files_and_labels_not_where_the_folder_lies(tmp_path):
    """A resume compares the listing with the run's: the same folder copied elsewhere, or named with
    a trailing slash, is the same data, but an image moved to another class is another labelling."""
    image = encoded(np.zeros((8, 8, 3), np.uint8))
    for path in ("a/1.png", "b/2.png", "b/3.png"):
        os.makedirs(tmp_path / "first" / os.path.dirname(path), exist_ok=True)
        (tmp_path / "first" / path).write_bytes(image)
    shutil.copytree(tmp_path / "first", tmp_path / "elsewhere" / "copy")
    listing = ImageFolderSource(str(tmp_path / "first")).listing
    assert ImageFolderSource(str(tmp_path / "elsewhere" / "copy")).listing == listing
    assert ImageFolderSource(f"{tmp_path}/first/").listing == listing
    os.rename(tmp_path / "first" / "b" / "3.png", tmp_path / "first" / "a" / "3.png")
    assert ImageFolderSource(str(tmp_path / "first")).listing != listing


def test_a_captioned_sets_listing_follows_which_caption_file_and_how_many_records_each_shard_holds(tmp_path):
    """A resume compares the listing with the run's: NAME.TXT swapped for NAME.txt is another
    caption, and the same shard names holding other counts (packed again with another
    --records_per_shard) are another record order."""
    from pixelflow_jax.data.caption_data import CaptionedFolderSource
    from pixelflow_jax.data.caption_shards import pack

    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(encoded(np.full((8, 8, 3), i, np.uint8)))
        (folder / f"{i}.TXT").write_text(f"caption {i}")
    listing = CaptionedFolderSource(str(folder)).listing
    (folder / "0.TXT").rename(folder / "0.txt")
    assert CaptionedFolderSource(str(folder)).listing != listing
    pack(str(folder), str(tmp_path / "two_and_two"), records_per_shard=2)
    pack(str(folder), str(tmp_path / "three_and_one"), records_per_shard=3)
    assert sorted(os.listdir(tmp_path / "two_and_two")) == sorted(os.listdir(tmp_path / "three_and_one"))
    assert CaptionRecordSource(str(tmp_path / "two_and_two")).listing != \
        CaptionRecordSource(str(tmp_path / "three_and_one")).listing


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


def test_the_loader_reads_only_prefetch_batches_ahead():
    """grain's default read-ahead is 500 elements (batches, here) on 16 threads: gigabytes at
    ImageNet sizes. Idle after its first batch, the loader must stop after a few."""
    import time

    import threading

    class CountingSource:  # read from grain's threads
        def __init__(self, source):
            self.source, self.reads, self.lock = source, 0, threading.Lock()

        def __len__(self):
            return len(self.source)

        def __getitem__(self, index):
            with self.lock:
                self.reads += 1
            return self.source[index]

    source = CountingSource(DemoSource(2000, seed=0))
    loader = ImageLoader(build_dataset(source, batch_size=8, resolution=R, seed=0, prefetch_batches=2))
    next(loader)
    time.sleep(2)
    assert source.reads <= 8 * (1 + 2 + 2)  # the batch taken, 2 buffered, 2 on their threads
    loader.close()


def test_loader_workers_die_with_a_trainer_killed_9(tmp_path):
    """kill -9 gives the trainer no chance to stop its workers: they must not live on, holding
    memory (a container's restart loop would pile them up)."""
    import signal
    import subprocess
    import sys
    import time

    script = """
import os, sys, time
from pixelflow_jax.data.demo_data import DemoSource
from pixelflow_jax.data.loader import ImageLoader, build_dataset
if __name__ == "__main__":
    loader = ImageLoader(build_dataset(DemoSource(24, seed=3), batch_size=4, resolution=32, seed=0, num_workers=2))
    next(loader)
    print("ready", flush=True)
    time.sleep(300)
"""
    path = tmp_path / "trainer.py"  # spawned workers re-import the main script by its path
    path.write_text(script)
    workers, trainer = [], None
    try:
        trainer = subprocess.Popen([sys.executable, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": REPO})
        assert trainer.stdout.readline().strip() == "ready"
        children = lambda: [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(int(p)) == trainer.pid]
        workers = children()
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), [open(f"/proc/{p}/cmdline").read() for p in workers if alive(p)]
    finally:
        if trainer and trainer.poll() is None:
            trainer.kill()
        for pid in workers:  # a failed test leaves no orphans behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_run_with_loader_workers_ends_without_a_leak_warning(tmp_path):
    """The batches prefetched when a run stops are removed by multiprocessing's resource tracker;
    its "leaked shared_memory objects" warning would end every run."""
    import subprocess
    import sys

    script = """
from pixelflow_jax.data.demo_data import DemoSource
from pixelflow_jax.data.loader import ImageLoader, build_dataset
if __name__ == "__main__":
    loader = ImageLoader(build_dataset(DemoSource(64, seed=3), batch_size=4, resolution=32, seed=0, num_workers=2))
    next(loader)
    loader.close()
"""
    (tmp_path / "run.py").write_text(script)
    result = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0 and "leaked shared_memory" not in result.stderr, result.stderr[-3000:]


def test_loader_workers_from_a_script_without_a_main_guard_are_refused_in_one_line_naming_the_fixes(tmp_path):
    """grain's workers are spawned: each runs the main script again, which built a loader of its
    own and failed starting its workers; the script ended in ~100 lines of tracebacks, grain's last
    line 'Worker process was terminated unexpectedly'. The same call under the guard, reached
    through a function, starts as before."""
    body = """
from pixelflow_jax.data.demo_data import DemoSource
from pixelflow_jax.data.loader import build_dataset

def first_batch():
    return next(iter(build_dataset(DemoSource(8), batch_size=4, resolution=16, seed=0, num_workers=1)))

"""
    run = lambda script: subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                                        timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    (tmp_path / "unguarded.py").write_text(body + "print(first_batch()['image'].shape)\n")
    result = run(tmp_path / "unguarded.py")
    assert result.returncode == 1 and "Worker process" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"pixelflow_jax.data.sources.DataError: build_dataset(num_workers=1) was called from the top-level code of "
        f"{tmp_path / 'unguarded.py'} (line 8), outside `if __name__ == \"__main__\":`: each loader worker process "
        "starts by running that script again (Python's spawn start method), which would run that code again in it; "
        "put the script's top-level code under that guard, or pass num_workers=0"), result.stderr[-3000:]
    (tmp_path / "guarded.py").write_text(body + "if __name__ == '__main__':\n    print(first_batch()['image'].shape)\n")
    result = run(tmp_path / "guarded.py")
    assert result.returncode == 0 and result.stdout.strip() == "(4, 16, 16, 3)", result.stderr[-3000:]


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


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
        resumed = [batches(source, 4, start_batch=3, rows=ProcessRows.contiguous(4, i, process_count))[0]
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
    parts = [batches(IndexSource(), 6, batch_size=8, rows=ProcessRows.contiguous(8, i, 2))[0] for i in range(2)]
    for step, (images, labels) in enumerate(one_process):
        # Process i holds rows [4i, 4i+4) of every global batch, crops and flips included.
        np.testing.assert_array_equal(np.concatenate([p[step][1] for p in parts]), labels)
        np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), images)
    read = np.concatenate([labels for _, labels in one_process[:2]])
    assert sorted(read.tolist()) == list(range(16))  # an epoch covers the data once
    with pytest.raises(DataError, match="global batch 8 is not divisible by the 3 processes"):
        ProcessRows.contiguous(8, 0, 3)


class FakeBatchSharding:
    """The rows of a batch that each device of this process holds."""

    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {device: (slice(start, stop),) for device, (start, stop) in enumerate(self.spans)}


def test_a_process_reads_the_rows_its_devices_hold_wherever_the_mesh_puts_them():
    """A TPU mesh orders devices by the chips' topology: one host's devices may hold rows 0-1 and
    4-5 of a batch of 8. The process read rows 0-3 all the same, and jax put them at its devices'
    places in order: image 2 of the global batch sat at row 4, with row 4's noise and stage."""
    assert ProcessRows.of_sharding(FakeBatchSharding([(0, 1), (1, 2), (2, 3), (3, 4)]), 8) == ProcessRows(4, (0,))
    assert ProcessRows.of_sharding(FakeBatchSharding([(4, 6), (6, 8)]), 8) == ProcessRows(4, (1,))
    assert ProcessRows.of_sharding(FakeBatchSharding([(4, 6), (0, 2), (0, 2)]), 8) == ProcessRows(2, (0, 2))
    assert ProcessRows.of_sharding(FakeBatchSharding([(0, 8)]), 8) == ProcessRows(8, (0,))  # fsdp-only: replicated
    # Rows 2-5 of 8: blocks of 2 (blocks 1 and 2), as a run's length (4) would misplace them at rows 0-3.
    assert ProcessRows.of_sharding(FakeBatchSharding([(2, 4), (4, 6)]), 8) == ProcessRows(2, (1, 2))

    one_process, _ = batches(IndexSource(), 3, batch_size=8)
    interleaved = [batches(IndexSource(), 3, batch_size=8, start_batch=0, rows=ProcessRows(2, blocks))[0]
                   for blocks in ((0, 2), (1, 3))]
    for step, (images, labels) in enumerate(one_process):
        for part, rows in zip(interleaved, ([0, 1, 4, 5], [2, 3, 6, 7])):
            np.testing.assert_array_equal(part[step][1], labels[rows])
            np.testing.assert_array_equal(part[step][0], images[rows])


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
    from pixelflow_jax.sharding import batch_sharding, make_mesh

    config = c2i.get_config("tiny")
    config.data.demo_num_images = 40
    sharding = batch_sharding(make_mesh())
    loader = make_loader(config, batch_size=8, sharding=sharding)
    images, labels = next(loader)
    assert images.shape == (8, 64, 64, 3) and labels.dtype == np.int32
    assert [classify(image).hue for image in images] == labels.tolist()  # crop+flip keep the class
    assert [classify(image).shape for image in images] == (labels % len(SHAPES)).tolist()  # and the outline
    config.data.source = "nonsense"
    with pytest.raises(DataError, match="unknown config.data.source 'nonsense'"):
        make_loader(config, batch_size=8, sharding=sharding)


def test_make_loader_reads_with_the_runs_seed_crop_and_flip_settings_from_its_start_batch():
    """make_loader is what a training run calls: config.seed, data.center_crop, data.random_flip and
    the step a resume starts at must reach the pipeline (a seed dropped there trains every run on
    one order; a start dropped repeats the first batches after each resume). Reference: the
    pipeline built with those settings directly."""
    import configs.c2i as c2i
    from pixelflow_jax.data.loader import make_loader
    from pixelflow_jax.data.sources import open_source
    from pixelflow_jax.sharding import batch_sharding, make_mesh

    config = c2i.get_config("tiny")
    config.seed = 5
    config.data.update(demo_num_images=24, resolution=32, center_crop=True, random_flip=False)
    loader = make_loader(config, batch_size=8, sharding=batch_sharding(make_mesh()), start_batch=2)
    expected = ImageLoader(build_dataset(open_source(config), batch_size=8, resolution=config.data.resolution, seed=5,
                                         center_crop=True, random_flip=False, start_batch=2))
    (images, labels), (expected_images, expected_labels) = next(loader), next(expected)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)



def test_make_loader_flips_for_a_config_of_a_version_without_random_flip():
    """A run's config.json from before data.random_flip resumes flipping, as it trained."""
    import configs.c2i as c2i
    from pixelflow_jax.data.loader import make_loader
    from pixelflow_jax.data.sources import open_source
    from pixelflow_jax.sharding import batch_sharding, make_mesh

    config = c2i.get_config("tiny")
    config.data.update(demo_num_images=24, resolution=32)
    del config.data["random_flip"]
    images, _ = next(make_loader(config, batch_size=8, sharding=batch_sharding(make_mesh())))
    flipped, kept = (next(ImageLoader(build_dataset(open_source(config), batch_size=8, resolution=32, seed=config.seed,
                                                    expand_ratio=config.data.expand_ratio, random_flip=flip)))[0]
                     for flip in (True, False))
    assert not np.array_equal(flipped, kept)  # (the check can fail)
    np.testing.assert_array_equal(images, flipped)

# ------------------------------------------------------------------- bad input a hostile user brings


def encoded(array, mode=None, format="PNG"):
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format=format)
    return out.getvalue()


def test_alpha_is_dropped_exif_orientation_is_not_applied_and_a_gif_trains_its_first_frame():
    """What the README states of these files, as torchvision's loader reads them: transparent
    pixels keep their stored colour (not composited), a photo stored sideways stays sideways."""
    def encoded(image, fmt, **kwargs):
        out = io.BytesIO()
        image.save(out, format=fmt, **kwargs)
        return out.getvalue()

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255  # green, fully transparent
    assert (np.asarray(decoding.to_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))) == [0, 255, 0]).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    sideways = encoded(Image.new("RGB", (40, 8)), "JPEG", exif=exif.tobytes())
    assert decoding.to_rgb(sideways).size == (40, 8)
    frames = [Image.new("RGB", (4, 4), (v, v, v)) for v in (10, 200)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert (np.asarray(decoding.to_rgb(gif)) == 10).all()


def test_high_bit_depth_grey_images_are_scaled_to_8_bits_not_clipped():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = lambda image: np.asarray(decoding.to_rgb(image))
    for image in (encoded(grey.astype(np.uint16) * 257),  # a 16-bit PNG (mode I;16)
                  encoded(grey.astype(np.int32) * 257, "I", "TIFF"),  # 16-bit data in a 32-bit TIFF
                  encoded(grey.astype(np.float32) / 255, "F", "TIFF")):  # floats in [0, 1]
        np.testing.assert_array_equal(rgb(image), np.repeat(grey[..., None], 3, axis=2))
    for beyond in (encoded(np.full((4, 4), 70000, np.int32), "I", "TIFF"),
                   encoded(np.full((4, 4), 2.0, np.float32), "F", "TIFF"),
                   encoded(np.full((4, 4), np.nan, np.float32), "F", "TIFF")):
        with pytest.raises(ValueError, match="values outside"):  # no known scale: skipped and counted
            rgb(beyond)
    # The 8-bit modes still convert as before.
    la = np.stack([grey, 255 - grey], axis=-1)
    np.testing.assert_array_equal(rgb(encoded(la, "LA")), np.repeat(grey[..., None], 3, axis=2))
    black_white = (grey > 127).astype(np.uint8) * 255
    palette = Image.fromarray(grey % 2, "L").convert("P")
    palette.putpalette([10, 20, 30, 200, 100, 0])
    for image, expected in ((Image.fromarray(black_white).convert("1"), np.repeat(black_white[..., None], 3, axis=2)),
                            (palette, [[10, 20, 30], [200, 100, 0]] * 128)):
        out = io.BytesIO()
        image.save(out, format="PNG")
        np.testing.assert_array_equal(rgb(out.getvalue()).reshape(16, 16, 3), np.reshape(expected, (16, 16, 3)))
    cyan = np.zeros((4, 4, 4), np.uint8)
    cyan[..., 0] = 255
    np.testing.assert_array_equal(rgb(encoded(cyan, "CMYK", "TIFF"))[0, 0], [0, 255, 255])


def test_high_bit_depth_grey_is_rounded_to_the_nearest_8_bit_value_not_truncated():
    """65535 / 255 = 257 exactly, so the multiples of 257 above scale alike either way; 129 / 257
    (0.502) is 1 and 0.003 x 255 (0.765) is 1 too."""
    rgb = lambda image: np.asarray(decoding.to_rgb(image))[..., 0]
    np.testing.assert_array_equal(rgb(encoded(np.array([[128, 129]], np.uint16))), [[0, 1]])
    np.testing.assert_array_equal(rgb(encoded(np.array([[0.001, 0.003]], np.float32), "F", "TIFF")), [[0, 1]])


def test_encoded_bytes_in_a_bytearray_decode_as_bytes_do():
    png = encoded(np.full((4, 4, 3), 90, np.uint8))
    assert (np.asarray(decoding.to_rgb(bytearray(png))) == 90).all()  # not read as a 1-D pixel array


def test_an_image_file_gone_since_the_listing_is_skipped_naming_its_path(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "a" / f"{i}.png")
    source = ImageFolderSource(str(tmp_path))
    os.remove(tmp_path / "a" / "0.png")  # the record itself cannot be read: no name of its own to give
    with caplog.at_level(logging.WARNING):
        assert decoding.DecodedSource(source, 8)[0]["skipped"] >= 1
    assert f"skipping unreadable record {tmp_path / 'a' / '0.png'}: " in caplog.text, caplog.text


def test_a_captions_truncation_and_unknown_text_are_flagged_in_its_element():
    class Flagging:  # a caption cut to one token that holds text the vocabulary lacks
        def tokenize(self, captions):
            return np.ones((1, 1), np.int32), np.ones((1, 1), np.int32), np.ones(1, np.int32)

        def has_unknown_text(self, tokens):
            return np.ones(1, bool)

    class Captioned:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": encoded(np.zeros((8, 8, 3), np.uint8)), "caption": b"a red disk"}

    element = decoding.DecodedSource(Captioned(), 8, tokenizer=Flagging())[0]
    assert (int(element["truncated"]), int(element["unknown_text"])) == (1, 1)


def test_a_pixel_array_of_one_channel_decodes_as_grey():
    """A source's (H, W, 1) array (a grey TFDS dataset's images), which PIL cannot take as it is."""
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    np.testing.assert_array_equal(np.asarray(decoding.to_rgb(grey)), np.repeat(grey, 3, axis=2))


def test_an_8_bit_grey_pngs_transparent_grey_value_is_a_transparent_pixel_only_where_a_pixel_has_it():
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    for transparent_value, transparent in ((100, True), (101, False)):
        file = io.BytesIO()
        Image.fromarray(grey).save(file, "PNG", transparency=transparent_value)
        pil = decoding.opened(file.getvalue())
        assert pil.mode == "L" and decoding.has_transparent_pixels(pil) is transparent


def test_the_shorter_side_is_resized_to_the_rounded_expand_ratio_times_the_resolution():
    """round(8 x 1.1) = 9 (README, Augmentation), not int's 8."""
    class OneImage:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": encoded(np.zeros((20, 30, 3), np.uint8)), "label": 0}

    assert decoding.DecodedSource(OneImage(), 8, expand_ratio=1.1)[0]["image"].shape == (9, 13, 3)


def test_an_image_with_transparent_pixels_is_named_by_its_records_own_name(caplog):
    """A source's record names itself (a caption folder's image path, the Python API's "name"), where
    the source itself would say only "record 0"."""
    rgba = np.zeros((8, 8, 4), np.uint8)

    class Logo:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": encoded(rgba), "label": 0, "name": "logos/cat.png"}

    with caplog.at_level(logging.WARNING):
        decoding.DecodedSource(Logo(), 8)[0]
    assert "logos/cat.png has transparent pixels" in caplog.text, caplog.text


def test_a_draw_gives_up_after_as_many_unusable_records_as_its_error_says():
    class Empty:
        drawn = 0

        def __len__(self):
            return 1000

        def __getitem__(self, index):
            Empty.drawn += 1
            return {"image": b"", "label": 0}

    with pytest.raises(DataError, match=rf"^{decoding.MAX_UNREADABLE_IN_A_ROW} records drawn in a row"):
        decoding.DecodedSource(Empty(), 8)[0]
    assert Empty.drawn == decoding.MAX_UNREADABLE_IN_A_ROW == 64


def test_image_folder_reads_class_folders_at_any_depth_and_leaves_out_hidden_names(tmp_path):
    image = encoded(np.zeros((8, 8, 3), np.uint8))
    for path in ("b/2.jpg", "b/sub/deeper/4.png", "b/sub/3.jpg", "b/1.jpg", "a/1.JPG",
                 ".ipynb_checkpoints/x.jpg", "a/.ipynb_checkpoints/1-checkpoint.jpg"):
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        (tmp_path / path).write_bytes(image)
    (tmp_path / "a" / "._1.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    (tmp_path / ".DS_Store").write_bytes(b"Bud1")
    os.makedirs(tmp_path / "lost+found")
    os.makedirs(tmp_path / "__MACOSX" / "a")  # a zip made on a Mac, unpacked: its metadata copies
    (tmp_path / "__MACOSX" / "a" / "._1.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    source = ImageFolderSource(str(tmp_path))
    assert source.classes == ["a", "b"]
    assert [(os.path.relpath(path, tmp_path), label) for path, label in source.records] == [
        ("a/1.JPG", 0), ("b/1.jpg", 1), ("b/2.jpg", 1), ("b/sub/3.jpg", 1), ("b/sub/deeper/4.png", 1)]


def write_shards(folder, tmp_path, count=3):
    """The packer's shards of `count` one-record shards."""
    from pixelflow_jax.data.caption_shards import pack

    images = tmp_path / "captioned"
    os.makedirs(images, exist_ok=True)
    for i in range(count):
        (images / f"{i}.png").write_bytes(encoded(np.full((8, 8, 3), i, np.uint8)))
        (images / f"{i}.txt").write_text(f"caption {i}")
    assert pack(str(images), str(folder), records_per_shard=1)["shards"] == count
    return [str(folder / f"captions-{i:05d}-of-{count:05d}.array_record") for i in range(count)]


@pytest.mark.parametrize("output", ["gs:/bucket/shards", "gs:bucket/shards"])
def test_pack_called_from_python_refuses_a_url_missing_its_slashes_rather_than_packing_into_a_local_folder(
        tmp_path, monkeypatch, output):
    from pixelflow_jax import storage
    from pixelflow_jax.data.caption_shards import pack

    monkeypatch.chdir(tmp_path)
    images = tmp_path / "captioned"
    images.mkdir()
    (images / "0.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    (images / "0.txt").write_text("caption")
    with pytest.raises(storage.StorageError, match='--output: .*without its "://"'):
        pack(str(images), output)
    assert sorted(os.listdir(tmp_path)) == ["captioned"]


def test_a_pack_whose_third_upload_fails_counts_the_two_shards_it_wrote_and_removes_them(tmp_path, monkeypatch):
    from pixelflow_jax.data import caption_shards

    write_shards(tmp_path / "shards", tmp_path, count=4)  # the captioned folder
    upload, uploaded = storage.upload_file_once, []

    def failing_third_upload(local, target):
        if len(uploaded) == 2:
            raise OSError("bucket gone")
        uploaded.append(target)
        return upload(local, target)

    monkeypatch.setattr(caption_shards.storage, "upload_file_once", failing_third_upload)
    with pytest.raises(DataError) as error:
        caption_shards.pack(str(tmp_path / "captioned"), str(tmp_path / "again"), records_per_shard=1)
    assert str(error.value) == "OSError: bucket gone (packing stopped; the 2 shards it had written are removed)"
    assert not os.path.exists(tmp_path / "again")


STOPS_A_PACK = """
import os, signal, sys, time
from pixelflow_jax import storage
from pixelflow_jax.data import pack_captions

upload, uploads, stop, where = storage.upload_file_once, [], getattr(signal, sys.argv[3]), sys.argv[4]


class StopsInDel:  # the signal's handler runs in a __del__, where Python drops its exception
    def __del__(self):
        os.kill(os.getpid(), stop)
        sum(range(1000))


def upload_then_stop(local, path):  # a signal once two shards are uploaded
    if len(uploads) == 2:
        StopsInDel() if where == "dropped" else os.kill(os.getpid(), stop)
        time.sleep(5)
    uploads.append(path)
    return upload(local, path)


storage.upload_file_once = upload_then_stop
sys.argv = ["pack_captions", f"--folder={sys.argv[1]}", f"--output={sys.argv[2]}", "--records_per_shard=1"]
pack_captions.main()
"""


@pytest.mark.parametrize("signal_name,status,cause,where", [("SIGINT", 130, "interrupted (Ctrl-C)", "raised"),
                                                            ("SIGTERM", 143, "terminated (SIGTERM)", "raised"),
                                                            ("SIGUSR2", 140, "terminated (SIGUSR2, handled as SIGTERM)",
                                                             "raised"),
                                                            ("SIGINT", 130, "interrupted (Ctrl-C)", "dropped")])
def test_a_pack_stopped_by_a_signal_removes_its_shards_and_says_so(tmp_path, signal_name, status, cause, where):
    """Ctrl-C left the shards written (and a KeyboardInterrupt traceback), and a rerun was refused for
    them; SIGTERM left them without a word. A Ctrl-C whose exception Python dropped (its handler
    ran in a __del__) is delivered again, and stops the pack all the same."""
    images = tmp_path / "captioned"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(encoded(np.full((8, 8, 3), i, np.uint8)))
        (images / f"{i}.txt").write_text(f"caption {i}")
    result = subprocess.run([sys.executable, "-c", STOPS_A_PACK, str(images),
                             str(tmp_path / "shards"), signal_name, where],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"stopped: {cause}; nothing was packed into "
                                                      f"{tmp_path / 'shards'} (the shards written are removed)"), \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "shards")  # the pack made it: gone


A_SIGTERM_AT_THE_PACKS_LAST_LINE = """
import runpy, sys
from pixelflow_jax import command_line
from pixelflow_jax.data import caption_shards


def counted(*args):  # the summary line is being written: a SIGTERM there
    raise command_line.Terminated


caption_shards.counted = counted
sys.argv = ["pack_captions.py", f"--folder={sys.argv[1]}", f"--output={sys.argv[2]}"]
runpy.run_path("pixelflow_jax/data/pack_captions.py", run_name="__main__")
"""


def test_a_sigterm_at_the_packs_last_line_stops_in_one_line(tmp_path):
    """Outside main()'s own handling (its arguments, its summary line) a SIGTERM was a Terminated
    traceback, exit status 1."""
    images = tmp_path / "captioned"
    images.mkdir()
    (images / "0.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    (images / "0.txt").write_text("a caption")
    result = subprocess.run([sys.executable, "-c", A_SIGTERM_AT_THE_PACKS_LAST_LINE, str(images),
                             str(tmp_path / "shards")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == "stopped: terminated (SIGTERM)"


def test_the_packer_reads_files_several_at_a_time_and_packs_them_in_order(tmp_path, monkeypatch):
    """From a bucket each file is a request: read one after another, a pack of a million captioned
    images waited out two million round trips."""
    import threading
    import time

    from pixelflow_jax.data import caption_shards

    real_read, lock, reading, most = storage.read_bytes, threading.Lock(), [0], [0]

    def slow_read(path):  # a store's latency
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        time.sleep(0.02)
        with lock:
            reading[0] -= 1
        return real_read(path)

    monkeypatch.setattr(caption_shards.storage, "read_bytes", slow_read)
    monkeypatch.setattr(storage.reads, "READ_AHEAD", 4)  # at most 4 files held
    shards = write_shards(tmp_path / "shards", tmp_path, count=12)
    assert 1 < most[0] <= 4
    records = [CaptionRecordSource(str(tmp_path / "shards"))[i] for i in range(12)]
    assert [r["caption"] for r in records] == [f"caption {i}" for i in sorted(range(12), key=str)]  # 0, 1, 10, 11, 2...
    assert all(r["name"].endswith(f"/{r['caption'].split()[1]}.png)") for r in records) and len(shards) == 12


def test_a_packs_caption_reads_end_before_its_image_reads_start(tmp_path, monkeypatch):
    """Left open, the captions' reader kept its threads idle for the whole pack."""
    from pixelflow_jax.data import caption_shards

    real_read_in_order, readers, open_when_images_checked = storage.read_in_order, [], []

    def tracked(read, items):
        readers.append(real_read_in_order(read, items))
        return readers[-1]

    def checked(data):
        open_when_images_checked.append(readers[0].gi_frame is not None)  # a closed generator has no frame
        return None

    monkeypatch.setattr(caption_shards.storage, "read_in_order", tracked)
    monkeypatch.setattr(caption_shards, "not_an_image", checked)
    write_shards(tmp_path / "shards", tmp_path, count=2)
    assert len(readers) == 2 and open_when_images_checked == [False, False]


def test_a_pack_stages_one_shard_at_a_time_on_local_disk_and_logs_its_progress(tmp_path, monkeypatch, caplog):
    """Each shard is written in a local scratch folder, then uploaded: kept there to the end, a pack
    into a bucket needed the whole set's size free on the local disk."""
    from pixelflow_jax.data import caption_shards

    upload, staged = storage.upload_file_once, []

    def upload_counting_the_staged(local, target):
        staged.append(len(os.listdir(os.path.dirname(local))))
        return upload(local, target)

    monkeypatch.setattr(caption_shards.storage, "upload_file_once", upload_counting_the_staged)
    with caplog.at_level(logging.INFO):
        write_shards(tmp_path / "shards", tmp_path, count=3)
    assert staged == [1, 1, 1]
    assert "packing: 3/3 image (100%)" in caplog.text
    from array_record.python.array_record_module import ArrayRecordReader

    shard = ArrayRecordReader(str(tmp_path / "shards" / "captions-00000-of-00003.array_record"))
    assert shard.writer_options_string().startswith("group_size:1,")  # one record per chunk: fast random access
    shard.close()


def test_a_pack_that_stopped_ends_its_reads_in_flight_and_its_progress_bar_before_it_reports(tmp_path, monkeypatch):
    """The error of a pack that stopped is printed after the progress bar's line, and no read of the
    images after it still runs (a bucket's reads would go on while the error is handled)."""
    import threading
    import time

    from pixelflow_jax.data import caption_shards

    real_read, lock, reading = storage.read_bytes, threading.Lock(), [0]

    def slow_read(path):  # the first image at once, the others still in flight when its shard fails
        if path.endswith(".png") and not path.endswith("/0.png"):
            with lock:
                reading[0] += 1
            time.sleep(0.3)
            with lock:
                reading[0] -= 1
        return real_read(path)

    def failing_upload(local, target):
        raise OSError("bucket gone")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    write_shards(tmp_path / "shards", tmp_path, count=8)  # the captioned folder
    monkeypatch.setattr(caption_shards.storage, "read_bytes", slow_read)
    monkeypatch.setattr(caption_shards.storage, "upload_file_once", failing_upload)
    monkeypatch.setattr(storage.reads, "READ_AHEAD", 4)
    monkeypatch.setattr(sys, "stderr", Terminal())
    try:
        caption_shards.pack(str(tmp_path / "captioned"), str(tmp_path / "again"), records_per_shard=1)
    except DataError as error:  # what a caller's handler meets
        assert str(error) == "OSError: bucket gone (packing stopped; no shard had been written)"  # its upload failed
        assert reading[0] == 0
        assert sys.stderr.getvalue().endswith("\n"), sys.stderr.getvalue()
    else:
        raise AssertionError("the pack did not stop")


def test_a_pack_that_fails_while_renaming_its_smaller_set_removes_the_shards_renamed_already(tmp_path, monkeypatch):
    """A file that is no image leaves one planned shard unwritten, and the set is renamed to its
    size: a failure there removed the shards by the names they had before."""
    from pixelflow_jax.data.caption_shards import pack

    images = tmp_path / "captioned"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)) if i else b"no image")
        (images / f"{i}.txt").write_text(f"caption {i}")
    move, moves = storage.move_file_once, []

    def move_failing_the_second_time(source, target):
        moves.append(target)
        if len(moves) == 2:
            raise OSError("disk error")
        return move(source, target)

    monkeypatch.setattr(storage, "move_file_once", move_failing_the_second_time)
    with pytest.raises(DataError, match=r"OSError: disk error \(packing stopped; the 2 shards it had written are "):
        pack(str(images), str(tmp_path / "shards"), records_per_shard=1)
    assert os.path.basename(moves[0]) == "captions-00000-of-00002.array_record"
    assert not os.path.exists(tmp_path / "shards")


def test_a_file_whose_header_pil_reads_as_a_value_error_is_skipped_as_no_image(tmp_path, capsys):
    """A PPM header with a width that is no number raises ValueError in PIL, not OSError."""
    from pixelflow_jax.data.caption_shards import pack

    images = tmp_path / "captioned"
    images.mkdir()
    (images / "0.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    (images / "1.ppm").write_bytes(b"P6\nwide 16\n255\n")
    for name in ("0", "1"):
        (images / f"{name}.txt").write_text("a caption")
    counts = pack(str(images), str(tmp_path / "shards"))
    assert (counts["records"], counts["skipped_images"]) == (1, 1)
    assert "1.ppm: not an image (ValueError)" in capsys.readouterr().out


def test_a_pack_from_python_refuses_images_without_captions_unless_told_to_skip_them(tmp_path):
    """As the packer's --missing_captions=error: a caption file lost in a copy is no image to drop
    without a word."""
    from pixelflow_jax.data.caption_shards import pack

    images = tmp_path / "captioned"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    (images / "0.txt").write_text("a caption")
    with pytest.raises(DataError, match="set --missing_captions=skip to leave those images out"):
        pack(str(images), str(tmp_path / "shards"))
    assert not os.path.exists(tmp_path / "shards")
    assert pack(str(images), str(tmp_path / "shards"), missing_captions="skip")["missing_captions"] == 1


def test_a_pack_from_python_refuses_a_blank_output_before_reading_the_folder(tmp_path):
    from pixelflow_jax.data.caption_shards import pack

    for blank in ("", "  ", "\t"):
        with pytest.raises(ValueError, match="^--output is empty: name a folder for the shards$"):
            pack(str(tmp_path / "nowhere"), blank)


def test_a_pack_into_a_folder_of_other_files_keeps_them_and_only_shards_there_are_refused(tmp_path):
    """Shards already there would mix two packs; a note beside them is no shard, and stays."""
    from pixelflow_jax.data.caption_shards import pack

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "README.txt").write_text("captions of set A")
    shards = write_shards(tmp_path / "shards", tmp_path, count=2)
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(["README.txt", *map(os.path.basename, shards)])
    with pytest.raises(ValueError, match="already holds 2 shards"):
        pack(str(tmp_path / "captioned"), str(tmp_path / "shards"))
    (tmp_path / "theirs").mkdir()  # another tool's shards, by other names, would mix as much
    for i in range(2):
        (tmp_path / "theirs" / f"train-0000{i}-of-00002.array_record").write_bytes(b"")
    with pytest.raises(ValueError, match=r"theirs already holds 2 shards \(e.g. train-0000"):
        pack(str(tmp_path / "captioned"), str(tmp_path / "theirs"))
    os.remove(tmp_path / "theirs" / "train-00001-of-00002.array_record")
    with pytest.raises(ValueError, match=r"theirs already holds 1 shard \(e.g. train-00000"):  # it said '1 shards'
        pack(str(tmp_path / "captioned"), str(tmp_path / "theirs"))


def test_array_record_shard_sets_must_be_whole_and_readable(tmp_path):
    shards = write_shards(tmp_path / "shards", tmp_path)
    (tmp_path / "shards" / "._captions-00000-of-00003.array_record").write_bytes(b"AppleDouble")  # left out
    assert len(CaptionRecordSource(str(tmp_path / "shards"))) == 3
    whole = open(shards[1], "rb").read()
    with open(shards[1], "wb") as f:
        f.write(whole[:4000])
    with pytest.raises(DataError, match=r"cannot read ArrayRecord shard \S+captions-00001-of-00003.array_record "
                                        r"\(.*64KB.*\); if it is truncated or damaged, copy the shards again, or pack"):
        CaptionRecordSource(str(tmp_path / "shards"))
    os.remove(shards[1])
    with pytest.raises(DataError, match=r"lacks 1 of the 3 shards of captions: "
                                        r"\['captions-00001-of-00003.array_record'\]"):
        CaptionRecordSource(str(tmp_path / "shards"))
    os.rename(shards[2], tmp_path / "shards" / "captions-00001-of-00002.array_record")  # another pack's shard
    with pytest.raises(DataError, match=r"mixes the shard sets captions-\*-of-00002, captions-\*-of-00003"):
        CaptionRecordSource(str(tmp_path / "shards"))

    from array_record.python.array_record_module import ArrayRecordWriter

    ArrayRecordWriter(str(tmp_path / "empty.array_record"), "group_size:1").close()
    with pytest.raises(DataError, match=r"ArrayRecord shard \S+empty.array_record holds no records; copy the"):
        CaptionRecordSource(str(tmp_path))


def test_a_shard_cut_at_a_64_kib_boundary_is_named_truncated(tmp_path):
    """The reader fails such a file with an empty RuntimeError: the error said only "(RuntimeError)"."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from pixelflow_jax.data.caption_data import encode_record

    shard = str(tmp_path / "captions.array_record")
    writer = ArrayRecordWriter(shard, "group_size:1")
    for i in range(12):  # ~120 KB, incompressible
        writer.write(encode_record(np.random.default_rng(i).bytes(10_000), f"caption {i}"))
    writer.close()
    with open(shard, "r+b") as f:
        f.truncate(64 * 1024)
    with pytest.raises(DataError, match=r"cannot read ArrayRecord shard \S+captions.array_record: it is truncated or "
                                        r"damaged \(the reader's RuntimeError gives no detail.*\); copy the shards "
                                        "again, or pack"):
        CaptionRecordSource(str(tmp_path))


def test_a_record_that_is_not_an_image_and_caption_is_refused_naming_the_packer():
    import msgpack

    from pixelflow_jax.data.caption_data import decode_record, encode_record

    assert decode_record(encode_record(b"png", "a red disk", "a.png")) == {"image": b"png", "caption": "a red disk",
                                                                           "name": "a.png"}
    for value in ([b"png", "a red disk"], {"image": b"png"}, {"caption": "a red disk"},
                  {"image": b"png", "caption": None}, {"image": "png", "caption": "a red disk"}):  # hand-made shards
        with pytest.raises(DataError, match=r"not a msgpack map with 'image' \(bytes\) and 'caption' \(text\) "
                                            ".*pack_captions"):
            decode_record(msgpack.packb(value, use_bin_type=True))
    with pytest.raises(DataError, match="not a msgpack map"):  # no msgpack at all: a TFDS tf.Example
        decode_record(b"\x0a\x05image\x12\x03png")


def test_shards_of_records_other_than_captioned_ones_are_refused_when_opened_naming_them(tmp_path):
    """Class records, or a TFDS build's tf.Example bytes (no msgpack: "unpack(b) received extra
    data."), were each skipped as unreadable once training, until 64 in a row stopped the run."""
    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    write_shards(tmp_path / "shards", tmp_path, count=2)
    for name, record in (("classes.array_record", msgpack.packb({"image": b"png", "label": 3}, use_bin_type=True)),
                         ("examples.array_record", b"\x0a\x05image\x12\x03png")):
        writer = ArrayRecordWriter(str(tmp_path / "shards" / name), "group_size:1")
        writer.write(record)
        writer.close()
        with pytest.raises(DataError, match=rf"^ArrayRecord shard \S+/{name} holds no captioned records: its first "
                                            r"record is not a msgpack map with 'image' \(bytes\) and 'caption' "
                                            r"\(text\)\. "
                                            r"Pack captioned images with python -m pixelflow_jax.data.pack_captions"):
            CaptionRecordSource(str(tmp_path / "shards"))
        os.remove(tmp_path / "shards" / name)
    assert len(CaptionRecordSource(str(tmp_path / "shards"))) == 2

    tfds_build = tmp_path / "tfds" / "imagenet2012" / "5.1.0"  # `tfds build`'s names do not end in .array_record
    os.makedirs(tfds_build)
    (tfds_build / "imagenet2012-train.array_record-00000-of-00002").write_bytes(b"")
    with pytest.raises(DataError, match=r"has no \*.array_record shards: "
                                        r"imagenet2012-train.array_record-00000-of-00002 "
                                        r"and the like are a TFDS build's, of class labels; .* data.source='tfds'"):
        CaptionRecordSource(str(tfds_build))


def test_shards_given_as_an_image_folder_and_an_image_folder_given_as_shards_name_the_source_to_set(tmp_path):
    """data.root set to the packer's output with data.source left at 'folder' (or an image folder
    with 'array_record') was told only that it holds no captioned images (no shards)."""
    from pixelflow_jax.data.caption_data import CaptionedFolderSource, CaptionRecordSource

    write_shards(tmp_path / "shards", tmp_path, count=2)
    with pytest.raises(DataError, match=r"no captioned images under \S+/shards \(.*\); it holds 2 ArrayRecord shards "
                                        r"\(e\.g\. \S+captions-00000-of-00002\.array_record\), which train with "
                                        r"--config\.data\.source=array_record"):
        CaptionedFolderSource(str(tmp_path / "shards"))
    with pytest.raises(DataError, match=r"captioned has no \*\.array_record shards: it holds images "
                                        r"\(0\.png, \.\.\.\), so it may be a captioned image folder: train on it with "
                                        r"--config\.data\.source=folder, or pack it .*\.pack_captions --folder=\S+"):
        CaptionRecordSource(str(tmp_path / "captioned"))
    (tmp_path / "img2dataset" / "00000").mkdir(parents=True)  # its images are in numbered folders
    with pytest.raises(DataError, match=r"has no \*\.array_record shards: it holds folders \(00000, \.\.\.\)"):
        CaptionRecordSource(str(tmp_path / "img2dataset"))
    (tmp_path / "other" / ".ipynb_checkpoints").mkdir(parents=True)  # hidden: not an img2dataset folder
    (tmp_path / "other" / "notes.md").write_text("")
    with pytest.raises(DataError, match=r"other has no \*\.array_record shards$"):
        CaptionRecordSource(str(tmp_path / "other"))


def test_a_set_of_more_than_99999_shards_is_checked_whole_too(tmp_path):
    """pack_captions names shard 7 of 123,456 captions-00007-of-123456: a pattern of five digits only
    took such a set for loose files, and read it with shards missing without a word."""
    from pixelflow_jax.data.caption_data import record_shards
    from pixelflow_jax.data.caption_shards import shard_name

    for index in (0, 7):
        (tmp_path / shard_name(index, 123456)).write_bytes(b"")  # (not opened: the listing is checked first)
    with pytest.raises(DataError, match=r"lacks 123454 of the 123456 shards of captions: "
                                        r"\['captions-00001-of-123456.array_record', .*"
                                        r"'captions-00005-of-123456.array_record'\] \.\.\.; copy the shards again"):
        record_shards(str(tmp_path))  # five named, and dots for the rest


def test_a_shard_set_without_its_last_shard_is_refused(tmp_path):
    """A copy cut short loses the last shards first: a set read without them trains on part of the
    data without a word."""
    shards = write_shards(tmp_path / "shards", tmp_path)
    os.remove(shards[-1])
    with pytest.raises(DataError, match=r"lacks 1 of the 3 shards of captions: "
                                        r"\['captions-00002-of-00003.array_record'\]"):
        CaptionRecordSource(str(tmp_path / "shards"))


def pack_command(monkeypatch, capsys, *args):
    """Runs the packer's command line; returns (exit code, stdout, stderr)."""
    from pixelflow_jax.data import pack_captions

    monkeypatch.setattr("sys.argv", ["pack_captions", *args])
    # The command's process-wide Ctrl-C / SIGTERM handlers would stay in this test process (the
    # packer's stops are tested in a process of their own).
    monkeypatch.setattr(pack_captions, "handle_ctrl_c_from_the_start", lambda: None)
    monkeypatch.setattr(pack_captions, "stop_on_sigterm", lambda: None)
    try:
        pack_captions.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_packers_flags_default_to_5000_records_a_shard_and_refusing_images_without_a_caption(tmp_path,
                                                                                                   monkeypatch, capsys):
    from pixelflow_jax.data import caption_shards

    called = []
    monkeypatch.setattr(caption_shards, "pack", lambda *args: called.append(args) or {
        "records": 1, "shards": 1, "skipped_captions": 0, "skipped_images": 0, "missing_captions": 0})
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={tmp_path}", f"--output={tmp_path / 'out'}")
    assert code == 0 and called == [(str(tmp_path), str(tmp_path / "out"), 5000, "error")], (out, called)
    assert out.startswith("wrote 1 record in 1 shard to "), out
    # Each count in its place, in its own number (all ones and zeros above: any count could stand for another).
    monkeypatch.setattr(caption_shards, "pack", lambda *args: {
        "records": 7, "shards": 2, "skipped_captions": 1, "skipped_images": 3, "missing_captions": 4})
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={tmp_path}", f"--output={tmp_path / 'out'}",
                                "--missing_captions=skip")
    assert code == 0 and out == (f"wrote 7 records in 2 shards to {tmp_path / 'out'}; skipped 1 unusable caption, "
                                 "3 files that are not images and 4 images without a caption\n"), out


def test_a_ctrl_c_a_library_caught_while_the_packer_imported_stops_it_before_it_reads_its_flags(tmp_path, monkeypatch,
                                                                                               capsys):
    """Python drops a Ctrl-C inside jax's gc callback: recorded, it is raised once the imports are
    done, not left to a redelivery that may come once shards are written."""
    import signal

    from pixelflow_jax import command_line
    from pixelflow_jax.data import pack_captions

    monkeypatch.setattr(command_line, "_ctrl_c_received", [True])  # received, and the KeyboardInterrupt dropped
    monkeypatch.setitem(command_line._dropped, signal.SIGINT, True)
    monkeypatch.setattr(pack_captions, "exit_without_teardown", lambda message, status: sys.exit((message, status)))
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={tmp_path}", f"--output={tmp_path / 'out'}")
    assert code == ("stopped: interrupted (Ctrl-C); nothing was packed", 130) and not out, (code, out)


def test_the_caption_packer_refuses_bad_input_in_one_line_naming_its_own_flags(tmp_path, monkeypatch, capsys):
    images = tmp_path / "captioned"
    os.makedirs(images)
    for i in range(2):
        (images / f"{i}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
        (images / f"{i}.txt").write_bytes(b"\xef\xbb\xbf \n")  # a BOM and blanks: no caption
    (tmp_path / "a_file").write_text("")
    os.makedirs(tmp_path / "empty")
    for args, message in (
            ([f"--folder={images}", f"--output={tmp_path / 'out'}"],
             f"none of the 2 captioned images under {images} has a usable caption (see the lines above); "
             "nothing written"),
            ([f"--folder={tmp_path / 'nope'}", f"--output={tmp_path / 'out'}"],
             f"captioned image folder {tmp_path / 'nope'} does not exist; set --folder to a folder"),
            ([f"--folder={tmp_path / 'empty'}", f"--output={tmp_path / 'out'}"], "no captioned images under"),
            ([f"--folder={images}", f"--output={tmp_path / 'out'}", "--records_per_shard=0"],
             "--records_per_shard must be positive, got 0"),
            ([f"--folder={images}", f"--output={tmp_path / 'a_file'}"],
             f"--output {tmp_path / 'a_file'} is a file; name a folder for the shards"),
            ([f"--folder={images}", "--output=gs:///shards"],
             "--output: gs:///shards names no bucket: write gs://BUCKET/"),
            ([f"--folder={images}", "--output=gs:/bucket/shards"],
             '--output: gs:/bucket/shards looks like a URL without its "://"'),
            ([f"--folder={images}", f"--output={tmp_path / 'out '}"], f"--output: '{tmp_path / 'out '}': the name"),
            (["--folder=hf://me/captioned", f"--output={tmp_path / 'out'}"],
             "--folder: hf://me/captioned: hf:// (the Hugging Face Hub) is read here for checkpoints and T5 folders"),
            ([f"--folder={images}", f"--output={images / 'shards'}"],
             f"--output {images / 'shards'} is inside the captioned folder {images}"),
            ([f"--folder={images}", "--output="], "--output is empty")):
        code, _, err = pack_command(monkeypatch, capsys, *args)
        assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, (args, err)
    assert not os.path.exists(tmp_path / "out")  # nothing written
    (images / "0.txt").write_text("a grey square")
    os.remove(images / "1.txt")
    code, _, err = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out'}")
    assert code == 1 and "set --missing_captions=skip to leave those images out" in err and "config.data" not in err

    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded in both flags
    code, out, _ = pack_command(monkeypatch, capsys, "--folder=~/captioned", "--output=~/out",
                                "--missing_captions=skip")
    assert code == 0 and f"wrote 1 record in 1 shard to {tmp_path / 'out'}; skipped 0 unusable captions, 0 files " \
        "that are not images and 1 image without a caption" in out  # was "1 records in 1 shards"
    assert os.listdir(tmp_path / "out") == ["captions-00000-of-00001.array_record"]

    # Files that are not images (by their header) are skipped and counted; a shard of none is refused.
    (images / "2.png").write_bytes(b"not an image")
    (images / "2.txt").write_text("a caption of no image")
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out2'}",
                                "--missing_captions=skip")
    assert code == 0 and "skipping" in out and "2.png: not an image (UnidentifiedImageError)" in out
    assert "wrote 1 record in 1 shard" in out and "1 file that is not an image" in out
    # Shards hold the next records_per_shard images, so a run of non-images leaves no shard empty: the
    # two planned shards came out as one, renamed to its size.
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out3'}",
                                "--missing_captions=skip", "--records_per_shard=1")
    assert code == 0 and "wrote 1 record in 1 shard" in out
    assert os.listdir(tmp_path / "out3") == ["captions-00000-of-00001.array_record"]
    assert len(CaptionRecordSource(str(tmp_path / "out3"))) == 1
    with monkeypatch.context() as patch:  # an image too large to decode (a 20000 px scan) is skipped the same way
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
        code, out, err = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out4'}",
                                    "--missing_captions=skip")
    assert code == 1 and "0.png: too large to decode" in out and "none of the 2 captioned files" in err
    assert not os.path.exists(tmp_path / "out4")  # the folder the pack made for nothing is gone too


def test_the_packer_names_the_first_skips_of_each_kind_and_counts_the_rest(tmp_path, monkeypatch, capsys):
    """A scraped set with many bad captions printed a line for each: the first SHOWN_SKIPS of a kind are
    named, the summary counts them all."""
    from pixelflow_jax.data.caption_shards import SHOWN_SKIPS

    images = tmp_path / "captioned"
    images.mkdir()
    bad = SHOWN_SKIPS + 3
    for i in range(bad + 1):
        (images / f"{i:03d}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
        (images / f"{i:03d}.txt").write_text("a caption" if i == bad else " ")
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out'}")
    assert code == 0 and out.count("skipping ") == SHOWN_SKIPS, out
    assert out.count("(further unusable captions are counted in the summary, not named)") == 1, out
    assert f"skipped {bad} unusable captions" in out


def test_a_skip_past_the_named_ones_says_the_rest_are_counted_and_exactly_shown_skips_say_nothing_more(capsys):
    """The note that further skips are only counted came with the last one named, also where no
    further one followed."""
    from pixelflow_jax.data.caption_shards import SHOWN_SKIPS, show_skip

    for count in range(1, SHOWN_SKIPS + 1):
        show_skip(count, f"{count}.png", "caption is empty", "unusable captions")
    assert capsys.readouterr().out == "".join(f"skipping {count}.png: caption is empty\n"
                                              for count in range(1, SHOWN_SKIPS + 1))
    show_skip(SHOWN_SKIPS + 1, "last.png", "caption is empty", "unusable captions")
    show_skip(SHOWN_SKIPS + 2, "later.png", "caption is empty", "unusable captions")
    assert capsys.readouterr().out == "(further unusable captions are counted in the summary, not named)\n"


@pytest.mark.parametrize("past_the_named", [False, True])
def test_a_skip_line_on_a_stdout_that_cannot_be_written_costs_the_line(monkeypatch, caplog, past_the_named):
    """Each of show_skip's lines, the note that further skips are only counted too, goes as a job's
    others do (progress.say): one warning, not the OSError that failed the pack (printed with print,
    the note passed: the pack's test on /dev/full skipped one file, named before the note)."""
    import errno

    from pixelflow_jax.data.caption_shards import SHOWN_SKIPS, show_skip

    class FullStream(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sys.stdout", FullStream())
    show_skip(SHOWN_SKIPS + 1 if past_the_named else 1, "1.png", "caption is empty", "unusable captions")
    assert "stdout cannot be written" in caplog.text and sys.stdout.name == os.devnull
    sys.stdout.close()


def test_a_bucket_that_cannot_be_reached_is_not_reported_as_a_missing_folder(bucket):
    """gcsfs's isdir answers False when it cannot connect; the sources must show the connection error."""
    import subprocess
    import sys

    from pixelflow_jax.data.caption_data import CaptionedFolderSource

    for missing in (lambda: ImageFolderSource(f"{bucket}/nothing"), lambda: CaptionRecordSource(f"{bucket}/nothing"),
                    lambda: CaptionedFolderSource(f"{bucket}/nothing"),
                    lambda: TfdsSource("imagenet2012", "train", f"{bucket}/nothing")):
        with pytest.raises(DataError, match=f"{bucket}/nothing does not exist"):  # reachable but missing
            missing()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused at once
    script = f"""
import os
os.environ.update(STORAGE_EMULATOR_HOST="{closed}", CLOUD_STORAGE_EMULATOR_ENDPOINT="{closed}", FSSPEC_GCS_TOKEN="anon")
import gcsfs.retry
gcsfs.retry.is_retriable = lambda e: False  # fail at the first try, not after ~30 s of retries
from pixelflow_jax.data.caption_data import CaptionedFolderSource, CaptionRecordSource
from pixelflow_jax.data.sources import ImageFolderSource, TfdsSource
for source in (ImageFolderSource, CaptionedFolderSource, CaptionRecordSource,
               lambda data_dir: TfdsSource("imagenet2012", "train", data_dir)):
    try:
        source("gs://some-bucket/data")
    except Exception as e:
        print(type(e).__name__, e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("StorageError gs://some-bucket/data: ClientConnectorError: Cannot "
                                                   "connect to host 127.0.0.1") for line in lines), result


def test_an_unbuilt_tfds_dataset_is_named_with_the_build_command_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(DataError, match=rf"TFDS dataset 'imagenet2012' is not built under {tmp_path}: run `tfds "
                                        rf"build imagenet2012 --manual_dir=DIR --data_dir={tmp_path} "
                                        r"--file_format=array_record`"):
        TfdsSource("imagenet2012", "train", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_caption_of_only_invisible_characters_is_skipped_as_empty():
    """Zero-width spaces, a byte-order mark mid-file or control characters alone tokenize to nothing:
    the image trained as the empty prompt, the unconditional of guidance, without a word."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption

    for caption in ("\u200b".encode(), "\u200b \u200b\n".encode(), b"\x01\x02", "\ufeff\ufeff".encode()):
        with pytest.raises(CaptionError, match="caption is empty, or only zero-width or control characters, which "
                                               "tokenize to nothing"):
            decode_caption(caption)
    assert decode_caption("\u200ba red disk\u0301".encode()) == "\u200ba red disk\u0301"  # text beside them trains
    assert decode_caption("\u732b \U0001f98a".encode()) == "\u732b \U0001f98a"


def test_captions_lose_a_bom_and_their_extension_matches_in_any_case(tmp_path, caplog):
    """(and a caption file that is a link to nothing is named, not dropped without a word)"""
    from pixelflow_jax.data.caption_data import CaptionedFolderSource, CaptionError, decode_caption

    assert decode_caption(b"\xef\xbb\xbfa red disk\n") == "a red disk"
    with pytest.raises(CaptionError, match="caption is empty"):
        decode_caption(b"\xef\xbb\xbf\r\n")
    for name in ("A.jpg", "A.TXT", "b.PNG", "b.txt", "c.png", "c.TXT", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d.png").write_bytes(b"x")
    (tmp_path / "d.txt").symlink_to(tmp_path / "captions" / "d.txt")
    with caplog.at_level(logging.WARNING):
        source = CaptionedFolderSource(str(tmp_path), missing_captions="skip")
    assert [tuple(os.path.basename(p) for p in record) for record in source.records] == [
        ("A.jpg", "A.TXT"), ("b.PNG", "b.txt"), ("c.png", "c.txt")]
    assert f"1 entries under {tmp_path} are not read: they are neither files nor folders, e.g. {tmp_path / 'd.txt'}" \
        in caplog.text



def test_a_caption_or_prompts_file_saved_as_windows_1252_is_named_so_with_the_command_that_converts_it(tmp_path):
    """Scraped captions and files from older Windows tools are often Windows-1252 ("caf\xe9", curly
    quotes as \x92): skipped as "not UTF-8 (invalid continuation byte at byte 3)", saying neither
    what the file is nor how to convert it."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    saved = "a caf\xe9 at dusk, it\u2019s raining".encode("cp1252")
    with pytest.raises(CaptionError, match=re.escape(
            "caption is not UTF-8 (invalid continuation byte at byte 5); it reads as Windows-1252 text ('a caf\xe9 at "
            "dusk, it\u2019s raining'): convert the file to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8 NAME.txt > "
            "NAME.utf8.txt, then replace NAME.txt with it")):
        decode_caption(saved)
    with pytest.raises(CaptionError, match=r"caption is not UTF-8 \(invalid start byte at byte 2\); re-save it as "
                                           r"UTF-8$"):
        decode_caption(b"ab\x81\x8d\x90 binary")  # bytes Windows-1252 leaves undefined: no guess
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red disk\na caf\xe9\n".encode("cp1252"))
    with pytest.raises(ValueError, match=re.escape(
            f"{path} is not UTF-8 text (invalid continuation byte at byte 16); it reads as Windows-1252 text ('a red "
            f"disk\\na caf\xe9\\n'): convert it, e.g. iconv -f WINDOWS-1252 -t UTF-8 {path} > prompts.utf8.txt, and "
            "give that file")):
        read_prompts_file(str(path))


def test_a_caption_or_prompts_file_with_a_stray_nul_is_named_so_not_utf16(tmp_path):
    """A caption file ending in a NUL byte (a tool that padded it) was called "UTF-16LE text without
    a byte-order mark", with an iconv that turns it into CJK; so was a prompts file."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    for saved in (b"a red disk\x00", b"a red dis\x00", "a red disk\x00"):
        with pytest.raises(CaptionError, match=r"^caption holds 1 NUL (character|byte) \(the first at (character|byte) "
                                               r"(9|10)\), which no text holds; remove them, e.g. tr -d '\\000' < "
                                               r"NAME.txt > NAME.clean.txt"):
            decode_caption(saved)
    with pytest.raises(CaptionError, match=r"^caption holds 2 NUL characters \(the first at character 1\)"):
        decode_caption(b"a\x00red disk\x00")  # NULs at odd places, but far from every other one
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red disk\na blue ring\n\x00\x00")
    with pytest.raises(ValueError, match=rf"prompts_file {path} holds 2 NUL bytes \(the first at byte 23\), which no "
                                         rf"text holds: remove them, e.g. tr -d '\\000' < {path} > prompts.clean.txt"):
        read_prompts_file(str(path))


def test_a_caption_saved_as_utf16_or_utf32_is_named_so_with_the_command_that_converts_it(tmp_path, monkeypatch,
                                                                                          capsys):
    """Windows editors save "Unicode" text as UTF-16 with a byte-order mark: it was skipped as "not
    UTF-8 (invalid start byte at byte 0)", which did not say what the file is. Without the mark, its
    ASCII captions read as UTF-8 with a NUL beside each letter, and trained so."""
    import codecs

    from pixelflow_jax.data.caption_data import CaptionError, decode_caption

    for saved, encoding in ((codecs.BOM_UTF16_LE + "a red disk".encode("utf-16-le"), "UTF-16"),
                            (codecs.BOM_UTF16_BE + "a red disk".encode("utf-16-be"), "UTF-16"),
                            (codecs.BOM_UTF32_LE + "a red disk".encode("utf-32-le"), "UTF-32"),  # not UTF-16's mark
                            (codecs.BOM_UTF32_BE + "a red disk".encode("utf-32-be"), "UTF-32")):
        with pytest.raises(CaptionError, match=rf"^caption is {encoding} \(it starts with a {encoding} byte-order "
                                               rf"mark\), not UTF-8; convert the file to UTF-8, e.g. iconv -f "
                                               rf"{encoding} -t UTF-8 NAME.txt > NAME.utf8.txt"):
            decode_caption(saved)
    for saved, encoding in (("a red disk".encode("utf-16-le"), "UTF-16LE"), ("a red disk".encode("utf-16-be"),
                                                                           "UTF-16BE"),  # no mark: valid UTF-8
                            ("a red disk".encode("utf-32-le"), "UTF-32LE"), ("a red disk".encode("utf-32-be"),
                                                                           "UTF-32BE")):
        with pytest.raises(CaptionError, match=rf"^caption holds NUL characters, as {encoding} text without a "
                                               rf"byte-order mark does; convert the file to UTF-8, e.g. iconv -f "
                                               rf"{encoding} -t UTF-8"):
            decode_caption(saved)
    images = tmp_path / "captioned"
    images.mkdir()
    for name in ("a", "b"):
        (images / f"{name}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    (images / "a.txt").write_text("a red disk", encoding="utf-16")
    (images / "b.txt").write_text("a blue disk", encoding="utf-8-sig")  # UTF-8's own mark is read and dropped
    code, out, _ = pack_command(monkeypatch, capsys, f"--folder={images}", f"--output={tmp_path / 'out'}")
    assert code == 0 and f"skipping {images / 'a.png'}: caption is UTF-16" in out and "wrote 1 record in 1 shard" in out

def test_an_empty_or_zero_filled_caption_or_prompts_file_is_named_empty_or_nuls_not_utf32(tmp_path):
    """img2dataset writes an empty NAME.txt for an image without a caption, and a file a crash left
    zero-filled holds only NULs: neither is UTF-32 text without its byte-order mark."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    with pytest.raises(CaptionError, match="^caption is empty"):
        decode_caption(b"")
    with pytest.raises(CaptionError, match=r"^caption holds 8 NUL characters \(the first at character 0\), which no "
                                           r"text holds"):
        decode_caption(b"\x00" * 8)
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"prompts_file {path} holds no prompts \(every line is blank\)"):
        read_prompts_file(str(path))
    path.write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=rf"prompts_file {path} holds 8 NUL bytes \(the first at byte 0\), which no "
                                         "text holds"):
        read_prompts_file(str(path))


def test_utf16_without_its_mark_is_named_so_with_half_its_characters_past_ascii_and_not_in_odd_lengths():
    """UTF-16 puts a NUL beside each ASCII letter only: a caption half in CJK (two bytes of text
    each) is still UTF-16; an odd number of bytes is no UTF-16 (nor -32), whatever its NULs."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption

    for encoding in ("UTF-16LE", "UTF-16BE"):
        with pytest.raises(CaptionError, match=f"^caption holds NUL characters, as {encoding} text without"):
            decode_caption("\u732b\u732b a".encode(encoding))  # two of its four characters ASCII
    with pytest.raises(CaptionError, match=r"^caption holds 2 NUL characters \(the first at character 1\), which no "
                                           r"text holds"):
        decode_caption(b"a\x00b\x00c")  # UTF-16LE's pattern, and a byte over


def test_a_windows_1252_caption_is_quoted_around_its_first_foreign_byte_and_binary_is_not_guessed_as_text():
    """The quote is the 30 characters either side of the byte UTF-8 stopped at; a file that holds
    control bytes (an image saved under NAME.txt) is no Windows-1252 text, though it decodes as one.
    A caption read as a bytearray is decoded as bytes are."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption

    saved = ("x" * 40 + "caf\xe9" + "y" * 40).encode("cp1252")
    quoted = "x" * 27 + "caf\xe9" + "y" * 29  # UTF-8 stopped at the é, character 43
    with pytest.raises(CaptionError, match=re.escape(f"reads as Windows-1252 text ({quoted!r})")):
        decode_caption(saved)
    png = encoded(np.zeros((8, 8, 3), np.uint8))
    assert png[:8].decode("cp1252") == "\u2030PNG\r\n\x1a\n"  # Windows-1252 reads it (\x1a: a control byte)
    with pytest.raises(CaptionError, match=r"^caption is not UTF-8 \(invalid start byte at byte 0\); re-save it as "
                                           r"UTF-8$"):
        decode_caption(png[:8] + b"IHDR")
    assert decode_caption(bytearray(b" a red disk\n")) == "a red disk"


def test_a_windows_1252_caption_with_windows_line_ends_is_named_so():
    """Notepad of old saved Windows-1252 with \\r\\n line ends: a carriage return is no sign of binary."""
    from pixelflow_jax.data.caption_data import CaptionError, decode_caption

    with pytest.raises(CaptionError, match=re.escape("it reads as Windows-1252 text ('a caf\xe9\\r\\n')")):
        decode_caption("a caf\xe9\r\n".encode("cp1252"))


def test_records_that_fail_for_their_captions_say_so():
    class Blank:
        def __init__(self, size):
            self.size = size

        def __len__(self):
            return self.size

        def __getitem__(self, index):
            return {"image": encoded(np.zeros((8, 8, 3), np.uint8)), "caption": b" \n"}

    class Tokenizer:
        def tokenize(self, captions):
            raise AssertionError("an empty caption is never tokenized")

    for size in (100, 3):
        with pytest.raises(DataError, match=r"64 records drawn in a row \(from record 1 on, each replacing the last\) "
                                            r"are unusable \(the last, record \d+: caption is empty"):
            decoding.DecodedSource(Blank(size), R, tokenizer=Tokenizer())[1]

    class TooLarge(Blank):  # a resolution no host holds: the settings' fault, not 64 bad records
        def __getitem__(self, index):
            raise MemoryError("Unable to allocate 64.0 GiB for an array")  # numpy's, as the demo set raised it

    with pytest.raises(MemoryError):  # was "64 ... records ... are unusable; is the dataset corrupt?"
        decoding.DecodedSource(TooLarge(100), R)[1]


def test_an_image_of_extreme_aspect_ratio_is_cut_to_16_to_1_before_its_resize_and_others_are_resized_whole():
    """A 1 x 3000 spacer GIF became a (288, 864000) array at 256 px (2.5 GB, ~4 s a draw); now its
    centred 1 x 16 window is resized. A 16:1 banner is resized whole, as the release does."""
    rng = np.random.default_rng(0)

    class Images:
        def __init__(self, *images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return {"image": encoded(self.images[index]), "label": 0}

    spacer, banner = rng.integers(0, 256, (1, 3000, 3), np.uint8), rng.integers(0, 256, (20, 320, 3), np.uint8)
    source = Images(spacer, banner, spacer.transpose(1, 0, 2))
    decoded = decoding.DecodedSource(source, R)
    window = Image.fromarray(spacer[:, 1492:1508])  # the centred 16 pixels of 3000
    resize_to = round(R * 1.125)
    np.testing.assert_array_equal(decoded[0]["image"], np.asarray(window.resize((16 * resize_to, resize_to),
                                                                                  resample=Image.LANCZOS)))
    assert decoded[1]["image"].shape == (resize_to, 16 * resize_to, 3)  # 320 / 20: whole
    np.testing.assert_array_equal(decoded[1]["image"], np.asarray(Image.fromarray(banner).resize(
        (16 * resize_to, resize_to), resample=Image.LANCZOS)))
    assert decoded[2]["image"].shape == (16 * resize_to, resize_to, 3)
    np.testing.assert_array_equal(decoded[2]["image"], np.asarray(Image.fromarray(  # its centred window too
        spacer.transpose(1, 0, 2)[1492:1508]).resize((resize_to, 16 * resize_to), resample=Image.LANCZOS)))
    assert decoding.DecodedSource(source, R, center_crop=True)[0]["image"].shape == (R, R, 3)


LARGE_IMAGE = """
import io, sys
import numpy as np
from PIL import Image
from pixelflow_jax.data.decoding import to_rgb

Image.MAX_IMAGE_PIXELS = 50  # an 8 x 8 image is then "large", as a 100 Mpx scan is
encoded = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(encoded, format="PNG")
print(to_rgb(encoded.getvalue()).size)
"""


def test_a_large_image_decodes_without_pils_decompression_bomb_warning():
    """A 100 Mpx image printed PIL's "could be decompression bomb DOS attack" in the training log."""
    result = subprocess.run([sys.executable, "-c", LARGE_IMAGE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "(8, 8)", result.stderr
    assert "DecompressionBombWarning" not in result.stderr, result.stderr


PACKED_LARGE_IMAGE = """
import io
import numpy as np
from PIL import Image
from pixelflow_jax.data.caption_shards import not_an_image

Image.MAX_IMAGE_PIXELS = 50  # an 8 x 8 image is then "large", as a 100 Mpx scan is
encoded = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(encoded, format="PNG")
print(not_an_image(encoded.getvalue()))
"""


def test_the_caption_packer_checks_a_large_image_without_pils_decompression_bomb_warning():
    """pack_captions never imports the loader's decoding, where PIL's warning was silenced: packing a
    folder of 100 Mpx scans printed "could be decompression bomb DOS attack" for each (r48a)."""
    result = subprocess.run([sys.executable, "-c", PACKED_LARGE_IMAGE], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr
    assert "DecompressionBombWarning" not in result.stderr, result.stderr


def test_an_unreadable_record_is_replaced_by_a_random_other_and_named_once(tmp_path, caplog):
    """Class a: 10 images, then 5 empty files; class b: 10 images. Each draw of an empty file was
    replaced by the next record in order: a's last image trained 6 times an epoch, class a got 15
    of 25 draws, every draw of a bad file was logged, and one draw that stepped over 5 bad files
    counted 5. Now a random other record replaces it, each bad file is named once, and each draw of
    one counts once."""
    for name, count in (("a", 10), ("b", 10)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / name / f"img{i}.png")
    for i in range(5):
        (tmp_path / "a" / f"zz{i}.png").write_bytes(b"")
    decoded = decoding.DecodedSource(ImageFolderSource(str(tmp_path)), 8, center_crop=True)
    with caplog.at_level(logging.WARNING):
        drawn = [decoded[i] for i in range(25)] + [decoded[i] for i in range(10, 15)]  # the bad ones twice
    firsts = drawn[:25]
    picked = collections.Counter((int(e["label"]), int(e["image"][0, 0, 0])) for e in firsts)
    assert max(picked.values()) <= 3, picked  # was 6
    skipped = [int(e["skipped"]) for e in firsts]
    assert skipped[:10] == skipped[15:] == [0] * 10 and 1 <= min(skipped[10:15]) and max(skipped[10:15]) <= 2, skipped
    named = [r.getMessage() for r in caplog.records if "skipping unreadable record" in r.getMessage()]
    assert sorted(m.split()[3].rsplit("/", 1)[-1].rstrip(":") for m in named) == [f"zz{i}.png" for i in range(5)]
    assert [int(e["skipped"]) for e in drawn[25:]] == [int(e["skipped"]) for e in firsts[10:15]]  # the same picks


def test_a_shard_record_that_cannot_be_read_is_named_with_its_shard(tmp_path, caplog):
    """A damaged chunk (the reader's "chunk data hash mismatch") was named "record 2", whatever
    shard held it: nothing said which file to copy again."""
    write_shards(tmp_path / "shards", tmp_path)
    source = CaptionRecordSource(str(tmp_path / "shards"))

    class DamagedThird:  # the shards' records, the third's chunk damaged
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, index):
            if index == 2:
                raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")
            return self.records[index]

    class OneToken:  # (captioned records are tokenized)
        def tokenize(self, captions):
            return np.ones((1, 1), np.int32), np.ones((1, 1), np.int32), np.zeros(1, np.int32)

        def has_unknown_text(self, tokens):
            return np.zeros(1, bool)

    source.source = DamagedThird(source.source)
    with caplog.at_level(logging.WARNING):
        assert decoding.DecodedSource(source, 8, center_crop=True, tokenizer=OneToken())[2]["skipped"] >= 1
    assert (f"skipping unreadable record {tmp_path}/shards:2 (record 0 of {tmp_path}/shards/captions-00002-of-00003"
            ".array_record): Corrupted Riegeli/records file") in caplog.text


def test_a_shard_record_of_an_earlier_version_without_a_name_is_named_by_its_place_alone(tmp_path):
    """Shards packed before records kept their file's name hold only the image and caption: their
    records are named ROOT:INDEX, not ROOT:INDEX (None)."""
    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    (tmp_path / "shards").mkdir()
    writer = ArrayRecordWriter(str(tmp_path / "shards" / "captions-00000-of-00001.array_record"), "group_size:1")
    writer.write(msgpack.packb({"image": encoded(np.zeros((8, 8, 3), np.uint8)), "caption": "a red disk"},
                               use_bin_type=True))
    writer.close()
    assert CaptionRecordSource(str(tmp_path / "shards"))[0]["name"] == f"{tmp_path}/shards:0"


def test_random_flip_off_keeps_every_image_the_right_way_round_and_the_same_crops():
    """Captions that say "on the left" need images that are never mirrored."""
    from pixelflow_jax.data.decoding import RandomCropFlip

    image = np.zeros((12, 12, 3), np.uint8)
    image[:, :6] = 255  # left half white
    flipped = [RandomCropFlip(8)({"image": image}, np.random.default_rng(seed))["image"] for seed in range(20)]
    kept = [RandomCropFlip(8, flip=False)({"image": image}, np.random.default_rng(seed))["image"] for seed in range(20)]
    assert any(crop[0, -1, 0] == 255 and crop[0, 0, 0] == 0 for crop in flipped)  # some mirrored
    assert all(not (crop[0, -1, 0] == 255 and crop[0, 0, 0] == 0) for crop in kept)
    for a, b in zip(flipped, kept):  # the same crop, mirrored or not
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])


def test_the_flip_draw_is_made_either_way_so_later_crops_do_not_depend_on_it():
    """One generator draws a worker's elements in turn: had flip=False skipped its draw, every
    later crop of a run would differ from those of the same run with flips."""
    from pixelflow_jax.data.decoding import RandomCropFlip

    image = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    crops = {}
    for flip in (True, False):
        rng = np.random.default_rng(0)
        crops[flip] = [RandomCropFlip(8, flip=flip)({"image": image}, rng)["image"] for _ in range(20)]
    for a, b in zip(crops[True], crops[False]):
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])


def test_the_shorter_side_resize_truncates_the_longer_side_as_torchvision_resize_does():
    """torchvision's Resize(size) (the release's transform) makes the longer side int(size * long /
    short), not a rounded one: 30 x 43 at 36 px is 36 x 51 (51.6), in either orientation."""
    image = np.random.default_rng(0).integers(0, 256, (43, 30, 3), np.uint8)
    for pixels in (image, image.transpose(1, 0, 2)):
        h, w = pixels.shape[:2]
        size = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
        np.testing.assert_array_equal(np.asarray(decoding.resize_shorter_side(Image.fromarray(pixels), 36)),
                                      np.asarray(Image.fromarray(pixels).resize(size, resample=Image.LANCZOS)))


def test_a_draw_counts_every_unreadable_record_it_stepped_over():
    """`skipped` is what the loader's count of unreadable records adds up: a draw whose random
    replacement was unreadable too counts both."""
    good = encoded(np.zeros((8, 8, 3), np.uint8))

    class MostlyEmpty:  # record 0 alone is an image
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"image": good if index == 0 else b"", "label": 0}

    decoded = decoding.DecodedSource(MostlyEmpty(), 8, center_crop=True)
    counts = [int(decoded[i]["skipped"]) for i in range(1, 4)]
    expected = [next(a for a in range(64) if decoded.replacement(i, a) == 0) for i in range(1, 4)]
    assert counts == expected and max(expected) > 1, (counts, expected)


def test_an_image_over_pils_size_limit_is_skipped_naming_the_limit_not_an_attack(monkeypatch, caplog):
    """A valid panorama past PIL's memory guard was logged as 'could be decompression bomb DOS
    attack', with nothing to do about it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 2x this raises: a 20x20 image does
    images = [encoded(np.zeros((20, 20, 3), np.uint8)), encoded(np.zeros((8, 8, 3), np.uint8))]

    class TwoImages:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return {"image": images[index], "label": 0, "name": f"image{index}.png"}

    with caplog.at_level("WARNING"):
        assert decoding.DecodedSource(TwoImages(), 8, center_crop=True)[0]["skipped"] > 0
    assert ("skipping unreadable record image0.png: Image size (400 pixels) exceeds limit of 200 pixels: PIL decodes "
            "no image that large") in caplog.text and "attack" not in caplog.text


def test_a_class_whose_every_image_is_unreadable_is_named_once_enough_images_are_drawn(caplog):
    """Each draw of an unreadable image is replaced by another record: a class folder of only
    unreadable images (or images past PIL's size limit) trained on nothing, and the run ended
    well, its samples of that class untrained."""
    good = [encoded(np.full((8, 8, 3), 60 * label, np.uint8)) for label in range(2)]

    class ThirdClassUnreadable:
        classes = ["cat", "dog", "panorama"]

        def __len__(self):
            return 6

        def __getitem__(self, index):
            label = index % 3
            return {"image": good[label] if label < 2 else b"", "label": label, "name": f"{index}.png"}

    loader = ImageLoader(build_dataset(ThirdClassUnreadable(), batch_size=4, resolution=8, seed=0), 3,
                         ThirdClassUnreadable.classes)
    with caplog.at_level("WARNING"):
        for _ in range(loader_module.DRAWS_PER_CLASS_BEFORE_CHECK * 3 // 4 - 1):
            next(loader)
        assert "never came" not in caplog.text  # not before 20 images per class
        for _ in range(5):
            next(loader)
    assert caplog.text.count("1 of 3 classes never came in the 60 images drawn so far: 2 (panorama)") == 1
    assert caplog.text.count("never came") == 1  # checked once: not again at each batch after
    loader.close()


@pytest.mark.parametrize("missing", [10, 11])
def test_the_classes_the_loader_never_drew_are_named_up_to_ten_with_dots_past_ten(caplog, missing):
    """As a folder's classes without images are: ten in full, and '...' only where more follow."""
    classes, draws = 1 + missing, loader_module.DRAWS_PER_CLASS_BEFORE_CHECK  # class 0 drawn alone
    batch = {"image": np.zeros((1, 1, 1, 3), np.uint8), "label": np.zeros(draws * classes, np.int32),
             "skipped": np.zeros(1, np.int32), "transparent": np.zeros(1, np.int32),
             "upscaled": np.zeros(1, np.int32), "exif_oriented": np.zeros(1, np.int32)}
    loader = ImageLoader([batch], classes)
    with caplog.at_level("WARNING"):
        next(loader)
    named = ", ".join(map(str, range(1, 11)))
    assert f"classes never came in the {draws * classes} images drawn so far: {named}{', ...' * (missing > 10)}. " \
        in caplog.text


def test_a_training_runs_loader_names_a_class_folder_whose_every_image_is_unreadable(tmp_path, caplog):
    """make_loader hands the loader the folder's classes: without them the check of classes
    never drawn is off, and a class of only damaged files trains on nothing without a word."""
    import configs.c2i as c2i
    from pixelflow_jax.data.loader import make_loader
    from pixelflow_jax.sharding import batch_sharding, make_mesh

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "0.png")
    (tmp_path / "dog" / "0.png").write_bytes(b"")
    config = c2i.get_config("tiny")
    config.data.update(source="folder", root=str(tmp_path), resolution=8)
    loader = make_loader(config, batch_size=8, sharding=batch_sharding(make_mesh()))
    with caplog.at_level(logging.WARNING):
        for _ in range(loader_module.DRAWS_PER_CLASS_BEFORE_CHECK * 2 // 8):
            next(loader)
    assert "1 of 2 classes never came in the 40 images drawn so far: 1 (dog)" in caplog.text
    loader.close()


def test_a_record_that_is_no_image_is_named_so_not_by_a_memory_address():
    from PIL import UnidentifiedImageError

    from pixelflow_jax.data.decoding import to_rgb

    with pytest.raises(UnidentifiedImageError, match=r"^not an image \(its header is no format PIL reads\)$"):
        to_rgb(b"<html>a saved error page</html>")


def test_the_centre_crop_is_adms_box_halving_bicubic_resize_and_centred_window():
    """Written out with PIL against decoding.adm_center_crop, on images whose columns and rows all
    differ, so a window off the centre or a resize of the wrong side shows."""
    ramp = lambda h, w: np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), np.zeros((h, w))],
                                 -1).astype(np.uint8)
    for h, w in ((10, 30), (40, 19), (37, 37), (16, 24)):  # wider, taller (box-halved once), square, exactly 2x
        image = Image.fromarray(ramp(h, w))
        expected = image
        while min(expected.size) >= 16:
            expected = expected.resize((expected.size[0] // 2, expected.size[1] // 2), resample=Image.BOX)
        scale = 8 / min(expected.size)
        expected = np.asarray(expected.resize((round(expected.size[0] * scale), round(expected.size[1] * scale)),
                                              resample=Image.BICUBIC))
        top, left = (expected.shape[0] - 8) // 2, (expected.shape[1] - 8) // 2
        np.testing.assert_array_equal(decoding.adm_center_crop(image, 8), expected[top:top + 8, left:left + 8])


def test_random_crops_reach_every_offset_and_a_centre_cropped_image_is_kept_whole():
    from pixelflow_jax.data.decoding import RandomCropFlip

    image = np.arange(10 * 12 * 3, dtype=np.int32).reshape(10, 12, 3)  # wider than high: each side its own range
    offsets = set()
    for seed in range(200):
        crop = RandomCropFlip(8, flip=False)({"image": image}, np.random.default_rng(seed))["image"]
        offsets.add((int(crop[0, 0, 0]) // 36, int(crop[0, 0, 0]) % 36 // 3))  # (top, left) of the window
    assert offsets == {(top, left) for top in range(3) for left in range(5)}
    exact = RandomCropFlip(8, flip=False)({"image": image[:8, :8]}, np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(exact, image[:8, :8])


def test_the_loaders_random_flip_setting_reaches_every_image():
    """IndexSource's ramps rise along a row (mod 256, resized): a mirrored crop falls. With
    data.random_flip off (captions that say "on the left") no image of the pipeline may come out
    mirrored; with it on, some do."""
    rising = {}
    for flip in (True, False):
        seen, _ = batches(IndexSource(), 4, random_flip=flip)
        steps = np.concatenate([images[..., 0] for images, _ in seen]).astype(int)
        signed = (np.diff(steps, axis=2) + 128) % 256 - 128  # the step to the next column, wrap-around undone
        rising[flip] = np.median(signed, axis=(1, 2)) > 0
    assert rising[False].all() and not rising[True].all() and rising[True].any()


def test_the_loaders_centre_crop_setting_gives_each_image_adms_centre_crop():
    """data.center_crop=True must reach the decoding: each image of a batch (IndexSource: label =
    record) is ADM's centre crop of its record, not the release's resize and random crop."""
    (images, labels), = batches(IndexSource(), 1, center_crop=True, random_flip=False)[0]
    for image, label in zip(images, labels):
        np.testing.assert_array_equal(
            image, decoding.adm_center_crop(Image.fromarray(IndexSource()[label]["image"]), R))


def test_a_running_count_is_logged_when_it_first_happens_and_again_each_time_it_doubles(caplog):
    """Totals 0, 1, 2, 3, 5, 5, 8, 9: logged at 1 (the first), 2 (twice 1) and 5 (past twice 2),
    not at 3, 8 or 9 (below twice 5), nor for an add of nothing."""
    count = loader_module.RunningCount("things seen")
    with caplog.at_level(logging.WARNING):
        for n in (0, 1, 1, 1, 2, 0, 3, 1):
            count.add(n)
    assert [record.getMessage() for record in caplog.records] == [
        f"so far, {total} things seen (logged again at {2 * total})" for total in (1, 2, 5)]
    assert count.count == 9


LOADER_WORKER = """
import ctypes, os, signal
from pixelflow_jax.data.loader import init_worker
init_worker(os.getppid())  # this process's parent plays the trainer
death_signal = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(death_signal))  # PR_GET_PDEATHSIG
print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, death_signal.value == signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_loader_worker_ignores_ctrl_c_and_is_killed_with_its_trainer():
    """A terminal's Ctrl-C reaches the workers too: had they died of it, the trainer's save on
    Ctrl-C would wait for batches no worker makes."""
    result = subprocess.run([sys.executable, "-c", LOADER_WORKER], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["True", "True"], result.stderr[-3000:]


@pytest.mark.parametrize("skip", [True, False])
def test_a_packs_lines_on_an_unwritable_stdout_cost_the_lines_not_the_pack(tmp_path, skip):
    """The packer's skip lines were print()s: on a stdout that takes no more (a log on a full disk, a
    closed ssh session's) the first skipped file failed the whole pack, its shards removed. Without a
    skip the summary is the first line: printed, it failed at exit (status 120)."""
    images = tmp_path / "captioned"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)) if i or not skip else b"no image")
        (images / f"{i}.txt").write_text(f"caption {i}")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "pixelflow_jax.data.pack_captions", f"--folder={images}",
                                 f"--output={tmp_path / 'shards'}"], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 0 and "stdout cannot be written" in result.stderr, result.stderr[-3000:]
    assert os.listdir(tmp_path / "shards") == ["captions-00000-of-00001.array_record"]


def test_a_pack_renaming_its_smaller_set_never_replaces_a_file_it_did_not_write(tmp_path, monkeypatch):
    """A set that came out smaller than planned is renamed to its size at the end: a file of such a
    name that appeared meanwhile (another pack writing into the folder) was replaced without a word."""
    from pixelflow_jax.data.caption_shards import pack

    images, shards = tmp_path / "captioned", tmp_path / "shards"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)) if i else b"no image")
        (images / f"{i}.txt").write_text(f"caption {i}")
    upload, theirs = storage.upload_file_once, shards / "captions-00000-of-00002.array_record"

    def upload_then_another_pack_writes(local, path):
        published = upload(local, path)
        if path.endswith("captions-00001-of-00003.array_record"):  # this pack's last shard
            theirs.write_bytes(b"another pack's shard")
        return published

    monkeypatch.setattr(storage, "upload_file_once", upload_then_another_pack_writes)
    with pytest.raises(DataError) as error:
        pack(str(images), str(shards), records_per_shard=1)
    assert (f"{theirs} appeared while this pack renamed its 2 shards to their count, and this pack did not write it: "
            f"another pack is writing into {shards}, or a file was put there; it is kept. Let one pack write "
            "there, into an empty folder") in str(error.value)
    assert "the 2 shards it had written are removed" in str(error.value)
    assert os.listdir(shards) == [theirs.name] and theirs.read_bytes() == b"another pack's shard"
