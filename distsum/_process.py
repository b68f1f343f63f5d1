"""Whether a process is still there, for the parts that outlive or clean up after others."""

from __future__ import annotations

import os

__all__ = ["alive"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but there
    return True
