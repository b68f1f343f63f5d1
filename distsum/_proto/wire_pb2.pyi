from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    SCALAR: _ClassVar[Kind]
    HISTOGRAM: _ClassVar[Kind]
    IMAGES: _ClassVar[Kind]
    TEXT: _ClassVar[Kind]

class Reduce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEAN: _ClassVar[Reduce]
    SUM: _ClassVar[Reduce]
    MIN: _ClassVar[Reduce]
    MAX: _ClassVar[Reduce]
    NONE: _ClassVar[Reduce]
KIND_UNSPECIFIED: Kind
SCALAR: Kind
HISTOGRAM: Kind
IMAGES: Kind
TEXT: Kind
MEAN: Reduce
SUM: Reduce
MIN: Reduce
MAX: Reduce
NONE: Reduce

class Envelope(_message.Message):
    __slots__ = ("version", "batch", "ack")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    version: int
    batch: Batch
    ack: Ack
    def __init__(self, version: _Optional[int] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Origin(_message.Message):
    __slots__ = ("run", "rank", "world_size", "stream", "pid", "host", "restart")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    world_size: int
    stream: int
    pid: int
    host: str
    restart: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., stream: _Optional[int] = ..., pid: _Optional[int] = ..., host: _Optional[str] = ..., restart: _Optional[int] = ...) -> None: ...

class Series(_message.Message):
    __slots__ = ("subrun", "tag", "kind", "reduce", "max_outputs")
    SUBRUN_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    subrun: str
    tag: str
    kind: Kind
    reduce: _containers.RepeatedScalarFieldContainer[Reduce]
    max_outputs: int
    def __init__(self, subrun: _Optional[str] = ..., tag: _Optional[str] = ..., kind: _Optional[_Union[Kind, str]] = ..., reduce: _Optional[_Iterable[_Union[Reduce, str]]] = ..., max_outputs: _Optional[int] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("series", "step", "wall_time", "buckets", "counts", "min", "max", "sum", "sum_squares", "nan", "posinf", "neginf")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    NAN_FIELD_NUMBER: _ClassVar[int]
    POSINF_FIELD_NUMBER: _ClassVar[int]
    NEGINF_FIELD_NUMBER: _ClassVar[int]
    series: int
    step: int
    wall_time: float
    buckets: bytes
    counts: bytes
    min: float
    max: float
    sum: float
    sum_squares: float
    nan: int
    posinf: int
    neginf: int
    def __init__(self, series: _Optional[int] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., buckets: _Optional[bytes] = ..., counts: _Optional[bytes] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., sum: _Optional[float] = ..., sum_squares: _Optional[float] = ..., nan: _Optional[int] = ..., posinf: _Optional[int] = ..., neginf: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("height", "width", "colorspace", "png")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    COLORSPACE_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    colorspace: int
    png: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., colorspace: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class Images(_message.Message):
    __slots__ = ("series", "step", "wall_time", "image")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    series: int
    step: int
    wall_time: float
    image: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, series: _Optional[int] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., image: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Text(_message.Message):
    __slots__ = ("series", "step", "wall_time", "text")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    series: int
    step: int
    wall_time: float
    text: str
    def __init__(self, series: _Optional[int] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class Raw(_message.Message):
    __slots__ = ("subrun", "event")
    SUBRUN_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    subrun: str
    event: bytes
    def __init__(self, subrun: _Optional[str] = ..., event: _Optional[bytes] = ...) -> None: ...

class SeriesTable(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[Series]
    def __init__(self, series: _Optional[_Iterable[_Union[Series, _Mapping]]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("origin", "seq", "series_table", "scalar_series", "scalar_steps", "scalar_values", "scalar_wall_times", "scalar_wall_counts", "histograms", "images", "texts", "flush", "finish", "raws", "dropped", "resend_from")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SERIES_TABLE_FIELD_NUMBER: _ClassVar[int]
    SCALAR_SERIES_FIELD_NUMBER: _ClassVar[int]
    SCALAR_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCALAR_VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALAR_WALL_TIMES_FIELD_NUMBER: _ClassVar[int]
    SCALAR_WALL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    RAWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    RESEND_FROM_FIELD_NUMBER: _ClassVar[int]
    origin: Origin
    seq: int
    series_table: bytes
    scalar_series: bytes
    scalar_steps: bytes
    scalar_values: bytes
    scalar_wall_times: bytes
    scalar_wall_counts: bytes
    histograms: _containers.RepeatedCompositeFieldContainer[Histogram]
    images: _containers.RepeatedCompositeFieldContainer[Images]
    texts: _containers.RepeatedCompositeFieldContainer[Text]
    flush: bool
    finish: bool
    raws: _containers.RepeatedCompositeFieldContainer[Raw]
    dropped: int
    resend_from: int
    def __init__(self, origin: _Optional[_Union[Origin, _Mapping]] = ..., seq: _Optional[int] = ..., series_table: _Optional[bytes] = ..., scalar_series: _Optional[bytes] = ..., scalar_steps: _Optional[bytes] = ..., scalar_values: _Optional[bytes] = ..., scalar_wall_times: _Optional[bytes] = ..., scalar_wall_counts: _Optional[bytes] = ..., histograms: _Optional[_Iterable[_Union[Histogram, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[Images, _Mapping]]] = ..., texts: _Optional[_Iterable[_Union[Text, _Mapping]]] = ..., flush: _Optional[bool] = ..., finish: _Optional[bool] = ..., raws: _Optional[_Iterable[_Union[Raw, _Mapping]]] = ..., dropped: _Optional[int] = ..., resend_from: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("stream", "received", "durable", "world_size")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    stream: int
    received: int
    durable: int
    world_size: int
    def __init__(self, stream: _Optional[int] = ..., received: _Optional[int] = ..., durable: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...
