"""The wire between a rank's client and the aggregator: framing, versions, validation.

Messages are ``wire_pb2.Envelope`` protos (``distsum/_proto/wire.proto``; ``docs/protocol.md``),
one per ZeroMQ frame. This module has no sockets: the client and the aggregator both use it, and
it is where everything that arrives from the network is checked before anything trusts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from distsum import _validate
from distsum._histogram import Histogram
from distsum._proto import event_pb2, varint, wire_pb2

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ScalarColumns",
    "WireError",
    "add_histogram",
    "check_records",
    "check_run_name",
    "decode_ack",
    "decode_batch",
    "decode_series_table",
    "encode_ack",
    "encode_batch",
    "encode_series_table",
    "histogram_of",
    "scalar_columns",
    "set_scalar_columns",
]

PROTOCOL_VERSION = 5
# The aggregator refuses larger frames (ZMQ_MAXMSGSIZE); clients split batches well below it.
MAX_MESSAGE_BYTES = 64 << 20
MAX_RANK = (1 << 24) - 1
MAX_IMAGES = 1000
_KINDS = {wire_pb2.SCALAR, wire_pb2.HISTOGRAM, wire_pb2.IMAGES, wire_pb2.TEXT}
_REDUCES = {wire_pb2.MEAN, wire_pb2.SUM, wire_pb2.MIN, wire_pb2.MAX, wire_pb2.NONE}


class WireError(ValueError):
    """A message that is not a valid distsum message; ``cause`` is a short label for counting."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


def check_run_name(name: object, what: str = "run") -> str:
    """A run or sub-run name: a relative path of plain components ('' is the run itself)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__} {name!r}")
    if name == "":
        return name
    if len(name) > 1024 or "\x00" in name or "\\" in name or name.startswith("/"):
        raise ValueError(f"{what} name {name!r} must be a relative path without NUL or backslash")
    for part in name.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise ValueError(f"{what} name {name!r} has an unusable component {part!r}")
        if len(part.encode("utf-8", "surrogatepass")) > 255:
            raise ValueError(f"{what} name {name!r} has a component over 255 bytes, too long for a file name")
    return name


def encode_ack(stream: int, received: int, durable: int, world_size: int) -> bytes:
    envelope = wire_pb2.Envelope(version=PROTOCOL_VERSION)
    ack = envelope.ack
    ack.stream, ack.received, ack.durable, ack.world_size = stream, received, durable, world_size
    return envelope.SerializeToString()


def encode_batch(batch: wire_pb2.Batch, scalars: ScalarColumns | None = None) -> bytes:
    """One wire message: ``batch``, its scalar columns replaced by ``scalars`` if given, in an Envelope.

    The columns go straight from numpy into the message, after the rest of the batch (a parser
    takes fields in any order). Through protobuf, whose serializer grows its buffer as it goes, a
    large batch cost more than the conversion of its scalars from Python objects.
    """
    parts = [b""]
    if scalars is not None:
        for name, data in _column_bytes(scalars):
            batch.ClearField(name)
            if data:
                parts += (_COLUMN_TAGS[name], varint(len(data)), data)
    parts[0] = batch.SerializeToString()
    size = sum(map(len, parts))
    return b"".join((_ENVELOPE_VERSION, _BATCH_TAG, varint(size), *parts))


_ENVELOPE_VERSION = wire_pb2.Envelope(version=PROTOCOL_VERSION).SerializeToString()
# Envelope.batch: its field number, length-delimited (wire type 2).
_BATCH_TAG = varint(wire_pb2.Envelope.DESCRIPTOR.fields_by_name["batch"].number << 3 | 2)


def _envelope(frame: bytes) -> wire_pb2.Envelope:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise WireError("too large", f"{len(frame)} bytes")
    try:
        envelope = wire_pb2.Envelope.FromString(frame)
    except Exception as e:  # protobuf raises DecodeError, and others on some malformed input
        raise WireError("unparseable", str(e) or type(e).__name__) from None
    if envelope.version != PROTOCOL_VERSION:
        raise WireError("wrong version", f"version {envelope.version}, expected {PROTOCOL_VERSION}")
    return envelope


def decode_ack(frame: bytes) -> wire_pb2.Ack:
    envelope = _envelope(frame)
    if envelope.WhichOneof("body") != "ack":
        raise WireError("not an ack", str(envelope.WhichOneof("body")))
    return envelope.ack


class ScalarColumns(NamedTuple):
    """A batch's scalar records as arrays, one entry per record (from the wire: read-only views of
    the message's bytes, but for the wall times, which it carries in runs)."""

    series: np.ndarray  # uint32
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    wall_times: np.ndarray  # float64


# A histogram's columns: bucket indices and their counts.
_BUCKETS, _COUNTS = np.dtype("<u2"), np.dtype("<i8")

# The columns of one entry per record, then the two of one entry per run of equal wall times.
_COLUMNS: tuple[tuple[str, np.dtype], ...] = (
    ("scalar_series", np.dtype("<u4")),
    ("scalar_steps", np.dtype("<i8")),
    ("scalar_values", np.dtype("<f8")),
)
_WALL_TIMES, _WALL_COUNTS = np.dtype("<f8"), np.dtype("<u4")
_WALL_COLUMNS = (("scalar_wall_times", _WALL_TIMES), ("scalar_wall_counts", _WALL_COUNTS))
# Each column's field number, length-delimited (wire type 2).
_COLUMN_TAGS = {
    name: varint(wire_pb2.Batch.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
    for name, _ in _COLUMNS + _WALL_COLUMNS
}


def set_scalar_columns(
    batch: wire_pb2.Batch, series: np.ndarray, steps: np.ndarray, values: np.ndarray, wall_times: np.ndarray
) -> None:
    """Put scalar records, given as columns of one length, into ``batch``."""
    for name, data in _column_bytes(ScalarColumns(series, steps, values, wall_times)):
        setattr(batch, name, data)


def _column_bytes(scalars: ScalarColumns) -> Iterator[tuple[str, bytes]]:
    """Each scalar column's field name and bytes on the wire. The wall times go as runs of equal
    ones: a sender stamps the records it takes together with one time, and a column of them would
    be two fifths of a batch of scalars."""
    for (name, dtype), column in zip(_COLUMNS, scalars[:3], strict=True):
        yield name, np.asarray(column, dtype=dtype).tobytes()
    walls = np.asarray(scalars.wall_times, dtype=_WALL_TIMES)
    starts = np.flatnonzero(np.not_equal(walls[1:], walls[:-1])) + 1
    if walls.size:
        starts = np.concatenate(([0], starts))
    yield "scalar_wall_times", walls[starts].tobytes()
    yield "scalar_wall_counts", np.diff(starts, append=walls.size).astype(_WALL_COUNTS).tobytes()


def scalar_columns(batch: wire_pb2.Batch) -> ScalarColumns:
    """The scalar records of a batch that ``decode_batch`` (or this process) made."""
    series, steps, values = (np.frombuffer(getattr(batch, name), dtype=dtype) for name, dtype in _COLUMNS)
    walls = np.repeat(
        np.frombuffer(batch.scalar_wall_times, dtype=_WALL_TIMES),
        np.frombuffer(batch.scalar_wall_counts, dtype=_WALL_COUNTS),
    )
    return ScalarColumns(series, steps, values, walls)


def encode_series_table(series: Iterable[tuple[str, str, int, Iterable[int], int]]) -> bytes:
    """A batch's ``series_table`` from (subrun, tag, kind, reduce, max_outputs) tuples."""
    table = wire_pb2.SeriesTable()
    for subrun, tag, kind, reduce, max_outputs in series:
        table.series.add(subrun=subrun, tag=tag, kind=kind, reduce=reduce, max_outputs=max_outputs)
    return table.SerializeToString()


def decode_series_table(data: bytes) -> list[wire_pb2.Series]:
    """Parse and check a batch's ``series_table``; raise WireError for anything malformed."""
    try:
        table = wire_pb2.SeriesTable.FromString(data)
    except Exception as e:  # DecodeError and friends
        raise WireError("bad series", str(e) or type(e).__name__) from None
    for spec in table.series:
        _check_series(spec)
    return list(table.series)


def decode_batch(frame: bytes) -> wire_pb2.Batch:
    """Parse and check one batch from the network; raise WireError for anything malformed.

    The series table is checked apart (``decode_series_table``), and the records against it
    (``check_records``), so that a table seen before need not be checked again.
    """
    envelope = _envelope(frame)
    if envelope.WhichOneof("body") != "batch":
        raise WireError("not a batch", str(envelope.WhichOneof("body")))
    batch = envelope.batch
    origin = batch.origin
    try:
        check_run_name(origin.run)
    except ValueError as e:
        raise WireError("bad run name", str(e)) from None
    if origin.rank > MAX_RANK or origin.world_size > MAX_RANK + 1:
        raise WireError("bad rank", f"rank {origin.rank} of {origin.world_size}")
    if origin.world_size and origin.rank >= origin.world_size:
        raise WireError("bad rank", f"rank {origin.rank} of {origin.world_size}")
    if batch.seq < 1:
        raise WireError("bad sequence number", str(batch.seq))
    lengths = [len(getattr(batch, name)) / dtype.itemsize for name, dtype in _COLUMNS]
    if len(set(lengths)) != 1 or not float(lengths[0]).is_integer():
        raise WireError("bad scalars", "columns of different lengths")
    runs = len(batch.scalar_wall_counts) / _WALL_COUNTS.itemsize
    if len(batch.scalar_wall_times) / _WALL_TIMES.itemsize != runs or not runs.is_integer():
        raise WireError("bad scalars", "wall times and their counts of different lengths")
    if runs:
        counts = np.frombuffer(batch.scalar_wall_counts, dtype=_WALL_COUNTS)
        if int(np.minimum.reduce(counts)) == 0 or int(np.add.reduce(counts, dtype=np.int64)) != lengths[0]:
            raise WireError("bad scalars", "wall time counts that are 0 or do not add up to the records")
    elif lengths[0]:
        raise WireError("bad scalars", "records without wall times")
    if batch.scalar_steps and int(np.minimum.reduce(np.frombuffer(batch.scalar_steps, dtype="<i8"))) < 0:
        raise WireError("bad scalars", "negative step")
    for records in (batch.histograms, batch.images, batch.texts):
        for record in records:
            if record.step < 0:
                raise WireError("bad record", f"series {record.series}, step {record.step}")
    for histogram in batch.histograms:
        n = len(histogram.buckets) // _BUCKETS.itemsize
        if len(histogram.buckets) != n * _BUCKETS.itemsize or len(histogram.counts) != n * _COUNTS.itemsize:
            raise WireError("bad record", f"series {histogram.series}: bucket columns of different lengths")
    for images in batch.images:
        if not 0 < len(images.image) <= MAX_IMAGES:
            raise WireError("bad images", f"{len(images.image)} images")
        for image in images.image:
            if image.height <= 0 or image.width <= 0 or image.colorspace not in (1, 2, 3, 4):
                raise WireError("bad images", f"{image.height}x{image.width}x{image.colorspace}")
    for raw in batch.raws:
        try:
            check_run_name(raw.subrun, "sub-run")
            event = event_pb2.Event.FromString(raw.event)
        except Exception as e:  # DecodeError and friends, or a bad name
            raise WireError("bad raw event", str(e) or type(e).__name__) from None
        if event.WhichOneof("what") in (None, "file_version") or not math.isfinite(event.wall_time):
            raise WireError("bad raw event", f"{event.WhichOneof('what')} at wall time {event.wall_time}")
    return batch


def check_records(batch: wire_pb2.Batch, kinds: np.ndarray, *, scalars_only: bool = False) -> None:
    """Check that a batch's records name series of its table, of their kind (``kinds``, by index).

    ``scalars_only``: every series of the table is a scalar one (a caller that keeps the table
    knows), so that scalar records need only an index in range.
    """
    if batch.scalar_series:
        series = np.frombuffer(batch.scalar_series, dtype="<u4")
        if int(np.maximum.reduce(series)) >= kinds.size:
            raise WireError("bad scalars", "series index out of range")
        if not scalars_only and not np.logical_and.reduce(kinds.take(series) == wire_pb2.SCALAR):
            raise WireError("bad scalars", "series of another kind")
    for records, kind in (
        (batch.histograms, wire_pb2.HISTOGRAM),
        (batch.images, wire_pb2.IMAGES),
        (batch.texts, wire_pb2.TEXT),
    ):
        for record in records:
            if record.series >= kinds.size or kinds[record.series] != kind:
                raise WireError("bad record", f"series {record.series}, step {record.step}")


def _check_series(spec: wire_pb2.Series) -> None:
    try:
        check_run_name(spec.subrun, "sub-run")
        _validate.check_tag(spec.tag)
    except (TypeError, ValueError) as e:
        raise WireError("bad series", str(e)) from None
    if spec.kind not in _KINDS:
        raise WireError("bad series", f"kind {spec.kind}")
    if spec.kind == wire_pb2.SCALAR and (not spec.reduce or not set(spec.reduce) <= _REDUCES):
        raise WireError("bad series", f"reduce {list(spec.reduce)}")
    if len(spec.reduce) != len(set(spec.reduce)):
        raise WireError("bad series", f"reduce {list(spec.reduce)} repeats")
    if spec.kind == wire_pb2.IMAGES and not 0 <= spec.max_outputs <= MAX_IMAGES:
        raise WireError("bad series", f"max_outputs {spec.max_outputs}")


def add_histogram(
    batch: wire_pb2.Batch, series: int, step: int, wall_time: float, histogram: Histogram
) -> None:
    """Append ``histogram`` to ``batch`` in its sparse wire form."""
    indices, counts = histogram.to_sparse()
    batch.histograms.add(
        series=series,
        step=step,
        wall_time=wall_time,
        buckets=indices.astype(_BUCKETS, copy=False).tobytes(),
        counts=counts.astype(_COUNTS, copy=False).tobytes(),
        min=histogram.min,
        max=histogram.max,
        sum=histogram.sum,
        sum_squares=histogram.sum_squares,
        nan=histogram.nan,
        posinf=histogram.posinf,
        neginf=histogram.neginf,
    )


def histogram_of(message: wire_pb2.Histogram) -> Histogram:
    """The histogram a wire message from ``decode_batch`` describes; ValueError if it is inconsistent."""
    return Histogram.from_parts(
        np.frombuffer(message.buckets, dtype=_BUCKETS),
        np.frombuffer(message.counts, dtype=_COUNTS),
        min=message.min,
        max=message.max,
        sum=message.sum,
        sum_squares=message.sum_squares,
        nan=message.nan,
        posinf=message.posinf,
        neginf=message.neginf,
    )
