"""The program of the article distsum grew from (TF1's tf.summary), with eager values.

Only the graph and session parts are replaced: ``session.run`` becomes a numpy forward/backward
pass of a small convolutional classifier on synthetic 28x28 digits. Every summary call, the
train/test writers, the merged summary per step, test accuracy every 10 steps, the weight and
gradient histograms and ``image('Conv1', ..., max_outputs=10)`` are the article's.
"""

from __future__ import annotations

import numpy as np

from distsum import summary
from tests.tbreaders import acc_histograms, acc_images, acc_scalars, acc_tags, accumulate, tbparse_read

STEPS = 1000


class Model:
    """conv(3x3, 1 filter) -> ReLU -> linear(784 -> 10) -> softmax, trained by plain SGD."""

    def __init__(self, rng):
        self.variables = {
            "conv1/kernel:0": rng.normal(0, 0.3, (3, 3)).astype(np.float32),
            "dense/kernel:0": rng.normal(0, 0.01, (784, 10)).astype(np.float32),
        }

    def conv1(self, x):
        k = self.variables["conv1/kernel:0"]
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        out = sum(k[i, j] * padded[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3))
        return np.maximum(out, 0), padded

    def run(self, images, labels):
        conv, padded = self.conv1(images)
        logits = conv.reshape(len(images), -1) @ self.variables["dense/kernel:0"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(len(labels)), labels] + 1e-9).mean()
        accuracy = (p.argmax(axis=1) == labels).mean()
        d_logits = p
        d_logits[np.arange(len(labels)), labels] -= 1
        d_logits /= len(labels)
        flat = conv.reshape(len(images), -1)
        grads = {"dense/kernel:0": flat.T @ d_logits}
        d_conv = (d_logits @ self.variables["dense/kernel:0"].T).reshape(conv.shape) * (conv > 0)
        grads["conv1/kernel:0"] = np.array(
            [[(d_conv * padded[:, i : i + 28, j : j + 28]).sum() for j in range(3)] for i in range(3)]
        )
        return conv, loss, accuracy, grads


def digits(rng, n, templates):
    labels = rng.integers(0, 10, n)
    images = templates[labels] + rng.normal(0, 0.5, (n, 28, 28))
    return images.astype(np.float32), labels


def test_the_articles_program_runs_and_tensorboard_shows_it(tmp_path):
    rng = np.random.default_rng(0)
    templates = rng.random((10, 28, 28)) > 0.7
    test_images, test_labels = digits(rng, 500, templates)
    model = Model(rng)
    log_dir = str(tmp_path)

    def session_run(images, labels, train):
        conv1_output, loss, accuracy, grads = model.run(images, labels)
        # The summaries the article defines, evaluated on this step's values.
        summary.scalar("loss", loss)
        summary.scalar("accuracy", accuracy)
        for i, variable in enumerate(model.variables.values()):
            summary.histogram(f"weights_{i}", variable)
        for (name, var), grad in zip(model.variables.items(), grads.values(), strict=True):
            summary.histogram(name.replace(":", "_") + "/gradient", grad)
            summary.histogram(name.replace(":", "_") + "/weight", var)
        conv1_reshape = conv1_output.reshape([-1, 28, 28, 1])
        summary.image("Conv1", conv1_reshape, max_outputs=10)
        merged = summary.merge_all()
        if train:
            for name, grad in grads.items():
                model.variables[name] -= 0.5 * grad.astype(np.float32)
        return merged.SerializeToString(), accuracy

    # The article's program, as it is, but for session.run.
    train_writer = summary.FileWriter(log_dir + "/train", b"")
    test_writer = summary.FileWriter(log_dir + "/test")
    accuracies = []
    for i in range(STEPS):
        batch = digits(rng, 100, templates)
        summary_, _ = session_run(batch[0], batch[1], train=True)
        train_writer.add_summary(summary_, i)
        if i % 10 == 0:
            summary_, acc = session_run(test_images, test_labels, train=False)
            test_writer.add_summary(summary_, i)
            accuracies.append(acc)
    train_writer.close()
    test_writer.close()

    assert accuracies[-1] > 0.9 > accuracies[0]  # it trained
    train, test = accumulate(tmp_path / "train"), accumulate(tmp_path / "test")
    assert [s for s, _ in acc_scalars(train, "loss")] == list(range(STEPS))
    assert [s for s, _ in acc_scalars(test, "accuracy")] == list(range(0, STEPS, 10))
    assert [v for _, v in acc_scalars(test, "accuracy")] == [float(np.float32(a)) for a in accuracies]
    histograms = {"weights_0", "weights_1", "conv1/kernel_0/gradient", "dense/kernel_0/weight"}
    assert histograms <= set(acc_tags(train, "histograms"))
    for step, rows in acc_histograms(train, "dense/kernel_0/weight")[:3]:
        assert rows[:, 2].sum() == 7840, step
    images = [t for t in acc_tags(train, "images")]
    assert sorted(images) == sorted(f"Conv1/image/{i}" for i in range(10))
    assert len(acc_images(test, "Conv1/image/9")) == STEPS // 10
    frames = tbparse_read(tmp_path)
    assert set(frames.scalars.dir_name) == {"train", "test"}
    assert len(frames.scalars[frames.scalars.dir_name == "train"]) == 2 * STEPS
