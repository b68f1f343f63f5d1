"""Summary bytes: the aggregator's encodings (scalar blocks, histograms) against protobuf's, byte for byte."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from distsum._histogram import Histogram
from distsum._proto import event_pb2, summary_pb2
from distsum._summaries import (
    HistogramItem,
    ScalarBlock,
    ScalarItem,
    ScalarTags,
    TextItem,
    event_bytes,
    summary_bytes,
    to_values,
)
from tests.test_histogram import protobuf_tensor

EDGES = [
    0.0,
    -0.0,
    1.0,
    -2.5,
    np.nan,
    np.inf,
    -np.inf,
    1e300,  # beyond float32: inf
    -1e300,
    3.4028235e38,  # float32 max
    3.4028236e38,  # rounds to float32 max
    1e-46,  # below float32's subnormals: 0
    1.4e-45,  # the smallest float32 subnormal
    1 / 3,
]

TAGS = st.text(min_size=1, max_size=200).filter(lambda t: "\x00" not in t)


def reference(items) -> bytes:
    return summary_pb2.Summary(value=to_values(items)).SerializeToString()


def test_a_block_encodes_as_protobuf_does_at_the_edges_of_float32() -> None:
    tags = ScalarTags([f"t{i}" for i in range(len(EDGES))])
    block = ScalarBlock(tags, np.array(EDGES))
    assert summary_bytes([block]) == reference([ScalarItem(f"t{i}", v) for i, v in enumerate(EDGES)])


@given(
    st.lists(st.tuples(TAGS, st.floats(allow_nan=False)), min_size=1, max_size=40, unique_by=lambda x: x[0])
)
@settings(max_examples=200, deadline=None)
def test_blocks_with_any_tags_are_the_bytes_of_their_items(pairs) -> None:
    tags = [t for t, _ in pairs]
    values = np.array([v for _, v in pairs], dtype=np.float64)
    block = ScalarBlock(ScalarTags(tags), values)
    assert summary_bytes([block]) == reference(block.items())
    parsed = summary_pb2.Summary.FromString(summary_bytes([block]))
    assert [v.tag for v in parsed.value] == tags
    with np.errstate(over="ignore"):
        assert np.array_equal([v.simple_value for v in parsed.value], values.astype(np.float32))


def test_blocks_and_other_items_keep_their_order_in_one_event() -> None:
    histogram = HistogramItem("h", Histogram.from_values(np.arange(10.0), tag="h"))
    a = ScalarBlock(ScalarTags(["a", "b"]), np.array([1.0, 2.0]))
    c = ScalarBlock(ScalarTags(["c"]), np.array([3.0]))
    items = [ScalarItem("x", 0.5), a, histogram, c, TextItem("t", "hi")]
    flat = [ScalarItem("x", 0.5), *a.items(), histogram, *c.items(), TextItem("t", "hi")]
    assert summary_bytes(items) == reference(flat)
    event = event_pb2.Event.FromString(event_bytes(7, 1234.5, items))
    expected = event_pb2.Event(wall_time=1234.5, step=7)
    expected.summary.value.extend(to_values(flat))
    assert event == expected
    assert event_bytes(7, 1234.5, items) == expected.SerializeToString()


def histogram_reference(tag: str, histogram: Histogram) -> summary_pb2.Summary.Value:
    """A histogram's Value as TensorBoard's own summary ops make it, through protobuf's classes."""
    value = summary_pb2.Summary.Value(tag=tag)
    value.metadata.plugin_data.plugin_name = "histograms"
    value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    value.tensor.CopyFrom(protobuf_tensor(histogram))
    return value


@given(
    st.lists(
        st.tuples(TAGS, st.lists(st.floats(width=32), max_size=50)),
        min_size=1,
        max_size=5,
        unique_by=lambda x: x[0],
    )
)
@settings(max_examples=200, deadline=None)
def test_histograms_encode_as_protobuf_does(pairs) -> None:
    """Histograms (empty ones too) among scalars, in bytes as protobuf serializes their Values."""
    items = [HistogramItem(tag, Histogram.from_values(np.array(v, np.float32), tag=tag)) for tag, v in pairs]
    scalars = ScalarBlock(ScalarTags(["s"]), np.array([1.0]))
    expected = summary_pb2.Summary(value=[histogram_reference(i.tag, i.histogram) for i in items])
    expected.value.insert(1, summary_pb2.Summary.Value(tag="s", simple_value=1.0))
    assert summary_bytes([items[0], scalars, *items[1:]]) == expected.SerializeToString()
    assert to_values(items) == [histogram_reference(i.tag, i.histogram) for i in items]
