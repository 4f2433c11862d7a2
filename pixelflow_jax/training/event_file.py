"""One TensorBoard event file, written in the caller's thread.

tensorboardX's SummaryWriter hands each event to a thread of its own, and its flush() does not
wait for that thread: a file copied right after flush() (a bucket run's upload) could lack the
latest records, and a process killed with events in the queue lost them. Here each event is in
the file when add_scalar or add_image returns, and on disk after flush()."""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid


def tensorboardx():
    """tensorboardX's summary builders, event protos and event file writer, imported without
    torch: tensorboardX imports torch when it is installed, only to accept torch tensors, and that
    import costs seconds at every start of a training run. A torch imported already is kept."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
        try:
            importlib.import_module("tensorboardX")  # its package __init__ is what imports torch
        finally:
            del sys.modules["torch"]
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
    return summary, event_pb2, event_file_writer.EventsWriter


class EventFile:
    """An event file of its own in `folder`: events.out.tfevents.TIME.HOST.ID, where ID keeps two
    files started in one second on one host (a run and its quick resume) apart."""

    def __init__(self, folder: str, purge_step: int):
        self._summary, self._event_pb2, events_writer = tensorboardx()
        os.makedirs(folder, exist_ok=True)
        self._writer = events_writer(os.path.join(folder, "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        # A restart at purge_step makes TensorBoard drop what an earlier run of this workdir logged
        # from that step on (a resumed run's steps past its checkpoint), else both curves overlap.
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=log))

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self._add(self._summary.scalar(name, value), step)

    def add_image(self, name: str, image_hwc, step: int) -> None:
        self._add(self._summary.image(name, image_hwc, dataformats="HWC"), step)

    def _add(self, summary, step: int) -> None:
        self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
