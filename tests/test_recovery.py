"""Exactly once across an aggregator's crash, for records whose fate depended on timing.

A resent batch may hold records that the dead aggregator merged into a step it then wrote, or
sent to the rank's late run, or never saw. The scenarios below pin each case down with real
processes: a standalone daemon killed with SIGKILL at a chosen moment and started again on the
same directory and address, and ranks frozen with SIGSTOP so that their resends arrive after the
new aggregator has moved on. Values are powers of two summed across ranks, so every written point
tells which ranks it holds.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

import distsum
from distsum._journal import Journal
from tests.daemon import dealers, kill_daemon, scalar_batch, start_daemon, stop_daemon, wait_for_durable_ack
from tests.tbreaders import acc_scalars, accumulate, poll_until
from tests.test_faults import assert_each_tag_step_once

RUN = "job"


def rank_process(rank: int, addr: str, commands, replies) -> None:
    """A rank that logs the steps it is told to, each as 2**rank under ``x`` (summed)."""
    try:
        distsum.init(rank, 2, addr=addr, run=RUN, resend_after=0.2)
        while True:
            command, arg = commands.get()
            if command == "log":
                for step in arg:
                    distsum.scalar("x", float(2**rank), step, reduce="sum")
                replies.put(("logged", rank))
            elif command == "finish":
                replies.put(("finished", distsum.finish(timeout=60)))
                return
    except BaseException as e:
        replies.put(("error", f"rank {rank}: {e!r}"))
        raise


class Job:
    def __init__(self, addr: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        # A queue per rank and direction: a rank frozen while it writes to a queue holds its lock.
        self.replies = [ctx.Queue(), ctx.Queue()]
        self.commands = [ctx.Queue(), ctx.Queue()]
        self.procs = [
            ctx.Process(target=rank_process, args=(rank, addr, self.commands[rank], self.replies[rank]))
            for rank in (0, 1)
        ]
        for p in self.procs:
            p.start()

    def tell(self, rank: int, command: str, arg=None):
        self.commands[rank].put((command, arg))
        return self.reply(rank)

    def reply(self, rank: int):
        reply = self.replies[rank].get(timeout=60)
        assert reply[0] != "error", reply[1]
        return reply

    def finish_all(self) -> None:
        for rank in range(len(self.procs)):
            assert self.tell(rank, "finish") == ("finished", True)

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join(10)


def written(run_dir: str) -> dict[str, dict[int, float]]:
    """Run path -> step -> value of ``x``, as TensorBoard's Python loader reads it."""
    out = {}
    for path in ("", "late/rank_0", "late/rank_1"):
        directory = os.path.join(run_dir, path)
        if os.path.isdir(directory):
            points = acc_scalars(accumulate(directory), "x")
            assert len({step for step, _ in points}) == len(points), f"{path}: a step twice: {points}"
            out[path] = dict(points)
    return out


def steps_of(run_dir: str) -> set[int]:
    if not os.path.isdir(run_dir):
        return set()
    try:
        return {step for step, _ in acc_scalars(accumulate(run_dir), "x")}
    except KeyError:
        return set()


def assert_each_record_once(run_dir: str, logged: dict[int, set[int]]) -> dict[str, dict[int, float]]:
    """Every (rank, step) logged is in the run's sum at the step or in the rank's late run, once."""
    assert_each_tag_step_once(run_dir)
    runs = written(run_dir)
    found: dict[tuple[int, int], list[str]] = {}
    for step, total in runs.get("", {}).items():
        assert total in (1.0, 2.0, 3.0), (step, total)
        for rank in (0, 1):
            if int(total) & 2**rank:
                found.setdefault((rank, step), []).append("run")
    for rank in (0, 1):
        for step, value in runs.get(f"late/rank_{rank}", {}).items():
            assert value == 2**rank
            found.setdefault((rank, step), []).append("late")
    expected = {(rank, step) for rank, steps in logged.items() for step in steps}
    assert set(found) == expected, f"missing {expected - set(found)}, extra {set(found) - expected}"
    repeated = {key: where for key, where in found.items() if len(where) > 1}
    assert not repeated, f"written twice: {repeated}"
    return runs


def rank_0_alone(job: Job, run_dir: str, steps: range) -> None:
    """Rank 1 frozen before it sends anything (steps 0..5 waiting for it); rank 0 logs ``steps``,
    and they time out into the run without rank 1."""
    job.tell(1, "log", [])
    os.kill(job.procs[1].pid, signal.SIGSTOP)
    job.commands[1].put(("log", range(6)))  # taken once it runs again
    job.tell(0, "log", steps)
    poll_until(lambda: 5 in steps_of(run_dir), timeout=30)


@pytest.fixture
def daemon(tmp_path):
    procs = []

    def start(addr: str | None = None, step_timeout: float = 1):
        args = ["--world-size", "2", "--step-timeout", str(step_timeout), "--flush-secs", "3600"]
        args += ["--rank-timeout", "600"]
        if addr is not None:
            args += ["--bind", addr]
        proc, address = start_daemon(tmp_path, *args)
        procs.append(proc)
        return proc, address

    yield start
    for proc in procs:
        if proc.poll() is None:
            kill_daemon(proc)


def test_records_merged_into_written_steps_are_not_written_again_as_late(tmp_path, daemon):
    # Both ranks' steps 0..4 are written; nothing is durable yet (no fsync) when the aggregator
    # dies. The new one writes step 5 from rank 0 alone (rank 1 is frozen), so rank 1's resent
    # steps 0..4 arrive behind what it has written: they were in the sums already, not late.
    proc, addr = daemon()
    run_dir = str(tmp_path / RUN)
    job = Job(addr)
    try:
        for rank in (0, 1):
            job.tell(rank, "log", range(6))
        poll_until(lambda: {0, 1, 2, 3, 4} <= steps_of(run_dir), timeout=30)
        os.kill(job.procs[1].pid, signal.SIGSTOP)
        kill_daemon(proc)
        proc, _ = daemon(addr)
        job.tell(0, "log", range(6, 9))
        poll_until(lambda: 5 in steps_of(run_dir), timeout=30)
        os.kill(job.procs[1].pid, signal.SIGCONT)
        job.tell(1, "log", range(6, 9))
        job.finish_all()
        assert stop_daemon(proc)[0] == 0
    finally:
        job.stop()
    runs = assert_each_record_once(run_dir, {0: set(range(9)), 1: set(range(9))})
    assert all(runs[""][step] == 3.0 for step in range(5))
    assert runs[""][5] == 1.0 and runs["late/rank_1"][5] == 2.0


def test_a_rank_that_finished_with_the_dead_aggregator_is_not_waited_for_by_the_next(tmp_path, daemon):
    # Rank 1 finishes while rank 0 goes on (a last evaluation on rank 0, say); then the aggregator
    # dies. The next one never hears from rank 1 again: only the journal can tell it that rank 1
    # is done, so that rank 0's steps are written once rank 0 moves past them, not a step timeout
    # (ten minutes here) later.
    proc, addr = daemon(step_timeout=600)
    run_dir = str(tmp_path / RUN)
    job = Job(addr)
    try:
        job.tell(0, "log", range(6))
        job.tell(1, "log", range(5))
        # Both ranks' records in the aggregator (their steps written) before rank 1 finishes: its
        # finish is fsynced at once, with nothing of it waiting for rank 0.
        poll_until(lambda: {0, 1, 2, 3} <= steps_of(run_dir), timeout=30)
        assert job.tell(1, "finish") == ("finished", True)
        kill_daemon(proc)
        proc, _ = daemon(addr, step_timeout=600)
        job.tell(0, "log", range(6, 8))
        poll_until(lambda: {5, 6} <= steps_of(run_dir), timeout=20)
        assert job.tell(0, "finish") == ("finished", True)
        assert stop_daemon(proc)[0] == 0
    finally:
        job.stop()
    runs = assert_each_record_once(run_dir, {0: set(range(8)), 1: set(range(5))})
    assert runs[""] == {**{step: 3.0 for step in range(5)}, 5: 1.0, 6: 1.0, 7: 1.0}


def test_a_rank_whose_last_batch_was_not_yet_durable_is_waited_for_by_the_next_aggregator(tmp_path, daemon):
    # Rank 1 sent its last batch, but its steps 2..4 wait for rank 0 when the aggregator dies: the
    # journal says rank 1 finished, not that it is durable. Rank 1 resends; until it does, the next
    # aggregator must wait for it rather than write those steps from rank 0 alone.
    proc, addr = daemon(step_timeout=600)
    run_dir = str(tmp_path / RUN)
    job = Job(addr)
    try:
        job.tell(0, "log", range(3))
        job.tell(1, "log", range(5))
        job.commands[1].put(("finish", None))

        def rank_1_finished() -> bool:
            streams = Journal(run_dir).earlier
            return any(rank == 1 and p.finished and not p.done for (rank, _), p in streams.items())

        poll_until(rank_1_finished, timeout=30)
        os.kill(job.procs[1].pid, signal.SIGSTOP)
        kill_daemon(proc)
        proc, _ = daemon(addr, step_timeout=600)
        job.tell(0, "log", range(3, 6))
        time.sleep(1.5)
        assert 2 not in steps_of(run_dir)
        os.kill(job.procs[1].pid, signal.SIGCONT)
        assert job.reply(1) == ("finished", True)
        assert job.tell(0, "finish") == ("finished", True)
        assert stop_daemon(proc)[0] == 0
    finally:
        job.stop()
    runs = assert_each_record_once(run_dir, {0: set(range(6)), 1: set(range(5))})
    assert runs[""] == {**{step: 3.0 for step in range(5)}, 5: 1.0}


def test_records_never_seen_by_the_dead_aggregator_go_late_when_their_steps_were_written(tmp_path, daemon):
    # Rank 1 is frozen before it sends anything; the first aggregator writes steps 0..5 from rank
    # 0 alone once they time out, then dies. Rank 1's records reach only the new aggregator.
    proc, addr = daemon()
    run_dir = str(tmp_path / RUN)
    job = Job(addr)
    try:
        rank_0_alone(job, run_dir, range(6))
        kill_daemon(proc)
        proc, _ = daemon(addr)
        os.kill(job.procs[1].pid, signal.SIGCONT)
        assert job.reply(1) == ("logged", 1)
        job.finish_all()
        assert stop_daemon(proc)[0] == 0
    finally:
        job.stop()
    runs = assert_each_record_once(run_dir, {0: set(range(6)), 1: set(range(6))})
    assert runs[""] == {step: 1.0 for step in range(6)}
    assert runs["late/rank_1"] == {step: 2.0 for step in range(6)}


def test_late_records_written_before_the_crash_are_not_written_again(tmp_path, daemon):
    # Rank 1's steps 0..5 arrive after the steps were written: late, and written to its late run.
    # The aggregator dies before any of it is durable; both ranks resend everything.
    proc, addr = daemon()
    run_dir = str(tmp_path / RUN)
    job = Job(addr)
    try:
        rank_0_alone(job, run_dir, range(7))
        os.kill(job.procs[1].pid, signal.SIGCONT)
        assert job.reply(1) == ("logged", 1)
        poll_until(lambda: 5 in steps_of(os.path.join(run_dir, "late", "rank_1")), timeout=30)
        kill_daemon(proc)
        proc, _ = daemon(addr)
        job.finish_all()
        assert stop_daemon(proc)[0] == 0
    finally:
        job.stop()
    runs = assert_each_record_once(run_dir, {0: set(range(7)), 1: set(range(6))})
    assert runs["late/rank_1"] == {step: 2.0 for step in range(6)}


def test_a_batch_durable_before_the_crash_is_a_duplicate_though_its_rank_missed_the_ack(tmp_path):
    # A rank that resends a batch the dead aggregator had written and fsynced (its durable ack was
    # lost with the connection): the next aggregator must not take it for new records.
    frame = scalar_batch(RUN, 0, 1, 77, 1, range(6), 1.0, flush=True)
    proc, addr = start_daemon(tmp_path, "--world-size", "1", "--flush-secs", "0.05")
    try:
        with dealers(addr, 1) as (sock,):
            sock.send(frame)
            # Written and fsynced: the aggregator says so, and dies. The rank resends the batch
            # as one that missed this acknowledgement would.
            wait_for_durable_ack(sock, 77, 1)
            kill_daemon(proc)
            proc, _ = start_daemon(tmp_path, "--world-size", "1", "--bind", addr)
            sock.send(frame)
            wait_for_durable_ack(sock, 77, 1)
        assert stop_daemon(proc)[0] == 0
    finally:
        if proc.poll() is None:
            kill_daemon(proc)
    assert written(str(tmp_path / RUN)) == {"": {step: 1.0 for step in range(6)}}


def test_a_finished_rank_that_missed_its_last_ack_is_not_waited_for_when_it_resends(tmp_path):
    # Rank 1 finished; the aggregator wrote everything of it and died before rank 1 read the
    # acknowledgement, so rank 1 resends its last batch to the next aggregator. That must not make
    # it a rank that joined again: rank 0's steps would wait for records rank 1 never sends.
    def batch(rank: int, seq: int, steps: range, *, finish: bool = False) -> bytes:
        return scalar_batch(RUN, rank, 2, 70 + rank, seq, steps, 2**rank, finish=finish)

    args = ["--world-size", "2", "--flush-secs", "0.05", "--step-timeout", "600", "--rank-timeout", "600"]
    proc, addr = start_daemon(tmp_path, *args)
    run_dir = str(tmp_path / RUN)
    try:
        with dealers(addr, 2) as socks:
            socks[0].send(batch(0, 1, range(6)))
            last_of_rank_1 = batch(1, 1, range(5), finish=True)
            socks[1].send(last_of_rank_1)
            wait_for_durable_ack(socks[1], 71, 1)
            kill_daemon(proc)
            proc, _ = start_daemon(tmp_path, *args, "--bind", addr)
            socks[1].send(last_of_rank_1)
            wait_for_durable_ack(socks[1], 71, 1)
            socks[0].send(batch(0, 1, range(6)))
            socks[0].send(batch(0, 2, range(6, 8)))
            poll_until(lambda: {5, 6} <= steps_of(run_dir), timeout=20)
            socks[0].send(batch(0, 3, range(0), finish=True))
            wait_for_durable_ack(socks[0], 70, 3)
        assert stop_daemon(proc)[0] == 0
    finally:
        if proc.poll() is None:
            kill_daemon(proc)
    assert written(run_dir) == {"": {**{step: 3.0 for step in range(5)}, 5: 1.0, 6: 1.0, 7: 1.0}}
