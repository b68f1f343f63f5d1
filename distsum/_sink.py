"""Where a front end's items go: straight to an event file here, or to the aggregator.

Both front ends (``distsum.summary.FileWriter`` and ``distsum.SummaryWriter``) talk to a ``Sink``
only, so the same front-end code writes locally in one process and through the aggregator when
``distsum.init()`` has been called in this process: then a writer's directory must be the run
directory or below it (a sub-run), and what every rank writes there is merged.

Through the aggregator, scalars are averaged over the ranks, histograms merged exactly, texts
gathered; an image tag shows the lowest rank's image, and events that cannot be merged (graphs,
session logs, hparams, summary values distsum does not know) are written from rank 0 only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from distsum import _api
from distsum._client import HISTOGRAM, IMAGES, RAW, SCALAR, TEXT
from distsum._eventfile import EventWriter
from distsum._proto import event_pb2, wire_pb2
from distsum._summaries import HistogramItem, ImageItem, ScalarItem, SummaryItem, TextItem, event_bytes
from distsum._wire import check_run_name

log = logging.getLogger("distsum")

__all__ = ["LocalSink", "RemoteSink", "Sink", "WriterOptions", "default_logdir", "open_sink"]


@dataclass(frozen=True, kw_only=True)
class WriterOptions:
    """How a front end's writer buffers: the FileWriter/SummaryWriter constructor arguments."""

    max_queue: int = 10
    flush_secs: float = 120
    filename_suffix: str = ""


class Sink(Protocol):
    @property
    def logdir(self) -> str: ...

    def add_items(self, items: Sequence[SummaryItem], step: int, wall_time: float | None = None) -> None:
        """Write ``items`` as one event at ``step``; ``wall_time`` defaults to now."""

    def add_event(self, event: event_pb2.Event) -> None:
        """Write an Event as it is (graphs, session logs)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class LocalSink:
    """Items written to a new event file in ``logdir`` by this process."""

    def __init__(self, logdir: str | os.PathLike[str], options: WriterOptions) -> None:
        self._writer = EventWriter(
            logdir,
            max_queue=options.max_queue,
            flush_secs=options.flush_secs,
            filename_suffix=options.filename_suffix,
        )

    @property
    def logdir(self) -> str:
        return self._writer.logdir

    @property
    def path(self) -> str:
        return self._writer.path

    def add_items(self, items: Sequence[SummaryItem], step: int, wall_time: float | None = None) -> None:
        self._writer.add(event_bytes(step, time.time() if wall_time is None else wall_time, items))

    def add_event(self, event: event_pb2.Event) -> None:
        self._writer.add(event.SerializeToString())

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RemoteSink:
    """Items sent through this rank's client to the aggregator, into sub-run ``subrun``."""

    def __init__(self, logdir: str, subrun: str) -> None:
        self.logdir = logdir
        self.subrun = subrun
        self._closed = False

    def add_items(self, items: Sequence[SummaryItem], step: int, wall_time: float | None = None) -> None:
        # Without a wall time, the client stamps each record as it queues it (a scalar, as the
        # sender batches it).
        wall = wall_time
        client, subrun = _api.client(), self.subrun
        raw = event_pb2.Event(wall_time=time.time() if wall is None else wall, step=step)
        for item in items:
            if isinstance(item, ScalarItem):
                client.add(((SCALAR, subrun, item.tag, (wire_pb2.MEAN,), 0), step, item.value, wall))
            elif isinstance(item, HistogramItem):
                client.add(((HISTOGRAM, subrun, item.tag, (), 0), step, item.histogram, wall))
            elif isinstance(item, ImageItem):
                client.add(((IMAGES, subrun, item.tag, (), 0), step, [item.image], wall))
            elif isinstance(item, TextItem):
                client.add(((TEXT, subrun, item.tag, (), 0), step, item.text, wall))
            else:
                raw.summary.value.append(item.value)
        if raw.summary.value:
            client.add(((RAW, subrun, "", (), 0), step, raw.SerializeToString(), wall))

    def add_event(self, event: event_pb2.Event) -> None:
        _api.client().add(((RAW, self.subrun, "", (), 0), event.step, event.SerializeToString(), 0.0))

    def flush(self) -> None:
        # Bounded like finish(): a writer's flush must not hang training on a lost aggregator.
        if not _api.client().flush(_api.FLUSH_TIMEOUT):
            log.warning("distsum: the aggregator did not confirm a flush within %s s", _api.FLUSH_TIMEOUT)

    def close(self) -> None:
        # The connection is the process's, closed by distsum.finish(); a writer only stops.
        if not self._closed:
            self._closed = True
            self.flush()


def default_logdir() -> str | None:
    """The directory a writer created without one should use: the run, after ``distsum.init()``."""
    if not _api.initialized():
        return None
    return _api.run_dir() or ""


def open_sink(logdir: str | os.PathLike[str], options: WriterOptions) -> Sink:
    """The sink a front end writing to ``logdir`` should use: the aggregator after ``init()``."""
    if not _api.initialized():
        return LocalSink(logdir, options)
    path = os.fspath(logdir)
    run_dir = _api.run_dir()
    if run_dir is None:
        # A standalone aggregator's run is not a local directory: a relative path is a sub-run.
        if os.path.isabs(path):
            raise ValueError(
                f"log directory {path!r}: with a standalone aggregator, give a sub-run as a relative path"
            )
        subrun = os.path.normpath(path) if path else ""
    else:
        subrun = os.path.relpath(os.path.abspath(path), run_dir)
        if subrun == os.curdir:
            subrun = ""
        elif subrun == os.pardir or subrun.startswith(os.pardir + os.sep):
            raise ValueError(
                f"log directory {path!r} is outside the run directory {run_dir!r} that distsum.init() "
                "set up; give the run directory or a directory below it"
            )
    subrun = "" if subrun == os.curdir else subrun.replace(os.sep, "/")
    return RemoteSink(path, check_run_name(subrun, "sub-run"))
