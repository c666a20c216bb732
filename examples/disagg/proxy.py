"""One OpenAI-compatible endpoint in front of a prefill and a decode vLLM instance.

    python examples/disagg/proxy.py --prefill http://127.0.0.1:8100 \
        --decode http://127.0.0.1:8200 --port 8000

Each `/v1/completions` or `/v1/chat/completions` request (streaming or not) goes

    client -> proxy -> prefill instance   same prompt, max_tokens=1, not streamed: computes
                                          the prompt's KV and hands it to the KV connector
                    -> decode instance    the original request (plus the prefill's
                                          `kv_transfer_params`, which NIXL needs): loads
                                          the prompt's KV and generates every token
           <- proxy <- decode's answer, streamed back as it comes

With `ExampleConnector` the KV travels through a shared folder (CPU); with `NixlConnector`
the decode instance pulls it from the prefill instance's memory, using the
`kv_transfer_params` the prefill answer carries (GPU).

At start-up the proxy waits for both instances and refuses to start (exit 2) when they
serve different models (`GET /v1/models`: the served names and the model path must
match). Every failure is an OpenAI-style error answer (`{"error": {"message", "type",
"code"}}`), never a traceback or a hang:

    client's request
      X-Request-Id not 1-128 chars of A-Za-z0-9._-  400 (refused, not replaced)
      body over --max-body-bytes (32 MiB)          413
      body not a JSON object, or without           400
        "prompt" (completions) / a "messages"
        list (chat), or "stream" not a boolean
    instances
      unreachable (connection refused)             503 at once
      all --max-connections connections busy       503 after waiting --pool-timeout s
      died during the request                      502 (streamed: a final `error` event)
      no answer within --timeout seconds           504
      answered an HTTP error (4xx, 5xx)            its status; its body when that is a
                                                   JSON object, else an error naming it
      answered 200 with something malformed        502
        (non-JSON, not an object, no "choices", a
        stream that is not `text/event-stream`),
        or another status (1xx, 3xx, ...)

Every answer to a generate request but the 400 for an invalid id carries its
`X-Request-Id` (the client's, or a new one), which the proxy also sends to both
instances. After a failure the decode instance's model is checked again before the
next request goes to it, so a restarted decode instance is used again as soon as it is
up.

The proxy cannot release the prefill instance's KV when the decode step fails: vLLM
0.32 has no endpoint for it (docs/disaggregated-prefill.md, "When decode fails after
the prefill").

Needs only fastapi, httpx and uvicorn (all three come with vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger("disagg_proxy")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")

# What NIXL's prefill side needs to keep the KV for a remote decode; other connectors
# ignore it.
PREFILL_KV_TRANSFER_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for a chat request with a few images
DEFAULT_MAX_CONNECTIONS = 256  # requests with an instance at once (one connection each)
DEFAULT_POOL_TIMEOUT = 30.0  # seconds a request waits for a free connection, then 503

# A client's X-Request-Id goes to vLLM's request id and NIXL's messages: letters,
# digits, ".", "_", "-"; anything else is refused (400), not replaced.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# NixlConnector's `kv_connector_extra_config` key and vLLM 0.32's default
# (nixl/base_scheduler.py): seconds the prefill instance keeps a request's KV blocks
# for a decode instance that does not read them.
NIXL_LEASE_KEY, NIXL_LEASE_DEFAULT_S = "kv_lease_duration", 30

ERROR_TYPES = {
    400: "BadRequestError",
    413: "RequestTooLarge",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class ModelMismatchError(ValueError):
    """The prefill and decode instances serve different models."""


class InstanceError(Exception):
    """An instance could not be reached, failed mid-request or answered something
    malformed: `status` is the proxy's HTTP answer (502, 503 or 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UpstreamHTTPError(InstanceError):
    """An instance answered an HTTP error (4xx, 5xx): the client gets that status, and
    the body when it is a JSON object (vLLM's errors are), else an error naming it."""

    def __init__(self, role: str, url: str, answer: httpx.Response):
        super().__init__(answer.status_code, f"{role} instance {url} answered {answer.status_code}")
        self.answer = answer

    def response(self) -> Response:
        try:
            is_object = isinstance(json.loads(self.answer.content), dict)
        except ValueError:
            is_object = False
        if is_object:
            return _passthrough(self.answer)
        return error_response(self.status, f"{self}: {_snippet(self.answer.content)}")


class ClientError(Exception):
    """The client's request cannot be forwarded: `status` is the proxy's answer (400
    or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- pure parts


def checked_request_id(given: str | None) -> str:
    """The request id to use: the client's `X-Request-Id` if it is one to
    REQUEST_ID_PATTERN, a new one if the client sent none; ClientError(400) else."""
    if given is None:
        return uuid.uuid4().hex
    if REQUEST_ID_PATTERN.fullmatch(given):
        return given
    raise ClientError(
        400,
        f"X-Request-Id {given[:64]!r}{'...' if len(given) > 64 else ''} is not 1-128 "
        "characters of A-Z a-z 0-9 . _ -: send such an id or none (the proxy makes one)",
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _json_kind(value: Any) -> str:
    """'a list', 'a string', ... for messages about a JSON value of the wrong kind."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), "a number")


def parse_request_body(raw: bytes, path: str) -> dict[str, Any]:
    """The client's request body as a dict; ClientError(400) saying what is wrong when
    it is not a JSON object or lacks what the proxy needs: "prompt" (or
    "prompt_embeds") for `/v1/completions`, a "messages" list for
    `/v1/chat/completions`, "stream" a boolean when given."""
    if not raw.strip():
        raise ClientError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise ClientError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ClientError(400, f"the request body must be a JSON object, not {_json_kind(body)}")
    if path == "/v1/chat/completions":
        if "messages" not in body:
            raise ClientError(400, 'the request body has no "messages" (a list of messages)')
        if not isinstance(body["messages"], list):
            kind = _json_kind(body["messages"])
            raise ClientError(400, f'"messages" must be a list of messages, not {kind}')
    elif body.get("prompt") is None and body.get("prompt_embeds") is None:
        raise ClientError(400, 'the request body has no "prompt" (nor "prompt_embeds")')
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ClientError(400, f'"stream" must be true or false, not {_json_kind(body["stream"])}')
    return body


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request for the prefill instance: the same prompt and sampling options, one
    token, one sequence, not streamed."""
    prefill = copy.deepcopy(body)
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill["stream"] = False
    prefill["n"] = 1
    for key in ("stream_options", "min_tokens", "best_of"):
        prefill.pop(key, None)
    prefill["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
    return prefill


def decode_request(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The request for the decode instance: the client's, plus the prefill answer's
    `kv_transfer_params` when it has any (NIXL: where to pull the KV from)."""
    decode = copy.deepcopy(body)
    params = prefill_answer.get("kv_transfer_params")
    if params:
        decode["kv_transfer_params"] = params
    else:
        decode.pop("kv_transfer_params", None)
    return decode


def generate_answer_problem(answer: Any) -> str | None:
    """What is wrong with a 200 answer to a completion or chat request (None: nothing):
    it must be a JSON object with a "choices" list and, if any, object
    `kv_transfer_params`."""
    if not isinstance(answer, dict):
        return f"a JSON {_json_kind(answer).removeprefix('a ')}, not an object"
    if not isinstance(answer.get("choices"), list):
        return 'no "choices" list'
    params = answer.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        return f'"kv_transfer_params" is {_json_kind(params)}, not an object'
    return None


def served_models(models_answer: dict[str, Any]) -> dict[str, str]:
    """`GET /v1/models` answer -> {served name: model path (vLLM's `root`)}."""
    return {m["id"]: m.get("root") or m["id"] for m in models_answer.get("data", [])}


def check_same_model(prefill: dict[str, str], decode: dict[str, str]) -> None:
    """Raise ModelMismatchError unless both instances serve the same names with the same
    model paths (`served_models` of each)."""
    if not prefill or not decode:
        raise ModelMismatchError(
            f"an instance serves no model: prefill {prefill or 'none'}, decode {decode or 'none'}"
        )
    if prefill != decode:
        raise ModelMismatchError(
            "the prefill and decode instances serve different models, so the decode "
            "instance cannot use the prefill's KV cache: prefill serves "
            f"{_describe(prefill)}, decode serves {_describe(decode)}. Start both with "
            "the same model and --served-model-name."
        )


def _describe(models: dict[str, str]) -> str:
    return ", ".join(f"{name!r} ({path})" for name, path in sorted(models.items()))


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error object, as vLLM's own server answers."""
    kind = ERROR_TYPES.get(status, "Error")
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def sse_error_event(status: int, message: str) -> bytes:
    """The last events of a stream that broke: the error, then `[DONE]`."""
    return f"data: {json.dumps(error_body(status, message))}\n\ndata: [DONE]\n\n".encode()


def _snippet(content: bytes) -> str:
    text = content.decode("utf-8", errors="replace")
    return repr(text[:100] + ("..." if len(text) > 100 else ""))


# --------------------------------------------------------------------------- the proxy


class DisaggProxy:
    """Forwards requests to the prefill, then the decode instance (see module docstring).

    At most `max_connections` requests are with the instances at once (one connection
    each); the next waits up to `pool_timeout` s for a free one, then gets 503. Request
    bodies over `max_body_bytes` get 413. `transport` replaces the network (tests pass
    an `httpx.MockTransport`, which has no connection pool)."""

    def __init__(
        self,
        prefill_url: str,
        decode_url: str,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    ):
        if max_body_bytes < 1 or max_connections < 1 or pool_timeout < 0:
            raise ValueError(
                f"max_body_bytes={max_body_bytes} and max_connections={max_connections} "
                f"must be at least 1, pool_timeout={pool_timeout} at least 0"
            )
        self.urls = {"prefill": prefill_url.rstrip("/"), "decode": decode_url.rstrip("/")}
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout, pool=pool_timeout)
        self._transport = transport
        self.client = self.new_client()
        self.models: dict[str, str] = {}  # the checked {served name: path}
        self.decode_checked = False

    def new_client(self) -> httpx.AsyncClient:
        """A client for the running event loop (httpx clients are bound to one)."""
        limits = httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_connections
        )
        return httpx.AsyncClient(timeout=self._timeout, limits=limits, transport=self._transport)

    # ---------------------------------------------------------------- model checks

    async def get_models(self, role: str) -> dict[str, str]:
        answer = await self.send(role, "GET", "/v1/models")
        if answer.status_code != 200:
            raise InstanceError(
                503, f"{role} instance {self.urls[role]}: GET /v1/models -> {answer.status_code}"
            )
        try:
            return served_models(answer.json())
        except (ValueError, AttributeError, KeyError, TypeError) as e:
            message = (
                f"{role} instance {self.urls[role]}: malformed GET /v1/models answer "
                f"{_snippet(answer.content)}: {e!r}"
            )
            raise InstanceError(502, message) from e

    async def check_models(self) -> None:
        """Check that both instances serve the same model; remember it."""
        prefill = await self.get_models("prefill")
        check_same_model(prefill, await self.get_models("decode"))
        self.models, self.decode_checked = prefill, True

    async def wait_and_check(self, wait: float) -> None:
        """Wait up to `wait` s for both instances to answer, then `check_models`."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return await self.check_models()
            except InstanceError as e:
                if time.monotonic() > deadline:
                    raise InstanceError(503, f"{e} (waited {wait:.0f} s)") from e
                await asyncio.sleep(1.0)

    async def _recheck_decode(self) -> None:
        """Before the first request and after a decode failure (the instance may have
        come back with another model)."""
        if not self.models:
            return await self.check_models()
        check_same_model(self.models, await self.get_models("decode"))
        self.decode_checked = True

    # ---------------------------------------------------------------- requests

    async def send(
        self,
        role: str,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request to an instance; network failures become InstanceError."""
        url = self.urls[role] + path
        try:
            request = self.client.build_request(method, url, json=body, headers=headers)
            return await self.client.send(request, stream=stream)
        except httpx.PoolTimeout as e:
            message = (
                f"the proxy is busy: all {self.max_connections} connections to the instances "
                f"are in use (--max-connections) and none came free in {self.pool_timeout:g} s "
                "(--pool-timeout)"
            )
            raise InstanceError(503, message) from e
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            if role == "decode":
                self.decode_checked = False
            message = f"{role} instance {self.urls[role]} is unreachable: {e!r}"
            raise InstanceError(503, message) from e
        except httpx.TimeoutException as e:
            raise InstanceError(504, f"{role} instance {url} did not answer in time: {e!r}") from e
        except httpx.TransportError as e:
            if role == "decode":
                self.decode_checked = False
            raise InstanceError(502, f"{role} instance {url} failed: {e!r}") from e

    async def generate(self, path: str, body: dict[str, Any], headers: dict) -> Response:
        """Prefill, then decode; the decode instance's answer goes back to the client.
        `body` is `parse_request_body`'s; `headers` carry the checked X-Request-Id."""
        try:
            if not self.decode_checked:
                await self._recheck_decode()
            prefill = await self.send("prefill", "POST", path, prefill_request(body), headers)
            prefill_answer = self._json_answer("prefill", path, prefill)
        except InstanceError as e:
            return self._failed(path, e)
        except ModelMismatchError as e:
            logger.error("%s", e)
            return error_response(503, str(e))
        try:
            return await self._decode(path, decode_request(body, prefill_answer), headers)
        except InstanceError as e:
            if not isinstance(e, UpstreamHTTPError):  # one that answered has freed it
                self._prefill_kv_left(headers.get("X-Request-Id"), prefill_answer)
            return self._failed(path, e)

    async def _decode(self, path: str, body: dict[str, Any], headers: dict) -> Response:
        if not body.get("stream"):
            answer = await self.send("decode", "POST", path, body, headers)
            self._json_answer("decode", path, answer)
            return _passthrough(answer)
        answer = await self.send("decode", "POST", path, body, headers, stream=True)
        if answer.status_code != 200:
            await answer.aread()
            await answer.aclose()
            self._raise_for_status("decode", path, answer)
        content_type = answer.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            await answer.aclose()
            raise InstanceError(
                502,
                f"decode instance {self.urls['decode']} answered a streamed {path} request "
                f"with content-type {content_type!r}, not text/event-stream",
            )
        return StreamingResponse(
            self._relay(answer), status_code=200, media_type="text/event-stream"
        )

    def _json_answer(self, role: str, path: str, answer: httpx.Response) -> dict[str, Any]:
        """A 200 answer's JSON object; InstanceError for an HTTP error or a malformed
        answer (`_raise_for_status`, `generate_answer_problem`)."""
        self._raise_for_status(role, path, answer)
        try:
            parsed = json.loads(answer.content)
        except ValueError:
            parsed, problem = None, f"not JSON: {_snippet(answer.content)}"
        else:
            problem = generate_answer_problem(parsed)
        if problem is not None:
            where = f"{role} instance {self.urls[role]}"
            raise InstanceError(502, f"{where} answered {path} with a malformed reply: {problem}")
        return parsed

    def _raise_for_status(self, role: str, path: str, answer: httpx.Response) -> None:
        """Nothing for a 200; an HTTP error (4xx, 5xx) becomes UpstreamHTTPError (passed
        on with its status), any other status InstanceError(502)."""
        if answer.status_code == 200:
            return
        if 400 <= answer.status_code < 600:
            raise UpstreamHTTPError(role, self.urls[role], answer)
        raise InstanceError(
            502,
            f"{role} instance {self.urls[role]} answered {path} with an unexpected status "
            f"{answer.status_code}",
        )

    def _failed(self, path: str, error: InstanceError) -> Response:
        if isinstance(error, UpstreamHTTPError):
            return error.response()
        logger.warning("%s %s: %s", path, error.status, error)
        return error_response(error.status, str(error))

    def _prefill_kv_left(self, request_id: str | None, prefill_answer: dict[str, Any]) -> None:
        """Decode failed after the prefill: say what the prefill instance still holds.
        vLLM 0.32 has no endpoint to release it (docs/disaggregated-prefill.md)."""
        if not prefill_answer.get("kv_transfer_params"):
            return  # ExampleConnector: nothing is held for the decode instance
        logger.warning(
            "request %s: decode failed after prefill; unless the decode instance got the "
            "request (it then frees them itself), the prefill instance %s holds its KV "
            "blocks until the connector's lease ends (NixlConnector %s, %d s by default)",
            request_id,
            self.urls["prefill"],
            NIXL_LEASE_KEY,
            NIXL_LEASE_DEFAULT_S,
        )

    async def _relay(self, answer: httpx.Response) -> AsyncIterator[bytes]:
        """Stream the decode instance's events; end with an error event if it breaks."""
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            self.decode_checked = False
            message = f"decode instance {self.urls['decode']} failed mid-stream: {e!r}"
            logger.warning("%s", message)
            yield sse_error_event(502, message)
        finally:
            await answer.aclose()


def _passthrough(answer: httpx.Response) -> Response:
    return Response(
        content=answer.content,
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type", "application/json"),
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read no further than `limit` bytes: ClientError(413) past it,
    (400) for a Content-Length that is not a number."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ClientError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            message = f"the request body is {int(declared)} bytes, over the proxy's limit of "
            raise ClientError(413, message + f"{limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            message = f"the request body is over the proxy's limit of {limit} bytes"
            raise ClientError(413, message + " (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(proxy: DisaggProxy) -> FastAPI:
    app = FastAPI(title="disaggregated prefill/decode proxy")

    async def generate(request: Request) -> Response:
        try:
            request_id = checked_request_id(request.headers.get("x-request-id"))
        except ClientError as e:
            return error_response(e.status, str(e))
        try:
            raw = await read_body(request, proxy.max_body_bytes)
            body = parse_request_body(raw, request.url.path)
        except ClientError as e:
            answer: Response = error_response(e.status, str(e))
        else:
            headers = {"X-Request-Id": request_id}
            if "authorization" in request.headers:
                headers["Authorization"] = request.headers["authorization"]
            answer = await proxy.generate(request.url.path, body, headers)
        answer.headers["X-Request-Id"] = request_id
        return answer

    for path in GENERATE_PATHS:
        app.add_api_route(path, generate, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            return _passthrough(await proxy.send("decode", "GET", "/v1/models"))
        except InstanceError as e:
            return error_response(e.status, str(e))

    @app.get("/health")
    async def health() -> Response:
        """200 when both instances answer their /health, else 503 naming the one down."""
        for role in ("prefill", "decode"):
            try:
                answer = await proxy.send(role, "GET", "/health")
            except InstanceError as e:
                return error_response(503, str(e))
            if answer.status_code != 200:
                message = f"{role} instance {proxy.urls[role]}: /health {answer.status_code}"
                return error_response(503, message)
        return Response(status_code=200)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", required=True, help="prefill instance URL")
    parser.add_argument("--decode", required=True, help="decode instance URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds an instance may take to answer"
    )
    parser.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for the instances at start-up"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections to the instances, i.e. requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--pool-timeout",
        type=float,
        default=DEFAULT_POOL_TIMEOUT,
        help="seconds a request past --max-connections waits for a free connection "
        "before it gets 503 (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s disagg_proxy %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    try:
        proxy = DisaggProxy(
            args.prefill,
            args.decode,
            timeout=args.timeout,
            max_body_bytes=args.max_body_bytes,
            max_connections=args.max_connections,
            pool_timeout=args.pool_timeout,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        asyncio.run(proxy.wait_and_check(args.wait))
    except (InstanceError, ModelMismatchError) as e:
        print(f"disagg proxy: refusing to start: {e}", file=sys.stderr, flush=True)
        return 2
    logger.info("serving %s on http://%s:%d", _describe(proxy.models), args.host, args.port)
    proxy.client = proxy.new_client()  # the check ran in an event loop of its own
    uvicorn.run(build_app(proxy), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
