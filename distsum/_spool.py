"""The batches a rank keeps until the aggregator says they are durable: in memory, then on disk.

While the aggregator is unreachable (not started yet, restarting, network cut) a rank keeps
training and its batches pile up here: the newest in memory up to ``max_memory_bytes``, older ones
in a spool file on local disk up to ``max_spool_bytes``. Only beyond both bounds are the oldest
batches dropped; their records are counted, the rank warns once, and the count travels to the
aggregator in every later batch, which reports it in the run's ``distsum/dropped_records``.

The spool is a few segment files in the event files' record framing (length, payload, checksums),
so a batch read back is checked. Dropping the oldest deletes the oldest segment, and a segment
goes as soon as all of it is acknowledged; all of them go when the rank finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from distsum._eventfile import frame, masked_crc32c
from distsum._process import alive

__all__ = ["Retained", "remove_orphans"]

log = logging.getLogger("distsum")

_PREFIX = "distsum-spool-"


def remove_orphans(spool_dir: str | None) -> None:
    """Remove spool files of processes that are gone (a rank killed before it could finish)."""
    directory = spool_dir or tempfile.gettempdir()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


@dataclass
class _Segment:
    path: str
    size: int = 0
    # seq -> (offset of its record, payload length, record count)
    batches: OrderedDict[int, tuple[int, int, int]] = field(default_factory=OrderedDict)


class Retained:
    """Unacknowledged batches by sequence number, oldest first."""

    def __init__(self, *, max_memory_bytes: int, max_spool_bytes: int, spool_dir: str | None) -> None:
        self._max_memory = max_memory_bytes
        self._max_spool = max_spool_bytes
        self._segment_bytes = max(1, max_spool_bytes // 8)
        self._spool_dir = spool_dir or tempfile.gettempdir()
        self._memory: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._memory_bytes = 0
        self._segments: deque[_Segment] = deque()
        self._spool_bytes = 0
        self.dropped_records = 0
        self._warned = False

    def __bool__(self) -> bool:
        return bool(self._memory or self._segments)

    @property
    def records(self) -> int:
        """How many records the batches held carry."""
        return sum(count for _, count in self._memory.values()) + sum(
            count for segment in self._segments for _, _, count in segment.batches.values()
        )

    def first(self) -> int | None:
        """The lowest sequence number still held."""
        if self._segments:
            return next(iter(self._segments[0].batches))
        return next(iter(self._memory), None)

    def add(self, seq: int, data: bytes, records: int) -> None:
        self._memory[seq] = (data, records)
        self._memory_bytes += len(data)
        while self._memory_bytes > self._max_memory and len(self._memory) > 1:
            old_seq, (old, count) = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)
            self._spool(old_seq, old, count)

    def _spool(self, seq: int, data: bytes, records: int) -> None:
        record = frame(data)
        if len(record) > self._max_spool:
            self._count_dropped(records)
            return
        while self._segments and self._spool_bytes + len(record) > self._max_spool:
            self._drop_segment()
        segment = self._segments[-1] if self._segments else None
        try:
            if segment is None or (segment.batches and segment.size + len(record) > self._segment_bytes):
                fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self._spool_dir)
                os.close(fd)
                segment = _Segment(path)
                self._segments.append(segment)
            with open(segment.path, "ab") as f:
                f.write(record)
        except OSError as e:
            log.warning("distsum: cannot spool to %s (%s); dropping the batch", self._spool_dir, e)
            self._count_dropped(records)
            return
        segment.batches[seq] = (segment.size, len(data), records)
        segment.size += len(record)
        self._spool_bytes += len(record)

    def _drop_segment(self) -> None:
        segment = self._segments.popleft()
        self._count_dropped(sum(count for _, _, count in segment.batches.values()))
        self._remove(segment)

    def _remove(self, segment: _Segment) -> None:
        self._spool_bytes -= segment.size
        with contextlib.suppress(OSError):
            os.unlink(segment.path)

    def _count_dropped(self, records: int) -> None:
        self.dropped_records += records
        if not self._warned:
            self._warned = True
            log.warning(
                "distsum: the aggregator has not acknowledged %d MiB of records; dropping the oldest "
                "(counted in the run's distsum/dropped_records)",
                (self._max_memory + self._max_spool) >> 20,
            )

    def release_through(self, seq: int) -> None:
        """Forget every batch up to ``seq``: the aggregator has them on disk."""
        while self._segments:
            batches = self._segments[0].batches
            while batches and next(iter(batches)) <= seq:
                batches.popitem(last=False)
            if batches:
                break
            self._remove(self._segments.popleft())
        while self._memory and next(iter(self._memory)) <= seq:
            data, _ = self._memory.popitem(last=False)[1]
            self._memory_bytes -= len(data)

    def items(self) -> Iterator[tuple[int, bytes]]:
        """Every batch held, oldest first; spooled ones are read back one at a time and checked."""
        for segment in list(self._segments):
            with open(segment.path, "rb") as f:
                for seq, (offset, length, _) in list(segment.batches.items()):
                    f.seek(offset + 12)
                    payload = f.read(length)
                    (crc,) = struct.unpack("<I", f.read(4))
                    if len(payload) != length or crc != masked_crc32c(payload):
                        # Dropped and counted, so resend_from moves past it instead of holding
                        # every later batch back as a gap.
                        log.warning("distsum: spooled batch %d is damaged on disk; dropping it", seq)
                        self._count_dropped(segment.batches.pop(seq)[2])
                        continue
                    yield seq, payload
        for seq, (data, _) in list(self._memory.items()):
            yield seq, data

    def close(self) -> None:
        while self._segments:
            self._remove(self._segments.popleft())
