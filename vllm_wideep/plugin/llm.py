"""`vllm_wideep.LLM`: vLLM's `LLM` that also takes the wide-EP options as keywords.

    LLM(model, enable_wideep=True, wideep_token_exchange="alltoall", tensor_parallel_size=2)

is `vllm.LLM(model, additional_config={"wideep": {"enabled": True, "token_exchange": "alltoall"}},
tensor_parallel_size=2)`.
"""

from __future__ import annotations

from typing import Any

import vllm

from vllm_wideep.config import ADDITIONAL_CONFIG_KEY, WideEPConfig


def fold_llm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move `enable_wideep` / `wideep_<option>` keywords into `additional_config`."""
    options: dict[str, Any] = {}
    if "enable_wideep" in kwargs:
        options["enabled"] = kwargs.pop("enable_wideep")
    for key in [k for k in kwargs if k.startswith("wideep_")]:
        options[key.removeprefix("wideep_")] = kwargs.pop(key)
    if options:
        additional = dict(kwargs.get("additional_config") or {})
        additional[ADDITIONAL_CONFIG_KEY] = {
            **(additional.get(ADDITIONAL_CONFIG_KEY) or {}),
            **options,
        }
        WideEPConfig.from_additional_config(additional)  # fail early on a bad option
        kwargs["additional_config"] = additional
    return kwargs


class LLM(vllm.LLM):
    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **fold_llm_kwargs(kwargs))
