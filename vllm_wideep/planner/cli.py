"""`vllm-wideep plan`: the capacity planner's command line.

    vllm-wideep plan [--model deepseek-r1] [--hardware gb200-nvl72] [--gpus 72] [--ep 8,16,32]
                     [--batch 1,2,4,...] [--isl 8192 --osl 1024 | --context 8704]
                     [--imbalance 1.1] [--mtp-tokens 1 --mtp-acceptance 0.85]
                     [--user-rate 100 | --tpot-target 10] [--png out.png] [--json out.json]
    vllm-wideep plan calibrate MEASUREMENTS.json [--hardware h200] [--out profile.json]
    vllm-wideep plan measure-cpu --out cpu_step_times.json [--arch qwen3_moe]
    vllm-wideep plan list

The first form prints the Pareto frontier of each EP size (and, with a user-rate target, the
best tokens/s per GPU of each EP size at that rate), writes the PNG and the JSON when asked.
A number out of its range (NaN and infinity included) is one line `vllm-wideep plan: error:
--FLAG VALUE: must be ...` giving the range, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vllm_wideep.planner.calibrate import calibrated_profile, fit_roofline, load_measurements
from vllm_wideep.planner.frontier import (
    DEFAULT_BATCHES,
    EPCurve,
    at_user_rate,
    default_ep_sizes,
    sweep,
)
from vllm_wideep.planner.hardware import BUILTIN_HARDWARE, HardwareProfile, load_hardware
from vllm_wideep.planner.model_shape import BUILTIN_CONFIGS, ModelShape, load_model_shape
from vllm_wideep.planner.perf_model import Deployment, StepEstimate, prefill_step
from vllm_wideep.planner.precision import PRECISIONS, Precision, load_precision


def _numbers(text: str, kind: type = int) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-wideep plan",
        description="Capacity planner: tokens/s per GPU against tokens/s per user, per EP size "
        "(docs/planner.md). Subcommands: calibrate, measure-cpu, list.",
    )
    p.add_argument(
        "--model",
        default="deepseek-r1",
        help=f"built-in ({', '.join(BUILTIN_CONFIGS)}) or a config.json / its folder",
    )
    p.add_argument(
        "--hardware",
        default="h200",
        help=f"built-in ({', '.join(BUILTIN_HARDWARE)}) or a JSON/YAML profile",
    )
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        help="number formats (default: the checkpoint's weight format)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs of the deployment (default: the largest EP size, else one NVLink domain)",
    )
    p.add_argument(
        "--ep",
        type=_numbers,
        help="EP sizes, comma-separated (default: the powers of two dividing --gpus, and --gpus)",
    )
    p.add_argument(
        "--batch",
        type=lambda s: _numbers(s, float),
        default=list(DEFAULT_BATCHES),
        help="batch sizes per GPU to sweep, comma-separated",
    )
    p.add_argument("--isl", type=float, default=1024, help="input tokens per request")
    p.add_argument("--osl", type=float, default=1024, help="output tokens per request")
    p.add_argument(
        "--context", type=float, help="mean KV length in decode, tokens (default: isl + osl / 2)"
    )
    p.add_argument(
        "--imbalance",
        type=float,
        default=1.0,
        help="max/mean (token, expert) rows over EP ranks, from the EPLB statistics",
    )
    p.add_argument("--mtp-tokens", type=int, default=0, help="MTP draft tokens per step")
    p.add_argument(
        "--mtp-acceptance",
        type=float,
        default=0.0,
        help="acceptance of each draft token given the earlier ones",
    )
    replicas = p.add_mutually_exclusive_group()
    replicas.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra expert slots in the EP group (EPLB replicas), for every EP size",
    )
    replicas.add_argument(
        "--extra-slots-per-gpu",
        type=int,
        default=0,
        help="EPLB replicas as extra slots on each GPU (TensorRT-LLM's 256 + EP slots: 1)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="fraction of min(compute, all-to-all) hidden by overlap (0: serial)",
    )
    p.add_argument(
        "--memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights and KV cache",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--user-rate", type=float, help="target tokens/s per user")
    target.add_argument(
        "--tpot-target", type=float, help="target time per output token, ms (= 1000 / user rate)"
    )
    p.add_argument(
        "--prefill-tokens",
        type=float,
        help="also estimate prefill with this many prompt tokens per GPU per step",
    )
    p.add_argument("--png", type=Path, help="write the frontier chart here")
    p.add_argument("--json", type=Path, help="write the frontier and the breakdowns here")
    return p


# --------------------------------------------------------------------------- plan

# Ranges of the numeric flags. The caps keep the sums finite and the sweep short; each is
# far beyond any real deployment (GB200 NVL72 racks: 72 GPUs; MTP: 1-3 draft tokens).
MAX_GPUS = 1_000_000
MAX_TOKENS = 1e9  # --isl, --osl, --context, --prefill-tokens, --batch
MAX_MTP_TOKENS = 64


def _check_number(
    flag: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError unless `value` is finite and within the range, which the message gives."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if math.isfinite(value) and above and below:
        return

    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if high == math.inf:
        allowed = f"{'>' if low_open else '>='} {show(low)}"
    else:
        allowed = (
            f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
        )
    kind = "an integer" if isinstance(value, int) else "a finite number"
    raise ValueError(f"{flag} {show(value)}: must be {kind} {allowed}")


def _check_plan_args(args: argparse.Namespace) -> None:
    """The ranges that need no model: every number finite, counts positive, fractions
    fractions. `--gpus 0` or `--user-rate 0` is refused, not taken as not given."""
    if args.gpus is not None:
        _check_number("--gpus", args.gpus, 1, MAX_GPUS)
    for ep in args.ep or ():
        _check_number("--ep", ep, 1, MAX_GPUS)
    for batch in args.batch:
        _check_number("--batch", batch, 0, MAX_TOKENS, low_open=True)
    if not args.batch:
        raise ValueError("--batch: give at least one batch size per GPU")
    _check_number("--isl", args.isl, 0, MAX_TOKENS)
    _check_number("--osl", args.osl, 0, MAX_TOKENS)
    if args.context is not None:
        _check_number("--context", args.context, 0, MAX_TOKENS)
    if args.prefill_tokens is not None:
        _check_number("--prefill-tokens", args.prefill_tokens, 0, MAX_TOKENS, low_open=True)
    _check_number("--imbalance", args.imbalance, 1)
    _check_number("--mtp-tokens", args.mtp_tokens, 0, MAX_MTP_TOKENS)
    _check_number("--mtp-acceptance", args.mtp_acceptance, 0, 1)
    _check_number("--redundant-experts", args.redundant_experts, 0)
    _check_number("--extra-slots-per-gpu", args.extra_slots_per_gpu, 0)
    _check_number("--overlap", args.overlap, 0, 1)
    _check_number("--memory-utilization", args.memory_utilization, 0, 1, low_open=True)
    if args.user_rate is not None:
        _check_number("--user-rate", args.user_rate, 0, low_open=True)
    if args.tpot_target is not None:
        _check_number("--tpot-target", args.tpot_target, 0, low_open=True)


def _check_replicas(args: argparse.Namespace, num_experts: int, widest_ep: int) -> None:
    """Replicas beyond one copy of every expert on every GPU of the widest EP size hold
    nothing new."""
    most = num_experts * (widest_ep - 1)
    if args.redundant_experts > most:
        raise ValueError(
            f"--redundant-experts {args.redundant_experts}: must be an integer in [0, {most}] "
            f"({num_experts} experts x (widest EP {widest_ep} - 1)), where every GPU already "
            f"holds every expert"
        )
    if args.extra_slots_per_gpu > num_experts:
        raise ValueError(
            f"--extra-slots-per-gpu {args.extra_slots_per_gpu}: must be an integer in "
            f"[0, {num_experts}] (the model's experts)"
        )


def _point(e: StepEstimate) -> dict[str, Any]:
    d = e.deployment
    return {
        "ep_size": d.ep_size,
        "batch_per_gpu": d.batch_per_gpu,
        "step_ms": e.step_s * 1e3,
        "tokens_per_s_per_user": e.tokens_per_s_per_user,
        "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu,
        "bottleneck": e.bottleneck,
        "weights_gb": e.weight_bytes / 1e9,
        "kv_gb": d.batch_per_gpu * e.kv_bytes_per_request / 1e9,
        "max_batch_per_gpu": e.max_batch_per_gpu,
        "expert_intensity_flop_per_byte": e.expert_intensity,
        "terms_ms": {t.name: t.seconds * 1e3 for t in e.terms},
    }


def _header(
    model: ModelShape, hw: HardwareProfile, prec: Precision, dep: Deployment, gpus: int
) -> str:
    mtp = (
        f"MTP {dep.mtp_tokens} draft(s) @ {dep.mtp_acceptance:g} "
        f"({dep.accepted_tokens_per_step:.2f} tokens/step)"
        if dep.mtp_tokens
        else "no MTP"
    )
    return (
        f"{model.name} ({model.total_params / 1e9:.0f}B, {model.num_experts} experts, "
        f"top-{model.top_k}) on {gpus} x {hw.name}, {prec.name}\n"
        f"context {dep.context_len:g} tokens, imbalance {dep.imbalance:g}, {mtp}, "
        f"overlap {dep.comm_overlap:g}"
    )


def _frontier_table(curves: Sequence[EPCurve], gpus: int) -> str:
    rows = [
        f"{'EP':>4} {'batch/GPU':>9} {'step ms':>8} {'tok/s/user':>10} {'tok/s/GPU':>10} "
        f"{'tok/s total':>11} {'mem GB':>7}  bottleneck"
    ]
    for curve in curves:
        if not curve.frontier:
            weights = curve.estimates[0].weight_bytes / 1e9
            rows.append(f"{curve.ep_size:>4}  does not fit: {weights:.0f} GB of weights per GPU")
            continue
        for e in curve.frontier:
            d = e.deployment
            mem = (e.weight_bytes + d.batch_per_gpu * e.kv_bytes_per_request) / 1e9
            rows.append(
                f"{d.ep_size:>4} {d.batch_per_gpu:>9g} {e.step_s * 1e3:>8.2f} "
                f"{e.tokens_per_s_per_user:>10.1f} {e.tokens_per_s_per_gpu:>10.0f} "
                f"{e.tokens_per_s_per_gpu * gpus:>11.0f} {mem:>7.1f}  {e.bottleneck}"
            )
    return "\n".join(rows)


def _target_table(at_rate: dict[int, StepEstimate | None], user_rate: float) -> str:
    rows = [
        f"at {user_rate:g} tokens/s per user:",
        f"{'EP':>4} {'batch/GPU':>9} {'tok/s/GPU':>10} {'vs smallest EP':>14}  bottleneck",
    ]
    reachable = {ep: e for ep, e in at_rate.items() if e is not None}
    base = reachable[min(reachable)].tokens_per_s_per_gpu if reachable else None
    for ep, e in at_rate.items():
        if e is None:
            rows.append(f"{ep:>4}  not reachable (even batch 1 is slower, or does not fit)")
            continue
        ratio = e.tokens_per_s_per_gpu / base if base else float("nan")
        note = " (memory-limited)" if e.tokens_per_s_per_user > user_rate * 1.001 else ""
        rows.append(
            f"{ep:>4} {e.deployment.batch_per_gpu:>9.1f} {e.tokens_per_s_per_gpu:>10.0f} "
            f"{ratio:>13.2f}x  {e.bottleneck}{note}"
        )
    if reachable:
        best = max(reachable.values(), key=lambda e: e.tokens_per_s_per_gpu)
        rows.append(f"best: EP {best.deployment.ep_size}")
    return "\n".join(rows)


def _plan(args: argparse.Namespace) -> int:
    _check_plan_args(args)
    model = load_model_shape(args.model)
    hw = load_hardware(args.hardware)
    prec = load_precision(args.precision or model.weight_dtype)
    ep_sizes = args.ep or default_ep_sizes(
        args.gpus if args.gpus is not None else hw.scale_up_domain
    )
    gpus = args.gpus if args.gpus is not None else max(ep_sizes)
    too_wide = [ep for ep in ep_sizes if ep > gpus]
    if too_wide:
        raise ValueError(f"EP sizes {too_wide} exceed --gpus {gpus}")
    _check_replicas(args, model.num_experts, max(ep_sizes))
    context = args.context if args.context is not None else args.isl + args.osl / 2
    template = Deployment(
        ep_size=ep_sizes[0],
        batch_per_gpu=1,
        context_len=context,
        imbalance=args.imbalance,
        mtp_tokens=args.mtp_tokens,
        mtp_acceptance=args.mtp_acceptance,
        redundant_experts=args.redundant_experts,
        extra_slots_per_gpu=args.extra_slots_per_gpu,
        comm_overlap=args.overlap,
        memory_utilization=args.memory_utilization,
    )
    curves = sweep(model, hw, prec, template, ep_sizes, args.batch)
    header = _header(model, hw, prec, template, gpus)
    print(header)
    print()
    print(_frontier_table(curves, gpus))

    user_rate = args.user_rate
    if args.tpot_target is not None:
        user_rate = 1000.0 / args.tpot_target
    at_rate: dict[int, StepEstimate | None] = {}
    if user_rate is not None:
        for ep in ep_sizes:
            at_rate[ep] = at_user_rate(model, hw, prec, replace(template, ep_size=ep), user_rate)
        print()
        print(_target_table(at_rate, user_rate))

    prefill: dict[int, StepEstimate] = {}
    if args.prefill_tokens is not None:
        print()
        print(
            f"prefill, {args.prefill_tokens:g} prompt tokens per GPU, prompts of "
            f"{args.isl:g} tokens:"
        )
        for ep in ep_sizes:
            dep = replace(
                template,
                ep_size=ep,
                batch_per_gpu=args.prefill_tokens,
                context_len=args.isl,
                mtp_tokens=0,
            )
            e = prefill_step(model, hw, prec, dep)
            prefill[ep] = e
            print(
                f"{ep:>4} {e.step_s * 1e3:>8.1f} ms  {e.tokens_per_s_per_gpu:>8.0f} "
                f"tok/s/GPU  {e.bottleneck}"
            )

    if args.png:
        from vllm_wideep.planner.plot import plot_frontier

        plot_frontier(curves, args.png, header, user_rate)
        print(f"\nwrote {args.png}")
    if args.json:
        doc = {
            "model": model.name,
            "hardware": asdict(hw),
            "precision": asdict(prec),
            "gpus": gpus,
            "deployment": {
                k: v for k, v in asdict(template).items() if k not in ("ep_size", "batch_per_gpu")
            },
            "curves": [
                {"ep_size": c.ep_size, "frontier": [_point(e) for e in c.frontier]} for c in curves
            ],
            "user_rate": user_rate,
            "at_user_rate": {str(ep): _point(e) if e else None for ep, e in at_rate.items()},
            "prefill": {str(ep): _point(e) for ep, e in prefill.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- subcommands


def _calibrate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vllm-wideep plan calibrate",
        description="Fit a hardware profile's bandwidth, FLOP/s and overhead to measurements "
        "(decode step times from measure-cpu, or grouped-GEMM benchmark results).",
    )
    p.add_argument("measurements", type=Path)
    p.add_argument(
        "--hardware",
        help="profile whose peaks the fit is relative to (default: "
        "the built-in named in the file's 'device', none for a CPU)",
    )
    p.add_argument(
        "--layout", default="contiguous", help="grouped GEMM: contiguous, batched or all"
    )
    p.add_argument("--name", help="name of the fitted profile")
    p.add_argument("--out", type=Path, help="write the fitted profile (JSON) here")
    args = p.parse_args(argv)

    kind, points, meta = load_measurements(
        args.measurements, None if args.layout == "all" else args.layout
    )
    base = load_hardware(args.hardware) if args.hardware else _builtin_for(meta.get("device"))
    fit = fit_roofline(points, max_bandwidth=base.memory_bandwidth if base else None)
    print(f"{args.measurements}: {kind}, {len(points)} points, device {meta.get('device', '?')}")
    print(
        f"  bandwidth  {fit.bandwidth / 1e9:10.1f} GB/s"
        + (
            " (held at the peak)"
            if fit.bandwidth_at_bound
            else ""
            if fit.bandwidth_determined
            else " (not determined)"
        )
    )
    print(
        f"  FLOP/s     {fit.flops / 1e12:10.3f} TFLOP/s"
        + ("" if fit.flops_determined else " (not determined: all points memory-bound)")
    )
    print(
        f"  overhead   {fit.overhead_s * 1e6:10.1f} us per "
        + ("step" if kind == "decode_step_times" else "call")
    )
    print(f"  rms relative error {fit.rms_relative_error:.3f}")
    print(f"  {'point':<34} {'measured ms':>11} {'fitted ms':>10}")
    for pt, pred in zip(points, fit.predicted_s, strict=True):
        print(f"  {pt.label:<34} {pt.measured_s * 1e3:>11.3f} {pred * 1e3:>10.3f}")
    name = args.name or f"{base.name if base else 'cpu'}-calibrated"
    profile = calibrated_profile(fit, kind, base, name)
    if base:
        print(
            f"  -> memory_efficiency {profile.memory_efficiency:.3f}, compute_efficiency "
            f"{profile.compute_efficiency:.3f} of {base.name}'s peaks"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _builtin_for(device: str | None) -> HardwareProfile | None:
    text = (device or "").lower().replace(" ", "")
    for name in sorted(BUILTIN_HARDWARE, key=len, reverse=True):
        if name.replace("-", "") in text.replace("-", ""):
            return BUILTIN_HARDWARE[name]
    return None


def _measure_cpu(argv: Sequence[str]) -> int:
    from vllm_wideep.planner.measure_cpu import DEFAULT_CPU_BATCHES, measure_cpu_step_times

    p = argparse.ArgumentParser(
        prog="vllm-wideep plan measure-cpu",
        description="Time a small model's decode step against batch size on this CPU "
        "(plain torch, the planner's op list, random bf16 weights).",
    )
    p.add_argument("--out", type=Path, required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--arch",
        default="qwen3_moe",
        help="a tiny model of vllm_wideep.tiny_models (needs transformers for its config)",
    )
    source.add_argument("--model", help="a config.json, a folder holding one, or a built-in")
    p.add_argument("--batch", type=_numbers, default=list(DEFAULT_CPU_BATCHES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for batch in args.batch:
        _check_number("--batch", batch, 1, MAX_TOKENS)
    _check_number("--repeats", args.repeats, 1)
    _check_number("--threads", args.threads, 1)
    if args.model:
        shape = load_model_shape(args.model)
    else:
        from vllm_wideep.planner.model_shape import shape_from_config
        from vllm_wideep.tiny_models import tiny_config

        config = json.loads(tiny_config(args.arch).to_json_string())
        shape = shape_from_config(config, name=f"tiny {args.arch}")
    data = measure_cpu_step_times(shape, args.batch, args.repeats, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for pt in data["points"]:
        print(f"batch {pt['batch']:>5}  {pt['step_s'] * 1e3:8.2f} ms")
    print(f"wrote {args.out}")
    return 0


def _list(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog="vllm-wideep plan list", description="Built-in hardware profiles and models."
    ).parse_args(argv)
    print("hardware:")
    for hw in BUILTIN_HARDWARE.values():
        print(
            f"  {hw.name:<12} {hw.memory_bytes / 1e9:5.0f} GB  {hw.memory_bandwidth / 1e12:4.2f} "
            f"TB/s  NVLink domain {hw.scale_up_domain:>2}  ({hw.source})"
        )
    print("models:")
    for name in BUILTIN_CONFIGS:
        m = load_model_shape(name)
        print(
            f"  {name:<17} {m.total_params / 1e9:5.0f}B  {m.num_experts} experts top-{m.top_k}"
            f"  {m.attention.kind}  weights {m.weight_dtype}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = {"calibrate": _calibrate, "measure-cpu": _measure_cpu, "list": _list}
    try:
        if argv and argv[0] in subcommands:
            return subcommands[argv[0]](argv[1:])
        return _plan(_plan_parser().parse_args(argv))
    except ValueError as err:
        message = " ".join(str(err).removeprefix("vllm_wideep: ").splitlines())
        print(f"vllm-wideep plan: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
