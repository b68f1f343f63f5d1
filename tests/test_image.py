"""Tests for distsum._image: checking, converting and PNG-encoding image summaries."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from distsum._image import (
    DATAFORMATS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    EncodedImage,
    encode_png,
    prepare_images,
)
from distsum._validate import as_array

TAG = "layer/img"
H, W = 5, 7  # unequal so a swapped height and width cannot pass


def decode(png: bytes) -> np.ndarray:
    """Decode a PNG to an (H, W, C) uint8 array, C the number of channels stored."""
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image)
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels


def from_nhwc(batch: np.ndarray, dataformats: str) -> np.ndarray:
    """Lay out an (N, H, W, C) batch in ``dataformats``, dropping N and C where it has none."""
    if "N" not in dataformats:
        batch = batch[0]
    if "C" not in dataformats:
        batch = batch[..., 0]
    source = ("N" if "N" in dataformats else "") + "HW" + ("C" if "C" in dataformats else "")
    return batch.transpose([source.index(axis) for axis in dataformats])


def random_batch(n: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, channels), dtype=np.uint8)


FORMAT_CHANNELS = [(fmt, c) for fmt in DATAFORMATS for c in ((1,) if "C" not in fmt else (1, 3, 4))]


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize(("dataformats", "channels"), FORMAT_CHANNELS)
def test_every_format_and_channel_count_round_trips_through_png(dataformats, channels):
    expected = random_batch(3 if "N" in dataformats else 1, channels)
    images = prepare_images(from_nhwc(expected, dataformats), tag=TAG, dataformats=dataformats)

    assert len(images) == len(expected)
    for image, want in zip(images, expected, strict=True):
        assert image.dtype == np.uint8
        assert image.flags.c_contiguous
        assert image.shape == (H, W, channels)
        encoded = encode_png(image)
        assert isinstance(encoded, EncodedImage)
        assert (encoded.height, encoded.width, encoded.colorspace) == (H, W, channels)
        assert encoded.png.startswith(b"\x89PNG\r\n\x1a\n")
        np.testing.assert_array_equal(decode(encoded.png), want)


def test_float_input_round_trips_in_the_given_layout():
    batch = np.random.default_rng(1).random((2, 3, H, W), dtype=np.float32)  # NCHW
    images = prepare_images(batch, tag=TAG, dataformats="NCHW")
    for image, want in zip(images, batch, strict=True):
        expected = (want.transpose(1, 2, 0) * np.float32(255)).astype(np.uint8)
        np.testing.assert_array_equal(decode(encode_png(image).png), expected)


def test_encode_png_supports_gray_with_alpha():
    image = random_batch(1, 2)[0]
    encoded = encode_png(image)
    assert encoded.colorspace == 2
    with Image.open(io.BytesIO(encoded.png)) as decoded:
        assert decoded.mode == "LA"
    np.testing.assert_array_equal(decode(encoded.png), image)


def test_encode_png_accepts_a_non_contiguous_view():
    image = random_batch(1, 3)[0]
    view = image[:, ::-1]
    np.testing.assert_array_equal(decode(encode_png(view).png), view)


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (np.zeros((2, 2, 3), np.float32), TypeError),
        (np.zeros((2, 2), np.uint8), ValueError),
        (np.zeros((2, 2, 5), np.uint8), ValueError),
        (np.zeros((0, 2, 3), np.uint8), ValueError),
    ],
)
def test_encode_png_rejects_what_it_cannot_encode(image, error):
    with pytest.raises(error, match="encode_png"):
        encode_png(image)


def test_uint8_output_does_not_share_memory_with_the_input():
    batch = random_batch(2, 3)
    images = prepare_images(batch, tag=TAG, dataformats="NHWC")
    for image in images:
        assert not np.shares_memory(image, batch)
    before = [image.copy() for image in images]
    batch[:] = 0  # the training loop reuses its buffer
    for image, want in zip(images, before, strict=True):
        np.testing.assert_array_equal(image, want)


# --- max_outputs ------------------------------------------------------------------------------


def test_max_outputs_keeps_the_first_images():
    batch = random_batch(5, 3)
    images = prepare_images(batch, tag=TAG, dataformats="NHWC", max_outputs=2)
    assert len(images) == 2
    np.testing.assert_array_equal(np.stack(images), batch[:2])


def test_max_outputs_larger_than_the_batch_keeps_all():
    batch = random_batch(3, 1)
    images = prepare_images(from_nhwc(batch, "NCHW"), tag=TAG, dataformats="NCHW", max_outputs=10)
    np.testing.assert_array_equal(np.stack(images), batch)


def test_max_outputs_accepts_numpy_integers_and_applies_to_a_single_image():
    image = random_batch(1, 3)[0]
    images = prepare_images(image, tag=TAG, dataformats="HWC", max_outputs=np.int64(1))
    assert len(images) == 1
    np.testing.assert_array_equal(images[0], image)


def test_max_outputs_limits_the_values_checked_and_the_size_counted():
    batch = np.zeros((2, 3, H, W), np.float32)
    batch[1] = np.nan  # beyond max_outputs: never looked at
    (image,) = prepare_images(batch, tag=TAG, dataformats="NCHW", max_outputs=1)
    assert not image.any()


@pytest.mark.parametrize("dataformats", ["NHWC", "NCHW"])
def test_batch_of_one(dataformats):
    batch = random_batch(1, 4)
    images = prepare_images(from_nhwc(batch, dataformats), tag=TAG, dataformats=dataformats)
    assert len(images) == 1
    np.testing.assert_array_equal(images[0], batch[0])


# --- same pixels as torch ---------------------------------------------------------------------


def torch_pixels(tensor, dataformats: str) -> np.ndarray:
    """The pixels torch's SummaryWriter would store for ``tensor``, decoded from its PNG."""
    summary = pytest.importorskip("torch.utils.tensorboard.summary")
    value = summary.image(TAG, tensor, dataformats=dataformats).value[0]
    return decode(value.image.encoded_image_string)


def as_torch_would_show(images: list[np.ndarray], dataformats: str) -> np.ndarray:
    """Our images as torch lays them out: gray repeated to RGB; a batch tiled in one row."""
    shown = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    return np.concatenate(shown, axis=1) if "N" in dataformats else shown[0]


def torch_inputs():
    rng = np.random.default_rng(7)
    edges = np.array([0.0, 1.0, 0.5, 1 / 255, 254.5 / 255, 0.1, 0.2, 0.3, 0.7, 0.9999999, 0.99999999])
    cases = []
    # torch tiles a batch into a grid and cannot tile four channels, so RGBA is single-image only.
    for fmt, channels in FORMAT_CHANNELS:
        if "N" in fmt and channels == 4:
            continue
        n = 3 if "N" in fmt else 1
        nhwc_u8 = rng.integers(0, 256, (n, H, W, channels), dtype=np.uint8)
        nhwc_f = rng.random((n, H, W, channels))
        nhwc_f.flat[: edges.size] = edges
        cases.append((fmt, from_nhwc(nhwc_u8, fmt)))
        cases.append((fmt, from_nhwc(nhwc_f.astype(np.float32), fmt)))
        cases.append((fmt, from_nhwc(nhwc_f, fmt)))  # float64: torch rounds to float32 first
    cases.append(("CHW", from_nhwc(rng.random((1, H, W, 3)).astype(np.float16), "CHW")))
    return cases


@pytest.mark.parametrize(
    ("dataformats", "array"),
    torch_inputs(),
    ids=lambda v: v if isinstance(v, str) else f"{v.dtype}{'x'.join(map(str, v.shape))}",
)
def test_pixels_equal_torch_add_image(dataformats, array):
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    # The real path: the front end turns the tensor into numpy with as_array.
    ours = prepare_images(as_array(tensor, TAG, "image"), tag=TAG, dataformats=dataformats)
    np.testing.assert_array_equal(as_torch_would_show(ours, dataformats), torch_pixels(tensor, dataformats))


# --- TF1 scaling ------------------------------------------------------------------------------


def tf1(values, dtype=np.float32, channels: int = 1) -> np.ndarray:
    """Run one image of ``values`` (a row of pixels) through the TF1 rule; return its pixels."""
    image = np.asarray(values, dtype=dtype).reshape(1, -1, channels)
    (out,) = prepare_images(image, tag=TAG, dataformats="HWC", scaling="tf1")
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.shape == image.shape
    return out.reshape(-1, channels).squeeze(-1) if channels == 1 else out.reshape(-1, channels)


def test_tf1_all_non_negative_scales_the_maximum_to_255():
    # max 2 -> scale 127.5; 0.5 * 127.5 = 63.75 and 1 * 127.5 = 127.5 truncate.
    np.testing.assert_array_equal(tf1([0, 0.5, 1, 2]), [0, 63, 127, 255])


def test_tf1_mixed_sign_centres_zero_at_128():
    # max |x| 2 -> scale 63.5, offset 128: -2 -> 1, -1 -> 64.5, 0 -> 128, 1 -> 191.5.
    np.testing.assert_array_equal(tf1([-2, -1, 0, 1]), [1, 64, 128, 191])


def test_tf1_all_zero_is_black():
    np.testing.assert_array_equal(tf1([0, 0, 0]), [0, 0, 0])
    np.testing.assert_array_equal(tf1([-0.0, 0.0]), [0, 0])  # -0.0 is not negative


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (3.0, np.float32, 255),  # 255 / 3 = 85 exactly
        (0.25, np.float32, 255),
        (-2.0, np.float32, 1),  # -2 * 63.5 + 128
        # float32 rounding, then truncation: 7 * fl(255 / 7) = 254.99998, -11 * fl(127 / 11) + 128
        # = 0.9999924.
        (7.0, np.float32, 254),
        (-11.0, np.float32, 0),
        (7.0, np.float64, 254),  # scale from float32, product in float64: 254.9999885
        # float16 does the arithmetic in float16: fl16(0.9) * fl16(255 / fl16(0.9)) = 254.9.
        (0.9, np.float16, 254),
        (0.9, np.float32, 255),
    ],
)
def test_tf1_constant_image_uses_tf_float_arithmetic(value, dtype, expected):
    np.testing.assert_array_equal(tf1([value] * 4, dtype=dtype), [expected] * 4)


def test_tf1_maximum_below_the_zero_threshold_maps_to_the_offset():
    np.testing.assert_array_equal(tf1([1e-7, 5e-7]), [0, 0])
    np.testing.assert_array_equal(tf1([-1e-7, 5e-7]), [128, 128])


def test_tf1_float16_scale_overflow_is_black():
    # 255 / 0.002 = 127500 does not fit in float16; TF's x86 build writes zeros.
    np.testing.assert_array_equal(tf1([0.001, 0.002], dtype=np.float16), [0, 0])


def test_tf1_non_finite_pixels_get_the_bad_colour_and_are_ignored_for_the_range():
    rgb = tf1([[1, 2, 3], [np.nan, 0, 0], [0, np.inf, 0], [-np.inf, 1, 1]], channels=3)
    np.testing.assert_array_equal(rgb, [[85, 170, 255], [255, 0, 0], [255, 0, 0], [255, 0, 0]])
    rgba = tf1([[1, 1, 1, 1], [np.nan, 0, 0, 0]], channels=4)
    np.testing.assert_array_equal(rgba, [[255, 255, 255, 255], [255, 0, 0, 255]])
    # Grayscale takes the first entry of (255, 0, 0, 255); a negative only among bad pixels
    # does not switch to the mixed-sign rule.
    np.testing.assert_array_equal(tf1([2, np.nan, 1]), [255, 255, 127])
    np.testing.assert_array_equal(tf1([np.nan, np.inf]), [255, 255])


def test_tf1_float64_beyond_float32_range_is_handled_as_tf_does():
    # float32(1e300) is inf, so the scale is 255 / inf = 0.
    np.testing.assert_array_equal(tf1([1e300, 1.0], dtype=np.float64), [0, 0])


def test_tf1_normalises_each_image_of_a_batch_on_its_own():
    batch = np.array([[1.0, 2.0], [-4.0, 4.0]], np.float32).reshape(2, 1, 2, 1)
    images = prepare_images(batch, tag=TAG, dataformats="NHWC", scaling="tf1")
    np.testing.assert_array_equal(images[0].ravel(), [127, 255])
    np.testing.assert_array_equal(images[1].ravel(), [1, 255])


def test_tf1_passes_uint8_through():
    batch = random_batch(2, 3)
    images = prepare_images(batch, tag=TAG, dataformats="NHWC", scaling="tf1")
    np.testing.assert_array_equal(np.stack(images), batch)


def test_tf1_accepts_values_outside_unit_range():
    image = np.array([[[-5.0], [5.0]]], np.float32)
    with pytest.raises(ValueError, match="min -5"):
        prepare_images(image, tag=TAG, dataformats="HWC")
    (out,) = prepare_images(image, tag=TAG, dataformats="HWC", scaling="tf1")
    np.testing.assert_array_equal(out.ravel(), [1, 255])


# --- bad input --------------------------------------------------------------------------------

GOOD = np.zeros((3, H, W), np.float32)  # CHW


@pytest.mark.parametrize(
    ("array", "kwargs", "error", "match"),
    [
        # the format string
        (GOOD, {"dataformats": "chw"}, ValueError, "dataformats"),
        (GOOD, {"dataformats": "HCW"}, ValueError, "dataformats"),
        (GOOD, {"dataformats": "NCHWC"}, ValueError, "dataformats"),
        (GOOD, {"dataformats": ""}, ValueError, "dataformats"),
        (GOOD, {"dataformats": None}, ValueError, "dataformats"),
        # dimensions that do not match the format
        (GOOD, {"dataformats": "NCHW"}, ValueError, r"4 dimensions, got shape \(3, 5, 7\)"),
        (GOOD, {"dataformats": "HW"}, ValueError, "'HW' must have 2 dimensions"),
        (GOOD[0], {"dataformats": "CHW"}, ValueError, "3 dimensions"),
        (np.float32(0.5), {"dataformats": "HW"}, ValueError, "2 dimensions"),
        # channels
        (np.zeros((2, H, W), np.float32), {"dataformats": "CHW"}, ValueError, "1, 3 or 4 channels, got 2 "),
        (np.zeros((1, H, W, 5), np.uint8), {"dataformats": "NHWC"}, ValueError, "channels, got 5 "),
        (np.zeros((H, W, 0), np.uint8), {"dataformats": "HWC"}, ValueError, "channels, got 0 "),
        # empty
        (np.zeros((0, 3, H, W), np.uint8), {"dataformats": "NCHW"}, ValueError, "empty"),
        (np.zeros((0, W), np.uint8), {"dataformats": "HW"}, ValueError, "empty"),
        (np.zeros((H, 0, 1), np.uint8), {"dataformats": "HWC"}, ValueError, "empty"),
        # float values in unit mode
        (np.full((H, W), np.nan, np.float32), {"dataformats": "HW"}, ValueError, "NaN"),
        (np.full((H, W), np.inf), {"dataformats": "HW"}, ValueError, "max inf"),
        (np.full((H, W), 1.5, np.float16), {"dataformats": "HW"}, ValueError, "max 1.5"),
        (np.full((H, W), -0.25), {"dataformats": "HW"}, ValueError, r"min -0.25 and max -0.25"),
        (np.full((H, W), 255.0), {"dataformats": "HW"}, ValueError, r"\[0, 1\]"),
        # dtypes
        (np.zeros((H, W), bool), {"dataformats": "HW"}, TypeError, "dtype bool"),
        (np.zeros((H, W), np.complex64), {"dataformats": "HW"}, TypeError, "dtype complex64"),
        (np.zeros((H, W), np.int64), {"dataformats": "HW"}, TypeError, "dtype int64"),
        (np.zeros((H, W), np.int8), {"dataformats": "HW"}, TypeError, "dtype int8"),
        (np.zeros((H, W), np.uint16), {"dataformats": "HW"}, TypeError, "dtype uint16"),
        (np.zeros((H, W), object), {"dataformats": "HW"}, TypeError, "dtype object"),
        (np.zeros((H, W), np.int32), {"dataformats": "HW", "scaling": "tf1"}, TypeError, "int32"),
        # size
        (np.zeros((MAX_IMAGE_SIDE + 1, 1), np.uint8), {"dataformats": "HW"}, ValueError, "at most"),
        (np.zeros((1, MAX_IMAGE_SIDE + 1, 1), np.uint8), {"dataformats": "HWC"}, ValueError, "16384"),
        # max_outputs
        (GOOD, {"dataformats": "CHW", "max_outputs": 0}, ValueError, "max_outputs .* positive, got 0"),
        (GOOD, {"dataformats": "CHW", "max_outputs": -3}, ValueError, "positive, got -3"),
        (GOOD, {"dataformats": "CHW", "max_outputs": 2.0}, TypeError, "max_outputs .* float 2.0"),
        (GOOD, {"dataformats": "CHW", "max_outputs": "2"}, TypeError, "max_outputs"),
        (GOOD, {"dataformats": "CHW", "max_outputs": True}, TypeError, "max_outputs"),
        # scaling
        (GOOD, {"dataformats": "CHW", "scaling": "tf2"}, ValueError, "scaling"),
    ],
)
def test_bad_input_raises_naming_the_tag(array, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        prepare_images(array, tag=TAG, **kwargs)
    assert repr(TAG) in str(info.value)


def test_too_many_bytes_in_one_call_is_refused_before_any_copy():
    # A zero-stride view: the shape is huge, the memory is one byte.
    sides = (17, 4096, 4096, 1)
    assert np.prod(sides) > MAX_IMAGE_BYTES
    huge = np.broadcast_to(np.zeros((), np.uint8), sides)
    with pytest.raises(ValueError, match=rf"{TAG!r} would take .* at most {MAX_IMAGE_BYTES}"):
        prepare_images(huge, tag=TAG, dataformats="NHWC")
    # Within the bound once max_outputs trims the batch.
    images = prepare_images(huge, tag=TAG, dataformats="NHWC", max_outputs=1)
    assert images[0].shape == (4096, 4096, 1)


def test_as_array_and_prepare_images_reject_a_bool_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=repr(TAG)):
        prepare_images(
            as_array(torch.zeros(3, H, W, dtype=torch.bool), TAG, "image"), tag=TAG, dataformats="CHW"
        )
