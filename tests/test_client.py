"""The rank's client against a real aggregator: prompt flushes, every record delivered, exact columns."""

from __future__ import annotations

import re
import signal
import threading
import time

import numpy as np
import pytest

import distsum
from distsum import _client, _wire
from distsum._histogram import Histogram
from distsum._image import EncodedImage, encode_png
from distsum._proto import wire_pb2
from distsum._wire import (
    PROTOCOL_VERSION,
    ScalarColumns,
    add_histogram,
    encode_batch,
    encode_series_table,
    scalar_columns,
    set_scalar_columns,
)
from tests.daemon import rank_of_a_daemon, start_daemon, stop_daemon
from tests.tbreaders import acc_histograms, acc_images, acc_scalars, acc_text, accumulate

# Bounds on how long a prompt flush may take: generous, since the machine may be busy; the
# behaviour they tell apart is a flush that waits for the sender's next round (seconds here).
PROMPT = 2.5


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


# --- the wire ---------------------------------------------------------------------------------


def batch_around_scalars(seed: int) -> wire_pb2.Batch:
    """A batch with fields before the scalar columns and after them."""
    batch = wire_pb2.Batch(seq=3 + seed, flush=True, finish=bool(seed % 2), resend_from=2, dropped=seed)
    batch.origin.run, batch.origin.rank, batch.origin.stream, batch.origin.host = "job", 1, 2**63 + 7, "h"
    batch.series_table = encode_series_table(
        ("", f"t{i}", wire_pb2.SCALAR, [wire_pb2.MEAN], 0) for i in range(seed * 40)
    )
    if seed % 3:
        add_histogram(batch, 0, 5, 1.5, Histogram.from_values(np.arange(50.0), tag="h"))
        batch.texts.add(series=0, step=1, wall_time=2.0, text="hi")
        batch.raws.add(subrun="x", event=b"\x09" + bytes(8))
    return batch


@pytest.mark.parametrize("seed", range(6))
def test_an_encoded_batch_parses_as_the_envelope_protobuf_writes_and_its_columns_come_back(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    steps = rng.integers(0, 2**63 - 1, n, dtype=np.int64, endpoint=True)
    series = rng.integers(0, 2**32 - 1, n, dtype=np.int64, endpoint=True)
    values = rng.normal(0, 1e6, n)
    values[:4] = [np.nan, np.inf, -np.inf, -0.0][: min(4, n)]
    columns = ScalarColumns(series, steps, values, 1.7e9 + rng.random(n))
    batch = batch_around_scalars(seed)
    data = encode_batch(batch, columns)
    expected = wire_pb2.Envelope(version=PROTOCOL_VERSION)
    expected.batch.CopyFrom(batch)
    set_scalar_columns(expected.batch, *columns)
    parsed = wire_pb2.Envelope.FromString(data)
    assert parsed == expected
    assert len(data) == len(expected.SerializeToString())  # each field once
    back = scalar_columns(parsed.batch)
    for got, sent in zip(back, columns, strict=True):
        assert np.array_equal(got, sent, equal_nan=True)
    assert back.series.dtype == np.uint32 and back.steps.dtype == np.int64


def test_wall_times_go_once_per_run_of_equal_ones():
    n = 500
    walls = np.full(n, 1.7e9 + 0.25)
    columns = ScalarColumns(np.arange(n) % 7, np.arange(n), np.ones(n), walls)
    common = encode_batch(batch_around_scalars(1), columns)
    parsed = wire_pb2.Envelope.FromString(common).batch
    assert np.frombuffer(parsed.scalar_wall_times, "<f8").tolist() == [1.7e9 + 0.25]
    assert np.frombuffer(parsed.scalar_wall_counts, "<u4").tolist() == [n]
    assert np.array_equal(scalar_columns(parsed).wall_times, walls)
    # Runs as a sender makes them, one time per round, and a record with a time of its own.
    walls[200:] += 0.01
    walls[-1] += 1
    runs = encode_batch(batch_around_scalars(1), columns)
    parsed = wire_pb2.Envelope.FromString(runs).batch
    assert np.frombuffer(parsed.scalar_wall_counts, "<u4").tolist() == [200, n - 201, 1]
    assert np.array_equal(scalar_columns(parsed).wall_times, walls)
    assert len(runs) - len(common) == 2 * 12
    # Every record its own time: a run each, the most a scalar adds to a batch (the sender's
    # bound when it cuts batches by bytes).
    columns = columns._replace(wall_times=np.arange(n, dtype=np.float64))
    data = encode_batch(batch_around_scalars(1), columns)
    each = wire_pb2.Envelope.FromString(data).batch
    assert np.frombuffer(each.scalar_wall_counts, "<u4").tolist() == [1] * n
    assert np.array_equal(scalar_columns(each).wall_times, columns.wall_times)
    headers = 5 * 6  # each column's field tag and length
    assert len(data) - len(encode_batch(batch_around_scalars(1))) <= n * _client._SCALAR_BYTES + headers


def test_a_batch_without_scalars_is_the_envelope_protobuf_writes():
    for seed in range(3):
        batch = batch_around_scalars(seed)
        expected = wire_pb2.Envelope(version=PROTOCOL_VERSION)
        expected.batch.CopyFrom(batch)
        assert encode_batch(batch) == expected.SerializeToString()
    assert (
        encode_batch(wire_pb2.Batch())
        == wire_pb2.Envelope(version=PROTOCOL_VERSION, batch={}).SerializeToString()
    )


# --- flush and finish -------------------------------------------------------------------------


def test_flush_returns_once_the_aggregator_answers_not_at_the_next_batch_interval(tmp_path):
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    try:
        distsum.init(0, 1, addr=addr, run="job", batch_interval=5.0)
        for step in range(2):
            for i in range(100):
                distsum.scalar("x", float(i), 100 * step + i)
            ok, took = timed(lambda: distsum.flush(10))
            assert ok and took < PROMPT, f"flush took {took:.2f} s with batch_interval 5"
        ok, took = timed(lambda: distsum.finish(10))
        assert ok and took < PROMPT, f"finish took {took:.2f} s with batch_interval 5"
    finally:
        distsum.finish(5)
        assert stop_daemon(proc)[0] == 0
    assert acc_scalars(accumulate(tmp_path / "runs" / "job"), "x") == [
        (s, float(s % 100)) for s in range(200)
    ]


def test_ranks_of_a_large_job_send_batches_less_often_unless_told(tmp_path):
    # An aggregator takes about a thousand batches a second comfortably: in a job of more than
    # 200 ranks each sends its batches less often than every 200 ms (at least once a second),
    # from the world size it was given or, given none, the one its aggregator answers with.
    cases = {
        (): [(8, {}, 0.2, 0.2), (4096, {}, 1.0, 1.0), (4096, {"batch_interval": 0.05}, 0.05, 0.05)],
        ("--world-size", "400"): [(None, {}, 0.2, 0.4)],
    }
    for n, (args, ranks) in enumerate(cases.items()):
        addr = f"ipc://{tmp_path}/agg{n}.sock"
        proc, _ = start_daemon(tmp_path / f"runs{n}", "--bind", addr, *args)
        try:
            for i, (world, options, before, after) in enumerate(ranks):
                distsum.init(3, world, addr=addr, run=f"job{i}", **options)
                try:
                    client = distsum._api.client()
                    assert client.batch_interval == before, (world, options)
                    assert distsum.flush(30)
                    assert client.batch_interval == after, (world, options)
                finally:
                    assert distsum.finish(30)
        finally:
            distsum.finish(5)
            assert stop_daemon(proc)[0] == 0


def test_batches_refused_before_the_aggregator_binds_go_out_as_soon_as_it_does(tmp_path):
    addr = f"ipc://{tmp_path}/agg.sock"
    distsum.init(0, 1, addr=addr, run="job", batch_interval=5.0)
    proc = None
    try:
        for step in range(50):
            distsum.scalar("x", float(step), step)
        assert not distsum.flush(0.3)  # nobody there: the batch waits for a connection
        proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
        ok, took = timed(lambda: distsum.flush(10))
        assert ok and took < PROMPT, f"flush took {took:.2f} s after the aggregator came up"
        assert distsum.finish(30)
    finally:
        distsum.finish(5)
        if proc is not None:
            assert stop_daemon(proc)[0] == 0
    assert acc_scalars(accumulate(tmp_path / "runs" / "job"), "x") == [(s, float(s)) for s in range(50)]


def test_finish_with_the_embedded_aggregator_and_a_one_second_batch_interval(tmp_path):
    # The embedded aggregator exits shortly after the last rank finished: the rank must have read
    # its acknowledgement by then, not at its next round.
    distsum.init(0, 1, logdir=str(tmp_path), batch_interval=1.0)
    try:
        for step in range(100):
            distsum.scalar("loss", 0.5, step)
        assert distsum.finish(30)
    finally:
        distsum.finish(5)
    assert acc_scalars(accumulate(tmp_path), "loss") == [(s, 0.5) for s in range(100)]


def test_init_on_rank_0_returns_once_its_embedded_aggregator_answers(tmp_path):
    # Its start-up then does not share the cores with the first steps of the training loop.
    distsum.init(0, 1, logdir=str(tmp_path))
    try:
        client = distsum._api.client()
        assert client._received >= 1  # without a flush: init's own has been answered
        distsum.scalar("x", 1.0, 0)
        assert distsum.finish(30)
    finally:
        distsum.finish(5)
    assert acc_scalars(accumulate(tmp_path), "x") == [(0, 1.0)]


def test_init_warns_naming_the_log_when_the_aggregator_is_slow_to_answer(tmp_path, monkeypatch, caplog):
    # No aggregator starts within a millisecond: init says where to look and returns, and the
    # records logged meanwhile arrive once it is up.
    monkeypatch.setattr(distsum._api, "AGGREGATOR_START_TIMEOUT", 0.001)
    with caplog.at_level("WARNING", logger="distsum"):
        distsum.init(0, 1, logdir=str(tmp_path))
    try:
        (warning,) = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
        assert str(tmp_path / "distsum-aggregator.log") in warning
        distsum.scalar("x", 2.0, 0)
        assert distsum.finish(30)
    finally:
        distsum.finish(5)
    assert acc_scalars(accumulate(tmp_path), "x") == [(0, 2.0)]


# --- what arrives -----------------------------------------------------------------------------


def test_every_kind_of_record_arrives_exactly_with_batches_cut_everywhere(tmp_path):
    rng = np.random.default_rng(7)
    histograms = {}
    # Small batches: cut by the record count, by the size of histograms, and by each flush.
    with rank_of_a_daemon(tmp_path, max_batch_records=7, max_batch_bytes=50_000) as run:
        test = distsum.writer("test")
        for step in range(40):
            distsum.scalar("loss", step / 8, step)
            distsum.scalar("sum", 1.0, step, reduce=("sum", "max"))
            test.scalar("acc", np.float32(step / 4), np.int64(step))
            if step % 3 == 0:
                histograms[step] = rng.normal(step, 1.0, 500)
                distsum.histogram("weights", histograms[step], step)
            if step % 5 == 0:
                distsum.text("note", f"step {step}", step)
            if step % 11 == 0:
                assert distsum.flush(30)
        # Steps a double cannot hold exactly arrive exactly (rows carry int64 steps).
        for step in (2**53 - 1, 2**53, 2**53 + 1, 2**62 + 3, 2**63 - 1):
            distsum.scalar("huge", 2.0, step)
        assert distsum.finish(60)
    acc = accumulate(run)
    assert acc_scalars(acc, "loss") == [(s, s / 8) for s in range(40)]
    assert acc_scalars(acc, "sum") == acc_scalars(acc, "sum/max") == [(s, 1.0) for s in range(40)]
    assert acc_scalars(accumulate(run / "test"), "acc") == [(s, float(np.float32(s / 4))) for s in range(40)]
    assert acc_scalars(acc, "huge") == [(s, 2.0) for s in (2**53 - 1, 2**53, 2**53 + 1, 2**62 + 3, 2**63 - 1)]
    assert [s for s, _ in acc_histograms(acc, "weights")] == sorted(histograms)
    for step, rows in acc_histograms(acc, "weights"):
        expected = Histogram.from_values(histograms[step], tag="w").rows().astype(np.float32)
        np.testing.assert_allclose(rows, expected)
    assert [(s, str(t)) for s, t in acc_text(acc, "note")] == [
        (s, f"**rank 0**\n\nstep {s}") for s in range(0, 40, 5)
    ]


def test_histograms_copied_into_the_senders_spare_arrays_arrive_exactly(tmp_path, monkeypatch):
    # Room for two spare arrays of 20,000 float64; each round buckets four.
    bound = 2 * 20_000 * 8
    monkeypatch.setattr(_client, "_MAX_SPARE_BYTES", bound)
    rng = np.random.default_rng(3)
    source = np.empty(20_000)  # one array the caller refills every step, like a gradient buffer
    logged = {}
    with rank_of_a_daemon(tmp_path) as run:
        client = distsum._api.client()
        for step in range(40):
            source[:] = rng.normal(step, 1.0, source.size)
            logged[step] = source.copy()
            distsum.histogram("grad", source, step)
            if step % 4 == 3:
                assert distsum.flush(30)
                # Bucketed and sent: the sender keeps the copies up to the bound, never the caller's.
                spares = [a for arrays in client._spares.values() for a in arrays]
                assert client._spare_bytes == sum(a.nbytes for a in spares) == bound
                assert not any(np.shares_memory(a, source) for a in spares)
        # The next copy goes into a spare array.
        distsum.histogram("grad", source, 40)
        logged[40] = source.copy()
        assert client._spare_bytes == bound - source.nbytes
        # Back to back, while the sender buckets and gives arrays back.
        for step in range(41, 400):
            source[:] = rng.normal(step, 1.0, source.size)
            logged[step] = source.copy()
            distsum.histogram("grad", source, step)
        assert distsum.finish(60)
    histograms = acc_histograms(accumulate(run), "grad")
    assert [s for s, _ in histograms] == sorted(logged)
    for step, rows in histograms:
        np.testing.assert_array_equal(rows, Histogram.from_values(logged[step], tag="g").rows())


@pytest.mark.parametrize("limits", [{"max_batch_records": 1}, {"max_batch_bytes": 1}])
def test_batches_of_one_record_deliver_everything(tmp_path, limits):
    with rank_of_a_daemon(tmp_path, **limits) as run:
        for step in range(30):
            distsum.scalar("x", float(step), step)
            if step % 10 == 0:
                distsum.text("t", "a", step)
                assert distsum.flush(30)
        assert distsum.finish(60)
    acc = accumulate(run)
    assert acc_scalars(acc, "x") == [(s, float(s)) for s in range(30)]
    assert [s for s, _ in acc_text(acc, "t")] == [0, 10, 20]


def test_records_logged_from_several_threads_all_arrive(tmp_path):
    steps = 3000
    with rank_of_a_daemon(tmp_path) as run:

        def log(name):
            for step in range(steps):
                distsum.scalar(name, float(step), step)
                if step % 500 == 0:
                    distsum.text(f"{name}/text", name, step)

        threads = [threading.Thread(target=log, args=(f"t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert distsum.finish(60)
    acc = accumulate(run)
    for i in range(4):
        assert acc_scalars(acc, f"t{i}") == [(s, float(s)) for s in range(steps)]
        assert [s for s, _ in acc_text(acc, f"t{i}/text")] == list(range(0, steps, 500))


def test_records_beyond_max_buffered_are_dropped_and_counted(tmp_path):
    # The sender takes nothing until the flush: its round and heartbeat are far away.
    with rank_of_a_daemon(tmp_path, max_buffered=10, batch_interval=60.0, heartbeat=60.0) as run:
        for step in range(25):
            distsum.scalar("x", 1.0, step)
        step = 1000
        for _ in range(5):  # one step object, found unchecked because the queue was full
            distsum.scalar("x", 1.0, step)
        assert distsum.finish(30)
    acc = accumulate(run)
    assert acc_scalars(acc, "x") == [(s, 1.0) for s in range(10)]
    assert acc_scalars(acc, "distsum/dropped_records")[-1][1] == 20


BAD_SCALARS = [
    (lambda: distsum.scalar("bad", 1.0, True), TypeError, "step for tag 'bad'"),
    (lambda: distsum.scalar("bad", 1.0, 2**63), ValueError, "step for tag 'bad'"),
    (lambda: distsum.scalar("bad", 1.0, -(2**70)), ValueError, "step for tag 'bad'"),
    (lambda: distsum.scalar("bad", True, 0), TypeError, "'bad'"),
    (lambda: distsum.scalar(["bad"], 1.0, 0), TypeError, "tag must be a str"),
    (lambda: distsum.scalar("bad", 1.0, 0, reduce=["sum"]), ValueError, "reduce for tag 'bad'"),
    (lambda: distsum.writer("sub").scalar("", 1.0, 0), ValueError, "empty"),
    (lambda: distsum.writer("sub").scalar("bad", 1.0, -1), ValueError, "step for tag 'bad'"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_SCALARS)
def test_a_bad_scalar_is_an_error_at_the_call_before_and_after_init(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call()
    distsum.init(0, 1, addr=f"ipc://{tmp_path}/nobody.sock", run="job")
    try:
        with pytest.raises(error, match=match):
            call()
    finally:
        distsum.finish(0.1)


def test_logging_without_init_or_after_finish_says_to_call_init(tmp_path):
    with pytest.raises(distsum.DistsumError, match="init"):
        distsum.scalar("x", 1.0, 0)
    distsum.init(0, 1, addr=f"ipc://{tmp_path}/nobody.sock", run="job")
    distsum.scalar("x", 1.0, 0)
    distsum.finish(0.1)
    with pytest.raises(distsum.DistsumError, match="init"):
        distsum.scalar("x", 1.0, 0)  # a step scalar() has checked
    with pytest.raises(distsum.DistsumError, match="init"):
        distsum.scalar("x", 1.0, 1)
    with pytest.raises(distsum.DistsumError, match="init"):
        distsum.writer("test").scalar("x", 1.0, 1)


def test_what_is_on_its_way_to_a_stalled_aggregator_stays_within_the_window(tmp_path):
    # The aggregator is frozen: nothing it would acknowledge as received. The rank keeps at most
    # max_in_flight_bytes (and one batch) handed to the socket; the rest waits in its own store,
    # and everything arrives once the aggregator runs again.
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    window = 8 << 10
    distsum.init(0, 1, addr=addr, run="job", max_in_flight_bytes=window, resend_after=60.0)
    try:
        assert distsum.flush(30)
        client = distsum._api.client()
        proc.send_signal(signal.SIGSTOP)
        largest = worst = 0
        for step in range(300):
            for j in range(20):
                distsum.scalar(f"x{j}", float(step), step)
            time.sleep(0.002)
            worst = max(worst, client._in_flight_bytes)
            largest = max([largest, *(size for _, size in client._in_flight)])
        assert client._window_full
        assert worst <= window + largest, (worst, largest)
        proc.send_signal(signal.SIGCONT)
        assert distsum.finish(60)
    finally:
        proc.send_signal(signal.SIGCONT)
        distsum.finish(5)
        assert stop_daemon(proc)[0] == 0
    acc = accumulate(tmp_path / "runs" / "job")
    assert acc_scalars(acc, "x19") == [(s, float(s)) for s in range(300)]


def test_a_rank_and_an_aggregator_of_different_protocol_versions_say_so_once(tmp_path, monkeypatch, caplog):
    # This process's client plays a distsum one protocol version ahead of the aggregator's.
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    monkeypatch.setattr(
        _wire, "_ENVELOPE_VERSION", wire_pb2.Envelope(version=PROTOCOL_VERSION + 1).SerializeToString()
    )
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    try:
        with caplog.at_level("WARNING", logger="distsum"):
            distsum.init(0, 1, addr=addr, run="job", heartbeat=0.2)
            for step in range(5):
                distsum.scalar("x", 1.0, step)
                assert not distsum.flush(0.3)  # nothing is acknowledged
            assert not distsum.finish(0.3)
    finally:
        code, err = stop_daemon(proc)
    assert code == 0
    told = [r.getMessage() for r in caplog.records if "another version" in r.getMessage()]
    assert told == [
        f"distsum: the aggregator at {addr} speaks another version of the wire protocol (wrong version: "
        f"version {PROTOCOL_VERSION}, expected {PROTOCOL_VERSION + 1}) and acknowledges nothing this rank "
        "sends: run the same distsum on both"
    ]
    assert "malformed acknowledgement" not in caplog.text
    # The aggregator logged the first of the rank's batches it dropped, and opened no run for them.
    assert err.count(f"version {PROTOCOL_VERSION + 1}, expected {PROTOCOL_VERSION}") == 1
    assert not (tmp_path / "runs" / "job").exists()


def test_a_finish_that_times_out_says_what_the_aggregator_has_not_confirmed(tmp_path, caplog):
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    try:
        distsum.init(3, 4, addr=addr, run="job")
        distsum.scalar("x", 1.0, 0)
        assert distsum.flush(30)
        proc.send_signal(signal.SIGSTOP)
        for step in range(1, 8):
            distsum.scalar("x", 1.0, step)
        with caplog.at_level("WARNING", logger="distsum"):
            assert not distsum.finish(0.5)
    finally:
        proc.send_signal(signal.SIGCONT)
        distsum.finish(5)
        assert stop_daemon(proc)[0] == 0
    (warning,) = [r.getMessage() for r in caplog.records if "stopped waiting" in r.getMessage()]
    assert re.match(
        rf"distsum: rank 3 stopped waiting after \d+\.\d s: the aggregator at {re.escape(addr)} ", warning
    )
    # The first scalar was received, not yet written: the aggregator waits for the other ranks.
    assert "has not confirmed 8 records as written" in warning
    assert "s ago)" in warning and "never" not in warning


def test_a_scalar_is_stamped_when_logged_unless_a_wall_time_is_given(tmp_path):
    # distsum.scalar's rows are stamped by the sender in its next round (within about 100 ms of the
    # call); a SummaryWriter's walltime= is kept exactly.
    run = tmp_path / "run"
    distsum.init(0, 1, logdir=run)
    try:
        before = time.time()
        distsum.scalar("logged", 1.0, 0)
        assert distsum.flush(30)
        after = time.time()
        with distsum.SummaryWriter() as writer:
            writer.add_scalar("given", 2.0, 0, walltime=1234.5)
        assert distsum.finish(60)
    finally:
        distsum.finish(5)
    acc = accumulate(run)
    ((logged, _),) = [(e.wall_time, e.step) for e in acc.Tensors("logged")]
    assert before <= logged <= after
    assert [e.wall_time for e in acc.Tensors("given")] == [1234.5]


def test_each_step_keeps_the_time_it_was_logged_at_however_rarely_batches_go(tmp_path):
    # Batches go out every batch_interval, here longer than the test: the sender stamps the rows
    # queued in its rounds between them, and the last step's row, taken before any round found it,
    # when it takes it.
    run = tmp_path / "run"
    distsum.init(0, 1, logdir=run, batch_interval=60.0)
    try:
        logged = []
        for step in range(4):
            logged.append(time.time())
            distsum.scalar("x", 1.0, step)
            if step < 3:
                time.sleep(0.5)
        assert distsum.finish(60)
    finally:
        distsum.finish(5)
    walls = [e.wall_time for e in accumulate(run).Tensors("x")]
    assert len(walls) == 4
    for wall, t in zip(walls, logged, strict=True):
        assert t <= wall < t + 0.4, [w - t for w, t in zip(walls, logged, strict=True)]


def test_a_copy_that_found_no_spare_array_has_one_faulted_in_for_the_next(tmp_path, monkeypatch):
    # No round, batch or heartbeat for a minute: nothing is bucketed, so a spare array can only
    # be one the sender made because a copy found none.
    monkeypatch.setattr(_client, "_ROUND", 60.0)
    run = tmp_path / "run"
    values = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    like = (values.dtype.str, values.size)
    distsum.init(0, 1, logdir=run, batch_interval=60.0, heartbeat=60.0)
    try:
        client = distsum._api.client()
        distsum.histogram("h", values, 1)
        deadline = time.monotonic() + 30
        while not client._spares.get(like) and time.monotonic() < deadline:
            time.sleep(0.001)
        (spare,) = client._spares[like]
        (record,) = client._breaks.values()
        assert not isinstance(record.payload, Histogram)  # not bucketed: the spare is a new array
        assert not np.shares_memory(spare, record.payload)
        # The next copy goes into it.
        distsum.histogram("h", values * 2, 2)
        assert not client._spares[like]
        second = client._breaks[max(client._breaks)]
        assert second.payload is spare
        # Within the bound only: an array that would not fit is neither copied into a spare nor made.
        big = np.zeros(_client._MAX_SPARE_BYTES // 8 + 1)
        distsum.histogram("big", big, 1)
        time.sleep(0.2)
        assert (big.dtype.str, big.size) not in client._spares and not client._misses
        assert distsum.finish(60)
    finally:
        distsum.finish(5)
    acc = accumulate(run)
    for (step, rows), scale in zip(acc_histograms(acc, "h"), (1, 2), strict=True):
        assert step == scale
        np.testing.assert_array_equal(rows, Histogram.from_values(values * scale, tag="h").rows())


def test_histograms_and_images_are_prepared_between_batches(tmp_path):
    # The sender buckets histograms and encodes images in its rounds, a little at a time, not in
    # a burst when the batch goes out; the batch then carries what they became.
    run = tmp_path / "run"
    values = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    distsum.init(0, 1, logdir=run, batch_interval=60.0)
    try:
        client = distsum._api.client()
        assert distsum.flush(30)
        sent = client._seq
        distsum.histogram("h", values, 1)
        distsum.image("i", pixels, 1, dataformats="HWC")
        histogram, images = list(client._breaks.values())
        deadline = time.monotonic() + 30
        while not isinstance(images.payload[0], EncodedImage) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(histogram.payload, Histogram) and isinstance(images.payload[0], EncodedImage)
        assert client._seq == sent  # no batch has gone since
        # The values' array, bucketed, waits for the next histogram's copy.
        assert client._spares[(values.dtype.str, values.size)]
        assert distsum.finish(60)
    finally:
        distsum.finish(5)
    acc = accumulate(run)
    ((step, rows),) = acc_histograms(acc, "h")
    assert step == 1
    np.testing.assert_array_equal(rows, Histogram.from_values(values, tag="h").rows())
    ((step, (png,)),) = acc_images(acc, "i/image/0")
    assert step == 1 and png == encode_png(pixels).png
