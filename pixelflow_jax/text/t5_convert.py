"""A Hugging Face T5 model folder -> T5Encoder parameters (strict), for the text-to-image model.

The folder is what `save_pretrained` writes (google/flan-t5-xl as downloaded): config.json and the
weights as model.safetensors, pytorch_model.bin, or either sharded with an .index.json. A full
seq2seq checkpoint also holds the decoder (`decoder.*`, `lm_head.*`): those tensors are skipped.
Every encoder tensor must be used and every parameter filled with the right shape; the tied
embedding may appear as both `shared.weight` and `encoder.embed_tokens.weight`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Mapping

import numpy as np
from flax import nnx, traverse_util

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import CheckpointError, module_with_params
from pixelflow_jax.text.t5 import T5Config, T5Encoder

SKIPPED_PREFIXES = ("decoder.", "lm_head.")
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# NNX path (unstacked for blocks) -> Hugging Face key; '{i}' is the layer.
_BLOCK_KEYS = {
    ("attention_norm",): "encoder.block.{i}.layer.0.layer_norm.weight",
    ("q", "kernel"): "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    ("k", "kernel"): "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    ("v", "kernel"): "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    ("o", "kernel"): "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    ("ff_norm",): "encoder.block.{i}.layer.1.layer_norm.weight",
    ("wi_0", "kernel"): "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
    ("wi_1", "kernel"): "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    ("wo", "kernel"): "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {
    ("relative_attention_bias", "embedding"): "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ("final_norm",): "encoder.final_layer_norm.weight",
}


def read_t5_config(folder: str, **runtime) -> T5Config:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json: " + (encoder_of_run_hint(folder) or (
            pipeline_hint(folder)) or "pass a Hugging Face T5 model folder (e.g. a download of "
            "google/flan-t5-xl)"))
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not a model config: download the T5 "
                              "folder again")
    if hf.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{path} describes a {hf.get('model_type')!r} model, not T5{pipeline_t5_hint(folder)}")
    try:
        return T5Config.from_hf(hf, **runtime)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def encoder_of_run_hint(folder: str) -> str:
    """Where the encoder of a text-to-image training run given as the T5 folder is: the one its
    run_config.json records (the demo's lies in the run's text_encoder/), else ''."""
    from pixelflow_jax.checkpoints.run_checkpoint import encoder_folder_of, is_run, read_run_config

    if not is_run(folder):
        return ""
    try:
        recorded = read_run_config(folder).get("text_encoder")
    except CheckpointError:  # unreadable or damaged (read_run_config refuses JSON that is no object): no hint
        return ""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        return ""
    return (f"it is a text-to-image training run, not a T5 folder: pass the text encoder it records, "
            f"{encoder_folder_of(folder, recorded['path'])}")


# A diffusers pipeline's folders: its T5 text encoder (text_encoder, SD3's text_encoder_3) keeps no
# tokenizer; that is in the folder of the same suffix, tokenizer (tokenizer_3).
ENCODER_FOLDER, TOKENIZER_FOLDER, PIPELINE_FILE = "text_encoder", "tokenizer", "model_index.json"
TOKENIZER_FILE = "spiece.model"  # T5's sentencepiece model


def pipeline_tokenizer_hint(folder: str) -> str:
    """Where a folder without TOKENIZER_FILE is a diffusers pipeline's text encoder folder: where
    the tokenizer is and how to make one T5 folder of the two; else pipeline_hint's words."""
    folder = os.path.normpath(folder)
    name = os.path.basename(folder)
    if not name.startswith(ENCODER_FOLDER):
        return pipeline_hint(folder)
    tokenizer = os.path.join(os.path.dirname(folder), TOKENIZER_FOLDER + name[len(ENCODER_FOLDER):])
    where = f"a diffusers pipeline's text encoder keeps it in its tokenizer's folder, {tokenizer}"
    if not os.path.isfile(os.path.join(tokenizer, TOKENIZER_FILE)):
        return f"{where}, which does not hold it either"
    copy = f"cp {os.path.join(tokenizer, TOKENIZER_FILE)} {folder}/"
    return f"{where}: copy it into the encoder's folder ({copy}) and pass that"


def pipeline_hint(folder: str) -> str:
    """Where `folder` is a diffusers pipeline (model_index.json): which of its folders is the T5 to pass; else ''."""
    if not os.path.isfile(os.path.join(folder, PIPELINE_FILE)):
        return ""
    t5_encoders = ", ".join(pipeline_t5_folders(folder)) or "none here"
    return (f"it is a diffusers pipeline, not a T5 folder: pass its T5 text encoder's folder ({t5_encoders}) with "
            f"its tokenizer's {TOKENIZER_FILE} copied in")


def pipeline_t5_folders(pipeline: str) -> list[str]:
    """The text encoder folders of a diffusers pipeline that hold a T5 (SD3's text_encoder_3, not its CLIPs)."""
    return [entry for entry in sorted(os.listdir(pipeline)) if entry.startswith(ENCODER_FOLDER) and
            is_t5_config(os.path.join(pipeline, entry, "config.json"))]


def pipeline_t5_hint(folder: str) -> str:
    """For a text encoder folder of a diffusers pipeline that is no T5: where the pipeline's T5 is; else ''."""
    pipeline = os.path.dirname(os.path.normpath(folder))
    if not os.path.isfile(os.path.join(pipeline, PIPELINE_FILE)):
        return ""
    t5_encoders = pipeline_t5_folders(pipeline)
    return (f": the T5 encoder of the diffusers pipeline {pipeline} is in {', '.join(t5_encoders)}" if t5_encoders
            else f": the diffusers pipeline {pipeline} has no T5 encoder")


def is_t5_config(path: str) -> bool:
    """Whether `path` is a readable config.json of a T5 model (a pipeline's CLIP encoders are not)."""
    try:
        with open(path) as f:
            return storage.parse_json(f.read()).get("model_type") == "t5"
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: str):
    try:
        with open(path) as f:
            return storage.parse_json(f.read())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, nesting past what Python reads
        raise CheckpointError(f"{path} is not valid JSON ({e}): download the T5 folder again") from None


def encoder_shards(index: Mapping) -> list[str]:
    """The shards of a sharded checkpoint's index.json that hold encoder tensors (decoder-only
    shards are neither downloaded nor read)."""
    try:
        return sorted({shard for key, shard in index["weight_map"].items() if not key.startswith(SKIPPED_PREFIXES)})
    except (KeyError, AttributeError, TypeError):
        raise CheckpointError("a T5 weight index (*.index.json) without a weight_map of tensor -> shard") from None


# What a T5 folder needs besides its weights; which weight files it needs is read from these.
T5_FOLDER_FILES = ("config.json", "spiece.model", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def fetch_encoder_files(fetch: Callable[[list[str]], str]) -> str:
    """Fetches only what an encoder load reads from a remote T5 folder (the Hub, a bucket): the
    config and tokenizer, then the weights in one format, and of sharded weights only the shards
    holding encoder tensors. fetch(names) makes those of the names that exist appear in a local
    folder and returns it."""
    folder = fetch(list(T5_FOLDER_FILES))
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            names = encoder_shards(_read_json(index_path))
        else:
            names = [single]
        fetch(names)
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return folder
    raise CheckpointError("the T5 folder has no weights (model.safetensors or pytorch_model.bin, sharded or not)")


def _weight_files(folder: str) -> list[str]:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name.endswith(".index.json"):
                shards = [os.path.join(folder, shard) for shard in encoder_shards(_read_json(path))]
                missing = [shard for shard in shards if not os.path.isfile(shard)]
                if missing:
                    raise CheckpointError(f"{path} lists {missing[0]}, which does not exist: download the T5 "
                                          "folder again (all of its shards)")
                return shards
            return [path]
    raise CheckpointError(f"{folder} has no T5 weights: expected one of {list(WEIGHT_FILES)}")


def folder_fingerprint(folder: str, samples: int = 32, sample_bytes: int = 1 << 16) -> str:
    """Names one encoder wherever its folder lies: a hash of the architecture config.json gives
    (not its bytes: transformers rewrites its version there), spiece.model, and each weight file's
    size and `samples` evenly spaced slices of its bytes (a fine-tune of the same shapes differs
    there; hashing all of flan-t5-xl's 4.8 GB would cost a minute at every start)."""
    architecture = dataclasses.asdict(read_t5_config(folder))
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    for path in [os.path.join(folder, "spiece.model")] + _weight_files(folder):
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({size * i // samples for i in range(samples)}):
                f.seek(offset)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:32]


def read_encoder_state_dict(folder: str) -> dict[str, np.ndarray]:
    """The encoder's tensors (float32 numpy) from every weight file of the folder."""
    tensors = {}
    for path in _weight_files(folder):
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="flax") as f:
                    for key in f.keys():
                        if not key.startswith(SKIPPED_PREFIXES):
                            tensors[key] = np.asarray(f.get_tensor(key), np.float32)
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}; truncated?): "
                                      "download it again") from None
        else:
            from pixelflow_jax.checkpoints.torch_io import float32_numpy, load_tensor_dict

            loaded = load_tensor_dict(path)
            tensors.update(float32_numpy({k: v for k, v in loaded.items() if not k.startswith(SKIPPED_PREFIXES)}))
    return tensors


def encoder_params(state_dict: Mapping[str, np.ndarray], cfg: T5Config) -> dict:
    """Nested parameter dict for T5Encoder(cfg); a CheckpointError lists every mismatch."""
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    problems, used, flat = [], set(), {}

    embeddings = [k for k in EMBEDDING_KEYS if k in state_dict]
    if len(embeddings) == 2 and not np.array_equal(*(state_dict[k] for k in embeddings)):
        problems.append(f"{EMBEDDING_KEYS[0]} and {EMBEDDING_KEYS[1]} differ (T5 ties them)")
    used.update(embeddings)

    def take(key: str, transpose: bool) -> np.ndarray | None:
        if key not in state_dict:
            problems.append(f"missing {key}")
            return None
        used.add(key)
        return state_dict[key].T if transpose else state_dict[key]

    for path, leaf in shapes.items():
        path = tuple(str(p) for p in path)
        if path == ("embed_tokens", "embedding"):
            value = state_dict[embeddings[0]] if embeddings else None
            if value is None:
                problems.append(f"missing {EMBEDDING_KEYS[0]}")
        elif path[0] == "blocks":
            layers = [take(_BLOCK_KEYS[path[1:]].format(i=i), path[-1] == "kernel") for i in range(cfg.num_layers)]
            value = None if any(layer is None for layer in layers) else np.stack(layers)
        else:
            value = take(_TOP_KEYS[path], path[-1] == "kernel")
        if value is not None and value.shape != leaf.shape:
            problems.append(f"{'.'.join(path)}: checkpoint shape {value.shape}, config.json says {leaf.shape}")
        flat[path] = value
    unused = sorted(set(state_dict) - used)
    if unused:
        problems.append(f"{len(unused)} encoder tensors this architecture does not use, e.g. {unused[:3]}")
    if problems:
        raise CheckpointError("the T5 weights do not match config.json:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(flat)


def load_t5_encoder(folder: str, *, dtype: str = "float32", param_dtype: str = "float32") -> T5Encoder:
    """A ready-to-call T5Encoder from a Hugging Face folder, parameters in param_dtype."""
    cfg = read_t5_config(folder, dtype=dtype, param_dtype=param_dtype)
    params = encoder_params(read_encoder_state_dict(folder), cfg)
    return module_with_params(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)), params, param_dtype)


def encoder_state_dict(encoder: T5Encoder) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of an encoder (the inverse of encoder_params): what
    save_t5_folder writes, so that any T5 reader (this module, transformers) loads it."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
    tensors = {}
    for path, value in flat.items():
        path = tuple(str(p) for p in path)
        value = np.asarray(value, np.float32)
        if path == ("embed_tokens", "embedding"):
            tensors[EMBEDDING_KEYS[0]] = value
        elif path[0] == "blocks":
            for i, layer in enumerate(value):
                tensors[_BLOCK_KEYS[path[1:]].format(i=i)] = layer.T if path[-1] == "kernel" else layer
        else:
            tensors[_TOP_KEYS[path]] = value.T if path[-1] == "kernel" else value
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save_t5_folder(folder: str, encoder: T5Encoder, tokenizer_model: bytes) -> None:
    """A Hugging Face-layout T5 encoder folder (local or gs://): spiece.model, model.safetensors,
    then config.json, written last, so a folder with config.json is complete."""
    from safetensors.numpy import save as safetensors_bytes

    cfg = encoder.config
    hf_config = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": cfg.vocab_size,
                 "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
                 "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
                 "relative_attention_max_distance": cfg.relative_attention_max_distance,
                 "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": cfg.feed_forward_proj,
                 "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1, "dropout_rate": 0.0}
    storage.write_atomically(storage.join(folder, "spiece.model"), tokenizer_model)
    storage.write_atomically(storage.join(folder, "model.safetensors"),
                             safetensors_bytes(encoder_state_dict(encoder), metadata={"format": "pt"}))
    storage.write_json_atomically(storage.join(folder, "config.json"), hf_config)
