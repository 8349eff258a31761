"""``ccmem serve``: an OpenAI-compatible HTTP server that keeps each conversation as a compressed memory.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/chat/completions``: OpenAI's chat completions, non-streaming or streaming (server-sent events).
  ccmem extension: ``"session": NAME`` in the body (``extra_body={"session": NAME}`` with the ``openai``
  client) answers from that stored session and saves the exchange into it. How messages meet the memory:
  :mod:`ccmem.serve.engine`.
- ``GET /v1/models``: the one model served (its id is ``<model>:<method>``).
- ``POST /v1/sessions``, ``GET /v1/sessions``, ``GET /v1/sessions/{name}``, ``DELETE /v1/sessions/{name}``.
- ``GET /health``.

With tokens configured, every request to ``/v1/`` needs ``Authorization: Bearer <token>``, and a session
is visible only to the token that made it. Errors are OpenAI-shaped ``{"error": {"message", "type", "code"}}``
with status 400 (bad request), 401, 404 (unknown model or session), 409 (a session conflict, or the session limit
reached), 413 (too large).
"""

from __future__ import annotations

import difflib
import errno
import hmac
import json
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccmem.api import ContextTooLongError
from ccmem.chat import Message, check_text
from ccmem.serve.engine import Answer, AnswerPieces, ConflictError, Engine, Params
from ccmem.serve.sessions import (
    NAME_RULE,
    DamagedSessionError,
    SessionError,
    SessionExistsError,
    SessionLimitError,
    SessionMismatchError,
    SessionRecord,
    StoreError,
    UnknownSessionError,
    VersionConflictError,
    check_name,
    owner_of,
)

SESSION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


# ---------------------------------------------------------------- request and response bodies


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' (OpenAI's newer name for instructions) is read as 'system'"
    )
    content: str | list[TextPart]
    name: str | None = Field(
        default=None,
        description="accepted as OpenAI clients send it, not shown to the model (the chat template has no place for "
        "a participant's name); put the name in the content where the model should read it",
    )


def _unsupported(key: str, value: Any) -> bool:
    """Whether an OpenAI parameter ccmem does not implement is set to something other than its 'off' value."""
    if key in ("tool_choice", "function_call"):
        return value not in ("none", "auto")
    if key == "response_format":
        return not (isinstance(value, dict) and value.get("type") == "text")
    if key == "modalities":
        return value != ["text"]
    return bool(value)


#: OpenAI parameters that would change the answer and that ccmem does not implement: refused when set, never
#: silently ignored (fields ccmem has no use for that change nothing, such as ``user`` or ``metadata``, pass).
UNSUPPORTED = (
    "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "tools",
    "tool_choice", "functions", "function_call", "prediction", "audio", "modalities", "reasoning_effort",
    "web_search_options",
)  # fmt: skip
#: OpenAI parameters that change nothing in ccmem's answer: accepted and not used.
INERT = (
    "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key", "verbosity",
)  # fmt: skip
#: Parameters whose explicit null means "the default", as OpenAI reads it (the openai client sends None as null).
NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "stop", "max_tokens", "max_completion_tokens", "seed")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="a last chunk, with no choices, carries the usage")


class ChatRequest(BaseModel):
    """OpenAI's chat completion request: the fields ccmem uses. OpenAI parameters that would change the answer and
    that ccmem does not implement (:data:`UNSUPPORTED`) are refused when set, those that change nothing
    (:data:`INERT`) pass, and any other name is refused as OpenAI refuses it (a misspelled ``temprature`` must not
    quietly decode greedily)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    # strict: "3", true and "yes" are refused as OpenAI refuses them, not read as 3, 1 and true
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 (the default here) decodes greedily"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=1, strict=True, description="ccmem answers with one choice")
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, strict=True, description="the random stream of sampling"
    )
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings that end the answer")
    user: str | None = None
    session: str | None = Field(
        default=None, pattern=SESSION_NAME, description="ccmem: answer from this stored session and save into it"
    )

    @model_validator(mode="before")
    @classmethod
    def _openai_defaults(cls, data: Any) -> Any:
        """A null is the default; stream_options needs stream; an unsupported parameter that is set is refused, an
        unknown one too (naming the closest known one)."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        for key in data:
            if key not in known and key not in UNSUPPORTED and key not in INERT:
                close = difflib.get_close_matches(str(key), sorted(known | set(INERT)), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"unrecognized request argument {key!r}; {hint}ccmem serve takes {', '.join(sorted(known))}"
                )
        data = {k: v for k, v in data.items() if k not in INERT and not (k in NULL_MEANS_DEFAULT and v is None)}
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ValueError("stream_options applies to streamed answers only; set stream to true or leave it out")
        for key in UNSUPPORTED:
            if data.get(key) is not None and _unsupported(key, data[key]):
                raise ValueError(
                    f"{key} is not supported by ccmem serve (it would change the answer, and ccmem does not "
                    "implement it); leave it out"
                )
        return {k: v for k, v in data.items() if k not in UNSUPPORTED}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MemoryInfo(BaseModel):
    """ccmem's extension of a completion: what the memory held and what was reused."""

    session: str | None
    memory_slots: int
    memory_bytes: int
    reused_messages: int = Field(
        description="the user and assistant messages of the request whose memory the server held already (the "
        "session's, or a conversation prefix it kept), so not read again; the system message is never counted"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    ccmem: MemoryInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ccmem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=SESSION_NAME, description=f"default: a random name; {NAME_RULE}")
    system_prompt: str | None = Field(
        default=None, description="default: the server's; at most --max-message-bytes, as any message"
    )


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created: int
    updated: int
    turns: int
    messages: int
    memory_slots: int
    memory_bytes: int
    version: int
    model: str | None
    method: str | None


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class Deleted(BaseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


logger = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "the request is malformed or asks for more than the server allows"),
        (401, "a bearer token is required, or the one given is not accepted"),
        (404, "no such model or session"),
        (409, "the request conflicts with the session's state, or the store holds its limit of sessions"),
        (413, "a message is too large"),
        (
            500,
            "the session's stored memory is missing or damaged (the server log names the file), or the server "
            "failed (its log has the details)",
        ),
        (503, "the session store cannot be reached or written"),
    ]
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


def error_response(status: int, message: str, code: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def _info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        id=record.name,
        created=int(record.created),
        updated=int(record.updated),
        turns=record.turns,
        messages=len(record.transcript),
        memory_slots=record.memory_slots,
        memory_bytes=record.memory_bytes,
        version=record.version,
        model=record.settings.get("model"),
        method=record.settings.get("method"),
    )


# ---------------------------------------------------------------- the app


UNAUTHORIZED = "give a valid bearer token: Authorization: Bearer <token>"


def _accepted(tokens: tuple[str, ...], authorization: str | None) -> str | None:
    """The bearer token of an ``Authorization`` header if it is one of ``tokens``, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
        return None
    return token


def owner(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The owner of the request: its bearer token's hash (401 without a valid one), or "" on an open server."""
    tokens: tuple[str, ...] = request.app.state.tokens
    if not tokens:
        return ""
    token = _accepted(tokens, authorization)
    if token is None:
        raise ApiError(401, UNAUTHORIZED, "invalid_api_key")
    return owner_of(token)


Owner = Annotated[str, Depends(owner)]
SessionName = Annotated[str, Path(pattern=SESSION_NAME, description=NAME_RULE)]


def create_app(engine: Engine, *, tokens: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``tokens``, a bearer token from that list is required."""
    app = FastAPI(
        title="ccmem",
        version="1",
        description="OpenAI-compatible chat completions over compressed context memories, with stored sessions.",
    )
    app.state.engine = engine
    app.state.tokens = tuple(tokens)
    started = int(time.time())
    limits = engine.limits

    # A body no valid request can have is refused on its Content-Length, before it is read and parsed (a 200 MB
    # message cost the server 600 MB of memory before the per-message check refused it). JSON may spell a
    # character in up to 6 bytes (\uXXXX), so the bound never refuses a request the limits allow.
    body_limit = 6 * limits.max_messages * limits.max_message_bytes + 65_536

    @app.middleware("http")
    async def refuse_early(request: Request, call_next: Any) -> Any:
        """Refuse, before the body is read: a request to the API without a valid token, and a body too large."""
        if (
            app.state.tokens
            and request.url.path.startswith("/v1/")
            and _accepted(app.state.tokens, request.headers.get("authorization")) is None
        ):
            return error_response(401, UNAUTHORIZED, "invalid_api_key")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_limit:
            return error_response(
                413,
                f"request body of {int(length)} bytes; this server reads at most {body_limit} "
                f"({limits.max_messages} messages of at most {limits.max_message_bytes} bytes)",
                "too_large",
            )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.code, err.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), f"http_{err.status_code}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            if e.get("type") == "json_invalid":
                at = e.get("loc", ("body", ""))[-1]
                problems.append(f"the body is not valid JSON (at character {at}): {e.get('msg', '')}".rstrip(": "))
            elif not where and e.get("type") in ("dict_type", "model_attributes_type"):
                problems.append("the body must be a JSON object, sent with Content-Type: application/json")
            else:
                problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return error_response(400, "invalid request: " + "; ".join(problems), "invalid_request")

    @app.exception_handler(SessionError)
    async def session_error(request: Request, err: SessionError) -> JSONResponse:
        status, code = 400, "invalid_session"
        if isinstance(err, StoreError):  # the store itself failed (Redis gone): not the request's fault
            status, code = 503, "store_unavailable"
        elif isinstance(err, DamagedSessionError):  # a stored file is broken: the server's fault, path logged only
            logger.error("%s", err)
            return error_response(500, err.public, "session_damaged", "server_error")
        elif isinstance(err, UnknownSessionError):
            status, code = 404, "session_not_found"
        elif isinstance(err, SessionLimitError):  # 409, not 429: retrying (as OpenAI clients do on 429) cannot help
            status, code = 409, "session_limit_reached"
        elif isinstance(err, SessionExistsError | SessionMismatchError | VersionConflictError | ConflictError):
            status, code = 409, "session_conflict"
        return error_response(status, str(err), code)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError) -> JSONResponse:
        code = "context_length_exceeded" if isinstance(err, ContextTooLongError) else "invalid_request"
        return error_response(400, str(err), code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # a fault of the server's own, as OpenAI-shaped as the others, so a client can say what happened; Starlette
        # raises it on after this response, and uvicorn logs the traceback
        message = f"the server failed while answering ({type(err).__name__}); its log has the details"
        return error_response(500, message, "internal_error", "server_error")

    @app.get("/health", responses={503: ERRORS[503]})
    async def health() -> Any:
        try:
            stats = engine.stats()
        except StoreError as err:
            return error_response(503, str(err), "store_unavailable")
        if app.state.tokens:  # /health is open: store-wide counts would tell a token that others have sessions
            stats = {k: v for k, v in stats.items() if k not in ("sessions", "live_sessions", "prefix_cache")}
        return {"status": "ok", "model": engine.model_id} | stats

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(who: Owner) -> ModelList:
        return ModelList(data=[ModelCard(id=engine.model_id, created=started)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str, who: Owner) -> ModelCard:
        if model_id != engine.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {engine.model_id!r}",
                           "model_not_found")  # fmt: skip
        return ModelCard(id=engine.model_id, created=started)

    @app.post("/v1/sessions", response_model=SessionInfo, status_code=201, responses=ERRORS)
    async def create_session(who: Owner, body: SessionCreate | None = None) -> SessionInfo:
        body = body or SessionCreate()  # no body: both fields are optional
        name = body.name or f"sess-{secrets.token_hex(8)}"
        if body.system_prompt is not None:
            _check_size(body.system_prompt, "system_prompt", limits.max_message_bytes)
            _check_text(body.system_prompt, "system_prompt")
        return _info(await engine.create_session(who, name, body.system_prompt))

    @app.get("/v1/sessions", response_model=SessionList, responses=ERRORS)
    async def list_sessions(who: Owner) -> SessionList:
        return SessionList(data=[_info(r) for r in engine.store.list(who)])

    @app.get("/v1/sessions/{name}", response_model=SessionInfo, responses=ERRORS)
    async def get_session(name: SessionName, who: Owner) -> SessionInfo:
        check_name(name)
        return _info(engine.store.get(name, who))

    @app.delete("/v1/sessions/{name}", response_model=Deleted, responses=ERRORS)
    async def delete_session(name: SessionName, who: Owner) -> Deleted:
        check_name(name)
        try:
            await engine.delete_session(who, name)
        except UnknownSessionError:  # not "create it first": there is nothing to delete
            raise UnknownSessionError(f"no session {name!r} to delete (GET /v1/sessions lists yours)") from None
        return Deleted(id=name)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=ERRORS | {200: {"content": {"text/event-stream": {}}, "description": "the completion"}},
    )
    async def chat_completions(body: ChatRequest, who: Owner) -> Any:
        if body.model != engine.model_id:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                "model_not_found",
            )
        messages = _messages(body.messages, limits.max_messages, limits.max_message_bytes)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "invalid_stop")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limits.max_new_tokens:
            which = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            message = f"{which} is {asked}, this server allows at most {limits.max_new_tokens}"
            raise ApiError(400, message, "max_tokens_too_large")
        params = Params(
            max_new_tokens=asked or min(256, limits.max_new_tokens),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(stops),
        )
        answer, pieces = await engine.chat(who, messages, params, session=body.session)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        if body.stream:  # the background task frees the session even if the stream never starts
            return StreamingResponse(
                _events(
                    ident,
                    created,
                    engine.model_id,
                    answer,
                    pieces,
                    usage=body.stream_options is not None and body.stream_options.include_usage,
                ),
                media_type="text/event-stream",
                background=BackgroundTask(pieces.aclose),
            )
        try:
            async for _ in pieces:
                pass
        finally:
            await pieces.aclose()
        return _completion(ident, created, engine.model_id, answer)

    return app


def _check_size(text: str, where: str, limit: int) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise ApiError(413, f"{where} is {size} bytes; this server takes at most {limit} per message", "too_large")


def _check_text(text: str, where: str) -> None:
    """JSON can carry a lone surrogate (``"\\ud800"``), which is no character: no tokenizer can read it."""
    try:
        check_text(text, where)
    except ValueError as err:
        raise ApiError(400, str(err), "invalid_text") from None


def _messages(messages: list[ChatMessage], max_messages: int, max_bytes: int) -> list[Message]:
    """The request's messages; a user or system message over ``max_bytes`` is refused. An assistant message is a
    reply sent back (OpenAI clients resend the whole list), which the server may have written longer than a
    small ``max_bytes``: it counts only in the request's total, ``max_messages * max_bytes`` as before."""
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; this server takes at most {max_messages}", "too_many_messages")
    out = []
    total = 0
    for i, m in enumerate(messages):
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        if m.role != "assistant":
            _check_size(content, f"messages.{i}.content", max_bytes)
        total += len(content.encode("utf-8", errors="surrogatepass"))
        _check_text(content, f"messages.{i}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if total > max_messages * max_bytes:
        raise ApiError(
            413,
            f"the messages hold {total} bytes in all; this server takes at most {max_messages * max_bytes} "
            f"({max_messages} messages of at most {max_bytes} bytes)",
            "too_large",
        )
    return out


def _completion(ident: str, created: int, model: str, answer: Answer) -> ChatCompletion:
    return ChatCompletion(
        id=ident,
        created=created,
        model=model,
        choices=[
            Choice(index=0, message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)  # type: ignore[arg-type]
        ],
        usage=Usage(
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            total_tokens=answer.prompt_tokens + answer.completion_tokens,
        ),
        ccmem=MemoryInfo(
            session=answer.session,
            memory_slots=answer.memory_slots,
            memory_bytes=answer.memory_bytes,
            reused_messages=answer.reused_messages,
        ),
    )


async def _events(
    ident: str, created: int, model: str, answer: Answer, pieces: AnswerPieces, *, usage: bool = False
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a role chunk, content chunks, a finish chunk (with ccmem's memory
    info), with ``usage`` a last chunk of no choices that carries the token counts (``usage: null`` before), then
    ``[DONE]``."""

    def chunk(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            **({"usage": None} if usage else {}),
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in pieces:
                yield chunk({"content": piece})
        except Exception as err:  # the status line is sent already: report the failure in the stream
            message, kind = _stream_failure(err)
            yield f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': None}})}\n\n"
            return
        info = _completion(ident, created, model, answer)
        yield chunk({}, answer.finish_reason, ccmem=info.ccmem.model_dump())
        if usage:
            yield chunk(None, usage=info.usage.model_dump())
        yield "data: [DONE]\n\n"
    finally:  # a client gone mid-stream: stop generating, free the session (unsaved)
        await pieces.aclose()


def _stream_failure(err: Exception) -> tuple[str, str]:
    """The message and type a stream reports for a failure after its status line went out, as the error body of a
    request that failed before it would say them: the request's own faults in full; a damaged stored session
    without the server's file path and an unexpected fault without its details, both logged here (the streamed
    chunk was all there was of them: nothing reached the server's log)."""
    if isinstance(err, DamagedSessionError):
        logger.error("%s", err)
        return err.public, "server_error"
    if isinstance(err, StoreError):
        return str(err), "server_error"
    if isinstance(err, SessionError | ValueError):
        return str(err), "invalid_request_error"
    logger.error("a streamed answer failed", exc_info=err)
    return f"the server failed while answering ({type(err).__name__}); its log has the details", "server_error"


def bind(host: str, port: int) -> Any:
    """A listening socket on ``host:port``, or a clear error when the port is taken or the host is unknown."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on host {host!r}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = (
            "another server may be using the port (pick another with --port)"
            if err.errno == errno.EADDRINUSE
            else "is the address one of this machine's? (--host 127.0.0.1, or 0.0.0.0 for every interface)"
        )
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; {hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(
    engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, tokens: Sequence[str] = (), log_level: str = "info"
) -> None:
    """Serve ``engine`` until interrupted (the port is checked before anything else starts)."""
    import uvicorn

    sock = bind(host, port)
    if port == 0:  # the system picked a free port: say which, or the server cannot be reached
        print(f"ccmem serve: listening on http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(engine, tokens=tokens), log_level=log_level)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()  # however uvicorn returned: left to the garbage collector, it held the port until then
        engine.close()
