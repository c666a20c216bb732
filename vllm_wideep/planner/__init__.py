"""Capacity planner: an analytical model of MoE decode and prefill under wide EP.

Given a model (``config.json``), a hardware profile, EP size, batch per GPU, load imbalance and
MTP settings, it predicts the step time term by term, tokens/s per GPU and tokens/s per user,
and the Pareto frontier of the two per EP size. docs/planner.md explains the model and its
validation against published results. Pure Python; nothing here imports vLLM or torch (the
CPU measurement and the PNG import torch and matplotlib lazily).

One job per file, in the order a plan runs:

    hardware.py     HardwareProfile, the built-in table, user profiles (JSON/YAML)
    model_shape.py  ModelShape from a config.json; built-in DeepSeek-R1/V3, Qwen3, Llama 4
    precision.py    bytes per weight / KV element / element sent (bf16, fp8, fp4)
    perf_model.py   Deployment -> StepEstimate: decode_step(), prefill_step()
    frontier.py     sweep batch per GPU per EP size, Pareto frontier, at_user_rate()
    plot.py         the frontier as a PNG
    calibrate.py    fit bandwidth, FLOP/s and overhead to measured times
    measure_cpu.py  time the tiny model's decode step on this CPU
    cli.py          `vllm-wideep plan`

Planner symbols (worked example: DeepSeek-R1 on 144 H800s, EP 144, 32 redundant experts):
    B    requests decoding on each GPU (batch per GPU)
    ctx  mean KV length of a request, tokens (4989)
    d    MTP draft tokens per step (1);  a  acceptance of a draft (0.85)
    A    accepted tokens per step = 1 + a + ... + a^d (1.85)
    T    query tokens per GPU per forward = B * (1 + d)
    u    imbalance: max / mean (token, expert) rows over EP ranks (1.1)
Other symbols as in the package glossary (vllm_wideep/__init__.py), with ep = R and one GPU
per rank; in this example S = ceil((256 + 32) / 144) = 2 slots per GPU, N = 144 * 2 = 288.
"""

from vllm_wideep.planner.frontier import EPCurve, at_user_rate, pareto_frontier, sweep
from vllm_wideep.planner.hardware import BUILTIN_HARDWARE, HardwareProfile, load_hardware
from vllm_wideep.planner.model_shape import (
    BUILTIN_CONFIGS,
    ModelShape,
    load_model_shape,
    shape_from_config,
)
from vllm_wideep.planner.perf_model import Deployment, StepEstimate, decode_step, prefill_step
from vllm_wideep.planner.precision import PRECISIONS, Precision, load_precision

__all__ = [
    "BUILTIN_CONFIGS",
    "BUILTIN_HARDWARE",
    "PRECISIONS",
    "Deployment",
    "EPCurve",
    "HardwareProfile",
    "ModelShape",
    "Precision",
    "StepEstimate",
    "at_user_rate",
    "decode_step",
    "load_hardware",
    "load_model_shape",
    "load_precision",
    "pareto_frontier",
    "prefill_step",
    "shape_from_config",
    "sweep",
]
