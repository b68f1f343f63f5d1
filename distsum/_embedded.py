"""The embedded aggregator: rank 0 runs it as a child process, and starts it again if it dies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from distsum._security import is_local

__all__ = ["EmbeddedAggregator"]

log = logging.getLogger("distsum")


class EmbeddedAggregator:
    """``python -m distsum.aggregator`` for one job's run, watched from a thread of rank 0."""

    def __init__(
        self, run_dir: str, bind: str, world_size: int | None, step_timeout: float, rank_timeout: float
    ) -> None:
        self.run_dir = run_dir
        self._command = [
            sys.executable,
            "-m",
            "distsum.aggregator",
            "--logdir",
            run_dir,
            "--bind",
            bind,
            "--step-timeout",
            str(step_timeout),
            "--rank-timeout",
            str(rank_timeout),
            "--embedded",
            "--parent-pid",
            str(os.getpid()),
        ]
        if world_size:
            self._command += ["--world-size", str(world_size)]
        if not is_local(bind):
            # A job on several machines: rank 0's aggregator trusts the job's network as torch's
            # own rendezvous store does. A standalone aggregator with CURVE keys authenticates.
            self._command.append("--insecure")
        os.makedirs(run_dir, exist_ok=True)
        self.restarts = 0
        self._process = self._start()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._finishing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="distsum-embedded", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _start(self) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C meant for the training job must not cut the aggregator off
        # before the ranks' last records are written; it exits when the job is done. Its log
        # goes beside the run's event files, out of the training job's terminal.
        with open(os.path.join(self.run_dir, "distsum-aggregator.log"), "ab") as log_file:
            return subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )

    def _watch(self) -> None:
        while True:
            # Blocks until the child exits: finish() learns at once that it is done.
            code = self._process.wait()
            with self._lock:
                if self._stopping.is_set():
                    return
                if code == 0 and self._finishing.is_set():
                    return  # the job is done and everything is written
                # Killed or crashed, even while the job finishes: the ranks keep what it had not
                # acknowledged as durable and resend it; the new one reads back what the old one
                # wrote and takes the streams where they were.
                log.warning("distsum: the embedded aggregator exited (code %s); starting it again", code)
                self._process = self._start()
                self.restarts += 1

    def finishing(self) -> None:
        """The job is finishing: an exit with status 0 from now on is the end, not a crash."""
        self._finishing.set()

    def wait(self, timeout: float | None) -> bool:
        """Wait until it has written everything and exited; after ``timeout``, stop it (SIGTERM,
        on which it writes out everything it holds) and return False."""
        self._finishing.set()
        self._watcher.join(timeout)
        if not self._watcher.is_alive():
            return True
        log.warning(
            "distsum: the embedded aggregator has not finished within finish()'s time; stopping it "
            "(it writes out what it holds first; its log: %s)",
            os.path.join(self.run_dir, "distsum-aggregator.log"),
        )
        with self._lock:  # not while the watcher starts a new one
            self._stopping.set()
            self._process.terminate()
        self._watcher.join()
        self._process.wait()
        return False
