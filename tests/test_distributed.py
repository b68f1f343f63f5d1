"""Ranks in real processes, real sockets, one aggregator, one run: read back by TensorBoard."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import distsum
from distsum._aggregator import AggregatorOptions
from distsum._histogram import Histogram
from tests.jobs import failures
from tests.tbreaders import (
    acc_histograms,
    acc_images,
    acc_scalars,
    acc_tags,
    acc_text,
    accumulate,
    poll_until,
)

WORLD = 4
STEPS = 20


def rank_values(rank: int, step: int) -> tuple[float, np.ndarray]:
    rng = np.random.default_rng(1000 * rank + step)
    return float(rank * 10 + step + 0.5), rng.normal(rank, 1.0, 200)


def worker(rank: int, logdir: str, errors) -> None:
    try:
        distsum.init(rank, WORLD, logdir=logdir, step_timeout=60)
        test = distsum.writer("test")
        for step in range(STEPS):
            loss, weights = rank_values(rank, step)
            distsum.scalar("loss", loss, step)
            distsum.scalar("tokens", 100 + rank, step, reduce=("sum", "min", "max"))
            distsum.scalar("per_rank", loss, step, reduce="none")
            distsum.histogram("weights", weights, step)
            if step % 5 == 0:
                test.scalar("accuracy", rank / 10, step)
        pixels = np.full((1, 4, 4, 3), 50 * rank, np.uint8)
        distsum.image("picture", pixels, STEPS, max_outputs=WORLD)
        distsum.text("host", f"rank {rank} says hi", STEPS)
        assert distsum.flush(timeout=60)
        assert distsum.finish(timeout=120)
    except BaseException as e:
        errors.put(f"rank {rank}: {e!r}")
        raise


def test_four_ranks_with_the_embedded_aggregator(tmp_path):
    logdir = str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, logdir, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert errors.empty(), failures(errors, logdir)
    assert all(p.exitcode == 0 for p in procs)

    acc = accumulate(logdir)
    loss = acc_scalars(acc, "loss")
    assert [s for s, _ in loss] == list(range(STEPS))
    for step, value in loss:
        expected = np.mean([rank_values(r, step)[0] for r in range(WORLD)])
        assert value == pytest.approx(expected, rel=1e-6)
    assert [v for _, v in acc_scalars(acc, "tokens")] == [sum(100 + r for r in range(WORLD))] * STEPS
    assert [v for _, v in acc_scalars(acc, "tokens/min")] == [100.0] * STEPS
    assert [v for _, v in acc_scalars(acc, "tokens/max")] == [100.0 + WORLD - 1] * STEPS
    for rank in range(WORLD):
        per_rank = acc_scalars(accumulate(os.path.join(logdir, f"rank_{rank}")), "per_rank")
        assert per_rank == [(s, float(np.float32(rank_values(rank, s)[0]))) for s in range(STEPS)]
    for step, rows in acc_histograms(acc, "weights"):
        union = np.concatenate([rank_values(r, step)[1] for r in range(WORLD)])
        np.testing.assert_allclose(rows, Histogram.from_values(union, tag="w").rows().astype(np.float32))
    test = accumulate(os.path.join(logdir, "test"))
    assert acc_scalars(test, "accuracy") == [
        (s, float(np.float32(np.mean([r / 10 for r in range(WORLD)])))) for s in range(0, STEPS, 5)
    ]
    assert sorted(t for t in acc_tags(acc, "images")) == [f"picture/image/{i}" for i in range(WORLD)]
    assert len(acc_images(acc, "picture/image/3")) == 1
    ((_, text),) = acc_text(acc, "host")
    assert [text.index(f"rank {r} says hi") for r in range(WORLD)] == sorted(
        text.index(f"rank {r} says hi") for r in range(WORLD)
    )
    assert "distsum/ranks_alive" in acc_tags(acc, "scalars") or "distsum/ranks_alive" in acc_tags(acc)


def test_a_single_rank_finish_returns_once_everything_is_written(tmp_path):
    distsum.init(0, 1, logdir=str(tmp_path))
    for step in range(3):
        distsum.scalar("x", step, step)
    assert distsum.flush(timeout=30)
    # The embedded aggregator exits right after the last rank finishes; the rank must still get
    # its last acknowledgement (a regression: it used to wait out the whole timeout).
    assert distsum.finish(timeout=30)
    assert distsum.finish(timeout=30)  # idempotent
    assert acc_scalars(accumulate(tmp_path), "x") == [(s, float(s)) for s in range(3)]


def test_a_step_nobody_moves_past_is_written_once_it_settles(tmp_path):
    # A slow training step: what it logged is written step_settle after it arrived (the options'
    # default, which the embedded aggregator's command line takes), not when the next step
    # begins or at finish().
    settle = AggregatorOptions(logdir="").step_settle
    distsum.init(0, 1, logdir=str(tmp_path))
    try:
        logged = time.monotonic()
        distsum.scalar("x", 1.0, 0)
        poll_until(
            lambda: acc_scalars(accumulate(tmp_path), "x"),
            timeout=settle + 30,
            interval=0.05,
            retry_on=(KeyError, FileNotFoundError),
            what="the settled step",
        )
        assert time.monotonic() - logged >= settle
    finally:
        assert distsum.finish(timeout=30)


def slow_rank_worker(rank: int, logdir: str, errors, others_done) -> None:
    try:
        distsum.init(rank, 3, logdir=logdir, step_timeout=1.0)
        if rank == 2:
            # Far behind: it starts logging once the others have finished and their steps were
            # written without it (the step timeout), so all its records arrive late.
            assert all(done.wait(60) for done in others_done)
        for step in range(0, 10, 2 if rank == 1 else 1):  # rank 1 skips odd steps
            distsum.scalar("loss", float(rank), step)
            if rank == 0:
                distsum.scalar("only_rank_0", 1.0, step)
        if rank == 0:
            # Rank 0 hosts the aggregator, so its finish() waits for the whole job: it only
            # waits here until its steps are on disk.
            assert distsum.flush(timeout=60)
            poll_until(
                lambda: acc_scalars(accumulate(logdir), "only_rank_0"),
                lambda r: len(r) == 10,
                timeout=60,
                retry_on=(KeyError, FileNotFoundError),
            )
            others_done[0].set()
        assert distsum.finish(timeout=60)
        if rank == 1:
            others_done[1].set()
    except BaseException as e:
        errors.put(f"rank {rank}: {e!r}")
        raise


def test_a_slow_rank_does_not_stall_the_others_and_loses_nothing(tmp_path):
    logdir = str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    others_done = [ctx.Event(), ctx.Event()]
    procs = [ctx.Process(target=slow_rank_worker, args=(r, logdir, errors, others_done)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert errors.empty(), failures(errors, logdir)
    acc = accumulate(logdir)
    loss = acc_scalars(acc, "loss")
    # Every step once, in order, written without the slow rank: mean of ranks 0 and 1 where
    # rank 1 logged (even steps), rank 0 alone at odd steps.
    assert loss == [(s, 0.5 if s % 2 == 0 else 0.0) for s in range(10)]
    assert acc_scalars(acc, "only_rank_0") == [(s, 1.0) for s in range(10)]
    # The slow rank's records are kept, counted as late, in its late run.
    late = acc_scalars(accumulate(os.path.join(logdir, "late", "rank_2")), "loss")
    assert late == [(s, 2.0) for s in range(10)]
    assert {"distsum/late_records", "distsum/step_lag", "distsum/ranks_alive"} <= set(acc_tags(acc))


def test_a_forked_child_that_logs_without_init_gets_a_clear_error(tmp_path):
    distsum.init(0, 1, logdir=str(tmp_path))
    try:
        distsum.scalar("x", 1.0, 0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what logging does, touch nothing else
            os.close(read)
            messages = []
            for step in (0, 1):  # the parent's scalar() has checked step 0, not step 1
                try:
                    distsum.scalar("x", 2.0, step)
                    messages.append("no error")
                except distsum.DistsumError as e:
                    messages.append(str(e))
            os.write(write, "\n".join(messages).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            messages = f.read().split("\n")
        assert os.waitpid(pid, 0)[1] == 0
        assert len(messages) == 2
        assert all("parent process" in m and "distsum.init()" in m for m in messages), messages
        distsum.scalar("x", 3.0, 1)
        assert distsum.finish(timeout=30)
    finally:
        distsum.finish(timeout=5)
    assert acc_scalars(accumulate(tmp_path), "x") == [(0, 1.0), (1, 3.0)]


def test_ranks_that_never_call_finish_are_finished_at_exit(tmp_path):
    script = (
        "import sys, distsum\n"
        "rank = int(sys.argv[1])\n"
        "distsum.init(rank, 2, logdir=sys.argv[2])\n"
        "for step in range(5):\n"
        "    distsum.scalar('x', rank, step)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path)]) for r in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert acc_scalars(accumulate(tmp_path), "x") == [(s, 0.5) for s in range(5)]


BAD_CALLS = [
    (lambda: distsum.scalar("", 1.0, 0), ValueError, "empty"),
    (lambda: distsum.scalar("t\x00", 1.0, 0), ValueError, "NUL"),
    (lambda: distsum.scalar(5, 1.0, 0), TypeError, "tag must be a str"),
    (lambda: distsum.scalar("bad", "1", 0), TypeError, "'bad'"),
    (lambda: distsum.scalar("bad", np.ones(3), 0), ValueError, "'bad'"),
    (lambda: distsum.scalar("bad", 1.0, -1), ValueError, "step for tag 'bad'"),
    (lambda: distsum.scalar("bad", 1.0, 2.5), TypeError, "step for tag 'bad'"),
    (lambda: distsum.scalar("bad", 1.0, 0, reduce="median"), ValueError, "reduce for tag 'bad'"),
    (lambda: distsum.scalar("bad", 1.0, 0, reduce=("mean", "mean")), ValueError, "'bad'"),
    (lambda: distsum.histogram("bad", np.array(["x"]), 0), TypeError, "'bad'"),
    (lambda: distsum.histogram("bad", np.ones(2, dtype=bool), 0), TypeError, "'bad'"),
    (lambda: distsum.image("bad", np.zeros((4, 4), np.uint8), 0), ValueError, "'bad'"),
    (lambda: distsum.image("bad", np.zeros((1, 0, 4, 3), np.uint8), 0), ValueError, "'bad'"),
    (lambda: distsum.image("bad", np.zeros((1, 4, 4, 3), np.int32), 0), TypeError, "'bad'"),
    (lambda: distsum.image("bad", np.zeros((1, 5000, 5000, 3), np.uint8), 0), ValueError, "'bad'"),
    (lambda: distsum.image("bad", np.zeros((1, 4, 4, 3)), 0, dataformats="XYZW"), ValueError, "'bad'"),
    (lambda: distsum.text("bad", 3, 0), TypeError, "'bad'"),
    (lambda: distsum.writer("../escape"), ValueError, "sub-run"),
    (lambda: distsum.writer("/abs"), ValueError, "sub-run"),
    (lambda: distsum.writer("a\x00b"), ValueError, "sub-run"),
]


def test_bad_input_is_an_error_at_the_call_and_loses_nothing(tmp_path):
    distsum.init(0, 1, logdir=str(tmp_path))
    try:
        distsum.scalar("before", 1.0, 0)
        for call, error, match in BAD_CALLS:
            with pytest.raises(error, match=match):
                call()
        distsum.scalar("after", float("nan"), 1)  # NaN is a value, not an error
        assert distsum.finish(timeout=60)
    finally:
        distsum.finish(timeout=5)
    acc = accumulate(tmp_path)
    assert acc_scalars(acc, "before") == [(0, 1.0)]
    ((step, nan),) = acc_scalars(acc, "after")
    assert step == 1 and np.isnan(nan)
    assert not [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]


@pytest.mark.parametrize("run", ["../up", "/abs", "a/b", "x\x00y", ".hidden"])
def test_a_run_name_that_is_a_path_is_refused(run):
    with pytest.raises(ValueError, match="run name"):
        distsum.init(0, 1, addr="tcp://127.0.0.1:9", run=run)
