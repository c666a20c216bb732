"""Tiny checkpoints: reproducible bytes, the configs vLLM needs, a working tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from vllm_wideep.tiny_models import (  # noqa: E402
    COVERAGE_ARCHES,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    STAMP_FILE,
    TINY_ARCHES,
    VOCAB_SIZE,
    build_coverage_model,
    build_tiny_model,
    coverage_config,
    main,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in TINY_ARCHES}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("arch", TINY_ARCHES)
def test_same_seed_gives_identical_bytes(
    arch: str, models: dict[str, Path], tmp_path: Path
) -> None:
    again = build_tiny_model(tmp_path / "again", arch)
    first, second = _digests(models[arch]), _digests(again)
    assert "model.safetensors" in first and "tokenizer.json" in first
    assert first == second


def test_other_seed_gives_other_weights(models: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "seed1", "qwen3_moe", seed=1)
    a, b = _tensors(models["qwen3_moe"]), _tensors(other)
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], b["model.layers.0.mlp.gate.weight"])
    assert (models["qwen3_moe"] / "tokenizer.json").read_bytes() == (
        other / "tokenizer.json"
    ).read_bytes()


def test_rebuild_with_same_stamp_is_a_no_op(models: dict[str, Path]) -> None:
    weights = models["mixtral"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(models["mixtral"], "mixtral") == models["mixtral"]
    assert weights.stat().st_mtime_ns == before


def test_other_params_replace_a_tiny_model_folder(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", "dense", seed=0)
    build_tiny_model(out, "dense", seed=3)
    assert json.loads((out / STAMP_FILE).read_text())["seed"] == 3


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_tiny_model(tmp_path, "dense")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_rejects_unknown_arch_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_tiny_model(tmp_path / "x", "llama4")
    with pytest.raises(ValueError, match="unsupported dtype"):
        build_tiny_model(tmp_path / "x", "dense", dtype="int8")


def test_cli_writes_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main([str(tmp_path / "f32"), "--arch", "qwen3_moe", "--dtype", "float32", "--seed", "2"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "f32")
    assert {t.dtype for t in _tensors(tmp_path / "f32").values()} == {torch.float32}


# --------------------------------------------------------------------------- configs and weights


def test_all_weights_bfloat16_and_sizes_fit_cpu_moe_kernel(models: dict[str, Path]) -> None:
    for arch, folder in models.items():
        cfg = _config(folder)
        assert {t.dtype for t in _tensors(folder).values()} == {torch.bfloat16}, arch
        assert cfg["vocab_size"] == VOCAB_SIZE
        assert cfg["eos_token_id"] == EOS_TOKEN_ID and cfg["pad_token_id"] == PAD_TOKEN_ID
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in cfg:
                assert cfg[key] % 32 == 0, (arch, key, cfg[key])
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == EOS_TOKEN_ID


def test_deepseek_v3_config(models: dict[str, Path]) -> None:
    cfg = _config(models["deepseek_v3"])
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576  # CPU MLA
    expected = {
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 96,
        "qk_nope_head_dim": 32,
        "v_head_dim": 64,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    }
    assert {k: cfg[k] for k in expected} == expected


def test_deepseek_v3_fp8_differs_only_in_sizes_that_fit_the_fp8_block(
    models: dict[str, Path],
) -> None:
    base, fp8 = _config(models["deepseek_v3"]), _config(models["deepseek_v3_fp8"])
    resized = {"q_lora_rank": 128, "qk_nope_head_dim": 64, "moe_intermediate_size": 128}
    assert {k: fp8[k] for k in resized} == resized
    same = set(base) - set(resized) - {"qk_head_dim"}  # qk_head_dim = nope + rope
    assert {k: fp8[k] for k in same} == {k: base[k] for k in same}
    heads = fp8["num_attention_heads"]
    assert heads * (fp8["qk_nope_head_dim"] + fp8["v_head_dim"]) == 512  # kv_b_proj rows
    tensors = _tensors(models["deepseek_v3_fp8"])
    for name, t in tensors.items():
        head_or_router = ("embed_tokens", "lm_head", "shared_head.head", "eh_proj", "mlp.gate.")
        if t.dim() != 2 or any(part in name for part in head_or_router):
            continue
        rows, cols = t.shape
        assert cols % 128 == 0, (name, t.shape)
        # kv_a_proj_with_mqa: 576 = 512 + 64 rows, the last part of vLLM's fused_qkv_a_proj.
        assert rows % 128 == 0 or (name.endswith("kv_a_proj_with_mqa.weight") and rows == 576)
    assert tensors["model.layers.3.mlp.experts.15.down_proj.weight"].shape == (128, 128)


def test_deepseek_v3_weights(models: dict[str, Path]) -> None:
    tensors = _tensors(models["deepseek_v3"])
    # Layer 0 dense, layers 1-2 MoE, layer 3 the MTP layer with its own MoE block.
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert not any(k.startswith("model.layers.0.mlp.experts.") for k in tensors)
    for layer in (1, 2, 3):
        prefix = f"model.layers.{layer}.mlp."
        for e in range(16):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"{prefix}experts.{e}.{proj}.weight" in tensors
        assert f"{prefix}experts.16.gate_proj.weight" not in tensors
        assert f"{prefix}shared_experts.gate_proj.weight" in tensors
        bias = tensors[f"{prefix}gate.e_score_correction_bias"]
        assert bias.shape == (16,) and bias.float().abs().min() > 0
        assert tensors[f"{prefix}experts.0.gate_proj.weight"].shape == (64, 128)
    mtp = {
        "enorm.weight": (128,),
        "hnorm.weight": (128,),
        "eh_proj.weight": (128, 256),
        "shared_head.norm.weight": (128,),
        "shared_head.head.weight": (VOCAB_SIZE, 128),
        "embed_tokens.weight": (VOCAB_SIZE, 128),
        "self_attn.kv_a_proj_with_mqa.weight": (576, 128),
    }
    for name, shape in mtp.items():
        assert tuple(tensors[f"model.layers.3.{name}"].shape) == shape, name
    assert torch.equal(
        tensors["model.layers.3.embed_tokens.weight"], tensors["model.embed_tokens.weight"]
    )
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], tensors["lm_head.weight"])
    assert not any(k.startswith("model.layers.4.") for k in tensors)


def test_qwen3_moe_mixtral_dense_layouts(models: dict[str, Path]) -> None:
    qwen = _config(models["qwen3_moe"])
    assert (
        qwen["num_local_experts"],
        qwen["num_experts_per_tok"],
        qwen["moe_intermediate_size"],
    ) == (16, 4, 64)
    assert (qwen["num_attention_heads"], qwen["num_key_value_heads"], qwen["head_dim"]) == (
        4,
        2,
        32,
    )
    assert qwen["norm_topk_prob"] is True and qwen["num_hidden_layers"] == 2
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in _tensors(models["qwen3_moe"])

    mixtral = _config(models["mixtral"])
    assert (
        mixtral["num_local_experts"],
        mixtral["num_experts_per_tok"],
        mixtral["intermediate_size"],
    ) == (8, 2, 64)
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in _tensors(models["mixtral"])

    assert _config(models["dense"])["architectures"] == ["Qwen3ForCausalLM"]
    assert not any("expert" in k for k in _tensors(models["dense"]))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_matches_model(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["deepseek_v3"])
    assert len(tok) == VOCAB_SIZE
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (
        EOS_TOKEN_ID,
        EOS_TOKEN_ID,
        PAD_TOKEN_ID,
    )
    for text in (
        "The router sends each token to four experts.",
        "Prices: $12.50, 3.99 — naïve café ✓\n\ttab",
    ):
        ids = tok(text).input_ids
        assert max(ids) < VOCAB_SIZE
        assert tok.decode(ids) == text
    assert len(tok("the lighthouse keeper").input_ids) < len(
        "the lighthouse keeper"
    )  # merges learnt
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "user: hi\nassistant:"


# --------------------------------------------------------------------------- the weights behave


def _experts_used(model: torch.nn.Module, input_ids: torch.Tensor) -> list[int]:
    """Distinct experts each MoE router picks for ``input_ids`` (HF routers return indices last)."""
    used: list[set[int]] = []

    def hook(_module, _inputs, output):
        used.append(set(output[-1].flatten().tolist()))

    handles = [
        m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")
    ]
    with torch.no_grad():
        model(input_ids)
    for h in handles:
        h.remove()
    return [len(s) for s in used]


@pytest.mark.parametrize(
    "arch, num_experts, min_used",
    [("deepseek_v3", 16, 12), ("qwen3_moe", 16, 12), ("mixtral", 8, 6)],
)
def test_routing_spreads_and_greedy_is_not_degenerate(
    arch: str, num_experts: int, min_used: int, models: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[arch])
    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32)
    ids = tok(
        "In the spring the river rose and the village moved its market to the hill.",
        return_tensors="pt",
    ).input_ids
    used = _experts_used(model, ids)
    assert used and all(min_used <= n <= num_experts for n in used), used
    out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    assert len(set(out.tolist())) >= 8, out.tolist()


# --------------------------------------------------------------------------- coverage models


@pytest.fixture(scope="module")
def coverage_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coverage")
    return {name: build_coverage_model(root / name, name) for name in COVERAGE_ARCHES}


def test_coverage_models_are_tiny_float32_moe_checkpoints(coverage_models: dict[str, Path]) -> None:
    for name, folder in coverage_models.items():
        cfg = _config(folder)
        assert cfg["architectures"] == [COVERAGE_ARCHES[name].architecture], name
        assert cfg["vocab_size"] == VOCAB_SIZE, name
        for key, value in COVERAGE_ARCHES[name].extra_config.items():
            assert cfg[key] == value, (name, key)  # the keys only vLLM reads survive saving
        tensors = _tensors(folder)
        assert {t.dtype for t in tensors.values()} == {torch.float32}, name
        assert sum(t.numel() for t in tensors.values()) < 4_000_000, name


def test_coverage_model_bytes_are_reproducible(
    coverage_models: dict[str, Path], tmp_path: Path
) -> None:
    again = build_coverage_model(tmp_path / "gpt_oss", "gpt_oss")
    assert _digests(again) == _digests(coverage_models["gpt_oss"])


def test_cli_writes_a_coverage_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "llama4"), "--arch", "llama4"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "llama4")
    assert _config(tmp_path / "llama4")["architectures"] == ["Llama4ForCausalLM"]


def test_layout_coverage_models_hold_their_layout_and_load_their_config(
    coverage_models: dict[str, Path],
) -> None:
    """The models without a transformers class: exactly the tensors of their layout, and
    a config that transformers loads (remote ones from their own configuration file,
    with ``trust_remote_code``; nothing is downloaded)."""
    from transformers import AutoConfig

    layout_models = {n: a for n, a in COVERAGE_ARCHES.items() if a.layout is not None}
    assert {"bailing_moe_v2", "deepseek", "step3p5"} <= set(layout_models)
    for name, arch in layout_models.items():
        folder = coverage_models[name]
        assert arch.layout is not None
        tensors = _tensors(folder)
        expected = arch.layout(coverage_config(name))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected, name
        cfg = _config(folder)
        if arch.trust_remote_code:
            assert cfg["auto_map"]["AutoConfig"].startswith("configuration_wideep_tiny."), name
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            assert config.model_type == cfg["model_type"] == arch.config_class.split(".")[1]
            assert config.num_hidden_layers == cfg["num_hidden_layers"], name
        else:  # a config class vLLM ships: no remote code
            assert not (folder / "configuration_wideep_tiny.py").exists(), name
