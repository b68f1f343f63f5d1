"""Where a front end's items go: straight to an event file here, or to the aggregator.

Both front ends (``distsum.summary.FileWriter`` and ``distsum.SummaryWriter``) talk to a ``Sink``
only, so the same front-end code writes locally in one process and through the aggregator when
``distsum.init()`` has been called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from distsum._eventfile import EventWriter
from distsum._proto import event_pb2
from distsum._summaries import Item, to_values

__all__ = ["LocalSink", "Sink", "WriterOptions", "open_sink"]


@dataclass(frozen=True, kw_only=True)
class WriterOptions:
    """How a front end's writer buffers: the FileWriter/SummaryWriter constructor arguments."""

    max_queue: int = 10
    flush_secs: float = 120
    filename_suffix: str = ""


class Sink(Protocol):
    @property
    def logdir(self) -> str: ...

    def add_items(self, items: Sequence[Item], step: int, wall_time: float | None = None) -> None:
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

    def add_items(self, items: Sequence[Item], step: int, wall_time: float | None = None) -> None:
        event = event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time, step=step)
        event.summary.value.extend(to_values(items))
        self._writer.add(event.SerializeToString())

    def add_event(self, event: event_pb2.Event) -> None:
        self._writer.add(event.SerializeToString())

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_sink(logdir: str | os.PathLike[str], options: WriterOptions) -> Sink:
    """The sink a front end writing to ``logdir`` should use."""
    return LocalSink(logdir, options)
