"""distsum.summary, the eager tf.compat.v1.summary front end, read back by TensorBoard's readers."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto import summary_pb2 as tb_summary_pb2

import distsum
from distsum import summary
from distsum._histogram import Histogram
from tests.tbreaders import (
    acc_histograms,
    acc_images,
    acc_scalars,
    acc_tags,
    acc_text,
    accumulate,
    read_events,
    tbparse_read,
)


@pytest.fixture(autouse=True)
def empty_collections():
    summary.merge_all()
    yield
    summary.merge_all()


def test_summaries_are_returned_at_once_and_serialize_like_protos():
    s = summary.scalar("loss", 0.5)
    assert s.tags == ["loss"]
    proto = tb_summary_pb2.Summary.FromString(s.SerializeToString())
    assert proto.value[0].tag == "loss" and proto.value[0].simple_value == 0.5
    assert summary.scalar("x", 1, family="fam").tags == ["fam/x"]


def test_merge_all_takes_what_was_created_since_the_last_merge_all():
    summary.scalar("a", 1.0)
    summary.histogram("h", [1.0, 2.0])
    merged = summary.merge_all()
    assert merged.tags == ["a", "h"]
    assert summary.merge_all() is None
    summary.scalar("b", 2.0, collections=["other"])
    assert summary.merge_all() is None
    assert summary.merge_all("other").tags == ["b"]
    summary.scalar("train/x", 1.0)
    summary.scalar("test/x", 1.0)
    assert summary.merge_all(scope="train").tags == ["train/x"]
    summary.scalar("a", 1.0)
    summary.scalar("a", 2.0)
    (item,) = summary.merge_all().items
    assert item.value == 2.0


def test_merge_keeps_order_rejects_duplicates_and_takes_bytes():
    a, b = summary.scalar("a", 1.0), summary.scalar("b", 2.0)
    assert summary.merge([b, a.SerializeToString()]).tags == ["b", "a"]
    with pytest.raises(ValueError, match="duplicate tag 'a'"):
        summary.merge([a, a])
    with pytest.raises(TypeError, match="Summary"):
        summary.merge([1.5])
    with pytest.raises(ValueError, match="not a serialized Summary"):
        summary.merge([b"\xff\xff\xff"])


def test_image_tags_follow_tf1():
    batch = np.zeros((2, 4, 4, 3), np.float32)
    assert summary.image("im", batch, max_outputs=1).tags == ["im/image"]
    assert summary.image("im", batch, max_outputs=3).tags == ["im/image/0", "im/image/1"]


def test_file_writer_writes_every_kind(tmp_path, tensorboard_server, load_fast):
    rng = np.random.default_rng(3)
    weights = rng.normal(size=500)
    images = rng.random((2, 5, 6, 1)).astype(np.float32) * 4 - 1  # TF1 scales these
    with summary.FileWriter(tmp_path / "train", graph=b"\x0a\x03\x0a\x01x") as writer:
        assert writer.get_logdir() == str(tmp_path / "train")
        for step in range(3):
            summary.scalar("loss", 1.0 / (step + 1))
            summary.histogram("weights", weights + step)
            writer.add_summary(summary.merge_all(), step)
        writer.add_summary(summary.image("conv", images, max_outputs=2), 2)
        writer.add_summary(summary.text("note", "hello *there*").SerializeToString(), 2)
        foreign = tb_summary_pb2.Summary()
        foreign.value.add(tag="foreign", simple_value=7.0)
        writer.add_summary(foreign, 3)
    events = read_events(tmp_path / "train")
    assert [e.graph_def for e in events if e.graph_def] == [b"\x0a\x03\x0a\x01x"]
    acc = accumulate(tmp_path / "train")
    assert acc_scalars(acc, "loss") == [(s, float(np.float32(1.0 / (s + 1)))) for s in range(3)]
    assert acc_scalars(acc, "foreign") == [(3, 7.0)]
    for step, rows in acc_histograms(acc, "weights"):
        np.testing.assert_allclose(rows, Histogram.from_values(weights + step, tag="w").rows(), rtol=1e-6)
    for i in range(2):
        ((step, (png,)),) = acc_images(acc, f"conv/image/{i}")
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        # TF1: mixed signs are centred at 128 and scaled by 127 / max|x|.
        x = images[i, :, :, 0]
        np.testing.assert_array_equal(pixels, (x * np.float32(127 / np.abs(x).max()) + 128).astype(np.uint8))
    assert acc_text(acc, "note") == [(2, "hello *there*")]
    assert "weights" in acc_tags(acc, "histograms")

    server = tensorboard_server(tmp_path, load_fast=load_fast)
    loss = server.wait_for(lambda: server.scalars("train", "loss"), lambda r: len(r) == 3)
    assert [s for s, _ in loss] == [0, 1, 2]
    hist = server.wait_for(lambda: server.histograms("train", "weights"), lambda r: len(r) == 3)
    assert [sum(b[2] for b in buckets) for _, buckets in hist] == [500, 500, 500]
    assert server.wait_for(lambda: server.image_tags().get("train")) == {"conv/image/0": 1, "conv/image/1": 1}
    ((_, html),) = server.wait_for(lambda: server.text("train", "note"))
    assert "<em>there</em>" in html


def test_reopen_starts_a_new_file_and_close_is_idempotent(tmp_path):
    writer = summary.FileWriter(tmp_path)
    writer.add_summary(summary.scalar("a", 1.0), 0)
    writer.close()
    writer.close()
    with pytest.raises(distsum.WriterClosedError):
        writer.add_summary(summary.scalar("a", 2.0), 1)
    writer.reopen()
    writer.add_summary(summary.scalar("a", 2.0), 1)
    writer.flush()
    writer.close()
    files = sorted(n for n in os.listdir(tmp_path) if "tfevents" in n)
    assert len(files) == 2
    assert acc_scalars(accumulate(tmp_path), "a") == [(0, 1.0), (1, 2.0)]
    frames = tbparse_read(tmp_path)
    assert list(frames.scalars.value) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: summary.scalar("bad", "x"), TypeError, "'bad'"),
        (lambda: summary.scalar("", 1.0), ValueError, "empty"),
        (lambda: summary.histogram("bad", object()), TypeError, "'bad'"),
        (lambda: summary.image("bad", np.zeros((4, 4, 3), np.uint8)), ValueError, "'bad'"),
        (lambda: summary.image("bad", np.zeros((1, 4, 4, 2), np.uint8)), ValueError, "'bad'"),
        (lambda: summary.image("bad", np.zeros((1, 4, 4, 3), np.uint8), max_outputs=0), ValueError, "'bad'"),
        (lambda: summary.text("bad", 5), TypeError, "'bad'"),
        (lambda: summary.text("bad", b"\xff"), ValueError, "'bad'"),
    ],
)
def test_bad_input_is_an_error_at_the_call_and_loses_nothing(tmp_path, call, error, match):
    with summary.FileWriter(tmp_path) as writer:
        writer.add_summary(summary.scalar("before", 1.0, collections=[]), 0)
        with pytest.raises(error, match=match):
            call()
        with pytest.raises(ValueError, match="step"):
            writer.add_summary(summary.scalar("x", 1.0), -3)
        writer.add_summary(summary.merge_all(), 1)
    acc = accumulate(tmp_path)
    assert acc_scalars(acc, "before") == [(0, 1.0)]
    assert acc_scalars(acc, "x") == [(1, 1.0)]
