"""The frozen text encoder of a text-to-image training run.

    train.text_encoder     a Hugging Face T5 folder (local, gs://) or hf://google/flan-t5-xl; empty
                           on the captioned demo set: the run builds its own small encoder into
                           WORKDIR/text_encoder (demo_text_encoder.py)
    train.max_text_tokens  captions are padded / truncated to this many tokens (the release: 512).
                           The encoder and every cross-attention cost grow with it: 77 or 128 cover
                           most captions at a fraction of the cost; truncations are counted.
    train.text_encoder_dtype  the encoder's parameter dtype ('bfloat16' halves flan-t5-xl's 4.8 GB)

The encoder's parameters are sharded over the mesh like the model's (FSDP) and passed to the
jitted step, which runs the encoder on the batch's tokens; they are never updated nor saved in
checkpoints. run_config.json records the encoder (relative to the run when it lives inside it),
so --mode=sample and --mode=demo on the run find it without a flag.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.run_checkpoint import (RUN_CONFIG, encoder_folder_of, has_trained, read_run_config,
                                                      recorded_encoder_gone)
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.sharding import global_array, global_arrays, param_shardings, replicated
from pixelflow_jax.text import demo_text_encoder
from pixelflow_jax.text.prompts import tokenize_with_warnings
from pixelflow_jax.training.train_step import TextConditioning


@dataclasses.dataclass
class TrainingTextEncoder:
    recorded_path: str  # what run_config.json says (relative to the run for its own encoder)
    max_tokens: int
    fingerprint: str  # t5_convert.folder_fingerprint: the same encoder at another path
    tokenizer: object  # text.T5Tokenizer (picklable for the loader's workers)
    conditioning: TextConditioning
    params: dict  # sharded like the model's parameters
    sharding: dict
    _encode: object = dataclasses.field(default=None, repr=False)
    _warned: set = dataclasses.field(default_factory=set, repr=False)  # prompts warned of (tokenize_with_warnings)

    def record(self) -> dict:
        """What run_config.json says of the encoder."""
        return {"path": self.recorded_path, "max_text_tokens": self.max_tokens, "fingerprint": self.fingerprint}

    def encode(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
        """(embeddings, mask float32) of prompts: text.PromptEncoder's interface, for previews."""
        mesh = jax.tree.leaves(self.sharding)[0].mesh
        # Every process tokenizes the same prompts: global arrays replicated over the encoder's mesh.
        tokenized = tokenize_with_warnings(self.tokenizer, prompts, self._warned)  # once each: previews repeat
        tokens, mask = (global_array(a, replicated(mesh)) for a in tokenized)
        if self._encode is None:  # compiled once; outputs replicated, so every process can read them
            self._encode = jax.jit(self.conditioning.encode, out_shardings=replicated(mesh))
        kwargs = self._encode(self.params, tokens, mask)
        return kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]


def encoder_path(config) -> str:
    """The text encoder a run trains with, as run_config.json records it."""
    if config.train.text_encoder:
        path = str(config.train.text_encoder)
        from pixelflow_jax.checkpoints import hub

        return path if hub.is_hub_path(path) else storage.absolute(path)
    if config.data.source != "demo":
        raise ValueError("a text-conditional model trains with a frozen T5 encoder: set --config.train.text_encoder "
                         "to a Hugging Face T5 folder (local or gs://) or hf://google/flan-t5-xl")
    return demo_text_encoder.FOLDER_NAME


def fill_encoder_of_runs(config, workdir: str, init_source=None) -> None:
    """An empty train.text_encoder means the encoder a run already trains with: this workdir's
    (resuming a run that trains with an encoder outside it), or that of the run train.init_from
    names (a fine-tune must feed its cross-attention the embeddings it learned). Another encoder
    than the init run's is refused."""
    recorded = (read_run_config(workdir).get("text_encoder") or {}) if has_trained(workdir) else {}
    if not config.train.text_encoder and recorded.get("path", demo_text_encoder.FOLDER_NAME) != \
            demo_text_encoder.FOLDER_NAME:
        config.train.text_encoder = recorded["path"]
        check_recorded_encoder_is_here(recorded["path"], f"{storage.join(workdir, RUN_CONFIG)} names the text encoder "
                                                         "this run trains with")
    if init_source is None:
        return
    if not init_source.run_step:
        if not config.train.text_encoder:  # the demo's random encoder would replace the one it learned
            raise ValueError(f"--config.train.init_from {init_source.label} is a text-to-image checkpoint that does "
                             "not record its text encoder: set --config.train.text_encoder to the one it was "
                             "trained with (the release's: hf://google/flan-t5-xl)")
        return
    run = init_source.run_step.run
    initial = read_run_config(run).get("text_encoder") or {}
    if not initial:
        return
    inherited = encoder_folder_of(run, initial["path"])
    if not config.train.text_encoder:
        config.train.text_encoder = inherited
        check_recorded_encoder_is_here(inherited, f"--config.train.init_from {run}: its {RUN_CONFIG} names the text "
                                                  "encoder it trained with")
    elif encoder_path(config) != inherited and not (  # the same folder elsewhere is the same encoder
            initial.get("fingerprint") and initial["fingerprint"] == fingerprint_of(config.train.text_encoder)):
        raise ValueError(f"--config.train.init_from {run} trained with the text encoder {inherited}, and "
                         f"--config.train.text_encoder {config.train.text_encoder} would feed its cross-attention "
                         "other embeddings: drop --config.train.text_encoder (the run's encoder is used)")


def check_recorded_encoder_is_here(path: str, recorded: str) -> None:
    """A local T5 folder that a run's record names (`recorded`, in words) must exist."""
    if gone := recorded_encoder_gone(path, recorded, "--config.train.text_encoder"):
        raise ValueError(gone)


def fingerprint_of(path: str) -> str:
    from pixelflow_jax.text.prompts import local_t5_folder
    from pixelflow_jax.text.t5_convert import folder_fingerprint

    return folder_fingerprint(local_t5_folder(path))


def build_demo_encoder(config, model_cfg: ModelConfig, folder: str, rebuild: bool) -> None:
    """Process 0 builds the demo's encoder (once per run, or again with `rebuild`: a run with no
    step saved builds it for its current config); every process waits for it."""
    from jax.experimental import multihost_utils

    from pixelflow_jax.data.demo_data import CaptionedDemoSource

    if jax.process_index() == 0 and rebuild and demo_text_encoder.is_built(folder):
        storage.remove(storage.join(folder, "config.json"))  # written last: until rebuilt, the folder is not built
    if jax.process_index() == 0 and not demo_text_encoder.is_built(folder):
        d = config.data
        captions = CaptionedDemoSource(d.demo_num_images, seed=d.demo_seed, num_classes=d.demo_num_classes,
                                       resolution=d.resolution).captions(demo_text_encoder.CAPTIONS_FOR_TOKENIZER)
        # Words those captions lack (a colour of many, a small set's unused wording) are read by later
        # images, the previews and prompts: each is taught as a caption of its own, not read as <unk>.
        seen = {word for caption in captions for word in caption.split()}
        captions += [word for word in demo_words(d.demo_num_classes) if word not in seen]
        demo_text_encoder.build(folder, captions, d_model=model_cfg.cross_attention_dim, seed=config.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("pixelflow demo text encoder built")


def demo_words(num_colours: int) -> list[str]:
    """Every word of the captioned demo set's num_colours-colour captions, sorted."""
    from pixelflow_jax.data.demo_data import CAPTION_WORDINGS, SHAPES, caption_of

    return sorted({word for c in range(num_colours) for s in range(len(SHAPES)) for w in range(len(CAPTION_WORDINGS))
                   for word in caption_of(c, s, num_colours, w).split()})


def unknown_demo_words(tokenizer, num_colours: int) -> set[str]:
    """The words of the demo's num_colours-colour captions that the word-level tokenizer reads as
    <unk> (it knows the words of the captions it was trained on)."""
    words = demo_words(num_colours)
    return {word for word, unknown in zip(words, tokenizer.has_unknown_text(tokenizer(words)[0])) if unknown}


def check_knows_the_demo_words(tokenizer, workdir: str, num_colours: int, folder: str) -> None:
    """A resume that changed data.demo_num_classes (allowed by train.allow_resume_changes) keeps
    the encoder built for the first count, whose tokenizer reads the new colours' words as <unk>,
    one embedding that says nothing: refused where the change adds such words."""
    from pixelflow_jax.training.resume_settings import recorded_settings

    built_for = recorded_settings(workdir).get("data.demo_num_classes")
    if built_for is None or built_for == num_colours:
        return
    added = unknown_demo_words(tokenizer, num_colours) - unknown_demo_words(tokenizer, built_for)
    if added:
        raise ValueError(f"the captioned demo's text encoder {folder} was built for data.demo_num_classes={built_for}: "
                         f"the {num_colours}-colour captions have words it does not know ({', '.join(sorted(added))}); "
                         f"resume with --config.data.demo_num_classes={built_for}, or train a new --workdir")


def load(config, workdir: str, model_cfg: ModelConfig, mesh, no_step_saved: bool) -> TrainingTextEncoder:
    """The run's encoder, checked against the model's cross-attention width before any step. The
    demo's own encoder is built anew while `no_step_saved`: a first start that failed may have built
    it for a config the rerun corrected (another width or colour count)."""
    from pixelflow_jax.text.prompts import JOB_ENCODER_DTYPE, T5Tokenizer, local_t5_folder
    from pixelflow_jax.text.t5_convert import folder_fingerprint, load_t5_encoder, read_t5_config

    t = config.train
    recorded = encoder_path(config)
    folder = encoder_folder_of(workdir, recorded)
    if recorded == demo_text_encoder.FOLDER_NAME:
        build_demo_encoder(config, model_cfg, folder, rebuild=no_step_saved)
    local = local_t5_folder(folder)
    t5_config = read_t5_config(local)
    width = t5_config.d_model
    if width != model_cfg.cross_attention_dim:
        raise ValueError(f"the text encoder {recorded} gives {width}-wide embeddings but model.cross_attention_dim "
                         f"is {model_cfg.cross_attention_dim}: set --config.model.cross_attention_dim={width} "
                         "(a new --workdir) or use another encoder")
    tokenizer = T5Tokenizer(local, int(t.max_text_tokens))
    tokenizer.check_vocabulary(t5_config.vocab_size, local)
    if recorded == demo_text_encoder.FOLDER_NAME and not no_step_saved:  # built by an earlier start
        check_knows_the_demo_words(tokenizer, workdir, config.data.demo_num_classes, folder)
    # float32 compute whatever model.dtype is, as the release's encoder and our sampling jobs run it
    encoder = load_t5_encoder(local, dtype=JOB_ENCODER_DTYPE, param_dtype=t.text_encoder_dtype)
    graphdef = nnx.graphdef(encoder)
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    sharding = param_shardings(params, mesh)
    empty_tokens, empty_mask = (np.asarray(a[0]) for a in tokenizer([""]))
    return TrainingTextEncoder(recorded, int(t.max_text_tokens), folder_fingerprint(local), tokenizer,
                               TextConditioning(graphdef, empty_tokens, empty_mask),
                               global_arrays(params, sharding), sharding)
