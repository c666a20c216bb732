"""Hardware profiles: what one GPU and its links can do, as peak numbers and achieved fractions.

A profile is per GPU. Bandwidths are one direction (a link of "1.8 TB/s bidirectional" is
900 GB/s here); FLOP/s are dense (no 2:4 sparsity). The planner never uses a peak number
alone: every term multiplies it by the profile's efficiency for that resource, so

    achieved HBM bandwidth   = memory_bandwidth * memory_efficiency          bytes/s
    achieved FLOP/s (dtype)  = flops_per_s(dtype) * compute_efficiency       FLOP/s
    achieved link bandwidth  = scale_up/out_bandwidth * network_efficiency   bytes/s

Built-in profiles (``BUILTIN_HARDWARE``), spec-sheet numbers per GPU:

=============  =======  =========  ======  ======  ======  ===========  ==========  ========
name           HBM GB   HBM TB/s   BF16    FP8     FP4     NVLink GB/s  NVLink      NIC GB/s
                                   PF/s    PF/s    PF/s    (one dir.)   domain      (one dir)
=============  =======  =========  ======  ======  ======  ===========  ==========  ========
h100           80       3.35       0.989   1.979   -       450          8           50
h800           80       3.35       0.989   1.979   -       200          8           50
h200           141      4.8        0.989   1.979   -       450          8           50
b200           180      8.0        2.25    4.5     9.0     900          8           50
gb200-nvl72    186      8.0        2.5     5.0     10.0    900          72          50
=============  =======  =========  ======  ======  ======  ===========  ==========  ========

Sources: NVIDIA H100 / H200 datasheets (SXM; the sheets' FP8 and BF16 numbers are "with
sparsity", halved here), the HGX B200 and GB200 NVL72 product pages (NVL72: 13.4 TB HBM3e,
576 TB/s, 130 TB/s NVLink, 720 PF FP4 dense for 72 GPUs), DeepSeek's DeepEP README for the
H800 (NVLink 400 GB/s bidirectional, about 160 GB/s achieved; one 400 Gb/s CX7 NIC per GPU).
Every NIC is 400 Gb/s = 50 GB/s one direction.

Efficiencies, one set for every built-in profile (see docs/planner.md, "Assumptions"):

    memory_efficiency  0.80   TensorRT-LLM's own estimates use "8 TB/s * efficiency 0.8"
                              (tech blog 14); our H200 copy benchmark reaches 0.885 and our
                              Triton grouped GEMM 0.63-0.79 of peak (docs/results)
    compute_efficiency 0.65   DeepGEMM FP8 grouped GEMM 1093-1297 of 1979 TFLOP/s on H800
                              (0.55-0.66); FlashMLA about 660 of 989 TFLOP/s (0.67)
    network_efficiency 0.80   DeepEP: 153-158 GB/s of the H800's ~200 GB/s NVLink, 38-40 of
                              50 GB/s RDMA (low-latency kernels), 726-740 of 900 GB/s on
                              SM100 NVLink
    scale_up_latency   10 us  per all-to-all inside an NVLink domain (assumed)
    scale_out_latency  20 us  per all-to-all that crosses the network (assumed)
    step_overhead      1 ms   per decode step: scheduling, sampling, kernel gaps (assumed)
    expert_call_overhead 0    per grouped-GEMM call beyond its roofline (tuned kernels)

`vllm-wideep plan calibrate` fits the efficiencies and the overheads to measurements: step
overhead from decode step times, expert call overhead from grouped-GEMM benchmark results.

User profiles: a JSON or YAML file with the fields of `HardwareProfile` (SI units), and
optionally ``base: <built-in name>`` to start from a built-in and override some fields::

    {"base": "h200", "name": "h200-measured", "memory_efficiency": 0.72}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

ComputeDtype = Literal["bf16", "fp8", "fp4"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)

GB = 1e9
TB = 1e12
PFLOP = 1e15
US = 1e-6


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU of a cluster, its links, and the fractions of peak the planner assumes.

    Units: bytes, bytes/s (one direction), FLOP/s (dense), seconds.
    """

    name: str
    memory_bytes: float
    memory_bandwidth: float
    bf16_flops: float
    fp8_flops: float
    fp4_flops: float  # 0: no FP4 tensor cores, FP4 weights run at the FP8 rate
    scale_up_domain: int  # GPUs that reach each other over NVLink (8: one HGX node)
    scale_up_bandwidth: float
    scale_out_bandwidth: float
    scale_up_latency: float = 10 * US
    scale_out_latency: float = 20 * US
    memory_efficiency: float = 0.80
    compute_efficiency: float = 0.65
    network_efficiency: float = 0.80
    step_overhead: float = 1e-3
    expert_call_overhead: float = 0.0  # fixed time per grouped-GEMM call (per MoE layer)
    source: str = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("name", "source"):
                continue
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"hardware {self.name!r}: {field.name} = {value!r} is not >= 0")
        for field in ("memory_efficiency", "compute_efficiency", "network_efficiency"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise ValueError(f"hardware {self.name!r}: {field} = {value} is not in (0, 1]")
        if self.scale_up_domain < 1:
            raise ValueError(f"hardware {self.name!r}: scale_up_domain must be >= 1")

    def flops_per_s(self, dtype: str) -> float:
        """Peak dense FLOP/s for GEMMs with ``dtype`` operands; FP4 falls back to FP8."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {COMPUTE_DTYPES}")
        if dtype == "fp4" and self.fp4_flops > 0:
            return self.fp4_flops
        if dtype in ("fp4", "fp8"):
            return self.fp8_flops
        return self.bf16_flops

    def achieved_flops(self, dtype: str) -> float:
        """FLOP/s the planner assumes a large GEMM reaches."""
        return self.flops_per_s(dtype) * self.compute_efficiency

    @property
    def achieved_memory_bandwidth(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NIC_400G = 50 * GB

BUILTIN_HARDWARE: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            name="h100",
            memory_bytes=80 * GB,
            memory_bandwidth=3.35 * TB,
            bf16_flops=0.989 * PFLOP,
            fp8_flops=1.979 * PFLOP,
            fp4_flops=0.0,
            scale_up_domain=8,
            scale_up_bandwidth=450 * GB,
            scale_out_bandwidth=_NIC_400G,
            source="NVIDIA H100 SXM5 datasheet; NVLink 4 900 GB/s bidirectional",
        ),
        HardwareProfile(
            name="h800",
            memory_bytes=80 * GB,
            memory_bandwidth=3.35 * TB,
            bf16_flops=0.989 * PFLOP,
            fp8_flops=1.979 * PFLOP,
            fp4_flops=0.0,
            scale_up_domain=8,
            scale_up_bandwidth=200 * GB,
            scale_out_bandwidth=_NIC_400G,
            source="H100 SXM5 compute and HBM; NVLink 400 GB/s bidirectional and one "
            "400 Gb/s CX7 per GPU (DeepEP README)",
        ),
        HardwareProfile(
            name="h200",
            memory_bytes=141 * GB,
            memory_bandwidth=4.8 * TB,
            bf16_flops=0.989 * PFLOP,
            fp8_flops=1.979 * PFLOP,
            fp4_flops=0.0,
            scale_up_domain=8,
            scale_up_bandwidth=450 * GB,
            scale_out_bandwidth=_NIC_400G,
            source="NVIDIA H200 SXM datasheet",
        ),
        HardwareProfile(
            name="b200",
            memory_bytes=180 * GB,
            memory_bandwidth=8.0 * TB,
            bf16_flops=2.25 * PFLOP,
            fp8_flops=4.5 * PFLOP,
            fp4_flops=9.0 * PFLOP,
            scale_up_domain=8,
            scale_up_bandwidth=900 * GB,
            scale_out_bandwidth=_NIC_400G,
            source="NVIDIA HGX B200 datasheet; NVLink 5 1.8 TB/s bidirectional",
        ),
        HardwareProfile(
            name="gb200-nvl72",
            memory_bytes=186 * GB,
            memory_bandwidth=8.0 * TB,
            bf16_flops=2.5 * PFLOP,
            fp8_flops=5.0 * PFLOP,
            fp4_flops=10.0 * PFLOP,
            scale_up_domain=72,
            scale_up_bandwidth=900 * GB,
            scale_out_bandwidth=_NIC_400G,
            source="NVIDIA GB200 NVL72 product page, per GPU (totals / 72)",
        ),
    )
}


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by name, or a profile from a JSON/YAML file (see module docstring)."""
    key = str(name_or_path)
    if key.lower() in BUILTIN_HARDWARE:
        return BUILTIN_HARDWARE[key.lower()]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown hardware {key!r}: neither a built-in profile "
            f"({', '.join(BUILTIN_HARDWARE)}) nor a file"
        )
    return hardware_from_dict(_read_mapping(path), origin=str(path))


def hardware_from_dict(fields: dict[str, Any], origin: str = "<dict>") -> HardwareProfile:
    """A profile from a field mapping; ``base`` names a built-in profile to override."""
    fields = dict(fields)
    base_name = fields.pop("base", None)
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{origin}: unknown hardware fields {unknown}; known: {sorted(known)}")
    if base_name is not None:
        if str(base_name).lower() not in BUILTIN_HARDWARE:
            raise ValueError(
                f"{origin}: base {base_name!r} is not a built-in profile "
                f"({', '.join(BUILTIN_HARDWARE)})"
            )
        base = BUILTIN_HARDWARE[str(base_name).lower()]
        return dataclasses.replace(base, **fields)
    missing = sorted(
        f.name
        for f in dataclasses.fields(HardwareProfile)
        if f.default is dataclasses.MISSING and f.name not in fields
    )
    if missing:
        raise ValueError(f"{origin}: missing hardware fields {missing} (or give a 'base')")
    return HardwareProfile(**fields)


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only user profiles in YAML need PyYAML

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ValueError(f"{path}: expected a mapping of hardware fields, got {kind}")
    return data
