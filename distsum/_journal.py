"""The progress journal: what the aggregator made of each batch it merged, kept beside the run.

A rank resends every batch not yet acknowledged as durable, and an aggregator that crashed may
have written some of such a batch's records already: into a step that was complete, or into the
rank's late run. Which of the two a record took depended on what the dead aggregator had written
*when the batch arrived*, which the event files alone do not tell. So before each round of event
writes the aggregator appends to the journal, for every stream that merged batches since the
last round, how far it merged and which records of those batches went late. Any record whose
consequence reached an event file is therefore described in the journal (writes happen in that
order, and a process that dies leaves what it wrote). A new aggregator reads it back and replays
each resent batch the way the old one took it; see ``RunMerger`` for how a replayed record is
recognised as written.

It also says which streams have sent their last batch. A rank whose last batch the dead
aggregator made durable never comes back with records, and the new one would otherwise wait for
it at every step until the step timeout.

Only batches beyond a stream's durable point can come again, and those up to it are answered as
duplicates (the rank may have missed the acknowledgement), so at every fsync the journal is
rewritten as one snapshot: each stream's durable point, and the late records of its batches
beyond it. A stream is forgotten once its run is done with: at the embedded aggregator's exit
once every rank has hung up, or when a standalone aggregator closes a run whose streams all
finished. Once all are, there is no journal file at all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from distsum._eventfile import frame, read_records
from distsum._proto import journal_pb2

__all__ = ["JOURNAL_NAME", "Journal", "Progress"]

log = logging.getLogger("distsum.aggregator")

JOURNAL_NAME = ".distsum-journal"


@dataclass
class Progress:
    """One stream: batches up to ``merged`` were merged; ``late`` lists their late records;
    ``finished``: its last batch was among them."""

    merged: int = 0
    durable: int = 0
    late: dict[int, journal_pb2.LateRecords] = field(default_factory=dict)
    finished: bool = False

    @property
    def done(self) -> bool:
        """Its last batch is durable: the stream sends nothing more but resends of batches whose
        acknowledgement it missed. (Finished and not durable, it resends everything beyond.)"""
        return self.finished and self.durable >= self.merged

    def prune(self) -> None:
        for seq in [seq for seq in self.late if seq <= self.durable]:
            del self.late[seq]


class Journal:
    """The journal of one run directory: loaded when the aggregator opens the run."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, JOURNAL_NAME)
        self._progress: dict[tuple[int, int], Progress] = {}
        self._changed: set[tuple[int, int]] = set()
        self._late: list[tuple[tuple[int, int], journal_pb2.LateRecords]] = []
        self._file: int | None = None
        # Whether anything changed since the last checkpoint.
        self.dirty = False
        self._load()
        # What an earlier aggregator left, by (rank, stream); never changed by this one.
        self.earlier = {
            key: Progress(p.merged, p.durable, dict(p.late), p.finished) for key, p in self._progress.items()
        }

    def _load(self) -> None:
        try:
            records = list(read_records(self.path))
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot read the journal %s: %s", self.path, e)
            return
        for payload in records:
            try:
                entry = journal_pb2.Entry.FromString(payload)
            except Exception:  # a damaged record: the CRC passed, so not ours
                continue
            if entry.snapshot:
                self._progress.clear()
            for s in entry.streams:
                p = self._progress.setdefault((s.rank, s.stream), Progress())
                p.merged = max(p.merged, s.merged)
                p.durable = max(p.durable, s.durable)
                p.finished = p.finished or s.finished
                for late in s.late:
                    p.late[late.seq] = late
                p.prune()

    def merged(
        self,
        rank: int,
        stream: int,
        seq: int,
        late: journal_pb2.LateRecords | None,
        *,
        finished: bool = False,
    ) -> None:
        """Batch ``seq`` of the stream was handed to the merger; ``late``: its late records;
        ``finished``: it was the stream's last."""
        key = (rank, stream)
        p = self._progress.get(key)
        if p is None:
            p = self._progress[key] = Progress()
        p.merged = max(p.merged, seq)
        p.finished = p.finished or finished
        if late is not None:
            late.seq = seq
            p.late[seq] = late
            self._late.append((key, late))
        self._changed.add(key)
        self.dirty = True

    def forget(self, rank: int, stream: int) -> None:
        """The stream will send nothing more (it finished and has its last ack, or it is dead)."""
        if self._progress.pop((rank, stream), None) is not None:
            self._changed.discard((rank, stream))
            self.dirty = True

    def durable(self, rank: int, stream: int, seq: int) -> None:
        """Batches up to ``seq`` of the stream are fsynced: they will not be resent."""
        p = self._progress.get((rank, stream))
        if p is not None and seq > p.durable:
            p.durable = seq
            p.prune()
            self.dirty = True

    @property
    def unwritten(self) -> bool:
        """Whether changes wait to be appended (the last ``append`` failed, say)."""
        return bool(self._changed)

    def append(self) -> None:
        """Write what changed since the last call; before the events it leads to. Raises OSError."""
        if not self._changed:
            return
        entry = journal_pb2.Entry()
        late_by_key: dict[tuple[int, int], list[journal_pb2.LateRecords]] = {}
        for key, late in self._late:
            late_by_key.setdefault(key, []).append(late)
        for key in self._changed:
            _add_stream(entry, key, self._progress[key], late_by_key.get(key, ()))
        data = frame(entry.SerializeToString())
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        end = os.lseek(self._file, 0, os.SEEK_END)
        try:
            if os.write(self._file, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            # A torn record would hide every later one from the reader: cut it off.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file, end)
            raise
        self._changed.clear()
        self._late.clear()

    def checkpoint(self) -> None:
        """Replace the file with one snapshot, fsynced. Raises OSError.

        Called after the event files were fsynced and ``durable`` recorded, so the late records
        it forgets are of batches on disk for good.
        """
        if not self._progress:
            # Nothing can come again: no journal at all, rather than an empty one beside the run.
            self.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._changed.clear()
            self._late.clear()
            self.dirty = False
            return
        entry = journal_pb2.Entry(snapshot=True)
        for key, p in self._progress.items():
            _add_stream(entry, key, p, p.late.values())
        data = frame(entry.SerializeToString())
        temporary = self.path + ".new"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        self.close()
        self._changed.clear()
        self._late.clear()
        self.dirty = False

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = None


def _add_stream(
    entry: journal_pb2.Entry, key: tuple[int, int], p: Progress, late: Iterable[journal_pb2.LateRecords]
) -> None:
    """Record stream ``key``'s progress in ``entry``, with the late records ``late``."""
    entry.streams.add(
        rank=key[0], stream=key[1], merged=p.merged, durable=p.durable, late=late, finished=p.finished
    )
