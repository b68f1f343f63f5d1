"""The aggregator: one ROUTER socket, every rank's batches in, one run per job out.

One thread does everything, in a loop: receive and check batches (``_wire``), drop the copies it
already has, hand the records to the job's ``RunMerger``, write the steps that are ready as one
event per (run path, step) to that run path's event file, and acknowledge. A malformed message is
counted and logged (one line per cause), never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import NamedTuple

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from distsum._errors import DistsumError
from distsum._eventfile import EventFile, is_event_file, read_records
from distsum._image import EncodedImage
from distsum._journal import Journal, Progress
from distsum._merge import REPLAY_LATE, REPLAY_MERGED, MergedStep, RunMerger, distinct_steps
from distsum._process import alive
from distsum._proto import event_pb2, journal_pb2, wire_pb2
from distsum._security import ServerKeys, is_local
from distsum._summaries import Item, ScalarBlock, ScalarItem, event_bytes
from distsum._wire import (
    MAX_MESSAGE_BYTES,
    WireError,
    check_records,
    decode_batch,
    decode_series_table,
    encode_ack,
    histogram_of,
    scalar_columns,
)

__all__ = ["Aggregator", "AggregatorOptions"]

log = logging.getLogger("distsum.aggregator")

# Seconds without a new rank before a restarted embedded aggregator takes the job as done.
_QUIET_AFTER_RESTART = 3.0
# Seconds a done embedded aggregator waits for the ranks to hang up with their last acks, and a
# stopped aggregator (whose ranks resend to the next one) for a moment.
_HANG_UP_WAIT_DONE = 10.0
_HANG_UP_WAIT_STOPPED = 0.5
# A round takes in at most this many messages, or bytes of them, before it writes what is ready
# and acknowledges: ranks sending faster than the aggregator merges see their batches received a
# round at a time, and what waits stays in the socket's queue rather than in the merger, whose
# work grows with what it holds (a flood of 200 KiB batches went 1.5-2x faster than with rounds
# bounded by the message count alone).
_ROUND_MESSAGES = 1000
_ROUND_BYTES = 8 << 20
# Seconds a round waits for messages before it looks at the clock (timeouts, settled steps).
_ROUND_WAIT = 0.05
# Peers of another protocol version told so; beyond this many, new ones are not (a bound on what
# anyone who can connect can make the aggregator keep).
_MAX_TOLD_VERSION = 1 << 16

_HEALTH_TAGS = tuple(
    f"distsum/{name}"
    for name in (
        "ranks_alive",
        "records_per_second",
        "late_records",
        "dropped_records",
        "open_steps",
        "disk_errors",
        "step_lag",
    )
)


@dataclass(frozen=True, kw_only=True)
class AggregatorOptions:
    logdir: str
    bind: str = "tcp://127.0.0.1:0"
    world_size: int | None = None
    step_timeout: float = 30.0
    # A step every rank has reached is written once it has had no record for this long (so a
    # slow training step does not hold the step it logged until the next one begins). With the
    # ranks' batching (a record arrives up to about 200 ms after the call), such a step is
    # readable within about 1.7 s of its last record: inside the flush interval below (2 s), as
    # benchmark target 8 asks.
    step_settle: float = 1.5
    # Event files are fsynced at least this often; a batch is acknowledged as durable only once
    # its records are written and fsynced. A flush or finish from a rank fsyncs at once.
    flush_secs: float = 2.0
    # A rank silent for this long (no batch, not even a heartbeat) is no longer waited for.
    rank_timeout: float = 30.0
    # Embedded mode: the logdir is the job's one run (run name ""), and the aggregator exits once
    # every rank of the world has finished. A standalone aggregator serves runs named by one
    # path component each, so no run's directory can hold or lie inside another's.
    embedded: bool = False
    # Embedded mode: exit when this process is gone and every rank has been silent for a while.
    parent_pid: int | None = None
    status_interval: float = 5.0
    # A standalone aggregator forgets a finished stream this long after its last batch, and a
    # run once it has no streams left (a later batch opens it again).
    retire_after: float = 10.0
    # What may wait in memory for a disk that refuses it, before the oldest is dropped.
    max_pending_bytes: int = 256 << 20
    # CURVE keys; without them, a bind beyond this machine needs insecure=True.
    keys: ServerKeys | None = None
    insecure: bool = False


@dataclass(eq=False)  # one object per stream, compared and hashed by identity
class _Stream:
    run: str
    rank: int
    identity: bytes
    received: int = 0
    durable: int = 0
    acked: tuple[int, int] = (0, 0)
    last_seen: float = 0.0
    finished: bool = False
    # Records the rank says it dropped (its buffers overflowed).
    dropped: int = 0
    # Step -> the lowest seq with records at that step, for steps not yet written.
    open_steps: dict[int, int] = field(default_factory=dict)
    # What an earlier aggregator merged of this stream before it died, from the run's journal.
    earlier: Progress | None = None


class _Table(NamedTuple):
    ids: np.ndarray
    kinds: np.ndarray
    scalars_only: bool


# Series tables remembered per run; beyond this many, or this many bytes of them, the memory
# starts over.
_MAX_TABLES = 1024
_MAX_TABLE_BYTES = 4 << 20


@dataclass
class _Run:
    merger: RunMerger
    journal: Journal
    world_size: int = 0
    files: dict[str, EventFile] = field(default_factory=dict)
    last_health_step: int = -1
    # The highest step any rank of the run has logged, for the step lag.
    highest_step: int = -1
    # Serialized events by run path, (step, event), not yet written (the disk refused them).
    pending: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    # The run's streams, and how many of them have not finished.
    streams: list[_Stream] = field(default_factory=list)
    active: int = 0
    # Each rank's latest stream to join (one an earlier aggregator saw finish does not): none of
    # the rank's other streams is unfinished.
    live: dict[int, _Stream] = field(default_factory=dict)
    # Streams that opened steps since the round last looked at their open steps.
    opened: set[_Stream] = field(default_factory=set)
    # (run path, tag) -> the last step an earlier aggregator wrote there: ranks resend what was
    # not acknowledged as durable when it died, and none of it may be written twice.
    recovered: dict[tuple[str, str], int] = field(default_factory=dict)
    # The series tables of the run's batches seen so far: run-wide ids and kinds, by index.
    tables: dict[bytes, _Table] = field(default_factory=dict)
    table_bytes: int = 0


class Aggregator:
    """Receives batches on ``options.bind`` and writes runs under ``options.logdir``."""

    def __init__(self, options: AggregatorOptions) -> None:
        self.options = options
        self.root = os.path.abspath(options.logdir)
        os.makedirs(self.root, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"logdir {self.root} is not writable")
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._auth = None
        self._monitor: zmq.Socket[bytes] | None = None
        if options.keys is not None:
            self._auth = options.keys.apply(self._context, self._socket)
        elif not is_local(options.bind) and not options.insecure:
            self._socket.close(linger=0)
            self._context.term()
            raise DistsumError(
                f"refusing to listen on {options.bind} without authentication: anyone who reaches "
                "it could write into the runs; give CURVE keys (--curve-secret and --curve-clients), "
                "bind to loopback, or pass --insecure"
            )
        try:
            self._socket.bind(options.bind)
        except zmq.ZMQError as e:
            self._close_socket()
            raise OSError(f"cannot listen on {options.bind}: {e}") from None
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Connections open now, from the socket's monitor: the way to tell that ranks hung up.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._peers = 0
        self._runs: dict[str, _Run] = {}
        self._streams: dict[tuple[str, int, int], _Stream] = {}
        # Streams that may have something new to be told (received or durable changed, or they
        # missed an ack): the round acknowledges these, not every stream of a thousand-rank job.
        self._to_ack: dict[tuple[str, int, int], _Stream] = {}
        # Streams forgotten (see _retire): their last batch, all of it durable.
        self._retired: dict[tuple[str, int, int], int] = {}
        self._told_version: set[bytes] = set()
        self._last_liveness = 0.0
        self._stop = threading.Event()
        self.malformed: Counter[str] = Counter()
        self.records = 0
        self.duplicates = 0
        self.disk_errors = 0
        self._last_join = time.monotonic()
        # An embedded aggregator that finds event files in its run was started again after a crash.
        self._restarted = options.embedded and any(
            is_event_file(name) for _, _, names in os.walk(self.root) for name in names
        )
        self.dropped_writes = 0
        self.pending_bytes = 0
        # Items not written because an earlier aggregator had written them (after a restart).
        self.rewritten = 0
        self._dirty: set[EventFile] = set()
        self._sync_now = False
        self._last_sync = time.monotonic()
        self._records_at_status = 0
        self._status_time = time.monotonic()
        self._rate = 0.0

    def _close_socket(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until ``stop()`` (or, embedded, until the job is done); write out everything held."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        done = False
        try:
            while not self._stop.is_set():
                for socket, _ in poller.poll(self._poll_ms()):
                    if socket is self._socket:
                        self._receive_all()
                    else:
                        self._count_peers()
                now = time.monotonic()
                self._check_liveness(now)
                self._write(take_all=False)
                self._sync(now)
                self._acknowledge()
                self._status(now)
                if self._done(now):
                    done = True
                    break
        finally:
            self._write(take_all=True)
            self._sync_now = True
            self._sync(time.monotonic())
            self._acknowledge()
            # Keep answering until every rank has hung up, which it does once it has read its last
            # ack: a rank's socket drops the acks it has not read when its peer goes away. Once the
            # job is done no aggregator would answer a resend, so a slow rank is waited for (a
            # loaded machine can keep it from reading for a while); when stopped, for a moment.
            deadline = time.monotonic() + (_HANG_UP_WAIT_DONE if done else _HANG_UP_WAIT_STOPPED)
            while (self._unacknowledged() or self._peers) and time.monotonic() < deadline:
                for socket, _ in poller.poll(10):
                    if socket is self._socket:
                        self._receive_all()
                    else:
                        self._count_peers()
                self._acknowledge()
            if not self._peers and not self._unacknowledged():
                # Every rank has hung up with its last ack: none of them can resend anything.
                for (_, rank, stream_id), stream in self._streams.items():
                    if stream.finished:
                        self._runs[stream.run].journal.forget(rank, stream_id)
                self._sync_now = True
                self._sync(time.monotonic())
            else:
                log.info(
                    "exiting with %d connections open and %d ranks' last acks not sent",
                    self._peers,
                    self._unacknowledged(),
                )
            for name, run in self._runs.items():
                if run.pending:
                    count = sum(len(entries) for entries in run.pending.values())
                    log.error("exiting with %d events of run %r that the disk did not take", count, name)
                self._close_files(run)
            self._close_socket()
            # libzmq leaves an ipc socket's file behind.
            if self.address.startswith("ipc://") and not self.address.startswith("ipc://@"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address[len("ipc://") :])

    def _poll_ms(self) -> int:
        """How long a round waits for messages: _ROUND_WAIT, or less when a step settles sooner,
        so that it is written then rather than up to a round later."""
        wait = _ROUND_WAIT
        now = time.monotonic()
        for run in self._runs.values():
            at = run.merger.settles_at()
            if at is not None:
                wait = min(wait, at - now)
        return max(1, math.ceil(wait * 1000))

    # --- input ---------------------------------------------------------------------------------

    def _receive_all(self) -> None:
        budget = _ROUND_BYTES
        for _ in range(_ROUND_MESSAGES):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                self._malformed("bad framing", frames[0], f"{len(frames) - 1} frames, expected 1")
                continue
            self._handle(frames[0], frames[1])
            budget -= len(frames[1])
            if budget <= 0:
                break

    def _malformed(self, cause: str, identity: bytes, detail: str) -> None:
        if not self.malformed[cause]:
            log.warning(
                "dropping malformed message from peer %s (%s); counting the rest", identity.hex(), detail
            )
        self.malformed[cause] += 1

    def _handle(self, identity: bytes, frame: bytes) -> None:
        try:
            batch = decode_batch(frame)
        except WireError as e:
            self._malformed(e.cause, identity, str(e))
            if e.cause == "wrong version":
                self._tell_version(identity)
            return
        origin = batch.origin
        key = (origin.run, origin.rank, origin.stream)
        stream = self._streams.get(key)
        retired = self._retired.get(key) if stream is None else None
        if retired is not None and batch.seq <= retired:
            # A finished stream that missed its last acknowledgement: everything is durable.
            self.duplicates += 1
            self._send_ack(identity, origin.stream, retired, retired, 0)
            return
        if not self._serves(origin.run):
            self._malformed("run not served here", identity, f"run {origin.run!r}")
            return
        # Everything is checked before the batch changes anything: a refused batch defines no
        # series, opens no run and sets no world size.
        known = self._runs.get(origin.run)
        table = None if known is None else known.tables.get(batch.series_table)
        try:
            if table is None:
                specs = decode_series_table(batch.series_table)
                kinds = np.array([spec.kind for spec in specs], dtype=np.int64)
                check_records(batch, kinds)
            else:
                check_records(batch, table.kinds, scalars_only=table.scalars_only)
        except WireError as e:
            self._malformed(e.cause, identity, str(e))
            return
        run = self._run(origin.run, origin.world_size)
        if table is None:
            table = self._table(run, batch.series_table, specs, kinds)
        if stream is None:
            # Batches below resend_from are written already (by an earlier aggregator, if this
            # one restarted); the stream goes on from there.
            start = self._retired.pop(key, None) or max(0, min(batch.resend_from, batch.seq) - 1)
            earlier = run.journal.earlier.get((origin.rank, origin.stream))
            if earlier is not None:
                # Durable before the crash, though the rank may have missed the acknowledgement.
                start = max(start, earlier.durable)
            stream = self._streams[key] = _Stream(origin.run, origin.rank, identity, start, start)
            stream.earlier = earlier
            run.streams.append(stream)
            if earlier is not None and earlier.done:
                # An earlier aggregator made all of it durable, and it resends because it missed
                # the acknowledgement: it is not waited for again.
                stream.finished = True
            else:
                # A rank number has one process at a time: a new stream of it (a restarted rank)
                # supersedes the old one, which must not later time out and take the new one along.
                old = run.live.get(origin.rank)
                if old is not None and not old.finished:
                    old.finished = True
                    run.active -= 1
                run.live[origin.rank] = stream
                run.active += 1
                self._last_join = time.monotonic()
                run.merger.rank_joined(origin.rank)
                log.info(
                    "rank %d of run %r joined (pid %d on %s)",
                    origin.rank,
                    origin.run or ".",
                    origin.pid,
                    origin.host,
                )
        stream.identity = identity
        stream.last_seen = time.monotonic()
        self._to_ack[key] = stream
        stream.dropped = max(stream.dropped, batch.dropped)
        if batch.seq <= stream.received:
            self.duplicates += 1
            stream.acked = (-1, -1)  # acknowledge again: the rank missed the earlier one
            return
        if batch.resend_from > stream.received + 1 and batch.seq >= batch.resend_from:
            # The rank dropped the batches in between (its spool overflowed while it could not
            # reach us); they are counted in batch.dropped. Go on from what it still has.
            stream.received = stream.durable = batch.resend_from - 1
        if batch.seq != stream.received + 1:
            return  # a gap: the rank resends from its first unacknowledged batch
        try:
            self._add(run.merger, origin.rank, batch, stream, table.ids)
        except (ValueError, TypeError) as e:
            # Acknowledged all the same: sending it again would not make it valid.
            self._malformed("bad records", identity, str(e))
        stream.received = batch.seq
        if batch.flush or batch.finish:
            self._sync_now = True
        if batch.flush:
            run.merger.rank_flushed(origin.rank)
        if batch.finish and not stream.finished:
            stream.finished = True
            run.active -= 1
            run.merger.rank_left(origin.rank)
            log.info("rank %d of run %r finished (batch %d)", origin.rank, origin.run or ".", batch.seq)

    def _tell_version(self, identity: bytes) -> None:
        """Answer a peer of another protocol version, once, with an ack of this one: it cannot read
        it, and says so, where it would otherwise wait in silence for acks that never come."""
        if identity in self._told_version or len(self._told_version) >= _MAX_TOLD_VERSION:
            return
        self._told_version.add(identity)
        self._send_ack(identity, 0, 0, 0, 0)

    def _serves(self, name: str) -> bool:
        """Whether this aggregator writes the run ``name``: a job must not write into another
        job's run (the embedded aggregator serves only its job's, the standalone one runs of one
        path component each)."""
        return name == "" if self.options.embedded else name != "" and "/" not in name

    def _run(self, name: str, world_size: int) -> _Run:
        """The run ``name`` (one ``_serves``), created on first sight."""
        run = self._runs.get(name)
        if run is None:
            size = self.options.world_size or world_size or None
            run_dir = os.path.join(self.root, name)
            recovered = _written_steps(run_dir)
            run = self._runs[name] = _Run(
                RunMerger(
                    step_timeout=self.options.step_timeout,
                    settle=self.options.step_settle,
                    world_size=size,
                    written=recovered,
                ),
                Journal(run_dir),
                size or 0,
                recovered=recovered,
            )
            if recovered:
                log.info("run %r: read back %d series written before", name or ".", len(recovered))
            # Ranks done with an earlier aggregator (everything durable) never come back with
            # records: not waited for.
            earlier = run.journal.earlier
            live = {rank for (rank, _), progress in earlier.items() if not progress.done}
            for rank in {rank for rank, _ in earlier} - live:
                run.merger.rank_left(rank)
            # Claimed first, so a rank's own series of these names counts as a conflict instead
            # of writing the same (tag, step) twice.
            for tag in _HEALTH_TAGS:
                run.merger.series("", tag, wire_pb2.SCALAR, (wire_pb2.MEAN,))
        elif world_size and not self.options.world_size and world_size != run.world_size:
            run.world_size = world_size
            run.merger.set_world_size(world_size)
        return run

    def _table(self, run: _Run, data: bytes, specs: list[wire_pb2.Series], kinds: np.ndarray) -> _Table:
        """A checked series table not seen before in the run, mapped to the run's series ids."""
        ids = np.array(
            [run.merger.series(s.subrun, s.tag, s.kind, tuple(s.reduce), s.max_outputs) for s in specs],
            dtype=np.intp,
        )
        table = _Table(ids, kinds, bool(np.logical_and.reduce(kinds == wire_pb2.SCALAR)))
        # Remembered up to a bound in bytes: any peer can send distinct tables.
        if len(data) <= _MAX_TABLE_BYTES:
            if run.table_bytes + len(data) > _MAX_TABLE_BYTES or len(run.tables) >= _MAX_TABLES:
                run.tables.clear()
                run.table_bytes = 0
            run.tables[data] = table
            run.table_bytes += len(data)
        return table

    def _add(
        self, merger: RunMerger, rank: int, batch: wire_pb2.Batch, stream: _Stream, ids: np.ndarray
    ) -> None:
        """Hand one batch's records to the merger: all of them, or (on a ValueError) none."""
        histograms = [histogram_of(h) for h in batch.histograms]
        # A batch an earlier aggregator merged before it died: its records go where they went then.
        earlier = stream.earlier
        fate = None
        if earlier is not None and batch.seq <= earlier.merged:
            fate = earlier.late.get(batch.seq) or journal_pb2.LateRecords()
        late = journal_pb2.LateRecords()
        steps: set[int] = set()
        scalars = scalar_columns(batch)
        if scalars.series.size:
            series = ids[scalars.series]
            replay = None
            if fate is not None:
                replay = np.full(series.size, REPLAY_MERGED, dtype=np.int8)
                replay[[i for i in fate.scalars if i < series.size]] = REPLAY_LATE
            distinct = distinct_steps(scalars.steps)
            went_late = merger.add_scalars(
                rank, series, scalars.steps, scalars.values, scalars.wall_times, replay, distinct
            )
            if went_late is not None:
                late.scalars.extend(went_late.tolist())
            steps.update(distinct[0].tolist())

        histogram_replay = _replay_flags(fate, "histograms", len(histograms))
        for i, (h, histogram) in enumerate(zip(batch.histograms, histograms, strict=True)):
            if merger.add_histogram(rank, ids[h.series], h.step, histogram, h.wall_time, histogram_replay[i]):
                late.histograms.append(i)
            steps.add(h.step)
        image_replay = _replay_flags(fate, "images", len(batch.images))
        for i, im in enumerate(batch.images):
            images = [EncodedImage(e.height, e.width, e.colorspace, e.png) for e in im.image]
            if merger.add_images(rank, ids[im.series], im.step, images, im.wall_time, image_replay[i]):
                late.images.append(i)
            steps.add(im.step)
        text_replay = _replay_flags(fate, "texts", len(batch.texts))
        for i, t in enumerate(batch.texts):
            if merger.add_text(rank, ids[t.series], t.step, t.text, t.wall_time, text_replay[i]):
                late.texts.append(i)
            steps.add(t.step)
        run = self._runs[stream.run]
        if rank == 0:
            # Written with the merged steps, through the same retries when the disk refuses.
            for raw in batch.raws:
                event = event_pb2.Event.FromString(raw.event)
                if fate is not None and _written_before(run, raw.subrun, event):
                    continue
                run.pending.setdefault(raw.subrun, []).append((event.step, raw.event))
                self.pending_bytes += len(raw.event)
        if steps:
            run.highest_step = max(run.highest_step, max(steps))
        self.records += (
            scalars.series.size
            + len(batch.histograms)
            + len(batch.images)
            + len(batch.texts)
            + len(batch.raws)
        )
        run.journal.merged(
            rank, batch.origin.stream, batch.seq, late if late.ByteSize() else None, finished=batch.finish
        )
        for step in steps:
            stream.open_steps.setdefault(step, batch.seq)
        if steps:
            run.opened.add(stream)

    def _check_liveness(self, now: float) -> None:
        if now - self._last_liveness < 1.0:
            return
        self._last_liveness = now
        if not self.options.embedded:
            self._retire(now)
        for stream in self._streams.values():
            if not stream.finished and now - stream.last_seen > self.options.rank_timeout:
                log.warning(
                    "rank %d of run %r silent for %.0f s: no longer waiting for it",
                    stream.rank,
                    stream.run or ".",
                    now - stream.last_seen,
                )
                stream.finished = True
                run = self._runs[stream.run]
                run.active -= 1
                live = run.live.get(stream.rank)
                if live is None or live.finished:
                    run.merger.rank_left(stream.rank)

    def _retire(self, now: float) -> None:
        """Forget streams that finished with everything durable and acknowledged, and runs left
        with none: a long-lived aggregator then visits only live streams each round, and keeps
        only a sequence number per finished stream (to answer a late resend). The run's journal
        keeps them until the run closes."""
        for key, stream in list(self._streams.items()):
            if (
                stream.finished
                and stream.durable == stream.received
                and stream.acked == (stream.received, stream.durable)
                and now - stream.last_seen > self.options.retire_after
            ):
                del self._streams[key]
                self._to_ack.pop(key, None)
                self._retired[key] = stream.received
                run = self._runs[stream.run]
                run.streams.remove(stream)
                run.opened.discard(stream)
                if run.live.get(stream.rank) is stream:
                    del run.live[stream.rank]
                # Still in the journal while the run is open: an aggregator started after this
                # one must know that the rank is done, or it waits for it at every step.
        for name, run in list(self._runs.items()):
            if not run.streams and not run.pending and not run.merger.stats().open_steps:
                for run_name, rank, stream_id in self._retired:
                    if run_name == name:
                        run.journal.forget(rank, stream_id)
                # A batch for it later opens it again, reading back its files and journal.
                try:
                    run.journal.checkpoint()  # without the retired streams: none, usually
                except OSError as e:
                    self._disk_error(run.journal.path, e)
                self._close_files(run)
                del self._runs[name]

    def _done(self, now: float) -> bool:
        if self.options.embedded and all(s.finished for s in self._streams.values()):
            if self._streams and not any(r.merger.stats().waited_ranks for r in self._runs.values()):
                return True
            # Started again after a crash: ranks that finished with the old one never come back,
            # and every live rank shows up within a heartbeat (one a second). When none has for a
            # few, and those that did have finished, the job is done.
            if self._restarted and now - self._last_join > _QUIET_AFTER_RESTART:
                return True
        parent = self.options.parent_pid
        if parent is not None and not alive(parent):
            quiet = all(now - s.last_seen > 5 for s in self._streams.values())
            return quiet
        return False

    # --- output --------------------------------------------------------------------------------

    def _write(self, *, take_all: bool) -> None:
        for name, run in self._runs.items():
            steps = run.merger.take_all() if take_all else run.merger.take_ready()
            if steps:
                self._add_health(name, run, steps)
            for merged in steps:
                for path, items in merged.outputs.items():
                    if run.recovered:
                        items = self._not_written_before(run, path, merged.step, items)
                        if not items:
                            continue
                    data = event_bytes(merged.step, merged.wall_time, items)
                    run.pending.setdefault(path, []).append((merged.step, data))
                    self.pending_bytes += len(data)
            if run.pending:
                # The journal first: whatever reaches an event file, it must already describe.
                try:
                    run.journal.append()
                except OSError as e:
                    self._disk_error(run.journal.path, e)
            wrote = False
            for path in list(run.pending) if not run.journal.unwritten else ():
                # Kept until written: a full disk or a lost directory is retried every round.
                try:
                    f = self._file(name, run, path)
                    f.write([event for _, event in run.pending[path]])
                except OSError as e:
                    self._disk_error(os.path.join(self.root, name, path), e)
                    continue
                self.pending_bytes -= sum(len(event) for _, event in run.pending.pop(path))
                self._dirty.add(f)
                wrote = True
            if self.pending_bytes > self.options.max_pending_bytes:
                self._drop_pending(run)
                wrote = True
            unwritten = {step for entries in run.pending.values() for step, _ in entries}
            if run.files and not run.active and not unwritten and not run.merger.stats().open_steps:
                # Every rank of the job finished and all is written: give the descriptors back,
                # so a long-lived aggregator serves any number of jobs.
                self._close_files(run)
            # A stream's records at a step are written once the merger no longer holds the step
            # and nothing of it waits for the disk (records it dropped as late or conflicting
            # never open a step at all). A held step stops being held only when a take returns
            # it, so every stream's open steps are looked at in a round that took or wrote
            # something; in other rounds, only those of the streams that opened steps.
            for stream in run.streams if steps or wrote else run.opened:
                if stream.open_steps:
                    done = [s for s in stream.open_steps if not run.merger.holds(s) and s not in unwritten]
                    for step in done:
                        del stream.open_steps[step]
                    if stream.finished and not stream.open_steps:
                        # A rank's finish waits for this: its last records waited for other
                        # ranks' and are written now, so fsync now rather than flush_secs later.
                        self._sync_now = True
            run.opened.clear()

    def _not_written_before(self, run: _Run, path: str, step: int, items: list[Item]) -> list[Item]:
        recovered = run.recovered
        if not any(recovered.get((path, tag), -1) >= step for tag in _tags(items)):
            return items
        flat = [one for item in items for one in (item.items() if isinstance(item, ScalarBlock) else (item,))]
        kept: list[Item] = [item for item in flat if recovered.get((path, item.tag), -1) < step]
        self.rewritten += len(flat) - len(kept)
        return kept

    def _close_files(self, run: _Run) -> None:
        run.journal.close()
        for f in run.files.values():
            try:
                f.close()
            except OSError as e:
                self._disk_error(f.path, e)
            self._dirty.discard(f)
        run.files.clear()

    def _drop_pending(self, run: _Run) -> None:
        """Past the bound on what waits for the disk, the oldest events go: counted, logged once."""
        for entries in run.pending.values():
            while entries and self.pending_bytes > self.options.max_pending_bytes:
                _, event = entries.pop(0)
                self.pending_bytes -= len(event)
                if not self.dropped_writes:
                    log.error(
                        "more than %d bytes wait for the disk; dropping the oldest",
                        self.options.max_pending_bytes,
                    )
                self.dropped_writes += 1
        for path in [p for p, entries in run.pending.items() if not entries]:
            del run.pending[path]

    def _disk_error(self, path: str, error: OSError) -> None:
        if not self.disk_errors:
            log.error("writing %s failed (%s); holding the data and retrying", path, error.strerror or error)
        self.disk_errors += 1

    def _sync(self, now: float) -> None:
        """Fsync what was written, at most ``flush_secs`` apart, then let acks call it durable."""
        if not (self._sync_now or now - self._last_sync >= self.options.flush_secs):
            return
        try:
            for f in list(self._dirty):
                f.fsync()
                self._dirty.discard(f)
        except OSError as e:
            self._disk_error("an event file", e)
            return
        self._sync_now, self._last_sync = False, now
        for key, stream in self._streams.items():
            _, rank, stream_id = key
            durable = min(stream.open_steps.values(), default=stream.received + 1) - 1
            if durable != stream.durable:
                stream.durable = durable
                self._to_ack[key] = stream
            self._runs[stream.run].journal.durable(rank, stream_id, durable)
        for run in self._runs.values():
            if run.journal.dirty:
                try:
                    run.journal.checkpoint()
                except OSError as e:
                    self._disk_error(run.journal.path, e)

    def _file(self, name: str, run: _Run, path: str) -> EventFile:
        f = run.files.get(path)
        if f is None:
            f = run.files[path] = EventFile(os.path.join(self.root, name, path))
        return f

    def _add_health(self, name: str, run: _Run, steps: list[MergedStep]) -> None:
        """The aggregator's own series under ``distsum/``, at the last step written this time."""
        last = steps[-1]
        if last.step <= run.last_health_step:
            return
        run.last_health_step = last.step
        stats = run.merger.stats()
        ranks_alive = sum(1 for s in self._streams.values() if s.run == name and not s.finished)
        dropped = (
            stats.late_dropped
            + stats.conflicts
            + sum(self.malformed.values())
            + self.dropped_writes
            + sum(stream.dropped for stream in run.streams)
        )
        values = (
            ranks_alive,
            self._rate,
            stats.late,
            dropped,
            stats.open_steps,
            self.disk_errors,
            # How far the written run trails the newest step any rank logged.
            max(0, run.highest_step - last.step),
        )
        health = [ScalarItem(tag, float(v)) for tag, v in zip(_HEALTH_TAGS, values, strict=True)]
        last.outputs.setdefault("", []).extend(health)

    def _count_peers(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)

    def _unacknowledged(self) -> int:
        """How many streams have an acknowledgement to send."""
        return sum(stream.acked != (stream.received, stream.durable) for stream in self._to_ack.values())

    def _acknowledge(self) -> None:
        for key, stream in list(self._to_ack.items()):
            if stream.acked != (stream.received, stream.durable):
                size = self._runs[stream.run].world_size
                stream_id = key[2]
                if not self._send_ack(stream.identity, stream_id, stream.received, stream.durable, size):
                    continue  # tried again next round
                stream.acked = (stream.received, stream.durable)
            del self._to_ack[key]

    def _send_ack(self, identity: bytes, stream: int, received: int, durable: int, world_size: int) -> bool:
        try:
            self._socket.send_multipart(
                [identity, encode_ack(stream, received, durable, world_size)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            return False  # the rank is gone or slow; it resends and gets a new ack
        return True

    def _status(self, now: float) -> None:
        elapsed = now - self._status_time
        if elapsed < 1.0:
            return
        self._rate = (self.records - self._records_at_status) / elapsed
        self._records_at_status, self._status_time = self.records, now
        ranks_alive = sum(1 for s in self._streams.values() if not s.finished)
        written = sum(r.merger.stats().steps_written for r in self._runs.values())
        late = sum(r.merger.stats().late for r in self._runs.values())
        line = (
            f"ranks alive {ranks_alive}  steps written {written}  records/s {self._rate:,.0f}  "
            f"late {late}  dropped {sum(self.malformed.values())}  duplicates {self.duplicates}"
            f"  disk errors {self.disk_errors}"
        )
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
        elif math.floor(now / self.options.status_interval) != math.floor(
            (now - elapsed) / self.options.status_interval
        ):
            log.info("%s", line)


def _tags(items: list[Item]) -> Iterator[str]:
    for item in items:
        if isinstance(item, ScalarBlock):
            yield from item.tags.tags
        else:
            yield item.tag


def _replay_flags(fate: journal_pb2.LateRecords | None, kind: str, n: int) -> list[int]:
    """What an earlier aggregator did with each of a batch's ``n`` records of a kind (0: nothing)."""
    if fate is None:
        return [0] * n
    late = set(getattr(fate, kind))
    return [REPLAY_LATE if i in late else REPLAY_MERGED for i in range(n)]


def _written_before(run: _Run, path: str, event: event_pb2.Event) -> bool:
    """Whether an earlier aggregator wrote this passed-through event of a batch it merged.

    Summaries are looked up; other events (a graph, say) are taken as written: the aggregator
    writes them right after it journals their batch, so only a crash between the two loses one.
    """
    return all(run.recovered.get((path, value.tag), -1) >= event.step for value in event.summary.value)


def _written_steps(run_dir: str) -> dict[tuple[str, str], int]:
    """(run path, tag) -> the last step of that tag in the event files below ``run_dir``."""
    last: dict[tuple[str, str], int] = {}
    for directory, _, names in os.walk(run_dir):
        path = os.path.relpath(directory, run_dir)
        path = "" if path == os.curdir else path.replace(os.sep, "/")
        for name in sorted(n for n in names if is_event_file(n)):
            try:
                records = list(read_records(os.path.join(directory, name)))
            except OSError as e:
                log.warning("cannot read %s back: %s", os.path.join(directory, name), e)
                continue
            for payload in records:
                try:
                    event = event_pb2.Event.FromString(payload)
                except Exception:  # a record that is not an Event: nothing of ours
                    continue
                for value in event.summary.value:
                    key = (path, value.tag)
                    if event.step > last.get(key, -1):
                        last[key] = event.step
    return last


def install_signal_handlers(aggregator: Aggregator) -> None:
    """SIGINT and SIGTERM stop the loop; ``serve`` then writes out everything it holds."""

    def handler(signum: int, frame: FrameType | None) -> None:
        aggregator.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
