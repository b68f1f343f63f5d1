"""Where the time goes: py-spy over the scenarios where distsum misses a target.

    .venv/bin/pip install py-spy
    PYTHONPATH=scripts .venv/bin/python -m bench_lib.profile [SCENARIO ...]  # SCENARIOS, breakdown

Each scenario runs under ``py-spy record --subprocesses --threads`` (so the sender thread and the
aggregator process are sampled too) and is summarised per process and thread: the functions
that hold the most samples, by their own time ("self") and including what they call ("total").
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SCENARIOS = {
    # The training-thread loop of target 1, long enough to sample.
    "scalar": ("calls", "scalar_calls", {"lib": "distsum", "n": 300_000, "repeats": 3}),
    "e2e": ("calls", "scalar_e2e", {"lib": "distsum", "n": 300_000, "repeats": 1}),
    "histogram": ("calls", "histogram", {"lib": "distsum", "size": 1_000_000, "calls": 30, "repeats": 3}),
    "image": ("calls", "image", {"lib": "distsum", "calls": 30, "repeats": 3}),
    "aggregator": (
        "loadgen",
        "capacity",
        # Batches as a client sends them at target 5's rate; then 62 times smaller ones.
        {"ranks": 8, "tags": 100, "steps": 10000, "steps_per_batch": 625, "check": False},
    ),
    "aggregator_small_batches": (
        "loadgen",
        "capacity",
        {"ranks": 8, "tags": 100, "steps": 4000, "steps_per_batch": 10, "check": False},
    ),
    # Target 6's job, distsum's blocks only (and no logging's, which the overhead is taken from).
    "job": (
        "ddp",
        "job",
        {"world": 4, "steps": 300, "warmup": 10, "repeats": 1, "modes": ["none", "distsum"]},
    ),
}


# py-spy's raw lines: "process N:"<command>";" for each process from the root down to the one
# sampled (a command line may hold ';' itself), "thread (N): name", then the frames (none for a
# thread sampled outside Python code).
_PROCESS = re.compile(r'process (\d+):"(.*?)";(?=process \d+:|thread \()')
_THREAD = re.compile(r"thread \((\w+)\)(?::\s*([^;]*))?(?:;|$)")


def _frames(line: str) -> tuple[str, str, list[str], int]:
    stack, _, count = line.rpartition(" ")
    process = thread = ""
    at = 0
    while match := _PROCESS.match(stack, at):
        process = f"process {match[1]}: {match[2][:70]}"
        at = match.end()
    if match := _THREAD.match(stack, at):
        thread = f"thread {match[2] or match[1]}"
        at = match.end()
    frames = [re.sub(r" \((.*?)(:\d+)?\)$", r" (\1)", part) for part in stack[at:].split(";") if part]
    return process, thread, frames, int(count)


def summarise(raw: str, top: int = 12) -> str:
    groups: dict[tuple[str, str], dict[str, collections.Counter[str]]] = {}
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        process, thread, frames, count = _frames(line)
        if not frames:
            continue
        key = (process, thread)
        group = groups.setdefault(key, {"self": collections.Counter(), "total": collections.Counter()})
        group["self"][frames[-1]] += count
        for frame in set(frames):
            group["total"][frame] += count
        totals[key] += count
    out = []
    for key, n in totals.most_common():
        if n < 20:
            continue
        process, thread = key
        out.append(f"\n== {process or 'main process'} {thread}: {n} samples")
        for kind in ("self", "total"):
            out.append(f"  by {kind}:")
            for frame, c in groups[key][kind].most_common(top):
                out.append(f"    {c / n:6.1%}  {frame}")
    return "\n".join(out)


def breakdown(n: int = 100_000, repeats: int = 5) -> str:
    """What one ``distsum.scalar()`` call is made of, timed piece by piece in this process."""
    import gc
    import statistics
    import time
    import timeit

    import distsum
    from distsum import _api

    def per_call(function: object, number: int = 200_000) -> float:
        return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]

    from distsum._client import pack_row

    queue = bytearray()
    row = pack_row(1, 2, 0.5)
    by_tag = {f"metric/{j:04d}": j for j in range(100)}

    def append() -> None:
        nonlocal queue
        queue += row

    rows = [
        ("time.time() (scalar() no longer calls it)", per_call(time.time)),
        ("dict lookup of a tag", per_call(lambda: by_tag["metric/0042"])),
        ("pack_row(series, step, value)", per_call(lambda: pack_row(1, 2, 0.5))),
        ("bytearray += 20 bytes", per_call(append)),
    ]
    tags = [f"metric/{j:04d}" for j in range(100)]
    logdir = tempfile.mkdtemp(prefix="bench-breakdown-")
    try:
        # The sender thread idle (it wakes only every 1000 s), so the calls run alone.
        distsum.init(0, 1, logdir=logdir, batch_interval=1000.0, heartbeat=1000.0)
        client = _api._state.client

        def loop(step0: int) -> float:
            start = time.perf_counter()
            for step in range(step0, step0 + n // 100):
                for tag in tags:
                    distsum.scalar(tag, 0.5, step)
            elapsed = (time.perf_counter() - start) / n * 1e6
            client._queue.clear()
            return elapsed

        idle = [loop(1 + r * n) for r in range(repeats)]
        gc.disable()
        no_gc = [loop(1 + (repeats + r) * n) for r in range(repeats)]
        gc.enable()
        rows.append((f"scalar() in a loop of {n:,}, sender idle (median)", statistics.median(idle)))
        rows.append(("... the same with the garbage collector off", statistics.median(no_gc)))
        distsum.finish(2)  # the idle sender never reads the last acknowledgement: returns False
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    lines = ["### breakdown: the pieces of one distsum.scalar() call, µs (best of 5 unless noted)"]
    lines += [f"  {what:<55} {value:.3f}" for what, value in rows]
    return "\n".join(lines)


def profile(name: str, rate: int = 250) -> str:
    module, function, kwargs = SCENARIOS[name]
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    out = tempfile.mktemp(prefix=f"bench-profile-{name}-", suffix=".txt")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        py_spy, "record", "--subprocesses", "--threads", "--nolineno", "-r", str(rate),
        "-f", "raw", "-o", out, "--",
        sys.executable, "-m", f"bench_lib.{module}", function, json.dumps(kwargs),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if not os.path.exists(out):
        raise SystemExit(f"py-spy failed:\n{result.stderr[-2000:]}")
    with open(out) as f:
        raw = f.read()
    os.unlink(out)
    measured = [line for line in result.stdout.splitlines() if line.startswith("@@RESULT")]
    return f"### {name}: {module}.{function}({kwargs})\n{measured[-1] if measured else ''}\n" + summarise(raw)


if __name__ == "__main__":
    for scenario in sys.argv[1:] or [*SCENARIOS, "breakdown"]:
        print(breakdown() if scenario == "breakdown" else profile(scenario), flush=True)
