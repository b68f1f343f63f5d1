"""distsum's exception tree.

    DistsumError                 anything distsum raises that is not a plain misuse of an argument
    ├── WriterClosedError        a write to a writer after close()
    └── WriterError              the background writer thread failed (disk full, permissions);
                                 raised in the caller's thread at the next call

Bad arguments raise the built-in TypeError or ValueError, at the call that passed them, with a
message that names the tag and what was wrong.
"""

from __future__ import annotations

__all__ = ["DistsumError", "WriterClosedError", "WriterError"]


class DistsumError(Exception):
    """Base class of distsum's own errors."""


class WriterClosedError(DistsumError):
    """A write was attempted on a writer that has been closed."""


class WriterError(DistsumError):
    """The background writer failed; the original exception is the ``__cause__``."""
