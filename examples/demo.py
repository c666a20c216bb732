"""Serve a trained tiny DeepSeek-V3 with wide expert parallelism and online rebalancing.

    python examples/demo.py [--model models/tiny-dsv3-tasks] [--workdir .cache/demo]

The model (committed in models/tiny-dsv3-tasks: 16 routed experts in each of 2 MoE
layers, 4 chosen per token) was trained on four synthetic tasks:

    add     "89+74="           -> "361"   the sum, written units first (163 backwards)
    copy    "cpy xjcg="        -> "xjcg"  copy 4 letters
    shift   "nxt vxej="        -> "wyfk"  each letter to the next one
    minmax  "dig 978723:max="  -> "9"     the largest (or smallest) of 6 digits

What the demo does:

1. Starts `vllm serve MODEL --enable-wideep --data-parallel-size 2 --wideep-eplb online
   ...` on 127.0.0.1. EP size = DP 2 x TP 1 = 2: each rank holds 9 expert slots of every
   MoE layer (16 experts + 2 redundant copies of busy ones, over 2 ranks), and every
   EPLB_INTERVAL engine steps the ranks re-plan which expert sits in which slot from the
   load they counted, and move the expert weights between them while serving.
2. Asks 2 questions of each task (greedy, stop at ";") and checks the answers.
3. Shows how many (token, expert) rows each rank's experts computed for those
   questions: POST /collective_rpc {"method": "wideep_stats"} (vLLM's dev endpoint,
   VLLM_SERVER_DEV_MODE=1) returns every rank's cumulative counters; the demo prints the
   difference before and after the questions.
4. Keeps asking questions until Prometheus' GET /metrics reports a rebalance
   (vllm_wideep:eplb_rebalances_total > 0).
5. Asks 2 new questions of each task and shows the answers and the load split again:
   the same kind of traffic, now on the rebalanced placement.
6. Stops the server (its whole process group). Exits 0 when at most MAX_WRONG answers
   were wrong, or 1 with the tail of the server log.

Runs on CPU in a few minutes (2 cores: one per rank). The server log is WORKDIR/server.log.
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

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny-dsv3-tasks"
DP_SIZE = 2
EPLB_INTERVAL = 32  # engine steps between re-plans; a batch of questions takes ~5-10 steps
MAX_WRONG = 2  # the model answers every held-out item right (bf16 numerics may flip one)

# Held-out items (the model never saw them in training), (prompt, expected answer).
FIRST_QUESTIONS = [
    ("89+74=", "361"),
    ("36+25=", "160"),
    ("cpy xjcg=", "xjcg"),
    ("cpy efxe=", "efxe"),
    ("nxt vxej=", "wyfk"),
    ("nxt nwvn=", "oxwo"),
    ("dig 978723:max=", "9"),
    ("dig 097881:max=", "9"),
]
SECOND_QUESTIONS = [
    ("34+14=", "840"),
    ("58+29=", "780"),
    ("cpy ijqr=", "ijqr"),
    ("cpy mhqq=", "mhqq"),
    ("nxt mnle=", "nomf"),
    ("nxt erah=", "fsbi"),
    ("dig 661390:max=", "9"),
    ("dig 486311:max=", "8"),
]


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


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
        "--wideep-redundant-experts", "2",
        "--wideep-eplb", "online",
        "--wideep-eplb-interval", str(EPLB_INTERVAL),
        "--api-server-count", "1",
        "--enforce-eager",
        "--max-model-len", "128",
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


# --------------------------------------------------------------------------- #
# HTTP helpers
# --------------------------------------------------------------------------- #


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def complete(url: str, prompts: list[str]) -> list[str]:
    """Greedy completions of `prompts` in one request, cut at ";" (minmax goes on with
    ";min=...") or a new line."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompts,
        "max_tokens": 8,
        "temperature": 0,
        "stop": [";", "\n"],
    }
    choices = post(url + "/v1/completions", body)["choices"]
    return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]


def rows_per_rank(url: str) -> dict[str, list[int]]:
    """MoE layer -> (token, expert) rows each EP rank's experts computed since start.

    `wideep_stats` runs on every worker; each returns its EP rank and, per layer, the rows
    of each of its local expert slots."""
    results = post(url + "/collective_rpc", {"method": "wideep_stats"}, timeout=60)["results"]
    if len(results) != DP_SIZE:
        raise RuntimeError(f"{len(results)} of {DP_SIZE} EP ranks answered wideep_stats")
    by_rank = sorted(results, key=lambda stats: stats["ep_rank"])
    layers = by_rank[0]["tokens_per_expert"]
    return {
        layer: [sum(stats["tokens_per_expert"][layer]) for stats in by_rank] for layer in layers
    }


def wideep_metrics(url: str) -> dict[tuple[str, str], float]:
    """The vllm_wideep:* samples of GET /metrics: (sample name, layer) -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("layer", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vllm_wideep:") and "rank" not in sample.labels
    }


def rebalances(url: str) -> int:
    """How many times a layer moved to a new expert placement (all layers)."""
    metrics = wideep_metrics(url)
    return int(sum(v for (name, _), v in metrics.items() if name.endswith("rebalances_total")))


# --------------------------------------------------------------------------- #
# What the demo shows
# --------------------------------------------------------------------------- #


def ask(url: str, questions: list[tuple[str, str]]) -> int:
    """Ask the questions in one batch, print answer against expected; return how many
    were right."""
    answers = complete(url, [prompt for prompt, _ in questions])
    right = 0
    print(f"  {'question':<18} {'answer':<8} {'expected':<8}")
    for (prompt, expected), answer in zip(questions, answers, strict=True):
        ok = answer == expected
        right += ok
        print(f"  {prompt:<18} {answer!r:<8} {expected!r:<8} {'✓' if ok else '✗'}")
    print(f"  {right}/{len(questions)} right")
    return right


def show_load(before: dict[str, list[int]], after: dict[str, list[int]]) -> None:
    """Rows per rank between two `rows_per_rank` readings, and balancedness = mean / max
    over ranks (1.00 = both ranks did the same work)."""
    header = "".join(f"{f'rank {r}':>9}" for r in range(DP_SIZE))
    print(f"  {'MoE layer':<28}{header}  balancedness (mean/max)")
    for layer, totals in after.items():
        rows = [total - start for total, start in zip(totals, before[layer], strict=True)]
        balance = sum(rows) / len(rows) / max(rows) if max(rows) else 1.0
        print(f"  {layer:<28}{''.join(f'{n:>9}' for n in rows)}  {balance:.2f}")


def ask_and_show_load(url: str, questions: list[tuple[str, str]]) -> int:
    before = rows_per_rank(url)
    right = ask(url, questions)
    print("\n(token, expert) rows each EP rank's experts computed for these questions:")
    show_load(before, rows_per_rank(url))
    return right


def drive_until_rebalanced(url: str, timeout: float) -> None:
    """Keep the engines stepping (rebalancing happens between engine steps) with more
    questions until /metrics counts a rebalance."""
    traffic = [prompt for prompt, _ in FIRST_QUESTIONS + SECOND_QUESTIONS]
    start = time.monotonic()
    print(f"\nasking more questions until the ranks rebalance (every {EPLB_INTERVAL} steps)")
    while (count := rebalances(url)) == 0:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no rebalance after {timeout:.0f} s")
        complete(url, traffic)
        print(".", end="", flush=True)
    print(f" {count} layer rebalance(s) after {time.monotonic() - start:.0f} s; /metrics says:")
    for (name, layer), value in sorted(wideep_metrics(url).items()):
        if name.endswith(("rebalances_total", "moved_bytes_total", "failures_total")):
            print(f"  {name}{{layer={layer!r}}} {value:g}")


def run_demo(url: str) -> bool:
    print("\n== before rebalancing: 2 questions of each task ==")
    right = ask_and_show_load(url, FIRST_QUESTIONS)
    if rebalances(url):
        print("(a rebalance already happened during these questions)")
    drive_until_rebalanced(url, timeout=240)
    print("\n== after rebalancing: 2 new questions of each task ==")
    right += ask_and_show_load(url, SECOND_QUESTIONS)
    total = len(FIRST_QUESTIONS) + len(SECOND_QUESTIONS)
    print(f"\n{right}/{total} answers right")
    return total - right <= MAX_WRONG


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-dsv3-tasks")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for start")
    args = parser.parse_args()
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if not (args.model / "model.safetensors").exists():
        print(f"no trained checkpoint in {args.model} (make model writes one)")
        return 1

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        server = start_server(args.model.absolute(), port, server_env(workdir), log)
        try:
            wait_ready(server, url, args.timeout)
            ok = run_demo(url)
        except Exception as error:  # any failure: say what, then show the server's side
            print(f"\nFAILED: {type(error).__name__}: {error}")
            ok = False
        finally:
            print("\nstopping the server")
            stop_server(server)
    if not ok:
        print(f"--- last lines of {log_path} ---")
        print("\n".join(log_path.read_text().splitlines()[-60:]))
        return 1
    print(f"done (server log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
