"""vLLM glue: what `register()` installs in every vLLM process."""

from __future__ import annotations


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM calls it once per process.

    Cheap and device-free: it only wraps a few vLLM functions and registers classes.
    """
    from vllm_wideep.plugin.cli import patch_cli
    from vllm_wideep.plugin.engine import patch_engine_config
    from vllm_wideep.plugin.patch import patch_moe
    from vllm_wideep.plugin.ray_cpu import patch_ray_cpu
    from vllm_wideep.plugin.worker import patch_dp_client, patch_worker

    patch_cli()
    patch_engine_config()
    patch_moe()
    patch_worker()
    patch_dp_client()
    patch_ray_cpu()
