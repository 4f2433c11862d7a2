"""Prompts -> T5 embeddings and mask, as the text-to-image release conditions its transformer.

The release tokenizes with the T5 folder's tokenizer (padding to 512, truncation, the end-of-text
token appended), runs the encoder with the attention mask, and passes the same mask to the
transformer's cross-attention. Negative prompts (default "") are encoded the same way.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.config import dtype_name, matmul_precision
from pixelflow_jax.sharding import replicate_on_local_devices
from pixelflow_jax.text.t5_convert import TOKENIZER_FILE, load_t5_encoder, read_t5_config

MAX_LENGTH = 512  # the release's max_token_length
PAD_ID, EOS_ID = 0, 1  # T5's fixed special ids


class T5Tokenizer:
    """T5's sentencepiece tokenization: pieces of the text, then </s>, then padding to max_length;
    longer texts are cut to max_length - 1 pieces before </s> (truncation=True). Picklable (as its
    model's bytes), so grain's worker processes tokenize captions."""

    def __init__(self, folder: str, max_length: int = MAX_LENGTH):
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            from pixelflow_jax.text.t5_convert import encoder_of_run_hint, pipeline_tokenizer_hint

            raise CheckpointError(f"{folder} has no {TOKENIZER_FILE} (the T5 sentencepiece model): " + (
                encoder_of_run_hint(folder) or pipeline_tokenizer_hint(folder)
                or "pass the Hugging Face T5 folder as downloaded, e.g. google/flan-t5-xl"))
        with open(path, "rb") as f:
            self._model = f.read()
        self.max_length = max_length
        self._load()

    def _load(self) -> None:
        import sentencepiece

        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._model)
        except RuntimeError as e:  # sentencepiece's "INTERNAL: ... ParseFromArray"
            raise CheckpointError(f"{TOKENIZER_FILE} is not a sentencepiece model ({str(e).strip()[:200]}): "
                                  "download the T5 folder again") from None

    def check_vocabulary(self, vocab_size: int, folder: str) -> None:
        """Refuses a tokenizer with ids past the encoder's embedding table: an id out of range
        reads NaN embeddings, which come out as black images, not as an error."""
        pieces = self.processor.get_piece_size()
        if pieces > vocab_size:
            raise CheckpointError(f"{folder}: {TOKENIZER_FILE} has {pieces} pieces but config.json's vocab_size is "
                                  f"{vocab_size}: the tokenizer and the weights are of different models")

    def __getstate__(self) -> dict:
        return {"_model": self._model, "max_length": self.max_length}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32 (N, max_length), mask int32 (N, max_length) 1 = token / 0 = padding,
        truncated bool (N,): the text had more than max_length - 1 pieces and was cut)."""
        texts = prompt_list(texts)
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros_like(ids)
        truncated = np.zeros(len(texts), bool)
        for row, pieces in enumerate(self.processor.encode(list(texts), out_type=int)):
            truncated[row] = len(pieces) > self.max_length - 1
            pieces = pieces[:self.max_length - 1] + [EOS_ID]
            ids[row, :len(pieces)] = pieces
            mask[row, :len(pieces)] = 1
        return ids, mask, truncated

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of tokenize()."""
        return self.tokenize(texts)[:2]

    def has_unknown_text(self, ids: np.ndarray) -> np.ndarray:
        """bool (N,): the row holds <unk>, text the vocabulary lacks (for T5: emoji, many scripts;
        for the demo's word-level tokenizer: any word its captions never used), which the model
        reads as one token that says nothing."""
        return (ids == self.processor.unk_id()).any(axis=1)


# Compute dtypes: float16 activations overflow in T5 v1.1 / flan-t5 (transformers keeps parts in float32).
DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
# The compute dtype of the jobs' T5 (sampling, the demo page, training): the release encodes prompts
# in float32 (autocast off), and bfloat16 moves flan-t5-xl's 24-layer embeddings by ~2e-2.
JOB_ENCODER_DTYPE = "float32"


def prompt_list(prompts: Sequence[str]) -> list[str]:
    """Prompts as a list of strings; one string alone is refused (iterated, it would be one prompt
    per character), and so is an empty list."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts must be a list of strings, got the single string {prompts!r}: pass [prompt]")
    if not isinstance(prompts, Iterable):  # list() said only "'NoneType' object is not iterable"
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__} {prompts!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: pass at least one")
    from pixelflow_jax.validation import entries_at, unicode_text

    not_text = np.array([not isinstance(p, str) for p in prompts])
    if not_text.any():  # which ones: a column of 10,000 captions may miss one (NaN in pandas)
        raise ValueError(f"prompts must be strings, got "
                         f"{entries_at(np.fromiter(prompts, dtype=object, count=len(prompts)), not_text)}")
    for prompt in prompts:
        unicode_text("prompts", prompt, where="")
    return prompts


class PromptEncoder:
    """encode(prompts) -> (embeddings (N, max_length, d_model) in the compute dtype, mask (N, max_length)
    float32), host (numpy) arrays for any model call: the text encoder jit-compiled once per batch shape.

    Like the transformer when sampling, the encoder's parameters are replicated on every device
    (param_dtype='bfloat16' halves them: flan-t5-xl's encoder is 1.2B parameters) and a batch of
    prompts is split over this process's devices when its size allows.

    folder: a Hugging Face T5 folder (config.json, spiece.model, the weights), local, gs:// or
      hf://OWNER/NAME (google/flan-t5-xl for the release's models).
    max_length: tokens per prompt, padded or cut (the release's 512; a training run records its own).
    dtype: the compute dtype, 'float32' (the release's) or 'bfloat16' (T5 v1.1 overflows in float16).
    """

    def __init__(self, folder: str, *, max_length: int = MAX_LENGTH, dtype: str = "float32",
                 param_dtype: str = "float32"):
        from pixelflow_jax import validation

        max_length = validation.integer("max_length", max_length, minimum=validation.MIN_TEXT_TOKENS,
                                        maximum=validation.MAX_TEXT_TOKENS, where="")
        dtype, param_dtype = (dtype_name(d) for d in (dtype, param_dtype))  # jnp.bfloat16 too, as load_model takes
        for name, value, allowed in (("dtype", dtype, DTYPES), ("param_dtype", param_dtype, PARAM_DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.folder = folder = local_t5_folder(folder)  # where its files are read (a cache for gs:// and hf://)
        self.tokenizer = T5Tokenizer(folder, max_length)
        self.tokenizer.check_vocabulary(read_t5_config(folder).vocab_size, folder)  # before gigabytes of weights
        self.encoder = load_t5_encoder(folder, dtype=dtype, param_dtype=param_dtype)
        graphdef, params = nnx.split(self.encoder)
        # Every process encodes the whole batch; the sampler builds its global arrays from host copies.
        self._params, self._rows = replicate_on_local_devices(params)
        self._encode = encoder_program(graphdef)
        self._warned: set[str] = set()  # prompts warned of: a job encodes a prompt once per batch holding it
        self.dtype = dtype  # the compute dtype

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = tokenize_with_warnings(self.tokenizer, prompts, self._warned)
        if len(ids) % self._rows.mesh.size == 0:
            ids, mask = jax.device_put((ids, mask), self._rows)
        # Under the encoder's own mesh (this process's devices): a caller's mesh in context, such as
        # the sampling job's over every process's devices, would conflict with its parameters.
        with matmul_precision(self.dtype), jax.set_mesh(self._rows.mesh):
            embeddings = self._encode(self._params, ids, mask)
        # Host copies: on the encoder's devices they would refuse a model loaded on one device
        # ("incompatible devices"), and every caller places them where its model is anyway.
        return np.asarray(embeddings), np.asarray(mask, np.float32)


@functools.lru_cache(maxsize=8)
def encoder_program(graphdef):
    """The jitted forward of a T5 encoder's graph (its architecture and dtypes), shared by every
    PromptEncoder of that graph: each text sampling job builds one, and so may a notebook, and each
    compiled the whole encoder again."""
    return jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params)(ids, mask))


def tokenize_with_warnings(tokenizer: T5Tokenizer, prompts: Sequence[str],
                           warned: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """tokenizer(prompts), with a warning for each prompt the model will not read whole that is not
    in `warned` yet (then added to it)."""
    prompts = prompt_list(prompts)
    ids, mask, truncated = tokenizer.tokenize(prompts)
    cut = {p for p, was_cut in zip(prompts, truncated) if was_cut}
    unknown = {p for p, has_unknown in zip(prompts, tokenizer.has_unknown_text(ids)) if has_unknown}
    for prompt in sorted((cut | unknown) - warned):  # one line each: a long prompt was logged once per problem
        problems = [f"is longer than {tokenizer.max_length} tokens and was cut there (the text length: "
                    "max_text_tokens / max_length)"] if prompt in cut else []
        if prompt in unknown:
            problems.append("holds text the tokenizer does not know, read as <unk> (the model learns nothing from it)")
        logging.warning("prompt %s %s", shortened(prompt), ", and ".join(problems))
    warned.update(cut | unknown)
    return ids, mask


LOGGED_PROMPT_CHARS = 200


def shortened(prompt: str) -> str:
    """A prompt as a log line quotes it: its first LOGGED_PROMPT_CHARS characters, '...' after them
    where it goes on (cut silently, a long prompt read as whole)."""
    if len(prompt) <= LOGGED_PROMPT_CHARS:
        return repr(prompt)
    return repr(prompt[:LOGGED_PROMPT_CHARS] + "...")


PASS_A_T5_FOLDER = ("pass a Hugging Face T5 folder (config.json, spiece.model, the weights), a gs:// copy of one, or "
                    "hf://google/flan-t5-xl")


def local_t5_folder(path: str) -> str:
    """A T5 folder on this machine: hf://OWNER/NAME[@REVISION][/SUBFOLDER] is fetched into the Hub
    cache, a gs:// folder (the encoder's files only) into this project's cache, storage.cache_dir:
    once, and again only for files that changed in the bucket."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints import hub

    try:  # as every path a user writes: ~ expanded, and a URL is never a local folder (nor one we cannot read)
        path = storage.user_path(path)
        if refusal := hub.web_address_refusal(path):  # a Hub page's address: its hf:// path, not a download
            raise storage.StorageError(refusal)
        if storage.is_url(path) and not hub.is_hub_path(path):
            storage.check_supported(path)
    except storage.StorageError as e:
        raise CheckpointError(f"T5 folder: {e}") from None
    if not path.strip():
        raise CheckpointError(f"no T5 folder given: {PASS_A_T5_FOLDER}")
    if hub.is_hub_path(path):
        return hub.t5_folder(path)
    if not storage.is_url(path):
        if os.path.isfile(path):
            raise CheckpointError(f"T5 folder {path} is a file: pass the folder that holds config.json, "
                                  "spiece.model and the weights")
        if not os.path.isdir(path):  # a Hub id (google/t5-v1_1-xxl) reaches here made absolute by a run's load
            hint = hub.missing_path_hint(os.path.relpath(path)).removeprefix(": ").strip(" ()")
            raise CheckpointError(f"T5 folder {path} does not exist: " + (hint or PASS_A_T5_FOLDER))
        return path
    if not storage.exists(path):  # else each file would be missing in turn, and the folder said to lack weights
        raise CheckpointError(f"T5 folder {path} {storage.missing_bucket_words(path) or 'does not exist'}: "
                              f"{PASS_A_T5_FOLDER}")
    local = storage.cache_dir("t5", hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16])

    def fetch(names: list[str]) -> str:
        for name in names:
            try:
                storage.cached_copy(storage.join(path, name), local)
            except FileNotFoundError:  # not in the folder (any more): an earlier copy must not be read in its place
                for stale in (name, f"{name}.source.json"):
                    storage.remove(os.path.join(local, stale))
        return local

    from pixelflow_jax.text.t5_convert import encoder_of_run_hint, fetch_encoder_files

    try:
        return fetch_encoder_files(fetch)
    except CheckpointError as e:  # a text run in a bucket given as its encoder: the copy has no run_config.json
        hint = encoder_of_run_hint(path)
        raise CheckpointError(f"{path}: {f'has no config.json: {hint}' if hint else e}") from None


def prompt_encoder_for(sample_config, cross_attention_dim: int) -> PromptEncoder:
    """The PromptEncoder of config.sample (text_encoder folder, max_text_tokens,
    text_encoder_param_dtype; float32 compute), checked against the checkpoint's cross-attention width."""
    s = sample_config
    if not s.text_encoder:
        raise ValueError("a text-conditional checkpoint needs its text encoder: set --config.sample.text_encoder "
                         "to a Hugging Face T5 folder or hf://google/flan-t5-xl (the release's encoder)")
    encoder = PromptEncoder(s.text_encoder, max_length=int(s.max_text_tokens), dtype=JOB_ENCODER_DTYPE,
                            param_dtype=s.text_encoder_param_dtype or "float32")  # '': no training run's
    width = encoder.encoder.config.d_model
    if width != cross_attention_dim:
        raise ValueError(f"the text encoder in {s.text_encoder} gives {width}-wide embeddings but the checkpoint's "
                         f"cross-attention takes {cross_attention_dim}: use the encoder it was trained with")
    return encoder
