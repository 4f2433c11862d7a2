"""Training input pipelines (grain): full-resolution uint8 images and their conditioning (int32
class labels, or the T5 tokens of a caption for text-conditional models).

Every stage's inputs are built later, on the device, from these full-resolution images, so the
loader only decodes and augments. The data path, top to bottom:

  source (tfds | folder | demo)  random access: record i -> encoded bytes or pixels + label
   (captioned: folder |          (sources.py), or + caption (caption_data.py)
    array_record | demo)
  -> DecodedSource (decoding.py) decode to RGB (16-bit and float grey scaled to 8 bits), resize the
                                 shorter side to round(R * 1.125) with Lanczos (or the ADM centre
                                 crop); tokenize the caption (too long:
                                 truncated and counted); a draw of an unreadable image or an
                                 unusable caption is replaced by one of a random other record, and
                                 counted
  -> shuffle (one global order, the same in every process; reshuffled every epoch), repeat forever
  -> random crop R + random horizontal flip (decoding.py; seeded by the element's global position)
  -> the rows of every global batch that this process's devices hold (ProcessRows: read from the
     batch sharding, so row r of the global array is image r of the global batch whatever the
     device order), from global batch `start_batch` on (a resumed run starts at its step)
  -> worker processes + prefetch
  -> ImageLoader: numpy batches (images, labels | (tokens, mask)); running counts of records
     skipped, of images with transparent pixels (their alpha dropped), smaller than R (upscaled) or
     with an EXIF orientation (not applied), and of captions truncated or holding text the tokenizer
     does not know
  -> to_global_batch: jax.Arrays sharded over the mesh's batch axes

grain and TFDS are imported lazily: the model, sampler and train step do not need them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import math
import os
import signal
import sys
import traceback
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from pixelflow_jax.data.decoding import DecodedSource, RandomCropFlip
from pixelflow_jax.data.sources import DataError, open_source


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """The rows of each global batch that one process reads: blocks of `block` consecutive rows,
    numbered from the batch's start (block j: rows [j*block, (j+1)*block)), in increasing order."""

    block: int
    blocks: tuple[int, ...]

    @classmethod
    def contiguous(cls, batch_size: int, process_index: int = 0, process_count: int = 1) -> "ProcessRows":
        """Process i of n reads rows [i*b, (i+1)*b) with b = batch_size / n."""
        if batch_size % process_count:
            raise DataError(f"global batch {batch_size} is not divisible by the {process_count} processes")
        return cls(batch_size // process_count, (process_index,))

    @classmethod
    def of_sharding(cls, sharding, batch_size: int) -> "ProcessRows":
        """The rows this process's devices hold of a (batch_size, ...) array with `sharding`. A mesh
        lays devices out by the chips' topology (on TPU pods one host's chips need not be
        neighbours in it), and jax.make_array_from_process_local_data puts a process's rows at its
        devices' places in order: reading rows [i*b, (i+1)*b) regardless, image r of the global
        batch would be at another row than r, so each image's noise and stage would depend on the
        devices' order, and a resume on another topology would train on other pairings."""
        runs = []  # the rows as maximal runs of consecutive rows, so that the blocks are as large as can be
        for start, stop in sorted({index[0].indices(batch_size)[:2]
                                   for index in sharding.addressable_devices_indices_map((batch_size,)).values()}):
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], stop)
            else:
                runs.append([start, stop])
        block = math.gcd(*(end for run in runs for end in run))
        return cls(block, tuple(j for start, stop in runs for j in range(start // block, stop // block)))


class RowsOfBatches:
    """Element k: this process's rows of global batch k, from `blocks` (a dataset of blocks of
    rows, block k*blocks_per_batch + j being block j of batch k)."""

    def __init__(self, blocks, rows: ProcessRows, batch_size: int):
        self.blocks, self.rows, self.blocks_per_batch = blocks, rows, batch_size // rows.block

    def __len__(self) -> int:
        return len(self.blocks) // self.blocks_per_batch

    def __getitem__(self, k: int) -> dict:
        parts = [self.blocks[k * self.blocks_per_batch + j] for j in self.rows.blocks]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def build_dataset(source, *, batch_size: int, resolution: int, seed: int, expand_ratio: float = 1.125,
                  center_crop: bool = False, random_flip: bool = True, rows: ProcessRows | None = None,
                  start_batch: int = 0, num_workers: int = 0, prefetch_batches: int = 2, tokenizer=None):
    """The grain IterDataset of this process's rows (`rows`; default: all) of each global batch of
    `batch_size` images: {'image': uint8 (b, R, R, 3), 'label': int32 (b,), 'skipped': int32 (b,),
    'transparent': int32 (b,), 'upscaled': int32 (b,), 'exif_oriented': int32 (b,)}
    with b = this process's rows of a batch; with a tokenizer, 'tokens' and 'token_mask' int32 (b, L),
    'truncated' and 'unknown_text' int32 (b,) replace 'label'. Infinite, reshuffled every epoch,
    deterministic for a seed.

    Every process computes the same global order and takes its rows of each global batch, and the
    crop/flip randomness is keyed by an image's global position, so the global batches do not
    depend on how many processes read them (one host with 8 devices trains on what two hosts with 4
    each train on). The iterator starts at global batch `start_batch`: a resumed run passes its
    step, so its position needs no checkpoint of its own and a checkpoint resumes with any number
    of processes.
    """
    import grain

    rows = rows or ProcessRows.contiguous(batch_size)
    decoded = DecodedSource(source, resolution, expand_ratio, center_crop, tokenizer)
    blocks = (grain.MapDataset.source(decoded)
              .seed(seed)
              .shuffle()
              .repeat()
              .random_map(RandomCropFlip(resolution, random_flip))
              .batch(rows.block, drop_remainder=True))
    dataset = (grain.MapDataset.source(RowsOfBatches(blocks, rows, batch_size))
               [start_batch:]
               # grain's default reads up to 500 elements (here: batches) ahead on 16 threads: tens
               # of GB at ImageNet sizes. prefetch_batches bounds both, in each worker.
               .to_iter_dataset(grain.ReadOptions(num_threads=prefetch_batches, prefetch_buffer_size=prefetch_batches)))
    if num_workers > 0:
        from absl import flags

        check_workers_can_start(f"build_dataset(num_workers={num_workers}) was called", "pass num_workers=0")
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside main.py use defaults
            flags.FLAGS.mark_as_parsed()
        quiet_shared_memory_cleanup()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                   per_worker_buffer_size=prefetch_batches),
                                      worker_init_fn=functools.partial(init_worker, os.getpid()))
    return dataset


def check_workers_can_start(started: str, fix: str) -> None:
    """grain spawns its workers, and each runs the main script again first: a script that builds
    its loader outside `if __name__ == "__main__":` would build one in every worker, which fails
    starting workers of its own, and the trainer heard only that a worker died, in ~100 lines of
    tracebacks. Refused here, before any worker starts: `started` says what was (a call, a job),
    `fix` the other way out than the guard."""
    if where := unguarded_main_code():
        raise DataError(f"{started} from the top-level code of {where}, outside `if __name__ == \"__main__\":`: each "
                        "loader worker process starts by running that script again (Python's spawn start method), "
                        f"which would run that code again in it; put the script's top-level code under that guard, "
                        f"or {fix}")


def unguarded_main_code() -> str | None:
    """'SCRIPT (line N)' where the main script's top-level code, which a spawned process runs
    again, is running this call at line N outside a top-level `if` on __name__; None where the
    call comes from under one, or the main module is not run again (interactive, python -c)."""
    main = sys.modules.get("__main__")
    if not runs_again_in_spawned_processes(main):
        return None
    frame = next((f for f, _ in traceback.walk_stack(None)
                  if f.f_globals is vars(main) and f.f_code.co_name == "<module>"), None)
    if frame is None:  # called once the script's top-level code has run (a thread, atexit)
        return None
    try:
        with open(frame.f_code.co_filename, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):  # no source at hand: give the benefit of the doubt
        return None
    guards = [node for node in tree.body if isinstance(node, ast.If) and
              any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node.test))]
    if any(guard.lineno <= frame.f_lineno <= guard.end_lineno for guard in guards):
        return None
    return f"{frame.f_code.co_filename} (line {frame.f_lineno})"


def runs_again_in_spawned_processes(main) -> bool:
    """Whether a spawned process runs the main module again, as multiprocessing decides: python -m
    MODULE by its name (but not a package's __main__), python SCRIPT by its path."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return not name.endswith("__main__")
    return bool(getattr(main, "__file__", None))


def quiet_shared_memory_cleanup() -> None:
    """Batches the workers made but the trainer never took (those prefetched when it stops) stay in
    shared memory until multiprocessing's resource tracker removes them at exit, with a warning of
    "leaked shared_memory objects" that every run would end with. The tracker is a process of its
    own, started with this process's -W options: this one, added before it starts, silences that
    warning there (the cleanup itself still happens)."""
    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


def init_worker(trainer_pid: int, *_) -> None:
    """In each loader worker:
    - Ctrl-C is ignored: a terminal's Ctrl-C reaches every process of the group, and the trainer
      saves a step on it (preemption.py) with batches the workers still have to make;
    - the worker dies with the trainer (Linux): after a kill -9 of the trainer it would otherwise
      go on holding its memory. Strictly, the kernel signals it when the trainer's thread that
      started it ends: grain's prefetch thread, which lives until the loader is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != trainer_pid:  # the trainer died before the call above
            os._exit(1)


class RunningCount:
    """A count of something the loader met, logged when it first happens and again each time it
    doubles: a few lines over a run, not one per batch. Given `among` (the things drawn, of which
    those counted are some: 'captions drawn'), the log says what share of them it is: a count alone
    did not tell a problem of a few captions from one of every caption."""

    def __init__(self, what: str, among: str = ""):
        self.what, self.among, self.count, self.drawn, self.next_log = what, among, 0, 0, 1

    def add(self, n: int, drawn: int = 0) -> None:
        self.count += n
        self.drawn += drawn
        if n and self.count >= self.next_log:
            counted = (f"{self.count} of the {self.drawn} {self.among} ({self.count / self.drawn:.0%})" if self.among
                       else str(self.count))
            logging.warning("so far, %s %s (logged again at %d)", counted, self.what, 2 * self.count)
            self.next_log = 2 * self.count


# Images drawn per class before the classes never drawn are named: a class of an even share is
# missed that long with a chance of e^-20.
DRAWS_PER_CLASS_BEFORE_CHECK = 20


class ImageLoader:
    """Iterates per-process numpy batches (images uint8 (B, R, R, 3), conditioning: labels int32
    (B,), or (tokens, mask) int32 (B, L) for captions) and logs the running counts of skipped
    records, of images with transparent pixels, smaller than R (upscaled) or with an EXIF orientation
    (not applied), and of captions truncated or holding text the tokenizer does not know (counted
    each time a batch holds one). Given `num_classes`, it names once the classes that never came in
    DRAWS_PER_CLASS_BEFORE_CHECK x num_classes images: each draw of an unreadable image is
    replaced by another record, so a class whose every image is unreadable would never train."""

    def __init__(self, dataset, num_classes: int = 0, class_names: list[str] | None = None):
        self.iterator = iter(dataset)
        self.class_names = class_names
        self.labels_drawn = np.zeros(num_classes, bool)
        self.images_drawn, self.classes_checked = 0, not num_classes
        self.skipped = RunningCount("draws of unusable records skipped (each replaced by a random other record)")
        self.truncated = None  # of captions: made at the first batch, which gives their token length
        self.unknown_text = RunningCount("held text the tokenizer does not know (read as <unk>: emoji, or a script "
                                         "outside its vocabulary)", among="captions drawn")
        self.transparent = RunningCount("images drawn had transparent pixels (trained as the colour under them, "
                                        "the alpha channel dropped)")
        self.upscaled = None  # made at the first batch, which gives the resolution
        self.exif_oriented = RunningCount("images drawn had an EXIF orientation that was not applied (trained as "
                                          "stored, sideways or mirrored)")

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        return self

    def __next__(self) -> tuple[np.ndarray, Any]:
        batch = next(self.iterator)
        self.skipped.add(int(batch["skipped"].sum()))
        self.transparent.add(int(batch["transparent"].sum()))
        if self.upscaled is None:
            self.upscaled = RunningCount(f"were smaller than data.resolution ({batch['image'].shape[1]} px) and "
                                         "upscaled", among="images drawn")
        self.upscaled.add(int(batch["upscaled"].sum()), len(batch["upscaled"]))
        self.exif_oriented.add(int(batch["exif_oriented"].sum()))
        if "tokens" not in batch:
            if not self.classes_checked:
                self.note_classes(batch["label"])
            return batch["image"], batch["label"].astype(np.int32)
        if self.truncated is None:
            self.truncated = RunningCount(f"were longer than train.max_text_tokens ({batch['tokens'].shape[1]} tokens) "
                                          "and were truncated", among="captions drawn")
        self.truncated.add(int(batch["truncated"].sum()), len(batch["tokens"]))
        self.unknown_text.add(int(batch["unknown_text"].sum()), len(batch["tokens"]))
        return batch["image"], (batch["tokens"], batch["token_mask"])

    def note_classes(self, labels: np.ndarray) -> None:
        num_classes = len(self.labels_drawn)
        self.labels_drawn[labels[(labels >= 0) & (labels < num_classes)]] = True
        self.images_drawn += len(labels)
        if self.images_drawn < DRAWS_PER_CLASS_BEFORE_CHECK * num_classes:
            return
        self.classes_checked = True
        missing = np.flatnonzero(~self.labels_drawn).tolist()
        if missing:
            named = [f"{i} ({self.class_names[i]})" if self.class_names else str(i) for i in missing[:10]]
            logging.warning("%d of %d classes never came in the %d images drawn so far: %s%s. A class whose every "
                            "image is unreadable (the warnings above name them) never trains, and its samples come "
                            "out untrained: replace its images, or leave its folder out", len(missing), num_classes,
                            self.images_drawn, ", ".join(named), ", ..." if len(missing) > 10 else "")

    def close(self) -> None:
        """Stops the worker processes (they prefetch until closed) and frees the shared memory of
        the batches they made now: at interpreter exit grain's cleanup of it raises in __del__."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        self.iterator = None
        gc.collect()


def make_loader(config, batch_size: int, sharding, start_batch: int = 0, tokenizer=None, source=None) -> ImageLoader:
    """The loader of this process for config.data (or the `source` open_source gave), reading the
    rows of each global batch that its devices hold in `sharding` (the batch's), from global batch
    `start_batch` on. With a tokenizer
    (text-conditional models) it reads captioned data and gives token batches instead of labels."""
    data = config.data
    if source is None:
        source = open_source(config, captioned=tokenizer is not None)
    dataset = build_dataset(source, batch_size=batch_size, resolution=data.resolution, seed=config.seed,
                            expand_ratio=data.expand_ratio, center_crop=data.center_crop,
                            random_flip=data.get("random_flip", True),  # a config file of an earlier version
                            rows=ProcessRows.of_sharding(sharding, batch_size), start_batch=start_batch,
                            num_workers=data.num_workers, prefetch_batches=data.prefetch_batches, tokenizer=tokenizer)
    classes = getattr(source, "classes", None)  # an image folder's (of fewer classes than the model's, maybe)
    return ImageLoader(dataset, len(classes) if classes is not None else 0, classes)


def to_global_batch(images: np.ndarray, conditioning: Any, sharding) -> tuple[Any, Any]:
    """Per-process batches -> global jax.Arrays sharded along the batch dimension by `sharding`
    (a NamedSharding whose spec's first entry names the mesh's batch axes); `conditioning` is an
    array or a tuple of arrays (tokens, mask)."""
    to_global = lambda a: jax.make_array_from_process_local_data(sharding, a)
    return to_global(images), jax.tree.map(to_global, conditioning)
