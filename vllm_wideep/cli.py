"""`vllm-wideep`: the project's command line (offline tools; serving is `vllm serve`).

    vllm-wideep plan ...          capacity planner: tokens/s per GPU against EP size
    vllm-wideep eplb ...          record expert load, write a placement file, draw heatmaps
    vllm-wideep tiny-model ...    write a tiny local MoE checkpoint

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only
routes to it, so `vllm-wideep --help` imports nothing heavy. A ValueError out of a subcommand
is bad input: one line `vllm-wideep SUB: error: MESSAGE` on stderr and exit code 2. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("vllm_wideep.planner.cli", "capacity planner: tokens/s per GPU against EP size"),
    "eplb": ("vllm_wideep.eplb.cli", "expert load: record, placement files, heatmaps"),
    "tiny-model": ("vllm_wideep.tiny_models", "write a tiny local MoE checkpoint"),
}


def _usage() -> str:
    lines = ["usage: vllm-wideep {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vllm-wideep: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ValueError as e:
        message = " ".join(str(e).removeprefix("vllm_wideep: ").splitlines())
        print(f"vllm-wideep {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
