"""The standalone aggregator as the tests run it: a real ``distsum.aggregator`` process."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator

import distsum


def start_daemon(logdir, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start it on ``logdir`` with the command-line ``args``; the process and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distsum.aggregator", "--logdir", str(logdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("distsum-aggregator listening on "), line + proc.stderr.read()
    return proc, line.split()[3].rstrip(",")


def stop_daemon(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, as a user's Ctrl-C or service manager would; its exit status and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def kill_daemon(proc: subprocess.Popen[str]) -> None:
    """SIGKILL, as a crash would: the aggregator writes nothing more."""
    proc.kill()
    proc.communicate()


@contextlib.contextmanager
def rank_of_a_daemon(tmp_path: pathlib.Path, **options: object) -> Iterator[pathlib.Path]:
    """A standalone aggregator on ``tmp_path/runs`` and this process as rank 0 of 1 of its run
    "job", with ``options`` for ``distsum.init``; yields the run's directory. On the way out
    finishes (bounded) and checks that the aggregator stopped cleanly."""
    addr = f"ipc://{tmp_path}/agg.sock"
    proc, _ = start_daemon(tmp_path / "runs", "--bind", addr)
    try:
        distsum.init(0, 1, addr=addr, run="job", **options)
        try:
            yield tmp_path / "runs" / "job"
        finally:
            distsum.finish(5)
    finally:
        assert stop_daemon(proc)[0] == 0
