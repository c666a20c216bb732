"""Worker side: the RPCs reachable with `collective_rpc` (LLM, or the dev endpoint of a
server), and the per-step hook that runs the load balancer.

    wideep_stats   per MoE layer: (token, expert) rows per local slot, balancer counters,
                   token-exchange bytes
    wideep_load    the expert load window and the placement, for `vllm-wideep eplb record`
    wideep_fault_drill  arm a bad transfer on this rank's next expert move (the group
                   must refuse that move and keep serving); for operators' drills and the
                   soak benchmark

Both read the worker's `layer.state.WorkerState`. They reach vLLM's workers through its
supported `worker_extension_cls` option (set by `engine.adjust_engine_args`).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from vllm_wideep.layer.state import WorkerState, worker_state
from vllm_wideep.plugin.hooks import wrap
from vllm_wideep.plugin.metrics import PUBLISH_EVERY, Publisher

RPC_METHODS = ("wideep_stats", "wideep_load", "wideep_fault_drill")


class WideEPWorkerExtension:
    """Mixed into vLLM's worker class by vLLM (`--worker-extension-cls`)."""

    def wideep_stats(self) -> dict[str, Any]:
        """This rank's EP rank and, per MoE layer, the (token, expert) rows each of its
        slots computed: `{"ep_rank": r, "tokens_per_expert": {layer_name: [S ints]}}`,
        the bytes its slots hold per layer (`"expert_bytes"`: weights and, for FP8
        experts, their scales), the balancer's counters per layer (`"eplb"`), its step
        hook's times (`"eplb_steps"`: `balancer.StepTimes`), the bytes reserved for
        staging expert moves (`"staging_bytes"`), and the bytes its token exchange
        moved: `"traffic": {layer_name: {"calls", "dispatch_sent_bytes",
        "dispatch_recv_bytes", "combine_sent_bytes", "combine_recv_bytes",
        "overflow_rows"}}` (`comm.base.TrafficCounters`)."""
        from vllm.distributed import get_ep_group

        state = worker_state(self.vllm_config.parallel_config)
        if state is None:
            raise RuntimeError("vllm_wideep: this engine has no wide-EP MoE layer")
        balancer = state.balancer
        eplb, eplb_steps = {}, {}
        if balancer is not None:
            eplb = {
                name: dataclasses.asdict(counter)
                for name, counter in zip(balancer.layer_names, balancer.counters, strict=True)
            }
            eplb_steps = dataclasses.asdict(balancer.step_times)
        return {
            "ep_rank": get_ep_group().rank_in_group,
            "tokens_per_expert": {
                name: slots.tokens_per_slot.tolist() for name, slots in state.slots.items()
            },
            "expert_bytes": {
                name: sum(w.numel() * w.element_size() for w in slots.weights)
                for name, slots in state.slots.items()
            },
            "eplb": eplb,
            "eplb_steps": eplb_steps,
            "staging_bytes": state.staging.nbytes if state.staging is not None else 0,
            "traffic": {name: traffic.snapshot() for name, traffic in state.traffic.items()},
        }

    def wideep_load(self) -> dict[str, Any]:
        """This rank's windowed expert load and the placement in use, per MoE layer:
        `{"ep_rank", "num_ranks", "model", "layers", "load" [L][E], "physical_to_logical"
        [L][N]}`; a recorder sums "load" over ranks."""
        from vllm_wideep.eplb.files import ModelIdentity

        parallel_config = self.vllm_config.parallel_config
        balancer = _balancer(worker_state(parallel_config), parallel_config)
        if balancer is None:
            raise RuntimeError("vllm_wideep: this engine has no wide-EP MoE layer")
        return {
            "ep_rank": balancer.rank,
            "num_ranks": balancer.num_ranks,
            "model": dataclasses.asdict(
                ModelIdentity.from_model_config(self.vllm_config.model_config)
            ),
            "layers": balancer.layer_names,
            "load": balancer.load().tolist(),
            "physical_to_logical": balancer.placement().physical_to_logical.tolist(),
        }

    def wideep_fault_drill(self, kind: str = "corrupt_transfer") -> dict[str, Any]:
        """Arm a one-shot fault on this rank: `corrupt_transfer` alters one byte of the
        next expert slot this rank receives, before verification."""
        from vllm.distributed import get_ep_group

        from vllm_wideep.eplb.mover import drill_corrupt_next_receive

        if kind != "corrupt_transfer":
            raise ValueError(
                f"vllm_wideep: unknown fault drill {kind!r}; the drills are: corrupt_transfer"
            )
        drill_corrupt_next_receive()
        return {"ep_rank": get_ep_group().rank_in_group, "armed": kind}


def _ep_device_group():
    from vllm.distributed import get_ep_group

    return get_ep_group().device_group


def collective_timeout(parallel_config) -> timedelta | None:
    """How long the plugin's own collectives wait for a peer: vLLM's
    --distributed-timeout-seconds, else (gloo, CPU) --cpu-distributed-timeout-seconds,
    else torch's default."""
    seconds = parallel_config.distributed_timeout_seconds
    if seconds is None:
        seconds = parallel_config.cpu_distributed_timeout_seconds
    return None if seconds is None else timedelta(seconds=seconds)


def _balancer(state: WorkerState | None, parallel_config):
    if state is None:
        return None
    return state.balancer_or_none(_ep_device_group, collective_timeout(parallel_config))


def step_balancer(parallel_config, is_dummy: bool, is_profile: bool) -> None:
    """After every engine step (and dummy step) on every rank: the balancer's step, and
    the metrics snapshot every `PUBLISH_EVERY` steps and when a rebalance completes."""
    state = worker_state(parallel_config)
    balancer = _balancer(state, parallel_config)
    if balancer is None:
        return
    moving = balancer.moving
    balancer.step(is_dummy=is_dummy, is_profile=is_profile)
    if state.publisher is None:
        state.publisher = Publisher(balancer.rank)
    if balancer.steps % PUBLISH_EVERY == 1 or (moving and not balancer.moving):
        state.publisher.publish(balancer)


def install_step_hooks() -> None:
    """Run `step_balancer` wherever vLLM steps its own EPLB: the V1 model runner's
    `eplb_step`, and Model Runner V2's EPLB controller (GPUs)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap_step(original):
        def step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
            step_balancer(self.parallel_config, is_dummy, is_profile)
            return original(self, is_dummy=is_dummy, is_profile=is_profile)

        return step

    wrap(GPUModelRunner, "eplb_step", wrap_step)
    try:
        from vllm.v1.worker.gpu.eplb_utils import EPLBController
    except ImportError:
        return
    wrap(EPLBController, "step", wrap_step)


def patch_dp_client() -> None:
    """With data parallelism, vLLM's load-balancing client sends a `collective_rpc` to
    every engine but returns the first engine's replies only; for the wide-EP RPCs gather
    the replies of all engines (every EP rank), as vLLM's own weight checksums do."""
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    def wrap_collective_rpc_async(original):
        async def collective_rpc_async(self, method, timeout=None, args=(), kwargs=None):
            if method not in RPC_METHODS:
                return await original(self, method, timeout, args, kwargs)
            per_engine = await self.call_utility_all_async(
                "collective_rpc", method, timeout, args, kwargs
            )
            return [reply for replies in per_engine for reply in replies]

        return collective_rpc_async

    wrap(DPLBAsyncMPClient, "collective_rpc_async", wrap_collective_rpc_async)
