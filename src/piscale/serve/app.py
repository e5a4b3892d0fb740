"""The HTTP application: routes, authentication, errors, lifecycle.

Routes (OpenAI's, plus vLLM's tokenizer endpoints so that clients which
tokenize through the server, such as ``piscale.lm.openai.OpenAILM``, work):

| route | what |
|---|---|
| ``POST /v1/chat/completions`` | chat, plain or scaled, streamed or not |
| ``POST /v1/completions`` | text or token-id prompts, plain or scaled, streamed or not |
| ``GET /v1/models`` | the served model (with its context length) and its presets |
| ``POST /tokenize``, ``POST /detokenize`` | the model's tokenizer (vLLM's request shapes) |
| ``GET /health`` | 200 once the model is loaded |
| ``GET /metrics`` | Prometheus text |

With an API key configured, the /v1 and tokenizer routes need
``Authorization: Bearer KEY`` (or ``x-api-key: KEY``); /health and /metrics
stay open for probes.

Nothing a request sends can stall the others: bodies are read up to
``max_body_bytes`` (413 above it) and parsed strictly (JSON's own grammar:
no NaN or Infinity, at most ``MAX_JSON_DEPTH`` levels of nesting); planning,
which tokenises, runs on a worker thread, not on the event loop; at most
``max_concurrency`` requests are handled at once (429 above it). Requests
that fail inside the server get a 500 naming the request's id, never the
exception's text.

All state (the backend, kept sequences, metrics) lives on ``app.state.service``,
created when the app starts; ``create_app`` can be given a ready backend
(tests, embedding the server in another program).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from piscale.grading import install_pool
from piscale.lm.base import LanguageModel
from piscale.serve.config import ServerConfig
from piscale.serve.errors import APIError, bad_request, internal_error, server_full, too_large
from piscale.serve.plan import Plan
from piscale.serve.render import json_safe
from piscale.serve.schema import ChatRequest, CompletionRequest, parse
from piscale.serve.service import ClientGone, Service

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, lm: LanguageModel | None = None) -> FastAPI:
    """The server for ``config``; ``lm`` (if given) is served instead of
    loading ``config.model``, and is not closed when the app stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if lm is None:
            from piscale.lm import load

            backend = load(config.model, engine=config.engine, device=config.device, **config.backend_options)
        else:
            backend = lm
        service = Service(config, backend)
        service.rewards.preload()
        app.state.service = service
        previous_pool = None
        if service.grading is not None:
            service.grading.start()
            previous_pool = install_pool(service.grading)
        log.info("serving %s (%s) as %r", config.model, type(backend).__name__, config.model_name)
        try:
            yield
        finally:
            if service.grading is not None:
                install_pool(previous_pool)
            await service.close()
            if lm is None:
                await backend.close()

    app = FastAPI(title="piscale", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ConcurrencyLimit, limit=config.max_concurrency)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        failure = internal_error(uuid.uuid4().hex[:24])
        log.error("%s %s failed: %s", request.method, request.url.path, failure.message, exc_info=error)
        return _error(failure)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(request, "chat", lambda service, body: service.plan_chat(parse(ChatRequest, body)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(
            request, "completions", lambda service, body: service.plan_completion(parse(CompletionRequest, body))
        )

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        service: Service = request.app.state.service
        try:
            _authorize(request, service.config)
        except APIError as error:
            return _error(error)
        name = service.config.model_name

        def card(model_id: str, **extra: Any) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": "piscale",
                "root": service.config.model,
                "max_model_len": service.lm.context_length,
                **extra,
            }

        data = [card(name)]
        for preset_name, preset in sorted(service.config.presets.items()):
            data.append(card(f"{name}:{preset_name}", piscale={"algorithm": preset.algorithm, "budget": preset.budget}))
        return JSONResponse({"object": "list", "data": data})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        service: Service = request.app.state.service
        try:
            _authorize(request, service.config)
            body = await _json(request, service)
            if not isinstance(body, dict):
                raise bad_request("the request body must be a JSON object", param="prompt")
            if "messages" in body:
                parsed = parse(ChatRequest, {"model": service.config.model_name, **body})
                messages = [m.plain(i) for i, m in enumerate(parsed.messages)]
                add = parsed.add_generation_prompt and not parsed.continue_final_message
                tokens = await service.offload(
                    service.lm.chat, messages, add_generation_prompt=add, continue_final_message=parsed.continue_final_message
                )
            elif isinstance(body.get("prompt"), str):
                tokens = await service.offload(service.lm.encode, body["prompt"])
            else:
                raise bad_request("tokenize needs a string prompt or a list of messages", param="prompt")
        except APIError as error:
            return _error(error)
        except ValueError as error:
            return _error(bad_request(str(error)))
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": service.lm.context_length})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        service: Service = request.app.state.service
        try:
            _authorize(request, service.config)
            body = await _json(request, service)
            if not isinstance(body, dict):
                raise bad_request("the request body must be a JSON object", param="tokens")
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise bad_request("detokenize needs tokens: a list of token ids", param="tokens")
            size = service.vocabulary_size
            if size is not None and any(not 0 <= t < size for t in tokens):
                raise bad_request(f"token ids must lie in [0, {size})", param="tokens")
            text = service.lm.decode(tokens)
        except APIError as error:
            return _error(error)
        except (ValueError, IndexError) as error:
            return _error(bad_request(str(error)))
        return JSONResponse({"prompt": text})

    @app.get("/health")
    async def health(request: Request) -> Response:
        service: Service = request.app.state.service
        return JSONResponse({"status": "ok", "model": service.config.model_name})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        service: Service = request.app.state.service
        text = service.metrics.render(service.lm, service.gauges())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


async def _answer(request: Request, endpoint: str, planner: Callable[[Service, Any], Plan]) -> Response:
    """Plan, run and answer one completion request, counting it in the metrics."""
    service: Service = request.app.state.service
    started = time.perf_counter()
    status = 200
    streaming = False
    service.metrics.in_flight += 1
    try:
        _authorize(request, service.config)
        body = await _json(request, service)
        # Planning tokenises: off the event loop, so that a long prompt does
        # not hold up every other request.
        plan = await service.offload(planner, service, body)
        service.check_room(plan)
        if plan.stream:
            # From here the stream counts itself, once it starts (a stream
            # the client abandons before its first byte never runs at all).
            streaming = True
            service.metrics.in_flight -= 1
            return StreamingResponse(
                _observed(service, endpoint, started, service.stream(plan)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        body = await service.complete(plan, disconnected=lambda: _disconnection(request))
        return JSONResponse(json_safe(body))
    except APIError as error:
        status = error.status
        if status in (413, 429):
            service.metrics.turned_away += error.code != "server_full"  # the gate counts its own
        return _error(error)
    except ClientGone:
        status = 499
        return Response(status_code=499)
    except Exception:
        failure = internal_error(uuid.uuid4().hex[:24])
        log.exception("request to %s failed: %s", endpoint, failure.message)
        status = 500
        return _error(failure)
    finally:
        if not streaming:
            service.metrics.in_flight -= 1
            service.metrics.observe(endpoint, status, time.perf_counter() - started)


async def _observed(service: Service, endpoint: str, started: float, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream, with the request counted when it ends however it ends."""
    status = 200
    service.metrics.in_flight += 1
    try:
        async for event in events:
            if status == 200 and event.startswith('data: {"error"'):
                status = _status_of(event)
            yield event
    except BaseException:
        status = 499
        raise
    finally:
        service.metrics.in_flight -= 1
        service.metrics.observe(endpoint, status, time.perf_counter() - started)


def _status_of(event: str) -> int:
    """The HTTP status an error event stands for (the stream itself began with 200)."""
    kind = json.loads(event[len("data: ") :])["error"].get("type")
    return {"timeout_error": 408, "server_error": 500, "not_found_error": 404}.get(kind, 400)


async def _disconnection(request: Request) -> None:
    """Returns when the client has gone (the body is read by then, so the
    next ASGI message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have."""


async def _json(request: Request, service: Service) -> Any:
    """The body as JSON: at most ``max_body_bytes`` (413), strictly JSON (no
    NaN or Infinity), nested at most ``MAX_JSON_DEPTH`` deep (400). Parsed
    on the planning thread, off the event loop."""
    limit = service.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"the request body has {int(declared)} bytes; this server reads at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"the request body is over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return await service.offload(parse_json, b"".join(chunks))


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or a 400: not JSON, NaN or Infinity (Python's parser
    takes them; JSON has no such numbers), or nested over ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request(f"the request body nests too deeply; at most {MAX_JSON_DEPTH} levels are allowed") from None
    except ValueError as error:
        raise bad_request(str(error)) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests too deeply; at most {MAX_JSON_DEPTH} levels are allowed")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the request body holds the number {text[:40]}, too large for a float")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"the request body is not valid JSON: {name} is not a JSON number")


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (0 for a scalar)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _authorize(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        key = request.headers.get("x-api-key", "")
    if not key:
        raise APIError(401, "this server needs an API key: send Authorization: Bearer <key>", code="missing_api_key")
    if not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
        raise APIError(401, "the API key is not valid for this server", code="invalid_api_key")


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` requests at once on every route
    but /health and /metrics (streams count until they end); one more gets
    a 429 at once, before its body is read."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            error = server_full(f"the server is handling {self.active} requests, its limit; retry later")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
