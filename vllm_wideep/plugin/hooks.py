"""Every change vllm_wideep makes to vLLM (and Ray) at run time, in one table.

`HOOKS` lists each symbol the plugin touches: where it lives, how it is changed, in which
processes, and why. The supported extension points come first (`register_oot`,
`register_quantization_config`, `worker_extension_cls`); the rest are wrappers, installed
with `wrap` (or `set_attribute`), which refuse any target not in the table and install each
wrapper once per process, whoever asks. `tests/unit/test_hooks.py` checks that every target
still exists in the installed vLLM with the parameters its wrapper passes on, so an upgrade
of vLLM fails in one test, not at serving time. Written for `VLLM_VERSION`.

Processes: `every process` = wherever vLLM loads its general plugins (front end, engine
cores, workers); `workers` = installed when a worker builds its first wide-EP MoE layer;
`API server` = the process of vLLM's OpenAI API server (`vllm serve`), which imports the
server's module before it loads the plugins; `Ray workers` = every Ray worker process of a
CPU engine on Ray (`ray_cpu.py`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

VLLM_VERSION = "0.32.0"

Change = Literal["register_oot", "register", "extension", "wrap", "set"]
Where = Literal["every process", "workers", "API server", "Ray workers"]


@dataclass(frozen=True)
class Hook:
    """One run-time change. target: `module:Qualname.attribute` (or `module:function`).
    params: the parameter names the wrapper relies on, None where nothing is called."""

    target: str
    change: Change
    where: Where
    why: str
    params: tuple[str, ...] | None = None

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def path(self) -> list[str]:
        """Attribute path inside the module: `["EngineArgs", "create_engine_config"]`."""
        return self.target.split(":")[1].split(".")


HOOKS: tuple[Hook, ...] = (
    # Supported extension points.
    Hook(
        "vllm.model_executor.layers.fused_moe.runner.moe_runner:MoERunner.register_oot",
        "register_oot",
        "every process",
        "every MoE layer is built as WideEPMoERunner (layer/runner.py)",
    ),
    Hook(
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:"
        "UnquantizedFusedMoEMethod.register_oot",
        "register_oot",
        "every process",
        "every unquantized MoE method is WideEPUnquantizedMethod (layer/method.py)",
    ),
    Hook(
        "vllm.model_executor.layers.quantization:register_quantization_config",
        "register",
        "every process",
        "the wideep_fp8 and wideep_ct_fp8 quantization configs (layer/fp8.py), which the "
        "engine hook selects for FP8 checkpoints with --enable-wideep only",
    ),
    Hook(
        "vllm.engine.arg_utils:EngineArgs.worker_extension_cls",
        "extension",
        "every process",
        "the wideep_stats / wideep_load worker RPCs (plugin/worker.py), set with --enable-wideep",
    ),
    # Command line and engine configuration (plugin/cli.py, plugin/engine.py).
    Hook(
        "vllm.engine.arg_utils:EngineArgs.add_cli_args",
        "wrap",
        "every process",
        "add --enable-wideep and the --wideep-* flags to every entry point",
        ("parser",),
    ),
    Hook(
        "vllm.engine.arg_utils:EngineArgs.from_cli_args",
        "wrap",
        "every process",
        "fold the parsed flags into additional_config['wideep'] (vLLM keeps only dataclass fields)",
        ("args",),
    ),
    Hook(
        "vllm.utils.argparse_utils:FlexibleArgumentParser.error",
        "wrap",
        "every process",
        "an unknown --wideep-* flag names the valid ones",
        ("self", "message"),
    ),
    Hook(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        "wrap",
        "every process",
        "check the options against the model and parallelism before any weight loads; "
        "set expert parallelism, the worker extension, the CUDA-graph policy",
        ("self", "usage_context", "headless"),
    ),
    # Data-parallel RPC replies and metrics (plugin/worker.py, plugin/metrics.py).
    Hook(
        "vllm.v1.engine.core_client:DPLBAsyncMPClient.collective_rpc_async",
        "wrap",
        "every process",
        "gather wideep_stats / wideep_load from every DP engine, not the first only",
        ("self", "method", "timeout", "args", "kwargs"),
    ),
    Hook(
        "vllm.v1.metrics.prometheus:get_prometheus_registry",
        "wrap",
        "every process",
        "with several API servers vLLM serves its own multiprocess registry: add the "
        "wide-EP collector to it",
        (),
    ),
    Hook(
        "vllm.entrypoints.serve.instrumentator.metrics:get_prometheus_registry",
        "set",
        "every process",
        "the /metrics route imported get_prometheus_registry by name: point it at the wrapped one",
    ),
    # The per-step balancer (plugin/worker.py).
    Hook(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.eplb_step",
        "wrap",
        "workers",
        "run the wide-EP balancer after every engine and dummy step, on every rank",
        ("self", "is_dummy", "is_profile"),
    ),
    Hook(
        "vllm.v1.worker.gpu.eplb_utils:EPLBController.step",
        "wrap",
        "workers",
        "the same for Model Runner V2 (GPUs), which steps EPLB through this controller",
        ("self", "is_dummy", "is_profile"),
    ),
    # The API server's exit status (plugin/server.py).
    Hook(
        "vllm.v1.engine.async_llm:AsyncLLM.shutdown",
        "wrap",
        "API server",
        "remember the engine clients asked to shut down, to tell a stop from an engine death",
        ("self", "timeout"),
    ),
    Hook(
        "vllm.entrypoints.launchers.api_server.entry:build_and_serve",
        "wrap",
        "API server",
        "when the engine died while serving, exit 1 after vLLM's clean-up (vLLM 0.32 exits 0)",
        ("engine_client",),
    ),
    # Ray on CPU (plugin/ray_cpu.py).
    Hook(
        "vllm.platforms.cpu:CpuPlatform.ray_device_key",
        "set",
        "every process",
        "CPU ranks ask Ray for the custom resource vllm_cpu_rank (vLLM 0.32 has none "
        "for CPUs and refuses Ray there)",
    ),
    Hook(
        "ray.runtime_context:RuntimeContext.get_accelerator_ids",
        "wrap",
        "Ray workers",
        "Ray lists accelerator resources only; CPU ranks report no ids for vllm_cpu_rank",
        ("self",),
    ),
)

_BY_TARGET = {hook.target: hook for hook in HOOKS}
_MARK = "__vllm_wideep_hook__"


def target_of(owner: type | ModuleType, name: str) -> str:
    """`module:Qualname.name` of an attribute of a class or module."""
    if isinstance(owner, ModuleType):
        return f"{owner.__name__}:{name}"
    return f"{owner.__module__}:{owner.__qualname__}.{name}"


def hook_for(owner: type | ModuleType, name: str) -> Hook:
    """The table's entry for `owner.name`; an AssertionError for a target not in it."""
    target = target_of(owner, name)
    assert target in _BY_TARGET, f"{target} is changed at run time but not listed in HOOKS"
    return _BY_TARGET[target]


def wrap(owner: type | ModuleType, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, once per process.

    Works for functions, methods, staticmethods and classmethods (the wrapper gets and
    returns the plain function: `cls` comes first for a classmethod). The wrapper carries
    `__wrapped__`, so `inspect.signature` shows the original's.
    """
    assert hook_for(owner, name).change == "wrap"
    raw = inspect.getattr_static(owner, name)
    descriptor = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    original = raw.__func__ if descriptor else raw
    if getattr(original, _MARK, False):
        return
    wrapper = functools.update_wrapper(make_wrapper(original), original)
    setattr(wrapper, _MARK, True)
    setattr(owner, name, descriptor(wrapper) if descriptor else wrapper)


def set_attribute(owner: type | ModuleType, name: str, value: Any) -> None:
    """`setattr(owner, name, value)` for a target listed in the table."""
    assert hook_for(owner, name).change == "set"
    setattr(owner, name, value)


def is_wrapped_function(function: Callable) -> bool:
    return getattr(function, _MARK, False)


def is_wrapped(owner: type | ModuleType, name: str) -> bool:
    """Whether `owner.name` is one of this module's wrappers."""
    raw = inspect.getattr_static(owner, name)
    return is_wrapped_function(
        raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    )


def markdown_table() -> str:
    """The table as Markdown (docs/architecture.md shows it)."""
    rows = ["| vLLM / Ray symbol | change | where | why |", "|---|---|---|---|"]
    for hook in HOOKS:
        rows.append(f"| `{hook.target}` | {hook.change} | {hook.where} | {hook.why} |")
    return "\n".join(rows)
