"""The premise of benchmarks/soak.py's oneDNN cache cap: vLLM's CPU linear layer keeps a
primitive per batch size in oneDNN's primitive cache, so resident memory grows with each
new batch size under oneDNN's default capacity and not under 16 entries
(benchmarks/onednn_cache_memory.py; docs/benchmarks.md, "Resident memory over longer
runs")."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import serve


def _growth_mib(capacity: str | None) -> float:
    """RSS growth over 500 new batch sizes after the first 100."""
    env = dict(os.environ)
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
    argv = [sys.executable, "benchmarks/onednn_cache_memory.py"]
    argv += ["--max-m", "600", "--every", "100", "--passes", "1"]
    done = subprocess.run(
        argv, cwd=serve.REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if "needs vLLM's CPU ops" in done.stderr:
        pytest.skip("vLLM's CPU oneDNN ops are not loaded")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "batch sizes: RSS" in line]
    assert lines[-1].startswith("600 calls"), done.stdout
    return float(re.search(r"RSS ([-+][0-9.]+) MiB", lines[-1]).group(1))


def test_a_capped_onednn_cache_keeps_rss_flat_over_new_batch_sizes():
    default = _growth_mib(None)
    capped = _growth_mib("16")
    # Measured on the 2-core AVX2 machine: +220 MiB and +0.0.
    assert default > 50, default
    assert capped < 5, capped
