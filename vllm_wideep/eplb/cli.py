"""`vllm-wideep eplb`: from a running server's expert load to a placement file.

    vllm-wideep eplb record --url http://127.0.0.1:8000 --out load.json
        sums every EP rank's load window (the server needs VLLM_SERVER_DEV_MODE=1 for
        POST /collective_rpc) into a load file
    vllm-wideep eplb placement --load load.json --ep-size 2 --redundant-experts 2 --out p.json
        plans a placement (`plan_placement`) and prints rank balance before and after
    vllm-wideep eplb heatmap --load load.json [--placement p.json] --out load.png
        draws expert load per layer, and rank load without and with the placement

Then `vllm serve MODEL --enable-wideep --wideep-placement p.json ...` starts from it.

Bad input (a flag out of range, a bad file, a server that is down or answers something
else, a reply not complete within --timeout) is one line `vllm-wideep eplb: error: ...`
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import reprlib
import socket
import sys
import threading
import time
import urllib.parse

import torch

from vllm_wideep.eplb.files import (
    LoadRecord,
    ModelIdentity,
    PlacementRecord,
    load_from_dict,
    read_load,
    read_placement,
    write_load,
    write_placement,
)
from vllm_wideep.eplb.location import home_placement
from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.policy import plan_placement


def record_from_replies(replies: list[dict]) -> LoadRecord:
    """Per-rank `wideep_load` replies -> one load record, summed over ranks.

    Every reply must be a load record (`load_from_dict`) of the same model and the same
    layers, in the same order, and the replies must come from EP ranks 0..R-1 once each;
    anything else is a ValueError saying which rank differs and how."""
    if not isinstance(replies, list) or not replies:
        raise ValueError(
            f"vllm_wideep: the server returned no wideep_load replies (got {_short(replies)})"
        )
    records, ranks, num_ranks = [], [], []
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            raise ValueError(
                f"vllm_wideep: wideep_load reply {i} is {_short(reply)}, not an object"
            )
        for key in ("ep_rank", "num_ranks"):
            value = reply.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"vllm_wideep: wideep_load reply {i}: '{key}' must be an integer >= 0, "
                    f"got {_short(value)}"
                )
        ranks.append(reply["ep_rank"])
        num_ranks.append(reply["num_ranks"])
        records.append(load_from_dict(reply, f"wideep_load reply of EP rank {reply['ep_rank']}"))
    if len(set(num_ranks)) != 1:
        raise ValueError(f"vllm_wideep: the EP ranks disagree on the EP size: {sorted(num_ranks)}")
    if sorted(ranks) != list(range(num_ranks[0])):
        raise ValueError(
            f"vllm_wideep: got load from EP ranks {sorted(ranks)}, expected all of "
            f"0..{num_ranks[0] - 1} once each"
        )
    first = records[0]
    for rank, rec in zip(ranks, records, strict=True):
        if rec.model != first.model:
            raise ValueError(
                f"vllm_wideep: EP rank {rank} reports model {rec.model}, EP rank {ranks[0]} "
                f"reports {first.model}"
            )
        if rec.layers != first.layers:
            raise ValueError(
                f"vllm_wideep: EP rank {rank} reports layers {_short(rec.layers)}, EP rank "
                f"{ranks[0]} reports {_short(first.layers)}; their loads cannot be summed"
            )
    load = torch.stack([rec.load for rec in records]).sum(dim=0)
    return LoadRecord(first.model, list(first.layers), load)


def _short(value) -> str:
    """`repr` cut to a line, for messages about values of any size."""
    return reprlib.repr(value)


def home(num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int) -> Placement:
    """The placement a server starts from without a placement file."""
    row = home_placement(num_experts, num_ranks, slots_per_rank)
    return Placement(row.expand(num_layers, -1).clone(), num_ranks)


def fetch(url: str, body: bytes | None, timeout: float, path: str = "/collective_rpc") -> bytes:
    """POST `body` (JSON) to `url` + `path`, or GET it when `body` is None; the reply's
    body, or a ValueError saying why not.

    `timeout` is a deadline for the whole exchange, not per read: a watchdog shuts the
    socket at the deadline, so a server that drips bytes cannot keep it open."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"vllm_wideep: --url {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"vllm_wideep: --url {url!r} must be http(s)://HOST[:PORT][/PATH]")
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(parts.hostname, port, timeout=timeout)
    deadline = time.monotonic() + timeout
    expired = threading.Event()

    sockets: list[socket.socket] = []  # the connection drops its own once headers say close

    def expire() -> None:
        expired.set()
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    late = f"vllm_wideep: no complete reply from {url} within --timeout {timeout:g} s"
    connected = False
    try:
        conn.connect()
        connected = True
        sockets.append(conn.sock)
        watchdog.interval = max(0.0, deadline - time.monotonic())
        watchdog.start()
        conn.request(
            "GET" if body is None else "POST",
            parts.path.rstrip("/") + path,
            body=body,
            headers={} if body is None else {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise ValueError(late) from None
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if not connected:
            raise ValueError(f"vllm_wideep: cannot reach {url}: {reason}") from None
        raise ValueError(f"vllm_wideep: the exchange with {url} failed: {reason}") from None
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():
        raise ValueError(late)
    if response.status != 200:
        excerpt = " ".join(data.decode("utf-8", "replace").split())[:200]
        hint = (
            " (POST /collective_rpc needs a server started with VLLM_SERVER_DEV_MODE=1)"
            if response.status == 404
            else ""
        )
        raise ValueError(
            f"vllm_wideep: {url} answered HTTP {response.status} {response.reason}{hint}: "
            f"{excerpt!r}"
        )
    return data


def replies_from(data: bytes, url: str) -> list:
    """The `results` list of a `/collective_rpc` reply body."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(
            f"vllm_wideep: the reply from {url} is not JSON ({type(e).__name__}): "
            f"{_short(data[:80])}"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError(f"vllm_wideep: the reply from {url} has no 'results' list: {_short(doc)}")
    return doc["results"]


def record_from_metrics(text: str, url: str) -> LoadRecord:
    """A server's `/metrics` page -> the load record of its `vllm_wideep:expert_load`
    (already summed over EP ranks) and `vllm_wideep:model_info`."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except ValueError as e:
        raise ValueError(f"vllm_wideep: {url}/metrics is not a Prometheus page: {e}") from None
    info = families.get("vllm_wideep:model_info")
    if info is None or not info.samples:
        raise ValueError(
            f"vllm_wideep: {url}/metrics has no vllm_wideep:model_info: is the server running "
            f"with --enable-wideep?"
        )
    labels = info.samples[0].labels
    model = ModelIdentity.from_dict(
        {
            "architecture": labels.get("architecture"),
            "num_experts": _integer(labels.get("num_experts")),
            "hidden_size": _integer(labels.get("hidden_size")),
        },
        f"{url}/metrics",
    )
    per_layer: dict[str, dict[int, float]] = {}
    load_family = families.get("vllm_wideep:expert_load")
    for sample in load_family.samples if load_family is not None else []:
        expert = _integer(sample.labels.get("expert"))
        per_layer.setdefault(sample.labels.get("layer", ""), {})[expert] = sample.value
    if not per_layer:
        raise ValueError(
            f"vllm_wideep: {url}/metrics has no expert load yet (workers publish every 16 "
            f"engine steps): send some requests first"
        )
    layers = sorted(per_layer, key=_natural_key)
    experts = list(range(model.num_experts))
    for layer in layers:
        if sorted(per_layer[layer]) != experts:
            raise ValueError(
                f"vllm_wideep: {url}/metrics has the load of experts {sorted(per_layer[layer])} "
                f"for {layer}, expected 0..{model.num_experts - 1}"
            )
    load = torch.tensor([[per_layer[layer][e] for e in experts] for layer in layers])
    return LoadRecord(model, layers, load.double())


def _integer(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _natural_key(name: str) -> list:
    """`model.layers.10.mlp.experts` after `model.layers.9...`."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _record(args) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout {args.timeout:g}: must be a finite number of seconds > 0")
    if args.source == "metrics":
        page = fetch(args.url, None, args.timeout, path="/metrics")
        record = record_from_metrics(page.decode("utf-8", "replace"), args.url)
        source = "/metrics (summed over EP ranks)"
    else:
        body = json.dumps({"method": "wideep_load"}).encode()
        replies = replies_from(fetch(args.url, body, args.timeout), args.url)
        record = record_from_replies(replies)
        source = f"{len(replies)} EP ranks"
    write_load(args.out, record)
    print(
        f"recorded {record.load.sum():.0f} expert choices over {len(record.layers)} layers "
        f"from {source} -> {args.out}"
    )
    return 0


def _placement(args) -> int:
    ep_size, redundant = args.ep_size, args.redundant_experts
    if ep_size < 1:
        raise ValueError(f"--ep-size {ep_size}: must be >= 1 (EP ranks)")
    if redundant < 0:
        raise ValueError(f"--redundant-experts {redundant}: must be >= 0")
    record = read_load(args.load)
    num_experts = record.model.num_experts
    if num_experts % ep_size:
        raise ValueError(
            f"--ep-size {ep_size} must divide the {num_experts} experts of {args.load}"
        )
    most = num_experts * (ep_size - 1)  # then every rank holds every expert once
    if redundant > most:
        raise ValueError(
            f"--redundant-experts {redundant}: must be at most {most} = {num_experts} experts "
            f"x (--ep-size {ep_size} - 1), where every rank already holds every expert"
        )
    if redundant % ep_size:
        raise ValueError(
            f"--redundant-experts {redundant} must be a multiple of --ep-size {ep_size}"
        )
    slots_per_rank = (num_experts + redundant) // ep_size
    before = home(len(record.layers), num_experts, ep_size, slots_per_rank)
    phy2log = plan_placement(record.load, ep_size, slots_per_rank)
    after = Placement(phy2log, ep_size)
    write_placement(args.out, PlacementRecord(record.model, record.layers, after))
    print(f"{'layer':<40} {'balancedness before':>20} {'after':>8}")
    for name, b, a in zip(
        record.layers,
        before.balancedness(record.load),
        after.balancedness(record.load),
        strict=True,
    ):
        print(f"{name:<40} {b:>20.3f} {a:>8.3f}")
    print(f"-> {args.out} ({ep_size} ranks x {slots_per_rank} slots)")
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
    try:
        fig.savefig(args.out, dpi=100)
    except OSError as e:
        raise ValueError(f"cannot write {args.out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
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
    record.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds for the whole exchange with the server (default 60)",
    )
    record.add_argument(
        "--source",
        choices=["metrics", "rpc"],
        default="metrics",
        help="'metrics': GET /metrics (vllm_wideep:expert_load, published every 16 steps); "
        "'rpc': POST /collective_rpc wideep_load, the load window as of now (needs "
        "VLLM_SERVER_DEV_MODE=1, which exposes every worker method without authentication)",
    )
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
        message = " ".join(str(e).removeprefix("vllm_wideep: ").splitlines())
        print(f"vllm-wideep eplb: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
