"""Image summaries: check a user's image array, convert it to uint8 HWC pixels, encode PNG.

``prepare_images`` runs in the caller's thread and raises TypeError or ValueError naming the tag,
so a bad image fails at the call that logged it. It returns fresh arrays that share no memory with
the input: ``as_array`` hands back a view of a torch tensor's storage, and the training loop may
overwrite that tensor before the pixels are encoded.

Two ways to turn float pixels into bytes, chosen by the front end being imitated:

* ``scaling="unit"`` (distsum's own and torch's ``add_image``): floats must lie in [0, 1] and are
  mapped exactly as torch's ``torch.utils.tensorboard.summary.image`` does, so the decoded pixels
  match torch's byte for byte. Unlike torch, out-of-range values and NaN are refused rather than
  clipped silently, a grayscale image stays one channel instead of being repeated to RGB, and a
  batch comes back as separate images rather than tiled into one grid.
* ``scaling="tf1"`` (TF1's ``tf.summary.image``): each float image is rescaled on its own by the
  rule of TensorFlow's ``ImageSummary`` kernel (``core/kernels/summary_image_op.cc``), including
  its float32 arithmetic and truncation, and its default ``bad_color`` for non-finite pixels.
  Checked pixel for pixel against tensorflow-cpu 2.21 on x86 (random, constant, tiny, huge and
  non-finite float16/32/64 images).
"""

from __future__ import annotations

import io
import operator
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "DATAFORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_SIDE",
    "PNG_COMPRESS_LEVEL",
    "SCALINGS",
    "EncodedImage",
    "encode_png",
    "prepare_images",
]

# The layouts torch's add_image/add_images accept, spelled the same (case-sensitive).
DATAFORMATS = ("HW", "HWC", "CHW", "NHWC", "NCHW")
SCALINGS = ("unit", "tf1")
# Larger sides are almost always a transposed or flattened tensor, not a picture anyone will view.
MAX_IMAGE_SIDE = 16384
# Bound on the uint8 pixels one call may produce, so a mistake cannot exhaust the rank's memory
# (256 MiB: 8192 x 8192 RGBA, or about 1,780 RGB images of 224 x 224).
MAX_IMAGE_BYTES = 2**28
# PNG is lossless, so the level trades only CPU time for file size. Measured with Pillow 13 on
# 224x224 RGB: a smooth natural-looking image takes 3.8 ms at level 1 against 10.8 ms at Pillow's
# default 6 for 17% more bytes; noise does not compress at any level (4.5 ms either way); a plain
# gradient takes 0.65 ms against 0.83 ms. Level 0 (stored) is faster still but doubles the size.
PNG_COMPRESS_LEVEL = 1

_CHANNELS = (1, 3, 4)
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# TF's ImageSummary attr default: opaque red, cut to the image's depth (grayscale gets 255).
_TF1_BAD_COLOR = np.array([255, 0, 0, 255], dtype=np.uint8)
# TF's kZeroThreshold: below this the maximum counts as zero and every pixel maps to the offset.
_TF1_ZERO_THRESHOLD = np.float32(1e-6)


def prepare_images(
    array: np.ndarray,
    *,
    tag: str,
    dataformats: str,
    max_outputs: int | None = None,
    scaling: str = "unit",
) -> list[np.ndarray]:
    """Return the images in ``array`` as C-contiguous uint8 arrays of shape (H, W, C), C in {1, 3, 4}.

    ``dataformats`` names the axes of ``array``; a format without ``N`` is one image and one
    without ``C`` is grayscale. ``max_outputs`` keeps only the first images of a batch. uint8
    pixels pass through unchanged; float16/32/64 pixels are converted as ``scaling`` says (see the
    module docstring). Raises TypeError for other dtypes and ValueError for anything else wrong,
    naming the tag.
    """
    if not isinstance(dataformats, str) or dataformats not in DATAFORMATS:
        raise ValueError(
            f"dataformats for image tag {tag!r} must be one of {', '.join(DATAFORMATS)}; got {dataformats!r}"
        )
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ValueError(f"scaling for image tag {tag!r} must be 'unit' or 'tf1', got {scaling!r}")
    limit = _check_max_outputs(max_outputs, tag)
    if array.ndim != len(dataformats):
        raise ValueError(
            f"image for tag {tag!r} with dataformats {dataformats!r} must have {len(dataformats)} "
            f"dimensions, got shape {array.shape}"
        )
    dtype = array.dtype
    if dtype != np.uint8 and dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"image for tag {tag!r} must be uint8 or float16/32/64, got dtype {dtype}"
            + (" (floats in [0, 1] or uint8 in [0, 255] are expected)" if scaling == "unit" else "")
        )

    batch = _to_nhwc(array, dataformats)
    n, height, width, channels = batch.shape
    if channels not in _CHANNELS:
        raise ValueError(
            f"image for tag {tag!r} must have 1, 3 or 4 channels, got {channels} "
            f"(shape {array.shape}, dataformats {dataformats!r})"
        )
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"image for tag {tag!r} is empty: shape {array.shape}, dataformats {dataformats!r}")
    if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
        raise ValueError(
            f"image for tag {tag!r} is {height} x {width} pixels; each side must be at most "
            f"{MAX_IMAGE_SIDE} (shape {array.shape}, dataformats {dataformats!r})"
        )
    if limit is not None:
        batch = batch[:limit]
        n = batch.shape[0]
    total = n * height * width * channels
    if total > MAX_IMAGE_BYTES:
        raise ValueError(
            f"images for tag {tag!r} would take {total} bytes of pixels; at most {MAX_IMAGE_BYTES} "
            f"per call ({n} images of {height} x {width} x {channels})"
        )

    if dtype == np.uint8:
        # A copy, never a view: the caller's buffer may be reused before the PNG is encoded.
        pixels = np.array(batch, dtype=np.uint8, order="C", copy=True)
    elif scaling == "unit":
        pixels = _unit_to_uint8(batch, tag)
    else:
        return [_tf1_to_uint8(image) for image in batch]
    return list(pixels)


def _check_max_outputs(max_outputs: object, tag: str) -> int | None:
    if max_outputs is None:
        return None
    if isinstance(max_outputs, (bool, np.bool_)):
        raise TypeError(f"max_outputs for image tag {tag!r} must be an int, got {max_outputs!r}")
    try:
        limit = operator.index(max_outputs)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"max_outputs for image tag {tag!r} must be an int, got "
            f"{type(max_outputs).__name__} {max_outputs!r}"
        ) from None
    if limit < 1:
        raise ValueError(f"max_outputs for image tag {tag!r} must be positive, got {limit}")
    return limit


def _to_nhwc(array: np.ndarray, dataformats: str) -> np.ndarray:
    """Return a view of ``array`` with axes N, H, W, C, adding N and C of length 1 if missing."""
    axes = dataformats
    if "N" not in axes:
        array, axes = array[np.newaxis], "N" + axes
    if "C" not in axes:
        array, axes = array[..., np.newaxis], axes + "C"
    return array.transpose([axes.index(axis) for axis in "NHWC"])


def _unit_to_uint8(batch: np.ndarray, tag: str) -> np.ndarray:
    """Map floats in [0, 1] to uint8 with the same float32 operations as torch's summary.image."""
    low, high = batch.min(), batch.max()  # NaN propagates into both
    if np.isnan(low) or np.isnan(high):
        raise ValueError(f"image for tag {tag!r} contains NaN; float pixels must be in [0, 1]")
    if not (low >= 0 and high <= 1):
        raise ValueError(
            f"float image for tag {tag!r} must have values in [0, 1] (or be uint8 in [0, 255]); "
            f"found min {low} and max {high}"
        )
    # torch: tensor.astype(np.float32); (tensor * 255).clip(0, 255).astype(np.uint8). Converting
    # float64 to float32 first matters: it can round 0.99999999 up to 1.0 and so to 255.
    scaled = batch.astype(np.float32, order="C") * np.float32(255)
    return scaled.clip(0, 255).astype(np.uint8)


def _tf1_to_uint8(image: np.ndarray) -> np.ndarray:
    """Normalise one float HWC image as TF1's ImageSummary kernel does.

    Pixels (all channels of one position) that hold NaN or an infinity take no part in the
    minimum and maximum and are painted TF's default bad colour, red (255, 0, 0, 255) cut to the
    image's channels, so grayscale shows them white. Of the finite values, the minimum and
    maximum are taken as float32. If the minimum is not negative, scale = 255 / max and
    offset = 0; otherwise scale = 127 / max(|min|, |max|) and offset = 128. A maximum below 1e-6
    gives scale 0, so an all-zero image is black and a tiny mixed-sign one is gray 128. The scale
    is computed in float32 and then cast to the input dtype, ``x * scale + offset`` is evaluated
    in the input dtype (multiply, then add: no fused multiply-add) and truncated toward zero,
    which is why, say, a constant 7.0 comes out as 254 and a constant -11.0 as 0. A float16 image
    whose float16 scale overflows (maximum below about 0.0039) comes out black, as on TF's x86
    build.
    """
    dtype = image.dtype.type
    finite = np.isfinite(image).all(axis=-1)
    all_finite = bool(finite.all())
    values = image if all_finite else image[finite]
    if values.size:
        # float32 rounding is monotonic, so the float32 of the extreme is the extreme of the
        # float32 values. A float64 beyond float32's range becomes an infinity, as in TF.
        with np.errstate(over="ignore"):
            low, high = np.float32(values.min()), np.float32(values.max())
    else:  # nothing finite: TF's starting values, which lead to scale 0
        low, high = np.float32(np.inf), np.float32(-np.inf)
    if low < 0:
        max_abs = max(abs(low), abs(high))
        scale = np.float32(0) if max_abs < _TF1_ZERO_THRESHOLD else np.float32(127) / max_abs
        offset = np.float32(128)
    else:
        scale = np.float32(0) if high < _TF1_ZERO_THRESHOLD else np.float32(255) / high
        offset = np.float32(0)
    with np.errstate(over="ignore"):
        scale_t, offset_t = dtype(scale), dtype(offset)
    if np.isinf(scale_t):
        # Only float16 gets here: a maximum below 255/65504 makes the scale overflow to inf and
        # every product inf or NaN. Casting those to uint8 is undefined in C++ and platform-
        # dependent in numpy; TF's x86 build yields 0, so say 0 outright.
        pixels = np.zeros(image.shape, dtype=np.uint8)
    else:
        # Non-finite inputs turn into NaN or inf here and are overwritten just below.
        with np.errstate(invalid="ignore", over="ignore"):
            pixels = (image * scale_t + offset_t).astype(np.uint8, order="C")
    if not all_finite:
        pixels[~finite] = _TF1_BAD_COLOR[: image.shape[-1]]
    return pixels


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One PNG and the fields of TensorBoard's ``Summary.Image`` that describe it."""

    height: int
    width: int
    colorspace: int  # number of channels: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA
    png: bytes


_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def encode_png(image: np.ndarray) -> EncodedImage:
    """Encode a uint8 (H, W, C) array, C in 1..4, as PNG with Pillow."""
    if image.dtype != np.uint8:
        raise TypeError(f"encode_png needs uint8 pixels, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in _PIL_MODES:
        raise ValueError(f"encode_png needs shape (H, W, C) with C in 1..4, got {image.shape}")
    height, width, channels = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"encode_png needs a non-empty image, got shape {image.shape}")
    mode = _PIL_MODES[channels]
    # frombuffer with an explicit mode: Image.fromarray's mode argument is deprecated in Pillow 11.3.
    pil = Image.frombuffer(mode, (width, height), np.ascontiguousarray(image), "raw", mode, 0, 1)
    out = io.BytesIO()
    pil.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return EncodedImage(height=height, width=width, colorspace=channels, png=out.getvalue())
