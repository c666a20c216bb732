import os
from pathlib import Path

import pytest

from tests.e2e import reference
from tests.e2e.launch import e2e_env, generate
from vllm_wideep.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model():
    """arch -> path of the built-in tiny checkpoint (built once, cached in .cache/)."""
    root = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache")) / "tiny-models"

    def build(arch: str) -> str:
        return str(build_tiny_model(root / arch, arch))

    return build


@pytest.fixture(scope="session")
def stock(tiny_model):
    """(arch, dtype) -> stock vLLM's greedy result at TP 1 with the plugin not even loaded,
    on `reference.PROMPTS`; one process runs every case (in-process engines)."""
    env = e2e_env(VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    results = generate(reference.spec(reference.runs(tiny_model)), env, timeout=900)
    return reference.by_case(results)


@pytest.fixture
def engine_config(monkeypatch):
    """`build(model, **engine_args)` -> VllmConfig, with the plugin loaded by vLLM."""
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    saved = dict(os.environ)

    def build(model: str, **kwargs):
        from vllm.engine.arg_utils import EngineArgs

        from vllm_wideep.plugin.hooks import is_wrapped

        engine_args = EngineArgs(model=model, enforce_eager=True, **kwargs)
        assert is_wrapped(EngineArgs, "create_engine_config"), "plugin not loaded"
        return engine_args.create_engine_config()

    yield build
    # vLLM's CPU platform writes os.environ (LD_PRELOAD, thread counts) while it builds
    # the config; later tests copy os.environ into their vLLM children.
    os.environ.clear()
    os.environ.update(saved)
