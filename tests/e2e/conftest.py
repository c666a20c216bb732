import os
from pathlib import Path

import pytest

from vllm_wideep.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model():
    """arch -> path of the built-in tiny checkpoint (built once, cached in .cache/)."""
    root = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache")) / "tiny-models"

    def build(arch: str) -> str:
        return str(build_tiny_model(root / arch, arch))

    return build
