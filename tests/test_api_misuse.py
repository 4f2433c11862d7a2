"""The Python API (load_model, the model, the samplers, the job functions) names its misuse: wrong
types, shapes, kernels and configs are refused before they give wrong images or raw errors."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, c2i_config, fixture_dir, free_port
from pixelflow_jax import CheckpointError, load_model, storage, validation
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.validation import ConfigError


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
    with pytest.raises(ValueError, match=re.escape("got (2, 3, 16, 16) (channels last: images.transpose(0, 2, 3, 1) "
                                                   "for an NCHW batch)")):  # a PyTorch user's layout
        model(x.transpose(0, 3, 1, 2), t, class_labels=np.array([1, 2]))
    # A wide batch (its patches no square grid); one 3 pixels high, no NCHW batch to transpose; RGBA.
    for images, shape in ((x[:, :, :8], "(2, 16, 8, 3)"), (np.zeros((2, 3, 16, 3), np.float32), "(2, 3, 16, 3)"),
                          (np.zeros((2, 16, 16, 4), np.float32), "(2, 16, 16, 4)")):
        with pytest.raises(ValueError, match=re.escape("images must be (B, H, H, 3) with H a multiple of patch size "
                                                       f"4, got {shape}") + "$"):
            model(images, t, class_labels=np.array([1, 2]))
    with pytest.raises(ValueError, match=re.escape("timesteps must be one value or one per image (2), got shape "
                                                   "(2, 1)")):  # a column of times is not (B,)
        model(x, t[:, None], class_labels=np.array([1, 2]))
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
    with pytest.raises(ValueError, match=re.escape("this model has no cross-attention (model.cross_attention_dim = 0); "
                                                   "do not pass encoder_hidden_states")):  # not ignored without a word
        model(x, t, class_labels=np.array([1, 2]), encoder_hidden_states=np.zeros((2, 6, width), np.float32))
    states = np.random.default_rng(0).standard_normal((2, 6, width)).astype(np.float32)
    np.testing.assert_array_equal(text_model(x, t, encoder_hidden_states=states.tolist()),  # a list: an AttributeError
                                  text_model(x, t, encoder_hidden_states=states))

    # Under jit only the labels' dtype is known: 1.7 was read as class 1, unseen.
    from flax import nnx

    jitted = nnx.jit(lambda model, labels: model(x, t, class_labels=labels))
    with pytest.raises(ValueError, match="class_labels must be integer ids, got dtype float32 under jit"):
        jitted(model, jnp.array([1.7, 5.0]))
    # Lists under jit are lists of traced scalars, which numpy cannot read (a TracerArrayConversionError).
    with pytest.raises(ValueError, match="class_labels must be integer ids, got dtype float32 under jit"):
        jitted(model, [1.7, 5.0])
    listed = nnx.jit(lambda model, images, times, labels: model(images, times, class_labels=labels))
    np.testing.assert_allclose(listed(model, list(x), [500.0, 500.0], [1, 2]),
                               model(x, t, class_labels=np.array([1, 2])), atol=1e-5)
    np.testing.assert_allclose(listed(model, x, (500.0, 500.0), (1, 2)),  # tuples as lists
                               model(x, t, class_labels=np.array([1, 2])), atol=1e-5)
    listed_text = nnx.jit(lambda model, states, mask: model(x, t, encoder_hidden_states=states,
                                                             encoder_attention_mask=mask))
    states, mask = np.ones((2, 6, width), np.float32), np.ones((2, 6), np.float32)
    np.testing.assert_allclose(listed_text(text_model, list(states), list(mask)),
                               text_model(x, t, encoder_hidden_states=states, encoder_attention_mask=mask), atol=1e-5)


def test_a_text_mask_is_taken_as_ones_and_zeros_in_an_array_or_a_list(models):
    """A list failed inside the attention kernel ('list' object has no attribute 'shape'); an
    additive mask (0 and -10000 or -inf), 2s or a NaN ran, giving other velocities without a word,
    in the model and in the sampler's sample; there a text uncond unlike cond failed inside jax."""
    model, _ = models["t2i_tiny"]
    rng = np.random.default_rng(0)
    images, times = rng.standard_normal((2, 16, 16, 3)).astype(np.float32), np.array([300.0, 700.0], np.float32)
    states = rng.standard_normal((2, 6, model.config.cross_attention_dim)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.float32)
    call = lambda mask: model(images, times, encoder_hidden_states=states, encoder_attention_mask=mask)
    expected = call(mask)
    assert np.abs(expected - model(images, times, encoder_hidden_states=states)).max() > 1e-2  # the mask matters
    for same in (mask.tolist(), mask.astype(bool), mask.astype(np.int64), jnp.asarray(mask, jnp.bfloat16)):
        np.testing.assert_array_equal(call(same), expected)
    for wrong, shown in (((1 - mask) * -10000, "[-10000.0]"), (np.where(mask > 0, 0, -np.inf), "[-inf]"),
                         (mask * 2, "[2.0]"), (np.where(mask > 0, 1, np.nan), "[nan]")):
        with pytest.raises(ValueError, match=re.escape("encoder_attention_mask must hold 1 for a caption's tokens and "
                                                       "0 for its padding (the tokenizer's attention_mask), got "
                                                       f"{shown}: the model makes the additive bias itself")):
            call(wrong)
    from pixelflow_jax.sampling.cascade import CascadeSampler, SamplingOptions

    noise = [jnp.zeros((2, side, side, 3)) for side in (8, 16, 32, 64)]
    uncond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
    additive = {**uncond, "encoder_attention_mask": np.where(mask > 0, 0, -np.inf)}
    for cond_and_uncond in ((additive, uncond), (uncond, additive)):  # the negative prompt's mask too
        with pytest.raises(ValueError, match=re.escape("encoder_attention_mask must hold 1 for a caption's tokens and "
                                                       "0 for its padding (the tokenizer's attention_mask), got [-inf]")):
            CascadeSampler(*models["t2i_tiny"]).sample(  # its stages run under jit, where values are not known
                noise[0], noise[1:], *cond_and_uncond, SamplingOptions.create(4, 1))
    # A guided step runs cond and uncond as one batch: a mask in one only failed in jax.tree.map, a
    # negative caption of another length in jnp.stack.
    sampler, cond = CascadeSampler(*models["t2i_tiny"]), {"encoder_hidden_states": states}
    with pytest.raises(ValueError, match=re.escape("cond and uncond must hold the same arguments (a guided step runs "
                                                   "them as one batch), got ['encoder_hidden_states'] and "
                                                   "['encoder_attention_mask', 'encoder_hidden_states']")):
        sampler.sample(noise[0], noise[1:], cond, uncond, SamplingOptions.create(4, 1))
    shorter = {"encoder_hidden_states": states[:, :4], "encoder_attention_mask": mask[:, :4]}
    with pytest.raises(ValueError, match=re.escape("uncond['encoder_hidden_states'] must have cond's shape (2, 6, 20) "
                                                   "(a guided step runs them as one batch), got (2, 4, 20): pad both")):
        sampler.sample(noise[0], noise[1:], uncond, shorter, SamplingOptions.create(4, 1))
    unguided = sampler.sample(noise[0], noise[1:], uncond, {}, SamplingOptions.create(4, 1, cfg_scale=1.0))
    assert unguided.shape == (2, 64, 64, 3)  # no guided step: uncond is not read


def test_forward_mode_differentiation_runs_as_reverse_mode_does(models):
    """jax.jvp, jax.jacfwd and jax.hessian of the model (attention 'xla', as 'auto' is on a CPU)
    failed with jax's "can't apply forward-mode autodiff (jvp) to a custom_vjp function" (GELU's
    and RoPE's custom backward passes, now jvp rules): they run, and agree with reverse mode."""
    model, _ = models["c2i_tiny"]
    images, labels = jnp.ones((1, 8, 8, 3)), jnp.array([3])
    velocity = lambda images: model(images, 300.0, class_labels=labels)
    jacobian = jax.jacrev(velocity)(images)
    _, tangent = jax.jvp(velocity, (images,), (images,))
    largest = np.abs(jacobian).max()  # float32 sums in another order: within 1e-5 of it
    np.testing.assert_allclose(tangent, jnp.tensordot(jacobian, images, axes=4), rtol=0,
                               atol=1e-5 * np.abs(tangent).max())
    np.testing.assert_allclose(jax.jacfwd(velocity)(images), jacobian, rtol=0, atol=1e-5 * largest)
    hessian = jax.hessian(lambda images: velocity(images).sum())(images)
    assert hessian.shape == (1, 8, 8, 3) * 2 and np.isfinite(hessian).all()
    reverse_over_reverse = jax.jacrev(jax.jacrev(lambda images: velocity(images).sum()))(images)
    np.testing.assert_allclose(hessian, reverse_over_reverse, rtol=0, atol=1e-5 * np.abs(hessian).max())
    from pixelflow_jax.model import TransformerBlock

    def failing_block(*_, **__):
        raise TypeError("a block's own TypeError")

    with pytest.MonkeyPatch.context() as patch:  # any other TypeError from the blocks is jax's or the user's to read
        patch.setattr(TransformerBlock, "__call__", failing_block)
        with pytest.raises(TypeError, match="^a block's own TypeError"):
            velocity(images)


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
    import pixelflow_jax
    from pixelflow_jax.sampling.cascade import CascadeSampler

    sampler = CascadeSampler(*models["c2i_tiny"])
    for labels, message in (([], "nothing to generate"), (["goldfish"], "generate takes class ids in .*, not text such as 'goldfish'"),
                            ([1.5], "labels must be whole class ids"), (["3"], "labels must be whole class ids"),
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
    for prompts in (["a red disk"], "a red disk", np.array(["a red disk", "a ring"]), [3, "a red disk"]):
        # (was 'labels must be whole class ids, got 'a red disk' at index 0', as if an id was mistyped)
        with pytest.raises(ValueError, match=re.escape("this model is class-conditional: generate takes class ids in "
                                                       "[0, 1000), not text such as 'a red disk' (prompts are for a "
                                                       "text-conditional model's generate_from_prompts(prompt_encoder, "
                                                       "prompts))")):
            sampler.generate(prompts, steps_per_stage=1)
    model, config = models["c2i_tiny"]
    # A user's own model, PixelFlow(ModelConfig(...)), has no load_model config: the error named none other.
    with pytest.raises(ValueError, match=re.escape("got a ModelConfig; for a model of your own, pixelflow_jax."
                                                   "CheckpointConfig(model=model.config, resolution=..., num_stages=..., "
                                                   "num_train_timesteps=...) as it was trained")):
        CascadeSampler(model, model.config)
    own = pixelflow_jax.CheckpointConfig(model=model.config, resolution=32, num_stages=3, num_train_timesteps=500)
    assert CascadeSampler(model, own).generate([1], steps_per_stage=1).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="config is another model's"):
        CascadeSampler(model, models["t2i_tiny"][1])
    with pytest.raises(ValueError, match=re.escape("model must be the PixelFlow load_model returns (model, config = "
                                                   "load_model(path)), got a str")):  # an AttributeError
        CascadeSampler("checkpoints/pixelflow_xl_c2i", models["c2i_tiny"][1])
    with pytest.raises(ValueError, match=r"prompt_encoder must be a PromptEncoder, got '/tmp/t5': build one"):
        CascadeSampler(*models["t2i_tiny"]).generate_from_prompts("/tmp/t5", ["a cat"], steps_per_stage=1)

    class Encoder:  # never reached: each call below is refused first
        def encode(self, prompts):
            raise AssertionError("encoded")

    with pytest.raises(ValueError, match=r"this model is class-conditional: use generate\(labels\)"):
        sampler.generate_from_prompts(Encoder(), ["a cat"], steps_per_stage=1)
    with pytest.raises(ValueError, match="negative_prompt must be a string, got None"):
        CascadeSampler(*models["t2i_tiny"]).generate_from_prompts(Encoder(), ["a cat"], negative_prompt=None,
                                                                  steps_per_stage=1)


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
    with pytest.raises(ValueError, match=re.escape("prompt_encoder gives embeddings of shape (1, 16, 24) for 1 "
                                                   "prompts; this model's cross-attention takes (prompts, tokens, "
                                                   "20): use the text encoder the model was trained with")):
        sampler.generate_from_prompts(Encoder(24), ["a red disk"], steps_per_stage=1)

    class PooledEncoder(Encoder):  # one embedding per prompt (a sentence encoder), of the right width
        def encode(self, prompts):
            return np.zeros((len(prompts), self.width), np.float32), np.ones((len(prompts), 1), np.float32)

    with pytest.raises(ValueError, match=re.escape("prompt_encoder gives embeddings of shape (1, 20) for 1 prompts; "
                                                   "this model's cross-attention takes (prompts, tokens, 20)")):
        sampler.generate_from_prompts(PooledEncoder(20), ["a red disk"], steps_per_stage=1)



def test_generate_from_prompts_names_a_prompt_encoded_past_the_length_the_model_trained_with(models, caplog):
    """A run records the length its captions were cut to (load_model's config.max_text_tokens); a
    PromptEncoder left at the release's 512 gave a longer prompt all its tokens without a word, a
    text the model never read in training. A prompt within that length encodes alike either way."""
    import dataclasses

    from pixelflow_jax.sampling.cascade import CascadeSampler

    class Encoder:  # a mask of one token per word, and </s>, as T5 encodes them
        def encode(self, prompts):
            mask = np.zeros((len(prompts), 16), np.float32)
            for row, prompt in enumerate(prompts):
                mask[row, :len(prompt.split()) + 1] = 1
            return np.zeros((len(prompts), 16, 20), np.float32), mask

    model, config = models["t2i_tiny"]
    sampler = CascadeSampler(model, dataclasses.replace(config, max_text_tokens=4))
    sampler.generate_from_prompts(Encoder(), ["a red disk"], steps_per_stage=1)  # 4 tokens: as in training
    assert "trained with" not in caplog.text
    long = "a red disk on a grey ground"
    sampler.generate_from_prompts(Encoder(), [long, "a red disk"], steps_per_stage=1)
    assert caplog.text.count("trained with") == 1
    assert (f"prompt {long!r} is encoded as 8 tokens, past the 4 this model trained with (its captions were cut "
            "there), so it reads text it never learned from: encode prompts with PromptEncoder(folder, "
            "max_length=4), as training did") in caplog.text
    sampler.generate_from_prompts(Encoder(), [long], steps_per_stage=1)
    assert caplog.text.count("trained with") == 1  # once per prompt, as the encoder warns
    CascadeSampler(*models["t2i_tiny"]).generate_from_prompts(Encoder(), [long], steps_per_stage=1)
    assert caplog.text.count("trained with") == 1  # a release checkpoint records no length

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


def test_a_sampling_job_from_python_needs_no_eval_section(converted, tmp_path, monkeypatch):
    """A sampling config built in Python without an `eval` section (sampling reads it only to
    evaluate its samples) failed in the checks with AttributeError: 'eval'."""
    from pixelflow_jax.sampling import sample_run

    config = c2i_config(**{"sample.checkpoint": converted["c2i_tiny"]})
    del config["eval"]
    workdirs = []
    monkeypatch.setattr(sample_run, "_sample", lambda config, workdir: workdirs.append(workdir))
    sample_run.run(config, str(tmp_path / "samples"))
    assert workdirs == [str(tmp_path / "samples")]


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
    # Its `samples` argument, as the config's field: it was read as given ('~/other.npz is not found').
    for given in ("~/other.npz", pathlib.Path("~/other.npz")):
        evaluate.run(c2i_config(**paths), "~/evals", samples=given)
        assert evaluated[-1][0] == str(tmp_path / "home" / "other.npz")
    with pytest.raises(ConfigError, match=r"^samples: expected a path \(a string or os.PathLike\), got "
                                                   r"b'other.npz'"):  # was "'bytes' object has no attribute 'seek'"
        evaluate.run(c2i_config(**paths), "~/evals", samples=b"other.npz")
    # The images themselves, where a path is asked for: "The truth value of an array ... is ambiguous".
    images = np.zeros((8, 4, 4, 3), np.uint8)
    refusal = (r"samples: expected a path \(a string or os.PathLike\), got an array of shape \(8, 4, 4, 3\) \(uint8\): "
               r"save it to a file, e.g. np.savez\(path, images\), and pass that file's path$")
    for call in (lambda: evaluate.run(c2i_config(**paths), "~/evals", samples=images),
                 lambda: evaluate.run(c2i_config(**paths), "~/evals", samples=jnp.asarray(images)),
                 lambda: evaluate.run(c2i_config(**{**paths, "eval.samples": images}), "~/evals")):
        with pytest.raises(ConfigError, match=refusal):
            call()
    # A pathlib.Path in a config built as a dict: "Could not override field 'reference' ... cannot be casted".
    evaluate.run(c2i_config(**{**paths, "eval.reference": pathlib.Path("~/other_reference.npz")}), "~/evals")
    # A frozen config (the job works on its own copy): "FrozenConfigDict is immutable. Cannot call __setitem__()".
    frozen = ml_collections.FrozenConfigDict(c2i_config(**{**paths, "eval.samples": "~/frozen.npz"}))
    evaluate.run(frozen, "~/evals")
    assert evaluated[-1][0] == str(tmp_path / "home" / "frozen.npz") and frozen.eval.samples == "~/frozen.npz"


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
    with pytest.raises(CheckpointError, match=rf"^attention backend '{attention}' runs on {platforms}"):
        load_model("/nowhere/checkpoint", attention=attention)  # before the path (a Hub download) is resolved
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


def test_load_model_reports_a_checkpoint_it_cannot_reach_as_a_checkpoint_error(monkeypatch, converted):
    """The README's errors to catch: a checkpoint that cannot be read raises CheckpointError. A
    bucket that could not be reached (no network, no credentials) raised storage.StorageError, an
    OSError, which `except pixelflow_jax.CheckpointError` let through."""
    from pixelflow_jax import api

    unreachable = ("gs://bucket/run/run_config.json: ClientConnectorDNSError: Cannot connect to host "
                   "storage.googleapis.com:443 (check the network, that the bucket exists, and the credentials)")

    def no_network(*_):
        raise storage.StorageError(unreachable)

    monkeypatch.setattr(api, "find_run_step", no_network)
    with pytest.raises(CheckpointError, match=f"^{re.escape(unreachable)}$"):
        load_model("gs://bucket/run")
    monkeypatch.undo()
    monkeypatch.setattr(api, "restore_params", no_network)  # while the weights are read
    with pytest.raises(CheckpointError, match=f"^{re.escape(unreachable)}$"):
        load_model(converted["c2i_tiny"])


def test_load_model_of_a_model_pt_reads_its_release_folder(tmp_path):
    _, config = load_model(os.path.join(fixture_dir("c2i_tiny"), "model.pt"))
    assert config.resolution == 64
    file_as_folder = os.path.join(fixture_dir("c2i_tiny"), "model.pt/")  # a shell's completion
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {file_as_folder} does not exist (the / at its "
                                                        f"end names a folder, and {file_as_folder[:-1]} is a file: "
                                                        "drop the /)")):
        load_model(file_as_folder)
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; checkpoints are folders"):
        load_model(str(tmp_path / "weights.pt"))
    with pytest.raises(CheckpointError, match=f"^{os.devnull} is not a checkpoint: expected a training run"):
        load_model(os.devnull)  # neither file nor folder: was "holds model.pt without the config.yaml"


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
    shards = tmp_path / "shards"  # the last one was offered as the newest step: half the weights
    shards.mkdir()
    for n in (1, 2):
        (shards / f"model-0000{n}-of-00002.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"it holds model-00001-of-00002.bin, model-00002-of-00002.bin, shards "
                                              r"of one state dict, each only part of the weights: join them"):
        resolve_checkpoint(str(shards))
    release = tmp_path / "release"  # a file of a checkpoint names that checkpoint
    shutil.copytree(fixture_dir("c2i_tiny"), release)
    conversion = shutil.copytree(converted["c2i_tiny"], tmp_path / "conversion")
    (conversion / "model.pt").write_bytes(b"x")  # a model.pt with no config.yaml beside it: not a release's
    for folder, file in ((release, "golden.npz"), (converted["c2i_tiny"], "pixelflow_config.json"),
                         (conversion, "model.pt")):
        with pytest.raises(CheckpointError, match=f"is a file; checkpoints are folders; it lies inside the "
                                                  f"checkpoint {folder}: pass that"):
            resolve_checkpoint(os.path.join(folder, file))


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
    for blocks in (shapes[1:3], shapes[1:] + [(2, 128, 128, 3)]):  # a stage's noise too few or too many
        with pytest.raises(ValueError, match=r"need block noise for stages 1..3 and steps for 4 stages"):
            sampler.sample(jnp.zeros(shapes[0]), [jnp.zeros(s) for s in blocks], *labels, options)
    with pytest.raises(ValueError, match=r"need block noise for stages 1..3 and steps for 4 stages"):
        sampler.sample(jnp.zeros(shapes[0]), [jnp.zeros(s) for s in shapes[1:]], *labels,
                       SamplingOptions.create(3, 1))
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


def test_a_mesh_of_explicit_axes_is_named_with_its_fix():
    """jax.make_mesh's axes are Explicit unless told otherwise. Under such a mesh, or with an input or
    a parameter placed on one, the model failed deep inside jax (a ShardingTypeError naming a
    reshape, a scan carry of another type); images placed whole on it moved nnx.jit's parameters
    there, and the next call under an Auto mesh failed. A mesh of Auto axes splits the batch."""
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from pixelflow_jax import PixelFlow

    model = PixelFlow(ModelConfig(num_attention_heads=2, attention_head_dim=16, depth=1, num_classes=10),
                      rngs=nnx.Rngs(0))
    images, times, labels = np.ones((8, 16, 16, 3), np.float32), np.full((8,), 300.0, np.float32), np.arange(8)
    forward = nnx.jit(lambda model, images, times, labels: model(images, times, class_labels=labels))
    expected = forward(model, images, times, labels)
    explicit = jax.make_mesh((8,), ("data",))
    assert explicit.axis_types == (AxisType.Explicit,)  # jax's default, as a user's mesh has it
    on_explicit = lambda value, spec=P("data"): jax.device_put(value, NamedSharding(explicit, spec))
    fix = re.escape("build the mesh with axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names)")
    with jax.set_mesh(explicit):
        for call in (lambda: forward(model, images, times, labels), lambda: model(images, times, class_labels=labels)):
            with pytest.raises(ValueError, match=rf"^the mesh in context has Explicit axes \['data'\].*{fix}"):
                call()
    for name, arguments in (("images", (on_explicit(images), times, labels)),
                            ("images", (on_explicit(images, P()), times, labels)),  # whole on every device
                            ("timesteps", (images, on_explicit(times), labels)),
                            ("class_labels", (images, times, on_explicit(labels)))):
        with pytest.raises(ValueError, match=rf"^{name} lies on a mesh with Explicit axes \['data'\].*{fix}"):
            forward(model, *arguments)
    text_model = PixelFlow(ModelConfig(num_attention_heads=2, attention_head_dim=16, depth=1, num_classes=0,
                                       cross_attention_dim=8), rngs=nnx.Rngs(0))
    states, mask = np.ones((8, 6, 8), np.float32), np.ones((8, 6), np.float32)
    text_forward = nnx.jit(lambda model, states, mask: model(images, times, encoder_hidden_states=states,
                                                              encoder_attention_mask=mask))
    for name, arguments in (("encoder_hidden_states", (on_explicit(states), mask)),
                            ("encoder_attention_mask", (states, on_explicit(mask)))):
        with pytest.raises(ValueError, match=rf"^{name} lies on a mesh with Explicit axes \['data'\].*{fix}"):
            text_forward(text_model, *arguments)
    split_kernel = nnx.clone(model)
    split_kernel.patch_embed.proj.kernel.set_value(on_explicit(model.patch_embed.proj.kernel[...], P(None, "data")))
    with pytest.raises(ValueError, match=r"^parameter patch_embed.proj.kernel lies on a mesh with Explicit axes"):
        forward(split_kernel, images, times, labels)
    auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(auto):
        split_batch = forward(model, jax.device_put(images, NamedSharding(auto, P("data"))), times, labels)
    assert split_batch.sharding.spec == P("data")
    np.testing.assert_allclose(split_batch, expected, atol=1e-6)
    # Inside jax.shard_map each device runs the model on its own images, under Manual axes: neither Explicit.
    graphdef, state = nnx.split(model)
    per_device = lambda state, images, times, labels: nnx.merge(graphdef, state)(images, times, class_labels=labels)
    with jax.set_mesh(auto):
        mapped = jax.jit(jax.shard_map(per_device, mesh=auto, in_specs=(P(), P("data"), P("data"), P("data")),
                                       out_specs=P("data")))(state, images, times, labels)
    np.testing.assert_allclose(mapped, expected, atol=1e-6)


def test_inputs_spread_over_several_processes_are_left_to_the_job_that_holds_them(models, monkeypatch):
    """A text mask, class labels or timesteps split over several processes cannot be read on one
    (np.asarray fails there), so the model and CascadeSampler.sample leave their values unchecked: the
    model called eagerly on such timesteps or labels failed in that read. Faked here: every jax array
    is marked not fully addressable, and holds values the checks would refuse."""
    from pixelflow_jax.model import checked_text_mask, readable_here
    from pixelflow_jax.sampling.cascade import CascadeSampler, SamplingOptions
    from test_sampling import recorded_stages

    mask, labels = jnp.full((2, 6), -jnp.inf), jnp.array([5000, 5000])
    assert readable_here(mask) and readable_here(np.ones(3)) and not readable_here(None)
    monkeypatch.setattr(type(mask), "is_fully_addressable", property(lambda self: False))
    assert not readable_here(mask) and checked_text_mask(mask, (2, 6)) is mask
    model, _ = models["c2i_tiny"]  # called eagerly: its timesteps and labels unread too
    assert model(np.zeros((2, 8, 8, 3), np.float32), jnp.full((2,), jnp.nan), class_labels=labels).shape == (2, 8, 8, 3)
    cond, uncond = {"class_labels": np.array([1, 2])}, {"class_labels": labels}
    sampler = CascadeSampler(*models["c2i_tiny"])
    assert len(recorded_stages(sampler, monkeypatch, SamplingOptions.create(4, 1), cond, uncond)) == 4  # labels unread


def test_an_attention_kernel_the_platform_lacks_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                             "--config.model.attention=cudnn"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: --config.model.attention: attention backend 'cudnn' runs on" in \
        result.stderr, result.stderr
    assert not workdir.exists()


def test_a_job_started_from_python_names_a_misspelt_field_or_a_config_of_another_type(tmp_path):
    """config.sample.num_imags = 8 (a typo: ConfigDict adds the field) sampled the 16 images of
    num_images without a word, where main.py refuses a field no mode reads; a plain dict (the
    config's to_dict()) failed on "'dict' object has no attribute 'sample'"."""
    from configs import t2i
    from pixelflow_jax import demo_app, inspect_model
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.training import train

    misspelt = c2i_config()
    misspelt.sample.num_imags = 8
    text = t2i.get_config("tiny")
    text.train.lr_schedul = "cosine"
    jobs = (sample_run.run, evaluate.run, inspect_model.run, train.train, demo_app.run)
    for job in jobs:
        with pytest.raises(ConfigError, match=re.escape("the config has fields that no mode reads: sample.num_imags "
                                                        "(meant sample.num_images?)")):
            job(misspelt, str(tmp_path / "job"))
        with pytest.raises(ConfigError, match=re.escape("the config has fields that no mode reads: train.lr_schedul "
                                                        "(meant train.lr_schedule?)")):
            job(text, str(tmp_path / "job"))
        with pytest.raises(ConfigError, match=re.escape("config must be an ml_collections.ConfigDict, as "
                                                        "configs.c2i.get_config() returns, got a dict")):
            job(c2i_config().to_dict(), str(tmp_path / "job"))
    assert os.listdir(tmp_path) == []
    # A config of just what its job reads (an evaluation's eval section) lacks fields, and is no misspelling.
    partial = ml_collections.ConfigDict(dict(eval=dict(c2i_config().eval)))
    partial.eval.samples_typo = "x.npz"
    with pytest.raises(ConfigError, match=re.escape("no mode reads: eval.samples_typo (meant eval.samples?)")):
        validation.check_fields(partial)
    del partial.eval["samples_typo"]
    validation.check_fields(partial)
    # ...but lacking a field its job reads was an AttributeError ("'batch_size'") from deep inside the job.
    from pixelflow_jax.evaluation import evaluate

    for lacking, config in (("eval.batch_size, which --mode=eval reads: set it",
                             dict(eval=dict(reference="r.npz", inception_weights="w.pth"))),
                            ("eval.reference, eval.inception_weights, eval.batch_size, which --mode=eval reads: set "
                             "them", {})):
        with pytest.raises(ConfigError, match=re.escape(f"the config lacks {lacking} (configs.c2i.get_config().eval "
                                                        "holds every field, ")):
            evaluate.run(ml_collections.ConfigDict(config), str(tmp_path / "job"), samples="s.npz")
    # eval.samples may be left out: the workdir's own samples.npz is evaluated, here none (not AttributeError)
    with pytest.raises(ValueError, match=r"^set --config.eval.samples: the samples and the reference are .npz"):
        evaluate.run(ml_collections.ConfigDict(dict(eval=dict(reference="r.npz", inception_weights="w.pth",
                                                              batch_size=8))), str(tmp_path / "job"))
    assert os.listdir(tmp_path) == []


def test_a_job_called_again_by_a_data_worker_importing_an_unguarded_script_names_the_guard(tmp_path, monkeypatch):
    """grain's data workers (data.num_workers > 0, the demo configs') are spawned, and each imports
    the main script again: a script calling train() outside `if __name__ == "__main__":` trained
    again in the worker, which found its parent's workdir lock and told the user to wait for "another
    training run" or delete its lock; the parent then failed on grain's "Worker process was
    terminated unexpectedly". (Python's own message for this case was never reached.)"""
    import multiprocessing

    from pixelflow_jax import demo_app, inspect_model
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.training import train

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)  # as spawn sets it
    for job, mode in ((train.train, "train"), (sample_run.run, "sample"), (evaluate.run, "eval"),
                      (inspect_model.run, "inspect"), (demo_app.run, "demo"), (demo_app.DemoSampler, "demo")):
        with pytest.raises(RuntimeError, match=re.escape(f"a {mode} job was started by a process importing the main "
                                                         "script again (a data worker of data.num_workers > 0 runs "
                                                         "the script's top level): start a script's jobs under "
                                                         '`if __name__ == "__main__":`')):
            job(c2i_config(), str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []


def test_a_training_job_with_loader_workers_from_a_script_without_a_main_guard_is_refused_before_it_starts(tmp_path):
    """The worker's own refusal (above) reached the user inside grain's tracebacks, after the parent
    had made its workdir, and the parent's last line was grain's 'Worker process was terminated
    unexpectedly'. The parent now refuses at once, naming the line, the guard and the setting."""
    script = tmp_path / "train_demo.py"
    script.write_text(f"""
from configs import c2i
from pixelflow_jax.training import train

config = c2i.get_config("tiny")
config.data.num_workers = 2
config.train.num_steps = 1
train.train(config, {str(tmp_path / "run")!r})
""")
    one_device = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}  # batch 8 divides
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**one_device, "PYTHONPATH": REPO})
    assert result.returncode == 1 and "Worker process" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"pixelflow_jax.data.sources.DataError: a train job with data.num_workers=2 was started from the top-level "
        f"code of {script} (line 8), outside `if __name__ == \"__main__\":`: each loader worker process starts by "
        "running that script again (Python's spawn start method), which would run that code again in it; put the "
        "script's top-level code under that guard, or set config.data.num_workers=0"), result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["train_demo.py"]


def test_a_users_own_configs_package_beside_a_notebook_is_not_taken_for_this_checkouts(tmp_path, monkeypatch):
    """A notebook's folder with a configs/ package of its own (its c2i.py copied from this one's, as
    the README advises, and no t2i.py) shadowed this checkout's: each job failed on "cannot import
    name 't2i' from 'configs'", where only this checkout's configs/ lists the fields to compare with."""
    from pixelflow_jax import validation

    config = c2i_config()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    shutil.copy(os.path.join(REPO, "configs", "c2i.py"), tmp_path / "configs" / "c2i.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("configs", "configs.c2i", "configs.t2i"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert validation.job_config(config, "sample").to_dict() == config.to_dict()
    monkeypatch.undo()  # this checkout's configs/ again: a misspelt field is named
    config.sample.num_imags = 8
    with pytest.raises(ConfigError, match=re.escape("sample.num_imags (meant sample.num_images?)")):
        validation.job_config(config, "sample")
