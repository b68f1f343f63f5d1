"""A long-lived standalone aggregator forgets finished streams and runs, and still answers them."""

from __future__ import annotations

import threading

import zmq

from distsum._aggregator import Aggregator, AggregatorOptions
from distsum._proto import wire_pb2
from distsum._wire import decode_ack, encode_batch, encode_series_table, set_scalar_columns
from tests.tbreaders import acc_scalars, accumulate, poll_until


def batch(run: str, stream: int, seq: int, step: int) -> bytes:
    b = wire_pb2.Batch(seq=seq, resend_from=seq, flush=True, finish=True)
    b.origin.run, b.origin.rank, b.origin.world_size, b.origin.stream = run, 0, 1, stream
    b.series_table = encode_series_table([("", "x", wire_pb2.SCALAR, [wire_pb2.MEAN], 0)])
    set_scalar_columns(b, [0], [step], [float(step)], [1.0])
    return encode_batch(b)


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
