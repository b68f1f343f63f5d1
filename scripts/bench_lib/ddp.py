"""Target 6: the time logging adds to each step of a real multi-rank job (gloo, DDP, tiny model).

One job of ``world`` processes (``torch.multiprocessing``, gloo over loopback, a file store, one
thread each as torchrun sets it) trains a small MLP with DistributedDataParallel. It runs blocks
of ``steps`` timed steps (after ``warmup`` untimed ones) in each logging mode, the modes
interleaved and the whole sequence ``repeats`` times, so every mode sees the same machine state.
Each logging step logs ``scalars`` scalars and ``histograms`` histograms of ``hist_size`` values:

* ``none``: no logging (the reference step time);
* ``distsum``: ``distsum.scalar`` / ``distsum.histogram`` on every rank, embedded aggregator;
* ``allreduce``: the scalars stacked into one tensor and ``all_reduce``d, the histogram values
  ``gather``ed to rank 0, which writes everything with torch's SummaryWriter;
* ``allreduce_each``: as ``allreduce`` but one ``all_reduce`` per scalar (the common way);
* ``per_rank``: every rank writes its own torch SummaryWriter, ``<block>/rank_<r>``.

The overhead of a mode is its mean step time on rank 0 minus that of no logging in the same
repeat: the mean of a ``none`` block at the start of the repeat and one at its end, since step
times drift by a millisecond over a repeat here. Once per job and not per step, so timed apart:
distsum's ``init()`` until the embedded aggregator answers a ``flush()`` (it starts a Python
process, whose imports would otherwise take the CPU from the first timed steps), and its
``finish()`` at the end of the block.

CPU per step is counted too, less noisy than wall time: every rank process (all its threads),
and in distsum's blocks also the ranks' sender threads and the embedded aggregator, from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from bench_lib.common import call_main, proc_cpu

MODES = ("none", "distsum", "allreduce", "allreduce_each", "per_rank")
# The reference block run again at the end of each repeat.
NONE_AGAIN = "none_again"


def _cpu_now(sender: threading.Thread | None, aggregator: Any) -> dict[str, float]:
    # Clocks that count in nanoseconds: a block of 40 steps is a few hundred milliseconds, and
    # the 10 ms ticks of /proc/PID/stat made "the rest of the ranks" come out negative.
    now = {"process": time.process_time()}
    if sender is not None:  # found among the running threads: it has an ident
        now["sender"] = time.clock_gettime(time.pthread_getcpuclockid(sender.ident))
    if aggregator is not None:
        now["aggregator"] = proc_cpu(aggregator.pid)
    return now


def _rank(rank: int, world: int, root: str, config: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter

    import distsum

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(64, 256, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    hists = [torch.randn(config["hist_size"], generator=generator) for _ in range(config["histograms"])]
    tags = [f"metric/{j:03d}" for j in range(config["scalars"])]
    hist_tags = [f"hist/{j}" for j in range(config["histograms"])]
    results: list[dict[str, Any]] = []
    step = 0

    def train_step() -> float:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    for repeat in range(config["repeats"]):
        for mode in [*config["modes"], NONE_AGAIN]:
            block = f"{root}/{mode}-{repeat}"
            writer = None
            ready = 0.0
            if mode == "distsum":
                t = time.perf_counter()
                distsum.init(rank, world, logdir=block)
                if not distsum.flush(120):
                    raise RuntimeError(f"rank {rank}: the embedded aggregator did not answer")
                ready = time.perf_counter() - t
            elif mode == "per_rank":
                writer = SummaryWriter(f"{block}/rank_{rank}")
            elif mode.startswith("allreduce") and rank == 0:
                writer = SummaryWriter(block)
            gathered = [torch.empty(config["hist_size"]) for _ in range(world)] if rank == 0 else None
            dist.barrier()
            start = 0.0
            sender = aggregator = None
            if mode == "distsum":
                sender = next(t for t in threading.enumerate() if t.name == "distsum-sender")
                state = distsum._api._state
                aggregator = state.aggregator if state is not None else None
            cpu: dict[str, float] = {}

            for i in range(config["warmup"] + config["steps"]):
                if i == config["warmup"]:
                    dist.barrier()
                    start = time.perf_counter()
                    cpu = _cpu_now(sender, aggregator)
                step += 1
                loss = train_step()
                if mode.startswith("none"):
                    continue
                if mode == "distsum":
                    for j, tag in enumerate(tags):
                        distsum.scalar(tag, loss + j, step)
                    for tag, values in zip(hist_tags, hists, strict=True):
                        distsum.histogram(tag, values, step)
                elif mode == "per_rank":
                    for j, tag in enumerate(tags):
                        writer.add_scalar(tag, loss + j, step)
                    for tag, values in zip(hist_tags, hists, strict=True):
                        writer.add_histogram(tag, values, step)
                else:
                    if mode == "allreduce":
                        stacked = torch.tensor([loss + j for j in range(len(tags))])
                        dist.all_reduce(stacked)
                        means = (stacked / world).tolist()
                    else:
                        means = []
                        for j in range(len(tags)):
                            value = torch.tensor(loss + j)
                            dist.all_reduce(value)
                            means.append(value.item() / world)
                    for tag, values in zip(hist_tags, hists, strict=True):
                        dist.gather(values, gathered, dst=0)
                        if rank == 0:
                            writer.add_histogram(tag, torch.cat(gathered), step)
                    if rank == 0:
                        for tag, mean in zip(tags, means, strict=True):
                            writer.add_scalar(tag, mean, step)
            elapsed = time.perf_counter() - start
            cpu_ms = {
                k: (v - cpu[k]) / config["steps"] * 1e3 for k, v in _cpu_now(sender, aggregator).items()
            }
            finish = 0.0
            if mode == "distsum":
                t = time.perf_counter()
                ok = distsum.finish(120)
                finish = time.perf_counter() - t
                if not ok:
                    raise RuntimeError(f"rank {rank}: distsum.finish() returned False")
            elif writer is not None:
                writer.close()
            results.append(
                {
                    "repeat": repeat,
                    "mode": mode,
                    "step_ms": elapsed / config["steps"] * 1e3,
                    "finish_s": finish,
                    "ready_s": ready,
                    "cpu_ms": cpu_ms,
                }
            )
            dist.barrier()
            shutil.rmtree(block, ignore_errors=True) if rank == 0 else None
    dist.destroy_process_group()
    with open(f"{root}/rank_{rank}.json", "w") as f:
        json.dump(results, f)


def job(
    world: int,
    steps: int,
    warmup: int,
    repeats: int,
    scalars: int = 100,
    histograms: int = 2,
    hist_size: int = 100_000,
    modes: list[str] | None = None,
) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    root = tempfile.mkdtemp(prefix="bench-ddp-")
    config = {
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "scalars": scalars,
        "histograms": histograms,
        "hist_size": hist_size,
        "modes": list(modes or MODES),
    }
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        tmp.spawn(_rank, args=(world, root, config), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(f"{root}/rank_{r}.json") as f:
                ranks.append(json.load(f))
        rows = ranks[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_ms: dict[str, list[float]] = {}
    overhead_ms: dict[str, list[float]] = {}
    # CPU per step over every rank process (and the embedded aggregator) beyond no logging's;
    # for distsum also its parts: the aggregator, the ranks' sender threads, the rest of the ranks.
    cpu_ms: dict[str, list[float]] = {}
    distsum_cpu_ms: dict[str, list[float]] = {}
    finish_s: list[float] = []
    ready_s: list[float] = []

    def cpu_of(repeat: int, mode: str) -> dict[str, float]:
        parts = [
            next(x for x in got if x["repeat"] == repeat and x["mode"] == mode)["cpu_ms"] for got in ranks
        ]
        total = {key: sum(p.get(key, 0.0) for p in parts) for key in ("process", "sender", "aggregator")}
        total["all"] = total["process"] + total["aggregator"]
        return total

    for repeat in range(repeats):
        by_mode = {r["mode"]: r for r in rows if r["repeat"] == repeat}
        base = (by_mode["none"]["step_ms"] + by_mode.pop(NONE_AGAIN)["step_ms"]) / 2
        base_cpu = (cpu_of(repeat, "none")["all"] + cpu_of(repeat, NONE_AGAIN)["all"]) / 2
        for mode, row in by_mode.items():
            step_ms.setdefault(mode, []).append(row["step_ms"])
            overhead_ms.setdefault(mode, []).append(row["step_ms"] - base)
            total = cpu_of(repeat, mode)
            cpu_ms.setdefault(mode, []).append(total["all"] - base_cpu)
            if mode == "distsum":
                finish_s.append(row["finish_s"])
                ready_s.append(row["ready_s"])
                distsum_cpu_ms.setdefault("aggregator", []).append(total["aggregator"])
                distsum_cpu_ms.setdefault("senders", []).append(total["sender"])
                distsum_cpu_ms.setdefault("rest of the ranks", []).append(
                    total["process"] - total["sender"] - base_cpu
                )
    return {
        "step_ms": step_ms,
        "overhead_ms": overhead_ms,
        "extra_cpu_ms": cpu_ms,
        "distsum_cpu_ms": distsum_cpu_ms,
        "distsum_finish_s": finish_s,
        "distsum_ready_s": ready_s,
    }


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    call_main({"job": job})
