"""Backend name -> Dispatcher class, checked against the config's `A2ABackend` choices."""

from __future__ import annotations

from typing import get_args

from vllm_wideep.comm.a2a import AllToAllDispatcher
from vllm_wideep.comm.base import Dispatcher
from vllm_wideep.plugin.config import A2ABackend

DISPATCHERS: dict[str, type[Dispatcher]] = {
    "a2a": AllToAllDispatcher,
}
assert set(DISPATCHERS) == set(get_args(A2ABackend)), "registry and config disagree"
