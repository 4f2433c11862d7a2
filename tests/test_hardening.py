"""What a hostile new user broke (issue 16): bad values, misuse of the API and of the converter,
damaged files and leftovers each get a clear error or are repaired, and lose nothing."""

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, fixture_dir, free_port, run_converter
from pixelflow_jax import CheckpointError, load_model, storage
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.training.run_config import check_run_config
from pixelflow_jax.validation import ConfigError, check


def c2i_config(**changes):
    from configs import c2i

    config = c2i.get_config("tiny")
    with config.ignore_type():  # values of another type too, as the Python API may pass them
        for dotted, value in changes.items():
            section, field = dotted.split(".") if "." in dotted else (None, dotted)
            (config[section] if section else config)[field] = value
    return config


@pytest.mark.parametrize("mode,field,value,message", [
    ("train", "model.param_dtype", "bfloat16", "param_dtype=bfloat16 cannot train: optimiser steps and the EMA"),
    ("train", "train.lr", float("nan"), "--config.train.lr must be a finite number, got nan"),
    ("train", "data.source", "imagefolder", "--config.data.source must be one of 'tfds', 'folder', 'demo', "),
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
                                       "evenly (training starts that stage from its 2x-downsampled image): try 48 or 96"),
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
    ("sample", "sample.steps_per_stage", 10**9, "--config.sample.steps_per_stage must be in [1, 10000], got 1000000000"),
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
    ("train", "data.root", "s3://bucket/images", "--config.data.root: s3://bucket/images: unsupported URL scheme s3://"),
    # the demo config pointed at one's own images trained on the demo set, recording the root as if read
    ("train", "data.root", "/my/images", "--config.data.root is set (/my/images) but data.source='demo' does not read "
                                         "it: add --config.data.source=folder, or drop data.root"),
    ("train", "data.demo_seed", -5, "--config.data.demo_seed must be in [0, 4294967295], got -5"),
    # far past any real use: a run allocated or compiled for minutes, then failed (or hung)
    ("train", "train.batch_size", 2**40, "--config.train.batch_size must be in [1, 1048576], got 1099511627776"),
    ("train", "train.preview_num_images", 10**8, "--config.train.preview_num_images must be in [1, 1024]"),
    ("train", "data.expand_ratio", 1e6, "--config.data.expand_ratio must be <= 4.0, got 1000000.0"),
    ("train", "train.init_from", "http://host/ckpt", "--config.train.init_from: http://host/ckpt: unsupported URL"),
    ("eval", "eval.reference", "hf://org/ref.npz", "--config.eval.reference: hf://org/ref.npz: hf:// (the Hugging Face Hub) is read here for checkpoints"),
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
    for timesteps, stages in ((7, 4), (3, 2)):
        with pytest.raises(ConfigError) as error:
            check(c2i_config(**{"scheduler.num_train_timesteps": timesteps, "scheduler.num_stages": stages}), "train")
        assert (f"{timesteps} timesteps feed stage 0 of {stages} the one timestep 0 at every training index"
                in str(error.value))


def test_a_bool_is_neither_a_number_nor_a_count():
    """True is a numbers.Integral: without its own refusal a flag typed into a rate field would train
    at lr 1.0 (a config field of type float casts it before any check, so the check is called directly)."""
    from pixelflow_jax.validation import integer, number

    assert number("train.lr", 1) == 1.0 and integer("train.num_steps", 1) == 1
    for check_value in (number, integer):
        with pytest.raises(ConfigError, match=r"--config.x must be a (finite|whole) number, got True"):
            check_value("x", True)


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


def t2i_config(**changes):
    from configs import t2i

    config = t2i.get_config("tiny")
    for dotted, value in changes.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize("mode,field,accepted,refused", [
    ("sample", "sample.max_text_tokens", 0, 1),  # 0: the run's length; 1 leaves no room for a prompt and </s>
    ("sample", "sample.max_text_tokens", 2, 1),
    ("sample", "sample.max_text_tokens", 4096, 4097),
    ("inspect", "sample.max_text_tokens", 2, 1),
    ("sample", "sample.images_per_prompt", 10**7, 10**7 + 1),
    ("sample", "sample.images_per_prompt", 1, 0),
    ("text-train", "train.caption_dropout", 0.0, -math.ulp(0.0)),
    ("text-train", "train.caption_dropout", next_below(1.0), 1.0),
    ("text-train", "train.max_text_tokens", 2, 1),
    ("text-train", "train.max_text_tokens", 4096, 4097),
])
def test_each_bound_of_a_text_setting_accepts_its_last_value_and_refuses_the_next(mode, field, accepted, refused):
    """The text config's bounds, both sides; text-train: check_text_training, which train.train runs
    once it knows the model is text-conditional."""
    from pixelflow_jax.validation import check_text_training

    run_check = check_text_training if mode == "text-train" else lambda config: check(config, mode)
    run_check(t2i_config(**{field: accepted}))
    with pytest.raises(ConfigError, match=re.escape(f"--config.{field} must ")):
        run_check(t2i_config(**{field: refused}))


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
    # a comma inside a nested group only, or brackets that never close, are no list either
    for one_prompt in ("(a red fox (best, quality))", "(a red fox, (best quality)"):
        check(t2i_config(**{"sample.prompts": one_prompt, "train.preview_every": 4}), mode)


@pytest.mark.parametrize("mode", ["sample", "train"])
def test_a_prompt_that_names_a_prompts_file_is_refused_naming_prompts_file(mode, tmp_path, monkeypatch):
    """--config.sample.prompts=prompts.txt (meant for prompts_file) sampled one image of the words
    'prompts.txt', and previewed it at every preview of a run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my prompts.list").write_text("a red disk\n")
    for value in ("prompts.txt", ("a red disk", "~/prompts.TXT"), "gs://bucket/prompts.txt", "my prompts.list"):
        file = value if isinstance(value, str) else value[1]
        with pytest.raises(ConfigError, match=re.escape(f"--config.sample.prompts is the prompt {file!r}, which names "
                                                        "a file: prompts read from a text file, one per line, are "
                                                        f"--config.sample.prompts_file={file}")):
            check(t2i_config(**{"sample.prompts": value, "train.preview_every": 4}), mode)
    for prompt in ("a sign that says notes.txt", "my prompts", "README.md"):  # a prompt, and a name of no file here
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
    ("configs/c2i.py:dmeo", "error: flag --config=configs/c2i.py:dmeo: ValueError: unknown c2i config variant 'dmeo'"),
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
    than None'. A .py word that is another flag's value (--workdir x.py) is that flag's."""
    command = [sys.executable, "main.py", *(a.replace("WORKDIR", str(tmp_path / "run")) for a in arguments)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith(
        "error: configs/c2i.py:demo is given without its flag: a config file is --config=configs/c2i.py:demo\n"), \
        result.stderr
    assert not (tmp_path / "run").exists()
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
                                 f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
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


@pytest.fixture(scope="module")
def models(converted):
    return {name: load_model(path) for name, path in converted.items()}


def test_the_model_checks_concrete_inputs_outside_jit(models):
    model, _ = models["c2i_tiny"]
    x, t = np.zeros((2, 16, 16, 3), np.float32), np.array([500.0, 500.0], np.float32)
    for labels in ([1001, 5], [-1, 5], [-2, 5], [1.5, 2]):
        with pytest.raises(ValueError, match=r"class_labels must be (class ids in \[0, 1000\] \(1000 = the null "
                                             r"class\)|whole class ids)"):
            model(x, t, class_labels=np.array(labels))
    assert model(x, t, class_labels=np.array([1000, 999])).shape == x.shape  # the null class is an id
    with pytest.raises(ValueError, match=r"images must be a batch \(B, H, H, 3\).*images\[None\]"):
        model(x[0], t[:1], class_labels=np.array([1]))
    text_model, _ = models["t2i_tiny"]
    wrong_width = np.zeros((2, 6, text_model.config.cross_attention_dim + 1), np.float32)
    with pytest.raises(ValueError, match="encoder_hidden_states must be .* the text encoder the model was trained"):
        text_model(x, t, encoder_hidden_states=wrong_width, encoder_attention_mask=np.ones((2, 6), np.float32))
    # uint8 pixels ran as values 0-255; a string time failed inside numpy; one caption for two images inside
    # the attention kernel, naming neither argument.
    with pytest.raises(ValueError, match=r"images must be floats in \[-1, 1\] .* got dtype uint8; scale 0-255"):
        model(np.zeros((2, 16, 16, 3), np.uint8), t, class_labels=np.array([1, 2]))
    for times in ("300", np.array([True, False])):
        with pytest.raises(ValueError, match="timesteps must be real numbers"):
            model(x, times, class_labels=np.array([1, 2]))
    assert model(x.tolist(), 500, class_labels=np.array([1, 2])).shape == x.shape  # a nested list is an array
    width = text_model.config.cross_attention_dim
    with pytest.raises(ValueError, match="encoder_hidden_states holds 1 captions for 2 images"):
        text_model(x, t, encoder_hidden_states=np.zeros((1, 6, width), np.float32))
    with pytest.raises(ValueError, match=re.escape("encoder_hidden_states must be a batch (B, L_text, 20), got shape "
                                                   "(6, 20): add a batch axis")):  # said: not the trained encoder
        text_model(x[:1], t[:1], encoder_hidden_states=np.zeros((6, width), np.float32))
    with pytest.raises(ValueError, match=re.escape("encoder_hidden_states must be a batch (B, L_text, 20), got shape "
                                                   "(1, 1, 6, 20)")):  # an axis too many, e.g. states[None] of a batch
        text_model(x[:1], t[:1], encoder_hidden_states=np.zeros((1, 1, 6, width), np.float32))
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be \(B, L_text\) = \(2, 6\)"):
        text_model(x, t, encoder_hidden_states=np.zeros((2, 6, width), np.float32),
                   encoder_attention_mask=np.ones((2, 5), np.float32))
    states = np.random.default_rng(0).standard_normal((2, 6, width)).astype(np.float32)
    np.testing.assert_array_equal(text_model(x, t, encoder_hidden_states=states.tolist()),  # a list: an AttributeError
                                  text_model(x, t, encoder_hidden_states=states))

    # Under jit only the labels' dtype is known: 1.7 was read as class 1, unseen.
    from flax import nnx

    jitted = nnx.jit(lambda model, labels: model(x, t, class_labels=labels))
    with pytest.raises(ValueError, match="class_labels must be integer ids, got dtype float32 under jit"):
        jitted(model, jnp.array([1.7, 5.0]))


def test_the_models_run_in_a_notebook_that_refuses_rank_promotion(models, encoder_folder):
    """jax_numpy_rank_promotion='raise' (a notebook's own strictness) refused the transformer's and
    T5's first multiply of a (C,) scale with (B, L, C) activations."""
    from pixelflow_jax.text.prompts import PromptEncoder

    model, _ = models["t2i_tiny"]
    encoder = PromptEncoder(encoder_folder, max_length=8)
    states, mask = encoder.encode(["a red disk"])
    call = lambda: model(np.zeros((1, 16, 16, 3), np.float32), 500, encoder_hidden_states=states,
                         encoder_attention_mask=mask)
    expected = call()
    with jax.numpy_rank_promotion("raise"):
        np.testing.assert_array_equal(encoder.encode(["a red disk"])[0], states)
        np.testing.assert_array_equal(call(), expected)


def test_help_on_the_python_api_describes_every_argument():
    """help(sampler.generate) named image_ids alone: that cfg_scale is the last stage's, ramped up
    from none at stage 0, or that dopri5 ignores steps and shift, was in no help text."""
    import inspect

    import pixelflow_jax
    from pixelflow_jax.sampling.cascade import CascadeSampler
    from pixelflow_jax.text.prompts import PromptEncoder

    described_in = {pixelflow_jax.load_model: pixelflow_jax.load_model,
                    pixelflow_jax.PixelFlow.__call__: pixelflow_jax.PixelFlow,
                    pixelflow_jax.PixelFlowScheduler.__init__: pixelflow_jax.PixelFlowScheduler,
                    pixelflow_jax.PixelFlowScheduler.set_timesteps: pixelflow_jax.PixelFlowScheduler.set_timesteps,
                    CascadeSampler.generate: CascadeSampler.generate,
                    CascadeSampler.generate_from_prompts: CascadeSampler.generate_from_prompts,
                    PromptEncoder.__init__: PromptEncoder}
    for function, documented in described_in.items():
        text = inspect.getdoc(documented)
        missing = [name for name in inspect.signature(function).parameters
                   if name != "self" and not re.search(rf"\b{name}\b", text)]
        assert not missing, (function.__qualname__, missing)


def test_the_sampler_names_the_misuse(models):
    from pixelflow_jax.sampling.cascade import CascadeSampler

    sampler = CascadeSampler(*models["c2i_tiny"])
    for labels, message in (([], "nothing to generate"), (["goldfish"], "labels must be whole class ids"),
                            ([3, 1000], r"labels must be class ids in \[0, 999\]"),
                            ((c for c in [1, 2]), r"labels must be a 1-D list of class ids, got generator <gen.*: pass "
                                                  "a list or a 1-D array"),
                            (7, r"labels must be a 1-D list of class ids, got int 7: pass a list"),
                            ([[1, 2]], r"labels must be a 1-D list of class ids, got shape \(1, 2\): pass a list")):
        with pytest.raises(ValueError, match=message):
            sampler.generate(labels, steps_per_stage=1)
    with pytest.raises(ValueError, match=r"image_ids must give one id per image \(2\)"):
        sampler.generate([1, 2], steps_per_stage=1, image_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        sampler.generate([1], steps_per_stage=1, cfg_scale=float("nan"))
    for arguments, message in (({"steps_per_stage": 2.5}, "steps_per_stage must be a whole number, got 2.5"),
                               ({"steps_per_stage": True}, "steps_per_stage must be a whole number, got True"),
                               ({"image_ids": [0.5]}, r"image_ids must be whole numbers in \[0, 2\*\*31\)"),
                               ({"image_ids": [-1]}, "image_ids must be whole numbers"),
                               ({"seed": 2**32}, r"seed must be in \[0, 4294967295\], got 4294967296"),
                               ({"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
                               ({"seed": 1.5}, "seed must be a whole number, got 1.5"),
                               ({"cfg_scale": np.array([2.0, 3.0])}, r"cfg_scale must be one number, got shape \(2,\)"),
                               ({"steps_per_stage": jax.numpy.array(True)}, "must be a whole number, got True")):
        with pytest.raises(ValueError, match=message):
            sampler.generate([1], **{"steps_per_stage": 1, **arguments})
    # numpy and jax scalars are numbers like any other
    np.testing.assert_array_equal(sampler.generate([1], steps_per_stage=jax.numpy.array(1),
                                                   cfg_scale=jax.numpy.float32(2.0), seed=np.int64(3)),
                                  sampler.generate([1], steps_per_stage=1, cfg_scale=2.0, seed=3))
    with pytest.raises(ValueError, match="this model is text-conditional: use generate_from_prompts"):
        CascadeSampler(*models["t2i_tiny"]).generate([1], steps_per_stage=1)
    model, config = models["c2i_tiny"]
    with pytest.raises(ValueError, match="config must be the checkpoint config load_model returns .* got a ModelConfig"):
        CascadeSampler(model, model.config)
    with pytest.raises(ValueError, match="config is another model's"):
        CascadeSampler(model, models["t2i_tiny"][1])
    with pytest.raises(ValueError, match=re.escape("model must be the PixelFlow load_model returns (model, config = "
                                                   "load_model(path)), got a str")):  # an AttributeError
        CascadeSampler("checkpoints/pixelflow_xl_c2i", models["c2i_tiny"][1])
    with pytest.raises(ValueError, match=r"prompt_encoder must be a PromptEncoder, got '/tmp/t5': build one"):
        CascadeSampler(*models["t2i_tiny"]).generate_from_prompts("/tmp/t5", ["a cat"], steps_per_stage=1)


def test_generate_from_prompts_names_an_encoder_of_another_width(models):
    """A T5 of another width than the model's cross-attention failed inside the first stage's jit,
    naming encoder_hidden_states of the doubled (guided) batch, (2, 16, 24) for one prompt."""
    from pixelflow_jax.sampling.cascade import CascadeSampler

    class Encoder:
        def __init__(self, width):
            self.width = width

        def encode(self, prompts):
            return np.zeros((len(prompts), 16, self.width), np.float32), np.ones((len(prompts), 16), np.float32)

    sampler = CascadeSampler(*models["t2i_tiny"])
    with pytest.raises(ValueError, match=re.escape("prompt_encoder gives embeddings of shape (1, 16, 24) for 1 prompts; "
                                                   "this model's cross-attention takes (prompts, tokens, 20): use the "
                                                   "text encoder the model was trained with")):
        sampler.generate_from_prompts(Encoder(24), ["a red disk"], steps_per_stage=1)

    class PooledEncoder(Encoder):  # one embedding per prompt (a sentence encoder), of the right width
        def encode(self, prompts):
            return np.zeros((len(prompts), self.width), np.float32), np.ones((len(prompts), 1), np.float32)

    with pytest.raises(ValueError, match=re.escape("prompt_encoder gives embeddings of shape (1, 20) for 1 prompts; "
                                                   "this model's cross-attention takes (prompts, tokens, 20)")):
        sampler.generate_from_prompts(PooledEncoder(20), ["a red disk"], steps_per_stage=1)


def test_a_config_of_the_other_kind_is_named(models):
    from configs import t2i
    from pixelflow_jax.sampling.sample_conditioning import conditioning_for

    with pytest.raises(ValueError, match="text-conditional: sample it with --config=configs/t2i.py"):
        conditioning_for(c2i_config().sample, models["t2i_tiny"][0].config)
    with pytest.raises(ValueError, match="class-conditional .*--config=configs/c2i.py"):
        conditioning_for(t2i.get_config("tiny").sample, models["c2i_tiny"][0].config)


def test_a_sampling_job_checks_its_config_against_the_checkpoint_before_reading_its_weights(converted, tmp_path,
                                                                                          monkeypatch):
    from configs import t2i
    from pixelflow_jax import api
    from pixelflow_jax.demo_app import DemoSampler
    from pixelflow_jax.sampling import sample_run

    def weights_read(*_, **__):
        raise AssertionError("the weights were read before the config was checked")

    monkeypatch.setattr(api, "read_checkpoint", weights_read)
    class_config, text_config = c2i_config(), t2i.get_config("tiny")
    class_config.sample.checkpoint = converted["t2i_tiny"]
    text_config.sample.checkpoint = fixture_dir("c2i_tiny")  # a release folder: its config.yaml alone is read
    for job in (lambda config: sample_run.run(config, str(tmp_path / "samples")), DemoSampler):
        with pytest.raises(ValueError, match="text-conditional: sample it with --config=configs/t2i.py"):
            job(class_config)
        with pytest.raises(ValueError, match="class-conditional .*--config=configs/c2i.py"):
            job(text_config)
    text_config.sample.update(checkpoint=converted["t2i_tiny"], prompts=[], prompts_file="")
    with pytest.raises(ValueError, match="set exactly one of --config.sample.prompts"):
        sample_run.run(text_config, str(tmp_path / "samples"))
    text_config.sample.update(prompts=["a red disk"], weights="model")  # before the text encoder is loaded
    for job in (lambda config: sample_run.run(config, str(tmp_path / "samples")), DemoSampler):
        with pytest.raises(CheckpointError, match="is a converted folder with one set of weights"):
            job(text_config)
    assert not os.path.exists(tmp_path / "samples")
    # A workdir this job cannot write is found before the restore (minutes at XL), not after it.
    class_config.sample.checkpoint = converted["c2i_tiny"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(storage.StorageError, match="a_file .*is a file, not a folder"):
        sample_run.run(class_config, str(tmp_path / "a_file" / "samples"))


def test_a_job_leaves_the_callers_config_as_it_was(converted, tmp_path, monkeypatch):
    """Jobs fill in what a config leaves empty. In a notebook the caller's config kept it: after
    inspect_model.run in a training run's workdir, sample_run.run in another run's workdir sampled
    the inspected run; after sampling a converted text model, a text run's sampling job took the
    release's 512 tokens and float32 encoder instead of the run's own."""
    from configs import t2i
    from pixelflow_jax import demo_app, inspect_model
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.training import train
    from test_inspect import a_training_run

    class Stop(Exception):
        pass

    def stop(*_, **__):
        raise Stop

    def fill_and_stop(config, *_):  # as train fills a resumed text run's encoder
        config.train.text_encoder = "/encoders/t5"
        raise Stop

    text_config = t2i.get_config("tiny")
    text_config.sample.update(checkpoint=converted["t2i_tiny"], prompts=["a red disk"])
    inspected = c2i_config()
    monkeypatch.setattr(inspect_model, "model_to_inspect", stop)  # the config is filled before these
    monkeypatch.setattr(sample_run, "conditioning_for", stop)
    monkeypatch.setattr(demo_app, "check_config_kind", stop)
    monkeypatch.setattr(train, "validate", fill_and_stop)
    for job, config in ((lambda c: inspect_model.run(c, a_training_run(tmp_path / "run", [4])), inspected),
                        (lambda c: sample_run.run(c, str(tmp_path / "samples")), text_config),
                        (lambda c: demo_app.DemoSampler(c, str(tmp_path / "demo")), text_config),
                        (lambda c: train.train(c, str(tmp_path / "text_run")), t2i.get_config("tiny"))):
        given = config.to_dict()
        with pytest.raises(Stop):
            job(config)
        assert config.to_dict() == given


def test_a_job_started_from_python_checks_its_config_and_workdir_as_main_does(converted, tmp_path, monkeypatch):
    """A notebook calling the jobs skipped main.py's checks: sample_run.run sampled a seed of 2**40
    as seed 0 (jax keeps 32 bits) and recorded 2**40, train.train at a resolution no stage could
    patch failed in a reshape, inspect_model.run of seed -1 said 'expected non-negative integer',
    and a workdir of ~/samples became a folder named '~' in the current one."""
    from pixelflow_jax import demo_app, inspect_model
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.training import train

    sampled = c2i_config(**{"sample.checkpoint": converted["c2i_tiny"], "sample.seed": 2**40})
    with pytest.raises(ConfigError, match=r"--config.sample.seed must be in \[0, 4294967295\], got 1099511627776"):
        sample_run.run(sampled, str(tmp_path / "samples"))
    with pytest.raises(ConfigError, match=r"--config.data.resolution \(65\) must be a multiple of model.patch_size"):
        train.train(c2i_config(**{"data.resolution": 65}), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"--config.seed must be in \[0, 4294967295\], got -1"):
        inspect_model.run(c2i_config(seed=-1), str(tmp_path / "inspect"))
    with pytest.raises(ConfigError, match=r"--config.demo.port must be in \[1, 65535\], got 0"):  # the demo's checks
        demo_app.DemoSampler(c2i_config(**{"sample.checkpoint": converted["c2i_tiny"], "demo.port": 0}),
                             str(tmp_path / "demo"))
    checkpoint = converted["c2i_tiny"]
    with pytest.raises(ConfigError, match="workdir is empty: name a folder"):
        sample_run.run(c2i_config(**{"sample.checkpoint": checkpoint}), " ")
    with pytest.raises(CheckpointError, match=rf"--workdir {checkpoint}/samples is inside a converted checkpoint"):
        sample_run.run(c2i_config(**{"sample.checkpoint": checkpoint}), f"{checkpoint}/samples")
    assert not os.path.exists(f"{checkpoint}/samples")
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    workdirs = []
    monkeypatch.setattr(sample_run, "_sample", lambda config, workdir: workdirs.append(workdir))
    sample_run.run(c2i_config(**{"sample.checkpoint": converted["c2i_tiny"]}), "~/samples")
    assert workdirs == [str(tmp_path / "home" / "samples")]


def test_an_evaluation_started_from_python_checks_its_config_and_workdir_as_main_does(tmp_path, monkeypatch):
    """evaluate.run from a notebook skipped main.py's checks, as the other jobs did before: an
    eval.batch_size of 0 failed in the Inception's batching with ZeroDivisionError, and a workdir of
    ~/evals (or samples at ~/samples.npz) became a folder named '~' in the current one."""
    from pixelflow_jax.evaluation import evaluate

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate", lambda samples, reference, weights, workdir, batch_size: evaluated.append(
        (samples, workdir)) or {name: 0.0 for name in evaluate.METRICS})
    paths = {"eval.samples": "~/samples.npz", "eval.reference": "~/reference.npz", "eval.inception_weights": "~/w.pth"}
    with pytest.raises(ConfigError, match=r"--config.eval.batch_size must be >= 1, got 0"):
        evaluate.run(c2i_config(**paths, **{"eval.batch_size": 0}), "~/evals")
    assert evaluated == [] and os.listdir(tmp_path) == []
    evaluate.run(c2i_config(**paths), "~/evals")
    assert evaluated == [(str(tmp_path / "home" / "samples.npz"), str(tmp_path / "home" / "evals"))]
    assert os.listdir(tmp_path) == ["home"]


def test_a_demo_page_started_from_python_checks_its_config_and_workdir_as_main_does(converted, tmp_path, monkeypatch):
    """demo_app.run from a notebook probed --config.demo.port before the config was checked (port 0
    bound at random), and a workdir of ~/page became a folder named '~' in the current one."""
    from pixelflow_jax import demo_app

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    pages = []

    class PageStarted(Exception):
        pass

    def record(config, workdir):
        pages.append(workdir)
        raise PageStarted

    monkeypatch.setattr(demo_app, "DemoSampler", record)
    checkpoint = {"sample.checkpoint": converted["c2i_tiny"]}
    with pytest.raises(ConfigError, match=r"--config.demo.port must be in \[1, 65535\], got 0"):
        demo_app.run(c2i_config(**checkpoint, **{"demo.port": 0}), "~/page")
    assert pages == [] and os.listdir(tmp_path) == []
    with pytest.raises(PageStarted):
        demo_app.run(c2i_config(**checkpoint, **{"demo.port": free_port()}), "~/page")
    assert pages == [str(tmp_path / "home" / "page")] and os.listdir(tmp_path) == ["home"]


def test_load_model_builds_the_model_with_the_attention_backend_and_dtypes_asked_for():
    """load_model(attention=...) was dropped without a word: the model ran the folder's backend. A
    notebook may halve the weights' memory as a sampling job does (param_dtype)."""
    import jax.numpy as jnp
    from flax import nnx

    model, config = load_model(fixture_dir("c2i_tiny"), attention="xla", dtype="bfloat16", param_dtype=jnp.bfloat16)
    assert (model.config.attention, model.config.dtype) == (config.model.attention, config.model.dtype) == ("xla",
                                                                                                           "bfloat16")
    assert model.config.param_dtype == "bfloat16"
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(CheckpointError, match=r"param_dtype must be one of \('float32', 'bfloat16', 'float16'\) "
                                              r"\(or the jnp dtype\), got 'int8'"):
        load_model(fixture_dir("c2i_tiny"), param_dtype="int8")


@pytest.mark.parametrize("attention, platforms", [("cudnn", "gpu"), ("pallas_gpu", "gpu"), ("splash", "tpu")])
def test_load_model_refuses_a_kernel_the_platform_cannot_run_at_load(attention, platforms):
    """The model loaded and failed only at its first call; a Pallas kernel still loads for
    interpret mode (the parity tests run it so)."""
    from pixelflow_jax.kernels.attention import interpret_kernels

    with pytest.raises(CheckpointError, match=rf"^attention backend '{attention}' runs on {platforms}, "
                                              r"and this run's platform is cpu: use 'auto' or 'xla'$"):
        load_model(fixture_dir("c2i_tiny"), attention=attention, dtype="bfloat16")
    if attention != "cudnn":
        with interpret_kernels():
            assert load_model(fixture_dir("c2i_tiny"), attention=attention)[0].config.attention == attention


def test_load_model_refuses_cudnn_for_a_model_computing_in_float32(monkeypatch, converted):
    """cuDNN takes no float32: on a GPU the model loaded and failed at its first call. The dtype
    is the one given, else the checkpoint's; either is checked before the weights are read."""
    import dataclasses

    from pixelflow_jax import api

    class WeightsRead(Exception):
        pass

    def read_checkpoint(*args):
        raise WeightsRead

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api, "read_checkpoint", read_checkpoint)
    for folder, dtype in ((fixture_dir("c2i_tiny"), None), (converted["c2i_tiny"], "float32")):
        with pytest.raises(CheckpointError, match=r"^attention backend 'cudnn' takes bfloat16 or float16 inputs, and "
                                                  r"this model computes in float32: compute in bfloat16, or use "
                                                  r"'auto' \(XLA for float32\) or 'xla'$"):
            load_model(folder, attention="cudnn", dtype=dtype)
    with pytest.raises(WeightsRead):
        load_model(fixture_dir("c2i_tiny"), attention="cudnn", dtype="bfloat16")
    real_config = api.checkpoint_config
    monkeypatch.setattr(api, "checkpoint_config", lambda source: dataclasses.replace(
        real_config(source), model=dataclasses.replace(real_config(source).model, dtype="bfloat16")))
    with pytest.raises(WeightsRead):  # a folder converted for bf16: its dtype
        load_model(converted["c2i_tiny"], attention="cudnn")


def test_loading_a_checkpoint_again_compiles_nothing(converted):
    """A notebook's sweep over checkpoints compiled the finiteness check of the weights at every load."""
    from test_sampling import counting_lowerings

    load_model(converted["c2i_tiny"])
    with counting_lowerings() as compiled:
        load_model(converted["c2i_tiny"])
    assert compiled == []


def test_load_model_checks_its_weights_choice_before_the_path(tmp_path, converted):
    """As dtype and attention: a mistyped weights= is named first, not after the path is resolved
    (an hf:// checkpoint's config downloaded) or refused for another reason."""
    from pixelflow_jax.api import read_checkpoint, resolve_checkpoint

    with pytest.raises(CheckpointError, match="weights must be one of"):
        load_model(str(tmp_path / "nowhere"), weights="opt_state")
    with pytest.raises(CheckpointError, match="weights must be one of"):  # a converted folder's one set was read
        read_checkpoint(resolve_checkpoint(converted["c2i_tiny"]), "opt_state")


def test_load_model_of_a_model_pt_reads_its_release_folder(tmp_path):
    _, config = load_model(os.path.join(fixture_dir("c2i_tiny"), "model.pt"))
    assert config.resolution == 64
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; checkpoints are folders"):
        load_model(str(tmp_path / "weights.pt"))


def test_a_weights_file_given_as_a_checkpoint_is_sent_to_the_converter_unless_it_lies_in_one(tmp_path, converted):
    """A train.py checkpoint (exp/model_2000.pt) was told "pass the folder that holds it", and that
    folder was then refused as no checkpoint, without a word of the conversion its files need."""
    from pixelflow_jax.api import resolve_checkpoint

    exp = tmp_path / "exp0001"
    exp.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"), exp)
    (exp / "model_2000.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as refused:
        resolve_checkpoint(str(exp / "model_2000.pt"))
    assert str(refused.value) == (f"{exp}/model_2000.pt is a file; checkpoints are folders: convert it with "
                                  f"convert_torch_ckpt.py --torch_checkpoint={exp}/model_2000.pt --output=DIR "
                                  "and pass DIR")
    for step in (10000, 9000):  # train.py's output folder: the newest step is offered, by number
        (exp / f"model_{step}.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as refused:
        resolve_checkpoint(str(exp))
    assert str(refused.value).endswith(f"; it holds model_2000.pt, model_9000.pt, model_10000.pt: convert one with "
                                       f"convert_torch_ckpt.py --torch_checkpoint={exp}/model_10000.pt --output=DIR "
                                       "and pass DIR"), refused.value
    release = tmp_path / "release"  # a file of a checkpoint names that checkpoint
    shutil.copytree(fixture_dir("c2i_tiny"), release)
    for folder, file in ((release, "golden.npz"), (converted["c2i_tiny"], "pixelflow_config.json")):
        with pytest.raises(CheckpointError, match=f"is a file; checkpoints are folders; it lies inside the "
                                                  f"checkpoint {folder}: pass that"):
            resolve_checkpoint(os.path.join(folder, file))


def test_eval_refuses_what_is_not_uint8_images(tmp_path):
    from pixelflow_jax.evaluation.evaluate import npz_image_count

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
                                 ("float", np.zeros((4, 8, 8, 3), np.float32), r"images in \[-1, 1\] with \(\(x \+ 1\)"),
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
    np.savez(tmp_path / "labels_alone.npz", np.arange(6), scores=np.zeros(6))  # no images beside: as before
    with pytest.raises(ValueError, match=r"arr_0 must be images \(N, H, W, 3\), got shape \(6,\)$"):
        npz_image_count(str(tmp_path / "labels_alone.npz"))
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
    np.savez(images, arr_0=np.zeros((8, 8, 8, 3), np.uint8))
    (tmp_path / "weights.pth").write_bytes(b"")
    for name, make in (("eval_features", lambda p: p.write_text("")), ("eval.json", lambda p: p.mkdir())):
        workdir = tmp_path / name.replace(".", "_")
        workdir.mkdir()
        make(workdir / name)
        with pytest.raises(ValueError, match=rf"{name} is a (file|folder), where the evaluation keeps its"):
            check_inputs(str(images), str(images), str(tmp_path / "weights.pth"), str(workdir))


def test_a_half_written_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from pixelflow_jax.training.train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(str(tmp_path), resumed_step=2)
        log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "metrics.jsonl: dropping an unreadable line" in caplog.text


def test_a_warmup_longer_than_the_run_is_named(caplog):
    from pixelflow_jax.model import ModelConfig
    from pixelflow_jax.training import train

    for warmup, warned in ((4, False), (100, True)):
        config = c2i_config(**{"train.warmup_steps": warmup, "train.num_steps": 6, "train.batch_size": 32})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train.validate(config, ModelConfig.from_mapping(config.model), train.make_mesh(1))
        assert ("train.warmup_steps (100) is not below train.num_steps (6): this run ends before its learning rate "
                "reaches train.lr") in caplog.text if warned else "warmup" not in caplog.text


def test_a_skipped_steps_non_finite_metrics_are_standard_json(tmp_path):
    """grad_norm Infinity was written as `Infinity`, which jq and JavaScript refuse."""
    from pixelflow_jax.training.train import MetricsLog

    log = MetricsLog(str(tmp_path), resumed_step=0)
    line = log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "images_per_s": 2.0,
                      "skipped_steps": 1})
    log.close()
    assert "loss nan" in line and "grad_norm inf" in line  # the readable line keeps them
    strict = json.loads((tmp_path / "metrics.jsonl").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict == {"step": 1, "loss": None, "grad_norm": None, "images_per_s": 2.0, "skipped_steps": 1}


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    import jax

    from pixelflow_jax.training import checkpointing

    state = {"w": jax.numpy.arange(4.0)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    for step in (2, 4):
        checkpointing.save(manager, step, {"w": state["w"] * step})
    checkpointing.save(manager, 5, {"w": state["w"] * np.nan})  # as damaged bytes can read back: no error, NaN
    manager.wait_until_finished()
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for name in files:
            open(os.path.join(root, name), "wb").close()  # damaged: every file emptied
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.resume_point(manager, state, shardings)
    assert step == 2 and np.asarray(restored["w"]).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert "checkpoints/5 cannot be restored (ValueError: it holds non-finite values" in caplog.text
    assert "checkpoints/4 cannot be restored" in caplog.text and "trying the one before it" in caplog.text
    # Set aside, so that saves go on from step 2 (orbax saves only steps after its latest one).
    assert manager.all_steps() == [2] and sorted(p.name.split("-")[0] for p in (tmp_path / "unreadable_checkpoints").iterdir()) == ["4", "5"]
    checkpointing.save(manager, 3, restored)
    checkpointing.wait_for_saves(manager)
    assert manager.all_steps() == [2, 3]
    with pytest.raises(CheckpointError, match="orbax did not save step 1 in .* it already holds step 3"):
        checkpointing.save(manager, 1, restored)


@pytest.mark.parametrize("times,names", [((1000, 2000), ["4-1000", "4-2000"]), ((1000, 1000), ["4-1000", "4-1000-2"])])
def test_a_step_set_aside_at_two_resumes_keeps_both_copies_side_by_side(tmp_path, monkeypatch, times, names):
    """A step that does not restore at two resumes (saved again in between, and damaged again) is set
    aside each time under its step and the time: neither copy replaces the other or goes inside it,
    even within one second (the second copy went inside the first)."""
    from types import SimpleNamespace

    from pixelflow_jax.training import checkpointing

    state = {"w": jnp.arange(4.0)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    clock = iter(times)  # the resumes' times
    monkeypatch.setattr(checkpointing, "time", SimpleNamespace(time=lambda: next(clock)))
    checkpointing.save(manager, 2, state)
    for _ in range(2):
        checkpointing.save(manager, 4, {"w": state["w"] * np.nan})
        manager.wait_until_finished()
        assert checkpointing.resume_point(manager, state, shardings)[0] == 2
    aside = tmp_path / "unreadable_checkpoints"
    assert sorted(os.listdir(aside)) == names
    step_folder = sorted(os.listdir(tmp_path / "checkpoints" / "2"))  # what each copy holds: a step folder's files
    assert sorted(os.listdir(aside / names[0])) == sorted(os.listdir(aside / names[1])) == step_folder
    manager.close()


def test_a_checkpoint_with_one_non_finite_value_is_skipped_and_one_where_none_restores_is_an_error(tmp_path, caplog):
    """One NaN among finite values (damaged bytes of one chunk) is as unusable as all NaN: resumed,
    the run would train from it. And where no step restores, the run stops naming them, rather than
    start afresh (or fail later with another message) in a workdir that holds its checkpoints."""
    from pixelflow_jax.training import checkpointing

    state = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    checkpointing.save(manager, 2, state)
    checkpointing.save(manager, 4, {**state, "w": state["w"].at[1].set(jnp.nan)})
    manager.wait_until_finished()
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.resume_point(manager, state, shardings)
    assert step == 2 and "checkpoints/4 cannot be restored (ValueError: it holds non-finite values" in caplog.text
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:
            open(os.path.join(root, name), "wb").close()  # damaged: every file emptied
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints can be restored \(steps \[2\]\)"):
        checkpointing.resume_point(manager, state, shardings)
    assert manager.all_steps() == [2]  # nothing set aside: the user decides
    manager.close()


def test_a_run_already_trained_to_num_steps_says_so(tmp_path, capsys):
    import jax

    from pixelflow_jax.training import checkpointing, train

    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32)  # 4 stages x the 8 test devices
    check_run_config(str(tmp_path), ModelConfig.from_mapping(config.model), config)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=2)
    checkpointing.save(manager, 4, {"w": jax.numpy.zeros(2)})
    manager.wait_until_finished()
    dead, here = 999999999, socket.gethostname()  # what killed writers of the run left: removed once it is ours
    (tmp_path / "previews").mkdir()
    left = [tmp_path / f".run_config.json.tmp-{here}-{dead}-a", tmp_path / "previews" / f".step_0000002.png.tmp-{here}-{dead}-b"]
    live = tmp_path / f".metrics.jsonl.tmp-{here}-{os.getpid()}-c"  # a live writer's (this process): kept
    for path in left + [live]:
        path.write_bytes(b"")
    killed_save = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1732" / "state"  # renamed to 6 when done
    killed_save.mkdir(parents=True)
    (killed_save / "data").write_bytes(b"partial")
    assert train.train(config, str(tmp_path)) == {}
    assert "already trained to step 4 (train.num_steps = 4): nothing to do" in capsys.readouterr().out
    assert not any(path.exists() for path in left) and live.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_a_resume_with_changed_settings_is_refused_before_the_checkpoint_is_restored(tmp_path):
    """The stand-in checkpoint below cannot restore into a train state: only a check made before
    the restore gives the settings error."""
    import jax

    from pixelflow_jax.training import checkpointing, train
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE

    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32)
    check_run_config(str(tmp_path), ModelConfig.from_mapping(config.model), config)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=2)
    checkpointing.save(manager, 2, {"w": jax.numpy.zeros(2)})
    manager.wait_until_finished()
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"train.lr": 0.5}))
    with pytest.raises(ValueError, match=r"trained to step 2 with other settings \(.*train.lr: 0.5 -> 0.0001"):
        train.train(config, str(tmp_path))


@pytest.mark.slow
def test_a_run_stops_after_max_bad_steps_without_logging_or_saving_a_step_past_them(tmp_path, monkeypatch):
    """lr 1e30 makes every update overflow, so every step is skipped. The loop reads a step's
    non-finite count after queueing the next step, except on steps it logs or saves."""
    from pixelflow_jax.training import train

    dispatched = []
    make_train_step = train.make_train_step

    def counted(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        return lambda *inputs: dispatched.append(1) or step(*inputs)

    monkeypatch.setattr(train, "make_train_step", counted)

    def stopped_run(workdir, max_bad_steps):
        dispatched.clear()
        config = c2i_config()
        config.train.update(num_steps=8, batch_size=32, lr=1e30, max_bad_steps=max_bad_steps, log_every=2,
                            checkpoint_every=2, preview_every=0)
        with pytest.raises(train.TrainingStopped) as stop:
            train.train(config, str(workdir))
        log = workdir / "metrics.jsonl"
        logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return (str(stop.value), train.complete_steps(str(workdir)), [(r["step"], r["skipped_steps"]) for r in logged],
                len(dispatched))

    # Step 3 is read while step 4 is queued, before step 4's save: step 2 (the initial weights) stays.
    assert stopped_run(tmp_path / "three", 3) == (
        "3 non-finite steps in a row (train.max_bad_steps); stopped at step 3 without saving: the last good "
        "checkpoint is step 2", [2], [(2, 2)], 4)
    # Step 2 is due to be logged and saved: it is read first, and nothing of it is written.
    assert stopped_run(tmp_path / "two", 2) == (
        "2 non-finite steps in a row (train.max_bad_steps); stopped at step 2 without saving: no checkpoint of "
        "this run was saved", [], [], 2)


def test_the_converter_never_replaces_its_input_or_a_foreign_folder(tmp_path, converted):
    release = tmp_path / "release"
    shutil.copytree(fixture_dir("c2i_tiny"), release)
    result = run_converter(f"--torch_checkpoint={release}", f"--output={release}", "--overwrite")
    assert result.returncode != 0 and "overlaps the input" in result.stderr
    assert sorted(os.listdir(release)) == ["config.yaml", "golden.npz", "golden_train_step.npz", "model.pt"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"cat")
    result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={foreign}",
                           "--overwrite")
    assert result.returncode != 0 and "replaces only an earlier export" in result.stderr
    assert os.listdir(foreign) == ["cat.jpg"]

    # A release folder the user downloaded looks like an export (config.yaml + model.pt), and a
    # conversion may hold the user's notes: neither is replaced.
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(release / name, downloaded / name)
    with_notes = tmp_path / "with_notes"
    shutil.copytree(converted["c2i_tiny"], with_notes)
    (with_notes / "notes.txt").write_text("mine")
    for args, output in ((("--to_torch", f"--jax_checkpoint={converted['t2i_tiny']}"), downloaded),
                         ((f"--torch_checkpoint={release}",), with_notes)):
        before = {name: (output / name).stat().st_mtime_ns for name in os.listdir(output)}
        result = run_converter(*args, f"--output={output}", "--overwrite")
        assert result.returncode != 0 and "holding nothing else" in result.stderr, result.stderr
        assert {name: (output / name).stat().st_mtime_ns for name in os.listdir(output)} == before
    export = tmp_path / "export"
    for _ in range(2):  # an export of this tool is marked as one, so --overwrite may replace it
        result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={export}",
                               "--overwrite")
        assert result.returncode == 0, result.stderr


def test_a_converted_folder_is_marked_complete_by_its_config_written_after_its_params(tmp_path, monkeypatch):
    """In a bucket a converted folder is written in place: a conversion killed after writing
    pixelflow_config.json but before its params would leave a folder that reads as a checkpoint."""
    import orbax.checkpoint as ocp

    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, CheckpointConfig, read_config, save_checkpoint

    output, marked_before_params = tmp_path / "out", []
    real_save = ocp.StandardCheckpointer.save

    def save_params(self, directory, *args, **kwargs):
        marked_before_params.append(os.path.exists(os.path.join(os.path.dirname(str(directory)), CONFIG_FILE)))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_params)
    config = CheckpointConfig(model=ModelConfig.from_mapping(c2i_config().model))
    save_checkpoint(str(output), {"w": np.zeros(2, np.float32)}, config)
    assert marked_before_params == [False] and read_config(str(output)) == config


def test_what_killed_runs_left_is_cleaned_up_on_the_next_run(tmp_path):
    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir
    from pixelflow_jax.demo_app import demo_output_dir

    dead = 999999999  # no such process
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.old-{dead}-def" / "previous").mkdir(parents=True)  # killed mid-swap: the only copy
    (tmp_path / f".out.old-{dead}-def" / "previous" / "model.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="already exists"):  # the old output is put back, not replaced
        with atomic_output_dir(str(tmp_path / "out")):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "model.pt").read_bytes() == b"old"

    # On a disk shared by hosts: another host's writer may be alive, so its temporary is kept for a day.
    (tmp_path / ".out.tmp-other-host.example-7-abc").mkdir()
    with atomic_output_dir(str(tmp_path / "out"), overwrite=True):
        pass
    assert sorted(os.listdir(tmp_path)) == [".out.tmp-other-host.example-7-abc", "out"]

    (tmp_path / "samples").mkdir()
    here, day_old = socket.gethostname(), time.time() - 25 * 3600
    ours = [f".000001.png.tmp-{dead}-x", "000002.png.tmp", "samples.npz.tmp.npz", f".000005.png.tmp-{here}-{dead}-z",
            f".000009.png.tmp-{here}-{os.getpid()}-t",  # a predecessor's with this pid (a restarted container)
            ".000006.png.tmp-other-host.example-7-w"]  # the last two a day old
    kept = [f".000003.png.tmp-{os.getpid()}-y", f".000007.png.tmp-{here}-{os.getpid()}-v",  # live writers'
            ".000008.png.tmp-other-host.example-7-u", "000004.png", "cache.tmp.npz", "draft.tmp"]  # a user's
    for name in ours + kept:
        (tmp_path / "samples" / name).write_bytes(b"")
    for name in ours[-2:]:
        os.utime(tmp_path / "samples" / name, (day_old, day_old))
    assert storage.remove_temporaries(str(tmp_path / "samples")) == len(ours)
    assert sorted(os.listdir(tmp_path / "samples")) == sorted(kept)

    outputs = tmp_path / "demo_outputs"  # the user's files, a killed page, a page still serving
    outputs.mkdir()
    (outputs / "keep.png").write_bytes(b"")
    (outputs / "my_favourites").mkdir()
    (outputs / f"page-{here}-{dead}-a" / "request").mkdir(parents=True)
    serving = outputs / f"page-{here}-{os.getppid()}-b"
    serving.mkdir()
    (serving / "0.png").write_bytes(b"")
    mine = demo_output_dir(str(tmp_path))
    assert os.path.dirname(mine) == str(outputs) and os.path.basename(mine).startswith(f"page-{here}-{os.getpid()}-")
    assert sorted(os.listdir(outputs)) == sorted(["keep.png", "my_favourites", serving.name, os.path.basename(mine)])
    assert os.listdir(serving) == ["0.png"]  # a second page on the workdir left the first one's images


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_demo_outputs_link_or_file_is_named_and_left_alone(tmp_path, kind):
    from pixelflow_jax.demo_app import demo_output_dir

    mine = tmp_path / "my_pictures"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"png")
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "link":
        (workdir / "demo_outputs").symlink_to(mine)
    else:
        (workdir / "demo_outputs").write_text("notes")
    with pytest.raises(ValueError, match=f"demo_outputs is a {kind}, where the page keeps its images"):
        demo_output_dir(str(workdir))
    assert os.listdir(mine) == ["holiday.png"]


def test_the_demo_page_keeps_only_its_newest_requests_on_disk(tmp_path):
    from pixelflow_jax.demo_app import remove_old_requests

    for i in range(5):
        (tmp_path / f"request{i}").mkdir()
        (tmp_path / f"request{i}" / "pixelflow_0_0.png").write_bytes(b"png")
        os.utime(tmp_path / f"request{i}", ns=(i * 10**9, i * 10**9))  # request4 is the newest
    remove_old_requests(str(tmp_path), keep=3)
    assert sorted(os.listdir(tmp_path)) == ["request2", "request3", "request4"]
    remove_old_requests(str(tmp_path), keep=3)
    assert len(os.listdir(tmp_path)) == 3


def test_a_bucket_workdir_demo_removes_the_output_folders_of_killed_pages(tmp_path, monkeypatch):
    """A page of a bucket workdir keeps its images in /tmp: a later page removes those of killed
    pages once untouched for an hour, never those of a page still serving, nor a recent one (a page
    in another container that shares /tmp and the hostname: its process is not visible here)."""
    import tempfile

    from pixelflow_jax.demo_app import demo_output_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here, hour_ago = socket.gethostname(), time.time() - 3700
    dead, recent, alive = (tmp_path / f"pixelflow_demo-{here}-{pid}-x" for pid in (999999999, 999999998, os.getppid()))
    for folder in (dead, recent, alive, tmp_path / "pixelflow_demo_other"):
        folder.mkdir()
    (dead / "request").mkdir()
    for path in (dead / "request", dead, alive):
        os.utime(path, (hour_ago, hour_ago))
    mine = demo_output_dir("gs://bucket/page")
    assert os.path.isdir(mine) and os.path.basename(mine).startswith(f"pixelflow_demo-{here}-{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == sorted([recent.name, alive.name, "pixelflow_demo_other", os.path.basename(mine)])


def test_a_demo_request_of_non_numbers_through_the_api_is_answered_on_the_page():
    from pixelflow_jax.demo_app import DemoSampler

    demo = DemoSampler.__new__(DemoSampler)  # check() needs no model
    demo.text, demo.num_classes, demo.max_images = False, 10, 8
    good = dict(condition=3, solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    assert demo.check(**good) is None
    assert demo.check(**{**good, "condition": 9.0, "seed": 7.0}) is None  # JSON numbers may come as floats
    assert demo.check(**{**good, "condition": "3"}) is None  # Gradio's API lists the dropdown's ids as strings
    for change, message in [({"cfg": None}, "CFG must be a number, got None."),
                            ({"cfg": "4"}, "CFG must be a number, got '4'."),
                            ({"steps": [2, None, 2, 2]}, "Steps of stage 1 must be a number, got None."),
                            ({"seed": float("nan")}, "Seed must be a number, got nan."),
                            # Gradio's own checks no longer run first: these reached the model or were rounded.
                            ({"seed": 0.5}, "Seed must be a whole number from 0 to 4294967295."),
                            ({"condition": 10}, "Class must be a whole number from 0 to 9, got 10."),
                            ({"condition": -1}, "Class must be a whole number from 0 to 9, got -1."),
                            ({"condition": "3.0"}, "Class must be a whole number from 0 to 9, got '3.0'."),
                            ({"condition": "12"}, "Class must be a whole number from 0 to 9, got 12."),
                            ({"condition": True}, "Class must be a whole number from 0 to 9, got True."),
                            ({"condition": float("inf")}, "Class must be a whole number from 0 to 9, got inf."),
                            ({"condition": None}, "Pick a class."),
                            ({"solver": "heun"}, "Solver must be one of euler, dopri5, got 'heun'.")]:
        assert demo.check(**{**good, **change}) == message
    demo.text = True
    assert demo.check(**{**good, "condition": "a red fox"}) is None
    assert demo.check(**{**good, "condition": " "}) == "Type a prompt."
    assert demo.check(**{**good, "condition": ["a red fox"]}) == "The prompt must be text, got ['a red fox']."


def bare_demo(**fields):
    """A DemoSampler without a model: check(), named() and generate() need only these fields."""
    from pixelflow_jax.demo_app import DemoSampler

    demo = DemoSampler.__new__(DemoSampler)
    demo.text, demo.num_classes, demo.max_images, demo.compiled = False, 10, 8, set()
    for name, value in fields.items():
        setattr(demo, name, value)
    return demo


def test_a_demo_request_is_accepted_at_each_limit_the_page_states_and_refused_just_past_it():
    """The page's limits are inclusive at both ends (a slider's own ends, seed 2**32 - 1, class 0);
    one step past either end, a fraction where a count goes, or True where a number goes is
    refused naming that limit. A class id sent as text with blanks is read as the id; digits that
    are no decimal ('²') are refused, not a crash in int()."""
    from pixelflow_jax.validation import DEMO_CFG_RANGE, DEMO_MAX_STEPS, DEMO_SHIFT_RANGE, MAX_SEED

    demo = bare_demo()
    good = dict(condition=3, solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    accepted = [{"condition": 0}, {"condition": 9}, {"condition": " 7 "}, {"num_images": 1}, {"num_images": 8},
                {"num_images": 8.0}, {"cfg": DEMO_CFG_RANGE[0]}, {"cfg": DEMO_CFG_RANGE[1]},
                {"shift": DEMO_SHIFT_RANGE[0]}, {"shift": DEMO_SHIFT_RANGE[1]}, {"steps": [1, DEMO_MAX_STEPS, 1, 1]},
                {"seed": MAX_SEED}, {"seed": 5.0}]
    for change in accepted:
        assert demo.check(**{**good, **change}) is None, change
    images = "Number of images must be a whole number from 1 to 8."
    cfg = f"CFG must be between {DEMO_CFG_RANGE[0]:g} and {DEMO_CFG_RANGE[1]:g}."
    shift = f"Noise shift must be between {DEMO_SHIFT_RANGE[0]:g} and {DEMO_SHIFT_RANGE[1]:g}."
    steps = f"Steps per stage must be whole numbers from 1 to {DEMO_MAX_STEPS}."
    seed = f"Seed must be a whole number from 0 to {MAX_SEED}."
    refused = [({"num_images": 0}, images), ({"num_images": 9}, images), ({"num_images": 2.5}, images),
               ({"cfg": DEMO_CFG_RANGE[0] - 0.1}, cfg), ({"cfg": DEMO_CFG_RANGE[1] + 0.1}, cfg),
               ({"shift": DEMO_SHIFT_RANGE[0] - 0.1}, shift), ({"shift": DEMO_SHIFT_RANGE[1] + 0.1}, shift),
               ({"steps": [2, 0, 2, 2]}, steps), ({"steps": [2, 2, DEMO_MAX_STEPS + 1, 2]}, steps),
               ({"steps": [2, 2, 2, 1.5]}, steps), ({"seed": -1}, seed), ({"seed": MAX_SEED + 1}, seed),
               ({"cfg": True}, "CFG must be a number, got True."),
               ({"condition": "\u00b2"}, "Class must be a whole number from 0 to 9, got '\u00b2'.")]
    for change, message in refused:
        assert demo.check(**{**good, **change}) == message, change


def test_a_demo_request_samples_what_was_asked_and_keeps_one_png_per_image_named_by_its_seed(tmp_path):
    """generate() gives the sampler the request as the sampling job takes it (whole numbers as
    ints, though JSON may send 7.0; one condition per image), writes each image's pixels to
    pixelflow_SEED_I.png in a new request folder, and leaves only the newest KEPT_REQUESTS folders."""
    from pixelflow_jax import demo_app

    class RecordingSampler:
        def __init__(self):
            self.calls = []

        def generate(self, labels, **options):
            self.calls.append((labels, options))
            return [np.full((4, 4, 3), 40 * i, np.uint8) for i in range(len(labels))]

    older = [tmp_path / f"old{i}" for i in range(demo_app.KEPT_REQUESTS)]
    for age, folder in enumerate(older):
        folder.mkdir()
        os.utime(folder, ns=(age * 10**9, age * 10**9))  # all long before this request
    demo = bare_demo(sampler=RecordingSampler(), output_dir=str(tmp_path))
    paths = demo.generate(3.0, 3.0, "euler", 4, 2, [2.0, 3, 1, 1], 7.0)
    (labels, options), = demo.sampler.calls
    assert labels == [3, 3, 3] and all(type(label) is int for label in labels)
    assert options == dict(steps_per_stage=[2, 3, 1, 1], cfg_scale=4.0, solver="euler", shift=2.0, seed=7)
    assert type(options["seed"]) is int and type(options["cfg_scale"]) is float
    assert [os.path.basename(path) for path in paths] == [f"pixelflow_7_{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.full((4, 4, 3), 40 * i, np.uint8))
    assert demo.compile_key(3, "euler", 4.0, [2, 3, 1, 1]) in demo.compiled
    kept = sorted(os.listdir(tmp_path))
    assert len(kept) == demo_app.KEPT_REQUESTS and "old0" not in kept and os.path.dirname(paths[0]) in \
        [str(tmp_path / name) for name in kept]


def test_the_demo_status_line_names_the_class_as_a_whole_number_and_shortens_only_prompts_past_80_characters():
    """An API client may send class 207.0 (named 'class 207'); a prompt of exactly
    SHOWN_PROMPT_CHARS characters is shown whole, one character more is cut there with '...'."""
    from types import SimpleNamespace

    from pixelflow_jax.demo_app import SHOWN_PROMPT_CHARS

    class PlainTokenizer:  # nothing cut, nothing unknown
        max_length = 16

        def tokenize(self, prompts):
            return np.zeros((len(prompts), 16), np.int32), None, [False] * len(prompts)

        def has_unknown_text(self, ids):
            return [False] * len(ids)

    assert bare_demo().named(207.0) == "class 207"
    demo = bare_demo(text=True, prompt_encoder=SimpleNamespace(tokenizer=PlainTokenizer()))
    exactly = "x" * SHOWN_PROMPT_CHARS
    assert demo.named(exactly) == f"prompt {exactly!r}"
    assert demo.named(exactly + "y") == f"prompt {exactly + '...'!r}"


def test_the_class_picker_lists_imagenet_names_by_id_for_1000_classes_and_numbers_otherwise():
    """Option i must send class id i: a name shifted by one would sample the class beside the one picked."""
    from pixelflow_jax.demo_app import IMAGENET_NAMES, class_choices

    names = json.load(open(IMAGENET_NAMES))
    choices = class_choices(1000)
    assert len(choices) == 1000 and all(choice == (f"{i}: {names[i]}", i) for i, choice in enumerate(choices))
    assert class_choices(3) == [("class 0", 0), ("class 1", 1), ("class 2", 2)]


@pytest.mark.parametrize("share", [False, True])
def test_the_demo_page_binds_to_this_machine_unless_told_to_share(monkeypatch, share):
    """config.demo.share_on_network=False must keep the page (and the checkpoint it samples) off
    the network: 127.0.0.1, not every interface."""
    from pixelflow_jax import demo_app

    class Bound(Exception):
        pass

    def bind(host, port):
        raise Bound(host, port)

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(demo_app, "check_port_free", bind)
    with pytest.raises(Bound) as bound:
        demo_app.run(c2i_config(**{"demo.share_on_network": share, "demo.port": 8123}))
    assert bound.value.args == ("0.0.0.0" if share else "127.0.0.1", 8123)


def test_a_demo_page_stopped_by_sigterm_leaves_a_notebook_as_it_was(monkeypatch, tmp_path):
    """demo_app.run left its SIGTERM handler installed and the stop recorded: in a notebook, every
    sampling job after a page stopped by SIGTERM raised Terminated at its first batch."""
    import signal
    import threading
    import types

    from pixelflow_jax import command_line, demo_app

    class Page:
        def queue(self):
            return self

        def launch(self, **_):
            pass

        @property
        def is_running(self):
            os.kill(os.getpid(), signal.SIGTERM)  # a `kill` meant for the page
            return True

        def close(self):
            pass

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(demo_app, "check_port_free", lambda *_: None)
    monkeypatch.setattr(demo_app, "DemoSampler", lambda *_: types.SimpleNamespace(output_dir=str(tmp_path / "out")))
    monkeypatch.setattr(demo_app, "build_page", lambda *_: Page())
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "out").mkdir()
    with pytest.raises(command_line.Terminated):
        demo_app.run(c2i_config(**{"sample.checkpoint": "ckpt"}), str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is before
    command_line.stop_if_terminated()  # a sampling job's check at each batch: no stop pending
    assert (tmp_path / "out").is_dir()  # a local workdir's demo outputs are kept
    with pytest.raises(command_line.Terminated):
        demo_app.run(c2i_config(**{"sample.checkpoint": "ckpt"}), "")
    assert not (tmp_path / "out").exists()  # a page without a workdir: its temporary folder removed
    heard = []
    signal.signal(signal.SIGTERM, lambda *_: heard.append("SIGTERM"))  # a notebook's own handler
    try:
        with command_line.sigterm_stops():  # a page closed while a dropped SIGTERM waits to be delivered again
            command_line.deliver_again_later(signal.SIGTERM)
        time.sleep(5 * command_line.REDELIVERY_DELAY_S)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert heard == []  # the page's stop, not the notebook's
    served = []  # a page served from a notebook's thread, where signal.signal raises ValueError

    def serve_in_a_thread():
        with command_line.sigterm_stops():
            served.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=serve_in_a_thread)
    thread.start()
    thread.join()
    assert served == [before]


def test_a_dropped_sigterm_delivered_again_as_the_page_closes_never_reaches_the_notebooks_handler(monkeypatch):
    """sigterm_stops gave the notebook its handler back before it forgot a dropped SIGTERM waiting
    to be delivered again: a delivery at that instant went to the notebook's handler (here a
    list; a notebook's own cleanup, or the default handler's exit, elsewhere)."""
    import signal

    from pixelflow_jax import command_line

    real_signal, heard = signal.signal, []

    def delivered_again_the_moment_it_is_restored(signum, handler):
        previous = real_signal(signum, handler)
        if handler is notebooks:  # the delivery's timer fires right then
            command_line._deliver_again(signum)
            time.sleep(5 * command_line.REDELIVERY_DELAY_S)  # for a signal sent to be handled
        return previous

    def notebooks(*_):
        heard.append("SIGTERM")

    before = real_signal(signal.SIGTERM, notebooks)
    try:
        monkeypatch.setattr(command_line.signal, "signal", delivered_again_the_moment_it_is_restored)
        with command_line.sigterm_stops():
            command_line._dropped[signal.SIGTERM] = True  # a SIGTERM dropped while the page served
        monkeypatch.undo()
    finally:
        real_signal(signal.SIGTERM, before)
    assert heard == []


def test_the_demo_compiles_per_euler_step_counts_not_dopri5_ones():
    """The page said "Compiling..." whenever a step slider moved under dopri5, which uses none."""
    from pixelflow_jax.demo_app import DemoSampler

    key = DemoSampler.compile_key
    assert key(None, 2, "euler", 4.0, [2, 2, 2, 2]) != key(None, 2, "euler", 4.0, [2, 3, 2, 2])
    assert key(None, 2, "dopri5", 4.0, [2, 2, 2, 2]) == key(None, 2, "dopri5", 4.0, [2, 3, 2, 2])
    assert key(None, 2, "dopri5", 4.0, [2, 2, 2, 2]) != key(None, 2, "dopri5", 1.0, [2, 2, 2, 2])  # unguided


def test_a_demo_with_steps_for_another_number_of_stages_is_one_line(converted):
    from configs import c2i
    from pixelflow_jax.demo_app import DemoSampler

    config = c2i.get_config("tiny")
    config.sample.update(checkpoint=converted["c2i_tiny"], steps_per_stage=(1, 2, 3))
    with pytest.raises(ValueError, match=r"steps_per_stage gives 3 values; .*c2i_tiny has 4 stages"):
        DemoSampler(config)


def test_a_demo_port_in_use_names_the_flag():
    from pixelflow_jax.demo_app import check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="is in use .*--config.demo.port=PORT"):
            check_port_free("127.0.0.1", busy.getsockname()[1])


def test_init_from_given_to_a_run_that_trains_warns_unless_it_is_where_the_run_started(tmp_path, caplog):
    """A resume reads no init_from. The same command rerun after a preemption passes quietly; an
    init_from the run did not start from (a fine-tune typed into an existing workdir) is a warning
    naming both, even after an allowed settings change rewrote the record."""
    from pixelflow_jax.training.resume_settings import check_resume, note_init_from_at_resume

    started, other = str(tmp_path / "base_run"), str(tmp_path / "other_run")
    tuned, scratch = str(tmp_path / "tuned"), str(tmp_path / "scratch")
    check_resume(tuned, c2i_config(**{"train.init_from": started}), step=0, num_records=100)
    check_resume(scratch, c2i_config(), step=0, num_records=100)

    def warnings_of(workdir, init_from):
        caplog.clear()
        with caplog.at_level("INFO"):
            note_init_from_at_resume(workdir, 40, init_from)
        assert "resumes from its step 40; train.init_from starts new runs only" in caplog.text
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings_of(tuned, started + "/") == []  # as typed again, a trailing slash aside
    [warning] = warnings_of(tuned, other)
    assert f"this run started from {started}, not from {other}. To train a new run from {other}, use a new " \
           "--workdir" in warning
    [warning] = warnings_of(scratch, started)
    assert f"this run trained from scratch, not from {started}" in warning
    changed = c2i_config(**{"train.init_from": other, "train.lr": 1e-3, "train.allow_resume_changes": True})
    check_resume(tuned, changed, step=40, num_records=100)  # rewrites train_settings.json
    assert warnings_of(tuned, started) == []


def test_init_from_weights_other_than_a_fine_tune_started_from_is_a_warning_at_its_resume(tmp_path, caplog):
    """A fine-tune from a run's EMA, rerun in its workdir with init_from_weights=model to try the
    raw weights instead: it resumed the EMA fine-tune with an INFO line saying init_from is not read
    (the path was the one it started from), as if the command were the same."""
    from pixelflow_jax.training.resume_settings import check_resume, note_init_from_at_resume

    started, tuned = str(tmp_path / "base_run"), str(tmp_path / "tuned")
    check_resume(tuned, c2i_config(**{"train.init_from": started}), step=0, num_records=100,
                 init_checkpoint=f"{started}/checkpoints/4", init_weights="ema")
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(tuned, 40, started, "ema")  # the same command rerun: said in passing
        assert caplog.text == ""
        note_init_from_at_resume(tuned, 40, started, "model")
    assert (f"resumes from its step 40; train.init_from starts new runs only and is not read: this run started "
            f"from the ema weights of {started}/checkpoints/4, not from the model weights of {started}. To train a "
            f"new run from those, use a new --workdir") in caplog.text
    # A converted folder holds one set: no choice was made (api.weights_chosen), so none is recorded or compared.
    caplog.clear()
    converted, tuned = str(tmp_path / "converted"), str(tmp_path / "tuned_from_converted")
    check_resume(tuned, c2i_config(**{"train.init_from": converted}), step=0, num_records=100,
                 init_checkpoint=converted, init_weights=None)
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(tuned, 40, converted, "model")
    assert caplog.text == ""


def test_a_resume_without_its_recorded_settings_says_it_goes_unchecked(tmp_path, caplog):
    """A run copied without train_settings.json resumed with any learning rate or batch size and
    said nothing: the check that refuses such changes had nothing to compare with."""
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, STARTED_FROM, check_resume, \
        note_init_from_at_resume

    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)  # a new run: nothing to say
        assert caplog.text == ""
        (tmp_path / SETTINGS_FILE).unlink()
        check_resume(str(tmp_path), c2i_config(**{"train.lr": 1.0}), step=40, num_records=100, record=False)
        assert caplog.text == ""  # said once, by the call that records
        check_resume(str(tmp_path), c2i_config(**{"train.lr": 1.0}), step=40, num_records=100)
    assert f"resumes at step 40 without its {SETTINGS_FILE} (a run of a version before that file, or a copy that " \
           "missed it): this command's settings cannot be checked" in caplog.text
    recorded = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert recorded["train.lr"] == 1.0
    assert STARTED_FROM not in recorded  # recorded mid-run: what it started from is not this command's init_from
    caplog.clear()
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(str(tmp_path), 40, "base_run")
    assert "this run did not record what it started from, not from base_run" in caplog.text  # not "from scratch"

def test_a_new_run_in_a_workdir_of_deleted_checkpoints_is_not_compared_with_that_runs_changes(tmp_path):
    """A fine-tune restarted in its workdir after `rm -r checkpoints/`, with the learning rate it
    had changed to: the earlier run's settings_changes.jsonl stayed, and the new run's first resume
    undid that change on its own record and refused its own command as 'train.lr: 0.0001 -> 0.001'."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    workdir, faster = str(tmp_path), {"train.lr": 1e-3}
    check_resume(workdir, c2i_config(), step=0, num_records=100)
    check_resume(workdir, c2i_config(**faster, **{"train.allow_resume_changes": True}), step=40, num_records=100)
    check_resume(workdir, c2i_config(**faster), step=0, num_records=100)  # checkpoints/ deleted: a new run
    check_resume(workdir, c2i_config(**faster), step=20, num_records=100)  # its own command resumes it
    [record] = map(json.loads, open(tmp_path / CHANGES_FILE))  # the earlier run's history is kept, marked
    assert record["changes"] == {"train.lr": {"from": 0.0001, "to": 0.001}}
    assert record["discarded"] == "no step trained with it was kept: a new run started in this workdir"
    # Damaged, that history stopped the new run, calling it 'the settings changes of this run': kept aside.
    (tmp_path / CHANGES_FILE).write_text("{not json\n")
    check_resume(workdir, c2i_config(**faster), step=0, num_records=100)
    [aside] = [name for name in os.listdir(tmp_path) if name.startswith(f"{CHANGES_FILE}.earlier-run-")]
    assert (tmp_path / aside).read_text() == "{not json\n" and not (tmp_path / CHANGES_FILE).exists()
    check_resume(workdir, c2i_config(**faster), step=20, num_records=100)


def test_resuming_with_changed_settings_is_refused_unless_allowed_and_then_recorded(tmp_path):
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    workdir = str(tmp_path)
    check_resume(workdir, c2i_config(), step=0, num_records=100)  # a new run records its settings
    check_resume(workdir, c2i_config(), step=40, num_records=100)  # the same settings resume
    changed = c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16})
    with pytest.raises(ValueError) as error:
        check_resume(workdir, changed, step=40, num_records=100)
    assert "train.batch_size: 8 -> 16" in str(error.value) and "train.lr: 0.0001 -> 0.001" in str(error.value)
    assert "--config.train.allow_resume_changes=True" in str(error.value)
    changed.train.allow_resume_changes = True
    check_resume(workdir, changed, step=40, num_records=100)
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record == {"step": 40, "changes": {"train.batch_size": {"from": 8, "to": 16},
                                              "train.lr": {"from": 0.0001, "to": 0.001}}}
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["train.lr"] == 0.001

    # Stopped before it saved a step with the change (kill -9): resumed at step 40 again, the change
    # trained nothing kept, so the run's own settings resume (they were refused as a change) and
    # the record is marked discarded.
    with pytest.raises(ValueError, match=r"train.batch_size: 16 -> 8"):  # refused before: nothing written
        check_resume(workdir, c2i_config(), step=41, num_records=100)
    check_resume(workdir, c2i_config(), step=40, num_records=100)
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record["discarded"] == "no step trained with it was kept: the run resumed at step 40"
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["train.lr"] == 0.0001
    check_resume(workdir, c2i_config(), step=80, num_records=100)  # and on, unchanged
    check_resume(workdir, changed, step=80, num_records=100)  # the change again, this time kept (step 81 on)
    assert [c.get("discarded") is None for c in map(json.loads, open(tmp_path / CHANGES_FILE))] == [False, True]

    with pytest.raises(ValueError, match=r"data.num_records: 100 -> 99\).*settings.json \(and the data's files as "
                                         r"they were\), or pass"):  # an image deleted: another data order
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16}), step=81, num_records=99)
    with pytest.raises(ValueError, match="model.dtype: 'float32' -> 'bfloat16'"):  # other arithmetic every step
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "model.dtype": "bfloat16"}),
                     step=81, num_records=100)
    with pytest.raises(ValueError, match="data.demo_num_classes: 10 -> 12"):  # every demo image drawn anew
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.demo_num_classes": 12}),
                     step=81, num_records=100)

    from pixelflow_jax.training.resume_settings import check_optimiser_state

    # The refusal says "rerun with the values in train_settings.json": edited by hand and broken, it
    # gave a JSONDecodeError traceback, or (holding a list) a TypeError without an error line.
    recorded = (tmp_path / SETTINGS_FILE).read_text()
    for content in ('{"seed": 0, "trunc', "[]"):
        (tmp_path / SETTINGS_FILE).write_text(content)
        for call in (lambda: check_optimiser_state(workdir, c2i_config(), 40),
                     lambda: check_resume(workdir, c2i_config(), step=40, num_records=100)):
            with pytest.raises(ValueError, match=rf"{SETTINGS_FILE} is damaged \(.+\): it records the settings this "
                                                 r"run trained with.* or delete it to have it recorded again"):
                call()
    (tmp_path / SETTINGS_FILE).write_text(recorded)
    with pytest.raises(ValueError, match="data.random_flip: True -> False"):  # other images every step
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.random_flip": False}),
                     step=81, num_records=100)
    recorded = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "data.random_flip"}))
    check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16}), step=81, num_records=100)
    with pytest.raises(ValueError, match="data.random_flip: True -> False"):  # a run before the setting flipped
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.random_flip": False}),
                     step=81, num_records=100)

    # One image folder spelled three ways is one folder; an earlier version recorded it as typed.
    folder = c2i_config(**{"data.source": "folder", "data.root": "data/images"})
    settings = tmp_path / "folder" / SETTINGS_FILE
    check_resume(str(tmp_path / "folder"), folder, step=0, num_records=100)
    assert json.loads(settings.read_text())["data.root"] == os.path.realpath("data/images")
    for spelling in ("./data/images/", os.path.abspath("data/images")):
        folder.data.root = spelling
        check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "data.root": "data/images/"}))
    check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    folder.data.root = "data/other"
    with pytest.raises(ValueError, match=r"data.root: '/.*/data/images' -> '/.*/data/other'"):
        check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    folder.data.update(root="data/images", tfds_name="imagenet_v2", demo_seed=7)  # fields a folder run never reads
    check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    # A symbolic link to the folder is the folder (it was refused as a data change, the listing the same)
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images")
    folder.data.root = str(tmp_path / "images")
    check_resume(str(tmp_path / "linked"), folder, step=0, num_records=100)
    folder.data.root = str(tmp_path / "link")
    check_resume(str(tmp_path / "linked"), folder, step=40, num_records=100)


def test_a_resume_behind_several_recorded_changes_compares_with_the_settings_its_step_trained_with(tmp_path):
    """A change recorded at a resume at step S trains steps S+1 on. Resumed before two changes (their
    checkpoints set aside), the run's steps trained with the settings before the first; and a change
    discarded by a resume before it, which then recorded a change of its own, is not undone again."""
    from pixelflow_jax.training.resume_settings import check_resume, read_changes

    def lr(value, allowed=True):
        return c2i_config(**{"train.lr": value, "train.allow_resume_changes": allowed})

    def discarded_at(step):
        return f"no step trained with it was kept: the run resumed at step {step}"

    two = str(tmp_path / "two_changes")
    check_resume(two, lr(1e-4, allowed=False), step=0, num_records=100)
    check_resume(two, lr(1e-3), step=40, num_records=100)  # trains steps 41 on
    check_resume(two, lr(1e-2), step=60, num_records=100)  # trains steps 61 on
    check_resume(two, lr(1e-4, allowed=False), step=40, num_records=100)  # steps 1-40 trained with 1e-4
    assert [c.get("discarded") for c in read_changes(two)] == [discarded_at(40)] * 2

    behind = str(tmp_path / "discarded_behind_a_change")
    check_resume(behind, lr(1e-4, allowed=False), step=0, num_records=100)
    check_resume(behind, lr(1e-3), step=40, num_records=100)
    check_resume(behind, lr(1e-2), step=20, num_records=100)  # 1e-3 trained nothing kept; 1e-2 trains 21 on
    assert [c.get("discarded") for c in read_changes(behind)] == [discarded_at(20), None]
    check_resume(behind, lr(1e-2, allowed=False), step=30, num_records=100)  # steps 21-30 trained with 1e-2


def test_a_damaged_settings_changes_file_is_named_with_its_fix(tmp_path):
    """A line of settings_changes.jsonl that is JSON but no change record (edited by hand, or
    another file's) was a TypeError or KeyError traceback at the resume."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    for line in ("[]", '{"step": "40", "changes": {}}', '{"step": 40}'):
        (tmp_path / CHANGES_FILE).write_text(line + "\n")
        with pytest.raises(ValueError, match=rf"{CHANGES_FILE} is damaged \(ValueError: a line is not a change record "
                                             r".*\): it records the settings changes of this run. Put back its"):
            check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)


def test_a_resume_checked_before_its_restore_writes_nothing_even_for_an_allowed_change(tmp_path):
    """record=False (train() checks before it restores the checkpoint, which may fail) only refuses:
    recording there, the resume's own check after the restore took the change for one recorded by a
    resume that trained nothing, and marked it discarded."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume, read_changes

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    recorded = (tmp_path / SETTINGS_FILE).read_text()
    allowed = c2i_config(**{"train.lr": 1e-3, "train.allow_resume_changes": True})
    check_resume(str(tmp_path), allowed, step=40, num_records=100, record=False)
    assert (tmp_path / SETTINGS_FILE).read_text() == recorded and not (tmp_path / CHANGES_FILE).exists()
    check_resume(str(tmp_path), allowed, step=40, num_records=100)
    assert read_changes(str(tmp_path)) == [{"step": 40, "changes": {"train.lr": {"from": 0.0001, "to": 0.001}}}]


def test_a_run_that_saved_no_step_starts_again_with_other_settings(tmp_path):
    """A run stopped before its first checkpoint (its learning rate mistyped, a schedule to add)
    keeps train_settings.json and no step: rerun with other settings it is a new run, which records
    them; nothing is compared, refused or recorded as a change."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_optimiser_state, check_resume, \
        recorded_settings

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    other = c2i_config(**{"train.lr": 1e-3, "train.lr_schedule": "cosine", "train.num_steps": 100})
    check_optimiser_state(str(tmp_path), other, step=0)  # no optimiser state to restore
    check_resume(str(tmp_path), other, step=0, num_records=99)
    recorded = recorded_settings(str(tmp_path))
    assert (recorded["train.lr"], recorded["train.lr_schedule"], recorded["data.num_records"]) == (1e-3, "cosine", 99)
    assert not (tmp_path / CHANGES_FILE).exists()


def test_a_resume_is_refused_for_each_setting_that_decides_the_data_order_or_the_optimisation(tmp_path):
    """Every recorded field, one at a time (a field dropped from the record resumed silently)."""
    from pixelflow_jax.training.resume_settings import DATA_FIELDS, MODEL_FIELDS, SOURCE_FIELDS, TRAIN_FIELDS, \
        check_resume

    config = c2i_config()
    check_resume(str(tmp_path), config, step=0, num_records=100)
    fields = ["seed", *(f"train.{f}" for f in TRAIN_FIELDS if f in config.train),
              *(f"data.{f}" for f in DATA_FIELDS + SOURCE_FIELDS[config.data.source]),
              *(f"model.{f}" for f in MODEL_FIELDS)]
    assert len(fields) >= 18, fields
    for field in fields:
        section, name = field.split(".") if "." in field else (None, field)
        value = (config[section] if section else config)[name]
        other = (not value if isinstance(value, bool) else value * 2 + 1 if isinstance(value, (int, float))
                 else value + "x")
        with pytest.raises(ValueError, match=re.escape(f"{field}: {value!r} -> {other!r}")):
            check_resume(str(tmp_path), c2i_config(**{field: other}), step=40, num_records=100)


def test_a_resume_on_other_devices_or_with_another_memory_setting_is_warned_and_recorded(tmp_path, caplog):
    """remat, fsdp, the attention backend and the devices change the order of float operations
    (measured: 125 parameters ~4e-9 apart after remat 'full'): allowed, but no longer bit for bit."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"other settings \(train.lr: 0.0001 -> 0.001\); resuming"):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full", "train.lr": 1e-3}), step=40, num_records=100)
    assert not (tmp_path / CHANGES_FILE).exists()
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full"}), step=40, num_records=100)
    assert "model.remat: 'none' -> 'full'): the steps compute in another order" in caplog.text
    assert json.loads((tmp_path / CHANGES_FILE).read_text()) == {
        "step": 40, "changes": {"model.remat": {"from": "none", "to": "full"}}}
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["model.remat"] == "full"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full"}), step=80, num_records=100)
    assert not caplog.text


def test_attention_auto_and_the_kernel_it_picks_are_one_setting_at_a_resume(tmp_path, caplog):
    """'auto' is XLA on a CPU: a resume with --config.model.attention=xla was warned that it agrees
    with an uninterrupted run to float rounding only, though the losses were equal to every digit.
    The kernel that ran is recorded; a record of 'auto' (runs before 2026-12-01) compares as its pick."""
    from pixelflow_jax.kernels.attention import interpret_kernels
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(**{"model.attention": "auto"}), step=0, num_records=100)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["model.attention"] == "xla"
    record = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**record, "model.attention": "auto"}))  # an earlier run's
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "xla"}), step=40, num_records=100)
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "auto"}), step=40, num_records=100)
    assert not caplog.text
    with caplog.at_level(logging.WARNING), interpret_kernels():  # another kernel is a change
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "pallas_gpu"}), step=40, num_records=100)
    assert "model.attention: 'xla' -> 'pallas_gpu'): the steps compute in another order" in caplog.text


def test_a_data_folder_whose_files_were_renamed_or_moved_between_classes_does_not_resume(tmp_path):
    """Only the record count was compared: a file renamed (another place in the shuffle) or moved
    to another class (another label) resumed silently."""
    from PIL import Image

    from pixelflow_jax.data.sources import ImageFolderSource
    from pixelflow_jax.training.resume_settings import check_resume

    root = tmp_path / "images"
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    listing = ImageFolderSource(str(root)).listing
    shutil.copytree(root, tmp_path / "moved")
    assert ImageFolderSource(str(tmp_path / "moved")).listing == listing  # the same files elsewhere
    config = c2i_config(**{"data.source": "folder", "data.root": str(root)})
    workdir = str(tmp_path / "run")
    check_resume(workdir, config, step=0, num_records=3, listing=listing)
    check_resume(workdir, config, step=40, num_records=3, listing=ImageFolderSource(str(root)).listing)
    for before, after in (("cat/a.png", "cat/z.png"), ("cat/z.png", "dog/z.png")):
        os.rename(root / before, root / after)
        with pytest.raises(ValueError, match=r"data.listing \(a hash of the data's file names, and classes where it "
                                             r"has them: files added, removed or renamed, or moved to another "
                                             r"class\): '[0-9a-f]{16}' -> "):
            check_resume(workdir, config, step=40, num_records=3, listing=ImageFolderSource(str(root)).listing)
    check_resume(workdir, config, step=40, num_records=3)  # a source without files (tfds, demo): nothing to compare


def test_a_run_records_its_datas_class_count_and_a_resume_on_another_count_is_refused_unless_allowed(tmp_path):
    """Sampling a run cycles its default labels over the classes its data held (a fine-tune of 1000
    classes on a 10-class TFDS dataset trains ids 0-9): the count is recorded, and a resume on
    labels of another count is a data change. A run recorded before the count was resumes."""
    from configs import t2i
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    config, workdir = c2i_config(**{"model.num_classes": 1000}), tmp_path / "run"
    check_resume(str(workdir), config, step=0, num_records=100, num_classes=10)
    recorded = lambda: json.loads((workdir / SETTINGS_FILE).read_text()).get("data.num_classes")
    assert recorded() == 10
    check_resume(str(workdir), config, step=40, num_records=100, num_classes=10)
    with pytest.raises(ValueError, match=r"data.num_classes \(the class count of the data's labels: ids 0 to N - 1 "
                                         r"train\): 10 -> 12\); resuming"):
        check_resume(str(workdir), config, step=40, num_records=100, num_classes=12)
    config.train.allow_resume_changes = True
    check_resume(str(workdir), config, step=40, num_records=100, num_classes=12)
    assert recorded() == 12
    assert json.loads((workdir / CHANGES_FILE).read_text())["changes"] == {"data.num_classes": {"from": 10, "to": 12}}

    older = tmp_path / "older"  # recorded by an earlier version: no count, and none added at a resume
    check_resume(str(older), c2i_config(), step=0, num_records=100)
    check_resume(str(older), c2i_config(), step=40, num_records=100, num_classes=10)
    assert "data.num_classes" not in json.loads((older / SETTINGS_FILE).read_text())
    text = tmp_path / "text"  # the captioned demo set's count is its colours: no class a text model learns
    check_resume(str(text), t2i.get_config("tiny"), step=0, num_records=100, num_classes=10)
    assert "data.num_classes" not in json.loads((text / SETTINGS_FILE).read_text())


def test_a_cosine_run_resumes_only_with_its_end_and_older_runs_resume_as_constant(tmp_path):
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_optimiser_state, check_resume

    cosine = c2i_config(**{"train.lr_schedule": "cosine", "train.num_steps": 100})
    check_resume(str(tmp_path / "cosine"), cosine, step=0, num_records=100)
    with pytest.raises(ValueError, match=r"train.num_steps \(where the learning-rate schedule ends\): 100 -> 200"):  # the rate would jump
        check_resume(str(tmp_path / "cosine"), c2i_config(**{"train.lr_schedule": "cosine", "train.num_steps": 200}),
                     step=40, num_records=100)
    older = tmp_path / "older"  # recorded before schedules existed: it resumes with the release's constant rate
    check_resume(str(older), c2i_config(), step=0, num_records=100)
    settings = json.loads((older / SETTINGS_FILE).read_text())
    (older / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in settings.items()
                                                   if k not in ("train.lr_schedule", "train.warmup_steps",
                                                                "data.num_records", "model.dtype")}))
    check_resume(str(older), c2i_config(), step=40, num_records=100)
    with pytest.raises(ValueError, match="train.lr_schedule: 'constant' -> 'cosine'"):
        check_resume(str(older), cosine, step=40, num_records=100)
    allowed = c2i_config(**{"train.warmup_steps": 10, "train.allow_resume_changes": True})
    with pytest.raises(ValueError, match="warmup_steps 0, this config asks for 'constant' and 10: .*keeps a step "
                                         "count in its optimiser state .*init_from"):
        check_optimiser_state(str(older), allowed, step=40)  # the optimiser states differ: no flag can allow it
    check_optimiser_state(str(older), c2i_config(**{"train.lr": 1.0}), step=40)


def test_a_workdir_has_one_owner_and_a_dead_owners_lock_is_taken_over(tmp_path, caplog):
    import time

    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock, process_start

    first = WorkdirLock(str(tmp_path), stale_after_s=60)
    first.acquire()
    with pytest.raises(WorkdirBusy, match=rf"is in use by another training run: host {socket.gethostname()}, "
                                          rf"pid {os.getpid()}, started .*delete {tmp_path / LOCK_FILE}"):
        WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()

    lock_file = tmp_path / LOCK_FILE
    here, this_process_started = socket.gethostname(), process_start(os.getpid())
    for holder, taken in (({"host": here, "pid": 999999999}, True),  # its process is gone
                          # a restarted container: the holder's pid is now this process, started later
                          ({"host": here, "pid": os.getpid(), "pid_start": this_process_started - 1}, True),
                          ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}, True),  # silent
                          ({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}, False),  # alive
                          # another container with this hostname: its pids are not ours (pid 1 here is
                          # not its pid 1), so its heartbeat decides: one that missed two refreshes is gone
                          ({"host": here, "pid": os.getpid(), "pid_start": this_process_started,
                            "pid_namespace": "pid:[1]", "heartbeat": time.time() - 2 * 60 - 11}, True),
                          ({"host": here, "pid": 999999999, "pid_namespace": "pid:[1]",
                            "heartbeat": time.time() - 60}, False)):  # was taken over: two runs in one workdir
        lock_file.write_text(json.dumps(holder))
        lock = WorkdirLock(str(tmp_path), stale_after_s=600)
        if taken:
            lock.acquire()
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            assert f"taking over {lock_file} from a run that is gone: host {holder['host']}" in caplog.text
            lock.release()
        else:
            with pytest.raises(WorkdirBusy, match=f"host {holder['host']}, pid {holder['pid']}"):
                lock.acquire()
    # A holder refreshing every 60 s is not judged by this run's shorter limit (30 s), and the error
    # says when a gone holder's lock is taken over.
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat_period_s": 60,
                                     "heartbeat": time.time() - 100}))
    with pytest.raises(WorkdirBusy, match=r"heartbeat 100 s ago\).*its lock is taken over once its heartbeat is 130 s "
                                          r"old \(rerun then\)"):
        WorkdirLock(str(tmp_path), stale_after_s=30).acquire()


def test_an_unreadable_lock_is_stale_after_a_minute_and_a_lock_is_never_written_empty(tmp_path, monkeypatch):
    """A start killed between creating its lock and writing it left an empty train.lock, which
    blocked the workdir for ever ("another run is starting right now")."""
    import time

    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, UNREADABLE_STALE_S, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_bytes(b"")
    with pytest.raises(WorkdirBusy, match="starting in this workdir right now"):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()  # fresh: maybe a start writing it
    old = time.time() - UNREADABLE_STALE_S - 5
    os.utime(lock_file, (old, old))
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()

    def killed_while_writing(fd, data):
        raise KeyboardInterrupt

    def no_hard_links(source, target):  # gcsfuse, s3fs, blobfuse
        raise OSError(38, "Function not implemented")

    with monkeypatch.context() as patch:
        patch.setattr(workdir_lock.os, "link", no_hard_links)
        lock = WorkdirLock(str(tmp_path), stale_after_s=600)
        lock.acquire()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy):
            WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
        lock.release()

    monkeypatch.setattr(workdir_lock.os, "fdopen", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
    assert not lock_file.exists()  # only a temporary, named as storage.remove_temporaries clears them


def test_a_stop_the_moment_after_the_lock_is_written_still_releases_it(tmp_path, monkeypatch):
    """A SIGTERM that landed between the lock's link into place and the run's note that it held it
    left train.lock behind (seen as 1 failure in ~50 runs of test_main's SIGTERM-while-a-training-
    run-starts test under load): a restart elsewhere was refused for train.lock_stale_after_s."""
    from pixelflow_jax.command_line import Terminated
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    real_create = workdir_lock.storage.create_file

    def created_then_stopped(path, data):
        assert real_create(path, data)
        raise Terminated

    monkeypatch.setattr(workdir_lock.storage, "create_file", created_then_stopped)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    try:  # as train() holds it: acquired inside the try whose finally releases
        with pytest.raises(Terminated):
            lock.acquire()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stop_before_the_locks_heartbeat_thread_starts_still_releases_the_lock(tmp_path, monkeypatch):
    """A stop between the heartbeat thread's creation and its start: release() joined the thread
    that never started, whose RuntimeError ("cannot join thread before it is started") replaced
    the stop and left train.lock behind."""
    import threading

    from pixelflow_jax.command_line import Terminated
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    real_start = threading.Thread.start

    def stopped_before_the_heartbeat_starts(thread):
        if thread.name == "workdir-lock-heartbeat":
            raise Terminated
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", stopped_before_the_heartbeat_starts)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    with pytest.raises(Terminated):
        try:  # as train() holds it
            lock.acquire()
        finally:
            lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_refreshed_by_a_thread_and_a_run_whose_lock_was_taken_over_stops(tmp_path):
    import time

    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock = WorkdirLock(str(tmp_path), stale_after_s=10)  # refreshed every second
    lock.acquire()
    first = json.loads(lock_file.read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads(lock_file.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(lock_file.read_text())["heartbeat"] > first  # no training step needed
    lock.check_held()
    from pixelflow_jax.training import workdir_lock

    lock.release()  # its thread stopped, the beats below are this test's
    lock = WorkdirLock(str(tmp_path), stale_after_s=10)
    lock.acquire()
    lock._stop.set()
    real_write = workdir_lock.storage.write_json_atomically

    def unavailable(path, value):
        raise OSError("503 Service Unavailable")

    workdir_lock.storage.write_json_atomically = unavailable
    try:
        with pytest.raises(OSError, match="503"):
            lock.heartbeat()  # the thread logs it and beats again
    finally:
        workdir_lock.storage.write_json_atomically = real_write
    lock.heartbeat()
    lock.check_held()  # a missed beat is no takeover
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    real_write(str(lock_file), rival)  # it judged this run gone and took over
    lock.heartbeat()
    assert json.loads(lock_file.read_text()) == rival  # not overwritten
    with pytest.raises(WorkdirBusy, match="taken over by another run \\(host elsewhere, pid 7\\).*without saving"):
        lock.check_held()
    lock.release()
    assert json.loads(lock_file.read_text()) == rival  # not removed either


def test_a_lock_whose_create_was_refused_after_it_landed_is_held_and_a_lost_lock_stops_the_next_save(
        tmp_path, monkeypatch):
    """A bucket client retries an upload whose response was lost, and the create-only retry is
    refused because the first attempt landed: the lock is this run's, held and released. And a
    run whose lock another run replaced since the last heartbeat is stopped before it saves."""
    import time

    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    real_create = workdir_lock.storage.create_file

    def landed_but_refused(path, data):
        assert real_create(path, data)
        return False

    monkeypatch.setattr(workdir_lock.storage, "create_file", landed_but_refused)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert lock.held
    lock.release()
    assert not lock_file.exists()
    monkeypatch.undo()

    lock = WorkdirLock(str(tmp_path), stale_after_s=600)  # refreshed every 60 s: no beat in this test
    lock.acquire()
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    workdir_lock.storage.write_json_atomically(str(lock_file), rival)
    lock.check_held()  # a logged step trusts the last heartbeat
    with pytest.raises(WorkdirBusy, match="taken over by another run \\(host elsewhere, pid 7\\)"):
        lock.check_held(read_now=True)  # a save reads the lock first
    lock.release()
    assert json.loads(lock_file.read_text()) == rival


def test_a_lock_in_a_bucket_is_created_only_if_absent_even_when_a_rival_slips_in(bucket, monkeypatch):
    """In a bucket the lock is one create-only upload (ifGenerationMatch=0): a rival run whose lock
    lands between this run's existence check and its upload keeps it, and this run backs off."""
    import fsspec

    from pixelflow_jax import storage
    from pixelflow_jax.training.workdir_lock import LOCK_FILE

    path = f"{bucket}/run/{LOCK_FILE}"
    assert storage.create_file(path, b"first") and not storage.create_file(path, b"second")
    assert storage.read_bytes(path) == b"first"

    contested = f"{bucket}/contested/{LOCK_FILE}"
    fs, _ = fsspec.core.url_to_fs(contested)  # fsspec's cached instance: the one the lock will use
    checks, real_exists = [], fs.exists

    def absent_at_the_first_check(key, **kwargs):
        checks.append(key)
        return len(checks) > 1 and real_exists(key, **kwargs)

    monkeypatch.setattr(fs, "exists", absent_at_the_first_check)
    storage.write_atomically(contested, b"rival")  # lands after this run's check (which will say "absent")
    assert not storage.create_file(contested, b"mine")
    assert len(checks) == 2 and storage.read_bytes(contested) == b"rival"


def test_a_second_training_on_a_busy_workdir_stops_at_once(tmp_path):
    from pixelflow_jax.training.workdir_lock import LOCK_FILE

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "started": "2026-11-27T05:00:00+00:00"}))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "is in use by another training run" in result.stderr
    assert f"pid {os.getpid()}, started 2026-11-27T05:00:00+00:00" in result.stderr
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # nothing written


def test_a_path_a_user_mistyped_is_refused_or_expanded(tmp_path):
    for broken, fixed in (("gs:/bucket/run", "gs://bucket/run"), ("gs:bucket", "gs://bucket"),
                          ("hf:/owner/name", "hf://owner/name"), ("gs//bucket/run", "gs://bucket/run"),
                          ("gs;//bucket/run", "gs://bucket/run"), ("Gs:/bucket", "gs://bucket"),  # was a local folder
                          ("gcs//bucket", "gs://bucket"), ("GCS:/bucket", "gs://bucket")):  # the one scheme that works
        with pytest.raises(storage.StorageError, match=f'looks like a URL without its "://": write {fixed} '):
            storage.user_path(broken)
    for globbed in ("gs://b/x?y", "gs://b/run#1", "gs://b/x*", "gs://b/[x]"):  # query, fragment, wildcards
        with pytest.raises(storage.StorageError, match="cannot be part of an object path here"):
            storage.user_path(globbed)
    assert storage.user_path("gsdata//x") == "gsdata//x" and storage.user_path("runs/x?y") == "runs/x?y"
    for no_bucket in ("gs://", "gs:///run"):
        with pytest.raises(storage.StorageError, match="names no bucket: write gs://BUCKET/"):
            storage.user_path(no_bucket)
    # A file URL's path is absolute: the advice was a relative path for file:/data/run and file://data/run
    for file_url in ("file:///data/run", "file:/data/run", "file://data/run", "file://localhost/data/run",
                     "FILE:/data/run"):
        with pytest.raises(storage.StorageError, match=r"write the local path itself \(/data/run\), not a file"):
            storage.user_path(file_url)
    for unsupported in ("https:/host/x", "s3:/b/x"):  # was told to write https://host/x, refused next
        with pytest.raises(storage.StorageError, match=r"without its \"://\", and \w+:// is not read here: paths are "
                                                       r"local or gs://"):
            storage.user_path(unsupported)
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme hdfs://"):  # was "write hdfs://BUCKET/"
        storage.check_supported(storage.user_path("hdfs:///x"))
    with pytest.raises(CheckpointError, match="^no checkpoint given: name a training run"):
        load_model("")  # was "checkpoint  does not exist"
    with pytest.raises(CheckpointError, match="^no checkpoint given: name a training run"):
        load_model("  ")  # not "the name '  ' starts and ends with a space ...: remove the space"
    for spaced, name in ((" runs/xl", " runs"), ("runs/xl ", "xl "), ("runs/ xl", " xl")):  # a quoting slip
        with pytest.raises(CheckpointError, match=rf"^'{spaced}': the name '{name}' (starts|ends) with a space and "
                                                  r"does not exist \(a quoting slip\?\): remove the space"):
            load_model(spaced)
    with pytest.raises(storage.StorageError, match="ends with a space, which an object name keeps: write 'gs://b/x'"):
        storage.user_path("gs://b/x ")
    for spaced, name, fixed in (("gs://b/a /x", "a ", "gs://b/a/x"), ("gs://b/ a/x", " a", "gs://b/a/x"),
                                ("gs:// b/x", " b", "gs://b/x"), ("hf://o/n\t/sub", "n\t", "hf://o/n/sub")):
        with pytest.raises(storage.StorageError, match=re.escape(f"{spaced!r}: the folder name {name!r} starts or ends "
                                                                 f"with whitespace, which an object name keeps (a "
                                                                 f"quoting slip?): write {fixed!r}")):
            storage.user_path(spaced)  # were taken as they are: a bucket folder named "a "
    assert storage.user_path("gs://b/my run/x") == "gs://b/my run/x"  # a space inside a name is a name's
    for dotted in ("gs://b/x/../y", "gs://b/./x"):
        with pytest.raises(storage.StorageError, match="do not resolve '.' and '..'"):
            storage.user_path(dotted)
    assert storage.user_path("~/runs/x") == os.path.join(os.path.expanduser("~"), "runs", "x")
    assert storage.user_path("./gs:/x") == "./gs:/x" and storage.user_path("gs://b/x") == "gs://b/x"

    config = c2i_config(**{"sample.checkpoint": "~/ckpt"})
    check(config, "sample")
    assert config.sample.checkpoint == os.path.join(os.path.expanduser("~"), "ckpt")
    with pytest.raises(ConfigError, match="--config.eval.reference: gs:/b/ref.npz looks like a URL"):
        check(c2i_config(**{"eval.reference": "gs:/b/ref.npz"}), "eval")
    with pytest.raises(CheckpointError, match="looks like a URL"):
        load_model("gs:/bucket/ckpt")


def test_a_new_local_name_with_a_space_at_its_edge_is_refused_and_an_existing_one_is_used(tmp_path, monkeypatch):
    """--workdir='runs/a ' made a folder named "a " (which ls shows as runs/a). A name that exists
    with its space (made on purpose, or by such a slip before this check) is used as it is."""
    from pixelflow_jax import validation

    monkeypatch.chdir(tmp_path)
    for spaced, name, fixed in (("runs/a ", "a ", "runs/a"), (" runs/a", " runs", "runs/a"),
                                ("runs/ a /b", " a ", "runs/a/b"), (f"{tmp_path}/out\t", "out\t", f"{tmp_path}/out")):
        with pytest.raises(storage.StorageError, match=re.escape(f"{spaced!r}: the name {name!r} ") + ".* and does "
                                                       r"not exist \(a quoting slip\?\): remove the (space|whitespace)"
                                                       + re.escape(f", as in {fixed!r}")):
            storage.user_path(spaced)
    with pytest.raises(storage.StorageError, match=r"^--workdir: 'runs/a ': the name 'a ' ends with a space"):
        validation.user_path("--workdir", "runs/a ")  # and so the converter's flags
    assert os.listdir(tmp_path) == []
    (tmp_path / "old run ").mkdir()
    assert storage.user_path("old run ") == "old run " and storage.user_path("old run /step_5") == "old run /step_5"
    # The fix offered keeps the names that exist as they are: 'old run/new' would be another folder.
    with pytest.raises(storage.StorageError, match=re.escape("remove the space, as in 'old run /new'")):
        storage.user_path("old run /new ")

def test_a_workdir_that_would_be_lost_or_misread_is_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    for workdir, message in ((run / "checkpoints" / "4", "inside the checkpoints of the training run"),
                             ("gs:/bucket/samples", "looks like a URL without its"),
                             ("", "--workdir is empty")):
        command = [sys.executable, os.path.join(REPO, "main.py"), f"--config={REPO}/configs/c2i.py:tiny",
                   f"--workdir={workdir}", "--mode=sample", f"--config.sample.checkpoint={run}"]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(run / "checkpoints" / "4") == []
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints

    os.symlink(run / "checkpoints", tmp_path / "link")  # the same folder by another name
    with pytest.raises(CheckpointError, match="inside the checkpoints of the training run"):
        check_outside_checkpoints(str(tmp_path / "link" / "6"))


def test_no_output_goes_inside_a_converted_checkpoint_folder_at_any_depth(tmp_path, converted):
    """A workdir in params/out was taken: the samples changed the checkpoint's fingerprint (a rerun
    of the same command was refused as "other weights"), and converting the folder again with
    --overwrite deleted them without a word."""
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints

    folder = converted["c2i_tiny"]
    for inside in ("params/out", "params/a/b", "a/b", "params"):
        for flag in ("--workdir", "--output"):
            with pytest.raises(CheckpointError, match=rf"{flag} .*/{inside} is inside a converted checkpoint folder "
                                                      rf"\({re.escape(folder)}\)"):
                check_outside_checkpoints(os.path.join(folder, inside), flag)
    (tmp_path / "downloads" / "deep").mkdir(parents=True)
    (tmp_path / "downloads" / "model.pt").write_bytes(b"")  # a release file downloaded here
    check_outside_checkpoints(str(tmp_path / "downloads" / "jax"), "--output")  # converted beside it
    check_outside_checkpoints(str(tmp_path / "downloads" / "deep" / "run"))  # anybody's model.pt, further up
    with pytest.raises(CheckpointError, match=r"--workdir .*/downloads/run is inside a release checkpoint folder"):
        check_outside_checkpoints(str(tmp_path / "downloads" / "run"))


def test_a_sample_job_never_adopts_images_of_other_weights(tmp_path, converted):
    """A checkpoint path written again with other weights, or images no settings.json describes,
    would mix into samples.npz: both are refused."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import read_config, restore_params, save_checkpoint
    from pixelflow_jax.sampling.job_settings import check_settings

    copy = str(tmp_path / "copy")
    shutil.copytree(converted["c2i_tiny"], copy)
    before = resolve_checkpoint(copy).fingerprint()
    assert before == resolve_checkpoint(converted["c2i_tiny"]).fingerprint()  # a copy is the same checkpoint
    assert before != resolve_checkpoint(converted["t2i_tiny"]).fingerprint()
    samples = str(tmp_path / "samples")
    os.makedirs(samples)
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": before})
    open(os.path.join(samples, "000000.png"), "wb").close()  # a first image

    config = read_config(copy)
    params = restore_params(copy, config)
    save_checkpoint(copy, jax.tree.map(lambda p: p + 1e-3, params), config, overwrite=True)
    after = resolve_checkpoint(copy).fingerprint()
    assert after != before
    with pytest.raises(ValueError, match=r"other settings \(differing: \['checkpoint_fingerprint'\]\): they are of "
                                         rf"other weights \(the files of {copy} changed since they were sampled \(converted "
                                         r"again, or replaced\)\); "
                                         rf"sample these into a new --workdir with --config.sample.checkpoint={copy}$"):
        check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": before})
    # The same weights at another path (moved, copied, linked) are the same checkpoint.
    check_settings(samples, str(tmp_path), {"checkpoint": converted["c2i_tiny"], "checkpoint_fingerprint": before})

    os.remove(os.path.join(samples, "settings.json"))  # a job of an earlier version did not record the fingerprint
    storage.write_json_atomically(os.path.join(samples, "settings.json"), {"checkpoint": copy})
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})

    orphans = str(tmp_path / "orphans")
    os.makedirs(orphans)
    open(os.path.join(orphans, "000000.png"), "wb").close()
    with pytest.raises(ValueError, match="holds the image 000000.png but no settings.json"):
        check_settings(orphans, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})
    assert not os.path.exists(os.path.join(orphans, "settings.json"))

    # The PNGs and settings.json deleted to save space, samples.npz, grid.png and eval.json kept: not overwritten.
    kept = tmp_path / "kept"
    (kept / "samples").mkdir(parents=True)
    (kept / "samples.npz").write_bytes(b"50k images")
    (kept / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match="holds samples.npz and eval.json of an earlier sampling job whose "
                                         ".*settings.json is gone"):
        check_settings(str(kept / "samples"), str(kept), {"checkpoint": copy, "checkpoint_fingerprint": after})
    assert not (kept / "samples" / "settings.json").exists()
    for name in ("samples.npz", "eval.json"):
        (kept / name).unlink()
    (kept / "grid.png").write_bytes(b"a grid")
    with pytest.raises(ValueError, match="holds grid.png of an earlier sampling job"):
        check_settings(str(kept / "samples"), str(kept), {"checkpoint": copy, "checkpoint_fingerprint": after})

    # A job of a text run recorded float32 encoder weights; the same command now takes the run's bfloat16.
    text = tmp_path / "text"
    (text / "samples").mkdir(parents=True)
    recorded = {"checkpoint": copy, "checkpoint_fingerprint": after, "text_encoder_param_dtype": "float32"}
    check_settings(str(text / "samples"), str(text), recorded)
    (text / "samples" / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"rerun with the settings in settings.json \(its text_encoder_param_dtype: "
                                         r"--config.sample.text_encoder_param_dtype=float32\)$"):
        check_settings(str(text / "samples"), str(text), {**recorded, "text_encoder_param_dtype": "bfloat16"})


def test_a_text_job_never_adopts_images_whose_prompts_another_encoder_encoded(tmp_path, monkeypatch):
    """A T5 folder written again in place (another download, a conversion) gives other embeddings: the
    job records the encoder's files, as it does the checkpoint's, so a rerun cannot mix the two."""
    from configs import t2i
    from pixelflow_jax.sampling import sample_conditioning
    from pixelflow_jax.sampling.job_settings import check_settings
    from pixelflow_jax.text import prompts, t5_convert

    class Encoder:  # what TextPrompts reads of a PromptEncoder, without loading a T5
        folder = str(tmp_path / "t5")

    fingerprints = {"t5": "weights-a"}
    monkeypatch.setattr(prompts, "prompt_encoder_for", lambda *_: Encoder())
    monkeypatch.setattr(t5_convert, "folder_fingerprint", lambda folder: fingerprints[os.path.basename(folder)])
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=("a red disk",), text_encoder=str(tmp_path / "t5"))
    settings = lambda: sample_conditioning.TextPrompts(sample, 20).settings()
    samples = str(tmp_path / "samples")
    os.makedirs(samples)
    check_settings(samples, str(tmp_path), settings())
    open(os.path.join(samples, "000000.png"), "wb").close()
    fingerprints["t5"] = "weights-b"  # the same path, other files
    with pytest.raises(ValueError, match=r"holds images whose prompts another text encoder encoded \(differing: "
                                         r"\['text_encoder_fingerprint'\]"):
        check_settings(samples, str(tmp_path), settings())
    fingerprints["moved"], Encoder.folder = "weights-a", str(tmp_path / "moved")  # the same files moved: the same encoder
    sample.text_encoder = Encoder.folder
    check_settings(samples, str(tmp_path), settings())


def test_a_samples_file_in_the_workdir_is_named_not_a_traceback(tmp_path, converted):
    (tmp_path / "samples").write_text("my notes")
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}", "--mode=sample",
               f"--config.sample.checkpoint={converted['c2i_tiny']}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "samples is a file, where this job keeps its images" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "samples").read_text() == "my notes"

    kept = tmp_path / "kept"  # an earlier job's samples.npz, its samples/ deleted: refused, and nothing made
    kept.mkdir()
    (kept / "samples.npz").write_bytes(b"50k images")
    result = subprocess.run([*command[:3], f"--workdir={kept}", *command[4:]], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "holds samples.npz of an earlier sampling job" in result.stderr, result.stderr
    assert os.listdir(kept) == ["samples.npz"]  # samples/ was made, empty, before the refusal

    folder = tmp_path / "folder"  # written once every image exists: a traceback there, after the sampling
    (folder / "grid.png").mkdir(parents=True)
    result = subprocess.run([*command[:3], f"--workdir={folder}", *command[4:]], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "grid.png is a folder, where this job writes its grid.png" in result.stderr
    assert os.listdir(folder) == ["grid.png"]


def test_sample_settings_that_cannot_matter_or_cannot_be_read_are_named(tmp_path):
    from configs import c2i
    from pixelflow_jax.evaluation.evaluate import check_sample_count
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    dopri5 = {"solver": "dopri5", "shift": 1.0, "steps_per_stage": [10, 10, 10, 10], "seed": 0}
    check_settings(str(samples), str(tmp_path), dopri5)
    check_settings(str(samples), str(tmp_path), {**dopri5, "shift": 3.0, "steps_per_stage": [2, 2, 2, 2]})  # unused
    with pytest.raises(ValueError, match=r"differing: \['seed'\]\) of a job that has sampled no image yet .*if no "
                                         r"job samples into .*samples, delete .*settings.json and rerun"):
        check_settings(str(samples), str(tmp_path), {**dopri5, "seed": 1})  # one killed before its first image
    (samples / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['seed'\]"):
        check_settings(str(samples), str(tmp_path), {**dopri5, "seed": 1})
    (samples / "settings.json").write_text('{"solver": "dopri5", ')  # a disk that filled up
    with pytest.raises(ValueError, match=r"samples/settings.json is damaged \(JSONDecodeError: .*use a new --workdir"):
        check_settings(str(samples), str(tmp_path), dopri5)
    (samples / "settings.json").write_text('["solver", "dopri5"]')  # JSON, but not the object written
    with pytest.raises(ValueError, match=r"settings.json is damaged \(ValueError: a JSON list, not an object\)"):
        check_settings(str(samples), str(tmp_path), dopri5)

    config = c2i.get_config("tiny")
    config.sample.num_images = 3
    with pytest.raises(ValueError, match=r"num_images=3 is too few to evaluate: precision and recall need more than 3"):
        check_sample_count(config.sample)


def test_a_sampling_job_may_grow_into_its_folder_and_shrink_back_while_no_image_lies_past(tmp_path):
    """A larger num_images (10,000 images for a first FID, then 50,000) keeps the images on disk when
    each recorded image keeps its label or prompt; a smaller one is taken back while no image past it
    was sampled (50,000 typed for 5,000); another conditioning of a recorded image is refused."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    architecture = {"num_classes": 3}  # as a job records it (and the labels' check reads)
    check = lambda settings, record=True: check_settings(str(samples), str(tmp_path),
                                                         {"seed": 0, "architecture": architecture, **settings},
                                                         record=record)
    recorded = lambda: {k: v for k, v in json.loads((samples / "settings.json").read_text()).items()
                        if k != "architecture"}
    check({"num_images": 4, "labels": [0, 1, 2, 0]})
    (samples / "000000.png").write_bytes(b"")
    check({"num_images": 6, "labels": [0, 1, 2, 0, 1, 2]})  # the default labels, i mod 3
    assert recorded() == {"seed": 0, "num_images": 6, "labels": [0, 1, 2, 0, 1, 2]}
    check({"num_images": 4, "labels": [0, 1, 2, 0]}, record=False)  # the check before the weights load
    assert recorded()["num_images"] == 6
    check({"num_images": 4, "labels": [0, 1, 2, 0]})
    assert recorded() == {"seed": 0, "num_images": 4, "labels": [0, 1, 2, 0]}
    check({"num_images": 6, "labels": [0, 1, 2, 0, 1, 2]})
    for refused in ({"num_images": 8, "labels": [1, 1, 2, 0, 1, 2, 0, 1]},  # image 0 with another label
                    {"num_images": 8, "labels": [0, 1, 2, 0, 1, 2, 0, 1], "seed": 1}):
        with pytest.raises(ValueError, match=r"holds images sampled with other settings"):
            check(refused)
    assert recorded()["num_images"] == 6

    text = {"num_images": 4, "prompts": ["a fox", "a cat"], "images_per_prompt": 2, "negative_prompt": ""}
    for name in ("settings.json", "000000.png"):
        (samples / name).unlink()
    check(text)
    check({**text, "num_images": 6, "prompts": ["a fox", "a cat", "a dog"]})  # a prompt added at the end
    check(text)  # and taken back
    check({**text, "num_images": 6, "prompts": ["a fox", "a cat", "a dog"]})
    with pytest.raises(ValueError, match=r"other settings \(differing: \['images_per_prompt', 'num_images'\]"):
        check({**text, "num_images": 9, "prompts": ["a fox", "a cat", "a dog"], "images_per_prompt": 3})
    (samples / "settings.json").unlink()
    one_prompt = {**text, "num_images": 2, "prompts": ["a fox"]}
    check(one_prompt)
    check({**one_prompt, "num_images": 5, "images_per_prompt": 5})  # more images of its one prompt


def test_a_sampling_job_refuses_to_shrink_past_images_it_sampled_and_names_them(tmp_path):
    """Images past the smaller count, as PNGs or in a finished job's samples.npz, would be left out
    of settings.json (a later extension with other labels would adopt them) or overwritten: the
    refusal names them, the count that keeps them and the files to remove."""
    from pixelflow_jax.sampling.job_settings import check_settings
    from pixelflow_jax.sampling.sample_run import write_images_npz

    samples = tmp_path / "samples"
    samples.mkdir()
    job = lambda count: {"seed": 0, "num_images": count, "labels": [i % 3 for i in range(count)]}
    check = lambda count: check_settings(str(samples), str(tmp_path), job(count))
    recorded = lambda: json.loads((samples / "settings.json").read_text())["num_images"]
    check(2)
    check(50)
    for i in (0, 1, 4, 6, 9, 10):  # the extension stopped after a few images
        (samples / f"{i:06d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"this job asks for 4 images, fewer than the 50 that .*samples/settings.json "
                                         r"records, but .*samples holds 4 images numbered 4 or above \(000004.png to "
                                         r"000010.png\): .* To shrink it to 4, delete those 4 PNGs, then rerun; to keep "
                                         r"them, rerun asking for at least 11 images \(as recorded: "
                                         r"--config.sample.num_images=50\); or use a new --workdir"):
        check(4)
    assert recorded() == 50
    with pytest.raises(ValueError, match=r"holds 1 image numbered 10 or above \(000010.png\): .*delete that 1 PNG, "
                                         r"then rerun; to keep it,"):
        check(10)
    check(11)
    assert recorded() == 11
    given = {"seed": 0, "num_images": 11, "labels": [7, 1] * 5 + [3]}  # labels the user gave, not the default's
    (samples / "settings.json").write_text(json.dumps(given))
    with pytest.raises(ValueError, match=r"to keep them, rerun asking for at least 11 images \(as recorded: "
                                         r"--config.sample.num_images=11, each image with the --config.sample.labels "
                                         r"entry settings.json records for it\); or use"):
        check_settings(str(samples), str(tmp_path), {**given, "num_images": 4, "labels": given["labels"][:4]})
    (samples / "settings.json").write_text(json.dumps(job(11)))

    for i in (4, 6, 9, 10):
        (samples / f"{i:06d}.png").unlink()
    with open(tmp_path / "samples.npz", "wb") as npz:  # a finished job of 11 whose PNGs were deleted
        write_images_npz(npz, np.zeros((11, 2, 2, 3), np.uint8), 11, 2)
    with pytest.raises(ValueError, match=r"but .*samples.npz holds 11 images: .* To shrink it to 4, move "
                                         r".*samples.npz away, then rerun; to keep them, rerun asking for at least 11"):
        check(4)
    (tmp_path / "samples.npz").write_bytes(b"PK cut off")
    with pytest.raises(ValueError, match=r"cannot tell how many images .*samples.npz holds \(.*\), and a job asking for "
                                         r"fewer images than settings.json records would overwrite it: move it away"):
        check(4)
    with open(tmp_path / "samples.npz", "wb") as npz:  # the smaller job's own, from before its extension
        write_images_npz(npz, np.zeros((2, 2, 2, 3), np.uint8), 2, 2)
    check(4)
    assert recorded() == 4

    for name in ("settings.json", "000000.png", "000001.png", "../samples.npz"):
        (samples / name).unlink()
    text = {"seed": 0, "num_images": 2, "prompts": ["a fox"], "images_per_prompt": 2, "negative_prompt": ""}
    check_settings(str(samples), str(tmp_path), {**text, "num_images": 4, "prompts": ["a fox", "a cat"]})
    (samples / "000002.png").write_bytes(b"")  # of the second prompt: keeping it keeps that prompt's 2 images
    with pytest.raises(ValueError, match=r"to keep it, rerun asking for at least the first 2 of settings.json's "
                                         r"prompts, 2 images each \(as recorded: its 2 prompts, 4 images\); or use"):
        check_settings(str(samples), str(tmp_path), text)


def test_an_euler_job_refuses_other_steps_or_shift_that_dopri5_ignores(tmp_path):
    """Euler's images depend on shift and steps_per_stage (only dopri5's adaptive steps use
    neither): a rerun with others would mix two sets of images in one samples.npz."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    euler = {"solver": "euler", "shift": 1.0, "steps_per_stage": [10, 10, 10, 10], "seed": 0}
    check_settings(str(samples), str(tmp_path), euler)
    (samples / "000000.png").write_bytes(b"")
    for name, value in (("shift", 3.0), ("steps_per_stage", [2, 2, 2, 2])):
        with pytest.raises(ValueError, match=rf"holds images sampled with other settings \(differing: \['{name}'\]"):
            check_settings(str(samples), str(tmp_path), {**euler, name: value})
    check_settings(str(samples), str(tmp_path), euler)


def test_a_checkpoint_folders_fingerprint_follows_its_config_and_weights_only(tmp_path, converted):
    """A release folder is config.yaml + model.pt, a converted one its config and params/: any of
    them written again makes another checkpoint (its images are not added to a job's), a file
    beside them (notes) does not. model.pt was left out, so release weights replaced in place
    passed as the same checkpoint."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, PARAMS_DIR

    release = tmp_path / "release"
    release.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(os.path.join(fixture_dir("c2i_tiny"), name), release / name)
    conversion = shutil.copytree(converted["c2i_tiny"], tmp_path / "converted")
    params_file = next(os.path.join(folder, files[0]) for folder, _, files in os.walk(conversion / PARAMS_DIR) if files)
    for folder, written in ((release, ["model.pt", "config.yaml"]), (conversion, [params_file, CONFIG_FILE])):
        fingerprint = lambda: resolve_checkpoint(str(folder)).fingerprint()
        before = fingerprint()
        (folder / "notes.txt").write_text("sampled for the paper")
        assert fingerprint() == before
        for name in written:
            with open(folder / name, "ab") as f:
                f.write(b"\n")
            assert fingerprint() != before, name
            before = fingerprint()


def test_a_relative_checkpoint_path_is_recorded_as_an_absolute_one(monkeypatch):
    """settings.json records the checkpoint as its label: a relative one would name another folder
    (or none) for a rerun from another directory."""
    from pixelflow_jax.api import resolve_checkpoint

    monkeypatch.chdir(os.path.dirname(fixture_dir("c2i_tiny")))
    assert resolve_checkpoint("c2i_tiny").label == fixture_dir("c2i_tiny")
    assert resolve_checkpoint(os.path.join("c2i_tiny", "model.pt")).label == fixture_dir("c2i_tiny")


def test_a_job_recorded_without_a_fingerprint_still_refuses_another_checkpoint(tmp_path):
    """settings.json of an earlier version has no checkpoint_fingerprint: the checkpoint's path is
    then all that says which weights drew its images (no fingerprint on either side is no proof
    of the same weights)."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    storage.write_json_atomically(str(samples / "settings.json"), {"checkpoint": "/runs/a", "seed": 0})
    (samples / "000000.png").write_bytes(b"")
    check_settings(str(samples), str(tmp_path), {"checkpoint": "/runs/a", "seed": 0, "checkpoint_fingerprint": "f1"})
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['checkpoint'\]"):
        check_settings(str(samples), str(tmp_path), {"checkpoint": "/runs/b", "seed": 0, "checkpoint_fingerprint": "f1"})


def test_a_job_recorded_before_a_setting_was_recorded_goes_on_and_one_recorded_is_compared(tmp_path):
    """settings.json of an earlier version lacks the settings recorded since (SETTINGS_ADDED_LATER):
    their absence is no change, so a rerun of that job goes on; once recorded, each is compared."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000000.png").write_bytes(b"")
    job = {"seed": 0, "checkpoint": "/runs/a", "text_encoder": "/t5"}
    added = {name: f"{name} of this job" for name in ("checkpoint_fingerprint", "text_encoder_param_dtype",
                                                       "param_dtype", "text_encoder_fingerprint")}
    storage.write_json_atomically(str(samples / "settings.json"), job)
    check_settings(str(samples), str(tmp_path), {**job, **added})
    for name in added:
        storage.write_json_atomically(str(samples / "settings.json"), {**job, name: added[name]})
        with pytest.raises(ValueError, match=rf"\(differing: \['{name}'\]"):
            check_settings(str(samples), str(tmp_path), {**job, **added, name: "another"})


def test_a_job_whose_pngs_were_deleted_is_not_taken_for_one_that_never_sampled(tmp_path):
    """samples.npz kept, the PNGs deleted to save space: the job did sample, so its settings.json is
    not one 'to delete and rerun' (that advice is for a job killed before its first image). A
    killed writer's temporaries are no images of a job (they are cleared once the job starts)."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000003.png.tmp").write_bytes(b"\x89PNG partial")  # an earlier version's temporary
    (samples / ".000004.png.tmp-999999999-x").write_bytes(b"\x89PNG partial")
    check_settings(str(samples), str(tmp_path), {"seed": 0})
    (tmp_path / "samples.npz").write_bytes(b"50k images")
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['seed'\]\); use "
                                         r"a new --workdir"):
        check_settings(str(samples), str(tmp_path), {"seed": 1})


def test_each_image_is_conditioned_on_what_settings_json_records_for_it(monkeypatch):
    """A batch of any image ids (a resumed job's missing ones) gets the label or prompt that
    settings.json records for those images (job_settings.per_image_conditioning, which a larger job
    is checked against), not that of the batch's rows; and every setting that changes an image's
    conditioning is recorded, so that a rerun with another one is refused."""
    from configs import c2i, t2i
    from pixelflow_jax.sampling import sample_conditioning
    from pixelflow_jax.sampling.job_settings import per_image_conditioning
    from pixelflow_jax.text import prompts as prompts_module, t5_convert

    sample = c2i.get_config("tiny").sample
    sample.num_images = 7
    labels = sample_conditioning.ClassLabels(sample, num_classes=3)
    assert labels.settings()["labels"] == [i % 3 for i in range(7)]  # the release's sample_ddp.py: i mod classes
    recorded, ids = per_image_conditioning(labels.settings()), np.array([5, 2, 6])
    cond, uncond = labels.batch(ids)
    assert cond["class_labels"].tolist() == [recorded[i] for i in ids] and uncond["class_labels"].tolist() == [3] * 3
    sample.labels = (2, 0)
    with pytest.raises(ValueError, match="labels has 2 entries but --config.sample.num_images is 7"):
        sample_conditioning.ClassLabels(sample, num_classes=3)

    vocabulary = ["", "blurry", "a fox", "a cat", "a dog"]

    class Encoder:  # a prompt's embedding is its index in the vocabulary: which prompt a row got reads back
        folder = "/tmp/t5"

        def encode(self, prompts):
            index = np.array([vocabulary.index(p) for p in prompts], np.float32)
            return index[:, None, None] * np.ones((1, 2, 4), np.float32), np.ones((len(prompts), 2), bool)

    monkeypatch.setattr(prompts_module, "prompt_encoder_for", lambda s, width: Encoder())
    monkeypatch.setattr(t5_convert, "folder_fingerprint", lambda folder: "the encoder's files")
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=["a fox", "a cat", "a dog"], images_per_prompt=2, text_encoder="/tmp/t5")
    text = sample_conditioning.TextPrompts(sample, 4)
    recorded = per_image_conditioning(text.settings())
    assert text.num_images == len(recorded) == 6
    cond, uncond = text.batch(ids[:2] - 1)  # images 4 and 1
    assert [vocabulary[int(e[0, 0])] for e in cond["encoder_hidden_states"]] == [recorded[4], recorded[1]]
    assert uncond["encoder_hidden_states"].max() == 0  # the negative prompt, ""
    sample.negative_prompt = "blurry"
    assert sample_conditioning.TextPrompts(sample, 4).settings() != text.settings()
    sample.prompts_file = "/tmp/prompts.txt"  # and prompts: which would the job take?
    with pytest.raises(ValueError, match="set exactly one of --config.sample.prompts"):
        sample_conditioning.TextPrompts(sample, 4)
    # A typo's count of images: settings.json's per-image list of 1e11 prompts took the host's memory,
    # at every rerun in that workdir
    sample.prompts_file, sample.images_per_prompt = "", 10**7
    with pytest.raises(ConfigError, match=r"3 prompts x --config.sample.images_per_prompt 10000000 = 30,000,000 "
                                          r"images, over the limit of 10,000,000"):
        sample_conditioning.TextPrompts(sample, 4)
    config = t2i.get_config("tiny")
    config.sample.update(prompts=["a fox"], images_per_prompt=10**11)
    with pytest.raises(ConfigError, match=r"sample.images_per_prompt must be in \[1, 10000000\], got 100000000000"):
        check(config, "sample")


def test_the_conditioning_refuses_a_job_of_no_images_itself():
    """Checked where the job's image count is made, not only by main.py's config check, which a
    Python caller of sample_run.run does not pass through."""
    from configs import c2i, t2i
    from pixelflow_jax.sampling import sample_conditioning

    sample = c2i.get_config("tiny").sample
    sample.num_images = 0
    with pytest.raises(ValueError, match="^--config.sample.num_images must be positive, got 0"):
        sample_conditioning.ClassLabels(sample, num_classes=3)
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=["a fox"], images_per_prompt=0)
    with pytest.raises(ValueError, match="^--config.sample.images_per_prompt must be positive, got 0"):
        sample_conditioning.TextPrompts(sample, 4)


def test_a_blank_prompt_is_refused_not_sampled():
    from configs import t2i
    from pixelflow_jax.sampling.sample_conditioning import read_prompts

    sample = t2i.get_config("tiny").sample
    sample.prompts = ("a fox", " ")
    with pytest.raises(ValueError, match=r"every prompt must be a non-empty string, got \['a fox', ' '\]"):
        read_prompts(sample)


def test_sample_settings_are_checked_by_process_0_and_its_refusal_stops_every_process(tmp_path, monkeypatch):
    """Another job's settings.json recorded between this job's checks and its exclusive create is
    named; with several processes, process 0 alone checks, and the others learn its outcome (one
    raising alone left the others waiting at a barrier; a barrier some processes skipped, when the
    file already existed for them, was a name mismatch)."""
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    from pixelflow_jax.sampling import job_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    other_job = lambda: (samples / "settings.json").write_text(json.dumps({"seed": 1}))
    monkeypatch.setattr(job_settings.storage, "create_json", lambda path, value: other_job() and False)
    with pytest.raises(ValueError, match=r"another job started sampling into .*samples at the same time, with other "
                                         r"settings \(differing: \['seed'\]\); use a new --workdir"):
        job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})

    reads = []
    monkeypatch.setattr(job_settings, "changed_settings", lambda *args: reads.append(args) or [])
    monkeypatch.setattr(job_settings.jax, "process_index", lambda: 1)
    monkeypatch.setattr(job_settings.jax, "process_count", lambda: 2)
    for refused_on_process_0 in (1, 0):
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                            lambda value: np.int32(refused_on_process_0))
        if refused_on_process_0:
            with pytest.raises(ValueError, match=r"process 0 refused the settings of .*samples \(its error says why\)"):
                job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})
        else:
            job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})
    assert reads == []  # process 1 reads nothing: what it would find depends on when it looks


def test_a_prompts_file_is_read_as_a_user_wrote_it_or_named_with_its_problem(tmp_path):
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red disk\r\n\r\na blue ring\n".encode("utf-8"))  # a Windows editor's file
    assert read_prompts_file(str(path)) == ["a red disk", "a blue ring"]
    # Only line breaks end a prompt: a form feed or U+2028 (pasted from a web page) inside a line is
    # no break an editor shows, and splitting there would shift every later prompt's images.
    path.write_text("a red disk\x0con grey\na blue\u2028ring\x85now\ra green square\n", encoding="utf-8")
    assert read_prompts_file(str(path)) == ["a red disk\x0con grey", "a blue\u2028ring\x85now", "a green square"]
    for content, message in ((" \n\n", "holds no prompts"), ("caf\xe9\n".encode("latin-1"), "is not UTF-8 text")):
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        with pytest.raises(ValueError, match=f"prompts_file {path} {message}"):
            read_prompts_file(str(path))
    with pytest.raises(ValueError, match="is a folder: give a text file"):
        read_prompts_file(str(tmp_path))
    # Windows' "Unicode": UTF-16 with its byte-order mark said "not UTF-8 (invalid start byte at byte 0)";
    # without the mark it read as UTF-8, a NUL beside each letter, and each line sampled as two prompts.
    for encoding, named in (("utf-16", "UTF-16"), ("utf-32", "UTF-32"), ("utf-16-le", "UTF-16LE"),
                            ("utf-16-be", "UTF-16BE")):
        path.write_bytes("a red disk\r\na blue ring\r\n".encode(encoding))
        with pytest.raises(ValueError, match=f"prompts_file {path} is {named} text, not UTF-8: convert it, e.g. "
                                             f"iconv -f {named} -t UTF-8 {path} > prompts.utf8.txt"):
            read_prompts_file(str(path))


def test_a_benchmarks_prompts_as_json_or_a_table_are_refused_rather_than_sampled_as_their_text(tmp_path):
    """GenEval's metadata.jsonl, PartiPrompts' TSV and DrawBench's CSV given as a prompts file were
    sampled line by line: each image of a JSON record's text, of a row's columns, and of the header."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts"
    refused = {
        '{"tag": "single_object", "include": [{"class": "bench"}], "prompt": "a photo of a bench"}\n'
        '{"tag": "colors", "prompt": "a photo of a red cow"}\n':
            "its lines are JSON objects (keys tag, include, prompt); write each one's prompt alone, e.g. jq -r "
            f".prompt {path} > prompts.txt, and give that file",
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t-\n":
            "its first line, 'Prompt\\tCategory\\tChallenge\\tNote', is a table's header, and each line a row of 4 "
            "columns; write the 'Prompt' column alone, without the header",
        'Prompts,Category\nA red colored car.,Colors\n"A black, colored car.",Colors\n':
            "its first line, 'Prompts,Category', is a table's header, and each line a row of 2 columns; write the "
            "'Prompts' column alone, without the header",
        "caption\na red fox\n": "its first line, 'caption', is a column's header, not a prompt; remove that line",
        '[\n  "a red fox",\n  "a blue car"\n]\n': "it is a JSON list of 2 entries; write each prompt alone on a line",
    }
    for text, problem in refused.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"prompts_file {path} is not one plain prompt per line: "
                                                       f"{problem}")):
            read_prompts_file(str(path))
    # prompts that only look like these: a prompt starting with a column's name, brackets, braces
    plain = ["text, bold letters on a sign", "caption: a red fox", "[a red fox]", "{a red fox}", "prompt"]
    path.write_text("\n".join(plain) + "\n")
    assert read_prompts_file(str(path)) == plain


def test_blank_lines_that_move_prompts_off_their_line_numbers_are_named(tmp_path, caplog):
    """They were skipped without a word: the images of the prompt on line 4 were those of prompt 1."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_text("a red disk\n\n  \na blue ring\na green square\n\n")
    with caplog.at_level(logging.WARNING):
        assert read_prompts_file(str(path)) == ["a red disk", "a blue ring", "a green square"]
    assert f"prompts_file {path}: blank lines 2, 3 skipped: the prompt on line 4 is prompt 1 (prompts count " \
           "non-blank lines, from 0, and a sampling job's image i shows prompt i // images_per_prompt)" in caplog.text
    caplog.clear()
    path.write_text("a red disk\na blue ring\n\n\n")  # blank lines after the last prompt move nothing
    with caplog.at_level(logging.WARNING):
        read_prompts_file(str(path))
    assert "blank" not in caplog.text
    # one blank line (the common case) is named too; with blank lines in two places the warning names the
    # first prompt they moved, and a long run of them is cut after ten
    for text, named in (("a red disk\n\na blue ring\n", "blank line 2 skipped: the prompt on line 3 is prompt 1 "),
                        ("a red disk\n\na blue ring\n\na green square\n",
                         "blank lines 2, 4 skipped: the prompt on line 3 is prompt 1 "),
                        ("\n" * 12 + "a red disk\n", "blank lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... skipped: the "
                                                    "prompt on line 13 is prompt 0 ")):
        caplog.clear()
        path.write_text(text)
        with caplog.at_level(logging.WARNING):
            read_prompts_file(str(path))
        assert f"prompts_file {path}: {named}" in caplog.text


def test_a_prompt_of_only_invisible_characters_is_refused(tmp_path):
    """A line holding only a byte-order mark (two files joined) or a zero-width space tokenized to
    nothing: its images were the negative prompt's, unguided, without a word."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a red disk\n\ufeff\na blue ring\n")
    sample = t2i_config(**{"sample.prompts_file": str(path)}).sample
    with pytest.raises(ValueError, match=re.escape("prompt 1 ('\\ufeff') holds no visible text, only zero-width, "
                                                   "byte-order-mark or control characters")):
        read_prompts(sample)
    sample.update(prompts_file="", prompts=("a red disk", "\u200b"))
    with pytest.raises(ValueError, match=re.escape("prompt 1 ('\\u200b') holds no visible text")):
        read_prompts(sample)
    sample.prompts = ("a red disk", "\u732b")
    assert read_prompts(sample) == ["a red disk", "\u732b"]


def test_sample_settings_a_text_job_does_not_use_are_refused():
    from configs import t2i

    for field, value in (("num_images", 10), ("labels", (1, 2))):
        config = t2i.get_config("tiny")
        config.sample[field] = value
        with pytest.raises(ConfigError, match=f"--config.sample.{field} does not apply to text-to-image sampling"):
            check(config, "sample")
    check(t2i.get_config("tiny"), "sample")
    config = t2i.get_config("tiny")
    config.sample.text_encoder_param_dtype = "fp16"  # named before the checkpoint loads
    with pytest.raises(ConfigError, match="--config.sample.text_encoder_param_dtype must be one of"):
        check(config, "sample")
    for count in (3_000_000_000, 10**8):  # past int32 ids; a typo that took 10 GB before its first log line
        with pytest.raises(ConfigError, match=r"--config.sample.num_images must be in \[1, 10000000\]"):
            check(c2i_config(**{"sample.num_images": count}), "sample")
    # Prompts of another type, and text settings inspect reads, are named before a checkpoint loads.
    for mode, field, value, message in (
            ("sample", "prompts", 5, "--config.sample.prompts must be a prompt or a list of prompts (strings), got 5"),
            ("sample", "prompts", None, "--config.sample.prompts must be a prompt or a list of prompts"),
            ("train", "prompts", ("a cat", 3), "--config.sample.prompts must be a prompt or a list of prompts"),
            ("inspect", "max_text_tokens", -5, "--config.sample.max_text_tokens must be in [0, 4096], got -5")):
        config = t2i.get_config("tiny")
        config.sample[field] = value
        if mode == "train":
            config.train.preview_every = 1
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(config, mode)
    for mode in ("sample", "demo", "inspect"):  # the dtypes a sampling job builds its model with
        with pytest.raises(ConfigError, match="--config.model.param_dtype must be .*float16.*got 'float64'"):
            check(c2i_config(**{"model.param_dtype": "float64"}), mode)
    with pytest.raises(ConfigError, match=r"--config.train.ema_decay must be < 1"):  # the EMA would never move
        check(c2i_config(**{"train.ema_decay": 1.0}), "train")


def test_a_setting_a_checkpoint_cannot_honour_is_refused(converted):
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    for path in (converted["c2i_tiny"], fixture_dir("c2i_tiny")):  # one set of weights each
        with pytest.raises(CheckpointError, match="holds one set of weights|with one set of weights"):
            load_model(path, weights="model")
    with pytest.raises(CheckpointError, match=r"--resolution=128 \(64 in .*config.yaml\): the config.yaml decides"):
        read_release_checkpoint(fixture_dir("c2i_tiny"), overrides={"resolution": 128, "num_stages": None})
    config, _ = read_release_checkpoint(fixture_dir("c2i_tiny"), overrides={"resolution": 64})  # agrees: fine
    assert config.resolution == 64


def test_a_foreign_or_other_model_workdir_is_refused_before_anything_is_written_there(tmp_path):
    from configs import t2i

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "5").mkdir(parents=True)
    (foreign / "checkpoints" / "5" / "model.pt").write_bytes(b"")
    config = c2i_config()
    with pytest.raises(ValueError, match=r"holds checkpoints/ but no run_config.json: not a training run of "
                                         r"pixelflow-jax, or a copy of one that missed that file \(copy run_config.json "
                                         r"from the run, then rerun to resume it\); otherwise use a new --workdir"):
        check_run_config(str(foreign), ModelConfig.from_mapping(config.model), config)  # (it said only the last)
    assert sorted(os.listdir(foreign)) == ["checkpoints"]

    class_run = str(tmp_path / "class_run")
    check_run_config(class_run, ModelConfig.from_mapping(config.model), config)
    os.makedirs(os.path.join(class_run, "checkpoints", "10"))  # a saved step
    text = t2i.get_config("tiny")  # checked before its text encoder would be built in the workdir
    with pytest.raises(ValueError, match="architecture.cross_attention_dim 0 there, 20 in this config"):
        check_run_config(class_run, ModelConfig.from_mapping(text.model), text, record=False)
    assert sorted(os.listdir(class_run)) == ["checkpoints", "run_config.json"]


def test_api_misuse_that_gave_wrong_images_or_raw_errors_is_named(models):
    import jax.numpy as jnp

    from pixelflow_jax.sampling.cascade import CascadeSampler, SamplingOptions
    from pixelflow_jax.text.prompts import prompt_list

    with pytest.raises(ValueError, match=r"the single string 'a cat': pass \[prompt\]"):  # was 5 prompts: a, " ", c...
        prompt_list("a cat")
    with pytest.raises(ValueError, match="no prompts"):
        prompt_list([])
    for prompts in (None, 5):  # a TypeError: "'NoneType' object is not iterable"
        with pytest.raises(ValueError, match=rf"prompts must be a list of strings, got {type(prompts).__name__} "):
            prompt_list(prompts)
    from pixelflow_jax.text.prompts import PromptEncoder

    for arguments, message in (({"dtype": "bf16"}, "dtype must be one of"),
                               ({"max_length": 0}, r"max_length must be in \[2, 4096\], got 0")):
        with pytest.raises(ValueError, match=message):  # before the folder is read
            PromptEncoder("/nowhere", **arguments)
    with pytest.raises(ValueError, match="rtol must be a finite positive number"):
        SamplingOptions.create(4, 2, solver="dopri5", rtol=-1.0)
    model, _ = models["c2i_tiny"]
    images = np.zeros((2, 16, 16, 3), np.float32)
    for arguments, message in (({"class_labels": [1, 2, 3]}, r"class_labels must be one per image, shape \(2,\)"),
                               ({"class_labels": [1, 2], "encoder_attention_mask": np.ones((2, 4))},
                                "no cross-attention: do not pass encoder_attention_mask")):
        with pytest.raises(ValueError, match=message):
            model(images, 1.0, **arguments)
    with pytest.raises(ValueError, match=r"timesteps must be one value or one per image \(2\)"):
        model(images, np.array([1.0, 2.0, 3.0]), class_labels=[1, 2])
    with pytest.raises(ValueError, match=r"timesteps must be finite, got \[1.0, nan\]"):
        model(images, np.array([1.0, np.nan]), class_labels=[1, 2])
    with pytest.raises(ValueError, match="empty batch"):
        model(images[:0], 1.0, class_labels=[])
    sampler = CascadeSampler(model, models["c2i_tiny"][1])
    for seed in (jax.random.key(0), jax.random.PRNGKey(0)):  # a numpy conversion error
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 4294967295\]"):
            sampler.generate([1], steps_per_stage=1, seed=seed)
    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number in \[1, 1000\]"):  # was NaN at 1e40
        sampler.generate([1], steps_per_stage=1, cfg_scale=1e40)
    for steps in (2, (2.5,) * 4):  # a TypeError inside the dataclass
        with pytest.raises(ValueError, match="steps_per_stage must be a tuple of ints, one per stage"):
            SamplingOptions(steps_per_stage=steps)
    shapes = [(2, r, r, 3) for r in (8, 16, 32, 64)]
    with pytest.raises(ValueError, match=r"uncond\['class_labels'\] must be class ids in \[0, 1000\]"):  # was NaN
        sampler.sample(jnp.zeros(shapes[0]), [jnp.zeros(s) for s in shapes[1:]], {"class_labels": np.array([1, 2])},
                       {"class_labels": np.array([5000, 5000])}, SamplingOptions.create(4, 1, cfg_scale=3.0))
    labels = {"class_labels": np.array([1, 2])}, {"class_labels": np.array([1000, 1000])}
    options = SamplingOptions.create(4, 1)
    # Noise of another size: a jax broadcast error; block noise of batch 1: every image the same noise.
    with pytest.raises(ValueError, match=r"initial_noise must have shape \(batch, 8, 8, 3\) = \(2, 8, 8, 3\), got "
                                         r"\(2, 4, 4, 3\)"):
        sampler.sample(jnp.zeros((2, 4, 4, 3)), [jnp.zeros(s) for s in shapes[1:]], *labels, options)
    with pytest.raises(ValueError, match=r"block_noises\[1\] \(stage 2\) must have shape .* = \(2, 32, 32, 3\), got "
                                         r"\(1, 32, 32, 3\)"):
        sampler.sample(jnp.zeros(shapes[0]), [jnp.zeros(shapes[1]), jnp.zeros((1, 32, 32, 3)), jnp.zeros(shapes[3])],
                       *labels, options)
    with pytest.raises(ValueError, match="options must be a SamplingOptions .*, got a dict"):
        sampler.sample(jnp.zeros(shapes[0]), [jnp.zeros(s) for s in shapes[1:]], *labels, {"steps_per_stage": 1})
    # Conditioning of one row for two images failed in jnp.stack, one not a dict on a missing .get.
    noise = jnp.zeros(shapes[0]), [jnp.zeros(s) for s in shapes[1:]]
    with pytest.raises(ValueError, match=re.escape("uncond['class_labels'] must hold one row per image of "
                                                   "initial_noise (2), got shape (1,)")):
        sampler.sample(*noise, labels[0], {"class_labels": np.array([1000])}, options)
    with pytest.raises(ValueError, match=re.escape("cond['class_labels'] must hold one row per image of "
                                                   "initial_noise (2), got shape ()")):
        sampler.sample(*noise, {"class_labels": np.int32(3)}, labels[1], options)  # a label, not one per image
    with pytest.raises(ValueError, match=re.escape("cond must be a dict of the model's keyword arguments "
                                                   "({'class_labels': ...}, or the encoder_hidden_states")):
        sampler.sample(*noise, np.array([1, 2]), labels[1], options)


def test_a_model_config_takes_whole_numbers_and_true_or_false_only():
    """numpy ints and 1.5 heads failed deep inside nnx ('Shapes must be 1D sequences of concrete
    values of integer type'); attention_bias="False", a truthy string, built the biases unseen."""
    small = dict(num_attention_heads=2, attention_head_dim=16, depth=1, num_classes=10)
    config = ModelConfig(**{**small, "depth": np.int64(2), "num_classes": 10.0})
    assert (type(config.depth), type(config.num_classes), config.depth) == (int, int, 2)
    assert config == ModelConfig(**{**small, "depth": 2})  # equal and hashed alike: a sampler's programs are shared
    flag = ModelConfig(**small, attention_bias=np.bool_(False)).attention_bias  # a numpy bool is True or False
    assert (type(flag), flag) == (bool, False)
    # dtypes as load_model takes them (it refused jnp.bfloat16, "got <class 'jax.numpy.bfloat16'>")
    assert ModelConfig(**small, dtype=jnp.bfloat16, param_dtype=np.dtype("float16")) == \
        ModelConfig(**small, dtype="bfloat16", param_dtype="float16")
    for field, value, message in (("num_attention_heads", 1.5, "model.num_attention_heads must be a whole number, "
                                                              "got 1.5"),
                                  ("depth", "2", "model.depth must be a whole number, got '2'"),
                                  ("num_classes", None, "model.num_classes must be a whole number, got None"),
                                  ("attention_head_dim", True, "model.attention_head_dim must be a whole number"),
                                  ("attention_bias", "False", "model.attention_bias must be True or False, got "
                                                              "'False'")):
        with pytest.raises(TypeError, match=re.escape(message)):
            ModelConfig(**{**small, field: value})
    # None is named as given, not as the float64 numpy would read it as
    with pytest.raises(ValueError, match=re.escape("model.dtype must be float32, bfloat16 or float16, got None")):
        ModelConfig(**small, dtype=None)


def test_a_fresh_model_names_a_config_or_rngs_of_the_wrong_type():
    """PixelFlow(config.model) (a ConfigDict) and rngs=0 failed inside the first layer, with an
    AttributeError naming neither argument."""
    from flax import nnx

    from configs import c2i
    from pixelflow_jax import PixelFlow

    for cfg, message in ((c2i.get_config("tiny").model, "cfg must be a ModelConfig, got a ConfigDict: "
                                                        "ModelConfig.from_mapping(values) builds one"),
                         ({"depth": 1}, "cfg must be a ModelConfig, got a dict: ModelConfig.from_mapping"),
                         ("tiny", "cfg must be a ModelConfig, got a str: ModelConfig(num_attention_heads=...")):
        with pytest.raises(TypeError, match=re.escape(message)):
            PixelFlow(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=re.escape("rngs must be a flax.nnx.Rngs (the initialisation's seed), got 0: "
                                                  "pass rngs=nnx.Rngs(0)")):
        PixelFlow(ModelConfig(num_attention_heads=2, attention_head_dim=16, depth=1, num_classes=10), rngs=0)


def test_an_attention_kernel_the_platform_lacks_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                             "--config.model.attention=cudnn"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: --config.model.attention: attention backend 'cudnn' runs on" in \
        result.stderr, result.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_a_step_is_saved_before_its_preview_and_a_preemption_skips_the_preview(tmp_path, monkeypatch):
    """With the default cadences every preview step is a save step, and the first preview compiles
    the sampler (minutes on XL): saved after it, a preemption's grace period could run out first
    and lose a checkpoint interval."""
    from pixelflow_jax.training import train

    events = []
    save = train.save
    monkeypatch.setattr(train, "save", lambda manager, step, state: events.append(("save", step)) or save(manager, step, state))
    previews_under_a_mesh = []

    def preview(*args, **kwargs):  # under the training mesh (splash attention on a TPU of several chips needs it)
        previews_under_a_mesh.append(not jax.sharding.get_abstract_mesh().empty)
        events.append(("preview", args[5]))
        return {}

    monkeypatch.setattr(train, "write_preview", preview)

    class PreemptedAtStep2:
        cause, interrupted = "preempted (SIGTERM)", False

        def __init__(self):
            self.step = 0

        def reached(self):  # a new run: its calls are its steps
            self.step += 1
            return self.step == 2 and not signal_during_the_step

        def requested_alone(self):  # a signal that came after reached(2) had answered False
            return self.step == 2 and signal_during_the_step

        def close(self):
            pass

    monkeypatch.setattr(train, "PreemptionWatch", PreemptedAtStep2)
    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32, log_every=1, checkpoint_every=1, preview_every=1)
    for signal_during_the_step in (False, True):
        events.clear()
        workdir = tmp_path / str(signal_during_the_step)
        with pytest.raises(train.TrainingPreempted, match="saved step 2"):
            train.train(config, str(workdir))
        saved = [1, 2] if config.train.checkpoint_every == 1 else [2]
        assert events == [("save", 1), ("preview", 1), ("save", 2)][2 - len(saved):]  # no preview at step 2
        assert train.complete_steps(str(workdir)) == saved
        config.train.checkpoint_every = 3  # the signalled step saves although no save was due
    assert previews_under_a_mesh == [True, True]

    # The skipped preview is drawn by the run that resumes at its step (from the EMA restored, that
    # step's own); a stop during the last step says so and what a rerun still does.
    events.clear()
    with pytest.raises(train.TrainingPreempted, match="saved step 4 on every process; the run's last step; rerun "
                                                      "the same command to draw its preview"):
        train.train(config, str(workdir))  # resumed at 2, signalled during its second step (4)
    assert events == [("preview", 2), ("save", 3), ("preview", 3), ("save", 4)]
    events.clear()
    assert train.train(config, str(workdir)) == {} and events == [("preview", 4)]  # (the stand-in draws no file)


def test_a_stop_at_the_last_step_with_no_preview_owed_says_the_run_is_complete():
    """Preempted at its last step, with its preview drawn (or none due), a run has nothing left: the
    message must not send the user to rerun for a preview; Ctrl-C and SIGTERM keep their exit codes."""
    import types

    from pixelflow_jax.command_line import EXIT_INTERRUPTED, EXIT_TERMINATED
    from pixelflow_jax.training import train

    for interrupted, status in ((False, EXIT_TERMINATED), (True, EXIT_INTERRUPTED)):
        stop = train.preempted_at(types.SimpleNamespace(cause="SIGTERM", interrupted=interrupted), 4, 4, False)
        assert (str(stop), stop.exit_status) == (
            "SIGTERM: saved step 4 on every process; the run's last step: the run is complete", status)


def test_a_preview_drawn_after_a_stop_joins_its_steps_logged_line(tmp_path):
    from pixelflow_jax.training.metrics_log import MetricsLog

    lines = [{"step": 4, "loss": 0.5}, {"step": 5, "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = MetricsLog(str(tmp_path), resumed_step=5)
    log.add_to_step(5, {"preview_hue_agreement": 0.75})
    log.add_to_step(6, {"preview_hue_agreement": 1.0})  # a step never logged (killed before): nothing
    log.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 4, "loss": 0.5}, {"step": 5, "loss": 0.25, "preview_hue_agreement": 0.75}]


def test_a_log_write_that_fails_is_one_error_and_the_lock_release_never_hides_it(tmp_path, monkeypatch, caplog):
    from pixelflow_jax.training.metrics_log import MetricsLog
    from pixelflow_jax.training.workdir_lock import WorkdirLock

    log = MetricsLog(str(tmp_path), resumed_step=0)
    (tmp_path / "metrics.jsonl").mkdir()  # not writable as a file, even for root
    record = {"step": 1, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "skipped_steps": 0}
    with pytest.raises(storage.StorageError, match=r"cannot write .*metrics.jsonl \(IsADirectoryError: .*rerun the "
                                                   "same command: it resumes from its latest checkpoint"):
        log.write(record)
    log.close()

    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()

    def cannot_remove(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage, "remove", cannot_remove)
    with caplog.at_level(logging.WARNING):
        lock.release()  # in a finally block: raising here would replace the run's own error
    assert "could not remove" in caplog.text and "Permission denied" in caplog.text and not lock.held


def test_a_lock_copied_with_its_workdir_is_taken_over_on_the_same_host(tmp_path, caplog):
    """cp -a of a running run's workdir: the copy's lock names a live run (this process) working in
    the original folder, so the copy could never be resumed while that run went on."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    (tmp_path / "original").mkdir()
    (tmp_path / "copy").mkdir()
    original = WorkdirLock(str(tmp_path / "original"), stale_after_s=600)
    original.acquire()
    try:
        shutil.copy(tmp_path / "original" / LOCK_FILE, tmp_path / "copy" / LOCK_FILE)
        with pytest.raises(WorkdirBusy):  # the original folder stays locked
            WorkdirLock(str(tmp_path / "original"), stale_after_s=600).acquire()
        copy = WorkdirLock(str(tmp_path / "copy"), stale_after_s=600)
        with caplog.at_level(logging.WARNING):
            copy.acquire()
        assert copy.held and "a copy of the lock of " + str(tmp_path / "original") in caplog.text
        copy.release()
        # One folder under two paths (a bind mount, an export mounted twice) is not a copy.
        lock = tmp_path / "original" / LOCK_FILE
        lock.write_text(json.dumps({**json.loads(lock.read_text()),  # (pathlib would drop the "/.")
                                    "workdir": os.path.join(str(tmp_path / "original"), ".")}))
        with pytest.raises(WorkdirBusy):
            WorkdirLock(str(tmp_path / "original"), stale_after_s=600).acquire()
    finally:
        original.release()


def test_a_lock_whose_folder_is_gone_is_a_copy_and_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path):
    """A workdir copied (or moved) away from a live run's folder that is gone since: its lock
    names a live process of this host, yet its run no longer works there. Another host's lock
    names its own mount point of a shared folder, which proves nothing here: taken over as a
    copy, two runs would train in one workdir. And such a gone holder is taken over once its
    heartbeat is older than this run's lock_stale_after_s, not only after two of its refreshes."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    mine = WorkdirLock(str(tmp_path), stale_after_s=600).record  # this process: alive
    lock_file.write_text(json.dumps({**mine, "workdir": str(tmp_path / "gone")}))
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert lock.held and json.loads(lock_file.read_text())["token"] == lock.record["token"]
    lock.release()

    stale_after_s = 100.0
    other_host = {**WorkdirLock(str(tmp_path), stale_after_s=stale_after_s).record, "host": "elsewhere",
                  "workdir": "/mnt/shared/run"}  # its mount point of this folder
    lock_file.write_text(json.dumps(other_host))
    with pytest.raises(WorkdirBusy, match="host elsewhere") as busy:
        WorkdirLock(str(tmp_path), stale_after_s=stale_after_s).acquire()
    # A run copied off that host (tar, rsync) brings its lock: the message names the folder it was taken in.
    assert str(busy.value).endswith(f". That run works in /mnt/shared/run on its host: if this folder is a copy of "
                                    f"that one (its lock came along), delete {lock_file} and rerun")
    lock_file.write_text(json.dumps({**other_host, "heartbeat": time.time() - stale_after_s - 10}))
    lock = WorkdirLock(str(tmp_path), stale_after_s=stale_after_s)
    lock.acquire()
    assert lock.held
    lock.release()


def test_a_run_that_lost_its_lock_never_removes_the_new_owners_and_a_removed_lock_is_written_again(tmp_path):
    """A run whose lock another run took over (it stalled) and that ends before its next beat must
    leave the new owner's lock: removed, a third run could start in the workdir. And a lock file
    removed under a live run (by hand) is no takeover: its next beat writes it again, and the run
    goes on refreshing it."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)  # refreshed every 60 s: no beat in this test
    lock.acquire()
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    storage.write_json_atomically(str(lock_file), rival)
    lock.release()
    assert json.loads(lock_file.read_text()) == rival

    lock_file.unlink()
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    try:
        lock_file.unlink()
        lock.heartbeat()
        assert lock.held and json.loads(lock_file.read_text())["token"] == lock.record["token"]
        lock.check_held(read_now=True)
    finally:
        lock.release()
    assert not lock_file.exists()


def test_a_process_start_time_is_read_from_proc_even_when_its_name_holds_parentheses(tmp_path):
    """process_start tells a live holder from a process that reuses its pid (a restarted
    container): a wrong field of /proc/PID/stat (an always-0 one, or the memory size, which
    changes) either never sees the reuse or takes a live run's lock over. The process name comes
    before the fields and may hold ") ", so the fields are counted from its last ")"."""
    from pixelflow_jax.training.workdir_lock import process_start

    ticks = os.sysconf("SC_CLK_TCK")
    named = tmp_path / "a) b c"
    named.symlink_to(shutil.which("sleep"))
    with open("/proc/uptime") as f:
        spawned_at = float(f.read().split()[0])  # seconds since boot
    child = subprocess.Popen([str(named), "30"])
    try:
        def name() -> str:
            with open(f"/proc/{child.pid}/comm") as f:
                return f.read()

        deadline = time.time() + 10  # the kernel names the process a moment after Popen returns
        while ") b c" not in name() and time.time() < deadline:
            time.sleep(0.01)
        assert ") b c" in name()
        assert abs(process_start(child.pid) / ticks - spawned_at) < 5
        assert process_start(child.pid) > process_start(os.getpid())  # started after this test's process
    finally:
        child.kill()
        child.wait()


def test_a_file_where_a_folder_goes_a_positional_mode_and_a_mistyped_demo_workdir_are_named(tmp_path):
    from pixelflow_jax.data.sources import DataError, make_source
    from pixelflow_jax.demo_app import run as run_demo

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(storage.StorageError, match="a_file is a file, not a folder: name a folder"):
        storage.check_writable(str(a_file))
    # A folder under it: "cannot write to a_file/run: NotADirectoryError ... name a folder this user can write to
    # (a training run in a read-only folder ...)", as if access were the problem.
    with pytest.raises(storage.StorageError, match=rf"^{a_file} \(above {a_file}/runs/x\) is a file, not a folder: "):
        storage.check_writable(str(a_file / "runs" / "x"))
    (tmp_path / "link").symlink_to(tmp_path / "moved_away")  # was 'cannot write to link: FileExistsError'
    for folder in (tmp_path / "link", tmp_path / "link" / "run"):
        with pytest.raises(storage.StorageError, match=rf"link.* is a link to {tmp_path}/moved_away, which does not "
                                                       r"exist \(moved or deleted\?\): point the link at the folder"):
            storage.check_writable(str(folder))
    from pixelflow_jax.api import sampling_checkpoint

    moved = rf"link is a link to {tmp_path}/moved_away, which does not exist \(moved or deleted\?\)"
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path}/{moved}$"):  # was '... does not exist'
        load_model(str(tmp_path / "link"))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/{moved}: for a training run, give its workdir"):
        sampling_checkpoint(c2i_config().sample, str(tmp_path / "link"))  # was 'does not exist (a typo?)'
    data = c2i_config(**{"data.source": "folder", "data.root": str(a_file)}).data
    with pytest.raises(DataError, match="a_file is a file, not a folder: set --config.data.root to a folder"):
        make_source(data)
    config = c2i_config(**{"demo.port": free_port()})
    with pytest.raises(CheckpointError, match="typo_run does not exist \\(a typo\\?\\)"):
        run_demo(config, str(tmp_path / "typo_run"))
    assert not (tmp_path / "typo_run").exists()  # not made by the write check
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}",
                             "sample"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "(a mode is a flag: --mode=sample)" in result.stderr
    assert len(result.stderr.splitlines()) == 2, result.stderr  # the error and where help is, not the whole help


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_while_a_job_writes_is_left_as_it_is(tmp_path, overwrite):
    """The swap replaced whatever stood at the output by then: a folder a person made during a long
    export (files lost without --overwrite), or a second conversion's output."""
    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir

    output = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while this job was writing"):
        with atomic_output_dir(str(output), overwrite=overwrite) as tmp:
            with open(os.path.join(tmp, "model.pt"), "wb") as f:
                f.write(b"new")
            output.mkdir()
            (output / "notes.txt").write_text("precious")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(output) == ["notes.txt"]


def test_two_sample_jobs_starting_together_in_one_folder_cannot_both_record_their_settings(tmp_path, monkeypatch):
    """Both saw no settings.json and both wrote one (the last rename won): two seeds, one folder."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    real_exists = storage.exists

    def other_job_writes_first(path):  # the other job records its settings between the check and the write
        found = real_exists(path)
        if path.endswith("settings.json") and not found:
            (samples / "settings.json").write_text(json.dumps({"seed": 0}))
        return found

    monkeypatch.setattr(storage, "exists", other_job_writes_first)
    with pytest.raises(ValueError, match=r"differing: \['seed'\]"):
        check_settings(str(samples), str(tmp_path), {"seed": 1})
    assert json.loads((samples / "settings.json").read_text()) == {"seed": 0}
    assert os.listdir(samples) == ["settings.json"]  # no temporary left


def test_a_step_folder_renamed_by_hand_is_refused_at_the_resume_not_trained_on_from_its_name(tmp_path):
    """checkpoints/4 renamed 40 resumed at step 40: the data taken up at batch 40, the noise keys at
    the state's step 4, and metrics.jsonl went from step 4 to 41."""
    from pixelflow_jax.training import checkpointing

    state = {"step": jnp.array(4, jnp.int32), "w": jnp.arange(2.0)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    checkpointing.save(manager, 4, state)
    manager.wait_until_finished()
    assert checkpointing.resume_point(manager, state, shardings)[0] == 4
    os.rename(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "40")
    manager.reload()
    with pytest.raises(CheckpointError, match=r"checkpoints/40 holds the train state of step 4, not 40 \(its folder "
                                              r"renamed by hand, or copied in from another run\?\): name it 4 again"):
        checkpointing.resume_point(manager, state, shardings)
    assert os.listdir(tmp_path / "checkpoints") == ["40"]  # nothing set aside: the weights are whole
    os.rename(tmp_path / "checkpoints" / "40", tmp_path / "checkpoints" / "2")  # a lower step than it counts
    manager.reload()
    with pytest.raises(CheckpointError, match=r"checkpoints/2 holds the train state of step 4, not 2 "):
        checkpointing.resume_point(manager, state, shardings)
    manager.close()


def test_a_resume_whose_steps_vanish_before_the_restore_is_named(tmp_path):
    """A resume builds only the state's shapes (the restore fills them): were the steps it found
    gone by the restore, those shapes must not go on as a train state."""
    from pixelflow_jax.training import checkpointing

    manager = checkpointing.checkpoint_manager(str(tmp_path), 3)
    shapes = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(CheckpointError, match="lists no step now, though the run found one as it started"):
        checkpointing.resume_point(manager, shapes, {"w": None})
    assert checkpointing.resume_point(manager, {"w": jnp.zeros(2)}, {"w": None})[0] == 0  # a new run's state
    manager.close()
