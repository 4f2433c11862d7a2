"""Progress of long jobs: log lines with rate and ETA off a terminal, a tqdm bar on one."""

import io

from pixelflow_jax.progress import Progress, format_duration


def test_log_lines_say_count_rate_and_eta_and_count_only_this_runs_work_after_its_first_chunk(monkeypatch):
    clock = iter([100.0, 160.0, 170.0, 200.0])
    monkeypatch.setattr("pixelflow_jax.progress.time.perf_counter", lambda: next(clock))
    lines = []
    progress = Progress(100, "sampling", "img", initial=40, interactive=False, log_every_s=65, log=lines.append)
    progress.update(10)  # t=160: the first chunk, a minute with its compilation; too soon for a line
    progress.update(10)  # t=170: 10 images in the 10 s since -> 1 img/s, 40 left
    progress.update(40)  # t=200: done, always logged
    assert lines == ["sampling: 60/100 img (60%), 1 img/s, ETA 0:40, elapsed 1:10",
                     "sampling: 100/100 img (100%), 1.25 img/s, ETA 0:00, elapsed 1:40"]


def test_a_line_after_only_the_first_chunk_gives_no_rate(monkeypatch):
    """The first chunk is mostly compilation: a rate from it alone gave an ETA of an hour for a
    minute's work."""
    clock = iter([100.0, 160.0])
    monkeypatch.setattr("pixelflow_jax.progress.time.perf_counter", lambda: next(clock))
    lines = []
    progress = Progress(60, "training", "step", interactive=False, log_every_s=30, log=lines.append)
    progress.update(1)  # t=160: compiled and ran step 1, a line is due
    assert lines == ["training: 1/60 step (2%), ? step/s, ETA ?, elapsed 1:00"]


def test_terminal_gets_a_bar_and_lines_that_do_not_break_it():
    stream = io.StringIO()
    with Progress(5, "training", "step", interactive=True, stream=stream) as progress:
        progress.update(2)
        progress.write("step 2: loss 0.5")
        progress.update(3)
    text = stream.getvalue()
    assert "training" in text and "5/5" in text and "step 2: loss 0.5" in text


def test_durations():
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"
