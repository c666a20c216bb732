"""One rank's expert moves begun and finished around a forward pass, on the GPU when there
is one (benchmarks/gpu_check.sh runs this folder there): the forward pass between
`begin_moves` and `finish_moves` reads the old weights whole, the commit writes the same
storage, so a CUDA graph captured before the move computes with the new weights after it.

Only local moves (one rank): the P2P path needs two GPUs (tests/dist covers it on gloo).
"""

from __future__ import annotations

import pytest
import torch

from vllm_wideep.eplb.mover import begin_moves, finish_moves, plan_moves

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS = 6
OLD = torch.tensor([0, 1, 2, 3, 4, 5])
NEW = torch.tensor([5, 1, 0, 0, 3, 2])  # expert 0 twice, 4 dropped, 1 stays


def _weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(SLOTS, 256, 128, generator=gen)  # [S, 2I, H]
    w2 = torch.randn(SLOTS, 128, 128, generator=gen)  # [S, H, I]
    return [w.to(DEVICE, torch.bfloat16) for w in (w13, w2)]


def _forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`[S, T, H]`: x through every slot's two GEMMs (a stand-in for the experts)."""
    w13, w2 = weights
    gate_up = torch.einsum("sij,tj->sti", w13.float(), x)  # [S, T, 2I]
    return torch.einsum("sij,stj->sti", w2.float(), torch.tanh(gate_up[..., :128]))


def test_forward_between_begin_and_finish_sees_the_old_weights_then_the_new():
    weights = _weights()
    x = torch.randn(16, 128, device=DEVICE)
    before = _forward(weights, x)  # [S, T, H]: slot s computes expert OLD[s]
    storage = [w.data_ptr() for w in weights]
    moves = begin_moves(plan_moves(OLD, NEW, SLOTS), weights, rank=0, num_ranks=1, group=None)
    during = _forward(weights, x)  # main stream, beside the side stream's copies
    assert finish_moves(moves)
    after = _forward(weights, x)
    assert torch.equal(during, before)
    assert torch.equal(after, before[NEW.to(DEVICE)])  # slot s now computes expert NEW[s]
    assert [w.data_ptr() for w in weights] == storage


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_a_graph_captured_before_a_move_computes_with_the_moved_weights():
    weights = _weights()
    x = torch.randn(16, 128, device=DEVICE)
    before = _forward(weights, x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _forward(weights, x)
    moves = begin_moves(plan_moves(OLD, NEW, SLOTS), weights, rank=0, num_ranks=1, group=None)
    graph.replay()  # during the move: the old weights
    torch.cuda.synchronize()
    assert torch.equal(out, before)
    assert finish_moves(moves)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, before[NEW.to(DEVICE)])
