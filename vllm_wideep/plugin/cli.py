"""`--enable-wideep` and `--wideep-*` flags on every vLLM entry point that parses engine args.

vLLM calls `load_general_plugins()` as the first statement of `AsyncEngineArgs.add_cli_args`
and then looks `EngineArgs.add_cli_args` up by attribute, so wrapping that staticmethod adds
our flags to `vllm serve`. `EngineArgs.from_cli_args` keeps only dataclass fields, so a second
wrapper folds the parsed flags into `additional_config["wideep"]`. Flags are generated from
`WideEPConfig`'s fields: a new option gets its flag, help and choices with no code here.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Literal, get_args

from vllm_wideep.config import ADDITIONAL_CONFIG_KEY, WideEPConfig, flag_for
from vllm_wideep.plugin.hooks import wrap


def _dest(option: str) -> str:
    return f"wideep__{option}"


def add_wideep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per `WideEPConfig` field; defaults are None (= not given)."""
    group = parser.add_argument_group(
        "WideEP",
        "vllm_wideep: wide expert parallelism. The same options are accepted as "
        "--additional-config '{\"wideep\": {...}}'.",
    )
    hints = typing.get_type_hints(WideEPConfig)
    for f in dataclasses.fields(WideEPConfig):
        hint = hints[f.name]
        kwargs: dict[str, Any] = {
            "dest": _dest(f.name),
            "default": None,
            "help": f"{f.metadata.get('help', '')} (default: {f.default!r})",
        }
        if hint is bool:
            kwargs["action"] = (
                "store_true" if f.name == "enabled" else argparse.BooleanOptionalAction
            )
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(get_args(hint))
        elif hint in (int, float):
            kwargs["type"] = hint
        group.add_argument(flag_for(f.name), **kwargs)
    return parser


def fold_cli_args(args: argparse.Namespace, additional_config: Any) -> dict | Any:
    """Merge the flags that were given into `additional_config["wideep"]` (flags win)."""
    given = {
        f.name: getattr(args, _dest(f.name))
        for f in dataclasses.fields(WideEPConfig)
        if getattr(args, _dest(f.name), None) is not None
    }
    if not given:
        return additional_config
    merged = dict(additional_config or {})
    options = dict(merged.get(ADDITIONAL_CONFIG_KEY) or {})
    options.update(given)
    merged[ADDITIONAL_CONFIG_KEY] = options
    return merged


def patch_cli() -> None:
    """Install the flag wrappers on `EngineArgs` and vLLM's argument parser."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def wrap_add_cli_args(original):
        def add_cli_args(parser, *args, **kwargs):
            return add_wideep_args(original(parser, *args, **kwargs))

        return add_cli_args

    def wrap_from_cli_args(original):
        def from_cli_args(cls, args):
            engine_args = original(cls, args)
            engine_args.additional_config = fold_cli_args(args, engine_args.additional_config)
            return engine_args

        return from_cli_args

    def wrap_error(original):
        def error(self, message: str):
            if message.startswith("unrecognized arguments:") and re.search(
                r"--(enable-)?wideep", message
            ):
                valid = ", ".join(flag_for(name) for name in WideEPConfig.option_names())
                message += f"\nvllm_wideep: valid wide-EP flags are {valid}"
            return original(self, message)

        return error

    wrap(EngineArgs, "add_cli_args", wrap_add_cli_args)
    wrap(EngineArgs, "from_cli_args", wrap_from_cli_args)
    wrap(FlexibleArgumentParser, "error", wrap_error)
