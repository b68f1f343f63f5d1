"""The event-file layer: framing, naming, the background writer, and failures on disk."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2 as tb_event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c

from distsum._errors import WriterClosedError
from distsum._eventfile import EventFile, EventWriter, frame, masked_crc32c
from distsum._proto import event_pb2


def parse_records(data: bytes) -> list[bytes]:
    """A strict reader: every record whole, both CRCs right, no trailing bytes."""
    records, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert length_crc == masked_crc32c(header)
        payload = data[offset + 12 : offset + 12 + length]
        assert len(payload) == length
        (data_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert data_crc == masked_crc32c(payload)
        records.append(payload)
        offset += 16 + length
    return records


def read_file_events(path: str) -> list[tb_event_pb2.Event]:
    with open(path, "rb") as f:
        return [tb_event_pb2.Event.FromString(p) for p in parse_records(f.read())]


def event_files(logdir) -> list[str]:
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n)


# Golden vectors from files TensorFlow wrote (the format fact sheet, section 1).
def test_masked_crc_golden_vector():
    assert masked_crc32c(b"\x1a\x11CRC test, one two") == 0x5794D08A


def test_file_version_record_golden_bytes():
    event = event_pb2.Event(wall_time=1599759586.0, file_version="brain.Event:2")
    payload = event.SerializeToString()
    assert payload == bytes.fromhex("09000080 3899d6d7 41") + b"\x1a\x0dbrain.Event:2"
    record = frame(payload)
    assert record[:12] == bytes.fromhex("1800000000000000 a37f4b22")
    assert struct.unpack("<I", record[-4:])[0] == 0xAB364B12


@settings(max_examples=200)
@given(st.binary(max_size=4096))
def test_masked_crc_matches_tensorboard(data):
    assert masked_crc32c(data) == tb_masked_crc32c(data)


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=2000), max_size=20))
def test_framing_round_trip(payloads):
    assert parse_records(b"".join(frame(p) for p in payloads)) == payloads


def test_new_file_name_and_first_record(tmp_path):
    f = EventFile(tmp_path / "run", filename_suffix=".x")
    f.close()
    name = os.path.basename(f.path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.[^.]+(\.[^.]+)*\.\d+\.\d{6}\.x", name), name
    assert str(os.getpid()) in name.split(".")
    (first,) = read_file_events(f.path)
    assert first.file_version == "brain.Event:2"
    assert first.step == 0
    assert abs(first.wall_time - time.time()) < 60


def test_each_file_is_new_and_sorts_after_the_existing_ones(tmp_path):
    # A file left by an earlier process with a timestamp ahead of ours (a clock step, a
    # restart within the second) must still sort before the new one.
    future = int(time.time()) + 1000
    (tmp_path / f"events.out.tfevents.{future:010d}.otherhost.1.000000").write_bytes(b"torn")
    paths = [EventFile(tmp_path).path for _ in range(3)]
    assert paths == sorted(paths)
    assert event_files(tmp_path)[-3:] == paths
    assert (tmp_path / f"events.out.tfevents.{future:010d}.otherhost.1.000000").read_bytes() == b"torn"


def summary_event(step: int, value: float) -> bytes:
    event = event_pb2.Event(wall_time=time.time(), step=step)
    event.summary.value.add(tag="loss", simple_value=value)
    return event.SerializeToString()


def test_writer_flush_puts_everything_on_disk(tmp_path):
    writer = EventWriter(tmp_path, max_queue=3, flush_secs=3600)
    for step in range(100):
        writer.add(summary_event(step, step / 2))
    writer.flush()
    events = read_file_events(writer.path)
    assert [e.step for e in events[1:]] == list(range(100))
    assert [e.summary.value[0].simple_value for e in events[1:]] == [s / 2 for s in range(100)]
    writer.close()


def test_writer_flushes_on_its_timer(tmp_path):
    writer = EventWriter(tmp_path, flush_secs=0.2)
    writer.add(summary_event(1, 1.0))
    deadline = time.monotonic() + 30
    while len(read_file_events(writer.path)) < 2:
        assert time.monotonic() < deadline, "the flush timer never wrote the event"
        time.sleep(0.02)
    writer.close()


def test_empty_event_does_not_hang_flush(tmp_path):
    writer = EventWriter(tmp_path)
    writer.add(b"")  # a valid, empty Event
    writer.flush()
    assert len(read_file_events(writer.path)) == 2
    writer.close()


def test_close_is_idempotent_and_later_writes_fail(tmp_path):
    writer = EventWriter(tmp_path)
    writer.add(summary_event(0, 0.0))
    writer.close()
    writer.close()
    assert len(read_file_events(writer.path)) == 2
    with pytest.raises(WriterClosedError):
        writer.add(summary_event(1, 1.0))
    with pytest.raises(WriterClosedError):
        writer.flush()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_queue"):
        EventWriter(tmp_path, max_queue=0)
    with pytest.raises(ValueError, match="flush_secs"):
        EventWriter(tmp_path, flush_secs=0)


def test_disk_error_reaches_the_caller_and_leaves_whole_records(tmp_path):
    # The writer thread's error is raised in the caller's thread. The failure is real: the
    # file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG partway through, as a full
    # disk would. It runs in a child so the limit stays there.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from distsum._eventfile import EventWriter
        from distsum._errors import WriterError
        from distsum._proto import event_pb2
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        writer = EventWriter({str(tmp_path)!r}, max_queue=5)
        print(writer.path, flush=True)
        try:
            for step in range(10_000):
                event = event_pb2.Event(step=step)
                event.summary.value.add(tag="t", simple_value=step)
                writer.add(event.SerializeToString())
                if step % 100 == 99:
                    writer.flush()
        except WriterError as e:
            print("raised", type(e.__cause__).__name__, flush=True)
            sys.exit(0)
        sys.exit("no error raised")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split("\n")
    path = out[0]
    assert out[1] == "raised OSError"
    events = read_file_events(path)  # strict: every record whole
    assert [e.step for e in events[1:]] == list(range(len(events) - 1))
    assert os.path.getsize(path) <= 50_000


def test_a_write_that_failed_can_be_retried_and_the_file_stays_whole(tmp_path):
    # EFBIG partway through a write (the file-size limit, a real failure), then the limit is
    # raised, as space coming back on a full disk: the retry continues right after the last
    # whole record, with no hole or torn record in between.
    script = textwrap.dedent(
        f"""
        import resource, signal
        from distsum._eventfile import EventFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
        f = EventFile({str(tmp_path)!r})
        print(f.path)
        f.write([b"a" * 1000])
        try:
            f.write([b"b" * 1000, b"c" * 1000])
            raise SystemExit("no error")
        except OSError:
            pass
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        f.write([b"b" * 1000, b"c" * 1000])
        f.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    with open(out.strip(), "rb") as f:
        assert parse_records(f.read())[1:] == [b"a" * 1000, b"b" * 1000, b"c" * 1000]
