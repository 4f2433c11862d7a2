"""`main.py --mode=demo` driven by headless Chromium: pick a class, generate, see the images."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, free_port
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
                             ((1000, "euler", 4.0, 1.0, 7, 1, 1, 1, 1, 1), "Class must be a whole number from 0 to 999"),
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
    demo = DemoSampler(config, str(tmp_path / "page"))
    request = dict(num_images=1, solver="euler", cfg=4.0, shift=1.0, steps=[1, 1, 1, 1], seed=0)
    path = demo.generate("a red cat", **request)[0]
    page = np.asarray(Image.open(path))
    umask = os.umask(0)
    os.umask(umask)  # the request's folder as a plain makedirs makes it: mkdtemp's 0700 hid the images from others
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o777 & ~umask
    options = dict(steps_per_stage=[1, 1, 1, 1], cfg_scale=4.0, solver="euler", shift=1.0, seed=0)
    job = [demo.sampler.generate_from_prompts(demo.prompt_encoder, ["a red cat"], negative_prompt=negative, **options)[0]
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
