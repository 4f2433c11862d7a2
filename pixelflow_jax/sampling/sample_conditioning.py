"""What each image of a `--mode=sample` run is conditioned on: a class label or a text prompt.

Both kinds give, for a batch of image ids, the model's conditional and unconditional keyword
arguments as host arrays, plus the settings that identify the run (settings.json).

    class-conditional: image i gets sample.labels[i] (class ids, or for a run trained on image
                       folders their names, from its class_index.json), or class i mod num_classes
                       (mod the classes a run trained where its data held fewer: its class
                       folders, or the class count its train_settings.json records); unconditional
                       = the null class (id num_classes).
    text-conditional:  image i gets prompt i // sample.images_per_prompt of sample.prompts (or
                       sample.prompts_file, one per line); unconditional = sample.negative_prompt
                       (default "", as the release). Prompts are encoded by the T5 folder in
                       sample.text_encoder, once per batch.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.sampling.cascade import check_conditional, class_conditioning, text_conditioning
from pixelflow_jax.validation import MAX_SAMPLE_IMAGES, ConfigError, class_ids


@dataclasses.dataclass(frozen=True)
class TrainedClasses:
    """The class ids a checkpoint learned, 0 to count - 1 (api.run_trained_classes), and for a run
    on image folders their names (class_index.json). Fewer than the model's classes where a run's
    data held fewer: a fine-tune of 1000 classes on 10 trains ids 0-9 only."""

    count: int
    folders: tuple[str, ...] = ()

    @classmethod
    def of_folders(cls, folders: Sequence[str]) -> TrainedClasses:
        return cls(len(folders), tuple(folders))


class ClassLabels:
    def __init__(self, sample_config, num_classes: int, trained: TrainedClasses | None = None):
        """trained: the classes the checkpoint learned; None: every class of the model."""
        s = sample_config
        trained = trained or TrainedClasses(num_classes)
        if s.num_images < 1:
            raise ValueError(f"--config.sample.num_images must be positive, got {s.num_images}")
        if len(s.labels):
            warn_of_ids_that_name_other_folders(list(s.labels), trained.folders)
            self.labels = class_ids("--config.sample.labels", ids_of_names(list(s.labels), trained.folders),
                                    num_classes)
            warn_of_untrained_ids(self.labels, trained)
        else:  # the release's sample_ddp.py order, over the classes the checkpoint trained
            self.labels = np.arange(s.num_images) % trained.count
        if len(self.labels) != s.num_images:
            raise ValueError(f"--config.sample.labels has {len(self.labels)} entries but --config.sample.num_images is "
                             f"{s.num_images}: give one label per image, or set --config.sample.num_images="
                             f"{len(self.labels)}")
        self.num_classes = num_classes
        self.num_images = int(s.num_images)

    def settings(self) -> dict:
        return dict(labels=self.labels.tolist())

    def batch(self, ids: np.ndarray) -> tuple[dict, dict]:
        cond, uncond = class_conditioning(self.labels[ids], self.num_classes)
        return ({k: np.asarray(v) for k, v in cond.items()}, {k: np.asarray(v) for k, v in uncond.items()})


SHOWN_CLASS_NAMES = 20  # of a run's class folders, in an error


def ids_of_names(labels: list, folder_classes: Sequence[str]) -> list:
    """sample.labels with each class folder name replaced by its id; ids stay as given."""
    names = [label for label in labels if isinstance(label, str)]
    if not names:
        return labels
    if not folder_classes:
        raise ConfigError(f"--config.sample.labels names the class {names[0]!r}, but this checkpoint has no "
                          "class_index.json to look it up in (only a run trained on image folders names its classes): "
                          "give class ids")
    ids = {**spelling_free_ids(folder_classes), **{name: i for i, name in enumerate(folder_classes)}}
    if unknown := [name for name in names if name not in ids and nfc(name) not in ids]:
        known = ", ".join(map(repr, folder_classes[:SHOWN_CLASS_NAMES]))
        more = f", ... ({len(folder_classes)} in all)" if len(folder_classes) > SHOWN_CLASS_NAMES else ""
        # Unquoted names reach the config as one string: (cats,dogs) is the name '(cats,dogs)', (cats) '(cats)'.
        unquoted = "," in unknown[0] or unknown[0].startswith("(")
        quoting = " (quote each name: --config.sample.labels='(\"cats\",\"dogs\")')" if unquoted else ""
        raise ConfigError(f"--config.sample.labels names {unknown[0]!r}, not a class folder of this run{quoting}; its "
                          f"class_index.json names {known}{more}")
    return [ids.get(label, ids.get(nfc(label))) if isinstance(label, str) else label for label in labels]


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def spelling_free_ids(folder_classes: Sequence[str]) -> dict[str, int]:
    """{NFC form: id} of the folder names that no other folder shares in that form: a name typed
    with é as one character finds a folder that a copy made on macOS spells with e + accent (NFD),
    which looks the same in every message."""
    forms = [nfc(name) for name in folder_classes]
    return {form: i for i, form in enumerate(forms) if forms.count(form) == 1}


def warn_of_ids_that_name_other_folders(labels: list, folder_classes: Sequence[str]) -> None:
    """Folders named by numbers sort as text ('0', '1', '10', '2'), so the id 2 is the folder '10':
    an unquoted number that is another folder's name was likely meant as that name."""
    ids = {name: i for i, name in enumerate(folder_classes)}
    mixed = sorted({label for label in labels if not isinstance(label, str) and ids.get(str(label), label) != label})
    if not mixed:
        return
    folder_of = lambda i: f"the folder {folder_classes[i]!r}" if 0 <= i < len(folder_classes) else "no folder"
    shown = "; ".join(f"id {i} is {folder_of(i)}, the folder {str(i)!r} is id {ids[str(i)]}" for i in mixed[:3])
    logging.warning("--config.sample.labels gives numbers that are names of other class folders of this run (%s%s): a "
                    "number is an id, the folder's place in class_index.json (names sorted as text); to ask for a "
                    "folder by its name, quote it: --config.sample.labels='(\"%s\",)'", shown,
                    "; ..." if len(mixed) > 3 else "", mixed[0])


def warn_of_untrained_ids(labels: np.ndarray, trained: TrainedClasses) -> None:
    """Ids past the classes a run trained are allowed: a fine-tune's initial weights may know them."""
    untrained = sorted(set(labels[labels >= trained.count].tolist()))
    if not untrained:
        return
    shown = ", ".join(map(str, untrained[:5])) + (f", ... ({len(untrained)} ids)" if len(untrained) > 5 else "")
    last = trained.count - 1
    what = (f"{trained.count} class folders, ids 0 to {last} (its class_index.json names them, and "
            "--config.sample.labels takes those names)" if trained.folders else
            f"the {trained.count} classes its data held, ids 0 to {last} (its train_settings.json records the count)")
    logging.warning("--config.sample.labels asks for ids (%s) that this run never trained: it trained %s; images of "
                    "those ids show what the weights it started from knew", shown, what)


def read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (a byte-order mark, as Windows editors write, is
    not part of the first prompt): line i is prompt i, as an editor numbers them. UTF-16 or -32
    saved without its mark reads as UTF-8 with NULs beside each letter: refused, not sampled."""
    from pixelflow_jax.data.caption_data import (WINDOWS_1252, marked_encoding, nul_count_words, unmarked_encoding,
                                                 windows_1252_text)

    name = f"--config.sample.prompts_file {path}"
    if not storage.isfile(path):
        raise ValueError(f"{name} is a folder: give a text file, one prompt per line" if storage.isdir(path)
                         else f"{name} does not exist")
    data = storage.read_bytes(path)
    def conversion(encoding: str) -> str:
        return f"convert it, e.g. iconv -f {encoding} -t UTF-8 {path} > prompts.utf8.txt, and give that file"

    if encoding := marked_encoding(data) or unmarked_encoding(data):
        raise ValueError(f"{name} is {encoding} text, not UTF-8: {conversion(encoding)}")
    if b"\x00" in data:  # a tool that padded or cut the file: no encoding puts them there
        raise ValueError(f"{name} holds {nul_count_words(data)}, which no text holds: remove them, e.g. "
                         f"tr -d '\\000' < {path} > prompts.clean.txt, and give that file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if legacy := windows_1252_text(data, e.start):
            raise ValueError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); it reads as {legacy}: "
                             f"{conversion(WINDOWS_1252)}") from None
        raise ValueError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    # Lines end at \n, \r\n or \r only: str.splitlines also splits at \f, \v, \x85, U+2028 and U+2029
    # inside a line (text pasted from the web, a PDF), which would shift every later prompt's image ids.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{name} holds no prompts (every line is blank): write one prompt per line")
    if problem := not_plain_prompts(text, prompts, path):
        raise ValueError(f"{name} is not one plain prompt per line: {problem}")
    warn_of_blank_lines_before_prompts(name, lines)
    return prompts


# The first column's name in the header of a benchmark's table of prompts (PartiPrompts' TSV: Prompt,
# DrawBench's CSV: Prompts; others: text, caption).
PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption")


def not_plain_prompts(text: str, prompts: list[str], path: str) -> str | None:
    """Why a file's lines (`prompts`) are records rather than prompts, which would be sampled as
    their raw text (brackets, keys, quotes, the other columns, the header as a prompt): a JSON
    document, lines of JSON objects, as GenEval's metadata.jsonl holds, or a table with a header
    row; None for plain prompts."""
    try:
        document, records = parsed_json(text), [parsed_json(line) for line in prompts]
    except RecursionError:  # brackets past Python's reach: a JSON document all the same, never a prompt
        return f"it is JSON {storage.too_deeply_nested()}; write each prompt alone on a line"
    if isinstance(document, (list, dict)):
        entries = f"{len(document)} {'entry' if len(document) == 1 else 'entries'}"
        return (f"it is a JSON {'list' if isinstance(document, list) else 'object'} of {entries}; write each prompt "
                "alone on a line")
    if all(isinstance(record, dict) for record in records):
        key = next((k for k in records[0] if k.lower() in PROMPT_COLUMNS), None)
        fix = f", e.g. jq -r .{key} {path} > prompts.txt," if key else ""
        return (f"its lines are JSON objects (keys {', '.join(list(records[0])[:6])}); write each one's prompt "
                f"alone{fix} and give that file")
    header = [name.strip().strip('"') for name in prompts[0].split("\t" if "\t" in prompts[0] else ",")]
    # column names are single words: 'text, bold letters' is a prompt
    if header[0].lower() in PROMPT_COLUMNS and all(re.fullmatch(r"\w+", name) for name in header):
        if len(header) == 1:
            return f"its first line, {prompts[0]!r}, is a column's header, not a prompt; remove that line"
        return (f"its first line, {prompts[0][:120]!r}, is a table's header, and each line a row of "
                f"{len(header)} columns; write the {header[0]!r} column alone, without the header")
    return None


def parsed_json(text: str):
    """The JSON list or object `text` holds; None for other text (a prompt is no valid JSON)."""
    import json

    if not text.lstrip().startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def warn_of_blank_lines_before_prompts(name: str, lines: list[str]) -> None:
    """Blank lines are skipped, so a prompt after one has fewer prompts before it than lines: its
    images (image i shows prompt i // images_per_prompt) are not where its line number says."""
    filled = [bool(line.strip()) for line in lines]
    blank = [i for i in range(len(lines)) if not filled[i] and any(filled[i:])]  # trailing ones move nothing
    if not blank:
        return
    moved = filled.index(True, blank[0])  # the first prompt a blank line moved
    logging.warning("%s: blank %s %s skipped: the prompt on line %d is prompt %d (prompts count non-blank lines, "
                    "from 0, and a sampling job's image i shows prompt i // images_per_prompt); remove the blank "
                    "lines for line numbers and prompts to agree", name, "line" if len(blank) == 1 else "lines",
                    ", ".join(str(i + 1) for i in blank[:10]) + (", ..." if len(blank) > 10 else ""),
                    moved + 1, sum(filled[:moved]))


def read_prompts(sample_config) -> list[str]:
    from pixelflow_jax.data.caption_data import has_visible_text

    s = sample_config
    if bool(len(s.prompts)) == bool(s.prompts_file):
        raise ValueError("a text-conditional checkpoint samples from prompts: set exactly one of "
                         "--config.sample.prompts (a list) or --config.sample.prompts_file (one prompt per line)")
    if s.prompts_file:
        prompts = read_prompts_file(s.prompts_file)
    else:
        prompts = [s.prompts] if isinstance(s.prompts, str) else list(s.prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"every prompt must be a non-empty string, got {prompts!r}")
    if invisible := [p for p in prompts if not has_visible_text(p)]:  # it would sample as the negative prompt ""
        raise ValueError(f"prompt {prompts.index(invisible[0])} ({invisible[0]!r}) holds no visible text, only "
                         "zero-width, byte-order-mark or control characters, which the tokenizer drops: write the "
                         "prompt, or remove it")
    return prompts


class TextPrompts:
    def __init__(self, sample_config, cross_attention_dim: int):
        from pixelflow_jax.text.prompts import prompt_encoder_for
        from pixelflow_jax.text.t5_convert import folder_fingerprint

        s = sample_config
        self.prompts = read_prompts(s)
        if s.images_per_prompt < 1:
            raise ValueError(f"--config.sample.images_per_prompt must be positive, got {s.images_per_prompt}")
        self.images_per_prompt = int(s.images_per_prompt)
        self.num_images = len(self.prompts) * self.images_per_prompt
        if self.num_images > MAX_SAMPLE_IMAGES:  # a typo: settings.json's per-image list would fill the host
            prompts = f"{len(self.prompts)} {'prompt' if len(self.prompts) == 1 else 'prompts'}"
            raise ConfigError(f"{prompts} x --config.sample.images_per_prompt "
                              f"{self.images_per_prompt} = {self.num_images:,} images, over the limit of "
                              f"{MAX_SAMPLE_IMAGES:,} a sampling job makes: lower images_per_prompt")
        self.negative_prompt = str(s.negative_prompt)
        self.encoder = prompt_encoder_for(s, cross_attention_dim)
        self.text_encoder = storage.absolute(s.text_encoder)
        # The encoder's files, not only its path: a folder re-downloaded or converted again in place gives
        # other embeddings, so a rerun must not add its images to the job's (as checkpoint_fingerprint).
        self.text_encoder_fingerprint = folder_fingerprint(self.encoder.folder)
        self.max_text_tokens = int(s.max_text_tokens)
        self.text_encoder_param_dtype = str(s.text_encoder_param_dtype)  # rounds the weights: other embeddings
        self._negative = None

    def settings(self) -> dict:
        return dict(prompts=self.prompts, images_per_prompt=self.images_per_prompt,
                    negative_prompt=self.negative_prompt, text_encoder=self.text_encoder,
                    max_text_tokens=self.max_text_tokens, text_encoder_param_dtype=self.text_encoder_param_dtype,
                    text_encoder_fingerprint=self.text_encoder_fingerprint)

    def batch(self, ids: np.ndarray) -> tuple[dict, dict]:
        if self._negative is None:  # encoded once for the whole job
            self._negative = self.encoder.encode([self.negative_prompt])
        return text_conditioning(*self.encoder.encode([self.prompts[i // self.images_per_prompt] for i in ids]),
                                 self._negative)


def check_config_kind(sample_config, model_config) -> None:
    """A text-conditional checkpoint needs a text config (configs/t2i.py), a class-conditional one
    a class config: the other kind lacks the settings the job reads. Either makes RGB images; an
    unconditional model is refused."""
    check_conditional(model_config)
    if (model_config.in_channels, model_config.out_channels) != (3, 3):
        raise ValueError(f"this checkpoint's model has in_channels {model_config.in_channels} and out_channels "
                         f"{model_config.out_channels}: the sampler makes RGB images (3 and 3)")
    text_config = "prompts" in sample_config
    if model_config.cross_attention_dim and not text_config:
        raise ValueError("this checkpoint is text-conditional: sample it with --config=configs/t2i.py "
                         "(prompts and a T5 text encoder)")
    if not model_config.cross_attention_dim and text_config:
        raise ValueError(f"this checkpoint is class-conditional ({model_config.num_classes} classes): sample it with "
                         "--config=configs/c2i.py")


def conditioning_for(sample_config, model_config, trained: TrainedClasses | None = None):
    """trained: as ClassLabels takes it."""
    check_config_kind(sample_config, model_config)
    if model_config.cross_attention_dim:
        return TextPrompts(sample_config, model_config.cross_attention_dim)
    return ClassLabels(sample_config, model_config.num_classes, trained)
