"""The read-back harness: what torch's SummaryWriter wrote comes back exactly, from every reader."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Sized
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from tests.tbreaders import (
    CorruptEventFileError,
    PurgeDetectedError,
    TensorBoardHTTPError,
    TensorBoardServer,
    TensorBoardServerError,
    acc_histograms,
    acc_hparams,
    acc_images,
    acc_scalars,
    acc_tags,
    acc_tensors,
    acc_text,
    accumulate,
    event_files,
    live_process_group_members,
    poll_until,
    read_events,
    read_records,
    scalars_from_events,
    tbparse_read,
)

# What the fixture log directory holds, written with torch.utils.tensorboard.SummaryWriter.
SCALARS = {
    "loss": [(s, 1.0 / (s + 1)) for s in range(5)],
    "acc/top1": [(s, 0.1 * s) for s in range(5)],
}
HIST_STEP = 3
HIST_VALUES = np.random.default_rng(0).normal(size=200)
IMAGE_STEP = 2
PIXELS = np.random.default_rng(1).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # HWC
TEXT_STEP = 1
TEXT = "hello **distsum** text"
HP_RUN = "hp"
HPARAMS = {"lr": 0.1, "opt": "sgd", "layers": 3}
HP_METRICS = {"hparam/acc": 0.9}
# A run and a tag that need URL encoding: space, "/", "+", "&", "=", "?".
ODD_RUN = "odd run+1"
ODD_TAG = "x/y z+&=?"
ODD_SCALARS = [(s, 2.5 * s) for s in range(3)]
# A TF2-style [k, 3] histogram, written with TensorBoard's own numpy summary op.
TF2_RUN = "tf2"
TF2_STEP = 7
TF2_BUCKETS = 4
RUNS = sorted([".", HP_RUN, ODD_RUN, TF2_RUN])


def f32(x: float) -> float:
    """``x`` rounded to float32, as every reader returns scalars."""
    return float(np.float32(x))


def f32_series(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, f32(v)) for step, v in points]


def has_len(n: int, sized: Sized) -> bool:
    return len(sized) == n


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def write_records(path: Path, events: list[event_pb2.Event]) -> list[bytes]:
    """Write ``events`` with TensorBoard's own RecordWriter; return the serialized payloads."""
    payloads = [e.SerializeToString() for e in events]
    writer = RecordWriter(open(path, "wb"))  # noqa: SIM115 - RecordWriter.close() closes it
    for p in payloads:
        writer.write(p)
    writer.close()
    return payloads


def scalar_event(tag: str, step: int, value: float) -> event_pb2.Event:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=1_700_000_000.0 + step, step=step, summary=summary)


VERSION_EVENT = event_pb2.Event(wall_time=1_700_000_000.0, file_version="brain.Event:2")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("logdir")
    writer = SummaryWriter(str(root))
    for tag, points in SCALARS.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.add_histogram("weights", HIST_VALUES, HIST_STEP)
    writer.add_image("pic", PIXELS, IMAGE_STEP, dataformats="HWC")
    writer.add_text("note", TEXT, TEXT_STEP)
    writer.add_hparams(HPARAMS, HP_METRICS, run_name=HP_RUN)
    writer.close()

    odd = SummaryWriter(str(root / ODD_RUN))
    for step, value in ODD_SCALARS:
        odd.add_scalar(ODD_TAG, value, step)
    odd.close()

    (root / TF2_RUN).mkdir()
    hist = histogram_summary.histogram_pb("tf2hist", HIST_VALUES, buckets=TF2_BUCKETS)
    write_records(
        root / TF2_RUN / "events.out.tfevents.0000000001.host.1.00000",
        [VERSION_EVENT, event_pb2.Event(wall_time=1_700_000_001.0, step=TF2_STEP, summary=hist)],
    )
    return root


@pytest.fixture(scope="module")
def written_histogram(logdir: Path) -> summary_pb2.HistogramProto:
    """The legacy HistogramProto torch wrote for "weights"."""
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.tag == "weights":
                return value.histo
    raise AssertionError("no 'weights' histogram in the file")


def assert_histogram_shown(
    buckets: np.ndarray | list[list[float]], proto: summary_pb2.HistogramProto
) -> None:
    """``[[left, right, count], ...]`` shows ``proto``: same non-empty buckets, same range, same total.

    The loaders convert a legacy proto differently (Python trims empty end buckets and rounds edges
    to float32; Rust keeps them and stays float64), so only the non-empty buckets are compared.
    """
    rows = np.asarray(buckets, dtype=np.float64)
    shown = rows[rows[:, 2] > 0]
    limits, counts = np.asarray(proto.bucket_limit), np.asarray(proto.bucket)
    nonzero = counts > 0
    assert shown[:, 2].tolist() == counts[nonzero].tolist()
    # Right edges are the proto's bucket limits, except the last, which is the proto's max.
    np.testing.assert_allclose(shown[:-1, 1], limits[nonzero][:-1], rtol=1e-6)
    np.testing.assert_allclose(shown[-1, 1], proto.max, rtol=1e-6)
    np.testing.assert_allclose(rows[0, 0], proto.min, rtol=1e-6)
    assert rows[:, 2].sum() == proto.num == len(HIST_VALUES)


def test_torch_wrote_the_histogram_of_the_data(written_histogram: summary_pb2.HistogramProto) -> None:
    assert written_histogram.num == len(HIST_VALUES)
    assert written_histogram.min == HIST_VALUES.min()
    assert written_histogram.max == HIST_VALUES.max()


# ---- read_events / read_records -----------------------------------------------------------------


def test_read_events_returns_every_event_of_the_run(logdir: Path) -> None:
    files = event_files(logdir)
    assert len(files) == 1  # subdirectories are other runs
    events = read_events(logdir)
    assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in read_events(files[0])]
    assert events[0].file_version == "brain.Event:2"
    assert scalars_from_events(events) == {tag: f32_series(points) for tag, points in SCALARS.items()}

    by_tag = {v.tag: (e.step, v) for e in events for v in e.summary.value}
    step, image = by_tag["pic"]
    assert step == IMAGE_STEP
    assert (image.image.height, image.image.width) == PIXELS.shape[:2]
    np.testing.assert_array_equal(decode_png(image.image.encoded_image_string), PIXELS)
    step, text = by_tag["note/text_summary"]
    assert (step, text.tensor.string_val) == (TEXT_STEP, [TEXT.encode()])
    assert by_tag["weights"][0] == HIST_STEP


def test_read_events_reads_a_run_directory_in_lexicographic_order(tmp_path: Path) -> None:
    # "10" sorts before "9": the order is by name, as TensorBoard's DirectoryWatcher reads them.
    write_records(tmp_path / "events.out.tfevents.9.host", [scalar_event("x", 9, 9.0)])
    write_records(tmp_path / "events.out.tfevents.10.host", [scalar_event("x", 10, 10.0)])
    write_records(tmp_path / "events.out.tfevents.5.host.profile-empty", [scalar_event("x", 5, 5.0)])
    (tmp_path / "notes.txt").write_text("not an event file")
    (tmp_path / "sub").mkdir()
    write_records(tmp_path / "sub" / "events.out.tfevents.1.host", [scalar_event("x", 1, 1.0)])

    assert [os.path.basename(f) for f in event_files(tmp_path)] == [
        "events.out.tfevents.10.host",
        "events.out.tfevents.9.host",
    ]
    assert [e.step for e in read_events(tmp_path)] == [10, 9]


def test_the_record_reader_uses_masked_crc32c() -> None:
    # Golden vector from TensorBoard's Rust data server tests (tensorboard/data/server/masked_crc.rs).
    assert masked_crc32c(b"\x1a\x11CRC test, one two") == 0x5794D08A


@pytest.fixture
def three_record_file(tmp_path: Path) -> tuple[Path, list[bytes]]:
    path = tmp_path / "events.out.tfevents.0000000001.host.1.00000"
    payloads = write_records(path, [VERSION_EVENT, scalar_event("x", 0, 0.5), scalar_event("x", 1, 1.5)])
    return path, payloads


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("part", "where", "reason"),
    [
        ("length", lambda n: 0, "header crc32"),
        ("length CRC", lambda n: 9, "header crc32"),
        # Byte 3 is inside the wall_time double: the payload still parses, only the CRC can tell.
        ("payload", lambda n: 12 + 3, "event crc32"),
        ("data CRC", lambda n: 12 + n + 1, "event crc32"),
    ],
)
def test_read_events_detects_a_flipped_byte(three_record_file, part, where, reason) -> None:
    path, payloads = three_record_file
    start = 16 + len(payloads[0])  # corrupt the second record
    assert payloads[1][0] == 0x09  # field 1 (wall_time), fixed64: bytes 1..8 are the double
    flip_byte(path, start + where(len(payloads[1])))

    with pytest.raises(CorruptEventFileError, match=reason) as info:
        read_events(path)
    assert (info.value.path, info.value.index, info.value.offset) == (str(path), 1, start)
    with pytest.raises(CorruptEventFileError):
        read_records(path.parent)


def test_tensorboards_own_loader_silently_stops_at_a_corrupt_record(three_record_file) -> None:
    """Why the harness does not use EventFileLoader: it swallows the DataLossError."""
    path, payloads = three_record_file
    flip_byte(path, 16 + len(payloads[0]) + 12 + 3)
    loaded = list(event_file_loader.RawEventFileLoader(str(path)).Load())
    assert loaded == payloads[:1]  # no error, just a short file
    with pytest.raises(CorruptEventFileError):
        accumulate(path.parent)
    with pytest.raises(CorruptEventFileError):
        tbparse_read(path.parent)


def test_truncated_tail_is_an_error_unless_allowed(three_record_file) -> None:
    path, payloads = three_record_file
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the last record loses its data CRC and a payload byte
    with pytest.raises(CorruptEventFileError, match="truncated") as info:
        read_events(path)
    assert info.value.index == 2
    assert [e.SerializeToString() for e in read_events(path, allow_truncated_tail=True)] == payloads[:2]


def test_a_payload_that_is_not_an_event_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.host"
    write_records(path, [VERSION_EVENT])
    with open(path, "ab") as f:
        RecordWriter(f).write(b"\xff\xff\xff")  # CRCs right, payload garbage
    with pytest.raises(CorruptEventFileError, match="not an Event") as info:
        read_events(path)
    assert info.value.index == 1


# ---- accumulate (the --load_fast=false loader) --------------------------------------------------


def test_accumulate_returns_what_the_python_loader_keeps(logdir: Path, written_histogram) -> None:
    acc = accumulate(logdir)
    assert acc_tags(acc, "scalars") == sorted(SCALARS)
    for tag, points in SCALARS.items():
        assert acc_scalars(acc, tag) == f32_series(points)
    assert acc_tags(acc, "histograms") == ["weights"]
    [(step, buckets)] = acc_histograms(acc, "weights")
    assert step == HIST_STEP
    assert buckets.dtype == np.float32  # data_compat converts legacy histograms to float32
    assert_histogram_shown(buckets, written_histogram)
    assert acc_tags(acc, "images") == ["pic"]
    [(step, pngs)] = acc_images(acc, "pic")
    assert step == IMAGE_STEP
    assert len(pngs) == 1
    np.testing.assert_array_equal(decode_png(pngs[0]), PIXELS)
    assert acc_tags(acc, "text") == ["note/text_summary"]
    assert acc_text(acc, "note/text_summary") == [(TEXT_STEP, TEXT)]
    assert acc_tags(acc, "no-such-plugin") == []

    hp = accumulate(logdir / HP_RUN)
    assert acc_hparams(hp) == {k: (float(v) if isinstance(v, int) else v) for k, v in HPARAMS.items()}
    assert acc_scalars(hp, "hparam/acc") == [(0, f32(0.9))]

    tf2 = accumulate(logdir / TF2_RUN)
    [(step, tensor)] = acc_tensors(tf2, "tf2hist")
    assert step == TF2_STEP
    assert tensor.shape == (TF2_BUCKETS, 3)
    assert tensor[:, 2].sum() == len(HIST_VALUES)


def test_accumulate_reports_a_purge(tmp_path: Path) -> None:
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    events = [VERSION_EVENT, event_pb2.Event(step=0, session_log=start)]
    events += [scalar_event("x", s, float(s)) for s in range(6)]
    events += [event_pb2.Event(step=3, session_log=start)]  # a second START purges steps >= 3
    events += [scalar_event("x", s, 10.0 * s) for s in (3, 4)]
    write_records(tmp_path / "events.out.tfevents.1.host", events)

    with pytest.raises(PurgeDetectedError, match="Purging 3 expired"):
        accumulate(tmp_path)
    acc = accumulate(tmp_path, allow_purge=True)
    assert acc_scalars(acc, "x") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


# ---- tbparse ------------------------------------------------------------------------------------


def test_tbparse_reads_the_same_values(logdir: Path, written_histogram) -> None:
    frames = tbparse_read(logdir)
    scalars = frames.scalars
    for tag, points in SCALARS.items():
        rows = scalars[(scalars.dir_name == "") & (scalars.tag == tag)]
        assert list(zip(rows.step, rows.value.map(float), strict=True)) == f32_series(points)
    odd = scalars[scalars.dir_name == ODD_RUN]
    assert set(odd.tag) == {ODD_TAG}
    assert list(zip(odd.step, odd.value.map(float), strict=True)) == f32_series(ODD_SCALARS)
    assert list(scalars[scalars.dir_name == HP_RUN].value.map(float)) == [f32(0.9)]

    [hist] = frames.histograms.itertuples()
    assert (hist.tag, hist.step) == ("weights", HIST_STEP)
    assert list(hist.counts) == list(written_histogram.bucket)
    np.testing.assert_allclose(hist.limits, written_histogram.bucket_limit)

    # The TF2 [k, 3] histogram is a tensor to tbparse (TensorFlow is not installed).
    assert "tf2hist" not in set(frames.histograms.tag)
    [tf2] = frames.tensors[frames.tensors.tag == "tf2hist"].itertuples()
    assert (tf2.dir_name, tf2.step, np.asarray(tf2.value).shape) == (TF2_RUN, TF2_STEP, (TF2_BUCKETS, 3))

    assert list(zip(frames.text.tag, frames.text.step, frames.text.value, strict=True)) == [
        ("note", TEXT_STEP, TEXT)  # "/text_summary" stripped
    ]
    hparams = dict(zip(frames.hparams.tag, frames.hparams.value, strict=True))
    assert hparams == {k: (float(v) if isinstance(v, int) else v) for k, v in HPARAMS.items()}


def test_tbparse_cannot_read_images_without_tensorflow(logdir: Path) -> None:
    import tbparse

    with pytest.raises(ModuleNotFoundError, match="tensorflow"):
        tbparse.SummaryReader(str(logdir), event_types={"images"})


# ---- poll_until ---------------------------------------------------------------------------------


def test_poll_until_returns_the_first_good_value() -> None:
    values: Iterator[int | Exception] = iter([0, ValueError("not yet"), 2, 3])

    def fetch() -> int:
        v = next(values)
        if isinstance(v, Exception):
            raise v
        return v

    assert poll_until(fetch, lambda v: v >= 2, interval=0.001, retry_on=(ValueError,)) == 2


def test_poll_until_times_out_with_what_it_last_saw() -> None:
    with pytest.raises(TimeoutError, match=r"the answer: .* last seen: \[41\]"):
        poll_until(lambda: [41], lambda v: v == [42], timeout=0.05, interval=0.01, what="the answer")


# ---- the real TensorBoard server ----------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["load_fast", "load_slow"])
def server(request: pytest.FixtureRequest, logdir: Path):
    with TensorBoardServer(logdir, load_fast=request.param) as srv:
        yield srv


@pytest.mark.tensorboard_server
class TestServer:
    def test_loader_and_runs(self, server: TensorBoardServer) -> None:
        provider = server.environment()["debug"]["data_provider"]
        assert provider.startswith("GrpcDataProvider(" if server.load_fast else "MultiplexerDataProvider(")
        runs = server.wait_for(server.runs, lambda runs: len(runs) == len(RUNS))
        assert sorted(runs) == RUNS

    def test_scalars(self, server: TensorBoardServer) -> None:
        tags = server.wait_for(server.scalar_tags, lambda t: len(t) == 3)
        assert tags == {".": sorted(SCALARS), HP_RUN: ["hparam/acc"], ODD_RUN: [ODD_TAG]}
        for tag, points in SCALARS.items():
            shown = server.wait_for(
                functools.partial(server.scalars, ".", tag), functools.partial(has_len, len(points))
            )
            assert shown == f32_series(points)
        assert server.scalars(ODD_RUN, ODD_TAG) == f32_series(ODD_SCALARS)
        with pytest.raises(TensorBoardHTTPError) as info:
            server.scalars(".", "no-such-tag")
        assert info.value.status == 404

    def test_histograms(self, server: TensorBoardServer, written_histogram) -> None:
        tags = server.wait_for(server.histogram_tags, lambda t: len(t) == 2)
        assert tags == {".": ["weights"], TF2_RUN: ["tf2hist"]}
        [(step, buckets)] = server.wait_for(lambda: server.histograms(".", "weights"))
        assert step == HIST_STEP
        assert_histogram_shown(buckets, written_histogram)
        [(step, tf2)] = server.wait_for(lambda: server.histograms(TF2_RUN, "tf2hist"))
        assert step == TF2_STEP
        assert len(tf2) == TF2_BUCKETS
        assert sum(count for _l, _r, count in tf2) == len(HIST_VALUES)

    def test_images(self, server: TensorBoardServer) -> None:
        assert server.wait_for(server.image_tags) == {".": {"pic": 1}}
        [(step, png)] = server.wait_for(lambda: server.images(".", "pic"))
        assert step == IMAGE_STEP
        np.testing.assert_array_equal(decode_png(png), PIXELS)

    def test_text(self, server: TensorBoardServer) -> None:
        assert server.wait_for(server.text_tags) == {".": ["note/text_summary"]}
        [(step, html)] = server.wait_for(lambda: server.text(".", "note/text_summary"))
        assert step == TEXT_STEP
        assert "hello <strong>distsum</strong> text" in html  # Markdown rendered

    def test_hparams(self, server: TensorBoardServer) -> None:
        experiment = server.wait_for(server.hparams_experiment, lambda e: e.get("hparamInfos"))
        assert sorted(h["name"] for h in experiment["hparamInfos"]) == sorted(HPARAMS)
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(HP_METRICS)
        [group] = server.hparams_session_groups()["sessionGroups"]
        assert group["name"] == HP_RUN
        assert group["hparams"] == HPARAMS
        assert [(m["name"]["tag"], m["value"]) for m in group["metricValues"]] == [("hparam/acc", f32(0.9))]


@pytest.mark.tensorboard_server
def test_server_follows_new_data_and_leaves_no_process(
    tensorboard_server, load_fast: bool, tmp_path: Path
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    server = tensorboard_server(tmp_path, load_fast=load_fast)
    assert server.runs() == []
    processes = server.processes()
    names = [cmd for _pid, cmd in processes]
    assert any("tensorboard.main" in c for c in names)
    assert any("tensorboard_data_server" in c for c in names) == load_fast

    writer = SummaryWriter(str(tmp_path / "live"))
    for step in range(3):
        writer.add_scalar("y", step / 3, step)
    writer.close()
    shown = server.wait_for(lambda: server.scalars("live", "y"), lambda p: len(p) == 3)
    assert shown == [(s, f32(s / 3)) for s in range(3)]

    server.close()
    server.close()  # idempotent
    # TensorBoard and its data server share the process group; none of it may be left running.
    assert live_process_group_members(server.pid) == []


@pytest.mark.tensorboard_server
def test_server_startup_failure_reports_tensorboards_output(tmp_path: Path) -> None:
    server = TensorBoardServer(tmp_path, extra_args=["--no_such_flag_for_tensorboard"])
    with pytest.raises(
        TensorBoardServerError, match=r"(?s)exited with status .*no_such_flag_for_tensorboard"
    ):
        server.start()
    assert live_process_group_members(server.pid) == []


@pytest.mark.tensorboard_server
def test_server_refuses_the_wrong_loader(tmp_path: Path) -> None:
    # argparse keeps the last value, so this TensorBoard runs the Python loader despite load_fast=True.
    server = TensorBoardServer(tmp_path, load_fast=True, extra_args=["--load_fast=false"])
    with pytest.raises(TensorBoardServerError, match="MultiplexerDataProvider"):
        server.start()
    assert live_process_group_members(server.pid) == []
