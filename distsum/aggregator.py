"""``distsum-aggregator``: the daemon that merges every rank's records into one run per job.

    distsum-aggregator --logdir DIR [--bind ADDR] [--world-size N] [--flush-secs S]
                       [--step-timeout S] [--step-settle S] [--rank-timeout S]

Every flag can also be set from the environment (``DISTSUM_LOGDIR``, ``DISTSUM_BIND``,
``DISTSUM_WORLD_SIZE``, ``DISTSUM_FLUSH_SECS``, ``DISTSUM_STEP_TIMEOUT``, ``DISTSUM_STEP_SETTLE``,
``DISTSUM_RANK_TIMEOUT``);
a flag wins over the environment. It binds to loopback unless told otherwise, prints the address
it listens on, and on SIGINT or SIGTERM writes out everything it holds and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys

from distsum._aggregator import Aggregator, AggregatorOptions, install_signal_handlers
from distsum._errors import DistsumError
from distsum._security import ServerKeys

__all__ = ["main"]


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory of large arrays for reuse; whether it could.

    The merger's arrays are megabytes each and short-lived. By default glibc maps each one afresh
    and unmaps it when freed, or trims the heap's top once tens of megabytes are free there, so
    every round faults its pages in again (several microseconds a page on a VM). Kept, they cost
    the aggregator at most the trim threshold over what it holds.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))


# The flags' defaults are the options' own.
_DEFAULTS = AggregatorOptions(logdir="")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsum-aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default=_env("DISTSUM_LOGDIR"), help="root directory of the runs")
    parser.add_argument("--bind", default=_env("DISTSUM_BIND", _DEFAULTS.bind))
    parser.add_argument("--world-size", type=int, default=_env("DISTSUM_WORLD_SIZE"))
    parser.add_argument(
        "--flush-secs", type=float, default=_env("DISTSUM_FLUSH_SECS", str(_DEFAULTS.flush_secs))
    )
    parser.add_argument(
        "--step-timeout", type=float, default=_env("DISTSUM_STEP_TIMEOUT", str(_DEFAULTS.step_timeout))
    )
    parser.add_argument(
        "--step-settle",
        type=float,
        default=_env("DISTSUM_STEP_SETTLE", str(_DEFAULTS.step_settle)),
        help="write a step every rank has reached once it has had no record for this long",
    )
    parser.add_argument(
        "--rank-timeout", type=float, default=_env("DISTSUM_RANK_TIMEOUT", str(_DEFAULTS.rank_timeout))
    )
    parser.add_argument(
        "--curve-secret",
        default=_env("DISTSUM_CURVE_SECRET"),
        help="the aggregator's secret key file (distsum keygen); requires --curve-clients",
    )
    parser.add_argument(
        "--curve-clients",
        default=_env("DISTSUM_CURVE_CLIENTS"),
        help="directory of the public key files of the ranks allowed to connect",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=_env("DISTSUM_INSECURE", "") not in ("", "0"),
        help="listen beyond loopback without authentication",
    )
    parser.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.logdir:
        parser.error("--logdir (or DISTSUM_LOGDIR) is required")
    if bool(args.curve_secret) != bool(args.curve_clients):
        parser.error("--curve-secret and --curve-clients go together")
    keys = ServerKeys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    logging.basicConfig(level=logging.INFO, format="distsum-aggregator: %(message)s")
    _keep_freed_memory()
    try:
        aggregator = Aggregator(
            AggregatorOptions(
                logdir=args.logdir,
                bind=args.bind,
                world_size=args.world_size,
                step_timeout=args.step_timeout,
                step_settle=args.step_settle,
                flush_secs=args.flush_secs,
                rank_timeout=args.rank_timeout,
                embedded=args.embedded,
                parent_pid=args.parent_pid,
                keys=keys,
                insecure=args.insecure,
            )
        )
    except (OSError, ValueError, DistsumError) as e:
        print(f"distsum-aggregator: {e}", file=sys.stderr)
        return 2
    install_signal_handlers(aggregator)
    print(f"distsum-aggregator listening on {aggregator.address}, writing to {aggregator.root}", flush=True)
    aggregator.serve()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written, fsynced and closed: skip the interpreter's teardown, which would add
    # tens of milliseconds to every job's finish() on rank 0.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
