"""The standalone aggregator as the tests run it: a real ``distsum.aggregator`` process."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator

import zmq

import distsum
from distsum._proto import wire_pb2
from distsum._wire import decode_ack, encode_batch, encode_series_table, set_scalar_columns


def start_daemon(logdir, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start it on ``logdir`` with the command-line ``args``; the process and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distsum.aggregator", "--logdir", str(logdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("distsum-aggregator listening on "), line + proc.stderr.read()
    return proc, line.split()[3].rstrip(",")


def stop_daemon(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, as a user's Ctrl-C or service manager would; its exit status and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def kill_daemon(proc: subprocess.Popen[str]) -> None:
    """SIGKILL, as a crash would: the aggregator writes nothing more."""
    proc.kill()
    proc.communicate()


@contextlib.contextmanager
def rank_of_a_daemon(tmp_path: pathlib.Path, **options: object) -> Iterator[pathlib.Path]:
    """A standalone aggregator on ``tmp_path/runs`` and this process as rank 0 of 1 of its run
    "job", with ``options`` for ``distsum.init``; yields the run's directory. On the way out
    finishes (bounded) and checks that the aggregator stopped cleanly."""
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    try:
        distsum.init(0, 1, addr=addr, run="job", **options)
        try:
            yield tmp_path / "runs" / "job"
        finally:
            distsum.finish(5)
    finally:
        assert stop_daemon(proc)[0] == 0


def scalar_batch(
    run: str,
    rank: int,
    world_size: int,
    stream: int,
    seq: int,
    steps: Iterable[int],
    values: float | Iterable[float],
    *,
    reduce: int = wire_pb2.SUM,
    resend_from: int = 1,
    **flags: bool,
) -> bytes:
    """A batch as a rank's client sends it, for tests that play the rank on a raw socket: the
    scalars of tag ``x`` at ``steps`` (``values``: one for all, or one each, wall time 1.0)."""
    steps = list(steps)
    values = [float(values)] * len(steps) if isinstance(values, (int, float)) else list(values)
    b = wire_pb2.Batch(seq=seq, resend_from=resend_from, **flags)
    b.origin.run, b.origin.rank, b.origin.world_size, b.origin.stream = run, rank, world_size, stream
    b.series_table = encode_series_table([("", "x", wire_pb2.SCALAR, [reduce], 0)])
    set_scalar_columns(b, [0] * len(steps), steps, values, [1.0] * len(steps))
    return encode_batch(b)


@contextlib.contextmanager
def dealers(addr: str, n: int, *, immediate: bool = False) -> Iterator[list[zmq.Socket]]:
    """``n`` DEALER sockets connected to ``addr``, each a rank played by the test; closed after.

    ``immediate``: ZMQ_IMMEDIATE, as the client sets it (which also makes a socket drop what it
    has not read when its peer hangs up)."""
    context = zmq.Context()
    socks = [context.socket(zmq.DEALER) for _ in range(n)]
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, int(immediate))
            sock.connect(addr)
        yield socks
    finally:
        for sock in socks:
            sock.close()
        context.term()


def wait_for_durable_ack(sock: zmq.Socket, stream: int, seq: int, timeout: float = 30) -> wire_pb2.Ack:
    """Read acks on ``sock`` until one says batch ``seq`` of ``stream`` is durable."""
    while True:
        assert sock.poll(int(timeout * 1000)), f"no durable acknowledgement of batch {seq} in {timeout:g} s"
        ack = decode_ack(sock.recv())
        if ack.stream == stream and ack.durable >= seq:
            return ack
