"""The progress journal on a real file: what a later aggregator reads back of it."""

from __future__ import annotations

import os

from distsum._journal import JOURNAL_NAME, Journal
from distsum._proto import journal_pb2


def test_merged_batches_and_their_late_records_are_read_back(tmp_path) -> None:
    j = Journal(str(tmp_path))
    assert j.earlier == {}
    j.merged(0, 11, 1, None)
    j.merged(0, 11, 2, journal_pb2.LateRecords(scalars=[3, 4], texts=[0]))
    j.merged(1, 12, 1, None)
    j.append()
    j.merged(0, 11, 3, None)
    j.append()
    j.close()
    earlier = Journal(str(tmp_path)).earlier
    assert set(earlier) == {(0, 11), (1, 12)}
    assert earlier[0, 11].merged == 3 and earlier[1, 12].merged == 1
    assert list(earlier[0, 11].late) == [2]
    late = earlier[0, 11].late[2]
    assert (list(late.scalars), list(late.texts), late.seq) == ([3, 4], [0], 2)


def test_a_torn_last_entry_is_ignored(tmp_path) -> None:
    j = Journal(str(tmp_path))
    j.merged(0, 11, 1, None)
    j.append()
    j.merged(0, 11, 2, None)
    j.append()
    j.close()
    path = tmp_path / JOURNAL_NAME
    os.truncate(path, os.path.getsize(path) - 3)
    assert Journal(str(tmp_path)).earlier[0, 11].merged == 1


def test_a_checkpoint_keeps_durable_points_and_the_late_records_beyond_them(tmp_path) -> None:
    j = Journal(str(tmp_path))
    j.merged(0, 11, 1, journal_pb2.LateRecords(scalars=[0]))
    j.merged(0, 11, 2, journal_pb2.LateRecords(scalars=[1]))
    j.merged(1, 12, 1, None)
    j.append()
    j.durable(0, 11, 1)
    j.durable(1, 12, 1)
    j.checkpoint()
    assert not j.dirty
    earlier = Journal(str(tmp_path)).earlier
    # Stream 12 is all durable, but its rank may not know: a resend is answered as a duplicate.
    assert set(earlier) == {(0, 11), (1, 12)} and earlier[1, 12].durable == 1
    assert earlier[0, 11].durable == 1 and list(earlier[0, 11].late) == [2]
    # Appends after a checkpoint go to the new file, after its snapshot.
    j.merged(0, 11, 3, None)
    j.append()
    j.close()
    assert Journal(str(tmp_path)).earlier[0, 11].merged == 3
    assert sorted(os.listdir(tmp_path)) == [JOURNAL_NAME]


def test_a_stream_that_finished_is_read_back_as_finished_from_appends_and_snapshots(tmp_path) -> None:
    j = Journal(str(tmp_path))
    j.merged(0, 11, 1, None)
    j.merged(1, 12, 1, None)
    j.merged(1, 12, 2, None, finished=True)
    j.append()
    j.close()
    earlier = Journal(str(tmp_path)).earlier
    assert not earlier[0, 11].finished and earlier[1, 12].finished
    # Finished, but not durable: the rank will resend, so it is not done.
    assert not earlier[1, 12].done
    # Still finished after a checkpoint, and after later entries that do not say so again.
    j.durable(1, 12, 2)
    j.checkpoint()
    j.merged(0, 11, 2, None)
    j.append()
    j.close()
    earlier = Journal(str(tmp_path)).earlier
    assert not earlier[0, 11].finished and earlier[1, 12].finished and earlier[1, 12].durable == 2
    assert earlier[1, 12].done and not earlier[0, 11].done


def test_what_an_earlier_aggregator_left_survives_a_second_restart(tmp_path) -> None:
    j = Journal(str(tmp_path))
    j.merged(0, 11, 5, journal_pb2.LateRecords(histograms=[1]))
    j.append()
    j.close()
    # A second aggregator has not heard from that stream again before its own checkpoint.
    second = Journal(str(tmp_path))
    second.merged(1, 12, 1, None)
    second.checkpoint()
    earlier = Journal(str(tmp_path)).earlier
    assert earlier[0, 11].merged == 5 and list(earlier[0, 11].late[5].histograms) == [1]
    assert earlier[1, 12].merged == 1


def test_once_every_stream_is_forgotten_there_is_no_journal_file(tmp_path) -> None:
    j = Journal(str(tmp_path))
    j.merged(0, 11, 1, None)
    j.append()
    assert os.listdir(tmp_path) == [JOURNAL_NAME]
    j.durable(0, 11, 1)
    j.checkpoint()
    assert os.listdir(tmp_path) == [JOURNAL_NAME]
    j.forget(0, 11)
    j.checkpoint()
    assert os.listdir(tmp_path) == []
