"""The table of run-time changes to vLLM (`plugin/hooks.py`) against the installed vLLM:
every target exists with the parameters its wrapper passes on, the plugin installs each
wrapper once, and docs/architecture.md shows the table as it is."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from vllm_wideep.plugin import hooks

REPO = Path(__file__).resolve().parents[2]


def _resolve(hook: hooks.Hook):
    """(owner, attribute name) of a table entry in the installed packages."""
    owner = importlib.import_module(hook.module)
    *path, name = hook.path
    for part in path:
        owner = getattr(owner, part)
    return owner, name


@pytest.mark.parametrize("hook", hooks.HOOKS, ids=lambda h: h.target)
def test_every_target_exists_with_the_expected_parameters(hook):
    owner, name = _resolve(hook)
    assert hooks.target_of(owner, name) == hook.target, "the table names it where it is defined"
    if hook.change == "extension":  # a dataclass field of EngineArgs
        assert name in {f.name for f in __import__("dataclasses").fields(owner)}
        return
    assert hasattr(owner, name), f"{hook.target} is gone from the installed version"
    if hook.params is None:
        return
    raw = inspect.getattr_static(owner, name)
    function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    params = list(inspect.signature(inspect.unwrap(function)).parameters)
    if isinstance(raw, classmethod):
        params = params[1:]  # cls
    assert params[: len(hook.params)] == list(hook.params), (
        f"{hook.target} now takes {params}; its wrapper was written for {hook.params} "
        f"(vLLM {hooks.VLLM_VERSION})"
    )


def test_register_installs_each_wrapper_once():
    import vllm_wideep
    from vllm_wideep.plugin.worker import install_step_hooks

    for _ in range(2):  # vLLM may load plugins more than once per process
        vllm_wideep.register()
        install_step_hooks()
    installed = {"every process", "workers"}
    # Installed elsewhere: the metrics registry with the first wide-EP engine config, and
    # the Ray accelerator ids in Ray worker processes.
    elsewhere = {
        "vllm.v1.metrics.prometheus:get_prometheus_registry",
        "ray.runtime_context:RuntimeContext.get_accelerator_ids",
    }
    for hook in hooks.HOOKS:
        if hook.change != "wrap" or hook.where not in installed or hook.target in elsewhere:
            continue
        owner, name = _resolve(hook)
        assert hooks.is_wrapped(owner, name), f"{hook.target} is in the table, not installed"
        raw = inspect.getattr_static(owner, name)
        function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        assert not hooks.is_wrapped_function(function.__wrapped__), f"{hook.target} twice"


def test_wrap_refuses_a_target_not_in_the_table():
    class Stranger:
        def method(self):
            return 1

    with pytest.raises(AssertionError, match="not listed in HOOKS"):
        hooks.wrap(Stranger, "method", lambda original: original)
    assert not hooks.is_wrapped(Stranger, "method")


def test_architecture_doc_shows_the_table():
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert hooks.markdown_table() in doc, (
        "docs/architecture.md's hook table is stale; paste hooks.markdown_table()"
    )
