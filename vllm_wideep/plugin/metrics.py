"""Wide-EP metrics on vLLM's Prometheus `/metrics`.

Workers run in other processes than the API server, so each worker writes a snapshot of
its counters to `$VLLM_WIDEEP_METRICS_DIR/rank-<ep rank>.json` (every `PUBLISH_EVERY`
steps, at the first step and after each rebalance: one host sync per publish), and a
collector in the API server reads them on every scrape:

    vllm_wideep:rank_tokens{layer, rank}         rows the rank's experts computed in the
                                                 last publish interval
    vllm_wideep:balancedness{layer}              mean / max of those over ranks (1 = even)
    vllm_wideep:expert_load{layer, expert}       tokens routed to each logical expert in the
                                                 balancer's load window, summed over ranks
                                                 (what `vllm-wideep eplb record` reads)
    vllm_wideep:model_info{architecture, num_experts, hidden_size}   1: the model served
    vllm_wideep:eplb_rebalances_total{layer}     layers moved to a new placement
    vllm_wideep:eplb_failures_total{layer}       moves that failed (every rank kept the old)
    vllm_wideep:eplb_moved_bytes_total{layer}    expert weight bytes sent between ranks
    vllm_wideep:eplb_rebalance_seconds_total{layer}  wall time moving weights (max over ranks)

Metrics never hurt what they observe: a snapshot that cannot be written is logged and
counted, never raised into the engine step; a snapshot that cannot be read or has the wrong
shape is skipped with a log line, and vLLM's own metrics are served regardless; snapshots
of another run (another front end's id) are ignored; the folder the front end made is
removed when it exits. Why files and not prometheus_client's multiprocess mode:
docs/architecture.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from vllm_wideep.plugin.hooks import set_attribute, wrap

logger = logging.getLogger("vllm_wideep")

METRICS_DIR_ENV = "VLLM_WIDEEP_METRICS_DIR"
METRICS_RUN_ENV = "VLLM_WIDEEP_METRICS_RUN"
PUBLISH_EVERY = 16
_COUNTERS = ("rebalances", "failures", "moved_bytes", "seconds")


def ensure_metrics_dir() -> Path:
    """The snapshot folder and this run's id, made once in the front end (children inherit
    the variables); a folder made here is removed when the front end exits."""
    if METRICS_DIR_ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix="vllm_wideep_metrics_")
        os.environ[METRICS_DIR_ENV] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ.setdefault(METRICS_RUN_ENV, uuid.uuid4().hex)
    return Path(os.environ[METRICS_DIR_ENV])


class Publisher:
    """Worker side: writes this rank's snapshot of a balancer's counters and load.

    failures: snapshots that could not be written (logged; serving goes on)."""

    def __init__(self, ep_rank: int):
        self.ep_rank = ep_rank
        self.failures = 0
        self._last_tokens: dict[str, int] = {}

    def publish(self, balancer) -> None:
        folder = os.environ.get(METRICS_DIR_ENV)
        if folder is None:
            return
        try:
            write_atomically(Path(folder) / f"rank-{self.ep_rank}.json", self.snapshot(balancer))
        except (OSError, RuntimeError, ValueError) as error:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                logger.warning(
                    "vllm_wideep: EP rank %d could not write its metrics snapshot (%s); "
                    "%d failed so far, serving goes on",
                    self.ep_rank,
                    error,
                    self.failures,
                )

    def snapshot(self, balancer) -> dict[str, Any]:
        """This rank's counters per layer (one host sync for all layers)."""
        totals = torch.stack([s.tokens_per_slot.sum() for s in balancer.layers]).tolist()
        load = balancer.load().tolist()  # [L][E] this rank's windowed load
        layers: dict[str, Any] = {}
        for slots, counter, total, expert_load in zip(
            balancer.layers, balancer.counters, totals, load, strict=True
        ):
            recent = total - self._last_tokens.get(slots.layer_name, 0)
            self._last_tokens[slots.layer_name] = total
            layers[slots.layer_name] = {
                "recent_tokens": recent,
                "expert_load": expert_load[: slots.num_experts],
                **{key: getattr(counter, key) for key in _COUNTERS},
            }
        run = os.environ.get(METRICS_RUN_ENV, "")
        return {"run": run, "ep_rank": self.ep_rank, "layers": layers}


def write_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write JSON to `path` through a new temporary file beside it (never an existing
    path or link), then rename: readers see the old file or the new one, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _valid(snapshot: Any) -> bool:
    """Whether a snapshot has the shape `Publisher.snapshot` writes."""
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("ep_rank"), int):
        return False
    layers = snapshot.get("layers")
    if not isinstance(layers, dict):
        return False
    for entry in layers.values():
        if not isinstance(entry, dict):
            return False
        numbers = [entry.get(key) for key in ("recent_tokens", *_COUNTERS)]
        load = entry.get("expert_load")
        if not isinstance(load, list):
            return False
        for value in numbers + load:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            if not math.isfinite(value):
                return False
    return True


def read_snapshots(folder: Path, run: str | None) -> list[dict[str, Any]]:
    """This run's well-formed snapshots; others are skipped (malformed ones logged)."""
    snapshots = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            snapshot = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue  # gone or being replaced: the next scrape reads it
        if not _valid(snapshot):
            logger.warning("vllm_wideep: skipping malformed metrics snapshot %s", path)
            continue
        if run is not None and snapshot.get("run") != run:
            continue  # another run's
        snapshots.append(snapshot)
    return snapshots


class WideEPCollector:
    """API-server side: a Prometheus collector over the workers' snapshots."""

    def __init__(self, folder: Path, run: str | None = None, model: dict[str, Any] | None = None):
        self.folder = folder
        self.run = run
        self.model = model or {}

    def describe(self):
        return []

    def collect(self):
        try:
            families = self._families(read_snapshots(self.folder, self.run))
        except Exception as error:  # vLLM's own metrics must be served regardless
            logger.warning("vllm_wideep: wide-EP metrics skipped this scrape (%s)", error)
            return
        yield from families

    def _families(self, snapshots: list[dict[str, Any]]) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rank_tokens = GaugeMetricFamily(
            "vllm_wideep:rank_tokens",
            "(token, expert) rows each EP rank computed in the last publish interval",
            labels=["layer", "rank"],
        )
        balancedness = GaugeMetricFamily(
            "vllm_wideep:balancedness",
            "mean / max over EP ranks of rank_tokens (1 = perfectly even)",
            labels=["layer"],
        )
        expert_load = GaugeMetricFamily(
            "vllm_wideep:expert_load",
            "tokens routed to each logical expert in the load window, summed over EP ranks",
            labels=["layer", "expert"],
        )
        counters = {
            key: CounterMetricFamily(f"vllm_wideep:eplb_{name}", help_, labels=["layer"])
            for key, name, help_ in [
                ("rebalances", "rebalances", "layer moves to a new expert placement"),
                ("failures", "failures", "layer moves that failed (every rank kept the old)"),
                ("moved_bytes", "moved_bytes", "expert weight bytes moved between ranks"),
                ("seconds", "rebalance_seconds", "wall time spent moving expert weights"),
            ]
        }
        layers = sorted({name for snap in snapshots for name in snap["layers"]})
        for layer in layers:
            per_rank = [
                (s["ep_rank"], s["layers"][layer]) for s in snapshots if layer in s["layers"]
            ]
            tokens = [entry["recent_tokens"] for _, entry in per_rank]
            for rank, entry in per_rank:
                rank_tokens.add_metric([layer, str(rank)], entry["recent_tokens"])
            peak = max(tokens)
            balancedness.add_metric([layer], sum(tokens) / len(tokens) / peak if peak else 1.0)
            loads = [entry["expert_load"] for _, entry in per_rank]
            if len({len(load) for load in loads}) == 1:
                for expert, values in enumerate(zip(*loads, strict=True)):
                    expert_load.add_metric([layer, str(expert)], sum(values))
            for key, family in counters.items():
                values = [entry[key] for _, entry in per_rank]
                # Every rank moves the same layers: count a rebalance once, sum the bytes.
                value = max(values) if key in ("rebalances", "failures", "seconds") else sum(values)
                family.add_metric([layer], value)
        model_info = GaugeMetricFamily(
            "vllm_wideep:model_info",
            "the model the load is for (value 1)",
            labels=list(self.model),
        )
        if self.model:
            model_info.add_metric([str(v) for v in self.model.values()], 1)
        return [model_info, rank_tokens, balancedness, expert_load, *counters.values()]


_collector: WideEPCollector | None = None


def install_collector(model: dict[str, Any] | None = None) -> None:
    """Add the collector to the registry vLLM's `/metrics` serves (once per process).
    model: the served model's identity (`eplb.files.ModelIdentity` as a dict)."""
    import sys

    import prometheus_client
    from vllm.v1.metrics import prometheus as vllm_prometheus

    global _collector
    folder = ensure_metrics_dir()
    if _collector is not None:
        return
    _collector = collector = WideEPCollector(folder, os.environ[METRICS_RUN_ENV], model)
    prometheus_client.REGISTRY.register(collector)

    # With several API servers vLLM serves a separate multiprocess registry.
    def wrap_get_prometheus_registry(original):
        def get_prometheus_registry():
            registry = original()
            if registry is not prometheus_client.REGISTRY:
                registry.register(collector)
            return registry

        return get_prometheus_registry

    wrap(vllm_prometheus, "get_prometheus_registry", wrap_get_prometheus_registry)
    route = sys.modules.get("vllm.entrypoints.serve.instrumentator.metrics")
    if route is not None:
        set_attribute(route, "get_prometheus_registry", vllm_prometheus.get_prometheus_registry)
