"""Faults with real processes: the aggregator and ranks killed with SIGKILL at seeded moments.

The runs are compared, as TensorBoard's loaders read them, with what the ranks logged: the same
tags, steps and values as an uninterrupted run, nothing twice, no step going backwards.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest

import distsum
from tests.jobs import failures
from tests.tbreaders import acc_scalars, accumulate, event_files, read_events, tbparse_read

WORLD = 3
STEPS = 150


def value(rank: int, step: int) -> float:
    return float(rank * 1000 + step)


def steady_rank(rank: int, logdir: str, errors) -> None:
    try:
        distsum.init(rank, WORLD, logdir=logdir, step_timeout=120, rank_timeout=120)
        for step in range(STEPS):
            distsum.scalar("loss", value(rank, step), step)
            distsum.scalar("mine", value(rank, step), step, reduce="none")
            time.sleep(0.01)  # a training step: the kills land mid-job
        assert distsum.finish(timeout=120)
    except BaseException as e:
        errors.put(f"rank {rank}: {e!r}")
        raise


def aggregator_pids(logdir: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"distsum.aggregator" in args and os.fsencode(logdir) in args:
            pids.append(int(pid))
    return pids


def assert_each_tag_step_once(run_dir: str) -> None:
    """Across every event file of every run path: each (path, tag, step) once, steps increasing."""
    for directory, _, names in os.walk(run_dir):
        if not any("tfevents" in n for n in names):
            continue
        seen: dict[str, list[int]] = collections.defaultdict(list)
        for path in event_files(directory):
            for event in read_events(path):
                for v in event.summary.value:
                    seen[v.tag].append(event.step)
        for tag, steps in seen.items():
            assert steps == sorted(set(steps)), f"{directory}: {tag} steps {steps}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_aggregator_killed_at_random_moments_loses_and_repeats_nothing(tmp_path, seed):
    logdir = str(tmp_path / "run")
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=steady_rank, args=(r, logdir, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    kills = 0
    try:
        for delay in sorted(rng.uniform(0.5, 3.0) for _ in range(3)):
            deadline = time.monotonic() + 30
            while not aggregator_pids(logdir) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay / 3)
            for pid in aggregator_pids(logdir):
                os.kill(pid, signal.SIGKILL)
                kills += 1
        for p in procs:
            p.join(240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert errors.empty(), failures(errors, logdir)
    assert [p.exitcode for p in procs] == [0] * WORLD
    assert kills >= 1, f"seed {seed}: the job ended before any kill"
    with open(os.path.join(logdir, "distsum-aggregator.log")) as f:
        starts = sum("listening on" in line for line in f)
    # Rank 0 started it again after each kill, but for one that landed as it was exiting anyway.
    assert 2 <= starts <= kills + 1, f"seed {seed}: {kills} kills, {starts} starts"

    assert_each_tag_step_once(logdir)
    expected_mean = [
        (s, float(np.float32(np.mean([value(r, s) for r in range(WORLD)])))) for s in range(STEPS)
    ]
    assert acc_scalars(accumulate(logdir), "loss") == expected_mean, f"seed {seed}"
    for rank in range(WORLD):
        mine = acc_scalars(accumulate(os.path.join(logdir, f"rank_{rank}")), "mine")
        assert mine == [(s, value(rank, s)) for s in range(STEPS)], f"seed {seed}, rank {rank}"
    # tbparse reads every file of the run separately and keeps duplicates: none may appear.
    frames = tbparse_read(logdir)
    loss = frames.scalars[(frames.scalars.tag == "loss") & (frames.scalars.dir_name == "")]
    assert list(loss.step) == list(range(STEPS))


def mortal_rank(rank: int, logdir: str, errors, flushed, rejoined, first_step: int, steps: int) -> None:
    try:
        distsum.init(rank, WORLD, logdir=logdir, step_timeout=120, rank_timeout=2)
        for step in range(first_step, first_step + steps):
            distsum.scalar("loss", value(rank, step), step)
            distsum.scalar("mine", value(rank, step), step, reduce="none")
            if rank == 2 and first_step == 0 and step == 20:
                assert distsum.flush(timeout=60)
                flushed.set()
                time.sleep(3600)  # killed here, with everything so far handed over
            time.sleep(0.005)
        if rank == 2:
            assert distsum.flush(timeout=60)
            rejoined.set()
        else:
            assert rejoined.wait(120)  # the job goes on until the restarted rank is back
        assert distsum.finish(timeout=120)
    except BaseException as e:
        errors.put(f"rank {rank}: {e!r}")
        raise


def test_a_killed_rank_stalls_nothing_keeps_what_it_delivered_and_rejoins(tmp_path, monkeypatch):
    logdir = str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    errors, flushed, rejoined = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=mortal_rank, args=(r, logdir, errors, flushed, rejoined, 0, STEPS))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    try:
        assert flushed.wait(120)
        os.kill(procs[2].pid, signal.SIGKILL)
        procs[2].join(30)
        # torchelastic's restart of the rank: same rank number, a new process and stream.
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        again = ctx.Process(target=mortal_rank, args=(2, logdir, errors, flushed, rejoined, 1000, 5))
        again.start()
        procs.append(again)
        for p in procs:
            p.join(240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert errors.empty(), failures(errors, logdir)
    assert [p.exitcode for p in procs] == [0, 0, -signal.SIGKILL, 0]

    assert_each_tag_step_once(logdir)
    rank_2 = acc_scalars(accumulate(os.path.join(logdir, "rank_2")), "mine")
    # Everything the dead rank handed over is kept; the restarted rank rejoined the same run.
    assert rank_2 == [(s, value(2, s)) for s in range(21)] + [(s, value(2, s)) for s in range(1000, 1005)]
    for rank in (0, 1):
        mine = acc_scalars(accumulate(os.path.join(logdir, f"rank_{rank}")), "mine")
        assert mine == [(s, value(rank, s)) for s in range(STEPS)]
    loss = dict(acc_scalars(accumulate(logdir), "loss"))
    assert sorted(loss) == list(range(STEPS)) + list(range(1000, 1005))
    for step in range(STEPS):
        ranks = range(WORLD) if step <= 20 else (0, 1)  # written without the dead rank
        assert loss[step] == float(np.float32(np.mean([value(r, step) for r in ranks]))), step
    assert [loss[s] for s in range(1000, 1005)] == [value(2, s) for s in range(1000, 1005)]
