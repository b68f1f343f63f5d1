"""distsum.SummaryWriter, read back by every TensorBoard reader and compared with torch's writer."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

import distsum
from distsum._histogram import BUCKET_LIMITS, Histogram
from tests.tbreaders import (
    acc_histograms,
    acc_hparams,
    acc_images,
    acc_scalars,
    acc_tags,
    acc_text,
    accumulate,
    read_events,
    tbparse_read,
)

STEPS = range(5)
LOSS = [2.5, 1.25, math.nan, math.inf, 0.125]
RNG = np.random.default_rng(7)
WEIGHTS = [RNG.normal(0, 1 + s, size=1000).astype(np.float32) for s in STEPS]
PICTURE = RNG.integers(0, 256, size=(3, 16, 24), dtype=np.uint8)  # CHW
FLOAT_PICTURE = RNG.random((10, 12, 3), dtype=np.float32)  # HWC in [0, 1)
BATCH = RNG.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)  # NCHW


def write_everything(writer) -> None:
    """The same calls for distsum's and torch's SummaryWriter."""
    for step in STEPS:
        writer.add_scalar("loss", LOSS[step], step)
        writer.add_scalar("lr", np.float64(0.1 / (step + 1)), step)
        writer.add_histogram("weights", WEIGHTS[step], step)
    writer.add_image("picture", PICTURE, 3)
    writer.add_image("float_picture", FLOAT_PICTURE, 3, dataformats="HWC")
    writer.add_images("batch", BATCH, 4)
    writer.add_text("notes", "**bold** move", 2)
    writer.add_scalars("split", {"a": 1.0, "b": 2.0}, 1)
    writer.add_hparams({"lr": 0.1, "optimizer": "sgd", "nesterov": True}, {"hp/acc": 0.75}, run_name="hp")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def float32(x: float) -> float:
    return float(np.float32(x))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def tiled(batch: np.ndarray) -> np.ndarray:
    """The NCHW batch laid out side by side, as an RGB image."""
    return np.concatenate([image.transpose(1, 2, 0) for image in batch], axis=1)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary_writer")
    with distsum.SummaryWriter(root / "run") as writer:
        write_everything(writer)
    return root


def test_files_and_runs(logdir):
    run = logdir / "run"
    assert sorted(p for p in os.listdir(run) if not (run / p).is_dir()) == [
        n for n in os.listdir(run) if "tfevents" in n
    ]
    assert sorted(p for p in os.listdir(run) if (run / p).is_dir()) == ["hp", "split_a", "split_b"]
    events = read_events(run)  # every CRC checked
    assert events[0].file_version == "brain.Event:2"


def test_python_loader(logdir):
    acc = accumulate(logdir / "run")
    assert all(same(v, float32(LOSS[s])) for s, v in acc_scalars(acc, "loss"))
    assert [s for s, _ in acc_scalars(acc, "loss")] == list(STEPS)
    assert acc_scalars(acc, "lr") == [(s, float32(0.1 / (s + 1))) for s in STEPS]
    for step, rows in acc_histograms(acc, "weights"):
        expected = Histogram.from_values(WEIGHTS[step], tag="w")
        assert rows[:, 2].sum() == 1000
        np.testing.assert_allclose(rows, expected.rows().astype(np.float32))
    ((step, (png,)),) = acc_images(acc, "picture")
    assert step == 3
    np.testing.assert_array_equal(pixels(png), PICTURE.transpose(1, 2, 0))
    ((_, (png,)),) = acc_images(acc, "float_picture")
    np.testing.assert_array_equal(pixels(png), (FLOAT_PICTURE * 255).astype(np.uint8))
    ((_, (png,)),) = acc_images(acc, "batch")
    np.testing.assert_array_equal(pixels(png), tiled(BATCH))
    assert acc_text(acc, "notes") == [(2, "**bold** move")]
    assert acc_scalars(accumulate(logdir / "run" / "split_a"), "split") == [(1, 1.0)]
    assert acc_scalars(accumulate(logdir / "run" / "split_b"), "split") == [(1, 2.0)]
    hp = accumulate(logdir / "run" / "hp")
    assert acc_hparams(hp) == {"lr": 0.1, "optimizer": "sgd", "nesterov": True}
    assert acc_scalars(hp, "hp/acc") == [(0, 0.75)]
    assert "hp/acc" in acc_tags(hp)


def test_tensorboard_server(logdir, tensorboard_server, load_fast):
    server = tensorboard_server(logdir, load_fast=load_fast)
    server.wait_for(server.runs, lambda runs: {"run", "run/hp", "run/split_a"} <= set(runs))
    loss = server.wait_for(lambda: server.scalars("run", "loss"), lambda r: len(r) == 5)
    assert all(same(v, float32(LOSS[s])) for s, v in loss)
    assert server.scalars("run/split_b", "split") == [(1, 2.0)]
    histograms = server.wait_for(lambda: server.histograms("run", "weights"), lambda r: len(r) == 5)
    for step, buckets in histograms:
        expected = Histogram.from_values(WEIGHTS[step], tag="w").rows()
        got = np.array(buckets)
        assert got[:, 2].sum() == 1000
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    ((step, png),) = server.wait_for(lambda: server.images("run", "picture"))
    assert step == 3
    np.testing.assert_array_equal(pixels(png), PICTURE.transpose(1, 2, 0))
    ((_, png),) = server.images("run", "batch")
    np.testing.assert_array_equal(pixels(png), tiled(BATCH))
    ((step, html),) = server.wait_for(lambda: server.text("run", "notes"))
    assert step == 2 and "<strong>bold</strong> move" in html
    experiment = server.wait_for(server.hparams_experiment, lambda e: e.get("hparamInfos"))
    assert sorted(h["name"] for h in experiment["hparamInfos"]) == ["lr", "nesterov", "optimizer"]


def test_tbparse(logdir):
    frames = tbparse_read(logdir / "run")
    loss = frames.scalars[(frames.scalars.tag == "loss") & (frames.scalars.dir_name == "")]
    assert list(loss.step) == list(STEPS)
    assert all(same(v, float32(LOSS[s])) for s, v in zip(loss.step, loss.value, strict=True))
    weights = frames.tensors[frames.tensors.tag == "weights"]
    assert list(weights.step) == list(STEPS)
    for step, rows in zip(weights.step, weights.value, strict=True):
        np.testing.assert_array_equal(rows, Histogram.from_values(WEIGHTS[step], tag="w").rows())
    assert list(frames.text[frames.text.tag == "notes"].value) == ["**bold** move"]
    assert dict(zip(frames.hparams.tag, frames.hparams.value, strict=True)) == {
        "lr": 0.1,
        "optimizer": "sgd",
        "nesterov": True,
    }


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    root = tmp_path_factory.mktemp("side_by_side")
    with distsum.SummaryWriter(root / "distsum") as writer:
        write_everything(writer)
    writer = torch_tb.SummaryWriter(str(root / "torch"))
    write_everything(writer)
    writer.close()
    return root


def mass_below(buckets: np.ndarray, edge: float) -> float:
    """Count of values below ``edge``, from [left, right, count] rows whose edges include ``edge``.

    The Python loader serves legacy histograms (torch's) in float32, so edges match to 1e-6; the
    grid's edges are 10% apart.
    """
    return float(buckets[buckets[:, 1] <= edge + abs(edge) * 1e-6, 2].sum())


def test_same_as_torch(side_by_side, tensorboard_server, load_fast):
    server = tensorboard_server(side_by_side, load_fast=load_fast)
    server.wait_for(server.runs, lambda runs: {"distsum", "torch"} <= set(runs))
    for tag in ("loss", "lr"):
        ours = server.wait_for(lambda t=tag: server.scalars("distsum", t), lambda r: len(r) == 5)
        theirs = server.wait_for(lambda t=tag: server.scalars("torch", t), lambda r: len(r) == 5)
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        assert all(same(a, b) for (_, a), (_, b) in zip(ours, theirs, strict=True))
    assert server.scalars("distsum/split_a", "split") == server.scalars("torch/split_a", "split")
    for tag in ("picture", "float_picture", "batch"):
        ((s1, ours),) = server.wait_for(lambda t=tag: server.images("distsum", t))
        ((s2, theirs),) = server.wait_for(lambda t=tag: server.images("torch", t))
        assert s1 == s2
        np.testing.assert_array_equal(pixels(ours), pixels(theirs))
    ours = server.wait_for(lambda: server.histograms("distsum", "weights"), lambda r: len(r) == 5)
    theirs = server.wait_for(lambda: server.histograms("torch", "weights"), lambda r: len(r) == 5)
    for (step, a), (_, b) in zip(ours, theirs, strict=True):
        a, b = np.array(a), np.array(b)
        assert a[0, 0] == pytest.approx(b[0, 0]) == WEIGHTS[step].min()  # min
        assert a[-1, 1] == pytest.approx(b[-1, 1]) == WEIGHTS[step].max()  # max
        assert a[:, 2].sum() == b[:, 2].sum() == 1000
        # The same mass below every edge both writers share: TF1's grid, inside the data's range.
        edges = BUCKET_LIMITS[(BUCKET_LIMITS > a[0, 0]) & (BUCKET_LIMITS < a[-1, 1])]
        for edge in edges:
            assert mass_below(a, edge) == mass_below(b, edge), (step, edge)


def test_purge_step_resumes_a_run_in_both_loaders(tmp_path, tensorboard_server, load_fast):
    with distsum.SummaryWriter(tmp_path / "run") as writer:
        for step in range(10):
            writer.add_scalar("loss", step, step)
    # A restart from the checkpoint at step 5: steps 5.. are logged again with new values.
    with distsum.SummaryWriter(tmp_path / "run", purge_step=5) as writer:
        for step in range(5, 8):
            writer.add_scalar("loss", 100 + step, step)
    expected = [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]
    server = tensorboard_server(tmp_path, load_fast=load_fast)
    got = server.wait_for(lambda: server.scalars("run", "loss"), lambda r: len(r) >= 8)
    assert got == expected


def test_default_log_dir_is_torchs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with distsum.SummaryWriter(comment="_x") as writer:
        assert writer.get_logdir().startswith("runs" + os.sep)
        assert writer.log_dir.endswith("_x")
    assert os.listdir(tmp_path / writer.log_dir)


def test_flush_makes_data_visible_and_close_is_idempotent(tmp_path):
    writer = distsum.SummaryWriter(tmp_path, flush_secs=3600)
    writer.add_scalar("a", 1.0, 0)
    writer.flush()
    assert acc_scalars(accumulate(tmp_path), "a") == [(0, 1.0)]
    writer.close()
    writer.close()
    with pytest.raises(distsum.WriterClosedError):
        writer.add_scalar("a", 2.0, 1)


class Tensorish:
    """Quacks like a one-element torch tensor, without torch."""

    def __init__(self, value):
        self.value = value

    def numel(self):
        return 1

    def item(self):
        return self.value


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w: w.add_scalar("", 1.0, 0), ValueError, "empty"),
        (lambda w: w.add_scalar(3, 1.0, 0), TypeError, "tag must be a str"),
        (lambda w: w.add_scalar("t\x00", 1.0, 0), ValueError, "NUL"),
        (lambda w: w.add_scalar("bad", "1.0", 0), TypeError, "'bad'"),
        (lambda w: w.add_scalar("bad", [1.0, 2.0], 0), TypeError, "'bad'"),
        (lambda w: w.add_scalar("bad", np.ones(2), 0), ValueError, "'bad'.*one element"),
        (lambda w: w.add_scalar("bad", 1.0 + 2j, 0), TypeError, "'bad'"),
        (lambda w: w.add_scalar("bad", 1.0, -1), ValueError, "step for tag 'bad'"),
        (lambda w: w.add_scalar("bad", 1.0, 1.5), TypeError, "step for tag 'bad'"),
        (lambda w: w.add_scalar("bad", 1.0, 2**63), ValueError, "'bad'"),
        (lambda w: w.add_scalar("bad", 1.0, 0, walltime=math.nan), ValueError, "walltime for tag 'bad'"),
        (lambda w: w.add_histogram("bad", np.array(["a"]), 0), TypeError, "'bad'"),
        (lambda w: w.add_histogram("bad", np.ones(3, dtype=bool), 0), TypeError, "'bad'"),
        (lambda w: w.add_image("bad", np.zeros((3, 4, 4), np.int64), 0), TypeError, "'bad'"),
        (lambda w: w.add_image("bad", np.full((3, 4, 4), 2.0), 0), ValueError, "'bad'"),
        (lambda w: w.add_image("bad", np.zeros((2, 4, 4), np.uint8), 0), ValueError, "'bad'"),
        (lambda w: w.add_image("bad", np.zeros((4, 4), np.uint8), 0), ValueError, "'bad'"),
        (lambda w: w.add_image("bad", np.zeros((1, 3, 4, 4), np.uint8), 0), ValueError, "'bad'"),
        (lambda w: w.add_images("bad", np.zeros((0, 3, 4, 4), np.uint8), 0), ValueError, "'bad'"),
        (lambda w: w.add_text("bad", b"bytes", 0), TypeError, "'bad'"),
        (lambda w: w.add_scalars("bad", [1.0], 0), TypeError, "'bad'"),
        (lambda w: w.add_scalars("bad", {"../x": 1.0}, 0), ValueError, "'bad'"),
        (lambda w: w.add_hparams({"lr": [1]}, {"m": 1.0}), TypeError, "'lr'"),
        (lambda w: w.add_hparams({"lr": 1.0}, {"m": 1.0}, run_name="../out"), ValueError, "run"),
    ],
)
def test_bad_input_is_an_error_at_the_call_and_loses_nothing(tmp_path, call, error, match):
    with distsum.SummaryWriter(tmp_path) as writer:
        writer.add_scalar("before", 1.0, 0)
        with pytest.raises(error, match=match):
            call(writer)
        writer.add_scalar("after", Tensorish(2.0), 1)
    acc = accumulate(tmp_path)
    assert acc_scalars(acc, "before") == [(0, 1.0)]
    assert acc_scalars(acc, "after") == [(1, 2.0)]
    assert sorted(os.listdir(tmp_path)) == [n for n in os.listdir(tmp_path) if "tfevents" in n]
