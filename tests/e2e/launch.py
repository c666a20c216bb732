"""Start vLLM in child process groups on 127.0.0.1 and always clean them up.

The launcher lives in `tools.launch` (`make eval` uses it too); this module
adds `generate`, which runs tests/e2e/generate.py, and `with_config`, a checkpoint with
changes to its config.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tools.launch import (
    REPO,
    VENV_BIN,
    Server,
    e2e_env,
    free_port,
    group_processes,
    run_group,
)

__all__ = [
    "REPO",
    "VENV_BIN",
    "Server",
    "e2e_env",
    "free_port",
    "generate",
    "group_processes",
    "run_group",
    "server_complete",
]


def generate(spec: dict, env: dict[str, str], timeout: float = 600) -> list[dict]:
    """Run tests/e2e/generate.py with `spec`; return one result per run."""
    output = run_group(
        [sys.executable, str(REPO / "tests/e2e/generate.py"), json.dumps(spec)], env, timeout
    )
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["runs"]


def server_complete(server: Server, prompts: list[str], max_tokens: int) -> dict:
    """Greedy completions of `prompts` from a server started with `--served-model-name
    tiny` -> {"tokens", "logprobs": [{token id: logprob}]}, like `generate`'s runs.

    Requests ask for `return_tokens_as_token_ids`, so top logprobs are keyed
    "token_id:N": byte-level tokens often share a text, which would collapse them."""
    body = {
        "model": "tiny",
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 2,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    choices = sorted(server.post("/v1/completions", body)["choices"], key=lambda c: c["index"])
    return {
        "tokens": [c["token_ids"] for c in choices],
        "logprobs": [
            [
                {key.removeprefix("token_id:"): lp for key, lp in top.items()}
                for top in c["logprobs"]["top_logprobs"]
            ]
            for c in choices
        ],
    }


def with_config(source: str, model: Path, **changes) -> str:
    """A copy of the checkpoint at `source` in `model` with `changes` made to config.json;
    the other files are links (for refusals checked before any weight is read)."""
    model.mkdir()
    for path in Path(source).iterdir():
        if path.name != "config.json":
            (model / path.name).symlink_to(path)
    config = json.loads((Path(source) / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return str(model)
