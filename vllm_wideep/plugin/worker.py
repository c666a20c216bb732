"""Read-only worker methods, reachable with `collective_rpc` (LLM or the dev endpoint)."""

from __future__ import annotations

from typing import Any


def wideep_stats(worker) -> dict[str, Any]:
    """This rank's EP rank and, per MoE layer, the (token, expert) rows its experts
    computed: `{"ep_rank": r, "tokens_per_expert": {layer_name: [E_local ints]}}`."""
    from vllm.distributed import get_ep_group

    from vllm_wideep.layer.runner import WideEPMoERunner

    context = worker.vllm_config.compilation_config.static_forward_context
    layers = {
        name: layer.tokens_per_expert.tolist()
        for name, layer in context.items()
        if isinstance(layer, WideEPMoERunner) and layer.wideep_enabled
    }
    return {"ep_rank": get_ep_group().rank_in_group, "tokens_per_expert": layers}


def patch_worker() -> None:
    """Expose `wideep_stats` as a method of every vLLM worker (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, "wideep_stats"):
        WorkerBase.wideep_stats = wideep_stats


def patch_dp_client() -> None:
    """With data parallelism, vLLM's load-balancing client sends a `collective_rpc` to
    every engine but returns the first engine's replies only; for `wideep_stats` gather
    the replies of all engines (every EP rank), as vLLM's own weight checksums do."""
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    original = DPLBAsyncMPClient.collective_rpc_async
    if getattr(original, "_vllm_wideep", False):
        return

    async def collective_rpc_async(self, method, timeout=None, args=(), kwargs=None):
        if method != "wideep_stats":
            return await original(self, method, timeout, args, kwargs)
        per_engine = await self.call_utility_all_async(
            "collective_rpc", method, timeout, args, kwargs
        )
        return [reply for replies in per_engine for reply in replies]

    collective_rpc_async._vllm_wideep = True
    DPLBAsyncMPClient.collective_rpc_async = collective_rpc_async
