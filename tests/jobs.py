"""Rank processes as the tests run them: what a failed job has to say."""

from __future__ import annotations

import os
from typing import Any


def failures(errors: Any, run_dir: str) -> str:
    """Every rank's error from the ``errors`` queue, and the embedded aggregator's log in
    ``run_dir``: the message of an assertion that the job went well."""
    lines = []
    while not errors.empty():
        lines.append(errors.get())
    log = os.path.join(run_dir, "distsum-aggregator.log")
    if os.path.exists(log):
        with open(log) as f:
            lines.append(f"{log}:\n{f.read()}")
    return "\n".join(lines)
