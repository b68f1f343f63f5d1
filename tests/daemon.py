"""The standalone aggregator as the tests run it: a real ``distsum.aggregator`` process."""

from __future__ import annotations

import signal
import subprocess
import sys


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
