"""distsum's demo: a small classifier trained with numpy, logged with distsum.

Writes loss and accuracy, weight and gradient histograms, an image of the inputs and the
first layer's output, and train/test sub-runs, then says where the run is.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import distsum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default=os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S")))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    templates = (rng.random((10, 28, 28)) > 0.7).astype(np.float32)

    def batch(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        return templates[labels] + rng.normal(0, 0.6, (n, 28, 28)).astype(np.float32), labels

    hidden = rng.normal(0, 0.05, (784, 64)).astype(np.float32)
    output = rng.normal(0, 0.05, (64, 10)).astype(np.float32)
    test_x, test_y = batch(500)

    with (
        distsum.SummaryWriter(os.path.join(args.logdir, "train")) as train,
        distsum.SummaryWriter(os.path.join(args.logdir, "test")) as test,
    ):
        for step in range(args.steps):
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

            train.add_scalar("loss", loss, step)
            train.add_scalar("accuracy", (p.argmax(1) == y).mean(), step)
            if step % 10 == 0:
                train.add_histogram("hidden/weight", hidden, step)
                train.add_histogram("hidden/gradient", grad_hidden, step)
                train.add_histogram("output/weight", output, step)
                th = np.maximum(test_x.reshape(500, -1) @ hidden, 0)
                test.add_scalar("accuracy", ((th @ output).argmax(1) == test_y).mean(), step)
            if step % 50 == 0:
                train.add_images("inputs", np.clip(x[:8, None] / 2 + 0.25, 0, 1), step)
                train.add_text("note", f"step {step}: loss {loss:.3f}", step)

    print(f"Wrote the run to {os.path.abspath(args.logdir)}")
    print(f"Open it with:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
