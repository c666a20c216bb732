"""Disaggregated prefill/decode with examples/disagg on CPU: a stock prefill instance
(EP 1), a wide-EP decode instance (EP 2 through DP 2) and the proxy, KV passed through
vLLM's ExampleConnector (a shared folder).

* Greedy outputs through the proxy equal the prefill instance's own (a single stock
  instance), and the decode instance really loaded the prompts' KV: its answers report
  the transferred tokens as cached (`--enable-prompt-tokens-details`).
* The proxy refuses to start when the instances serve different models.
* Decode killed: the proxy answers 503 at once. Decode restarted on its port: the proxy
  uses it again, with the same outputs.

Tiny Qwen3-MoE in float32 (its CPU attention does not depend on the batch, unlike
DeepSeek's MLA). ExampleConnector hands over whole KV blocks of the prompt minus its last
token (128 tokens a block on CPU), so the prompts are 2-3 blocks long, plus one short
prompt that the decode instance prefills itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import REPO, e2e_env

pytestmark = pytest.mark.slow


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"examples/disagg/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


launch = _load("launch")

_PARAGRAPHS = [
    "The old lighthouse stood at the end of a narrow stone pier, and every evening the "
    "keeper climbed its one hundred and twelve steps to light the lamp. Ships passing in the "
    "dark counted the flashes: two short, one long, then a pause of ten seconds.",
    "A model that predicts the next word must first learn which words follow which. It reads "
    "a sentence one token at a time and keeps a summary of what it has seen. Large models "
    "split this work among many experts, and a small router decides which experts should "
    "look at each token.",
    "In the spring the river rose and the village moved its market to the hill. Traders "
    "brought apples, bread, cheese, honey, salt, wool and copper pots. Children ran between "
    "the stalls while their parents argued about prices.",
]
PROMPTS = [  # 268, 352 and 2 tokens
    " ".join(_PARAGRAPHS),
    " ".join(reversed(_PARAGRAPHS)) + " " + _PARAGRAPHS[1],
    "Hi",
]
BLOCK = 128  # vLLM's default KV block size on CPU
MAX_TOKENS = 12
DTYPE = "float32"


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read().decode()
            status = answer.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _complete(url: str, prompts: list[str]) -> dict:
    """Greedy completions, one request per prompt -> {"tokens", "logprobs",
    "cached_tokens": [per prompt]} (vLLM reports one batch's last prompt's only)."""
    parts = [_complete_one(url, prompt) for prompt in prompts]
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def _complete_one(url: str, prompt: str) -> dict:
    body = {
        "model": launch.SERVED_NAME,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 2,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    status, answer = _post(url + "/v1/completions", body)
    assert status == 200, answer
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    return {
        "tokens": [c["token_ids"] for c in choices],
        "logprobs": [
            [
                {key.removeprefix("token_id:"): lp for key, lp in top.items()}
                for top in c["logprobs"]["top_logprobs"]
            ]
            for c in choices
        ],
        "cached_tokens": [answer["usage"]["prompt_tokens_details"]["cached_tokens"]],
    }


def _chat(url: str, stream: bool) -> str:
    body = {
        "model": launch.SERVED_NAME,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        if not stream:
            return json.loads(answer.read())["choices"][0]["message"]["content"]
        events = [line.decode().strip() for line in answer]
    assert "data: [DONE]" in events, events[-3:]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """Prefill and decode started together, then the proxy; all killed at the end."""
    workdir = tmp_path_factory.mktemp("disagg")
    extra = ["--dtype", DTYPE, "--enable-prompt-tokens-details"]
    d = launch.Deployment(
        tiny_model("qwen3_moe"),
        workdir,
        vllm_args=[*launch.DEFAULT_VLLM_ARGS, *extra],
        base_env=e2e_env(),
    )
    d.processes = {"prefill": d.start_prefill(), "decode": d.start_decode()}
    try:
        d.processes["prefill"].wait_ready(600)
        d.processes["decode"].wait_ready(600)
        d.processes["proxy"] = d.start_proxy()
        d.processes["proxy"].wait_ready(120)
        yield d
    finally:
        for process in d.processes.values():
            process.kill()


@pytest.fixture(scope="module")
def through_proxy(deployment) -> dict:
    """The prompts through the proxy, first thing (the KV folder is empty before)."""
    assert not any(deployment.kv_path.iterdir())
    return _complete(deployment.url("proxy"), PROMPTS)


@pytest.fixture(scope="module")
def reference(deployment, through_proxy) -> dict:
    """The prefill instance alone: a single stock vLLM instance (EP 1)."""
    return _complete(deployment.url("prefill"), PROMPTS)


def test_outputs_through_proxy_equal_a_single_instance(deployment, through_proxy, reference):
    assert_greedy_parity(reference, through_proxy, DTYPE)
    # The KV of both long prompts crossed over (whole blocks of the prompt but its last
    # token: 2 blocks each), counted as cached by the decode instance; the short one has
    # no whole block.
    assert through_proxy["cached_tokens"] == [2 * BLOCK, 2 * BLOCK, 0]
    decode_log = deployment.processes["decode"].log.read_text()
    assert "External Cache Hit!" in decode_log
    assert _chat(deployment.url("proxy"), stream=True) == _chat(
        deployment.url("prefill"), stream=False
    )


class _OtherModel(BaseHTTPRequestHandler):
    """An instance that serves another model under the same name."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = json.dumps({"data": [{"id": launch.SERVED_NAME, "root": "/models/other"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_different_models_are_refused(deployment):
    other = ThreadingHTTPServer(("127.0.0.1", 0), _OtherModel)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        cmd = [sys.executable, str(launch.PROXY), "--prefill", deployment.url("prefill")]
        cmd += ["--decode", f"http://127.0.0.1:{other.server_port}", "--port", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        other.shutdown()
    assert done.returncode == 2, done.stderr
    assert "refusing to start" in done.stderr and "serve different models" in done.stderr
    assert "/models/other" in done.stderr and deployment.model in done.stderr


def test_decode_gone_gives_an_error_and_a_restarted_decode_is_used_again(deployment, reference):
    deployment.processes.pop("decode").kill()
    start = time.monotonic()
    status, answer = _post(deployment.url("proxy") + "/v1/completions", _body(stream=False))
    assert status == 503 and "decode instance" in answer["error"]["message"], answer
    status, answer = _post(deployment.url("proxy") + "/v1/completions", _body(stream=True))
    assert status == 503, answer
    assert time.monotonic() - start < 15  # an error at once, not a hang

    deployment.processes["decode"] = deployment.start_decode()  # same port
    deployment.processes["decode"].wait_ready(600)
    result = _complete(deployment.url("proxy"), PROMPTS)
    assert_greedy_parity(reference, result, DTYPE)
    assert result["cached_tokens"] == [2 * BLOCK, 2 * BLOCK, 0]  # loaded by the new decode


def _body(stream: bool) -> dict:
    return {"model": launch.SERVED_NAME, "prompt": PROMPTS[0], "max_tokens": 4, "stream": stream}
