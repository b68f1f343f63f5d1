"""``distsum.SummaryWriter``: a drop-in for ``torch.utils.tensorboard.SummaryWriter``.

Same constructor, same ``add_*`` calls, same files on disk in the same places, without importing
torch. Where torch's behaviour is a known trap, distsum does what the caller meant:

- Scalars are always written as float32 ``simple_value``. ``new_style`` and ``double_precision``
  are accepted and ignored: torch's double-precision scalars (DT_DOUBLE) vanish from TensorBoard's
  default (Rust) loader, and both styles display identically.
- ``purge_step=T`` (resuming a run at step T) writes SessionLog.START twice at T, because
  TensorBoard's Python loader ignores the first START of a run and would otherwise keep the old
  points beside the new ones; the Rust loader replaces each tag's points from T on as new steps
  arrive, so both loaders end up showing what a resumed run means.
- ``add_histogram`` always buckets on TF1's fixed grid (torch's default ``bins="tensorflow"``, minus
  its loss of values beyond ±1e20), so histograms from different processes merge exactly. Other
  ``bins``/``max_bins`` values are accepted and ignored. NaN and infinities are counted apart
  instead of raising.
- ``add_text`` writes the tag as given (torch appends ``/text_summary``) as a rank-0 string, which
  TensorBoard renders as Markdown.
- Grayscale images stay one channel (torch expands them to RGB); TensorBoard shows the same picture.

After ``distsum.init()``, the writer goes through the job's aggregator: ``SummaryWriter()`` writes
to the job's run and a ``log_dir`` inside the run becomes a sub-run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import numpy as np

from distsum import _validate
from distsum._errors import WriterClosedError
from distsum._histogram import Histogram
from distsum._image import prepare_images
from distsum._proto import event_pb2
from distsum._sink import Sink, WriterOptions, default_logdir, open_sink
from distsum._summaries import HistogramItem, ImageItem, ScalarItem, SummaryItem, TextItem, hparams_items

__all__ = ["SummaryWriter"]


class SummaryWriter:
    """Writes scalars, histograms, images, text and hparams to event files in ``log_dir``.

    ``log_dir`` defaults to ``runs/<Mon DD_HH-MM-SS>_<host><comment>`` as in torch.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: float = 120,
        filename_suffix: str = "",
    ) -> None:
        if log_dir is None:
            # After distsum.init(), the job's run: torch's default (per host, per second) would
            # give every rank its own directory.
            log_dir = default_logdir()
        if log_dir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            log_dir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        self.log_dir = os.fspath(log_dir)
        self._options = WriterOptions(
            max_queue=max_queue, flush_secs=flush_secs, filename_suffix=filename_suffix
        )
        self._sink: Sink | None = open_sink(self.log_dir, self._options)
        self._sub_sinks: dict[str, Sink] = {}
        if purge_step is not None:
            step = _validate.check_step(purge_step, "purge_step")
            for _ in range(2):
                event = event_pb2.Event(wall_time=time.time(), step=step)
                event.session_log.status = event_pb2.SessionLog.START
                self._sink.add_event(event)

    def get_logdir(self) -> str:
        return self.log_dir

    def _open(self) -> Sink:
        if self._sink is None:
            raise WriterClosedError(f"SummaryWriter for {self.log_dir} is closed")
        return self._sink

    def _add(self, items: Sequence[SummaryItem], step: int | None, tag: str, walltime: float | None) -> None:
        self._open().add_items(items, _step(step, tag), _walltime(walltime, tag))

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """A scalar: a number, numpy scalar or one-element tensor. NaN and ±inf are kept as values."""
        tag = _validate.check_tag(tag)
        self._add([ScalarItem(tag, _validate.as_scalar(scalar_value, tag))], global_step, tag, walltime)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: Mapping[str, Any],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Several scalars on one chart: each under ``main_tag`` in run ``<log_dir>/<main_tag>_<key>``."""
        main_tag = _validate.check_tag(main_tag)
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(f"tag_scalar_dict for {main_tag!r} must be a mapping, got {tag_scalar_dict!r}")
        step, wall = _step(global_step, main_tag), _walltime(walltime, main_tag)
        checked = []
        for key, value in tag_scalar_dict.items():
            _validate.check_tag(key)
            run = f"{main_tag.replace('/', '_')}_{key}"
            _check_subdir(run, main_tag)
            checked.append((run, ScalarItem(main_tag, _validate.as_scalar(value, f"{main_tag}/{key}"))))
        self._open()
        for run, item in checked:
            sink = self._sub_sinks.get(run)
            if sink is None:
                sink = self._sub_sinks[run] = open_sink(os.path.join(self.log_dir, run), self._options)
            sink.add_items([item], step, wall)

    def add_histogram(
        self,
        tag: str,
        values: Any,
        global_step: int | None = None,
        bins: Any = "tensorflow",
        walltime: float | None = None,
        max_bins: int | None = None,
    ) -> None:
        """A histogram of ``values`` on TF1's bucket grid (``bins`` and ``max_bins`` are ignored)."""
        tag = _validate.check_tag(tag)
        array = _validate.as_array(values, tag, "histogram values")
        histogram = Histogram.from_values(array, tag=tag, sums=False)
        self._add([HistogramItem(tag, histogram)], global_step, tag, walltime)

    def add_image(
        self,
        tag: str,
        img_tensor: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """One image: uint8, or float in [0, 1]; ``dataformats`` one of CHW, HWC, HW."""
        tag = _validate.check_tag(tag)
        array = _validate.as_array(img_tensor, tag, "image")
        if len(dataformats) == 4:
            raise ValueError(f"add_image for tag {tag!r} takes one image; use add_images for {dataformats}")
        (pixels,) = prepare_images(array, tag=tag, dataformats=dataformats)
        self._add([ImageItem(tag, pixels)], global_step, tag, walltime)

    def add_images(
        self,
        tag: str,
        img_tensor: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        dataformats: str = "NCHW",
    ) -> None:
        """A batch of images tiled into one grid image, eight to a row, as torch does."""
        tag = _validate.check_tag(tag)
        array = _validate.as_array(img_tensor, tag, "images")
        grid = _tile(prepare_images(array, tag=tag, dataformats=dataformats))
        self._add([ImageItem(tag, grid)], global_step, tag, walltime)

    def add_text(
        self, tag: str, text_string: str, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        """Text, rendered by TensorBoard as Markdown."""
        tag = _validate.check_tag(tag)
        if not isinstance(text_string, str):
            raise TypeError(f"text for tag {tag!r} must be a str, got {type(text_string).__name__}")
        self._add([TextItem(tag, text_string)], global_step, tag, walltime)

    def add_hparams(
        self,
        hparam_dict: Mapping[str, Any],
        metric_dict: Mapping[str, Any],
        hparam_domain_discrete: Mapping[str, Sequence[Any]] | None = None,
        run_name: str | None = None,
        global_step: int | None = None,
    ) -> None:
        """One hparams session in sub-run ``run_name`` (default: the current time), as torch does:
        the hparams records there, and each metric as a scalar there at ``global_step``."""
        if not isinstance(hparam_dict, Mapping) or not isinstance(metric_dict, Mapping):
            raise TypeError("hparam_dict and metric_dict must be mappings")
        metrics = [
            ScalarItem(_validate.check_tag(k), _validate.as_scalar(v, k)) for k, v in metric_dict.items()
        ]
        items = hparams_items(hparam_dict, [m.tag for m in metrics], discrete_domains=hparam_domain_discrete)
        run = str(time.time()) if run_name is None else run_name
        _check_subdir(run, "hparams")
        self._open()
        sink = open_sink(os.path.join(self.log_dir, run), self._options)
        try:
            step = _step(global_step, "hparams")
            sink.add_items(items, step)
            for metric in metrics:
                sink.add_items([metric], step)
        finally:
            sink.close()

    def flush(self) -> None:
        """Return once everything added so far is in the event files."""
        self._open().flush()
        for sink in self._sub_sinks.values():
            sink.flush()

    def close(self) -> None:
        """Write everything out and close the files. Closing twice does nothing."""
        if self._sink is None:
            return
        sinks = [self._sink, *self._sub_sinks.values()]
        self._sink, self._sub_sinks = None, {}
        for sink in sinks:
            sink.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _step(step: object, tag: str) -> int:
    return 0 if step is None else _validate.check_step(step, tag)


def _walltime(walltime: object, tag: str) -> float:
    if walltime is None:
        return time.time()
    value = _validate.as_scalar(walltime, tag)
    # TensorBoard's Rust loader marks a whole file dead on a NaN wall time.
    if not np.isfinite(value):
        raise ValueError(f"walltime for tag {tag!r} must be finite, got {value}")
    return value


def _check_subdir(name: str, tag: str) -> None:
    if not name or name in (".", "..") or "\x00" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"{name!r} (for {tag!r}) is not usable as a run directory name")


def _tile(images: list[np.ndarray], ncols: int = 8) -> np.ndarray:
    """Images of one shape laid out in a grid ``ncols`` wide, row by row, as torch's make_grid."""
    height, width, channels = images[0].shape
    ncols = min(len(images), ncols)
    nrows = -(-len(images) // ncols)
    canvas = np.zeros((height * nrows, width * ncols, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = divmod(i, ncols)
        canvas[y * height : (y + 1) * height, x * width : (x + 1) * width] = image
    return canvas
