"""The demo page (`main.py --mode=demo`): driven by headless Chromium (pick a class, generate, see the
images), and what it does with odd requests, stops, ports and its output folders."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image
import pytest

from conftest import REPO, c2i_config, fixture_dir, free_port
from pixelflow_jax.command_line import EXIT_INTERRUPTED

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (.ci/run installs it)


@pytest.fixture
def demo_server(converted, tmp_path):
    port = free_port()
    log = open(tmp_path / "demo.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                               "--mode=demo", f"--config.sample.checkpoint={converted['c2i_tiny']}",
                               f"--config.demo.port={port}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the demo server did not start: {open(tmp_path / 'demo.log').read()[-2000:]}")
            time.sleep(0.5)
    yield url
    server.send_signal(signal.SIGINT)  # Ctrl-C: a stopped job's status, as every mode ends (Gradio's wait said 0)
    assert server.wait(timeout=30) == EXIT_INTERRUPTED
    log.close()
    assert open(tmp_path / "demo.log").read().endswith("stopped: interrupted (Ctrl-C)\n")


def test_pick_a_class_generate_and_see_the_images(demo_server, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = os.environ.get("PIXELFLOW_TEST_ARTIFACTS", str(tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(demo_server)
        box = page.get_by_label("Class")  # a 1000-class model: ImageNet names, filtered by typing
        box.click()
        box.press("Control+a")
        box.press("Backspace")
        box.press_sequentially("Golden", delay=30)
        page.get_by_role("option", name="207: Golden Retriever").click()

        # Bad input gives a message on the page, and the server carries on.
        seed = page.get_by_label("Seed")
        seed.fill("4294967296")  # 2**32: jax would draw seed 0's noise
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Not generated')",
                               timeout=30_000)
        assert "Seed must be a whole number from 0 to 4294967295" in page.locator("#status").inner_text()

        seed.fill("7")
        count = page.get_by_label("number input for Number of images")
        count.fill("3")
        count.press("Enter")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 3", timeout=180_000)
        assert page.locator("#gallery img").count() == 3
        assert "3 images for class 207" in page.locator("#status").inner_text()
        page.screenshot(path=os.path.join(artifacts, "demo_page.png"), full_page=True)
        browser.close()
    assert os.path.getsize(os.path.join(artifacts, "demo_page.png")) > 10_000

    # Through the page's API, what the page cannot send is answered in our words, and the server's
    # terminal stays free of tracebacks (Gradio's checks raised on a string for a slider and listed
    # all 1000 classes for an unknown one). Arguments: class, solver, cfg, shift, seed, images, steps.
    from gradio_client import Client

    client = Client(demo_server, verbose=False)
    for request, message in [((207, "euler", "4", 1.0, 7, 1, 1, 1, 1, 1), "CFG must be a number, got '4'."),
                             ((1000, "euler", 4.0, 1.0, 7, 1, 1, 1, 1, 1),
                              "Class must be a whole number from 0 to 999"),
                             ((207, "euler", 4.0, 1.0, 0.5, 1, 1, 1, 1, 1), "Seed must be a whole number")]:
        status = client.predict(*request, api_name="/generate")[0]  # the status line's update
        assert status["value"].startswith(f"**Not generated:** {message}"), status
    assert "Traceback" not in open(tmp_path / "demo.log").read()


def api_call(url: str, values: list) -> str:
    """The server-sent events answering a request to the page's API over plain HTTP (as curl sends it)."""
    request = urllib.request.Request(url + "gradio_api/call/generate", data=json.dumps({"data": values}).encode(),
                                     headers={"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=120).read().decode()


def test_an_api_request_with_too_few_or_too_many_values_is_told_the_values_the_page_takes(demo_server, tmp_path):
    """Too few values got '{"error": null}' from Gradio, and the server's terminal a traceback listing
    component objects; extra values were dropped unread."""
    expected = ("the page takes 10, in this order: 'Class', 'Solver', 'CFG', 'Noise shift', 'Seed', 'Number of "
                "images', 'Steps, stage 0', 'Steps, stage 1', 'Steps, stage 2', 'Steps, stage 3'.")
    for values in ([207, "euler", 4.0, 1.0, 7, 1], [207, "euler", 4.0, 1.0, 7, 1, 1, 1, 1, 1, 1]):
        answer = api_call(demo_server, values)
        assert answer.startswith("event: error\n"), answer
        error = json.loads(answer.split("data: ", 1)[1].splitlines()[0])["error"]
        assert error == f"This request sent {len(values)} values; {expected}"
    assert "1 image for class 207" in api_call(demo_server, [207, "euler", 4.0, 1.0, 7, 1, 1, 1, 1, 1])
    assert "Traceback" not in open(tmp_path / "demo.log").read()


def test_requests_are_sampled_one_at_a_time_and_a_waiting_visitor_sees_their_place_in_the_queue(monkeypatch):
    """Gradio runs one request of an event at a time unless GRADIO_DEFAULT_CONCURRENCY_LIMIT says
    more: set for another app, it had this page sample several requests at once (the sampler's
    compiled-settings record shared, twice the accelerator memory for two batches). Now one samples;
    the others wait in Gradio's queue, each page showing its place, and a page closed leaves it."""
    import threading

    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("GRADIO_DEFAULT_CONCURRENCY_LIMIT", "3")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    release, reached, sampling, started = threading.Event(), threading.Event(), [], []

    def generate(*request):  # the first request holds the sampler until released
        started.append(request)
        sampling.append(request)
        reached.set()
        release.wait(120)
        sampling.remove(request)
        return []

    with bare_page_served(generate=generate) as (page, url), contextlib.ExitStack() as releasing:
        releasing.callback(release.set)  # before the page closes: a held request would hold its close
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            tabs = [browser.new_page() for _ in range(3)]
            for tab in tabs:
                tab.goto(url)
            tabs[0].get_by_role("button", name="Generate").click()
            assert reached.wait(30), "the first request never reached the sampler"
            for tab, shown in zip(tabs[1:], ["queue: 1/1", "queue: 2/2"]):  # (the queue's size as each joined)
                tab.get_by_role("button", name="Generate").click()
                tab.wait_for_function(f"document.body.innerText.includes({shown!r})", timeout=30_000)
            assert len(sampling) == 1
            tabs.pop().close()  # a visitor leaves while waiting: the request goes with them
            deadline = time.time() + 30
            while len(page._queue) > 1:  # (Gradio's queue: the requests waiting)
                assert time.time() < deadline, "the closed page's request stayed in the queue"
                time.sleep(0.1)
            release.set()
            for tab in tabs:
                tab.wait_for_function("document.querySelector('#status').innerText.includes('for class 0')",
                                      timeout=30_000)
            browser.close()
        assert len(started) == 2


def test_a_request_posted_past_the_queue_is_refused_so_requests_still_sample_one_at_a_time(monkeypatch):
    """Gradio keeps a direct route beside the queue (POST /gradio_api/run/generate), open wherever the
    page is not on Hugging Face Spaces: a visitor's script sampled there while the queue's request
    sampled, past the one-at-a-time limit (twice the accelerator memory; the compiled-settings record
    shared). Now that route is closed; requests join the queue (the page, gradio_client, /call/)."""
    import threading
    import urllib.error

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    release, reached, sampling, most_at_once = threading.Event(), threading.Event(), [], [0]

    def generate(*request):  # the first request holds the sampler until released
        sampling.append(request)
        most_at_once[0] = max(most_at_once[0], len(sampling))
        reached.set()
        release.wait(60)
        sampling.remove(request)
        return []

    values = json.dumps({"data": [0, "euler", 4.0, 1.0, 7, 1, 1, 1, 1, 1]}).encode()
    with bare_page_served(generate=generate) as (_, url), contextlib.ExitStack() as releasing:
        releasing.callback(release.set)  # before the page closes: a held request would hold its close
        queued = threading.Thread(target=api_call, args=(url, json.loads(values)["data"]), daemon=True)
        queued.start()
        assert reached.wait(30), "the queued request never reached the sampler"
        direct = urllib.request.Request(url + "gradio_api/run/generate", data=values,
                                        headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(direct, timeout=30)
        release.set()
        queued.join(timeout=30)
    assert refused.value.code == 404 and "join the queue" in refused.value.read().decode()
    assert most_at_once[0] == 1


@contextlib.contextmanager
def bare_page_served(**demo_fields):
    """The page of a DemoSampler without a model (`demo_fields` set on it, e.g. generate), served on
    127.0.0.1 in a thread: (the page, its URL)."""
    import threading
    import types

    from pixelflow_jax import demo_app
    from pixelflow_jax.api import CheckpointSource

    demo = bare_demo(ckpt=types.SimpleNamespace(num_stages=4, resolution=64), trained_classes=None,
                     source=CheckpointSource("a-folder-here", "ckpt"), **demo_fields)
    page, port = demo_app.build_page(demo, c2i_config()), free_port()
    server = threading.Thread(target=demo_app.serve, args=(page, "127.0.0.1", port, None), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:  # (urllib's URLError is one)
                assert time.time() < deadline, "the page did not start"
                time.sleep(0.2)
        yield page, url
    finally:
        page.close()
        server.join(timeout=30)


def test_the_page_takes_no_uploads_so_a_visitor_cannot_fill_the_servers_disk(monkeypatch):
    """The page has no file input, but Gradio's upload route is open on every page, without a size
    limit unless one is set: a visitor's POST stored a file of any size in the server's temporary
    folder (a security review filled /tmp with it). Now anything but an empty file is refused."""
    import urllib.error

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    body = (b'--XX\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 1024 + b"\r\n--XX--\r\n")
    with bare_page_served() as (_, url):
        upload = urllib.request.Request(url + "gradio_api/upload", data=body,
                                        headers={"Content-Type": "multipart/form-data; boundary=XX"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(upload, timeout=30)
    assert refused.value.code == 413


def test_the_request_count_check_leaves_another_gradios_page_as_it_is():
    """Page.validate_inputs is not documented Gradio API: where a version lacks it, the page still builds."""
    from pixelflow_jax.demo_app import name_the_values_of_miscounted_requests

    page = type("PageOfAnotherGradio", (), {})()
    name_the_values_of_miscounted_requests(page)
    assert vars(page) == {}


def test_text_page_guides_away_from_the_configured_negative_prompt(converted, tmp_path):
    """The page ignored sample.negative_prompt (always ""), unlike the sampling job."""
    import numpy as np
    from PIL import Image

    from configs import t2i
    from pixelflow_jax.demo_app import DemoSampler
    from test_t5 import write_tiny_t5_folder

    encoder = str(tmp_path / "t5")
    write_tiny_t5_folder(encoder, d_model=20)
    config = t2i.get_config("tiny")
    config.sample.checkpoint, config.sample.text_encoder = converted["t2i_tiny"], encoder
    config.sample.max_text_tokens, config.sample.negative_prompt = 16, "the moon"
    config.sample.cfg_scale = 5.0  # the CFG slider's first value, which the PNGs' names leave out
    demo = DemoSampler(config, str(tmp_path / "page"))
    request = dict(num_images=1, solver="euler", cfg=4.0, shift=1.0, steps=[1, 1, 1, 1], seed=0)
    path = demo.generate("a red cat", **request)[0]
    assert os.path.basename(path) == "pixelflow_seed0_cfg4_0.png" and demo.request_name(None, 0, 5.0) == "seed0"
    page = np.asarray(Image.open(path))
    umask = os.umask(0)
    os.umask(umask)  # the request's folder as a plain makedirs makes it: mkdtemp's 0700 hid the images from others
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o777 & ~umask
    options = dict(steps_per_stage=[1, 1, 1, 1], cfg_scale=4.0, solver="euler", shift=1.0, seed=0)
    job = [demo.sampler.generate_from_prompts(demo.prompt_encoder, ["a red cat"], negative_prompt=negative,
                                              **options)[0]
           for negative in ("the moon", "")]
    np.testing.assert_array_equal(page, job[0])
    assert not np.array_equal(job[0], job[1])  # the negative prompt matters at this CFG
    # The status line: a 5,000-character prompt was shown whole, and not said to be cut to 16 tokens.
    assert demo.named("a red cat") == "prompt 'a red cat'"
    long = " ".join(["a red cat"] * 600)
    assert demo.named(long) == f"prompt {long[:80] + '...'!r} (cut to its first 16 tokens: the model reads no more)"
    assert demo.named("a red cat \U0001f98a").endswith("(some of its text is unknown to the tokenizer, read as <unk>: "
                                                     "the model learns nothing from it)")  # the fox emoji


def bare_class_demo(num_classes: int = 10):
    """A class page's DemoSampler without a model: check() needs only these fields."""
    from pixelflow_jax.demo_app import DemoSampler

    demo = DemoSampler.__new__(DemoSampler)
    demo.text, demo.num_classes, demo.max_images, demo.compiled = False, num_classes, 8, set()
    return demo


def test_a_class_id_of_more_digits_than_python_reads_is_answered_on_the_page_in_one_short_line():
    """A class id sent as a string of 5,001 digits (Gradio's API lists the ids as strings) raised
    int()'s ValueError in check(): the caller read '{"error": null}', the server a traceback. The
    refusal shows the value shortened, as it does any long value sent."""
    import sys

    demo = bare_class_demo()
    good = dict(condition=3, solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    too_long = "1" + "0" * sys.get_int_max_str_digits()
    message = demo.check(**{**good, "condition": too_long})
    assert message.startswith("Class must be a whole number from 0 to 9, got '1000"), message
    assert len(message) < 100, message
    assert demo.check(**{**good, "condition": "12"}) == "Class must be a whole number from 0 to 9, got 12."
    long_list = list(range(1000))
    message = demo.check(**{**good, "condition": long_list})
    assert message.startswith("Class must be a whole number from 0 to 9, got [0, 1, 2,") and len(message) < 100
    assert len(demo.check(**{**good, "cfg": "4" * 10_000})) < 100


def test_a_prompt_of_only_invisible_characters_is_refused_on_the_page_as_the_sampling_job_refuses_it():
    """A prompt of zero-width spaces, a byte-order mark or control characters tokenizes to nothing:
    the page sampled it as the empty prompt (the negative prompt's images, said to be the prompt's),
    where --mode=sample refuses it."""
    demo = bare_class_demo()
    demo.text = True
    good = dict(condition="a red disk", solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    assert demo.check(**good) is None
    assert demo.check(**{**good, "condition": "a red disk \u200b"}) is None
    for invisible in ("\u200b\u200b", "\ufeff", "\x01\x02", " \u200b\n"):
        assert demo.check(**{**good, "condition": invisible}) == (
            "The prompt holds no visible text, only zero-width, byte-order-mark or control characters, which the "
            "tokenizer drops: type the prompt."), repr(invisible)
    # Half a surrogate pair, as a JSON escape sends it: the request failed ('Failed: ConfigError: prompts holds ...').
    assert demo.check(**{**good, "condition": "\ud800"}).startswith("The prompt holds U+D800, half of a UTF-16")
    assert demo.check(**{**good, "condition": "a \ud800 red disk"}) == (
        "The prompt holds U+D800, half of a UTF-16 surrogate pair, after 'a ' in 'a \\ud800 red disk': text cut inside "
        "a character such as an emoji, or one escape of a pair decoded alone; give it as UTF-8 text.")


def test_a_pages_prompt_of_escaped_bytes_is_not_blamed_on_the_locale_of_the_server(monkeypatch):
    """A request's JSON escapes (\\udcc3\\udca9, the UTF-8 of 'e acute' as a command line's escaped bytes)
    were never decoded by this Python's locale: a server in a C locale must not tell the page's user to
    run it with LC_ALL=C.UTF-8."""
    demo = bare_class_demo()
    demo.text = True
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")  # a server started under LC_ALL=C
    said = demo.check(condition="caf\udcc3\udca9", solver="euler", num_images=2, cfg=4.0, shift=1.0,
                      steps=[2, 2, 2, 2], seed=0)
    assert said.startswith("The prompt holds the byte 0xc3, which is not UTF-8") and "LC_ALL" not in said, said


def test_a_port_taken_while_the_model_loaded_is_named_with_the_flag_and_no_address_is_printed(monkeypatch, capsys):
    """Two pages started together on one port both pass the start's port check; the second found it
    taken once its model had loaded: it printed 'demo page: http://127.0.0.1:PORT/' (the first
    page's address) and then Gradio's OSError traceback, which names its environment variable."""
    import socket

    import gradio as gr

    from pixelflow_jax import demo_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with gr.Blocks() as page:
        gr.Markdown("another page")
    with socket.socket() as first_page:
        first_page.bind(("127.0.0.1", 0))
        first_page.listen()
        port = first_page.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^port {port} on 127.0.0.1 is in use .*--config.demo.port=PORT$"):
            demo_app.serve(page, "127.0.0.1", port, None)
    assert "demo page:" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_demo_outputs_link_or_file_is_named_and_left_alone(tmp_path, kind):
    from pixelflow_jax.demo_app import demo_output_dir

    mine = tmp_path / "my_pictures"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"png")
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "link":
        (workdir / "demo_outputs").symlink_to(mine)
    else:
        (workdir / "demo_outputs").write_text("notes")
    with pytest.raises(ValueError, match=f"demo_outputs is a {kind}, where the page keeps its images"):
        demo_output_dir(str(workdir))
    assert os.listdir(mine) == ["holiday.png"]


def test_the_demo_page_keeps_only_its_newest_requests_on_disk(tmp_path):
    from pixelflow_jax.demo_app import remove_old_requests

    for i in range(5):
        (tmp_path / f"request{i}").mkdir()
        (tmp_path / f"request{i}" / "pixelflow_0_0.png").write_bytes(b"png")
        os.utime(tmp_path / f"request{i}", ns=(i * 10**9, i * 10**9))  # request4 is the newest
    remove_old_requests(str(tmp_path), keep=3)
    assert sorted(os.listdir(tmp_path)) == ["request2", "request3", "request4"]
    remove_old_requests(str(tmp_path), keep=3)
    assert len(os.listdir(tmp_path)) == 3


def test_a_bucket_workdir_demo_removes_the_output_folders_of_killed_pages(tmp_path, monkeypatch):
    """A page of a bucket workdir keeps its images in /tmp: a later page removes those of killed
    pages once untouched for an hour, never those of a page still serving, nor a recent one (a page
    in another container that shares /tmp and the hostname: its process is not visible here)."""
    import tempfile

    from pixelflow_jax.demo_app import demo_output_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here, hour_ago = socket.gethostname(), time.time() - 3700
    dead, recent, alive = (tmp_path / f"pixelflow_demo-{here}-{pid}-x" for pid in (999999999, 999999998, os.getppid()))
    for folder in (dead, recent, alive, tmp_path / "pixelflow_demo_other"):
        folder.mkdir()
    (dead / "request").mkdir()
    for path in (dead / "request", dead, alive):
        os.utime(path, (hour_ago, hour_ago))
    mine = demo_output_dir("gs://bucket/page")
    assert os.path.isdir(mine) and os.path.basename(mine).startswith(f"pixelflow_demo-{here}-{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == sorted([recent.name, alive.name, "pixelflow_demo_other",
                                                   os.path.basename(mine)])


def test_a_demo_request_of_non_numbers_through_the_api_is_answered_on_the_page():
    from pixelflow_jax.demo_app import DemoSampler

    demo = DemoSampler.__new__(DemoSampler)  # check() needs no model
    demo.text, demo.num_classes, demo.max_images = False, 10, 8
    good = dict(condition=3, solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    assert demo.check(**good) is None
    assert demo.check(**{**good, "condition": 9.0, "seed": 7.0}) is None  # JSON numbers may come as floats
    assert demo.check(**{**good, "condition": "3"}) is None  # Gradio's API lists the dropdown's ids as strings
    for change, message in [({"cfg": None}, "CFG is empty: give a number."),
                            ({"seed": None}, "Seed is empty: give a number."),  # the page's Seed box emptied
                            ({"cfg": "4"}, "CFG must be a number, got '4'."),
                            ({"steps": [2, None, 2, 2]}, "Steps of stage 1 is empty: give a number."),
                            ({"seed": float("nan")}, "Seed must be a number, got nan."),
                            # Gradio's own checks no longer run first: these reached the model or were rounded.
                            ({"seed": 0.5}, "Seed must be a whole number from 0 to 4294967295."),
                            ({"condition": 10}, "Class must be a whole number from 0 to 9, got 10."),
                            ({"condition": -1}, "Class must be a whole number from 0 to 9, got -1."),
                            ({"condition": "3.0"}, "Class must be a whole number from 0 to 9, got '3.0'."),
                            ({"condition": "12"}, "Class must be a whole number from 0 to 9, got 12."),
                            ({"condition": True}, "Class must be a whole number from 0 to 9, got True."),
                            ({"condition": float("inf")}, "Class must be a whole number from 0 to 9, got inf."),
                            ({"condition": None}, "Pick a class."),
                            ({"solver": "heun"}, "Solver must be one of euler, dopri5, got 'heun'.")]:
        assert demo.check(**{**good, **change}) == message
    demo.text = True
    assert demo.check(**{**good, "condition": "a red fox"}) is None
    assert demo.check(**{**good, "condition": " "}) == "Type a prompt."
    assert demo.check(**{**good, "condition": None}) == "Type a prompt."  # an API client's null
    assert demo.check(**{**good, "condition": ["a red fox"]}) == "The prompt must be text, got ['a red fox']."


def bare_demo(**fields):
    """A DemoSampler without a model: check(), named() and generate() need only these fields."""
    from pixelflow_jax.demo_app import DemoSampler

    demo = DemoSampler.__new__(DemoSampler)
    demo.text, demo.num_classes, demo.max_images, demo.compiled, demo.default_cfg = False, 10, 8, set(), 4.0
    for name, value in fields.items():
        setattr(demo, name, value)
    return demo


def test_a_demo_request_is_accepted_at_each_limit_the_page_states_and_refused_just_past_it():
    """The page's limits are inclusive at both ends (a slider's own ends, seed 2**32 - 1, class 0);
    one step past either end, a fraction where a count goes, or True where a number goes is
    refused naming that limit. A class id sent as text with blanks is read as the id; digits that
    are no decimal ('²') are refused, not a crash in int()."""
    from pixelflow_jax.validation import DEMO_CFG_RANGE, DEMO_MAX_STEPS, DEMO_SHIFT_RANGE, MAX_SEED

    demo = bare_demo()
    good = dict(condition=3, solver="euler", num_images=2, cfg=4.0, shift=1.0, steps=[2, 2, 2, 2], seed=0)
    accepted = [{"condition": 0}, {"condition": 9}, {"condition": " 7 "}, {"num_images": 1}, {"num_images": 8},
                {"num_images": 8.0}, {"cfg": DEMO_CFG_RANGE[0]}, {"cfg": DEMO_CFG_RANGE[1]},
                {"shift": DEMO_SHIFT_RANGE[0]}, {"shift": DEMO_SHIFT_RANGE[1]}, {"steps": [1, DEMO_MAX_STEPS, 1, 1]},
                {"seed": MAX_SEED}, {"seed": 5.0}]
    for change in accepted:
        assert demo.check(**{**good, **change}) is None, change
    images = "Number of images must be a whole number from 1 to 8."
    cfg = f"CFG must be between {DEMO_CFG_RANGE[0]:g} and {DEMO_CFG_RANGE[1]:g}."
    shift = f"Noise shift must be between {DEMO_SHIFT_RANGE[0]:g} and {DEMO_SHIFT_RANGE[1]:g}."
    steps = f"Steps per stage must be whole numbers from 1 to {DEMO_MAX_STEPS}."
    seed = f"Seed must be a whole number from 0 to {MAX_SEED}."
    refused = [({"num_images": 0}, images), ({"num_images": 9}, images), ({"num_images": 2.5}, images),
               ({"cfg": DEMO_CFG_RANGE[0] - 0.1}, cfg), ({"cfg": DEMO_CFG_RANGE[1] + 0.1}, cfg),
               ({"shift": DEMO_SHIFT_RANGE[0] - 0.1}, shift), ({"shift": DEMO_SHIFT_RANGE[1] + 0.1}, shift),
               ({"steps": [2, 0, 2, 2]}, steps), ({"steps": [2, 2, DEMO_MAX_STEPS + 1, 2]}, steps),
               ({"steps": [2, 2, 2, 1.5]}, steps), ({"seed": -1}, seed), ({"seed": MAX_SEED + 1}, seed),
               ({"cfg": True}, "CFG must be a number, got True."),
               ({"condition": "\u00b2"}, "Class must be a whole number from 0 to 9, got '\u00b2'.")]
    for change, message in refused:
        assert demo.check(**{**good, **change}) == message, change


def test_a_demo_request_samples_what_was_asked_and_keeps_one_png_per_image_named_by_its_class_and_seed(tmp_path):
    """generate() gives the sampler the request as the sampling job takes it (whole numbers as
    ints, though JSON may send 7.0; one condition per image), writes each image's pixels to
    pixelflow_classC_seedS_I.png in a new request folder, and leaves only the newest KEPT_REQUESTS folders."""
    from pixelflow_jax import demo_app

    class RecordingSampler:
        def __init__(self):
            self.calls = []

        def generate(self, labels, **options):
            self.calls.append((labels, options))
            return [np.full((4, 4, 3), 40 * i, np.uint8) for i in range(len(labels))]

    older = [tmp_path / f"old{i}" for i in range(demo_app.KEPT_REQUESTS)]
    for age, folder in enumerate(older):
        folder.mkdir()
        os.utime(folder, ns=(age * 10**9, age * 10**9))  # all long before this request
    demo = bare_demo(sampler=RecordingSampler(), output_dir=str(tmp_path))
    paths = demo.generate(3.0, 3.0, "euler", 4, 2, [2.0, 3, 1, 1], 7.0)
    (labels, options), = demo.sampler.calls
    assert labels == [3, 3, 3] and all(type(label) is int for label in labels)
    assert options == dict(steps_per_stage=[2, 3, 1, 1], cfg_scale=4.0, solver="euler", shift=2.0, seed=7)
    assert type(options["seed"]) is int and type(options["cfg_scale"]) is float
    # A student's downloads of class 3 and class 5 at seed 7 were both pixelflow_7_0.png (then 'pixelflow_7_0 (1).png').
    assert [os.path.basename(path) for path in paths] == [f"pixelflow_class3_seed7_{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.full((4, 4, 3), 40 * i, np.uint8))
    assert demo.compile_key(3, "euler", 4.0, [2, 3, 1, 1]) in demo.compiled
    kept = sorted(os.listdir(tmp_path))
    assert len(kept) == demo_app.KEPT_REQUESTS and "old0" not in kept and os.path.dirname(paths[0]) in \
        [str(tmp_path / name) for name in kept]
    # Two CFG values at one class and seed were both pixelflow_class3_seed7_0.png: the page's first CFG (4 here)
    # is left out of the name, any other named (as the slider shows it).
    assert [os.path.basename(path) for path in demo.generate(3, 1, "euler", 2.4000000000000004, 2, [1] * 4, 7)] == [
        "pixelflow_class3_seed7_cfg2.4_0.png"]
    assert demo.request_name(3, 7, 4.000000000000001) == "class3_seed7"



def test_a_request_after_the_pages_folder_was_removed_writes_its_images_into_a_new_one(tmp_path):
    """A page idle for a day on one host of a shared workdir is taken for gone by a page started on
    another, which removes its folder: the next request there failed (FileNotFoundError on the page)."""
    class Sampler:
        def generate(self, labels, **options):
            return [np.zeros((4, 4, 3), np.uint8)] * len(labels)

    demo = bare_demo(sampler=Sampler(), output_dir=str(tmp_path / "demo_outputs" / "page-removed"))
    paths = demo.generate(3, 1, "euler", 4.0, 1.0, [1] * 4, 7)
    assert [os.path.basename(path) for path in paths] == ["pixelflow_class3_seed7_0.png"] and os.path.isfile(paths[0])

def test_a_text_page_request_samples_its_prompt_once_per_image_and_names_the_pngs_by_the_whole_seed(tmp_path):
    """On a text page generate() gives the prompt encoder the prompt once per image, with the
    configured negative prompt, and names the PNGs by the seed as a whole number (JSON may send 7.0)."""
    class RecordingSampler:
        def __init__(self):
            self.calls = []

        def generate_from_prompts(self, encoder, prompts, **options):
            self.calls.append((encoder, prompts, options))
            return [np.full((4, 4, 3), 40 * i, np.uint8) for i in range(len(prompts))]

    encoder = object()
    demo = bare_demo(text=True, sampler=RecordingSampler(), prompt_encoder=encoder, negative_prompt="the moon",
                     output_dir=str(tmp_path))
    paths = demo.generate("a red cat", 2.0, "euler", 4, 2, [2, 3, 1, 1], 7.0)
    (used, prompts, options), = demo.sampler.calls
    assert used is encoder and prompts == ["a red cat", "a red cat"]
    assert options == dict(negative_prompt="the moon", steps_per_stage=[2, 3, 1, 1], cfg_scale=4.0, solver="euler",
                           shift=2.0, seed=7)
    names = [os.path.basename(path) for path in paths]  # (was pixelflow_seed7.0_0.png for the JSON's 7.0)
    assert len(set(names)) == 2 and all(re.search(r"seed7(?!\.0)", name) and "class" not in name for name in names)


def test_the_demo_status_line_names_the_class_as_a_whole_number_and_shortens_only_prompts_past_80_characters():
    """An API client may send class 207.0 (named 'class 207'); a prompt of exactly
    SHOWN_PROMPT_CHARS characters is shown whole, one character more is cut there with '...'."""
    from types import SimpleNamespace

    from pixelflow_jax.demo_app import SHOWN_PROMPT_CHARS

    class PlainTokenizer:  # nothing cut, nothing unknown
        max_length = 16

        def tokenize(self, prompts):
            return np.zeros((len(prompts), 16), np.int32), None, [False] * len(prompts)

        def has_unknown_text(self, ids):
            return [False] * len(ids)

    assert bare_demo().named(207.0) == "class 207"
    demo = bare_demo(text=True, prompt_encoder=SimpleNamespace(tokenizer=PlainTokenizer()))
    exactly = "x" * SHOWN_PROMPT_CHARS
    assert demo.named(exactly) == f"prompt {exactly!r}"
    assert demo.named(exactly + "y") == f"prompt {exactly + '...'!r}"


def test_the_class_picker_lists_imagenet_names_by_id_for_1000_classes_and_numbers_otherwise():
    """Option i must send class id i: a name shifted by one would sample the class beside the one picked."""
    from pixelflow_jax.demo_app import IMAGENET_NAMES, class_choices

    names = json.load(open(IMAGENET_NAMES))
    choices = class_choices(1000)
    assert len(choices) == 1000 and all(choice == (f"{i}: {names[i]}", i) for i, choice in enumerate(choices))
    assert class_choices(3) == [("class 0", 0), ("class 1", 1), ("class 2", 2)]


@pytest.mark.parametrize("share", [False, True])
def test_the_demo_page_binds_to_this_machine_unless_told_to_share(monkeypatch, share):
    """config.demo.share_on_network=False must keep the page (and the checkpoint it samples) off
    the network: 127.0.0.1, not every interface."""
    from pixelflow_jax import demo_app

    class Bound(Exception):
        pass

    def bind(host, port):
        raise Bound(host, port)

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(demo_app, "check_port_free", bind)
    with pytest.raises(Bound) as bound:
        demo_app.run(c2i_config(**{"demo.share_on_network": share, "demo.port": 8123}))
    assert bound.value.args == ("0.0.0.0" if share else "127.0.0.1", 8123)


def test_a_demo_page_stopped_by_sigterm_leaves_a_notebook_as_it_was(monkeypatch, tmp_path):
    """demo_app.run left its SIGTERM handler installed and the stop recorded: in a notebook, every
    sampling job after a page stopped by SIGTERM raised Terminated at its first batch."""
    import signal
    import threading
    import types

    from pixelflow_jax import command_line, demo_app

    class Page:
        def queue(self, **_):
            return self

        def launch(self, **_):
            pass

        @property
        def is_running(self):
            os.kill(os.getpid(), signal.SIGTERM)  # a `kill` meant for the page
            return True

        def close(self):
            pass

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(demo_app, "check_port_free", lambda *_: None)
    monkeypatch.setattr(demo_app, "DemoSampler", lambda *_: types.SimpleNamespace(output_dir=str(tmp_path / "out")))
    monkeypatch.setattr(demo_app, "build_page", lambda *_: Page())
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "out").mkdir()
    with pytest.raises(command_line.Terminated):
        demo_app.run(c2i_config(**{"sample.checkpoint": "ckpt"}), str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is before
    command_line.stop_if_terminated()  # a sampling job's check at each batch: no stop pending
    assert (tmp_path / "out").is_dir()  # a local workdir's demo outputs are kept
    with pytest.raises(command_line.Terminated):
        demo_app.run(c2i_config(**{"sample.checkpoint": "ckpt"}), "")
    assert not (tmp_path / "out").exists()  # a page without a workdir: its temporary folder removed
    heard = []
    signal.signal(signal.SIGTERM, lambda *_: heard.append("SIGTERM"))  # a notebook's own handler
    try:
        with command_line.sigterm_stops():  # a page closed while a dropped SIGTERM waits to be delivered again
            command_line.deliver_again_later(signal.SIGTERM)
        time.sleep(5 * command_line.REDELIVERY_DELAY_S)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert heard == []  # the page's stop, not the notebook's
    served = []  # a page served from a notebook's thread, where signal.signal raises ValueError

    def serve_in_a_thread():
        with command_line.sigterm_stops():
            served.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=serve_in_a_thread)
    thread.start()
    thread.join()
    assert served == [before]


def test_a_dropped_sigterm_delivered_again_as_the_page_closes_never_reaches_the_notebooks_handler(monkeypatch):
    """sigterm_stops gave the notebook its handler back before it forgot a dropped SIGTERM waiting
    to be delivered again: a delivery at that instant went to the notebook's handler (here a
    list; a notebook's own cleanup, or the default handler's exit, elsewhere)."""
    import signal

    from pixelflow_jax import command_line

    real_signal, heard = signal.signal, []

    def delivered_again_the_moment_it_is_restored(signum, handler):
        previous = real_signal(signum, handler)
        if handler is notebooks:  # the delivery's timer fires right then
            command_line._deliver_again(signum)
            time.sleep(5 * command_line.REDELIVERY_DELAY_S)  # for a signal sent to be handled
        return previous

    def notebooks(*_):
        heard.append("SIGTERM")

    before = real_signal(signal.SIGTERM, notebooks)
    try:
        monkeypatch.setattr(command_line.signal, "signal", delivered_again_the_moment_it_is_restored)
        with command_line.sigterm_stops():
            command_line._dropped[signal.SIGTERM] = True  # a SIGTERM dropped while the page served
        monkeypatch.undo()
    finally:
        real_signal(signal.SIGTERM, before)
    assert heard == []

def test_a_page_stopped_by_a_signal_passed_on_as_sigterm_forgets_it_with_the_stop(monkeypatch):
    """A page stopped by SLURM's SIGUSR1 (passed on as a SIGTERM) left that record behind: the notebook's
    next SIGTERM was named 'SIGUSR1, handled as SIGTERM' with exit 138, and its next SIGUSR1, taken for
    one already passed on, was never passed on again."""
    import signal

    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_passed_on", [None])
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    with pytest.raises(command_line.Terminated):
        with command_line.sigterm_stops():
            command_line._pass_on_as_sigterm(signal.SIGUSR1)
            sum(range(1000))  # bytecodes for the handler to run between
    assert command_line._passed_on == [None] and command_line.termination_signal() == ("SIGTERM", 143)


def test_the_demo_compiles_per_euler_step_counts_not_dopri5_ones():
    """The page said "Compiling..." whenever a step slider moved under dopri5, which uses none."""
    from pixelflow_jax.demo_app import DemoSampler

    key = DemoSampler.compile_key
    assert key(None, 2, "euler", 4.0, [2, 2, 2, 2]) != key(None, 2, "euler", 4.0, [2, 3, 2, 2])
    assert key(None, 2, "dopri5", 4.0, [2, 2, 2, 2]) == key(None, 2, "dopri5", 4.0, [2, 3, 2, 2])
    assert key(None, 2, "dopri5", 4.0, [2, 2, 2, 2]) != key(None, 2, "dopri5", 1.0, [2, 2, 2, 2])  # unguided


def test_a_demo_with_steps_for_another_number_of_stages_is_one_line(converted):
    from configs import c2i
    from pixelflow_jax.demo_app import DemoSampler

    config = c2i.get_config("tiny")
    config.sample.update(checkpoint=converted["c2i_tiny"], steps_per_stage=(1, 2, 3))
    with pytest.raises(ValueError, match=r"steps_per_stage gives 3 values; .*c2i_tiny has 4 stages"):
        DemoSampler(config)


def test_a_demo_port_in_use_names_the_flag():
    from pixelflow_jax.demo_app import check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="is in use .*--config.demo.port=PORT"):
            check_port_free("127.0.0.1", busy.getsockname()[1])


def test_a_demo_port_this_user_may_not_bind_is_named_as_not_open_not_as_in_use(monkeypatch):
    """Ports below 1024 need root: 'in use' would send the user looking for a program that holds it."""
    import errno

    from pixelflow_jax.demo_app import check_port_free
    from test_multihost import RefusedProbe

    monkeypatch.setattr(socket, "socket", RefusedProbe)
    monkeypatch.setattr(RefusedProbe, "errno", errno.EACCES)
    with pytest.raises(ValueError, match=r"^port 80 on 127.0.0.1 is not open to this process \(Permission denied\): "
                                         r"choose another with --config.demo.port=PORT$"):
        check_port_free("127.0.0.1", 80)


def test_a_port_a_stopped_page_served_just_now_is_free_for_the_restarted_page():
    """A page stopped with Ctrl-C and started again at once was refused ('port ... is in use'), for
    about a minute: its closed connections to the students' browsers linger in TIME_WAIT on that
    port, which the start's check took for another program; Gradio itself binds through them."""
    from pixelflow_jax.demo_app import check_port_free

    with socket.socket() as page:
        page.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        page.bind(("127.0.0.1", 0))
        page.listen()
        port = page.getsockname()[1]
        browser = socket.create_connection(("127.0.0.1", port))
        served, _ = page.accept()
        served.close()  # the page closes the connection first: TIME_WAIT on its side, on the port
        browser.close()
    check_port_free("127.0.0.1", port)


def test_a_page_drops_its_compiled_programs_after_so_many_settings_so_its_memory_stays_bounded(tmp_path, monkeypatch):
    """Each new batch size or Euler step count compiled programs that the page kept for good: a
    class moving the four step sliders (1-100 each) grew the server by ~5 MB a stage per setting
    on the tiny model (48 programs: +263 MB), request after request. Past COMPILED_SETTINGS_KEPT
    settings the page drops them (memory is reused) and says it compiles again."""
    import jax

    from pixelflow_jax import demo_app

    class Sampler:
        def generate(self, labels, **_):
            return [np.zeros((4, 4, 3), np.uint8)] * len(labels)

    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    demo = bare_demo(sampler=Sampler(), output_dir=str(tmp_path))
    kept = demo_app.COMPILED_SETTINGS_KEPT
    for steps in range(1, kept + 1):
        demo.generate(3, 1, "euler", 4.0, 1.0, [steps, 1, 1, 1], 0)
    demo.generate(3, 1, "euler", 4.0, 1.0, [1, 1, 1, 1], 0)  # a setting compiled before: nothing dropped
    assert cleared == [] and len(demo.compiled) == kept
    demo.generate(3, 1, "euler", 4.0, 1.0, [kept + 1, 1, 1, 1], 0)
    assert cleared == [True]
    assert demo.compiled == {demo.compile_key(1, "euler", 4.0, [kept + 1, 1, 1, 1])}
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:  # the number the README gives
        assert f"The page keeps the programs of {kept} settings compiled" in readme.read()


def test_a_request_whose_sampling_failed_is_not_recorded_as_compiled(tmp_path):
    """The page says 'Compiling...' for settings not in demo.compiled: a request that failed (its
    compile out of memory) compiled nothing, and the next one of those settings compiles again."""
    class FailingSampler:
        def generate(self, labels, **_):
            raise RuntimeError("out of memory while compiling")

    demo = bare_demo(sampler=FailingSampler(), output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="out of memory"):
        demo.generate(3, 2, "euler", 4.0, 1.0, [2, 2, 2, 2], 0)
    assert demo.compiled == set() and os.listdir(tmp_path) == []


def test_a_page_started_in_a_workdir_removes_the_image_folders_of_stopped_pages_and_keeps_the_rest(tmp_path):
    """Each page keeps its images in WORKDIR/demo_outputs/page-HOST-PID-...: a page started there
    removes those of pages stopped or killed, never a page's still serving nor the user's own."""
    from pixelflow_jax.demo_app import demo_output_dir

    outputs, here = tmp_path / "demo_outputs", socket.gethostname()
    stopped, serving, mine = (outputs / name for name in (f"page-{here}-999999999-x", f"page-{here}-{os.getppid()}-y",
                                                          "my_picks"))
    for folder in (stopped, serving, mine):
        (folder / "request").mkdir(parents=True)
    page = os.path.basename(demo_output_dir(str(tmp_path)))
    assert page.startswith(f"page-{here}-{os.getpid()}-")
    assert sorted(os.listdir(outputs)) == sorted([serving.name, mine.name, page])


def test_a_demo_of_a_mistyped_workdir_is_refused_as_one_and_makes_no_folder(tmp_path):
    """Without --config.sample.checkpoint the workdir names the run to sample: one that does not exist
    is refused before the workdir is made for the page's images (else it was made, then called 'not
    a training run', and left behind)."""
    from pixelflow_jax import demo_app
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"/typo does not exist \(a typo\?\)"):
        demo_app.run(c2i_config(**{"demo.port": free_port()}), str(tmp_path / "typo"))
    assert os.listdir(tmp_path) == []


def test_a_gradio_folder_this_user_cannot_write_is_named_with_its_variable_before_the_model_loads(tmp_path,
                                                                                                  monkeypatch):
    """On a shared machine the first user to serve any Gradio page owns Gradio's default folder
    (/tmp/gradio): another user's page stopped as Gradio built it, after the model had loaded, with a
    traceback of Gradio's PermissionError."""
    import tempfile

    from pixelflow_jax import demo_app, storage

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    another_users = str(tmp_path / "gradio")
    write = storage.writes.write_atomically

    def refused_there(path, data):  # (tests run as root, whom modes do not stop)
        if path.startswith(another_users + os.sep):
            raise PermissionError(13, "Permission denied", path)
        write(path, data)

    monkeypatch.setattr(storage.writes, "write_atomically", refused_there)
    monkeypatch.setattr(demo_app, "DemoSampler", lambda *_: pytest.fail("the model was loaded"))
    config = c2i_config(**{"demo.port": free_port(), "sample.checkpoint": fixture_dir("c2i_tiny")})
    with pytest.raises(storage.StorageError, match=re.escape(f"cannot write to {another_users}: PermissionError: ") +
                       r".*: Gradio keeps the page's files there \(Gradio's default, which every user of this machine "
                       r"shares unless GRADIO_TEMP_DIR is set\): set GRADIO_TEMP_DIR to a folder of your own"):
        demo_app.run(config, str(tmp_path / "run"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "mine"))
    demo_app.check_gradio_folder()  # the fix it names
    assert os.listdir(tmp_path / "mine") == []


def test_the_temporary_image_folder_of_a_page_without_a_workdir_is_removed_when_python_exits(tmp_path):
    """A DemoSampler made in a notebook (no serve(), which removes it when the page stops) with no
    workdir or a bucket's: its folder in /tmp goes when the interpreter does."""
    code = "from pixelflow_jax.demo_app import demo_output_dir; print(demo_output_dir(''))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.startswith(str(tmp_path / "pixelflow_demo-")), result.stderr[-2000:]
    assert os.listdir(tmp_path) == []
