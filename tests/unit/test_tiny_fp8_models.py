"""Tiny FP8 checkpoints (``build_fp8_model``): the FP8 tensors dequantize exactly to the
dequantized copy's, the quantized set and the configs are what each scope and format
promise, and vLLM's own matching rules read the ignore lists as meant. (Serving them, and
stock vLLM on the copies: tests/e2e/test_fp8.py.)"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from vllm_wideep.kernels.fp8 import dequantize_block_fp8  # noqa: E402
from vllm_wideep.tiny_models import (  # noqa: E402
    STAMP_FILE,
    build_fp8_model,
    build_tiny_model,
    dequantized_dir,
    fp8_scale_name,
    main,
)

ARCH = "deepseek_v3_fp8"
# (fmt, scope, dtype): each format with each scope, the dtypes alternating.
CASES = [
    ("fp8", "experts", "bfloat16"),
    ("fp8", "all", "float32"),
    ("compressed-tensors", "experts", "float32"),
    ("compressed-tensors", "all", "bfloat16"),
]
LAYERS = range(4)  # 0 dense, 1-2 MoE, 3 the MTP layer (MoE)
MOE_LAYERS = range(1, 4)
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _expected_quantized(scope: str) -> set[str]:
    experts = {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        for layer in MOE_LAYERS
        for e in range(16)
        for proj in MLP
    }
    if scope == "experts":
        return experts
    attention = {
        f"model.layers.{layer}.self_attn.{p}.weight" for layer in LAYERS for p in ATTENTION
    }
    dense = {f"model.layers.0.mlp.{proj}.weight" for proj in MLP}
    shared = {
        f"model.layers.{layer}.mlp.shared_experts.{p}.weight" for layer in MOE_LAYERS for p in MLP
    }
    return experts | attention | dense | shared


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp8")


@pytest.fixture(scope="module")
def built(root: Path) -> dict[tuple[str, str, str], Path]:
    return {
        case: build_fp8_model(
            root / "-".join(case), ARCH, fmt=case[0], scope=case[1], dtype=case[2]
        )
        for case in CASES
    }


@pytest.fixture(scope="module")
def plain(root: Path) -> dict[str, Path]:
    return {
        dtype: build_tiny_model(root / f"plain-{dtype}", ARCH, dtype)
        for dtype in ("bfloat16", "float32")
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_fp8_tensors_dequantize_exactly_to_the_copy(
    case: tuple[str, str, str], built: dict, plain: dict[str, Path]
) -> None:
    fmt, scope, dtype = case
    fp8, copy, base = (
        _tensors(built[case]),
        _tensors(dequantized_dir(built[case])),
        _tensors(plain[dtype]),
    )
    quantized = {name for name, t in fp8.items() if t.dtype == torch.float8_e4m3fn}
    assert quantized == _expected_quantized(scope)
    scales = {fp8_scale_name(name, fmt) for name in quantized}
    assert fp8.keys() == base.keys() | scales
    assert copy.keys() == base.keys()
    for name in quantized:
        q, scale = fp8[name], fp8[fp8_scale_name(name, fmt)]
        rows, cols = base[name].shape
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (-(-rows // 128), -(-cols // 128)), name
        assert copy[name].dtype == base[name].dtype == getattr(torch, dtype)
        assert torch.equal(copy[name], dequantize_block_fp8(q, scale).to(copy[name].dtype)), name
        # Quantization error stays in e4m3's range: 3 mantissa bits, about 2^-4 relative.
        error = (copy[name].float() - base[name].float()).abs().max()
        assert 0 < error <= 0.07 * base[name].float().abs().max(), name
    for name in base.keys() - quantized:
        assert fp8[name].dtype == getattr(torch, dtype), name
        assert torch.equal(fp8[name], base[name]) and torch.equal(copy[name], base[name]), name


def test_a_float32_copy_is_q_times_the_block_scale(built: dict) -> None:
    case = ("fp8", "all", "float32")
    fp8, copy = _tensors(built[case]), _tensors(dequantized_dir(built[case]))
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # [576, 128]: 4.5 row blocks
    q, scale = fp8[name], fp8[name.replace("weight", "weight_scale_inv")]
    assert tuple(q.shape) == (576, 128) and tuple(scale.shape) == (5, 1)
    for row in (0, 127, 128, 575):
        expected = q[row].float() * scale[row // 128, 0]
        assert torch.equal(copy[name][row], expected)


# --------------------------------------------------------------------------- configs


def _expected_ignore(scope: str) -> list[str]:
    ignore = {"lm_head", "model.layers.3.eh_proj", "model.layers.3.shared_head.head"}
    ignore |= {f"model.layers.{layer}.mlp.gate" for layer in MOE_LAYERS}
    if scope == "experts":
        for layer in LAYERS:
            attn = f"model.layers.{layer}.self_attn."
            ignore |= {attn + p for p in (*ATTENTION, "fused_qkv_a_proj")}
            mlp = f"model.layers.{layer}.mlp." + ("" if layer == 0 else "shared_experts.")
            ignore |= {mlp + p for p in (*MLP, "gate_up_proj")}
    return sorted(ignore)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_quantization_config(
    case: tuple[str, str, str], built: dict, plain: dict[str, Path]
) -> None:
    fmt, scope, dtype = case
    config, copy_config = _config(built[case]), _config(dequantized_dir(built[case]))
    quant = config.pop("quantization_config")
    assert config == copy_config == _config(plain[dtype])
    assert (dequantized_dir(built[case]) / "config.json").read_bytes() == (
        plain[dtype] / "config.json"
    ).read_bytes()
    if fmt == "fp8":
        assert quant == {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": _expected_ignore(scope),
        }
    else:
        assert quant["quant_method"] == "compressed-tensors"
        assert quant["format"] == "float-quantized"
        assert quant["ignore"] == _expected_ignore(scope)
        (group,) = quant["config_groups"].values()
        assert group["targets"] == ["Linear"]
        assert group["weights"] == {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "block",
            "block_structure": [128, 128],
            "dynamic": False,
        }
        assert group["input_activations"]["strategy"] == "group"
        assert group["input_activations"]["group_size"] == 128
        assert group["input_activations"]["dynamic"] is True


# --------------------------------------------------------------------------- vLLM reads the lists


def _vllm_modules(mtp: bool = False) -> dict[str, list[str]]:
    """vLLM's module prefixes (as its quant configs see them) of every Linear that asks
    the quant config, and of each FusedMoE ("mlp.experts"), with the checkpoint weights
    each loads. The MTP layer's are in the draft model only (``mtp``)."""
    modules = {}
    for layer in LAYERS if mtp else LAYERS[:-1]:
        attn = f"model.layers.{layer}.self_attn."
        modules[attn + "fused_qkv_a_proj"] = [attn + "q_a_proj", attn + "kv_a_proj_with_mqa"]
        for p in ("q_b_proj", "kv_b_proj", "o_proj"):
            modules[attn + p] = [attn + p]
        mlp = f"model.layers.{layer}.mlp." + ("" if layer == 0 else "shared_experts.")
        modules[mlp + "gate_up_proj"] = [mlp + "gate_proj", mlp + "up_proj"]
        modules[mlp + "down_proj"] = [mlp + "down_proj"]
        if layer:
            experts = f"model.layers.{layer}.mlp.experts"
            modules[experts] = [f"{experts}.{e}.{p}" for e in range(16) for p in MLP]
    return modules


def _packed_modules_mapping() -> dict[str, list[str]]:
    """``DeepseekV2ForCausalLM.packed_modules_mapping`` as its __init__ completes it for a
    model with a ``q_lora_rank``."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM

    return {
        **DeepseekV2ForCausalLM.packed_modules_mapping,
        "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
    }


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_vllm_skips_exactly_the_unquantized_modules(
    case: tuple[str, str, str], built: dict
) -> None:
    """Each vLLM module is quantized, by vLLM's own config classes and matching rules,
    exactly when the checkpoint holds FP8 weights for it."""
    pytest.importorskip("vllm")
    fmt, scope, _ = case
    quant = _config(built[case])["quantization_config"]
    quantized = {name.removesuffix(".weight") for name in _expected_quantized(scope)}
    mapping = _packed_modules_mapping()
    if fmt == "fp8":
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

        config = Fp8Config.from_config(quant)
        assert config.weight_block_size == [128, 128] and config.activation_scheme == "dynamic"

        def skipped(module: str) -> bool:
            return is_layer_skipped(
                module, config.ignored_layers, mapping, match_mode=config.ignored_layers_match_mode
            )

    else:
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        config = CompressedTensorsConfig.from_config(quant)
        config.packed_modules_mapping = mapping

        class ColumnParallelLinear(torch.nn.Module):  # the class name "Linear" targets
            pass

        def skipped(module: str) -> bool:
            # A FusedMoE asks for the scheme of its expert 0's projections.
            names = [f"{module}.0.{p}" for p in MLP] if module.endswith("experts") else [module]
            schemes = [config.get_scheme_dict(ColumnParallelLinear(), name) for name in names]
            assert len({s is None for s in schemes}) == 1, module
            if schemes[0] is not None:
                assert schemes[0]["weights"].strategy == "block"
                assert schemes[0]["weights"].block_structure == [128, 128]
            return schemes[0] is None

    for module, weights in _vllm_modules(mtp=True).items():
        assert skipped(module) == (not set(weights) <= quantized), module
        assert set(weights) <= quantized or not set(weights) & quantized, module


# --------------------------------------------------------------------------- files


def test_same_arguments_give_identical_bytes(built: dict, tmp_path: Path) -> None:
    case = ("compressed-tensors", "experts", "float32")
    again = build_fp8_model(tmp_path / "again", ARCH, fmt=case[0], scope=case[1], dtype=case[2])
    assert _digests(again) == _digests(built[case])
    assert _digests(dequantized_dir(again)) == _digests(dequantized_dir(built[case]))
    assert {p.name for p in again.iterdir()} >= {
        "tokenizer.json",
        "generation_config.json",
        STAMP_FILE,
    }


def test_rebuild_with_same_stamps_is_a_no_op(built: dict) -> None:
    case = CASES[0]
    files = [built[case] / "model.safetensors", dequantized_dir(built[case]) / "model.safetensors"]
    before = [f.stat().st_mtime_ns for f in files]
    assert (
        build_fp8_model(built[case], ARCH, fmt=case[0], scope=case[1], dtype=case[2]) == built[case]
    )
    assert [f.stat().st_mtime_ns for f in files] == before


def test_other_scope_replaces_both_folders(tmp_path: Path) -> None:
    out = build_fp8_model(tmp_path / "m", ARCH, scope="experts", dtype="float32")
    build_fp8_model(out, ARCH, scope="all", dtype="float32")
    for folder, role in ((out, "fp8"), (dequantized_dir(out), "dequantized")):
        stamp = json.loads((folder / STAMP_FILE).read_text())
        assert stamp["fp8"] == {"format": "fp8", "scope": "all", "role": role}
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in _tensors(out)


def test_refuses_a_foreign_copy_folder(tmp_path: Path) -> None:
    copy = dequantized_dir(tmp_path / "m")
    copy.mkdir()
    (copy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_fp8_model(tmp_path / "m", ARCH)
    assert not (tmp_path / "m").exists()
    assert (copy / "notes.txt").read_text() == "keep me"


def test_rejects_sizes_off_the_block_and_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("off the 128 x 128 FP8 block")):
        build_fp8_model(tmp_path / "x", "deepseek_v3")  # moe_intermediate_size 64
    with pytest.raises(ValueError, match="DeepSeek-V3 only"):
        build_fp8_model(tmp_path / "x", "qwen3_moe")
    with pytest.raises(ValueError, match="unknown FP8 format"):
        build_fp8_model(tmp_path / "x", ARCH, fmt="int8")
    with pytest.raises(ValueError, match="unknown FP8 scope"):
        build_fp8_model(tmp_path / "x", ARCH, scope="attention")
    assert not any(tmp_path.iterdir())


def test_cli(built: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = built[("compressed-tensors", "all", "bfloat16")]
    argv = [str(out), "--arch", ARCH, "--quant", "compressed-tensors", "--quant-scope", "all"]
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out), str(dequantized_dir(out))]
    with pytest.raises(SystemExit):
        main([str(out), "--arch", ARCH, "--quant-scope", "all"])
    assert "--quant-scope needs --quant" in capsys.readouterr().err


# --------------------------------------------------------------------------- stock vLLM
