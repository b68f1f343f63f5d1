"""Event files on disk: TFRecord framing, file naming, and the background writer.

The layers, bottom up:

- ``frame(payload)``: one TFRecord. On disk a record is::

      uint64 length | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

  all little-endian, no padding. The mask is LevelDB's: rotate right by 15, add 0xA282EAD8.
- ``EventFile``: one new file in a run directory, written in whole records only. It never appends
  to an existing file (a crash may have left that one ending in half a record, which would swallow
  whatever came after) and, if a write fails, cuts the file back to its last whole record.
- ``EventWriter``: a thread that owns an ``EventFile``, fed through a bounded queue, writing at
  most every ``flush_secs`` (or when asked), each time with one ``write()``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

import crc32c

from distsum._errors import WriterClosedError, WriterError
from distsum._proto import event_pb2

__all__ = ["EventFile", "EventWriter", "frame", "is_event_file", "masked_crc32c", "read_records"]

FILE_VERSION = "brain.Event:2"
WRITER_NAME = "distsum"
_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# Names distsum gives its files; the timestamp is what orders them across processes.
_NAME = re.compile(r"events\.out\.tfevents\.(\d{10})\.")
# A process-wide counter keeps two files opened in the same second by one process distinct and
# in creation order; zero padding keeps lexicographic order equal to numeric order.
_file_counter = itertools.count()


def masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    """Return ``payload`` framed as one TFRecord."""
    header = _LENGTH.pack(len(payload))
    return b"".join((header, _CRC.pack(masked_crc32c(header)), payload, _CRC.pack(masked_crc32c(payload))))


def read_records(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The payloads of an event file's whole, intact records, in order.

    Stops quietly at the first record that is cut short or fails its checksums: the tail a crash
    left behind.
    """
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        if _CRC.unpack_from(data, offset + 8)[0] != masked_crc32c(header):
            return
        (length,) = _LENGTH.unpack(header)
        end = offset + 12 + length
        if end + 4 > len(data):
            return
        payload = data[offset + 12 : end]
        if _CRC.unpack_from(data, end)[0] != masked_crc32c(payload):
            return
        yield payload
        offset = end + 4


def is_event_file(name: str) -> bool:
    return "tfevents" in name


def _file_version_event() -> bytes:
    event = event_pb2.Event(wall_time=time.time(), step=0, file_version=FILE_VERSION)
    event.source_metadata.writer = WRITER_NAME
    return event.SerializeToString()


class EventFile:
    """A new event file in ``logdir``, opened at once, with the file_version record written.

    The file's timestamp is never earlier than that of any event file already in the directory, so
    TensorBoard's Python loader, which reads files in name order and only tails the newest, moves
    on to this one.
    """

    def __init__(self, logdir: str | os.PathLike[str], filename_suffix: str = "") -> None:
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        secs = max(int(time.time()), _newest_timestamp(self.logdir))
        name = (
            f"events.out.tfevents.{secs:010d}.{socket.gethostname()}.{os.getpid()}"
            f".{next(_file_counter):06d}{filename_suffix}"
        )
        self.path = os.path.join(self.logdir, name)
        # O_EXCL: never write into a file that already exists, whoever made it. O_APPEND: after
        # a failed write is cut back, the next one starts at the new end, not past a hole.
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        self._size = 0
        self.write([_file_version_event()])

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, payloads: Iterable[bytes]) -> None:
        """Append the payloads as whole records with one ``write()``.

        If the write fails (a full disk, say), the file is cut back to the end of its last whole
        record before the error propagates, so the file stays readable and a retry is safe.
        """
        if self._fd is None:
            raise WriterClosedError(f"event file {self.path} is closed")
        data = b"".join(frame(p) for p in payloads)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Fsync and close; closing twice does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _newest_timestamp(logdir: str) -> int:
    newest = 0
    for name in os.listdir(logdir):
        match = _NAME.match(name)
        if match:
            newest = max(newest, int(match.group(1)))
    return newest


class _Flush:
    """A marker in the queue: everything before it is to be on disk when ``done`` is set."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_CLOSE = object()


class EventWriter:
    """Writes serialized Events to a new event file in ``logdir`` from a background thread.

    ``add()`` puts a serialized Event on a queue of ``max_queue`` entries and blocks while the
    queue is full, as TensorFlow's FileWriter does. The thread gathers what arrives and writes it
    out at least every ``flush_secs`` seconds (monotonic clock), on ``flush()``, on ``close()`` and
    whenever a megabyte has gathered. An error on the thread is raised as ``WriterError`` from the
    next call in the caller's thread.
    """

    # Written out as soon as this many bytes are pending, whatever flush_secs says.
    _MAX_PENDING_BYTES = 1 << 20

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        max_queue: int = 10,
        flush_secs: float = 120,
        filename_suffix: str = "",
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue!r}")
        if not flush_secs > 0:
            raise ValueError(f"flush_secs must be positive, got {flush_secs!r}")
        self._file = EventFile(logdir, filename_suffix)
        self._flush_secs = float(flush_secs)
        self._queue: queue.Queue[object] = queue.Queue(max_queue)
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"distsum-writer:{self._file.path}", daemon=True
        )
        self._thread.start()

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def logdir(self) -> str:
        return self._file.logdir

    def add(self, event: bytes) -> None:
        """Queue one serialized Event."""
        self._check()
        self._queue.put(event)

    def flush(self) -> None:
        """Return once everything added before this call is written to the file."""
        self._check()
        marker = _Flush()
        self._queue.put(marker)
        while not marker.done.wait(0.1):
            if not self._thread.is_alive():
                break
        self._raise_error()

    def close(self) -> None:
        """Write everything out, fsync and close the file. Closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        self._file.close()
        self._raise_error()

    def _check(self) -> None:
        if self._closed:
            raise WriterClosedError(f"writer for {self.logdir} is closed")
        self._raise_error()

    def _raise_error(self) -> None:
        # The error stays: once a write failed, the writer no longer takes events.
        error = self._error
        if error is not None:
            raise WriterError(f"writing {self._file.path} failed: {error}") from error

    def _run(self) -> None:
        pending: list[bytes] = []
        pending_bytes = 0
        deadline = time.monotonic() + self._flush_secs
        waiting: list[_Flush] = []
        try:
            while True:
                timeout = max(0.0, deadline - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                stop = item is _CLOSE
                if isinstance(item, bytes):
                    pending.append(item)
                    pending_bytes += len(item)
                elif isinstance(item, _Flush):
                    waiting.append(item)
                # Take whatever else is already queued so it goes out in the same write.
                while not stop and pending_bytes < self._MAX_PENDING_BYTES:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _CLOSE:
                        stop = True
                    elif isinstance(item, _Flush):
                        waiting.append(item)
                    else:
                        pending.append(item)  # type: ignore[arg-type]
                        pending_bytes += len(item)  # type: ignore[arg-type]
                now = time.monotonic()
                if stop or waiting or now >= deadline or pending_bytes >= self._MAX_PENDING_BYTES:
                    if pending:
                        self._file.write(pending)
                        pending, pending_bytes = [], 0
                    deadline = now + self._flush_secs
                    for marker in waiting:
                        marker.done.set()
                    waiting.clear()
                if stop:
                    return
        except BaseException as e:  # handed to the caller's thread
            self._error = e
            for marker in waiting:
                marker.done.set()
            # Drain so callers blocked on a full queue or waiting on a flush are released; they
            # see the error on return.
            while True:
                item = self._queue.get()
                if isinstance(item, _Flush):
                    item.done.set()
                elif item is _CLOSE:
                    return
