"""Checks on what a user passes in: tags, steps, scalar values and arrays.

Every check runs in the caller's thread and raises TypeError or ValueError naming the tag, so a
mistake surfaces at the line that made it and nothing already logged is touched.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

# A tag becomes a key in TensorBoard's UI and URLs, not a path; it may contain '/'.
MAX_TAG_LENGTH = 1024
# Steps are int64 on disk.
MAX_STEP = 2**63 - 1


def check_tag(tag: object) -> str:
    """Return ``tag`` if it is a usable tag, else raise TypeError/ValueError."""
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str, got {type(tag).__name__} {tag!r}")
    if not tag:
        raise ValueError("tag must not be empty")
    if len(tag) > MAX_TAG_LENGTH:
        raise ValueError(f"tag {tag[:40]!r}... is {len(tag)} characters; at most {MAX_TAG_LENGTH}")
    if "\x00" in tag:
        raise ValueError(f"tag {tag!r} contains a NUL character")
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"tag {tag!r} is not valid Unicode text: {e.reason}") from None
    return tag


def check_step(step: object, tag: str) -> int:
    """Return ``step`` as a Python int in [0, 2**63), else raise TypeError/ValueError."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        index = getattr(step, "__index__", None)
        if index is None or isinstance(step, (bool, np.bool_)):
            raise TypeError(f"step for tag {tag!r} must be an integer, got {type(step).__name__} {step!r}")
        step = index()
    value = int(step)  # type: ignore[call-overload]
    if not 0 <= value <= MAX_STEP:
        raise ValueError(f"step for tag {tag!r} must be in [0, 2**63), got {value}")
    return value


def as_scalar(value: object, tag: str) -> float:
    """Return ``value`` as a float: numbers, numpy scalars, 0-d or 1-element arrays, torch tensors.

    NaN and infinities are values like any other and pass through.
    """
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes, bool, np.bool_, complex, np.complexfloating)):
        raise TypeError(f"scalar value for tag {tag!r} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(
                f"scalar value for tag {tag!r} must hold exactly one element, got shape {value.shape}"
            )
        if value.dtype.kind not in "iuf":
            raise TypeError(f"scalar value for tag {tag!r} must be a real number, got dtype {value.dtype}")
        return float(value.reshape(()))
    item = getattr(value, "item", None)
    if callable(item):
        # torch tensors and similar: .item() raises for more than one element.
        numel = getattr(value, "numel", None)
        if callable(numel) and numel() != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise ValueError(f"scalar value for tag {tag!r} must hold exactly one element, got shape {shape}")
        return as_scalar(item(), tag)
    if hasattr(value, "__float__"):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise TypeError(f"scalar value for tag {tag!r} is not a real number: {e}") from None
    raise TypeError(
        f"scalar value for tag {tag!r} must be a real number, got {type(value).__name__} {value!r}"
    )


def as_array(value: Any, tag: str, what: str) -> np.ndarray:
    """Return ``value`` as a numpy array without copying when possible.

    Accepts numpy arrays, nested sequences, and tensors of frameworks that expose ``.numpy()``
    (torch, detached and moved to the CPU first) without importing them.
    """
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} for tag {tag!r} must be an array of numbers, got {value!r}")
    detach = getattr(value, "detach", None)
    if callable(detach):
        value = detach()
        cpu = getattr(value, "cpu", None)
        if callable(cpu):
            value = cpu()
    to_numpy = getattr(value, "numpy", None)
    if callable(to_numpy):
        try:
            return np.asarray(to_numpy())
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{what} for tag {tag!r} could not be converted to numpy: {e}") from None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} for tag {tag!r} is not an array of numbers: {e}") from None
    if array.dtype == object:
        raise TypeError(f"{what} for tag {tag!r} is not an array of numbers: {value!r:.80}")
    return array
