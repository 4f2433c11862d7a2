"""The --config.FIELD overrides of main.py's command line that a mode does not use, named in a
warning: a sampling job's (or an inspection's of a checkpoint) model, stages and resolution come
from the checkpoint, some settings are read by other modes alone (train.* by --mode=train; all but
eval.* by any mode but eval), the dopri5 solver chooses its own steps, and a sampling job reads eval.* only
to end with an evaluation, where eval.reference is set (never eval.samples). The overrides are read from the
command line as given (argv, and its flag files), not from the parsed config, which does not tell an override from
the config file's own value. So are lists whose strings lack a comma between them, which Python joins into one."""

from __future__ import annotations

import ast
import io
import tokenize

from absl import flags, logging

# Overrides a sampling job cannot honour: the checkpoint holds the model, its stages and resolution;
# each image's noise comes from sample.seed.
CHECKPOINT_DECIDES = ("model.", "scheduler.", "data.resolution", "seed")
RUNTIME_MODEL_FIELDS = ("model.dtype", "model.param_dtype", "model.attention")


def given_arguments(argv: list[str]) -> list[str]:
    """argv's arguments with the lines of its --flagfiles in their place, as absl reads them."""
    try:
        return flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:  # a flag file that cannot be read is an error of its own (check_flag_files)
        return argv[1:]


def override_fields(argv: list[str]) -> list[str]:
    """Each overridden field once, in the order first given (a field given twice, the last value
    winning, is still one override to warn of), wherever absl reads it: written -config.FIELD too,
    or a line of a --flagfile."""
    fields = [a.lstrip("-").split("=", 1)[0].removeprefix("config.") for a in given_arguments(argv)
              if a.startswith("-") and a.lstrip("-").startswith("config.")]
    return list(dict.fromkeys(fields))


def override_values(argv: list[str]) -> dict[str, str]:
    """{field: the value typed} of the --config.FIELD=VALUE overrides, the last of a field winning."""
    return dict(a.lstrip("-").removeprefix("config.").split("=", 1) for a in given_arguments(argv)
                if a.startswith("-") and a.lstrip("-").startswith("config.") and "=" in a)


def adjacent_strings(value: str) -> tuple[str, str] | None:
    """The first two string literals side by side in `value`, ('("a red fox" "a blue car")'), which
    Python, and so ml_collections' reading of a list, joins into one string; None where none are."""
    skipped = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    try:  # ml_collections strips the same leading blanks before it evaluates the value
        tokens = tokenize.generate_tokens(io.StringIO(value.lstrip(" \t")).readline)
        tokens = [token for token in tokens if token.type not in skipped]
    except (tokenize.TokenError, SyntaxError):  # not Python: ml_collections keeps it as the text typed
        return None
    for first, second in zip(tokens, tokens[1:]):
        if first.type == second.type == tokenize.STRING:
            return ast.literal_eval(first.string), ast.literal_eval(second.string)
    return None


def joined_strings_error(argv: list[str], config) -> str | None:
    """What is wrong with an override that gives strings without a comma between them (a list of
    prompts or class names written over several lines): ml_collections reads '("a red fox" "a blue
    car")' as the one prompt 'a red foxa blue car', and nothing later can tell. A field that keeps
    the text as typed (a str field: its value is the raw text) joined nothing."""
    for field, value in override_values(argv).items():
        parsed = config
        for key in field.split("."):
            parsed = getattr(parsed, key, None)
        if parsed == value or not (pair := adjacent_strings(value)):
            continue
        return (f"--config.{field} gives the strings {pair[0]!r} and {pair[1]!r} side by side without a comma, which "
                f"Python joins into one string, {pair[0] + pair[1]!r}: put a comma between them, "
                f"--config.{field}='(\"{pair[0]}\", \"{pair[1]}\")'")
    return None


def overrides_without_effect(argv: list[str], mode: str, inspects_checkpoint: bool = False) -> list[str]:
    """The --config.FIELD overrides that --mode=sample or demo does not read, nor --mode=inspect
    of a checkpoint (whose seed still draws the inputs it times): those the checkpoint decides
    (training_overrides_unused names the training settings)."""
    if mode not in ("sample", "demo") and not (mode == "inspect" and inspects_checkpoint):
        return []
    decided = [p for p in CHECKPOINT_DECIDES if mode != "inspect" or p != "seed"]
    return [f for f in override_fields(argv) if f not in RUNTIME_MODEL_FIELDS
            and any(f == p or (p.endswith(".") and f.startswith(p)) for p in decided)]


# The modes that read the settings under each prefix, the first that fits: the model and sampling
# settings are read by every mode but eval, which reads its .npz files alone; a training run's
# previews read only the sampling settings named first.
BUT_EVAL = ("train", "sample", "demo", "inspect")
PREVIEWS_READ = ("sample.cfg_scale", "sample.shift", "sample.negative_prompt", "sample.prompts", "sample.prompts_file")
READERS = (("train.", ("train",)), ("mesh.", ("train",)), ("data.", ("train",)), ("demo.", ("demo",)),
           ("eval.", ("sample", "eval")), *((field, BUT_EVAL) for field in PREVIEWS_READ),
           ("sample.", ("sample", "demo", "inspect")), ("model.", BUT_EVAL), ("scheduler.", BUT_EVAL),
           ("seed", BUT_EVAL))
# The setting of another mode that an override's intent has there, named beside it (with the modes
# that read it): a training run starts from train.init_from, not from sample.checkpoint.
SAMPLING_COUNTERPARTS = {
    "train.init_from": ("sample.checkpoint", ("sample", "demo", "inspect")),
    "train.init_from_weights": ("sample.weights", ("sample", "demo", "inspect")),
    "train.text_encoder": ("sample.text_encoder", ("sample", "demo")),
    "train.text_encoder_dtype": ("sample.text_encoder_param_dtype", ("sample", "demo")),
    "train.max_text_tokens": ("sample.max_text_tokens", ("sample", "demo", "inspect")),
    "train.batch_size": ("sample.batch_size", ("sample",)),
    "train.preview_steps_per_stage": ("sample.steps_per_stage", ("sample",)),
}
TRAINING_COUNTERPARTS = {
    "sample.checkpoint": ("train.init_from", ("train",)),
    "sample.weights": ("train.init_from_weights", ("train",)),
    "sample.text_encoder": ("train.text_encoder", ("train",)),
    "sample.text_encoder_param_dtype": ("train.text_encoder_dtype", ("train",)),
    "sample.max_text_tokens": ("train.max_text_tokens", ("train",)),
    "sample.num_images": ("train.preview_num_images", ("train",)),
    "sample.steps_per_stage": ("train.preview_steps_per_stage", ("train",)),
}
COUNTERPARTS = {**SAMPLING_COUNTERPARTS, **TRAINING_COUNTERPARTS}


def readers_of(field: str) -> tuple[str, ...]:
    """The modes that read `field` (every mode, for a field no prefix above names)."""
    for prefix, modes in READERS:
        if field == prefix or (prefix.endswith(".") and field.startswith(prefix)):
            return modes
    return ("train", "sample", "demo", "inspect", "eval")


def overrides_of_other_modes(argv: list[str], mode: str, inspects_checkpoint: bool = False
                             ) -> dict[tuple[str, ...], list[str]]:
    """{modes that read them: the overrides} of those that `mode` never reads (a training setting
    given to --mode=sample), but those that overrides_without_effect names already; an inspection
    of the config's own model builds it at data.resolution and times its text at train.max_text_tokens."""
    read = {"data.resolution", "train.max_text_tokens"} if mode == "inspect" and not inspects_checkpoint else set()
    named = set(overrides_without_effect(argv, mode, inspects_checkpoint))
    unread: dict[tuple[str, ...], list[str]] = {}
    for field in override_fields(argv):
        readers = readers_of(field)
        if mode not in readers and field not in read | named:
            unread.setdefault(readers, []).append(field)
    return unread


def in_words(modes: tuple[str, ...]) -> str:
    """('train', 'sample', 'demo') -> 'train, sample and demo'."""
    return modes[0] if len(modes) == 1 else f"{', '.join(modes[:-1])} and {modes[-1]}"


def counterparts_read(fields: list[str], mode: str) -> str:
    """' (for train.X, --mode=M reads --config.sample.Y; ...)' for the fields whose intent `mode` has
    a setting of its own for (COUNTERPARTS); '' for none."""
    pointers = [f"for {f}, --mode={mode} reads --config.{COUNTERPARTS[f][0]}" for f in fields
                if mode in COUNTERPARTS.get(f, ("", ()))[1]]
    return f" ({'; '.join(pointers)})" if pointers else ""


def step_overrides_dopri5_ignores(argv: list[str], mode: str, solver: str) -> list[str]:
    """The Euler step settings given with --config.sample.solver=dopri5, whose adaptive steps use
    neither (a user comparing step counts would otherwise get the same images each time)."""
    if mode != "sample" or solver != "dopri5":
        return []
    return [f for f in override_fields(argv) if f in ("sample.steps_per_stage", "sample.shift")]


def eval_overrides_sampling_ignores(argv: list[str], mode: str, evaluates: bool) -> tuple[list[str], list[str]]:
    """(the eval.* overrides a sampling job reads only to end with an evaluation, where it ends with none for want
    of eval.reference; eval.samples, which it never reads: it evaluates the samples.npz it writes). A job given
    the Inception weights alone sampled every image and ended without the metrics, without a word."""
    if mode != "sample":
        return [], []
    fields = override_fields(argv)
    # eval.reference is the one missing; eval.samples has a warning of its own
    unused = [] if evaluates else [f for f in fields if f.startswith("eval.") and f not in ("eval.reference",
                                                                                            "eval.samples")]
    return unused, [f for f in fields if f == "eval.samples"]


def warn_of_overrides_without_effect(argv: list[str], mode: str, inspects_checkpoint: bool, solver: str, *,
                                      evaluates: bool) -> None:
    """A warning line for each kind of override above that `argv` holds (the job runs on); `evaluates`: a
    sampling job ends with an evaluation (eval.reference is set)."""
    if ignored := overrides_without_effect(argv, mode, inspects_checkpoint):
        logging.warning("%s: --mode=%s does not use %s; the checkpoint decides the model, its stages and resolution%s",
                        ", ".join(f"--config.{f}" for f in ignored), mode, "them" if len(ignored) > 1 else "it",
                        " (the seed of the images is sample.seed)" if mode != "inspect" else
                        " (the config's own model is inspected with an empty --config.sample.checkpoint, in a "
                        "--workdir that is not a training run)")
    for readers, unread in overrides_of_other_modes(argv, mode, inspects_checkpoint).items():
        logging.warning("%s: only --mode=%s %s %s, so --mode=%s runs as if %s not given%s",
                        ", ".join(f"--config.{f}" for f in unread), in_words(readers),
                        "uses" if len(readers) == 1 else "use", "them" if len(unread) > 1 else "it", mode,
                        "they were" if len(unread) > 1 else "it was", counterparts_read(unread, mode))
    if ignored := step_overrides_dopri5_ignores(argv, mode, solver):
        logging.warning("%s: the dopri5 solver chooses its own steps (to a tolerance) and uses %s only with "
                        "--config.sample.solver=euler", ", ".join(f"--config.{f}" for f in ignored),
                        "these" if len(ignored) > 1 else "this")
    unused, samples = eval_overrides_sampling_ignores(argv, mode, evaluates)
    if unused:
        logging.warning("%s: a sampling job ends with an evaluation only where --config.eval.reference is set, so this "
                        "one will not evaluate its images; set it too, or evaluate them later with --mode=eval",
                        ", ".join(f"--config.{f}" for f in unused))
    if samples:
        logging.warning("--config.eval.samples: a sampling job evaluates the samples.npz it writes in its workdir; "
                        "--mode=eval reads --config.eval.samples")
