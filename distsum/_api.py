"""``distsum.init()`` and the module-level logging calls every rank makes.

Rank and world size come from the arguments, else from the launcher's environment (torchrun,
Open MPI, MPICH/Intel MPI, Slurm), else rank 0 of 1. Without an aggregator address, rank 0 starts
the **embedded** aggregator for the job, listening on an ``ipc://`` path derived from the run
directory and the job id, so the other ranks on the machine find it with no configuration.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from typing import Any, Protocol

from distsum import _validate
from distsum._client import (
    HISTOGRAM,
    IMAGES,
    SCALAR,
    TEXT,
    Client,
    ClientOptions,
    pack_row,
    series_of,
    unpack_row,
)
from distsum._embedded import EmbeddedAggregator
from distsum._errors import DistsumError
from distsum._image import prepare_images
from distsum._proto import wire_pb2
from distsum._security import ClientKeys
from distsum._wire import check_run_name

__all__ = [
    "Writer",
    "client",
    "finish",
    "flush",
    "histogram",
    "image",
    "init",
    "initialized",
    "run_dir",
    "scalar",
    "text",
    "writer",
]

# How long a flush or finish waits for the aggregator by default.
FLUSH_TIMEOUT = float(os.environ.get("DISTSUM_FINISH_TIMEOUT", "30"))

# How long init() on rank 0 waits for the embedded aggregator it starts to answer.
AGGREGATOR_START_TIMEOUT = 10.0

# Pixels of one image call: its PNGs must fit in one wire message (MAX_MESSAGE_BYTES).
MAX_IMAGE_BYTES = 32 << 20

log = logging.getLogger("distsum")

_REDUCE = {
    "mean": wire_pb2.MEAN,
    "sum": wire_pb2.SUM,
    "min": wire_pb2.MIN,
    "max": wire_pb2.MAX,
    "none": wire_pb2.NONE,
}

# (rank variable, world size variable, local rank variable) of each launcher, in priority order.
_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH, Intel MPI
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # Slurm
)
_JOB_IDS = ("TORCHELASTIC_RUN_ID", "OMPI_MCA_orte_hnp_uri", "PMIX_NAMESPACE", "SLURM_JOB_ID", "PMI_ID")


class _State:
    def __init__(self, client: Client, run_dir: str | None, aggregator: EmbeddedAggregator | None):
        self.client = client
        self.run_dir = run_dir
        self.aggregator = aggregator


_state: _State | None = None
_lock = threading.Lock()
_atexit_registered = False


class _NoQueue:
    """The scalar calls' queue without a client usable in this process (not initialised,
    finished, a forked child): a row goes to ``Client.put``, which says why it refuses."""

    def __len__(self) -> int:
        return 0

    def __iadd__(self, row: bytes) -> _NoQueue:
        series, step, value = unpack_row(row)
        client().put(series, step, value, None)
        return self


_NO_QUEUE: Any = _NoQueue()

# The scalar calls append rows to the client's queue themselves (Client.scalar_rows), checking
# its length against _row_limit whenever a call brings a step they have not checked yet.
_rows: bytearray = _NO_QUEUE
_row_limit = 0


def _forget_rows_in_child() -> None:
    global _rows, _row_limit
    _rows, _row_limit = _NO_QUEUE, 0


os.register_at_fork(after_in_child=_forget_rows_in_child)


def _launcher_env() -> tuple[int | None, int | None]:
    for rank_var, size_var, _ in _LAUNCHERS:
        if rank_var in os.environ:
            size = os.environ.get(size_var)
            return int(os.environ[rank_var]), int(size) if size else None
    return None, None


def _job_id() -> str | None:
    for name in _JOB_IDS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _run_name_of(job: str | None) -> str:
    """A run name (one path component) from a launcher's job id, the same on every rank."""
    if not job:
        return ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", job).strip("-.")
    if len(name) > 64 or name != job:
        # Ids like Open MPI's URI lose characters above; a digest keeps two jobs apart.
        name = f"{name[:48]}-{hashlib.sha1(job.encode()).hexdigest()[:12]}".strip("-")
    return name


def _embedded_address(run_dir: str, job: str | None) -> str:
    """Where the embedded aggregator listens; every rank derives it without talking to the others.

    On one machine, an ipc:// path from the run directory and the job id. A torchrun job on
    several machines (WORLD_SIZE > LOCAL_WORLD_SIZE) uses TCP on MASTER_ADDR, the machine of
    rank 0, at port DISTSUM_PORT, else MASTER_PORT + 1.
    """
    master, world, local = (os.environ.get(v) for v in ("MASTER_ADDR", "WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if master and world and local and int(world) > int(local):
        port = os.environ.get("DISTSUM_PORT") or str(int(os.environ.get("MASTER_PORT", "29500")) + 1)
        return f"tcp://{master}:{int(port)}"
    digest = hashlib.sha1(f"{os.path.abspath(run_dir)}\0{job or ''}".encode()).hexdigest()[:20]
    return f"ipc://{tempfile.gettempdir()}/distsum-{digest}.sock"


def _bind_address(addr: str) -> str:
    # ZeroMQ binds to an interface or an IP address, not a host name.
    if addr.startswith("tcp://"):
        host, _, port = addr[len("tcp://") :].rpartition(":")
        return f"tcp://{socket.gethostbyname(host.strip('[]'))}:{port}"
    return addr


def init(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    logdir: str | os.PathLike[str] | None = None,
    addr: str | None = None,
    run: str | None = None,
    **options: Any,
) -> None:
    """Connect this rank to the job's aggregator (starting the embedded one on rank 0 if needed:
    then it returns once that one answers, within ``AGGREGATOR_START_TIMEOUT``).

    ``logdir`` is the run directory in embedded mode (default ``runs/<job id>``); with a running
    aggregator (``addr`` or ``DISTSUM_ADDR``), ``run`` (or ``DISTSUM_RUN``, else the launcher's
    job id) names the run below the aggregator's logdir. ``options`` are ``ClientOptions`` fields
    plus ``step_timeout`` and ``rank_timeout`` (how long a silent rank is waited for) for the
    embedded aggregator, and ``curve_secret`` (this rank's secret key
    file) with ``curve_server_key`` (the aggregator's public key file) for an aggregator that
    requires CURVE authentication (else ``DISTSUM_CURVE_RANK_SECRET``, ``DISTSUM_CURVE_SERVER_KEY``).
    """
    global _state, _atexit_registered, _rows, _row_limit
    env_rank, env_size = _launcher_env()
    if world_size is None:
        # Without a rank either, a process that no launcher started is a job of its own; given
        # only a rank, the world size is the launcher's, the aggregator's --world-size, or what
        # the aggregator learns from the ranks that connect.
        world_size = env_size if env_rank is not None else (1 if rank is None else None)
    rank = env_rank if rank is None else rank
    rank = 0 if rank is None else rank
    if not isinstance(rank, int) or rank < 0 or (world_size is not None and not 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} is not in a world of size {world_size!r}")
    step_timeout = float(options.pop("step_timeout", 30.0))
    rank_timeout = float(options.pop("rank_timeout", 30.0))
    secret = options.pop("curve_secret", None) or os.environ.get("DISTSUM_CURVE_RANK_SECRET")
    server_key = options.pop("curve_server_key", None) or os.environ.get("DISTSUM_CURVE_SERVER_KEY")
    if bool(secret) != bool(server_key):
        raise ValueError("curve_secret and curve_server_key go together (a rank's key and the aggregator's)")
    keys = ClientKeys(os.fspath(secret), os.fspath(server_key)) if secret and server_key else None
    client_options = ClientOptions(**options)
    job = _job_id()
    addr = addr or os.environ.get("DISTSUM_ADDR")
    with _lock:
        if _state is not None and not _state.client.forked_away:
            raise DistsumError("distsum.init() was already called in this process; call finish() first")
        aggregator = None
        if addr is None:
            run_dir = os.fspath(logdir) if logdir is not None else os.environ.get("DISTSUM_LOGDIR")
            if run_dir is None:
                if job is None and (world_size or 1) > 1:
                    raise ValueError("pass logdir= to distsum.init(): no launcher job id to name the run")
                run_dir = os.path.join("runs", job or time.strftime("%Y%m%d-%H%M%S"))
            run_dir = os.path.abspath(run_dir)
            addr = _embedded_address(run_dir, job)
            run_name = ""
            if rank == 0:
                aggregator = EmbeddedAggregator(
                    run_dir, _bind_address(addr), world_size, step_timeout, rank_timeout
                )
        else:
            run_dir = None
            run_name = check_run_name(run or os.environ.get("DISTSUM_RUN") or _run_name_of(job))
            if not run_name:
                raise ValueError("pass run= to distsum.init() (or set DISTSUM_RUN): no launcher job id")
            if "/" in run_name:
                # One directory per job under the aggregator's root: none inside another's.
                raise ValueError(f"run name {run_name!r} must be one path component, without '/'")
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        client = Client(
            addr,
            run=run_name,
            rank=rank,
            world_size=world_size,
            restart=restart,
            options=client_options,
            keys=keys,
        )
        _state = _State(client, run_dir, aggregator)
        _rows, _row_limit = client.scalar_rows()
        if not _atexit_registered:
            atexit.register(_finish_at_exit)
            _atexit_registered = True
    if aggregator is not None and not client.flush(AGGREGATOR_START_TIMEOUT):
        # Nothing is lost meanwhile (records wait in the rank), but a training loop started
        # before the aggregator is up shares the cores with its start-up: an interpreter, its
        # imports and the read-back of a resumed run, a fifth of a second of CPU and more.
        log.warning(
            "distsum: the embedded aggregator has not answered within %.0f s; records wait in "
            "this rank until it does (its log: %s)",
            AGGREGATOR_START_TIMEOUT,
            os.path.join(aggregator.run_dir, "distsum-aggregator.log"),
        )


def client() -> Client:
    """This process's client; DistsumError if distsum.init() was not called in this process."""
    state = _state
    if state is None:
        raise DistsumError("call distsum.init() before logging")
    return state.client  # Client.add refuses in a forked child


def initialized() -> bool:
    """Whether distsum.init() was called in this process (and not finished)."""
    state = _state
    return state is not None and not state.client.forked_away


_scalar_keys: dict[tuple[str, str, Any], tuple[Any, ...]] = {}


def _scalar_key(subrun: str, tag: str, reduce: Any) -> tuple[Any, ...]:
    """The series key of a scalar tag (``Client.add``), checked once and then cached."""
    cache_key = (subrun, tag, reduce)
    try:
        key = _scalar_keys.get(cache_key)
    except TypeError:  # an unhashable tag or reduce: the checks below say what is wrong
        key = None
    if key is None:
        _validate.check_tag(tag)
        ops = (reduce,) if isinstance(reduce, str) else reduce
        if not isinstance(ops, tuple) or not ops or not all(op in _REDUCE for op in ops):
            raise ValueError(
                f"reduce for tag {tag!r} must be one of {sorted(_REDUCE)} or a tuple of them, got {reduce!r}"
            )
        if len(set(ops)) != len(ops):
            raise ValueError(f"reduce for tag {tag!r} repeats an operation: {reduce!r}")
        key = _scalar_keys[cache_key] = (SCALAR, subrun, tag, tuple(_REDUCE[op] for op in ops), 0)
    return key


class ScalarCall(Protocol):
    """The signature of ``distsum.scalar`` and ``Writer.scalar``."""

    def __call__(self, tag: str, value: Any, step: int, reduce: str | tuple[str, ...] = "mean") -> None: ...


_MEAN = "mean"


def _scalar_call(subrun: str) -> ScalarCall:
    """The scalar call of one sub-run: the hot path of a training loop, so one flat function.

    The common case is a dict lookup, a type check, an identity check of the step and one append
    of a row; anything else (a new tag, another reduction, a value that is not a float, a step not
    checked yet) takes the full path, with the same checks and errors. ``reduce`` is not
    keyword-only: that would keep CPython off its fastest call.
    """
    by_tag: dict[str, int] = {}  # series numbers for reduce="mean" (the default object itself)
    # The last step object that passed the checks, with room in the queue then. A loop passes the
    # same int object to every call of a step, so the checks run once a step; ints are immutable,
    # so a checked one stays valid whichever thread checked it. The queue may thus outgrow
    # max_buffered by the records of one step: it only grows while the sender is not taking them.
    checked: Any = None

    def scalar(tag: str, value: Any, step: int, reduce: str | tuple[str, ...] = _MEAN) -> None:
        """Log a scalar; across ranks it is reduced with ``reduce`` (mean, sum, min, max, none)."""
        nonlocal checked
        try:
            series = by_tag[tag] if reduce is _MEAN else None
        except (KeyError, TypeError):  # a new tag, or not even hashable
            series = None
        if series is None:
            series = series_of(*_scalar_key(subrun, tag, reduce))
            if reduce is _MEAN:
                by_tag[tag] = series
        if type(value) is not float:
            value = _validate.as_scalar(value, tag)
        if step is not checked:
            # A negative step and one of 2**63 or more both shift to nonzero.
            if type(step) is not int or step >> 63:
                step = _validate.check_step(step, tag)
            if len(_rows) >= _row_limit:
                client().put(series, step, value, None)  # refuses, or drops and counts
                return
            checked = step
        rows = _rows
        rows += pack_row(series, step, value)

    return scalar


class Writer:
    """The logging calls, writing to one sub-run of the job's run (``distsum.writer(name)``)."""

    scalar: ScalarCall

    def __init__(self, subrun: str = "") -> None:
        self.subrun = check_run_name(subrun, "sub-run")
        self.scalar = _scalar_call(self.subrun)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        """Log a histogram; across ranks, the histogram of all ranks' values together."""
        _validate.check_tag(tag)
        step = _validate.check_step(step, tag)
        array = _validate.as_array(values, tag, "histogram values")
        if array.dtype.kind not in "iuf":
            raise TypeError(f"histogram values for tag {tag!r} must be real numbers, got dtype {array.dtype}")
        # A copy: the training loop may change its array before the sender thread buckets it.
        client().add_values((HISTOGRAM, self.subrun, tag, (), 0), step, array)

    def image(
        self, tag: str, images: Any, step: int, *, max_outputs: int = 3, dataformats: str = "NHWC"
    ) -> None:
        """Log images (uint8, or float in [0, 1]); across ranks, gathered in rank order."""
        _validate.check_tag(tag)
        step = _validate.check_step(step, tag)
        array = _validate.as_array(images, tag, "images")
        pixels = prepare_images(array, tag=tag, dataformats=dataformats, max_outputs=max_outputs)
        size = sum(p.nbytes for p in pixels)
        if size > MAX_IMAGE_BYTES:
            raise ValueError(
                f"images for tag {tag!r} hold {size} bytes of pixels; at most {MAX_IMAGE_BYTES} per call"
            )
        client().add(((IMAGES, self.subrun, tag, (), max_outputs), step, pixels, None))

    def text(self, tag: str, text: str, step: int) -> None:
        """Log Markdown text; across ranks, gathered in rank order, each labelled with its rank."""
        _validate.check_tag(tag)
        step = _validate.check_step(step, tag)
        if not isinstance(text, str):
            raise TypeError(f"text for tag {tag!r} must be a str, got {type(text).__name__}")
        client().add(((TEXT, self.subrun, tag, (), 0), step, text, None))


_root = Writer()
scalar = _root.scalar
histogram = _root.histogram
image = _root.image
text = _root.text


_writers: dict[str, Writer] = {}


def writer(name: str) -> Writer:
    """The logging calls for sub-run ``<run>/<name>``, e.g. ``distsum.writer("test")``."""
    # One per name, so a loop that calls distsum.writer(name).scalar(...) keeps its tag cache.
    found = _writers.get(name) if isinstance(name, str) else None
    if found is None:
        found = Writer(name)
        _writers[name] = found
    return found


def flush(timeout: float | None = 30.0) -> bool:
    """True once the aggregator holds everything this rank logged before the call."""
    return client().flush(timeout)


def finish(timeout: float | None = 30.0) -> bool:
    """Flush, wait (at most ``timeout``) until it is written, and disconnect. Safe to call twice.

    On rank 0 with the embedded aggregator, also waits (within the same timeout) for the
    aggregator to finish writing the other ranks' records. False if that did not happen in time;
    a warning then says what the aggregator had not confirmed as written.
    """
    global _state, _rows, _row_limit
    with _lock:
        state = _state
        if state is None or state.client.forked_away:
            return True
        _state = None
        _rows, _row_limit = _NO_QUEUE, 0
    deadline = None if timeout is None else time.monotonic() + timeout
    if state.aggregator is not None:
        # It exits once every rank has finished, this one included: not a crash to recover from.
        state.aggregator.finishing()
    ok = state.client.close(timeout)
    if state.aggregator is not None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = state.aggregator.wait(remaining) and ok
    return ok


def _finish_at_exit() -> None:
    finish(timeout=FLUSH_TIMEOUT)


def run_dir() -> str | None:
    """The run directory of the embedded aggregator (None with a standalone one)."""
    state = _state
    return None if state is None else state.run_dir
