"""Real launchers start a real 4-rank job; the run it leaves is read back with TensorBoard's loader.

* ``torchrun``: ``python -m torch.distributed.run --standalone --nproc-per-node 4`` (the c10d
  rendezvous store binds port 0, so concurrent runs cannot race for a port), a tiny model trained
  with DDP over gloo on the CPU (``tests/launched_job.py torch``).
* ``mpirun``: Open MPI's launcher (Debian's ``openmpi-bin``), a numpy-only job
  (``tests/launched_job.py numpy``). Skipped when ``mpirun`` is not on ``PATH``.

Neither job passes a rank or a world size to ``distsum.init()``: distsum takes them and the job id
from the launcher's environment, rank 0 starts the embedded aggregator and the other ranks find it.
Each rank also writes what it logged to ``rank_<r>.json``, from which the expected merged run is
computed with numpy. Each job runs once per module (fixture ``job``); the tests check its exit,
the merged run, and that it leaves no process and no socket file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distsum._histogram import Histogram
from tests.launched_job import EVAL_EVERY, STEPS
from tests.tbreaders import acc_histograms, acc_scalars, acc_tags, accumulate, event_files, poll_until

WORLD = 4
REPO = Path(__file__).resolve().parent.parent
JOB_SCRIPT = Path(__file__).resolve().with_name("launched_job.py")
# Generous next to what the jobs take (torchrun 9-16 s, mpirun 2-3 s on 2 cores); past
# this the job is killed and the tests fail with its output.
JOB_TIMEOUT = {"torchrun": 75.0, "mpirun": 45.0}

# Variables by which a launcher hands out ranks and job ids: a test session that itself runs
# under a launcher must not pass its own to the job it starts.
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK"}
_LAUNCHER_VARS |= {"MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE", "PMI_ID", "MPI_LOCALRANKID"}
_LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_", "DISTSUM_")

# The root run's own series and the runs the job's calls create (NONE reductions: rank_<r>).
ROOT_SCALARS = {"loss", "local_loss_range", "local_loss_range/min", "samples", "samples/min", "samples/max"}
HISTOGRAMS = ("gradients", "residuals")
RUNS = {"", "test", *(f"rank_{r}" for r in range(WORLD)), *(f"test/rank_{r}" for r in range(WORLD))}


def f32(value: float) -> float:
    """What a ``simple_value`` (float32) holding ``value`` reads back as."""
    return float(np.float32(value))


# --------------------------------------------------------------------------------------------------
# Running a job and cleaning up after it
# --------------------------------------------------------------------------------------------------


def _live_processes_mentioning(marker: str) -> dict[int, str]:
    """``{pid: cmdline}`` of the live (non-zombie) processes whose command line contains ``marker``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue  # gone meanwhile
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if marker in cmdline and state != "Z":
            found[int(entry)] = cmdline
    return found


def _kill_all(pgid: int, marker: str) -> None:
    """SIGKILL the launcher's process group and every process naming the job's directory.

    The embedded aggregator runs in a session of its own, so the group alone would miss it; its
    command line names the run directory, which is inside the job's directory.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for pid in _live_processes_mentioning(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _job_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclasses.dataclass
class Job:
    launcher: str
    directory: Path
    logdir: Path
    command: list[str]
    returncode: int | None  # None: killed after the timeout
    output: str
    seconds: float
    results: list[dict[str, Any]]  # rank_<r>.json of each rank that wrote one, in rank order
    leftovers: dict[int, str]  # processes still alive 10 s after the launcher exited (then killed)
    socket_left: bool
    started: float  # wall time of the launch

    def describe(self) -> str:
        log = self.logdir / "distsum-aggregator.log"
        aggregator_log = log.read_text(errors="replace") if log.exists() else "<none>"
        return (
            f"command: {' '.join(self.command)}\nexit status: {self.returncode}, {self.seconds:.1f} s\n"
            f"job directory (run, per-rank JSON, full output): {self.directory}\n"
            f"output (last 6000 characters):\n{self.output[-6000:]}\n"
            f"aggregator log (last 3000 characters):\n{aggregator_log[-3000:]}"
        )

    def require_success(self) -> None:
        if self.returncode != 0 or len(self.results) != WORLD:
            pytest.fail(
                f"the {self.launcher} job failed ({len(self.results)} of {WORLD} ranks reported)\n"
                + self.describe(),
                pytrace=False,
            )

    def timings(self) -> str:
        """Per rank, when it reached each phase, in seconds since the launcher was started."""
        lines = [f"{self.launcher}: {self.seconds:.1f} s from launch to exit"]
        for result in self.results:
            times = result["times"]
            phases = "  ".join(f"{name} {t - self.started:.1f}" for name, t in times.items())
            lines.append(f"  rank {result['rank']}: {phases}")
        return "\n".join(lines)


def run_job(launcher: str, directory: Path) -> Job:
    logdir, outdir = directory / "run", directory / "out"
    outdir.mkdir()
    job_args = [str(JOB_SCRIPT), "torch" if launcher == "torchrun" else "numpy", str(logdir), str(outdir)]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(WORLD), "--max-restarts", "0", *job_args]
    else:
        # As root, Open MPI wants --allow-run-as-root; four ranks on two cores, --oversubscribe.
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
        command += ["-n", str(WORLD), sys.executable, *job_args]
    # Every process of the job names a path in the job's directory: the launcher and the ranks
    # in their arguments, the embedded aggregator in --logdir.
    marker = str(directory) + os.sep
    started_wall = time.time()
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=directory,
        env=_job_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a timeout can stop all of it
    )
    try:
        raw, _ = proc.communicate(timeout=JOB_TIMEOUT[launcher])
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_all(proc.pid, marker)
        raw, _ = proc.communicate()
        returncode = None
    except BaseException:  # the test session interrupted: stop the job before going
        _kill_all(proc.pid, marker)
        proc.communicate()
        raise
    seconds = time.monotonic() - started
    output = raw.decode("utf-8", "replace")
    if returncode is None:
        output += f"\n<killed after {JOB_TIMEOUT[launcher]:g} s>"
    (directory / "launcher-output.txt").write_text(output)  # kept with the run, for a post-mortem

    # The launcher is gone; its workers and the embedded aggregator must follow within moments.
    leftovers = {}
    try:
        poll_until(lambda: _live_processes_mentioning(marker), lambda found: not found, timeout=10.0)
    except TimeoutError:
        leftovers = _live_processes_mentioning(marker)
        _kill_all(proc.pid, marker)

    results = []
    for rank in range(WORLD):
        path = outdir / f"rank_{rank}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))

    # The embedded aggregator's ipc:// socket file, at the path the ranks derived.
    socket_left = False
    for address in {r["address"] for r in results if r["address"].startswith("ipc://")}:
        socket_path = address.removeprefix("ipc://")
        socket_left = socket_left or os.path.exists(socket_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)  # don't litter the temp directory, whatever the test says

    return Job(
        launcher,
        directory,
        logdir,
        command,
        returncode,
        output,
        seconds,
        results,
        leftovers,
        socket_left,
        started_wall,
    )


@pytest.fixture(scope="module", params=["torchrun", "mpirun"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One job per launcher, run once for all the tests of this module."""
    launcher: str = request.param
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Debian: apt-get install openmpi-bin)")
    result = run_job(launcher, tmp_path_factory.mktemp(launcher))
    print(result.timings())
    return result


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_every_rank_ran_under_the_launcher(job: Job) -> None:
    job.require_success()
    assert [r["rank"] for r in job.results] == list(range(WORLD))
    assert {r["world"] for r in job.results} == {WORLD}
    assert all(r["flushed"] and r["finished"] for r in job.results)
    # One job id from the launcher, seen by every rank, and so one ipc:// address for all of them
    # (one machine: no TCP), derived by each rank on its own.
    job_ids = {r["job_id"] for r in job.results}
    assert len(job_ids) == 1 and None not in job_ids, job_ids
    addresses = {r["address"] for r in job.results}
    assert len(addresses) == 1 and addresses.pop().startswith("ipc://"), addresses
    assert {r["run_dir"] for r in job.results} == {str(job.logdir)}
    # Rank 0, and only rank 0, started the embedded aggregator.
    assert job.results[0]["aggregator_pid"] is not None
    assert [r["aggregator_pid"] for r in job.results[1:]] == [None] * (WORLD - 1)
    assert len({r["pid"] for r in job.results}) == WORLD


def _rank_values(job: Job, tag: str, step: int) -> list[float]:
    return [r["scalars"][tag][str(step)] for r in job.results]


def _check_histogram(rows: np.ndarray, values: np.ndarray, tag: str) -> None:
    expected = Histogram.from_values(values, tag=tag)
    assert rows.dtype == np.float64 and rows.shape[1] == 3
    np.testing.assert_array_equal(rows, expected.rows())
    assert rows[0, 0] == expected.min == float(values.min())
    assert rows[-1, 1] == expected.max == float(values.max())
    assert int(rows[:, 2].sum()) == expected.num == values.size
    # The buckets partition [min, max]: each holds the values in [left, right), the last one max too.
    lefts, rights = rows[:, 0], rows[:, 1]
    counts = [np.count_nonzero((values >= lo) & (values < hi)) for lo, hi in zip(lefts, rights, strict=True)]
    counts[-1] += np.count_nonzero(values == rights[-1])
    assert counts == rows[:, 2].astype(np.int64).tolist()


def test_the_merged_run_holds_every_rank(job: Job) -> None:
    job.require_success()
    logdir = job.logdir
    runs = {os.path.relpath(d, logdir).replace(os.sep, "/") for d, _, _ in os.walk(logdir) if event_files(d)}
    assert {"" if r == "." else r for r in runs} == RUNS  # and so no late/rank_<r> run: nothing was late

    acc = accumulate(logdir)
    own = {t for t in acc_tags(acc, "scalars") if not t.startswith("distsum/")}
    assert own == ROOT_SCALARS
    assert acc_tags(acc, "histograms") == sorted(HISTOGRAMS)
    steps = list(range(STEPS))

    reductions: dict[str, Callable[[np.ndarray], Any]] = {
        "loss": np.mean,
        "samples": np.sum,
        "samples/min": np.min,
        "samples/max": np.max,
        "local_loss_range": np.max,
        "local_loss_range/min": np.min,
    }
    for tag, reduce in reductions.items():
        logged = tag.split("/")[0]
        expected = [(s, f32(reduce(np.array(_rank_values(job, logged, s), dtype=np.float64)))) for s in steps]
        assert acc_scalars(acc, tag) == expected, tag
    # Unequal shards (16 + 4 r samples): the sum and the extremes are known outright.
    assert {v for _, v in acc_scalars(acc, "samples")} == {float(sum(16 + 4 * r for r in range(WORLD)))}

    for rank in range(WORLD):
        per_rank = accumulate(logdir / f"rank_{rank}")
        assert acc_tags(per_rank, "scalars") == ["local_loss", "local_loss_range"]
        for tag in ("local_loss", "local_loss_range"):
            logged = job.results[rank]["scalars"][tag]
            assert acc_scalars(per_rank, tag) == [(s, f32(logged[str(s)])) for s in steps]

    for tag in HISTOGRAMS:
        histograms = acc_histograms(acc, tag)
        assert [s for s, _ in histograms] == steps, tag
        for step, rows in histograms:
            values = np.concatenate(
                [np.asarray(r["histograms"][tag][str(step)], dtype=np.float32) for r in job.results]
            )
            _check_histogram(rows, values, tag)
    if job.launcher == "torchrun":
        # DDP really ran: every rank saw the same averaged gradients.
        for step in steps:
            grads = [r["histograms"]["gradients"][str(step)] for r in job.results]
            assert all(g == grads[0] for g in grads[1:]), step

    eval_steps = list(range(0, STEPS, EVAL_EVERY))
    test = accumulate(logdir / "test")
    assert acc_tags(test, "scalars") == ["eval_loss"]
    assert acc_scalars(test, "eval_loss") == [
        (s, f32(np.mean(np.array(_rank_values(job, "test/eval_loss", s))))) for s in eval_steps
    ]
    for rank in range(WORLD):
        logged = job.results[rank]["scalars"]["test/eval_loss"]
        per_rank = accumulate(logdir / "test" / f"rank_{rank}")
        assert acc_scalars(per_rank, "eval_loss") == [(s, f32(logged[str(s)])) for s in eval_steps]

    # The aggregator's own series: nothing was late or dropped. (ranks_alive counts the ranks not
    # yet finished when a step is written, which for the fast numpy job may be any of 0..4.)
    assert {v for _, v in acc_scalars(acc, "distsum/ranks_alive")} <= {float(n) for n in range(WORLD + 1)}
    assert {v for _, v in acc_scalars(acc, "distsum/late_records")} == {0.0}
    assert {v for _, v in acc_scalars(acc, "distsum/dropped_records")} == {0.0}


def test_no_process_is_left_behind(job: Job) -> None:
    # Checked even when the job failed: a failed job must not leave anything running either.
    assert job.leftovers == {}, (
        "alive 10 s after the launcher exited (now killed):\n"
        + "".join(f"  {pid}: {cmd}\n" for pid, cmd in sorted(job.leftovers.items()))
        + job.describe()
    )
    if job.results:
        aggregator = job.results[0]["aggregator_pid"]
        assert aggregator not in _live_processes_mentioning(str(job.directory) + os.sep)


def test_the_embedded_aggregator_removes_its_socket_file(job: Job) -> None:
    job.require_success()
    assert not job.socket_left
