"""Versioned JSON files: a recorded expert load, and a placement made from it.

    load file       {"format": "vllm-wideep-load", "version": 1, "model": {...},
                     "layers": [layer names], "load": [[tokens per expert] per layer]}
    placement file  {"format": "vllm-wideep-placement", "version": 1, "model": {...},
                     "num_ranks": R, "slots_per_rank": S, "layers": [layer names],
                     "physical_to_logical": [[expert per slot] per layer]}

`model` identifies what the numbers are for: `{"architecture", "num_experts",
"hidden_size"}` (`ModelIdentity`). Layers are named as vLLM names MoE layers
(`model.layers.3.mlp.experts`), so a file says which layer each row is for. Every reader
error is a ValueError naming the file and what is wrong: a missing file, a directory, JSON
that is not a record of the right format, counts that are not positive integers (4.9 and "4"
are refused, not rounded), loads that are negative, NaN or infinite.

Writers write a uniquely named temporary file next to the target (created exclusively, so
a planted `*.tmp` link is never followed) and rename it over the target: readers never see
half a file, and a failed write leaves nothing behind. A path that cannot be written (a
directory, a missing permission) is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import tempfile
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

    @classmethod
    def from_dict(cls, model: Any, source: str | Path) -> ModelIdentity:
        """From a file's or a reply's `model` object; ValueError naming `source` unless it
        holds a non-empty `architecture` string and positive integer counts."""
        keys = ("architecture", "num_experts", "hidden_size")
        if not isinstance(model, dict) or not all(k in model for k in keys):
            raise ValueError(
                f"vllm_wideep: {source}: 'model' must hold architecture, num_experts and "
                f"hidden_size, got {_short(model)}"
            )
        architecture = model["architecture"]
        if not isinstance(architecture, str) or not architecture:
            raise ValueError(
                f"vllm_wideep: {source}: 'model' architecture must be a non-empty string, "
                f"got {_short(architecture)}"
            )
        for key in keys[1:]:
            if not _is_int(model[key]) or model[key] < 1:
                raise ValueError(
                    f"vllm_wideep: {source}: 'model' {key} must be a positive integer, "
                    f"got {_short(model[key])}"
                )
        return cls(architecture, model["num_experts"], model["hidden_size"])

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
    if not torch.isfinite(record.load).all():
        raise ValueError(f"vllm_wideep: {path}: not written, the load holds NaN or Infinity")
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
    return load_from_dict(_read(path, LOAD_FORMAT), path)


def load_from_dict(data: dict[str, Any], source: str | Path) -> LoadRecord:
    """The `model`, `layers` and `load` of a load file (or of a server's `wideep_load`
    reply, which has the same keys); ValueError naming `source` and what is wrong."""
    model = ModelIdentity.from_dict(data.get("model"), source)
    layers = _layers(data, source)
    load = _matrix(data, "load", source, torch.float64)
    if load.shape != (len(layers), model.num_experts):
        raise ValueError(
            f"vllm_wideep: {source}: 'load' is {tuple(load.shape)}, expected "
            f"[{len(layers)} layers, {model.num_experts} experts]"
        )
    if not torch.isfinite(load).all():
        raise ValueError(
            f"vllm_wideep: {source}: 'load' holds NaN or Infinity; loads are token counts"
        )
    if (load < 0).any():
        raise ValueError(f"vllm_wideep: {source}: 'load' has negative entries")
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
    model = ModelIdentity.from_dict(data.get("model"), path)
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
    _check_path(path)
    path = Path(path)
    try:
        text = json.dumps(data, allow_nan=False) + "\n"
    except ValueError:
        raise ValueError(
            f"vllm_wideep: {path}: not written, it would hold NaN or Infinity"
        ) from None
    if path.is_dir():
        raise ValueError(f"vllm_wideep: cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"vllm_wideep: cannot write {path}: {e.strerror or e}") from None
    written = False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, widened as open() would
        os.replace(tmp, path)  # readers never see half a file
        written = True
    except OSError as e:
        raise ValueError(f"vllm_wideep: cannot write {path}: {e.strerror or e}") from None
    finally:
        if not written:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    """This process's umask. Linux reports it in /proc; elsewhere it can only be read by
    setting it, so set it back at once."""
    with (
        contextlib.suppress(OSError, ValueError, StopIteration),
        open("/proc/self/status", encoding="ascii") as f,
    ):
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_path(path: str | Path) -> None:
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"vllm_wideep: the file path is empty ({path!r})")


def _read(path: str | Path, kind: str) -> dict[str, Any]:
    _check_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"vllm_wideep: {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"vllm_wideep: {path} is a directory, expected a {kind} file") from None
    except OSError as e:
        raise ValueError(f"vllm_wideep: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"vllm_wideep: {path} is not a JSON file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"vllm_wideep: {path} is not a JSON file: {e}") from None
    except RecursionError:
        raise ValueError(
            f"vllm_wideep: {path} is not a {kind} file: its JSON is nested too deeply"
        ) from None
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"vllm_wideep: {path} is not a {kind} file (format: {_short(found)})")
    if not _is_int(data.get("version")) or data["version"] != VERSION:
        raise ValueError(
            f"vllm_wideep: {path} has {kind} version {_short(data.get('version'))}; "
            f"this vllm_wideep reads version {VERSION}"
        )
    return data


def _layers(data: dict[str, Any], path) -> list[str]:
    layers = data.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"vllm_wideep: {path}: 'layers' must be a list of layer names")
    if len(set(layers)) != len(layers):
        raise ValueError(f"vllm_wideep: {path}: 'layers' names a layer twice")
    return layers


def _positive_int(data: dict[str, Any], key: str, path) -> int:
    value = data.get(key)
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"vllm_wideep: {path}: '{key}' must be a positive integer, got {_short(value)}"
        )
    return value


def _is_int(value: Any) -> bool:
    """A JSON integer: not a float (4.9, 4.0, Infinity), a string ("4") or a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """`repr` cut to a line, for messages about values of any size."""
    return reprlib.repr(value)


def _matrix(data: dict[str, Any], key: str, path, dtype: torch.dtype) -> torch.Tensor:
    try:
        matrix = torch.tensor(data[key], dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"vllm_wideep: {path}: '{key}' must be a list of equal-length rows of numbers"
        ) from None
    if matrix.dim() != 2:
        raise ValueError(f"vllm_wideep: {path}: '{key}' must be a list of equal-length rows")
    values = [v for row in data[key] for v in row]
    if dtype == torch.int64 and not all(_is_int(v) for v in values):
        raise ValueError(f"vllm_wideep: {path}: '{key}' must hold integers only")
    if not all(_is_int(v) or isinstance(v, float) for v in values):
        raise ValueError(f"vllm_wideep: {path}: '{key}' must hold numbers only")
    return matrix
