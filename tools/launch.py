"""Start vLLM in child process groups on 127.0.0.1 and always clean them up.

vLLM leaves EngineCore/worker processes behind when its front process is killed, so
every run gets its own session (process group) and the whole group is killed at the end.
Used by tests/e2e and by `make eval` (`tools.accuracy.eval`).
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
import time
import urllib.request
from pathlib import Path

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


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_group(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run a command in its own process group; return its output, raise on failure."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
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
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

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
