"""The wire between a rank's client and the aggregator: framing, versions, validation.

Messages are ``wire_pb2.Envelope`` protos (``distsum/_proto/wire.proto``; ``docs/protocol.md``),
one per ZeroMQ frame. This module has no sockets: the client and the aggregator both use it, and
it is where everything that arrives from the network is checked before anything trusts it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from distsum import _validate
from distsum._histogram import Histogram
from distsum._proto import event_pb2, wire_pb2

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ScalarColumns",
    "WireError",
    "add_histogram",
    "check_run_name",
    "decode_ack",
    "decode_batch",
    "encode_ack",
    "encode_batch",
    "histogram_of",
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


class ScalarColumns(NamedTuple):
    """Scalar records as columns of equal length (numpy): record i is the i-th of each."""

    series: np.ndarray
    steps: np.ndarray
    values: np.ndarray
    wall_times: np.ndarray


def encode_batch(batch: wire_pb2.Batch, scalars: ScalarColumns | None = None) -> bytes:
    """One wire message: ``batch`` in an ``Envelope`` of this version.

    ``scalars`` are the batch's scalar records (then its own scalar fields must be empty). They
    are encoded with numpy, as packed fields, and spliced in where protobuf writes those fields:
    the bytes are those of the batch holding them, without a Python object per value.
    """
    data = batch.SerializeToString()
    if scalars is not None and len(scalars.series):
        if batch.scalar_series or batch.scalar_step or batch.scalar_value or batch.scalar_wall_time:
            raise ValueError("scalar columns given for a batch that has scalars of its own")
        cut = _fields_below(data, _SCALAR_FIELDS[-1] + 1)
        columns = (
            _varints(scalars.series),
            _varints(scalars.steps),
            np.asarray(scalars.values, dtype="<f8").tobytes(),
            np.asarray(scalars.wall_times, dtype="<f8").tobytes(),
        )
        parts = [data[:cut]]
        for number, payload in zip(_SCALAR_FIELDS, columns, strict=True):
            parts += (_varint(number << 3 | _LEN), _varint(len(payload)), payload)
        parts.append(data[cut:])
        data = b"".join(parts)
    # What protobuf writes for Envelope(version=..., batch=batch), without copying the batch.
    return b"".join((_ENVELOPE_VERSION, _BATCH_TAG, _varint(len(data)), data))


_LEN = 2  # the wire type of length-delimited fields, packed ones among them
_SCALAR_FIELDS = [
    wire_pb2.Batch.DESCRIPTOR.fields_by_name[name].number
    for name in ("scalar_series", "scalar_step", "scalar_value", "scalar_wall_time")
]
_ENVELOPE_VERSION = wire_pb2.Envelope(version=PROTOCOL_VERSION).SerializeToString()
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_BATCH_TAG = _varint(wire_pb2.Envelope.DESCRIPTOR.fields_by_name["batch"].number << 3 | _LEN)


def _fields_below(data: bytes, number: int) -> int:
    """Where the fields numbered below ``number`` end in a serialized message.

    Protobuf writes a message's fields in the order of their numbers.
    """
    pos = 0
    while pos < len(data):
        tag, after = _read_varint(data, pos)
        if tag >> 3 >= number:
            break
        kind = tag & 7
        if kind == 0:
            pos = _read_varint(data, after)[1]
        elif kind == _LEN:
            length, after = _read_varint(data, after)
            pos = after + length
        else:  # fixed 64 or 32 bits
            pos = after + (8 if kind == 1 else 4)
    return pos


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varints(values: np.ndarray) -> bytes:
    """Integers as consecutive protobuf varints (negative ones as 64-bit two's complement)."""
    v = np.asarray(values, dtype=np.int64)
    low, top = int(v.min()), int(v.max())
    width = max(1, (top.bit_length() + 6) // 7)  # bytes of the largest
    if width == 1 and low >= 0:
        return v.astype(np.uint8).tobytes()
    if low < 0 or width > 8:
        return _wide_varints(v)
    # Each value spread over one little-endian word, a byte per 7 bits, continuation bits set.
    word = np.dtype("<u4" if width <= 4 else "<u8")
    x = v.astype(word)
    spread = x & 0x7F
    longer = [x >= 1 << 7 * k for k in range(1, width)]  # longer[k - 1]: has a byte k
    for k in range(1, width):
        spread |= (x & (0x7F << (7 * k))) << k
        spread |= longer[k - 1].astype(word) << (8 * k - 1)
    out = spread.view(np.uint8).reshape(len(x), word.itemsize)[:, :width]
    if low >= 1 << 7 * (width - 1):  # all of one length, the common case
        return out.tobytes()
    length = 1 + np.sum(longer, axis=0)
    return out[np.arange(width) < length[:, None]].tobytes()


def _wide_varints(v: np.ndarray) -> bytes:
    u = v.view(np.uint64)
    width = max(1, (int(u.max()).bit_length() + 6) // 7)
    shifted = u[:, None] >> _SHIFTS[:width]
    out = (shifted & 0x7F).astype(np.uint8)
    more = shifted[:, 1:] != 0  # whether a value has a byte after this one
    out[:, :-1] |= more.view(np.uint8) << 7
    keep = np.ones(out.shape, dtype=bool)
    keep[:, 1:] = more
    return out[keep].tobytes()


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
