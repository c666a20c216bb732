"""The Ray executor on CPU (`--distributed-executor-backend ray`), lifted at run time.

vLLM 0.32 refuses Ray on CPU ("current platform cpu does not support ray",
`v1/executor/ray_utils.py`, `ray_executor_v2.py`) for two reasons, both fixed here:

1. `CpuPlatform.ray_device_key` is empty. It names the Ray resource each rank's
   placement-group bundle asks for; Ray reserves "CPU" for `num_cpus`, so CPU ranks take
   a custom resource, `RAY_CPU_RESOURCE`, which every Ray node that should hold vLLM
   ranks declares, one unit per rank:

       ray start --head --node-ip-address HEAD_IP --resources '{"vllm_cpu_rank": 1}'
       ray start --address HEAD_IP:6379 --node-ip-address NODE_IP --resources '{"vllm_cpu_rank": 1}'

2. The Ray worker actors ask Ray for their accelerator ids under that key
   (`get_accelerator_ids()[ray_device_key]`) before vLLM loads any plugin in them, and
   Ray only lists accelerator resources. The engine therefore gives the Ray job a
   `worker_process_setup_hook` (`prepare_ray_workers`), so every Ray worker process
   loads vLLM's plugins and reports an empty id list for the CPU resource first.

vLLM puts rank 0 on the node of the engine; thread binding (`VLLM_CPU_OMP_THREADS_BIND`)
is per node, indexed by the rank's local rank on its node. Without `--enable-wideep` the
engine refuses Ray on CPU as stock vLLM does (`refuse_ray_on_cpu`).
"""

from __future__ import annotations

from vllm_wideep.plugin.hooks import set_attribute, wrap

RAY_CPU_RESOURCE = "vllm_cpu_rank"
_SETUP_HOOK = "vllm_wideep.plugin.ray_cpu.setup_ray_worker"


def patch_ray_cpu() -> None:
    """Give the CPU platform a Ray resource name where it has none (idempotent; a no-op
    on GPUs and wherever vLLM or another plugin already set one)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not current_platform.ray_device_key:
        set_attribute(type(current_platform), "ray_device_key", RAY_CPU_RESOURCE)


def refuse_ray_on_cpu(engine_args) -> None:
    """Without `--enable-wideep`, keep vLLM's refusal of Ray on CPU (with its message),
    which `patch_ray_cpu` would otherwise have lifted for every engine."""
    from vllm.platforms import current_platform

    if (
        engine_args.distributed_executor_backend == "ray"
        and current_platform.is_cpu()
        and current_platform.ray_device_key == RAY_CPU_RESOURCE
    ):
        raise ValueError(
            "current platform cpu does not support ray. (vllm_wideep runs vLLM on Ray on "
            "CPU with --enable-wideep.)"
        )


def prepare_ray_workers(vllm_config) -> None:
    """With the Ray executor on CPU, add `setup_ray_worker` to the Ray job's runtime
    environment (vLLM passes `parallel_config.ray_runtime_env` to `ray.init`)."""
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    if parallel.distributed_executor_backend != "ray" or not current_platform.is_cpu():
        return
    from ray.runtime_env import RuntimeEnv

    runtime_env = dict(parallel.ray_runtime_env or {})
    runtime_env["worker_process_setup_hook"] = _SETUP_HOOK
    parallel.ray_runtime_env = RuntimeEnv(**runtime_env)


def setup_ray_worker() -> None:
    """Runs first in every Ray worker process of the engine's job."""
    import ray.runtime_context
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # patch_ray_cpu() among them

    def wrap_get_accelerator_ids(original):
        def get_accelerator_ids(self):
            ids = original(self)
            ids.setdefault(RAY_CPU_RESOURCE, [])  # CPU ranks hold no device ids
            return ids

        return get_accelerator_ids

    wrap(ray.runtime_context.RuntimeContext, "get_accelerator_ids", wrap_get_accelerator_ids)
