"""The patches to vLLM (patches/, applied by tools/fix_cpu_venv.py at `make install`)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ROPE_FILE = "vllm/model_executor/layers/rotary_embedding/base.py"


def _fix_cpu_venv():
    spec = importlib.util.spec_from_file_location("fix_cpu_venv", REPO / "tools/fix_cpu_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patches_apply_once_and_refuse_a_foreign_file(tmp_path: Path) -> None:
    vllm = pytest.importorskip("vllm")
    fix = _fix_cpu_venv()
    patch = REPO / "patches/0001-cpu-rotary-embedding-multi-head-query.patch"
    installed = Path(vllm.__file__).parents[1] / ROPE_FILE
    copy = tmp_path / ROPE_FILE
    copy.parent.mkdir(parents=True)
    shutil.copy(installed, copy)
    patched = copy.read_text()
    assert "vllm-wideep patch" in patched  # make install applied it
    fix.apply_patch(patch, tmp_path)  # applied already: unchanged
    assert copy.read_text() == patched
    subprocess.run(["patch", "-p1", "-R", "-s", "-d", tmp_path, "-i", patch], check=True)
    assert "vllm-wideep patch" not in copy.read_text()
    fix.apply_patch(patch, tmp_path)
    assert copy.read_text() == patched
    copy.write_text("something else\n")
    with pytest.raises(SystemExit, match="does not apply"):
        fix.apply_patch(patch, tmp_path)


def test_cpu_rotary_embedding_of_a_multi_head_query_beside_one_key_head() -> None:
    """MLA's layout (DeepSeek): query [tokens, heads, rope dim], key [tokens, 1, rope dim],
    interleaved (GPT-J) rotation. vLLM's CPU kernel rotated such a query wrongly (the
    trained tiny DeepSeek-V3 answered nothing right); patched, it equals the reference."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            64,
            max_position=64,
            is_neox_style=False,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        )
    positions = torch.arange(7)
    q_full = torch.randn(7, 4, 96, dtype=torch.float64).float()  # [tokens, heads, nope + rope]
    key = torch.randn(7, 1, 64)
    want_q, want_k = rope.forward_native(positions, q_full[..., 32:].clone(), key.clone())
    query = q_full.clone()[..., 32:]  # a strided view, as MLA passes it
    got_q, got_k = rope.forward_cpu(positions, query, key.clone())
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(query, want_q)  # in place
    torch.testing.assert_close(got_k, want_k)
