"""examples/disagg/proxy.py without vLLM: request rewriting, the model check, and the
proxy's answers with fake instances (httpx.MockTransport) that work, fail, go away and
come back."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

PROXY_PATH = Path(__file__).resolve().parents[2] / "examples/disagg/proxy.py"


def _load_proxy():
    spec = importlib.util.spec_from_file_location("disagg_proxy", PROXY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


proxy_mod = _load_proxy()

PREFILL, DECODE = "http://prefill:1", "http://decode:2"
MODELS = {"object": "list", "data": [{"id": "tiny", "root": "/models/tiny"}]}


# --------------------------------------------------------------------------- pure parts


def test_prefill_request_asks_for_one_token_without_streaming():
    body = {
        "model": "tiny",
        "prompt": "Hi",
        "max_tokens": 12,
        "max_completion_tokens": 12,
        "min_tokens": 4,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    prefill = proxy_mod.prefill_request(body)
    assert prefill == {
        "model": "tiny",
        "prompt": "Hi",
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "n": 1,
        "stream": False,
        "temperature": 0,
        "kv_transfer_params": proxy_mod.PREFILL_KV_TRANSFER_PARAMS,
    }
    assert body["max_tokens"] == 12 and body["stream"] is True  # the client's is untouched


def test_decode_request_carries_the_prefill_kv_transfer_params():
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    params = {"remote_engine_id": "e0", "remote_block_ids": [3, 4]}
    assert proxy_mod.decode_request(body, {"kv_transfer_params": params}) == {
        **body,
        "kv_transfer_params": params,
    }
    assert proxy_mod.decode_request(body, {"kv_transfer_params": None}) == body
    assert proxy_mod.decode_request(body, {}) == body


def test_same_model_is_accepted_and_different_models_are_refused():
    same = {"tiny": "/models/tiny"}
    proxy_mod.check_same_model(same, dict(same))
    with pytest.raises(proxy_mod.ModelMismatchError, match="serve different models") as e:
        proxy_mod.check_same_model(same, {"tiny": "/models/other"})
    assert "/models/tiny" in str(e.value) and "/models/other" in str(e.value)
    with pytest.raises(proxy_mod.ModelMismatchError, match="'other'"):
        proxy_mod.check_same_model(same, {"other": "/models/tiny"})
    with pytest.raises(proxy_mod.ModelMismatchError, match="serves no model"):
        proxy_mod.check_same_model(same, {})


def test_served_models_reads_vllm_model_list():
    assert proxy_mod.served_models(MODELS) == {"tiny": "/models/tiny"}


# --------------------------------------------------------------------------- with fake instances


class FakeInstances:
    """A prefill and a decode instance behind one MockTransport; `decode_state` is
    "up", "down" (connection refused), "hangs" (read timeout), "other-model" or
    "dies-mid-stream"."""

    def __init__(self):
        self.decode_state = "up"
        self.requests: list[tuple[str, str, dict | None]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = "prefill" if request.url.host == "prefill" else "decode"
        body = json.loads(request.content) if request.content else None
        self.requests.append((host, request.url.path, body))
        if host == "decode" and self.decode_state == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if host == "decode" and self.decode_state == "hangs" and request.method == "POST":
            raise httpx.ReadTimeout("no answer", request=request)
        if request.url.path == "/v1/models":
            if host == "decode" and self.decode_state == "other-model":
                return httpx.Response(200, json={"data": [{"id": "tiny", "root": "/other"}]})
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/health":
            return httpx.Response(200)
        if body.get("prompt") == "bad":
            return httpx.Response(400, json={"error": {"message": "bad prompt", "code": 400}})
        if host == "prefill":
            return httpx.Response(200, json={"choices": [{"text": "P"}]})
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": "decoded"}]})
        return httpx.Response(
            200, content=self._events(), headers={"content-type": "text/event-stream"}
        )

    async def _events(self):
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        if self.decode_state == "dies-mid-stream":
            raise httpx.ReadError("connection reset")
        yield b'data: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'


@pytest.fixture
def fake():
    instances = FakeInstances()
    proxy = proxy_mod.DisaggProxy(PREFILL, DECODE, transport=httpx.MockTransport(instances.handler))
    with TestClient(proxy_mod.build_app(proxy)) as client:
        yield instances, client


def _completion(client, **extra):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 8, **extra}
    return client.post("/v1/completions", json=body)


def test_prefill_then_decode(fake):
    instances, client = fake
    answer = _completion(client)
    assert answer.status_code == 200 and answer.json() == {"choices": [{"text": "decoded"}]}
    posts = [(host, body) for host, path, body in instances.requests if path != "/v1/models"]
    assert [host for host, _ in posts] == ["prefill", "decode"]
    assert posts[0][1]["max_tokens"] == 1 and posts[1][1]["max_tokens"] == 8


def test_streaming_and_chat(fake):
    _, client = fake
    answer = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [], "stream": True}
    )
    assert answer.status_code == 200
    assert answer.text.endswith("data: [DONE]\n\n") and '"text": "b"' in answer.text


def test_an_instance_error_is_passed_through(fake):
    _, client = fake
    answer = _completion(client, prompt="bad")
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "bad prompt"


def test_decode_gone_gives_503_and_a_restarted_decode_is_used_again(fake):
    instances, client = fake
    assert _completion(client).status_code == 200
    instances.decode_state = "down"
    answer = _completion(client)
    assert answer.status_code == 503
    assert "decode instance http://decode:2 is unreachable" in answer.json()["error"]["message"]
    assert client.get("/health").status_code == 503
    instances.decode_state = "up"
    instances.requests.clear()
    assert _completion(client).status_code == 200
    assert ("decode", "/v1/models", None) in instances.requests  # checked again first
    assert client.get("/health").status_code == 200


def test_decode_restarted_with_another_model_is_refused(fake):
    instances, client = fake
    assert _completion(client).status_code == 200
    instances.decode_state = "down"
    assert _completion(client).status_code == 503
    instances.decode_state = "other-model"
    answer = _completion(client)
    assert answer.status_code == 503 and "serve different models" in answer.text


def test_decode_not_answering_in_time_gives_504(fake):
    instances, client = fake
    instances.decode_state = "hangs"
    answer = _completion(client)
    assert answer.status_code == 504 and "did not answer in time" in answer.text


def test_decode_dying_mid_stream_ends_the_stream_with_an_error(fake):
    instances, client = fake
    instances.decode_state = "dies-mid-stream"
    answer = _completion(client, stream=True)
    assert answer.status_code == 200  # the headers had gone out already
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[0] == 'data: {"choices": [{"text": "a"}]}'
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == 502
    assert events[-1] == "data: [DONE]"


def test_start_up_refuses_different_models(capsys):
    instances = FakeInstances()
    instances.decode_state = "other-model"

    class Proxy(proxy_mod.DisaggProxy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, transport=httpx.MockTransport(instances.handler), **kwargs)

    original = proxy_mod.DisaggProxy
    proxy_mod.DisaggProxy = Proxy
    try:
        code = proxy_mod.main(["--prefill", PREFILL, "--decode", DECODE])
    finally:
        proxy_mod.DisaggProxy = original
    assert code == 2
    assert "refusing to start" in capsys.readouterr().err


def _load_launcher():
    spec = importlib.util.spec_from_file_location("disagg_launch", PROXY_PATH.parent / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_launcher_commands():
    """examples/disagg/launch.py: stock prefill (EP 1), wide-EP decode (EP 2 through DP 2),
    ExampleConnector producer -> consumer through one folder (the README's commands)."""
    launch = _load_launcher()
    d = launch.Deployment("MODEL", Path("/w"), prefill_port=8100, decode_port=8200)
    decode, prefill = d.decode_command(), d.prefill_command()
    assert decode[decode.index("--data-parallel-size") + 1] == "2" and "--enable-wideep" in decode
    assert "--enable-wideep" not in prefill
    kv = {
        cmd[cmd.index("--port") + 1]: json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
        for cmd in (prefill, decode)
    }
    assert kv == {
        "8100": launch.kv_transfer_config("prefill", Path("/w/kv")),
        "8200": launch.kv_transfer_config("decode", Path("/w/kv")),
    }
    assert kv["8100"]["kv_role"] == "kv_producer" and kv["8200"]["kv_role"] == "kv_consumer"
    assert kv["8100"]["kv_connector"] == "ExampleConnector"
    proxy = d.proxy_command()
    assert proxy[proxy.index("--decode") + 1] == "http://127.0.0.1:8200"
