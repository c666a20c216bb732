"""examples/disagg/proxy.py without vLLM: request rewriting, the model check, and the
proxy's answers with fake instances (httpx.MockTransport) that work, fail, answer
malformed replies, go away and come back; the connection pool limit with real fake
instances on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    "dies-mid-stream". `replies[host]`, when set, makes that instance's answer to every
    POST; `kv_transfer_params` go in the prefill's answer (NIXL does that)."""

    def __init__(self):
        self.decode_state = "up"
        self.requests: list[tuple[str, str, dict | None]] = []
        self.request_ids: list[tuple[str, str | None]] = []  # (host, X-Request-Id)
        self.replies: dict[str, httpx.Response] = {}
        self.kv_transfer_params: dict | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = "prefill" if request.url.host == "prefill" else "decode"
        body = json.loads(request.content) if request.content else None
        self.requests.append((host, request.url.path, body))
        if request.method == "POST":
            self.request_ids.append((host, request.headers.get("x-request-id")))
        if request.method == "POST" and host in self.replies:
            return self.replies[host]
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
            answer = {"choices": [{"text": "P"}], "kv_transfer_params": self.kv_transfer_params}
            return httpx.Response(200, json=answer)
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


def _client(instances: FakeInstances, **options) -> TestClient:
    transport = httpx.MockTransport(instances.handler)
    proxy = proxy_mod.DisaggProxy(PREFILL, DECODE, transport=transport, **options)
    return TestClient(proxy_mod.build_app(proxy))


@pytest.fixture
def fake():
    instances = FakeInstances()
    with _client(instances) as client:
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


# --------------------------------------------------------------------------- the client's request


def _post_raw(client, content: bytes, path: str = "/v1/completions", **headers):
    headers = {"content-type": "application/json", **headers}
    return client.post(path, content=content, headers=headers)


def _error(answer) -> str:
    error = answer.json()["error"]
    assert error["code"] == answer.status_code
    return error["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the request body is empty"),
        (b'{"prompt": "Hi"', "the request body is not valid JSON: Expecting"),
        (b'{"prompt": NaN}', "the request body is not valid JSON: NaN is not a JSON value"),
        (b"\xff\xfe\x00{", "the request body is not valid JSON"),
        (b'[{"prompt": "Hi"}]', "the request body must be a JSON object, not a list"),
        (b'"Hi"', "the request body must be a JSON object, not a string"),
        (b"3", "the request body must be a JSON object, not a number"),
        (b"null", "the request body must be a JSON object, not null"),
    ],
)
def test_a_body_that_is_not_a_json_object_gets_400(fake, content, message):
    instances, client = fake
    answer = _post_raw(client, content)
    assert answer.status_code == 400 and _error(answer).startswith(message)
    assert answer.json()["error"]["type"] == "BadRequestError"
    assert not instances.request_ids  # nothing went to the instances


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"model": "tiny"}, 'the request body has no "prompt"'),
        ("/v1/completions", {"prompt": None}, 'the request body has no "prompt"'),
        ("/v1/chat/completions", {"prompt": "Hi"}, 'the request body has no "messages"'),
        ("/v1/chat/completions", {"messages": "Hi"}, '"messages" must be a list of messages'),
        ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, '"stream" must be true or false'),
    ],
)
def test_a_body_without_what_the_proxy_needs_gets_400(fake, path, body, message):
    instances, client = fake
    answer = client.post(path, json=body)
    assert answer.status_code == 400 and _error(answer).startswith(message)
    assert not instances.request_ids


def test_a_body_over_the_size_limit_gets_413():
    instances = FakeInstances()
    with _client(instances, max_body_bytes=100) as client:
        small = json.dumps({"prompt": "Hi"}).ljust(100).encode()
        assert _post_raw(client, small).status_code == 200  # exactly the limit
        answer = _post_raw(client, small + b" ")
        assert answer.status_code == 413
        message = "the request body is 101 bytes, over the proxy's limit of 100 bytes"
        assert _error(answer) == message + " (--max-body-bytes)"
        # Without a Content-Length (chunked): counted while read.
        chunked = client.post("/v1/completions", content=iter([small, b" "]))
        assert chunked.status_code == 413 and "over the proxy's limit of 100" in _error(chunked)
        bad_length = _post_raw(client, small, **{"content-length": "lots"})
        assert bad_length.status_code == 400
    assert len(instances.request_ids) == 2  # the one accepted body: prefill and decode


def test_limits_are_checked_at_construction_and_on_the_command_line():
    with pytest.raises(ValueError, match="max_connections=0"):
        proxy_mod.DisaggProxy(PREFILL, DECODE, max_connections=0)
    with pytest.raises(ValueError, match="pool_timeout=-1"):
        proxy_mod.DisaggProxy(PREFILL, DECODE, pool_timeout=-1)
    with pytest.raises(SystemExit) as e:
        proxy_mod.main(["--prefill", PREFILL, "--decode", DECODE, "--max-body-bytes", "0"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- request ids


def test_a_request_id_is_made_when_absent_and_sent_to_both_instances(fake):
    instances, client = fake
    answer = _completion(client)
    request_id = answer.headers["x-request-id"]
    assert answer.status_code == 200 and len(request_id) == 32
    assert instances.request_ids == [("prefill", request_id), ("decode", request_id)]
    assert _completion(client).headers["x-request-id"] != request_id  # a new one each


def test_a_valid_request_id_is_kept(fake):
    instances, client = fake
    body = {"prompt": "Hi", "stream": True}
    answer = client.post("/v1/completions", json=body, headers={"X-Request-Id": "job-7.a_b"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "job-7.a_b"
    assert instances.request_ids == [("prefill", "job-7.a_b"), ("decode", "job-7.a_b")]


@pytest.mark.parametrize("request_id", ["", "a b", "a/b", "x,y", "é", "x" * 129])
def test_an_invalid_request_id_is_refused(fake, request_id):
    instances, client = fake
    headers = {"X-Request-Id": request_id.encode()}  # bytes: non-ASCII goes as sent
    answer = client.post("/v1/completions", json={"prompt": "Hi"}, headers=headers)
    assert answer.status_code == 400 and "x-request-id" not in answer.headers
    assert "is not 1-128 characters of A-Z a-z 0-9 . _ -" in _error(answer)
    assert not instances.request_ids


# --------------------------------------------------------------------------- instances' answers


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (httpx.Response(200, text="<html>oops</html>"), "not JSON: '<html>oops</html>'"),
        (httpx.Response(200, json=[1, 2]), "a JSON list, not an object"),
        (httpx.Response(200, json={"text": "P"}), 'no "choices" list'),
        (
            httpx.Response(200, json={"choices": [], "kv_transfer_params": "x"}),
            '"kv_transfer_params" is a string, not an object',
        ),
    ],
)
@pytest.mark.parametrize("host", ["prefill", "decode"])
def test_a_malformed_answer_gives_502(fake, host, reply, problem):
    instances, client = fake
    instances.replies[host] = reply
    answer = _completion(client)
    url = {"prefill": PREFILL, "decode": DECODE}[host]
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "BadGateway"
    assert _error(answer) == (
        f"{host} instance {url} answered /v1/completions with a malformed reply: {problem}"
    )


def test_a_stream_that_is_not_an_event_stream_gives_502(fake):
    instances, client = fake
    instances.replies["decode"] = httpx.Response(200, json={"choices": []})
    answer = _completion(client, stream=True)
    assert answer.status_code == 502
    assert _error(answer) == (
        f"decode instance {DECODE} answered a streamed /v1/completions request with "
        "content-type 'application/json', not text/event-stream"
    )


def test_an_unexpected_status_gives_502(fake):
    instances, client = fake
    instances.replies["prefill"] = httpx.Response(302, headers={"location": "/elsewhere"})
    answer = _completion(client)
    assert answer.status_code == 502
    assert _error(answer) == (
        f"prefill instance {PREFILL} answered /v1/completions with an unexpected status 302"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_http_errors_keep_their_status_and_get_an_error_body(fake, stream):
    instances, client = fake
    vllm_error = {"error": {"message": "model 'x' does not exist", "code": 404}}
    instances.replies["decode"] = httpx.Response(404, json=vllm_error)
    answer = _completion(client, stream=stream)
    assert answer.status_code == 404 and answer.json() == vllm_error  # JSON: unchanged
    instances.replies["decode"] = httpx.Response(500, text="Internal Server Error")
    answer = _completion(client, stream=stream)
    assert answer.status_code == 500
    assert _error(answer) == f"decode instance {DECODE} answered 500: 'Internal Server Error'"


# --------------------------------------------------------------------------- KV left on prefill


NIXL_PARAMS = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_block_ids": [1]}


def test_decode_failing_after_prefill_says_the_prefill_kv_is_held(fake, caplog):
    instances, client = fake
    instances.kv_transfer_params = NIXL_PARAMS
    assert _completion(client).status_code == 200
    instances.decode_state = "down"
    with caplog.at_level(logging.WARNING, logger="disagg_proxy"):
        answer = client.post(
            "/v1/completions", json={"prompt": "Hi"}, headers={"X-Request-Id": "r1"}
        )
    assert answer.status_code == 503
    held = [r.getMessage() for r in caplog.records if "holds its KV blocks" in r.getMessage()]
    assert held == [
        "request r1: decode failed after prefill; unless the decode instance got the request "
        f"(it then frees them itself), the prefill instance {PREFILL} holds its KV blocks "
        "until the connector's lease ends (NixlConnector kv_lease_duration, 30 s by default)"
    ]


def test_nothing_is_held_without_kv_transfer_params_or_after_a_decode_answer(fake, caplog):
    instances, client = fake
    with caplog.at_level(logging.WARNING, logger="disagg_proxy"):
        instances.decode_state = "down"  # ExampleConnector: no kv_transfer_params
        assert _completion(client).status_code == 503
        instances.decode_state = "up"
        instances.kv_transfer_params = NIXL_PARAMS  # decode answered: it freed them
        instances.replies["decode"] = httpx.Response(400, json={"error": {"message": "no"}})
        assert _completion(client).status_code == 400
    assert not [r for r in caplog.records if "holds its KV blocks" in r.getMessage()]


# --------------------------------------------------------------------------- connection pool


class _Upstream(BaseHTTPRequestHandler):
    """A real instance on 127.0.0.1 (the pool limit needs real connections): models,
    one-token prefill answers, and decode streams that hold their connection until
    `server.release` is set (at most 5 s)."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._send(200, "application/json", json.dumps(MODELS).encode())

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            self._send(200, "application/json", b'{"choices": [{"text": "x"}]}')
            return
        self._send(200, "text/event-stream", b'data: {"choices": [{"text": "a"}]}\n\n')
        self.server.release.wait(timeout=5)
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status: int, content_type: str, content: bytes):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()  # HTTP/1.0: the answer ends when the connection closes
        self.wfile.write(content)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def real_instances():
    servers = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
        server.daemon_threads = True
        server.release = threading.Event()
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_port}" for s in servers], servers[1].release
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_past_max_connections_a_request_waits_pool_timeout_then_gets_503(real_instances):
    (prefill, decode), release = real_instances
    proxy = proxy_mod.DisaggProxy(prefill, decode, max_connections=1, pool_timeout=0.2)
    with TestClient(proxy_mod.build_app(proxy)) as client:
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "Hi", "stream": True}
        ) as held:
            assert held.status_code == 200  # its decode stream holds the one connection
            start = time.monotonic()
            busy = _completion(client)
            waited = time.monotonic() - start
            assert busy.status_code == 503 and 0.2 <= waited < 3
            assert _error(busy) == (
                "the proxy is busy: all 1 connections to the instances are in use "
                "(--max-connections) and none came free in 0.2 s (--pool-timeout)"
            )
            release.set()
            assert held.read().endswith(b"data: [DONE]\n\n")
        assert _completion(client).status_code == 200  # the connection is free again
