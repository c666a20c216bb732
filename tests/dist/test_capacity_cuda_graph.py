"""On a GPU: the `capacity` exchange (routing, packing, NCCL all_to_all_single, unpacking,
combine and the traffic counters) is captured in a CUDA graph and replayed on new inputs,
which only works without host syncs; the `alltoall` exchange cannot be captured. One NCCL rank
(one GPU: the rank's block to itself goes through NCCL all the same)."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist

from vllm_wideep.comm.registry import make_dispatcher

pytestmark = pytest.mark.gpu

HIDDEN, EXPERTS, TOP_K, TOKENS = 256, 16, 4, 64


@pytest.fixture(scope="module")
def nccl_group():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def _inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.rand(TOKENS, EXPERTS, device="cuda", generator=g).argsort(dim=1)[:, :TOP_K]
    ids[: TOKENS // 8, 1:] = -1  # some dropped choices
    weights = torch.rand(TOKENS, TOP_K, device="cuda", generator=g)
    return x, ids, weights


def _experts(received, w):
    """Every local expert on every received row (fixed shapes), weighted; `-1` skipped."""
    ids = received.topk_ids.long()
    y = torch.einsum("rh,rkgh->rkg", received.hidden_states.float(), w[ids.clamp(min=0)])
    y = y * (received.topk_weights * (ids >= 0)).unsqueeze(-1)
    return y.sum(1).to(received.hidden_states.dtype)


def _reference(x, ids, weights, w):
    ids = ids.long()
    y = torch.einsum("mh,mkgh->mkg", x.double(), w[ids.clamp(min=0)].double())
    return (y * (weights.double() * (ids >= 0)).unsqueeze(-1)).sum(1)


def _dispatcher(group, token_exchange="capacity", **options):
    return make_dispatcher(
        token_exchange,
        **options,
        group=group,
        slots_per_rank=EXPERTS,
        num_ranks=1,
        max_tokens_per_rank=TOKENS,
    )


@pytest.mark.parametrize("dispatch_dtype", ["auto", "fp8"])
def test_capacity_layer_is_captured_and_replayed(nccl_group, dispatch_dtype):
    w = torch.randn(EXPERTS, HIDDEN, HIDDEN, device="cuda") / HIDDEN**0.5
    dispatcher = _dispatcher(nccl_group, token_exchange="capacity", dispatch_dtype=dispatch_dtype)
    x, ids, weights = _inputs(0)

    def layer():
        received = dispatcher.dispatch(x, ids, weights)
        return dispatcher.combine(_experts(received, w), received.handle)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer()  # warm-up, eager: builds the counters' constant increments
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()

    new_x, new_ids, new_weights = _inputs(1)
    x.copy_(new_x)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    calls = dispatcher.traffic.snapshot()["calls"]
    graph.replay()
    torch.cuda.synchronize()
    expected = _reference(new_x, new_ids, new_weights, w)
    error = (out.double() - expected).norm() / expected.norm()
    assert error < (0.08 if dispatch_dtype == "fp8" else 0.01), error
    assert dispatcher.traffic.snapshot()["calls"] == calls + 1  # counting replays too


def test_capacity_second_round_over_nccl(nccl_group):
    """capacity 16 < 64 rows: eager, the rows beyond it take the second round."""
    w = torch.randn(EXPERTS, HIDDEN, HIDDEN, device="cuda") / HIDDEN**0.5
    dispatcher = _dispatcher(nccl_group, token_exchange="capacity", capacity_tokens=16)
    x, ids, weights = _inputs(2)
    received = dispatcher.dispatch(x, ids, weights)
    out = dispatcher.combine(_experts(received, w), received.handle)
    expected = _reference(x, ids, weights, w)
    assert (out.double() - expected).norm() / expected.norm() < 0.01
    assert dispatcher.traffic.snapshot()["overflow_rows"] == TOKENS - 16


def test_a2a_cannot_be_captured(nccl_group):
    """Last in this module: a failed capture may leave the NCCL communicator unusable."""
    w = torch.randn(EXPERTS, HIDDEN, HIDDEN, device="cuda") / HIDDEN**0.5
    dispatcher = _dispatcher(nccl_group, token_exchange="alltoall")
    x, ids, weights = _inputs(3)
    received = dispatcher.dispatch(x, ids, weights)  # eager works
    dispatcher.combine(_experts(received, w), received.handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError), torch.cuda.graph(graph):
        received = dispatcher.dispatch(x, ids, weights)
