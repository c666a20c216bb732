"""Worker-side glue: RPCs reachable with `collective_rpc` (LLM or the dev endpoint), and
the per-step hook that runs the load balancer.

    wideep_stats   per MoE layer: (token, expert) rows per local slot, and balancer counters
    wideep_load    the expert load window and the placement, for `vllm-wideep eplb record`
"""

from __future__ import annotations

import dataclasses
from typing import Any


def wideep_stats(worker) -> dict[str, Any]:
    """This rank's EP rank and, per MoE layer, the (token, expert) rows its experts
    computed: `{"ep_rank": r, "tokens_per_expert": {layer_name: [E_local ints]}}`, and
    the bytes its token exchange moved: `"traffic": {layer_name: {"calls",
    "dispatch_sent_bytes", "dispatch_recv_bytes", "combine_sent_bytes",
    "combine_recv_bytes", "overflow_rows"}}` (`comm.base.TrafficCounters`)."""
    from vllm.distributed import get_ep_group

    from vllm_wideep.layer.runner import WideEPMoERunner

    context = worker.vllm_config.compilation_config.static_forward_context
    layers = {
        name: layer.tokens_per_expert.tolist()
        for name, layer in context.items()
        if isinstance(layer, WideEPMoERunner) and layer.wideep_enabled
    }
    balancer = _balancer(worker)
    eplb = {}
    if balancer is not None:
        eplb = {
            name: dataclasses.asdict(counter)
            for name, counter in zip(balancer.layer_names, balancer.counters, strict=True)
        }
    traffic = {
        name: layer.traffic
        for name, layer in context.items()
        if isinstance(layer, WideEPMoERunner) and layer.wideep_enabled
    }
    return {
        "ep_rank": get_ep_group().rank_in_group,
        "tokens_per_expert": layers,
        "eplb": eplb,
        "traffic": traffic,
    }


def wideep_load(worker) -> dict[str, Any]:
    """This rank's windowed expert load and the placement in use, per MoE layer:
    `{"ep_rank", "num_ranks", "model", "layers", "load" [L][E], "physical_to_logical"
    [L][N]}`; a recorder sums "load" over ranks."""
    from vllm_wideep.eplb.files import ModelIdentity

    balancer = _balancer(worker)
    if balancer is None:
        raise RuntimeError("vllm_wideep: this engine has no wide-EP MoE layer")
    return {
        "ep_rank": balancer.rank,
        "num_ranks": balancer.num_ranks,
        "model": dataclasses.asdict(
            ModelIdentity.from_model_config(worker.vllm_config.model_config)
        ),
        "layers": balancer.layer_names,
        "load": balancer.load().tolist(),
        "physical_to_logical": balancer.placement().physical_to_logical.tolist(),
    }


def _balancer(worker):
    from vllm_wideep.eplb.balancer import balancer_for

    return balancer_for(worker.vllm_config.parallel_config)


def _step_balancer(parallel_config, is_dummy: bool, is_profile: bool) -> None:
    from vllm_wideep.eplb.balancer import balancer_for
    from vllm_wideep.plugin.metrics import PUBLISH_EVERY, Publisher

    balancer = balancer_for(parallel_config)
    if balancer is None:
        return
    moving = balancer.moving
    balancer.step(is_dummy=is_dummy, is_profile=is_profile)
    if not hasattr(balancer, "publisher"):
        balancer.publisher = Publisher(balancer.rank)
    if balancer.steps % PUBLISH_EVERY == 1 or (moving and not balancer.moving):
        balancer.publisher.publish(balancer)


def install_eplb_hook() -> None:
    """Run the wide-EP balancer wherever vLLM steps its own EPLB (idempotent): after each
    engine step and each dummy step, on every rank. Called in worker processes only (the
    model runner modules are heavy)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.eplb_step, "_vllm_wideep", False):
        original = GPUModelRunner.eplb_step

        def eplb_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
            _step_balancer(self.parallel_config, is_dummy, is_profile)
            return original(self, is_dummy=is_dummy, is_profile=is_profile)

        eplb_step._vllm_wideep = True
        GPUModelRunner.eplb_step = eplb_step
    try:  # Model Runner V2 (GPUs) steps EPLB through its controller.
        from vllm.v1.worker.gpu.eplb_utils import EPLBController
    except ImportError:
        return
    if not getattr(EPLBController.step, "_vllm_wideep", False):
        original_step = EPLBController.step

        def step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
            _step_balancer(self.parallel_config, is_dummy, is_profile)
            return original_step(self, is_dummy=is_dummy, is_profile=is_profile)

        step._vllm_wideep = True
        EPLBController.step = step


def patch_worker() -> None:
    """Expose `wideep_stats` as a method of every vLLM worker (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, "wideep_stats"):
        WorkerBase.wideep_stats = wideep_stats
        WorkerBase.wideep_load = wideep_load


def patch_dp_client() -> None:
    """With data parallelism, vLLM's load-balancing client sends a `collective_rpc` to
    every engine but returns the first engine's replies only; for `wideep_stats` gather
    the replies of all engines (every EP rank), as vLLM's own weight checksums do."""
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    original = DPLBAsyncMPClient.collective_rpc_async
    if getattr(original, "_vllm_wideep", False):
        return

    async def collective_rpc_async(self, method, timeout=None, args=(), kwargs=None):
        if method not in ("wideep_stats", "wideep_load"):
            return await original(self, method, timeout, args, kwargs)
        per_engine = await self.call_utility_all_async(
            "collective_rpc", method, timeout, args, kwargs
        )
        return [reply for replies in per_engine for reply in replies]

    collective_rpc_async._vllm_wideep = True
    DPLBAsyncMPClient.collective_rpc_async = collective_rpc_async
