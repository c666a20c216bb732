"""A stalled engine stops a wide-EP server whole, within the configured timeout.

A DP 2 wide-EP server (EP 2, online rebalancing every 4 steps, both distributed timeouts
at `TIMEOUT_S`) streams a completion; mid-decode, SIGSTOP freezes the engine core of DP
rank 1 (its worker goes on running but gets no more work). The other rank's collectives
then wait for a peer that never comes: its next one times out, its engine dies, and the
front end must answer the pending request with an error, fail `/health`, and exit 1
(plugin/server.py: vLLM alone exits 0) with the timeout in its log, within `TIMEOUT_S` +
30 s, leaving no process of its group behind, the frozen one included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from tests.e2e.launch import Server, e2e_env, group_processes

pytestmark = pytest.mark.slow

TIMEOUT_S = 20
SERVE = ["--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"]
SERVE += ["--wideep-eplb", "online", "--wideep-eplb-interval", "4"]
SERVE += ["--wideep-redundant-experts", "2", "--dtype", "float32", "--max-model-len", "2048"]
SERVE += ["--enforce-eager", "--served-model-name", "tiny"]
SERVE += ["--distributed-timeout-seconds", str(TIMEOUT_S)]
SERVE += ["--cpu-distributed-timeout-seconds", str(TIMEOUT_S)]
# What the surviving rank reports: gloo's timeout in one of vLLM's collectives (the DP
# batch sync, the token exchange), or the balancer's own error when it was moving experts
# or planning.
TIMEOUT_CAUSE = re.compile(
    rf"Timed out waiting {TIMEOUT_S * 1000}ms|EP rank \d: .* failed .*the EP group cannot go on"
)
ENGINE_DIED = "vllm_wideep: the engine died while serving"
DRAIN_S = 10
# Long enough that the request is still decoding when the engine core is stopped, however
# late the test thread gets there on a loaded machine: a finished request leaves both
# engines idle, with no collective to time out (200 tokens sometimes ended first).
MAX_TOKENS = 2000


class Stream:
    """One streamed greedy completion, read on a thread: `tokens` chunks so far, how it
    ended (`finish_reason`, or `error`: an error event or a broken connection)."""

    def __init__(self, url: str, max_tokens: int):
        self.tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.body = {
            "model": "tiny",
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        self.url = url
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/completions", json=self.body, timeout=TIMEOUT_S + 60
            ) as reply:
                if reply.status_code != 200:
                    self.error = f"HTTP {reply.status_code}"
                    return
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        self.error = event["error"]["message"]
                        return
                    self.tokens += 1
                    self.finish_reason = event["choices"][0]["finish_reason"]
        except httpx.HTTPError as broken:
            self.error = f"{type(broken).__name__}: {broken}"


def _engine_core(group: int, dp_rank: int) -> psutil.Process:
    name = f"VLLM::EngineCore_DP{dp_rank}"
    found = [p for p in group_processes(group) if p.cmdline()[:1] == [name]]
    assert len(found) == 1, [p.cmdline()[:1] for p in group_processes(group)]
    return found[0]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until(condition, timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} not within {timeout} s; the server's log ends:\n{server.output()[-6000:]}"
            )
        time.sleep(0.2)


def _left_after(group: int, seconds: float) -> list[tuple[int, str, str]]:
    """(pid, command, state) of the processes of `group` still there after `seconds`."""
    deadline = time.monotonic() + seconds
    while (members := group_processes(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for process in members:
        with contextlib.suppress(psutil.Error):
            left.append((process.pid, " ".join(process.cmdline())[:120], process.status()))
    return left


def test_a_stopped_engine_core_stops_the_server_and_leaves_no_process(tiny_model):
    with Server(tiny_model("qwen3_moe"), SERVE, e2e_env(num_ranks=2)) as server:
        group = server.proc.pid
        stream = Stream(server.url, max_tokens=MAX_TOKENS)
        _wait_until(lambda: stream.tokens >= 8 or stream.error, 120, "8 streamed tokens", server)
        assert stream.error is None and stream.finish_reason is None, vars(stream)
        frozen = _engine_core(group, dp_rank=1)
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        limit = TIMEOUT_S + 30
        _wait_until(lambda: not _healthy(server.url), limit, "/health failing", server)
        try:
            exit_code = server.proc.wait(timeout=max(1, stopped_at + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs {limit} s after the SIGSTOP")
        exited_after = time.monotonic() - stopped_at
        stream.thread.join(timeout=10)
        # multiprocessing's resource tracker exits on its own once the front end is gone,
        # after it has unlinked what the engines left in /dev/shm
        left = _left_after(group, DRAIN_S)
        output = server.output()
    print(f"server exited {exit_code} {exited_after:.1f} s after the SIGSTOP")
    assert exit_code != 0, output[-4000:]
    assert TIMEOUT_CAUSE.search(output) and ENGINE_DIED in output, output[-4000:]
    assert not stream.thread.is_alive(), "the pending request still hangs"
    assert stream.error is not None and stream.finish_reason is None, vars(stream)
    assert left == [], f"processes of the server's group still running: {left}"
