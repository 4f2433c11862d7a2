"""The demo sets' own measure of a sampling job: for a checkpoint of a run trained on the built-in
demo data, how many images show the hue and the outline they were asked for, as
demo_data.classify reads them (the training previews' preview_hue_agreement and
preview_shape_agreement, here on the job's images). A class c asks for hue c and outline c mod 5;
a prompt asks for the colour and shape it names ("a red disk", "a ring in blue"), and a prompt that
names not exactly one of each is left out of the count.
"""

from __future__ import annotations

import io
import re
from typing import NamedTuple

import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.data.demo_data import SHAPES, classify, colour_name
from pixelflow_jax.error_text import described
from pixelflow_jax.progress import say
from pixelflow_jax.training.resume_settings import recorded_settings


class Asked(NamedTuple):
    ids: np.ndarray  # of the images that ask for a colour and a shape
    colours: np.ndarray
    shapes: np.ndarray  # indices into SHAPES


def demo_colours_of(run: str | None) -> int | None:
    """The colour count of the demo data the run trained on; None for a run on other data (or no run)."""
    settings = recorded_settings(run) if run else {}
    return int(settings.get("data.demo_num_classes", 10)) if settings.get("data.source") == "demo" else None


def asked_by_prompt(prompt: str, num_colours: int) -> tuple[int, int] | None:
    """(colour, shape) a prompt names, or None unless it names exactly one of each."""
    text = prompt.lower()
    named = lambda words: [i for i, word in enumerate(words) if re.search(rf"\b{re.escape(word)}\b", text)]
    colours = named([colour_name(c, num_colours) for c in range(num_colours)])
    shapes = named(SHAPES)
    return (colours[0], shapes[0]) if len(colours) == len(shapes) == 1 else None


def asked_of(conditioning, num_colours: int) -> Asked:
    """What each image of a job asks for (sample_conditioning's ClassLabels or TextPrompts)."""
    if hasattr(conditioning, "labels"):  # class c: hue c, outline c mod 5 (demo_data.demo_image)
        labels = np.asarray(conditioning.labels, np.int64)
        return Asked(np.arange(len(labels)), labels, labels % len(SHAPES))
    per_prompt = [asked_by_prompt(p, num_colours) for p in conditioning.prompts]
    ids, colours, shapes = [], [], []
    for i in range(conditioning.num_images):
        if pair := per_prompt[i // conditioning.images_per_prompt]:
            ids.append(i)
            colours.append(pair[0])
            shapes.append(pair[1])
    return Asked(*(np.array(column, np.int64) for column in (ids, colours, shapes)))


def report(images: np.ndarray, asked: Asked, num_colours: int) -> str:
    """One line: hue and outline agreement over the images that ask for both, and per shape."""
    if not len(asked.ids):
        return "demo check: no prompt names one demo colour and one shape (as 'a red disk' does); nothing to check"
    readings = [classify(images[i], num_colours) for i in asked.ids]
    hue_right = np.array([r.hue == c for r, c in zip(readings, asked.colours)])
    shape_right = np.array([r.shape == s for r, s in zip(readings, asked.shapes)])
    count = len(asked.ids)
    per_shape = ", ".join(f"{name} {shape_right[asked.shapes == s].sum()}/{(asked.shapes == s).sum()}"
                          for s, name in enumerate(SHAPES) if (asked.shapes == s).any())
    left_out = len(images) - count
    unchecked = f"; {left_out} images from prompts naming no demo colour and shape not checked" if left_out else ""
    images_checked = f"{count} image{'s' if count != 1 else ''}"
    return (f"demo check ({images_checked}, read by demo_data.classify): hue {hue_right.sum()}/{count} "
            f"({hue_right.mean():.0%}), outline {shape_right.sum()}/{count} ({shape_right.mean():.0%}): "
            f"{per_shape}{unchecked}")


def print_for(run: str | None, conditioning, samples_npz: str) -> None:
    """Prints the check of a job whose checkpoint is a step of a run on the demo data; nothing else.
    The job's outputs are written by then: a check that fails is a warning, not a failed job."""
    try:
        num_colours = demo_colours_of(run)
        if num_colours:
            images = np.load(io.BytesIO(storage.read_bytes(samples_npz)))["arr_0"]
            say(report(images, asked_of(conditioning, num_colours), num_colours))
    except Exception as e:  # a damaged train_settings.json, a store failing now
        logging.warning("the demo check of %s was not made: %s", samples_npz, described(e))
