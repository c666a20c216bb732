"""`WorkerState`: everything wide EP keeps in a worker process, in one visible place.

A worker builds its MoE layers (the model's, then the drafter's) under one vLLM engine
config; each wide-EP layer registers its expert slots and its token-exchange counters
here as it finishes loading. The balancer is made at the first engine step, once every
model is loaded, and the metrics publisher with it. The plugin's worker extension
(`wideep_stats`, `wideep_load`) and its per-step hook read this object; nothing else
holds wide-EP state between calls.

A process serves one engine at a time: layers built under another engine config (a new
`LLM` in the same process) start a new state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from vllm_wideep.comm.base import TrafficCounters
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.balancer import Balancer, staging_sets
from vllm_wideep.eplb.location import ExpertSlots
from vllm_wideep.eplb.mover import StagingPool

logger = logging.getLogger("vllm_wideep")


@dataclass
class WorkerState:
    """Wide-EP state of one worker.

    engine_config: the vLLM `ParallelConfig` the layers were built under (compared by
        identity to tell engines apart).
    config: the validated wide-EP options.
    slots: per MoE layer name, its expert slots on this rank (registration order).
    traffic: per MoE layer name, its token exchange's byte counters.
    balancer: made at the first step (`balancer_or_none`).
    publisher: the metrics publisher (`plugin.metrics.Publisher`), made by the plugin.
    staging: with online rebalancing, the moves' staging rows, reserved when the first
        layer registers (model build: vLLM's memory profile then counts them).
    """

    engine_config: Any
    config: WideEPConfig
    slots: dict[str, ExpertSlots] = field(default_factory=dict)
    traffic: dict[str, TrafficCounters] = field(default_factory=dict)
    balancer: Balancer | None = None
    publisher: Any = None
    staging: StagingPool | None = None

    def balancer_or_none(
        self, group_factory: Callable[[], Any], timeout: timedelta | None = None
    ) -> Balancer | None:
        """The balancer over every registered layer, made on first use with the EP
        process group `group_factory()` returns and its collectives' `timeout`; None
        without layers."""
        if self.balancer is None and self.slots:
            self.balancer = Balancer(
                list(self.slots.values()),
                self.config,
                group_factory(),
                staging=self.staging,
                timeout=timeout,
            )
        return self.balancer


_current: WorkerState | None = None
# Called when the first wide-EP layer of an engine registers: the plugin installs its
# worker-side vLLM hooks from here (only workers build MoE layers). Each must be idempotent.
on_first_layer: list[Callable[[], None]] = []


def register_layer(
    engine_config: Any, config: WideEPConfig, slots: ExpertSlots, traffic: TrafficCounters
) -> WorkerState:
    """Add a layer that finished loading; a layer of the same name (a weight reload)
    replaces its earlier registration."""
    global _current
    if _current is None or _current.engine_config is not engine_config:
        _current = WorkerState(engine_config, config)
        for callback in on_first_layer:
            callback()
    if config.eplb == "online" and _current.staging is None:
        _current.staging = _reserve_staging(config, slots, _model_layers())
    _current.slots[slots.layer_name] = slots
    _current.traffic[slots.layer_name] = traffic
    _current.balancer = None  # rebuilt over the new layer set at the next step
    return _current


def worker_state(engine_config: Any) -> WorkerState | None:
    """This engine's state, or None if it has no wide-EP layer (in this process)."""
    if _current is None or _current.engine_config is not engine_config:
        return None
    return _current


def _model_layers() -> int | None:
    """The hidden layers of the model vLLM is building (the most MoE layers it can have),
    None outside a vLLM config."""
    from vllm.config.vllm import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or vllm_config.model_config is None:
        return None
    return getattr(vllm_config.model_config.hf_text_config, "num_hidden_layers", None)


def _reserve_staging(
    config: WideEPConfig, slots: ExpertSlots, num_layers: int | None
) -> StagingPool:
    """Staging rows for `staging_sets` layers in flight, each S slots of every slot tensor
    of `slots` (the model's MoE layers share one shape; a layer that differs allocates its
    own at each move)."""
    pool = StagingPool.reserve(slots.weights, staging_sets(config, num_layers))
    logger.info(
        "vllm_wideep: EP rank %d reserved %.1f MiB for expert-move staging (%d layers in "
        "flight x %d slots x %d tensors)",
        slots.rank,
        pool.nbytes / 2**20,
        pool.buffers[0].shape[0],
        slots.slots_per_rank,
        len(slots.weights),
    )
    return pool
