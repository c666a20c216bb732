"""The API server's exit status: non-zero when its engine died while serving.

vLLM 0.32's API server, when an engine core dies (a peer that timed out in a collective, a
crashed worker), answers the pending requests with errors, stops the HTTP server, shuts the
engine processes down, and returns normally: `vllm serve` exits 0, as if asked to stop, so a
supervisor's restart-on-failure never fires (vllm-project/vllm#48966). In the API server
process the plugin tells the two apart and, with `--enable-wideep`, exits 1 after vLLM's
own clean-up when the engine died:

    AsyncLLM.shutdown       remembers the clients asked to shut down (SIGTERM, SIGINT, ...)
    build_and_serve         returns when the HTTP server stopped: if its engine client
                            errored without being asked to shut down, the engine died;
                            the shutdown task vLLM awaits last then raises SystemExit(1)

Installed only in a process that already imported vLLM's API server module (`vllm serve`
imports it before loading plugins); engine cores and workers never import it.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Awaitable

from vllm_wideep.config import WideEPConfig
from vllm_wideep.plugin.hooks import wrap

API_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
ENGINE_DIED_EXIT_STATUS = 1


def patch_server_exit_status() -> None:
    """Install the two wrappers above, in an API server process only."""
    entry = sys.modules.get(API_SERVER_MODULE)
    if entry is None:
        return
    from vllm.v1.engine.async_llm import AsyncLLM

    asked_to_stop: weakref.WeakSet = weakref.WeakSet()

    def wrap_shutdown(original):
        def shutdown(self, timeout=None):
            asked_to_stop.add(self)
            return original(self, timeout=timeout)

        return shutdown

    def wrap_build_and_serve(original):
        async def build_and_serve(engine_client, *args, **kwargs):
            shutdown_task = await original(engine_client, *args, **kwargs)
            if _wideep_enabled(engine_client) and (
                engine_client.errored and engine_client not in asked_to_stop
            ):
                return _exit_after(shutdown_task)
            return shutdown_task

        return build_and_serve

    wrap(AsyncLLM, "shutdown", wrap_shutdown)
    wrap(entry, "build_and_serve", wrap_build_and_serve)


def _wideep_enabled(engine_client) -> bool:
    additional_config = engine_client.vllm_config.additional_config
    return WideEPConfig.from_additional_config(additional_config).enabled


async def _exit_after(shutdown_task: Awaitable) -> None:
    """vLLM's last step of shutting down, then the exit status of a failure."""
    from vllm.logger import init_logger

    await shutdown_task
    init_logger("vllm_wideep").error(
        "vllm_wideep: the engine died while serving (its error is logged above); "
        "exiting with status %d",
        ENGINE_DIED_EXIT_STATUS,
    )
    raise SystemExit(ENGINE_DIED_EXIT_STATUS)
