"""Progress of long jobs: log lines with rate and ETA off a terminal, a tqdm bar on one."""

import io
import os
import sys

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


def test_lines_come_at_most_every_log_every_s_and_at_the_end(monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 145.0, 160.0, 200.0])
    monkeypatch.setattr("pixelflow_jax.progress.time.perf_counter", lambda: next(clock))
    lines = []
    progress = Progress(5, "eval", "batch", interactive=False, log_every_s=30, log=lines.append)
    for _ in range(5):
        progress.update(1)  # t=145: 45 s after the start, a line; t=160: 15 s after that line, none
    assert [line.split(",")[0] for line in lines] == ["eval: 3/5 batch (60%)", "eval: 5/5 batch (100%)"]


def test_a_job_done_in_one_chunk_is_timed_over_this_runs_work(monkeypatch):
    """No chunk after the first to time: the rate is that of this run's whole work (not the '?' of
    a line that more chunks will follow, nor counting the resumed job's earlier images)."""
    clock = iter([100.0, 120.0, 300.0, 305.0])
    monkeypatch.setattr("pixelflow_jax.progress.time.perf_counter", lambda: next(clock))
    lines = []
    Progress(8, "sampling", "img", initial=4, interactive=False, log=lines.append).update(4)
    Progress(0, "sampling", "img", interactive=False, log=lines.append).update(0)  # nothing left to do
    assert lines == ["sampling: 8/8 img (100%), 0.2 img/s, ETA 0:00, elapsed 0:20",
                     "sampling: 0/0 img (100%), 0 img/s, ETA ?, elapsed 0:05"]


def test_a_resumed_jobs_bar_starts_at_its_count_and_takes_the_place_of_log_lines():
    stream, lines = io.StringIO(), []
    with Progress(5, "training", "step", initial=2, interactive=True, stream=stream, log=lines.append) as progress:
        progress.update(3)
    assert "5/5" in stream.getvalue() and lines == []


def test_off_a_terminal_messages_are_printed_and_other_processes_show_nothing(monkeypatch, capsys):
    Progress(2, "training", "step", interactive=False).write("step 1: loss 0.5")
    assert capsys.readouterr().out == "step 1: loss 0.5\n"
    monkeypatch.setattr("pixelflow_jax.progress.jax.process_index", lambda: 1)
    stream, lines = io.StringIO(), []
    for interactive in (True, False):
        with Progress(2, "training", "step", interactive=interactive, stream=stream, log=lines.append) as progress:
            progress.update(2)
            progress.write("step 2: loss 0.4")
    assert stream.getvalue() == "" and lines == [] and capsys.readouterr().out == ""


def test_a_stdout_that_cannot_be_written_costs_its_lines_not_the_job(monkeypatch, caplog):
    """A training run under nohup with its log on a full disk (or piped to a reader gone, `| head`)
    died at its first step line, an OSError traceback, before its first checkpoint."""
    from pixelflow_jax import progress

    full = open("/dev/full", "w")
    monkeypatch.setattr("sys.stdout", full)
    open_files = len(os.listdir("/proc/self/fd"))
    Progress(10, "training", "step", interactive=False).write("step 1: loss 0.1")
    progress.say("step 2: loss 0.1")
    full.flush()  # what was held back goes to /dev/null now, as at exit
    assert len(os.listdir("/proc/self/fd")) == open_files  # the /dev/null opened for it is closed once in place
    warnings = [r.getMessage() for r in caplog.records if "stdout cannot be written" in r.getMessage()]
    assert warnings == ["stdout cannot be written (OSError: [Errno 28] No space left on device): this job's further "
                        "lines for it are dropped (its files keep them)"]
    full.close()


def test_a_stdout_of_no_file_descriptor_that_cannot_be_written_is_replaced_once(monkeypatch, caplog):
    """A stream of no file descriptor (a notebook's, a wrapper's) cannot be pointed at /dev/null: it
    is replaced by /dev/null's, so only its first failed line is warned of."""
    import errno

    from pixelflow_jax import progress

    class FullStream(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sys.stdout", FullStream())
    progress.say("step 1: loss 0.1")
    progress.say("step 2: loss 0.1")
    warnings = [r.getMessage() for r in caplog.records if "stdout cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and sys.stdout.name == os.devnull, warnings
    sys.stdout.close()


def test_a_terminal_gets_the_bar_and_a_log_file_the_log_lines_unless_told_otherwise(caplog):
    """Left unset, `interactive` is whether the stream is a terminal, and the lines off one go to the
    job's log (absl's): a batch job's log showed a bar's carriage returns, or nothing at all."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log_file = Terminal(), io.StringIO()
    with caplog.at_level("INFO"):
        for stream in (terminal, log_file):
            with Progress(2, "sampling", "img", stream=stream) as progress:
                progress.update(2)
    assert "2/2" in terminal.getvalue() and log_file.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records if "sampling" in r.getMessage()] == [
        "sampling: 2/2 img (100%)"]
