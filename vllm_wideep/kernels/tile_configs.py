"""Tile configurations for the expert GEMMs: defaults by shape, tuned tables per GPU.

A tuned table lives in ``configs/<device>.json`` where ``<device>`` is
``torch.cuda.get_device_name()`` normalised (``"NVIDIA H200"`` -> ``NVIDIA_H200``), the way
vLLM names its fused_moe configs. Layout, written by ``python -m vllm_wideep.kernels.autotune``::

    {"H=7168,I=2048": {"16": {"BLOCK_M": 16, "gate_up": {...}, "down": {...}}, "512": {...}}}

The inner key is rows per expert (``M * k / E``, known on the host without a sync); a lookup
takes the nearest tuned key, as vLLM does. ``BLOCK_M`` is shared by both GEMMs because it
fixes the tile schedule; each GEMM has its own ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``,
``num_warps`` and ``num_stages``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def device_config_name(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def shape_key(hidden_size: int, intermediate_size: int) -> str:
    return f"H={hidden_size},I={intermediate_size}"


def default_config(rows_per_expert: float, hidden_size: int, intermediate_size: int) -> dict:
    """Sound tiles without tuning.

    Few rows per expert (decode) are bound by reading weights: a short BLOCK_M wastes no
    MMA rows and many N-tiles spread the weight read over all SMs. Many rows (prefill) are
    compute bound: 128-row tiles and GROUP_M swizzling keep weight tiles hot in L2.
    """
    if rows_per_expert <= 16:
        block_m, gate_up, down = 16, (64, 128, 1, 4, 4), (64, 128, 1, 4, 4)
    elif rows_per_expert <= 64:
        block_m, gate_up, down = 64, (64, 64, 8, 4, 4), (128, 64, 8, 4, 4)
    else:
        block_m, gate_up, down = 128, (64, 64, 8, 8, 4), (128, 64, 8, 8, 4)
    return {
        "BLOCK_M": block_m,
        "gate_up": _fit(dict(zip(GEMM_KEYS, gate_up, strict=True)), intermediate_size, hidden_size),
        "down": _fit(dict(zip(GEMM_KEYS, down, strict=True)), hidden_size, intermediate_size),
    }


def _fit(cfg: dict, n: int, k: int) -> dict:
    """Shrink tiles to tiny problems (tests, CPU interpreter); tl.dot needs >= 16."""
    cfg = dict(cfg)
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], _next_pow2(n)))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], _next_pow2(k)))
    return cfg


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def load_table(device_name: str) -> dict:
    """The tuned table for a GPU, ``{}`` when none was written."""
    path = CONFIG_DIR / f"{device_config_name(device_name)}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def get_config(
    rows_per_expert: float, hidden_size: int, intermediate_size: int, device_name: str | None
) -> dict:
    """Tuned config nearest in rows per expert, else the default for the shape."""
    if device_name is not None:
        by_rows = load_table(device_name).get(shape_key(hidden_size, intermediate_size))
        if by_rows:
            nearest = min(by_rows, key=lambda r: abs(int(r) - rows_per_expert))
            return by_rows[nearest]
    return default_config(rows_per_expert, hidden_size, intermediate_size)
