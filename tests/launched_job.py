"""A small training job that ``tests/test_launchers.py`` starts under a real launcher.

    python tests/launched_job.py torch LOGDIR OUTDIR    # under torchrun: DDP over gloo, on the CPU
    python tests/launched_job.py numpy LOGDIR OUTDIR    # under mpirun: numpy only, no torch

Every rank logs through distsum into the run directory LOGDIR, with rank, world size and job id
taken from the launcher's environment by ``distsum.init()``, and writes what it logged to
``OUTDIR/rank_<r>.json``, so the test can compute what the merged run must hold. Floats go through
JSON as ``repr`` and come back bit for bit; histogram values are float32 in both modes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

import distsum

STEPS = 20
EVAL_EVERY = 5
FEATURES = 16


class Record:
    """What this rank logged: scalars as ``{tag: {step: value}}``, histograms as value lists."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.histograms: dict[str, dict[int, list[float]]] = {}
        self.times: dict[str, float] = {"started": time.time()}

    def mark(self, phase: str) -> None:
        """Note when this rank reached ``phase`` (wall time, for the test's timing report)."""
        self.times[phase] = time.time()

    def scalar(self, tag: str, value: float, step: int, **kwargs: Any) -> None:
        distsum.scalar(tag, value, step, **kwargs)
        self.scalars.setdefault(tag, {})[step] = value

    def test_scalar(self, tag: str, value: float, step: int, **kwargs: Any) -> None:
        distsum.writer("test").scalar(tag, value, step, **kwargs)
        self.scalars.setdefault("test/" + tag, {})[step] = value

    def histogram(self, tag: str, values: Any, step: int) -> None:
        distsum.histogram(tag, values, step)
        array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
        assert array.dtype == np.float32, array.dtype
        self.histograms.setdefault(tag, {})[step] = array.reshape(-1).tolist()


def rank_and_world() -> tuple[int, int]:
    """This rank as the launcher numbers it (distsum reads the same variables)."""
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    raise SystemExit("launched_job.py: no launcher rank in the environment")


def train_torch(rank: int, world: int, record: Record) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # four ranks share two cores
    record.mark("torch imported")
    dist.init_process_group("gloo")
    record.mark("process group ready")
    try:
        assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
        torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
        model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)
        true_w = torch.linspace(-1.0, 1.0, FEATURES)
        batch = 16 + 4 * rank  # unequal shards: the sums and extremes across ranks are known
        x_eval = torch.randn(64, FEATURES, generator=data)
        y_eval = x_eval @ true_w
        for step in range(STEPS):
            x = torch.randn(batch, FEATURES, generator=data)
            y = x @ true_w + 0.1 * torch.randn(batch, generator=data)
            optimizer.zero_grad()
            prediction = ddp(x).squeeze(1)
            loss = torch.nn.functional.mse_loss(prediction, y)
            loss.backward()  # DDP averages the gradients over the ranks here
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
            value = float(loss.item())
            record.scalar("loss", value, step)
            record.scalar("local_loss", value, step, reduce="none")
            record.scalar("local_loss_range", value, step, reduce=("max", "none", "min"))
            record.scalar("samples", float(batch), step, reduce=("sum", "min", "max"))
            record.histogram("gradients", grads, step)  # a torch tensor, as users pass it
            record.histogram("residuals", (prediction - y).detach(), step)
            optimizer.step()
            if step % EVAL_EVERY == 0:
                with torch.no_grad():
                    eval_loss = float(torch.nn.functional.mse_loss(model(x_eval).squeeze(1), y_eval))
                record.test_scalar("eval_loss", eval_loss, step, reduce=("mean", "none"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_numpy(rank: int, world: int, record: Record) -> None:
    # Linear regression by gradient descent, one independent model per rank (no MPI bindings).
    rng = np.random.default_rng(200 + rank)
    true_w = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32)
    batch = 16 + 4 * rank
    w = np.zeros(FEATURES, dtype=np.float32)
    x_eval = rng.standard_normal((64, FEATURES), dtype=np.float32)
    y_eval = x_eval @ true_w
    for step in range(STEPS):
        x = rng.standard_normal((batch, FEATURES), dtype=np.float32)
        y = x @ true_w + np.float32(0.1) * rng.standard_normal(batch, dtype=np.float32)
        residuals = x @ w - y
        value = float(np.mean(residuals * residuals))
        grads = (np.float32(2.0 / batch) * (x.T @ residuals)).astype(np.float32)
        record.scalar("loss", value, step)
        record.scalar("local_loss", value, step, reduce="none")
        record.scalar("local_loss_range", value, step, reduce=("max", "none", "min"))
        record.scalar("samples", float(batch), step, reduce=("sum", "min", "max"))
        record.histogram("gradients", grads, step)
        record.histogram("residuals", residuals, step)
        w -= np.float32(0.05) * grads
        if step % EVAL_EVERY == 0:
            eval_residuals = x_eval @ w - y_eval
            record.test_scalar("eval_loss", float(np.mean(eval_residuals**2)), step, reduce=("mean", "none"))


def main() -> None:
    mode, logdir, outdir = sys.argv[1:4]
    rank, world = rank_and_world()
    record = Record()
    distsum.init(logdir=logdir, step_timeout=30)
    record.mark("distsum ready")
    state = distsum._api._state
    assert state is not None
    aggregator_pid = state.aggregator.pid if state.aggregator is not None else None
    job_id = distsum._api._job_id()
    if mode == "torch":
        train_torch(rank, world, record)
    elif mode == "numpy":
        train_numpy(rank, world, record)
    else:
        raise SystemExit(f"launched_job.py: unknown mode {mode!r}")
    record.mark("trained")
    flushed = distsum.flush(timeout=30)
    record.mark("flushed")
    finished = distsum.finish(timeout=30)
    record.mark("finished")
    result = {
        "rank": rank,
        "world": world,
        "pid": os.getpid(),
        "aggregator_pid": aggregator_pid,
        "job_id": job_id,
        "address": state.client.addr,
        "run_dir": state.run_dir,
        "flushed": flushed,
        "finished": finished,
        "times": record.times,
        "scalars": {tag: {str(s): v for s, v in values.items()} for tag, values in record.scalars.items()},
        "histograms": {
            tag: {str(s): v for s, v in values.items()} for tag, values in record.histograms.items()
        },
    }
    path = os.path.join(outdir, f"rank_{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    if not (flushed and finished):
        raise SystemExit(f"rank {rank}: flush {flushed}, finish {finished}")


if __name__ == "__main__":
    main()
