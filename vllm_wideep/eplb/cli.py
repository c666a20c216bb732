"""`vllm-wideep eplb`: from a running server's expert load to a placement file.

    vllm-wideep eplb record --url http://127.0.0.1:8000 --out load.json
        sums every EP rank's load window (the server needs VLLM_SERVER_DEV_MODE=1 for
        POST /collective_rpc) into a load file
    vllm-wideep eplb placement --load load.json --ep-size 2 --redundant-experts 2 --out p.json
        plans a placement (`plan_placement`) and prints rank balance before and after
    vllm-wideep eplb heatmap --load load.json [--placement p.json] --out load.png
        draws expert load per layer, and rank load without and with the placement

Then `vllm serve MODEL --enable-wideep --wideep-placement p.json ...` starts from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import torch

from vllm_wideep.eplb.files import (
    LoadRecord,
    ModelIdentity,
    PlacementRecord,
    read_load,
    read_placement,
    write_load,
    write_placement,
)
from vllm_wideep.eplb.location import home_placement
from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.policy import plan_placement


def record_from_replies(replies: list[dict]) -> LoadRecord:
    """Per-rank `wideep_load` replies -> one load record, summed over ranks."""
    if not replies:
        raise ValueError("vllm_wideep: the server returned no wideep_load replies")
    first = replies[0]
    ranks = sorted(r["ep_rank"] for r in replies)
    if ranks != list(range(first["num_ranks"])):
        raise ValueError(
            f"vllm_wideep: got load from EP ranks {ranks}, expected all of "
            f"0..{first['num_ranks'] - 1}"
        )
    load = sum(torch.tensor(r["load"], dtype=torch.float64) for r in replies)
    return LoadRecord(ModelIdentity(**first["model"]), list(first["layers"]), load)


def home(num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int) -> Placement:
    """The placement a server starts from without a placement file."""
    row = home_placement(num_experts, num_ranks, slots_per_rank)
    return Placement(row.expand(num_layers, -1).clone(), num_ranks)


def _record(args) -> int:
    request = urllib.request.Request(
        args.url.rstrip("/") + "/collective_rpc",
        data=json.dumps({"method": "wideep_load"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=args.timeout) as response:
        replies = json.loads(response.read())["results"]
    record = record_from_replies(replies)
    write_load(args.out, record)
    print(
        f"recorded {record.load.sum():.0f} expert choices over {len(record.layers)} layers "
        f"from {len(replies)} EP ranks -> {args.out}"
    )
    return 0


def _placement(args) -> int:
    record = read_load(args.load)
    num_experts = record.model.num_experts
    if num_experts % args.ep_size or args.redundant_experts % args.ep_size:
        raise SystemExit(
            f"--ep-size {args.ep_size} must divide the {num_experts} experts and "
            f"--redundant-experts {args.redundant_experts}"
        )
    slots_per_rank = (num_experts + args.redundant_experts) // args.ep_size
    before = home(len(record.layers), num_experts, args.ep_size, slots_per_rank)
    phy2log = plan_placement(record.load, args.ep_size, slots_per_rank)
    after = Placement(phy2log, args.ep_size)
    write_placement(args.out, PlacementRecord(record.model, record.layers, after))
    print(f"{'layer':<40} {'balancedness before':>20} {'after':>8}")
    for name, b, a in zip(
        record.layers,
        before.balancedness(record.load),
        after.balancedness(record.load),
        strict=True,
    ):
        print(f"{name:<40} {b:>20.3f} {a:>8.3f}")
    print(f"-> {args.out} ({args.ep_size} ranks x {slots_per_rank} slots)")
    return 0


def _heatmap(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = read_load(args.load)
    load = record.load.float()
    num_layers, num_experts = load.shape
    panels = [("expert load (tokens)", load, "expert")]
    if args.placement:
        placement_record = read_placement(args.placement)
        placement_record.model.check_matches(record.model, args.placement)
        after = placement_record.placement
        before = home(num_layers, num_experts, after.num_ranks, after.slots_per_rank)
        panels.append(("rank load, no placement", before.rank_load(load), "EP rank"))
        panels.append(("rank load, with placement", after.rank_load(load), "EP rank"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1 + 0.4 * num_layers))
    axes = [axes] if len(panels) == 1 else list(axes)
    vmax = max(float(p[1].max()) for p in panels[1:]) if len(panels) > 1 else None
    for ax, (title, data, xlabel) in zip(axes, panels, strict=True):
        image = ax.imshow(
            data.numpy(),
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=vmax if xlabel == "EP rank" else None,
        )
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_yticks(range(num_layers), [name.removesuffix(".experts") for name in record.layers])
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"-> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-wideep eplb",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    record = sub.add_parser("record", help="read the expert load of a running server")
    record.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    record.add_argument("--out", required=True, help="load file to write")
    record.add_argument("--timeout", type=float, default=60.0)
    record.set_defaults(run=_record)
    place = sub.add_parser("placement", help="turn a load file into a placement file")
    place.add_argument("--load", required=True)
    place.add_argument("--ep-size", type=int, required=True)
    place.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra slots per layer over all ranks (a multiple of --ep-size)",
    )
    place.add_argument("--out", required=True)
    place.set_defaults(run=_placement)
    heat = sub.add_parser("heatmap", help="draw expert and rank load as a PNG")
    heat.add_argument("--load", required=True)
    heat.add_argument("--placement", help="also draw rank load with this placement")
    heat.add_argument("--out", required=True, help="PNG file to write")
    heat.set_defaults(run=_heatmap)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
