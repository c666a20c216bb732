"""Fit a hardware profile's achieved bandwidth, FLOP/s and fixed overhead to measured times.

Model of one measured point ``i`` (a decode step, or one grouped-GEMM call), the planner's own
roofline with three unknowns::

    t_i = c0 + sum over ops j of max(bytes_ij / BW, flops_ij / F)

``bytes_ij`` and ``flops_ij`` come from the performance model (a step's terms) or from the
benchmark's formulas (grouped GEMM); ``BW`` (bytes/s), ``F`` (FLOP/s) and ``c0`` (s) are
fitted. Fitting minimises the squared relative error. For a fixed ridge ``r = F / BW`` the
model is linear in ``(c0, 1 / F)``::

    t_i = c0 + (1 / F) * g_i(r),   g_i(r) = sum_j max(bytes_ij * r, flops_ij)

so a scan over ``log10 r`` with a closed-form least-squares fit at each ``r`` (``c0 >= 0``),
refined by golden-section search, finds the optimum; it needs no SciPy.

Identifiability: if every op is memory-bound at the fitted ridge, ``F`` is not determined
(only ``BW`` is), and the other way round; ``CalibrationFit`` says which.

Two input formats (``load_measurements``):

* ``{"kind": "decode_step_times", "model_shape": <ModelShape fields> (or "model": a built-in
  name, a config.json path or an inline config), "precision": "bf16", "context_len": ctx,
  "ep_size": 1, "points": [{"batch": B, "step_s": t}, ...]}`` -- written by
  ``measure_cpu.py``; fits ``step_overhead``.
* the grouped-GEMM benchmark's results (``benchmarks/grouped_gemm.py --json``, e.g.
  ``docs/results/grouped_gemm_h200_tuned.json``): per call, bytes = active experts * 3HI *
  elem + 2 M H elem, FLOP = 6 H I rows (the benchmark's formulas); fits
  ``expert_call_overhead``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vllm_wideep.planner.hardware import HardwareProfile
from vllm_wideep.planner.model_shape import (
    AttentionShape,
    ModelShape,
    load_model_shape,
    shape_from_config,
)
from vllm_wideep.planner.perf_model import Deployment, decode_step
from vllm_wideep.planner.precision import load_precision

MeasurementKind = Literal["decode_step_times", "grouped_gemm"]

_LOG_RIDGE_RANGE = (-3.0, 6.0)  # FLOP per byte: 0.001 .. 1e6
_GRID_STEP = 0.01  # decades


@dataclass(frozen=True)
class CalibrationPoint:
    """One measurement: the roofline ops it consists of and the measured time."""

    ops: tuple[tuple[float, float], ...]  # (bytes, FLOP) per op
    measured_s: float
    label: str = ""


@dataclass(frozen=True)
class CalibrationFit:
    bandwidth: float  # achieved bytes/s
    flops: float  # achieved FLOP/s
    overhead_s: float  # fixed seconds per point
    rms_relative_error: float
    bandwidth_determined: bool  # some op is memory-bound at the fitted ridge
    flops_determined: bool  # some op is compute-bound at the fitted ridge
    predicted_s: tuple[float, ...]
    bandwidth_at_bound: bool = False  # BW was held at the given peak (see fit_roofline)


def _g(point: CalibrationPoint, ridge: float) -> float:
    return sum(max(nbytes * ridge, flops) for nbytes, flops in point.ops)


def _solve(points: Sequence[CalibrationPoint], ridge: float) -> tuple[float, float, float]:
    """(c0, 1/F, relative squared error) at ``ridge``; c0 >= 0, 1/F > 0 (inf error if not)."""
    # Rows of the weighted system: [1/t, g/t] @ [c0, x] ~ 1.
    a = [1.0 / p.measured_s for p in points]
    b = [_g(p, ridge) / p.measured_s for p in points]
    saa = sum(u * u for u in a)
    sab = sum(u * v for u, v in zip(a, b, strict=True))
    sbb = sum(v * v for v in b)
    sa, sb = sum(a), sum(b)
    det = saa * sbb - sab * sab
    c0, x = -1.0, -1.0
    if det > 1e-12 * saa * sbb:
        c0 = (sa * sbb - sb * sab) / det
        x = (saa * sb - sab * sa) / det
    if c0 < 0 or x <= 0:
        c0, x = 0.0, sb / sbb if sbb > 0 else -1.0
    if x <= 0:
        return 0.0, 0.0, math.inf
    err = sum((c0 * u + x * v - 1.0) ** 2 for u, v in zip(a, b, strict=True))
    return c0, x, err


def _best_log_ridge(error_at: Callable[[float], float]) -> float:
    """argmin over log10 ridge: a grid scan, then golden-section inside the best cell."""
    lo, hi = _LOG_RIDGE_RANGE
    steps = round((hi - lo) / _GRID_STEP)
    grid = [lo + i * _GRID_STEP for i in range(steps + 1)]
    errors = [error_at(10**g) for g in grid]
    best = min(range(len(grid)), key=lambda i: errors[i])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - golden * (b - a), a + golden * (b - a)
        if error_at(10**c) <= error_at(10**d):
            b = d
        else:
            a = c
    refined = 0.5 * (a + b)
    return refined if error_at(10**refined) <= errors[best] else grid[best]


def _solve_fixed_bandwidth(
    points: Sequence[CalibrationPoint], bandwidth: float, ridge: float
) -> tuple[float, float]:
    """(c0, relative squared error) with BW fixed and F = ridge * BW; c0 >= 0."""
    flops = ridge * bandwidth
    h = [sum(max(nb / bandwidth, fl / flops) for nb, fl in p.ops) for p in points]
    w = [1.0 / p.measured_s**2 for p in points]
    c0 = sum((p.measured_s - hi) * wi for p, hi, wi in zip(points, h, w, strict=True)) / sum(w)
    c0 = max(0.0, c0)
    err = sum(((c0 + hi) / p.measured_s - 1.0) ** 2 for p, hi in zip(points, h, strict=True))
    return c0, err


def fit_roofline(
    points: Sequence[CalibrationPoint], max_bandwidth: float | None = None
) -> CalibrationFit:
    """Least-squares fit of ``(BW, F, c0)`` to the points (see the module docstring).

    ``max_bandwidth`` (the profile's peak): if the free fit lands above it -- the overhead
    and the bandwidth trade off when every point moves about the same bytes -- the fit is
    redone with ``BW = max_bandwidth`` and ``bandwidth_at_bound`` is set."""
    if len(points) < 3:
        raise ValueError(f"need >= 3 measured points to fit 3 parameters, got {len(points)}")
    for p in points:
        if p.measured_s <= 0 or not p.ops:
            raise ValueError(f"point {p.label!r}: needs ops and a measured time > 0")

    ridge = 10 ** _best_log_ridge(lambda r: _solve(points, r)[2])
    c0, x, err = _solve(points, ridge)
    if not math.isfinite(err):
        raise ValueError("no fit with a non-negative overhead and a positive FLOP/s")
    flops = 1.0 / x
    bandwidth = flops / ridge
    at_bound = False
    if max_bandwidth is not None and bandwidth > max_bandwidth:
        bandwidth, at_bound = max_bandwidth, True
        ridge = 10 ** _best_log_ridge(lambda r: _solve_fixed_bandwidth(points, bandwidth, r)[1])
        c0, err = _solve_fixed_bandwidth(points, bandwidth, ridge)
        flops = ridge * bandwidth
    predicted = tuple(c0 + sum(max(nb / bandwidth, fl / flops) for nb, fl in p.ops) for p in points)
    memory_bound = any(nb * ridge >= fl for p in points for nb, fl in p.ops if nb > 0)
    compute_bound = any(fl > nb * ridge for p in points for nb, fl in p.ops if fl > 0)
    return CalibrationFit(
        bandwidth=bandwidth,
        flops=flops,
        overhead_s=c0,
        rms_relative_error=math.sqrt(err / len(points)),
        bandwidth_determined=memory_bound and not at_bound,
        flops_determined=compute_bound,
        predicted_s=predicted,
        bandwidth_at_bound=at_bound,
    )


# --------------------------------------------------------------------------- inputs


def _step_time_points(data: dict[str, Any]) -> tuple[list[CalibrationPoint], ModelShape]:
    if "model_shape" in data:
        fields = dict(data["model_shape"])
        fields["attention"] = AttentionShape(**fields["attention"])
        model = ModelShape(**fields)
    elif isinstance(data.get("model"), dict):
        model = shape_from_config(data["model"], name=data.get("model_name"))
    else:
        model = load_model_shape(data["model"])
    prec = load_precision(data.get("precision", "bf16"))
    context = float(data.get("context_len", 1))
    ep = int(data.get("ep_size", 1))
    # Any profile gives the same bytes and FLOP per term; only they are used here.
    probe = _probe_profile()
    points = []
    for row in data["points"]:
        dep = Deployment(ep_size=ep, batch_per_gpu=float(row["batch"]), context_len=context)
        est = decode_step(model, probe, prec, dep)
        ops = tuple((t.bytes, t.flops) for t in est.terms if t.bound in ("memory", "compute"))
        points.append(CalibrationPoint(ops, float(row["step_s"]), f"batch {row['batch']}"))
    return points, model


def _grouped_gemm_points(
    data: dict[str, Any], layout: str | None = "contiguous"
) -> list[CalibrationPoint]:
    shape = data["model"]
    hidden, inter = int(shape["H"]), int(shape["I"])
    elem = 2 if "16" in str(data.get("dtype", "bfloat16")) else 4
    points = []
    for r in data["results"]:
        if layout is not None and r.get("layout") != layout:
            continue
        weight_bytes = r["active_experts"] * 3 * hidden * inter * elem
        act_bytes = 2 * r["tokens"] * hidden * elem
        flops = 6 * hidden * inter * r["rows"]
        label = f"ep {r['ep']} batch {r['batch_per_rank']} {r.get('layout', '')}".strip()
        points.append(CalibrationPoint(((weight_bytes + act_bytes, flops),), r["ms"] / 1e3, label))
    return points


def load_measurements(
    path: str | Path, layout: str | None = "contiguous"
) -> tuple[MeasurementKind, list[CalibrationPoint], dict[str, Any]]:
    """Read a measurement file (either format); returns its kind, points and metadata."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "decode_step_times":
        points, model = _step_time_points(data)
        meta = {k: v for k, v in data.items() if k not in ("points", "model", "model_shape")}
        meta["model_name"] = data.get("model_name", model.name)
        return "decode_step_times", points, meta
    if isinstance(data.get("results"), list) and "model" in data:
        points = _grouped_gemm_points(data, layout)
        meta = {k: v for k, v in data.items() if k != "results"}
        return "grouped_gemm", points, meta
    raise ValueError(
        f"{path}: neither decode step times (kind = 'decode_step_times') nor grouped-GEMM "
        "benchmark results (a 'results' list)"
    )


def _probe_profile() -> HardwareProfile:
    return HardwareProfile(
        name="probe",
        memory_bytes=1e15,
        memory_bandwidth=1e12,
        bf16_flops=1e15,
        fp8_flops=1e15,
        fp4_flops=1e15,
        scale_up_domain=1,
        scale_up_bandwidth=1e12,
        scale_out_bandwidth=1e12,
        step_overhead=0.0,
    )


# --------------------------------------------------------------------------- outputs


def calibrated_profile(
    fit: CalibrationFit,
    kind: MeasurementKind,
    base: HardwareProfile | None,
    name: str,
    dtype: str = "bf16",
) -> HardwareProfile:
    """A profile with the fitted numbers.

    With ``base``: its peaks stay, efficiencies become fitted / peak (capped at 1), and the
    overhead goes to ``step_overhead`` (step times) or ``expert_call_overhead`` (grouped
    GEMM). A parameter the data does not determine keeps the base's value. Without
    ``base`` (a CPU): the fitted numbers become the peaks, with efficiencies of 1."""
    overhead_field = "step_overhead" if kind == "decode_step_times" else "expert_call_overhead"
    source = f"calibrated: {kind}, rms relative error {fit.rms_relative_error:.3f}"
    if base is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return HardwareProfile(
            name=name,
            memory_bytes=float(memory),
            memory_bandwidth=fit.bandwidth,
            bf16_flops=fit.flops,
            fp8_flops=fit.flops,
            fp4_flops=0.0,
            scale_up_domain=1,
            scale_up_bandwidth=0.0,
            scale_out_bandwidth=0.0,
            memory_efficiency=1.0,
            compute_efficiency=1.0,
            source=source,
            **{overhead_field: fit.overhead_s},
        )
    changes: dict[str, Any] = {"name": name, "source": source, overhead_field: fit.overhead_s}
    if fit.bandwidth_determined or fit.bandwidth_at_bound:
        changes["memory_efficiency"] = min(1.0, fit.bandwidth / base.memory_bandwidth)
    if fit.flops_determined:
        changes["compute_efficiency"] = min(1.0, fit.flops / base.flops_per_s(dtype))
    return dataclasses.replace(base, **changes)
