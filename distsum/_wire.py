"""The wire between a rank's client and the aggregator: framing, versions, validation.

Messages are ``wire_pb2.Envelope`` protos (``distsum/_proto/wire.proto``; ``docs/protocol.md``),
one per ZeroMQ frame. This module has no sockets: the client and the aggregator both use it, and
it is where everything that arrives from the network is checked before anything trusts it.
"""

from __future__ import annotations

import math

import numpy as np

from distsum import _validate
from distsum._histogram import Histogram
from distsum._proto import event_pb2, wire_pb2

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "WireError",
    "add_histogram",
    "add_scalars",
    "check_run_name",
    "decode_ack",
    "decode_batch",
    "encode_ack",
    "encode_batch",
    "histogram_of",
    "new_batch",
]

PROTOCOL_VERSION = 1
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


def encode_batch(batch: wire_pb2.Batch) -> bytes:
    envelope = wire_pb2.Envelope(version=PROTOCOL_VERSION)
    envelope.batch.CopyFrom(batch)
    return envelope.SerializeToString()


def add_scalars(
    batch: wire_pb2.Batch, series: np.ndarray, steps: np.ndarray, values: np.ndarray, wall_times: np.ndarray
) -> None:
    """Append scalar records, given as columns, to ``batch``.

    The same message as extending the four repeated fields value by value, built with numpy:
    the packed fields are encoded in bulk and merged in (protobuf checks them as it parses).
    """
    if not len(series):
        return
    batch.MergeFromString(
        b"".join(
            (
                _packed_field(_SCALAR_FIELDS[0], _varints(series)),
                _packed_field(_SCALAR_FIELDS[1], _varints(steps)),
                _packed_field(_SCALAR_FIELDS[2], np.asarray(values, dtype="<f8").tobytes()),
                _packed_field(_SCALAR_FIELDS[3], np.asarray(wall_times, dtype="<f8").tobytes()),
            )
        )
    )


_SCALAR_FIELDS = [
    wire_pb2.Batch.DESCRIPTOR.fields_by_name[name].number
    for name in ("scalar_series", "scalar_step", "scalar_value", "scalar_wall_time")
]
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _packed_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2: length-delimited


def _varints(values: np.ndarray) -> bytes:
    """Integers as consecutive protobuf varints (negative ones as 64-bit two's complement)."""
    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    width = max(1, (int(v.max()).bit_length() + 6) // 7)  # bytes of the largest
    if width == 1:
        return v.astype(np.uint8).tobytes()
    shifted = v[:, None] >> _SHIFTS[:width]
    out = (shifted & 0x7F).astype(np.uint8)
    more = shifted[:, 1:] != 0  # whether a value has a byte after this one
    out[:, :-1] |= more.view(np.uint8) << 7
    if more.all():
        return out.tobytes()
    keep = np.ones(out.shape, dtype=bool)
    keep[:, 1:] = more
    return out[keep].tobytes()


def new_batch() -> tuple[wire_pb2.Envelope, wire_pb2.Batch]:
    """An envelope of this version and its empty batch, to be filled in place and serialized whole.

    The same bytes as ``encode_batch`` of the finished batch, without copying it into an envelope.
    """
    envelope = wire_pb2.Envelope(version=PROTOCOL_VERSION)
    envelope.batch.SetInParent()
    return envelope, envelope.batch


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


def decode_batch(frame: bytes) -> wire_pb2.Batch:
    """Parse and check one batch from the network; raise WireError for anything malformed."""
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
    for spec in batch.series:
        _check_series(spec)
    n = len(batch.scalar_series)
    if not len(batch.scalar_step) == len(batch.scalar_value) == len(batch.scalar_wall_time) == n:
        raise WireError("bad scalars", "columns of different lengths")
    nseries = len(batch.series)
    kinds = [spec.kind for spec in batch.series]
    if n and (max(batch.scalar_series) >= nseries or min(batch.scalar_step) < 0):
        raise WireError("bad scalars", "series index out of range or negative step")
    if any(kinds[i] != wire_pb2.SCALAR for i in set(batch.scalar_series)):
        raise WireError("bad scalars", "series of another kind")
    for records, kind in (
        (batch.histograms, wire_pb2.HISTOGRAM),
        (batch.images, wire_pb2.IMAGES),
        (batch.texts, wire_pb2.TEXT),
    ):
        for record in records:
            if record.series >= nseries or kinds[record.series] != kind or record.step < 0:
                raise WireError("bad record", f"series {record.series}, step {record.step}")
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
        index=indices.tolist(),
        count=counts.tolist(),
        min=histogram.min,
        max=histogram.max,
        sum=histogram.sum,
        sum_squares=histogram.sum_squares,
        nan=histogram.nan,
        posinf=histogram.posinf,
        neginf=histogram.neginf,
    )


def histogram_of(message: wire_pb2.Histogram) -> Histogram:
    """The histogram a wire message describes; ValueError if it is inconsistent."""
    return Histogram.from_parts(
        np.asarray(message.index, dtype=np.int64),
        np.asarray(message.count, dtype=np.uint64),
        min=message.min,
        max=message.max,
        sum=message.sum,
        sum_squares=message.sum_squares,
        nan=message.nan,
        posinf=message.posinf,
        neginf=message.neginf,
    )
