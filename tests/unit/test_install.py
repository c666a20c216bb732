"""The package installed as a user installs it (not editable, no checkout around it): the
user commands run from it, and it carries the runtime package alone (no training loop,
test launchers or benchmark helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_editable_install_runs_the_user_commands(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(REPO)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "bin",
        "vllm_wideep",
    ]
    assert not (target / "vllm_wideep" / "testing").exists()
    assert not (target / "vllm_wideep" / "accuracy").exists()
    assert (target / "vllm_wideep" / "kernels" / "configs" / "NVIDIA_H200.json").exists()

    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import vllm_wideep; print(vllm_wideep.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(target / "vllm_wideep" / "__init__.py")

    command = [sys.executable, str(target / "bin" / "vllm-wideep")]
    plan = subprocess.run(
        command + ["plan", "--model", "deepseek-r1", "--hardware", "h200"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    assert "routed experts" in plan.stdout
    eplb = subprocess.run(
        command + ["eplb", "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert eplb.returncode == 0, eplb.stderr
    assert "record" in eplb.stdout and "placement" in eplb.stdout
