"""What every measurement needs: process CPU and RSS from /proc, event-file reading, JSON out."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "CLOCK_TICK",
    "call_main",
    "emit",
    "event_files",
    "iter_events",
    "proc_cpu",
    "proc_rss",
    "read_new_records",
    "wait_for",
]

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_HEADER = struct.Struct("<QI")


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads so far, as the scheduler counts them.

    In nanoseconds from each thread's /proc schedstat: /proc/PID/stat counts in clock ticks, 10 ms,
    as much as the whole of some measured spans (20 histograms' worth of the aggregator's work). A
    thread that exits takes its time with it; the processes measured keep theirs to the end.
    """
    if not os.path.exists(f"/proc/{pid}/schedstat"):  # a kernel without scheduler statistics
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # Fields after the command: state is index 0, utime 11, stime 12 (proc(5) numbers 14, 15).
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # exited since the listing
            pass
    return total / 1e9


def proc_rss(pid: int | str = "self") -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value, _unit = line.split()
                out[name[:-1]] = int(value) / 1024
    return out


def event_files(directory: str) -> list[str]:
    """The event files directly in ``directory``, in name order (the order loaders read them)."""
    try:
        names = sorted(n for n in os.listdir(directory) if "tfevents" in n)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def read_new_records(path: str, offset: int) -> tuple[list[bytes], int]:
    """Whole TFRecords of ``path`` from ``offset`` on (CRCs not checked); and the offset after them."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    records = []
    pos = 0
    while pos + 12 <= len(data):
        length, _ = _HEADER.unpack_from(data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos + 12 : pos + 12 + length])
        pos = end
    return records, offset + pos


def iter_events(directory: str) -> Iterator[Any]:
    """Every Event in the event files directly in ``directory``."""
    from distsum._proto import event_pb2

    for path in event_files(directory):
        records, _ = read_new_records(path, 0)
        for record in records:
            yield event_pb2.Event.FromString(record)


def emit(result: Any) -> None:
    """Hand a result to the orchestrator: one JSON line, the last on stdout."""
    sys.stdout.write("\n@@RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def call_main(functions: dict[str, Callable[..., Any]]) -> None:
    """``python -m bench_lib.<module> <function> '<json kwargs>'``: run it and emit its result."""
    name, arguments = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    emit(functions[name](**arguments))


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.001) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
