"""Serve a tiny DeepSeek-V3 with wide expert parallelism over 2 data-parallel ranks.

    python examples/demo.py [--workdir .cache/demo]

1. Writes a tiny DeepSeek-V3 checkpoint (random weights: the answers are gibberish).
2. Starts `vllm serve MODEL --enable-wideep --data-parallel-size 2 ...` on 127.0.0.1.
   EP size = DP 2 x TP 1 = 2: each rank holds 8 of the 16 routed experts of every MoE layer.
3. Sends completion and chat requests with the `openai` client and prints the answers.
4. Asks every worker, through vLLM's dev endpoint POST /collective_rpc, how many
   (token, expert) rows its experts computed (`wideep_stats`), and prints them.
5. Stops the server. Exits 0, or 1 with the tail of the server log.

Runs on CPU (2 cores are enough). The server log is WORKDIR/server.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from vllm_wideep.tiny_models import build_tiny_model

SERVED_NAME = "tiny-deepseek"
DP_SIZE = 2


def server_env(workdir: Path) -> dict[str, str]:
    """Environment for a CPU-only vLLM with one core per DP rank and caches in `workdir`."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per rank
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",  # rank 0 on core 0, rank 1 on core 1
        "VLLM_SERVER_DEV_MODE": "1",  # enables POST /collective_rpc
        "HF_HUB_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
        "HF_HOME": str(workdir / "hf-home"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, env: dict[str, str], log) -> subprocess.Popen:
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [
        str(vllm), "serve", str(model),
        "--enable-wideep",
        "--data-parallel-size", str(DP_SIZE),
        "--api-server-count", "1",
        "--enforce-eager",
        "--max-model-len", "512",
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    print("$", " ".join(cmd))
    # A session of its own: vLLM's engine and worker processes join its process group.
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(server: subprocess.Popen, url: str, timeout: float) -> None:
    """Poll GET /health every 2 s: a dot per poll, the elapsed time every 30 s."""
    print("waiting for the server", end="", flush=True)
    start = time.monotonic()
    polls = 0
    while (elapsed := time.monotonic() - start) < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    print(f" ready after {elapsed:.0f} s")
                    return
        except OSError:
            pass
        time.sleep(2)
        polls += 1
        print("." if polls % 15 else f" {elapsed:.0f} s", end="", flush=True)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, then SIGKILL to whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        print("the server did not stop within 60 s; killing it")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # engine processes left behind
    server.wait()


def ask(client: OpenAI) -> None:
    prompts = ["The old lighthouse stood", "Numbers are words too:"]
    completion = client.completions.create(
        model=SERVED_NAME, prompt=prompts, max_tokens=16, temperature=0
    )
    for choice in sorted(completion.choices, key=lambda c: c.index):
        print(f"completion  {prompts[choice.index]!r} -> {choice.text!r}")
    messages = [{"role": "user", "content": "How do you bake simple bread?"}]
    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=16, temperature=0
    )
    print(f"chat        {messages[0]['content']!r} -> {chat.choices[0].message.content!r}")


def show_stats(url: str) -> None:
    request = urllib.request.Request(
        url + "/collective_rpc",
        data=json.dumps({"method": "wideep_stats"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        results = json.loads(response.read())["results"]
    # One result per worker: {"ep_rank": r, "tokens_per_expert": {layer: [rows per expert]}}.
    print("\n(token, expert) rows computed by each EP rank's experts, per MoE layer:")
    print(f"{'EP rank':>7}  {'layer':<28}  {'rows':>6}  per local expert")
    for stats in sorted(results, key=lambda s: s["ep_rank"]):
        for layer, counts in stats["tokens_per_expert"].items():
            print(f"{stats['ep_rank']:>7}  {layer:<28}  {sum(counts):>6}  {counts}")
    if len(results) < DP_SIZE:
        raise RuntimeError(f"only {len(results)} of {DP_SIZE} EP ranks answered wideep_stats")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for start")
    args = parser.parse_args()
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    print("building the tiny DeepSeek-V3 checkpoint (16 routed experts, 2 MoE layers)")
    model = build_tiny_model(workdir / "tiny-deepseek-v3", "deepseek_v3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        server = start_server(model, port, server_env(workdir), log)
        try:
            wait_ready(server, url, args.timeout)
            ask(OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0))
            show_stats(url)
        except Exception as error:  # any failure: say what, then show the server's side
            print(f"\nFAILED: {type(error).__name__}: {error}")
            print(f"--- last lines of {log_path} ---")
            print("\n".join(log_path.read_text().splitlines()[-60:]))
            return 1
        finally:
            print("\nstopping the server")
            stop_server(server)
    print(f"done (server log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
