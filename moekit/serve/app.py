"""The HTTP API: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (both with
streaming as server-sent events), ``/v1/models``, ``/health`` and ``/metrics`` (Prometheus), on
FastAPI.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status for what the client can fix (429 with a Retry-After header when
the server is full) and 5xx for what it cannot; the server goes on serving. A request whose
client goes away is cancelled at the next decoding step and its KV blocks freed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from moekit.serve.engine import Engine, Overloaded, Piece, RequestFailed, Sampling, Usage
from moekit.train.chat import render_chat

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


# The "object" of a whole answer and of a streamed chunk, by endpoint (OpenAI's names).
OBJECTS = {"cmpl": ("text_completion", "text_completion"),
           "chatcmpl": ("chat.completion", "chat.completion.chunk")}
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is there


def _error_body(message: str, kind: str = "invalid_request_error",
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(message, kind, code),
                        headers=headers)


def _failure_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


class _Request(BaseModel):
    """The sampling fields both endpoints share; unknown fields are ignored, as OpenAI's
    clients send some this server does not use."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def sampling(self, max_tokens: int | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}")
        return Sampling(max_tokens=max_tokens,
                        temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                        stop=stop, n=self.n)


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _event(chunk: dict | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"


class _Stream(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends (done, failed, or the
    client gone before or while it streamed)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def create_app(engine: Engine, api_key: str | None = None, max_request_bytes: int = 1 << 20,
               max_streams_per_client: int = 16) -> FastAPI:
    """The app serving ``engine``; with ``api_key``, /v1 requests need ``Authorization: Bearer
    <api_key>``; bodies over ``max_request_bytes`` are refused (413), and a client (by its
    address) with ``max_streams_per_client`` requests in flight gets 429 for the next."""
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)
    in_flight = Counter()  # requests per client address; only the event loop touches it

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, error.message, error.kind, error.code)

    @app.exception_handler(ValueError)  # the engine's and the library's checks
    async def value_error(request: Request, error: ValueError):
        return _error(400, str(error))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded):
        return _error(429, str(error), "rate_limit_error", "overloaded",
                      headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(RequestFailed)
    async def request_failed(request: Request, error: RequestFailed):
        return _error(error.status, str(error), _failure_kind(error.status))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in error.errors())
        return _error(400, f"bad request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.middleware("http")
    async def limits_and_key(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "a Content-Length header is required")
            if int(length) > max_request_bytes:
                return _error(413, f"request body of {int(length):,} bytes is over this "
                                   f"server's limit of {max_request_bytes:,}")
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                              "authentication_error", "invalid_api_key")
        return await call_next(request)

    def check_model(request: _Request) -> None:
        if request.model is not None and request.model not in (engine.name, *engine.aliases):
            raise ApiError(404, f"model {request.model!r} does not exist; this server serves "
                                f"{engine.name!r}", code="model_not_found")

    def take_slot(client: str) -> None:
        if in_flight[client] >= max_streams_per_client:
            raise Overloaded(f"client {client} has {in_flight[client]} requests in flight, "
                             f"this server's limit per client", retry_after=1)
        in_flight[client] += 1

    def give_slot(client: str) -> None:
        in_flight[client] -= 1
        if not in_flight[client]:
            del in_flight[client]

    async def respond(http: Request, request: _Request, prompts: list[str],
                      max_tokens: int | None, kind: str, shape):
        """Run the request; ``shape(piece)`` is one choice's JSON for a piece (streaming) and
        ``shape(Piece(i, whole text, finish))`` the choice of the whole answer."""
        check_model(request)
        sampling = request.sampling(max_tokens)
        client = http.client.host if http.client else "unknown"
        take_slot(client)
        try:
            ticket = engine.submit(prompts, sampling, asyncio.get_running_loop())
        except BaseException:
            give_slot(client)
            raise
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": engine.name}
        obj, chunk_obj = OBJECTS[kind]
        if request.stream:
            with_usage = bool((request.stream_options or {}).get("include_usage"))

            def close():
                ticket.cancel()  # a no-op once it has finished
                give_slot(client)
            return _Stream(_events(ticket, {**head, "object": chunk_obj}, shape, with_usage),
                           close)
        try:
            texts, finish = {}, {}
            while (piece := await _next_or_gone(ticket, http)) is not None:
                texts[piece.index] = texts.get(piece.index, "") + piece.text
                finish[piece.index] = piece.finish_reason or finish.get(piece.index)
        finally:
            ticket.cancel()
            give_slot(client)
        choices = [shape(Piece(i, texts.get(i, ""), finish.get(i)), streaming=False)
                   for i in range(len(prompts) * sampling.n)]
        return {**head, "object": obj, "choices": choices, "usage": _usage(ticket.usage)}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt must be a string or a non-empty list of strings")

        def shape(piece: Piece, streaming: bool) -> dict:
            return {"index": piece.index, "text": piece.text, "logprobs": None,
                    "finish_reason": piece.finish_reason}
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's
        return await respond(http, request, prompts, max_tokens, "cmpl", shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        eos = engine.tokenizer.backend.id_to_token(engine.tokenizer.eos_id)
        prompt = render_chat([m.model_dump() for m in request.messages], engine.chat_template,
                             eos)

        def shape(piece: Piece, streaming: bool) -> dict:
            message = {"role": "assistant", "content": piece.text}
            return {"index": piece.index, "finish_reason": piece.finish_reason,
                    "delta" if streaming else "message": message, "logprobs": None}
        return await respond(http, request, [prompt],
                             request.max_completion_tokens or request.max_tokens, "chatcmpl",
                             shape)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": 0, "owned_by": "moekit"}]}

    @app.get("/health")
    def health():  # 503 once shutting down, so that a load balancer sends no more
        if not engine.scheduler.admitting:
            return JSONResponse(status_code=503, content={"status": "shutting down"})
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(engine.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


async def _next_or_gone(ticket, http: Request) -> Piece | None:
    """The ticket's next piece; cancels it (and raises RequestFailed) if the client left."""
    while True:
        try:
            return await asyncio.wait_for(ticket.next_piece(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                ticket.cancel()
                raise RequestFailed(499, "the client went away") from None


async def _events(ticket, head: dict, shape, with_usage: bool):
    """The server-sent events of a streaming answer (each chunk ``head`` + its choices); a
    failure after the first byte (the status is sent by then) comes as an error event."""
    try:
        while (piece := await ticket.next_piece()) is not None:
            yield _event({**head, "choices": [shape(piece, streaming=True)]})
        if with_usage:
            yield _event({**head, "choices": [], "usage": _usage(ticket.usage)})
    except RequestFailed as failure:
        yield _event(_error_body(str(failure), _failure_kind(failure.status)))
    yield _event("[DONE]")
