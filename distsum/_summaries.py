"""Summary items: what a front end hands on, in a form that can still be merged across ranks.

A front end validates what the user passed (in the user's thread) and turns it into items. An
item keeps its data mergeable: a scalar as a float, a histogram as counts on TF1's fixed grid,
images as pixels. ``to_values`` turns items into the ``Summary.Value`` protos written to disk,
and is the one place that decides how each kind looks on disk:

==========  ======================================================================================
scalar      legacy ``simple_value`` (float32); both loaders and tbparse show it as a scalar.
            A ``ScalarBlock`` is many of them at once, as the aggregator writes them: its bytes
            are a template per layout of tags with the values filled in, the same bytes
            ``to_values`` gives
histogram   TF2 ``[k, 3]`` float64 tensor, plugin ``histograms``: both loaders serve it the same
images      legacy ``Summary.Image`` PNGs, one Value each, TF1 tag naming (``name/image/i``)
text        rank-0 DT_STRING tensor, plugin ``text`` (rendered as Markdown)
hparams     metadata-only Values, plugin ``hparams``
==========  ======================================================================================

Every tensor Value carries its plugin metadata (TF2 style), so each tag is typed correctly in
every file whichever Value TensorBoard happens to see first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import struct_pb2

from distsum._histogram import Histogram
from distsum._image import EncodedImage, encode_png
from distsum._proto import event_pb2, hparams_pb2, summary_pb2, types_pb2, varint

__all__ = [
    "HistogramItem",
    "ImageItem",
    "Item",
    "ProtoItem",
    "ScalarBlock",
    "ScalarItem",
    "ScalarTags",
    "SummaryItem",
    "TextItem",
    "event_bytes",
    "hparams_items",
    "image_tags",
    "item_from_value",
    "summary_bytes",
    "to_values",
]


@dataclass(frozen=True, slots=True)
class ScalarItem:
    tag: str
    value: float


class ScalarTags:
    """The tags of a ``ScalarBlock``, in order, and the bytes of their Values around the numbers.

    Built once per layout (the aggregator keeps one per set of tags it writes together), so
    writing a block is one copy of the template and one scatter of float32 bytes into it.
    """

    __slots__ = ("_slots", "_template", "tags")

    def __init__(self, tags: Sequence[str]) -> None:
        self.tags = tuple(tags)
        parts: list[bytes] = []
        slots: list[int] = []
        offset = 0
        for tag in self.tags:
            # Summary.value (field 1) holding Value{tag (1): str, simple_value (2): float}.
            name = tag.encode("utf-8")
            value = b"\x0a" + varint(len(name)) + name + b"\x15"
            prefix = b"\x0a" + varint(len(value) + 4) + value
            parts += (prefix, bytes(4))
            offset += len(prefix)
            slots.append(offset)
            offset += 4
        self._template = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self._slots = (np.array(slots, dtype=np.intp)[:, None] + np.arange(4)).ravel()

    def __len__(self) -> int:
        return len(self.tags)

    def __repr__(self) -> str:
        return f"ScalarTags({list(self.tags)!r})"

    def encode(self, values: np.ndarray) -> bytes:
        """The serialized ``Summary`` values for ``values`` (one per tag, rounded to float32)."""
        out = self._template.copy()
        with np.errstate(over="ignore"):
            out[self._slots] = values.astype("<f4").view(np.uint8)
        return out.tobytes()


@dataclass(frozen=True, slots=True)
class ScalarBlock:
    """Scalars at one step of one run path: ``values[i]`` under ``tags.tags[i]``."""

    tags: ScalarTags
    values: np.ndarray

    def items(self) -> list[ScalarItem]:
        values = self.values.tolist()
        return [ScalarItem(tag, value) for tag, value in zip(self.tags.tags, values, strict=True)]


@dataclass(frozen=True, slots=True)
class HistogramItem:
    tag: str
    histogram: Histogram


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image: HWC uint8 pixels, PNG-encoded only when first needed, or an encoded PNG."""

    tag: str
    image: np.ndarray | EncodedImage
    _encoded: list[EncodedImage] = field(default_factory=list, compare=False, repr=False)

    def encoded(self) -> EncodedImage:
        if isinstance(self.image, EncodedImage):
            return self.image
        if not self._encoded:
            self._encoded.append(encode_png(self.image))
        return self._encoded[0]


@dataclass(frozen=True, slots=True)
class TextItem:
    tag: str
    text: str


@dataclass(frozen=True, slots=True)
class ProtoItem:
    """A ``Summary.Value`` written as it is: hparams records, values from foreign summaries."""

    value: summary_pb2.Summary.Value

    @property
    def tag(self) -> str:
        return self.value.tag


# One value, as the front ends make them and a Summary holds them.
SummaryItem = ScalarItem | HistogramItem | ImageItem | TextItem | ProtoItem
# What an event holds: the aggregator also writes scalars in blocks.
Item = SummaryItem | ScalarBlock


def _metadata(
    plugin: str, data_class: summary_pb2.DataClass, content: bytes = b""
) -> summary_pb2.SummaryMetadata:
    metadata = summary_pb2.SummaryMetadata(data_class=data_class)
    metadata.plugin_data.plugin_name = plugin
    metadata.plugin_data.content = content
    return metadata


_HISTOGRAMS = _metadata("histograms", summary_pb2.DATA_CLASS_TENSOR)
# Value.metadata (field 9) with the above, as _histogram_value writes it after the tensor.
_HISTOGRAMS_FIELD = b"\x4a" + varint(_HISTOGRAMS.ByteSize()) + _HISTOGRAMS.SerializeToString()
_TEXT = _metadata("text", summary_pb2.DATA_CLASS_TENSOR)


def image_tags(name: str, max_outputs: int) -> list[str]:
    """TF1's names for the images of one ``image`` call: ``name/image`` or ``name/image/i``.

    The suffix follows the requested ``max_outputs``, not the number of images given.
    """
    if max_outputs == 1:
        return [f"{name}/image"]
    return [f"{name}/image/{i}" for i in range(max_outputs)]


def to_values(items: Iterable[Item], *, legacy_histograms: bool = False) -> list[summary_pb2.Summary.Value]:
    """The ``Summary.Value`` protos that represent ``items`` on disk, in order.

    ``legacy_histograms`` writes histograms as TF1's ``HistogramProto`` instead, which keeps the
    exact bucket counts on TF1's grid, so ``item_from_value`` can take them back for merging:
    the form of a ``distsum.summary.Summary`` that is serialized and handed on as bytes.
    """
    values = []
    for item in items:
        if isinstance(item, ScalarItem):
            values.append(summary_pb2.Summary.Value(tag=item.tag, simple_value=item.value))
        elif isinstance(item, ScalarBlock):
            values.extend(to_values(item.items()))
        elif isinstance(item, HistogramItem) and legacy_histograms:
            values.append(summary_pb2.Summary.Value(tag=item.tag, histo=item.histogram.to_histogram_proto()))
        elif isinstance(item, HistogramItem):
            values.append(summary_pb2.Summary.Value.FromString(_histogram_value(item)))
        elif isinstance(item, ImageItem):
            image = item.encoded()
            value = summary_pb2.Summary.Value(tag=item.tag)
            value.image.height = image.height
            value.image.width = image.width
            value.image.colorspace = image.colorspace
            value.image.encoded_image_string = image.png
            values.append(value)
        elif isinstance(item, TextItem):
            value = summary_pb2.Summary.Value(tag=item.tag, metadata=_TEXT)
            value.tensor.dtype = types_pb2.DT_STRING
            value.tensor.string_val.append(item.text.encode("utf-8"))
            values.append(value)
        elif isinstance(item, ProtoItem):
            values.append(item.value)
        else:
            raise TypeError(f"not a summary item: {item!r}")
    return values


def _histogram_value(item: HistogramItem) -> bytes:
    """The serialized ``Summary.Value`` of a histogram: its tag, TF2 tensor and plugin metadata.

    In bytes rather than protobuf's classes: the aggregator writes one for every histogram tag
    at every step.
    """
    tag = item.tag.encode("utf-8")
    tensor = item.histogram.tensor_bytes()
    # Value{tag (1), tensor (8), metadata (9)}, in field order as protobuf writes them.
    return b"".join((b"\x0a", varint(len(tag)), tag, b"\x42", varint(len(tensor)), tensor, _HISTOGRAMS_FIELD))


def summary_bytes(items: Iterable[Item]) -> bytes:
    """The serialized ``Summary`` holding ``items``: the bytes of ``Summary(value=to_values(items))``."""
    parts: list[bytes] = []
    others: list[Item] = []
    for item in items:
        # A Summary's values concatenate, each a Summary.value (field 1): the scalar blocks and
        # histograms are encoded as bytes, the rest through protobuf.
        if type(item) is ScalarBlock:
            part = item.tags.encode(item.values)
        elif type(item) is HistogramItem:
            value = _histogram_value(item)
            part = b"\x0a" + varint(len(value)) + value
        else:
            others.append(item)
            continue
        if others:
            parts.append(summary_pb2.Summary(value=to_values(others)).SerializeToString())
            others = []
        parts.append(part)
    if others:
        parts.append(summary_pb2.Summary(value=to_values(others)).SerializeToString())
    return b"".join(parts)


def event_bytes(step: int, wall_time: float, items: Iterable[Item]) -> bytes:
    """The serialized ``Event`` at ``step`` whose summary holds ``items``."""
    summary = summary_bytes(items)
    # Event.summary is field 5, length-delimited: tag byte 0x2a.
    head = event_pb2.Event(wall_time=wall_time, step=step).SerializeToString()
    return b"".join((head, b"\x2a", varint(len(summary)), summary))


def item_from_value(value: summary_pb2.Summary.Value) -> SummaryItem:
    """The item a ``Summary.Value`` from elsewhere stands for, mergeable where distsum can merge it:
    scalars, legacy histograms on TF1's grid, images, single texts; anything else as it is."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return ScalarItem(value.tag, value.simple_value)
    if kind == "histo":
        histogram = Histogram.from_histogram_proto(value.histo)
        if histogram is not None:
            return HistogramItem(value.tag, histogram)
    if kind == "image":
        image = value.image
        encoded = EncodedImage(image.height, image.width, image.colorspace, image.encoded_image_string)
        return ImageItem(value.tag, encoded)
    tensor = value.tensor
    if (
        kind == "tensor"
        and value.metadata.plugin_data.plugin_name == "text"
        and tensor.dtype == types_pb2.DT_STRING
        and len(tensor.string_val) == 1
        and not tensor.tensor_shape.dim
    ):
        try:
            return TextItem(value.tag, tensor.string_val[0].decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return ProtoItem(value)


# --- hparams -------------------------------------------------------------------------------------

_HPARAMS_EXPERIMENT = "_hparams_/experiment"
_HPARAMS_SESSION_START = "_hparams_/session_start_info"
_HPARAMS_SESSION_END = "_hparams_/session_end_info"


def _hparams_value(tag: str, data: hparams_pb2.HParamsPluginData) -> ProtoItem:
    value = summary_pb2.Summary.Value(tag=tag)
    value.metadata.CopyFrom(_metadata("hparams", summary_pb2.DATA_CLASS_UNKNOWN, data.SerializeToString()))
    return ProtoItem(value)


def hparams_items(
    hparams: Mapping[str, object],
    metrics: Sequence[str],
    *,
    discrete_domains: Mapping[str, Sequence[object]] | None = None,
) -> list[ProtoItem]:
    """The three hparams plugin records for one session: experiment, start and end.

    ``hparams`` maps names to bool, int, float or str values; ``metrics`` names the scalar tags
    the hparams dashboard should show beside them. Raises TypeError/ValueError naming the bad
    entry.
    """
    experiment = hparams_pb2.Experiment(time_created_secs=time.time())
    start = hparams_pb2.SessionStartInfo(start_time_secs=time.time())
    discrete_domains = dict(discrete_domains or {})
    for name, raw in hparams.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"hparam names must be non-empty str, got {name!r}")
        info = experiment.hparam_infos.add(name=name)
        if isinstance(raw, bool):
            info.type = hparams_pb2.DATA_TYPE_BOOL
            start.hparams[name].bool_value = raw
        elif isinstance(raw, (int, float, np.integer, np.floating)):
            info.type = hparams_pb2.DATA_TYPE_FLOAT64
            start.hparams[name].number_value = float(raw)
        elif isinstance(raw, str):
            info.type = hparams_pb2.DATA_TYPE_STRING
            start.hparams[name].string_value = raw
        else:
            raise TypeError(
                f"hparam {name!r} must be a bool, int, float or str, got {type(raw).__name__} {raw!r}"
            )
        domain = discrete_domains.pop(name, None)
        if domain is not None:
            info.domain_discrete.CopyFrom(_list_value(name, domain))
    if discrete_domains:
        raise ValueError(f"discrete domains given for unknown hparams: {sorted(discrete_domains)}")
    for tag in metrics:
        experiment.metric_infos.add().name.tag = tag
    end = hparams_pb2.SessionEndInfo(status=hparams_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return [
        _hparams_value(_HPARAMS_EXPERIMENT, hparams_pb2.HParamsPluginData(experiment=experiment)),
        _hparams_value(_HPARAMS_SESSION_START, hparams_pb2.HParamsPluginData(session_start_info=start)),
        _hparams_value(_HPARAMS_SESSION_END, hparams_pb2.HParamsPluginData(session_end_info=end)),
    ]


def _list_value(name: str, values: Sequence[object]) -> struct_pb2.ListValue:
    out = struct_pb2.ListValue()
    for v in values:
        if isinstance(v, bool):
            out.values.add().bool_value = v
        elif isinstance(v, (int, float)):
            out.values.add().number_value = float(v)
        elif isinstance(v, str):
            out.values.add().string_value = v
        else:
            raise TypeError(f"domain of hparam {name!r} holds {v!r}; expected bool, number or str")
    return out
