"""Targets 1-4: one process logs through distsum, torch's SummaryWriter or tensorboardX's.

Every function runs the same loop for each library and returns per-repeat figures. distsum runs
with its embedded aggregator (a child process); its CPU is read from /proc where a target counts
"CPU anywhere".
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import numpy as np

from bench_lib.common import call_main, iter_events, proc_cpu, wait_for

LIBS = ("distsum", "torch", "tensorboardX")


class _Distsum:
    """distsum.init on rank 0 of 1 (embedded aggregator), connected before anything is timed."""

    def __init__(self, logdir: str) -> None:
        import distsum
        from distsum import _api

        self.distsum = distsum
        distsum.init(0, 1, logdir=logdir)
        distsum.scalar("bench/warmup", 0.0, 0)
        if not distsum.flush(60):
            raise RuntimeError("distsum.flush() of the warm-up record timed out")
        self.client = _api._state.client
        self.aggregator_pid = _api._state.aggregator.pid
        self.scalar = distsum.scalar
        self.histogram = distsum.histogram

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.distsum.image(tag, image, step, dataformats="CHW", max_outputs=1)

    def wait_durable(self, timeout: float = 120.0) -> bool:
        """After a flush: wait until the aggregator says everything sent so far is written."""
        seq = self.client._seq
        return wait_for(lambda: self.client._durable >= seq, timeout)

    def sync(self) -> None:
        if not self.distsum.flush(300):
            raise RuntimeError("distsum.flush() timed out")

    def close(self) -> bool:
        return self.distsum.finish(300)


class _Torchlike:
    def __init__(self, lib: str, logdir: str) -> None:
        if lib == "torch":
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(logdir)
        self.scalar = self.writer.add_scalar
        self.histogram = self.writer.add_histogram

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step)  # CHW, the default

    def sync(self) -> None:
        self.writer.flush()

    def close(self) -> bool:
        self.writer.close()
        return True


def _open(lib: str, logdir: str) -> Any:
    return _Distsum(logdir) if lib == "distsum" else _Torchlike(lib, logdir)


def _tags(n: int) -> list[str]:
    return [f"metric/{j:04d}" for j in range(n)]


def scalar_calls(lib: str, n: int, repeats: int, tags: int = 100) -> dict[str, Any]:
    """Target 1: time per call over a loop of ``n`` calls, ``tags`` tags per step.

    The loop is timed as a whole, so the background thread's share of the interpreter lock while
    the loop runs counts against it. Between repeats the library is flushed (not timed).
    """
    logdir = tempfile.mkdtemp(prefix=f"bench-scalar-{lib}-")
    try:
        w = _open(lib, logdir)
        names = _tags(tags)
        steps = n // tags
        log = w.scalar
        base = 1
        per_call = []
        for _ in range(repeats):
            start = time.perf_counter()
            for step in range(base, base + steps):
                value = step * 0.001
                for tag in names:
                    log(tag, value, step)
            per_call.append((time.perf_counter() - start) / (steps * tags) * 1e6)
            base += steps
            w.sync()
        w.close()

        # The floor: the same loop calling a function that does nothing.
        def nothing(tag: str, value: float, step: int) -> None:
            pass

        start = time.perf_counter()
        for step in range(steps):
            value = step * 0.001
            for tag in names:
                nothing(tag, value, step)
        floor = (time.perf_counter() - start) / (steps * tags) * 1e6
        return {"us_per_call": per_call, "floor_us": floor}
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def scalar_e2e(lib: str, n: int, repeats: int, tags: int = 100) -> dict[str, Any]:
    """Target 2: ``n`` scalars logged until on disk, and a count of what is on disk.

    distsum: from the first call until ``finish()`` returned (durable acknowledgement, then the
    embedded aggregator's exit); also the time until the durable acknowledgement alone. torch
    and tensorboardX: until ``close()`` returned.
    """
    rates, rates_durable, lost = [], [], []
    names = _tags(tags)
    steps = n // tags
    for _ in range(repeats):
        logdir = tempfile.mkdtemp(prefix=f"bench-e2e-{lib}-")
        try:
            w = _open(lib, logdir)
            log = w.scalar
            start = time.perf_counter()
            for step in range(1, steps + 1):
                value = step * 0.001
                for tag in names:
                    log(tag, value, step)
            if lib == "distsum":
                ok = w.client.close(300)
                durable = time.perf_counter() - start
                rates_durable.append(steps * tags / durable)
                ok = w.close() and ok
                if not ok:
                    raise RuntimeError("distsum.finish() returned False")
            else:
                w.close()
            elapsed = time.perf_counter() - start
            rates.append(steps * tags / elapsed)
            written = sum(
                1
                for event in iter_events(logdir)
                for value in event.summary.value
                if value.tag.startswith("metric/")
            )
            lost.append(steps * tags - written)
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
    out: dict[str, Any] = {"per_s": rates, "lost": lost}
    if rates_durable:
        out["per_s_durable"] = rates_durable
    return out


def _tf1_limits() -> np.ndarray:
    # TF1's default buckets (histogram.cc InitDefaultBucketsInner), computed here independently.
    pos = []
    limit = 1e-12
    while limit < 1e20:
        pos.append(limit)
        limit *= 1.1
    dbl_max = np.finfo(np.float64).max
    return np.array([-dbl_max, *(-np.array(pos[::-1])), 0.0, *pos, dbl_max])


def _check_tf1_grid(logdir: str, tag: str, values: np.ndarray) -> str:
    """Compare distsum's written histogram with TF1's bucketing of the same values."""
    rows = None
    for event in iter_events(logdir):
        for value in event.summary.value:
            if value.tag == tag:
                rows = np.frombuffer(value.tensor.tensor_content, dtype="<f8").reshape(-1, 3)
    if rows is None:
        return "missing"
    limits = _tf1_limits()
    x = values.astype(np.float64)
    reference = np.bincount(np.searchsorted(limits, x, side="right"), minlength=limits.size + 1)
    nonzero = np.flatnonzero(reference)
    written = rows[rows[:, 2] > 0]
    if not np.array_equal(written[:, 2], reference[nonzero].astype(np.float64)):
        return "counts differ"
    # Each non-empty row's right edge is its bucket's limit (the last row's is the maximum).
    if not np.array_equal(written[:-1, 1], limits[nonzero[:-1]]):
        return "edges differ"
    return "exact"


def histogram(lib: str, size: int, calls: int, repeats: int) -> dict[str, Any]:
    """Target 3: ``calls`` back-to-back histograms of ``size`` float32 values, per repeat.

    Training-thread cost: the loop's time per call (back to back, so the sender thread bucketing
    the previous histograms competes for the interpreter lock), after a first burst reported
    apart; and each call's time when the calls are 30 ms apart ("spaced"). Total CPU: this
    process's CPU (all threads) from the loop's start until the library has everything (distsum:
    flush, then the durable acknowledgement), plus, for distsum, the embedded aggregator's CPU
    over the same span.
    """
    logdir = tempfile.mkdtemp(prefix=f"bench-hist-{lib}-")
    rng = np.random.default_rng(0)
    values = rng.standard_normal(size, dtype=np.float32)
    try:
        w = _open(lib, logdir)
        train_ms, cpu_ms, cpu_rank_ms = [], [], []
        step = 1
        # Repeat 0 is the first burst, reported apart ("cold"): its copies land in memory fresh
        # from the kernel, and page faults make it cost several times the steady state.
        for repeat in range(repeats + 1):
            aggregator_cpu = proc_cpu(w.aggregator_pid) if lib == "distsum" else 0.0
            cpu = time.process_time()
            start = time.perf_counter()
            for _ in range(calls):
                w.histogram("weights", values, step)
                step += 1
            elapsed = (time.perf_counter() - start) / calls * 1e3
            w.sync()
            if lib == "distsum":
                w.wait_durable()
            rank_cpu = time.process_time() - cpu
            if lib == "distsum":
                aggregator_cpu = proc_cpu(w.aggregator_pid) - aggregator_cpu
            if repeat == 0:
                cold_ms = elapsed
                continue
            train_ms.append(elapsed)
            cpu_rank_ms.append(rank_cpu / calls * 1e3)
            cpu_ms.append((rank_cpu + aggregator_cpu) / calls * 1e3)
        # The same calls spaced out, as a training loop spaces them: each call alone, after the
        # sender thread has finished with the previous histogram.
        spaced_ms = []
        for _ in range(calls):
            time.sleep(0.03)
            start = time.perf_counter()
            w.histogram("weights", values, step)
            spaced_ms.append((time.perf_counter() - start) * 1e3)
            step += 1
        ok = w.close()
        grid = _check_tf1_grid(logdir, "weights", values) if lib == "distsum" else None
        return {
            "train_ms": train_ms,
            "cold_ms": [cold_ms],
            "spaced_ms": spaced_ms,
            "cpu_ms": cpu_ms,
            "cpu_rank_ms": cpu_rank_ms,
            "grid": grid,
            "finished": ok,
        }
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def image(lib: str, calls: int, repeats: int) -> dict[str, Any]:
    """Target 4: ``calls`` back-to-back 3x224x224 uint8 (noise) images, time per call."""
    logdir = tempfile.mkdtemp(prefix=f"bench-image-{lib}-")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)
    try:
        w = _open(lib, logdir)
        train_ms, cpu_ms = [], []
        step = 1
        for _ in range(repeats):
            aggregator_cpu = proc_cpu(w.aggregator_pid) if lib == "distsum" else 0.0
            cpu = time.process_time()
            start = time.perf_counter()
            for _ in range(calls):
                w.image("input", pixels, step)
                step += 1
            train_ms.append((time.perf_counter() - start) / calls * 1e3)
            w.sync()
            if lib == "distsum":
                w.wait_durable()
                aggregator_cpu = proc_cpu(w.aggregator_pid) - aggregator_cpu
            cpu_ms.append((time.process_time() - cpu + aggregator_cpu) / calls * 1e3)
        ok = w.close()
        images = sum(
            1 for event in iter_events(logdir) for value in event.summary.value if value.HasField("image")
        )
        return {"train_ms": train_ms, "cpu_ms": cpu_ms, "images_written": images, "finished": ok}
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    call_main(
        {"scalar_calls": scalar_calls, "scalar_e2e": scalar_e2e, "histogram": histogram, "image": image}
    )
