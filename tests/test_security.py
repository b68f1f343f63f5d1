"""Who may write: loopback by default, CURVE keys beyond it, nothing from a sender without a key."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest

import distsum
from distsum._security import is_local
from tests.daemon import start_daemon, stop_daemon
from tests.tbreaders import acc_scalars, accumulate


def keygen(directory, name: str) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "distsum", "keygen", str(directory), "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    public, secret = (line.split(": ", 1)[1] for line in out.splitlines())
    return public, secret


@pytest.mark.parametrize(
    ("addr", "local"),
    [
        ("tcp://127.0.0.1:0", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://[::1]:0", True),
        ("tcp://localhost:0", True),
        ("ipc:///tmp/x.sock", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.213.0.1:5555", False),
    ],
)
def test_what_counts_as_this_machine_only(addr, local):
    assert is_local(addr) is local


def test_importing_distsum_leaves_the_authenticator_to_the_aggregators_that_use_keys():
    # zmq.auth.thread brings in asyncio: tens of milliseconds at every rank's import, for nothing.
    code = "import sys, distsum; print('zmq.auth.thread' in sys.modules, 'asyncio' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["False", "False"]


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distsum.aggregator", "--logdir", str(tmp_path), "--bind", "tcp://0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on tcp://0.0.0.0:0 without authentication" in result.stderr
    assert "--insecure" in result.stderr


def rank(run: str, addr: str, secret: str | None, server: str | None, steps: int, timeout: float, result):
    options = {"curve_secret": secret, "curve_server_key": server} if secret else {}
    distsum.init(0, 1, addr=addr, run=run, **options)
    for step in range(steps):
        distsum.scalar("x", step, step)
    result.put(distsum.finish(timeout=timeout))


def run_rank(*args) -> bool:
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    p = ctx.Process(target=rank, args=(*args, result))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    return result.get(timeout=10)


def test_only_ranks_with_an_allowed_key_get_anything_in(tmp_path):
    keys = tmp_path / "keys"
    _, server_secret = keygen(keys / "server", "aggregator")
    server_public = str(keys / "server" / "aggregator.key")
    allowed_public, allowed_secret = keygen(keys / "ranks", "rank")
    _, stranger_secret = keygen(keys / "strangers", "stranger")
    clients = keys / "allowed"
    clients.mkdir()
    shutil.copy(allowed_public, clients)
    logdir = tmp_path / "runs"
    proc, addr = start_daemon(
        logdir, "--curve-secret", server_secret, "--curve-clients", str(clients), "--world-size", "1"
    )
    try:
        assert run_rank("allowed", addr, allowed_secret, server_public, 5, 60)
        # A real unauthorised socket: CURVE keys the aggregator does not know.
        assert not run_rank("stranger", addr, stranger_secret, server_public, 5, 3)
        # And one without any keys.
        assert not run_rank("plain", addr, None, None, 5, 3)
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err
    assert acc_scalars(accumulate(logdir / "allowed"), "x") == [(s, float(s)) for s in range(5)]
    assert sorted(os.listdir(logdir)) == ["allowed"]


def test_a_rank_needs_both_keys():
    with pytest.raises(ValueError, match="go together"):
        distsum.init(0, 1, addr="tcp://127.0.0.1:1", run="r", curve_secret="x")
