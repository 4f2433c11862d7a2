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


def readme_words() -> str:
    """README.md's text with every run of spaces and line breaks as one space: a phrase reads the
    same wherever the paragraph wraps."""
    return " ".join(readme_text().split())


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


def heading_anchors(text: str) -> set[str]:
    """The #anchors GitHub gives README.md's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    anchors = set()
    for line in text.splitlines():
        if heading := re.fullmatch(r"#{1,6}\s+(.+?)\s*#*", line):
            anchor = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchors.add(next(a for n in itertools.count() if (a := anchor + (f"-{n}" if n else "")) not in anchors))
    return anchors


def test_every_link_inside_the_readme_leads_to_one_of_its_headings():
    text = readme_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a `# comment` in a bash block is no heading
    links = set(re.findall(r"\]\(#([^)\s]+)\)", text))
    assert len(links) >= 5, "the pattern no longer finds the README's links to its sections"
    broken = sorted(links - heading_anchors(prose))
    assert not broken, f"README.md links to sections that no heading makes (a renamed heading?): {broken}"


# Top-level folders of this repository: a path starting with one of them (not part of a longer path,
# such as ~/.cache/pixelflow_jax or runs/demo/...) names a file or folder of the repository.
REPO_FOLDERS = ("tests", "bench", "pixelflow_jax", "configs")


def test_every_repository_path_the_readme_names_exists():
    """tests/..., bench/..., pixelflow_jax/..., configs/... and the test files named bare
    (`test_workdir_lock.py`): a file renamed or removed fails here, not in a reader's command."""
    text = readme_text()
    folders = "|".join(REPO_FOLDERS)
    paths = set(re.findall(rf"(?<![\w/.$~-])((?:{folders})/[\w/.-]*[\w/])", text))
    paths |= {f"tests/{name}" for name in re.findall(r"(?<![\w/])(test_\w+\.py)\b", text)}
    assert len(paths) > 30, "the patterns no longer find the README's paths"
    missing = sorted(path for path in paths if not os.path.exists(os.path.join(REPO, path)))
    assert not missing, f"README.md names paths that are not in the repository: {missing}"


def module_basenames() -> dict[str, str]:
    """The package's modules by file name (`loader` -> pixelflow_jax.data.loader), those whose name
    is unique, as the README names them after their module's row in the 'What is here' table."""
    names: dict[str, list[str]] = {}
    for folder, _, files in os.walk(os.path.join(REPO, "pixelflow_jax")):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                module = os.path.relpath(os.path.join(folder, name[:-3]), REPO).replace(os.sep, ".")
                names.setdefault(name[:-3], []).append(module)
    return {name: modules[0] for name, modules in names.items() if len(modules) == 1}


# First words of dotted names in the README that are config sections or files, not modules:
# `model.remat`, `train.lock`, `scheduler.num_stages`, `metrics.jsonl`, `config.yaml`.
NOT_MODULES = {"config", "model", "train", "scheduler", "metrics", "sample", "data", "eval", "demo", "mesh"}
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "pt", "pth", "npz", "npy", "png", "txt", "lock", "md", "sh"}


def readme_code_names() -> set[str]:
    """Dotted Python names in the README's code spans and blocks: `pixelflow_jax.load_model`,
    `loader.to_global_batch` (a module of the package by its file name)."""
    text = readme_text()
    spans = re.findall(r"```.*?```", text, flags=re.S)
    spans += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    bare = module_basenames()
    names = set()
    for span in spans:
        for name in re.findall(r"(?<![\w./:-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", span):
            first, *_, last = name.split(".")
            if last in FILE_SUFFIXES:
                continue
            if first == "pixelflow_jax" or (first in bare and first not in NOT_MODULES):
                names.add(name)
    return names


def resolves(name: str) -> bool:
    import importlib

    first, *attributes = name.split(".")
    module = "pixelflow_jax" if first == "pixelflow_jax" else module_basenames()[first]
    obj = importlib.import_module(module)
    for attribute in attributes:
        if not hasattr(obj, attribute):
            try:  # a submodule not imported by its package
                obj = importlib.import_module(f"{obj.__name__}.{attribute}")
                continue
            except (ImportError, AttributeError):
                return False
        obj = getattr(obj, attribute)
    return True


def test_every_python_name_the_readme_gives_exists():
    """`pixelflow_jax.sampling.sample_run.run`, `train.TrainingPreempted`-style names and the
    module functions the README tells readers to call: a rename fails here (imports only, nothing
    compiled)."""
    names = readme_code_names()
    assert {"pixelflow_jax.load_model", "loader.to_global_batch", "attention.compiling_for"} <= names, \
        "the pattern no longer finds the README's Python names"
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"README.md names Python objects that do not exist (renamed or removed?): {missing}"


# The command lines the README gives flags to, and where their flags are defined.
SCRIPTS = {r"main\.py": "main.py", r"convert_torch_ckpt\.py": "convert_torch_ckpt.py",
           r"pixelflow_jax\.data\.pack_captions": "pixelflow_jax/data/pack_captions.py",
           r"(?:bench/)?(\w+)\.py": "bench/{}.py"}
ABSL_FLAGS = {"flagfile", "helpshort", "helpfull", "help"}
# Other programs' flags the README names in prose, with their program.
OTHER_PROGRAMS_FLAGS = {"caption_col": "img2dataset", "data_dir": "tfds build", "dist": "pytest", "index-url": "pip",
                        "logdir": "tensorboard", "network": "docker", "nodes": "srun", "ntasks-per-node": "srun",
                        "requeue": "sbatch", "signal": "srun",
                        "xla_cpu_enable_concurrency_optimized_scheduler": "XLA_FLAGS",
                        "xla_gpu_enable_triton_gemm": "XLA_FLAGS",
                        "xla_backend_optimization_level": "XLA_FLAGS"}


def defined_flags(path: str) -> set[str]:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        source = f.read()
    return (set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
            | set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", source)) | ABSL_FLAGS)


def readme_commands() -> list[tuple[str, set[str]]]:
    """(script file, the flags given to it) of every command of this repository's scripts in the
    README, in code blocks and in prose; `--config.*` overrides have their own test."""
    text = readme_text().replace("\\\n", " ")  # a command continued over lines
    pieces = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    pieces += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for piece in pieces:
        for command in re.split(r"&&|;|\||>|#", piece):
            for pattern, file in SCRIPTS.items():
                if found := re.search(rf"(?<![\w/.]){pattern}((?:\s+\S+)*)", command):
                    *names, arguments = found.groups()
                    if os.path.isfile(os.path.join(REPO, path := file.format(*names))):
                        commands.append((path, set(re.findall(r"(?<![\w-])--(?!config\.)([\w-]+)", arguments))))
                    break
    return commands


def test_every_flag_the_readmes_commands_give_is_defined():
    commands = readme_commands()
    scripts = {path for path, _ in commands}
    assert {"main.py", "convert_torch_ckpt.py", "bench/gpu_compile.py"} <= scripts, \
        "the pattern no longer finds the README's commands"
    unknown = sorted({f"{path} --{flag}" for path, flags in commands for flag in flags - defined_flags(path)})
    assert not unknown, f"README.md gives flags that its scripts do not define (renamed?): {unknown}"


def test_every_flag_the_readme_names_in_prose_is_one_of_a_script_or_program():
    """A `--flag` named alone in the text (`--overwrite`, `--compilation_cache=on`) is one of this
    repository's scripts, or of the other program the sentence is about."""
    ours = set().union(*(defined_flags(path) for path in ("main.py", "convert_torch_ckpt.py",
                                                          "pixelflow_jax/data/pack_captions.py")),
                       *(defined_flags(os.path.join("bench", name)) for name in os.listdir(os.path.join(REPO, "bench"))
                         if name.endswith(".py")))
    prose = re.sub(r"```.*?```", "", readme_text(), flags=re.S)
    named = {flag for span in re.findall(r"`([^`]+)`", prose)
             for flag in re.findall(r"(?<![\w-])--(?!config\.)([a-z][\w-]*)", span)}
    assert {"overwrite", "distributed", "compilation_cache"} <= named, "the pattern no longer finds the flags"
    unknown = sorted(named - ours - set(OTHER_PROGRAMS_FLAGS))
    assert not unknown, (f"README.md names flags that no script here defines: {unknown} (another program's? add it "
                         f"to OTHER_PROGRAMS_FLAGS)")
    unused = sorted(set(OTHER_PROGRAMS_FLAGS) - named)
    assert not unused, f"OTHER_PROGRAMS_FLAGS lists flags the README no longer names: {unused}"


NUMBER_WORDS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {f"twenty-{w}": 20 + n for w, n in
                                                      zip("one two three four five six seven eight nine".split(),
                                                          range(1, 10))}


def marked_tests(marker: str) -> int:
    """Tests decorated @pytest.mark.MARKER in tests/ (none of them is parametrized)."""
    count = 0
    for name in os.listdir(os.path.join(REPO, "tests")):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(REPO, "tests", name), encoding="utf-8") as f:
                count += len(re.findall(rf"^@pytest\.mark\.{marker}\b", f.read(), flags=re.M))
    return count


def test_the_readmes_counts_of_slow_and_timed_tests_are_the_suites():
    """The Tests section says how many tests `-m "not slow"` skips and how many `timed` tests run one
    after another: a test marked or unmarked since updates the sentence."""
    text = readme_words()
    sentences = {"slow": r"skips the ([\w-]+) tests over ~30 s", "timed": r"keeps the ([\w-]+) `timed` tests"}
    for marker, pattern in sentences.items():
        said = re.search(pattern, text)
        assert said, f"the README's sentence on the {marker} tests changed: update this test's pattern"
        assert NUMBER_WORDS.get(said.group(1)) == marked_tests(marker), (
            f"README.md says {said.group(0)!r}; tests/ has {marked_tests(marker)} tests marked {marker}")


def readme_numbers() -> dict[str, list[float]]:
    """{phrase of the README (a regex of one group): the numbers the code gives there}, for limits,
    defaults and intervals that no other test reads from the README."""
    import inspect
    import math
    import signal

    import jax
    import PIL.Image

    import grain
    from flax import nnx

    from configs import c2i, t2i
    from pixelflow_jax import host_memory, multihost, validation
    from pixelflow_jax.checkpoints import torch_io
    from pixelflow_jax.cli import compilation_cache, job_exit
    from pixelflow_jax.command_line import EXIT_HUNG_UP, EXIT_INTERRUPTED, EXIT_TERMINATED
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.data import caption_shards, decoding, demo_data, loader, sources
    from pixelflow_jax.model import PixelFlow
    from pixelflow_jax.progress import Progress
    from pixelflow_jax.sampling import cascade, sample_run
    from pixelflow_jax.sharding import batch_for
    from pixelflow_jax.storage import reads
    from pixelflow_jax.text import demo_text_encoder, t5_convert
    from pixelflow_jax.training import metrics_log, workdir_lock

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    def least_resolution(patch_size, num_stages):
        """The least data.resolution that validation accepts for a model of this patch and stages."""
        for resolution in range(1, 1025):
            config = c2i.get_config("tiny")
            config.model.patch_size, config.scheduler.num_stages, config.data.resolution = (patch_size, num_stages,
                                                                                             resolution)
            try:
                validation.check_architecture(config)
                return resolution
            except validation.ConfigError:
                continue

    def millions_of_parameters(config):
        model = nnx.eval_shape(lambda: PixelFlow(ModelConfig.from_mapping(config.model), rngs=nnx.Rngs(0)))
        return round(sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6, 1)

    demo, text_demo, xl = c2i.get_config("demo"), t2i.get_config("demo"), c2i.get_config("")
    kept = range(demo.train.num_steps - (demo.train.keep_checkpoints - 1) * demo.train.checkpoint_every,
                 demo.train.num_steps + 1, demo.train.checkpoint_every)
    release, release_text = torch_io.RELEASE_DEFAULTS, torch_io.RELEASE_T2I_DEFAULTS
    converter_defaults = [release["resolution"], release_text["resolution"], release["num_stages"],
                          release["num_train_timesteps"]]
    sampled_batch = batch_for(50, 16, 1)
    return {
        # Checkpoint paths
        r"the demo keeps its last three: ([\d, ]+)\)": list(kept),
        r"a log line at most every (\d+) s \(the converter": [default(Progress, "log_every_s")],
        # Converting the released weights
        r"set what no config.yaml gives \(defaults: ([^)]+)\)": converter_defaults,
        r"One without `data.resolution` or the scheduler's values gets the release's \(([^)]+)\)": converter_defaults,
        r"the architecture inferred from tensor shapes plus `--attention_head_dim=(\d+)`": [xl.model.attention_head_dim],
        # Sampling
        r"so 50 images at 16 run as (\d+ x \d+)": [math.ceil(50 / sampled_batch), sampled_batch],
        r"`cfg_scale` \(2.4; from 1, no guidance, to ([\d,]+)\)": [validation.MAX_CFG_SCALE],
        r"`steps_per_stage` \(int or one per stage, at most ([\d,]+);": [validation.MAX_STEPS_PER_STAGE],
        r"adaptive at (rtol \S+ / atol \S+) as the release": [cascade.DOPRI5_RTOL, cascade.DOPRI5_ATOL],
        r"a stage it does not finish within ([\d,]+) steps": [cascade.DOPRI5_MAX_STEPS],
        r"`WORKDIR/grid.png` \(the first (\d+ images, at most \d+ x \d+)\)":
            [sample_run.GRID_IMAGES, *[math.ceil(math.sqrt(sample_run.GRID_IMAGES))] * 2],
        r"its heartbeat refreshed every (\d+) s\)":
            [workdir_lock.heartbeat_period(sample_run.SAMPLE_LOCK_STALE_S)],
        r"and from another host once (\d+) s old": [sample_run.SAMPLE_LOCK_STALE_S],
        r"\((\d+ reads in flight, at most \d+) images held\)": [reads.READ_THREADS, reads.READ_AHEAD],
        r"a seed outside \[0, (2\^\d+)\)": [2, math.log2(validation.MAX_SEED + 1)],
        r"Ctrl-C stops with exit status (\d+), a SIGTERM": [EXIT_INTERRUPTED],
        # Training
        r"release's recipe \(AdamW (\S+), clip (\S+), EMA (\S+), label # dropout (\S+),":
            [xl.train.lr, xl.train.grad_clip, xl.train.ema_decay, xl.train.label_dropout],
        r"the paper's length, ~(\S+)M steps at batch (\d+),": [xl.train.num_steps / 1e6, xl.train.batch_size],
        r"([\d,]+) steps of batch (\d+) in 6 min 37 s": [text_demo.train.num_steps, text_demo.train.batch_size],
        r"\(a (\S+)M-parameter model with (\d+)-wide cross-attention":
            [millions_of_parameters(text_demo), text_demo.model.cross_attention_dim],
        r"its (\d+) previews ask for every colour/shape pair once": [text_demo.train.preview_num_images],
        r"constant cfg (\d+), (\d+) Euler steps per stage\)":
            [text_demo.sample.cfg_scale, text_demo.train.preview_steps_per_stage],
        r"shows in 50/50 at steps ([\d,]+ and [\d,]+),": [text_demo.train.preview_every, text_demo.train.num_steps],
        r"its residual branches start (\d+)x smaller than usual": [1 / demo_text_encoder.RESIDUAL_SCALE],
        r"s per text step \(batch (\d+)\), [\d.]+ instead of [\d.]+ s per class step \(batch (\d+)\)":
            [text_demo.train.batch_size, demo.train.batch_size],
        r"XL/4 with flan-t5-xl cross-attention \((\d+) wide\)": [t2i.get_config("").model.cross_attention_dim],
        r"mmap and trim thresholds of (\d+ and ~\d+) GiB": [host_memory.MMAP_THRESHOLD / 2**30,
                                                               round(host_memory.TRIM_THRESHOLD / 2**30)],
        r"an LRU of (\d+ GiB, programs that took over \S+) s to compile":
            [compilation_cache.COMPILATION_CACHE_BYTES / 2**30, compilation_cache.COMPILATION_CACHE_MIN_COMPILE_S],
        r"waits up to (\d+) minutes for all of them to join": [multihost.CONNECT_WAIT_S / 60],
        r"every other process must see within (\d+) s\)": [multihost.SHARED_CHECK_WAIT_S],
        r"every `lock_stale_after_s / (\d+)` seconds, at most (\d+),":
            [300 / workdir_lock.heartbeat_period(300), workdir_lock.heartbeat_period(math.inf)],
        r"older than `train.lock_stale_after_s` \((\d+) min": [xl.train.lock_stale_after_s / 60],
        r"at least (\d+) s, as hosts' clocks differ": [validation.MIN_LOCK_STALE_S],
        r"over about 1 / \(1 - `ema_decay`\) steps \(([\d,]+ at the default [\d.]+)\)":
            [round(1 / (1 - xl.train.ema_decay)), xl.train.ema_decay],
        r"lower `ema_decay` \(the demo trains with ([\d.]+)\)": [demo.train.ema_decay],
        r"(\d+) preempted \(SIGTERM\), (\d+) interrupted \(Ctrl-C\), (\d+) a training run":
            [EXIT_TERMINATED, EXIT_INTERRUPTED, EXIT_HUNG_UP],
        r"(\d+ or \d+) a job warned by SLURM's": [128 + signal.SIGUSR1, 128 + signal.SIGUSR2],
        r"builds a small one, with (\d+) tokens per prompt": [text_demo.train.max_text_tokens],
        r"`max_text_tokens` \((\d+), the release's;": [t2i.get_config("").train.max_text_tokens],
        r"with probability `train.caption_dropout` \(([\d.]+): our default": [t2i.get_config("").train.caption_dropout],
        r"each weight file's size and (\d+ evenly spaced \d+) KiB slices":
            [default(t5_convert.folder_fingerprint, "samples"),
             default(t5_convert.folder_fingerprint, "sample_bytes") / 1024],
        # Training data
        r"10 classes, class c a saturated shape in hue c x (\d+) degrees and outline c mod (\d+)":
            [360 / xl.data.demo_num_classes, len(demo_data.SHAPES)],
        r"shorter side to round\(`expand_ratio` x R\) \(([\d.]+)\)": [xl.data.expand_ratio],
        r"where grain's default would read up to (\d+) ahead": [grain.ReadOptions().prefetch_buffer_size],
        r"`demo_num_images` \(([\d,]+)\) images, `demo_num_classes` \((\d+)\) hues":
            [xl.data.demo_num_images, xl.data.demo_num_classes],
        r"\[--records_per_shard=(\d+)\]": [default(caption_shards.pack, "records_per_shard")],
        r"\(the first (\d+) skips of each kind are named": [caption_shards.SHOWN_SKIPS],
        r"An image longer than (\d+):1": [decoding.MAX_ASPECT_RATIO],
        r"\((\d+) unusable draws in a row stop the run": [decoding.MAX_UNREADABLE_IN_A_ROW],
        r"`PIL.Image.MAX_IMAGE_PIXELS` x (\d+), about (\d+) Mpx\)": [2, round(2 * PIL.Image.MAX_IMAGE_PIXELS / 1e6)],
        r"once (\d+) images per class have been drawn": [loader.DRAWS_PER_CLASS_BEFORE_CHECK],
        r"would read up to \d+ ahead; each at most (\d+)\)":  # num_workers and prefetch_batches both
            sorted({validation.MAX_DATA_WORKERS, validation.MAX_PREFETCH_BATCHES}),
        # Runs in a bucket, Cloud TPU pods and GPU clusters
        r"they go at most every (\d+) s \(`metrics_log.BUCKET_UPLOAD_INTERVAL_S`":
            [metrics_log.BUCKET_UPLOAD_INTERVAL_S],
        r"builds `data.prefetch_batches` batches at once in threads \((\d+) by default\)": [xl.data.prefetch_batches],
        r"\(array-record >= (\d+)\.(\d+)\.(\d+);": list(sources.ARRAY_RECORD_READS_GCS_FROM),
        r"Process 0, which hosts that service, waits (\d+) s first": [job_exit.EXIT_GRACE_S],
        # Configs
        r"with patch 3 and 4 stages: a multiple of (\d+)\)": [least_resolution(3, 4)],
    }


# A number as the README writes it: 10,000, 0.9999, 1e-3, 2^32.
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def test_the_readmes_limits_defaults_and_intervals_are_the_codes():
    """Each phrase of readme_numbers() occurs once in the README, and the numbers in its groups are
    the code's: a constant changed since (or a sentence that never said it right) fails here."""
    text = readme_words()
    wrong = []
    for phrase, expected in readme_numbers().items():
        found = re.findall(phrase, text)
        assert len(found) == 1, (f"README.md holds {len(found)} matches of {phrase!r}, not one: its sentence changed; "
                                 f"update readme_numbers()")
        groups = found[0] if isinstance(found[0], tuple) else (found[0],)
        said = [float(number.replace(",", "")) for group in groups for number in NUMBER.findall(group)]
        if said != pytest.approx([float(value) for value in expected], rel=1e-6):
            code = ", ".join(f"{value:g}" for value in expected)
            wrong.append(f"{' '.join(groups)!r} in {phrase!r} (the code: {code})")
    assert not wrong, f"README.md's numbers that the code does not give: {'; '.join(wrong)}"


def test_the_readme_names_every_sampling_setting_a_training_override_is_named_with():
    """'Using a trained run' lists, for a training setting given to --mode=sample, the sampling setting
    the warning names beside it: each pair of config_overrides.SAMPLING_COUNTERPARTS, none other."""
    from pixelflow_jax.cli.config_overrides import SAMPLING_COUNTERPARTS

    listed = re.search(r"that mode reads where one has the same intent \((.*?)\), and the job runs", readme_words())
    assert listed, "the README's sentence on the settings of the same intent changed: update this test's pattern"
    pairs = dict(re.findall(r"`(train\.\w+)`: `(sample\.\w+)`", listed.group(1)))
    assert pairs == {field: counterpart for field, (counterpart, _) in SAMPLING_COUNTERPARTS.items()}, (
        f"README.md pairs {pairs}; the warning names {SAMPLING_COUNTERPARTS}")
