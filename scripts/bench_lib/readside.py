"""Target 9: TensorBoard's Python loader reading one job's output, distsum's run vs per-rank runs.

The same job twice: ``ranks`` ranks each log ``steps`` x ``tags`` scalars, once through distsum
(``ranks`` spawned processes, one merged run) and once through torch's SummaryWriter into
``rank_<r>`` directories (the per-rank way). Then TensorBoard's multiplexer
(``--load_fast=false``, everything kept) loads each job's directory, alternately, ``repeats``
times.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from typing import Any

from bench_lib.common import call_main


def _distsum_rank(rank: int, world: int, logdir: str, steps: int, tags: int) -> None:
    import distsum

    distsum.init(rank, world, logdir=logdir)
    names = [f"metric/{j:04d}" for j in range(tags)]
    for step in range(steps):
        value = step * 0.001 + rank
        for tag in names:
            distsum.scalar(tag, value, step)
    if not distsum.finish(300):
        raise SystemExit("distsum.finish() returned False")


def _torch_ranks(ranks: int, logdir: str, steps: int, tags: int) -> None:
    """What ``ranks`` per-rank SummaryWriters write; one process writes them all, one after another
    (the files are the same as from separate processes, and it spares the imports of torch)."""
    from torch.utils.tensorboard import SummaryWriter

    names = [f"metric/{j:04d}" for j in range(tags)]
    for rank in range(ranks):
        writer = SummaryWriter(f"{logdir}/rank_{rank}")
        for step in range(steps):
            value = step * 0.001 + rank
            for tag in names:
                writer.add_scalar(tag, value, step)
        writer.close()


def _run_job(target: Any, args_of_rank: Any, ranks: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed: {[p.exitcode for p in procs]}")


def _load(directory: str) -> tuple[float, int, int]:
    """Seconds to load ``directory`` as TensorBoard does; runs and scalar points it found."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    start = time.perf_counter()
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(directory)
    mux.Reload()
    elapsed = time.perf_counter() - start
    points = 0
    runs = mux.PluginRunToTagToContent("scalars")
    for run, tags in runs.items():
        for tag in tags:
            points += len(mux.Tensors(run, tag))
    return elapsed, len(runs), points


def read_side(ranks: int, steps: int, tags: int, repeats: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="bench-read-")
    try:
        distsum_dir, torch_dir = f"{root}/distsum", f"{root}/per_rank"
        _run_job(_distsum_rank, lambda r: (r, ranks, distsum_dir, steps, tags), ranks)
        _run_job(_torch_ranks, lambda r: (ranks, torch_dir, steps, tags), 1)
        times: dict[str, list[float]] = {"distsum": [], "per_rank": []}
        found = {}
        for _ in range(repeats):
            for name, directory in (("distsum", distsum_dir), ("per_rank", torch_dir)):
                elapsed, runs, points = _load(directory)
                times[name].append(elapsed)
                found[name] = {"runs": runs, "points": points}
        return {"seconds": times, "found": found}
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    call_main({"read_side": read_side})
