"""The HTTP API: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (both with
streaming as server-sent events), ``/v1/models`` and ``/health``, on FastAPI.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status for what the client can fix; the server goes on serving.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from moekit.serve.engine import Engine, Piece, Sampling, Usage
from moekit.train.chat import render_chat

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": None, "code": code}})


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


def _events(chunks: Iterator[dict]) -> Iterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def create_app(engine: Engine, api_key: str | None = None,
               max_request_bytes: int = 1 << 20) -> FastAPI:
    """The app serving ``engine``; with ``api_key``, /v1 requests need ``Authorization: Bearer
    <api_key>``; bodies over ``max_request_bytes`` are refused (413)."""
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, error.message, error.kind, error.code)

    @app.exception_handler(ValueError)  # the engine's and the library's checks
    async def value_error(request: Request, error: ValueError):
        return _error(400, str(error))

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

    def respond(request: _Request, prompts: list[str], max_tokens: int | None, kind: str,
                shape):
        """Run the request; ``shape(piece)`` is one choice's JSON for a piece (streaming) and
        ``shape(Piece(i, whole text, finish))`` the choice of the whole answer."""
        check_model(request)
        sampling = request.sampling(max_tokens)
        pieces, usage = engine.complete(prompts, sampling)
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": engine.name}
        if request.stream:
            obj = "text_completion" if kind == "cmpl" else "chat.completion.chunk"
            with_usage = bool((request.stream_options or {}).get("include_usage"))

            def chunks():
                for piece in pieces:
                    yield {**head, "object": obj, "choices": [shape(piece, streaming=True)]}
                if with_usage:
                    yield {**head, "object": obj, "choices": [], "usage": _usage(usage)}
            return StreamingResponse(_events(chunks()), media_type="text/event-stream")
        texts, finish = {}, {}
        for piece in pieces:
            texts[piece.index] = texts.get(piece.index, "") + piece.text
            finish[piece.index] = piece.finish_reason or finish.get(piece.index)
        choices = [shape(Piece(i, texts.get(i, ""), finish.get(i)), streaming=False)
                   for i in range(len(prompts) * sampling.n)]
        return {**head, "object": "text_completion" if kind == "cmpl" else "chat.completion",
                "choices": choices, "usage": _usage(usage)}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt must be a string or a non-empty list of strings")

        def shape(piece: Piece, streaming: bool) -> dict:
            return {"index": piece.index, "text": piece.text, "logprobs": None,
                    "finish_reason": piece.finish_reason}
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's
        return respond(request, prompts, max_tokens, "cmpl", shape)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        eos = engine.tokenizer.backend.id_to_token(engine.tokenizer.eos_id)
        prompt = render_chat([m.model_dump() for m in request.messages], engine.chat_template,
                             eos)

        def shape(piece: Piece, streaming: bool) -> dict:
            message = {"role": "assistant", "content": piece.text}
            return {"index": piece.index, "finish_reason": piece.finish_reason,
                    "delta" if streaming else "message": message, "logprobs": None}
        return respond(request, [prompt], request.max_completion_tokens or request.max_tokens,
                       "chatcmpl", shape)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": 0, "owned_by": "moekit"}]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app
