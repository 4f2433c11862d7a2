"""Every setting, config file and flag a user can get wrong is refused before any work, in one line
that names the setting and the fix."""

import math
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, c2i_config, t2i_config
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.validation import ConfigError, check


@pytest.mark.parametrize("mode,field,value,message", [
    ("train", "model.param_dtype", "bfloat16", "param_dtype=bfloat16 cannot train: optimiser steps and the EMA"),
    ("train", "model.param_dtype", "float16", "param_dtype=float16 cannot train"),  # any 16-bit weight, not only bf16
    # no loss scaling: the float16 backward pass's cotangents (~1e-8 per pixel at scale) round to zero
    ("train", "model.dtype", "float16", "--config.model.dtype=float16 cannot train: this trainer does no loss scaling"),
    ("train", "model.dtype", "float16", "round to zero. Compute in bfloat16 (--config.model.dtype=bfloat16, as fast on "
                                        "GPUs since Ampere and on TPUs) or float32; float16 is for sampling."),
    # sampling builds the checkpoint's model with these: refused before its weights are read
    ("sample", "model.dtype", "float64", "--config.model.dtype must be one of 'float32', 'bfloat16', 'float16', got "
                                         "'float64'"),
    ("sample", "model.param_dtype", "int8", "--config.model.param_dtype must be one of 'float32', 'bfloat16', "),
    ("train", "train.lr", float("nan"), "--config.train.lr must be a finite number, got nan"),
    ("train", "data.source", "imagefolder", "--config.data.source must be one of 'tfds', 'folder', 'demo', got "),
    ("train", "train.lr", float("inf"), "--config.train.lr must be a finite number"),
    ("train", "train.ema_decay", 1.5, "--config.train.ema_decay must be < 1"),
    ("train", "train.lr_schedule", "linear", "--config.train.lr_schedule must be one of 'constant', 'cosine'"),
    ("train", "train.warmup_steps", 4, "--config.train.warmup_steps (4) must be below train.num_steps (4)"),
    ("sample", "sample.cfg_scale", float("nan"), "--config.sample.cfg_scale must be a finite number"),
    ("sample", "sample.labels", (1.7, 2.2), "--config.sample.labels must be a whole number, got 1.7"),
    ("sample", "sample.batch_size", -2, "--config.sample.batch_size must be >= 1, got -2"),
    ("sample", "sample.seed", 2**32, "--config.sample.seed must be in [0, 4294967295], got 4294967296"),
    ("train", "seed", -1, "--config.seed must be in [0, 4294967295], got -1"),
    ("train", "scheduler.num_stages", 0, "--config.scheduler.num_stages must be >= 1, got 0"),
    # the grid of 100 stages is 4 x 2^99 px: the message printed its 31 digits as the resolution to try
    ("train", "scheduler.num_stages", 100, "--config.scheduler.num_stages 100 is far too many: each stage halves the "
                                           "image, so the full image must be at least 4 (the patch size) x 2^99 px "
                                           "for the first stage to hold a whole patch: --config.data.resolution 64 "
                                           "holds at most 5; set --config.scheduler.num_stages to 5 or less"),
    ("inspect", "model.patch_size", 3, "--config.data.resolution (64) must be a multiple of model.patch_size x 2^("
                                       "scheduler.num_stages - 1) = 24, so that every stage has a whole patch grid, "
                                       "and of 2^scheduler.num_stages = 16, so that the first stage's image halves "
                                       "evenly (training starts that stage from its 2x-downsampled image): try 48 "
                                       "or 96"),
    ("train", "model.out_channels", 1, "--config.model.in_channels and out_channels must be 3, got 3 and 1: the "
                                       "data, previews and samples are RGB images"),
    ("inspect", "model.in_channels", 4, "--config.model.in_channels and out_channels must be 3, got 4 and 3"),
    ("train", "model.attention", "fast", "--config.model.attention must be one of"),
    ("train", "data.expand_ratio", 0.9, "--config.data.expand_ratio must be >= 1, got 0.9"),
    ("train", "data.num_workers", -1, "--config.data.num_workers must be in [0, 128], got -1"),
    ("train", "data.prefetch_batches", 0, "--config.data.prefetch_batches must be in [1, 128], got 0"),
    ("sample", "sample.batch_size", 0, "--config.sample.batch_size must be >= 1, got 0"),
    ("sample", "sample.steps_per_stage", (3, 0, 3, 3), "--config.sample.steps_per_stage must be in [1, 10000]"),
    # 10**9 steps filled a 24 GB host with time grids (killed by the kernel, no message)
    ("sample", "sample.steps_per_stage", 10**9,
     "--config.sample.steps_per_stage must be in [1, 10000], got 1000000000"),
    ("train", "train.preview_steps_per_stage", 10**9, "--config.train.preview_steps_per_stage must be in [1, 10000]"),
    ("train", "train.lock_stale_after_s", 0.0, "--config.train.lock_stale_after_s must be >= 30.0"),
    ("train", "train.lock_stale_after_s", float("nan"), "--config.train.lock_stale_after_s must be a finite number"),
    ("train", "train.init_from_weights", "bogus", "--config.train.init_from_weights must be one of"),
    ("train", "mesh.fsdp", 0, "--config.mesh.fsdp must be >= 1"),
    ("demo", "demo.port", 70000, "--config.demo.port must be in [1, 65535]"),
    ("demo", "demo.max_images", 10**6, "--config.demo.max_images must be in [1, 64], got 1000000"),
    # The page's sliders hold the config's sampling defaults: outside them its own first request failed.
    ("demo", "sample.cfg_scale", 30.0, "the demo page's --config.sample.cfg_scale must be <= 25.0, got 30.0"),
    ("demo", "sample.shift", 0.5, "the demo page's --config.sample.shift must be >= 1.0, got 0.5"),
    ("demo", "sample.steps_per_stage", 150, "the demo page's --config.sample.steps_per_stage must be in [1, 100]"),
    ("eval", "eval.batch_size", 0, "--config.eval.batch_size must be >= 1"),
    ("inspect", "sample.weights", "foo", "--config.sample.weights must be one of"),
    ("train", "data.resolution", 0, "--config.data.resolution must be >= 1, got 0"),  # 0 is a multiple of any grid
    # the near-miss named for a resolution below the grid is the grid itself, not 0
    ("inspect", "data.resolution", 8, "= 32, so that every stage has a whole patch grid: try 32"),
    ("train", "data.root", "s3://bucket/images",
     "--config.data.root: s3://bucket/images: unsupported URL scheme s3://"),
    # the demo config pointed at one's own images trained on the demo set, recording the root as if read
    ("train", "data.root", "/my/images", "--config.data.root is set (/my/images) but data.source='demo' does not read "
                                         "it: add --config.data.source=folder, or drop data.root"),
    ("train", "data.demo_seed", -5, "--config.data.demo_seed must be in [0, 4294967295], got -5"),
    # far past any real use: a run allocated or compiled for minutes, then failed (or hung)
    ("train", "train.batch_size", 2**40, "--config.train.batch_size must be in [1, 1048576], got 1099511627776"),
    ("train", "train.preview_num_images", 10**8, "--config.train.preview_num_images must be in [1, 1024]"),
    ("train", "data.expand_ratio", 1e6, "--config.data.expand_ratio must be <= 4.0, got 1000000.0"),
    ("train", "train.init_from", "http://host/ckpt", "--config.train.init_from: http://host/ckpt: unsupported URL"),
    # the download addresses the README gives, passed as they are: the fix is to download them
    ("eval", "eval.inception_weights", "https://host/pt_inception.pth", "--config.eval.inception_weights: "
     "https://host/pt_inception.pth: unsupported URL scheme https://: nothing is downloaded or uploaded at run time "
     "(an input: download it first, wget https://host/pt_inception.pth, and pass the file's path); paths are local or "
     "gs://"),
    ("eval", "eval.reference", "http://host/ref.npz", "--config.eval.reference: http://host/ref.npz: unsupported URL "
     "scheme http://: nothing is downloaded or uploaded at run time (an input: download it first, wget "
     "http://host/ref.npz,"),
    ("eval", "eval.reference", "hf://org/ref.npz", "--config.eval.reference: hf://org/ref.npz: hf:// (the Hugging Face "
                                                   "Hub) is read here for checkpoints"),
    # a quoting slip: a folder named "a " would be made, or an input not found without saying why
    ("train", "train.init_from", "runs/a ", "--config.train.init_from: 'runs/a ': the name 'a ' ends with a space"),
    ("eval", "eval.samples", " samples.npz", "--config.eval.samples: ' samples.npz': the name ' samples.npz' starts "
                                             "with a space and does not exist (a quoting slip?): remove the space"),
])
def test_every_config_value_is_checked_before_any_work(mode, field, value, message):
    with pytest.raises(ConfigError) as error:
        changes = {field: value, **({"train.lr_schedule": "cosine"} if field == "train.warmup_steps" else {})}
        check(c2i_config(**changes), mode)
    assert message in str(error.value)
    check(c2i_config(), mode)  # the defaults pass


def next_below(x):
    return math.nextafter(x, -math.inf)


def next_above(x):
    return math.nextafter(x, math.inf)


@pytest.mark.parametrize("mode,field,accepted,refused", [
    *[("train", f"train.{field}", 1, 0) for field in ("num_steps", "log_every", "checkpoint_every",
                                                      "keep_checkpoints", "max_bad_steps", "grad_accum_steps")],
    ("train", "train.num_steps", 3.0, 3.5),  # a whole float is a whole number; a fraction is not truncated
    ("train", "train.num_steps", 1, True),  # a bool is no count
    ("sample", "sample.batch_size", jnp.asarray(2), jnp.asarray(2.5)),  # 0-d jax arrays, as the Python API passes
    ("train", "train.batch_size", 1, 0),
    ("train", "train.batch_size", 2**20, 2**20 + 1),
    ("train", "train.preview_num_images", 1024, 1025),
    ("train", "train.preview_num_images", 1, 0),
    ("train", "train.preview_steps_per_stage", 10_000, 10_001),
    ("train", "train.preview_every", 0, -1),
    ("train", "train.lr", math.ulp(0.0), 0.0),
    ("train", "train.warmup_steps", 0, -1),
    ("train", "train.weight_decay", 0.0, -math.ulp(0.0)),
    ("train", "train.grad_clip", math.ulp(0.0), 0.0),
    ("train", "train.ema_decay", 0.0, -math.ulp(0.0)),
    ("train", "train.ema_decay", next_below(1.0), 1.0),
    ("train", "train.label_dropout", 0.0, -math.ulp(0.0)),
    ("train", "train.label_dropout", next_below(1.0), 1.0),
    ("train", "seed", 2**32 - 1, 2**32),
    ("train", "seed", 0, -1),
    ("train", "train.lock_stale_after_s", 30.0, next_below(30.0)),
    ("train", "mesh.fsdp", 1, 0),
    ("train", "scheduler.num_stages", 1, 0),
    # every stage gets timesteps of its own (the tiny config has 4 stages; 4 to 7 gave stage 0 only timestep 0)
    ("train", "scheduler.num_train_timesteps", 8, 7),
    ("inspect", "scheduler.num_train_timesteps", 4, 3),  # inspect builds no schedule: a timestep per stage at least
    ("inspect", "model.depth", 1, 0),
    ("inspect", "model.num_classes", 0, -1),
    ("inspect", "model.cross_attention_dim", 0, -1),
    ("train", "data.expand_ratio", 1.0, next_below(1.0)),
    ("train", "data.expand_ratio", 4.0, next_above(4.0)),
    ("train", "data.num_workers", 0, -1),
    ("train", "data.num_workers", 128, 129),  # processes per host
    ("train", "data.prefetch_batches", 1, 0),
    ("train", "data.prefetch_batches", 128, 129),  # threads per process: 100000 died in grain
    ("train", "data.demo_num_images", 1, 0),
    ("train", "data.demo_num_classes", 1, 0),
    ("train", "data.demo_seed", 2**32 - 1, 2**32),
    ("sample", "sample.batch_size", 1, 0),
    ("sample", "sample.seed", 2**32 - 1, 2**32),
    ("sample", "sample.cfg_scale", 1.0, next_below(1.0)),
    ("sample", "sample.cfg_scale", 1000.0, next_above(1000.0)),
    ("sample", "sample.shift", math.ulp(0.0), 0.0),
    ("sample", "sample.steps_per_stage", 1, 0),
    ("sample", "sample.steps_per_stage", (3, 10_000, 3, 3), (3, 10_001, 3, 3)),
    ("sample", "sample.num_images", 1, 0),
    ("sample", "sample.num_images", 10**7, 10**7 + 1),
    ("sample", "sample.labels", (0, 9), (0, -1)),
    ("sample", "sample.labels", (2.0,), (2.5,)),
    ("eval", "eval.batch_size", 1, 0),
    ("inspect", "seed", 2**32 - 1, 2**32),
    ("demo", "demo.port", 1, 0),
    ("demo", "demo.port", 65535, 65536),
    ("demo", "demo.max_images", 1, 0),
    ("demo", "demo.max_images", 64, 65),
    ("demo", "sample.cfg_scale", 25.0, next_above(25.0)),  # the page's sliders, inside the sampler's own range
    ("demo", "sample.shift", 1.0, next_below(1.0)),
    ("demo", "sample.shift", 100.0, next_above(100.0)),
    ("demo", "sample.steps_per_stage", 100, 101),
])
def test_each_bound_accepts_its_last_value_and_refuses_the_first_past_it(mode, field, accepted, refused):
    """Both sides of every range, whole-number and type rule: an inclusive bound turned strict (or
    the reverse) moves exactly one of the two verdicts. Floats step by one ulp (math.nextafter)."""
    check(c2i_config(**{field: accepted}), mode)
    with pytest.raises(ConfigError, match=re.escape(f"--config.{field} must be")):
        check(c2i_config(**{field: refused}), mode)


def test_a_training_timestep_count_that_feeds_a_stage_one_timestep_names_the_stage_and_its_timestep():
    """The bound test holds the refusal's start only; its words say which stage and which timestep."""
    for timesteps, stages, works in ((7, 4, 8), (3, 2, 4), (23, 9, 25)):
        with pytest.raises(ConfigError) as error:
            check(c2i_config(**{"scheduler.num_train_timesteps": timesteps, "scheduler.num_stages": stages,
                                "data.resolution": 2 ** (stages + 1)}), "train")
        assert (f"{timesteps} timesteps feed stage 0 of {stages} the one timestep 0 at every training index"
                in str(error.value))
        assert f"The smallest larger count that gives every stage timesteps of its own: {works} " in str(error.value)


def test_a_bool_is_neither_a_number_nor_a_count():
    """True is a numbers.Integral: without its own refusal a flag typed into a rate field would train
    at lr 1.0 (a config field of type float casts it before any check, so the check is called directly)."""
    from pixelflow_jax.validation import integer, number

    assert number("train.lr", 1) == 1.0 and integer("train.num_steps", 1) == 1
    for check_value in (number, integer):
        with pytest.raises(ConfigError, match=r"--config.x must be a (finite|whole) number, got True"):
            check_value("x", True)


def test_class_ids_past_their_range_are_named_five_at_most_and_an_image_id_past_int32_is_refused():
    from pixelflow_jax.validation import class_ids, image_ids

    with pytest.raises(ConfigError, match=r"labels must be class ids in \[0, 9\], got \[10, 11, 12, 13, 14\]$"):
        class_ids("labels", list(range(10, 20)), 10)
    with pytest.raises(ConfigError,
                       match=r"image_ids must be whole numbers in \[0, 2\*\*31\), got 2147483648 at index 0$"):
        image_ids([2**31], 1)  # would wrap to a negative int32 id
    assert image_ids([2**31 - 1], 1).tolist() == [2**31 - 1]


def test_a_long_list_of_ids_is_refused_naming_its_bad_entries_alone():
    """A notebook's 100,001 labels with one None among them were refused with every label printed
    (689,000 characters); image_ids named their first five ids, not the bad one; an object array of
    whole numbers (a pandas column's to_numpy()) was refused as not whole."""
    from pixelflow_jax.validation import class_ids, image_ids

    labels = list(range(5)) * 20_000
    with pytest.raises(ConfigError, match=r"^labels must be whole class ids, got None at index 100000 \(1 of 100001 "
                                          r"entries\)$"):
        class_ids("labels", labels + [None], 10)
    with pytest.raises(ConfigError, match=r"^labels must be whole class ids, got 0.5 at index 3, 1.5 at index 4 "
                                          r"\(fractions are not truncated\)$"):
        class_ids("labels", [0, 1, 2, 0.5, 1.5], 10)
    with pytest.raises(ConfigError, match=r"^labels must be whole class ids, got 'goldfish' at index 0, 'shark' "
                                          r"at index 1$"):
        class_ids("labels", ["goldfish", "shark"], 10)
    assert class_ids("labels", np.array([1, 2], dtype=object), 10).tolist() == [1, 2]
    with pytest.raises(ConfigError, match=r"^image_ids must be whole numbers in \[0, 2\*\*31\), got -1 at index 5, "
                                          r"2147483648 at index 6 \(2 of 7 entries\)$"):
        image_ids([0, 1, 2, 3, 4, -1, 2**31], 7)


def test_ids_numpy_cannot_read_as_numbers_are_named_cut_short_and_lists_inside_an_object_array_are_no_ids():
    """An int past int64, a Fraction or a lone list of ids in an object array were read as numbers:
    the refusal named nothing ('got '), or 2-D ids were returned, or numpy's ValueError on ragged
    lists came out; a 1 MB string or a list of 100,000 prompts was printed whole."""
    from fractions import Fraction

    from pixelflow_jax.text.prompts import prompt_list
    from pixelflow_jax.validation import class_ids, image_ids

    with pytest.raises(ConfigError, match=r"got 1180591620717411303424 at index 1$"):
        class_ids("labels", [1, 2**70], 10)
    with pytest.raises(ConfigError, match=r"got Fraction\(1, 2\) at index 0$"):
        image_ids([Fraction(1, 2)], 1)
    for lists in ([[1, 2], [3, 4]], [[1, 2], [3]]):
        ids = np.empty(2, object)
        ids[0], ids[1] = lists
        with pytest.raises(ConfigError, match=r"got \[1, 2\] at index 0, \[3(, 4)?\] at index 1$"):
            class_ids("labels", ids, 10)
        with pytest.raises(ConfigError, match=r"got \[1, 2\] at index 0, \[3(, 4)?\] at index 1$"):
            image_ids(ids, 2)
    with pytest.raises(ConfigError) as error:
        class_ids("labels", [1, "x" * 10**6], 10)
    assert len(str(error.value)) < 200 and "at index 1" in str(error.value)
    with pytest.raises(ValueError) as error:
        prompt_list(["a cat", ["a dog"] * 100_000])
    assert len(str(error.value)) < 200 and "at index 1" in str(error.value)


def test_ragged_lists_of_ids_and_a_bool_among_numbers_are_named():
    """A plain list of lists of different lengths came out as numpy's own ValueError ('inhomogeneous
    shape'), naming no setting; [1, True] was read as the ids [1, 1]."""
    from pixelflow_jax.validation import class_ids, image_ids

    with pytest.raises(ConfigError, match=r"^labels must be a 1-D list of ids, got lists of different lengths: pass"):
        class_ids("labels", [[1, 2], [3]], 10)
    with pytest.raises(ConfigError, match=r"^image_ids must be a 1-D list of ids, got lists of different lengths"):
        image_ids([[0], [1, 2]], 2)
    with pytest.raises(ConfigError, match=r"^labels must be whole ids, got True at index 1$"):
        class_ids("labels", [1, True], 10)
    with pytest.raises(ConfigError, match=r"^image_ids must be whole ids, got True at index 1$"):
        image_ids((0, np.True_), 2)
    assert class_ids("labels", [1, np.int64(2)], 10).tolist() == [1, 2]


def test_image_ids_given_as_a_generator_are_named_so():
    """A generator of ids was refused as 'got shape ()', which names neither it nor the fix."""
    from pixelflow_jax.validation import image_ids

    with pytest.raises(ConfigError, match=r"^image_ids must give one id per image \(2\) as a list or a 1-D array, "
                                          r"got generator <generator"):
        image_ids((i for i in range(2)), 2)
    with pytest.raises(ConfigError, match=r"^image_ids must give one id per image \(2\) as a list or a 1-D array, "
                                          r"got shape \(3,\)$"):
        image_ids([0, 1, 2], 2)
    with pytest.raises(ConfigError, match=r"^image_ids must give one id per image \(1\) as a list or a 1-D array, "
                                          r"got int 7$"):  # was 'got shape ()', as for the generator
        image_ids(7, 1)
    assert image_ids(range(2), 2).tolist() == [0, 1]


MODES = ("train", "sample", "eval", "demo", "inspect")


@pytest.mark.parametrize("changes,refused_by", [
    ({"data.num_workers": -1}, {"train"}),  # the data pipeline: training only
    ({"train.lr": 0.0}, {"train"}),
    ({"model.depth": 0}, {"train", "inspect"}),  # the config's own model (sampling reads the checkpoint's)
    ({"seed": -1}, {"train", "inspect"}),
    ({"sample.solver": "rk4"}, {"sample", "demo"}),
    ({"sample.cfg_scale": 0.5}, {"sample", "demo"}),
    ({"sample.cfg_scale": 0.5, "train.preview_every": 1}, {"sample", "demo", "train"}),  # previews are guided
    ({"sample.weights": "foo"}, {"sample", "demo", "inspect"}),
    ({"eval.batch_size": 0}, {"eval"}),
    ({"eval.batch_size": 0, "eval.reference": "ref.npz"}, {"eval", "sample"}),  # a sampling job that evaluates
    ({"demo.port": 0}, {"demo"}),
    ({"data.source": "tfds", "data.root": "/my/images"}, {"train"}),  # tfds reads no root either
])
def test_each_mode_checks_exactly_the_settings_it_reads(changes, refused_by):
    """validation.CHECKS: a bad value is refused by every mode that reads it, and never by one that
    does not (a sampling command reusing a training command's overrides must still run)."""
    refused = set()
    for mode in MODES:
        try:
            check(c2i_config(**changes), mode)
        except ConfigError:
            refused.add(mode)
    assert refused == refused_by


@pytest.mark.parametrize("mode,field,accepted,refused", [
    ("sample", "sample.max_text_tokens", 0, 1),  # 0: the run's length; 1 leaves no room for a prompt and </s>
    ("sample", "sample.max_text_tokens", 2, 1),
    ("sample", "sample.max_text_tokens", 0, -1),
    ("sample", "sample.max_text_tokens", 4096, 4097),
    ("inspect", "sample.max_text_tokens", 2, 1),
    ("sample", "sample.images_per_prompt", 10**7, 10**7 + 1),
    ("sample", "sample.images_per_prompt", 1, 0),
    ("text-train", "train.caption_dropout", 0.0, -math.ulp(0.0)),
    ("text-train", "train.caption_dropout", next_below(1.0), 1.0),
    ("text-train", "train.max_text_tokens", 2, 1),
    ("text-train", "train.max_text_tokens", 4096, 4097),
    # the choices: an accepted one, and one refused
    ("text-train", "train.text_encoder_dtype", "bfloat16", "float16"),
    ("text-train", "data.missing_captions", "skip", "ignore"),
    ("sample", "sample.text_encoder_param_dtype", "", "int8"),  # '': the run's (or the release's) encoder dtype
    ("sample", "sample.text_encoder_param_dtype", "float16", "float64"),
])
def test_each_bound_of_a_text_setting_accepts_its_last_value_and_refuses_the_next(mode, field, accepted, refused):
    """The text config's bounds, both sides, and its choices; text-train: check_text_training, which train.train runs
    once it knows the model is text-conditional."""
    from pixelflow_jax.validation import check_text_training

    run_check = check_text_training if mode == "text-train" else lambda config: check(config, mode)
    run_check(t2i_config(**{field: accepted}))
    with pytest.raises(ConfigError, match=re.escape(f"--config.{field} must ")):
        run_check(t2i_config(**{field: refused}))


def test_a_text_configs_unknown_data_source_lists_the_sources_with_captions():
    """tfds has no captions (a text model refuses it); a typo's error listed it among the choices."""
    with pytest.raises(ConfigError, match=re.escape("--config.data.source must be one of 'folder', 'array_record', "
                                                    "'demo', got 'webdataset'")):
        check(t2i_config(**{"data.source": "webdataset"}), "train")


@pytest.mark.parametrize("mode,value", [("sample", "(a red disk, a blue square)"), ("train", "[a fox, a car]"),
                                        ("sample", "(a (red) fox, a car)")])
def test_a_list_of_unquoted_prompts_is_refused_rather_than_sampled_as_one_prompt(mode, value):
    """The command line gives such a list as one string: it sampled one image of the whole text."""
    with pytest.raises(ConfigError, match=re.escape(f"--config.sample.prompts is the one string {value!r}, which would "
                                                    "be a single prompt: a list needs each prompt quoted")):
        check(t2i_config(**{"sample.prompts": value, "train.preview_every": 4}), mode)
    # a prompt that only starts, or only ends, with a bracketed part is a prompt, not a list
    for one_prompt in ("a lighthouse at dusk, oil painting", "(masterpiece)", ("(a, b)",), "(best quality), a red fox",
                       "a red fox, (best quality)", "(masterpiece, best quality), a cat, (red)", "(a, b) and [c, d]",
                       "(red fox (best, quality))x"):  # emphasis groups, not one bracketed list
        check(t2i_config(**{"sample.prompts": one_prompt, "train.preview_every": 4}), mode)
    # a comma inside a nested group only, brackets that never close, or a last bracket of the other kind than the
    # first: no list either
    for one_prompt in ("(a red fox (best, quality))", "(a red fox, (best quality)", "(a red fox, a blue car]"):
        check(t2i_config(**{"sample.prompts": one_prompt, "train.preview_every": 4}), mode)


@pytest.mark.parametrize("mode", ["sample", "train"])
def test_a_prompt_that_names_a_prompts_file_is_refused_naming_prompts_file(mode, tmp_path, monkeypatch):
    """--config.sample.prompts=prompts.txt (meant for prompts_file) sampled one image of the words
    'prompts.txt', and previewed it at every preview of a run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "my prompts.list").write_text("a red disk\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "my list").write_text("a red disk\n")
    (tmp_path / "a red fox").mkdir()  # a folder is no prompts file
    for value in ("prompts.txt", ("a red disk", "~/prompts.TXT"), "gs://bucket/prompts.txt", "my prompts.list",
                  "~/my list", "prompts.txt "):
        file = value if isinstance(value, str) else value[1]
        with pytest.raises(ConfigError, match=re.escape(f"--config.sample.prompts is the prompt {file!r}, which names "
                                                        "a file: prompts read from a text file, one per line, are "
                                                        f"--config.sample.prompts_file={file}")):
            check(t2i_config(**{"sample.prompts": value, "train.preview_every": 4}), mode)
    for prompt in ("a sign that says notes.txt", "my prompts", "README.md", "a red fox"):  # a prompt, no file's name
        check(t2i_config(**{"sample.prompts": prompt, "train.preview_every": 4}), mode)


@pytest.mark.parametrize("mode,field,value", [
    ("sample", "sample.prompts", ("a red disk", "caf\udce9 au lait")),  # the byte 0xe9 of a Latin-1 terminal
    ("sample", "sample.prompts", "caf\udce9"),
    ("sample", "sample.negative_prompt", "blurry, caf\udce9"),
    ("train", "sample.negative_prompt", "caf\udce9"),  # every preview is guided by it
    ("train", "sample.prompts", ("caf\udce9",)),
])
def test_a_prompt_holding_bytes_that_are_not_utf8_is_refused_before_any_work(mode, field, value):
    """sentencepiece refused it only when the prompt was first tokenized: a traceback after a
    sampling job's settings.json was written, or at a training run's first preview, losing every
    step since its last checkpoint."""
    config = t2i_config(**{field: value, "train.preview_every": 4})
    with pytest.raises(ConfigError, match=re.escape(f"--config.{field} holds the byte 0xe9, which is not UTF-8, "
                                                    "after '")) as refused:
        check(config, mode)
    # a prompts file is the way round the terminal for the prompts, not for the negative prompt it cannot hold
    assert ("put the prompts in a UTF-8 file for --config.sample.prompts_file" in str(refused.value)) == (
        field == "sample.prompts")
    check(t2i_config(**{field: value.replace("\udce9", "\u00e9") if isinstance(value, str) else
                        tuple(p.replace("\udce9", "\u00e9") for p in value)}), mode)  # the same text as UTF-8


def test_a_utf8_prompt_read_in_an_ascii_locale_is_refused_naming_the_locale_not_the_quoting(tmp_path):
    """Under LC_ALL=C with PYTHONUTF8=0 a typed 'é' reaches sys.argv as the escaped bytes 0xc3 0xa9: the
    list of prompts stayed one string (the override's parser refuses the escapes) and was refused as an
    unquoted list, and a prompt alone was blamed on a Latin-1 terminal. Nothing is written."""
    workdir = tmp_path / "run"
    for prompts in ('("un café noir",)', "un café noir"):
        command = [sys.executable, "main.py", "--config=configs/t2i.py:tiny", f"--workdir={workdir}", "--mode=sample",
                   f"--config.sample.prompts={prompts}"]
        # bytes, as a C locale's shell passes them; the child prints its error in ASCII with escapes
        refused = subprocess.run([os.fsencode(word) for word in command], cwd=REPO, capture_output=True, timeout=300,
                                 env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
        error = refused.stderr.decode("ascii", "replace")
        assert refused.returncode != 0
        assert "holds the byte 0xc3, which Python did not read as UTF-8" in error, error
        assert "(a C or POSIX locale with PYTHONUTF8=0); run it with LC_ALL=C.UTF-8 or PYTHONUTF8=1" in error, error
        assert "caf\\xe9 noir" in error, error  # the text as UTF-8 reads it
        assert "a list needs each prompt quoted" not in error and "Latin-1" not in error
        assert not workdir.exists()


def test_escaped_bytes_are_blamed_on_the_locale_only_where_they_spell_utf8_and_the_locale_decoded_them(monkeypatch):
    from pixelflow_jax.validation import unicode_text

    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    with pytest.raises(ConfigError, match=re.escape("run it with LC_ALL=C.UTF-8 or PYTHONUTF8=1")):
        unicode_text("x", "caf\udcc3\udca9")  # 'é' in UTF-8
    for text, decoded_by_the_locale in (("caf\udce9", True),  # Latin-1 'é': no UTF-8
                                        ("caf\udcc3\udca9", False)):  # a web request's escapes
        with pytest.raises(ConfigError, match=re.escape("which is not UTF-8")):
            unicode_text("x", text, decoded_by_the_locale=decoded_by_the_locale)
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "utf-8")
    with pytest.raises(ConfigError, match=re.escape("uses another encoding (such as Latin-1); give it as UTF-8 text")):
        unicode_text("x", "caf\udcc3\udca9")  # this Python reads UTF-8: the bytes were escaped elsewhere


def test_a_lone_surrogate_is_named_as_the_byte_it_stands_for_or_as_half_a_pair():
    """Python keeps an undecodable byte 0x80-0xff of an argument as U+DC80-U+DCFF: those are named
    as the byte, any other lone surrogate as half of a pair; the first of a run of them is named, after
    40 characters before it, in 200 of the text."""
    from pixelflow_jax.validation import unicode_text

    for code, what in ((0xDC80, "the byte 0x80, which is not UTF-8"), (0xDCFF, "the byte 0xff, which is not UTF-8"),
                       (0xDC7F, "U+DC7F, half of a UTF-16 surrogate pair"),
                       (0xD83D, "U+D83D, half of a UTF-16 surrogate pair")):
        text = f"a{chr(code)}b"
        with pytest.raises(ConfigError, match=re.escape(f"--config.x holds {what}, after 'a' in {text!r}: ")):
            unicode_text("x", text)
    with pytest.raises(ConfigError, match=re.escape("--config.x holds the byte 0xe9, which is not UTF-8, after 'caf'")):
        unicode_text("x", "caf\udce9\udce8")  # Latin-1 'éè': one error spans both
    text = "x" * 50 + "\udce9" + "y" * 300
    with pytest.raises(ConfigError, match=re.escape(f"after {'x' * 40!r} in {text[:200]!r}: the terminal")):
        unicode_text("x", text)


def test_prompts_are_strings_given_alone_or_in_a_list_or_tuple():
    """A Python list of prompts is sampled; a list holding other than strings is one line (a number
    in it was an AttributeError traceback); an unquoted list is named by its first 200 characters."""
    check(t2i_config(**{"sample.prompts": ["a red disk", "a blue car"]}), "sample")
    with pytest.raises(ConfigError, match=re.escape("--config.sample.prompts must be a prompt or a list of prompts "
                                                    "(strings), got ('a red disk', 2)")):
        check(t2i_config(**{"sample.prompts": ("a red disk", 2)}), "sample")
    long_list = "(" + ", ".join(["a red fox"] * 100) + ")"
    with pytest.raises(ConfigError, match=re.escape(f"is the one string {long_list[:200]!r}, which would be")):
        check(t2i_config(**{"sample.prompts": long_list}), "sample")


def test_text_sampling_refuses_the_class_settings_and_class_sampling_takes_class_names():
    """num_images and labels are not read by a text job (it makes images from the prompts); a class
    job's labels may name class folders (checked against the checkpoint later)."""
    for field, value in (("num_images", 4), ("labels", (1,))):
        with pytest.raises(ConfigError, match=rf"^--config.sample.{field} does not apply to text-to-image sampling"):
            check(t2i_config(**{f"sample.{field}": value, "sample.prompts": ("a red disk",)}), "sample")
    check(c2i_config(**{"sample.labels": ("cat", "dog", 3)}), "sample")


def test_only_the_cosine_schedule_needs_its_warmup_to_end_before_the_last_step():
    """The constant schedule's warmup is a ramp a run may stop inside; cosine decays from its end."""
    check(c2i_config(**{"train.lr_schedule": "constant", "train.warmup_steps": 8, "train.num_steps": 4}), "train")
    check(c2i_config(**{"train.lr_schedule": "cosine", "train.warmup_steps": 3, "train.num_steps": 4}), "train")


def test_float16_compute_is_refused_by_training_alone():
    """Training refuses float16 (no loss scaling), not bfloat16, which has float32's range; sampling
    and inspection compute in float16 as asked."""
    for dtype in ("float32", "bfloat16"):
        check(c2i_config(**{"model.dtype": dtype}), "train")
    for mode in ("sample", "inspect"):
        check(c2i_config(**{"model.dtype": "float16"}), mode)


def test_a_config_without_model_param_dtype_is_checked_as_float32_weights():
    """A config of an earlier version, or built in Python, may lack the field: the model's default."""
    for mode in ("train", "sample", "inspect"):
        config = c2i_config()
        del config.model["param_dtype"]
        check(config, mode)


def test_the_resolution_offered_is_a_grid_and_a_stage_count_whose_grid_is_the_largest_side_is_not_too_many():
    """Below the grid, the grid alone is offered (no 'try 0'); a stage count whose least resolution
    is LARGEST_IMAGE_SIDE itself is a resolution to raise, one stage more is too many."""
    from pixelflow_jax.validation import LARGEST_IMAGE_SIDE

    assert LARGEST_IMAGE_SIDE == 2**16  # 4 (the patch size) x 2^(15 - 1): 15 stages
    for changes, ending in (({"data.resolution": 8}, "= 32, so that every stage has a whole patch grid: try 32"),
                            ({"scheduler.num_stages": 15}, "= 65536, so that every stage has a whole patch grid: "
                                                           "try 65536")):
        with pytest.raises(ConfigError) as error:
            check(c2i_config(**changes), "inspect")
        assert str(error.value).endswith(ending), str(error.value)
    with pytest.raises(ConfigError, match=r"^--config.scheduler.num_stages 16 is far too many"):
        check(c2i_config(**{"scheduler.num_stages": 16}), "inspect")


def test_every_path_field_is_expanded_and_only_checkpoints_and_encoders_read_the_hub(tmp_path, monkeypatch):
    """validation.PATH_FIELDS, each by name: '~' expanded before any work, an unset one ('' or None)
    left as it is; hf:// is read for HUB_FIELDS' checkpoints and encoders only."""
    monkeypatch.setenv("HOME", str(tmp_path))
    hub_fields = ("train.init_from", "train.text_encoder", "sample.checkpoint", "sample.text_encoder")
    for field in ("data.root", "data.tfds_data_dir", "train.init_from", "train.text_encoder", "sample.checkpoint",
                  "sample.text_encoder", "sample.prompts_file", "eval.samples", "eval.reference",
                  "eval.inception_weights"):
        section, name = field.split(".")
        configs = [c for c in (c2i_config(), t2i_config()) if name in c[section]]
        assert configs, field
        for config in configs:
            config[section][name] = "~/x"
            check(config, "eval")
            assert config[section][name] == str(tmp_path / "x"), field
            for unset in ("", None):
                config[section][name] = unset
                check(config, "eval")
                assert config[section][name] == unset, field
            config[section][name] = "hf://org/repo"
            if field in hub_fields:
                check(config, "eval")
                assert config[section][name] == "hf://org/repo"
            else:
                with pytest.raises(ConfigError, match=f"^--config.{field}: hf://org/repo: "):
                    check(config, "eval")


def test_a_jobs_workdir_is_named_as_its_caller_spells_it():
    """job_workdir's name is the Python argument's (main.py passes --workdir); a blank path object
    is empty too."""
    import pathlib

    from pixelflow_jax import storage
    from pixelflow_jax.validation import job_workdir

    with pytest.raises(ConfigError, match=r"^workdir is empty: name a folder"):
        job_workdir(pathlib.Path(" "))
    for name in ("workdir", "--workdir"):
        with pytest.raises(storage.StorageError, match=rf"^{name}: gs:/b/run looks like a URL"):
            job_workdir("gs:/b/run", name)


def test_the_command_line_refuses_a_bad_value_before_writing_anything(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}", "--mode=sample",
               "--config.sample.checkpoint=whatever", "--config.sample.cfg_scale=nan"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "--config.sample.cfg_scale must be a finite number" in result.stderr
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_distributed_without_a_cluster_or_its_flags_names_the_flags(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}", "--distributed"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: --distributed: " in result.stderr and "--coordinator_address=HOST:PORT" in result.stderr
    assert not workdir.exists()


def test_a_first_stage_that_training_cannot_halve_is_refused_before_the_run_starts():
    """Patch 3 at 72 px has a whole patch grid at every stage (3, 6, 12, 24 patches across), but its
    9 px first stage cannot be halved, as training's start point for that stage is: the run crashed
    at its first step with a reshape traceback, a workdir recorded."""
    config = c2i_config(**{"model.patch_size": 3, "data.resolution": 72})
    with pytest.raises(ConfigError, match=r"must be a multiple of model.patch_size x 2\^\(scheduler.num_stages - 1\) = "
                                          r"24, .*and of 2\^scheduler.num_stages = 16, .*: try 48 or 96"):
        check(config, "train")
    config.data.resolution = 96  # 12 px first stage: halves
    check(config, "train")


def test_sampling_a_checkpoint_of_other_than_rgb_images_is_refused_before_its_weights_are_read():
    from configs import c2i
    from pixelflow_jax.sampling.sample_conditioning import check_config_kind

    sample = c2i.get_config("tiny").sample
    check_config_kind(sample, ModelConfig(num_classes=10))
    with pytest.raises(ValueError, match=r"in_channels 3 and out_channels 1: the sampler makes RGB images"):
        check_config_kind(sample, ModelConfig(num_classes=10, out_channels=1))
    with pytest.raises(ValueError, match=r"in_channels 4 and out_channels 3: the sampler makes RGB images"):
        check_config_kind(sample, ModelConfig(num_classes=10, in_channels=4))  # RGB out of a 4-channel input


def test_an_unconditional_model_is_refused_by_sampling_the_demo_page_and_the_python_sampler():
    """A converted model with num_classes 0 and no cross-attention (the release has none; training
    here refuses it): sampling recorded settings.json with labels i mod 0 and then said the model
    was text-conditional, the demo page died on its empty class list, and generate() and
    generate_from_prompts() each sent the user to the other."""
    from flax import nnx

    from configs import c2i, t2i
    from pixelflow_jax.checkpoints.checkpoint import CheckpointConfig
    from pixelflow_jax.sampling.cascade import CascadeSampler
    from pixelflow_jax.sampling.sample_conditioning import check_config_kind

    unconditional = ModelConfig(**{**c2i.get_config("tiny").model.to_dict(), "num_classes": 0})
    message = r"this model is unconditional \(model.num_classes = 0 and no text cross-attention\)"
    for sample in (c2i.get_config("tiny").sample, t2i.get_config("tiny").sample):  # the demo page's check too
        with pytest.raises(ValueError, match=message):
            check_config_kind(sample, unconditional)
    from pixelflow_jax.model import PixelFlow

    model = PixelFlow(unconditional, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        CascadeSampler(model, CheckpointConfig(unconditional, resolution=64))
    with pytest.raises(ValueError, match=r"this model has no class table \(model.num_classes = 0\)"):
        model(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), class_labels=jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("config,message", [
    ("configs/c2.py:demo", "error: --config file configs/c2.py does not exist (this project's configs: configs/c2i.py, "
                           "configs/t2i.py)"),
    ("configs/c2i.py:dmeo", "error: configs/c2i.py:dmeo could not be read: its code raised ValueError: unknown c2i "
                            "config variant 'dmeo'; choose '' (XL/4), 'tiny' or 'demo' (line "),
    ("gs://b/c2i.py:demo", "error: --config gs://b/c2i.py:demo is a URL: flag and config files are read from local "
                           "paths only: copy it here first (gcloud storage cp gs://b/c2i.py .)"),  # was "file gs"
    ("configs", "error: --config configs is a folder: name a config file (this project's configs: configs/c2i.py, "
                "configs/t2i.py)"),  # was "configs does not exist"
    # the release's train.py takes its config.yaml: that was "not a Python file of settings (line 1: ...)"
    ("tests/fixtures/c2i_tiny/config.yaml", "error: --config tests/fixtures/c2i_tiny/config.yaml is a YAML file (a "
                                            "release config.yaml?); main.py's configs are Python: configs/c2i.py, "
                                            "configs/t2i.py, with --config.FIELD=VALUE overrides (such as "
                                            "--config.model.depth=12); a release folder's weights are read as "
                                            "--config.sample.checkpoint=FOLDER or --config.train.init_from=FOLDER"),
])
def test_a_config_file_or_variant_that_does_not_exist_is_one_line(tmp_path, config, message):
    command = [sys.executable, "main.py", f"--config={config}", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("arguments", [["configs/c2i.py:demo", "--workdir=WORKDIR"],
                                       ["--workdir", "WORKDIR", "configs/c2i.py:demo"],
                                       ["--workdir=WORKDIR", "configs/c2i.py:demo"],  # a flag with its value
                                       # a boolean flag takes no next word: absl left it aside, as here
                                       ["--distributed", "configs/c2i.py:demo", "--workdir=WORKDIR"],
                                       ["--workdir=WORKDIR", "--nodistributed", "configs/c2i.py:demo"]])
def test_a_config_file_given_without_its_flag_is_named_with_it(tmp_path, arguments):
    """As the release's scripts take a config: absl said only 'Flag --config must have a value other
    than None'."""
    command = [sys.executable, "main.py", *(a.replace("WORKDIR", str(tmp_path / "run")) for a in arguments)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith(
        "error: configs/c2i.py:demo is given without its flag: a config file is --config=configs/c2i.py:demo\n"), \
        result.stderr
    assert not (tmp_path / "run").exists()


def test_a_py_word_that_is_a_flags_value_or_beside_a_config_is_no_config_file_given_without_its_flag(tmp_path):
    """A .py word that is another flag's value (--workdir x.py) is that flag's. Apart from the test
    above: its five argument lists ran these same two commands five times (~4 s a start of main.py)."""
    taken = subprocess.run([sys.executable, "main.py", "--workdir", str(tmp_path / "run.py")], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert "Flag --config must have a value other than None" in taken.stderr, taken.stderr
    # beside a --config, a .py word is no config file given without its flag, but a word too many
    extra = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", "notes.py",
                            f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert extra.stderr.startswith("error: unexpected arguments ['notes.py']\n"), extra.stderr


@pytest.mark.parametrize("flag,message", [
    ("--pretrained=PixelFlow-XL-c2i", "error: --pretrained is a flag of the release's sample_ddp.py; here it is "
                                      "--config.sample.checkpoint=FOLDER (a release folder is read as it is)"),
    ("--num-steps-per-stage=10", "error: --num-steps-per-stage is a flag of the release's sample_ddp.py; here it is "
                                 "--config.sample.steps_per_stage=N"),
    ("--output-dir=exp0001", "error: --output-dir is a flag of the release's train.py; here it is --workdir=FOLDER"),
    ("--class_cond", "error: --class_cond is a flag of the release's app.py; here it is --config=configs/c2i.py "
                     "(configs/t2i.py for text)"),
])
def test_a_flag_of_the_releases_scripts_names_this_projects_setting_for_it(tmp_path, flag, message):
    """A user of the release typed its flags and got absl's "Unknown command line flag 'pretrained'",
    with --helpshort, which lists none of the --config.* settings that take their place."""
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}",
                             flag], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith(message + "\n"), result.stderr
    assert not (tmp_path / "run").exists()


def test_every_setting_named_for_a_flag_of_the_releases_scripts_is_a_field_of_the_configs():
    """The test above runs four of the table's flags; a setting of the others renamed since would send
    a user of the release to an override main.py refuses."""
    from configs import c2i
    from pixelflow_jax.cli.config_file import RELEASE_FLAGS

    config = c2i.get_config("demo")
    named = [field for _, setting in RELEASE_FLAGS.values() for field in re.findall(r"--config\.(\w+\.\w+)", setting)]
    assert named and all(field.split(".")[1] in config[field.split(".")[0]] for field in named), named


def test_the_config_and_flag_files_a_command_names_are_found_in_every_form_absl_reads():
    """--NAME=VALUE, --NAME VALUE and -NAME (absl's single dash), each occurrence; a flag whose
    name only starts with NAME, a value that merely equals it, and a last --NAME without a value
    are not taken (main.py then refuses a bucket URL among them before absl opens it)."""
    from pixelflow_jax.cli.config_file import flag_values

    argv = ["main.py", "--config=gs://b/a.py:demo", "-config", "gs://b/c.py", "--config_x=1", "--mode", "config",
            "--flagfile", "gs://b/run.flags", "-flagfile=local.flags", "--config"]
    assert flag_values(argv, "config") == ["gs://b/a.py:demo", "gs://b/c.py"]
    assert flag_values(argv, "flagfile") == ["gs://b/run.flags", "local.flags"]


def test_the_sibling_config_is_named_for_its_own_fields_only_and_a_path_below_a_value_has_none():
    from pixelflow_jax.cli.config_file import configs_folder, sibling_config_with

    ours = f"{configs_folder()}/c2i.py"
    assert sibling_config_with(f"{ours}:tiny", "train.caption_dropout") == f"{configs_folder()}/t2i.py"
    assert sibling_config_with(f"{ours}:tiny", "train.caption_dropout.x") is None  # a float has no fields
    assert sibling_config_with(ours, "train.no_such_field") is None
    assert sibling_config_with("/home/me/c2i.py", "train.caption_dropout") is None  # a user's file of that name


def test_a_mistake_inside_a_users_config_file_and_cluster_flags_without_distributed_are_named(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("import ml_collections\n\ndef get_config():\n"
                    "    config = ml_collections.ConfigDict({'train': {'batch_size': 8}})\n"
                    "    config.train.lr = config.train.batchsize * 1e-4\n    return config\n")
    for args, message in (
            ([f"--config={mine}"], f"error: {mine} could not be read: its get_config raised KeyError: 'batchsize'"),
            (["--config=configs/c2i.py:tiny", "--num_processes=2", "--process_id=1"],  # each would train alone
             "error: --coordinator_address, --num_processes and --process_id apply with --distributed")):
        result = subprocess.run([sys.executable, "main.py", *args, f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_any_error_the_code_of_a_users_config_file_raises_is_one_line_with_its_line(tmp_path):
    """A NameError in get_config (a misspelt variable), or any error but the few main.py caught, was
    a traceback of 20 absl and ml_collections frames around the one line that mattered."""
    (tmp_path / "in_get_config.py").write_text("import ml_collections\n\ndef get_config():\n"
                                               "    return ml_collections.ConfigDict({'lr': lr_base * 2})\n")
    (tmp_path / "on_import.py").write_text("import ml_collections\n\nSCALE = 1 / 0\n")
    for name, message in (("in_get_config.py", "its code raised NameError: name 'lr_base' is not defined (line 4)"),
                          ("on_import.py", "its code raised ZeroDivisionError: division by zero (line 3)")):
        result = subprocess.run([sys.executable, "main.py", f"--config={tmp_path / name}",
                                 f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 1 and result.stderr == f"error: {tmp_path / name} could not be read: {message}\n", \
            result.stderr
        assert not (tmp_path / "run").exists()
    # raised in a helper of get_config's: the helper's line, where the mistake is; of the last --config, which
    # absl reads (an earlier one named the repo's c2i.py, and the error went by as a traceback)
    (tmp_path / "helper.py").write_text("import ml_collections\n\n\ndef scaled(lr):\n    return lr * LR_SCALE\n\n\n"
                                        "def get_config():\n"
                                        "    return ml_collections.ConfigDict({'lr': scaled(1e-4)})\n")
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny",
                             f"--config={tmp_path / 'helper.py'}", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.stderr == (f"error: {tmp_path / 'helper.py'} could not be read: its code raised NameError: name "
                             "'LR_SCALE' is not defined (line 5)\n"), result.stderr


def test_a_config_file_that_is_no_config_or_a_missing_flagfile_is_one_line(tmp_path):
    """Each ended in a 50-line traceback of absl and ml_collections frames (the flag file's before
    main.py had defined its flags)."""
    files = {"syntax.py": "def get_config():\n    return dict(a=1\n", "typo.py": "import ml_collection\n",
             "empty.py": "x = 1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for args, message in (
            ([f"--config={tmp_path / 'syntax.py'}"], "syntax.py is not a Python file of settings (line 2: '(' was "
                                                     "never closed); a config file defines get_config()"),
            ([f"--config={REPO}/README.md"], "README.md is not a Python file of settings (line "),
            ([f"--config={tmp_path / 'typo.py'}"], "typo.py could not be read: No module named 'ml_collection'"),
            ([f"--config={tmp_path / 'empty.py'}"], "empty.py defines no get_config(): a config file defines"),
            ([f"--flagfile={tmp_path / 'run.flags'}", "--config=configs/c2i.py:tiny"],
             "error: --flagfile cannot be read: [Errno 2] No such file or directory"),
            (["--flagfile", "gs://b/run.flags", "--config=configs/c2i.py:tiny"],
             "error: --flagfile gs://b/run.flags is a URL: flag and config files are read from local paths only: "
             "copy it here first (gcloud storage cp gs://b/run.flags .)")):
        result = subprocess.run([sys.executable, "main.py", *args, f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_config_file_whose_get_config_returns_no_config_or_fails_in_ml_collections_is_one_line(tmp_path):
    """Each was a message about ml_collections' insides: a ValueError or TypeError of the file's own
    code (a ConfigDict field set to a value of another type, int() of an unset environment variable)
    came without its line and with a pointer to the flags' help; an OSError (a file the config reads)
    as 'get_config() returned a _ErrorConfig'; None as '--config must have a value other than None'
    after a logged warning; a FrozenConfigDict as an error its get_config raised; a variant given to a
    get_config that takes none (or none to one that needs one) as a bare TypeError."""
    start = "from configs import c2i\n\ndef get_config():\n    config = c2i.get_config('tiny')\n"
    files = {"type.py": start + "    config.model.depth = 2.5\n    return config\n",
             "env.py": "import os\n\ndef get_config():\n    return int(os.environ.get('R16C_UNSET', 'x'))\n",
             "reads.py": "def get_config():\n    return open('/nonexistent/classes.txt').read()\n",
             "none.py": start, "frozen.py": "import ml_collections\n" + start
             + "    return ml_collections.FrozenConfigDict(config)\n",
             "plain.py": start + "    return config\n",
             "variant.py": "from configs import c2i\n\ndef get_config(variant):\n    return c2i.get_config(variant)\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    from pixelflow_jax.cli.config_file import WHAT_A_CONFIG_FILE_IS

    for config, message in (
            ("type.py", "type.py could not be read: its code raised TypeError: Could not override field 'depth' "
                        "(reference). 2.5 is of original type <class 'float'> and cannot be casted to type <class "
                        "'int'> (line 5)"),
            ("env.py", "env.py could not be read: its code raised ValueError: invalid literal for int() with base 10: "
                       "'x' (line 4)"),
            ("reads.py", "reads.py could not be read: its code raised FileNotFoundError: [Errno 2] No such file or "
                         "directory: '/nonexistent/classes.txt' (line 2)"),
            ("none.py", f"none.py: get_config() returned None (no return statement?); {WHAT_A_CONFIG_FILE_IS}"),
            ("frozen.py", "frozen.py: get_config() returned a FrozenConfigDict, whose fields --config.FIELD=VALUE "
                          "cannot set: return an ml_collections.ConfigDict (ConfigDict(frozen) makes one)"),
            ("plain.py:tiny", "plain.py:tiny: this get_config() takes no variant: drop ':tiny'"),
            ("variant.py", "variant.py: this get_config() takes a variant (its argument variant): give one as "
                           "--config=FILE:VARIANT")):
        result = subprocess.run([sys.executable, "main.py", f"--config={tmp_path / config}",
                                 f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 1 and result.stderr == f"error: {tmp_path}/{message}\n", result.stderr
        assert not (tmp_path / "run").exists()
    result = subprocess.run([sys.executable, "main.py", "--config=", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.stderr.startswith("error: --config is given without a file name: name a config file (this "
                                    "project's configs: configs/c2i.py, configs/t2i.py)"), result.stderr


def test_a_config_file_imports_the_python_files_beside_it(tmp_path):
    """Experiments that share a base config (exp1.py: from my_base import base) failed with 'No module
    named my_base', even run from their folder: only main.py's folder was on the import path. The
    folder goes last, so a file there named like an installed module (colorsys.py) does not hide it."""
    folder = tmp_path / "my configs"
    folder.mkdir()
    (folder / "my_base.py").write_text("from configs import c2i\n\n\ndef base():\n    config = c2i.get_config('tiny')"
                                       "\n    config.data.resolution = 63\n    return config\n")
    (folder / "colorsys.py").write_text("raise ImportError('the colorsys.py beside the config was imported')\n")
    (folder / "exp1.py").write_text("import colorsys\nfrom my_base import base\n\n\ndef get_config():\n"
                                    "    return base()\n")
    result = subprocess.run([sys.executable, "main.py", f"--config={folder / 'exp1.py'}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: --config.data.resolution (63) must be a "
                                                               "multiple of"), result.stderr  # read, then checked
    assert not (tmp_path / "run").exists()


def test_a_config_file_named_in_a_flagfile_imports_the_python_files_beside_it(tmp_path):
    """--flagfile=run.flags holding --config=exp1.py: the folder of exp1.py was not on the import path."""
    folder = tmp_path / "my configs"
    folder.mkdir()
    (folder / "my_base.py").write_text("from configs import c2i\n\n\ndef base():\n    config = c2i.get_config('tiny')"
                                       "\n    config.data.resolution = 63\n    return config\n")
    (folder / "exp1.py").write_text("from my_base import base\n\n\ndef get_config():\n    return base()\n")
    (tmp_path / "run.flags").write_text(f"--config={folder / 'exp1.py'}\n")
    result = subprocess.run([sys.executable, "main.py", f"--flagfile={tmp_path / 'run.flags'}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: --config.data.resolution (63) must be a "
                                                               "multiple of"), result.stderr  # read, then checked


@pytest.mark.parametrize("config_text,message", [
    ("def get_config():\n    return 1 / 0\n",  # was a ZeroDivisionError traceback
     "{config} could not be read: its code raised ZeroDivisionError: division by zero (line 2)"),
    (None, "--config file {config} does not exist (this project's configs: "  # was 'Failed loading config_config'
           "configs/c2i.py, configs/t2i.py)"),
    ("def get_config():\n    pass\n", "{config}: get_config() returned None (no return statement?)"),
])
def test_a_config_file_named_in_a_flagfile_is_named_in_its_errors_as_on_the_command_line(tmp_path, config_text,
                                                                                         message):
    """The config file's checks and load errors read --config from the command line only: named in
    a --flagfile, a config whose code raised was a traceback, and a missing one was named
    'config_config' by ml_collections."""
    config = tmp_path / "exp.py"
    if config_text is not None:
        config.write_text(config_text)
    (tmp_path / "run.flags").write_text(f"--config={config}\n")
    result = subprocess.run([sys.executable, "main.py", f"--flagfile={tmp_path / 'run.flags'}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {message.format(config=config)}"), \
        result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_users_config_lacking_a_field_or_holding_one_no_mode_reads_is_named():
    """A config built without a section (or as a dict) ended in a traceback deep inside a mode; a
    field misspelt in the file would never be read, and the run would go on without the setting."""
    sys.path.insert(0, REPO)
    from configs import c2i, t2i
    from pixelflow_jax.cli.config_file import check_config_fields

    for config in (c2i.get_config("demo"), t2i.get_config("tiny")):  # this project's own pass
        check_config_fields(config, "mine.py")
    config = c2i.get_config()
    del config["eval"]
    del config.sample["cfg_scale"]
    with pytest.raises(ConfigError, match=r"^mine.py lacks eval, sample.cfg_scale: fields of configs/c2i.py"):
        check_config_fields(config, "mine.py")
    config = t2i.get_config()
    del config.train["caption_dropout"]  # a text config's field: checked against the text config
    with pytest.raises(ConfigError, match=r"lacks train.caption_dropout: fields of configs/t2i.py"):
        check_config_fields(config, "mine.py")
    config = c2i.get_config()
    config.train.num_step = 5
    with pytest.raises(ConfigError, match=r"has fields that no mode reads: train.num_step \(meant train.num_steps\?\)"):
        check_config_fields(config, "mine.py")
    with pytest.raises(ConfigError, match=r"get_config\(\) returned a dict; a config file defines get_config\(\)"):
        check_config_fields(c2i.get_config().to_dict(), "mine.py")
    # Eight fields named at most, the rest counted; a field like none of the config's gets no guess.
    config = c2i.get_config()
    dropped = sorted(f"sample.{field}" for field in config.sample)[:10]
    for field in dropped:
        del config.sample[field.split(".")[1]]
    with pytest.raises(ConfigError, match=re.escape(f"mine.py lacks {', '.join(dropped[:8])} and 2 more: fields of")):
        check_config_fields(config, "mine.py")
    config.sample[dropped[9].split(".")[1]] = c2i.get_config().sample[dropped[9].split(".")[1]]  # 9 missing
    with pytest.raises(ConfigError, match=re.escape(f"mine.py lacks {', '.join(dropped[:8])} and 1 more: fields of")):
        check_config_fields(config, "mine.py")
    config = c2i.get_config()
    config.zzqx = 1
    for i in range(9):
        config.train[f"num_step{i}"] = 5
    with pytest.raises(ConfigError) as error:
        check_config_fields(config, "mine.py")
    named = str(error.value).split("no mode reads: ")[1].split(": a typo")[0]
    assert named == ", ".join([f"train.num_step{i} (meant train.num_steps?)" for i in range(8)])
    config = c2i.get_config()
    config.zzqx = 1
    with pytest.raises(ConfigError, match=r"has fields that no mode reads: zzqx: a typo"):
        check_config_fields(config, "mine.py")


def test_data_that_cannot_be_read_stops_training_before_the_workdir_records_anything(tmp_path):
    from pixelflow_jax.data.sources import DataError
    from pixelflow_jax.training import train

    config = c2i_config(**{"data.source": "folder", "data.root": str(tmp_path / "nowhere"), "train.batch_size": 32})
    with pytest.raises(DataError, match="image folder .*nowhere does not exist"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no run_config.json, checkpoints/ or lock: not even the folder it made


@pytest.mark.parametrize("workdir", [".", "run"])
def test_a_workdir_inside_the_image_folder_is_refused_before_it_becomes_training_data(tmp_path, workdir):
    """It trained once; its checkpoints/ then read as a class, and every resume was refused."""
    from pixelflow_jax.training import train

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    config = c2i_config(**{"data.source": "folder", "data.root": str(tmp_path), "train.batch_size": 32})
    with pytest.raises(ValueError, match=r"--workdir .* is inside the training images \(--config.data.root="):
        train.train(config, str(tmp_path / workdir))
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    from pixelflow_jax.data.sources import read_with_folder

    assert not read_with_folder(str(tmp_path / ".runs" / "exp1"), str(tmp_path))  # a hidden folder is not read
    assert not read_with_folder(str(tmp_path) + "_runs", str(tmp_path))


def test_a_workdir_whose_checkpoints_link_to_another_runs_is_refused_before_it_trains(tmp_path):
    """Two workdirs sharing one checkpoints/ (ln -s ../a/checkpoints b/) each took a lock of their
    own and trained at once: b's save was removed by a's run and b stopped with 'free space: ...
    resumes from step 12', a step of a."""
    from pixelflow_jax.training import train

    (tmp_path / "a" / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "a" / "run_config.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoints").symlink_to(tmp_path / "a" / "checkpoints")
    with pytest.raises(ValueError, match=rf"b/checkpoints is a link to {tmp_path}/a/checkpoints, the checkpoints of "
                                         rf"the training run {tmp_path}/a: .* Train that run with --workdir="):
        train.train(c2i_config(**{"train.batch_size": 32}), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoints"] and os.listdir(tmp_path / "a" / "checkpoints") == ["4"]
    (tmp_path / "disk" / "b_checkpoints").mkdir(parents=True)  # a folder of no run: the run's own, on another disk
    (tmp_path / "b" / "checkpoints").unlink()
    (tmp_path / "b" / "checkpoints").symlink_to(tmp_path / "disk" / "b_checkpoints")
    train.check_checkpoints_are_its_own(str(tmp_path / "b"))
    train.check_checkpoints_are_its_own(str(tmp_path / "a"))
    (tmp_path / "a" / "b_checkpoints").mkdir()  # kept beside a run, not that run's own
    (tmp_path / "b" / "checkpoints").unlink()
    (tmp_path / "b" / "checkpoints").symlink_to(tmp_path / "a" / "b_checkpoints")
    train.check_checkpoints_are_its_own(str(tmp_path / "b"))
    (tmp_path / "disk" / "old" / "checkpoints").mkdir(parents=True)  # named checkpoints, in a folder of no run
    (tmp_path / "b" / "checkpoints").unlink()
    (tmp_path / "b" / "checkpoints").symlink_to(tmp_path / "disk" / "old" / "checkpoints")
    train.check_checkpoints_are_its_own(str(tmp_path / "b"))


def test_init_from_naming_the_new_runs_own_workdir_says_so(tmp_path):
    """It said 'is not a checkpoint: expected a training run ...' of a folder that was one, being made."""
    from pixelflow_jax.training import train

    config = c2i_config(**{"train.init_from": str(tmp_path / "run"), "train.batch_size": 32})
    with pytest.raises(ValueError, match=r"init_from .*run is this run's own workdir, which has no checkpoint yet"):
        train.train(config, str(tmp_path / "run" / "."))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("--config.data.shard_cache_dir=/tmp",  # a setting an earlier version had
     "--config.data.shard_cache_dir: configs/c2i.py:tiny has no field 'shard_cache_dir'; configs/c2i.py lists"),
    ("--config.trian.lr=1", "--config.trian.lr: configs/c2i.py:tiny has no field 'trian' (Did you mean \"train\""),
    ("--config.train.preview_steps_per_stage=(3,3,3,3)",  # as sample.steps_per_stage takes: was int()'s words
     "--config.train.preview_steps_per_stage takes one whole number, written in digits"),
    ("--config.sample.prompts=a cat",  # a text-to-image setting given to the class config
     "--config.sample.prompts: configs/c2i.py:tiny has no field 'prompts'; it is a setting of configs/t2i.py: use "
     "that config"),
    # a path below a value: was "configs/c2i.py:tiny could not be read: its get_config raised KeyError: ..."
    ("--config.train.lr.x=1", "error: --config.train.lr.x: train.lr of configs/c2i.py:tiny is a value (float), "
                              "not a section with fields: write --config.train.lr=VALUE"),
    ("--config.sample.labels.x.y=1", "error: --config.sample.labels.x.y: sample.labels of configs/c2i.py:tiny is a "
                                     "value (tuple), not a section with fields: write --config.sample.labels=VALUE"),
])
def test_an_override_of_a_field_the_config_lacks_is_named_without_a_traceback(tmp_path, override, message):
    workdir = tmp_path / "run"
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_text_configs_lack_the_class_only_settings_and_do_not_train_class_models(tmp_path):
    from configs import t2i
    from pixelflow_jax.training import train

    for variant in ("", "tiny", "demo"):  # an override of one is refused as a field the config lacks
        config = t2i.get_config(variant)
        assert "label_dropout" not in config.train and not {"tfds_name", "tfds_data_dir", "split"} & set(config.data)
    config.model.update(cross_attention_dim=0, num_classes=10, pooled_text=False)  # the demo variant, as a class model
    config.train.update(batch_size=32)
    with pytest.raises(ValueError, match=r"a class-conditional model .* trains with --config=configs/c2i.py"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_eval_refuses_what_is_not_uint8_images(tmp_path):
    from pixelflow_jax.evaluation.npz_images import npz_image_count

    for name, array, message in (("float", np.random.rand(4, 8, 8, 3).astype(np.float32), "must be uint8 images"),
                                 ("integers", np.zeros((4, 8, 8, 3), np.int64), "x.clip\\(0, 255\\).astype"),
                                 ("rgba", np.zeros((4, 8, 8, 4), np.uint8), "got RGBA .*images\\[..., :3\\]"),
                                 ("grey", np.zeros((4, 8, 8), np.uint8), "got grey ones .*np.repeat"),
                                 # a pickled list of images of two sizes was told 'got shape (2,)'
                                 ("ragged", np.array([np.zeros((8, 8, 3)), np.zeros((4, 4, 3))], dtype=object),
                                  r"arr_0 holds Python objects \(saved with allow_pickle: a list of images of "
                                  r"different sizes\?\), not uint8 images .*np.stack\(images\).astype\(np.uint8\)"),
                                 ("objects", np.zeros((4, 8, 8, 3), object), "arr_0 holds Python objects"),
                                 # one RGB image was called grey ones, and their fix made it 8 images 8x3
                                 ("single", np.zeros((8, 8, 3), np.uint8), r"must be a batch of images \(N, H, W, 3\), "
                                                                          r"got one image \(8, 8, 3\); .*np.stack"),
                                 ("single_rgba", np.zeros((8, 8, 4), np.uint8), r"got one image \(8, 8, 4\)"),
                                 ("nchw", np.zeros((4, 3, 8, 8), np.uint8), r"got channels first \(4, 3, 8, 8\); "
                                                                           r"write images.transpose\(0, 2, 3, 1\)"),
                                 # grey or RGBA channels first were told only 'got shape (4, 1, 8, 8)'
                                 ("nchw_grey", np.zeros((4, 1, 8, 8), np.uint8), r"got channels first \(4, 1, 8, 8\); "
                                  r"write np.repeat\(images.transpose\(0, 2, 3, 1\), 3, axis=-1\)"),
                                 ("nchw_rgba", np.zeros((4, 4, 8, 8), np.uint8), r"got channels first \(4, 4, 8, 8\); "
                                  r"write images.transpose\(0, 2, 3, 1\)\[..., :3\]"),
                                 ("fortran", np.asfortranarray(np.zeros((4, 8, 8, 3), np.uint8)),
                                  "Fortran .*np.ascontiguousarray"),
                                 ("three", np.zeros((3, 8, 8, 3), np.uint8), "holds 3 images: precision and recall "
                                                                             "need more than 3"),
                                 ("none", np.zeros((0, 8, 8, 3), np.uint8), "holds 0 images"),
                                 ("empty", np.zeros((5, 0, 0, 3), np.uint8), "images of 0x0 pixels, which have no"),
                                 ("float255", np.zeros((4, 8, 8, 3)), r"and 0-255 values with x.round\(\)"),
                                 ("one", np.zeros((1, 8, 8, 3), np.uint8), "holds 1 image: precision"),
                                 # 16-bit images: x.clip(0, 255) would saturate nearly every pixel
                                 ("sixteen", np.zeros((4, 8, 8, 3), np.uint16), r"16-bit images \(0-65535\) with "
                                                                               r"\(x // 257\)"),
                                 ("float", np.zeros((4, 8, 8, 3), np.float32),
                                  r"images in \[-1, 1\] with \(\(x \+ 1\)"),
                                 # clip(0, 255) would make them images of 0 and 1
                                 ("bools", np.zeros((4, 8, 8, 3), bool), r"got bool; convert them with "
                                                                        r"x.astype\(np.uint8\) \* 255")):
        np.savez(tmp_path / f"{name}.npz", arr_0=array)
        with pytest.raises(ValueError, match=message):
            npz_image_count(str(tmp_path / f"{name}.npz"))
    # labels saved first, images second (np.savez(path, labels, images)) were told only 'got shape (6,)'
    np.savez(tmp_path / "labels_first.npz", np.arange(6), np.zeros((6, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"labels_first.npz: arr_0 holds 6 values of one dimension \(labels\?\), and "
                                         r"the images \(N, H, W, 3\) are arr_1 \(6, 8, 8, 3\); an evaluation reads the "
                                         r"images as arr_0: write them first, np.savez\(path, images, labels\)"):
        npz_image_count(str(tmp_path / "labels_first.npz"))
    # a pickled ragged list first is no labels, whatever lies beside it
    ragged = np.array([np.zeros((8, 8, 3)), np.zeros((4, 4, 3))], dtype=object)
    np.savez(tmp_path / "ragged_first.npz", ragged, np.zeros((6, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"ragged_first.npz: arr_0 holds Python objects \(saved with allow_pickle"):
        npz_image_count(str(tmp_path / "ragged_first.npz"))
    for name, beside in (("labels_alone", {"scores": np.zeros(6)}),  # no images beside: as before
                         ("labels_and_masks", {"masks": np.zeros((6, 8, 8, 1), np.uint8)})):  # nor grey masks
        np.savez(tmp_path / f"{name}.npz", np.arange(6), **beside)
        with pytest.raises(ValueError, match=r"arr_0 must be images \(N, H, W, 3\), got shape \(6,\)$"):
            npz_image_count(str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "two_sets.npz", np.zeros((6, 8, 8, 3), np.uint8), np.ones((5, 8, 8, 3), np.uint8))
    assert npz_image_count(str(tmp_path / "two_sets.npz")) == 6  # images first, other images beside: arr_0 is read
    np.save(tmp_path / "plain.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"it is a .npy file: save the images with np.savez"):
        npz_image_count(str(tmp_path / "plain.npy"))
    # one of a sampling job's PNGs said only "File is not a zip file"
    (tmp_path / "job" / "samples").mkdir(parents=True)
    png = tmp_path / "job" / "samples" / "000000.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(ValueError, match=r"File is not a zip file; it is a PNG image, and an evaluation reads a set "
                                         r"of images from one .npz; a sampling job packs its images into "
                                         r"WORKDIR/samples.npz, and other images go into one with numpy.savez"):
        npz_image_count(str(png))
    np.savez(tmp_path / "job" / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"it is a PNG image, and an evaluation reads a set of images from "
                                                   f"one .npz (pass {tmp_path}/job/samples.npz, the images a sampling "
                                                   "job packed)")):
        npz_image_count(str(png))
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")  # a JPEG said only "File is not a zip file" too
    with pytest.raises(ValueError, match=r"it is a JPEG image, and an evaluation reads a set of images from one .npz"):
        npz_image_count(str(tmp_path / "photo.jpg"))
    np.savez(tmp_path / "whole.npz", arr_0=np.zeros((40, 8, 8, 3), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:3000])  # a download that stopped
    with pytest.raises(ValueError, match=r"it is cut off .*: write or download it again"):
        npz_image_count(str(tmp_path / "cut.npz"))
    # wget of a missing blob saves its XML error, of a web address its HTML; a clone without git lfs its pointers
    for name, text, message in (
            ("blob.npz", '<?xml version="1.0"?><Error><Code>BlobNotFound</Code></Error>', "it is a web page or an XML "
             r"document \(the error page a failed download saves\?\), not the .npz: download it again"),
            ("page.npz", "\n<!DOCTYPE html><html></html>", "it is a web page"),
            ("lfs.npz", "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 10\n",
             "it is a Git LFS pointer, not the .npz: fetch the file with git lfs pull")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name} is not an .npz .*File is not a zip file; {message}"):
            npz_image_count(str(tmp_path / name))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npz is not an .npz .*; it is empty \(a write that never finished\?\)"):
        npz_image_count(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "statistics.npz", mu=np.zeros(2048), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"statistics alone do not do: precision and recall compare images"):
        npz_image_count(str(tmp_path / "statistics.npz"))


def test_eval_and_inspect_refuse_before_any_work_what_would_fail_after_it(tmp_path, converted):
    """eval_features/ as a file failed after the Inception pass; eval.json as a folder at the last
    write; inspect's seed -1 in numpy with a traceback; a converted checkpoint given as --workdir
    was taken for a workdir (inspect timed the config's random model, eval wrote among orbax's files)."""
    command = lambda *args: subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", *args],
                                           cwd=REPO, capture_output=True, text=True, timeout=300)
    for workdir in (converted["c2i_tiny"], os.path.join(converted["c2i_tiny"], "params")):
        result = command(f"--workdir={workdir}", "--mode=inspect")
        assert result.returncode == 1 and "a converted checkpoint folder" in result.stderr, result.stderr[-2000:]
        assert f"pass --config.sample.checkpoint={converted['c2i_tiny']} and choose another --workdir" in result.stderr
    (tmp_path / "t2i_release").mkdir()  # the released text-to-image folder: model.pt without config.yaml
    (tmp_path / "t2i_release" / "model.pt").write_bytes(b"")
    result = command(f"--workdir={tmp_path / 't2i_release'}", "--mode=inspect")
    assert result.returncode == 1 and "is a release checkpoint folder" in result.stderr, result.stderr[-2000:]
    result = command(f"--workdir={tmp_path / 'inspect'}", "--mode=inspect", "--config.seed=-1")
    assert result.returncode == 1 and "--config.seed must be in [0, 4294967295], got -1" in result.stderr
    assert "Traceback" not in result.stderr

    from pixelflow_jax.evaluation.evaluate import check_inputs

    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.full((8, 8, 8, 3), 128, np.uint8))
    (tmp_path / "weights.pth").write_bytes(b"")
    for name, make in (("eval_features", lambda p: p.write_text("")), ("eval.json", lambda p: p.mkdir())):
        workdir = tmp_path / name.replace(".", "_")
        workdir.mkdir()
        make(workdir / name)
        with pytest.raises(ValueError, match=rf"{name} is a (file|folder), where the evaluation keeps its"):
            check_inputs(str(images), str(images), str(tmp_path / "weights.pth"), str(workdir))


def test_the_configs_named_in_errors_are_found_beside_main_py_where_pip_installed_the_package(monkeypatch, tmp_path):
    """A container image with the package in site-packages and main.py with configs/ copied to /app:
    a --config that did not exist ended in a FileNotFoundError traceback for site-packages/configs."""
    from pixelflow_jax.cli import config_file

    monkeypatch.setattr(config_file, "PACKAGE", str(tmp_path / "site-packages" / "pixelflow_jax"))
    monkeypatch.setattr("sys.argv", [str(tmp_path / "app" / "main.py")])
    monkeypatch.chdir(tmp_path)
    assert config_file.our_configs() == ("configs/c2i.py and configs/t2i.py of the project's checkout, which pip "
                                         "does not install with the package")
    (tmp_path / "app" / "configs").mkdir(parents=True)
    (tmp_path / "app" / "configs" / "c2i.py").write_text("")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "configs").write_text("")  # a file of that name is no configs/
    assert config_file.our_configs() == "app/configs/c2i.py"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # named in full where it is not below the current folder
    assert config_file.our_configs() == f"{tmp_path}/app/configs/c2i.py"
    monkeypatch.chdir(tmp_path / "app")
    monkeypatch.setattr("sys.argv", ["main.py"])  # `python main.py`: the folder in full, whatever the cwd later
    assert config_file.configs_folder() == str(tmp_path / "app" / "configs")
    (tmp_path / "checkout" / "configs").mkdir(parents=True)  # a checkout's own come first
    monkeypatch.setattr(config_file, "PACKAGE", str(tmp_path / "checkout" / "pixelflow_jax"))
    assert config_file.configs_folder() == str(tmp_path / "checkout" / "configs")
