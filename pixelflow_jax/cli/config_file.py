"""main.py's --config file and its fields, checked in one line where absl and ml_collections end
in a traceback or say nothing: a config file that does not exist, is no Python file of settings,
or lacks (or adds) fields of this project's configs; an override naming a field the config lacks
(with the sibling config that has it, or the field meant); a flag value absl refuses; a flag of the
release's scripts (with the setting that takes its place); a --flagfile that cannot be read. Light
to import: main.py runs the first checks before it defines its flags.
The configs are this checkout's configs/, imported as the `configs` package from main.py's folder."""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import flags

from pixelflow_jax.cli.config_overrides import override_fields
from pixelflow_jax.error_text import described


def check_flag_files(argv: list[str]) -> None:
    """A --flagfile that cannot be read, named in one line: ml_collections reads the flag files as
    main.py defines --config, where absl's error is a traceback."""
    try:
        flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except flags.CantOpenFlagFileError as e:
        if urls := [url for url in flag_values(argv, "flagfile") if "://" in url]:
            sys.exit(f"error: --flagfile {urls[0]} is a URL: {read_locally(urls[0])}")
        sys.exit(f"error: --flagfile cannot be read: {str(e).removeprefix('ERROR:: Unable to open flagfile: ')}")


def flag_values(argv: list[str], name: str) -> list[str]:
    """The values given to --NAME (or -NAME) in argv, as --NAME=VALUE or --NAME VALUE."""
    values = []
    for i, arg in enumerate(argv[1:], 1):
        flag = arg.lstrip("-")  # absl takes -config as --config
        if flag.startswith(f"{name}="):
            values.append(flag.split("=", 1)[1])
        elif flag == name and arg.startswith("-") and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


def read_locally(url: str) -> str:
    """Why a flag or config file in a bucket is not read, and what to do: absl and ml_collections
    open these files themselves (a config file is imported as Python)."""
    return f"flag and config files are read from local paths only: copy it here first (gcloud storage cp {url} .)"


PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pixelflow_jax/


def configs_folder() -> str | None:
    """This project's configs/: beside the package in a checkout (`pip install -e .` too), else beside
    the main.py that runs (the package installed into site-packages, main.py and configs/ copied
    beside each other); None where neither has it."""
    for folder in (os.path.join(os.path.dirname(PACKAGE), "configs"),
                   os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "configs")):
        if os.path.isdir(folder):
            return folder
    return None


# The class and the text config, each with settings the other lacks (prompts, captions, the T5 encoder).
SIBLING_CONFIGS = {"c2i.py": "t2i.py", "t2i.py": "c2i.py"}


def sibling_config_with(config_file: str, field: str) -> str | None:
    """configs/t2i.py for an override of configs/c2i.py that names one of its fields (such as
    sample.prompts), and the other way round; None otherwise."""
    import importlib

    folder, name = os.path.split(config_file.split(":")[0])
    if name not in SIBLING_CONFIGS or os.path.abspath(folder or ".") != configs_folder():
        return None
    config = importlib.import_module(f"configs.{SIBLING_CONFIGS[name].removesuffix('.py')}").get_config()
    for part in field.split("."):
        if not hasattr(config, "keys") or part not in config:
            return None
        config = config[part]
    return os.path.join(folder, SIBLING_CONFIGS[name])


WHAT_A_CONFIG_FILE_IS = ("a config file defines get_config(), which returns an ml_collections.ConfigDict with "
                         "every field of configs/c2i.py or configs/t2i.py: start from theirs (from configs import "
                         "c2i; config = c2i.get_config(); config.train.lr = ...)")


def configs_given(argv: list[str]) -> list[str]:
    """The values of --config on the command line and in the --flagfile files it names, in absl's
    order (the last one counts). The flag files were checked readable before (check_flag_files)."""
    return flag_values(flags.FLAGS.read_flags_from_files(argv, force_gnu=False), "config")


def config_file_given(argv: list[str]) -> str:
    return (configs_given(argv) or ["the config file"])[-1]


def config_fields(config) -> set[str]:
    """Every field of a config as dotted names, its sections' included."""
    fields = set()
    for name, value in config.items():
        fields.add(name)
        if hasattr(value, "items"):
            fields |= {f"{name}.{field}" for field in config_fields(value)}
    return fields


def check_config_fields(config, config_file: str, every_field: bool = True) -> None:
    """A config file of a user's has the fields of this project's config of its kind (the text
    config where it has a text setting), and no other: a missing one ended in a traceback deep
    inside a mode, and one no mode reads (a typo in the file) would be silently unused.
    every_field=False: only the second (a config built in Python may hold just what its job reads)."""
    import difflib

    import ml_collections

    from configs import c2i, t2i
    from pixelflow_jax.validation import ConfigError

    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{config_file}: get_config() returned a {type(config).__name__}; {WHAT_A_CONFIG_FILE_IS}")
    fields = config_fields(config)
    kinds = {"configs/c2i.py": config_fields(c2i.get_config()), "configs/t2i.py": config_fields(t2i.get_config())}
    text_only = kinds["configs/t2i.py"] - kinds["configs/c2i.py"]
    kind = "configs/t2i.py" if fields & text_only else "configs/c2i.py"
    absent = kinds[kind] - fields
    # A missing section is named, not its fields too.
    if every_field and (missing := sorted(f for f in absent if f.rsplit(".", 1)[0] not in absent or "." not in f)):
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(f"{config_file} lacks {shown}: fields of {kind} that the modes read; {WHAT_A_CONFIG_FILE_IS}")
    if unused := sorted(fields - kinds[kind]):
        named = []
        for field in unused[:8]:
            meant = difflib.get_close_matches(field, kinds[kind], n=1)
            named.append(f"{field} (meant {meant[0]}?)" if meant else field)
        raise ConfigError(f"{config_file} has fields that no mode reads: {', '.join(named)}: a typo, or a setting "
                          f"of another version; {kind} lists the fields that exist")


def unknown_field_message(argv: list[str], error: Exception) -> str:
    """What a --config.PATH=VALUE override naming a field the config lacks (a typo, or a setting
    this version removed) gets instead of ml_collections' traceback: the override, the missing
    field and, for a near miss, the field meant."""
    while error.args and isinstance(error.args[0], Exception):  # ml_collections wraps its KeyError
        error = error.args[0]
    first_line, _, hint = str(error.args[0] if error.args else error).partition("\n")
    missing, hint = first_line.strip("'\""), hint.strip()
    config_file = config_file_given(argv)
    if isinstance(error, AttributeError) and first_line.endswith("has no attribute 'get_config'"):
        return f"{config_file} defines no get_config(): {WHAT_A_CONFIG_FILE_IS}"
    for field in override_fields(argv):
        if missing in field.split("."):
            if sibling := sibling_config_with(config_file, field):
                return (f"--config.{field}: {config_file} has no field {missing!r}; it is a setting of {sibling}: use "
                        "that config")
            return (f"--config.{field}: {config_file} has no field {missing!r}{f' ({hint})' if hint else ''}; "
                    f"{config_file.split(':')[0]} lists the settings that exist")
    if below_a_value := override_below_a_value(config_file, error):
        return below_a_value
    # No override names the field: the config file's own code asked for it.
    return f"{config_file} could not be read: its get_config raised {type(error).__name__}: {first_line}"


def override_below_a_value(config_file: str, error: Exception) -> str | None:
    """For an override whose path goes on below a value (--config.train.lr.x=1), which was blamed on
    the config file's code: ml_collections' walk along the path fails in its config_path module,
    with the path, the field and the value it reached in hand; None for any other error."""
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames or not frames[-1][0].f_code.co_filename.endswith(os.path.join("config_flags", "config_path.py")):
        return None
    walk = frames[-1][0].f_locals
    path, field, value = walk.get("field_path"), walk.get("field"), walk.get("config")
    parts = path.split(".") if isinstance(path, str) else []
    if field not in parts[1:]:
        return None
    holder = ".".join(parts[:parts.index(field, 1)])
    return (f"--config.{path}: {holder} of {config_file} is a value ({type(value).__name__}), not a section with "
            f"fields: write --config.{holder}=VALUE")


def config_code_error(argv: list[str], error: Exception) -> str | None:
    """What an error raised by the config file's own code (a NameError in its get_config, a division
    by zero as it is imported) gets instead of absl's and ml_collections' traceback: its type,
    message and line in the file; None for an error that no line of the file raised."""
    given = configs_given(argv)
    if not given:
        return None
    path = os.path.realpath(given[-1].split(":", 1)[0])  # absl takes the last --config
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.realpath(frame.filename) == path]
    if not lines:
        return None
    return f"{given[-1]} could not be read: its code raised {described(error)} (line {lines[-1]})"


def chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling, outermost first: absl's flag error
    holds ml_collections' rewording, which holds the one the config file's code raised."""
    errors = [error]
    while (inner := errors[-1].__cause__ or errors[-1].__context__) is not None and inner not in errors:
        errors.append(inner)
    return errors


def config_loading_error(argv: list[str], error: Exception) -> str | None:
    """For absl's error while it loaded the --config file, one line on what went wrong there: an
    error of the file's code with its line (ml_collections rewords a ValueError or TypeError into a
    traceback in the text), a variant the file's get_config() does not take (or lacks), or None
    returned; None for any other flag error."""
    given = configs_given(argv)
    if not given:
        return None
    errors = chain(error)
    # The innermost error raised through a line of the file (one raised inside a library and reworded there has none).
    if message := next(filter(None, (config_code_error(argv, e) for e in reversed(errors))), None):
        return message
    cause = errors[-1]
    if isinstance(cause, TypeError) and str(cause).startswith("get_config()"):  # the call itself: no line of the file
        if ":" in given[-1] and "takes 0 positional arguments" in str(cause):
            return f"{given[-1]}: this get_config() takes no variant: drop ':{given[-1].split(':', 1)[1]}'"
        if needed := re.search(r"missing 1 required positional argument: '(\w+)'", str(cause)):
            return (f"{given[-1]}: this get_config() takes a variant (its argument {needed[1]}): give one as "
                    "--config=FILE:VARIANT")
    if "--config must have a value other than None" in str(error):
        return f"{given[-1]}: get_config() returned None (no return statement?); {WHAT_A_CONFIG_FILE_IS}"
    return None


def hide_none_config_warning() -> None:
    """ml_collections logs a warning of its own where get_config() returns None, before absl's
    error: config_loading_error says it in the one line."""
    from absl import logging

    logging.get_absl_logger().addFilter(lambda record: "did you forget a return statement" not in record.getMessage())


def unloaded_config_error(argv: list[str], config) -> str | None:
    """ml_collections keeps an OSError raised while it loads the config file (by a file its code
    opens) in a stand-in config that raises it on first use, where the field check named the
    stand-in's class: the error, with its line in the file; None for a config that loaded."""
    if type(config).__name__ != "_ErrorConfig":
        return None
    cause = object.__getattribute__(config, "_error")
    return config_code_error(argv, cause) or f"{config_file_given(argv)} could not be read: {described(cause)}"


def frozen_config_error(argv: list[str], error: Exception) -> str | None:
    """A FrozenConfigDict returned by get_config(): ml_collections' lock() of it raised, which read as
    an error of get_config's own."""
    if not (isinstance(error, AttributeError) and "FrozenConfigDict is immutable" in str(error)):
        return None
    return (f"{config_file_given(argv)}: get_config() returned a FrozenConfigDict, whose fields --config.FIELD=VALUE "
            "cannot set: return an ml_collections.ConfigDict (ConfigDict(frozen) makes one)")


def import_beside_config_files(argv: list[str]) -> None:
    """Lets a config file import the Python files in its folder (experiments sharing a base config),
    as a script does those beside it: its folder is added last to the import path, so a file there
    named like an installed module (colorsys.py) does not hide that module. A --config given in a
    --flagfile counts too."""
    for value in configs_given(argv):
        folder = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
        if folder not in sys.path:
            sys.path.append(folder)


def check_config_file(argv: list[str]) -> None:
    """A --config file that does not exist, named in one line (ml_collections reports it only when
    the config is first read, in a traceback); a config file given as a bare word, as the release's
    scripts take theirs, named with the flag (absl said only that --config needs a value)."""
    given = configs_given(argv)
    if not given:
        for previous, word in zip(argv, argv[1:]):
            if re.fullmatch(r"[^-].*\.py(:\w*)?", word) and not takes_the_next_word(previous):
                sys.exit(f"error: {word} is given without its flag: a config file is --config={word}")
    for value in given:
        if "://" in value:  # split at its first ":" below, gs://b/c2i.py:demo was "file gs does not exist"
            scheme, _, rest = value.partition("://")
            sys.exit(f"error: --config {value} is a URL: {read_locally(scheme + '://' + rest.split(':', 1)[0])}")
        path = value.split(":", 1)[0]
        if not path:  # ml_collections' stand-in config for it was named as what get_config() returned
            sys.exit(f"error: --config is given without a file name: name a config file (this project's configs: "
                     f"{our_configs()})")
        if os.path.isdir(path):
            sys.exit(f"error: --config {path} is a folder: name a config file (this project's configs: "
                     f"{our_configs()})")
        if not os.path.isfile(path):
            sys.exit(f"error: --config file {path} does not exist (this project's configs: {our_configs()})")
        if path.endswith((".yaml", ".yml")):  # the release's train.py takes its config.yaml
            sys.exit(f"error: --config {path} is a YAML file (a release config.yaml?); main.py's configs are Python: "
                     f"{our_configs()}, with --config.FIELD=VALUE overrides (such as --config.model.depth=12); a "
                     "release folder's weights are read as --config.sample.checkpoint=FOLDER or "
                     "--config.train.init_from=FOLDER")


def takes_the_next_word(arg: str) -> bool:
    """Whether absl reads the word after `arg` as its value: --workdir WORD does; --workdir=x, a
    boolean flag (--distributed, --nodistributed: absl gives those no value but by =) and a word
    that is no flag do not."""
    if not arg.startswith("-") or "=" in arg:
        return False
    name = arg.lstrip("-")
    is_boolean = lambda flag: flag in flags.FLAGS and flags.FLAGS[flag].boolean
    return not (is_boolean(name) or (name.startswith("no") and is_boolean(name[2:])))


def our_configs() -> str:
    """This project's config files, named as they would work from here."""
    folder = configs_folder()
    if folder is None:  # a pip install holds the package only
        return ("configs/c2i.py and configs/t2i.py of the project's checkout, which pip does not install with the "
                "package")
    shown = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else folder
    return ", ".join(os.path.join(shown, n) for n in sorted(os.listdir(folder)) if re.fullmatch(r"[a-z]\w*\.py", n))


# The flags of the release's scripts, and what takes their place here (a user of the release types them).
RELEASE_FLAGS = {
    "pretrained": ("sample_ddp.py", "--config.sample.checkpoint=FOLDER (a release folder is read as it is)"),
    "sample-dir": ("sample_ddp.py", "--workdir=FOLDER (its images go to FOLDER/samples)"),
    "cfg": ("sample_ddp.py", "--config.sample.cfg_scale=SCALE"),
    "num-steps-per-stage": ("sample_ddp.py", "--config.sample.steps_per_stage=N"),
    "use-ode-dopri5": ("sample_ddp.py", "--config.sample.solver=dopri5"),
    "local-batch-size": ("sample_ddp.py", "--config.sample.batch_size=N (the global batch)"),
    "num-fid-samples": ("sample_ddp.py", "--config.sample.num_images=N"),
    "global-seed": ("sample_ddp.py", "--config.sample.seed=N"),
    "checkpoint": ("app.py", "--config.sample.checkpoint=FOLDER, with --mode=demo for its page"),
    "class_cond": ("app.py", "--config=configs/c2i.py (configs/t2i.py for text)"),
    "output-dir": ("train.py", "--workdir=FOLDER"),
    "pretrained-model": ("train.py", "--config.train.init_from=FOLDER (a release folder, or a conversion of a "
                                     "state dict)"),
    "checkpoint-steps": ("train.py", "--config.train.checkpoint_every=N"),
    "logging-steps": ("train.py", "--config.train.log_every=N"),
}


def flag_error_message(error: Exception) -> str:
    """absl's message for a bad flag value, without the traceback of a config file's get_config
    that ml_collections puts inside it: the flag and the exception's last line; for a flag of the
    release's scripts, the setting that takes its place."""
    if isinstance(error, flags.UnrecognizedFlagError) and error.flagname in RELEASE_FLAGS:
        script, setting = RELEASE_FLAGS[error.flagname]
        return f"--{error.flagname} is a flag of the release's {script}; here it is {setting}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return f"{lines[0].split(': Error whilst parsing config file')[0]}: {lines[-1]}"
    flag, _, cause = str(error).partition(": ")
    name = flag.split("=", 1)[0].removeprefix("flag ")
    if cause.startswith("invalid literal for int() with base 10"):  # a tuple or 1e5 for an int field
        return f"{flag}: {name} takes one whole number, written in digits"
    if cause.startswith("('Non-boolean argument to boolean flag'"):  # absl's words were a tuple's repr
        return f"{flag}: {name} takes True or False"
    return str(error)
