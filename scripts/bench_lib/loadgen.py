"""Targets 5 and 7a: a real aggregator process fed by a load generator over a real socket.

The generator plays ``ranks`` ranks, each with its own ZeroMQ DEALER socket (so its own identity,
as a real rank has), and sends what a rank's client would send: ``wire_pb2.Batch`` messages in an
``Envelope``, one frame each, scalar columns for ``tags`` tags per step, ``steps_per_batch`` steps
per batch, seq 1, 2, ... per stream, the last batch with ``flush`` and ``finish``. Every batch is
encoded before the clock starts, so the figure is the aggregator's: from the first send until
every simulated rank holds a *durable* acknowledgement of its last batch, i.e. every value was
received, merged, reduced and written (``os.write``) to the run's event file. Afterwards the run
is read back and every merged value checked.

``paced`` sends at a steady rate instead, as ranks that log so many steps a second do, each its
batches at its client's interval: whether one aggregator keeps up with a job of many ranks.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from bench_lib.common import call_main, event_files, iter_events, proc_cpu, proc_rss

RUN = "bench"


def start_aggregator(logdir: str, addr: str, world_size: int) -> subprocess.Popen[str]:
    """``distsum-aggregator`` as a user starts it, with timeouts long enough never to fire."""
    log = open(os.path.join(logdir, "aggregator.log"), "w")  # noqa: SIM115 - closed by stop_aggregator
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distsum.aggregator",
            "--logdir",
            logdir,
            "--bind",
            addr,
            "--world-size",
            str(world_size),
            "--step-timeout",
            "600",
            "--rank-timeout",
            "600",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    proc.log = log  # type: ignore[attr-defined]
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"aggregator did not start: {line!r}")
    return proc


def stop_aggregator(proc: subprocess.Popen[str], timeout: float = 120) -> int:
    """SIGTERM (it writes out what it holds), bounded wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.log.close()  # type: ignore[attr-defined]
    return proc.returncode


def connect_ranks(
    context: zmq.Context[Any], addr: str, ranks: int, sockets: list[zmq.Socket[bytes]]
) -> zmq.Poller:
    """A DEALER socket per simulated rank, appended to ``sockets`` (for the caller to close, even if
    this fails part way); the poller that waits for their acknowledgements."""
    poller = zmq.Poller()
    for _ in range(ranks):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(addr)
        sockets.append(s)
        poller.register(s, zmq.POLLIN)
    return poller


def encode_batches(
    rank: int, world: int, tags: int, steps: int, steps_per_batch: int
) -> tuple[list[bytes], int]:
    """One simulated rank's batches, as its client would encode them; and the values they hold."""
    from distsum._proto import wire_pb2
    from distsum._wire import encode_batch, encode_series_table, set_scalar_columns

    origin = wire_pb2.Origin(
        run=RUN,
        rank=rank,
        world_size=world,
        stream=random.getrandbits(63) + 1,
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    table = encode_series_table(
        ("", f"metric/{j:04d}", wire_pb2.SCALAR, (wire_pb2.MEAN,), 0) for j in range(tags)
    )
    tag_index = np.arange(tags, dtype=np.int64)
    out = []
    values = 0
    now = time.time()
    for seq, first in enumerate(range(1, steps + 1, steps_per_batch), start=1):
        step_range = np.arange(first, min(first + steps_per_batch, steps + 1), dtype=np.int64)
        batch = wire_pb2.Batch(seq=seq, series_table=table)
        batch.origin.CopyFrom(origin)
        step_column = np.repeat(step_range, tags)
        # Mean over ranks is known in closed form: step/2 + tag + (world-1)/2.
        value_column = step_column * 0.5 + np.tile(tag_index, step_range.size) + rank
        # A wall time per step, as a client stamps its rows once a round (10 ms) and a rank
        # logging this much takes about a round a step.
        walls = now + step_column * 0.01
        set_scalar_columns(batch, np.tile(tag_index, step_range.size), step_column, value_column, walls)
        if first + steps_per_batch > steps:
            batch.flush = batch.finish = True
        out.append(encode_batch(batch))
        values += step_column.size
    return out, values


def _check_run(run_dir: str, world: int, tags: int, steps: int) -> dict[str, Any]:
    """Read the run back: one merged value per (tag, step), each the exact mean."""
    seen = 0
    wrong = 0
    late_or_other = 0
    for event in iter_events(run_dir):
        for value in event.summary.value:
            if not value.tag.startswith("metric/"):
                continue
            seen += 1
            j = int(value.tag[7:])
            expected = np.float32(event.step * 0.5 + j + (world - 1) / 2)
            if np.float32(value.simple_value) != expected:
                wrong += 1
    for directory, _, _ in os.walk(run_dir):
        if directory != run_dir:  # sub-runs, such as late/rank_<r>
            late_or_other += sum(
                1
                for event in iter_events(directory)
                for v in event.summary.value
                if v.tag.startswith("metric/")
            )
    return {"written": seen, "expected": tags * steps, "wrong": wrong, "in_sub_runs": late_or_other}


def capacity(
    ranks: int,
    tags: int,
    steps: int,
    steps_per_batch: int,
    lag: bool = False,
    window: int | None = None,
    max_in_flight_bytes: int | None = None,
    check: bool = True,
    timeout: float = 600,
) -> dict[str, Any]:
    """Rank values per second through one aggregator process; its CPU and peak RSS.

    ``lag``: the last rank sends all its batches only after every other rank has sent all of its
    own, so the aggregator must hold every step until then (the memory case). ``window``: a rank
    sends batch ``b`` only once the aggregator acknowledged receiving batch ``b - window``, so
    batches do not pile up in ZeroMQ's queues (None: as fast as the socket takes them).
    ``max_in_flight_bytes`` bounds each rank as a client's option of that name does (None: the
    client's default): a batch waits while the ones sent before it and not yet acknowledged as
    received, with it, would be more bytes than that.
    """
    logdir = tempfile.mkdtemp(prefix="bench-agg-")
    addr = f"ipc://{logdir}/agg.sock"
    proc = start_aggregator(logdir, addr, ranks)
    context = zmq.Context()
    sockets = []
    try:
        batches = []
        total = 0
        for r in range(ranks):
            encoded, values = encode_batches(r, ranks, tags, steps, steps_per_batch)
            batches.append(encoded)
            total += values
        nbatches = len(batches[0])
        if max_in_flight_bytes is None:
            from distsum._client import ClientOptions

            max_in_flight_bytes = ClientOptions().max_in_flight_bytes
        # sent_before[r][b]: the bytes of rank r's batches before batch b.
        sent_before = [np.cumsum([0, *map(len, per_rank)]) for per_rank in batches]
        poller = connect_ranks(context, addr, ranks, sockets)
        rank_of = {s: r for r, s in enumerate(sockets)}
        durable = [0] * ranks
        received = [0] * ranks

        from distsum._wire import decode_ack

        def drain(wait_ms: int) -> None:
            for s, _ in poller.poll(wait_ms):
                while True:
                    try:
                        frame = s.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    ack = decode_ack(frame)
                    r = rank_of[s]
                    durable[r] = max(durable[r], ack.durable)
                    received[r] = max(received[r], ack.received)

        def must_wait(r: int, b: int) -> bool:
            # received[r] counts rank r's batches received in order, so batches received[r]..b-1
            # are in flight; as in the client, one batch alone may go whatever its size.
            if window is not None and received[r] < b - window:
                return True
            in_flight = sent_before[r][b + 1] - sent_before[r][received[r]]
            return received[r] < b and in_flight > max_in_flight_bytes

        held_back = 0

        def send(r: int, b: int) -> None:
            nonlocal held_back
            if must_wait(r, b):
                held_back += 1
                while must_wait(r, b):
                    if proc.poll() is not None:
                        raise RuntimeError(f"aggregator exited {proc.returncode}")
                    drain(50)
            sockets[r].send(batches[r][b])

        rss_before = proc_rss(proc.pid)["VmRSS"]
        cpu_before = proc_cpu(proc.pid)
        order = list(range(ranks - 1)) if lag else list(range(ranks))
        start = time.perf_counter()
        for b in range(nbatches):
            for r in order:
                send(r, b)
            drain(0)
        if lag:
            for b in range(nbatches):
                send(ranks - 1, b)
                drain(0)
        deadline = time.monotonic() + timeout
        while min(durable) < nbatches:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    f"aggregator did not acknowledge everything as durable within {timeout} s "
                    f"(lowest durable {min(durable)} of {nbatches}; exit {proc.poll()})"
                )
            drain(50)
        elapsed = time.perf_counter() - start
        cpu = proc_cpu(proc.pid) - cpu_before
        rss = proc_rss(proc.pid)
        out: dict[str, Any] = {
            "values": total,
            "seconds": elapsed,
            "values_per_s": total / elapsed,
            "values_per_cpu_s": total / cpu if cpu > 0 else None,
            "aggregator_cpu_s": cpu,
            "rss_before_mib": rss_before,
            "rss_peak_mib": rss["VmHWM"],
            "messages": nbatches * ranks,
            "bytes": sum(len(b) for per_rank in batches for b in per_rank),
            "batches_held_back": held_back,
        }
        stop_aggregator(proc)
        if check:
            out["check"] = _check_run(os.path.join(logdir, RUN), ranks, tags, steps)
            out["event_files"] = len(event_files(os.path.join(logdir, RUN)))
        return out
    finally:
        for s in sockets:
            s.close(linger=0)
        context.term()
        if proc.poll() is None:
            stop_aggregator(proc)
        shutil.rmtree(logdir, ignore_errors=True)


def paced(
    ranks: int, tags: int, steps_per_second: float, batch_interval: float, seconds: float
) -> dict[str, Any]:
    """Ranks logging ``tags`` scalars ``steps_per_second`` times a second, each sending what it
    logged every ``batch_interval`` (their clocks spread over it, as independent ranks' are), for
    ``seconds``: whether one aggregator keeps up, and its share of a core meanwhile.

    ``behind_s`` is how long after the last send every batch was acknowledged as durable: a
    fraction of a second when the aggregator keeps up (each rank's last batch flushes), more the
    further it fell behind.
    """
    import resource

    steps = max(2, int(seconds * steps_per_second))
    steps_per_batch = max(1, round(steps_per_second * batch_interval))
    # Two descriptors a socket; a ZeroMQ context allows 1,023 sockets unless told otherwise.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * ranks + 256)), hard))
    logdir = tempfile.mkdtemp(prefix="bench-paced-")
    addr = f"ipc://{logdir}/agg.sock"
    proc = start_aggregator(logdir, addr, ranks)
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, ranks + 64)
    sockets: list[zmq.Socket[bytes]] = []
    try:
        batches = [encode_batches(r, ranks, tags, steps, steps_per_batch)[0] for r in range(ranks)]
        nbatches = len(batches[0])
        poller = connect_ranks(context, addr, ranks, sockets)
        rank_of = {s: r for r, s in enumerate(sockets)}
        sent_at = np.zeros((ranks, nbatches))
        durable_at = np.full((ranks, nbatches), np.nan)
        durable = [0] * ranks

        from distsum._wire import decode_ack

        def drain(wait_ms: int) -> None:
            for s, _ in poller.poll(wait_ms):
                r = rank_of[s]
                while True:
                    try:
                        ack = decode_ack(s.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if ack.durable > durable[r]:
                        durable_at[r, durable[r] : ack.durable] = time.perf_counter()
                        durable[r] = ack.durable

        offsets = np.arange(ranks) * batch_interval / ranks
        start = time.perf_counter() + 0.5
        cpu_before = proc_cpu(proc.pid)
        for b in range(nbatches):
            for r in range(ranks):
                due = start + (b + 1) * batch_interval + offsets[r]
                while (now := time.perf_counter()) < due:
                    drain(max(0, int((due - now) * 1000)))
                sockets[r].send(batches[r][b])
                sent_at[r, b] = time.perf_counter()
            drain(0)
        sent = time.perf_counter()
        cpu = proc_cpu(proc.pid) - cpu_before
        deadline = time.monotonic() + 600
        while min(durable) < nbatches:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"aggregator did not make every batch durable (exit {proc.poll()})")
            drain(50)
        latency = (durable_at - sent_at)[:, :-1]
        return {
            "ranks": ranks,
            "batch_interval": batch_interval,
            "steps_per_batch": steps_per_batch,
            "batches_per_s": ranks / batch_interval,
            "values_per_s": ranks * tags * steps_per_second,
            "aggregator_core_share": cpu / (sent - start),
            "durable_p50_ms": float(np.median(latency) * 1e3),
            "durable_p99_ms": float(np.percentile(latency, 99) * 1e3),
            "behind_s": time.perf_counter() - sent,
        }
    finally:
        for s in sockets:
            s.close(linger=0)
        context.term()
        stop_aggregator(proc)
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    call_main({"capacity": capacity, "paced": paced})
