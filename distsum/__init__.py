"""distsum: one TensorBoard run from every rank of a distributed training job."""

from __future__ import annotations

from distsum._errors import DistsumError, WriterClosedError, WriterError

__all__ = ["DistsumError", "WriterClosedError", "WriterError"]
