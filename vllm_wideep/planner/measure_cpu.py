"""Measure a small model's decode step time against batch size on this CPU.

The step is a plain-torch forward of ``B`` tokens (one per request, KV length 1) through a
decoder built from a ``ModelShape``: the same projections, dense MLPs, router, routed experts
(looped over the experts that got rows, as Hugging Face's eager MoE does), shared experts and
LM head that the performance model counts, with random bf16 weights. Timing the planner's
own op list is what makes the fit in ``calibrate.py`` meaningful. Each batch runs twice to
warm up, then ``repeats`` times; the median is kept.

The result is the ``decode_step_times`` JSON that ``calibrate.load_measurements`` reads::

    {"kind": "decode_step_times", "device": "cpu (x86_64), 1 torch thread(s), torch 2.13.0",
     "model_name": "tiny qwen3_moe", "model_shape": {...ModelShape...}, "precision": "bf16",
     "context_len": 1, "ep_size": 1, "points": [{"batch": 1, "step_s": 0.0021}, ...]}

One torch thread by default: the numbers then depend less on what else runs on the machine,
and the measurement stays light.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm_wideep.planner.model_shape import ModelShape

if TYPE_CHECKING:
    import torch

DEFAULT_CPU_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _decoder(shape: ModelShape, generator: torch.Generator) -> Any:
    """Random bf16 weights for every GEMM of ``shape``, as a dict of tensors per layer."""
    import torch

    h = shape.hidden_size

    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) / cols**0.5).to(torch.bfloat16)

    a = shape.attention
    layers = []
    moe_layers = set(range(shape.num_dense_layers, shape.num_layers))
    for i in range(shape.num_layers):
        layer: dict[str, Any] = {}
        if a.kind == "mla":
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            if a.q_lora_rank:
                layer["q"] = [w(a.q_lora_rank, h), w(a.num_heads * qk, a.q_lora_rank)]
            else:
                layer["q"] = [w(a.num_heads * qk, h)]
            layer["kv_a"] = w(a.kv_lora_rank + a.qk_rope_head_dim, h)
            layer["kv_b"] = w(a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
            layer["o"] = w(h, a.num_heads * a.v_head_dim)
        else:
            layer["q"] = [w(a.num_heads * a.head_dim, h)]
            layer["kv"] = w(2 * a.num_kv_heads * a.head_dim, h)
            layer["o"] = w(h, a.num_heads * a.head_dim)
        if i in moe_layers:
            e, inter = shape.num_experts, shape.moe_intermediate_size
            layer["router"] = w(e, h)
            layer["w13"] = [w(2 * inter, h) for _ in range(e)]
            layer["w2"] = [w(h, inter) for _ in range(e)]
            if shape.shared_intermediate_size:
                layer["shared"] = (
                    w(2 * shape.shared_intermediate_size, h),
                    w(h, shape.shared_intermediate_size),
                )
        else:
            layer["mlp"] = (
                w(2 * shape.dense_intermediate_size, h),
                w(h, shape.dense_intermediate_size),
            )
        layers.append(layer)
    return {
        "embed": w(shape.vocab_size, h),
        "layers": layers,
        "lm_head": w(shape.vocab_size, h),
    }


def _forward(shape: ModelShape, weights: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V]`` for ``ids [B]``; attention over a KV cache of one token (its own)."""
    import torch
    import torch.nn.functional as F

    a = shape.attention

    def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ w13.T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2.T

    x = weights["embed"][ids]
    for layer in weights["layers"]:
        q = x
        for proj in layer["q"]:
            q = q @ proj.T
        if a.kind == "mla":
            latent = (x @ layer["kv_a"].T)[:, : a.kv_lora_rank]
            kv = (latent @ layer["kv_b"].T).view(-1, a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
            values = kv[..., a.qk_nope_head_dim :]
        else:
            kv = (x @ layer["kv"].T).view(-1, 2, a.num_kv_heads, a.head_dim)
            values = kv[:, 1].repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)
        del q  # one cached token: the scores do not change the output
        x = x + values.reshape(x.shape[0], -1) @ layer["o"].T
        if "mlp" in layer:
            x = x + mlp(x, *layer["mlp"])
            continue
        scores = (x @ layer["router"].T).float().softmax(dim=-1)
        topk_weights, topk_ids = scores.topk(shape.top_k, dim=-1)
        out = torch.zeros_like(x)
        for expert in topk_ids.unique().tolist():
            rows, slot = (topk_ids == expert).nonzero(as_tuple=True)
            y = mlp(x[rows], layer["w13"][expert], layer["w2"][expert])
            out.index_add_(0, rows, y * topk_weights[rows, slot, None].to(y.dtype))
        if "shared" in layer:
            out = out + mlp(x, *layer["shared"])
        x = x + out
    return x @ weights["lm_head"].T


def measure_cpu_step_times(
    shape: ModelShape,
    batches: Sequence[int] = DEFAULT_CPU_BATCHES,
    repeats: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one decode step of ``shape`` per batch size; see the module docstring."""
    import torch

    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats = {repeats} and threads = {threads} must be >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        weights = _decoder(shape, generator)
        points = []
        with torch.inference_mode():
            for batch in batches:
                ids = torch.randint(0, shape.vocab_size, (int(batch),), generator=generator)
                for _ in range(2):
                    _forward(shape, weights, ids)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    _forward(shape, weights, ids)
                    times.append(time.perf_counter() - start)
                points.append({"batch": int(batch), "step_s": statistics.median(times)})
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "kind": "decode_step_times",
        "device": f"cpu ({platform.machine()}), {threads} torch thread(s), "
        f"torch {torch.__version__}",
        "model_name": shape.name,
        "model_shape": dataclasses.asdict(shape),
        "precision": "bf16",
        "context_len": 1,
        "ep_size": 1,
        "points": points,
    }
