"""`WideEPConfig`: every wide-EP option, validated in one place.

The options reach vLLM as `additional_config["wideep"]` (a plain dict, because vLLM
pickles it to every process and hashes it into the compile cache). The CLI flags
`--enable-wideep` / `--wideep-<option>` and `vllm_wideep.LLM(enable_wideep=True, ...)` are
spellings of the same dict; this module is the one place that reads it.

The bottom layer of the package: it imports neither vLLM nor any other part of it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

TokenExchange = Literal["alltoall", "capacity", "allgather"]
DispatchDtype = Literal["auto", "fp8"]
ExpertsBackend = Literal["auto", "triton", "torch"]
EplbMode = Literal["off", "online"]
EplbStats = Literal["window", "decay"]
EplbOverlap = Literal["auto", "on", "off"]

ADDITIONAL_CONFIG_KEY = "wideep"


@dataclass(frozen=True)
class WideEPConfig:
    """Wide expert parallelism options (`additional_config["wideep"]`).

    With `enabled`, the experts of every MoE layer are spread over all DP x TP ranks
    (EP size = DP x TP) and each layer runs route -> dispatch -> experts -> combine.
    """

    enabled: bool = field(default=False, metadata={"help": "Turn wide expert parallelism on."})
    token_exchange: TokenExchange = field(
        default="alltoall",
        metadata={
            "help": "How tokens travel between EP ranks (dispatch and combine). "
            "'alltoall': variable-size all_to_all_single over the EP group (NCCL on GPU, "
            "gloo on CPU), one row per (token, destination rank); syncs with the host, so "
            "CUDA graphs are turned off. 'capacity': fixed-size per-peer buffers, no host "
            "sync, keeps CUDA graphs; sends padding. 'allgather': every token to every "
            "rank and a reduce-scatter back; the reference (CUDA graphs off)."
        },
    )
    experts_backend: ExpertsBackend = field(
        default="auto",
        metadata={
            "help": "Local expert computation: 'triton' grouped GEMM, 'torch', "
            "or 'auto' (Triton on GPU, torch on CPU)."
        },
    )
    capacity_tokens: int = field(
        default=0,
        metadata={
            "help": "Rows per peer buffer of the 'capacity' exchange; 0 = the largest "
            "CUDA-graph batch per rank (without graphs, the per-rank token budget "
            "ceil(max_num_batched_tokens / TP), which never overflows). Any value is raised "
            "to the largest CUDA-graph batch, so captured batches never overflow; eager "
            "batches with more rows for a peer send the rest in a second round. The buffer "
            "memory per rank is logged at start."
        },
    )
    dispatch_dtype: DispatchDtype = field(
        default="auto",
        metadata={
            "help": "Dispatch payload: 'auto' = the activation dtype; 'fp8' = float8 "
            "e4m3 with one scale per token and 128 columns (0.52x the bf16 bytes; combine "
            "stays in the activation dtype). With an FP8 checkpoint the experts then read "
            "those rows as they came and compute W8A8; otherwise weight-only FP8 (W8A16)."
        },
    )

    # Expert-parallel load balancing (vllm_wideep/eplb/).
    redundant_experts: int = field(
        default=0,
        metadata={
            "help": "Extra expert slots per MoE layer, over all EP ranks (a multiple of "
            "the EP size); they hold replicas of hot experts."
        },
    )
    placement: str | None = field(
        default=None,
        metadata={
            "help": "Expert placement file to start from (written by "
            "'vllm-wideep eplb placement'); default: experts in order, rank r "
            "holding the r-th block."
        },
    )
    eplb: EplbMode = field(
        default="off",
        metadata={
            "help": "'online': re-plan the placement from the recorded load every "
            "--wideep-eplb-interval steps and move expert weights in place between "
            "steps. 'off': keep the start placement."
        },
    )
    eplb_interval: int = field(
        default=3000, metadata={"help": "Engine steps between two online re-plans."}
    )
    eplb_layers_per_step: int = field(
        default=4,
        metadata={"help": "MoE layers whose weights move in one engine step while re-planning."},
    )
    eplb_overlap: EplbOverlap = field(
        default="auto",
        metadata={
            "help": "'on': move a layer's expert weights while the next forward pass runs "
            "and switch to them at the step after. 'off': the step that begins a move "
            "waits for it. 'auto': on (a step then holds half a move: on CPU the longest "
            "pause a rebalance added halved, at the same throughput)."
        },
    )
    eplb_stats: EplbStats = field(
        default="window",
        metadata={
            "help": "Expert load statistics: 'window' sums the last --wideep-eplb-window "
            "steps; 'decay' weighs steps by 0.5 ** (age / --wideep-eplb-window)."
        },
    )
    eplb_window: int = field(
        default=1000,
        metadata={"help": "Steps in the load window ('window'), or the half-life ('decay')."},
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
        if self.capacity_tokens < 0:
            raise ValueError(
                f"vllm_wideep: option 'capacity_tokens' must be >= 0, got {self.capacity_tokens}"
            )
        for name in ("eplb_interval", "eplb_layers_per_step", "eplb_window"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"vllm_wideep: option '{name}' must be >= 1, got {getattr(self, name)}"
                )
        if self.redundant_experts < 0:
            raise ValueError(
                f"vllm_wideep: option 'redundant_experts' must be >= 0, "
                f"got {self.redundant_experts}"
            )

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

    @classmethod
    def options_table(cls) -> str:
        """The README's options table (Markdown), made from the fields."""
        hints = typing.get_type_hints(cls)
        rows = ["| name | flag | default | help |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            flag = flag_for(f.name)
            if typing.get_origin(hints[f.name]) is Literal:
                flag += " {" + ",".join(get_args(hints[f.name])) + "}"
            default = "`" + json.dumps(f.default) + "`"
            help_ = re.sub(r"'([^' ]+)'", r"`\1`", f.metadata.get("help", ""))
            rows.append(f"| `{f.name}` | `{flag}` | {default} | {help_} |")
        return "\n".join(rows)


def flag_for(option: str) -> str:
    """The CLI spelling of an option: `enabled` -> `--enable-wideep`,
    `token_exchange` -> `--wideep-token-exchange`."""
    if option == "enabled":
        return "--enable-wideep"
    return "--wideep-" + option.replace("_", "-")


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
