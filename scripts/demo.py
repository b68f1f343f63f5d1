"""distsum's demo: a 4-rank data-parallel job on the embedded aggregator, one TensorBoard run.

Each rank trains a replica of a small numpy classifier on its own stream of synthetic digits and
logs loss and accuracy, weight and gradient histograms, an image of its inputs, text, and a test
sub-run. distsum merges the ranks by step into one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

import distsum

WORLD = 4


def train(rank: int, logdir: str, steps: int) -> None:
    distsum.init(rank, WORLD, logdir=logdir)
    rng = np.random.default_rng(rank)
    templates = (np.random.default_rng(0).random((10, 28, 28)) > 0.7).astype(np.float32)

    def batch(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        return templates[labels] + rng.normal(0, 0.6, (n, 28, 28)).astype(np.float32), labels

    hidden = np.random.default_rng(1).normal(0, 0.05, (784, 64)).astype(np.float32)
    output = np.random.default_rng(2).normal(0, 0.05, (64, 10)).astype(np.float32)
    test_x, test_y = batch(500)
    test = distsum.writer("test")
    for step in range(steps):
        x, y = batch(64)
        h = np.maximum(x.reshape(64, -1) @ hidden, 0)
        logits = h @ output
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(64), y] + 1e-9).mean()
        d = p
        d[np.arange(64), y] -= 1
        d /= 64
        grad_output = h.T @ d
        grad_hidden = x.reshape(64, -1).T @ ((d @ output.T) * (h > 0))
        output -= 0.1 * grad_output
        hidden -= 0.1 * grad_hidden

        distsum.scalar("loss", loss, step)  # the mean over ranks
        distsum.scalar("loss_per_rank", loss, step, reduce="none")  # one line per rank
        distsum.scalar("accuracy", (p.argmax(1) == y).mean(), step, reduce=("mean", "min", "max"))
        if step % 10 == 0:
            distsum.histogram("hidden/weight", hidden, step)  # the histogram of all ranks' values
            distsum.histogram("hidden/gradient", grad_hidden, step)
            th = np.maximum(test_x.reshape(500, -1) @ hidden, 0)
            test.scalar("accuracy", ((th @ output).argmax(1) == test_y).mean(), step)
        if step % 50 == 0:
            distsum.image("inputs", np.clip(x[:1, :, :, None] / 2 + 0.25, 0, 1), step, max_outputs=WORLD)
            distsum.text("note", f"step {step}: loss {loss:.3f}", step)
    distsum.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default=os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S")))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    logdir = os.path.abspath(args.logdir)
    # Four ranks on a few cores: one BLAS thread each, as a launcher would set it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    ctx = multiprocessing.get_context("spawn")
    ranks = [ctx.Process(target=train, args=(r, logdir, args.steps)) for r in range(WORLD)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join()
    if any(p.exitcode for p in ranks):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in ranks]}")
    print(f"{WORLD} ranks wrote one run to {logdir}")
    print(f"Open it with:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
