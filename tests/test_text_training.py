"""Text-to-image training: captioned sources and their bad input, ArrayRecord packing, the demo
captions, and the text-conditional step (frozen T5, caption dropout) against float64 and across
meshes."""

import dataclasses
import json
import logging
import os
import pathlib
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from pixelflow_jax import PixelFlowScheduler, load_model
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.data.caption_data import CaptionedFolderSource, CaptionRecordSource
from pixelflow_jax.data.demo_data import SHAPES, CaptionedDemoSource, captioned_demo_image, classify, colour_name
from pixelflow_jax.data.loader import ImageLoader, build_dataset
from pixelflow_jax.data.sources import DataError
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.text import demo_text_encoder
from pixelflow_jax.text.prompts import T5Tokenizer
from pixelflow_jax.text.t5_convert import load_t5_encoder
from pixelflow_jax.training.flow import StageTables, draw, stage_batches
from pixelflow_jax.training.train_step import (StepConfig, TextConditioning, _loss_and_stage_losses,
                                               dropped_conditioning, make_optimizer, make_train_step,
                                               state_shardings)
from test_model_parity import relative_error
from test_train import host_state, mesh_of

R, TOKENS = 32, 16


def write_image(path, index):
    Image.fromarray(captioned_demo_image(index, resolution=40).image).save(path)


@pytest.fixture
def captioned_folder(tmp_path):
    """img2dataset's layout (shard folders of NAME.jpg + NAME.txt): 8 good records, a caption that
    is not UTF-8, an empty one, one far over 16 tokens, and an image without a caption."""
    root = tmp_path / "captioned"
    captions = {}
    for i in range(12):
        folder = root / f"{i // 6:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"{i:09d}.png", i)
        caption = captioned_demo_image(i).caption.encode()
        if i == 2:
            caption = b"\xff\xfe a red disk"  # not UTF-8
        elif i == 5:
            caption = b"  \n"  # empty
        elif i == 8:
            caption = b"a red disk " * 20  # 60 words: truncated to 16 tokens
        if i != 10:  # no caption file
            (folder / f"{i:09d}.txt").write_bytes(caption)
            captions[str(folder / f"{i:09d}.png")] = caption
    return str(root), captions


def test_captioned_folder_names_missing_captions_or_skips_and_counts_them(captioned_folder):
    root, _ = captioned_folder
    with pytest.raises(DataError, match=r"1 of 12 images .* no caption file .*000000010.png.*missing_captions=skip"):
        CaptionedFolderSource(root)
    source = CaptionedFolderSource(root, missing_captions="skip")
    assert len(source) == 11 and source.missing_captions == 1
    with pytest.raises(DataError, match="does not exist"):
        CaptionedFolderSource(root + "/nothing")
    with pytest.raises(DataError, match="--config.data.root is not set"):
        CaptionedFolderSource("")
    with pytest.raises(DataError, match=r"--config.data.missing_captions must be one of \('error', 'skip'\), got "
                                        r"'skp'"):
        CaptionedFolderSource(root, missing_captions="skp")


def test_a_runs_missing_captions_setting_reaches_its_captioned_folder(captioned_folder):
    """config.data.missing_captions='skip' must leave the uncaptioned image out of a run's data, as
    the packer's --missing_captions does; 'error' must refuse it."""
    from configs import t2i
    from pixelflow_jax.data.caption_data import make_captioned_source

    root, _ = captioned_folder
    data = t2i.get_config("tiny").data
    data.update(source="folder", root=root, missing_captions="skip")
    source = make_captioned_source(data)
    assert len(source) == 11 and source.missing_captions == 1
    data.missing_captions = "error"
    with pytest.raises(DataError, match=r"1 of 12 images .* no caption file"):
        make_captioned_source(data)


def test_a_runs_demo_settings_reach_its_captioned_demo_set():
    from configs import t2i
    from pixelflow_jax.data.caption_data import make_captioned_source

    data = t2i.get_config("tiny").data
    data.update(source="demo", demo_num_images=6, demo_seed=3, demo_num_classes=12, resolution=16)
    source = make_captioned_source(data)
    expected = CaptionedDemoSource(6, seed=3, num_classes=12, resolution=16)
    assert len(source) == 6 and source[5]["image"].shape == (16, 16, 3)
    assert [source[i]["caption"] for i in range(6)] == expected.captions(6)


def test_a_caption_named_after_the_whole_file_name_is_pointed_out(captioned_folder):
    root, _ = captioned_folder
    (pathlib.Path(root) / "00001" / "000000010.png.txt").write_text("a red disk")  # not read as 000000010.png's
    with pytest.raises(DataError, match=r"1 of 12 images .* no caption file .*000000010.png'\]; 1 of them have a "
                                        r"caption file named after the image's whole file name, e.g. "
                                        r".*000000010.png.txt: name those NAME.txt; add the captions"):
        CaptionedFolderSource(root)


def test_a_caption_named_in_another_case_than_its_image_is_pointed_out(tmp_path, caplog):
    """IMG_1.JPG beside img_1.txt is one name where the folder was made (macOS, Windows): here the
    image was said to have no caption, and the caption, in a warning of its own, no image."""
    for name in ("IMG_1.JPG", "Cat.png", "dog.png"):
        write_image(tmp_path / name, 0)
    for name in ("img_1.txt", "cat.txt", "dog.txt"):
        (tmp_path / name).write_text("a red disk")
    with pytest.raises(DataError, match=r"2 of 3 images .* no caption file .*; 2 of them have a caption file whose "
                                        r"name differs from the image's only in case, e\.g\. \S+/cat\.txt \(one name "
                                        r"on macOS and Windows, two here\): rename those to the image's name; add the"):
        CaptionedFolderSource(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert len(CaptionedFolderSource(str(tmp_path), missing_captions="skip")) == 1
    assert "2 of them have a caption file whose name differs from the image's only in case" in caplog.text


def test_a_caption_named_in_another_unicode_form_than_its_image_is_pointed_out(tmp_path):
    """café.jpg written by macOS (é as e + accent, NFD) beside café.txt written by a script (one
    character, NFC): two names here that show alike, and the image was said to have no caption. Its
    case is the same: it is not named among those differing in case too."""
    import unicodedata

    write_image(tmp_path / f"{unicodedata.normalize('NFD', 'café')}.png", 0)
    (tmp_path / f"{unicodedata.normalize('NFC', 'café')}.txt").write_text("a red disk")
    write_image(tmp_path / "dog.png", 0)
    (tmp_path / "dog.txt").write_text("a red disk")
    caption = tmp_path / f"{unicodedata.normalize('NFC', 'café')}.txt"
    hint = re.escape(f"1 of them have a caption file whose name differs from the image's only in its Unicode form "
                     f"(an accent written apart from its letter, as macOS writes names, or not), e.g. {caption}: "
                     "rename those to the image's name (convmv -r --nfc -f utf8 -t utf8 --notest ROOT renames a "
                     "folder's names to one form)")
    with pytest.raises(DataError, match=hint) as error:
        CaptionedFolderSource(str(tmp_path))
    assert "only in case" not in str(error.value)


def test_a_caption_named_in_another_case_and_unicode_form_than_its_image_is_pointed_out(tmp_path):
    """CAFÉ.png written by a script (É as one character) beside café.txt as macOS writes it (e +
    accent): both differences at once, and one name where the folder was made."""
    import unicodedata

    write_image(tmp_path / f"{unicodedata.normalize('NFC', 'CAFÉ')}.png", 0)
    (tmp_path / f"{unicodedata.normalize('NFD', 'café')}.txt").write_text("a red disk")
    with pytest.raises(DataError, match=r"1 of 1 images .* no caption file .*; 1 of them have a caption file whose "
                                        r"name differs from the image's only in case, e\.g\. \S+/caf\S+\.txt"):
        CaptionedFolderSource(str(tmp_path))


def test_captions_kept_as_other_tools_keep_them_are_named_as_not_read(tmp_path, caplog):
    """A Hugging Face imagefolder (metadata.jsonl, as diffusers' scripts read) or NAME.caption
    sidecars: every image was said to lack a caption, and the file holding them went unmentioned."""
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png", 0)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red disk"}\n')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'metadata.jsonl'} (another tool's captions) is not "
                                                  "read: write each image's caption into NAME.txt beside it; add the")):
        CaptionedFolderSource(str(tmp_path))
    (tmp_path / "b.caption").write_text("a blue ring")
    with pytest.raises(DataError, match=r"b.caption and 1 more such file \(another tool's captions\) are not read"):
        CaptionedFolderSource(str(tmp_path))
    # imagefolder's other metadata files too; and an image left out under missing_captions=skip is
    # warned of with the same hint, as the images it leaves out may be captioned there
    for name in ("metadata.jsonl", "b.caption"):
        (tmp_path / name).unlink()
    for metadata in ("metadata.csv", "metadata.parquet"):
        (tmp_path / metadata).write_text("file_name,text\na.png,a red disk\n")
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / metadata} (another tool's captions) is not read")):
            CaptionedFolderSource(str(tmp_path))
        (tmp_path / metadata).unlink()
    (tmp_path / "a.txt").write_text("a red disk")
    (tmp_path / "b.caption").write_text("a blue ring")
    with caplog.at_level(logging.WARNING):
        CaptionedFolderSource(str(tmp_path), missing_captions="skip")
    assert (f"1 images without a caption file left out (missing_captions=skip), e.g. ['{tmp_path / 'b.png'}']; "
            f"{tmp_path / 'b.caption'} (another tool's captions) is not read") in caplog.text, caplog.text


def test_another_tools_captions_are_named_where_some_images_have_their_caption_file(tmp_path):
    """An imagefolder's metadata.jsonl in a sub-folder, or NAME.CAPTION in capitals, beside images
    that have NAME.txt: the images it captions were said to lack one, the file unmentioned."""
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png", 0)
    (tmp_path / "a.txt").write_text("a red disk")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "a blue ring"}\n')
    (tmp_path / "c.CAPTION").write_text("a green square")
    with pytest.raises(DataError, match=re.escape(f"; {tmp_path / 'c.CAPTION'} and 1 more such file (another tool's "
                                                  "captions) are not read")):
        CaptionedFolderSource(str(tmp_path))


def test_json_sidecars_of_images_without_a_caption_are_named_as_not_read(tmp_path):
    """img2dataset's `files` output given no --caption_col: ROOT/00000/NAME.jpg + NAME.json (its
    metadata) and no NAME.txt. Below the folder's top no JSON file was named: every image was only
    said to lack a caption file. A NAME.json beside an image that has its caption is not named."""
    shard = tmp_path / "00000"
    shard.mkdir()
    for name in ("000000000", "000000001", "000000002"):
        write_image(shard / f"{name}.jpg", 0)
        (shard / f"{name}.json").write_text('{"url": "https://example.com/a.jpg", "key": "0", "status": "success"}')
    (shard / "000000000.txt").write_text("a red disk")
    sidecars = re.escape(f"; {shard / '000000001.json'} and 1 more such file (per-image metadata, as img2dataset "
                         "writes beside each image, with the caption in NAME.txt only when given --caption_col) are "
                         "not read: write each image's caption into NAME.txt beside it; add the")
    with pytest.raises(DataError, match=r"2 of 3 images .*" + sidecars):
        CaptionedFolderSource(str(tmp_path))
    (shard / "000000000.txt").unlink()
    with pytest.raises(DataError, match=re.escape(f"{shard / '000000000.json'} and 2 more such files (per-image")):
        CaptionedFolderSource(str(tmp_path))
    # At the folder's top, where a table of captions is named too: named once, as an image's metadata
    with pytest.raises(DataError) as refusal:
        CaptionedFolderSource(str(shard))
    assert str(refusal.value).count("000000000.json") == 1 and "another tool's captions" not in str(refusal.value)


def test_a_table_of_captions_under_any_name_is_named_as_not_read_where_no_image_has_a_caption(tmp_path):
    """captions.csv or train.jsonl at the folder's top got no word (only metadata.* did): every
    image was said to lack a caption file. A table beside images that have theirs is not named."""
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png", 0)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "sources.csv").write_text("url\n")  # below the top: not the folder's captions
    for table in ("captions.csv", "train.jsonl", "captions.json", "captions.tsv", "captions.parquet"):
        (tmp_path / table).write_text("file_name,text\na.png,a red disk\n")
        with pytest.raises(DataError, match=re.escape(f"e.g. ['{tmp_path / 'a.png'}', '{tmp_path / 'b.png'}']; "
                                                      f"{tmp_path / table} (another tool's captions) is not read: "
                                                      "write each image's caption into NAME.txt beside it; add the")):
            CaptionedFolderSource(str(tmp_path), root_flag="--folder", missing_flag="--missing_captions")
        (tmp_path / table).unlink()
    (tmp_path / "a.txt").write_text("a red disk")
    (tmp_path / "results.csv").write_text("step,loss\n")
    with pytest.raises(DataError) as refusal:
        CaptionedFolderSource(str(tmp_path))
    assert "1 of 2 images" in str(refusal.value) and "results.csv" not in str(refusal.value), refusal.value


def test_webdataset_tar_shards_are_named_with_how_to_read_them(tmp_path):
    """img2dataset's webdataset output (00000.tar of NAME.jpg + NAME.txt, a .parquet and _stats.json
    beside each) was 'no captioned images', as a folder given as shards was 'no shards': neither
    said that the captioned images are inside the archives."""
    import tarfile

    from pixelflow_jax.data.caption_data import record_shards

    inside = tmp_path / "inside"
    inside.mkdir()
    write_image(inside / "000000000.jpg", 0)
    (inside / "000000000.txt").write_text("a red disk")
    root = tmp_path / "laion"
    root.mkdir()
    for shard in ("00000", "00001"):
        with tarfile.open(root / f"{shard}.tar", "w") as archive:
            archive.add(inside, arcname=".")
        (root / f"{shard}.parquet").write_bytes(b"PAR1")
        (root / f"{shard}_stats.json").write_text("{}")
    archives = re.escape(f"{root / '00000.tar'} and 1 more archive are not read (webdataset shards, as img2dataset's "
                         "webdataset output writes, hold the images and captions): extract them into folders, e.g. "
                         f"for f in {root}/*.tar; do mkdir ${{f%.tar}}; tar -xf $f -C ${{f%.tar}}; done")
    with pytest.raises(DataError, match=r"no captioned images under .*; " + archives + "$"):
        CaptionedFolderSource(str(root))
    with pytest.raises(DataError, match=r"has no \*\.array_record shards: " + archives + ", then pack them"):
        record_shards(str(root))


def test_a_hugging_face_datasets_tables_are_named_as_not_read(tmp_path):
    """A dataset downloaded from the Hub (Parquet shards of images and captions under data/) or saved
    by datasets' save_to_disk (Arrow files) was only 'no captioned images', naming none of its files."""
    for shard in ("train-00000-of-00002", "train-00001-of-00002"):
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "hub" / "data" / f"{shard}.parquet").write_bytes(b"PAR1")
    (tmp_path / "hub" / "README.md").write_text("---\ndataset_info: ...")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "data-00000-of-00001.arrow").write_bytes(b"")
    for folder, named in (("hub", "data/train-00000-of-00002.parquet and 1 more such file are"),
                          ("saved", "data-00000-of-00001.arrow is")):
        with pytest.raises(DataError, match=re.escape(
                f"no captioned images under {tmp_path / folder} (expected NAME.ext + NAME.txt with ext one of .jpg, "
                f".jpeg, .jpe, .jfif, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .gif); {tmp_path / folder}/{named} "
                "not read (a Hugging Face dataset's tables, which hold its images and captions): write each row's "
                "image into a file, NAME.jpg, and its caption into NAME.txt beside it") + "$"):
            CaptionedFolderSource(str(tmp_path / folder))


def test_archives_are_extracted_where_they_lie_with_their_own_tool_and_in_a_bucket_from_a_local_copy():
    """The command's loop names the archives' own folder (img2dataset's shards may lie below the
    folder given) and each kind's extractor; a shell loop over a bucket's path would find nothing."""
    from pixelflow_jax.data.caption_data import archives_hint

    for archive, extract in (("00000.tgz", "tar -xzf $f -C ${f%.tgz}"), ("00000.tar.gz", "tar -xzf $f -C ${f%.tar.gz}"),
                             ("00000.ZIP", "unzip -q $f -d ${f%.ZIP}")):  # as spelled: *.zip finds no .ZIP
        extension = archive[5:]
        assert archives_hint("/data", [f"/data/laion/{archive}"]).endswith(
            f"e.g. for f in /data/laion/*{extension}; do mkdir ${{f%{extension}}}; {extract}; done"), archive
    assert archives_hint("gs://b/data", ["gs://b/data/00000.tar", "gs://b/data/00001.tar"]) == (
        "gs://b/data/00000.tar and 1 more archive are not read (webdataset shards, as img2dataset's webdataset output "
        "writes, hold the images and captions): extract them into folders, e.g. on a local copy of them")


def test_caption_files_without_an_image_are_counted(captioned_folder, caplog):
    root, _ = captioned_folder
    for name in ("lost_a", "lost_b"):
        (pathlib.Path(root) / "00000" / f"{name}.txt").write_text("a red disk")
    (pathlib.Path(root) / "00000" / "other_format.avif").write_bytes(b"")
    (pathlib.Path(root) / "00000" / "other_format.txt").write_text("a red disk")
    CaptionedFolderSource(root, missing_captions="skip")
    assert "3 caption files have no image beside them" in caplog.text and "lost_a.txt" in caplog.text


def test_a_captioned_folder_of_split_folders_is_read_whole_with_a_warning_naming_the_train_split(tmp_path, caplog):
    """ROOT/train/ and ROOT/val/ (a dataset's top folder, as many are laid out) trained on both
    splits, the validation images among them, without a word: a captioned folder is read at any
    depth. Training on every split can be meant, so it trains, and the log names ROOT/train."""
    root = tmp_path / "captioned"
    for index, split in enumerate(("train", "val")):
        (root / split).mkdir(parents=True)
        write_image(root / split / "0.png", index)
        (root / split / "0.txt").write_text("a red disk")
    with caplog.at_level(logging.WARNING):
        assert len(CaptionedFolderSource(str(root))) == 2
    assert (f"{root} holds only the split folders train, val, and every one is read (a captioned folder is read at any "
            "depth), the validation or test images among them: to train on one split, set "
            f"--config.data.root={root / 'train'}") in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CaptionedFolderSource(str(root / "train"))
        (root / "extra").mkdir()  # a folder of another name beside them: not a dataset's splits alone
        write_image(root / "extra" / "0.png", 2)
        (root / "extra" / "0.txt").write_text("a red disk")
        CaptionedFolderSource(str(root))
    assert "split folders" not in caplog.text


@pytest.mark.parametrize("entries,named", [
    (("Train", "Val"), "Train"), (("test", "train"), "train"),  # any case; the training split, not the first
    ((".ipynb_checkpoints", "train", "val"), "train"),  # a hidden folder beside them is no folder of images
    (("train",), None),  # one split alone is all there is: reading it whole is reading that split
    (("COVER.JPG", "train", "val"), None),  # images of ROOT itself: no dataset's top folder of splits
])
def test_which_captioned_folders_of_split_folders_are_warned_of(tmp_path, caplog, entries, named):
    for index, entry in enumerate(entries):
        folder = tmp_path if "." in entry.lstrip(".") else tmp_path / entry
        folder.mkdir(exist_ok=True)
        write_image(folder / (entry if folder == tmp_path else "0.png"), index)
        (folder / f"{entry.split('.')[0] if folder == tmp_path else '0'}.txt").write_text("a red disk")
    with caplog.at_level(logging.WARNING):
        CaptionedFolderSource(str(tmp_path))
        CaptionedFolderSource(str(tmp_path), root_flag="--folder")  # as the packer reads it: its own flag named
    warned = [r.getMessage() for r in caplog.records if "split folders" in r.getMessage()]
    if named:
        assert [message.rsplit(" set ", 1)[1] for message in warned] == [
            f"--config.data.root={tmp_path / named}", f"--folder={tmp_path / named}"], warned
    else:
        assert warned == [], warned


def test_images_that_would_share_a_caption_file_are_refused_and_a_doubled_caption_file_named(tmp_path, caplog):
    for name, colour in (("cat.jpg", "black"), ("cat.png", "white"), ("dog.png", "red")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "cat.txt").write_text("a black square")  # right for cat.jpg only
    (tmp_path / "dog.txt").write_text("a red square")
    (tmp_path / "dog.TXT").write_text("a pink square")
    with pytest.raises(DataError, match=r"1 names under .* belong to more than one image, which would share one "
                                        r"caption file, e\.g\. \[\['.*cat\.jpg', '.*cat\.png'\]\]; give each"):
        CaptionedFolderSource(str(tmp_path))
    (tmp_path / "cat.txt").rename(tmp_path / "cat.caption")  # no caption: both left out, none mismatched
    assert len(CaptionedFolderSource(str(tmp_path), missing_captions="skip")) == 1
    (tmp_path / "cat.caption").rename(tmp_path / "cat.txt")
    (tmp_path / "cat.png").rename(tmp_path / "cat_2.png")
    (tmp_path / "cat_2.txt").write_text("a white square")
    source = CaptionedFolderSource(str(tmp_path))
    assert {os.path.basename(source[i]["name"]): source[i]["caption"] for i in range(len(source))} == {
        "cat.jpg": b"a black square", "cat_2.png": b"a white square", "dog.png": b"a red square"}
    assert ("1 images have more than one caption file, differing only in the extension's case, e.g. "
            f"{tmp_path / 'dog.txt'} is read, not {tmp_path / 'dog.TXT'}") in caplog.text, caplog.text


def test_caption_files_differing_in_case_without_a_txt_are_named_as_found(tmp_path, caplog):
    """NAME.Txt beside NAME.TXT: the warning said the one ending in .txt is read, a file that does
    not exist; it names the files found and the one read."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "dog.png")
    (tmp_path / "dog.TXT").write_text("a red square")
    (tmp_path / "dog.Txt").write_text("a pink square")
    source = CaptionedFolderSource(str(tmp_path))
    assert source[0]["caption"] == b"a red square"  # the first in sorted order, as listed
    assert ("1 images have more than one caption file, differing only in the extension's case, e.g. "
            f"{tmp_path / 'dog.TXT'} is read, not {tmp_path / 'dog.Txt'}") in caplog.text, caplog.text
    caplog.clear()
    (tmp_path / "dog.txt").write_text("a dark red square")
    assert CaptionedFolderSource(str(tmp_path))[0]["caption"] == b"a dark red square"
    assert (f"e.g. {tmp_path / 'dog.txt'} is read, not {tmp_path / 'dog.TXT'}, {tmp_path / 'dog.Txt'}"
            in caplog.text), caplog.text


def test_the_loaders_counts_are_logged_when_they_start_and_each_time_they_double(caplog):
    """A long caption is truncated in nearly every batch of a real run: one line per batch buried
    the log."""
    from pixelflow_jax.data.loader import RunningCount

    count = RunningCount("captions drawn were truncated")
    for n in (0, 1, 0, 1, 1, 1, 3, 1, 1):
        count.add(n)
    assert count.count == 9
    assert [r.getMessage() for r in caplog.records] == [
        f"so far, {n} captions drawn were truncated (logged again at {2 * n})" for n in (1, 2, 4, 8)]
    caplog.clear()
    share = RunningCount("were truncated", among="captions drawn")  # of every caption drawn
    for n, drawn in ((0, 4), (1, 4), (3, 4)):
        share.add(n, drawn)
    assert [r.getMessage() for r in caplog.records] == [
        "so far, 1 of the 8 captions drawn (12%) were truncated (logged again at 2)",
        "so far, 4 of the 12 captions drawn (33%) were truncated (logged again at 8)"]


def test_loader_tokenizes_captions_and_counts_skipped_and_truncated_ones(captioned_folder, encoder_folder, caplog):
    """The counts of captions cut or read in part say what share of the captions drawn they are, and
    the length cut to: a run on one's own captions with the demo's 8 tokens cut nearly all of them,
    and the log only counted up."""
    root, captions = captioned_folder
    tokenizer = T5Tokenizer(encoder_folder, TOKENS)
    source = CaptionedFolderSource(root, missing_captions="skip")
    # One epoch in one batch of 11: records 2 (not UTF-8) and 5 (empty) are replaced by random usable ones.
    loader = ImageLoader(build_dataset(source, batch_size=11, resolution=R, seed=0, tokenizer=tokenizer, num_workers=2))
    with caplog.at_level(logging.WARNING):
        images, (tokens, mask) = next(loader)
    loader.close()
    assert (f"so far, 1 of the 11 captions drawn (9%) were longer than train.max_text_tokens ({TOKENS} tokens) and "
            "were truncated (logged again at 2)") in caplog.text
    assert images.shape == (11, R, R, 3) and tokens.shape == mask.shape == (11, TOKENS)
    assert loader.skipped.count == 2 and loader.truncated.count == 1
    usable = [c.decode() for c in captions.values() if c.strip() and not c.startswith(b"\xff")]
    expected = {tuple(row) for row in tokenizer(usable)[0]}
    assert {tuple(row) for row in tokens} == expected  # every usable caption, and only those
    assert loader.unknown_text.count == int(tokenizer.has_unknown_text(tokenizer(usable)[0]).sum())
    assert (mask.sum(axis=1) == TOKENS).sum() >= 1  # the long caption fills every position


def test_pack_into_array_record_reads_back_the_folder_locally_and_in_a_bucket(captioned_folder, encoder_folder,
                                                                            tmp_path, bucket, monkeypatch):
    """Shards in a bucket are read in place (no local copy), also by a loader worker process,
    and give the batches the same shards give on a local disk."""
    from pixelflow_jax import storage
    from pixelflow_jax.data.caption_shards import pack

    root, captions = captioned_folder
    expected = sorted((open(path, "rb").read(), caption.decode().strip()) for path, caption in captions.items()
                      if caption.strip() and not caption.startswith(b"\xff"))
    sources = []
    for output in (str(tmp_path / "shards"), f"{bucket}/shards"):
        counts = pack(root, output, records_per_shard=3, missing_captions="skip")
        assert counts == {"records": 9, "shards": 3, "skipped_captions": 2, "skipped_images": 0, "missing_captions": 1}
        assert len([n for n in storage.list_files(output) if n.endswith(".array_record")]) == 3
        source = CaptionRecordSource(output)
        assert all(shard.startswith(output) for shard in source.shards)
        assert sorted((bytes(source[i]["image"]), source[i]["caption"]) for i in range(len(source))) == expected
        packed_from = {source[i]["name"].split(" (", 1)[1].rstrip(")") for i in range(len(source))}
        assert packed_from <= {str(path) for path in captions} and len(packed_from) == 9  # named in skip warnings
        with pytest.raises(ValueError, match="already holds 3 shards"):
            pack(root, output)  # nothing is overwritten
        sources.append(source)

    # An image that cannot be read after two shards were written: the folder is left as it was.
    from pixelflow_jax.data import caption_shards

    real_read = storage.read_bytes
    seventh = sources[0][6]["name"].split(" (", 1)[1].rstrip(")")  # the image of the third shard's first record

    def failing_on_the_seventh_image(path):
        if path == seventh:
            raise OSError("disk error")
        return real_read(path)

    failed = tmp_path / "failed"
    with monkeypatch.context() as patch:
        patch.setattr(caption_shards.storage, "read_bytes", failing_on_the_seventh_image)
        with pytest.raises(DataError, match="OSError: disk error \\(packing stopped; the 2 shards it had written "
                                            "are removed"):
            pack(root, str(failed), records_per_shard=3, missing_captions="skip")
    assert not os.path.exists(failed)  # no shard, nor the folder the pack made for them

    tokenizer = T5Tokenizer(encoder_folder, TOKENS)
    local, in_bucket = (ImageLoader(build_dataset(source, batch_size=4, resolution=R, seed=0, tokenizer=tokenizer,
                                                  num_workers=workers))
                        for source, workers in zip(sources, (0, 1)))
    for _ in range(3):
        (a, (ta, ma)), (b, (tb, mb)) = next(local), next(in_bucket)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ma, mb)
    in_bucket.close()


def test_a_pack_never_overwrites_a_shard_another_pack_wrote_meanwhile(captioned_folder, tmp_path, bucket,
                                                                      monkeypatch):
    """Two packs into one output at once (the packer started on every worker of a pod, or twice by
    hand) both passed the check for shards there, and each replaced the other's shards without a
    word: a set mixed from two folders, or a pack's cleanup removing the other's shards."""
    from pixelflow_jax import storage
    from pixelflow_jax.data import caption_shards

    root, _ = captioned_folder
    real_check = caption_shards.not_an_image
    for output in (str(tmp_path / "shards"), f"{bucket}/shards"):
        theirs = storage.join(output, "captions-00000-of-00003.array_record")

        def another_pack_writes_first(data):  # while this pack reads its first shard's images
            if not storage.exists(theirs):
                storage.write_atomically(theirs, b"the other pack's shard")
            return real_check(data)

        with monkeypatch.context() as patch:
            patch.setattr(caption_shards, "not_an_image", another_pack_writes_first)
            with pytest.raises(DataError, match=re.escape(
                    f"{theirs} appeared while this pack was writing it: another pack is writing into {output}; "
                    "let one pack write there") + r".*packing stopped; no shard had been written"):
                caption_shards.pack(root, output, records_per_shard=3, missing_captions="skip")
        assert storage.read_bytes(theirs) == b"the other pack's shard"  # neither replaced nor removed
        assert [n for n in storage.list_files(output) if not n.startswith(".")] == [os.path.basename(theirs)]


def test_a_t5_folder_in_a_bucket_is_copied_once_and_again_only_where_it_changed(encoder_folder, bucket,
                                                                                monkeypatch):
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.text.prompts import local_t5_folder

    remote = f"{bucket}/t5"
    names = sorted(os.listdir(encoder_folder))
    for name in names:
        storage.upload_file_atomically(os.path.join(encoder_folder, name), f"{remote}/{name}")
    local = local_t5_folder(remote)
    assert local.startswith(storage.cache_dir())
    for name in names:
        assert open(os.path.join(local, name), "rb").read() == open(os.path.join(encoder_folder, name), "rb").read()

    downloads, open_file = [], storage.open_file
    monkeypatch.setattr(storage.cache, "open_file",  # (what cached_copy downloads through)
                        lambda path, mode="rb": downloads.append(path) or open_file(path, mode))
    assert local_t5_folder(remote) == local and downloads == []  # a second run reads the copy
    assert local_t5_folder(remote + "/") == local and downloads == []  # the same folder, spelled with its slash

    with open(os.path.join(encoder_folder, "config.json")) as f:
        config = json.load(f)
    storage.write_atomically(f"{remote}/config.json", json.dumps(config, indent=4))  # changed in the bucket
    stale = os.path.join(local, "model.safetensors.index.json")  # a copy the bucket no longer holds
    with open(stale, "w") as f:
        json.dump({"weight_map": {"encoder.block.0.layer.0.SelfAttention.q.weight": "gone.safetensors"}}, f)
    with open(f"{stale}.source.json", "w") as f:  # its record (storage.cached_copy's) goes with it
        json.dump({"url": f"{remote}/model.safetensors.index.json", "size": 1, "mtime": 1}, f)
    killed, elsewhere = (os.path.join(local, f".config.json.download-{host}-{pid}-x")  # leftovers of downloads
                         for host, pid in ((socket.gethostname(), 999999999), ("another-host", 1)))
    for leftover in (killed, elsewhere):
        open(leftover, "wb").close()
    assert local_t5_folder(remote) == local and downloads == [f"{remote}/config.json"]
    assert not os.path.exists(stale) and not os.path.exists(f"{stale}.source.json")
    assert not os.path.exists(killed) and os.path.exists(elsewhere)  # this host's dead download only
    with open(os.path.join(local, "config.json")) as f:
        assert f.read() == json.dumps(config, indent=4)
    assert load_t5_encoder(local).config.d_model == 20

    # A text run in the bucket given as its encoder: named with the encoder it records (the local copy of
    # the encoder's files has no run_config.json to tell it by)
    storage.write_atomically(f"{bucket}/run/run_config.json", json.dumps({"text_encoder": {"path": "text_encoder"}}))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{bucket}/run: has no config.json: it is a text-to-image training run, not a T5 folder: pass the text "
            f"encoder it records, {bucket}/run/text_encoder")):
        local_t5_folder(f"{bucket}/run")


def test_a_t5_folder_in_a_bucket_without_weights_is_named_as_such(encoder_folder, bucket):
    """A bucket folder that is no training run keeps the encoder's own refusal: only a run given as
    its encoder is told which encoder it records."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.text.prompts import local_t5_folder

    remote = f"{bucket}/t5_without_weights"
    for name in ("config.json", "spiece.model"):
        storage.upload_file_atomically(os.path.join(encoder_folder, name), f"{remote}/{name}")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{remote}: the T5 folder has no weights (model.safetensors or pytorch_model.bin, sharded or not)")):
        local_t5_folder(remote)


def test_a_t5_folder_in_a_bucket_that_does_not_exist_is_named_as_such(bucket):
    """A missing folder, or one in a bucket that does not exist, was said to be a T5 folder without
    weights: each of its files was missing in turn, the weights last."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.text.prompts import local_t5_folder

    with pytest.raises(CheckpointError, match=re.escape(f"T5 folder {bucket}/no_t5 does not exist: pass a Hugging "
                                                        "Face T5 folder")):
        local_t5_folder(f"{bucket}/no_t5")
    with pytest.raises(CheckpointError, match=re.escape("T5 folder gs://no-such-bucket/t5 is in the bucket "
                                                        "gs://no-such-bucket, which does not exist (a typo?")):
        local_t5_folder("gs://no-such-bucket/t5")


def test_demo_captions_name_what_the_image_shows_with_independent_colour_and_shape():
    drawn = [captioned_demo_image(i, seed=2) for i in range(500)]
    assert len({(d.colour, d.shape) for d in drawn}) == 50  # every combination occurs
    assert len({d.caption.split()[0] for d in drawn}) >= 3  # several wordings
    for d in drawn[:100]:
        assert colour_name(d.colour, 10) in d.caption and SHAPES[d.shape] in d.caption
        assert tuple(classify(d.image)) == (d.colour, d.shape)
    counts = np.bincount([d.colour * 5 + d.shape for d in drawn], minlength=50)
    assert counts.min() >= 3  # not tied to each other (a class set would give 10 pairs)


def test_demo_encoder_keeps_each_word_its_own_embedding(encoder_folder):
    """The demo T5's outputs: a word's token barely depends on the rest of the caption, while two
    words differ as much as random vectors (see demo_text_encoder: otherwise shape goes unlearned)."""
    from pixelflow_jax.text.prompts import PromptEncoder

    embeddings, _ = PromptEncoder(encoder_folder, max_length=TOKENS).encode(
        ["a red disk", "a disk in blue", "a red square"])
    embeddings = np.asarray(embeddings)
    disk, disk_elsewhere, square = embeddings[0, 2], embeddings[1, 1], embeddings[2, 2]
    same_word, other_word = np.linalg.norm(disk - disk_elsewhere), np.linalg.norm(disk - square)
    assert same_word < 0.3 * other_word, (same_word, other_word)


# ----------------------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def text_setup(converted, encoder_folder):
    """The t2i fixture's model with a text step's pieces: tokenizer, encoder, captions of a batch."""
    model, config = load_model(converted["t2i_tiny"])
    tokenizer = T5Tokenizer(encoder_folder, TOKENS)
    encoder = load_t5_encoder(encoder_folder)
    empty = [np.asarray(a[0]) for a in tokenizer([""])]
    text = TextConditioning(nnx.graphdef(encoder), *empty)
    drawn = [captioned_demo_image(i, resolution=64) for i in range(8)]
    images = np.stack([d.image for d in drawn])
    tokens, mask = tokenizer([d.caption for d in drawn])
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    return model, config, text, params, images, (tokens, mask), tokenizer


def test_caption_dropout_substitutes_the_empty_prompt_at_its_rate(text_setup):
    model, config, text, params, _, _, tokenizer = text_setup
    captions = [captioned_demo_image(i).caption for i in range(400)]
    tokens, mask = tokenizer(captions)
    dropped = dropped_conditioning(jax.random.key(1), (tokens, mask), config.model,
                                   StepConfig(caption_dropout=0.3), text)
    kwargs = text.encode(params, dropped["tokens"], dropped["mask"])
    kept = text.encode(params, tokens, mask)
    empty = text.encode(params, *tokenizer([""]))
    hidden = np.asarray(kwargs["encoder_hidden_states"])
    is_empty = np.all(np.isclose(hidden, np.asarray(empty["encoder_hidden_states"])), axis=(1, 2))
    is_kept = np.all(np.isclose(hidden, np.asarray(kept["encoder_hidden_states"])), axis=(1, 2))
    assert np.all(is_empty ^ is_kept)
    assert 0.24 <= is_empty.mean() <= 0.36  # 0.3 of 400, within 2.6 sigma
    np.testing.assert_array_equal(np.asarray(kwargs["encoder_attention_mask"])[is_empty].sum(axis=1), 1)  # "</s>"


def test_each_stage_gets_the_text_states_of_its_own_captions(text_setup):
    """encode_stages encodes every stage's rows in one interleaved call: each stage must get back
    the states of its own captions, as encoding that stage alone gives them."""
    from pixelflow_jax.training.flow import StageBatch

    _, _, text, params, _, (tokens, mask), _ = text_setup
    stages = [StageBatch(x_t=None, target=None, timesteps=None,
                         conditioning={"tokens": tokens[s::4], "mask": mask[s::4]}) for s in range(4)]
    for s, stage in enumerate(text.encode_stages(params, stages)):
        alone = text.encode(params, tokens[s::4], mask[s::4])
        np.testing.assert_allclose(stage.conditioning["encoder_hidden_states"], alone["encoder_hidden_states"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stage.conditioning["encoder_attention_mask"], mask[s::4])


def reference_stage_inputs(images, draws, scheduler):
    """The stage-mixed inputs written again in float64 numpy: box means down to each stage, the
    half-resolution start upsampled by repetition, and the scheduler's end/start mixing."""
    x = np.asarray(images, np.float64) / 127.5 - 1.0
    stage_of = np.asarray(draws.stage_of_image)
    k = np.asarray(draws.timestep_index)
    s_count = scheduler.num_stages
    out = []
    for s in range(s_count):
        members = np.flatnonzero(stage_of == s)
        size = x.shape[1] >> (s_count - 1 - s)
        box = lambda a, n: a.reshape(a.shape[0], n, a.shape[1] // n, n, a.shape[2] // n, 3).mean(axis=(2, 4))
        x_end = box(x[members], size)
        x_start = box(x_end, size // 2).repeat(2, axis=1).repeat(2, axis=2)
        noise = np.asarray(draws.noise[s], np.float64)
        x_end = scheduler.end_t[s] * x_end + (1 - scheduler.end_t[s]) * noise
        x_start = scheduler.start_t[s] * x_start + (1 - scheduler.start_t[s]) * noise
        t = np.asarray(scheduler.t_window_per_stage[s], np.float64)[k[members]][:, None, None, None]
        out.append((members, t * x_end + (1 - t) * x_start, x_end - x_start,
                    np.asarray(scheduler.timesteps_per_stage[s], np.float64)[k[members]]))
    return out


def reference_velocity(p, x, t, text, text_mask, heads, patch):
    """The text-conditional PixelFlow forward written again, functionally and in float64, from the
    parameter dict: patch tokens, timestep + latent-size (+ pooled text) embeddings, adaLN blocks (q/k RMSNorm, 2D
    RoPE; cross-attention on the RMS-normed stream with the text mask), final modulation."""
    lin = lambda q, a: a @ q["kernel"] + q.get("bias", 0.0)
    silu = lambda a: a / (1 + jnp.exp(-a))
    rms = lambda a, w: a / jnp.sqrt(jnp.mean(a**2, -1, keepdims=True) + 1e-6) * w
    ln = lambda a: (a - a.mean(-1, keepdims=True)) / jnp.sqrt(a.var(-1, keepdims=True) + 1e-6)
    gelu = lambda a: 0.5 * a * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    b, r, _, c = x.shape
    g = r // patch
    h = lin(p["patch_embed"]["proj"],
            x.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1))

    def embed(q, values):
        freqs = jnp.exp(-np.log(10000.0) * jnp.arange(128) / 127.0)
        angles = values[:, None] * freqs[None]
        return lin(q["linear_2"], silu(lin(q["linear_1"], jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1))))

    cond = embed(p["timestep_embedder"], t) + embed(p["latent_size_embedder"], jnp.full((1,), float(g)))
    if "text_pool_proj" in p:  # model.pooled_text: the mean of the unmasked text states, projected
        keep = text_mask[..., None]
        cond = cond + lin(p["text_pool_proj"], (text * keep).sum(1) / keep.sum(1))
    head_dim = h.shape[-1] // heads
    freqs = 1.0 / 10000.0 ** (np.arange(0, head_dim // 2, 2) / (head_dim // 2))
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    angle = np.concatenate([np.repeat(np.outer(a.ravel(), freqs), 2, axis=1) for a in (cols, rows)], axis=1)

    def rope(a):
        pairs = a.reshape(*a.shape[:-1], -1, 2)
        turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(a.shape)
        return a * np.cos(angle)[None, :, None] + turned * np.sin(angle)[None, :, None]

    def attend(q, queries, keys, mask, rotate_keys):
        split = lambda a: a.reshape(*a.shape[:2], heads, head_dim)
        qs = rope(split(rms(lin(q["q_proj"], queries), q["q_norm"]["weight"])))
        ks = split(rms(lin(q["k_proj"], keys), q["k_norm"]["weight"]))
        ks = rope(ks) if rotate_keys else ks
        logits = jnp.einsum("bqhd,bkhd->bhqk", qs, ks) / np.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, split(lin(q["v_proj"], keys)))
        return lin(q["o_proj"], out.reshape(*out.shape[:2], -1))

    depth = p["transformer_blocks"]["norm3"]["weight"].shape[0]
    for layer in range(depth):
        blk = jax.tree.map(lambda a: a[layer], p["transformer_blocks"])
        mods = jnp.split(lin(blk["norm1"]["linear"], silu(cond))[:, None], 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        modulated = ln(h) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * attend(blk["attn1"], modulated, modulated, None, True)
        h = h + attend(blk["attn2"], rms(h, blk["norm2"]["weight"]), text, text_mask, False)
        mlp_in = rms(h, blk["norm3"]["weight"]) * (1 + scale_mlp) + shift_mlp
        h = h + gate_mlp * lin(blk["mlp"]["fc2"], gelu(lin(blk["mlp"]["fc1"], mlp_in)))
    shift, scale = jnp.split(lin(p["proj_out_1"], silu(cond))[:, None], 2, axis=-1)
    out = lin(p["proj_out_2"], ln(h) * (1 + scale) + shift)
    return out.reshape(b, g, g, patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, r, r, c)


@pytest.mark.slow
def test_text_loss_and_gradient_equal_a_float64_computation(text_setup):
    """The step's float32 loss and gradient (stage inputs from flow.py, the NNX model, T5 embeddings
    of the captions) vs everything written again in float64: stage inputs in numpy, the forward
    functionally (reference_velocity), the gradient by float64 autodiff of that."""
    model, config, text, encoder_params, images, (tokens, mask), _ = text_setup
    scheduler = PixelFlowScheduler(1000, 4)
    draws = draw(jax.random.key(3), 8, 64, 3, 4, 1000)
    kwargs = jax.jit(text.encode)(encoder_params, tokens, mask)  # one program (eagerly, T5's ops compiled 36)
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    @jax.jit
    def loss_and_grads32(p):
        stages = stage_batches(jnp.asarray(images, jnp.float32) / 127.5 - 1, kwargs, draws,
                               StageTables.from_scheduler(scheduler))
        return jax.value_and_grad(lambda p: _loss_and_stage_losses(graphdef, p, stages), has_aux=True)(p)

    (loss32, _), grads32 = loss_and_grads32(params)
    hidden = np.asarray(kwargs["encoder_hidden_states"], np.float64)
    heads = config.model.num_attention_heads
    with jax.enable_x64(True):
        def loss64(p):
            per_sample = [jnp.mean((reference_velocity(p, x_t, t, hidden[idx], mask[idx], heads, 4) - target) ** 2,
                                   axis=(1, 2, 3))
                          for idx, x_t, target, t in reference_stage_inputs(images, draws, scheduler)]
            return jnp.concatenate(per_sample).mean()

        loss_ref, grads_ref = jax.jit(jax.value_and_grad(loss64))(
            jax.tree.map(lambda a: np.asarray(a, np.float64), params))
        assert abs(float(loss32) - float(loss_ref)) <= 1e-5 * float(loss_ref)
        flat = lambda tree: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])
        assert relative_error(flat(grads32), flat(grads_ref)) <= 1e-4
        for name in ("attn2", "norm2"):  # the text path gets its share of the gradient
            assert np.abs(flat(grads_ref["transformer_blocks"][name])).max() > 0


def test_pooled_text_model_equals_a_float64_forward_and_ignores_padding(text_setup):
    """model.pooled_text adds Linear(mean of the caption's unmasked T5 states) to the conditioning:
    the float32 model equals reference_velocity in float64 with that term, padded token states
    change nothing, and the term does change the output."""
    import dataclasses

    from pixelflow_jax.checkpoints.checkpoint import build_model

    model, config, text, encoder_params, _, (tokens, mask), _ = text_setup
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    width, hidden = config.model.cross_attention_dim, config.model.hidden_size
    params["text_pool_proj"] = {"kernel": rng.normal(0, 0.3, (width, hidden)).astype(np.float32),
                                "bias": rng.normal(0, 0.3, hidden).astype(np.float32)}
    pooled = build_model(dataclasses.replace(config, model=dataclasses.replace(config.model, pooled_text=True)), params)
    states = np.asarray(text.encode(encoder_params, tokens, mask)["encoder_hidden_states"])
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    t = rng.uniform(0, 1000, 8).astype(np.float32)
    forward = jax.jit(lambda m, states: m(x, t, encoder_hidden_states=states, encoder_attention_mask=mask))
    out = np.asarray(forward(pooled, states))
    with jax.enable_x64(True):
        reference = reference_velocity(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x.astype(np.float64),
                                       t.astype(np.float64), states.astype(np.float64), mask.astype(np.float64),
                                       config.model.num_attention_heads, config.model.patch_size)
    assert relative_error(out, np.asarray(reference)) <= 1e-5
    assert (mask == 0).any()
    garbage = np.where(mask[..., None] > 0, states, 1e3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(forward(pooled, garbage)), out, rtol=0, atol=1e-5)
    assert relative_error(np.asarray(forward(model, states)), out) > 1e-2
    # without a mask every token counts, as with a mask of ones: the mean of the states, not their sum
    masked_by = jax.jit(lambda m, states, mask: m(x, t, encoder_hidden_states=states, encoder_attention_mask=mask))
    unmasked = jax.jit(lambda m, states: m(x, t, encoder_hidden_states=states))
    all_ones = np.asarray(masked_by(pooled, states, np.ones_like(mask)))
    np.testing.assert_allclose(np.asarray(unmasked(pooled, states)), all_ones, rtol=0, atol=1e-5)



def test_a_pooled_text_model_takes_a_caption_with_every_token_masked():
    """The pooled mean of no tokens is 0 (the count is floored at 1), not 0 / 0: NaN in every block."""
    cfg = ModelConfig(num_attention_heads=2, attention_head_dim=8, depth=1, num_classes=0, cross_attention_dim=12,
                      pooled_text=True)
    model = PixelFlow(cfg, rngs=nnx.Rngs(0))
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = model(np.zeros((2, 8, 8, 3), np.float32), np.array([10.0, 500.0]),
                encoder_hidden_states=np.ones((2, 5, 12), np.float32), encoder_attention_mask=mask)
    assert np.isfinite(np.asarray(out)).all()


def build_text_step(model, config, text, encoder_params, mesh):
    step_cfg = StepConfig(lr=1e-3, caption_dropout=0.25)
    tx = make_optimizer(step_cfg)
    state = host_state(model, tx)
    shardings = state_shardings(state, mesh)
    from pixelflow_jax.sharding import param_shardings

    encoder_sharding = param_shardings(encoder_params, mesh)
    step = make_train_step(config.model, nnx.graphdef(model), StageTables.from_scheduler(PixelFlowScheduler()), tx,
                           step_cfg, 64, 1000, mesh, shardings, text=text, encoder_sharding=encoder_sharding)
    encoder = jax.device_put(jax.tree.map(np.asarray, encoder_params), encoder_sharding)  # host arrays: host_state
    return jax.device_put(state, shardings), encoder, step


@pytest.mark.slow
def test_text_step_on_eight_devices_equals_one_device_and_leaves_the_encoder_frozen(text_setup):
    """One step on 1 device and on 8 (4 data x 2 fsdp) gives the same loss and weights, leaves the
    encoder as it was, and moves no T5 embedding between devices: grouping the rows by stage after
    encoding them moved (B, L, d_model) float32 values each step; the step gathers the int32 tokens
    by stage instead and encodes the stages' rows where they are trained."""
    import re

    model, config, text, encoder_params, images, (tokens, mask), _ = text_setup
    # 32 rows: 8 per stage, so that each of the 8 devices trains a row of every stage.
    images, conditioning = np.tile(images, (4, 1, 1, 1)), (np.tile(tokens, (4, 1)), np.tile(mask, (4, 1)))
    results = []
    for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 2)):
        mesh = mesh_of(devices, fsdp)
        state, encoder, step = build_text_step(model, config, text, encoder_params, mesh)
        if fsdp == 2:
            batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
            images, conditioning = jax.device_put((images, conditioning), batch)
            step = step.lower(state, images, conditioning, encoder).compile()
            types = re.findall(r"= (.*?) (?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                               r"(?:-start)?\(", step.as_text())
            moved = [dims for t in types for dims in re.findall(r"f32\[(\d+),(\d+),(\d+)\]", t)
                     if dims[1:] == (str(TOKENS), "20")]
            assert types and not moved, moved  # rows of T5 states (n, 16 tokens, 20 wide)
        before = jax.tree.map(np.asarray, encoder)
        for _ in range(2):
            state, metrics = step(state, images, conditioning, encoder)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(encoder)):
            np.testing.assert_array_equal(a, np.asarray(b))  # frozen, and not donated
        if fsdp == 2:
            assert encoder["blocks"]["wi_0"]["kernel"].sharding.spec == P(None, None, "fsdp")
        results.append((float(metrics["loss"]),
                        np.concatenate([np.ravel(a) for a in jax.tree.leaves(state["params"])])))
    (loss_one, params_one), (loss_eight, params_eight) = results
    assert abs(loss_one - loss_eight) <= 1e-5 * loss_one
    assert relative_error(params_eight, params_one) <= 1e-5


def test_encoder_of_another_width_is_refused_before_training(tmp_path, encoder_folder):
    import configs.t2i as t2i
    from pixelflow_jax.training.train import train

    config = t2i.get_config("tiny")
    config.model.cross_attention_dim = 24
    config.train.batch_size = 32  # 4 stages x 8 devices
    config.train.text_encoder = encoder_folder
    with pytest.raises(ValueError, match=r"gives 20-wide embeddings but model.cross_attention_dim is 24"):
        train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_demo_encoder_is_built_anew_for_the_config_while_no_step_is_saved(tmp_path):
    """A first start that failed (before its first save) built the demo's encoder into the workdir:
    the corrected command, with another width or colour count, builds it anew; a run with a saved
    step keeps the encoder its cross-attention learned."""
    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.text.train_text import build_demo_encoder

    config = t2i.get_config("tiny")
    folder = str(tmp_path / "run" / demo_text_encoder.FOLDER_NAME)
    model_cfg = ModelConfig.from_mapping(config.model)
    width = lambda: json.loads(pathlib.Path(folder, "config.json").read_text())["d_model"]
    build_demo_encoder(config, model_cfg, folder, rebuild=True)  # nothing there yet
    assert width() == 20
    wider = dataclasses.replace(model_cfg, cross_attention_dim=32)
    build_demo_encoder(config, wider, folder, rebuild=False)  # steps saved: the learned encoder stays
    assert width() == 20
    build_demo_encoder(config, wider, folder, rebuild=True)
    assert width() == 32


@pytest.mark.parametrize("num_colours,num_images", [(100, 20_000), (10, 8)])
def test_the_demo_encoder_knows_every_word_of_its_captions(tmp_path, num_colours, num_images):
    """Its tokenizer stopped at 64 pieces: with 100 colours 52 hue numbers read as <unk>, colours the
    model could never learn; and a small set's first captions lack words later images, the previews
    and prompts use."""
    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.text.prompts import T5Tokenizer
    from pixelflow_jax.text.train_text import build_demo_encoder, unknown_demo_words

    config = t2i.get_config("tiny")
    config.data.update(demo_num_classes=num_colours, demo_num_images=num_images)
    folder = str(tmp_path / demo_text_encoder.FOLDER_NAME)
    build_demo_encoder(config, ModelConfig.from_mapping(config.model), folder, rebuild=True)
    assert unknown_demo_words(T5Tokenizer(folder), num_colours) == set()


def test_a_resume_with_more_demo_colours_than_its_encoder_knows_is_refused(tmp_path):
    """With train.allow_resume_changes a resume may change data.demo_num_classes, but the run's
    demo encoder keeps its word list: the new colours would all read as <unk> (fewer colours too:
    counts other than 10 name hues by degree). A resume with the count unchanged passes, even where
    the tokenizer never met every caption word."""
    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.text import train_text

    config = t2i.get_config("tiny")
    config.data.demo_num_images = 8  # its tokenizer learns the words of 8 captions only
    model_cfg, workdir = ModelConfig.from_mapping(config.model), tmp_path / "run"
    encoder = train_text.load(config, str(workdir), model_cfg, make_mesh(1), no_step_saved=True)  # for 10 colours
    assert encoder.record()["path"] == demo_text_encoder.FOLDER_NAME  # inside the run: found wherever it moves
    (workdir / "train_settings.json").write_text(json.dumps({"data.demo_num_classes": 10}))  # as the run recorded
    train_text.load(config, str(workdir), model_cfg, make_mesh(1), no_step_saved=False)  # a resume as it was
    config.data.demo_num_classes = 12  # "hue 0", "hue 30", ..., "hue 330"
    with pytest.raises(ValueError, match=r"text_encoder was built for data.demo_num_classes=10: the 12-colour "
                                         r"captions have words it does not know \(0, 120, 150, 180, 210, 240, 270, "
                                         r"30, 300, 330, 60, 90, hue\); resume with --config.data.demo_num_classes=10"):
        train_text.load(config, str(workdir), model_cfg, make_mesh(1), no_step_saved=False)
    config.data.demo_num_classes = 8  # fewer colours are named by hue too: "hue 45", ...
    with pytest.raises(ValueError, match=r"the 8-colour captions have words it does not know \(0, 135, .*, hue\)"):
        train_text.load(config, str(workdir), model_cfg, make_mesh(1), no_step_saved=False)


def test_the_training_encoder_computes_in_float32_for_a_bfloat16_model(tmp_path, encoder_folder):
    """As the release encodes prompts and as sampling does: a run's model sees the embeddings it
    will be sampled with."""
    import dataclasses

    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.text import train_text

    config = t2i.get_config("tiny")
    config.train.update(text_encoder=encoder_folder, text_encoder_dtype="bfloat16")
    model_cfg = dataclasses.replace(ModelConfig(**config.model.to_dict()), cross_attention_dim=20, dtype="bfloat16")
    encoder = train_text.load(config, str(tmp_path / "run"), model_cfg, make_mesh(1), no_step_saved=True)
    embeddings, _ = encoder.encode(["a red disk"])
    assert embeddings.dtype == jnp.float32
    # ... with the weights in train.text_encoder_dtype, which sampling the run reads back (fill_text_encoder)
    assert {leaf.dtype for leaf in jax.tree.leaves(encoder.params)} == {jnp.dtype(jnp.bfloat16)}


def test_the_training_encoder_records_its_fingerprint_and_reads_captions_at_the_runs_token_length(tmp_path,
                                                                                                  encoder_folder,
                                                                                                  caplog):
    """What run_config.json records of the encoder, the tokenizer of the loader's captions and the
    empty prompt of caption dropout, for a run with max_text_tokens=8 (the demo-built encoder_folder)."""
    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.text import train_text
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    config = t2i.get_config("tiny")
    config.train.update(text_encoder=encoder_folder, max_text_tokens=8)
    model_cfg = dataclasses.replace(ModelConfig(**config.model.to_dict()), cross_attention_dim=20)
    encoder = train_text.load(config, str(tmp_path / "run"), model_cfg, make_mesh(1), no_step_saved=True)
    assert encoder.record() == {"path": encoder_folder, "max_text_tokens": 8,
                                "fingerprint": folder_fingerprint(encoder_folder)}
    assert encoder.tokenizer.max_length == 8
    assert encoder.conditioning.empty_mask.tolist() == [1] + [0] * 7  # the empty prompt: </s> alone
    assert encoder.conditioning.empty_tokens.tolist() == [1] + [0] * 7
    previews = ["a red disk", "a teal disk", "a red disk in blue on a grey ground"]
    with caplog.at_level(logging.WARNING):  # the prompts the model will not read whole, as sampling says: once
        embeddings, mask = encoder.encode(previews)
        encoder.encode(previews)
    assert embeddings.shape == (3, 8, 20) and mask.dtype == jnp.float32
    assert np.asarray(mask)[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # a, red, disk, </s>
    assert caplog.text.count("prompt 'a teal disk' holds text the tokenizer does not know") == 1
    assert caplog.text.count("prompt 'a red disk in blue on a grey ground' is longer than 8 tokens and was cut") == 1
    assert "'a red disk'" not in caplog.text


def test_a_runs_encoder_is_recorded_absolute_as_a_hub_name_or_as_the_demos_own_folder(tmp_path, monkeypatch):
    """run_config.json names the encoder so that a run started from another folder finds it; only
    the demo's encoder, built inside the run, is named relative to the run."""
    from configs import t2i
    from pixelflow_jax.text.train_text import encoder_path

    monkeypatch.chdir(tmp_path)
    config = t2i.get_config("tiny")
    for given, recorded in (("t5", str(tmp_path / "t5")), ("gs://bucket/t5", "gs://bucket/t5"),
                            ("hf://google/flan-t5-xl", "hf://google/flan-t5-xl"), ("", demo_text_encoder.FOLDER_NAME)):
        config.train.text_encoder = given
        assert encoder_path(config) == recorded
    config.data.source = "array_record"  # the demo's encoder would not know the words of one's own captions
    with pytest.raises(ValueError, match="trains with a frozen T5 encoder: set --config.train.text_encoder"):
        encoder_path(config)


def test_a_tokenizer_with_more_pieces_than_the_encoders_vocabulary_is_refused_before_training(tmp_path,
                                                                                            encoder_folder):
    import shutil

    import configs.t2i as t2i
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.text import train_text

    folder = shutil.copytree(encoder_folder, tmp_path / "t5")
    hf_config = json.loads((folder / "config.json").read_text())
    pieces = T5Tokenizer(encoder_folder).processor.get_piece_size()
    (folder / "config.json").write_text(json.dumps({**hf_config, "vocab_size": pieces - 1}))
    config = t2i.get_config("tiny")
    config.train.text_encoder = str(folder)
    model_cfg = dataclasses.replace(ModelConfig(**config.model.to_dict()), cross_attention_dim=20)
    with pytest.raises(CheckpointError, match=f"spiece.model has {pieces} pieces but config.json's vocab_size is "
                                              f"{pieces - 1}: the tokenizer and the weights are of different models"):
        train_text.load(config, str(tmp_path / "run"), model_cfg, make_mesh(1), no_step_saved=True)


def test_a_text_run_given_as_the_text_encoder_names_the_encoder_it_trains_with(tmp_path, encoder_folder):
    """--config.train.text_encoder=RUN said only 'RUN has no config.json', and
    --config.sample.text_encoder=RUN only 'RUN has no spiece.model'."""
    import shutil

    import configs.t2i as t2i
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.text import train_text
    from pixelflow_jax.text.prompts import PromptEncoder

    config = t2i.get_config("tiny")
    model_cfg = dataclasses.replace(ModelConfig(**config.model.to_dict()), cross_attention_dim=20)
    run = tmp_path / "demo_run"  # the demo's encoder, built inside the run
    shutil.copytree(encoder_folder, run / "text_encoder")
    for recorded, encoder in (("text_encoder", run / "text_encoder"), ("/encoders/t5", "/encoders/t5")):
        (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": recorded, "max_text_tokens": 8}}))
        config.train.text_encoder = str(run)
        with pytest.raises(CheckpointError, match=re.escape(
                f"{run} has no config.json: it is a text-to-image training run, not a T5 folder: pass the text "
                f"encoder it records, {encoder}")):
            train_text.load(config, str(tmp_path / "new"), model_cfg, make_mesh(1), no_step_saved=True)
        with pytest.raises(CheckpointError, match=re.escape(
                f"{run} has no spiece.model (the T5 sentencepiece model): it is a text-to-image training run, not a "
                f"T5 folder: pass the text encoder it records, {encoder}")):
            PromptEncoder(str(run))  # a sampling job's sample.text_encoder
    # a class run: no encoder to name; nor in a run_config.json damaged or of another shape (the usual
    # refusal, not a traceback from the hint)
    for record in (json.dumps({"architecture": {}}), "{", "[]", json.dumps({"text_encoder": {"path": None}}),
                   json.dumps({"text_encoder": "text_encoder"})):
        (run / "run_config.json").write_text(record)
        with pytest.raises(CheckpointError, match="has no config.json: pass a Hugging Face T5 model folder"):
            train_text.load(config, str(tmp_path / "new"), model_cfg, make_mesh(1), no_step_saved=True)
        with pytest.raises(CheckpointError, match="has no spiece.model .*: pass the Hugging Face T5 folder as "
                                                  "downloaded"):
            PromptEncoder(str(run))


def test_a_fine_tune_or_a_resume_trains_with_the_encoder_its_run_trained_with(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from configs import t2i
    from pixelflow_jax.text.train_text import fill_encoder_of_runs

    init_run, resumed, failed_start = tmp_path / "init", tmp_path / "resumed", tmp_path / "failed_start"
    t5 = str(tmp_path / "encoders" / "t5")
    for run, path in ((init_run, "text_encoder"), (resumed, t5),  # the demo's own; another folder
                      (failed_start, t5)):
        run.mkdir()
        (run / path).mkdir(parents=True, exist_ok=True)  # (t5, absolute, is made where it says)
        (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": path, "max_text_tokens": 8}}))
    (resumed / "checkpoints" / "10").mkdir(parents=True)  # a saved step: the encoder it records was trained with
    source = SimpleNamespace(run_step=SimpleNamespace(run=str(init_run)))

    config = t2i.get_config("tiny")
    fill_encoder_of_runs(config, str(tmp_path / "new"), source)
    assert config.train.text_encoder == str(init_run / "text_encoder")
    config = t2i.get_config("tiny")
    config.train.text_encoder = str(tmp_path / "other_t5")
    with pytest.raises(ValueError, match="trained with the text encoder .*init/text_encoder.* drop "
                                         "--config.train.text_encoder"):
        fill_encoder_of_runs(config, str(tmp_path / "new"), source)
    monkeypatch.chdir(tmp_path)
    config.train.text_encoder = "init/text_encoder"  # the init run's own, spelled relative (a record of no fingerprint)
    fill_encoder_of_runs(config, str(tmp_path / "new"), source)
    config = t2i.get_config("tiny")
    release_format = SimpleNamespace(run_step=None, label="pixelflow_t2i")  # no record of its encoder
    with pytest.raises(ValueError, match="pixelflow_t2i is a text-to-image checkpoint that does not record its text "
                                         "encoder: set --config.train.text_encoder"):
        fill_encoder_of_runs(config, str(tmp_path / "new"), release_format)
    config = t2i.get_config("tiny")
    fill_encoder_of_runs(config, str(resumed))
    assert config.train.text_encoder == t5
    config = t2i.get_config("tiny")
    fill_encoder_of_runs(config, str(failed_start))  # no step saved: its record steers no corrected command
    assert config.train.text_encoder == ""
    config = t2i.get_config("tiny")
    fill_encoder_of_runs(config, str(init_run))  # the demo's encoder inside its run: found as before
    assert config.train.text_encoder == ""


def test_a_resume_or_fine_tune_whose_recorded_encoder_is_gone_names_the_record_and_the_flag(tmp_path):
    """The encoder a run records, moved away since, was refused by the T5 load as "T5 folder PATH does not
    exist: pass a Hugging Face T5 folder ...", a folder the user never passed, without the flag that
    gives its new place. One in a bucket or on the Hub is not looked for on this disk."""
    from types import SimpleNamespace

    from configs import t2i
    from pixelflow_jax.text.train_text import fill_encoder_of_runs

    run, gone = tmp_path / "run", str(tmp_path / "moved_away")
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": gone, "max_text_tokens": 8}}))
    fix = "(moved?): set --config.train.text_encoder to where that T5 folder is now"
    with pytest.raises(ValueError, match=re.escape(f"{run / 'run_config.json'} names the text encoder this run trains "
                                                   f"with, {gone}, which does not exist {fix}")):
        fill_encoder_of_runs(t2i.get_config("tiny"), str(run))
    source = SimpleNamespace(run_step=SimpleNamespace(run=str(run)))
    with pytest.raises(ValueError, match=re.escape(f"--config.train.init_from {run}: its run_config.json names the "
                                                   f"text encoder it trained with, {gone}, which does not exist {fix}")):
        fill_encoder_of_runs(t2i.get_config("tiny"), str(tmp_path / "new"), source)
    (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": "gs://b/t5", "max_text_tokens": 8}}))
    config = t2i.get_config("tiny")
    fill_encoder_of_runs(config, str(tmp_path / "new"), source)
    assert config.train.text_encoder == "gs://b/t5"


def test_a_fine_tune_takes_its_init_runs_encoder_found_elsewhere_by_its_fingerprint_only(tmp_path, encoder_folder):
    """The init run recorded its encoder's fingerprint: a copy at another path is the same encoder,
    while an encoder of other weights (the same shapes and files) is refused, not trained on."""
    import shutil
    from types import SimpleNamespace

    from configs import t2i
    from pixelflow_jax.text.t5_convert import folder_fingerprint
    from pixelflow_jax.text.train_text import fill_encoder_of_runs

    init_run, copy, other = tmp_path / "init", str(tmp_path / "copy"), str(tmp_path / "other")
    init_run.mkdir()
    record = {"path": encoder_folder, "max_text_tokens": 8, "fingerprint": folder_fingerprint(encoder_folder)}
    (init_run / "run_config.json").write_text(json.dumps({"text_encoder": record}))
    source = SimpleNamespace(run_step=SimpleNamespace(run=str(init_run)))
    shutil.copytree(encoder_folder, copy)
    shutil.copytree(encoder_folder, other)
    with open(os.path.join(other, "model.safetensors"), "r+b") as f:  # other weights, the same size
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x7f" * 64)
    config = t2i.get_config("tiny")
    config.train.text_encoder = copy
    fill_encoder_of_runs(config, str(tmp_path / "new"), source)
    assert config.train.text_encoder == copy
    config.train.text_encoder = other
    with pytest.raises(ValueError, match="trained with the text encoder .* drop --config.train.text_encoder"):
        fill_encoder_of_runs(config, str(tmp_path / "new"), source)


def test_sampling_a_text_run_with_another_encoder_than_it_trained_with_is_named(tmp_path, caplog):
    import logging

    from configs import t2i
    from pixelflow_jax.api import CheckpointSource, fill_text_encoder
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": "text_encoder", "max_text_tokens": 8}}))
    source = CheckpointSource(str(run / "checkpoints" / "4"), "the run", RunStep(str(run), 4))
    with pytest.raises(CheckpointError, match=r"run_config.json names the text encoder the run trained with, "
                                              r".*text_encoder, which does not exist \(moved\?\): set "
                                              r"--config.sample.text_encoder to where"):
        fill_text_encoder(t2i.get_config("tiny").sample, source)
    (run / "text_encoder").mkdir()
    for text_encoder, tokens, warned in (("", 0, False), (str(tmp_path / "other_t5"), 0, True), ("", 16, True)):
        sample = t2i.get_config("tiny").sample
        sample.text_encoder, sample.max_text_tokens = text_encoder, tokens
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fill_text_encoder(sample, source)
        assert ("it trained with" in caplog.text) == warned, caplog.text
    assert sample.text_encoder == str(run / "text_encoder") and sample.max_text_tokens == 16
    assert sample.text_encoder_param_dtype == "float32"  # the run recorded no encoder dtype

    # A run whose frozen encoder had bfloat16 weights trained on their embeddings: its sampling uses
    # them too (it used float32 weights, and other embeddings), unless told otherwise.
    (run / "train_settings.json").write_text(json.dumps({"train.text_encoder_dtype": "bfloat16"}))
    for asked, used in (("", "bfloat16"), ("float32", "float32")):
        sample = t2i.get_config("tiny").sample
        sample.text_encoder_param_dtype = asked
        fill_text_encoder(sample, source)
        assert sample.text_encoder_param_dtype == used
    sample = t2i.get_config("tiny").sample
    fill_text_encoder(sample, CheckpointSource(str(tmp_path / "release"), "a release folder", None))
    assert sample.text_encoder_param_dtype == "float32"


def test_sampling_a_text_run_whose_encoder_is_in_a_bucket_or_on_the_hub_is_not_looked_for_on_this_disk(tmp_path):
    """Only a local folder can be told moved here; a gs:// or hf:// encoder is fetched where it loads
    (a gs:// one refused as 'does not exist (moved?)' passed: every recorded encoder tested was local)."""
    from configs import t2i
    from pixelflow_jax.api import CheckpointSource, fill_text_encoder
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep

    run = tmp_path / "run"
    run.mkdir()
    source = CheckpointSource(str(run / "checkpoints" / "4"), "the run", RunStep(str(run), 4))
    for recorded in ("gs://bucket/t5", "hf://google/flan-t5-xl"):
        (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": recorded, "max_text_tokens": 8}}))
        sample = t2i.get_config("tiny").sample
        fill_text_encoder(sample, source)
        assert (sample.text_encoder, sample.max_text_tokens) == (recorded, 8)


def test_sampling_a_text_run_with_another_encoder_of_the_same_width_warns_unlike_with_a_copy(tmp_path, encoder_folder,
                                                                                           caplog, monkeypatch):
    """A run that recorded its encoder's fingerprint: a copy of that encoder at another path samples
    without a word, while another encoder of the same width (which loads without complaint) was
    named only by its path, as a moved copy was: now its files are said to differ."""
    import logging
    import shutil

    from configs import t2i
    from pixelflow_jax.api import CheckpointSource, fill_text_encoder
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    run, copy, other = tmp_path / "run", str(tmp_path / "copy"), str(tmp_path / "other")
    shutil.copytree(encoder_folder, run / "text_encoder")
    record = {"path": "text_encoder", "max_text_tokens": 8, "fingerprint": folder_fingerprint(encoder_folder)}
    (run / "run_config.json").write_text(json.dumps({"text_encoder": record}))
    shutil.copytree(encoder_folder, copy)
    shutil.copytree(encoder_folder, other)
    with open(os.path.join(other, "model.safetensors"), "r+b") as f:  # other weights, the same size
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x7f" * 64)
    source = CheckpointSource(str(run / "checkpoints" / "4"), "the run", RunStep(str(run), 4))

    def warnings_sampling_with(text_encoder):
        sample = t2i.get_config("tiny").sample
        sample.text_encoder = text_encoder
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fill_text_encoder(sample, source)
        return caplog.text

    for text_encoder, expected in (("", None), (copy, None), (other, "whose files are not those of the encoder it "
                                                                     "trained with"),
                                   (str(tmp_path / "no_t5_here"), "; it trained with")):
        warned = warnings_sampling_with(text_encoder)
        assert (expected in warned) if expected else "it trained with" not in warned, warned

    # A run that recorded no fingerprint (before it was recorded) cannot tell a copy from another
    # encoder: another folder is named by its path alone, never said to hold other files; the
    # run's own folder given by a relative path is that folder.
    (run / "run_config.json").write_text(json.dumps({"text_encoder": {**record, "fingerprint": None}}))
    monkeypatch.chdir(tmp_path)
    for text_encoder, expected in (("run/text_encoder", None), (copy, "; it trained with"),
                                   (other, "; it trained with")):
        warned = warnings_sampling_with(text_encoder)
        assert (expected in warned) if expected else "it trained with" not in warned, warned
        assert "whose files are not those" not in warned, warned


def test_sampling_a_text_run_with_a_broken_t5_folder_leaves_the_refusal_to_the_encoders_load(tmp_path, encoder_folder,
                                                                                              caplog):
    """A folder given as the encoder that cannot be fingerprinted (here: no spiece.model) is named by
    its path, as a folder of no fingerprint is; what it lacks is said where the encoder loads, not
    as a FileNotFoundError of the fingerprint's reads."""
    import logging
    import shutil

    from configs import t2i
    from pixelflow_jax.api import CheckpointSource, fill_text_encoder
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep
    from pixelflow_jax.text.prompts import PromptEncoder
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    run, broken = tmp_path / "run", tmp_path / "broken_t5"
    shutil.copytree(encoder_folder, run / "text_encoder")
    record = {"path": "text_encoder", "max_text_tokens": 8, "fingerprint": folder_fingerprint(encoder_folder)}
    (run / "run_config.json").write_text(json.dumps({"text_encoder": record}))
    shutil.copytree(encoder_folder, broken)
    os.remove(broken / "spiece.model")
    sample = t2i.get_config("tiny").sample
    sample.text_encoder = str(broken)
    with caplog.at_level(logging.WARNING):
        fill_text_encoder(sample, CheckpointSource(str(run / "checkpoints" / "4"), "the run", RunStep(str(run), 4)))
    assert f"sampling the run with the text encoder {broken}; it trained with {run / 'text_encoder'}" in caplog.text
    with pytest.raises(CheckpointError, match=re.escape(f"{broken} has no spiece.model")):
        PromptEncoder(str(broken))


def test_sampling_a_text_run_at_another_token_length_warns_with_both_lengths(tmp_path, encoder_folder, caplog):
    """Its own encoder at another max_text_tokens is allowed (a longer prompt), but the embeddings
    are not those it trained on: said with both lengths; its own length, or 0 (the recorded one),
    samples without a word."""
    import logging
    import shutil

    from configs import t2i
    from pixelflow_jax.api import CheckpointSource, fill_text_encoder
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep

    run = tmp_path / "run"
    shutil.copytree(encoder_folder, run / "text_encoder")
    (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": "text_encoder", "max_text_tokens": 8}}))
    source = CheckpointSource(str(run / "checkpoints" / "4"), "the run", RunStep(str(run), 4))
    for tokens, warned in ((0, False), (8, False), (4, True), (16, True)):  # shorter too: other embeddings
        sample = t2i.get_config("tiny").sample
        sample.max_text_tokens = tokens
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fill_text_encoder(sample, source)
        assert ("text tokens; it trained with" in caplog.text) == warned, caplog.text
    assert "sampling the run with 16 text tokens; it trained with 8 tokens" in caplog.text


def test_a_run_resumes_with_its_encoder_found_at_another_path_or_with_another_token_length(tmp_path, encoder_folder):
    """A run recorded its encoder by path only: a folder moved (another machine's download), or the
    run's own folder spelled absolute, was 'a different model', and an allowed max_text_tokens
    change was offered then refused. The folder's fingerprint names the encoder now."""
    import shutil

    from configs import t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.text.t5_convert import folder_fingerprint
    from pixelflow_jax.training.run_config import check_run_config

    config = t2i.get_config("tiny")
    model_cfg = ModelConfig(**config.model.to_dict())
    workdir = str(tmp_path / "run")
    moved = str(tmp_path / "moved_t5")
    shutil.copytree(encoder_folder, moved)
    fingerprint = folder_fingerprint(encoder_folder)
    assert folder_fingerprint(moved) == fingerprint
    first = {"path": encoder_folder, "max_text_tokens": 8, "fingerprint": fingerprint}
    check_run_config(workdir, model_cfg, config, first)  # records the run
    os.makedirs(os.path.join(workdir, "checkpoints", "10"))  # a saved step: the run holds to its encoder

    def recorded():
        return json.load(open(os.path.join(workdir, "run_config.json")))["text_encoder"]

    for current in ({**first, "path": moved}, {**first, "path": moved, "max_text_tokens": 16}):
        check_run_config(workdir, model_cfg, config, record=False)
        check_run_config(workdir, model_cfg, config, current)
        assert recorded() == current
    with open(os.path.join(moved, "model.safetensors"), "r+b") as f:  # other weights, the same size
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x7f" * 64)
    other = {**first, "path": moved, "fingerprint": folder_fingerprint(moved)}
    assert other["fingerprint"] != fingerprint
    with pytest.raises(ValueError, match="holds a run of a different model"):
        check_run_config(workdir, model_cfg, config, {**other, "path": str(tmp_path / "elsewhere")})
    with pytest.raises(ValueError, match="moved_t5 changed since the run recorded it .*allow_resume_changes=True"):
        check_run_config(workdir, model_cfg, config, other)  # the same folder, other contents
    config.train.allow_resume_changes = True  # "the weights are the same"
    check_run_config(workdir, model_cfg, config, other)
    assert recorded() == other
    config.train.allow_resume_changes = False
    with open(os.path.join(moved, "config.json")) as f:  # transformers re-saving it: the same encoder
        hf_config = json.load(f)
    with open(os.path.join(moved, "config.json"), "w") as f:
        json.dump({**hf_config, "transformers_version": "9.9.9"}, f, indent=4)
    assert folder_fingerprint(moved) == other["fingerprint"]

    # A run recorded before fingerprints: compared by path, and its record gains the fingerprint.
    old = {"path": encoder_folder, "max_text_tokens": 8}
    with open(os.path.join(workdir, "run_config.json")) as f:
        run_config = json.load(f)
    with open(os.path.join(workdir, "run_config.json"), "w") as f:
        json.dump({**run_config, "text_encoder": old}, f)
    check_run_config(workdir, model_cfg, config, first)
    assert recorded() == first


def test_init_from_across_class_and_text_models_names_the_kinds(converted, monkeypatch):
    from configs import c2i, t2i
    from pixelflow_jax import api
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training.train import load_init_from

    def weights_read(*_, **__):
        raise AssertionError("the weights were read before the kinds were compared")

    monkeypatch.setattr(api, "read_checkpoint", weights_read)

    for config_module, checkpoint, kinds in ((c2i, "t2i_tiny", "a text-to-image checkpoint and this config trains a "
                                                               "class-conditional model"),
                                             (t2i, "c2i_tiny", "a class-conditional checkpoint and this config trains "
                                                               "a text-to-image model")):
        config = config_module.get_config("tiny")
        config.train.init_from = converted[checkpoint]
        with pytest.raises(ValueError, match=kinds):
            load_init_from(config, ModelConfig(**config.model.to_dict()))


def test_a_fine_tune_at_another_caption_length_than_its_run_trained_with_is_warned(tmp_path, caplog):
    """A text run trained with max_text_tokens=8 fine-tuned under a config of 16 (or the reverse) went on
    without a word. No weight is shaped by the length (the fine-tune runs), but the captions it now reads
    are longer, or cut shorter, than those it learned from."""
    from configs import t2i
    from pixelflow_jax.training import train
    from pixelflow_jax.training.run_config import check_run_config

    config = t2i.get_config("tiny")
    model_cfg = ModelConfig.from_mapping(config.model)
    run = tmp_path / "run"
    check_run_config(str(run), model_cfg, config, {"path": "gs://b/t5", "max_text_tokens": 8})
    (run / "checkpoints" / "10").mkdir(parents=True)
    config.train.init_from = str(run)
    keep = "set --config.train.max_text_tokens=8 to keep its length"
    for tokens, read in ((16, "captions up to 16 tokens, longer than the 8 it learned from"),
                         (4, "captions cut to 4 tokens, shorter than the 8 it learned from")):
        config.train.max_text_tokens = tokens
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train.check_init_from(config, model_cfg)
        assert (f"train.init_from {run / 'checkpoints' / '10'} trained with train.max_text_tokens 8 and this run trains with {tokens}: "
                "no weight of the model is shaped by the caption length") in caplog.text, caplog.text
        assert f"so it fine-tunes on {read}; {keep}" in caplog.text, caplog.text
    config.train.max_text_tokens = 8
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.check_init_from(config, model_cfg)
    assert not caplog.text


def test_a_fine_tune_missing_its_text_encoder_is_refused_before_the_weights_are_read(converted, tmp_path,
                                                                                    monkeypatch):
    from configs import t2i
    from pixelflow_jax import api
    from pixelflow_jax.training import train

    def weights_read(*_, **__):
        raise AssertionError("the weights were read before the text encoder was checked")

    monkeypatch.setattr(api, "read_checkpoint", weights_read)
    config = t2i.get_config("tiny")
    config.train.update(init_from=converted["t2i_tiny"], batch_size=32)
    with pytest.raises(ValueError, match="does not record its text encoder: set --config.train.text_encoder"):
        train.train(config, str(tmp_path / "tune"))


def test_a_text_run_on_own_data_names_every_missing_setting_at_once(tmp_path):
    """configs/t2i.py as it stands, on one's own data, needs the data folder, the T5 encoder and
    the previews' prompts: one error names all three (they came one rerun at a time), before
    anything is written; captionless TFDS is named first."""
    import configs.t2i as t2i
    from pixelflow_jax.training.train import train

    config = t2i.get_config("")
    config.train.batch_size = 32
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^this run needs 3 more settings: --config.data.root, the folder of "
                                         r"captioned images.*; --config.train.text_encoder, .*; "
                                         r"--config.sample.prompts or --config.sample.prompts_file, "
                                         r"the prompts of the previews"):
        train(config, workdir)
    config.data.root, config.train.preview_every = str(tmp_path), 0
    with pytest.raises(ValueError, match=r"^this run needs 1 more setting: --config.train.text_encoder"):
        train(config, workdir)
    config.data.update(source="tfds", root="")  # (with data.root, the root TFDS does not read is named first)
    with pytest.raises(ValueError, match=r"^--config.data.source 'tfds' has no captions"):
        train(config, workdir)
    assert not os.path.exists(workdir)


def test_a_text_runs_previews_on_own_data_draw_preview_num_images_cycling_over_the_prompts(tmp_path, monkeypatch):
    """Every line of sample.prompts_file was one preview batch (a file of 1,000 prompts, 1,000 images
    at each preview), whatever train.preview_num_images said. The prompts are read once, when the run
    starts."""
    import configs.t2i as t2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.model import PixelFlow
    from pixelflow_jax.training import train

    config = t2i.get_config("tiny")
    config.data.source, config.train.preview_num_images = "folder", 5
    (tmp_path / "prompts.txt").write_text("a red disk\na blue square\n")
    config.sample.prompts_file = str(tmp_path / "prompts.txt")
    model_cfg = ModelConfig.from_mapping(config.model)
    graphdef, ema = nnx.split(PixelFlow(model_cfg, rngs=nnx.Rngs(0)))
    asked = []

    class Sampler:  # what write_preview asks of the sampler, without sampling
        def __init__(self, model, checkpoint_config):
            pass

        def generate_from_prompts(self, encoder, prompts, **options):
            asked.extend(prompts)
            return np.zeros((len(prompts), 8, 8, 3), np.uint8)

    monkeypatch.setattr(train, "CascadeSampler", Sampler)
    log = type("Log", (), {"image": lambda self, *args: None})()
    prompts = train.own_preview_prompts(config)  # as the run reads them when it starts
    # Read once: a prompts file removed (or edited) while the run trains stopped it at its next preview,
    # losing the steps since its last checkpoint.
    (tmp_path / "prompts.txt").unlink()
    for step in (2, 4):
        assert train.write_preview(config, model_cfg, graphdef, ema, str(tmp_path), step, log, text_encoder=object(),
                                   prompts=prompts) == {}
        assert asked == ["a red disk", "a blue square"] * 2 + ["a red disk"]
        asked.clear()


def test_a_text_run_on_own_data_previews_the_prompts_it_read_when_it_started(tmp_path, monkeypatch, encoder_folder):
    """train() reads the preview prompts once and hands them to every preview: a prompts file removed
    (or edited) while the run trained stopped it at its next preview. The loop runs with
    StandInLoop's stand-in step and preview."""
    import configs.t2i as t2i
    from test_train import StandInLoop

    loop = StandInLoop(monkeypatch)
    config = t2i.get_config("tiny")
    config.scheduler.num_stages, config.data.resolution = 2, 16
    config.train.update(batch_size=16, keep_checkpoints=5, num_steps=2, checkpoint_every=2, preview_every=1,
                        preview_num_images=3, text_encoder=encoder_folder)
    (tmp_path / "data").mkdir()
    for i in range(4):
        write_image(tmp_path / "data" / f"{i}.png", i)
        (tmp_path / "data" / f"{i}.txt").write_text(captioned_demo_image(i).caption)
    config.data.update(source="folder", root=str(tmp_path / "data"))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red disk\na blue square\n")
    config.sample.prompts_file = str(prompts_file)
    preview = loop.train.write_preview

    def preview_then_edit(*args, **kwargs):  # the file edited, then removed, while the run trains
        prompts_file.write_text("a green ring\n") if len(loop.previews) == 0 else prompts_file.unlink(missing_ok=True)
        return preview(*args, **kwargs)

    monkeypatch.setattr(loop.train, "write_preview", preview_then_edit)
    from pixelflow_jax.sampling import sample_conditioning

    reads, read_prompts_file = [], sample_conditioning.read_prompts_file
    monkeypatch.setattr(sample_conditioning, "read_prompts_file",
                        lambda path: reads.append(path) or read_prompts_file(path))
    loop.run(config, tmp_path / "run")
    assert loop.previews == [1, 2]
    assert loop.preview_prompts == [["a red disk", "a blue square", "a red disk"]] * 2
    assert reads == [str(prompts_file)]  # once for the run: its check and its previews (and its warnings, once)
