"""The front ends after distsum.init(): code written for rank 0, run on every rank, gives one run."""

from __future__ import annotations

import io
import json
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

import distsum
from distsum import summary
from distsum._histogram import Histogram
from tests.tbreaders import (
    acc_histograms,
    acc_hparams,
    acc_images,
    acc_scalars,
    acc_tags,
    acc_text,
    accumulate,
)

WORLD = 4


def run_ranks(target, *args) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD


def summary_writer_rank(rank: int, run: str, out: str) -> None:
    distsum.init(rank, WORLD, logdir=run, step_timeout=120)
    with pytest.raises(ValueError, match="outside the run directory"):
        distsum.SummaryWriter(os.path.join(os.path.dirname(run), "elsewhere"))
    rng = np.random.default_rng(rank)
    weights = {}
    with distsum.SummaryWriter() as writer, distsum.SummaryWriter(os.path.join(run, "eval")) as ev:
        assert os.path.abspath(writer.get_logdir()) == run
        for step in range(10):
            writer.add_scalar("loss", rank + step / 10, step)
            weights[step] = rng.normal(size=100).tolist()
            writer.add_histogram("weights", np.array(weights[step]), step)
            ev.add_scalar("accuracy", rank / 4, step)
        writer.add_image("picture", np.full((3, 4, 4), 60 * rank, np.uint8), 10)
        writer.add_text("who", f"rank {rank}", 10)
        writer.add_scalars("split", {"a": rank, "b": 2 * rank}, 10)
        writer.add_hparams({"lr": 0.1, "ranks": WORLD}, {"hp/final": float(rank)}, run_name="hp")
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
        json.dump(weights, f)
    assert distsum.finish(timeout=120)


def test_summary_writer_on_every_rank(tmp_path):
    run = str(tmp_path / "run")
    run_ranks(summary_writer_rank, run, str(tmp_path))
    acc = accumulate(run)
    assert acc_scalars(acc, "loss") == [
        (s, float(np.float32(np.mean([r + s / 10 for r in range(WORLD)])))) for s in range(10)
    ]
    logged = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(WORLD)]
    for step, rows in acc_histograms(acc, "weights"):
        union = np.concatenate([logged[r][str(step)] for r in range(WORLD)])
        np.testing.assert_allclose(rows, Histogram.from_values(union, tag="w").rows().astype(np.float32))
    ((_, (png,)),) = acc_images(acc, "picture")  # the lowest rank's image
    assert np.asarray(Image.open(io.BytesIO(png))).max() == 0
    ((_, text),) = acc_text(acc, "who")
    assert all(f"rank {r}" in text for r in range(WORLD))
    assert acc_scalars(accumulate(os.path.join(run, "eval")), "accuracy") == [
        (s, float(np.float32(np.mean([r / 4 for r in range(WORLD)])))) for s in range(10)
    ]
    assert acc_scalars(accumulate(os.path.join(run, "split_a")), "split") == [(10, 1.5)]
    assert acc_scalars(accumulate(os.path.join(run, "split_b")), "split") == [(10, 3.0)]
    hp = accumulate(os.path.join(run, "hp"))
    assert acc_hparams(hp) == {"lr": 0.1, "ranks": float(WORLD)}
    assert acc_scalars(hp, "hp/final") == [(0, 1.5)]
    assert sorted(os.listdir(tmp_path)) == ["rank_0.json", "rank_1.json", "rank_2.json", "rank_3.json", "run"]


STEPS = 60


def article_rank(rank: int, log_dir: str, out: str) -> None:
    from tests.test_article import Model, digits

    distsum.init(rank, WORLD, logdir=log_dir, step_timeout=120)
    rng = np.random.default_rng(100 + rank)
    templates = np.random.default_rng(0).random((10, 28, 28)) > 0.7
    test_images, test_labels = digits(rng, 200, templates)
    model = Model(np.random.default_rng(1))
    losses, accuracies = [], []

    def session_run(images, labels, train):
        conv1_output, loss, accuracy, grads = model.run(images, labels)
        summary.scalar("loss", loss)
        summary.scalar("accuracy", accuracy)
        for i, variable in enumerate(model.variables.values()):
            summary.histogram(f"weights_{i}", variable)
        summary.image("Conv1", conv1_output.reshape([-1, 28, 28, 1]), max_outputs=10)
        merged = summary.merge_all()
        if train:
            for name, grad in grads.items():
                model.variables[name] -= 0.5 * grad.astype(np.float32)
        return merged.SerializeToString(), loss, accuracy

    train_writer = summary.FileWriter(log_dir + "/train", b"")
    test_writer = summary.FileWriter(log_dir + "/test")
    for i in range(STEPS):
        batch = digits(rng, 50, templates)
        summary_, loss, _ = session_run(batch[0], batch[1], train=True)
        train_writer.add_summary(summary_, i)
        losses.append(float(loss))
        if i % 10 == 0:
            summary_, _, acc = session_run(test_images, test_labels, train=False)
            test_writer.add_summary(summary_, i)
            accuracies.append(float(acc))
    train_writer.close()
    test_writer.close()
    with open(os.path.join(out, f"article_{rank}.json"), "w") as f:
        json.dump({"loss": losses, "accuracy": accuracies}, f)
    assert distsum.finish(timeout=120)


def test_the_articles_program_on_four_ranks(tmp_path):
    log_dir = str(tmp_path / "logs")
    run_ranks(article_rank, log_dir, str(tmp_path))
    logged = [json.loads((tmp_path / f"article_{r}.json").read_text()) for r in range(WORLD)]
    train, test = accumulate(os.path.join(log_dir, "train")), accumulate(os.path.join(log_dir, "test"))
    expected_loss = np.mean([x["loss"] for x in logged], axis=0)
    got = acc_scalars(train, "loss")
    assert [s for s, _ in got] == list(range(STEPS))
    np.testing.assert_allclose([v for _, v in got], expected_loss.astype(np.float32), rtol=1e-6)
    expected_acc = np.mean([x["accuracy"] for x in logged], axis=0)
    got = acc_scalars(test, "accuracy")
    assert [s for s, _ in got] == list(range(0, STEPS, 10))
    np.testing.assert_allclose([v for _, v in got], expected_acc.astype(np.float32), rtol=1e-6)
    assert {"weights_0", "weights_1"} <= set(acc_tags(train, "histograms"))
    for _, rows in acc_histograms(train, "weights_1")[:2]:
        assert rows[:, 2].sum() == 7840 * WORLD
    assert sorted(acc_tags(train, "images")) == sorted(f"Conv1/image/{i}" for i in range(10))
    # One run per writer, not one per rank (the run itself holds the aggregator's health series).
    names = [n for n in os.listdir(log_dir) if "tfevents" not in n]
    assert sorted(names) == ["distsum-aggregator.log", "test", "train"]
