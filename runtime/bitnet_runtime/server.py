"""An OpenAI-compatible HTTP server over the continuous-batching engine (engine.py).

POST /v1/completions and /v1/chat/completions (whole or streamed as server-sent events),
GET /v1/models, /health and /metrics (Prometheus text). Starlette and uvicorn carry the HTTP,
pydantic checks the requests (openai_api.py), prometheus-client writes the metrics: the
``serve`` extra, so a device that only runs ``run`` and ``chat`` installs none of them.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a
malformed or invalid request or a prompt beyond the context, 404 for an unknown model or
path, 413 for a body over MAX_BODY, 429 when the queue is full, 503 when the engine is down
or the server is shutting down. A client that disconnects cancels its generation; its
sequence slot is free at the next step. SIGTERM (uvicorn's graceful shutdown) stops taking
requests and lets the running ones finish.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Delta, Done, Engine, QueueFull, Request
from .errors import UserError
from .openai_api import ChatRequest, CompletionRequest, Shaper, error_body
from .server_metrics import Metrics

MAX_BODY = 4 << 20  # bytes of a request body: a context of text is far below it
GRACE_SECONDS = 120  # on SIGTERM, how long requests in flight may take to finish
SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while another waits (Python's default: 5 ms)
DISCONNECT_POLL = 0.5  # seconds between checks for a vanished client of a non-streamed request


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, code, param)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status)


async def _json_body(http: HttpRequest) -> object:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    body = b""
    async for part in http.stream():
        body += part
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


def _validated(cls, body: object):
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None


async def _internal_error(http: HttpRequest, err: Exception) -> JSONResponse:
    """A bug: still OpenAI's error shape for the client (uvicorn logs the traceback)."""
    return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Mailbox:
    """Events from the engine thread to the requests' queues on the event loop, delivered in
    one wake-up of the loop per burst: a decode step of 16 sequences emits 16 events at once,
    and one wake-up instead of 16 leaves the cores to the kernels."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, queue: asyncio.Queue, event: object) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class Server:
    """The routes over one engine and the model's tokenizer, under the name ``model_name``."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, engine.tokenizer, model_name
        self.metrics = Metrics(engine)
        self.mailbox = Mailbox()
        self.draining = False
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]
        handlers = {HTTPException: self._http_error, Exception: _internal_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    async def _http_error(self, http: HttpRequest, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{http.method} {http.url.path}: {err.detail}", kind), status_code=err.status_code)

    async def models(self, http: HttpRequest) -> JSONResponse:
        entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "bitnet-compile"}
        return JSONResponse({"object": "list", "data": [entry | {"max_model_len": self.engine.context_length}]})

    async def health(self, http: HttpRequest) -> JSONResponse:
        if not self.engine.alive or self.draining:
            return JSONResponse(error_body("the engine is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, http: HttpRequest) -> Response:
        return Response(self.metrics.text(), media_type=self.metrics.content_type)

    async def completions(self, http: HttpRequest) -> Response:
        return await self._generate(http, chat=False)

    async def chat(self, http: HttpRequest) -> Response:
        return await self._generate(http, chat=True)

    async def _generate(self, http: HttpRequest, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            job, queue, shaper, stream, usage = await self._accept(http, chat)
        except ApiError as err:
            self.metrics.request(endpoint, err.status)
            return _error_response(err)
        self.metrics.request(endpoint, 200)
        events = self._events(job, queue)
        if stream:
            return StreamingResponse(
                self._streamed(job, events, shaper, usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._whole(http, job, events, shaper)

    async def _accept(self, http: HttpRequest, chat: bool) -> tuple:
        """The request parsed, checked and queued: (job, its event queue, shaper, stream?, usage?)."""
        if not self.engine.alive or self.draining:
            raise ApiError(503, "the server is not accepting requests", "server_error", "unavailable")
        self.mailbox.bind(asyncio.get_running_loop())
        req = _validated(ChatRequest if chat else CompletionRequest, await _json_body(http))
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} does not exist; this server has {self.model_name!r}",
                "not_found_error",
                "model_not_found",
                "model",
            )
        if (field := req.unsupported()) is not None:
            raise ApiError(400, f"{field} is not supported by this server", param=field)
        try:
            ids, sampling = req.prompt_ids(self.tokenizer), req.sampling()
        except (UserError, ValueError, TypeError) as err:  # a lone surrogate in the text, say
            raise ApiError(400, f"the prompt cannot be tokenized: {err}" if not isinstance(err, UserError) else str(err)) from None
        context = self.engine.context_length
        if len(ids) >= context:
            raise ApiError(
                400, f"the prompt has {len(ids)} tokens; this server's context holds {context} per request", code="context_length_exceeded"
            )
        limit = req.token_limit()
        queue: asyncio.Queue = asyncio.Queue()
        emit: Callable = lambda event: self.mailbox.post(queue, event)  # noqa: E731
        job = Request(ids, context if limit is None else limit, sampling, emit, req.stops(), req.logprob_count(), req.ignore_eos)
        try:
            self.engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", "queue_full") from None
        except UserError as err:
            raise ApiError(400, str(err)) from None
        return job, queue, Shaper(chat, self.model_name, self.tokenizer), req.stream, req.include_usage

    async def _events(self, job: Request, queue: asyncio.Queue) -> AsyncIterator[Delta | Done]:
        """The job's events as they come, timed for the latency histograms."""
        last = None
        while True:
            event = await queue.get()
            now = time.perf_counter()
            if isinstance(event, Delta) and event.token is not None:
                self.metrics.token(now - (job.arrived if last is None else last), first=last is None)
                last = now
            yield event
            if isinstance(event, Done):
                return

    async def _whole(self, http: HttpRequest, job: Request, events: AsyncIterator, shaper: Shaper) -> Response:
        deltas: list[Delta] = []
        watcher = asyncio.ensure_future(_cancel_when_gone(http, job))
        try:
            async for event in events:
                if isinstance(event, Delta):
                    deltas.append(event)
        finally:
            watcher.cancel()
        if event.finish_reason == "cancelled":
            return Response(status_code=499)  # nobody is listening
        if event.finish_reason == "error":
            return _error_response(ApiError(500, event.message, "server_error"))
        text = "".join(d.text for d in deltas)
        return JSONResponse(shaper.whole(text, deltas, event.finish_reason, event.prompt_tokens, event.completion_tokens))

    async def _streamed(self, job: Request, events: AsyncIterator, shaper: Shaper, include_usage: bool) -> AsyncIterator[str]:
        first = True
        try:
            async for event in events:
                if isinstance(event, Delta):
                    if event.text or event.logprob is not None or first:
                        yield _sse(shaper.chunk(event.text, [event], None, first))
                        first = False
                    continue
                if event.finish_reason == "error":
                    yield _sse(error_body(event.message, "server_error"))
                else:
                    yield _sse(shaper.chunk(None if shaper.chat else "", [], event.finish_reason, first))
                    if include_usage:
                        yield _sse(shaper.usage_chunk(event.prompt_tokens, event.completion_tokens))
                yield _sse("[DONE]")
        finally:
            job.cancelled = True  # a vanished client stops its generation; after Done this changes nothing


async def _cancel_when_gone(http: HttpRequest, job: Request) -> None:
    """Cancel a non-streamed job whose client disconnects (a streamed one notices by itself)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL)
    job.cancelled = True


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the server starts, so a port in use is a one-line error, not uvicorn's exit."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as err:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
    sock.listen(2048)
    return sock


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def serve(engine: Engine, model_name: str, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; then finish the requests in flight and stop."""
    import uvicorn

    sock = _listening_socket(host, port)
    server = Server(engine, model_name)
    kv = engine.max_seqs * engine.context_length * engine.kv_bytes_per_token()
    print(
        f"serving {model_name} at http://{host}:{sock.getsockname()[1]}/v1: {engine.max_seqs} sequence{'s' * (engine.max_seqs != 1)} of up to "
        f"{engine.context_length} tokens decoded together, KV cache at most {_size(kv)} (mapped as it fills), "
        f"{engine.max_queue} more requests queued at most",
        file=sys.stderr,
        flush=True,
    )
    engine.start()
    sys.setswitchinterval(SWITCH_INTERVAL)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=GRACE_SECONDS)
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it stopped on once it
        signal.signal(sig, lambda *_: None)  # has drained: let it land here, so the engine stops cleanly
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.draining = True
        engine.stop()
    print("server stopped", file=sys.stderr)
