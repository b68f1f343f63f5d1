"""distsum: one TensorBoard run from every rank of a distributed training job.

The public API is what ``__all__`` lists; every other module is internal (its name starts with
an underscore) and may change without notice.
"""

from __future__ import annotations

from distsum import summary
from distsum._api import Writer, finish, flush, histogram, image, init, scalar, text, writer
from distsum._errors import DistsumError, WriterClosedError, WriterError
from distsum._writer import SummaryWriter

__all__ = [
    "DistsumError",
    "SummaryWriter",
    "Writer",
    "WriterClosedError",
    "WriterError",
    "finish",
    "flush",
    "histogram",
    "image",
    "init",
    "scalar",
    "summary",
    "text",
    "writer",
]
