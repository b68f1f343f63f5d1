"""The rank side: records go on a queue in the training thread; one thread batches and sends them.

The training thread only validates and appends a tuple to a deque (thread-safe without a lock).
The sender thread owns the ZeroMQ socket: it drains the deque every ``batch_interval``, does the
expensive work there (histogram bucketing, PNG encoding, protobuf), numbers each batch, sends it,
and keeps it until the aggregator acknowledges it as durable, resending what was not
acknowledged. So a batch lost with a connection or an aggregator is sent again, and the
aggregator drops the copies it already has by (run, rank, stream, seq).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from distsum._errors import DistsumError
from distsum._histogram import Histogram
from distsum._image import EncodedImage, encode_png
from distsum._proto import wire_pb2
from distsum._security import ClientKeys
from distsum._spool import Retained, remove_orphans
from distsum._wire import (
    WireError,
    add_histogram,
    decode_ack,
    encode_batch,
    encode_series_table,
    set_scalar_columns,
)

__all__ = ["Client", "ClientOptions"]

# Counts the forks this process descends from: a client made before a fork is unusable in the
# child (its socket and sender thread stayed in the parent). Compared on every logging call,
# which a getpid() system call would make several times slower.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

log = logging.getLogger("distsum")

SCALAR, HISTOGRAM, IMAGES, TEXT = wire_pb2.SCALAR, wire_pb2.HISTOGRAM, wire_pb2.IMAGES, wire_pb2.TEXT
# Events passed through unmerged (wire Raw records); they have no series.
RAW = "raw"


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    # Records waiting in the training process before the sender takes them; beyond it, new
    # records are dropped and counted rather than letting memory grow or the training block.
    max_buffered: int = 2_000_000
    batch_interval: float = 0.01
    max_batch_records: int = 100_000
    # A batch is closed once its records' payloads reach about this many bytes, far below the
    # aggregator's limit on one message.
    max_batch_bytes: int = 8 << 20
    # Without any acknowledgement for this long, everything unacknowledged is sent again.
    resend_after: float = 1.0
    # An empty batch at least this often, so the aggregator knows the rank is alive.
    heartbeat: float = 1.0
    # Batches not yet acknowledged as durable: this much in memory, then this much in a spool
    # file in spool_dir (default: the temporary directory); beyond both the oldest are dropped.
    max_unacked_bytes: int = 64 << 20
    max_spool_bytes: int = 1 << 30
    spool_dir: str | None = None


class _Marker:
    """A flush or finish request in the record queue; ``seq`` is the batch that carried it."""

    __slots__ = ("finish", "seq")

    def __init__(self, finish: bool) -> None:
        self.finish = finish
        self.seq: int | None = None


class Client:
    """One rank's connection to the aggregator.

    A series key is ``(kind, subrun, tag, reduce, max_outputs)``; ``add`` takes
    ``(key, step, payload, wall_time)`` where payload is a float (scalar), an array of histogram
    values (bucketed on the sender thread) or a ``Histogram``, a list of HWC uint8 arrays or
    ``EncodedImage`` (images), a str (text), or, for kind ``RAW``, a serialized Event.
    """

    def __init__(
        self,
        addr: str,
        *,
        run: str,
        rank: int,
        world_size: int | None,
        restart: int = 0,
        options: ClientOptions | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        self.addr = addr
        self.options = options or ClientOptions()
        self._origin = wire_pb2.Origin(
            run=run,
            rank=rank,
            world_size=world_size or 0,
            stream=random.SystemRandom().getrandbits(63) + 1,
            pid=os.getpid(),
            host=socket.gethostname(),
            restart=restart,
        )
        self._generation = _fork_generation
        # The first held batch not yet handed to the socket (None: all were).
        self._unsent: int | None = None
        self._queue: collections.deque[Any] = collections.deque()
        self.dropped = 0
        self._warned = False
        self._seq = 0
        remove_orphans(self.options.spool_dir)
        self._unacked = Retained(
            max_memory_bytes=self.options.max_unacked_bytes,
            max_spool_bytes=self.options.max_spool_bytes,
            spool_dir=self.options.spool_dir,
        )
        self._received = 0
        self._durable = 0
        self.world_size = world_size
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        # Explicit limits: pyzmq's defaults block the sender at the high-water mark and make
        # close hang on unsent messages.
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._socket.setsockopt(zmq.RCVHWM, 10_000)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        if keys is not None:
            keys.apply(self._socket)
        self._socket.connect(addr)
        self._thread = threading.Thread(target=self._run, name="distsum-sender", daemon=True)
        self._thread.start()

    @property
    def stream(self) -> int:
        return self._origin.stream

    # --- training thread ------------------------------------------------------------------------

    @property
    def forked_away(self) -> bool:
        """Whether this is a forked child of the process that made the client (unusable here)."""
        return self._generation != _fork_generation

    def add(self, record: tuple[Any, int, Any, float]) -> None:
        if self._generation != _fork_generation:
            raise DistsumError(
                "distsum was initialised in a parent process; call distsum.init() in this child"
            )
        if self._closed:
            raise DistsumError("distsum.finish() was called; call distsum.init() to log again")
        if len(self._queue) >= self.options.max_buffered:
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "distsum: more than %d records waiting to be sent; dropping new records",
                    self.options.max_buffered,
                )
            return
        self._queue.append(record)

    def flush(self, timeout: float | None, *, finish: bool = False) -> bool:
        """Wait until the aggregator holds everything added before this call (durable if finish)."""
        if self._closed:
            return True
        if self.forked_away:
            raise DistsumError(
                "distsum was initialised in a parent process; call distsum.init() in this child"
            )
        marker = _Marker(finish)
        self._queue.append(marker)
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout

        def done() -> bool:
            if marker.seq is None:
                return False
            return (self._durable if finish else self._received) >= marker.seq

        with self._cond:
            while not done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if not self._thread.is_alive():
                    return False
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout: float | None) -> bool:
        """Send everything, wait (bounded) until it is durable, and close the socket."""
        if self._closed or self.forked_away:
            return True
        ok = self.flush(timeout, finish=True)
        self._closed = True
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._socket.close(linger=0)
        self._context.term()
        self._unacked.close()
        return ok

    # --- sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        last_sent = last_progress = time.monotonic()
        while not self._stop:
            self._wake.wait(self.options.batch_interval)
            self._wake.clear()
            now = time.monotonic()
            while self._queue or now - last_sent >= self.options.heartbeat:
                records, markers = self._drain()
                batch = self._build(records, markers)
                self._seq += 1
                batch.seq = self._seq
                data = encode_batch(batch)
                self._unacked.add(self._seq, data, len(records))
                for marker in markers:
                    marker.seq = self._seq
                # In order: while an earlier batch waits to be handed to the socket, this one does too.
                if self._unsent is None and not self._send(data):
                    self._unsent = self._seq
                last_sent = now
                if len(records) < self.options.max_batch_records:
                    break
            if self._unsent is not None:
                # Not connected yet (the aggregator is starting, say): try again every round
                # rather than waiting out resend_after.
                self._unsent = self._send_from(self._unsent)
            if self._receive_acks():
                last_progress = now
            if self._unacked and now - last_progress >= self.options.resend_after:
                # No acknowledgement for a while: anything may have been lost on the way.
                first = self._unacked.first()
                self._unsent = None if first is None else self._send_from(first)
                last_progress = now

    def _drain(self) -> tuple[list[Any], list[_Marker]]:
        records: list[Any] = []
        markers: list[_Marker] = []
        queue, limit, byte_limit = self._queue, self.options.max_batch_records, self.options.max_batch_bytes
        size = 0
        while queue and len(records) < limit and size < byte_limit:
            item = queue.popleft()
            if isinstance(item, _Marker):
                markers.append(item)
                break  # a flush covers what came before it; the rest goes in the next batch
            records.append(item)
            size += _payload_bytes(item[0][0], item[2])
        return records, markers

    def _build(self, records: list[Any], markers: list[_Marker]) -> wire_pb2.Batch:
        batch = wire_pb2.Batch()
        batch.origin.CopyFrom(self._origin)
        series: dict[Any, int] = {}
        scalar_series, scalar_step, scalar_value, scalar_time = [], [], [], []
        for key, step, payload, wall in records:
            if key[0] == RAW:
                batch.raws.add(subrun=key[1], event=payload)
                continue
            index = series.get(key)
            if index is None:
                index = series[key] = len(series)
            kind = key[0]
            if kind == SCALAR:
                scalar_series.append(index)
                scalar_step.append(step)
                scalar_value.append(payload)
                scalar_time.append(wall)
            elif kind == HISTOGRAM:
                histogram = (
                    payload if isinstance(payload, Histogram) else Histogram.from_values(payload, tag=key[2])
                )
                add_histogram(batch, index, step, wall, histogram)
            elif kind == IMAGES:
                images = batch.images.add(series=index, step=step, wall_time=wall)
                for pixels in payload:
                    encoded = pixels if isinstance(pixels, EncodedImage) else encode_png(pixels)
                    images.image.add(
                        height=encoded.height,
                        width=encoded.width,
                        colorspace=encoded.colorspace,
                        png=encoded.png,
                    )
            else:
                batch.texts.add(series=index, step=step, wall_time=wall, text=payload)
        batch.series_table = encode_series_table(
            (subrun, tag, kind, reduce, max_outputs) for kind, subrun, tag, reduce, max_outputs in series
        )
        set_scalar_columns(batch, scalar_series, scalar_step, scalar_value, scalar_time)
        batch.flush = bool(markers)
        batch.finish = any(m.finish for m in markers)
        first = self._unacked.first()
        batch.resend_from = self._seq + 1 if first is None else first
        batch.dropped = self.dropped + self._unacked.dropped_records
        return batch

    def _send_from(self, first: int) -> int | None:
        """Send the held batches from ``first`` on, in order; the first that did not go, if any."""
        for seq, data in self._unacked.items():
            if seq >= first and not self._send(data):
                return seq
        return None

    def _send(self, data: bytes) -> bool:
        # Not connected, or the pipe is full: the batch stays unacknowledged and is resent.
        try:
            self._socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _receive_acks(self) -> bool:
        progress = False
        while True:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                ack = decode_ack(frame)
            except WireError as e:
                log.warning("distsum: ignoring a malformed acknowledgement: %s", e)
                continue
            if ack.stream != self._origin.stream:
                continue
            with self._cond:
                if ack.received > self._received or ack.durable > self._durable:
                    progress = True
                self._received = max(self._received, min(ack.received, self._seq))
                self._durable = max(self._durable, min(ack.durable, self._received))
                self._unacked.release_through(self._durable)
                if ack.world_size:
                    self.world_size = ack.world_size
                self._cond.notify_all()
        return progress


def _payload_bytes(kind: int, payload: Any) -> int:
    """About how many bytes a record adds to a batch (an upper bound for images and text)."""
    if kind == SCALAR:
        return 28
    if kind == HISTOGRAM:
        return 20_000  # sparse counts on 1551 buckets at most
    if kind == IMAGES:
        return sum(len(p.png) if isinstance(p, EncodedImage) else p.nbytes for p in payload) + 1024
    return len(payload) * 4
