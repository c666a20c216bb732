"""Disaggregated prefill/decode on one machine: a prefill instance, a wide-EP decode
instance and the proxy, all on 127.0.0.1.

    python examples/disagg/launch.py [--model DIR] [--workdir .cache/disagg] [--check]
                                     [--decode-dp 2] [--prefill-wideep] [-- VLLM_ARGS...]

    prefill   vllm serve MODEL --kv-transfer-config '{"kv_connector": "ExampleConnector",
                  "kv_role": "kv_producer", ...}'                              EP size 1
    decode    vllm serve MODEL --enable-wideep --data-parallel-size 2 --api-server-count 1
                  --kv-transfer-config '{..., "kv_role": "kv_consumer", ...}'  EP size 2
    proxy     python examples/disagg/proxy.py --prefill URL --decode URL --port PORT

KV travels through `ExampleConnector`'s shared folder (WORKDIR/kv, emptied at start),
which works on CPU.
Without `--model` a tiny Qwen3-MoE is written to WORKDIR/model (random weights). Arguments
after `--` go to both `vllm serve` commands. Each process runs in a process group of its
own, logs to WORKDIR/{prefill,decode,proxy}.log, and is killed on exit; on SIGTERM or
SIGHUP the launcher kills the three groups, then dies of the signal.

With `--check` it sends a completion and a streamed chat request through the proxy,
prints them and stops; otherwise it serves until Ctrl-C.

CPU: prefill and decode share the 2 cores (`VLLM_CPU_OMP_THREADS_BIND` prefill "0",
decode "0|1"). On GPUs use NixlConnector instead (README, "Disaggregated prefill").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
PROXY = Path(__file__).resolve().parent / "proxy.py"
HOST = "127.0.0.1"
SERVED_NAME = "tiny"
DEFAULT_VLLM_ARGS = [
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--served-model-name",
    SERVED_NAME,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def kv_transfer_config(role: str, kv_path: Path) -> dict:
    """`--kv-transfer-config` of the prefill (producer) or decode (consumer) instance."""
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": {"prefill": "kv_producer", "decode": "kv_consumer"}[role],
        "kv_connector_extra_config": {"shared_storage_path": str(kv_path)},
    }


class ChildGroups:
    """The process groups this process started and has not killed yet. On SIGTERM or SIGHUP
    it SIGKILLs them all, then the signal does what it did before: the earlier Python
    handler runs, or (the default) the process dies of the signal, exit status 128 + signum.
    A signal already ignored (`nohup` ignores SIGHUP) stays ignored.

    The handlers go in at the first `popen` from the main thread (Python allows no other).
    A signal that comes while `popen` starts a child waits until the child is registered,
    so no child escapes. (tools/launch.py has the same class; this example stands alone.)"""

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


class Process:
    """A command in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, url: str):
        self.name, self.cmd, self.url = name, cmd, url
        self.log = log
        with open(log, "a") as out:
            print("$", " ".join(cmd), file=out, flush=True)
            self.proc = CHILD_GROUPS.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        """Poll GET /health until it answers 200; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=5) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text()[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole process group (vLLM's engine and worker processes too)."""
        CHILD_GROUPS.kill(self.proc)


@dataclass
class Deployment:
    """Ports, flags and environment of the three processes; `start_*` launch them."""

    model: str
    workdir: Path
    vllm_args: list[str] = field(default_factory=lambda: list(DEFAULT_VLLM_ARGS))
    decode_dp: int = 2
    prefill_wideep: bool = False
    prefill_port: int = field(default_factory=free_port)
    decode_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    base_env: dict[str, str] | None = None  # default: this process's environment

    @property
    def kv_path(self) -> Path:
        return self.workdir / "kv"

    def url(self, role: str) -> str:
        return f"http://{HOST}:{getattr(self, f'{role}_port')}"

    def env(self, omp_bind: str) -> dict[str, str]:
        env = dict(os.environ if self.base_env is None else self.base_env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per rank (CPU)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_bind)
        env.setdefault("VLLM_HOST_IP", HOST)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def _serve(self, role: str, flags: list[str]) -> list[str]:
        kv = json.dumps(kv_transfer_config(role, self.kv_path))
        port = str(getattr(self, f"{role}_port"))
        return [
            str(VENV_BIN / "vllm"), "serve", self.model, "--host", HOST, "--port", port,
            *flags, "--kv-transfer-config", kv, *self.vllm_args,
        ]  # fmt: skip

    def prefill_command(self) -> list[str]:
        return self._serve("prefill", ["--enable-wideep"] if self.prefill_wideep else [])

    def decode_command(self) -> list[str]:
        flags = ["--enable-wideep", "--data-parallel-size", str(self.decode_dp)]
        return self._serve("decode", [*flags, "--api-server-count", "1"])

    def proxy_command(self, wait: float = 60) -> list[str]:
        return [
            sys.executable, str(PROXY), "--prefill", self.url("prefill"),
            "--decode", self.url("decode"), "--host", HOST, "--port", str(self.proxy_port),
            "--wait", str(wait),
        ]  # fmt: skip

    def start_prefill(self) -> Process:
        self.kv_path.mkdir(parents=True, exist_ok=True)
        cmd = self.prefill_command()
        return Process(
            "prefill", cmd, self.env("0"), self.workdir / "prefill.log", self.url("prefill")
        )

    def start_decode(self) -> Process:
        self.kv_path.mkdir(parents=True, exist_ok=True)
        bind = "|".join(str(rank % 2) for rank in range(self.decode_dp))
        cmd = self.decode_command()
        return Process(
            "decode", cmd, self.env(bind), self.workdir / "decode.log", self.url("decode")
        )

    def start_proxy(self) -> Process:
        cmd = self.proxy_command()
        env = dict(os.environ if self.base_env is None else self.base_env)
        return Process("proxy", cmd, env, self.workdir / "proxy.log", self.url("proxy"))


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def check(proxy_url: str) -> None:
    """One completion and one streamed chat request through the proxy."""
    prompt = "In the spring the river rose and the village moved its market to the hill. " * 12
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    answer = _post(proxy_url + "/v1/completions", body)
    print("completion:", repr(answer["choices"][0]["text"]), "usage:", answer["usage"])
    chat = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        proxy_url + "/v1/chat/completions",
        data=json.dumps(chat).encode(),
        headers={"Content-Type": "application/json"},
    )
    text = []
    with urllib.request.urlopen(request, timeout=120) as stream:
        for line in stream:
            line = line.decode().strip()
            if line.startswith("data: {"):
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                text.append(delta.get("content") or "")
    print("streamed chat:", repr("".join(text)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model folder or name (default: a tiny Qwen3-MoE)")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/disagg"))
    parser.add_argument("--decode-dp", type=int, default=2, help="decode EP size (DP ranks)")
    parser.add_argument("--prefill-wideep", action="store_true", help="wide EP (EP 1) on prefill")
    parser.add_argument("--port", type=int, default=8000, help="the proxy's port")
    parser.add_argument("--check", action="store_true", help="send 2 requests, then stop")
    parser.add_argument("--timeout", type=float, default=600, help="start-up timeout, s")
    args = parser.parse_args(argv)

    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from vllm_wideep.tiny_models import build_tiny_model

        model = str(build_tiny_model(workdir / "model", "qwen3_moe"))
    deployment = Deployment(
        model,
        workdir,
        vllm_args=[*DEFAULT_VLLM_ARGS, *vllm_args],
        decode_dp=args.decode_dp,
        prefill_wideep=args.prefill_wideep,
        proxy_port=args.port,
    )
    # Stored KV is keyed by prompt tokens only: never serve another model's.
    shutil.rmtree(deployment.kv_path, ignore_errors=True)
    processes: list[Process] = []
    try:
        processes += [deployment.start_prefill(), deployment.start_decode()]
        for process in processes:
            print(f"{process.name}: {' '.join(process.cmd)}", flush=True)
        for process in processes:
            process.wait_ready(args.timeout)
        processes.append(deployment.start_proxy())
        processes[-1].wait_ready(120)
        print(f"serving {SERVED_NAME!r} on {deployment.url('proxy')} (logs in {workdir})")
        if args.check:
            check(deployment.url("proxy"))
            return 0
        while all(p.proc.poll() is None for p in processes):
            time.sleep(1)
        dead = next(p for p in processes if p.proc.poll() is not None)
        print(f"{dead.name} exited {dead.proc.returncode}:\n{dead.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, urllib.error.URLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for process in processes:
            process.kill()


if __name__ == "__main__":
    raise SystemExit(main())
