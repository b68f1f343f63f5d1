"""Target 8: from the last rank logging a step to that step being readable in the run's event file.

``ranks`` processes (spawned, as a launcher would) run a synchronous loop: every ``period``
seconds, all of them log ``tags`` scalars of the next step (the embedded aggregator on rank 0).
This process tails the run's event files every millisecond and notes when each step's event
appears. Two latencies per step ``s``:

* from the last log: appearance minus the moment the last rank returned from its last
  ``scalar()`` call at ``s`` (each rank notes it; the event's wall time would not do, since the
  sender stamps a batch's scalars when it sends them);
* from completion: appearance minus the moment the last rank started logging ``s + 1``. distsum
  writes a step once every rank has moved past it, so this is the part distsum itself adds.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from bench_lib.common import call_main, event_files, read_new_records


def _rank(
    rank: int, world: int, logdir: str, steps: int, period: float, tags: int, t0: float, out: Any
) -> None:
    import distsum

    distsum.init(rank, world, logdir=logdir)
    names = [f"metric/{j:04d}" for j in range(tags)]
    starts, ends = [], []
    for step in range(steps):
        target = t0 + step * period
        delay = target - time.time()
        if delay > 0:
            time.sleep(delay)
        starts.append(time.time())
        value = step * 0.001
        for tag in names:
            distsum.scalar(tag, value, step)
        ends.append(time.time())
    ok = distsum.finish(120)
    out.put((rank, starts, ends, ok))


def latency(ranks: int, steps: int, period: float, tags: int) -> dict[str, Any]:
    from distsum._proto import event_pb2

    logdir = tempfile.mkdtemp(prefix="bench-latency-")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # Start well after the ranks' imports and the aggregator's start.
    t0 = time.time() + 2.0
    procs = [
        ctx.Process(target=_rank, args=(r, ranks, logdir, steps, period, tags, t0, out)) for r in range(ranks)
    ]
    seen: dict[int, float] = {}
    offsets: dict[str, int] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 2.0 + steps * period + 120
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            for path in event_files(logdir):
                records, offsets[path] = read_new_records(path, offsets.get(path, 0))
                if not records:
                    continue
                now = time.time()
                for record in records:
                    event = event_pb2.Event.FromString(record)
                    if any(v.tag.startswith("metric/") for v in event.summary.value):
                        seen.setdefault(event.step, now)
            time.sleep(0.001)
        results = {}
        while len(results) < ranks:
            rank, starts, ends, ok = out.get(timeout=60)
            results[rank] = (starts, ends, ok)
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(logdir, ignore_errors=True)
    starts = np.array([results[r][0] for r in range(ranks)])  # [rank, step]
    complete = starts.max(axis=0)  # when the last rank started logging each step
    last_log = np.array([results[r][1] for r in range(ranks)]).max(axis=0)
    from_log, from_complete = [], []
    for step in range(steps - 1):  # the last step is written by finish(), not by progress
        if step in seen:
            appeared = seen[step]
            from_log.append((appeared - last_log[step]) * 1e3)
            from_complete.append((appeared - complete[step + 1]) * 1e3)
    return {
        "steps_seen": len(seen),
        "steps": steps,
        "from_log_ms": from_log,
        "from_complete_ms": from_complete,
        "finished": all(ok for _, _, ok in results.values()),
    }


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    call_main({"latency": latency})
