"""The ``distsum`` command: ``distsum keygen DIR [--name NAME]``.

The aggregator's own command is ``distsum-aggregator`` (``distsum/aggregator.py``).
"""

from __future__ import annotations

import argparse
import sys

from distsum._errors import DistsumError
from distsum._security import generate

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsum")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser(
        "keygen",
        help="write a CURVE key pair",
        description="Write NAME.key (the public key, to hand out) and NAME.key_secret (keep it) in DIR. "
        "The aggregator takes its secret file (--curve-secret) and a directory of the ranks' "
        "public files (--curve-clients); a rank takes its secret file and the aggregator's public one.",
    )
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="distsum")
    args = parser.parse_args(argv)
    try:
        public, secret = generate(args.directory, args.name)
    except (OSError, DistsumError) as e:
        print(f"distsum keygen: {e}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
