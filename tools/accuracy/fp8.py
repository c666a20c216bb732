"""The trained tiny DeepSeek-V3 with its routed experts in FP8, and its dequantized copy.

    python -m tools.accuracy.fp8 [--model models/tiny-dsv3-tasks] OUT_DIR

writes `OUT_DIR`, the FP8 checkpoint in DeepSeek's format (`quant_method: fp8`, 128 x 128
block scales in `*.weight_scale_inv`, every other Linear in `modules_to_not_convert`), and
`OUT_DIR-dequant` (`tiny_models.dequantized_dir`), the same checkpoint with each FP8 weight
replaced by `dequantize_block_fp8(q, scale)` in the model dtype and no
`quantization_config`: stock vLLM on CPU has no FP8 MoE, so it runs that copy as the
reference (`make eval`'s FP8 rows, docs/accuracy.md).

Padding. vLLM's block-FP8 loader takes an expert only if its intermediate size I is a
multiple of the 128-wide block, and the trained model has I = `moe_intermediate_size` = 64.
Each MLP of the MoE layers is widened to I' = 128 with zeros before it is quantized:

    gate_proj, up_proj  `[I, H]` -> `[I', H]`   zero rows I .. I'-1
    down_proj           `[H, I]` -> `[H, I']`   zero columns I .. I'-1

The new units compute silu(0) * 0 = 0 and feed `down_proj` through zero columns, so the
padded model computes the same function. vLLM and transformers build the shared expert with
`moe_intermediate_size * n_shared_experts` units, so it is widened the same way to
I' * n_shared_experts (and stays unquantized) and `config.json` says I'. Worked example
(hidden H = 128, 16 routed + 1 shared expert, MoE layers 1, 2 and the MTP layer 3): each
routed expert's gate/up `[64, 128]` -> `[128, 128]` float8 with scale `[1, 1]`, its down
`[128, 64]` -> `[128, 128]` with scale `[1, 1]`; the shared expert's three weights become
128 wide in bfloat16.

Both folders hold a stamp (`STAMP_FILE`: the source checkpoint's digest, the role, the
format version); a folder with the right stamp is left alone, so a second call writes
nothing. Each appears whole (written next to it, then renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vllm_wideep.tiny_models import (
    FP8_BLOCK,
    dequantized_dir,
    fp8_quantization_config,
    fp8_quantized_weights,
    fp8_scale_name,
    fp8_unquantized_modules,
    publish_folder,
)

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "tiny-dsv3-tasks"
STAMP_FILE = "wideep_fp8_experts.json"
FORMAT_VERSION = 1  # bump when the written files change for the same source
WEIGHTS = "model.safetensors"
# The MLPs of the MoE layers: a routed expert or the shared one, and which projection.
_MOE_MLP = re.compile(
    r"\.mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)\.weight$"
)


class Fp8ExpertsModel(NamedTuple):
    """The folders `write_fp8_experts_model` writes."""

    fp8: Path  # routed experts float8 e4m3 + `weight_scale_inv`, `quantization_config`
    dequantized: Path  # the same with dequant(quant(w)) in the model dtype; no quantization


def padded_size(size: int, block: int = FP8_BLOCK) -> int:
    """The next multiple of `block`: 64 -> 128, 128 -> 128."""
    return -(-size // block) * block


def pad_moe_intermediate(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], size: int
) -> dict[str, torch.Tensor]:
    """`tensors` of a DeepSeek-V3 checkpoint with `config` (`config.json`'s dict), with
    every MoE-layer MLP widened with zeros from `moe_intermediate_size` to `size` units
    (the shared expert from `moe_intermediate_size * n_shared_experts` to `size *
    n_shared_experts`); the same function (module docstring, "Padding")."""
    import torch

    old = config["moe_intermediate_size"]
    if size < old:
        raise ValueError(f"cannot pad moe_intermediate_size {old} down to {size}")
    shared = config.get("n_shared_experts") or 0
    padded = dict(tensors)
    for name, weight in tensors.items():
        match = _MOE_MLP.search(name)
        if match is None:
            continue
        units = old * shared if match[1] == "shared_experts" else old
        width = size * shared if match[1] == "shared_experts" else size
        dim = 1 if match[2] == "down_proj" else 0
        if weight.shape[dim] != units:
            raise ValueError(
                f"{name} {list(weight.shape)}: expected {units} units in dim {dim} "
                f"(moe_intermediate_size {old}, n_shared_experts {shared})"
            )
        zeros_shape = list(weight.shape)
        zeros_shape[dim] = width - units
        zeros = torch.zeros(zeros_shape, dtype=weight.dtype)
        padded[name] = torch.cat([weight, zeros], dim=dim).contiguous()
    return padded


def write_fp8_experts_model(
    trained_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Fp8ExpertsModel:
    """Write the FP8-experts checkpoint of `trained_dir` into `out_dir` and its dequantized
    copy into `dequantized_dir(out_dir)` (module docstring); return both paths.

    Nothing is written when both folders hold the stamp for the current `trained_dir`.
    A folder with another stamp is replaced; a non-empty folder without one is refused."""
    source = Path(trained_dir).absolute()
    out = Fp8ExpertsModel(Path(out_dir).absolute(), dequantized_dir(out_dir))
    digest = _digest(source)
    stamps = {
        path: {"format_version": FORMAT_VERSION, "source": digest, "role": role}
        for path, role in zip(out, ("fp8", "dequantized"), strict=True)
    }
    if all([_is_current(path, stamp) for path, stamp in stamps.items()]):  # both checked
        return out

    from safetensors.torch import load_file

    config = json.loads((source / "config.json").read_text())
    size = padded_size(config["moe_intermediate_size"])
    tensors = pad_moe_intermediate(load_file(source / WEIGHTS), config, size)
    quantized = fp8_quantized_weights(tensors, "experts")
    fp8_tensors, dequantized = quantize_weights(tensors, quantized)
    plain = {**config, "moe_intermediate_size": size}
    quantization = fp8_quantization_config("fp8", fp8_unquantized_modules(tensors, quantized))
    configs = {out.fp8: {**plain, "quantization_config": quantization}, out.dequantized: plain}
    weights = {out.fp8: fp8_tensors, out.dequantized: dequantized}
    for path in out:
        publish_folder(
            path,
            stamps[path],
            lambda tmp, p=path: _write_checkpoint(tmp, source, weights[p], configs[p]),
            STAMP_FILE,
        )
    return out


def quantize_weights(
    tensors: dict[str, torch.Tensor], quantized: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the FP8 checkpoint's tensors, the dequantized copy's): each weight in `quantized`
    `[out, in]` (multiples of `FP8_BLOCK`) -> float8 e4m3 plus `weight_scale_inv` `[out /
    128, in / 128]` float32 in the first, `dequantize_block_fp8` of them in its own dtype
    in the second; every other tensor the same in both."""
    from vllm_wideep.kernels.fp8 import dequantize_block_fp8, quantize_block_fp8

    block = (FP8_BLOCK, FP8_BLOCK)
    off_block = [f"{n} {list(tensors[n].shape)}" for n in quantized if _off_block(tensors[n])]
    if off_block:
        raise ValueError(f"vLLM loads FP8 weights in whole {block} blocks only: {off_block[:4]}")
    fp8_tensors, dequantized = dict(tensors), dict(tensors)
    for name in quantized:
        q, scale = quantize_block_fp8(tensors[name], block)
        fp8_tensors[name] = q.contiguous()
        fp8_tensors[fp8_scale_name(name, "fp8")] = scale.contiguous()
        dequantized[name] = dequantize_block_fp8(q, scale, block).to(tensors[name].dtype)
    return fp8_tensors, dequantized


def _off_block(weight: torch.Tensor) -> bool:
    return any(size % FP8_BLOCK for size in weight.shape)


def _digest(source: Path) -> str:
    """sha256 of the source checkpoint's weights and config."""
    sha = hashlib.sha256()
    for name in (WEIGHTS, "config.json"):
        sha.update((source / name).read_bytes())
    return sha.hexdigest()


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_current(path: Path, stamp: dict[str, Any]) -> bool:
    """Whether `path` holds what `stamp` describes; raises for a non-empty folder without
    a stamp, which is never overwritten."""
    found = _read_stamp(path)
    if found == stamp:
        return True
    if found is None and path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty and holds no {STAMP_FILE}; not overwriting it")
    return False


def _write_checkpoint(
    tmp: Path, source: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Fill `tmp` with the checkpoint `source` with `tensors` and `config` (the tokenizer
    and other files copied)."""
    from safetensors.torch import save_file

    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in (WEIGHTS, "config.json", STAMP_FILE):
            shutil.copyfile(path, tmp / path.name)
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy.fp8", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    for path in write_fp8_experts_model(args.model, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
