"""`WideEPConfig`: every wide-EP option, validated in one place.

The options reach vLLM as `additional_config["wideep"]` (a plain dict, because vLLM
pickles it to every process and hashes it into the compile cache). The CLI flags
`--enable-wideep` / `--wideep-<option>` and `vllm_wideep.LLM(enable_wideep=True, ...)` are
spellings of the same dict; this module is the one place that reads it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

A2ABackend = Literal["a2a"]
ExpertsBackend = Literal["auto", "triton", "torch"]

ADDITIONAL_CONFIG_KEY = "wideep"


@dataclass(frozen=True)
class WideEPConfig:
    """Wide expert parallelism options (`additional_config["wideep"]`).

    With `enabled`, the experts of every MoE layer are spread over all DP x TP ranks
    (EP size = DP x TP) and each layer runs route -> dispatch -> experts -> combine.
    """

    enabled: bool = field(default=False, metadata={"help": "Turn wide expert parallelism on."})
    a2a_backend: A2ABackend = field(
        default="a2a",
        metadata={
            "help": "Token exchange between EP ranks. 'a2a': variable-size "
            "all_to_all_single over the EP group (NCCL on GPU, gloo on CPU)."
        },
    )
    experts_backend: ExpertsBackend = field(
        default="auto",
        metadata={
            "help": "Local expert computation: 'triton' grouped GEMM, 'torch', "
            "or 'auto' (Triton on GPU, torch on CPU)."
        },
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> WideEPConfig:
        """Build from `additional_config["wideep"]`; raises ValueError naming any bad key."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"vllm_wideep: unknown option(s) {unknown}; valid options are {cls.option_names()}"
            )
        return cls(**options)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> WideEPConfig:
        """Read the options out of `VllmConfig.additional_config` (absent = disabled)."""
        if not isinstance(additional_config, dict):
            return cls()
        options = additional_config.get(ADDITIONAL_CONFIG_KEY)
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise ValueError(
                f"vllm_wideep: additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a "
                f"JSON object, got {type(options).__name__}: {options!r}"
            )
        return cls.from_dict(options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ValueError(
                f"vllm_wideep: option '{name}' must be one of {list(choices)}, got {value!r}"
            )
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"vllm_wideep: option '{name}' must be true or false, got {value!r}")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"vllm_wideep: option '{name}' must be an integer, got {value!r}")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"vllm_wideep: option '{name}' must be a number, got {value!r}")
        return
    if hint == (str | None):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"vllm_wideep: option '{name}' must be a string, got {value!r}")
        return
    raise TypeError(f"vllm_wideep: no validator for option '{name}' of type {hint}")
