"""Read event files back with TensorBoard's own readers, so tests assert on what TensorBoard shows.

Four readers, from the bytes up:

* ``read_events`` / ``read_records``: TensorBoard's CRC-checking record reader (the no-TensorFlow stub
  ``PyRecordReader_New``, or TensorFlow's reader if TensorFlow is installed), picked the same way
  TensorBoard's loader picks it. Unlike TensorBoard's ``EventFileLoader``, which swallows every
  ``DataLossError`` and silently stops at a bad record, these raise ``CorruptEventFileError``.
* ``accumulate``: the Python loader behind ``--load_fast=false`` (``plugin_event_accumulator``), keeping
  every item, plus ``acc_*`` helpers that turn its tensors into plain Python data.
* ``TensorBoardServer``: the real ``tensorboard`` program in a subprocess, in either loader mode
  (``load_fast=True`` is the Rust data server, ``False`` the Python multiplexer), queried over HTTP.
* ``tbparse_read``: tbparse's DataFrames.

All readers but the HTTP server check every record's CRCs first (``check_records=True``), because the
accumulator and tbparse both stop quietly at a corrupt record and a test would then see a short series.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from tensorboard.backend.event_processing import event_file_loader, io_wrapper
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.compat import tf as tb_tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tb_logging, tensor_util

__all__ = [
    "DEFAULT_SAMPLES_PER_PLUGIN",
    "CorruptEventFileError",
    "PurgeDetectedError",
    "TbparseFrames",
    "TensorBoardHTTPError",
    "TensorBoardServer",
    "TensorBoardServerError",
    "acc_histograms",
    "acc_hparams",
    "acc_images",
    "acc_scalars",
    "acc_tags",
    "acc_tensors",
    "acc_text",
    "accumulate",
    "event_files",
    "live_child_processes",
    "live_process_group_members",
    "live_server_process_groups",
    "poll_until",
    "read_events",
    "read_records",
    "scalars_from_events",
    "tbparse_read",
]

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Record level: TensorBoard's CRC-checking reader, made strict.
# --------------------------------------------------------------------------------------------------


class CorruptEventFileError(Exception):
    """An event file holds a record that TensorBoard's reader rejects (bad CRC, truncation, bad proto).

    ``path`` is the file, ``index`` the 0-based number of the bad record, ``offset`` its byte offset
    (the sum of the sizes of the good records before it) and ``reason`` the reader's message.
    """

    def __init__(self, path: str, index: int, offset: int, reason: str) -> None:
        super().__init__(f"{path}: record #{index} at byte offset {offset}: {reason}")
        self.path = path
        self.index = index
        self.offset = offset
        self.reason = reason


def event_files(path: str | os.PathLike[str]) -> list[str]:
    """The event files of ``path``: the file itself, or a run directory's files in reading order.

    A run directory's event files are those TensorBoard's Python loader counts (``"tfevents"`` in the
    name, not ``*.profile-empty``), directly inside it (not in subdirectories, which are other runs),
    sorted lexicographically by path, which is the order ``DirectoryWatcher`` reads them in.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        return sorted(
            os.path.join(p, name)
            for name in os.listdir(p)
            if io_wrapper.IsSummaryEventsFile(os.path.join(p, name)) and os.path.isfile(os.path.join(p, name))
        )
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no event file or run directory at {p}")
    return [p]


def _records_of_file(path: str, *, allow_truncated_tail: bool) -> Iterator[bytes]:
    # _make_tf_record_iterator is the function TensorBoard's RawEventFileLoader uses to pick its record
    # reader: the stub PyRecordReader_New without TensorFlow (checks the masked CRC-32C of the length
    # and of the data), TensorFlow's reader with it. The loader then swallows DataLossError; we don't.
    iterator = event_file_loader._make_tf_record_iterator(path)
    index = offset = 0
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except tb_tf.errors.DataLossError as e:
            reason = str(getattr(e, "message", "") or e)
            if allow_truncated_tail and "truncated record" in reason:
                return
            raise CorruptEventFileError(path, index, offset, reason) from e
        yield record
        index += 1
        offset += 8 + 4 + len(record) + 4


def read_records(path: str | os.PathLike[str], *, allow_truncated_tail: bool = False) -> list[bytes]:
    """Every record payload of one event file, or of a run directory's event files in order.

    Raises ``CorruptEventFileError`` on a bad length CRC, a bad data CRC or a truncated record.
    ``allow_truncated_tail=True`` reads a file that a writer may still be appending to: a record cut
    short by the end of the file ends the file quietly instead (corruption still raises).
    """
    out: list[bytes] = []
    for f in event_files(path):
        out.extend(_records_of_file(f, allow_truncated_tail=allow_truncated_tail))
    return out


def read_events(path: str | os.PathLike[str], *, allow_truncated_tail: bool = False) -> list[event_pb2.Event]:
    """Every ``Event`` of one event file, or of a run directory's event files in lexicographic order.

    Read through TensorBoard's CRC-checking record reader; any bad record raises
    ``CorruptEventFileError``, as does a payload that does not parse as an ``Event``.
    """
    events: list[event_pb2.Event] = []
    for f in event_files(path):
        offset = 0
        for index, record in enumerate(_records_of_file(f, allow_truncated_tail=allow_truncated_tail)):
            try:
                events.append(event_pb2.Event.FromString(record))
            except Exception as e:  # protobuf's DecodeError, but be generous about which one
                raise CorruptEventFileError(f, index, offset, f"payload is not an Event: {e}") from e
            offset += 16 + len(record)
    return events


def scalars_from_events(events: Sequence[event_pb2.Event]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` in file order, from ``simple_value`` and rank-0 float tensors.

    This is the raw content of the file: no plugin or metadata rules are applied, duplicates and
    backward steps are kept. Ask ``accumulate`` or ``TensorBoardServer`` for what TensorBoard shows.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        if event.WhichOneof("what") != "summary":
            continue
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                out.setdefault(value.tag, []).append((event.step, float(value.simple_value)))
            elif kind == "tensor":
                arr = tensor_util.make_ndarray(value.tensor)
                if arr.shape == () and arr.dtype.kind == "f":
                    out.setdefault(value.tag, []).append((event.step, float(arr)))
    return out


def _check_records_under(path: str) -> None:
    """Run every event file under ``path`` (recursively) through the strict reader."""
    if os.path.isfile(path):
        read_records(path)
        return
    for dirpath, _dirnames, _filenames in os.walk(path):
        read_records(dirpath)


# --------------------------------------------------------------------------------------------------
# Python loader: plugin_event_accumulator.EventAccumulator
# --------------------------------------------------------------------------------------------------


class PurgeDetectedError(AssertionError):
    """TensorBoard's Python loader purged data or skipped an out-of-order file while loading a run."""


# Log lines by which the Python loader admits it dropped data: plugin_event_accumulator._Purge and
# directory_watcher's out-of-order-file errors.
_PURGE_LOG_PATTERNS = (
    re.compile(r"Purging \d+ expired tensor events"),
    re.compile(r"created after file .* even though it's lexicographically earlier"),
    re.compile(r"updated even though the current file is"),
)


class _CollectLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def accumulate(
    path: str | os.PathLike[str], *, check_records: bool = True, allow_purge: bool = False
) -> pea.EventAccumulator:
    """Load one run directory (or one event file) as ``--load_fast=false`` TensorBoard does.

    Returns the ``plugin_event_accumulator.EventAccumulator`` after ``Reload()``, keeping every item
    (size guidance 0). Only files directly in the directory are read: subdirectories are other runs.
    Everything is a tensor here: legacy ``simple_value``, ``histo`` and ``image`` values are
    converted by ``data_compat`` on the way in. Use the ``acc_*`` helpers to get plain data.

    ``check_records`` first runs every file through ``read_records``, because the accumulator stops
    silently at a corrupt record. Unless ``allow_purge``, ``PurgeDetectedError`` is raised when the
    loader logs that it purged "orphaned" steps (a SessionLog.START, or out-of-order steps in a file
    without ``file_version``) or ignored an out-of-order event file.
    """
    p = os.fspath(path)
    if check_records:
        read_records(p)
    acc = pea.EventAccumulator(
        p,
        size_guidance={key: 0 for key in pea.DEFAULT_SIZE_GUIDANCE},
        tensor_size_guidance={},
    )
    handler = _CollectLog()
    logger = tb_logging.get_logger()
    logger.addHandler(handler)
    try:
        acc.Reload()
    finally:
        logger.removeHandler(handler)
    dropped = [m for m in handler.messages if any(pat.search(m) for pat in _PURGE_LOG_PATTERNS)]
    if dropped and not allow_purge:
        raise PurgeDetectedError(f"TensorBoard's Python loader dropped data in {p}: " + "; ".join(dropped))
    return acc


def acc_tags(acc: pea.EventAccumulator, plugin_name: str | None = None) -> list[str]:
    """Sorted tags of the run; only those owned by ``plugin_name`` (e.g. ``"scalars"``) if given."""
    if plugin_name is None:
        return sorted(acc.Tags()[pea.TENSORS])
    try:
        return sorted(acc.PluginTagToContent(plugin_name))
    except KeyError:
        return []


def acc_tensors(acc: pea.EventAccumulator, tag: str) -> list[tuple[int, np.ndarray]]:
    """``[(step, ndarray)]`` of one tag, in the loader's order (arrival order, duplicates kept)."""
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def acc_scalars(acc: pea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one scalar tag (legacy ``simple_value`` arrives as a float32 tensor)."""
    out = []
    for step, arr in acc_tensors(acc, tag):
        if arr.size != 1:
            raise ValueError(f"tag {tag!r} at step {step} is not a scalar: shape {arr.shape}")
        out.append((step, float(arr.reshape(()))))
    return out


def acc_histograms(acc: pea.EventAccumulator, tag: str) -> list[tuple[int, np.ndarray]]:
    """``[(step, ndarray[k, 3] of (left, right, count))]``; legacy ``histo`` comes converted to float32."""
    return acc_tensors(acc, tag)


def acc_images(acc: pea.EventAccumulator, tag: str) -> list[tuple[int, list[bytes]]]:
    """``[(step, [encoded image, ...])]``: the ``[width, height, img...]`` tensor without its header."""
    return [(step, [bytes(b) for b in arr.reshape(-1)[2:]]) for step, arr in acc_tensors(acc, tag)]


def acc_text(acc: pea.EventAccumulator, tag: str) -> list[tuple[int, str | np.ndarray]]:
    """``[(step, text)]``; a single-element string tensor becomes ``str``, larger ones stay arrays."""
    out: list[tuple[int, str | np.ndarray]] = []
    for step, arr in acc_tensors(acc, tag):
        if arr.size == 1:
            item = arr.reshape(-1)[0]
            out.append((step, item.decode("utf-8") if isinstance(item, bytes) else str(item)))
        else:
            out.append((step, arr))
    return out


def acc_hparams(acc: pea.EventAccumulator) -> dict[str, Any]:
    """The run's hparams from ``_hparams_/session_start_info``: ``{name: number | str | bool}``."""
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    out: dict[str, Any] = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind) if kind is not None else None
    return out


# --------------------------------------------------------------------------------------------------
# tbparse
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TbparseFrames:
    """tbparse's DataFrames for one log directory (long format: ``step``, ``tag``, ``value`` + extras).

    * ``scalars``: legacy ``simple_value`` only; TF2 rank-0 tensor scalars are in ``tensors``.
    * ``tensors``: every tensor value not claimed by the hparams or text plugins, so TF2 ``[k,3]``
      histograms, TF2 scalars and TF2 images land here (``value`` is an ndarray).
    * ``histograms``: legacy ``histo`` only, with ``limits`` and ``counts`` columns.
    * ``text``: single-element text tensors, with torch's ``/text_summary`` tag suffix removed.
    * ``hparams``: ``tag`` (hparam name) and ``value``, from ``_hparams_/session_start_info``.

    Images and audio are absent: tbparse 0.0.9 decodes them with TensorFlow, which is not installed.
    """

    scalars: Any
    tensors: Any
    histograms: Any
    text: Any
    hparams: Any


def tbparse_read(
    logdir: str | os.PathLike[str],
    *,
    extra_columns: Sequence[str] = ("dir_name",),
    pivot: bool = False,
    check_records: bool = True,
) -> TbparseFrames:
    """Read ``logdir`` (recursively, one legacy ``EventAccumulator`` per file) with tbparse.

    ``dir_name`` (the run, relative to ``logdir``; ``""`` for the root) is added by default so that
    runs can be told apart. ``check_records`` first runs every event file through ``read_records``,
    because tbparse stops silently at a corrupt record.
    """
    import tbparse  # imported here: it pulls in pandas, which only the tests that use it should pay for

    p = os.fspath(logdir)
    if check_records:
        _check_records_under(p)
    reader = tbparse.SummaryReader(
        p,
        pivot=pivot,
        extra_columns=set(extra_columns),
        event_types={"scalars", "tensors", "histograms", "text", "hparams"},
    )
    return TbparseFrames(
        scalars=reader.scalars,
        tensors=reader.tensors,
        histograms=reader.histograms,
        text=reader.text,
        hparams=reader.hparams,
    )


# --------------------------------------------------------------------------------------------------
# The real TensorBoard server, in a subprocess
# --------------------------------------------------------------------------------------------------


def poll_until(
    fetch: Callable[[], T],
    until: Callable[[T], object] = bool,
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
    what: str | None = None,
) -> T:
    """Call ``fetch()`` every ``interval`` s until ``until(result)`` is true; return that result.

    Exceptions of the types in ``retry_on`` count as "not yet". After ``timeout`` s, raises
    ``TimeoutError`` naming ``what`` and the last result (or exception) seen.
    """
    deadline = time.monotonic() + timeout
    last: object = "<never called>"
    while True:
        try:
            value = fetch()
        except retry_on as e:
            last = e
        else:
            if until(value):
                return value
            last = value
        if time.monotonic() >= deadline:
            label = what or getattr(fetch, "__name__", repr(fetch))
            raise TimeoutError(f"{label}: condition not met after {timeout:g} s; last seen: {last!r}")
        time.sleep(interval)


class TensorBoardServerError(RuntimeError):
    """TensorBoard failed to start, picked the wrong loader, died, or would not stop."""


class TensorBoardHTTPError(Exception):
    """TensorBoard answered a request with an HTTP error status."""

    def __init__(self, url: str, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status} from {url}: {body[:300]!r}")
        self.url = url
        self.status = status
        self.body = body


# A sample limit per plugin that is larger than any test writes. Not 0: "0" makes the ingester keep
# everything but then the plugins downsample each response to 0 items.
DEFAULT_SAMPLES_PER_PLUGIN = {
    "scalars": 100000,
    "images": 100000,
    "text": 100000,
    "histograms": 100000,
    "tensors": 100000,
}

_URL_RE = re.compile(r"TensorBoard \S+ at (http://127\.0\.0\.1:(\d+)/)")
# The loader mode's data provider, as /data/environment reports it in debug.data_provider.
_PROVIDER = {True: "GrpcDataProvider(", False: "MultiplexerDataProvider("}
# No proxy for 127.0.0.1, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ALL_SESSION_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]

# Process groups of servers started and not yet confirmed gone; conftest checks this stays empty.
_live_groups: set[int] = set()
_live_groups_lock = threading.Lock()


def _proc_stat(pid: str) -> tuple[int, int, str] | None:
    """``(ppid, pgrp, state)`` of a process from ``/proc``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "<gone>"


def live_process_group_members(pgid: int) -> list[tuple[int, str]]:
    """``[(pid, cmdline)]`` of the processes, zombies excluded, in process group ``pgid``."""
    if not os.path.isdir("/proc"):  # not Linux: ask the kernel whether anything is left at all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [(pgid, "<unknown: no /proc>")]
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None and stat[1] == pgid and stat[2] != "Z":
                members.append((int(entry), _cmdline(int(entry))))
    return members


def live_child_processes(pid: int) -> list[tuple[int, str]]:
    """``[(pid, cmdline)]`` of the live (non-zombie) children of process ``pid``; Linux only."""
    children = []
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _proc_stat(entry)
                if stat is not None and stat[0] == pid and stat[2] != "Z":
                    children.append((int(entry), _cmdline(int(entry))))
    return children


def live_server_process_groups() -> dict[int, list[tuple[int, str]]]:
    """Process groups of ``TensorBoardServer`` instances not cleanly closed, with their live members."""
    with _live_groups_lock:
        groups = sorted(_live_groups)
    return {g: live_process_group_members(g) for g in groups}


class TensorBoardServer:
    """``tensorboard`` in a subprocess on 127.0.0.1, with a plain-data client for its HTTP API.

    ``load_fast=True`` runs the Rust data server (``GrpcDataProvider``), ``False`` the Python
    multiplexer (``MultiplexerDataProvider``); ``start()`` checks that the requested one is active.
    TensorBoard runs in its own process group, which ``close()`` terminates (SIGTERM, then SIGKILL)
    and waits for until no member is left, so the data server cannot outlive it.

    Data loads asynchronously (first load and then every ``reload_interval`` s): wrap reads in
    ``wait_for``. Tag listings omit runs with no tags of that kind.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        load_fast: bool = True,
        reload_interval: int = 1,
        samples_per_plugin: dict[str, int] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        request_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.logdir = os.fspath(logdir)
        self.load_fast = load_fast
        samples = DEFAULT_SAMPLES_PER_PLUGIN if samples_per_plugin is None else samples_per_plugin
        self.command = [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            self.logdir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            f"--load_fast={'true' if load_fast else 'false'}",
            "--reload_interval",
            str(reload_interval),
            "--samples_per_plugin=" + ",".join(f"{k}={v}" for k, v in samples.items()),
            *extra_args,
        ]
        self._startup_timeout = startup_timeout
        self._request_timeout = request_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._output: list[str] = []
        self._output_lock = threading.Lock()
        self._url_found = threading.Event()
        self._url: str | None = None
        self._port: int | None = None
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> TensorBoardServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        if self._url is None:
            raise TensorBoardServerError("TensorBoard is not running; call start()")
        return self._url

    @property
    def port(self) -> int:
        if self._port is None:
            raise TensorBoardServerError("TensorBoard is not running; call start()")
        return self._port

    @property
    def pid(self) -> int:
        """PID of the ``tensorboard`` process, which is also its process group ID."""
        if self._proc is None:
            raise TensorBoardServerError("TensorBoard is not running; call start()")
        return self._proc.pid

    def output(self) -> str:
        """Everything TensorBoard (and its data server) has written to stdout and stderr so far."""
        with self._output_lock:
            return "".join(self._output)

    def processes(self) -> list[tuple[int, str]]:
        """``[(pid, cmdline)]`` of the live processes in TensorBoard's process group."""
        return live_process_group_members(self.pid)

    def start(self) -> None:
        """Start TensorBoard and return once it serves HTTP with the requested loader.

        Raises ``TensorBoardServerError``, with TensorBoard's output, if it exits, does not print
        its URL within ``startup_timeout`` s, or reports the wrong data provider.
        """
        if self._proc is not None:
            raise TensorBoardServerError("start() called twice")
        deadline = time.monotonic() + self._startup_timeout
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: close() can stop the data server too
        )
        with _live_groups_lock:
            _live_groups.add(self._proc.pid)
        self._reader = threading.Thread(
            target=self._read_output, name=f"tensorboard-{self._proc.pid}-output", daemon=True
        )
        self._reader.start()
        try:
            self._wait_for_url(deadline)
            env = poll_until(
                self.environment,
                retry_on=(TensorBoardHTTPError, urllib.error.URLError, ConnectionError),
                timeout=max(1.0, deadline - time.monotonic()),
                what=f"GET {self._url}data/environment",
            )
            provider = str(env.get("debug", {}).get("data_provider", ""))
            if not provider.startswith(_PROVIDER[self.load_fast]):
                raise TensorBoardServerError(
                    f"load_fast={self.load_fast} wants {_PROVIDER[self.load_fast]}...), but "
                    f"/data/environment reports data_provider={provider!r}\n{self._describe()}"
                )
        except BaseException:
            self.close()
            raise

    def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        # The pipe reaches EOF only once TensorBoard *and* its data server (which inherits it) exit.
        for raw in iter(self._proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._output_lock:
                self._output.append(line)
            if not self._url_found.is_set():
                m = _URL_RE.search(line)
                if m:
                    self._url, self._port = m.group(1), int(m.group(2))
                    self._url_found.set()

    def _wait_for_url(self, deadline: float) -> None:
        assert self._proc is not None
        while not self._url_found.wait(0.05):
            if self._proc.poll() is not None:
                # Give the reader a moment to collect the last lines before reporting them.
                if self._reader is not None:
                    self._reader.join(timeout=2.0)
                raise TensorBoardServerError(
                    f"TensorBoard exited with status {self._proc.returncode} before serving\n"
                    + self._describe()
                )
            if time.monotonic() >= deadline:
                raise TensorBoardServerError(
                    f"TensorBoard printed no URL within {self._startup_timeout:g} s\n" + self._describe()
                )

    def _describe(self) -> str:
        return f"command: {' '.join(self.command)}\noutput:\n{self.output() or '<none>'}"

    def close(self) -> None:
        """Stop TensorBoard and its data server; wait until none of its process group is left.

        Idempotent. Raises ``TensorBoardServerError`` if processes survive SIGKILL.
        """
        if self._closed or self._proc is None:
            self._closed = True
            return
        self._closed = True
        proc, pgid = self._proc, self._proc.pid
        self._signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=self._stop_timeout)
        # TensorBoard is reaped; its data server (same group) may still be exiting.
        try:
            poll_until(
                lambda: live_process_group_members(pgid),
                lambda members: not members,
                timeout=self._stop_timeout,
                interval=0.05,
                what=f"process group {pgid} to exit after SIGTERM",
            )
        except TimeoutError:
            self._signal_group(pgid, signal.SIGKILL)
            try:
                poll_until(
                    lambda: live_process_group_members(pgid),
                    lambda members: not members,
                    timeout=self._stop_timeout,
                    interval=0.05,
                    what=f"process group {pgid} to exit after SIGKILL",
                )
            except TimeoutError as e:
                raise TensorBoardServerError(str(e)) from None
        if self._reader is not None:
            self._reader.join(timeout=self._stop_timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        with _live_groups_lock:
            _live_groups.discard(pgid)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

    # ---- HTTP --------------------------------------------------------------------------------

    def request(self, route: str, params: dict[str, Any] | None = None, body: bytes | None = None) -> bytes:
        """GET ``route`` (POST if ``body`` is given) with URL-encoded ``params``; the response bytes."""
        url = self.url + route.lstrip("/")
        if params:
            # quote, not quote_plus, and safe="": run and tag names may contain "/", " " and "+".
            url += "?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(req, timeout=self._request_timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as e:
            try:
                err_body = e.read()
            finally:
                e.close()
            raise TensorBoardHTTPError(url, e.code, err_body) from None
        except (urllib.error.URLError, ConnectionError) as e:
            if self._proc is not None and self._proc.poll() is not None:
                raise TensorBoardServerError(
                    f"TensorBoard has exited (status {self._proc.returncode})\n{self._describe()}"
                ) from e
            raise

    def get_json(self, route: str, **params: Any) -> Any:
        """GET ``route`` with query ``params`` and decode the JSON response."""
        return json.loads(self.request(route, params))

    def post_json(self, route: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``route`` and decode the JSON response."""
        return json.loads(self.request(route, body=json.dumps(payload).encode("utf-8")))

    def wait_for(
        self,
        fetch: Callable[[], T],
        until: Callable[[T], object] = bool,
        *,
        timeout: float = 30.0,
        interval: float = 0.1,
        what: str | None = None,
    ) -> T:
        """Poll ``fetch()`` until ``until(result)`` holds (default: truthy), at most ``timeout`` s.

        HTTP error statuses (e.g. 404 for a tag not loaded yet) count as "not yet". Raises
        ``TimeoutError`` with the last result seen and TensorBoard's output.
        """
        try:
            return poll_until(
                fetch, until, timeout=timeout, interval=interval, retry_on=(TensorBoardHTTPError,), what=what
            )
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self._describe()}") from None

    # ---- data API, plain Python data ---------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        """``/data/environment``; ``["debug"]["data_provider"]`` names the active loader."""
        env: dict[str, Any] = self.get_json("data/environment")
        return env

    def runs(self) -> list[str]:
        """Run names (directories relative to the logdir; the root is ``"."``) in discovery order."""
        runs: list[str] = self.get_json("data/runs")
        return runs

    def _tags(self, plugin: str) -> dict[str, list[str]]:
        index = self.get_json(f"data/plugin/{plugin}/tags")
        return {run: sorted(tags) for run, tags in index.items() if tags}

    def scalar_tags(self) -> dict[str, list[str]]:
        """``{run: sorted scalar tags}``."""
        return self._tags("scalars")

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` as the scalars dashboard gets them (values are float32 in both loaders)."""
        rows = self.get_json("data/plugin/scalars/scalars", run=run, tag=tag)
        return [(int(step), float(value)) for _wall, step, value in rows]

    def histogram_tags(self) -> dict[str, list[str]]:
        """``{run: sorted histogram tags}``."""
        return self._tags("histograms")

    def histograms(self, run: str, tag: str) -> list[tuple[int, list[list[float]]]]:
        """``[(step, [[left, right, count], ...])]``.

        The endpoint **downsamples to 51 events per request** (``HistogramsPlugin.SAMPLE_SIZE``,
        first and last kept), whatever ``--samples_per_plugin`` says. Legacy ``histo`` values are
        converted differently by the two loaders (Python: float32, empty end buckets trimmed; Rust:
        float64, untrimmed); compare non-empty buckets, not the whole list.
        """
        rows = self.get_json("data/plugin/histograms/histograms", run=run, tag=tag)
        return [(int(step), buckets) for _wall, step, buckets in rows]

    def image_tags(self) -> dict[str, dict[str, int]]:
        """``{run: {tag: samples}}``: ``samples`` is the most images at one step of that tag."""
        index = self.get_json("data/plugin/images/tags")
        return {
            run: {tag: int(info["samples"]) for tag, info in tags.items()}
            for run, tags in index.items()
            if tags
        }

    def images(self, run: str, tag: str, sample: int = 0) -> list[tuple[int, bytes]]:
        """``[(step, encoded image bytes)]`` for image ``sample`` of each step, fetched one by one."""
        entries = self.get_json("data/plugin/images/images", run=run, tag=tag, sample=sample)
        out = []
        for entry in entries:
            # "query" is an opaque, already-encoded query string (blob_key=...): pass it through as is.
            image = self.request("data/plugin/images/individualImage?" + entry["query"])
            out.append((int(entry["step"]), image))
        return out

    def text_tags(self) -> dict[str, list[str]]:
        """``{run: sorted text tags}`` (torch and tensorboardX tags end in ``/text_summary``)."""
        index = self.get_json("data/plugin/text/tags")
        return {run: sorted(tags) for run, tags in index.items() if tags}

    def text(self, run: str, tag: str) -> list[tuple[int, str]]:
        """``[(step, html)]``: the text rendered as Markdown to HTML (rank>0 tensors become tables)."""
        rows = self.get_json("data/plugin/text/text", run=run, tag=tag)
        return [(int(row["step"]), str(row["text"])) for row in rows]

    def hparams_experiment(self, experiment_name: str = "") -> dict[str, Any]:
        """POST ``/data/plugin/hparams/experiment``: ``hparamInfos``, ``metricInfos``, ...."""
        exp: dict[str, Any] = self.post_json(
            "data/plugin/hparams/experiment", {"experimentName": experiment_name}
        )
        return exp

    def hparams_session_groups(self, **request: Any) -> dict[str, Any]:
        """POST ``/data/plugin/hparams/session_groups``: ``sessionGroups`` with hparams and metrics.

        The request is a ``ListSessionGroupsRequest`` in JSON; by default every status and every
        group (``sliceSize`` 100000). Keyword arguments override its fields (camelCase).
        """
        payload: dict[str, Any] = {
            "experimentName": "",
            "allowedStatuses": _ALL_SESSION_STATUSES,
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100000,
        }
        payload.update(request)
        groups: dict[str, Any] = self.post_json("data/plugin/hparams/session_groups", payload)
        return groups
