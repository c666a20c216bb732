"""Soak: a DP 2 wide-EP server under mixed streaming traffic, every answer checked
against stock vLLM, then the same traffic with one injected bad expert transfer.

    python benchmarks/soak.py [--requests 400] [--concurrency 32] [--arch qwen3_moe]
        [--dtype float32] [--disconnect-fraction 0.1] [--seed 0] [--warm-up 2000]
        [--onednn-cache-capacity 16]

The server (`SERVE`): `vllm serve --enable-wideep --data-parallel-size 2` on the tiny
checkpoint (EP 2, one rank per core), 2 redundant slots, a new placement planned every 4
steps from the last 16 steps' load (`--wideep-eplb online`), dev mode on for
`POST /collective_rpc`. The traffic (`soak_requests`): one greedy streamed completion per
request, prompts of 1 to 64 words and 4 to 64 output tokens drawn with `--seed`, at most
`--concurrency` in flight; `--disconnect-fraction` of the clients hang up mid-stream, after
a drawn number of chunks.

Two runs on one server, after a warm-up of `--warm-up` requests drawn the same way
(another seed; `soak()` defaults to 2 x the concurrency).

The server runs with oneDNN's primitive cache capped at `--onednn-cache-capacity` entries
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`; oneDNN's default is 1024). vLLM's CPU linear layers
build a oneDNN primitive per batch token count and keep it in that cache, so with the
default every worker's RSS grows for thousands of requests, stock vLLM's too; capped, the
soak's RSS check sees any growth that is not that cache. The plugin itself sets nothing.
Figures: docs/benchmarks.md, "Resident memory over longer runs".

    clean          the requests as drawn
    bad transfer   `wideep_fault_drill` armed on every EP rank first (the next expert
                   slot each rank receives arrives with one byte altered), then the same
                   requests

Per run, printed as a table:

    requests     sent
    errors       a request that did not end as asked: an HTTP error, an error event, a
                 broken stream, or fewer than max_tokens tokens (a client's own hang-up is
                 not an error)
    mismatches   finished requests whose tokens differ from stock vLLM's (TP 1, plugin
                 not loaded, `VLLM_PLUGINS=""`) on the same prompt, other than a fork at a
                 near-tie (tests/e2e/compare.py)
    disconnects  requests the client hung up on mid-stream
    rebalances   layer moves committed during the run (EP rank 0's `wideep_stats`
                 counters summed over MoE layers; every rank commits the same moves)
    failures     layer moves the EP group refused during the run: a staged slot failed
                 its checksum on some rank, so every rank kept the layer's old placement
                 (the same counters; every rank counts each refusal)
    RSS          resident memory of every process of the server's process group, summed,
                 at the start and the end of the run (MiB); each process's start, end and
                 growth are printed too
    seconds      the run's wall time
    load         the 1-minute load average at its end (other jobs share the 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.compare import assert_greedy_parity  # noqa: E402
from tests.e2e.launch import Server, e2e_env, generate, group_processes  # noqa: E402
from vllm_wideep.tiny_models import build_tiny_model  # noqa: E402

SERVED_NAME = "tiny"
SERVE = ["--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"]
SERVE += ["--wideep-redundant-experts", "2", "--wideep-eplb", "online"]
SERVE += ["--wideep-eplb-interval", "4", "--wideep-eplb-window", "16"]
SERVE += ["--max-model-len", "256", "--enforce-eager", "--served-model-name", SERVED_NAME]
# Prompts are drawn from these words; the tiny models' tokenizer makes 1 to 3 tokens of each.
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing",
    "matches in distant river towns where old sailors count silver coins and bake bread",
    "for hungry children under bright winter stars",
)
VOCABULARY = " ".join(WORDS).split(" ")
MAX_PROMPT_WORDS = 64
OUTPUT_TOKENS = (4, 64)
REQUEST_TIMEOUT_S = 180
# Warm-up requests of the command line: even with the cache cap below, each worker's RSS
# grows by 24 to 28 MiB in its first 400 requests (docs/benchmarks.md, soak section).
WARM_UP_REQUESTS = 2000
ONEDNN_CACHE_CAPACITY = 16  # the server's oneDNN primitive cache entries (module docstring)
# soak()'s default warm-up, in multiples of the concurrency (the short test's).
WARM_UP_ROUNDS = 2
MIB = 1 << 20


@dataclass(frozen=True)
class SoakRequest:
    """One client's request. disconnect_after: streamed chunks the client reads before it
    hangs up; None = it reads to the end."""

    prompt: str
    max_tokens: int
    disconnect_after: int | None


@dataclass
class Outcome:
    """How one request ended: the token ids and chosen-token logprobs streamed
    (`{token id: logprob}` per position), the finish reason, or an error."""

    request: SoakRequest
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    disconnected: bool = False


@dataclass(frozen=True)
class BalancerCounts:
    """Cumulative balancer counters of the server (see the module docstring)."""

    rebalances: int
    failures: int


@dataclass(frozen=True)
class RunResult:
    name: str
    requests: int
    errors: int
    mismatches: int
    disconnects: int
    rebalances: int
    failures: int
    rss_start_mib: float
    rss_end_mib: float
    seconds: float
    load: float  # 1-minute load average at the end of the run (2 cores)
    problems: list[str]  # the first errors and mismatches, for the log


def soak_requests(count: int, disconnect_fraction: float, seed: int) -> list[SoakRequest]:
    """`count` requests with drawn prompt and output lengths; `disconnect_fraction` of
    them hang up after 1 to max_tokens - 1 chunks."""
    rng = random.Random(seed)
    hanging_up = set(rng.sample(range(count), round(count * disconnect_fraction)))
    requests = []
    for index in range(count):
        words = rng.randint(1, MAX_PROMPT_WORDS)
        prompt = " ".join(rng.choice(VOCABULARY) for _ in range(words))
        max_tokens = rng.randint(*OUTPUT_TOKENS)
        disconnect_after = rng.randint(1, max_tokens - 1) if index in hanging_up else None
        requests.append(SoakRequest(prompt, max_tokens, disconnect_after))
    return requests


def stock_reference(model: str, dtype: str, requests: list[SoakRequest]) -> dict[str, dict]:
    """prompt -> stock vLLM's greedy tokens and top-2 logprobs for the longest output
    asked of it (a shorter greedy output is a prefix: `ignore_eos`, no stop strings).
    One engine in a child process group (tests/e2e/generate.py)."""
    prompts = sorted({r.prompt for r in requests})
    spec = {
        "runs": [{"model": model, "dtype": dtype}],
        "prompts": prompts,
        "max_tokens": max(r.max_tokens for r in requests),
        "logprobs": 2,
    }
    env = e2e_env(VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    (run,) = generate(spec, env, timeout=900)
    return {
        prompt: {"tokens": tokens, "logprobs": logprobs}
        for prompt, tokens, logprobs in zip(prompts, run["tokens"], run["logprobs"], strict=True)
    }


async def _stream(client: httpx.AsyncClient, url: str, request: SoakRequest) -> Outcome:
    outcome = Outcome(request)
    body = {
        "model": SERVED_NAME,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 1,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                outcome.error = f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"
                return outcome
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    outcome.error = f"error event: {event['error']['message']}"
                    return outcome
                choice = event["choices"][0]
                outcome.tokens += choice["token_ids"]
                outcome.logprobs += [
                    {key.removeprefix("token_id:"): lp for key, lp in top.items()}
                    for top in choice["logprobs"]["top_logprobs"]
                ]
                outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
                chunks += 1
                if request.disconnect_after is not None and chunks >= request.disconnect_after:
                    outcome.disconnected = True  # leaving the block closes the connection
                    return outcome
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as broken:
        outcome.error = f"{type(broken).__name__}: {broken}"
        return outcome
    if outcome.finish_reason != "length" or len(outcome.tokens) != request.max_tokens:
        outcome.error = (
            f"ended with {outcome.finish_reason!r} after {len(outcome.tokens)} of "
            f"{request.max_tokens} tokens"
        )
    return outcome


async def _drive(url: str, requests: list[SoakRequest], concurrency: int) -> list[Outcome]:
    """Every request, at most `concurrency` in flight; outcomes in request order."""
    # Each request on a connection of its own, as independent clients: a kept-alive
    # connection can be closed by the server's keep-alive timeout (5 s) just as a starved
    # client sends the next request on it, which fails before the server sees a byte.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(request: SoakRequest) -> Outcome:
            async with gate:
                return await _stream(client, url, request)

        return await asyncio.gather(*(one(r) for r in requests))


def drive(url: str, requests: list[SoakRequest], concurrency: int) -> list[Outcome]:
    return asyncio.run(_drive(url, requests, concurrency))


def named_processes(group: int) -> dict[str, psutil.Process]:
    """The live processes of the server's group by `"<name> (<pid>)"`: vLLM's process title
    (`VLLM::EngineCore_DP0`, `VLLM::Worker_TP0`, ...), "API server" for the group leader."""
    processes = {}
    for process in group_processes(group):
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.cmdline()).strip()
            name = "API server" if process.pid == group else command[:48]
            processes[f"{name} ({process.pid})"] = process
    return processes


def rss_by_process(group: int) -> dict[str, int]:
    """Resident bytes of each live process of the server's group (`named_processes`)."""
    sizes = {}
    for name, process in named_processes(group).items():
        with contextlib.suppress(psutil.Error):
            sizes[name] = process.memory_info().rss
    return sizes


def balancer_counts(server: Server) -> BalancerCounts:
    """The server's cumulative rebalances (EP rank 0) and refused moves (the most any rank
    counted), summed over MoE layers, from every EP rank's `wideep_stats`."""
    replies = server.post("/collective_rpc", {"method": "wideep_stats"})["results"]
    by_rank = {reply["ep_rank"]: reply["eplb"] for reply in replies}
    assert sorted(by_rank) == list(range(len(replies))), sorted(by_rank)
    return BalancerCounts(
        rebalances=sum(layer["rebalances"] for layer in by_rank[0].values()),
        failures=max(
            sum(layer["failures"] for layer in eplb.values()) for eplb in by_rank.values()
        ),
    )


def arm_bad_transfer(server: Server) -> None:
    """Arm `wideep_fault_drill` on every EP rank (the RPC reaches every DP engine)."""
    replies = server.post("/collective_rpc", {"method": "wideep_fault_drill"})["results"]
    assert sorted(r["ep_rank"] for r in replies) == [0, 1], replies


def check(outcomes: list[Outcome], reference: dict[str, dict], dtype: str) -> list[str]:
    """The mismatches: finished requests that are not stock vLLM's output (one line each)."""
    mismatches = []
    for index, outcome in enumerate(outcomes):
        if outcome.error is not None or outcome.disconnected:
            continue
        stock = reference[outcome.request.prompt]
        length = len(outcome.tokens)
        expected = {"tokens": [stock["tokens"][:length]], "logprobs": [stock["logprobs"][:length]]}
        got = {"tokens": [outcome.tokens], "logprobs": [outcome.logprobs]}
        try:
            assert_greedy_parity(expected, got, dtype)
        except AssertionError as mismatch:
            mismatches.append(f"request {index}: {str(mismatch).splitlines()[0]}")
    return mismatches


def soak_run(
    name: str, server: Server, requests: list[SoakRequest], concurrency: int
) -> tuple[list[Outcome], dict]:
    """One run: its outcomes and measurements (mismatches are checked later, against the
    reference)."""
    before = balancer_counts(server)
    rss_start = rss_by_process(server.proc.pid)
    start = time.monotonic()
    outcomes = drive(server.url, requests, concurrency)
    seconds = time.monotonic() - start
    rss_end = rss_by_process(server.proc.pid)
    after = balancer_counts(server)
    for process, start_bytes in sorted(rss_start.items()):
        end_bytes = rss_end.get(process, 0)
        print(
            f"  {process}: RSS {start_bytes / MIB:.0f} -> {end_bytes / MIB:.0f} MiB "
            f"({(end_bytes - start_bytes) / MIB:+.0f})"
        )
    rss_start, rss_end = sum(rss_start.values()), sum(rss_end.values())
    measured = {
        "name": name,
        "seconds": seconds,
        "rebalances": after.rebalances - before.rebalances,
        "failures": after.failures - before.failures,
        "rss_start_mib": rss_start / MIB,
        "rss_end_mib": rss_end / MIB,
        "load": os.getloadavg()[0],
    }
    print(
        f"{name}: {len(requests)} requests in {seconds:.1f} s, RSS {rss_start / MIB:.0f} -> "
        f"{rss_end / MIB:.0f} MiB",
        flush=True,
    )
    return outcomes, measured


def result(outcomes: list[Outcome], measured: dict, mismatches: list[str]) -> RunResult:
    errors = [f"request {i}: {o.error}" for i, o in enumerate(outcomes) if o.error is not None]
    return RunResult(
        requests=len(outcomes),
        errors=len(errors),
        mismatches=len(mismatches),
        disconnects=sum(o.disconnected for o in outcomes),
        problems=(errors + mismatches)[:10],
        **measured,
    )


def soak(
    model: str,
    dtype: str,
    requests: list[SoakRequest],
    concurrency: int,
    server_log: Path | None = None,
    warm_up: int | None = None,
    onednn_cache: int = ONEDNN_CACHE_CAPACITY,
) -> list[RunResult]:
    """The clean run and the bad-transfer run on one server, after `warm_up` requests
    (None: `WARM_UP_ROUNDS` x `concurrency`); stock vLLM's reference is computed meanwhile
    in another process group. onednn_cache: the server's oneDNN primitive cache capacity."""
    reference: dict[str, dict] = {}
    failure: list[BaseException] = []

    def compute_reference() -> None:
        try:
            reference.update(stock_reference(model, dtype, requests))
        except Exception as error:  # re-raised in the caller's thread below
            failure.append(error)

    reference_thread = threading.Thread(target=compute_reference, daemon=True)
    reference_thread.start()
    hanging_up = sum(r.disconnect_after is not None for r in requests) / len(requests)
    warm_up_requests = soak_requests(
        WARM_UP_ROUNDS * concurrency if warm_up is None else warm_up, hanging_up, seed=-1
    )
    env = e2e_env(
        num_ranks=2,
        VLLM_SERVER_DEV_MODE="1",  # POST /collective_rpc
        ONEDNN_PRIMITIVE_CACHE_CAPACITY=str(onednn_cache),
    )
    runs = []
    with Server(model, [*SERVE, "--dtype", dtype], env) as server:
        try:
            drive(server.url, warm_up_requests, concurrency)
            runs.append(soak_run("clean", server, requests, concurrency))
            arm_bad_transfer(server)
            runs.append(soak_run("bad transfer", server, requests, concurrency))
        finally:
            if server_log is not None:
                server_log.write_text(server.output())
    reference_thread.join(timeout=900)
    if failure:
        raise failure[0]
    assert reference, "stock vLLM's reference did not finish within 900 s"
    return [
        result(outcomes, measured, check(outcomes, reference, dtype)) for outcomes, measured in runs
    ]


COLUMNS = (
    ("run", "name", "{}"),
    ("requests", "requests", "{}"),
    ("errors", "errors", "{}"),
    ("mismatches", "mismatches", "{}"),
    ("disconnects", "disconnects", "{}"),
    ("rebalances", "rebalances", "{}"),
    ("failures", "failures", "{}"),
    ("RSS start MiB", "rss_start_mib", "{:.0f}"),
    ("RSS end MiB", "rss_end_mib", "{:.0f}"),
    ("seconds", "seconds", "{:.0f}"),
    ("load", "load", "{:.1f}"),
)


def table(results: list[RunResult]) -> str:
    """The runs as a Markdown table."""
    lines = [
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for run in results:
        cells = [fmt.format(getattr(run, attribute)) for _, attribute, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-up", type=int, default=WARM_UP_REQUESTS, help="requests before the first run"
    )
    parser.add_argument(
        "--onednn-cache-capacity",
        type=int,
        default=ONEDNN_CACHE_CAPACITY,
        help="the server's ONEDNN_PRIMITIVE_CACHE_CAPACITY (oneDNN's default: 1024)",
    )
    parser.add_argument("--server-log", type=Path, help="write the server's output here")
    args = parser.parse_args()
    model = str(build_tiny_model(REPO / ".cache" / "tiny-models" / args.arch, args.arch))
    requests = soak_requests(args.requests, args.disconnect_fraction, args.seed)
    results = soak(
        model,
        args.dtype,
        requests,
        args.concurrency,
        args.server_log,
        warm_up=args.warm_up,
        onednn_cache=args.onednn_cache_capacity,
    )
    print(table(results))
    for run in results:
        for problem in run.problems:
            print(f"{run.name}: {problem}")


if __name__ == "__main__":
    main()
