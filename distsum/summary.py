"""``tf.compat.v1.summary``, eager: the TF1 summary calls without a graph or a session.

A TF1 program builds summary ops once and evaluates them with ``session.run``; here each call
returns its ``Summary`` at once, computed from the values it was given::

    from distsum import summary

    train_writer = summary.FileWriter(log_dir + "/train")
    for step in range(1000):
        summary.scalar("loss", loss)
        summary.histogram("weights", w)
        train_writer.add_summary(summary.merge_all(), step)
    train_writer.close()

Differences from TF1, each because there is no graph:

- ``merge_all(key)`` merges every summary created with that collection key *since the previous
  ``merge_all(key)``* (TF1 merges every summary op in the graph, which is the same thing when a
  program creates its summaries once per step and merges them once per step). A tag created more
  than once in between keeps its latest value. It returns None when there are none, as TF1 does.
- ``image`` takes a 4-D ``[batch, height, width, channels]`` array and scales float input as TF1
  does (``[0, 255]`` from the maximum, or centred at 128 when there are negative values).
- ``histogram`` counts NaN and infinite values apart instead of failing the step (TF1 raises);
  they are left out of the buckets and out of min, max, sum and sum_squares.
- Summaries are ``distsum.summary.Summary`` objects; ``add_summary`` and ``merge`` also take a
  serialized ``Summary`` (``bytes``) or any Summary proto, as TF1's ``add_summary`` does.

After ``distsum.init()``, a FileWriter writes through the job's aggregator, so the same program
run on every rank produces one run with the ranks' values merged.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from distsum import _validate
from distsum._errors import WriterClosedError
from distsum._histogram import Histogram
from distsum._image import prepare_images
from distsum._proto import event_pb2, summary_pb2
from distsum._sink import Sink, WriterOptions, open_sink
from distsum._summaries import (
    HistogramItem,
    ImageItem,
    ScalarItem,
    SummaryItem,
    TextItem,
    image_tags,
    item_from_value,
    to_values,
)

__all__ = ["FileWriter", "Summary", "histogram", "image", "merge", "merge_all", "scalar", "text"]

SUMMARIES = "summaries"  # tf.compat.v1.GraphKeys.SUMMARIES


class Summary:
    """The values of one or more summary calls, ready for ``FileWriter.add_summary``."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[SummaryItem]) -> None:
        self._items: tuple[SummaryItem, ...] = tuple(items)

    @property
    def items(self) -> tuple[SummaryItem, ...]:
        return self._items

    @property
    def tags(self) -> list[str]:
        return [item.tag for item in self._items]

    def to_proto(self) -> summary_pb2.Summary:
        """The Summary proto; histograms in TF1's legacy form, so the bytes stay mergeable."""
        proto = summary_pb2.Summary()
        proto.value.extend(to_values(self._items, legacy_histograms=True))
        return proto

    def SerializeToString(self) -> bytes:  # the protobuf name, so code written for protos works
        return self.to_proto().SerializeToString()

    def __repr__(self) -> str:
        return f"Summary(tags={self.tags!r})"


_collections: dict[str, list[Summary]] = {}
_collections_lock = threading.Lock()


def _register(summary: Summary, collections: Sequence[str] | None) -> Summary:
    with _collections_lock:
        for key in (SUMMARIES,) if collections is None else collections:
            _collections.setdefault(key, []).append(summary)
    return summary


def _tag(name: object, family: str | None) -> str:
    tag = _validate.check_tag(name)
    return tag if family is None else _validate.check_tag(f"{family}/{tag}")


def scalar(
    name: str, tensor: Any, collections: Sequence[str] | None = None, family: str | None = None
) -> Summary:
    """A scalar summary: a real number (Python, numpy, or a one-element tensor)."""
    tag = _tag(name, family)
    return _register(Summary([ScalarItem(tag, _validate.as_scalar(tensor, tag))]), collections)


def histogram(
    name: str, values: Any, collections: Sequence[str] | None = None, family: str | None = None
) -> Summary:
    """A histogram of ``values`` (any shape) on TF1's default bucket grid."""
    tag = _tag(name, family)
    array = _validate.as_array(values, tag, "histogram values")
    return _register(Summary([HistogramItem(tag, Histogram.from_values(array, tag=tag))]), collections)


def image(
    name: str,
    tensor: Any,
    max_outputs: int = 3,
    collections: Sequence[str] | None = None,
    family: str | None = None,
) -> Summary:
    """Up to ``max_outputs`` images of a ``[batch, height, width, channels]`` array.

    Tags are ``name/image/0``, ``name/image/1``, ... (``name/image`` when ``max_outputs`` is 1).
    """
    tag = _tag(name, family)
    array = _validate.as_array(tensor, tag, "image")
    pixels = prepare_images(array, tag=tag, dataformats="NHWC", max_outputs=max_outputs, scaling="tf1")
    tags = image_tags(tag, max_outputs)
    return _register(Summary(ImageItem(t, p) for t, p in zip(tags, pixels, strict=False)), collections)


def text(name: str, tensor: Any, collections: Sequence[str] | None = None) -> Summary:
    """A text summary, shown as Markdown. ``tensor`` is a str or UTF-8 bytes."""
    tag = _validate.check_tag(name)
    if isinstance(tensor, bytes):
        try:
            tensor = tensor.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text for tag {tag!r} is not valid UTF-8: {e}") from None
    if not isinstance(tensor, str):
        raise TypeError(f"text for tag {tag!r} must be str or bytes, got {type(tensor).__name__}")
    return _register(Summary([TextItem(tag, tensor)]), collections)


def _as_summary(summary: object) -> Summary:
    if isinstance(summary, Summary):
        return summary
    if isinstance(summary, (bytes, bytearray, memoryview)):
        data = bytes(summary)
    elif callable(getattr(summary, "SerializeToString", None)):
        data = summary.SerializeToString()  # type: ignore[attr-defined]
    else:
        raise TypeError(f"expected a Summary, a Summary proto or its bytes, got {type(summary).__name__}")
    try:
        proto = summary_pb2.Summary.FromString(data)
    except Exception as e:
        raise ValueError(f"not a serialized Summary: {e}") from None
    return Summary(item_from_value(value) for value in proto.value)


def merge(
    inputs: Iterable[object], collections: Sequence[str] | None = None, name: str | None = None
) -> Summary:
    """The values of all ``inputs`` in order, as one Summary. A tag given twice is a ValueError."""
    items: list[SummaryItem] = []
    seen: set[str] = set()
    for summary in inputs:
        for item in _as_summary(summary).items:
            if item.tag in seen:
                raise ValueError(f"duplicate tag {item.tag!r} found in summary inputs")
            seen.add(item.tag)
            items.append(item)
    return _register(Summary(items), collections if collections is not None else ())


def merge_all(key: str = SUMMARIES, scope: str | None = None) -> Summary | None:
    """Merge every summary created with collection ``key`` since the last ``merge_all(key)``.

    ``scope``, as in TF1, keeps only tags that start with it. Returns None if there is nothing.
    """
    with _collections_lock:
        summaries = _collections.pop(key, [])
    if scope is not None:
        summaries = [Summary(i for i in s.items if i.tag.startswith(scope)) for s in summaries]
    # A tag created twice since the last merge_all (a loop that skipped a merge) keeps its latest
    # value; TF1 would have renamed the second op instead.
    latest = {item.tag: item for s in summaries for item in s.items}
    if not latest:
        return None
    return Summary(latest.values())


class FileWriter:
    """Writes summaries to event files in ``logdir``, as ``tf.compat.v1.summary.FileWriter``.

    ``graph``/``graph_def`` take a serialized GraphDef (bytes) or an object with
    ``SerializeToString()`` or ``as_graph_def()``; it is written as the run's graph. ``session``
    is accepted and ignored.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        graph: Any = None,
        max_queue: int = 10,
        flush_secs: float = 120,
        graph_def: Any = None,
        filename_suffix: str | None = None,
        session: Any = None,
    ) -> None:
        self._logdir = os.fspath(logdir)
        self._options = WriterOptions(
            max_queue=max_queue, flush_secs=flush_secs, filename_suffix=filename_suffix or ""
        )
        self._sink: Sink | None = open_sink(self._logdir, self._options)
        if graph is not None or graph_def is not None:
            self.add_graph(graph, graph_def=graph_def)

    def get_logdir(self) -> str:
        return self._logdir

    def _open(self) -> Sink:
        if self._sink is None:
            raise WriterClosedError(f"FileWriter for {self._logdir} is closed; reopen() it first")
        return self._sink

    def add_summary(self, summary: object, global_step: int | None = None) -> None:
        """Write ``summary`` (a Summary, a Summary proto or its serialized bytes) at ``global_step``."""
        summary = _as_summary(summary)
        step = 0 if global_step is None else _validate.check_step(global_step, ",".join(summary.tags))
        self._open().add_items(summary.items, step)

    def add_graph(self, graph: Any, global_step: int | None = None, graph_def: Any = None) -> None:
        data = _graph_bytes(graph if graph is not None else graph_def)
        step = 0 if global_step is None else _validate.check_step(global_step, "graph")
        self._open().add_event(event_pb2.Event(wall_time=time.time(), step=step, graph_def=data))

    def add_session_log(self, session_log: Any, global_step: int | None = None) -> None:
        step = 0 if global_step is None else _validate.check_step(global_step, "session_log")
        event = event_pb2.Event(wall_time=time.time(), step=step)
        event.session_log.ParseFromString(session_log.SerializeToString())
        self._open().add_event(event)

    def add_event(self, event: Any) -> None:
        """Write an Event proto (any Event message class) unchanged."""
        self._open().add_event(event_pb2.Event.FromString(event.SerializeToString()))

    def flush(self) -> None:
        self._open().flush()

    def close(self) -> None:
        """Write everything and close the file. Closing twice does nothing."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()

    def reopen(self) -> None:
        """After ``close()``, start writing again, into a new event file."""
        if self._sink is None:
            self._sink = open_sink(self._logdir, self._options)

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _graph_bytes(graph: Any) -> bytes:
    if isinstance(graph, (bytes, bytearray, memoryview)):
        return bytes(graph)
    as_graph_def = getattr(graph, "as_graph_def", None)
    if callable(as_graph_def):
        graph = as_graph_def()
    serialize = getattr(graph, "SerializeToString", None)
    if callable(serialize):
        return serialize()
    raise TypeError(f"graph must be GraphDef bytes or a GraphDef-like object, got {type(graph).__name__}")
