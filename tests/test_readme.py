"""README.md's ```python blocks run as printed, on the tiny fixtures: a renamed function, argument or
import breaks here rather than in a reader's first session.

Each block gets a few literal substitutions (checkpoint paths -> the tiny fixtures, fewer steps).
Every source text must occur in its block, so an edited README fails loudly instead of running
something else; a block with no entry in BLOCKS fails too."""

import itertools
import os
import re
import textwrap

import numpy as np
import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")

# The tiny c2i fixture keeps the release's 1000 classes (id 1000 is its null class too) and 64 px
# over 4 stages, so the labels 207, 360, 1000 and the 64 px model input run unchanged.
C2I = ('"checkpoints/pixelflow_xl_c2i"', "{c2i!r}")


def readme_python_blocks() -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block of README.md."""
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start, textwrap.dedent("\n".join(lines[start:number - 1]))))
            start = None
    return blocks


def check_model_call(ns, folders):
    config = ns["config"]  # the attributes the block's comment lists
    assert (config.resolution, config.num_stages, config.num_train_timesteps) == (64, 4, 1000)
    assert config.model.num_classes == 1000, "the labels 207 and 1000 (null) need substitutions now"
    velocity = np.asarray(ns["velocity"])
    assert velocity.shape == ns["images"].shape == (2, 64, 64, 3)  # NHWC, as the images
    assert np.isfinite(velocity).all() and np.abs(velocity).max() > 0


def check_generate(ns, folders):
    images = ns["images"]
    assert images.dtype == np.uint8 and images.shape == (2, 64, 64, 3)  # README: uint8 (2, 256, 256, 3) for XL
    assert ns["model"].config.dtype == "bfloat16"
    assert not np.array_equal(images[0], images[1])  # each image its own noise


def check_prompts(ns, folders):
    from pixelflow_jax import load_model

    images = ns["images"]
    assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)
    encoder = ns["encoder"]
    assert encoder.dtype == "float32"  # the comment: float32 compute
    # The last comment: encode's outputs go into a model call as encoder_hidden_states/_attention_mask.
    embeddings, mask = encoder.encode(["a red fox in the snow"])
    assert embeddings.shape[:2] == mask.shape and embeddings.shape[0] == 1 and embeddings.shape[2] == 20
    model, _ = load_model(folders["t2i"], dtype="bfloat16")
    # Straight in: on a host of several devices (8 fake ones here) encode's outputs were on all of
    # them and the model's weights on one, a mix the call refused ("incompatible devices").
    velocity = model(np.zeros((1, 8, 8, 3), np.float32), np.array([300.0]),
                     encoder_hidden_states=embeddings, encoder_attention_mask=mask)
    assert velocity.shape == (1, 8, 8, 3) and np.isfinite(np.asarray(velocity, np.float32)).all()


# name: (text that marks the block, [(README text, replacement)], check of the block's namespace).
# Replacements are str.format templates over the fixture folders {c2i}, {t2i}, {t5}.
BLOCKS = {
    "model_call": ("velocity = model(", [C2I], check_model_call),
    "generate": ("sampler.generate(", [C2I, ("steps_per_stage=30", "steps_per_stage=1")], check_generate),
    "prompts": ("sampler.generate_from_prompts(", [('"checkpoints/pixelflow_t2i"', "{t2i!r}"),
                                                   ('"/path/to/flan-t5-xl"', "{t5!r}"),
                                                   ("steps_per_stage=10", "steps_per_stage=1")], check_prompts),
}


def blocks_marked(marker: str) -> list[tuple[int, str]]:
    return [(line, code) for line, code in readme_python_blocks() if marker in code]


def test_every_python_block_of_the_readme_is_run():
    for line, code in readme_python_blocks():
        names = [name for name, (marker, _, _) in BLOCKS.items() if marker in code]
        assert len(names) == 1, (f"README.md line {line}: a ```python block that tests/test_readme.py "
                                 f"{'does not run' if not names else f'takes for each of {names}'}: add its "
                                 f"substitutions and a check to BLOCKS, under a marker found in that block only")
    for name, (marker, _, _) in BLOCKS.items():
        count = len(blocks_marked(marker))
        assert count == 1, f"BLOCKS[{name!r}]: {marker!r} marks {count} README blocks, not one"


@pytest.mark.parametrize("name", list(BLOCKS))
def test_readme_python_block_runs(name, converted, encoder_folder):
    marker, substitutions, check = BLOCKS[name]
    blocks = blocks_marked(marker)
    assert len(blocks) == 1, f"{marker!r} marks {len(blocks)} README blocks, not one: update BLOCKS[{name!r}]"
    [(line, code)] = blocks
    folders = {"c2i": converted["c2i_tiny"], "t2i": converted["t2i_tiny"], "t5": encoder_folder}
    for source, replacement in substitutions:
        assert source in code, (f"README.md line {line}: {source!r} is no longer in this block; update its "
                                f"substitutions in tests/test_readme.py")
        code = code.replace(source, replacement.format(**folders))
    namespace = {}
    exec(compile(code, f"README.md block at line {line}", "exec"), namespace)
    check(namespace, folders)


def readme_text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


# Fields the README names as mistakes on purpose (the override refused with the field meant).
MISSPELT_ON_PURPOSE = {"trian.lr"}


def test_every_config_field_the_readme_overrides_exists():
    """Each `--config.SECTION.FIELD` of the README is a field of configs/c2i.py or configs/t2i.py: a
    renamed or removed setting fails here rather than in a reader's command line."""
    from configs import c2i, t2i

    configs = [c2i.get_config(""), t2i.get_config("")]

    def has(config, field):
        for part in field.split("."):
            if not hasattr(config, "keys") or part not in config:
                return False
            config = config[part]
        return True

    # Lower case only: --config.FIELD is a placeholder.
    fields = set(re.findall(r"--config\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)", readme_text()))
    assert len(fields) > 30, "the pattern no longer finds the README's overrides"
    missing = sorted(f for f in fields - MISSPELT_ON_PURPOSE if not any(has(c, f) for c in configs))
    assert not missing, f"README.md names --config fields that configs/c2i.py and configs/t2i.py lack: {missing}"
    assert not any(has(c, f) for c in configs for f in MISSPELT_ON_PURPOSE), "a field misspelt on purpose exists now"


def readme_module_table() -> set[str]:
    """The path of each file that README.md's 'What is here' table names, under the folder of its rows."""
    lines = readme_text().splitlines()
    start = lines.index("| file | job |") + 2
    folder, named = "pixelflow_jax", set()
    for row in itertools.takewhile(lambda line: line.startswith("|"), lines[start:]):
        first_cell = row.split("|")[1]
        if heading := re.fullmatch(r"\s*\*\*`([\w/]+)/`\*\*\s*", first_cell):  # **`pixelflow_jax/`**, **`cli/`**
            folder = heading.group(1) if heading.group(1) == "pixelflow_jax" else f"pixelflow_jax/{heading.group(1)}"
        elif "**top level**" in first_cell:
            folder = ""
        else:
            for name in re.findall(r"`([^`]+)`", first_cell):
                named.add(os.path.normpath(name if "/" in name else os.path.join(folder, name)))
    return named


def test_the_readme_module_table_lists_every_module_where_it_is():
    """A module added, moved or removed updates the table a reader finds the code by."""
    named = readme_module_table()
    gone = sorted(path for path in named if not os.path.isfile(os.path.join(REPO, path)))
    assert not gone, f"README.md's 'What is here' table names files that are not there: {gone}"
    package = os.path.join(REPO, "pixelflow_jax")
    modules = {os.path.relpath(os.path.join(folder, name), REPO) for folder, _, names in os.walk(package)
               for name in names if name.endswith(".py") and name != "__init__.py"}
    unlisted = sorted(modules - named)
    assert not unlisted, (f"modules missing from README.md's 'What is here' table: {unlisted}; add each to the "
                          f"rows of its folder")
