"""The launchers (tools/launch.py: `run_group`, `Server`; examples/disagg/launch.py) leave no
process behind when they get SIGTERM or SIGHUP: a launcher subprocess starts dummy
children through the real code path (a shell that runs `sleep` in its process group, in
place of vLLM), the test signals the launcher, and every child group must be gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A process group of two, like vLLM's front process and its engine: a shell and its sleep.
# It names itself by creating the file $PIDS/<its pid> (= its group id).
CHILD = 'sleep 600 & : > "$PIDS/$$"; wait'

# name -> (child groups it starts, launcher code); the code sees os, signal, sys, REPO,
# FAKE_BIN (a folder whose `vllm` is CHILD) and WORKDIR.
LAUNCHERS = {
    "run_group": (1, f"""
from tools.launch import run_group
run_group(["sh", "-c", {CHILD!r}], dict(os.environ), 600)
"""),
    "Server": (1, """
import tools.launch as launch
launch.VENV_BIN = FAKE_BIN
with launch.Server("model", [], dict(os.environ)):
    pass
"""),
    "disagg": (2, """
import importlib.util
spec = importlib.util.spec_from_file_location("disagg", REPO / "examples/disagg/launch.py")
launch = importlib.util.module_from_spec(spec)
sys.modules["disagg"] = launch
spec.loader.exec_module(launch)
launch.VENV_BIN = FAKE_BIN
launch.main(["--model", "model", "--workdir", str(WORKDIR), "--port", "1"])
"""),
}  # fmt: skip
# run_group, with SIGTERM arriving while Popen starts the child: after the fork, before
# the launcher has registered the child.
SIGNALLED_WHILE_STARTING = f"""
import subprocess, time
import tools.launch as launch
class SignalledWhileStarting(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        while not os.listdir(os.environ["PIDS"]):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs in here
launch.subprocess.Popen = SignalledWhileStarting
launch.run_group(["sh", "-c", {CHILD!r}], dict(os.environ), 600)
"""


def _group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp, ...
                members.append(int(stat.parent.name))
    return members


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return value


class Launcher:
    """One launcher subprocess, in a session of its own, and the child groups it started."""

    def __init__(self, tmp_path: Path, body: str, ignore_sighup: bool):
        self.pids = tmp_path / "pids"
        self.pids.mkdir()
        fake_bin = tmp_path / "bin"  # `vllm` for Server and the disagg launcher
        fake_bin.mkdir()
        (fake_bin / "vllm").write_text(f"#!/bin/sh\n{CHILD}\n")
        (fake_bin / "vllm").chmod(0o755)
        prelude = "import os, signal, sys\nfrom pathlib import Path\n"
        prelude += f"REPO = Path({str(REPO)!r})\nFAKE_BIN = Path({str(fake_bin)!r})\n"
        prelude += f"WORKDIR = Path({str(tmp_path / 'work')!r})\n"
        if ignore_sighup:  # as `nohup` does
            prelude += "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + body],
            env={**os.environ, "PIDS": str(self.pids), "PYTHONPATH": str(REPO)},
            cwd=tmp_path,
            start_new_session=True,
        )
        self.groups: list[int] = []

    def started_groups(self) -> list[int]:
        """The group ids of the children that announced themselves."""
        return [int(p.name) for p in self.pids.iterdir()]

    def wait_started(self, count: int) -> None:
        """Wait until `count` child groups run, two processes each."""

        def started() -> list[int]:
            assert self.proc.poll() is None, f"launcher exited {self.proc.returncode}"
            groups = self.started_groups()
            ready = len(groups) == count and all(len(_group_members(g)) == 2 for g in groups)
            return groups if ready else []

        self.groups = _wait_for(started, 30, f"{count} child groups")

    def cleanup(self) -> None:
        for pgid in {*self.groups, *self.started_groups(), self.proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def launcher(tmp_path):
    started = []

    def start(name: str, ignore_sighup: bool = False, body: str = "") -> Launcher:
        """LAUNCHERS[name], or `body`; wait for its children unless `body` is given."""
        count, launcher_body = LAUNCHERS[name]
        started.append(Launcher(tmp_path, body or launcher_body, ignore_sighup))
        if not body:
            started[-1].wait_started(count)
        return started[-1]

    yield start
    for one in started:
        one.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_signalled_launcher_kills_its_child_groups(launcher, name, signum):
    started = launcher(name)
    assert started.proc.pid not in started.groups  # the children have sessions of their own
    os.kill(started.proc.pid, signum)
    assert started.proc.wait(timeout=10) == -signum  # died of the signal: shell status 128+N
    for pgid in started.groups:
        _wait_for(lambda pgid=pgid: not _group_members(pgid), 5, f"group {pgid} gone")


def test_a_launcher_under_nohup_outlives_sighup_with_its_children(launcher):
    started = launcher("run_group", ignore_sighup=True)
    os.kill(started.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert started.proc.poll() is None
    assert len(_group_members(started.groups[0])) == 2
    os.kill(started.proc.pid, signal.SIGTERM)
    assert started.proc.wait(timeout=10) == -signal.SIGTERM
    _wait_for(lambda: not _group_members(started.groups[0]), 5, "group gone")


def test_a_launcher_killed_outright_leaves_its_children(launcher):
    """Why the forwarding matters: SIGKILL cannot be caught, and the group survives it."""
    started = launcher("run_group")
    os.kill(started.proc.pid, signal.SIGKILL)
    started.proc.wait(timeout=10)
    time.sleep(0.5)
    assert len(_group_members(started.groups[0])) == 2  # the fixture kills them


def test_a_signal_while_a_child_starts_waits_for_it(launcher):
    started = launcher("run_group", body=SIGNALLED_WHILE_STARTING)
    assert started.proc.wait(timeout=10) == -signal.SIGTERM
    started.groups = started.started_groups()
    assert len(started.groups) == 1
    _wait_for(lambda: not _group_members(started.groups[0]), 5, "group gone")
