"""`main.py --mode=demo`: a local web page (Gradio) that samples a checkpoint (see api.py).

Class-conditional checkpoints get a class picker (ImageNet names for 1000-class models, the class
folders for a run trained on an image folder, bare ids for the classes of a run's data of fewer
classes than its model), text ones a prompt box (with config.sample.text_encoder); both get
solver, CFG, noise shift, steps per stage, seed and number of images, a gallery and the PNGs to
download. Each new combination of batch size, Euler steps and solver compiles once (the page says
so), as does CFG 1 (unguided); other CFG values, shifts and seeds reuse the compiled sampler
(the programs of COMPILED_SETTINGS_KEPT settings are kept).
Bad input is reported on the page; the server keeps running. Requests are sampled one at a time;
Gradio's queue shows the waiting pages their place. Binds to 127.0.0.1 unless
config.demo.share_on_network.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import numbers
import os
import re
import reprlib
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from pixelflow_jax import storage
from pixelflow_jax.data.caption_data import has_visible_text
from pixelflow_jax.command_line import sigterm_stops
from pixelflow_jax.validation import (DEMO_CFG_RANGE, DEMO_MAX_STEPS, DEMO_SHIFT_RANGE, MAX_SEED, ConfigError,
                                      is_whole, job_config, job_workdir, unicode_text)
from pixelflow_jax.api import (check_steps_for_stages, load_sampling_model, run_trained_classes, sampling_checkpoint,
                               sampling_source, weights_chosen, weights_note)
from pixelflow_jax.sampling.cascade import SOLVERS, CascadeSampler
from pixelflow_jax.sampling.sample_conditioning import TrainedClasses, check_config_kind

# Index = class id; the short names of github.com/anishathalye/imagenet-simple-labels (MIT), as data.
IMAGENET_NAMES = os.path.join(os.path.dirname(__file__), "imagenet_class_names.json")


def class_choices(num_classes: int, trained: TrainedClasses | None = None) -> list[tuple[str, int]]:
    """The picker's (label, id) pairs. A fine-tune of the 1000-class release on 10 classes trains
    ids 0-9 as its data's classes, not as ImageNet's first 10: named by its class folders (a run
    on an image folder), or bare ids where its data names none (TFDS, the demo set). Ids it never trained keep
    the names of the classes the weights it started from knew."""
    names = {}
    if num_classes == 1000:
        with open(IMAGENET_NAMES) as f:
            names = dict(enumerate(json.load(f)))
    trained = trained or TrainedClasses(num_classes)
    if trained.count < num_classes:
        names = {i: name for i, name in names.items() if i >= trained.count}
    names.update(enumerate(trained.folders))
    return [(f"{i}: {names[i]}" if i in names else f"class {i}", i) for i in range(num_classes)]


SHOWN_PROMPT_CHARS = 80  # of a prompt, in the status line


TEMPORARY_OUTPUTS = "pixelflow_demo"  # a bucket workdir's page folders (storage.temporary_dir)


def outputs_are_temporary(workdir: str) -> bool:
    """Whether a page's images go to a temporary folder: it serves files from a local folder, so a
    bucket workdir (or none) holds no demo_outputs/."""
    return not workdir or storage.is_url(workdir)


def demo_output_dir(workdir: str) -> str:
    """This page's folder in WORKDIR/demo_outputs (the page serves files from a local folder); the
    folders of pages that stopped are removed, those of pages still serving and anything else kept.
    A bucket workdir gets a temporary folder removed at exit; those of pages that were killed are
    removed by a later start (storage.remove_abandoned_dirs)."""
    if outputs_are_temporary(workdir):
        storage.remove_abandoned_dirs(TEMPORARY_OUTPUTS)
        folder = storage.temporary_dir(TEMPORARY_OUTPUTS)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    outputs = check_demo_outputs(workdir)
    os.makedirs(outputs, exist_ok=True)
    # (The user's own files and the folders of pages still serving are kept.)
    for _, folder in list(storage.folders_of_gone_writers(outputs, PAGE_OUTPUTS)):
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
    return storage.make_folder(outputs, f"page-{storage.writer_tag()}-")


PAGE_OUTPUTS = re.compile(rf"page-{storage.WRITER}")


def check_demo_outputs(workdir: str) -> str:
    """WORKDIR/demo_outputs, refused when it is a link or a file: a start removes the folders of
    pages that stopped there."""
    outputs = os.path.join(workdir, "demo_outputs")
    if os.path.islink(outputs) or (os.path.exists(outputs) and not os.path.isdir(outputs)):
        kind = "a link" if os.path.islink(outputs) else "a file"
        raise ValueError(f"{outputs} is {kind}, where the page keeps its images (and removes those of earlier "
                         "pages): move it away, or use another --workdir")
    return outputs


# Requests whose PNGs stay on disk: a page open for days must not fill the disk (1024 px images
# are ~2 MB each). The browser's gallery links to the newest ones.
KEPT_REQUESTS = 64


def remove_old_requests(output_dir: str, keep: int = KEPT_REQUESTS) -> None:
    """Deletes all but the `keep` newest request folders of the page's output folder."""
    folders = [entry for entry in os.scandir(output_dir) if entry.is_dir()]
    folders.sort(key=lambda entry: entry.stat().st_mtime_ns)
    for entry in folders[:max(0, len(folders) - keep)]:
        shutil.rmtree(entry.path, ignore_errors=True)


def class_id_sent(condition):
    """A class id as an API client sent it, a string of digits (as Gradio's API lists the
    dropdown's ids) read as its number; anything else as it is."""
    if isinstance(condition, str) and condition.strip().isdecimal():
        with contextlib.suppress(ValueError):  # past Python's 4,300 digits: no class table is that long
            return int(condition)
    return condition


def shown(value) -> str:
    """A value sent, as the status line quotes it: a client may send megabytes where one number goes."""
    return reprlib.repr(value)


# Settings (batch size, solver, Euler steps, guided or not) whose compiled programs the page keeps:
# each holds host memory (~5 MB a stage on the tiny model, more for larger ones).
COMPILED_SETTINGS_KEPT = 16


# dopri5 picks its own steps between the stage's ends: the page says what it did not use.
DOPRI5_NOTE = " dopri5 chooses its own steps: the step sliders and the noise shift were not used."


class DemoSampler:
    """The model, its compiled sampler, and the request validation the page relies on."""

    def __init__(self, config, workdir: str = ""):
        config = job_config(config, "demo")
        s = config.sample
        # The config's kind, its steps and the text encoder are checked before the weights are read.
        self.source, ckpt = sampling_source(config, workdir)
        check_config_kind(s, ckpt.model)
        check_steps_for_stages(s, self.source, ckpt.num_stages)
        self.text = bool(ckpt.model.cross_attention_dim)
        self.num_classes = None if self.text else int(ckpt.model.num_classes)
        self.trained_classes = None if self.text else run_trained_classes(self.source, self.num_classes)
        self.prompt_encoder, self.negative_prompt = None, str(s.get("negative_prompt", ""))
        if self.text:
            from pixelflow_jax.text.prompts import prompt_encoder_for

            self.prompt_encoder = prompt_encoder_for(s, ckpt.model.cross_attention_dim)
        model, self.ckpt, self.source = load_sampling_model(config, self.source)  # the page names the step read
        self.sampler = CascadeSampler(model, self.ckpt)
        self.max_images = int(config.demo.max_images)
        self.default_cfg = float(s.cfg_scale)  # the CFG slider's first value
        self.compiled: set = set()
        self.output_dir = demo_output_dir(workdir)

    def check(self, condition, solver, num_images, cfg, shift, steps, seed) -> str | None:
        """The problem with a request, in words for the page, or None. The page's event skips
        Gradio's own checks (see build_page), so this is the only one: it takes anything an API
        client sends."""
        if self.text:
            if condition is not None and not isinstance(condition, str):
                return f"The prompt must be text, got {shown(condition)}."
            if not (condition or "").strip():
                return "Type a prompt."
            try:  # half a surrogate pair (an API client's JSON escape): sentencepiece would fail the request
                unicode_text("prompt", condition, where="the ", decoded_by_the_locale=False)
            except ConfigError as e:
                return f"{str(e)[0].upper()}{str(e)[1:]}."
            if not has_visible_text(condition):  # it would sample as the empty prompt, as --mode=sample refuses
                return ("The prompt holds no visible text, only zero-width, byte-order-mark or control characters, "
                        "which the tokenizer drops: type the prompt.")
        elif condition is None:
            return "Pick a class."
        elif not is_whole(class_id := class_id_sent(condition)) or not 0 <= class_id < self.num_classes:
            # (id num_classes is the null class of guidance: unconditioned images; past it a jitted lookup gives NaN)
            return f"Class must be a whole number from 0 to {self.num_classes - 1}, got {shown(class_id)}."
        if solver not in SOLVERS:
            return f"Solver must be one of {', '.join(SOLVERS)}, got {shown(solver)}."
        given = {"Number of images": num_images, "CFG": cfg, "Noise shift": shift, "Seed": seed,
                 **{f"Steps of stage {stage}": n for stage, n in enumerate(steps)}}
        for label, value in given.items():  # the page sends numbers; its API accepts anything
            if value is None:  # the page's Seed box emptied ('got None' read as Python to a student)
                return f"{label} is empty: give a number."
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                return f"{label} must be a number, got {shown(value)}."
        if not 1 <= num_images <= self.max_images or not is_whole(num_images):
            return f"Number of images must be a whole number from 1 to {self.max_images}."
        if not DEMO_CFG_RANGE[0] <= cfg <= DEMO_CFG_RANGE[1]:
            return "CFG must be between {:g} and {:g}.".format(*DEMO_CFG_RANGE)
        if not DEMO_SHIFT_RANGE[0] <= shift <= DEMO_SHIFT_RANGE[1]:
            return "Noise shift must be between {:g} and {:g}.".format(*DEMO_SHIFT_RANGE)
        if any(not 1 <= n <= DEMO_MAX_STEPS or not is_whole(n) for n in steps):
            return f"Steps per stage must be whole numbers from 1 to {DEMO_MAX_STEPS}."
        if not 0 <= seed <= MAX_SEED or not is_whole(seed):
            return f"Seed must be a whole number from 0 to {MAX_SEED}."
        return None

    def named(self, condition) -> str:
        """The class or prompt as the status line names it: a long prompt shortened, and one longer
        than the text length said to be cut (the model reads only its first tokens)."""
        if not self.text:
            return f"class {int(condition)}"  # (an API client may send 207.0)
        prompt = str(condition)
        named = f"prompt {prompt if len(prompt) <= SHOWN_PROMPT_CHARS else prompt[:SHOWN_PROMPT_CHARS] + '...'!r}"
        tokenizer = self.prompt_encoder.tokenizer
        ids, _, truncated = tokenizer.tokenize([prompt])
        if truncated[0]:
            named += f" (cut to its first {tokenizer.max_length} tokens: the model reads no more)"
        if tokenizer.has_unknown_text(ids)[0]:
            named += " (some of its text is unknown to the tokenizer, read as <unk>: the model learns nothing from it)"
        return named

    def compile_key(self, num_images, solver, cfg, steps) -> tuple:
        # The sampler compiles per batch, solver, Euler step counts (dopri5 picks its own steps) and
        # guided or not (CFG 1 is unguided).
        return (int(num_images), solver, float(cfg) == 1.0, tuple(int(n) for n in steps) if solver == "euler" else ())

    def drop_compiled_past_the_kept_settings(self, key) -> None:
        """Before a new setting past COMPILED_SETTINGS_KEPT, drops every compiled program: jax keeps
        each for good, and a class moving the step sliders would grow the server without end."""
        if key not in self.compiled and len(self.compiled) >= COMPILED_SETTINGS_KEPT:
            import jax

            jax.clear_caches()  # (the whole process's: it holds no per-program eviction)
            self.compiled.clear()  # so the page says it compiles again

    def generate(self, condition, num_images, solver, cfg, shift, steps, seed) -> list[str]:
        """PNG paths of the images; the same request always gives the same images."""
        options = dict(steps_per_stage=[int(n) for n in steps], cfg_scale=float(cfg), solver=solver,
                       shift=float(shift), seed=int(seed))
        n, key = int(num_images), self.compile_key(num_images, solver, cfg, steps)
        self.drop_compiled_past_the_kept_settings(key)
        if self.text:
            images = self.sampler.generate_from_prompts(self.prompt_encoder, [str(condition)] * n,
                                                        negative_prompt=self.negative_prompt, **options)
        else:
            images = self.sampler.generate([int(condition)] * n, **options)
        self.compiled.add(key)
        os.makedirs(self.output_dir, exist_ok=True)  # a page on another host takes one idle for a day as gone
        folder = storage.make_folder(self.output_dir)  # (with mkdtemp's 0700 only this user could see the images)
        request = self.request_name(condition, seed, cfg)
        paths = []
        for i, image in enumerate(images):
            paths.append(os.path.join(folder, f"pixelflow_{request}_{i}.png"))
            Image.fromarray(np.asarray(image)).save(paths[-1])
        remove_old_requests(self.output_dir)
        return paths

    def request_name(self, condition, seed, cfg) -> str:
        """A student's downloads of several requests land in one folder: the name says which class and
        seed, and the CFG scale where it is not the page's first (two CFGs at one class and seed were
        both pixelflow_class207_seed7_0.png)."""
        name = f"seed{int(seed)}" if self.text else f"class{int(condition)}_seed{int(seed)}"
        shown_cfg = f"{float(cfg):g}"  # a slider's 2.4000000000000004 is its 2.4
        return name if shown_cfg == f"{self.default_cfg:g}" else f"{name}_cfg{shown_cfg}"


def page_heading(demo: DemoSampler, weights: str) -> str:
    """The page's title and what it samples. Which weights only where the checkpoint holds two sets
    to choose from (api.weights_chosen): a converted or exported folder holds the one set it was
    written from, which an export of a run's raw weights made the page call 'ema weights'. An
    export of a run says which of the run's sets it holds, in its config.yaml (and a conversion of the
    export keeps it): quoted from there."""
    chosen = f" ({named} weights)" if (named := weights_chosen(demo.source, weights)) else ""
    if not chosen and (note := weights_note(demo.source)):
        chosen = f"; {note}"
    return (f"# PixelFlow in JAX\n{demo.ckpt.resolution} px, {demo.ckpt.num_stages} stages, "
            f"{'text' if demo.text else 'class'}-conditional checkpoint `{demo.source.label}`{chosen}")


def build_page(demo: DemoSampler, config):
    import gradio as gr

    stages = demo.ckpt.num_stages
    default_steps = config.sample.steps_per_stage
    default_steps = list(default_steps) if isinstance(default_steps, (list, tuple)) else [default_steps] * stages
    # Gradio copies every served image into its own cache: clear copies older than a day, hourly.
    with gr.Blocks(title="PixelFlow (JAX)", delete_cache=(3600, 86400)) as page:
        gr.Markdown(page_heading(demo, config.sample.weights))
        with gr.Row():
            with gr.Column():
                if demo.text:
                    condition = gr.Textbox(label="Prompt", placeholder="a red fox in the snow")
                else:
                    choices = class_choices(demo.num_classes, demo.trained_classes)
                    condition = gr.Dropdown(choices=choices, value=choices[0][1], label="Class")
                solver = gr.Radio(list(SOLVERS), value=config.sample.solver, label="Solver")
                cfg = gr.Slider(*DEMO_CFG_RANGE, value=float(config.sample.cfg_scale), step=0.1, label="CFG")
                shift = gr.Slider(*DEMO_SHIFT_RANGE, value=float(config.sample.shift), step=1.0, label="Noise shift")
                steps = [gr.Slider(1, DEMO_MAX_STEPS, value=int(default_steps[s]), step=1, label=f"Steps, stage {s}")
                         for s in range(stages)]
                seed = gr.Number(value=int(config.sample.seed), label="Seed")  # (precision=0 would round 0.5 to 0)
                num_images = gr.Slider(1, demo.max_images, value=min(2, demo.max_images), step=1,
                                       label="Number of images")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="status")
                gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery")
                files = gr.File(label="PNGs", file_count="multiple")

        def run(condition, solver, cfg, shift, seed, num_images, *steps):
            problem = demo.check(condition, solver, num_images, cfg, shift, steps, seed)
            if problem:
                yield gr.update(value=f"**Not generated:** {problem}"), gr.update(), gr.update()
                return
            if demo.compile_key(num_images, solver, cfg, steps) not in demo.compiled:
                yield (gr.update(value="Compiling the sampler for these settings (the first request for a new "
                                       "batch size, step count or solver, or CFG 1, takes longer; repeats are "
                                       "fast)..."),
                       gr.update(), gr.update())
            start = time.perf_counter()
            try:
                paths = demo.generate(condition, num_images, solver, cfg, shift, steps, seed)
            except Exception as error:  # shown on the page; the server keeps serving
                yield gr.update(value=f"**Failed:** {type(error).__name__}: {error}"), gr.update(), gr.update()
                return
            images = f"{len(paths)} image{'s' if len(paths) > 1 else ''}"
            yield (gr.update(value=f"{images} for {demo.named(condition)} in {time.perf_counter() - start:.1f} s."
                                   + (DOPRI5_NOTE if solver == "dopri5" else "")), paths, paths)

        # preprocess=False: the values reach run() as sent, and check() answers on the page. Gradio's
        # own checks answered an API client's string or out-of-range number with its generic error
        # (a 1000-value list for a class), and a traceback on the server's terminal.
        # concurrency_limit=1, whatever GRADIO_DEFAULT_CONCURRENCY_LIMIT says: one request samples (its
        # batch holds the accelerator, and demo.compiled is the page's one record); the others wait in
        # Gradio's queue, whose place each page shows.
        button.click(run, [condition, solver, cfg, shift, seed, num_images, *steps], [status, gallery, files],
                     api_name="generate", preprocess=False, concurrency_limit=1)
    name_the_values_of_miscounted_requests(page)
    return page


def name_the_values_of_miscounted_requests(page) -> None:
    """A request to the page's API with too few values was refused by Gradio before run() saw it:
    the caller read '{"error": null}', and the server's terminal a traceback listing component
    objects; extra values were dropped unread. Now either is refused with the values the page
    takes, in order, and the terminal stays clear. (gradio_client fills missing values with the
    page's defaults itself: raw HTTP requests are the ones refused for too few.)"""
    import gradio as gr

    gradios_check = getattr(page, "validate_inputs", None)
    if gradios_check is None:  # a Gradio that checks requests elsewhere: its own error stands
        return

    def check(block_fn, inputs):
        if len(inputs) != len(block_fn.inputs):
            expected = ", ".join(f"'{block.label}'" for block in block_fn.inputs)
            raise gr.Error(f"This request sent {len(inputs)} values; the page takes {len(block_fn.inputs)}, in this "
                           f"order: {expected}.", print_exception=False)
        gradios_check(block_fn, inputs)

    page.validate_inputs = check


def check_port_free(host: str, port: int) -> None:
    """Before the model loads, and after Gradio could not listen: a port taken (or closed to this
    user) is one clear error naming the flag that changes it. A port a page served until just now
    is free: its connections left in TIME_WAIT keep no server from listening (SO_REUSEADDR)."""
    import errno
    import socket

    with socket.socket() as probe:
        if os.name == "posix":  # as the server binds: the closed connections of a page just stopped do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            cause = "in use" if e.errno == errno.EADDRINUSE else "not open to this process"
            raise ValueError(f"port {port} on {host} is {cause} ({e.strerror}): choose another with "
                             "--config.demo.port=PORT") from None


def gradio_folder() -> str:
    """Where Gradio keeps its files (its copies of the page's images): GRADIO_TEMP_DIR, else gradio/
    in the temporary folder, as Gradio chooses it."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")


def check_gradio_folder() -> None:
    """Gradio's folder, writable, before the model loads. Unset, it is one folder for every user of the
    machine, owned by the first to serve any Gradio page: another user's page stopped as it was built,
    with a traceback of Gradio's PermissionError."""
    folder = gradio_folder()
    setting = ("GRADIO_TEMP_DIR" if os.environ.get("GRADIO_TEMP_DIR") else
               "Gradio's default, which every user of this machine shares unless GRADIO_TEMP_DIR is set")
    storage.check_writable(folder, fix=f"Gradio keeps the page's files there ({setting}): set GRADIO_TEMP_DIR to a "
                                       "folder of your own (GRADIO_TEMP_DIR=$HOME/gradio_files, say) and start the "
                                       "page again")


def run(config, workdir: str = "") -> None:
    # Checked before the port is probed or a folder made (no workdir: the page's images go to a temporary folder).
    config, workdir = job_config(config, "demo"), job_workdir(workdir) if workdir else workdir
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    host = "0.0.0.0" if config.demo.share_on_network else "127.0.0.1"
    check_port_free(host, int(config.demo.port))
    check_gradio_folder()
    if not config.sample.checkpoint:  # a typo'd workdir is named as one, before it is made below
        sampling_checkpoint(config.sample, workdir)
    if not outputs_are_temporary(workdir):  # its demo_outputs/: known before the model loads
        storage.check_writable(workdir)
        check_demo_outputs(workdir)
    demo = DemoSampler(config, workdir)
    page = build_page(demo, config)
    with sigterm_stops():  # a SIGTERM stops the page as Ctrl-C does: Terminated, raised where it waits below
        serve(page, host, int(config.demo.port), demo.output_dir if outputs_are_temporary(workdir) else None)


def serve(page, host: str, port: int, temporary_outputs: str | None) -> None:
    """Serves the page until it closes or a stop is raised; its temporary outputs' folder (None:
    none) removed after. Its address is printed once it listens."""
    try:
        try:  # quiet: Gradio's banner suggests share=True (a public gradio.live tunnel), which this demo never opens
            # max_file_size=0: the page takes no files, but Gradio's upload route is open on every page
            # and stored a visitor's file of any size in the temporary folder (a disk filled remotely); now 413.
            # api_open=False: Gradio's direct route (POST /gradio_api/run/generate, open off Hugging Face
            # Spaces) ran a request beside the one sampling, past the queue and its one-at-a-time limit.
            page.queue(api_open=False).launch(server_name=host, server_port=port, share=False, inbrowser=False,
                                              quiet=True, prevent_thread_lock=True, max_file_size=0)
        except OSError:  # Gradio's words name its environment variable, not the flag
            check_port_free(host, port)  # taken since run() checked it, while the model loaded (another page?)
            raise
        where = ("on every network interface of this machine" if host == "0.0.0.0" else
                 "on this machine only (--config.demo.share_on_network=True serves it to the network)")
        print(f"demo page: http://{host}:{port}/ {where}; Ctrl-C stops it", flush=True)
        # waits here, not in Gradio's launch, which took Ctrl-C for a normal end (exit status 0)
        while page.is_running:
            time.sleep(0.1)
    finally:  # main.py ends a stopped job without the interpreter's teardown, so no atexit cleanup runs
        page.close()
        if temporary_outputs:
            shutil.rmtree(temporary_outputs, ignore_errors=True)
