"""The rank side: records go on a queue in the training thread; one thread batches and sends them.

The training thread only validates and appends to the queue. The sender thread owns the ZeroMQ
socket: every ``batch_interval`` (200 ms; longer in jobs of more than 200 ranks) it drains the
queue, numbers the batch, sends it, and keeps it until the aggregator acknowledges it as durable,
resending what was not acknowledged. So a batch lost with a connection or an aggregator is sent
again, and the aggregator drops the copies it already has by (run, rank, stream, seq). In *rounds*
between batches, every ``_ROUND`` (100 ms), it stamps the rows queued so far with the time and does
the expensive work of the records queued (histogram bucketing, PNG encoding), a little at a time:
in a synchronous job, a long burst of work on one rank's cores holds up every rank. A batch,
encoded and checked and merged as one, costs the sender and the aggregator about as much for one
record as for a thousand, so batches are rare. The sender waits on the socket and a wake-up pipe
together, so acknowledgements are read as they arrive and a flush goes out at once.

The queue is a ``bytearray`` of packed rows ``(series uint32, step int64, value float64)``, each
appended with ``queue += pack_row(series, step, value)``: one C call that converts the numbers
and one in-place concatenation, atomic, so rows from different threads never interleave. The
sender takes the rows as numpy columns with one copy, without touching a Python object per row.
A scalar's wall time is that of the sender's first round after the call, normally within 100 ms
of it: calling ``time.time()`` in the training thread would cost a third of the call. Any other
record (and every flush marker) waits in ``_breaks`` under a number, and a row ``(BREAK, number,
0.0)`` holds its place in the queue.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import mmap
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from distsum._errors import DistsumError
from distsum._histogram import Histogram
from distsum._image import EncodedImage, encode_png
from distsum._proto import wire_pb2
from distsum._security import ClientKeys
from distsum._spool import Retained, remove_orphans
from distsum._wire import (
    ScalarColumns,
    WireError,
    add_histogram,
    decode_ack,
    encode_batch,
    encode_series_table,
)

__all__ = ["Client", "ClientOptions", "Series", "series_of"]

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

# A row of the record queue; pack_row(series, step, value) packs one.
_ROW = struct.Struct("<Iqd")
pack_row, unpack_row = _ROW.pack, _ROW.unpack
_ROW_DTYPE = np.dtype([("series", "<u4"), ("step", "<i8"), ("value", "<f8")])
assert _ROW_DTYPE.itemsize == _ROW.size
# The series of a row that holds the place of a break; series numbers stay below it.
BREAK = (1 << 32) - 1
# What a scalar adds to a batch at most: its three column entries (series, step, value) and a
# run of wall times of its own (a time and a count), as when every scalar has its own walltime=.
_SCALAR_BYTES = 32
# Series tables kept by the sender; beyond this many, it starts over.
_MAX_TABLES = 256
# How often the sender stamps queued rows and prepares queued records between batches, at most.
# Each round wakes a thread whose caches have gone cold meanwhile, so a round costs far more than
# its work: in target 6's job, the senders took 1.4 times the CPU with 10 ms rounds as with 50 ms,
# and 1.2 times with 50 ms rounds and 100 ms batches as with 100 ms rounds and 200 ms batches.
_ROUND = 0.1
# Bytes of bucketed histogram value arrays kept for the training thread's next copies.
_MAX_SPARE_BYTES = 32 << 20
# A batch costs the aggregator about as much whatever it holds (a tenth to a quarter of a
# millisecond, more on a machine where it wakes up cold): by default a job's ranks together send
# it at most this many a second, a batch each every 200 ms up to 200 ranks, then less often, but
# at least once a second. (In target 6's job, 100 ms batches cost the aggregator 1.5 times the
# CPU of 200 ms ones.)
_JOB_BATCHES_PER_SECOND = 1000
_BATCH_INTERVAL = 0.2
_MAX_BATCH_INTERVAL = 1.0


def batch_interval_for(world_size: int | None) -> float:
    """The default ``batch_interval`` of a rank in a job of ``world_size`` ranks (None: unknown)."""
    return min(max(_BATCH_INTERVAL, (world_size or 1) / _JOB_BATCHES_PER_SECOND), _MAX_BATCH_INTERVAL)


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    # Records waiting in the training process before the sender takes them; beyond it, new
    # records are dropped and counted rather than letting memory grow or the training block.
    max_buffered: int = 2_000_000
    # How often the queued records go out as a batch (a flush sends them at once). Each batch
    # costs a fixed amount on both sides, whatever it holds; a record's wall time does not depend
    # on it, nor does any record wait beyond it. None: 200 ms, longer in jobs of more than 200
    # ranks (batch_interval_for), so that one aggregator keeps up with thousands of them.
    batch_interval: float | None = None
    max_batch_records: int = 100_000
    # A batch is closed once its records' payloads reach about this many bytes, far below the
    # aggregator's limit on one message.
    max_batch_bytes: int = 8 << 20
    # Without any acknowledgement for this long, everything unacknowledged is sent again.
    resend_after: float = 1.0
    # An empty batch at least this often, so the aggregator knows the rank is alive.
    heartbeat: float = 1.0
    # Bytes of batches sent and not yet acknowledged as received: more wait here (in memory, then
    # the spool) until acks come, so what waits in the aggregator's queues for this rank stays
    # below this (plus one batch).
    max_in_flight_bytes: int = 16 << 20
    # Batches not yet acknowledged as durable: this much in memory, then this much in a spool
    # file in spool_dir (default: the temporary directory); beyond both the oldest are dropped.
    max_unacked_bytes: int = 64 << 20
    max_spool_bytes: int = 1 << 30
    spool_dir: str | None = None


class Series:
    """One series, ``(kind, subrun, tag, reduce, max_outputs)``."""

    __slots__ = ("kind", "max_outputs", "reduce", "subrun", "tag")

    def __init__(self, kind: Any, subrun: str, tag: str, reduce: tuple[Any, ...], max_outputs: int) -> None:
        self.kind, self.subrun, self.tag = kind, subrun, tag
        self.reduce, self.max_outputs = reduce, max_outputs


# Every series this process has logged, by number: the queue's rows carry the number.
_series: list[Series] = []
_series_numbers: dict[tuple[Any, ...], int] = {}
_series_lock = threading.Lock()


def series_of(kind: Any, subrun: str, tag: str, reduce: tuple[Any, ...], max_outputs: int) -> int:
    """The number of this series in this process (not validated: the front ends check it)."""
    key = (kind, subrun, tag, reduce, max_outputs)
    number = _series_numbers.get(key)
    if number is None:
        with _series_lock:
            number = _series_numbers.get(key)
            if number is None:
                if len(_series) >= BREAK:
                    raise DistsumError(f"this process has logged {BREAK} series, as many as a row can name")
                _series.append(Series(kind, subrun, tag, reduce, max_outputs))
                number = _series_numbers[key] = len(_series) - 1
    return number


class _Marker:
    """A flush or finish request in the record queue; ``seq`` is the batch that carried it."""

    __slots__ = ("finish", "seq")

    def __init__(self, finish: bool) -> None:
        self.finish = finish
        self.seq: int | None = None


class _Record:
    """A record that is not a row: a histogram, images, text, a raw event, a scalar with a wall time.

    ``spare``: the payload is an array of the client's own (``add_values``), which the sender
    keeps for later copies once it has bucketed it.
    """

    __slots__ = ("payload", "series", "spare", "step", "wall")

    def __init__(self, series: int, step: int, payload: Any, wall: float, spare: bool = False) -> None:
        self.series, self.step, self.payload, self.wall = series, step, payload, wall
        self.spare = spare


class Client:
    """One rank's connection to the aggregator.

    ``add`` takes ``(key, step, payload, wall_time or None)`` where the key is ``(kind, subrun, tag,
    reduce, max_outputs)`` and the payload a float (scalar), an array of histogram values
    (bucketed on the sender thread) or a ``Histogram``, a list of HWC uint8 arrays or
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
        given = self.options.batch_interval
        self.batch_interval = batch_interval_for(world_size) if given is None else given
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
        # Batches handed to the socket and not yet acknowledged as received: (seq, bytes).
        self._in_flight: collections.deque[tuple[int, int]] = collections.deque()
        self._in_flight_bytes = 0
        self._window_full = False
        self._queue = bytearray()
        self._row_limit = _ROW.size * self.options.max_buffered
        self._breaks: dict[int, _Record | _Marker] = {}
        self._break_numbers = itertools.count()
        # The sender's rows taken off the queue and not yet batched, from _row on; _stops lists
        # the places in them that hold a break.
        self._rows = np.empty(0, dtype=_ROW_DTYPE)
        self._row_walls = np.empty(0)
        self._row = 0
        # Rows ever taken off the queue; and, from the rounds, (rows ever queued, time) for the
        # rows not taken yet: a row numbered below such a count was queued by that time.
        self._taken = 0
        self._stamps: collections.deque[tuple[int, float]] = collections.deque()
        # The first break a round has yet to prepare, unless drained before.
        self._unprepared = 0
        self._stops: collections.deque[int] = collections.deque()
        # Payloads that preparing made useless, let go one round or batch later (_let_go).
        self._done_with: list[Any] = []
        self._previous: list[Any] = []
        # Arrays of histogram values the sender has bucketed, by (dtype, size), for the training
        # thread's next copies: fresh memory for a copy page-faults in, at several times the cost
        # of the copy itself. At most _MAX_SPARE_BYTES in all.
        self._spares: dict[tuple[str, int], list[np.ndarray]] = {}
        self._spare_bytes = 0
        # Copies that found no spare, by (dtype, size), since the sender last made spares for them.
        self._misses: dict[tuple[str, int], int] = {}
        self._spare_lock = threading.Lock()
        self._tables: dict[bytes, bytes] = {}
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
        self._last_ack: float | None = None  # time.monotonic() of the last one
        self.world_size = world_size
        self._cond = threading.Condition()
        # A byte in this pipe wakes the sender from its poll (a flush, close, a copy that found no
        # spare). The lock keeps a flush in another thread from writing to the descriptor once
        # close() has released it.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._wake_lock = threading.Lock()
        self._stop = False
        self._closed = False
        # Set by a flush before it wakes the sender: the queue goes out at once. Other wake-ups
        # (close, a copy that found no spare) only wake it.
        self._flush_asked = False
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

    def scalar_rows(self) -> tuple[bytearray, int]:
        """The record queue and the length below which a row may be appended to it directly.

        A row is ``pack_row(series_of(...), step, value)`` of a scalar series, a checked step and
        a float value, appended with ``queue += row``. The caller must stop once the client
        closes or the process forks (``put`` refuses then, saying why).
        """
        return self._queue, self._row_limit

    def add(self, record: tuple[Any, int, Any, float | None]) -> None:
        key, step, payload, wall = record
        number = _series_numbers.get(key)
        self.put(series_of(*key) if number is None else number, step, payload, wall)

    def add_values(self, key: tuple[Any, ...], step: int, values: np.ndarray) -> None:
        """``add`` a histogram record of a copy of ``values`` (a real-valued array), in an array the
        sender gave back if one of that dtype and size is spare: the caller may change ``values``
        as soon as this returns."""
        copy = None
        missed = False
        like = (values.dtype.str, values.size)
        with self._spare_lock:
            spares = self._spares.get(like)
            if spares:
                copy = spares.pop()
                self._spare_bytes -= copy.nbytes
            elif self._room_for_spare(values.nbytes):
                self._misses[like] = self._misses.get(like, 0) + 1
                missed = True
        if copy is None:
            if missed:
                # The sender faults in a spare for the next copy meanwhile, on its own core.
                self._wake()
            copy = np.empty(values.size, dtype=values.dtype)
        np.copyto(copy.reshape(values.shape), values)
        self.put(series_of(*key), step, copy, None, spare=True)

    def put(self, series: int, step: int, payload: Any, wall: float | None, *, spare: bool = False) -> None:
        """Queue one record of series number ``series`` (``series_of``; see ``add``).

        A scalar without a wall time becomes a row, stamped when the sender batches it; every other
        record is stamped now if it has no wall time.
        """
        if self._generation != _fork_generation:
            raise DistsumError(
                "distsum was initialised in a parent process; call distsum.init() in this child"
            )
        if self._closed:
            raise DistsumError("distsum.finish() was called; call distsum.init() to log again")
        if len(self._queue) >= self._row_limit:
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "distsum: more than %d records waiting to be sent; dropping new records",
                    self.options.max_buffered,
                )
            return
        if wall is None and _series[series].kind == SCALAR:
            self._queue += pack_row(series, step, float(payload))
        else:
            self._enqueue_break(_Record(series, step, payload, time.time() if wall is None else wall, spare))

    def _enqueue_break(self, entry: _Record | _Marker) -> None:
        number = next(self._break_numbers)
        # The entry before its row: the sender, having found the row, must find the entry.
        self._breaks[number] = entry
        self._queue += pack_row(BREAK, number, 0.0)

    def _wake(self) -> None:
        # A full pipe holds wake-ups the sender has yet to read: it wakes anyway.
        with self._wake_lock, contextlib.suppress(BlockingIOError):
            if self._wake_write >= 0:
                os.write(self._wake_write, b"\0")

    def flush(self, timeout: float | None, *, finish: bool = False) -> bool:
        """Wait until the aggregator holds everything added before this call (durable if finish)."""
        if self._closed:
            return True
        if self.forked_away:
            raise DistsumError(
                "distsum was initialised in a parent process; call distsum.init() in this child"
            )
        marker = _Marker(finish)
        self._enqueue_break(marker)
        self._flush_asked = True
        self._wake()
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
        start = time.monotonic()
        ok = self.flush(timeout, finish=True)
        self._closed = True
        self._stop = True
        self._wake()
        self._thread.join()
        if not ok:
            self._warn_unconfirmed(time.monotonic() - start)
        self._socket.close(linger=0)
        self._context.term()
        with self._wake_lock:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_write = -1
        self._unacked.close()
        return ok

    def _warn_unconfirmed(self, waited: float) -> None:
        last = self._last_ack
        heard = "never heard from" if last is None else f"last heard from {time.monotonic() - last:.1f} s ago"
        log.warning(
            "distsum: rank %d stopped waiting after %.1f s: the aggregator at %s (%s) has not "
            "confirmed %d records as written (of batches 1 to %d, received up to %d, written up to %d)",
            self._origin.rank,
            waited,
            self.addr,
            heard,
            self._unacked.records,
            self._seq,
            self._received,
            self._durable,
        )

    # --- sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        options = self.options
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        watching_out = False
        now = time.monotonic()
        last_sent = last_progress = now
        round_interval = min(_ROUND, self.batch_interval)
        next_batch = now + self.batch_interval
        next_round = now + round_interval
        while not self._stop:
            if (self._unsent is not None and not self._window_full) != watching_out:
                # While a batch waits for the socket, wake as soon as it can take one (IMMEDIATE:
                # a completed connection, say to an aggregator that has just started).
                watching_out = not watching_out
                poller.modify(self._socket, (zmq.POLLIN | zmq.POLLOUT) if watching_out else zmq.POLLIN)
            wake_at = min(next_round, next_batch, last_sent + options.heartbeat)
            if self._unacked:
                wake_at = min(wake_at, last_progress + options.resend_after)
            events = dict(poller.poll(max(0, math.ceil((wake_at - time.monotonic()) * 1000))))
            now = time.monotonic()
            if self._wake_read in events:
                self._read_wake_ups()
            if self._misses:
                self._make_spares()
            if events.get(self._socket, 0) & zmq.POLLIN and self._receive_acks():
                last_progress = now
            # Cleared before the queue is drained: a flush asking after this wakes the poll again.
            due = self._flush_asked or now >= next_batch
            self._flush_asked = False
            if (due and self._queued()) or now - last_sent >= options.heartbeat:
                self._send_batches()
                last_sent = now
            elif now >= next_round:
                self._round()
            if due:
                next_batch = now + self.batch_interval
            if due or now >= next_round:
                next_round = now + round_interval
            if self._unsent is not None and (
                events.get(self._socket, 0) & zmq.POLLOUT or (self._window_full and not self._over_window(0))
            ):
                # It was not connected (the aggregator was starting, say), the pipe was full, or
                # acks have made room in the window.
                self._unsent = self._send_from(self._unsent)
            if self._unacked and now - last_progress >= options.resend_after:
                # No acknowledgement for a while: anything may have been lost on the way.
                self._in_flight.clear()
                self._in_flight_bytes = 0
                first = self._unacked.first()
                self._unsent = None if first is None else self._send_from(first)
                last_progress = now
        self._previous = []

    def _round(self) -> None:
        """Between batches: stamp the rows queued so far with the time, prepare the records."""
        self._let_go()
        queued = self._taken + len(self._queue) // _ROW.size
        if queued > (self._stamps[-1][0] if self._stamps else self._taken):
            self._stamps.append((queued, time.time()))
        # Breaks are numbered in the order they are queued (but for a race between two logging
        # threads, which leaves one to the batch), and drained in that order.
        number = self._unprepared
        while (entry := self._breaks.get(number)) is not None:
            if isinstance(entry, _Record):
                self._prepare(entry)
            number += 1
        self._unprepared = number

    def _prepare(self, record: _Record) -> None:
        """Bucket a record's histogram values or encode its images, once; keep a spare array."""
        kind, payload = _series[record.series].kind, record.payload
        if kind == HISTOGRAM and not isinstance(payload, Histogram):
            record.payload = Histogram.from_values(payload, tag=_series[record.series].tag, sums=False)
            if record.spare:
                record.spare = False
                if self._keep_spare(payload):
                    return
        elif kind == IMAGES and not all(isinstance(p, EncodedImage) for p in payload):
            record.payload = [p if isinstance(p, EncodedImage) else encode_png(p) for p in payload]
        else:
            return
        self._done_with.append(payload)

    def _keep_spare(self, values: np.ndarray) -> bool:
        """Keep a bucketed array of values for ``add_values``'s next copies, if within the bound."""
        with self._spare_lock:
            if not self._room_for_spare(values.nbytes):
                return False
            self._spares.setdefault((values.dtype.str, values.size), []).append(values)
            self._spare_bytes += values.nbytes
            return True

    def _room_for_spare(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of spare arrays fit the bound: exact under ``_spare_lock``, and
        without it a hint that ``_keep_spare`` checks again."""
        return self._spare_bytes + nbytes <= _MAX_SPARE_BYTES

    def _make_spares(self) -> None:
        """Fault in an array for each copy that found no spare of its dtype and size, within bound.

        Made here, on the sender's core, the page faults of fresh memory are off the training
        thread: a burst of histograms before any has been bucketed would otherwise pay them all.
        """
        with self._spare_lock:
            misses, self._misses = self._misses, {}
        for (dtype, size), count in misses.items():
            for _ in range(count):
                if not self._room_for_spare(size * np.dtype(dtype).itemsize):
                    return
                values = np.empty(size, dtype=dtype)
                # A write to each page faults it in (zeroed by the kernel).
                values.view(np.uint8)[:: mmap.PAGESIZE] = 0
                self._keep_spare(values)

    def _let_go(self) -> None:
        # Payloads (pixels, histogram values beyond the spares) are let go a round after they were
        # prepared, while the training thread is making the next ones: freed at once, they can
        # leave the top of the heap free and malloc returns it to the kernel, so every copy of the
        # next burst page-faults fresh memory in (several times the cost of a copy).
        self._previous, self._done_with = self._done_with, []

    def _read_wake_ups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass

    def _queued(self) -> bool:
        return self._row < len(self._rows) or len(self._queue) > 0

    def _send_batches(self) -> None:
        """Batch everything queued (at least one batch: an empty one is a heartbeat)."""
        while True:
            self._let_go()
            rows, walls, others, markers, cut = self._drain()
            for record in others:
                self._prepare(record)
            self._seq += 1
            data = self._encode(rows, walls, others, markers)
            self._unacked.add(self._seq, data, len(rows) + len(others))
            for marker in markers:
                marker.seq = self._seq
            # In order: while an earlier batch waits to be handed to the socket, this one does too.
            if self._unsent is None and not self._send(self._seq, data):
                self._unsent = self._seq
            if not (cut and self._queued()):
                return

    def _drain(self) -> tuple[np.ndarray, np.ndarray, list[_Record], list[_Marker], bool]:
        """The next batch's records: scalar rows and their wall times, other records, the flush
        marker that ends it.

        The last item says whether the batch was cut short (by a marker or a limit) rather than
        taking everything queued.
        """
        record_limit, byte_limit = self.options.max_batch_records, self.options.max_batch_bytes
        blocks: list[np.ndarray] = []
        wall_blocks: list[np.ndarray] = []
        others: list[_Record] = []
        markers: list[_Marker] = []
        count = size = 0
        cut = True
        while True:
            room = min(record_limit - count, -(-(byte_limit - size) // _SCALAR_BYTES))
            if room <= 0:
                if count:
                    break
                room = 1  # whatever the limits, a batch takes a record: the queue moves on
            if self._row == len(self._rows) and not self._take_rows(room):
                cut = False
                break
            stop = self._stops[0] if self._stops else len(self._rows)
            end = min(stop, self._row + room)
            if end > self._row:
                blocks.append(self._rows[self._row : end])
                wall_blocks.append(self._row_walls[self._row : end])
                count += end - self._row
                size += (end - self._row) * _SCALAR_BYTES
                self._row = end
                continue
            # At a break, with room for it.
            self._stops.popleft()
            self._row += 1
            number = int(self._rows["step"][stop])
            entry = self._breaks.pop(number)
            self._unprepared = max(self._unprepared, number + 1)
            if isinstance(entry, _Marker):
                markers.append(entry)  # a flush covers what came before it; the rest goes next
                break
            others.append(entry)
            count += 1
            size += _payload_bytes(_series[entry.series].kind, entry.payload)
        if len(blocks) == 1:
            return blocks[0], wall_blocks[0], others, markers, cut
        if blocks:
            return np.concatenate(blocks), np.concatenate(wall_blocks), others, markers, cut
        return self._rows[:0], self._row_walls[:0], others, markers, cut

    def _take_rows(self, room: int) -> bool:
        """Move up to ``room`` rows from the front of the queue to the sender's; False if none."""
        n = min(len(self._queue) // _ROW.size, room)
        if n == 0:
            return False
        # A copy, then a delete: the training thread only appends, so the front stays put between.
        # Never a view: while the queue's buffer is exported, appending to it fails.
        size = _ROW.size * n
        self._rows = np.frombuffer(self._queue[:size], dtype=_ROW_DTYPE)
        del self._queue[:size]
        first, self._taken = self._taken, self._taken + n
        # Each row's wall time: that of the first round that found it queued, or now.
        stamps = self._stamps
        now = time.time()
        if not stamps:
            self._row_walls = np.full(n, now)
        else:
            counts = np.fromiter((queued for queued, _ in stamps), dtype=np.int64, count=len(stamps))
            times = np.fromiter((wall for _, wall in stamps), dtype=np.float64, count=len(stamps))
            stamp = np.searchsorted(counts, np.arange(first, self._taken), "right")
            self._row_walls = np.append(times, now)[stamp]
            while stamps and stamps[0][0] <= self._taken:
                stamps.popleft()
        self._row = 0
        self._stops = collections.deque(np.flatnonzero(self._rows["series"] == BREAK).tolist())
        return True

    def _encode(
        self, rows: np.ndarray, walls: np.ndarray, others: list[_Record], markers: list[_Marker]
    ) -> bytes:
        """The batch of ``_drain``'s records, the others prepared (``_prepare``)."""
        batch = wire_pb2.Batch(seq=self._seq)
        batch.origin.CopyFrom(self._origin)
        numbers, steps, values = rows["series"].astype(np.intp), rows["step"], rows["value"]
        stamped = [r for r in others if _series[r.series].kind == SCALAR]  # given a wall time
        if stamped:
            numbers = np.concatenate([numbers, [r.series for r in stamped]])
            steps = np.concatenate([steps, np.array([r.step for r in stamped], dtype=np.int64)])
            values = np.concatenate([values, [float(r.payload) for r in stamped]])
            walls = np.concatenate([walls, [r.wall for r in stamped]])
        # Each series used once per batch, in the order of their numbers in this process.
        used = np.zeros(len(_series), dtype=bool)
        used[numbers] = True
        for record in others:
            used[record.series] = _series[record.series].kind != RAW
        present = np.flatnonzero(used)
        index = np.zeros(len(used), dtype=np.int64)
        index[present] = np.arange(len(present))
        batch.series_table = self._series_table(present)
        for record in others:
            series, step, payload, wall = _series[record.series], record.step, record.payload, record.wall
            i = int(index[record.series])
            if series.kind == RAW:
                batch.raws.add(subrun=series.subrun, event=payload)
            elif series.kind == HISTOGRAM:
                add_histogram(batch, i, step, wall, payload)
            elif series.kind == IMAGES:
                images = batch.images.add(series=i, step=step, wall_time=wall)
                for encoded in payload:
                    images.image.add(
                        height=encoded.height,
                        width=encoded.width,
                        colorspace=encoded.colorspace,
                        png=encoded.png,
                    )
            elif series.kind == TEXT:
                batch.texts.add(series=i, step=step, wall_time=wall, text=payload)
        batch.flush = bool(markers)
        batch.finish = any(m.finish for m in markers)
        first = self._unacked.first()
        batch.resend_from = self._seq if first is None else first
        batch.dropped = self.dropped + self._unacked.dropped_records
        return encode_batch(batch, ScalarColumns(index[numbers], steps, values, walls))

    def _series_table(self, present: np.ndarray) -> bytes:
        """The series table of a batch that uses the series numbered ``present``, ascending.

        A rank's batches mostly use the same series, so the table is made once and kept.
        """
        key = present.tobytes()
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= _MAX_TABLES:
                self._tables.clear()
            series = [_series[n] for n in present.tolist()]
            table = self._tables[key] = encode_series_table(
                (s.subrun, s.tag, s.kind, s.reduce, s.max_outputs) for s in series
            )
        return table

    def _send_from(self, first: int) -> int | None:
        """Send the held batches from ``first`` on, in order; the first that did not go, if any."""
        for seq, data in self._unacked.items():
            if seq >= first and not self._send(seq, data):
                return seq
        return None

    def _over_window(self, size: int) -> bool:
        return bool(self._in_flight) and self._in_flight_bytes + size > self.options.max_in_flight_bytes

    def _send(self, seq: int, data: bytes) -> bool:
        # Not connected, the pipe is full, or too much is on its way: the batch stays
        # unacknowledged and goes later.
        self._window_full = self._over_window(len(data))
        if self._window_full:
            return False
        try:
            self._socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._in_flight.append((seq, len(data)))
        self._in_flight_bytes += len(data)
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
                if e.cause != "wrong version":
                    log.warning("distsum: ignoring a malformed acknowledgement: %s", e)
                else:
                    # An aggregator of another distsum version answers a rank once: nothing sent is
                    # acknowledged, and the records wait (in memory, then in the spool).
                    log.warning(
                        "distsum: the aggregator at %s speaks another version of the wire protocol "
                        "(%s) and acknowledges nothing this rank sends: run the same distsum on both",
                        self.addr,
                        e,
                    )
                continue
            if ack.stream != self._origin.stream:
                continue
            self._last_ack = time.monotonic()
            with self._cond:
                if ack.received > self._received or ack.durable > self._durable:
                    progress = True
                self._received = max(self._received, min(ack.received, self._seq))
                while self._in_flight and self._in_flight[0][0] <= self._received:
                    self._in_flight_bytes -= self._in_flight.popleft()[1]
                self._durable = max(self._durable, min(ack.durable, self._received))
                self._unacked.release_through(self._durable)
                if ack.world_size:
                    self.world_size = ack.world_size
                    if self.options.batch_interval is None:
                        self.batch_interval = batch_interval_for(ack.world_size)
                self._cond.notify_all()
        return progress


def _payload_bytes(kind: Any, payload: Any) -> int:
    """About how many bytes a record that is not a row adds to a batch (an upper bound)."""
    if kind == SCALAR:
        return _SCALAR_BYTES
    if kind == HISTOGRAM:
        return 20_000  # sparse counts on 1551 buckets at most
    if kind == IMAGES:
        return sum(len(p.png) if isinstance(p, EncodedImage) else p.nbytes for p in payload) + 1024
    return len(payload) * 4
