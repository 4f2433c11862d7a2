"""The T5 encoder and tokenizer against Hugging Face transformers on a tiny random T5 folder."""

import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.checkpoints.checkpoint import CheckpointError

SENTENCES = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
             "a bowl of fruit, oil painting", "sunset over mountains with clouds", "a small dog running in the park"]
VOCAB = 40
PROMPTS = ["a cat on the moon", "", "  two   spaces  ", "Zebra!",
           "an astronaut riding a horse on the moon with a red chair and a dog in the park at sunset"]


def write_tiny_t5_folder(folder: str, d_model: int = 32) -> None:
    """A seq2seq T5 (decoder included, as google/flan-t5-xl ships) saved by transformers, with a
    sentencepiece model trained here on a few sentences (pad 0, </s> 1, unk 2, as T5's)."""
    import sentencepiece
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model.getvalue())


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_t5"))
    write_tiny_t5_folder(folder)
    return folder


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_tokenizer_equals_transformers_autotokenizer(t5_folder):
    """Padding to max_length, </s> appended, truncation keeping </s>, whitespace runs, unknowns."""
    from transformers import AutoTokenizer

    from pixelflow_jax.text.prompts import T5Tokenizer

    ids, mask = T5Tokenizer(t5_folder, max_length=16)(PROMPTS)
    reference = AutoTokenizer.from_pretrained(t5_folder, extra_ids=0)(
        PROMPTS, padding="max_length", max_length=16, truncation=True, add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(ids, reference["input_ids"])
    np.testing.assert_array_equal(mask, reference["attention_mask"])
    assert ids.dtype == mask.dtype == np.int32  # as the step's empty-prompt tokens (TextConditioning)
    assert mask[1].sum() == 1 and ids[1, 0] == 1  # the empty prompt is </s> alone
    assert mask[4].all() and ids[4, -1] == 1  # truncated, still ending in </s>


@pytest.mark.parametrize("param_dtype,tolerance", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_encoder_equals_transformers_t5_encoder_model(t5_folder, param_dtype, tolerance):
    """Through our converter; 40 tokens exceed relative_attention_max_distance (20), so the
    logarithmic position buckets are used; the second row is half padding."""
    import torch
    from transformers import T5EncoderModel

    from pixelflow_jax.text.t5_convert import load_t5_encoder

    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (2, 40))
    mask = np.ones((2, 40), np.int64)
    mask[1, 22:], ids[1, 22:] = 0, 0
    reference = T5EncoderModel.from_pretrained(t5_folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    dtype = "bfloat16" if param_dtype == "bfloat16" else "float32"
    encoder = load_t5_encoder(t5_folder, dtype=dtype, param_dtype=param_dtype)
    got = encoder(ids, mask)
    real = mask.astype(bool)  # padded positions' outputs are never attended to downstream
    assert relative_error(np.asarray(got, np.float32)[real], expected.numpy()[real]) <= tolerance


def test_prompt_encoder_masks_and_shapes(t5_folder, caplog):
    from pixelflow_jax.text.prompts import PromptEncoder

    encoder = PromptEncoder(t5_folder, max_length=24)
    embeddings, mask = encoder.encode(["a cat", ""])
    assert embeddings.shape == (2, 24, 32) and mask.shape == (2, 24)
    assert mask.dtype == jnp.float32  # as the transformer's cross-attention takes it
    assert mask.sum(axis=1).tolist() == [float(len(encoder.tokenizer.processor.encode("a cat")) + 1), 1.0]
    assert "does not know" not in caplog.text and "was cut" not in caplog.text
    encoder.encode([PROMPTS[4]])  # more pieces than 24 tokens hold
    assert f"prompt {PROMPTS[4]!r} is longer than 24 tokens and was cut there" in caplog.text
    encoder.encode(["a cat \U0001f98a"])  # an emoji: read as <unk>, which says nothing to the model
    assert "prompt 'a cat \U0001f98a' holds text the tokenizer does not know, read as <unk>" in caplog.text
    encoder.encode(p for p in ["a cat \U0001f98a", PROMPTS[4]])  # a job's next batches: each prompt warned of once
    assert caplog.text.count("prompt 'a cat \U0001f98a' holds text") == caplog.text.count(" was cut there") == 1


def test_a_long_prompt_with_unknown_text_is_logged_once_and_shortened_visibly(t5_folder, caplog):
    """A demo page's long prompt holding an emoji was logged twice, 200 characters each time (once
    as cut, once as holding unknown text), its shortening not shown."""
    import logging

    from pixelflow_jax.text.prompts import T5Tokenizer, tokenize_with_warnings

    long = "\U0001f98a " + " ".join(["a cat on the moon"] * 30)  # the emoji within the tokens read
    with caplog.at_level(logging.WARNING):
        tokenize_with_warnings(T5Tokenizer(t5_folder, 24), [long, long], set())
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"prompt {long[:200] + '...'!r} is longer than 24 tokens and was cut there (the text length: "
                      "max_text_tokens / max_length), and holds text the tokenizer does not know, read as <unk> (the "
                      "model learns nothing from it)"], logged

def test_a_logged_prompt_is_shortened_only_past_200_characters_and_then_says_so():
    from pixelflow_jax.text.prompts import shortened

    assert shortened("a" * 200) == repr("a" * 200)
    assert shortened("a" * 201) == repr("a" * 200 + "...")


def test_jobs_encode_prompts_in_float32_whatever_the_model_dtype(t5_folder):
    """The release encodes with autocast off; bfloat16 compute would move flan-t5-xl's embeddings by 2e-2."""
    import ml_collections

    from pixelflow_jax.config import matmul_precision
    from pixelflow_jax.text.prompts import PromptEncoder, prompt_encoder_for

    sample = ml_collections.ConfigDict(dict(text_encoder=t5_folder, max_text_tokens=24,
                                            text_encoder_param_dtype="bfloat16"))
    encoder = prompt_encoder_for(sample, cross_attention_dim=32)  # for a bfloat16 model, as sampling and the demo
    assert encoder.tokenizer.max_length == 24  # sample.max_text_tokens
    assert {leaf.dtype for leaf in jax.tree.leaves(encoder._params)} == {jnp.dtype(jnp.bfloat16)}  # as asked
    embeddings, _ = encoder.encode(["a cat"])
    assert embeddings.dtype == np.float32
    # ... with float32 matmuls (GPUs default to TF32, TPUs to bfloat16 passes; a CPU shows it in the HLO)
    ids, mask = encoder.tokenizer(["a cat"])
    with matmul_precision(encoder.dtype):  # as encode() lowers it
        assert "HIGHEST" in encoder._encode.lower(encoder._params, ids, mask).as_text()
    reference, _ = PromptEncoder(t5_folder, max_length=24, param_dtype="bfloat16", dtype="bfloat16").encode(["a cat"])
    assert reference.dtype != np.float32  # the test can tell the two apart
    as_jnp, _ = PromptEncoder(t5_folder, max_length=24, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16).encode(["a cat"])
    np.testing.assert_array_equal(np.asarray(as_jnp), np.asarray(reference))  # as load_model takes jnp dtypes
    with pytest.raises(ValueError, match="dtype must be one of"):  # T5 v1.1 overflows in float16
        PromptEncoder(t5_folder, dtype="float16")


def test_a_second_prompt_encoder_of_the_same_t5_reuses_its_compiled_encoder(t5_folder):
    """Each text sampling job (and a notebook's every PromptEncoder) compiled the whole encoder
    again: minutes for flan-t5-xl on some platforms."""
    from pixelflow_jax.text.prompts import PromptEncoder
    from test_sampling import counting_lowerings

    expected, _ = PromptEncoder(t5_folder, max_length=20).encode(["a cat", "the moon"])
    with counting_lowerings() as compiled:
        again, _ = PromptEncoder(t5_folder, max_length=20).encode(["a cat", "the moon"])
    assert compiled == []
    np.testing.assert_array_equal(again, expected)


def test_prompts_encode_under_another_mesh_in_context(t5_folder):
    """The sampling job encodes prompts inside its own mesh, which on several processes spans
    devices the encoder's parameters are not on (here: a 4-device mesh against the encoder's 8)."""
    from pixelflow_jax.text.prompts import PromptEncoder

    encoder = PromptEncoder(t5_folder, max_length=24)
    expected, _ = encoder.encode(["a cat", "the moon"])
    with jax.set_mesh(jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])):
        embeddings, mask = encoder.encode(["a cat", "the moon"])
    np.testing.assert_array_equal(np.asarray(embeddings), np.asarray(expected))
    assert np.asarray(mask).shape == (2, 24)


def test_converter_is_strict_and_names_the_problem(t5_folder, tmp_path):
    from pixelflow_jax.text.t5_convert import load_t5_encoder, read_encoder_state_dict

    state = read_encoder_state_dict(t5_folder)
    assert not any(k.startswith("decoder.") for k in state)  # the decoder is skipped
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(t5_folder):
        os.link(os.path.join(t5_folder, name), broken / name)
    with open(broken / "config.json") as f:
        config = json.load(f)
    os.remove(broken / "config.json")
    for key, value, expected in (
            ("num_layers", 3, r"missing encoder\.block\.2\.layer\.0\.layer_norm\.weight"),
            ("num_layers", 1, r"\n  9 encoder tensors this architecture does not use, e\.g\. \['encoder\.block\.1\."),
            ("d_ff", 64, r"blocks\.wi_0\.kernel: checkpoint shape \(2, 32, 48\), config.json says \(2, 32, 64\)")):
        (broken / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=expected):
            load_t5_encoder(str(broken))
    # a config.json without model_type (written before transformers recorded it) is a T5's
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    assert load_t5_encoder(str(broken)).config == load_t5_encoder(t5_folder).config
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_t5_encoder(str(tmp_path))


def test_pytorch_model_bin_folder_loads_the_same_encoder(t5_folder, tmp_path):
    """The same weights as pytorch_model.bin (the older Hugging Face format) instead of safetensors."""
    import shutil

    import jax
    import torch
    from flax import nnx

    from pixelflow_jax.text.t5_convert import load_t5_encoder, read_encoder_state_dict

    folder = tmp_path / "bin"
    shutil.copytree(t5_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({k: torch.tensor(v) for k, v in read_encoder_state_dict(t5_folder).items()},
               folder / "pytorch_model.bin")
    expected = nnx.to_pure_dict(nnx.state(load_t5_encoder(t5_folder), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(load_t5_encoder(str(folder)), nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_untied_lm_head_and_the_decoder_are_skipped_in_either_weight_format(t5_folder, tmp_path):
    """flan-t5-xl's lm_head is not tied to its embedding, so its weights hold lm_head.weight (the
    fixture's tied one is not saved); like the decoder's tensors, it is not the encoder's, in
    model.safetensors as in pytorch_model.bin."""
    import shutil

    import torch
    from safetensors.numpy import load_file, save_file

    from pixelflow_jax.text.t5_convert import encoder_state_dict, load_t5_encoder

    seq2seq = load_file(os.path.join(t5_folder, "model.safetensors"))
    assert any(key.startswith("decoder.") for key in seq2seq)
    seq2seq["lm_head.weight"] = seq2seq["shared.weight"] + 1
    expected = encoder_state_dict(load_t5_encoder(t5_folder))
    writers = {"model.safetensors": lambda path: save_file(seq2seq, path),
               "pytorch_model.bin": lambda path: torch.save({k: torch.from_numpy(v) for k, v in seq2seq.items()}, path)}
    for name, write in writers.items():
        folder = tmp_path / name.split(".")[-1]
        shutil.copytree(t5_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        write(str(folder / name))
        got = encoder_state_dict(load_t5_encoder(str(folder)))
        assert got.keys() == expected.keys(), name
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def linked_copy(source: str, folder) -> str:
    """A copy of a T5 folder whose files are hard links, to damage one file at a time."""
    os.makedirs(folder)
    for name in os.listdir(source):
        os.link(os.path.join(source, name), os.path.join(folder, name))
    return str(folder)


def replaced(folder: str, name: str, content: bytes) -> None:
    if os.path.exists(os.path.join(folder, name)):
        os.remove(os.path.join(folder, name))  # a hard link: the shared fixture stays whole
    with open(os.path.join(folder, name), "wb") as f:
        f.write(content)


def test_a_diffusers_pipelines_text_encoder_is_told_where_its_tokenizer_is(t5_folder, tmp_path):
    """A diffusers pipeline (PixArt's, SD3's) keeps T5's spiece.model in a folder beside its text
    encoder's (tokenizer/, tokenizer_3/ beside text_encoder_3/): given either, the error was only to
    pass 'the Hugging Face T5 folder as downloaded'."""
    from pixelflow_jax.text.prompts import PromptEncoder
    from pixelflow_jax.text.t5_convert import read_t5_config

    pipeline = tmp_path / "pipeline"
    encoder = linked_copy(t5_folder, pipeline / "text_encoder_3")
    os.remove(os.path.join(encoder, "spiece.model"))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{encoder} has no spiece.model (the T5 sentencepiece model): a diffusers pipeline's text encoder keeps "
            f"it in its tokenizer's folder, {pipeline / 'tokenizer_3'}, which does not hold it either")):
        PromptEncoder(encoder, max_length=8)
    (pipeline / "tokenizer_3").mkdir()
    os.link(os.path.join(t5_folder, "spiece.model"), pipeline / "tokenizer_3" / "spiece.model")
    copy = f"cp {pipeline / 'tokenizer_3' / 'spiece.model'} {encoder}/"
    with pytest.raises(CheckpointError, match=re.escape(
            f"a diffusers pipeline's text encoder keeps it in its tokenizer's folder, {pipeline / 'tokenizer_3'}: "
            f"copy it into the encoder's folder ({copy}) and pass that")):
        PromptEncoder(encoder, max_length=8)
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{pipeline} has no spiece.model (the T5 sentencepiece model): it is a diffusers pipeline, not a T5 "
            "folder: pass its T5 text encoder's folder (text_encoder_3) with its tokenizer's spiece.model copied in")):
        PromptEncoder(str(pipeline), max_length=8)
    # a run's load reads config.json first: the pipeline had "no config.json", and its CLIP encoder "not T5"
    with pytest.raises(CheckpointError, match=re.escape(f"{pipeline} has no config.json: it is a diffusers pipeline")):
        read_t5_config(str(pipeline))
    clip = pipeline / "text_encoder"
    clip.mkdir()
    (clip / "config.json").write_text('{"model_type": "clip_text_model"}')
    (pipeline / "text_encoder_2").mkdir()
    (pipeline / "text_encoder_2" / "config.json").write_text("[]")  # no model's config: passed over, no traceback
    with pytest.raises(CheckpointError, match=re.escape(
            f"{clip / 'config.json'} describes a 'clip_text_model' model, not T5: the T5 encoder of the diffusers "
            f"pipeline {pipeline} is in text_encoder_3")):
        read_t5_config(str(clip))
    os.link(os.path.join(t5_folder, "spiece.model"), os.path.join(encoder, "spiece.model"))
    assert PromptEncoder(encoder, max_length=8).encode(["a red disk"])[0].shape[:2] == (1, 8)


@pytest.mark.parametrize("path,meant", [("google/t5-v1_1-xxl", "hf://google/t5-v1_1-xxl"),
                                        ("huggingface.co/google/flan-t5-xl", "hf://google/flan-t5-xl"),
                                        ("runs/t5", None)])
def test_a_missing_t5_folder_that_reads_as_a_hub_repository_names_its_hf_path(path, meant, tmp_path, monkeypatch):
    """--config.train.text_encoder=google/t5-v1_1-xxl (a Hub id, as transformers takes it) was told to
    pass a folder 'or hf://google/flan-t5-xl', another model; a run's load made the path absolute first."""
    from pixelflow_jax.text.prompts import local_t5_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for given in (path, str(tmp_path / path)):
        with pytest.raises(CheckpointError) as refusal:
            local_t5_folder(given)
        assert (f"write {meant}" in str(refusal.value)) if meant else "if it names" not in str(refusal.value), \
            str(refusal.value)


def test_a_damaged_t5_folder_is_one_error_naming_the_file_and_the_fix(t5_folder, tmp_path, monkeypatch):
    """Each damage used to be a traceback of json, safetensors or sentencepiece (or, for a tokenizer
    of another model, NaN embeddings: black images and no error)."""
    import sentencepiece

    from pixelflow_jax.text.prompts import PromptEncoder

    config = open(os.path.join(t5_folder, "config.json"), "rb").read()
    weights = open(os.path.join(t5_folder, "model.safetensors"), "rb").read()
    bigger_vocabulary = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=bigger_vocabulary, vocab_size=VOCAB + 4,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    damages = {
        "config.json": (config[:40], r"config\.json is not valid JSON .*download the T5 folder again"),
        "spiece.model": (b"not a model", r"spiece\.model is not a sentencepiece model"),
        "model.safetensors": (weights[:len(weights) // 2], r"model\.safetensors is not a readable safetensors file"),
    }
    configs = {"[1, 2]": "holds a JSON list, not a model config",
               "caf\xe9": r"config\.json is not valid JSON \(.*download the T5 folder again",  # not UTF-8
               json.dumps({**json.loads(config), "num_layers": "2"}): "num_layers must be a positive integer, got '2'"}
    cases = [(name, content, message) for name, (content, message) in damages.items()]
    cases += [("config.json", content.encode("latin-1"), message) for content, message in configs.items()]
    cases += [("spiece.model", bigger_vocabulary.getvalue(),
               f"spiece.model has {VOCAB + 4} pieces but config.json's vocab_size is {VOCAB}: the tokenizer and "
               "the weights are of different models")]
    for number, (name, content, message) in enumerate(cases):
        folder = linked_copy(t5_folder, tmp_path / str(number))
        replaced(folder, name, content)
        with pytest.raises(CheckpointError, match=message):
            PromptEncoder(folder, max_length=8)

    sharded = linked_copy(t5_folder, tmp_path / "sharded")
    os.remove(os.path.join(sharded, "model.safetensors"))
    index = {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}
    replaced(sharded, "model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(CheckpointError, match=r"index\.json lists .*model-00001-of-00002\.safetensors, which does "
                                              "not exist"):
        PromptEncoder(sharded, max_length=8)
    for index in ([], {"weight_map": ["model-00001-of-00002.safetensors"]}):  # JSON of other shapes
        replaced(sharded, "model.safetensors.index.json", json.dumps(index).encode())
        with pytest.raises(CheckpointError, match=r"^a T5 weight index \(\*\.index\.json\) without a weight_map"):
            PromptEncoder(sharded, max_length=8)
    with pytest.raises(CheckpointError, match="config.json is a file: pass the folder that holds"):
        PromptEncoder(os.path.join(t5_folder, "config.json"), max_length=8)

    # The path rules of every other path: a URL-like name is never a local folder, ~ is expanded.
    os.makedirs(tmp_path / "gs:", exist_ok=True)
    os.symlink(t5_folder, tmp_path / "gs:" / "b")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r'T5 folder: gs:/b looks like a URL without its "://"'):
        PromptEncoder("gs:/b", max_length=8)
    with pytest.raises(CheckpointError, match="^no T5 folder given"):
        PromptEncoder("", max_length=8)
    # A Hub page's address: its hf:// path (a StorageError, unprefixed, then a wget of the page were suggested).
    with pytest.raises(CheckpointError, match=r"^T5 folder: https://huggingface.co/google/flan-t5-xl is the address of "
                                              r"a Hugging Face Hub web page, which is not read as files: write "
                                              r"hf://google/flan-t5-xl \("):
        PromptEncoder("https://huggingface.co/google/flan-t5-xl", max_length=8)
    with pytest.raises(CheckpointError, match=r"^T5 folder: https://example.com/t5: unsupported URL scheme https://: "
                                              r"nothing is downloaded or uploaded at run time"):
        PromptEncoder("https://example.com/t5", max_length=8)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 20), (8, 16)])
def test_position_buckets_equal_transformers_beyond_max_distance(num_buckets, max_distance):
    """flan-t5-xl's buckets (32, 128) and the tiny folder's and the demo encoder's, over 300
    positions; the encoder test's 40 tokens under max_distance 20 cannot tell every off-by-one
    in the exact / logarithmic split apart (one gives the same buckets there, not at 128)."""
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from pixelflow_jax.text.t5 import relative_position_buckets

    position = torch.arange(300)
    expected = T5Attention._relative_position_bucket(position[None, :] - position[:, None], bidirectional=True,
                                                     num_buckets=num_buckets, max_distance=max_distance)
    got = relative_position_buckets(300, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(got), expected.numpy())


def test_rms_norm_equals_float64_also_where_epsilon_matters():
    """x * rsqrt(mean(x^2) + eps) * weight: rows far below eps (a near-silent embedding) and a
    zero row (no NaN), against float64."""
    from pixelflow_jax.text.t5 import rms_norm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)) * np.array([[1.0], [30.0], [1e-4], [0.0]])
    weight, eps = rng.standard_normal(64), 1e-6
    expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * weight
    got = np.asarray(rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32), eps), np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "gated-relu"])
def test_feed_forward_activation_is_the_one_transformers_picks(feed_forward_proj):
    """Each feed_forward_proj T5Config accepts computes transformers' activation (only gated-gelu
    reaches the encoder test)."""
    import torch
    from transformers import T5Config as HFT5Config
    from transformers.activations import ACT2FN

    from pixelflow_jax.text.t5 import ACTIVATIONS, T5Config

    x = np.linspace(-6, 6, 101)
    expected = ACT2FN[HFT5Config(feed_forward_proj=feed_forward_proj).dense_act_fn](torch.tensor(x)).numpy()
    got = ACTIVATIONS[T5Config(feed_forward_proj=feed_forward_proj).activation](jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5, atol=1e-6)


def test_truncated_is_flagged_exactly_where_transformers_cuts(t5_folder):
    """A prompt of max_length - 1 pieces fits whole with its </s>: no "was cut" warning for it,
    one for a piece more."""
    from transformers import AutoTokenizer

    from pixelflow_jax.text.prompts import T5Tokenizer

    reference = AutoTokenizer.from_pretrained(t5_folder, extra_ids=0)
    full_length = len(reference(PROMPTS[0])["input_ids"])  # its pieces and </s>
    for max_length in (full_length - 1, full_length, full_length + 1):
        _, _, truncated = T5Tokenizer(t5_folder, max_length=max_length).tokenize(PROMPTS)
        expected = [len(reference(p)["input_ids"]) > max_length for p in PROMPTS]
        assert truncated.tolist() == expected, max_length


def test_an_encoder_of_another_width_than_the_cross_attention_is_refused(t5_folder):
    """Another encoder's embeddings would feed the checkpoint's cross-attention without a word."""
    import ml_collections

    from pixelflow_jax.text.prompts import prompt_encoder_for

    sample = ml_collections.ConfigDict(dict(text_encoder=t5_folder, max_text_tokens=8, text_encoder_param_dtype=""))
    with pytest.raises(ValueError, match="gives 32-wide embeddings but the checkpoint's cross-attention takes 20"):
        prompt_encoder_for(sample, cross_attention_dim=20)
    sample.text_encoder = ""
    with pytest.raises(ValueError, match="needs its text encoder: set --config.sample.text_encoder"):
        prompt_encoder_for(sample, cross_attention_dim=32)


def test_a_tokenizer_with_as_many_pieces_as_the_vocabulary_fits_and_one_more_is_refused(t5_folder):
    """Ids run from 0 to pieces - 1: a tokenizer of exactly vocab_size pieces reads every id in range."""
    from pixelflow_jax.text.prompts import T5Tokenizer

    tokenizer = T5Tokenizer(t5_folder)
    tokenizer.check_vocabulary(VOCAB, t5_folder)
    with pytest.raises(CheckpointError, match=f"has {VOCAB} pieces but config.json's vocab_size is {VOCAB - 1}"):
        tokenizer.check_vocabulary(VOCAB - 1, t5_folder)


def test_prompts_and_encoder_settings_are_refused_before_any_file_is_read():
    from pixelflow_jax.text.prompts import PromptEncoder, prompt_list

    with pytest.raises(ValueError, match="^prompts must be strings, got 3 at index 1, None at index 2$"):
        prompt_list(["a cat", 3, None])
    with pytest.raises(ValueError, match=r"the single string b'a cat': pass \[prompt\]"):  # not 5 prompts 97, 32, ...
        prompt_list(b"a cat")
    # A notebook's prompts column with one missing caption (pandas reads it as NaN): which one, of how many.
    with pytest.raises(ValueError, match=r"^prompts must be strings, got nan at index 5000 \(1 of 10000 entries\)$"):
        prompt_list(["a cat"] * 5000 + [float("nan")] + ["a dog"] * 4999)
    for arguments, message in (({"max_length": 1}, r"max_length must be in \[2, 4096\], got 1"),  # </s> alone
                               ({"max_length": 4097}, r"max_length must be in \[2, 4096\], got 4097"),
                               ({"param_dtype": "int8"}, "param_dtype must be one of")):
        with pytest.raises(ValueError, match=message):
            PromptEncoder("/nowhere", **arguments)


def test_tied_embeddings_saved_twice_load_when_equal_and_are_refused_when_not(t5_folder):
    """transformers writes shared.weight alone; other writers keep encoder.embed_tokens.weight too."""
    from pixelflow_jax.text.t5_convert import encoder_params, read_encoder_state_dict, read_t5_config

    state, cfg = read_encoder_state_dict(t5_folder), read_t5_config(t5_folder)
    both = {**state, "encoder.embed_tokens.weight": state["shared.weight"].copy()}
    np.testing.assert_array_equal(encoder_params(both, cfg)["embed_tokens"]["embedding"], state["shared.weight"])
    both["encoder.embed_tokens.weight"] = both["encoder.embed_tokens.weight"] + 1
    with pytest.raises(CheckpointError, match=r"shared\.weight and encoder\.embed_tokens\.weight differ"):
        encoder_params(both, cfg)


def test_save_t5_folder_reads_back_as_the_same_encoder(t5_folder, tmp_path):
    """What the demo's encoder is written with: config.json and weights read back (by this module
    and by transformers) as the encoder that was saved, non-default fields included."""
    from transformers import T5Config as HFT5Config

    from pixelflow_jax.text.t5_convert import encoder_state_dict, load_t5_encoder, read_t5_config, save_t5_folder

    encoder = load_t5_encoder(t5_folder)
    save_t5_folder(str(tmp_path), encoder, open(os.path.join(t5_folder, "spiece.model"), "rb").read())
    assert read_t5_config(str(tmp_path)) == encoder.config
    hf = HFT5Config.from_pretrained(str(tmp_path))
    assert (hf.relative_attention_max_distance, hf.dense_act_fn, hf.layer_norm_epsilon) == (20, "gelu_new", 1e-6)
    reread = encoder_state_dict(load_t5_encoder(str(tmp_path)))
    expected = encoder_state_dict(encoder)
    assert reread.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(reread[key], expected[key])


def test_a_t5_folder_whose_weights_failed_to_save_has_no_config_json(t5_folder, tmp_path, monkeypatch):
    """The demo builds its encoder once and takes a folder with config.json for a finished one: a
    save that stopped at the weights (a full disk, a kill) must not leave that file."""
    from pixelflow_jax import storage
    from pixelflow_jax.text.t5_convert import load_t5_encoder, save_t5_folder

    write_atomically = storage.write_atomically

    def disk_full_at_the_weights(path, content):
        if path.endswith(".safetensors"):
            raise OSError(28, "No space left on device")
        write_atomically(path, content)

    monkeypatch.setattr(storage, "write_atomically", disk_full_at_the_weights)
    with pytest.raises(OSError, match="No space left"):
        save_t5_folder(str(tmp_path), load_t5_encoder(t5_folder), b"a tokenizer")
    assert not os.path.exists(tmp_path / "config.json")


def test_the_fingerprint_samples_the_whole_weight_file(t5_folder, tmp_path):
    """Bytes changed in a weight file's last quarter (a fine-tune of later layers) make another
    fingerprint, also with fewer samples than the file has bytes."""
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    folder = linked_copy(t5_folder, tmp_path / "tuned")
    weights = bytearray(open(os.path.join(folder, "model.safetensors"), "rb").read())
    before = folder_fingerprint(folder, samples=4, sample_bytes=16)
    weights[len(weights) * 3 // 4 + 1] ^= 0xFF
    replaced(folder, "model.safetensors", bytes(weights))
    assert folder_fingerprint(folder, samples=4, sample_bytes=16) != before


def test_the_fingerprint_follows_the_architecture_and_the_tokenizer_not_the_config_files_bytes(t5_folder, tmp_path):
    """A sampling job's record of its encoder: config.json written again by another transformers
    (its version) is the same encoder; another layer norm epsilon or another tokenizer is not."""
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    folder = linked_copy(t5_folder, tmp_path / "t5")
    before = folder_fingerprint(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    replaced(folder, "config.json", json.dumps({**config, "transformers_version": "9.9.9"}, indent=4).encode())
    assert folder_fingerprint(folder) == before
    replaced(folder, "config.json", json.dumps({**config, "layer_norm_epsilon": 1e-5}).encode())
    other_epsilon = folder_fingerprint(folder)
    assert other_epsilon != before
    replaced(folder, "spiece.model", b"another tokenizer")
    assert folder_fingerprint(folder) != other_epsilon


def test_a_prompt_that_is_not_unicode_text_is_named_before_the_tokenizer_sees_it():
    """sentencepiece's own words were 'TypeError: List elements must be str or bytes'."""
    from pixelflow_jax.text.prompts import prompt_list

    with pytest.raises(ValueError, match=re.escape("prompts holds the byte 0xe9, which is not UTF-8, after 'caf' in "
                                                   "'caf\\udce9': the terminal or script")):
        prompt_list(["a cat", "caf\udce9"])
    with pytest.raises(ValueError, match=re.escape("prompts holds U+D83D, half of a UTF-16 surrogate pair, after "
                                                   "'a fox ' in")):
        prompt_list(["a fox \ud83d"])
    assert prompt_list(["caf\u00e9 \U0001f98a"]) == ["caf\u00e9 \U0001f98a"]
    # the bytes an undecodable argument becomes are U+DC80..U+DCFF (0x80-0xff): the code points on either side
    # are surrogates no terminal writes, named as such
    for text, named in (("\udc80", "the byte 0x80, which is not UTF-8"),
                        ("\udcff", "the byte 0xff, which is not UTF-8"),
                        ("\udc7f", "U+DC7F, half of a UTF-16 surrogate pair"),
                        ("\ud800", "U+D800, half of a UTF-16 surrogate pair")):
        with pytest.raises(ValueError, match=re.escape(f"prompts holds {named}, after ''")):
            prompt_list([text])


def test_a_t5_config_nested_deeper_than_python_reads_is_named_not_valid_json(tmp_path):
    """json's RecursionError is no ValueError: a T5 folder's crafted config.json came out as a
    traceback, and a pipeline's text encoder folder holding one stopped the search for its T5."""
    from pixelflow_jax.text.t5_convert import is_t5_config, read_t5_config

    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert not is_t5_config(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'} is not valid JSON (nested more "
                                                        "than") + r" \d+ levels deep, past what Python reads\): "
                                                                  r"download the T5 folder again"):
        read_t5_config(str(tmp_path))
