"""Class-conditional training data as random-access sources: record i -> encoded bytes (or pixels),
label and a name for messages. An image folder (root/<class>/**/<image>, class ids from sorted
folder names, kept in the run's class_index.json once trained), a built TFDS dataset (ArrayRecord),
or the demo set; captioned sources are in caption_data.py. Opening a source finds a missing or
unusable dataset, so a run does it before it writes anything.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import os
import re
import unicodedata

import jax
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.error_text import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
CLASS_INDEX_FILE = "class_index.json"


class DataError(RuntimeError):
    """The dataset cannot be used as configured; the message names the path and the fix."""


# ArrayRecord's reader opens gs:// objects itself (ranged reads with the machine's Google
# credentials) from array-record 0.8.3 on; older versions take the URL for a local file name.
ARRAY_RECORD_READS_GCS_FROM = (0, 8, 3)


def installed_array_record_version() -> str | None:
    try:
        return importlib.metadata.version("array-record")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_array_record_reads(path: str) -> None:
    """Stops a run whose ArrayRecord files are in a bucket when the installed reader cannot open them."""
    if not storage.is_url(path):
        return
    version = installed_array_record_version()
    if version is None or tuple(int(n) for n in re.findall(r"\d+", version)[:3]) < ARRAY_RECORD_READS_GCS_FROM:
        installed = f"array-record {version} reads only local files" if version else "array-record is not installed"
        raise DataError(f"{path} is in a bucket, but {installed}; install array-record>="
                        f"{'.'.join(map(str, ARRAY_RECORD_READS_GCS_FROM))} (pip install -r requirements.txt), "
                        "or copy the files to a local disk")


def ignored_name(name: str) -> bool:
    """Hidden files and folders (macOS's ._x.jpg and .DS_Store, .ipynb_checkpoints, .Trash), a
    file system's lost+found and the __MACOSX folder of a zip made on a Mac (its ._ copies) hold no
    training data."""
    return name.startswith(".") or name in ("lost+found", "__MACOSX")


def read_with_folder(path: str, root: str) -> bool:
    """Whether `path` is folder `root` or lies where a folder source reads inside it (not below a
    hidden or ignored folder): a run's or a pack's output there would become data."""
    root, path = storage.resolved(root), storage.resolved(path)
    if path == root:
        return True
    if not storage.is_inside(path, root):
        return False
    return not any(ignored_name(part) for part in path[len(root.rstrip("/")) + 1:].split("/"))


def walk_files(root: str, above: tuple[str, ...] = (), unlisted: list[str] | None = None) -> list[str]:
    """Every file under root (any depth) as a full path, in a fixed order (a folder's files sorted,
    then its sub-folders' in sorted order), leaving out ignored names. Symbolic links are followed;
    one back to a folder above it (`above`: their real paths) is refused. Entries of a local folder
    that are neither files nor folders (links to nothing, sockets) are left out, and added to
    `unlisted` when it is given, so the caller can say so once."""
    if not storage.is_url(root):
        real = os.path.realpath(root)
        if real in above:
            link = next((p for p in parents_and_self(root) if leads_back(p)), root)
            raise DataError(f"{link} is a symbolic link to {os.path.realpath(link)}, a folder that holds it: reading "
                            "it would never end; remove the link")
        above += (real,)
    others: list[str] = []
    files, folders = storage.list_entries(root, others)
    if unlisted is not None:
        unlisted += [os.path.join(root, name) for name in others if not ignored_name(name)]
    paths = [storage.join(root, name) for name in files if not ignored_name(name)]
    for folder in folders:
        if not ignored_name(folder):
            paths += walk_files(storage.join(root, folder), above, unlisted)
    return paths


def warn_unlisted(root: str, unlisted: list[str]) -> None:
    """One warning for the entries under root walk_files left out as neither files nor folders."""
    if unlisted:
        example = unlisted[0]
        what = (f"a symbolic link to {os.readlink(example)}, which does not exist" if os.path.islink(example)
                else "not a regular file")
        logging.warning("%d entries under %s are not read: they are neither files nor folders, e.g. %s (%s); "
                        "mend or remove them", len(unlisted), root, example, what)


def parents_and_self(path: str) -> list[str]:
    """path, then each folder above it: a/b/c, a/b, a."""
    paths = [path]
    while (parent := os.path.dirname(paths[-1])) not in ("", paths[-1]):
        paths.append(parent)
    return paths


def leads_back(path: str) -> bool:
    """Whether path is a symbolic link to a folder that holds it (the link a walk loops through)."""
    if not os.path.islink(path):
        return False
    target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
    return here == target or storage.is_inside(here, target)


def listing_fingerprint(root: str, rows) -> str:
    """A short hash of a dataset's listing (each row: a file's path, what it trains as): a resume on
    the same number of records whose files were renamed, or moved to another class, is another
    data order, and another labelling."""
    # Paths relative to the root: a moved root is the same.
    text = "\n".join("\t".join(value.removeprefix(root).lstrip("/") if isinstance(value, str) else str(value)
                               for value in row) for row in rows)
    # surrogateescape: file names that are not UTF-8 (zip archives from Windows) hash as their bytes.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def require_folder(root: str, message: str) -> None:
    """Raises DataError(message) unless root is a folder. storage.isdir answers False for a bucket
    it cannot reach (gcsfs swallows the error), so exists() asks first: it raises that StorageError."""
    if not storage.exists(root):
        if missing_bucket := storage.missing_bucket_words(root):  # a typo in the bucket's name, not the folder's
            raise DataError(f"{root} {missing_bucket}; {message.split('; ', 1)[-1]}")
        raise DataError(message)
    if not storage.isdir(root):
        raise DataError(f"{root} is a file, not a folder: {message.split('; ', 1)[-1]}")


def captions_hint(not_images: list[str], images: list[str]) -> str:
    """Where files an image folder does not read are captions beside their images (NAME.txt beside
    NAME.jpg, a captioned folder given to a class config): the config that reads them; else ''."""
    from pixelflow_jax.data.caption_data import CAPTION_EXTENSION

    stems = {os.path.splitext(path)[0] for path in images}
    captions = [path for path in not_images if os.path.splitext(path)[1].lower() == CAPTION_EXTENSION
                and os.path.splitext(path)[0] in stems]
    if not captions:
        return ""
    return (f"; {len(captions)} of them are captions beside their images (NAME{CAPTION_EXTENSION} beside NAME.jpg), "
            "which a class-conditional model does not read: a text-to-image model trains on them, "
            "--config=configs/t2i.py")


def refuse_class_links_to_nothing(root: str, others: list[str]) -> None:
    """A link to nothing among the class folders (one to a disk not mounted) is an error: left out,
    every class after it would train under the id one lower."""
    links = [name for name in others if os.path.islink(os.path.join(root, name))]
    if links:
        link = os.path.join(root, links[0])
        raise DataError(f"{link} is a symbolic link to {os.readlink(link)}, which does not exist: a class folder that "
                        "cannot be read (its class id would go to the next folder). Mend the link (mount the disk it "
                        f"leads to) or remove it{f' ({len(links)} such links in {root})' if len(links) > 1 else ''}")


# Folder names a dataset's splits go by: a root whose only "classes" these are is the dataset's top folder.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval")


def training_split(splits: list[str]) -> str:
    """Of a dataset's split folders, the one to train on: train (or training), else the first."""
    return next((name for name in splits if name.lower() in ("train", "training")), splits[0])


def refuse_split_folders(root: str, classes: list[str]) -> None:
    """A dataset's top folder (ROOT/train/<class>/, ROOT/val/<class>/) given as the image folder
    is an error naming ROOT/train: class folders are read at any depth, so it would train a model
    of classes "train" and "val", the validation images among them. Class folders that only bear
    such names hold images themselves, and train."""
    if not classes or not all(name.lower() in SPLIT_NAMES for name in classes):
        return
    listings = {name: storage.list_entries(storage.join(root, name)) for name in classes}
    if any(any(file.lower().endswith(IMAGE_EXTENSIONS) for file in files) or not folders
           for files, folders in listings.values()):
        return
    split = training_split(classes)
    inner = [folder for folder in listings[split][1] if not ignored_name(folder)]
    raise DataError(f"{root}'s class folders {classes} are named like a dataset's splits and hold folders, not "
                    f"images: {root} looks like the dataset's top folder, with the class folders a level down. Set "
                    f"--config.data.root={storage.join(root, split)} (its class folders: {', '.join(inner[:10])}"
                    f"{', ...' if len(inner) > 10 else ''})")


class ImageFolderSource:
    """root/<class name>/**/<image>, like torchvision's ImageFolder: class ids from sorted folder
    names, each class folder read at any depth; hidden names and lost+found are left out."""

    def __init__(self, root: str, classes: list[str] | None = None, class_index: str = "the run's class index"):
        """`classes`: the ids a run fixed (in `class_index`, named in messages); None: the folders found."""
        if not root:
            raise DataError("--config.data.root is not set: set it to a folder of class subfolders "
                            "(root/<class>/<image>)")
        require_folder(root, f"image folder {root} does not exist; set --config.data.root to a folder of class "
                             "subfolders (root/<class>/<image>)")
        others: list[str] = []
        found = [name for name in storage.list_entries(root, others)[1] if not ignored_name(name)]
        # A link named like an image is a loose image (never read), not a class folder.
        refuse_class_links_to_nothing(root, [name for name in others if not ignored_name(name)
                                             and not name.lower().endswith(IMAGE_EXTENSIONS)])
        refuse_split_folders(root, found)
        self.classes = classes if classes is not None else found
        added, gone = sorted(set(found) - set(self.classes)), sorted(set(self.classes) - set(found))
        if added or gone:
            change = " and ".join(([f"has class folders {added} that {class_index} does not list"] if added else [])
                                  + ([f"lacks class folders {gone} that {class_index} lists"] if gone else []))
            nfc = lambda names: sorted(unicodedata.normalize("NFC", name) for name in names)
            respelled = (" (the names differ only in how their accented letters are encoded, NFC or NFD, as a "
                         "copy made on macOS can change them: rename the folders back)"
                         if added and nfc(added) == nfc(gone) else "")
            raise DataError(f"{root} {change}{respelled}: the run's checkpoints learned its class ids. Train on the "
                            "class folders it started with, or start a new --workdir")
        self.records: list[tuple[str, int]] = []
        empty, not_images = [], []
        unlisted: list[str] = []
        for label, name in enumerate(self.classes):
            files = walk_files(storage.join(root, name), unlisted=unlisted)
            images = [(path, label) for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
            not_images += [path for path in files if not path.lower().endswith(IMAGE_EXTENSIONS)]
            empty += [] if images else [name]
            self.records += images
        loose = [name for name in storage.list_files(root) if name.lower().endswith(IMAGE_EXTENSIONS)]
        warn_unlisted(root, unlisted)
        if not_images:
            logging.warning("%d files in the class folders of %s are not read (their names do not end in an image "
                            "extension: %s), e.g. %s%s", len(not_images), root, " ".join(IMAGE_EXTENSIONS),
                            not_images[0], captions_hint(not_images, [path for path, _ in self.records]))
        if loose and self.records:
            logging.warning("%d images in %s itself are not read (e.g. %s): a class's images go in %s/<class>/",
                            len(loose), root, loose[0], root)
        if not self.records:
            where = (f"the images in {root} itself are not read: put each class's images in a subfolder "
                     f"{root}/<class>/" if loose else f"expected {root}/<class>/<image>")
            raise DataError(f"no images found in class folders of {root} ({where}, with one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        if empty:
            raise DataError(f"{root}: classes without images: {empty[:10]}{' ...' if len(empty) > 10 else ''} "
                            f"(no file ending in {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders")
        self.listing = listing_fingerprint(root, self.records)

    @property
    def num_classes(self) -> int:
        """The class ids this data trains, 0 to num_classes - 1: one per class folder."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        path, label = self.records[index]
        return {"image": storage.read_bytes(path), "label": label, "name": path}


class TfdsSource:
    """A built TFDS dataset read as a data source (ArrayRecord; no TensorFlow needed): each
    record's 'image' and 'label' (class id); `num_classes` is the label's class count, where TFDS
    records one."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        check_array_record_reads(data_dir or "")
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        build = (f"`tfds build {name} --manual_dir=DIR --data_dir={data_dir or '~/tensorflow_datasets'} "
                 "--file_format=array_record` (see README, Training data)")
        if data_dir and not storage.exists(data_dir):  # (a bucket it cannot reach raises the cause)
            missing = storage.missing_bucket_words(data_dir) or "does not exist"
            raise DataError(f"TFDS data dir {data_dir} {missing}; build the dataset there with {build}")
        builder = tfds_builder(name, data_dir, where, build)
        if not builder.is_prepared():  # tfds.data_source would download and build it into data_dir
            raise DataError(f"TFDS dataset {name!r} is not built under {where}: "
                            f"{dataset_folder_hint(name, data_dir) or f'run {build}'}")
        self.source = split_source(builder, name, split, where)
        self.num_classes = label_classes(builder, name, where)
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        return {"image": record["image"], "label": int(record["label"]), "name": f"{self.name}:{index}"}


def tfds_builder(name: str, data_dir: str | None, where: str, build: str):
    """TFDS's builder of dataset `name` (registered with TFDS, or built under data_dir by a
    builder of one's own); a name that is neither is named with the closest known names."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)  # (the community index is a download)
        close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3)
        hint = dataset_folder_hint(name, data_dir)
        raise DataError(f"no TFDS dataset is named {name!r}: TFDS does not know it, and none of that name is built "
                        f"under {where}{'; ' + hint if hint else ''}. Check --config.data.tfds_name"
                        f"{' (close names: ' + ', '.join(close) + ')' if close else ''}, and "
                        "--config.data.tfds_data_dir for a dataset built by a builder of one's own") from None
    except Exception as e:  # TFDS raises several types for versions and configs it does not have
        raise DataError(f"cannot open TFDS dataset {name!r} in {where}: {first_line(e).rstrip('.')}. Build it "
                        f"once with {build}") from None


def dataset_folder_hint(name: str, data_dir: str | None) -> str:
    """Where data_dir is the dataset's own folder (DATA_DIR/imagenet2012, or its version folder
    below), not the data dir that holds it: the fix (not a build into the dataset's folder); else ''."""
    folder = name.split(":")[0].split("/")[0]
    parts = (data_dir or "").rstrip("/").split("/")
    if folder not in parts[-3:]:  # DATA_DIR/NAME[/CONFIG]/VERSION at most
        return ""
    above = "/".join(parts[:len(parts) - 1 - parts[::-1].index(folder)]) or "."
    return (f"{data_dir} is the dataset's own folder, not the data dir holding it: set "
            f"--config.data.tfds_data_dir={above}")


def split_source(builder, name: str, split: str, where: str):
    """The records of `split` (a split of the built dataset, or a slice of one: train[:10%]); one
    that is not there, or selects no record, is named with the splits there are."""
    try:
        source = builder.as_data_source(split=split)
        size = len(source)
    except ValueError as e:  # an unknown split, a slice past its end or of no records
        size, cause = 0, f" ({first_line(e)})"
    else:
        cause = ""
    if size == 0:
        splits = ", ".join(f"{key} ({info.num_examples} records)" for key, info in builder.info.splits.items())
        raise DataError(f"TFDS dataset {name!r} in {where} has no records in split {split!r}{cause}: its splits are "
                        f"{splits or 'none'}; set --config.data.split to one of them or a slice of one that holds "
                        "records (train[:10%], train[1000:])")
    return source


def label_classes(builder, name: str, where: str) -> int | None:
    """The class count of the dataset's 'label' (None where TFDS records none); a dataset without
    an 'image' and a 'label' is no class-conditional dataset, and refused now rather than as 64
    unreadable records in a row once training."""
    features = builder.info.features
    missing = [key for key in ("image", "label") if key not in features]
    if missing:
        raise DataError(f"TFDS dataset {name!r} in {where} has no {' or '.join(map(repr, missing))} feature (its "
                        f"features: {', '.join(features.keys())}): a class-conditional model trains on an 'image' and "
                        "its class id, 'label', per record, as imagenet2012 has")
    return getattr(features["label"], "num_classes", None)


def read_class_index(path: str) -> list[str]:
    """The class folder names a run's checkpoints learned as ids 0, 1, ...; a file that is not what
    the run wrote (damaged, or edited by hand) is an error naming it and the fix."""
    try:
        classes = storage.read_json(path)["classes"]
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise TypeError(f"its classes are a {type(classes).__name__}, not a list of folder names")
        if not classes:  # a run on image folders trained at least one
            raise ValueError("its classes list is empty")
        if twice := sorted({name for name in classes if classes.count(name) > 1}):  # one folder under two ids
            raise ValueError(f"its classes name {', '.join(map(repr, twice))} more than once")
        return classes
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no "classes", not a list of distinct names
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}): it holds the class ids this run's checkpoints "
                        "learned. Put back its earlier content, or delete it to have it written again from the class "
                        "folders' sorted names (the same ids, unless class folders were added or removed "
                        "since)") from None


def check_class_count(dataset: str, count: int, num_classes: int, fewer_classes: str, fits: str) -> None:
    """A dataset of `count` classes must fit the model's class table: id num_classes is the null
    class and higher ids have no embedding (their steps come out NaN and are skipped); fewer
    classes train, and the rest are named (previews would show classes never trained)."""
    if count > num_classes:
        raise DataError(f"{dataset} has {count} classes but the model has model.num_classes = {num_classes}: ids from "
                        f"{num_classes} on would train as the null class or past the class table. Set "
                        f"--config.model.num_classes={count} (a new --workdir) or {fewer_classes}")
    if count < num_classes:
        logging.warning("%s has %d classes but the model has model.num_classes = %d: classes %d to %d never train "
                        "(--config.model.num_classes=%d %s, in a new --workdir)", dataset, count, num_classes, count,
                        num_classes - 1, count, fits)


def make_source(data_config, class_index_dir: str | None = None, num_classes: int | None = None,
                ids_learned: bool = True):
    """The configured source. For folders, the class list is read back from class_index_dir/
    class_index.json once a checkpoint of the run has learned those ids (`ids_learned`), so the
    ids of a run stay as they were (record_class_index writes it, once the run accepts the data);
    it must fit the model's num_classes (id num_classes is the null class, and higher ids have no
    embedding)."""
    kind = data_config.source
    if kind == "tfds":
        source = TfdsSource(data_config.tfds_name, data_config.split, data_config.tfds_data_dir)
        if num_classes is not None and source.num_classes is not None:
            check_class_count(f"TFDS dataset {data_config.tfds_name!r}", source.num_classes, num_classes,
                              "train on a dataset of fewer classes", "fits the dataset")
        return source
    if kind == "folder":
        classes = None
        index_path = storage.join(class_index_dir, CLASS_INDEX_FILE) if class_index_dir else None
        if index_path and ids_learned and storage.exists(index_path):
            classes = read_class_index(index_path)
        source = ImageFolderSource(data_config.root, classes, index_path or "the run's class index")
        if num_classes is not None:
            check_class_count(data_config.root, len(source.classes), num_classes, "remove class folders",
                              "fits the folder")
        return source
    if kind == "demo":
        from pixelflow_jax.data.demo_data import DemoSource

        return DemoSource(data_config.demo_num_images, seed=data_config.demo_seed,
                          num_classes=data_config.demo_num_classes, resolution=data_config.resolution)
    if kind == "array_record":
        raise DataError("data.source='array_record' holds captioned records for text-conditional models; a "
                        "class-conditional model trains on 'tfds', 'folder' or 'demo'")
    raise DataError(f"unknown config.data.source {kind!r}; choose 'tfds', 'folder' or 'demo' ('array_record' for "
                    "text-conditional models)")


def record_class_index(data_config, source, class_index_dir: str | None, ids_learned: bool) -> None:
    """Writes the class list of a folder source to class_index_dir/class_index.json, unless a
    checkpoint of the run has learned the ids one there holds (`ids_learned`): (re)written until a
    checkpoint uses it."""
    if not isinstance(source, ImageFolderSource) or not class_index_dir or jax.process_index() != 0:
        return
    index_path = storage.join(class_index_dir, CLASS_INDEX_FILE)
    if not (ids_learned and storage.exists(index_path)):
        storage.write_json_atomically(index_path, {"root": storage.absolute(data_config.root),
                                                   "classes": source.classes})


def open_source(config, class_index_dir: str | None = None, captioned: bool = False, ids_learned: bool = True):
    """The records of config.data: captioned ones for a text-conditional model. Opening them finds
    a missing or unreadable dataset, so a run does it before it writes anything."""
    if captioned:
        from pixelflow_jax.data.caption_data import make_captioned_source

        return make_captioned_source(config.data)
    return make_source(config.data, class_index_dir, num_classes=config.model.num_classes, ids_learned=ids_learned)
