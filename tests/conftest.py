"""Shared fixtures: real TensorBoard servers, and a check that the test session leaves no process behind.

Tests that start a TensorBoard server carry the ``tensorboard_server`` marker (added automatically to
every test that uses the ``tensorboard_server`` fixture): ``pytest -m "not tensorboard_server"`` skips
them, ``pytest -m tensorboard_server`` runs only them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.tbreaders import (
    TensorBoardServer,
    live_child_processes,
    live_server_process_groups,
    poll_until,
)

ServerFactory = Callable[..., TensorBoardServer]

# Long-lived helpers of the standard library that may legitimately outlive a test session's tests.
_BENIGN_CHILDREN = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tensorboard_server: starts a real TensorBoard subprocess over HTTP (a few seconds each)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tensorboard_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tensorboard_server)


@pytest.fixture(params=[True, False], ids=["load_fast", "load_slow"])
def load_fast(request: pytest.FixtureRequest) -> bool:
    """Both TensorBoard loaders: True is the Rust data server, False the Python multiplexer."""
    value: bool = request.param
    return value


@pytest.fixture
def tensorboard_server() -> Iterator[ServerFactory]:
    """Factory: ``tensorboard_server(logdir, load_fast=..., **kwargs)`` starts a ``TensorBoardServer``.

    Every server it started is closed when the test ends, even if the test failed, and the close
    waits until none of the server's processes (TensorBoard and its data server) is left.
    """
    started: list[TensorBoardServer] = []

    def start(logdir: str | os.PathLike[str], *, load_fast: bool = True, **kwargs: Any) -> TensorBoardServer:
        server = TensorBoardServer(logdir, load_fast=load_fast, **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    errors = []
    for server in reversed(started):
        try:
            server.close()
        except Exception as e:  # close the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]


def _live_children(pid: int) -> dict[int, str]:
    return {p: c for p, c in live_child_processes(pid) if not any(b in c for b in _BENIGN_CHILDREN)}


@pytest.fixture(scope="session", autouse=True)
def _no_processes_left_behind() -> Iterator[None]:
    """Fail the session if a test left a child process or a TensorBoard process group running."""
    me = os.getpid()
    before = set(_live_children(me))
    yield

    def leftovers() -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
        children = {p: c for p, c in _live_children(me).items() if p not in before}
        groups = {g: m for g, m in live_server_process_groups().items() if m}
        return children, groups

    try:
        # A process killed a moment ago may still be exiting: allow a few seconds.
        poll_until(leftovers, lambda found: not found[0] and not found[1], timeout=5.0, interval=0.1)
        return
    except TimeoutError:
        pass
    children, groups = leftovers()
    # TensorBoard groups are ours to stop; other children are only reported.
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    pytest.fail(
        "processes left behind by the test session:\n"
        + "".join(f"  child {p}: {c}\n" for p, c in sorted(children.items()))
        + "".join(f"  TensorBoard process group {g}: {members}\n" for g, members in sorted(groups.items())),
        pytrace=False,
    )
