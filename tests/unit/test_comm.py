"""Single-process parts of the token exchange: fixed-length routing plans, row packing
(fp8 included), capacity sizing, traffic counters and the CUDA-graph policy."""

import pytest
import torch

from vllm_wideep.comm.base import TRAFFIC_FIELDS, TrafficCounters
from vllm_wideep.comm.capacity import capacity_rows
from vllm_wideep.comm.packing import RowFormat
from vllm_wideep.comm.routing import plan_routes
from vllm_wideep.config import WideEPConfig
from vllm_wideep.kernels.fp8 import dequantize_block_fp8
from vllm_wideep.plugin.engine import cuda_graph_policy


@pytest.mark.parametrize("num_ranks, experts_per_rank, top_k", [(2, 4, 2), (4, 2, 6), (8, 4, 8)])
def test_fixed_length_plan_is_the_plan_plus_padding(num_ranks, experts_per_rank, top_k):
    g = torch.Generator().manual_seed(num_ranks)
    num_tokens, num_experts = 11, num_ranks * experts_per_rank
    topk_ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(11)])
    topk_ids[torch.rand(num_tokens, top_k, generator=g) < 0.2] = -1
    topk_weights = torch.rand(num_tokens, top_k, generator=g)

    exact = plan_routes(topk_ids, topk_weights, experts_per_rank, num_ranks)
    max_pairs = num_tokens * min(top_k, num_ranks)
    fixed = plan_routes(topk_ids, topk_weights, experts_per_rank, num_ranks, max_pairs=max_pairs)
    P = len(exact.token_index)
    assert len(fixed.token_index) == max_pairs >= P
    assert torch.equal(fixed.send_counts, exact.send_counts)
    for name in ("token_index", "dest_rank", "local_ids", "weights"):
        assert torch.equal(getattr(fixed, name)[:P], getattr(exact, name)[:P]), name
    assert (fixed.dest_rank[P:] == num_ranks).all()
    assert (fixed.local_ids[P:] == -1).all() and (fixed.weights[P:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_row_format_round_trip(dtype, fp8):
    H = 200  # two scale groups, the second one partial
    fmt = RowFormat(hidden_dim=H, top_k=3, dtype=dtype, fp8=fp8)
    hidden = torch.randn(5, H, dtype=dtype) * torch.logspace(-3, 3, 5)[:, None].to(dtype)
    hidden[:, 128:] *= 1000  # groups of very different magnitude in one row
    ids = torch.tensor([[0, -1, 2]] * 5, dtype=torch.int32)
    weights = torch.rand(5, 3)
    rows = fmt.pack(hidden, ids, weights)
    assert rows.shape == (5, fmt.nbytes) and rows.dtype == torch.uint8
    assert fmt.nbytes == H * (1 if fp8 else dtype.itemsize) + (2 * 4 if fp8 else 0) + 24
    out_hidden, scales, out_ids, out_weights = fmt.unpack(rows)
    assert torch.equal(out_ids, ids) and torch.equal(out_weights, weights)
    assert out_hidden.dtype == dtype and scales is None
    if fp8:
        # A scale per token and 128 columns: the relative error of each group does not
        # depend on its magnitude (e4m3: 3 mantissa bits, at most 2**-4 per element).
        for group in (slice(0, 128), slice(128, H)):
            ref, got = hidden[:, group].float(), out_hidden[:, group].float()
            error = (got - ref).norm(dim=1) / ref.norm(dim=1)
            assert (error < 0.05).all(), error
        q, kept_scales, _, _ = fmt.unpack(rows, keep_fp8=True)
        assert q.dtype == torch.float8_e4m3fn and kept_scales.shape == (5, 2)
        expected = dequantize_block_fp8(q, kept_scales, (1, 128)).to(dtype)
        assert torch.equal(expected, out_hidden)
    else:
        assert torch.equal(out_hidden, hidden)
    empty = fmt.unpack(fmt.pack(hidden[:0], ids[:0], weights[:0]))
    assert [t.shape[0] for t in empty if t is not None] == [0, 0, 0]


def test_deepseek_row_sizes():
    assert RowFormat(7168, 8, torch.bfloat16).nbytes == 14400
    # 7168 fp8 bytes, 56 scales (one per 128 columns), 8 ids, 8 weights: 0.52x of bf16
    assert RowFormat(7168, 8, torch.bfloat16, fp8=True).nbytes == 7456


def test_capacity_rows():
    assert capacity_rows(0, max_tokens_per_rank=4096) == 4096  # no graphs: never overflows
    # with CUDA graphs: sized for a captured (decode) batch; larger batches overflow
    assert capacity_rows(0, max_tokens_per_rank=4096, graph_tokens_per_rank=512) == 512
    assert capacity_rows(0, max_tokens_per_rank=256, graph_tokens_per_rank=512) == 256
    assert capacity_rows(64, max_tokens_per_rank=4096) == 64
    # raised to the largest CUDA-graph batch, so a captured batch never needs a host read
    assert capacity_rows(64, max_tokens_per_rank=4096, graph_tokens_per_rank=256) == 256
    assert capacity_rows(9000, max_tokens_per_rank=4096) == 4096
    with pytest.raises(ValueError, match="capacity_tokens"):
        capacity_rows(-1, max_tokens_per_rank=4096)


def test_capacity_tokens_option_is_checked():
    with pytest.raises(ValueError, match="capacity_tokens"):
        WideEPConfig(capacity_tokens=-2)
    with pytest.raises(ValueError, match="dispatch_dtype"):
        WideEPConfig(dispatch_dtype="fp4")


def test_traffic_counters_add_on_device():
    counters = TrafficCounters()
    assert counters.snapshot() == dict.fromkeys(TRAFFIC_FIELDS, 0)
    counters.add(TrafficCounters.increment("cpu", calls=1, dispatch_sent_bytes=100))
    counters.add(
        TrafficCounters.increment("cpu", dispatch_sent_bytes=5, overflow_rows=torch.tensor(3))
    )
    snapshot = counters.snapshot()
    assert snapshot["calls"] == 1
    assert snapshot["dispatch_sent_bytes"] == 105
    assert snapshot["overflow_rows"] == 3


@pytest.mark.parametrize(
    "backend, keep", [("capacity", True), ("alltoall", False), ("allgather", False)]
)
def test_cuda_graph_policy(backend, keep):
    kept, why = cuda_graph_policy(WideEPConfig(enabled=True, token_exchange=backend))
    assert kept is keep
    assert backend in why


def test_ray_on_cpu_is_lifted_only_for_wide_ep():
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from vllm_wideep.plugin.ray_cpu import (
        RAY_CPU_RESOURCE,
        patch_ray_cpu,
        prepare_ray_workers,
        refuse_ray_on_cpu,
    )

    if not current_platform.is_cpu():
        pytest.skip("CPU platform only")
    patch_ray_cpu()
    assert current_platform.ray_device_key == RAY_CPU_RESOURCE
    with pytest.raises(ValueError, match="does not support ray"):
        refuse_ray_on_cpu(SimpleNamespace(distributed_executor_backend="ray"))
    refuse_ray_on_cpu(SimpleNamespace(distributed_executor_backend="mp"))

    pytest.importorskip("ray")
    parallel = SimpleNamespace(distributed_executor_backend="ray", ray_runtime_env=None)
    prepare_ray_workers(SimpleNamespace(parallel_config=parallel))
    hook = parallel.ray_runtime_env["worker_process_setup_hook"]
    assert hook == "vllm_wideep.plugin.ray_cpu.setup_ray_worker"
