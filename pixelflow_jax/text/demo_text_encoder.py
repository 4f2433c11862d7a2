"""The text encoder of the captioned demo set: a small T5 encoder with random (frozen) weights and
a word-level sentencepiece tokenizer trained on the demo captions, built by the project itself, so the
text-to-image demo downloads nothing.

A random frozen encoder is enough here: its embeddings of different words differ, and the
transformer's cross-attention learns to read them, provided each word keeps its own embedding. At
the usual initialisation two random layers mix every token with the whole caption, so "a red disk"
and "a red square" differ in every position (as much as two random vectors) and the model must
learn 250 caption hashes instead of 15 words: it then learns colour but not shape. So the residual
branches (attention and feed-forward outputs) start RESIDUAL_SCALE times smaller, and each output
token stays mostly its word's embedding. A run builds the encoder once into WORKDIR/text_encoder (a
Hugging Face-layout T5 folder, so sampling and the demo page read it like flan-t5-xl).
"""

from __future__ import annotations

import io

from flax import nnx

from pixelflow_jax import storage
from pixelflow_jax.text.t5 import T5Config, T5Encoder
from pixelflow_jax.text.t5_convert import save_t5_folder

FOLDER_NAME = "text_encoder"  # inside the run's workdir
CAPTIONS_FOR_TOKENIZER = 2000
RESIDUAL_SCALE = 0.02
SPECIAL_PIECES = 3  # <pad>, </s>, <unk>
# The vocabulary's usual bound (hard_vocab_limit=False: fewer words give fewer pieces); raised for
# captions of more words (data.demo_num_classes past ~48 names a hue number each).
VOCABULARY = 64


def train_tokenizer(captions: list[str]) -> bytes:
    """A word-level sentencepiece model (one piece per caption word: captions stay <= 8 tokens) with
    T5's special ids (pad 0, </s> 1, unk 2, no <s>); words it never saw become unk."""
    import sentencepiece

    words = len({word for caption in captions for word in caption.split()})
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=max(VOCABULARY, words + SPECIAL_PIECES),
        hard_vocab_limit=False,
        model_type="word", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def build(folder: str, captions: list[str], *, d_model: int, seed: int = 0) -> None:
    """Writes the demo's T5 folder (tokenizer + random encoder of width d_model) to `folder`."""
    import sentencepiece

    tokenizer = train_tokenizer(captions)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).vocab_size()
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
                   num_heads=max(1, d_model // 16), relative_attention_num_buckets=8,
                   relative_attention_max_distance=16)
    encoder = T5Encoder(cfg, rngs=nnx.Rngs(seed))
    for branch_output in (encoder.blocks.o, encoder.blocks.wo):  # stacked over layers
        branch_output.kernel[...] = branch_output.kernel[...] * RESIDUAL_SCALE
    save_t5_folder(folder, encoder, tokenizer)


def is_built(folder: str) -> bool:
    return storage.isfile(storage.join(folder, "config.json"))  # written last (save_t5_folder)
