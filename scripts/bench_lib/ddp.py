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

The overhead of a mode is its mean step time on rank 0 minus that of the ``none`` block of the
same repeat. distsum's ``finish()`` at the end of its block is timed apart (not per step).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from bench_lib.common import call_main

MODES = ("none", "distsum", "allreduce", "allreduce_each", "per_rank")


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
        for mode in config["modes"]:
            block = f"{root}/{mode}-{repeat}"
            writer = None
            if mode == "distsum":
                distsum.init(rank, world, logdir=block)
            elif mode == "per_rank":
                writer = SummaryWriter(f"{block}/rank_{rank}")
            elif mode.startswith("allreduce") and rank == 0:
                writer = SummaryWriter(block)
            gathered = [torch.empty(config["hist_size"]) for _ in range(world)] if rank == 0 else None
            dist.barrier()
            start = 0.0
            for i in range(config["warmup"] + config["steps"]):
                if i == config["warmup"]:
                    dist.barrier()
                    start = time.perf_counter()
                step += 1
                loss = train_step()
                if mode == "none":
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
        with open(f"{root}/rank_0.json") as f:
            rows = json.load(f)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_ms: dict[str, list[float]] = {}
    overhead_ms: dict[str, list[float]] = {}
    finish_s: list[float] = []
    for repeat in range(repeats):
        by_mode = {r["mode"]: r for r in rows if r["repeat"] == repeat}
        base = by_mode["none"]["step_ms"]
        for mode, row in by_mode.items():
            step_ms.setdefault(mode, []).append(row["step_ms"])
            overhead_ms.setdefault(mode, []).append(row["step_ms"] - base)
            if mode == "distsum":
                finish_s.append(row["finish_s"])
    return {"step_ms": step_ms, "overhead_ms": overhead_ms, "distsum_finish_s": finish_s}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    call_main({"job": job})
