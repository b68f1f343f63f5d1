from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LateRecords(_message.Message):
    __slots__ = ("seq", "scalars", "histograms", "images", "texts")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    scalars: _containers.RepeatedScalarFieldContainer[int]
    histograms: _containers.RepeatedScalarFieldContainer[int]
    images: _containers.RepeatedScalarFieldContainer[int]
    texts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., scalars: _Optional[_Iterable[int]] = ..., histograms: _Optional[_Iterable[int]] = ..., images: _Optional[_Iterable[int]] = ..., texts: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamProgress(_message.Message):
    __slots__ = ("rank", "stream", "merged", "durable", "late", "finished")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    stream: int
    merged: int
    durable: int
    late: _containers.RepeatedCompositeFieldContainer[LateRecords]
    finished: bool
    def __init__(self, rank: _Optional[int] = ..., stream: _Optional[int] = ..., merged: _Optional[int] = ..., durable: _Optional[int] = ..., late: _Optional[_Iterable[_Union[LateRecords, _Mapping]]] = ..., finished: _Optional[bool] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("streams", "snapshot")
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamProgress]
    snapshot: bool
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamProgress, _Mapping]]] = ..., snapshot: _Optional[bool] = ...) -> None: ...
