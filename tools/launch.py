"""Start vLLM in child process groups on 127.0.0.1 and always clean them up.

vLLM leaves EngineCore/worker processes behind when its front process is killed, so
every run gets its own session (process group) and the whole group is killed at the end.
When this process gets SIGTERM or SIGHUP, every group it started is killed first and then
the signal takes its usual course (`CHILD_GROUPS`). Used by tests/e2e and by `make eval`
(`tools.accuracy.eval`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def e2e_env(num_ranks: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a vLLM child on this 2-core, GPU-less machine."""
    env = dict(os.environ)
    cache = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache"))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        VLLM_HOST_IP="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
    )
    if num_ranks > 1:
        # One core per rank; vLLM refuses to start 2 ranks on one NUMA node otherwise.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(num_ranks))
    env.update(extra)
    return env


class ChildGroups:
    """The process groups this process started and has not killed yet. On SIGTERM or SIGHUP
    it SIGKILLs them all, then the signal does what it did before: the earlier Python
    handler runs, or (the default) the process dies of the signal, exit status 128 + signum.
    A signal already ignored (`nohup` ignores SIGHUP) stays ignored.

    The handlers go in at the first `popen` from the main thread (Python allows no other).
    A signal that comes while `popen` starts a child waits until the child is registered,
    so no child escapes."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen] = {}  # group id (= the child's pid) -> child
        self._previous: dict[int, object] = {}  # signum -> the handler before ours
        self._starting: set[int] = set()  # ids of the threads inside `popen`
        self._pending: int | None = None  # a signal that came during `popen`

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """`subprocess.Popen(args, start_new_session=True, **kwargs)`, registered."""
        self._install()
        self._starting.add(threading.get_ident())
        try:
            proc = subprocess.Popen(args, start_new_session=True, **kwargs)
            self.live[proc.pid] = proc
        finally:
            self._starting.discard(threading.get_ident())
            if self._pending is not None and not self._starting:
                signal.raise_signal(self._pending)  # handled again, in the main thread
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the group of `proc` (its children too) and reap `proc`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.live.pop(proc.pid, None)  # after the kill: a signal in between finds it still
        proc.wait()

    def _install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous != signal.SIG_IGN:
                self._previous[signum] = previous
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._starting:
            self._pending = signum
            return
        self._pending = None
        for pgid in list(self.live):  # no wait() here: the main thread may hold its lock
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


CHILD_GROUPS = ChildGroups()


def _kill_group(proc: subprocess.Popen) -> None:
    CHILD_GROUPS.kill(proc)


def run_group(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run a command in its own process group; return its output, raise on failure."""
    with tempfile.TemporaryFile("w+") as log:
        proc = CHILD_GROUPS.popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = proc.poll() is None
            _kill_group(proc)
        log.seek(0)
        output = log.read()
    if timed_out or proc.returncode != 0:
        tail = output[-6000:]
        what = f"timed out after {timeout}s" if timed_out else f"exit {proc.returncode}"
        raise RuntimeError(f"{' '.join(args[:4])} ... {what}:\n{tail}")
    return output


def group_processes(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`. Zombies are left out: they have exited
    and hold no memory, they only wait for their parent to read their exit status."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` (the console script) in its own process group on 127.0.0.1."""

    def __init__(self, model: str, args: list[str], env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [str(VENV_BIN / "vllm"), "serve", model, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *args]
        self.proc = CHILD_GROUPS.popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def wait_ready(self, timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.proc.returncode}:\n{self.output()[-6000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()[-6000:]}")

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def get_text(self, path: str, timeout: float = 60) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def stop(self) -> None:
        _kill_group(self.proc)
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
