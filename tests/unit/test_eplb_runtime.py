"""The balancer's pure parts: logical->physical routing, move plans, load windows, files,
the engine-side option checks and the `vllm-wideep eplb` commands."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb import plan_placement
from vllm_wideep.eplb.cli import main as eplb_main
from vllm_wideep.eplb.cli import record_from_replies
from vllm_wideep.eplb.files import (
    LoadRecord,
    ModelIdentity,
    PlacementRecord,
    read_load,
    read_placement,
    write_load,
    write_placement,
)
from vllm_wideep.eplb.location import ExpertRouting, home_placement, routing_tables, row_keys
from vllm_wideep.eplb.mover import plan_moves, slot_checksum
from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.stats import LoadWindow, record
from vllm_wideep.eplb.traces import zipf_load
from vllm_wideep.plugin.engine import resolve_balancing

MODEL = ModelIdentity("Qwen3MoeForCausalLM", num_experts=16, hidden_size=128)


def _random_placement(gen, num_experts, num_ranks, slots_per_rank):
    """Every expert once, the extra slots random replicas, all shuffled."""
    extra = num_ranks * slots_per_rank - num_experts
    row = torch.cat(
        [torch.arange(num_experts), torch.randint(num_experts, (extra,), generator=gen)]
    )
    return row[torch.randperm(row.numel(), generator=gen)]


# --- routing ---------------------------------------------------------------------------


def test_routing_tables_worked_example():
    row = torch.tensor([0, 2, 1, 0, 1, 3])
    log2phy, count = routing_tables(row, 4, 3)
    assert log2phy.tolist() == [[0, 3], [2, 4], [1, -1], [5, -1]]
    assert count.tolist() == [2, 2, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_physical_depends_on_the_token_alone(dtype):
    """A token's slot holds its expert and is a function of its bits alone: not of its
    position or batch (the same on every rank: the tables are), and the replicas of an
    expert share its tokens about evenly."""
    gen = torch.Generator().manual_seed(0)
    num_experts, num_ranks, slots_per_rank = 8, 4, 3
    row = _random_placement(gen, num_experts, num_ranks, slots_per_rank)
    tokens = torch.randn(4000, 64, generator=gen).to(dtype)
    topk = torch.randint(-1, num_experts, (4000, 4), generator=gen)
    routing = ExpertRouting(num_experts, 5, "cpu")
    routing.load(row, slots_per_rank)
    slots = routing.to_physical(topk, tokens)
    valid = topk >= 0
    assert ((slots == -1) == ~valid).all() and (row[slots[valid]] == topk[valid]).all()
    batch = torch.randperm(4000, generator=gen)[:700]  # another batch, other positions
    assert torch.equal(routing.to_physical(topk[batch], tokens[batch]), slots[batch])
    assert torch.equal(row_keys(tokens[batch]), row_keys(tokens)[batch])
    for e in range(num_experts):
        replicas = (row == e).nonzero().flatten()
        counts = torch.bincount(slots[topk == e], minlength=len(row))[replicas]
        share = counts.float() / counts.sum()
        assert (share - 1 / len(replicas)).abs().max() < 0.05, (e, counts.tolist())


def test_home_placement_with_and_without_extra_slots():
    assert home_placement(4, 2, 2).tolist() == [0, 1, 2, 3]
    assert home_placement(4, 2, 3).tolist() == [0, 1, 0, 2, 3, 2]


# --- move plans --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_plan_moves_turns_old_into_new(seed):
    gen = torch.Generator().manual_seed(seed)
    num_experts, num_ranks, slots_per_rank = 12, 4, 4
    old = _random_placement(gen, num_experts, num_ranks, slots_per_rank)
    new = _random_placement(gen, num_experts, num_ranks, slots_per_rank)
    plan = plan_moves(old, new, slots_per_rank)
    changed = (old != new).nonzero().flatten().tolist()
    assert sorted(m.dst_slot for m in plan.moves) == changed  # one move per changed slot
    after = old.clone()
    for m in plan.moves:  # staged: every source is read from the old placement
        assert old[m.src_slot] == m.expert == new[m.dst_slot]
        dst_rank = m.dst_slot // slots_per_rank
        held_here = [s for s in range(len(old)) if old[s] == m.expert and s // 4 == dst_rank]
        if held_here:
            assert m.src_slot == min(held_here)  # a local copy, no traffic
        after[m.dst_slot] = old[m.src_slot]
    assert torch.equal(after, new)


def test_plan_moves_of_an_unchanged_placement_is_empty():
    row = home_placement(8, 2, 5)
    assert plan_moves(row, row.clone(), 5).moves == ()


# --- load statistics ---------------------------------------------------------------------


def test_record_counts_choices_and_skips_minus_one():
    counts = torch.zeros(4, dtype=torch.int64)
    record(counts, torch.tensor([[0, 3], [3, -1], [-1, -1]]))
    assert counts.tolist() == [1, 0, 0, 2]


def test_load_window_sums_the_last_steps_and_decay_halves_at_the_half_life():
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 100, (2, 5), generator=gen) for _ in range(7)]
    window = LoadWindow(2, 5, "window", 3, "cpu")
    decay = LoadWindow(2, 5, "decay", 2, "cpu")
    for s in steps:
        window.add_step(s)
        decay.add_step(s)
    assert torch.equal(window.total(), sum(steps[-3:]).double())
    factor = 0.5 ** (1 / 2)
    expected = sum(s.double() * factor ** (len(steps) - 1 - i) for i, s in enumerate(steps))
    torch.testing.assert_close(decay.total(), expected, rtol=1e-12, atol=0)


# --- files -------------------------------------------------------------------------------


def _placement_record(num_ranks=2, slots_per_rank=9):
    load = zipf_load(2, 16, tokens=4000, alpha=1.2, seed=0)
    placement = Placement(plan_placement(load, num_ranks, slots_per_rank), num_ranks)
    return PlacementRecord(
        MODEL, ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"], placement
    )


def test_placement_and_load_files_round_trip(tmp_path):
    rec = _placement_record()
    write_placement(tmp_path / "p.json", rec)
    back = read_placement(tmp_path / "p.json")
    assert back.model == rec.model and back.layers == rec.layers
    assert torch.equal(back.placement.physical_to_logical, rec.placement.physical_to_logical)
    assert torch.equal(
        back.row_for("model.layers.1.mlp.experts"), rec.placement.physical_to_logical[1]
    )
    load = LoadRecord(MODEL, rec.layers, torch.rand(2, 16, dtype=torch.float64))
    write_load(tmp_path / "l.json", load)
    assert torch.equal(read_load(tmp_path / "l.json").load, load.load)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: "{not json", "is not a JSON file"),
        (lambda d: {**d, "format": "vllm-wideep-load"}, "is not a vllm-wideep-placement file"),
        (lambda d: {**d, "version": 99}, "version 99"),
        (lambda d: {**d, "model": {"architecture": "X"}}, "'model' must hold"),
        (lambda d: {**d, "num_ranks": 3}, "expected [2 layers, 3 ranks x 9 slots]"),
        (lambda d: {**d, "physical_to_logical": [[0] * 18, [0] * 18]}, "are not placed"),
        (lambda d: {**d, "physical_to_logical": [[99] * 18] * 2}, "out of range"),
        (lambda d: {**d, "physical_to_logical": [[0.5] * 18] * 2}, "integers only"),
        (lambda d: {**d, "layers": ["a", "a"]}, "names a layer twice"),
    ],
)
def test_corrupt_placement_files_are_refused_with_the_reason(tmp_path, corrupt, message):
    path = tmp_path / "p.json"
    write_placement(path, _placement_record())
    bad = corrupt(json.loads(path.read_text()))
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_placement(path)


# --- engine-side checks ------------------------------------------------------------------


def _model_config(architecture="Qwen3MoeForCausalLM", num_experts=16, hidden=128):
    return SimpleNamespace(
        architectures=[architecture],
        get_num_experts=lambda: num_experts,
        get_hidden_size=lambda: hidden,
        get_total_num_hidden_layers=lambda: 2,
        model="tiny",
    )


def test_redundant_experts_must_divide_by_the_ep_size():
    config = WideEPConfig(enabled=True, redundant_experts=3)
    with pytest.raises(ValueError, match="multiple of the EP size 2"):
        resolve_balancing(config, _model_config(), ep_size=2)
    assert resolve_balancing(WideEPConfig(enabled=True, redundant_experts=4), _model_config(), 2)


def test_gpt_oss_with_redundant_slots_is_refused_without_them_accepted():
    gpt_oss = _model_config(architecture="GptOssForCausalLM")
    with pytest.raises(ValueError, match="not supported for GptOssForCausalLM"):
        resolve_balancing(WideEPConfig(enabled=True, redundant_experts=2), gpt_oss, 2)
    assert resolve_balancing(WideEPConfig(enabled=True, eplb="online"), gpt_oss, 2)


def test_placement_file_sets_the_slots_and_must_fit_the_model(tmp_path):
    path = tmp_path / "p.json"
    write_placement(path, _placement_record())  # 2 ranks x 9 slots for 16 experts
    config = resolve_balancing(WideEPConfig(enabled=True, placement=str(path)), _model_config(), 2)
    assert config.redundant_experts == 2 and config.placement == str(path)
    with pytest.raises(ValueError, match="is for 2 EP ranks, but this deployment has EP size 4"):
        resolve_balancing(WideEPConfig(enabled=True, placement=str(path)), _model_config(), 4)
    with pytest.raises(ValueError, match="was made for"):
        resolve_balancing(
            WideEPConfig(enabled=True, placement=str(path)), _model_config("MixtralForCausalLM"), 2
        )
    with pytest.raises(ValueError, match="disagrees with the placement file"):
        resolve_balancing(
            WideEPConfig(enabled=True, placement=str(path), redundant_experts=4), _model_config(), 2
        )
    with pytest.raises(ValueError, match="no such file"):
        resolve_balancing(
            WideEPConfig(enabled=True, placement=str(tmp_path / "nope.json")), _model_config(), 2
        )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eplb": "sometimes"}, "must be one of"),
        ({"eplb_interval": 0}, "must be >= 1"),
        ({"redundant_experts": -2}, "must be >= 0"),
        ({"placement": 3}, "must be a string"),
    ],
)
def test_bad_balancer_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        WideEPConfig.from_dict({"enabled": True, **options})


# --- commands ----------------------------------------------------------------------------


def test_record_placement_heatmap_commands(tmp_path, capsys):
    layers = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    load = zipf_load(2, 16, tokens=8000, alpha=1.2, seed=3).double()
    halves = [load.floor() // 2, load.floor() - load.floor() // 2]
    replies = [
        {
            "ep_rank": r,
            "num_ranks": 2,
            "model": MODEL.__dict__,
            "layers": layers,
            "load": halves[r].tolist(),
            "physical_to_logical": [],
        }
        for r in (1, 0)
    ]
    recorded = record_from_replies(replies)
    assert torch.equal(recorded.load, load.floor())
    write_load(tmp_path / "load.json", recorded)
    out = tmp_path / "p.json"
    assert (
        eplb_main(
            [
                "placement",
                "--load",
                str(tmp_path / "load.json"),
                "--ep-size",
                "2",
                "--redundant-experts",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    placement = read_placement(out).placement
    assert placement.slots_per_rank == 9
    before = Placement(home_placement(16, 2, 9).expand(2, -1), 2).balancedness(recorded.load)
    after = placement.balancedness(recorded.load)
    assert (after >= before).all() and after.min() > 0.95
    printed = capsys.readouterr().out
    assert f"{after[0]:.3f}" in printed and f"{before[0]:.3f}" in printed
    png = tmp_path / "load.png"
    assert (
        eplb_main(
            [
                "heatmap",
                "--load",
                str(tmp_path / "load.json"),
                "--placement",
                str(out),
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("[]")
    assert eplb_main(["heatmap", "--load", str(tmp_path / "bad.json"), "--out", str(png)]) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 4, 8), (3, 5, 3)])  # 8-byte words, and odd sizes
def test_slot_checksum_sees_a_flipped_bit_and_swapped_words(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(dtype), torch.randn(shape).to(dtype)]
    copy = [w.clone() for w in weights]
    want = slot_checksum(weights, 1)
    assert torch.equal(slot_checksum(copy, 1), want)
    assert not torch.equal(slot_checksum(copy, 0), want)
    flipped = [w.clone() for w in weights]
    flipped[1].view(-1).view(torch.uint8)[flipped[1][0].numel() * dtype.itemsize + 3] ^= 4
    assert not torch.equal(slot_checksum(flipped, 1), want)
    swapped = [w.clone() for w in weights]
    row = swapped[0][1].view(-1).view(torch.uint8)  # swap the first and last 8 bytes
    head, tail = row[:8].clone(), row[-8:].clone()
    row[:8], row[-8:] = tail, head
    assert not torch.equal(slot_checksum(swapped, 1), want)
