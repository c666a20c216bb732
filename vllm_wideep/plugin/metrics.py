"""Wide-EP metrics on vLLM's Prometheus `/metrics`.

Workers run in other processes than the API server, so each worker writes a snapshot of
its counters to `$VLLM_WIDEEP_METRICS_DIR/rank-<ep rank>.json` (every `PUBLISH_EVERY`
steps, at the first step and after each rebalance: one host sync per publish), and a
collector in the API server reads them on every scrape:

    vllm_wideep:rank_tokens{layer, rank}         rows the rank's experts computed in the
                                                 last publish interval
    vllm_wideep:balancedness{layer}              mean / max of those over ranks (1 = even)
    vllm_wideep:eplb_rebalances_total{layer}     layers moved to a new placement
    vllm_wideep:eplb_failures_total{layer}       moves that failed verification (kept old)
    vllm_wideep:eplb_moved_bytes_total{layer}    expert weight bytes sent between ranks
    vllm_wideep:eplb_rebalance_seconds_total{layer}  wall time moving weights (max over ranks)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vllm_wideep.plugin.hooks import set_attribute, wrap

METRICS_DIR_ENV = "VLLM_WIDEEP_METRICS_DIR"
PUBLISH_EVERY = 16


def ensure_metrics_dir() -> Path:
    """The snapshot folder, created once in the front end; children inherit the variable."""
    if METRICS_DIR_ENV not in os.environ:
        os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="vllm_wideep_metrics_")
    return Path(os.environ[METRICS_DIR_ENV])


class Publisher:
    """Worker side: writes this rank's snapshot of a balancer's counters."""

    def __init__(self, ep_rank: int):
        self.ep_rank = ep_rank
        self._last_tokens: dict[str, int] = {}

    def publish(self, balancer) -> None:
        folder = os.environ.get(METRICS_DIR_ENV)
        if folder is None:
            return
        layers: dict[str, Any] = {}
        totals = torch.stack(
            [s.tokens_per_slot.sum() for s in balancer.layers if s.tokens_per_slot is not None]
        ).tolist()  # one host sync for all layers
        for slots, counter, total in zip(balancer.layers, balancer.counters, totals, strict=True):
            recent = total - self._last_tokens.get(slots.layer_name, 0)
            self._last_tokens[slots.layer_name] = total
            layers[slots.layer_name] = {
                "recent_tokens": recent,
                "rebalances": counter.rebalances,
                "failures": counter.failures,
                "moved_bytes": counter.moved_bytes,
                "seconds": counter.seconds,
            }
        path = Path(folder) / f"rank-{self.ep_rank}.json"
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ep_rank": self.ep_rank, "layers": layers}))
        tmp.replace(path)


def read_snapshots(folder: Path) -> list[dict[str, Any]]:
    snapshots = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            snapshots.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a worker is replacing it; the next scrape reads it
    return snapshots


class WideEPCollector:
    """API-server side: a Prometheus collector over the workers' snapshots."""

    def __init__(self, folder: Path):
        self.folder = folder

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshots = read_snapshots(self.folder)
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
        counters = {
            key: CounterMetricFamily(f"vllm_wideep:eplb_{name}", help_, labels=["layer"])
            for key, name, help_ in [
                ("rebalances", "rebalances", "layer moves to a new expert placement"),
                ("failures", "failures", "layer moves that failed verification"),
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
            for key, family in counters.items():
                values = [entry[key] for _, entry in per_rank]
                # Every rank moves the same layers: count a rebalance once, sum the bytes.
                value = max(values) if key in ("rebalances", "failures", "seconds") else sum(values)
                family.add_metric([layer], value)
        yield rank_tokens
        yield balancedness
        yield from counters.values()


_collector: WideEPCollector | None = None


def install_collector() -> None:
    """Add the collector to the registry vLLM's `/metrics` serves (once per process)."""
    import sys

    import prometheus_client
    from vllm.v1.metrics import prometheus as vllm_prometheus

    global _collector
    folder = ensure_metrics_dir()
    if _collector is not None:
        return
    _collector = collector = WideEPCollector(folder)
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
