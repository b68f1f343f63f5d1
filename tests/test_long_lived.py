"""A long-lived standalone aggregator forgets finished streams and runs, and still answers them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import zmq

from distsum._aggregator import Aggregator, AggregatorOptions
from distsum._proto import wire_pb2
from distsum._wire import decode_ack
from tests.daemon import dealers, scalar_batch
from tests.tbreaders import acc_scalars, accumulate, poll_until


def batch(run: str, stream: int, seq: int, step: int) -> bytes:
    return scalar_batch(
        run, 0, 1, stream, seq, [step], step, reduce=wire_pb2.MEAN, resend_from=seq, flush=True, finish=True
    )


def send(sock: zmq.Socket, frame: bytes) -> wire_pb2.Ack:
    sock.send(frame)
    while True:
        assert sock.poll(10_000), "no acknowledgement"
        ack = decode_ack(sock.recv())
        if ack.durable:
            return ack


def test_finished_streams_and_runs_are_forgotten_and_a_late_resend_is_still_answered(tmp_path) -> None:
    aggregator = Aggregator(AggregatorOptions(logdir=str(tmp_path), flush_secs=0.05, retire_after=0.2))
    thread = threading.Thread(target=aggregator.serve)
    thread.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(aggregator.address)
    try:
        first = batch("job", 11, 1, 5)
        ack = send(sock, first)
        assert (ack.received, ack.durable) == (1, 1)
        poll_until(lambda: not aggregator._streams and "job" not in aggregator._runs, timeout=30)
        assert not (tmp_path / "job" / ".distsum-journal").exists()
        # The rank missed its ack and resends: answered from what the aggregator remembers.
        duplicates = aggregator.duplicates
        assert send(sock, first).durable == 1
        assert aggregator.duplicates == duplicates + 1 and "job" not in aggregator._runs
        # A new stream in the same run opens it again, with what was written before.
        assert send(sock, batch("job", 12, 1, 6)).durable == 1
    finally:
        aggregator.stop()
        thread.join()
        sock.close()
        context.term()
    assert acc_scalars(accumulate(str(tmp_path / "job")), "x") == [(5, 5.0), (6, 6.0)]


@contextlib.contextmanager
def serving(options: AggregatorOptions) -> Iterator[Aggregator]:
    aggregator = Aggregator(options)
    thread = threading.Thread(target=aggregator.serve)
    thread.start()
    try:
        yield aggregator
    finally:
        aggregator.stop()
        thread.join()


def test_a_retired_rank_is_still_known_as_done_to_an_aggregator_started_after_this_one(tmp_path) -> None:
    # Rank 1 of a 2-rank job finished long ago and was retired; rank 0 goes on. An aggregator
    # started on the run after this one stops never hears from rank 1: the journal must still
    # say that rank 1 is done, or rank 0's steps wait for it until the step timeout.
    def ranked(rank: int, seq: int, steps: range, **flags: bool) -> bytes:
        return scalar_batch("job", rank, 2, 70 + rank, seq, steps, 2**rank, resend_from=seq, **flags)

    def written() -> list[tuple[int, float]]:
        return acc_scalars(accumulate(str(tmp_path / "job")), "x")

    options = AggregatorOptions(logdir=str(tmp_path), flush_secs=0.05, retire_after=0.2, step_timeout=600)
    with serving(options) as first, dealers(first.address, 2) as socks:
        socks[1].send(ranked(1, 1, range(3), finish=True))
        assert send(socks[0], ranked(0, 1, range(4), flush=True)).durable == 1
        poll_until(lambda: ("job", 1, 71) not in first._streams, timeout=30)
    with serving(options) as second, dealers(second.address, 1) as (sock,):
        sock.send(ranked(0, 2, range(4, 7)))
        poll_until(lambda: len(written()) == 6, timeout=20)
    assert written() == [(0, 3.0), (1, 3.0), (2, 3.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0)]
