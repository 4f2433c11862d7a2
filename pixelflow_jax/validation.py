"""One validation layer for config values, run by main.py for every mode before any work: numbers
finite and in range, integers integral, class ids whole numbers. Each message names the field as
the command line writes it and what it accepts, so a bad value never becomes NaN weights, black
images or a settings.json left behind. The jobs run them again for callers of the Python API
(job_config, job_workdir); train.train() adds those that need the mesh or the model's kind (text:
check_text_training)."""

from __future__ import annotations

import copy
import importlib.util
import math
import numbers
import os
import reprlib
import sys

import numpy as np

from pixelflow_jax import storage


class ConfigError(ValueError):
    """A config value is unusable; the message names the field and the accepted values."""


def number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, where: str = "--config.") -> float:
    """A finite real number in the given bounds (minimum/maximum inclusive, above/below strict).
    `where` + `name` is how the message names it: a config field, or (where="") an argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}{name} must be a finite number, got {value!r}")
    bounds = [(minimum, value >= minimum if minimum is not None else True, ">="),
              (maximum, value <= maximum if maximum is not None else True, "<="),
              (above, value > above if above is not None else True, ">"),
              (below, value < below if below is not None else True, "<")]
    for bound, ok, relation in bounds:
        if not ok:
            raise ConfigError(f"{where}{name} must be {relation} {bound}, got {value!r}")
    return float(value)


def is_whole(value) -> bool:
    """An int, or a finite real number without a fraction; not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
            where: str = "--config.") -> int:
    """A whole number (an int, or a float without a fraction; numpy and jax scalars too), in the
    given inclusive bounds."""
    if hasattr(value, "__array__") and np.ndim(value) == 0:  # a 0-d numpy or jax array
        value = np.asarray(value).item()
    if not is_whole(value):
        raise ConfigError(f"{where}{name} must be a whole number, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{where}{name} must be {allowed}, got {value}")
    return value


# 10**7 images at 256 px fill 2 TB; 10**8 was allowed and unusable (60 s of setup without a log
# line, 10 GB of memory for the settings' label list alone): more is a typo.
MAX_SAMPLE_IMAGES = 10**7
# More is a typo (the release samples with 10 to 30): the sampler builds each stage's time grid in
# host memory, and 10**9 exhausted a 24 GB host instead of failing.
MAX_STEPS_PER_STAGE = 10_000
CLASS_DATA_SOURCES = ("tfds", "folder", "demo")
TEXT_DATA_SOURCES = ("folder", "array_record", "demo")  # array_record: captioned shards
MIN_LOCK_STALE_S = 30.0
MAX_BATCH = 2**20  # images in a global batch (the release trains with 1,024)
MAX_PREVIEW_IMAGES = 1024  # drawn as one batch
MAX_EXPAND_RATIO = 4.0  # the release resizes to 1.125 x the resolution before its crop
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits: seed 2**32 would draw seed 0's noise
# Loader processes per host, and batches (threads) each decodes at once: a typo past these
# (prefetch_batches=100000) died starting threads, in a traceback of grain's.
MAX_DATA_WORKERS = 128
MAX_PREFETCH_BATCHES = 128
# A prompt's tokens: at least one piece and </s>; 4096 already cost the T5 encoder minutes.
MIN_TEXT_TOKENS, MAX_TEXT_TOKENS = 2, 4096
TEXT_ENCODER_DTYPES = ("float32", "bfloat16")  # train.text_encoder_dtype's choices


def seed(name: str, value, where: str = "--config.") -> int:
    return integer(name, value, minimum=0, maximum=MAX_SEED, where=where)


def class_ids(name: str, values, num_classes: int, *, allow_null: bool = False) -> np.ndarray:
    """Whole class ids in [0, num_classes) ([0, num_classes] with the null class), as int64;
    for config values and for concrete arrays at the Python API (labels, class_labels)."""
    array = ids_array(name, values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D list of class ids, got {given_as(values, array)}: pass a list or a "
                          "1-D array")
    array = numbers_read(array)
    if array.dtype.kind not in "iuf" or array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = entries_at(array, ~np.isfinite(array)) if array.dtype.kind == "f" else non_numbers(values, array)
        raise ConfigError(f"{name} must be whole class ids, got {bad}")
    if array.dtype.kind == "f" and not np.all(whole := array == np.round(array)):
        raise ConfigError(f"{name} must be whole class ids, got {entries_at(array, ~whole)} (fractions are not "
                          "truncated)")
    array = array.astype(np.int64)
    top = num_classes if allow_null else num_classes - 1
    bad = array[(array < 0) | (array > top)]
    if len(bad):
        null = f" ({num_classes} = the null class)" if allow_null else ""
        raise ConfigError(f"{name} must be class ids in [0, {top}]{null}, got {bad[:5].tolist()}")
    return array


def image_ids(values, count: int) -> np.ndarray:
    """The Python API's image_ids: one whole, non-negative id per image (an id picks the image's
    noise, so a truncated 0.5 would silently repeat image 0)."""
    array = ids_array("image_ids", values)
    if array.shape != (count,):
        raise ConfigError(f"image_ids must give one id per image ({count}) as a list or a 1-D array, got "
                          f"{given_as(values, array)}")
    array = numbers_read(array)
    if array.dtype.kind not in "iuf":
        raise ConfigError(f"image_ids must be whole numbers in [0, 2**31), got {non_numbers(values, array)}")
    with np.errstate(invalid="ignore"):  # NaN compares False: refused as not whole
        usable = (array == np.round(array)) & (array >= 0) & (array <= np.iinfo(np.int32).max)
    if not np.all(usable):
        raise ConfigError(f"image_ids must be whole numbers in [0, 2**31), got {entries_at(array, ~usable)}")
    return array.astype(np.int32)


def ids_array(name: str, values) -> np.ndarray:
    """`values` as numpy reads them, refusing what it would read wrong or not at all: lists of
    different lengths (numpy's own error names no setting), and a bool among numbers, which
    [1, True] would turn into the id 1."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise ConfigError(f"{name} must be a 1-D list of ids, got lists of different lengths: pass a list or a "
                          "1-D array") from None
    if (array.ndim == 1 and array.dtype.kind in "iuf" and isinstance(values, (list, tuple))
            and any(isinstance(v, (bool, np.bool_)) for v in values)):
        raise ConfigError(f"{name} must be whole ids, got {non_numbers(values, array)}")
    return array


def given_as(values, array: np.ndarray) -> str:
    """Ids given as no 1-D list: an array's shape; a number or a generator by its type and value."""
    return f"shape {array.shape}" if array.ndim else f"{type(values).__name__} {reprlib.repr(values)}"


def numbers_read(array: np.ndarray) -> np.ndarray:
    """A 1-D object array (a pandas column's to_numpy()) as numpy reads its entries where each is one
    number: its Python ints as int64. Lists inside it stay entries, no second dimension."""
    if array.dtype != object or not all(isinstance(v, numbers.Number) for v in array.tolist()):
        return array
    return np.asarray(array.tolist())


def non_numbers(values, array: np.ndarray) -> str:
    """entries_at of the entries of 1-D `values` (read as `array`) that numpy reads as no int or
    float, as given: numpy reads [1, '2'] as the strings '1' and '2'. Bools are no ids either, nor
    an int past int64 or a Fraction."""
    entries = array if array.dtype.kind == "b" else np.fromiter(values, dtype=object, count=len(array))
    numeric = [isinstance(v, numbers.Number) and np.asarray(v).dtype.kind in "iuf" for v in entries.tolist()]
    return entries_at(entries, ~np.array(numeric, bool))


def entries_at(array: np.ndarray, bad: np.ndarray) -> str:
    """The first five entries `bad` marks, with their indices, and how many there are in a long
    list, each cut short: a message that names the problem, not a list of 100,000 labels."""
    where = np.flatnonzero(bad)
    entry = [array[i].item() if isinstance(array[i], np.generic) else array[i] for i in where[:5]]
    shown = ", ".join(f"{reprlib.repr(v)} at index {i}" for v, i in zip(entry, where))
    return shown + (f" ({len(where)} of {len(array)} entries)" if len(array) > 5 else "")


def steps_per_stage(name: str, value, where: str = "--config.", maximum: int = MAX_STEPS_PER_STAGE) -> None:
    values = [value] if np.ndim(value) == 0 else list(value)
    for v in values:
        integer(name, v, minimum=1, maximum=maximum, where=where)


def check_train(config) -> None:
    t = config.train
    for field in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                  "grad_accum_steps"):
        integer(f"train.{field}", t[field], minimum=1)
    # Bounds far past any real use: beyond them a run allocated or compiled for minutes before failing.
    integer("train.batch_size", t.batch_size, minimum=1, maximum=MAX_BATCH)
    integer("train.preview_num_images", t.preview_num_images, minimum=1, maximum=MAX_PREVIEW_IMAGES)
    integer("train.preview_steps_per_stage", t.preview_steps_per_stage, minimum=1, maximum=MAX_STEPS_PER_STAGE)
    integer("train.preview_every", t.preview_every, minimum=0)
    number("train.lr", t.lr, above=0)
    from pixelflow_jax.training.train_step import LR_SCHEDULES

    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    integer("train.warmup_steps", t.warmup_steps, minimum=0)
    if t.lr_schedule == "cosine" and t.warmup_steps >= t.num_steps:
        raise ConfigError(f"--config.train.warmup_steps ({t.warmup_steps}) must be below train.num_steps "
                          f"({t.num_steps}): the cosine schedule decays from the end of the warmup to num_steps")
    number("train.weight_decay", t.weight_decay, minimum=0)
    number("train.grad_clip", t.grad_clip, above=0)
    number("train.ema_decay", t.ema_decay, minimum=0, below=1)  # 1: the EMA would stay the initial weights
    if "label_dropout" in t:  # class configs (text configs drop captions at train.caption_dropout)
        number("train.label_dropout", t.label_dropout, minimum=0, below=1)
    seed("seed", config.seed)
    from pixelflow_jax.checkpoints.checkpoint import WEIGHT_CHOICES

    choice("train.init_from_weights", t.init_from_weights, WEIGHT_CHOICES)
    # Heartbeats come at most once a second and hosts' clocks differ: a shorter limit would let
    # another host take a live run's workdir.
    number("train.lock_stale_after_s", t.lock_stale_after_s, minimum=MIN_LOCK_STALE_S)
    integer("mesh.fsdp", config.mesh.fsdp, minimum=1)
    if config.model.get("param_dtype", "float32") != "float32":
        # A 1e-4 AdamW step and the 0.9999 EMA decay are below a bfloat16 weight's rounding step:
        # the weights and the EMA would stay where they started while the loss looks normal.
        raise ConfigError(f"--config.model.param_dtype={config.model.param_dtype} cannot train: optimiser steps and "
                          "the EMA update round away in a 16-bit weight, so the run would not learn. Train with "
                          "float32 weights, as the release does; for speed, compute in bfloat16 "
                          "(--config.model.dtype=bfloat16, the c2i and t2i default). param_dtype=bfloat16 is for "
                          "sampling.")
    if config.model.dtype == "float16":
        # Without loss scaling the backward pass's float16 cotangents underflow: each pixel's share of the
        # mean loss's gradient, ~1e-8 at batch 256 and 256 px, is below half of float16's smallest number (6e-8).
        raise ConfigError("--config.model.dtype=float16 cannot train: this trainer does no loss scaling, and the "
                          "gradients flowing back through float16 activations (each pixel's share of the mean loss, "
                          "~1e-8 at batch 256 and 256 px) round to zero. Compute in bfloat16 (--config.model.dtype="
                          "bfloat16, as fast on GPUs since Ampere and on TPUs) or float32; float16 is for sampling.")
    from pixelflow_jax.scheduler import PixelFlowScheduler

    scheduler = PixelFlowScheduler(config.scheduler.num_train_timesteps, config.scheduler.num_stages)
    for stage in scheduler.stages_with_one_timestep()[:1]:
        raise ConfigError(f"--config.scheduler.num_train_timesteps must be larger: {scheduler.num_train_timesteps} "
                          f"timesteps feed stage {stage} of {scheduler.num_stages} the one timestep "
                          f"{scheduler.timesteps_per_stage[stage][0]:g} at every training index, so the model could "
                          f"not tell that stage's times apart. The smallest larger count that gives every stage "
                          f"timesteps of its own: {scheduler.smallest_count_above_that_trains()} (the release: "
                          "1000)")
    if t.preview_every:
        check_guidance(config)
        if "prompts" in config.sample:  # text previews draw sample.prompts, guided by the negative prompt
            prompts("sample.prompts", config.sample.prompts)
            unicode_text("sample.negative_prompt", config.sample.negative_prompt)


def check_architecture(config) -> None:
    """The model, stages and resolution a run builds (training, inspect): ModelConfig's own checks,
    and a whole patch grid at every stage, before a workdir records them."""
    from pixelflow_jax.config import ModelConfig

    num_stages = integer("scheduler.num_stages", config.scheduler.num_stages, minimum=1)
    integer("scheduler.num_train_timesteps", config.scheduler.num_train_timesteps, minimum=num_stages)
    resolution = integer("data.resolution", config.data.resolution, minimum=1)
    m = config.model
    for field in ("num_attention_heads", "attention_head_dim", "depth", "patch_size", "in_channels", "out_channels"):
        integer(f"model.{field}", m[field], minimum=1)
    for field in ("num_classes", "cross_attention_dim"):
        integer(f"model.{field}", m[field], minimum=0)
    try:
        model = ModelConfig.from_mapping(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{e}" if str(e).startswith("model.") else f"--config.model: {e}") from None
    if (model.in_channels, model.out_channels) != (3, 3):  # (a 1-channel output broadcast against RGB and trained)
        raise ConfigError(f"--config.model.in_channels and out_channels must be 3, got {model.in_channels} and "
                          f"{model.out_channels}: the data, previews and samples are RGB images")
    least_resolution = lambda stages: math.lcm(model.patch_size * 2 ** (stages - 1), 2 ** stages)
    if least_resolution(num_stages) > LARGEST_IMAGE_SIDE:
        raise ConfigError(too_many_stages(num_stages, resolution, model.patch_size, least_resolution, names=(
            "--config.scheduler.num_stages", "--config.data.resolution")))
    grid, halving = model.patch_size * 2 ** (num_stages - 1), 2 ** num_stages
    factor = math.lcm(grid, halving)  # they differ for odd patch sizes only
    if resolution % factor:
        why = f"model.patch_size x 2^(scheduler.num_stages - 1) = {grid}, so that every stage has a whole patch grid"
        if factor != grid:
            why += (f", and of 2^scheduler.num_stages = {halving}, so that the first stage's image halves evenly "
                    "(training starts that stage from its 2x-downsampled image)")
        raise ConfigError(f"--config.data.resolution ({resolution}) must be a multiple of {why}: "
                          f"try {' or '.join(map(str, nearest_multiples(resolution, factor)))}")


def nearest_multiples(value: int, factor: int) -> list[int]:
    """The multiples of `factor` next below and next above `value`, 0 left out: the values to suggest."""
    below = value // factor * factor
    return [multiple for multiple in (below, below + factor) if multiple]


# Image side (px) far past any model's (the release's text-to-image model samples at 1024). A stage
# count whose least resolution is larger (4 x 2^99 px for 100 stages) is the mistake, not the
# resolution: it is named, and that resolution is not offered.
LARGEST_IMAGE_SIDE = 2**16


def too_many_stages(num_stages: int, resolution: int, patch_size: int, least_resolution,
                    names=("num_stages", "resolution")) -> str:
    """Why `num_stages` cannot be: `least_resolution(stages)` is the least resolution that gives each
    of that many stages a whole patch grid, and passes LARGEST_IMAGE_SIDE; `names` spell the settings."""
    stages_name, resolution_name = names
    fitting = 0
    while least_resolution(fitting + 1) <= resolution:
        fitting += 1
    problem = (f"{stages_name} {num_stages} is far too many: each stage halves the image, so the full image must "
               f"be at least {patch_size} (the patch size) x 2^{num_stages - 1} px for the first stage to hold a "
               "whole patch")
    if not fitting:
        return (f"{problem}, and {resolution_name} {resolution} is below even one stage's {least_resolution(1)} px: "
                f"raise it, and set {stages_name} to a few (the release's: 4)")
    return f"{problem}: {resolution_name} {resolution} holds at most {fitting}; set {stages_name} to {fitting} or less"


def check_data(config) -> None:
    d = config.data
    # A text config's data section has missing_captions. The other kind's sources are refused later
    # with their own reasons (tfds has no captions, array_record no class labels); a typo lists only
    # those the model trains on.
    if d.source not in CLASS_DATA_SOURCES + TEXT_DATA_SOURCES:
        choice("data.source", d.source, TEXT_DATA_SOURCES if "missing_captions" in d else CLASS_DATA_SOURCES)
    number("data.expand_ratio", d.expand_ratio, minimum=1, maximum=MAX_EXPAND_RATIO)
    integer("data.num_workers", d.num_workers, minimum=0, maximum=MAX_DATA_WORKERS)
    integer("data.prefetch_batches", d.prefetch_batches, minimum=1, maximum=MAX_PREFETCH_BATCHES)
    if d.source == "demo":
        integer("data.demo_num_images", d.demo_num_images, minimum=1)
        integer("data.demo_num_classes", d.demo_num_classes, minimum=1)
        seed("data.demo_seed", d.demo_seed)
    if d.get("root") and d.source in ("demo", "tfds"):  # starting from the demo config with one's own images
        readers = "folder (or array_record for captioned shards)" if "missing_captions" in d else "folder"
        raise ConfigError(f"--config.data.root is set ({d.root}) but data.source={d.source!r} does not read it: add "
                          f"--config.data.source={readers}, or drop data.root")


def check_text_training(config) -> None:
    from pixelflow_jax.data.caption_data import MISSING_CAPTION_CHOICES

    t, d = config.train, config.data
    number("train.caption_dropout", t.caption_dropout, minimum=0, below=1)
    integer("train.max_text_tokens", t.max_text_tokens, minimum=MIN_TEXT_TOKENS, maximum=MAX_TEXT_TOKENS)
    choice("train.text_encoder_dtype", t.text_encoder_dtype, TEXT_ENCODER_DTYPES)
    choice("data.missing_captions", d.missing_captions, MISSING_CAPTION_CHOICES)
    if d.source == "tfds":
        raise ConfigError("--config.data.source 'tfds' has no captions: a text-conditional model trains on 'folder' "
                          "(NAME.jpg + NAME.txt), 'array_record' (pixelflow_jax.data.pack_captions) or 'demo'")


def choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"--config.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# Far past any use (the release samples at 1-25; images saturate long before): a bound that keeps
# the guided velocity, uncond + cfg (cond - uncond), finite in float32.
MAX_CFG_SCALE = 1000.0


def check_guidance(config) -> None:
    s = config.sample
    number("sample.cfg_scale", s.cfg_scale, minimum=1, maximum=MAX_CFG_SCALE)
    number("sample.shift", s.shift, above=0)


def check_model_numerics(config) -> None:
    """The dtypes a sampling job (sample, demo) builds the checkpoint's model with (inspect checks
    them with the whole architecture, check_architecture)."""
    from pixelflow_jax.config import COMPUTE_DTYPES

    choice("model.dtype", config.model.dtype, COMPUTE_DTYPES)
    choice("model.param_dtype", config.model.get("param_dtype", "float32"), COMPUTE_DTYPES)


def text_tokens(sample_config) -> None:
    s = sample_config
    if integer("sample.max_text_tokens", s.max_text_tokens, minimum=0, maximum=MAX_TEXT_TOKENS) == 1:
        raise ConfigError("--config.sample.max_text_tokens must be 0 (the run's or the release's length) or >= 2 "
                          "(a prompt's pieces and </s>), got 1")


def prompts(name: str, value) -> None:
    """A prompt, or a list of prompts (strings); empty where a prompts file gives them."""
    if not (isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value))):
        raise ConfigError(f"--config.{name} must be a prompt or a list of prompts (strings), got {value!r}")
    given = [value] if isinstance(value, str) else value
    for prompt in given:  # first: a list holding such a byte stayed one string, which the list check would blame
        unicode_text(name, prompt)
    if isinstance(value, str) and looks_like_an_unquoted_list(value):
        # The command line keeps a list whose prompts are not quoted as one string: all of it one prompt.
        raise ConfigError(f"--config.{name} is the one string {value[:200]!r}, which would be a single prompt: a "
                          f"list needs each prompt quoted, --config.{name}='(\"a red fox\", \"a blue car\")'; one "
                          f"prompt written in brackets is a list of one, --config.{name}='(\"(a, b)\",)'")
    for prompt in given:
        if names_a_prompts_file(prompt):  # it would be sampled as the words of its name
            raise ConfigError(f"--config.{name} is the prompt {prompt!r}, which names a file: prompts read from a text "
                              f"file, one per line, are --config.sample.prompts_file={prompt}")


def names_a_prompts_file(prompt: str) -> bool:
    """Whether a prompt is the name of a file (as --config.sample.prompts_file takes one): a file
    here, or a name without spaces ending in .txt (a file elsewhere, a gs:// one)."""
    words = prompt.strip()
    return os.path.isfile(os.path.expanduser(words)) or (words.lower().endswith(".txt") and len(words.split()) == 1)


def looks_like_an_unquoted_list(text: str) -> bool:
    """Whether text is one pair of brackets around comma-separated items, '(a red fox, a blue car)':
    not a prompt of emphasis groups, '(masterpiece, best quality), a cat, (red)', whose first
    bracket closes before its end."""
    pairs = {"(": ")", "[": "]"}
    if text[:1] not in pairs or not text.endswith(pairs[text[:1]]):
        return False
    depth, comma_inside = 0, False
    for i, character in enumerate(text):
        depth += character in "(["
        depth -= character in ")]"
        comma_inside |= character == "," and depth == 1
        if depth == 0:
            return i == len(text) - 1 and comma_inside
    return False


def unicode_text(name: str, value: str, where: str = "--config.", decoded_by_the_locale: bool = True) -> None:
    """Text a tokenizer can read. A byte that is not UTF-8 on the command line (typed in a terminal
    or written by a script in Latin-1, say) reaches Python as a lone surrogate: sentencepiece
    refuses it, and only when the text is first encoded (a training run's first preview).
    decoded_by_the_locale: False for text that came another way (a web request's JSON), which this
    Python's locale did not decode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        # Python keeps an undecodable argument byte b as the code point U+DC00 + b (surrogateescape).
        as_utf8 = utf8_read_in_another_locale(value) if decoded_by_the_locale else None
        if 0xDC80 <= code <= 0xDCFF and as_utf8 is not None:
            what = f"the byte 0x{code - 0xDC00:02x}, which Python did not read as UTF-8"
            cause = (f"the text is UTF-8 ({as_utf8[:200]!r}), but this Python reads the command "
                     f"line as {sys.getfilesystemencoding()} (a C or POSIX locale with PYTHONUTF8=0)")
            fix = "run it with LC_ALL=C.UTF-8 or PYTHONUTF8=1"
        elif 0xDC80 <= code <= 0xDCFF:
            what = f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
            cause = "the terminal or script that wrote it uses another encoding (such as Latin-1)"
            fix = "give it as UTF-8 text"
        else:
            what = f"U+{code:04X}, half of a UTF-16 surrogate pair"
            cause = "text cut inside a character such as an emoji, or one escape of a pair decoded alone"
            fix = "give it as UTF-8 text"
        prompts_file = ", or put the prompts in a UTF-8 file for --config.sample.prompts_file" if (
            f"{where}{name}" == "--config.sample.prompts") else ""
        raise ConfigError(f"{where}{name} holds {what}, after {value[:e.start][-40:]!r} in {value[:200]!r}: {cause}; "
                          f"{fix}{prompts_file}") from None


def utf8_read_in_another_locale(text: str) -> str | None:
    """The text that text's escaped bytes spell where they are UTF-8 which this Python read in a locale
    that is not (under LC_ALL=C with PYTHONUTF8=0 a typed 'é' reaches sys.argv as two escaped bytes, not
    as a wrong byte); else None."""
    if sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return None
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None


def check_sample(config) -> None:
    s = config.sample
    check_model_numerics(config)
    integer("sample.batch_size", s.batch_size, minimum=1)
    seed("sample.seed", s.seed)
    check_guidance(config)
    steps_per_stage("sample.steps_per_stage", s.steps_per_stage)
    from pixelflow_jax.checkpoints.checkpoint import WEIGHT_CHOICES
    from pixelflow_jax.sampling.cascade import SOLVERS

    choice("sample.solver", s.solver, SOLVERS)
    choice("sample.weights", s.weights, WEIGHT_CHOICES)
    if "prompts" not in s:  # text configs count images by prompts (sample_conditioning.py)
        integer("sample.num_images", s.num_images, minimum=1, maximum=MAX_SAMPLE_IMAGES)
    else:  # 0: the training run's length, or the release's 512 (api.fill_text_encoder)
        text_tokens(s)
        prompts("sample.prompts", s.prompts)
        unicode_text("sample.negative_prompt", s.negative_prompt)
        integer("sample.images_per_prompt", s.images_per_prompt, minimum=1, maximum=MAX_SAMPLE_IMAGES)
        from pixelflow_jax.text.prompts import PARAM_DTYPES

        choice("sample.text_encoder_param_dtype", s.text_encoder_param_dtype, ("",) + PARAM_DTYPES)
        for field in ("num_images", "labels"):  # set by a user who thinks them used: say they are not
            if s[field]:
                raise ConfigError(f"--config.sample.{field} does not apply to text-to-image sampling: it makes "
                                  "len(prompts) x --config.sample.images_per_prompt images, image i from prompt "
                                  "i // images_per_prompt")
    for label in s.labels:  # the range, and the names, need the checkpoint: sample_conditioning.py
        if not isinstance(label, str):  # a name: a class folder of a run trained on image folders
            integer("sample.labels", label, minimum=0)


def check_inspect(config) -> None:
    from pixelflow_jax.checkpoints.checkpoint import WEIGHT_CHOICES

    choice("sample.weights", config.sample.weights, WEIGHT_CHOICES)  # read when sample.checkpoint is set
    seed("seed", config.seed)  # the random weights and inputs
    if "max_text_tokens" in config.sample:  # a text model is inspected with prompts of this length
        text_tokens(config.sample)


# What an evaluation reads (eval.samples may be left out: the workdir's own samples.npz, or run's argument).
EVAL_FIELDS = ("reference", "inception_weights", "batch_size")


def check_eval(config) -> None:
    """A config built in Python may hold only the eval section, but not without what it reads."""
    lacking = [f"eval.{name}" for name in EVAL_FIELDS if "eval" not in config or name not in config.eval]
    if lacking:
        raise ConfigError(f"the config lacks {', '.join(lacking)}, which --mode=eval reads: set "
                          f"{'them' if len(lacking) > 1 else 'it'} (configs.c2i.get_config().eval holds every field, "
                          "batch_size=100 among them)")
    integer("eval.batch_size", config.eval.batch_size, minimum=1)


# The demo page's sliders: its defaults come from config.sample, so they must lie within.
DEMO_CFG_RANGE, DEMO_SHIFT_RANGE, DEMO_MAX_STEPS = (1.0, 25.0), (1.0, 100.0), 100
# A page samples each request as one batch (guided: twice that on the device) and keeps every image
# of it in memory and on its folder: more is a sampling job's (--mode=sample), not a page request's.
DEMO_MAX_IMAGES = 64


def check_demo(config) -> None:
    integer("demo.port", config.demo.port, minimum=1, maximum=65535)
    integer("demo.max_images", config.demo.max_images, minimum=1, maximum=DEMO_MAX_IMAGES)
    check_guidance(config)
    s = config.sample
    number("sample.cfg_scale", s.cfg_scale, minimum=DEMO_CFG_RANGE[0], maximum=DEMO_CFG_RANGE[1],
           where="the demo page's --config.")
    number("sample.shift", s.shift, minimum=DEMO_SHIFT_RANGE[0], maximum=DEMO_SHIFT_RANGE[1],
           where="the demo page's --config.")
    steps_per_stage("sample.steps_per_stage", s.steps_per_stage, "the demo page's --config.", DEMO_MAX_STEPS)


# Config fields that hold a path: local, gs://, or (checkpoints and T5 folders) hf://.
PATH_FIELDS = ("data.root", "data.tfds_data_dir", "train.init_from", "train.text_encoder", "sample.checkpoint",
               "sample.text_encoder", "sample.prompts_file", "eval.samples", "eval.reference", "eval.inception_weights")
HUB_FIELDS = ("train.init_from", "train.text_encoder", "sample.checkpoint", "sample.text_encoder")


def user_path(flag: str, value: str, *, hub_allowed: bool = False) -> str:
    """A path a user gave in `flag` through storage.user_path (`~` expanded, a URL without its "//"
    refused) and a URL scheme this project cannot use refused (hf:// is read where `hub_allowed`,
    never written); the StorageError names the flag."""
    from pixelflow_jax.checkpoints import hub

    try:
        path = storage.user_path(value)
        if hub_allowed and (refusal := hub.web_address_refusal(path)):
            raise storage.StorageError(refusal)
        if not (hub_allowed and hub.is_hub_path(path)):
            storage.check_supported(path)
    except storage.StorageError as e:
        raise storage.StorageError(f"{flag}: {e}") from None
    return path


def setting_path(flag: str, value, *, hub_allowed: bool = False) -> str:
    """user_path for a path setting (a config field, or a job function's argument in its place): its
    refusal is a ConfigError, as the other settings' are."""
    try:
        return user_path(flag, value, hub_allowed=hub_allowed)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None


def expand_paths(config) -> None:
    """Each path field of the config through setting_path, before any work."""
    for field in PATH_FIELDS:
        section, name = field.split(".")
        if section in config and name in config[section] and is_set(config[section][name]):
            path = setting_path(f"--config.{field}", config[section][name], hub_allowed=field in HUB_FIELDS)
            with config[section].ignore_type():  # a pathlib.Path in a config built from a dict becomes a str
                config[section][name] = path


def is_set(value) -> bool:
    """Whether a path setting is given: not None nor empty (an array, given for a path, is, and is refused)."""
    return value is not None and not (isinstance(value, (str, bytes)) and not value)


CHECKS = {"train": (check_architecture, check_data, check_train), "sample": (check_sample,), "eval": (check_eval,),
          "demo": (check_sample, check_demo), "inspect": (check_architecture, check_inspect)}


def check(config, mode: str) -> None:
    expand_paths(config)
    for checker in CHECKS[mode]:
        checker(config)
    if mode == "sample" and "eval" in config and config.eval.get("reference"):  # a Python config may lack it
        check_eval(config)


def job_config(config, mode: str):
    """A job's own copy of the config it is given, checked as main.py checks it (a job started from
    Python skips main.py: a seed of 2**40 sampled seed 0's images). Jobs fill in what a config leaves
    empty (an inspected run as sample.checkpoint, a text run's encoder and token length): in a
    notebook the caller's config carried these into its next job, and sampling another run's
    workdir sampled the run inspected before it."""
    check_not_a_worker_importing_the_script(mode)
    check_fields(config)
    # A FrozenConfigDict's copy thawed: the checks write the paths they expand, jobs what they fill in.
    config = config.as_configdict() if hasattr(config, "as_configdict") else copy.deepcopy(config)
    check(config, mode)
    if mode == "train" and config.data.num_workers > 0:  # refused before the workdir is made, in the job's words
        from pixelflow_jax.data.loader import check_workers_can_start

        check_workers_can_start(f"a train job with data.num_workers={config.data.num_workers} was started",
                                "set config.data.num_workers=0")
    return config


def check_not_a_worker_importing_the_script(mode: str) -> None:
    """grain's data workers are spawned, and each imports the main script again: a script that
    starts a job outside `if __name__ == "__main__":` started it again in every worker, where a
    training run then found its parent's workdir lock ("in use by another training run: wait for
    it or delete its lock") and the parent failed on "Worker process was terminated unexpectedly".
    multiprocessing marks a process importing the script to start with `_inheriting`."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"a {mode} job was started by a process importing the main script again (a data worker "
                           "of data.num_workers > 0 runs the script's top level): start a script's jobs under "
                           '`if __name__ == "__main__":`')


def check_fields(config) -> None:
    """A job's config is a ConfigDict with no field that configs/c2i.py or configs/t2i.py lacks, as
    main.py checks its --config: from Python, config.sample.num_imags = 8 (ConfigDict adds a
    misspelt field) was silently unused. It may lack fields (an evaluation's config of its eval
    section alone). Where this checkout's configs/ is not what `configs` imports (an installed
    package run elsewhere), there are no fields to compare with."""
    import ml_collections

    from pixelflow_jax.cli.config_file import check_config_fields

    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config must be an ml_collections.ConfigDict, as configs.c2i.get_config() returns, got a "
                          f"{type(config).__name__}: ml_collections.ConfigDict(values) makes one")
    if checkout_configs_imported():
        check_config_fields(config, "the config", every_field=False)


def checkout_configs_imported() -> bool:
    """Whether `configs.c2i` and `configs.t2i` import as this checkout's files: not where the package
    is installed without them, nor where a notebook's own configs/ package shadows them."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("c2i", "t2i"):
        try:
            spec = importlib.util.find_spec(f"configs.{name}")
        except (ImportError, ValueError):  # no configs package; one in sys.modules without a spec
            return False
        if not (spec and spec.origin) or os.path.realpath(spec.origin) != os.path.join(
                os.path.realpath(checkout), "configs", f"{name}.py"):
            return False
    return True


def job_workdir(workdir, name: str = "workdir") -> str:
    """A job's workdir (`name`: as its caller spells it, main.py's --workdir), refused when empty
    or inside a checkpoint, and `~` expanded (from Python, a folder named '~' was made in the
    current one)."""
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints

    if isinstance(workdir, (str, os.PathLike)) and not str(workdir).strip():
        raise ConfigError(f"{name} is empty: name a folder for this job's outputs")
    workdir = user_path(name, workdir)
    check_outside_checkpoints(workdir)
    return workdir
