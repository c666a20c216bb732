"""Each bad input gets one clear error that names the problem, before any weight loads.

(a) and (c) go through the real `vllm serve` console script and must exit fast. The others
build the engine config in this process: `EngineArgs.__post_init__` loads vLLM's general
plugins, so `create_engine_config` is the plugin's wrapper, as in every entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.launch import VENV_BIN, e2e_env, with_config

SERVE_TIMEOUT = 120  # seconds; a refusal must come well before this
WIDEEP = {"wideep": {"enabled": True}}
# vLLM's CPU model runner logs this when it starts loading weights.
LOADING_WEIGHTS = "Starting to load model"


def _serve(model: str, *args: str) -> tuple[int, str]:
    """Run `vllm serve` in its own process group; return (exit code, output).

    Fails the test if it has not exited after SERVE_TIMEOUT; kills the group either way.
    """
    cmd = [str(VENV_BIN / "vllm"), "serve", model, "--host", "127.0.0.1", *args]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=e2e_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=SERVE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"`vllm serve {' '.join(args)}` hung for {SERVE_TIMEOUT} s:\n{output[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # engine processes left behind, if any
    elapsed = time.monotonic() - start
    print(f"`vllm serve {' '.join(args)}`: exit {proc.returncode} after {elapsed:.0f} s")
    return proc.returncode, output


@pytest.mark.slow
def test_dense_model_is_refused_by_serve(tiny_model):
    code, output = _serve(tiny_model("dense"), "--enable-wideep", "--enforce-eager")
    assert code != 0, output[-3000:]
    assert LOADING_WEIGHTS not in output
    assert "has no routed experts" in output, output[-3000:]
    assert "Qwen3ForCausalLM" in output


@pytest.mark.slow
def test_unknown_wideep_flag_lists_the_valid_ones(tiny_model):
    code, output = _serve(tiny_model("mixtral"), "--enable-wideep", "--wideep-bogus")
    assert code == 2, output[-3000:]
    assert "unrecognized arguments: --wideep-bogus" in output, output[-3000:]
    assert (
        "valid wide-EP flags are --enable-wideep, --wideep-token-exchange, "
        "--wideep-experts-backend" in output
    ), output[-3000:]


# --------------------------------------------------------------------------- #
# In-process: EngineArgs(...).create_engine_config(), no server, no weights.
# --------------------------------------------------------------------------- #


def _with_experts(tiny_model, tmp_path: Path, num_experts: int) -> str:
    """The tiny Mixtral (8 experts) with `num_local_experts` changed in config.json."""
    source = tiny_model("mixtral")
    return with_config(
        source, tmp_path / f"mixtral-{num_experts}-experts", num_local_experts=num_experts
    )


def test_ep_size_must_divide_the_experts(engine_config, tiny_model, tmp_path):
    model = _with_experts(tiny_model, tmp_path, 6)
    with pytest.raises(ValueError) as error:
        engine_config(model, data_parallel_size=2, tensor_parallel_size=2, additional_config=WIDEEP)
    message = str(error.value)
    assert "data parallel 2 x tensor parallel 2 = 4" in message
    assert "routed experts (6)" in message
    assert "EP sizes that do: [1, 2, 3, 6]" in message


def test_check_model_accepts_a_dividing_ep_size(engine_config, tiny_model):
    from vllm_wideep.plugin.engine import check_model

    config = engine_config(tiny_model("mixtral"), data_parallel_size=2, additional_config=WIDEEP)
    assert config.parallel_config.enable_expert_parallel  # set by the plugin
    check_model(config.model_config, data_parallel_size=2, tensor_parallel_size=4)


def test_ill_typed_option_names_it_and_its_choices(engine_config, tiny_model):
    bad = {"wideep": {"enabled": True, "token_exchange": "x"}}
    with pytest.raises(
        ValueError,
        match=r"'token_exchange' must be one of \['alltoall', 'capacity', 'allgather'\], got 'x'",
    ):
        engine_config(tiny_model("mixtral"), additional_config=bad)


def test_vllm_eplb_is_refused(engine_config, tiny_model):
    with pytest.raises(ValueError, match="--enable-eplb .* cannot run with --enable-wideep"):
        engine_config(tiny_model("mixtral"), enable_eplb=True, additional_config=WIDEEP)


def test_without_wideep_the_config_is_stock(engine_config, tiny_model):
    config = engine_config(tiny_model("mixtral"))
    assert not config.parallel_config.enable_expert_parallel


def test_dense_model_is_refused_in_process(engine_config, tiny_model):
    with pytest.raises(ValueError) as error:
        engine_config(tiny_model("dense"), additional_config=WIDEEP)
    assert "has no routed experts" in str(error.value)


def _placement_file(path: Path, model: dict, num_ranks: int, rows: list[list[int]]) -> str:
    data = {
        "format": "vllm-wideep-placement",
        "version": 1,
        "model": model,
        "num_ranks": num_ranks,
        "slots_per_rank": len(rows[0]) // num_ranks,
        "layers": [f"model.layers.{i}.block_sparse_moe.experts" for i in range(len(rows))],
        "physical_to_logical": rows,
    }
    path.write_text(json.dumps(data))
    return str(path)


MIXTRAL = {"architecture": "MixtralForCausalLM", "num_experts": 8, "hidden_size": 128}


def test_placement_for_another_model_is_refused(engine_config, tiny_model, tmp_path):
    other = {**MIXTRAL, "architecture": "Qwen3MoeForCausalLM", "num_experts": 16}
    path = _placement_file(tmp_path / "p.json", other, 2, [list(range(16))] * 2)
    options = {"wideep": {"enabled": True, "placement": path}}
    with pytest.raises(ValueError, match="was made for .*Qwen3MoeForCausalLM.* the served model"):
        engine_config(tiny_model("mixtral"), data_parallel_size=2, additional_config=options)


def test_corrupt_placement_file_is_refused(engine_config, tiny_model, tmp_path):
    rows = [[0, 1, 2, 3, 4, 5, 6, 6]] * 2  # expert 7 missing
    path = _placement_file(tmp_path / "p.json", MIXTRAL, 2, rows)
    options = {"wideep": {"enabled": True, "placement": path}}
    with pytest.raises(
        ValueError, match=r"invalid placement: layer 0: experts \[7\] are not placed"
    ):
        engine_config(tiny_model("mixtral"), data_parallel_size=2, additional_config=options)
    (tmp_path / "p.json").write_text('{"format": "vllm-wideep-placement", "ver')
    with pytest.raises(ValueError, match="is not a JSON file"):
        engine_config(tiny_model("mixtral"), data_parallel_size=2, additional_config=options)


def test_placement_for_another_ep_size_is_refused(engine_config, tiny_model, tmp_path):
    path = _placement_file(tmp_path / "p.json", MIXTRAL, 2, [list(range(8)) + [0, 1]] * 2)
    options = {"wideep": {"enabled": True, "placement": path}}
    with pytest.raises(ValueError, match="is for 2 EP ranks, but this deployment has EP size 1"):
        engine_config(tiny_model("mixtral"), additional_config=options)


def test_redundant_experts_not_divisible_by_ep_size_is_refused(engine_config, tiny_model):
    options = {"wideep": {"enabled": True, "redundant_experts": 3}}
    with pytest.raises(ValueError, match="must be a multiple of the EP size 2"):
        engine_config(tiny_model("mixtral"), data_parallel_size=2, additional_config=options)


# Quantization formats wide EP does not run: each refused before any weight loads, naming
# the format and the supported ones (the weights are never read: config.json alone).
UNSUPPORTED_QUANTIZATION = {
    "fp8 with weight_block_size None": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "mxfp4": {"quant_method": "mxfp4"},
    "auto_gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
    "modelopt_fp4": {"quant_method": "modelopt", "quant_algo": "NVFP4"},
}


@pytest.mark.parametrize("name", UNSUPPORTED_QUANTIZATION)
def test_unsupported_quantization_is_refused_naming_it(engine_config, tiny_model, tmp_path, name):
    quantization = UNSUPPORTED_QUANTIZATION[name]
    model = with_config(
        tiny_model("mixtral"), tmp_path / "quantized", quantization_config=quantization
    )
    with pytest.raises(ValueError) as error:
        engine_config(model, additional_config=WIDEEP)
    message = str(error.value)
    quantized_as = message.split("its checkpoint is quantized as ", 1)[1].split(". ", 1)[0]
    assert name in quantized_as, message  # MXFP4 is also named by its family
    assert "Supported checkpoints: unquantized" in message and "fp8 with 128x128" in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eplb_window": 10**9}, r"would keep \d+\.\d GiB of load statistics per rank"),
        ({"redundant_experts": 16}, r"more than one extra copy of each of the model's 8"),
        ({"placement": ""}, r"--wideep-placement is empty"),
        ({"placement": "  "}, r"--wideep-placement is empty"),
    ],
)
def test_options_out_of_proportion_are_refused(engine_config, tiny_model, options, message):
    with pytest.raises(ValueError, match=message):
        engine_config(
            tiny_model("mixtral"), additional_config={"wideep": {"enabled": True, **options}}
        )


def test_a_directory_as_placement_file_is_refused(engine_config, tiny_model, tmp_path):
    bad = {"wideep": {"enabled": True, "placement": str(tmp_path)}}
    with pytest.raises(ValueError, match=str(tmp_path)):
        engine_config(tiny_model("mixtral"), additional_config=bad)
