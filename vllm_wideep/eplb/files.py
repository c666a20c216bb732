"""Versioned JSON files: a recorded expert load, and a placement made from it.

    load file       {"format": "vllm-wideep-load", "version": 1, "model": {...},
                     "layers": [layer names], "load": [[tokens per expert] per layer]}
    placement file  {"format": "vllm-wideep-placement", "version": 1, "model": {...},
                     "num_ranks": R, "slots_per_rank": S, "layers": [layer names],
                     "physical_to_logical": [[expert per slot] per layer]}

`model` identifies what the numbers are for: `{"architecture", "num_experts",
"hidden_size"}` (`ModelIdentity`). Layers are named as vLLM names MoE layers
(`model.layers.3.mlp.experts`), so a file says which layer each row is for. Every reader
error is a ValueError naming the file and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_wideep.eplb.placement import Placement

LOAD_FORMAT = "vllm-wideep-load"
PLACEMENT_FORMAT = "vllm-wideep-placement"
VERSION = 1


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    num_experts: int
    hidden_size: int

    @classmethod
    def from_model_config(cls, model_config) -> ModelIdentity:
        """From vLLM's `ModelConfig`."""
        return cls(
            architecture=(model_config.architectures or ["?"])[0],
            num_experts=int(model_config.get_num_experts()),
            hidden_size=int(model_config.get_hidden_size()),
        )

    def check_matches(self, served: ModelIdentity, path: str | Path) -> None:
        """Raise ValueError unless a file recorded for `self` fits the served model."""
        if self != served:
            raise ValueError(
                f"vllm_wideep: {path} was made for {asdict(self)}, but the served model is "
                f"{asdict(served)}; make a placement for this model "
                f"('vllm-wideep eplb placement')."
            )


@dataclass(frozen=True)
class LoadRecord:
    """load: `[L, E]` float64 tokens per logical expert; layers: L layer names."""

    model: ModelIdentity
    layers: list[str]
    load: torch.Tensor


@dataclass(frozen=True)
class PlacementRecord:
    model: ModelIdentity
    layers: list[str]
    placement: Placement

    def row_for(self, layer: str) -> torch.Tensor:
        """`[N]` int64, the placement of one named layer."""
        return self.placement.physical_to_logical[self.layers.index(layer)]


def write_load(path: str | Path, record: LoadRecord) -> None:
    _write(
        path,
        {
            "format": LOAD_FORMAT,
            "version": VERSION,
            "model": asdict(record.model),
            "layers": record.layers,
            "load": record.load.tolist(),
        },
    )


def read_load(path: str | Path) -> LoadRecord:
    data = _read(path, LOAD_FORMAT)
    model = _identity(data, path)
    layers = _layers(data, path)
    load = _matrix(data, "load", path, torch.float64)
    if load.shape != (len(layers), model.num_experts):
        raise ValueError(
            f"vllm_wideep: {path}: 'load' is {tuple(load.shape)}, expected "
            f"[{len(layers)} layers, {model.num_experts} experts]"
        )
    if (load < 0).any():
        raise ValueError(f"vllm_wideep: {path}: 'load' has negative entries")
    return LoadRecord(model, layers, load)


def write_placement(path: str | Path, record: PlacementRecord) -> None:
    placement = record.placement
    _write(
        path,
        {
            "format": PLACEMENT_FORMAT,
            "version": VERSION,
            "model": asdict(record.model),
            "num_ranks": placement.num_ranks,
            "slots_per_rank": placement.slots_per_rank,
            "layers": record.layers,
            "physical_to_logical": placement.physical_to_logical.tolist(),
        },
    )


def read_placement(path: str | Path) -> PlacementRecord:
    data = _read(path, PLACEMENT_FORMAT)
    model = _identity(data, path)
    layers = _layers(data, path)
    num_ranks = _positive_int(data, "num_ranks", path)
    slots_per_rank = _positive_int(data, "slots_per_rank", path)
    phy2log = _matrix(data, "physical_to_logical", path, torch.int64)
    expected = (len(layers), num_ranks * slots_per_rank)
    if tuple(phy2log.shape) != expected:
        raise ValueError(
            f"vllm_wideep: {path}: 'physical_to_logical' is {tuple(phy2log.shape)}, expected "
            f"[{expected[0]} layers, {num_ranks} ranks x {slots_per_rank} slots]"
        )
    placement = Placement(phy2log, num_ranks)
    try:
        placement.validate(model.num_experts, num_ranks)
    except ValueError as e:
        raise ValueError(f"vllm_wideep: {path}: invalid placement: {e}") from None
    return PlacementRecord(model, layers, placement)


def _write(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)  # readers never see half a file


def _read(path: str | Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"vllm_wideep: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"vllm_wideep: {path} is not a JSON file: {e}") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"vllm_wideep: {path} is not a {kind} file (format: {found!r})")
    if data.get("version") != VERSION:
        raise ValueError(
            f"vllm_wideep: {path} has {kind} version {data.get('version')!r}; "
            f"this vllm_wideep reads version {VERSION}"
        )
    return data


def _identity(data: dict[str, Any], path) -> ModelIdentity:
    model = data.get("model")
    try:
        identity = ModelIdentity(
            architecture=str(model["architecture"]),
            num_experts=int(model["num_experts"]),
            hidden_size=int(model["hidden_size"]),
        )
    except (TypeError, KeyError, ValueError):
        raise ValueError(
            f"vllm_wideep: {path}: 'model' must hold architecture, num_experts and "
            f"hidden_size, got {model!r}"
        ) from None
    return identity


def _layers(data: dict[str, Any], path) -> list[str]:
    layers = data.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"vllm_wideep: {path}: 'layers' must be a list of layer names")
    if len(set(layers)) != len(layers):
        raise ValueError(f"vllm_wideep: {path}: 'layers' names a layer twice")
    return layers


def _positive_int(data: dict[str, Any], key: str, path) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"vllm_wideep: {path}: '{key}' must be a positive integer, got {value!r}")
    return value


def _matrix(data: dict[str, Any], key: str, path, dtype: torch.dtype) -> torch.Tensor:
    try:
        matrix = torch.tensor(data[key], dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"vllm_wideep: {path}: '{key}' must be a list of equal-length rows of numbers"
        ) from None
    if matrix.dim() != 2:
        raise ValueError(f"vllm_wideep: {path}: '{key}' must be a list of equal-length rows")
    if dtype == torch.int64 and not all(
        isinstance(v, int) and not isinstance(v, bool) for row in data[key] for v in row
    ):
        raise ValueError(f"vllm_wideep: {path}: '{key}' must hold integers only")
    return matrix
