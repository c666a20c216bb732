"""WideEPConfig, the CLI flags and the LLM keywords: one option set, one validator."""

import argparse
from pathlib import Path

import pytest

from vllm_wideep.config import WideEPConfig, flag_for
from vllm_wideep.plugin.cli import add_wideep_args, fold_cli_args


def test_defaults_are_disabled():
    assert WideEPConfig.from_additional_config({}) == WideEPConfig()
    assert WideEPConfig.from_additional_config(None).enabled is False
    assert WideEPConfig.from_additional_config({"other": 1}).enabled is False


def test_unknown_option_names_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*token_exchange"):
        WideEPConfig.from_additional_config({"wideep": {"enabled": True, "bogus": 1}})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"enabled": "yes"}, "'enabled' must be true or false"),
        (
            {"token_exchange": "nccl"},
            r"'token_exchange' must be one of \['alltoall', 'capacity', 'allgather'\]",
        ),
        ({"experts_backend": 3}, r"'experts_backend' must be one of \['auto', 'triton'"),
    ],
)
def test_ill_typed_option(options, message):
    with pytest.raises(ValueError, match=message):
        WideEPConfig.from_dict(options)


def test_wideep_section_must_be_an_object():
    with pytest.raises(ValueError, match="must be a JSON object"):
        WideEPConfig.from_additional_config({"wideep": True})


def _parse(argv):
    parser = add_wideep_args(argparse.ArgumentParser())
    return parser.parse_args(argv)


def test_flags_fold_into_additional_config():
    args = _parse(["--enable-wideep", "--wideep-experts-backend", "torch"])
    folded = fold_cli_args(args, {"x": 1, "wideep": {"token_exchange": "alltoall"}})
    assert folded == {
        "x": 1,
        "wideep": {"token_exchange": "alltoall", "enabled": True, "experts_backend": "torch"},
    }


def test_no_flag_leaves_additional_config_alone():
    original = {"wideep": {"enabled": True}}
    assert fold_cli_args(_parse([]), original) is original


def test_flag_choices_come_from_the_config():
    with pytest.raises(SystemExit):
        _parse(["--wideep-token-exchange", "bogus"])
    assert flag_for("enabled") == "--enable-wideep"
    assert flag_for("token_exchange") == "--wideep-token-exchange"


def test_llm_keywords_fold_and_validate():
    from vllm_wideep.plugin.llm import fold_llm_kwargs

    kwargs = fold_llm_kwargs(
        {"enable_wideep": True, "wideep_experts_backend": "torch", "dtype": "float32"}
    )
    assert kwargs == {
        "dtype": "float32",
        "additional_config": {"wideep": {"enabled": True, "experts_backend": "torch"}},
    }
    with pytest.raises(ValueError, match="unknown option"):
        fold_llm_kwargs({"enable_wideep": True, "wideep_colour": "blue"})


def test_readme_options_table_is_the_generated_one():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert WideEPConfig.options_table() in readme, (
        "README's options table is stale; paste WideEPConfig.options_table()"
    )
