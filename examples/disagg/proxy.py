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
match). Failures give OpenAI-style error answers instead of hangs:

    prefill or decode instance unreachable   503 at once (connection refused)
    instance died during the request         502 (streamed: a final `error` event)
    no answer within --timeout seconds       504
    instance answered an error               its status and body, unchanged

After a failure the decode instance's model is checked again before the next request
goes to it, so a restarted decode instance is used again as soon as it is up.

Needs only fastapi, httpx and uvicorn (all three come with vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
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


class ModelMismatchError(ValueError):
    """The prefill and decode instances serve different models."""


class InstanceError(Exception):
    """An instance could not be reached or failed mid-request: `status` is the proxy's
    HTTP answer (502, 503 or 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- pure parts


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
    kinds = {502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}
    return {"error": {"message": message, "type": kinds.get(status, "Error"), "code": status}}


def sse_error_event(status: int, message: str) -> bytes:
    """The last events of a stream that broke: the error, then `[DONE]`."""
    return f"data: {json.dumps(error_body(status, message))}\n\ndata: [DONE]\n\n".encode()


# --------------------------------------------------------------------------- the proxy


class DisaggProxy:
    """Forwards requests to the prefill, then the decode instance (see module docstring).

    `transport` replaces the network (tests pass an `httpx.MockTransport`)."""

    def __init__(
        self,
        prefill_url: str,
        decode_url: str,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.urls = {"prefill": prefill_url.rstrip("/"), "decode": decode_url.rstrip("/")}
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._transport = transport
        self.client = self.new_client()
        self.models: dict[str, str] = {}  # the checked {served name: path}
        self.decode_checked = False

    def new_client(self) -> httpx.AsyncClient:
        """A client for the running event loop (httpx clients are bound to one)."""
        return httpx.AsyncClient(timeout=self._timeout, transport=self._transport)

    # ---------------------------------------------------------------- model checks

    async def get_models(self, role: str) -> dict[str, str]:
        answer = await self.send(role, "GET", "/v1/models")
        if answer.status_code != 200:
            raise InstanceError(
                503, f"{role} instance {self.urls[role]}: GET /v1/models -> {answer.status_code}"
            )
        return served_models(answer.json())

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
        """Prefill, then decode; the decode instance's answer goes back to the client."""
        try:
            if not self.decode_checked:
                await self._recheck_decode()
            prefill = await self.send("prefill", "POST", path, prefill_request(body), headers)
            if prefill.status_code != 200:
                return _passthrough(prefill)
            decode_body = decode_request(body, prefill.json())
            if not body.get("stream"):
                return _passthrough(await self.send("decode", "POST", path, decode_body, headers))
            answer = await self.send("decode", "POST", path, decode_body, headers, stream=True)
        except InstanceError as e:
            logger.warning("%s %s: %s", path, e.status, e)
            return JSONResponse(error_body(e.status, str(e)), status_code=e.status)
        except ModelMismatchError as e:
            logger.error("%s", e)
            return JSONResponse(error_body(503, str(e)), status_code=503)
        if answer.status_code != 200:
            await answer.aread()
            return _passthrough(answer)
        return StreamingResponse(
            self._relay(answer), status_code=200, media_type="text/event-stream"
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


def _forwarded_headers(request: Request) -> dict[str, str]:
    headers = {"X-Request-Id": request.headers.get("x-request-id") or uuid.uuid4().hex}
    if "authorization" in request.headers:
        headers["Authorization"] = request.headers["authorization"]
    return headers


def build_app(proxy: DisaggProxy) -> FastAPI:
    app = FastAPI(title="disaggregated prefill/decode proxy")

    async def generate(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(error_body(400, "the body is not JSON"), status_code=400)
        return await proxy.generate(request.url.path, body, _forwarded_headers(request))

    for path in GENERATE_PATHS:
        app.add_api_route(path, generate, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            return _passthrough(await proxy.send("decode", "GET", "/v1/models"))
        except InstanceError as e:
            return JSONResponse(error_body(e.status, str(e)), status_code=e.status)

    @app.get("/health")
    async def health() -> Response:
        """200 when both instances answer their /health, else 503 naming the one down."""
        for role in ("prefill", "decode"):
            try:
                answer = await proxy.send(role, "GET", "/health")
            except InstanceError as e:
                return JSONResponse(error_body(503, str(e)), status_code=503)
            if answer.status_code != 200:
                message = f"{role} instance {proxy.urls[role]}: /health {answer.status_code}"
                return JSONResponse(error_body(503, message), status_code=503)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s disagg_proxy %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    proxy = DisaggProxy(args.prefill, args.decode, timeout=args.timeout)
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
