"""A rank whose aggregator is not there: batches wait in memory, then on disk, then are dropped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import distsum
from distsum._spool import Retained, remove_orphans
from tests.daemon import start_daemon, stop_daemon
from tests.tbreaders import acc_scalars, accumulate


def batch(seq: int, size: int = 1000) -> bytes:
    return bytes([seq % 256]) * size


def test_memory_then_spool_then_the_oldest_are_dropped(tmp_path):
    held = Retained(max_memory_bytes=2500, max_spool_bytes=3 * 1016, spool_dir=str(tmp_path))
    for seq in range(1, 11):
        held.add(seq, batch(seq), records=seq)
    # 2 in memory (2000 bytes), 3 in the spool (3 records of 1000 + 16 bytes framing), 5 dropped.
    assert [seq for seq, _ in held.items()] == [6, 7, 8, 9, 10]
    assert all(data == batch(seq) for seq, data in held.items())
    assert held.dropped_records == 1 + 2 + 3 + 4 + 5
    assert held.first() == 6
    assert len(os.listdir(tmp_path)) == 3  # one segment file per batch at this size
    held.release_through(8)
    assert [seq for seq, _ in held.items()] == [9, 10]
    assert os.listdir(tmp_path) == []  # segments go once all of them is acknowledged
    held.close()
    assert os.listdir(tmp_path) == []


def test_a_damaged_spool_record_is_not_sent(tmp_path):
    held = Retained(max_memory_bytes=0, max_spool_bytes=1 << 20, spool_dir=str(tmp_path))
    for seq in (1, 2, 3):
        held.add(seq, batch(seq), records=1)
    (spool,) = os.listdir(tmp_path)  # small batches share one segment
    with open(tmp_path / spool, "r+b") as f:
        f.seek(12 + 500)  # inside the first record's payload
        f.write(b"\xff")
    assert [seq for seq, _ in held.items()] == [2, 3]
    held.close()


@pytest.mark.parametrize(
    ("spool_bytes", "lost"), [(64 << 20, False), (16 << 10, True)], ids=["spooled", "overflowed"]
)
def test_a_rank_trains_while_the_aggregator_is_away_and_delivers_when_it_comes(tmp_path, spool_bytes, lost):
    addr = f"ipc://{tmp_path}/agg.sock"
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    # No aggregator yet: logging returns at once and batches pile up, spilling to disk.
    distsum.init(
        0,
        1,
        addr=addr,
        run="job",
        max_unacked_bytes=8 << 10,
        max_batch_records=100,
        max_spool_bytes=spool_bytes,
        spool_dir=str(spool_dir),
    )
    proc = None
    try:
        for step in range(3000):
            distsum.scalar("x", step, step)
        assert not distsum.flush(timeout=2)  # nobody is there to acknowledge
        assert os.listdir(spool_dir)  # the spool is in use
        proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
        assert distsum.finish(timeout=60)
    finally:
        distsum.finish(timeout=5)
        if proc is not None:
            assert stop_daemon(proc)[0] == 0
    assert os.listdir(spool_dir) == []  # removed when the rank finished
    acc = accumulate(tmp_path / "runs" / "job")
    got = acc_scalars(acc, "x")
    dropped = acc_scalars(acc, "distsum/dropped_records")[-1][1]
    if lost:
        # The oldest were dropped, counted, and reported; what arrived is in order and exact.
        assert 0 < len(got) < 3000
        assert got == [(s, float(s)) for s in range(3000 - len(got), 3000)]
        assert dropped == 3000 - len(got)
    else:
        assert got == [(s, float(s)) for s in range(3000)]
        assert dropped == 0


def test_a_damaged_spool_record_is_dropped_and_counted_so_later_batches_go_on(tmp_path):
    held = Retained(max_memory_bytes=0, max_spool_bytes=1 << 20, spool_dir=str(tmp_path))
    for seq in (1, 2, 3):
        held.add(seq, batch(seq), records=5)
    (spool,) = os.listdir(tmp_path)
    with open(tmp_path / spool, "r+b") as f:
        f.seek(12 + 500)
        f.write(b"\xff")
    assert [seq for seq, _ in held.items()] == [2, 3]
    assert held.first() == 2  # resend_from moves past it
    assert held.dropped_records == 5
    held.close()


def test_spool_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"distsum-spool-{dead.pid}-abc").write_bytes(b"old")
    (tmp_path / f"distsum-spool-{os.getpid()}-def").write_bytes(b"mine")
    (tmp_path / "unrelated").write_bytes(b"keep")
    remove_orphans(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f"distsum-spool-{os.getpid()}-def", "unrelated"]
