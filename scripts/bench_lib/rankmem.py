"""Target 7b: a rank's memory while no aggregator is up, and whether everything arrives later.

The rank connects (``addr=``, standalone mode) to an ``ipc://`` address nobody has bound, logs at
a steady rate for ``seconds``, sampling its RSS once a second; then an aggregator is started on
that address and ``finish()`` must deliver every record logged meanwhile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from bench_lib.common import call_main, iter_events, proc_rss
from bench_lib.loadgen import start_aggregator, stop_aggregator


def _held(client: Any) -> dict[str, Any]:
    """What the client holds unacknowledged: MiB in memory and in its spool, records dropped.

    Reads the client's internals, which have changed shape before: a plain dict of batches, or a
    bounded store with a spool on disk.
    """
    held = client._unacked
    if isinstance(held, dict):
        return {"memory_mib": sum(len(b) for b in held.values()) / 2**20, "spool_mib": 0.0, "dropped": 0}
    return {
        "memory_mib": getattr(held, "_memory_bytes", 0) / 2**20,
        "spool_mib": getattr(held, "_spool_bytes", 0) / 2**20,
        "dropped": getattr(held, "dropped_records", 0),
    }


def rank_down(
    seconds: float, steps_per_s: float, tags: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``options``: ClientOptions fields passed to ``distsum.init``."""
    import distsum
    from distsum import _api

    logdir = tempfile.mkdtemp(prefix="bench-down-")
    addr = f"ipc://{logdir}/agg.sock"
    names = [f"metric/{j:04d}" for j in range(tags)]
    try:
        distsum.init(0, 1, addr=addr, run="bench", **(options or {}))
        client = _api._state.client
        rss = [proc_rss()["VmRSS"]]
        start = time.monotonic()
        times = [0.0]
        next_sample = start + 1
        step = 0
        while time.monotonic() - start < seconds:
            step += 1
            value = step * 0.001
            for tag in names:
                distsum.scalar(tag, value, step)
            target = start + step / steps_per_s
            now = time.monotonic()
            if now >= next_sample:
                rss.append(proc_rss()["VmRSS"])
                times.append(now - start)
                next_sample += 1
            if target > now:
                time.sleep(target - now)
        time.sleep(0.05)  # let the sender take the last records off the queue
        rss.append(proc_rss()["VmRSS"])
        times.append(time.monotonic() - start)
        # Growth per minute: the slope after the first second (imports and buffers settle).
        slope = float(np.polyfit(times[1:], rss[1:], 1)[0]) * 60 if len(rss) > 3 else None
        held = _held(client)
        limit = getattr(client.options, "max_unacked_bytes", None)
        queued = len(client._queue)
        logged = step * tags
        # The aggregator comes up: everything held must now arrive.
        proc = start_aggregator(logdir, addr, 1)
        try:
            t = time.perf_counter()
            finished = distsum.finish(300)
            recovery = time.perf_counter() - t
        finally:
            stop_aggregator(proc)
        written = sum(
            1
            for event in iter_events(os.path.join(logdir, "bench"))
            for value in event.summary.value
            if value.tag.startswith("metric/")
        )
        return {
            "seconds": seconds,
            "records": logged,
            "rss_mib": rss,
            "growth_mib": rss[-1] - rss[0],
            "growth_mib_per_min": slope,
            "records_per_min": logged / seconds * 60,
            "held": held,
            "memory_limit_mib": None if limit is None else limit / 2**20,
            "queued_records": queued,
            "finished": finished,
            "recovery_s": recovery,
            "written": written,
            "lost": logged - written,
        }
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    call_main({"rank_down": rank_down})
