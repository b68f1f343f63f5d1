"""Two hosts: the aggregator in one network namespace, ranks in another, joined by a veth pair.

The test makes the namespaces itself (``ip netns``, as root) and removes them; traffic stays on
the pair's own addresses inside them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.tbreaders import acc_scalars, accumulate

ADDR_A, ADDR_B = "10.213.0.1", "10.213.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's ip to make network namespaces")
    a, b = f"distsum-a-{os.getpid()}", f"distsum-b-{os.getpid()}"
    veth = f"dsv{os.getpid() % 100000}"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
        ip("link", "set", f"{veth}a", "netns", a)
        ip("link", "set", f"{veth}b", "netns", b)
        ip("-n", a, "addr", "add", f"{ADDR_A}/24", "dev", f"{veth}a")
        ip("-n", b, "addr", "add", f"{ADDR_B}/24", "dev", f"{veth}b")
        for ns, dev in ((a, f"{veth}a"), (b, f"{veth}b")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str, *command: str, extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(extra_env or {})}
    return subprocess.Popen(["ip", "netns", "exec", ns, *command], env=env, **kwargs)


RANK = textwrap.dedent(
    """
    import sys, distsum
    rank, addr = int(sys.argv[1]), sys.argv[2]
    distsum.init(rank, 2, addr=addr, run="over-the-wire")
    for step in range(20):
        distsum.scalar("loss", rank * 100 + step, step)
    sys.exit(0 if distsum.finish(timeout=60) else 3)
    """
)


def test_ranks_on_one_host_aggregator_on_another(two_hosts, tmp_path):
    a, b = two_hosts
    # Beyond loopback the aggregator requires keys: CURVE over the wire between the hosts.
    keys = tmp_path / "keys"
    for name in ("aggregator", "ranks"):
        subprocess.run([sys.executable, "-m", "distsum", "keygen", str(keys), "--name", name], check=True)
    allowed = keys / "allowed"
    allowed.mkdir()
    shutil.copy(keys / "ranks.key", allowed)
    daemon = in_ns(
        a,
        sys.executable,
        "-m",
        "distsum.aggregator",
        "--logdir",
        str(tmp_path / "runs"),
        "--bind",
        f"tcp://{ADDR_A}:0",
        "--world-size",
        "2",
        "--curve-secret",
        str(keys / "aggregator.key_secret"),
        "--curve-clients",
        str(allowed),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    try:
        line = daemon.stdout.readline()
        assert f"tcp://{ADDR_A}:" in line, line
        addr = line.split()[3].rstrip(",")
        rank_env = {
            "DISTSUM_CURVE_RANK_SECRET": str(keys / "ranks.key_secret"),
            "DISTSUM_CURVE_SERVER_KEY": str(keys / "aggregator.key"),
        }
        ranks = [in_ns(b, sys.executable, "-c", RANK, str(r), addr, extra_env=rank_env) for r in range(2)]
        assert [p.wait(120) for p in ranks] == [0, 0]
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    got = acc_scalars(accumulate(tmp_path / "runs" / "over-the-wire"), "loss")
    assert got == [(s, float(np.float32(50 + s))) for s in range(20)]


NODE = textwrap.dedent(
    """
    import os, sys, distsum
    distsum.init(logdir=sys.argv[1])
    rank = int(os.environ["RANK"])
    for step in range(10):
        distsum.scalar("value", rank + step, step, reduce=("mean", "max"))
        distsum.scalar("value_per_rank", rank + step, step, reduce="none")
    sys.exit(0 if distsum.finish(timeout=90) else 3)
    """
)


def test_torchrun_on_two_hosts_finds_the_embedded_aggregator_on_master_addr(two_hosts, tmp_path):
    pytest.importorskip("torch")
    a, b = two_hosts
    script = tmp_path / "node.py"
    script.write_text(NODE)
    run = tmp_path / "run"
    nodes = [
        in_ns(
            ns,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "2",
            "--master-addr",
            ADDR_A,
            "--master-port",
            "29650",
            str(script),
            str(run),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node, ns in ((0, a), (1, b))
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in nodes] == [0, 0], outputs
    acc = accumulate(run)
    assert acc_scalars(acc, "value") == [(s, 1.5 + s) for s in range(10)]
    assert acc_scalars(acc, "value/max") == [(s, 3.0 + s) for s in range(10)]
    for rank in range(4):
        assert acc_scalars(accumulate(run / f"rank_{rank}"), "value_per_rank") == [
            (s, float(rank + s)) for s in range(10)
        ]
