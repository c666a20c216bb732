"""`make eval`: lm-eval accuracy of the trained tiny MoE, stock vLLM against wide EP.

    python -m tools.accuracy.eval [--model models/tiny-dsv3-tasks] [--configs NAME ...]
                                        [--limit N] [--no-inprocess] [--out docs/results]
                                        [--work .cache/accuracy]

For each entry of `CONFIGS` (a row of the table): start `vllm serve MODEL <its flags>`
on 127.0.0.1 in a process group of its own, run lm-eval's `local-completions` model on the
`wideep_tasks` group (`lm_eval_tasks/`: 4 exact-match generation tasks, 1 multiple-choice
log-likelihood task, all held-out items), stop the server. Then run lm-eval's in-process
`vllm` model with `additional_config={"wideep": {"enabled": True}}` at TP=2 (EP=2) in a
child process. Prints one table and writes `accuracy_cpu.json` to `--out`:

    config                  add  reverse  shift  minmax  mc  MTP acceptance  rebalances
    stock                   ...
    wide-EP                 ...
    wide-EP + online EPLB   ...                                             (placements applied)
    stock + MTP             ...
    wide-EP + MTP           ...
    stock, FP8 dequantized  ...
    wide-EP, FP8            ...

The last two rows serve the model with its routed experts in FP8 (`tools/accuracy/fp8.py`,
written to `--work` on first use): wide EP on the FP8 checkpoint, and stock vLLM, which has
no FP8 MoE on CPU, on its dequantized copy.

The targets are checked at the end (exit 1 if one is missed): stock scores at least 90 % on
every task; every other row is within 1 point of its baseline on every task: the wide-EP
FP8 row of stock on the dequantized copy, every other row of stock.

Servers with a speculative config report the MTP acceptance rate, accepted / drafted
tokens from the `vllm:spec_decode_num_{accepted,draft}_tokens` counters of `/metrics`.

The first wide-EP row also records the routing of the evaluation requests: the
(token, expert) rows per expert and MoE layer from `POST /collective_rpc
{"method": "wideep_stats"}` (after the run minus before it, so the start-up dummy runs do
not count), written as a `vllm-wideep-load` file (`vllm_wideep.eplb.files`) to
`--out/tiny_dsv3_tasks_load.json`, the "real" trace of the EPLB benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tools.accuracy.fp8 import write_fp8_experts_model
from tools.accuracy.tasks import KINDS, TASKS_DIR, generation_rows
from tools.launch import REPO, Server, e2e_env, run_group

DEFAULT_MODEL = REPO / "models" / "tiny-dsv3-tasks"
DEFAULT_OUT = REPO / "docs" / "results"
DEFAULT_WORK = REPO / ".cache" / "accuracy"
SERVED_NAME = "tiny-dsv3-tasks"
TASK_GROUP = "wideep_tasks"
# task name -> lm-eval metric key
METRICS: dict[str, str] = {
    **{f"wideep_{kind}": "exact_match,none" for kind in KINDS},
    "wideep_mc": "acc,none",
}
MIN_STOCK_SCORE = 0.90
MAX_POINTS_FROM_STOCK = 1.0
LOAD_FILE = "tiny_dsv3_tasks_load.json"
RESULT_FILE = "accuracy_cpu.json"

COMMON_ARGS = (
    "--served-model-name", SERVED_NAME,
    "--max-model-len", "128",
    "--enforce-eager",
    "--seed", "0",
)  # fmt: skip
WIDE_EP_ARGS = ("--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1")
# Online rebalancing forced often: a new placement every 4 steps, 2 redundant slots.
EPLB_ARGS = ("--wideep-eplb", "online", "--wideep-eplb-interval", "4")
EPLB_ARGS += ("--wideep-redundant-experts", "2")
MTP_ARGS = ("--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": 1}))
# What a row serves: `--model`, or its FP8-experts checkpoint or that one's dequantized copy
# (`tools.accuracy.fp8.write_fp8_experts_model`).
Checkpoint = Literal["trained", "fp8", "dequantized"]
CHECKPOINTS: tuple[str, ...] = get_args(Checkpoint)
BASELINE = "stock"
FP8_BASELINE = "stock, FP8 dequantized"


@dataclass(frozen=True)
class ServeConfig:
    """One row: `vllm serve CHECKPOINT *COMMON_ARGS *args`, with `num_ranks` engine
    processes (one CPU core each); its scores must stay within `MAX_POINTS_FROM_STOCK` of
    row `baseline`'s on every task (None: a baseline itself)."""

    name: str
    args: tuple[str, ...]
    num_ranks: int = 1
    checkpoint: Checkpoint = "trained"
    baseline: str | None = BASELINE

    @property
    def wide_ep(self) -> bool:
        return "--enable-wideep" in self.args

    @property
    def speculative(self) -> bool:
        return "--speculative-config" in self.args

    @property
    def rebalancing(self) -> bool:
        return "--wideep-eplb" in self.args


CONFIGS: tuple[ServeConfig, ...] = (
    ServeConfig(BASELINE, (), baseline=None),
    ServeConfig("wide-EP", WIDE_EP_ARGS, num_ranks=2),
    ServeConfig("wide-EP + online EPLB", WIDE_EP_ARGS + EPLB_ARGS, num_ranks=2),
    ServeConfig("stock + MTP", MTP_ARGS),
    ServeConfig("wide-EP + MTP", WIDE_EP_ARGS + MTP_ARGS, num_ranks=2),
    ServeConfig(FP8_BASELINE, (), checkpoint="dequantized", baseline=None),
    ServeConfig("wide-EP, FP8", WIDE_EP_ARGS, num_ranks=2, checkpoint="fp8", baseline=FP8_BASELINE),
)
INPROCESS_NAME = "wide-EP, lm-eval vllm in-process (TP=2)"
# row name -> the row it is compared with, None for a baseline; rows not listed (the
# in-process one) compare with stock.
BASELINE_OF: dict[str, str | None] = {c.name: c.baseline for c in CONFIGS}
assert {c.checkpoint for c in CONFIGS} <= set(CHECKPOINTS), CONFIGS
assert {b for b in BASELINE_OF.values() if b} <= {n for n, b in BASELINE_OF.items() if not b}


@dataclass
class Row:
    name: str
    command: str
    scores: dict[str, float] = field(default_factory=dict)
    mtp_acceptance: float | None = None
    rebalances: int | None = None  # placements applied, summed over layers (online EPLB)
    start_s: float | None = None
    eval_s: float | None = None
    error: str | None = None
    # kind -> MoE layer -> the 4 busiest experts and their share of the kind's rows
    routing: dict[str, Any] | None = None


# --------------------------------------------------------------------------- #
# lm-eval
# --------------------------------------------------------------------------- #


def _scores(results: dict[str, Any]) -> dict[str, float]:
    return {task: float(results["results"][task][key]) for task, key in METRICS.items()}


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def lm_eval_server(url: str, model: Path, limit: int | None) -> dict[str, float]:
    """lm-eval `local-completions` against the server at `url`: score per task."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": SERVED_NAME,
            "base_url": f"{url}/v1/completions",
            "tokenizer": str(model),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": False,
            "num_concurrent": 1,
            "max_retries": 2,
            "timeout": 600,
        },
        tasks=[TASK_GROUP],
        task_manager=_task_manager(),
        batch_size=50,
        limit=limit,
        log_samples=False,
    )
    return _scores(results)


def lm_eval_inprocess(model: Path, limit: int | None) -> tuple[dict[str, float], int]:
    """lm-eval's `vllm` model (vLLM's `LLM` in this process) with wide EP over TP=2.

    Returns the scores and how many EP ranks' experts computed rows (`wideep_stats`),
    which shows that `additional_config` reached the engine."""
    import lm_eval
    from lm_eval.api.registry import get_model

    lm = get_model("vllm").create_from_arg_obj(
        {
            "pretrained": str(model),
            "tensor_parallel_size": 2,
            "additional_config": {"wideep": {"enabled": True}},
            "enforce_eager": True,
            "max_model_len": 128,
            "seed": 0,
        },
        {"batch_size": "auto"},
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK_GROUP], task_manager=_task_manager(), limit=limit, log_samples=False
    )
    stats = lm.model.collective_rpc("wideep_stats")
    busy_ranks = sum(any(sum(rows) for rows in s["tokens_per_expert"].values()) for s in stats)
    return _scores(results), busy_ranks


# --------------------------------------------------------------------------- #
# Server-side numbers
# --------------------------------------------------------------------------- #


def expert_load(stats: list[dict[str, Any]]) -> dict[str, list[int]]:
    """`wideep_stats` replies (one per EP rank) -> layer -> `[E]` rows per expert, the
    ranks' local experts concatenated in EP-rank order (rank r holds r * E_local ...)."""
    by_rank = sorted(stats, key=lambda s: s["ep_rank"])
    layers = by_rank[0]["tokens_per_expert"]
    return {layer: [n for s in by_rank for n in s["tokens_per_expert"][layer]] for layer in layers}


def _counter(metrics: str, name: str) -> float:
    """Sum of a Prometheus counter over its label sets (e.g. one per engine)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$")
    return sum(float(m.group(1)) for line in metrics.splitlines() if (m := pattern.match(line)))


def mtp_acceptance(metrics: str) -> float | None:
    """Accepted / drafted speculative tokens from a `/metrics` page, None before any draft."""
    drafted = _counter(metrics, "vllm:spec_decode_num_draft_tokens")
    accepted = _counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    return accepted / drafted if drafted else None


def _load_now(server: Server) -> dict[str, list[int]]:
    return expert_load(server.post("/collective_rpc", {"method": "wideep_stats"})["results"])


def _load_since(server: Server, before: dict[str, list[int]]) -> dict[str, list[int]]:
    now = _load_now(server)
    return {k: [b - a for a, b in zip(before[k], now[k], strict=True)] for k in now}


def busiest_experts(load: dict[str, list[int]], top: int = 4) -> dict[str, Any]:
    """layer -> `{"experts": the `top` busiest, "share": their fraction of the rows}`."""
    result = {}
    for layer in sorted(load, key=_layer_index):
        rows = load[layer]
        order = sorted(range(len(rows)), key=lambda e: (-rows[e], e))[:top]
        share = sum(rows[e] for e in order) / max(1, sum(rows))
        result[layer] = {"experts": order, "share": round(share, 3)}
    return result


def routing_by_kind(server: Server) -> dict[str, Any]:
    """Greedy completions of each kind's evaluation prompts, one kind at a time: which
    experts each kind uses (`busiest_experts` of the rows it adds)."""
    result = {}
    for kind in KINDS:
        before = _load_now(server)
        prompts = [row["prompt"] for row in generation_rows(kind)]
        body = {"model": SERVED_NAME, "prompt": prompts, "max_tokens": 4, "temperature": 0}
        server.post("/v1/completions", body, timeout=600)
        result[kind] = busiest_experts(_load_since(server, before))
    return result


def _layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def write_load_file(path: Path, load: dict[str, list[int]], model: Path) -> None:
    """The routing of the evaluation as a `vllm-wideep-load` file (EPLB benchmark trace)."""
    import torch

    from vllm_wideep.eplb.files import LoadRecord, ModelIdentity, write_load

    config = json.loads((model / "config.json").read_text())
    layers = sorted(load, key=_layer_index)
    identity = ModelIdentity(
        architecture=config["architectures"][0],
        num_experts=config["n_routed_experts"],
        hidden_size=config["hidden_size"],
    )
    rows = torch.tensor([load[layer] for layer in layers], dtype=torch.float64)
    write_load(path, LoadRecord(model=identity, layers=layers, load=rows))


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #


def run_config(config: ServeConfig, model: Path, limit: int | None, load_path: Path | None) -> Row:
    """Serve `model` with `config`, evaluate it, stop the server."""
    args = [*COMMON_ARGS, *config.args]
    row = Row(config.name, " ".join(["vllm serve", model.name, *config.args]))
    env = e2e_env(config.num_ranks, VLLM_SERVER_DEV_MODE="1")
    start = time.monotonic()
    server = Server(str(model), args, env)
    try:
        server.wait_ready(timeout=900)
        row.start_s = round(time.monotonic() - start, 1)
        record = config.wide_ep and load_path is not None
        before = _load_now(server) if record else None
        start = time.monotonic()
        row.scores = lm_eval_server(server.url, model, limit)
        row.eval_s = round(time.monotonic() - start, 1)
        if record:
            write_load_file(load_path, _load_since(server, before), model)
            row.routing = routing_by_kind(server)
        if config.speculative:
            row.mtp_acceptance = mtp_acceptance(server.get_text("/metrics"))
        if config.rebalancing:
            metrics = server.get_text("/metrics")
            row.rebalances = int(_counter(metrics, "vllm_wideep:eplb_rebalances"))
            if failures := int(_counter(metrics, "vllm_wideep:eplb_failures")):
                raise RuntimeError(f"{failures} failed rebalances")
            if not row.rebalances:
                raise RuntimeError("online EPLB on, but no rebalance happened")
    except Exception as error:  # one failed row must not hide the others
        row.error = f"{type(error).__name__}: {error}"[-3000:]
        log = server.output()
        errors = [line for line in log.splitlines() if "Error" in line]
        print(f"{config.name}: FAILED\n{row.error}\n--- server log ---\n{log[-4000:]}")
        print("--- error lines of the server log ---\n" + "\n".join(errors[-20:]))
    finally:
        server.stop()
    return row


def run_inprocess(model: Path, limit: int | None) -> Row:
    """`lm_eval_inprocess` in a child process group (vLLM's workers die with it)."""
    row = Row(INPROCESS_NAME, "lm-eval --model vllm additional_config={'wideep': ...}")
    cmd = [sys.executable, "-m", "tools.accuracy.eval", "--model", str(model)]
    cmd += ["--inprocess-child"] + (["--limit", str(limit)] if limit else [])
    start = time.monotonic()
    try:
        output = run_group(cmd, e2e_env(2), timeout=1800)
        line = next(x for x in output.splitlines() if x.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        if result["busy_ranks"] != 2:
            raise RuntimeError(f"experts ran on {result['busy_ranks']} EP ranks, not 2")
        row.scores = result["scores"]
        row.eval_s = round(time.monotonic() - start, 1)
    except Exception as error:
        row.error = f"{type(error).__name__}: {error}"[-3000:]
        print(f"{INPROCESS_NAME}: FAILED\n{row.error}")
    return row


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def check_targets(rows: list[Row]) -> list[str]:
    """The missed targets, in words (empty when all are met): stock at least
    `MIN_STOCK_SCORE` on every task, every other row within `MAX_POINTS_FROM_STOCK` points
    of its baseline (`BASELINE_OF`, stock where not listed) on every task."""
    by_name = {row.name: row for row in rows}
    missed = []
    for row in rows:
        if row.error:
            missed.append(f"{row.name} failed")
            continue
        baseline = BASELINE_OF.get(row.name, BASELINE)
        if baseline is None:
            if row.name == BASELINE:
                missed += [
                    f"{row.name} {task} = {100 * score:.1f} % < {100 * MIN_STOCK_SCORE:.0f} %"
                    for task, score in row.scores.items()
                    if score < MIN_STOCK_SCORE
                ]
            continue
        base = by_name.get(baseline)
        if base is None or not base.scores:
            missed.append(f"no {baseline} scores to compare {row.name} with")
            continue
        for task, score in row.scores.items():
            points = 100 * abs(score - base.scores[task])
            if points > MAX_POINTS_FROM_STOCK:
                missed.append(f"{row.name} {task}: {points:.1f} points from {baseline}")
    return missed


def table(rows: list[Row]) -> str:
    """Markdown table: one row per config, scores in %."""
    tasks = list(METRICS)
    head = ["config", *(t.removeprefix("wideep_") for t in tasks), "MTP acceptance"]
    head.append("rebalances")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.error:
            cells = ["failed"] * len(tasks) + ["", ""]
        else:
            cells = [f"{100 * row.scores[t]:.1f}" for t in tasks]
            rate = row.mtp_acceptance
            cells.append("" if rate is None else f"{100 * rate:.1f} %")
            cells.append("" if row.rebalances is None else str(row.rebalances))
        lines.append("| " + " | ".join([row.name, *cells]) + " |")
    return "\n".join(lines)


def routing_summary(routing: dict[str, Any]) -> str:
    """One line per (MoE layer, kind): its 4 busiest experts and their share of its rows."""
    lines = []
    for kind, layers in routing.items():
        for layer, busiest in layers.items():
            share = 100 * busiest["share"]
            lines.append(f"  {layer:<28} {kind:<8} experts {busiest['experts']}  {share:.0f} %")
    return "\n".join(sorted(lines, key=lambda line: (_layer_index(line), line)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy.eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--configs", nargs="*", choices=[c.name for c in CONFIGS])
    parser.add_argument("--limit", type=int, help="items per task (default: all)")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the lm-eval vllm row")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="where the FP8 checkpoints are written"
    )
    parser.add_argument("--inprocess-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model.absolute()
    if not (model / "config.json").exists():
        print(f"no checkpoint in {model}; run `make model`", file=sys.stderr)
        return 2
    if args.inprocess_child:
        scores, busy_ranks = lm_eval_inprocess(model, args.limit)
        print("RESULT " + json.dumps({"scores": scores, "busy_ranks": busy_ranks}), flush=True)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    configs = [c for c in CONFIGS if args.configs is None or c.name in args.configs]
    checkpoints = {"trained": model}
    if any(c.checkpoint != "trained" for c in configs):
        fp8 = write_fp8_experts_model(model, args.work.absolute() / f"{model.name}-fp8")
        checkpoints.update(fp8=fp8.fp8, dequantized=fp8.dequantized)
    rows, load_path = [], args.out / LOAD_FILE
    for config in configs:
        served = checkpoints[config.checkpoint]
        print(f"== {config.name}: vllm serve {served.name} {' '.join(config.args)}", flush=True)
        plain_wide_ep = config.wide_ep and not config.speculative and config.checkpoint == "trained"
        record = load_path if plain_wide_ep else None
        rows.append(run_config(config, served, args.limit, record))
        if record is not None:
            load_path = None  # the first plain wide-EP row records the routing
    if not args.no_inprocess:
        print(f"== {INPROCESS_NAME}", flush=True)
        rows.append(run_inprocess(model, args.limit))

    print("\n" + table(rows))
    for row in rows:
        if row.routing:
            print(f"\nrouting of {row.name}: the 4 busiest of 16 experts per task kind")
            print(routing_summary(row.routing))
    missed = check_targets(rows)
    print("\ntargets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    result = {
        "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
        "limit": args.limit,
        "rows": [asdict(row) for row in rows],
        "targets_missed": missed,
    }
    (args.out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / RESULT_FILE}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
