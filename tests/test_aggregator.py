"""The standalone daemon: its command line, ranks of two jobs, garbage on its socket, SIGTERM."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

import distsum
from distsum._aggregator import _ROUND_BYTES
from distsum._proto import wire_pb2
from distsum._wire import PROTOCOL_VERSION, decode_ack, encode_batch, encode_series_table, set_scalar_columns
from tests.daemon import dealers, scalar_batch, start_daemon, stop_daemon, wait_for_durable_ack
from tests.tbreaders import acc_scalars, accumulate, poll_until, read_events


def job(rank: int, addr: str, run: str, offset: float, errors) -> None:
    try:
        distsum.init(rank, 2, addr=addr, run=run)
        for step in range(30):
            distsum.scalar("loss", offset + rank + step, step)
        assert distsum.finish(timeout=60)
    except BaseException as e:
        errors.put(f"{run} rank {rank}: {e!r}")
        raise


def garbage(addr: str, n: int) -> None:
    """Random bytes, wrong versions, truncated and mutated valid batches, from a raw socket."""
    rng = random.Random(5)
    valid = wire_pb2.Batch(seq=1)
    # A well-formed batch of another run; some bit flips leave it well formed (a forged batch is
    # kept out of a job's run only by authentication, a later step), so it names no real job.
    valid.origin.run, valid.origin.rank, valid.origin.stream = "intruder", 0, 99
    loss = wire_pb2.Series(tag="loss", kind=wire_pb2.SCALAR, reduce=[wire_pb2.MEAN])
    valid.series_table = wire_pb2.SeriesTable(series=[loss]).SerializeToString()
    # One scalar record (series 0, step 3, value 1e9, wall time 1.0): little-endian columns.
    valid.scalar_series = np.array([0], dtype="<u4").tobytes()
    valid.scalar_steps = np.array([3], dtype="<i8").tobytes()
    valid.scalar_values = np.array([1e9], dtype="<f8").tobytes()
    valid.scalar_wall_times = np.array([1.0], dtype="<f8").tobytes()
    valid.scalar_wall_counts = np.array([1], dtype="<u4").tobytes()
    good = encode_batch(valid)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    try:
        for i in range(n):
            kind = i % 4
            if kind == 0:
                frame = rng.randbytes(rng.randrange(0, 200))
            elif kind == 1:
                frame = good[: rng.randrange(0, len(good))]
            elif kind == 2:
                data = bytearray(good)
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                frame = bytes(data)
            else:
                frame = wire_pb2.Envelope(version=99).SerializeToString()
            sock.send(frame)
    finally:
        sock.close()
        context.term()


def test_two_jobs_on_a_standalone_daemon_survive_garbage(tmp_path):
    proc, addr = start_daemon(tmp_path, "--bind", "tcp://127.0.0.1:0", "--step-timeout", "30")
    try:
        garbage(addr, 2000)
        ctx = multiprocessing.get_context("spawn")
        errors = ctx.Queue()
        procs = [
            ctx.Process(target=job, args=(r, addr, run, offset, errors))
            for run, offset in (("job-a", 0.0), ("job-b", 1000.0))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert errors.empty(), errors.get()
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert "dropping malformed message" in err
    for run, offset in (("job-a", 0.0), ("job-b", 1000.0)):
        got = acc_scalars(accumulate(tmp_path / run), "loss")
        assert got == [(s, float(np.float32(offset + 0.5 + s))) for s in range(30)]
    # Nothing written into the jobs' runs but theirs: only the jobs' own sub-runs are there.
    assert {"job-a", "job-b"} <= set(os.listdir(tmp_path))
    assert all(
        not (tmp_path / run / sub).is_dir()
        for run in ("job-a", "job-b")
        for sub in os.listdir(tmp_path / run)
    )


def test_sigterm_writes_out_what_it_holds(tmp_path):
    proc, addr = start_daemon(tmp_path, "--world-size", "2", "--step-timeout", "3600")
    try:
        # Only rank 0 of 2 logs: nothing is complete until shutdown.
        distsum.init(0, 2, addr=addr, run="half")
        for step in range(5):
            distsum.scalar("x", step, step)
        assert distsum.flush(timeout=60)
    finally:
        distsum.finish(timeout=5)
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert acc_scalars(accumulate(tmp_path / "half"), "x") == [(s, float(s)) for s in range(5)]


@pytest.mark.parametrize("bad", [["--logdir", ""], ["--world-size", "x"]])
def test_bad_command_line(tmp_path, bad):
    result = subprocess.run(
        [sys.executable, "-m", "distsum.aggregator", *bad], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "distsum-aggregator" in result.stderr


def test_unwritable_logdir_is_an_error_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "distsum.aggregator", "--logdir", str(blocker / "runs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "runs" in result.stderr


def test_a_restarted_aggregator_takes_the_stream_where_the_last_one_left_it(tmp_path):
    proc, addr = start_daemon(tmp_path, "--world-size", "1", "--step-timeout", "3600")
    try:
        distsum.init(0, 1, addr=addr, run="job")
        for step in range(10):
            distsum.scalar("x", step, step)
        assert distsum.flush(timeout=60)
        # Step 9 is written once the rank moves past it, which it does on its next record.
        distsum.scalar("x", 10, 10)
        assert distsum.flush(timeout=60)
        poll_until(
            lambda: acc_scalars(accumulate(tmp_path / "job"), "x"),
            lambda r: len(r) >= 10,
            retry_on=(KeyError, FileNotFoundError),
        )
        proc.kill()
        proc.communicate(timeout=30)
        # The same address: the rank's socket reconnects by itself.
        proc, _ = start_daemon(tmp_path, "--bind", addr, "--world-size", "1", "--step-timeout", "3600")
        for step in range(11, 20):
            distsum.scalar("x", step, step)
        assert distsum.finish(timeout=60)
    finally:
        distsum.finish(timeout=5)
        code, err = stop_daemon(proc)
    assert code == 0, err
    got = acc_scalars(accumulate(tmp_path / "job"), "x")
    assert got == [(s, float(s)) for s in range(20)]


def test_a_rank_that_finished_first_is_durable_as_soon_as_its_last_steps_are_written(tmp_path):
    # Rank 1 finishes while its last steps wait for rank 0. Once rank 0 catches up they are
    # written, and rank 1's finish (which waits until they are durable) is acknowledged then,
    # not at the next periodic fsync, an hour away here.
    args = ["--world-size", "2", "--step-timeout", "3600", "--flush-secs", "3600"]
    proc, addr = start_daemon(tmp_path, *args)
    try:
        with dealers(addr, 2) as socks:
            socks[0].send(scalar_batch("job", 0, 2, 70, 1, range(3), 1.0))
            socks[1].send(scalar_batch("job", 1, 2, 71, 1, range(5), 2.0, finish=True))
            # Received, with steps 2..4 waiting for rank 0: not durable yet.
            assert socks[1].poll(10_000)
            first = decode_ack(socks[1].recv())
            assert (first.received, first.durable) == (1, 0)
            socks[0].send(scalar_batch("job", 0, 2, 70, 2, range(3, 6), 1.0))
            wait_for_durable_ack(socks[1], 71, 1, timeout=10)
            socks[0].send(scalar_batch("job", 0, 2, 70, 3, range(0), 1.0, finish=True))
            wait_for_durable_ack(socks[0], 70, 3)
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert acc_scalars(accumulate(tmp_path / "job"), "x") == [*((s, 3.0) for s in range(5)), (5, 1.0)]


def test_a_restarted_ranks_new_stream_supersedes_its_old_one(tmp_path):
    # The process of rank 0 died without a word and a new one took its place (a new stream). The
    # old stream is not waited for: the job ends when the new one finishes, not a rank timeout
    # (10 minutes here) after the old one fell silent.
    addr = f"ipc://{tmp_path}/agg.sock"
    args = ["--bind", addr, "--embedded", "--world-size", "1", "--rank-timeout", "600"]
    proc, _ = start_daemon(tmp_path / "run", *args)
    try:
        with dealers(addr, 2, immediate=True) as (old, new):
            old.send(scalar_batch("", 0, 1, 7, 1, range(3), 1.0))
            assert old.poll(10_000)
            assert decode_ack(old.recv()).received == 1
            new.send(scalar_batch("", 0, 1, 8, 1, range(3, 6), 2.0, finish=True))
            wait_for_durable_ack(new, 8, 1, timeout=10)
        assert proc.wait(timeout=30) == 0
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    values = [(s, 1.0) for s in range(3)] + [(s, 2.0) for s in range(3, 6)]
    assert acc_scalars(accumulate(tmp_path / "run"), "x") == values


def test_a_peer_of_another_protocol_version_is_answered_once_in_this_one(tmp_path):
    # A rank of another distsum version cannot read this aggregator's acks; one answer lets it say
    # so (tests/test_client.py), where it would otherwise wait in silence. Its batches are dropped.
    proc, addr = start_daemon(tmp_path)
    try:
        with dealers(addr, 2) as (other, same):
            envelope = wire_pb2.Envelope.FromString(scalar_batch("job", 0, 2, 5, 1, range(3), 1.0))
            envelope.version = PROTOCOL_VERSION + 1
            for _ in range(3):
                other.send(envelope.SerializeToString())
            assert other.poll(10_000)
            answer = wire_pb2.Envelope.FromString(other.recv())
            assert (answer.version, answer.WhichOneof("body")) == (PROTOCOL_VERSION, "ack")
            # A rank of this version is acknowledged as usual; the other peer hears nothing more.
            same.send(scalar_batch("job", 1, 2, 6, 1, range(3), 2.0, finish=True))
            assert same.poll(10_000)
            assert decode_ack(same.recv()).received == 1
            assert not other.poll(1_000)
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert err.count("wrong version") == 1  # the first of its dropped batches


def test_the_last_rank_to_finish_gets_its_last_ack_however_late_it_reads_it(tmp_path):
    # Once the last rank has finished, the embedded aggregator is done. The rank's socket drops an
    # ack it has not read when the aggregator hangs up, and no aggregator would answer a resend:
    # the aggregator waits for the rank to hang up, which it does once it has read the ack.
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "run", "--bind", addr, "--embedded", "--world-size", "1")
    try:
        with dealers(addr, 1, immediate=True) as (sock,):
            sock.send(scalar_batch("", 0, 1, 7, 1, range(3), 1.0, finish=True))
            time.sleep(2)  # busy elsewhere: a loaded machine, or a slow training process
            wait_for_durable_ack(sock, 7, 1, timeout=10)
        # Hung up: the aggregator exits at once.
        assert proc.wait(timeout=30) == 0
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert acc_scalars(accumulate(tmp_path / "run"), "x") == [(s, 1.0) for s in range(3)]


def test_a_flooded_aggregator_takes_in_a_bounded_round_then_writes_and_acknowledges(tmp_path):
    # A rank sends faster than the aggregator merges. Each round takes in at most _ROUND_BYTES
    # of batches before writing and acknowledging them, so the rank sees its batches received a
    # round at a time (its in-flight bound waits on that) rather than once the flood is over.
    tags, steps_per_batch, batches = 1000, 20, 60
    table = encode_series_table([("", f"t{j}", wire_pb2.SCALAR, [wire_pb2.MEAN], 0) for j in range(tags)])
    frames = []
    for seq in range(1, batches + 1):
        b = wire_pb2.Batch(seq=seq, series_table=table, finish=seq == batches)
        b.origin.run, b.origin.world_size, b.origin.stream = "job", 1, 9
        steps = np.repeat(np.arange((seq - 1) * steps_per_batch, seq * steps_per_batch), tags)
        series = np.tile(np.arange(tags), steps_per_batch)
        set_scalar_columns(b, series, steps, steps + series / tags, np.full(steps.size, 1.0))
        frames.append(encode_batch(b))
    per_round = math.ceil(_ROUND_BYTES / len(frames[0]))
    assert batches > 2 * per_round
    proc, addr = start_daemon(tmp_path, "--world-size", "1")
    try:
        with dealers(addr, 1) as (sock,):
            for frame in frames:
                sock.send(frame)
            received, durable = [0], 0
            while durable < batches:
                assert sock.poll(60_000), f"no acknowledgement after batch {received[-1]}"
                ack = decode_ack(sock.recv())
                if ack.received > received[-1]:
                    received.append(ack.received)
                durable = ack.durable
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    jumps = np.diff(received)
    assert jumps.max() <= per_round, f"batches acknowledged per round: {jumps.tolist()}"
    got = [
        (e.step, v.tag, v.simple_value)
        for e in read_events(tmp_path / "job")
        for v in e.summary.value
        if not v.tag.startswith("distsum/")
    ]
    expected = [
        (s, f"t{j}", np.float32(s + j / tags)) for s in range(batches * steps_per_batch) for j in range(tags)
    ]
    assert got == expected


KEEPS_FREED_MEMORY = """
import resource
import numpy as np
from distsum.aggregator import _keep_freed_memory

assert _keep_freed_memory()
for round in range(5):
    if round == 1:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(1 << 20) for _ in range(5)]  # 40 MiB in 8 MiB arrays, as a merge round
    del arrays
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_aggregator_process_reuses_the_memory_of_its_large_arrays():
    # Arrays freed by one round are reused by the next instead of being given back to the system
    # and faulted in again page by page (glibc's defaults fault in about a fifth of them here).
    out = subprocess.run(
        [sys.executable, "-c", KEEPS_FREED_MEMORY], capture_output=True, text=True, check=True
    )
    pages = 4 * 5 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(out.stdout) < pages // 100


def test_status_line_on_a_terminal(tmp_path):
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distsum.aggregator", "--logdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    try:
        assert "listening on" in proc.stdout.readline()
        seen = b""
        deadline = time.monotonic() + 30
        while b"ranks alive" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        # One line, rewritten in place: a carriage return and erase-to-end-of-line, no newline.
        assert b"\rranks alive 0  steps written 0  records/s 0" in seen, seen
        assert b"\x1b[K" in seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        os.close(leader)
    assert proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs, as root; the test fills it to make the disk full for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, timeout=30
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_full_disk_is_reported_corrupts_nothing_and_writing_resumes(small_disk):
    import threading

    logdir = small_disk / "runs"
    proc, addr = start_daemon(logdir, "--world-size", "1", "--step-timeout", "3600")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    filler = small_disk / "filler"
    try:
        distsum.init(0, 1, addr=addr, run="job")
        for step in range(10):
            distsum.scalar("x", step, step)
        distsum.scalar("x", 10, 10)
        assert distsum.flush(timeout=60)
        poll_until(
            lambda: acc_scalars(accumulate(logdir / "job"), "x"),
            lambda r: len(r) >= 10,
            retry_on=(KeyError, FileNotFoundError),
        )
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        for step in range(11, 40):
            distsum.text("note", "x" * 2000, step)
            distsum.scalar("x", step, step)
        assert distsum.flush(timeout=60)
        poll_until(lambda: list(lines), lambda seen: any("failed" in line for line in seen), timeout=60)
        # What was written stays whole and readable while the disk is full.
        assert acc_scalars(accumulate(logdir / "job"), "x")[:10] == [(s, float(s)) for s in range(10)]
        filler.unlink()
        assert distsum.finish(timeout=60)
    finally:
        distsum.finish(timeout=5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, "".join(lines)
    assert sum("failed" in line for line in lines) == 1  # one line, however many retries
    assert acc_scalars(accumulate(logdir / "job"), "x") == [(s, float(s)) for s in range(40)]
