"""Capacity planner: validation against published results, model properties, calibration,
config parsing and the command line (docs/planner.md)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from vllm_wideep.planner import (
    BUILTIN_CONFIGS,
    Deployment,
    at_user_rate,
    decode_step,
    load_hardware,
    load_model_shape,
    load_precision,
    pareto_frontier,
    prefill_step,
    sweep,
)
from vllm_wideep.planner.calibrate import (
    calibrated_profile,
    fit_roofline,
    load_measurements,
)
from vllm_wideep.planner.cli import main
from vllm_wideep.planner.hardware import HardwareProfile, hardware_from_dict
from vllm_wideep.planner.perf_model import StepEstimate, active_slots, destination_ranks

REPO = Path(__file__).resolve().parents[2]
GROUPED_GEMM_RESULTS = REPO / "docs" / "results" / "grouped_gemm_h200_tuned.json"

DEEPSEEK_R1 = load_model_shape("deepseek-r1")


# --------------------------------------------------------------------------- validation
#
# One setting for both published results (docs/planner.md, "Validation"): MTP with one draft
# token at DeepSeek's published 85 % acceptance, imbalance 1.1 (TensorRT-LLM's EPLB result at
# EP32: (max - mean) / mean = 0.109), no comm/compute overlap, the built-in efficiencies.
MTP_TOKENS, MTP_ACCEPTANCE, IMBALANCE = 1, 0.85, 1.1


def test_gb200_ep32_over_ep8_per_gpu_throughput_at_100_tokens_per_user() -> None:
    """NVIDIA: wide EP (EP32) gives up to 1.8x the per-GPU throughput of EP8 for DeepSeek-R1
    on GB200 NVL72. Setting: NVFP4 experts, ISL/OSL 8k/1k (mean KV 8192 + 512), one extra
    expert slot per GPU (TensorRT-LLM's 256 + EP slots), read at 100 tokens/s per user."""
    hw, prec = load_hardware("gb200-nvl72"), load_precision("fp4")
    per_gpu = {}
    for ep in (8, 32):
        dep = Deployment(
            ep_size=ep,
            batch_per_gpu=1,
            context_len=8192 + 1024 / 2,
            imbalance=IMBALANCE,
            mtp_tokens=MTP_TOKENS,
            mtp_acceptance=MTP_ACCEPTANCE,
            extra_slots_per_gpu=1,
        )
        est = at_user_rate(DEEPSEEK_R1, hw, prec, dep, user_rate=100.0)
        assert est is not None and est.fits_in_memory
        assert est.tokens_per_s_per_user == pytest.approx(100.0, rel=1e-3)
        per_gpu[ep] = est.tokens_per_s_per_gpu
    ratio = per_gpu[32] / per_gpu[8]
    assert ratio == pytest.approx(1.8, rel=0.20), per_gpu


def test_deepseek_h800_decode_tokens_per_node() -> None:
    """DeepSeek Day 6: ~14.8k decode tokens/s per H800 node; EP144 over 18 nodes, 32
    redundant experts (2 routed per GPU), FP8 GEMMs and dispatch, BF16 MLA and combine,
    mean KV length 4989, users see 20-22 tokens/s (read at 21)."""
    hw, prec = load_hardware("h800"), load_precision("fp8")
    dep = Deployment(
        ep_size=144,
        batch_per_gpu=1,
        context_len=4989,
        imbalance=IMBALANCE,
        mtp_tokens=MTP_TOKENS,
        mtp_acceptance=MTP_ACCEPTANCE,
        redundant_experts=32,
    )
    est = at_user_rate(DEEPSEEK_R1, hw, prec, dep, user_rate=21.0)
    assert est is not None and est.fits_in_memory
    assert est.tokens_per_s_per_user == pytest.approx(21.0, rel=1e-3)
    per_node = 8 * est.tokens_per_s_per_gpu
    assert per_node == pytest.approx(14_800, rel=0.25)


# --------------------------------------------------------------------------- properties


def _deepseek_step(hw_name: str = "h200", **changes: float) -> StepEstimate:
    """DeepSeek-R1 in FP8, 64 requests per GPU at 4096 tokens of context, EP 16 unless
    ``changes`` say otherwise."""
    dep = Deployment(ep_size=16, batch_per_gpu=64, context_len=4096)
    dep = dataclasses.replace(dep, **changes)
    return decode_step(DEEPSEEK_R1, load_hardware(hw_name), load_precision("fp8"), dep)


@pytest.mark.parametrize("ep", [8, 16, 64])
def test_more_imbalance_lowers_throughput(ep: int) -> None:
    rates = [
        _deepseek_step(ep_size=ep, imbalance=u).tokens_per_s_per_gpu for u in (1.0, 1.2, 1.6, 2.5)
    ]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)), rates


def test_more_bandwidth_raises_throughput() -> None:
    dep = Deployment(ep_size=16, batch_per_gpu=32, context_len=4096)
    prec, h200 = load_precision("fp8"), load_hardware("h200")
    base = decode_step(DEEPSEEK_R1, h200, prec, dep).tokens_per_s_per_gpu
    faster_hbm = dataclasses.replace(h200, memory_bandwidth=2 * h200.memory_bandwidth)
    faster_nic = dataclasses.replace(h200, scale_out_bandwidth=2 * h200.scale_out_bandwidth)
    assert decode_step(DEEPSEEK_R1, faster_hbm, prec, dep).tokens_per_s_per_gpu > base
    assert decode_step(DEEPSEEK_R1, faster_nic, prec, dep).tokens_per_s_per_gpu > base


def test_grouped_gemm_intensity_rises_with_ep_at_fixed_batch_per_gpu() -> None:
    intensities = [_deepseek_step(ep_size=ep).expert_intensity for ep in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a < b for a, b in zip(intensities, intensities[1:], strict=False)), intensities
    # EP 64, 64 requests per GPU: 64 * 8 rows over 4 slots, FP8 weights -> 2 * 128 FLOP/byte.
    assert intensities[-1] == pytest.approx(2 * 64 * 8 / 4, rel=1e-3)


def test_wider_ep_reads_fewer_expert_weights_per_gpu() -> None:
    steps = [_deepseek_step(ep_size=ep) for ep in (8, 16, 32, 64)]
    for narrow, wide in zip(steps, steps[1:], strict=False):
        assert narrow.term("routed experts").bytes > wide.term("routed experts").bytes
        assert narrow.weight_bytes > wide.weight_bytes
        assert narrow.tokens_per_s_per_gpu < wide.tokens_per_s_per_gpu


def test_all_to_all_leaves_the_node_only_beyond_the_nvlink_domain() -> None:
    inside = _deepseek_step("h200", ep_size=8).term("all-to-all").seconds
    outside = _deepseek_step("h200", ep_size=16).term("all-to-all").seconds
    nvl72 = _deepseek_step("gb200-nvl72", ep_size=16).term("all-to-all").seconds
    # EP 16 on 8-GPU nodes: 8 of 15 peers over a 50 GB/s NIC instead of 450 GB/s NVLink.
    assert outside > 3 * inside
    assert nvl72 < outside / 3


def test_routing_statistics() -> None:
    dep = Deployment(ep_size=8, batch_per_gpu=1, context_len=0)
    # 32 slots per rank, top-8 of 256: a rank is missed with C(224, 8) / C(256, 8).
    p_miss = 1.0
    for i in range(8):
        p_miss *= (224 - i) / (256 - i)
    assert destination_ranks(DEEPSEEK_R1, dep) == pytest.approx(8 * (1 - p_miss))
    assert active_slots(DEEPSEEK_R1, dep, tokens_per_gpu=1e6) == pytest.approx(32)
    # One token in the whole group (1/8 per GPU) hits 8 of 256 slots: 1 per rank on average.
    assert active_slots(DEEPSEEK_R1, dep, tokens_per_gpu=1 / 8) == pytest.approx(1.0)


def test_mtp_accepted_tokens_and_memory_limit() -> None:
    dep = Deployment(ep_size=8, batch_per_gpu=1, context_len=1, mtp_tokens=3, mtp_acceptance=0.5)
    assert dep.accepted_tokens_per_step == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    # 671 B parameters in FP8 do not fit on one 80 GB GPU: no batch fits, no frontier.
    curve = sweep(DEEPSEEK_R1, load_hardware("h100"), load_precision("fp8"), dep, [1], [1, 2])[0]
    assert curve.estimates[0].max_batch_per_gpu == 0 and not curve.fits


def test_frontier_is_pareto_and_at_user_rate_hits_the_target() -> None:
    hw, prec = load_hardware("h200"), load_precision("fp8")
    template = Deployment(ep_size=16, batch_per_gpu=1, context_len=2048)
    (curve,) = sweep(DEEPSEEK_R1, hw, prec, template, [16], [1, 4, 16, 64, 128])
    users = [e.tokens_per_s_per_user for e in curve.frontier]
    gpus = [e.tokens_per_s_per_gpu for e in curve.frontier]
    assert users == sorted(users, reverse=True) and gpus == sorted(gpus)
    assert pareto_frontier(curve.estimates) == list(curve.frontier)
    target = (users[1] + users[2]) / 2
    est = at_user_rate(DEEPSEEK_R1, hw, prec, template, target)
    assert est is not None and est.tokens_per_s_per_user == pytest.approx(target, rel=1e-3)
    assert at_user_rate(DEEPSEEK_R1, hw, prec, template, 10 * users[0]) is None


def test_prefill_step_is_compute_heavy() -> None:
    dep = Deployment(ep_size=32, batch_per_gpu=16384, context_len=4096, redundant_experts=32)
    est = prefill_step(DEEPSEEK_R1, load_hardware("h800"), load_precision("fp8"), dep)
    assert est.phase == "prefill"
    assert est.term("routed experts").bound == "compute"
    assert est.term("attention weights").bound == "compute"
    assert est.tokens_per_s_per_gpu == pytest.approx(16384 / est.step_s)


def test_bad_deployment_values_are_refused() -> None:
    with pytest.raises(ValueError, match="imbalance"):
        Deployment(ep_size=8, batch_per_gpu=1, context_len=1, imbalance=0.9)
    with pytest.raises(ValueError, match="comm_overlap"):
        Deployment(ep_size=8, batch_per_gpu=1, context_len=1, comm_overlap=2)


# --------------------------------------------------------------------------- calibration


def _synthetic_profile() -> HardwareProfile:
    """One FLOP/s for every dtype and efficiencies of 1, so the truth is (BW, F, c0)."""
    return HardwareProfile(
        name="synthetic",
        memory_bytes=1e15,
        memory_bandwidth=2.0e12,
        bf16_flops=4.0e14,
        fp8_flops=4.0e14,
        fp4_flops=4.0e14,
        scale_up_domain=1,
        scale_up_bandwidth=0.0,
        scale_out_bandwidth=0.0,
        memory_efficiency=1.0,
        compute_efficiency=1.0,
        step_overhead=3e-4,
    )


def test_calibration_recovers_known_parameters_from_step_times(tmp_path: Path) -> None:
    truth = _synthetic_profile()
    model, prec = load_model_shape("qwen3-235b-a22b"), load_precision("bf16")
    points = []
    for batch in (1, 4, 16, 64, 256, 1024, 4096):
        dep = Deployment(ep_size=1, batch_per_gpu=batch, context_len=1)
        points.append({"batch": batch, "step_s": decode_step(model, truth, prec, dep).step_s})
    path = tmp_path / "steps.json"
    path.write_text(
        json.dumps(
            {
                "kind": "decode_step_times",
                "model": "qwen3-235b-a22b",
                "precision": "bf16",
                "context_len": 1,
                "ep_size": 1,
                "points": points,
            }
        )
    )
    kind, cal_points, _ = load_measurements(path)
    fit = fit_roofline(cal_points)
    assert kind == "decode_step_times"
    assert fit.bandwidth_determined and fit.flops_determined
    assert fit.bandwidth == pytest.approx(truth.memory_bandwidth, rel=0.01)
    assert fit.flops == pytest.approx(truth.bf16_flops, rel=0.01)
    assert fit.overhead_s == pytest.approx(truth.step_overhead, rel=0.01)
    assert fit.rms_relative_error < 1e-3

    base = dataclasses.replace(truth, memory_bandwidth=4.0e12, bf16_flops=8.0e14)
    profile = calibrated_profile(fit, kind, base, "fitted")
    assert profile.memory_efficiency == pytest.approx(0.5, rel=0.01)
    assert profile.compute_efficiency == pytest.approx(0.5, rel=0.01)
    assert profile.step_overhead == pytest.approx(3e-4, rel=0.01)


def test_calibration_reads_the_grouped_gemm_results() -> None:
    kind, points, meta = load_measurements(GROUPED_GEMM_RESULTS)
    assert kind == "grouped_gemm" and meta["device"] == "NVIDIA H200"
    assert len(points) == 24  # 4 EP sizes x 6 batches, contiguous layout
    h200 = load_hardware("h200")
    fit = fit_roofline(points, max_bandwidth=h200.memory_bandwidth)
    assert fit.bandwidth <= h200.memory_bandwidth
    assert 0 < fit.flops <= h200.bf16_flops and fit.overhead_s >= 0
    profile = calibrated_profile(fit, kind, h200, "h200-triton")
    assert profile.expert_call_overhead == pytest.approx(fit.overhead_s)
    assert 0 < profile.compute_efficiency <= 1


# --------------------------------------------------------------------------- model shapes


@pytest.mark.parametrize(
    ("name", "total_b", "active_b", "moe_layers", "kind", "kv_elems"),
    [
        ("deepseek-r1", 671, 37, 58, "mla", 576),
        ("deepseek-v3", 671, 37, 58, "mla", 576),
        ("qwen3-235b-a22b", 235, 22, 94, "gqa", 2 * 4 * 128),
        ("llama-4-maverick", 400, 17, 24, "gqa", 2 * 8 * 128),
    ],
)
def test_builtin_model_shapes(
    name: str, total_b: float, active_b: float, moe_layers: int, kind: str, kv_elems: int
) -> None:
    shape = load_model_shape(name)
    assert shape.total_params / 1e9 == pytest.approx(total_b, rel=0.03)
    assert shape.active_params / 1e9 == pytest.approx(active_b, rel=0.10)
    assert shape.num_moe_layers == moe_layers
    assert shape.attention.kind == kind
    assert shape.attention.kv_elements_per_token == kv_elems
    assert set(BUILTIN_CONFIGS) >= {name}


def test_deepseek_shape_details() -> None:
    s = DEEPSEEK_R1
    assert (s.num_layers, s.num_dense_layers, s.num_mtp_layers) == (61, 3, 1)
    assert s.attention_params == 187_105_280
    assert s.expert_params == 3 * 7168 * 2048
    assert s.shared_intermediate_size == 2048 and s.weight_dtype == "fp8"
    llama = load_model_shape("llama-4-maverick")
    assert llama.dense_intermediate_size == 16384 and llama.shared_intermediate_size == 8192


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models' config.json files. build_tiny_model writes ``tiny_config(arch)``
    (plus ``architectures`` and ``dtype``, which the planner does not read); writing it
    directly skips training the tokenizer and writing weights (tens of seconds on a busy
    2-core machine). Importing transformers' config classes alone costs ~10 s of CPU."""
    pytest.importorskip("transformers")
    from vllm_wideep.tiny_models import TINY_ARCHES, tiny_config

    root = tmp_path_factory.mktemp("tiny_configs")
    paths = {}
    for arch in TINY_ARCHES:
        (root / arch).mkdir()
        paths[arch] = root / arch / "config.json"
        paths[arch].write_text(tiny_config(arch).to_json_string())
    return paths


def test_tiny_model_configs_parse(tiny_configs: dict[str, Path]) -> None:
    ds = load_model_shape(tiny_configs["deepseek_v3"].parent)  # a folder holding config.json
    assert (ds.num_layers, ds.num_moe_layers, ds.num_mtp_layers) == (3, 2, 1)
    assert (ds.num_experts, ds.top_k, ds.shared_intermediate_size) == (16, 4, 64)
    assert ds.attention.kind == "mla" and ds.attention.kv_elements_per_token == 512 + 64
    assert ds.weight_dtype == "bf16"
    qwen = load_model_shape(tiny_configs["qwen3_moe"])
    assert (qwen.num_moe_layers, qwen.num_experts, qwen.top_k) == (2, 16, 4)
    assert qwen.attention.kv_elements_per_token == 2 * 2 * 32
    mixtral = load_model_shape(tiny_configs["mixtral"])
    assert (mixtral.num_experts, mixtral.top_k, mixtral.moe_intermediate_size) == (8, 2, 64)
    assert mixtral.shared_intermediate_size == 0
    with pytest.raises(ValueError, match="no routed experts"):
        load_model_shape(tiny_configs["dense"])


def test_measure_cpu_then_calibrate(tiny_configs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    model = str(tiny_configs["deepseek_v3"])
    rc = main(shlex.split(f"measure-cpu --model {model} --batch 1,4,16 --repeats 1 --out {out}"))
    assert rc == 0
    data = json.loads(out.read_text())
    assert [p["batch"] for p in data["points"]] == [1, 4, 16]
    assert all(p["step_s"] > 0 for p in data["points"])
    profile_path = tmp_path / "cpu_profile.json"
    assert main(["calibrate", str(out), "--out", str(profile_path)]) == 0
    assert load_hardware(profile_path).step_overhead >= 0


# --------------------------------------------------------------------------- profiles, CLI


def test_user_hardware_profiles(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"base": "h200", "name": "h200-slow", "memory_efficiency": 0.5}))
    mine = load_hardware(path)
    assert mine.name == "h200-slow" and mine.memory_efficiency == 0.5
    assert mine.memory_bandwidth == load_hardware("h200").memory_bandwidth
    with pytest.raises(ValueError, match="unknown hardware fields"):
        hardware_from_dict({"base": "h200", "hbm": 1})
    with pytest.raises(ValueError, match="memory_efficiency"):
        hardware_from_dict({"base": "h200", "memory_efficiency": 1.5})
    with pytest.raises(ValueError, match="unknown hardware"):
        load_hardware("tpu-v9")


def test_cli_plan_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png, out = tmp_path / "plan.png", tmp_path / "plan.json"
    args = shlex.split(
        "--model deepseek-r1 --hardware gb200-nvl72 --precision fp4 --gpus 72 --ep 8,32 "
        "--batch 1,8,64 --isl 8192 --osl 1024 --imbalance 1.1 --mtp-tokens 1 "
        "--mtp-acceptance 0.85 --extra-slots-per-gpu 1 --user-rate 100"
    )
    rc = main([*args, "--png", str(png), "--json", str(out)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    assert [c["ep_size"] for c in doc["curves"]] == [8, 32]
    assert all(c["frontier"] for c in doc["curves"])
    assert doc["at_user_rate"]["32"]["tokens_per_s_per_user"] == pytest.approx(100, rel=1e-3)
    printed = capsys.readouterr().out
    assert "at 100 tokens/s per user" in printed and "best: EP 32" in printed


def test_cli_calibrate_list_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = tmp_path / "h200_triton.json"
    assert main(["calibrate", str(GROUPED_GEMM_RESULTS), "--out", str(profile)]) == 0
    assert load_hardware(profile).expert_call_overhead > 0
    assert main(["list"]) == 0
    assert "gb200-nvl72" in capsys.readouterr().out
    assert main(["--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
