"""The HTTP API (FastAPI): OpenAI-compatible chat completions, search, status, metrics, admin, dashboard.

Endpoints (docs/SERVE.md):
- `POST /v1/chat/completions` (OpenAI-compatible, `stream=true` as server-sent events), `GET /v1/models`;
  the answer's route, sources, slice, cache and timings come back in the extra field `pgfresh`;
- `POST /v1/search` (the options and JSON of `pgfresh search --json`), `GET /v1/status`;
- `GET /healthz` (liveness), `GET /readyz` (store reachable, capture lag under `serve.ready_max_lag_seconds`);
- `GET /metrics` (Prometheus);
- admin: `GET /v1/quarantine`, `POST /v1/quarantine/{id}/release`, `GET /v1/slices`,
  `POST /v1/slices/{slice}/rollback`, `GET /v1/reports`; the dashboard at `/`.

Auth: `Authorization: Bearer <key>` with a key from `pgfresh keys create`. A tenant key reads its
own tenant only (asking for another is a 403); an admin key reads any tenant and may call the
admin endpoints. With no key ever created, every request acts as admin and `run` binds to
localhost only. Bad input is a 4xx whose body is `{"error": {"message": one line, "type": ...}}`;
nothing a client sends produces a 500 or a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pgfresh import serve
from pgfresh.errors import PgfreshError
from pgfresh.serve import keys as apikeys
from pgfresh.serve.answer import MODES, Options
from pgfresh.serve.registry import Registry

KEY_TTL_SECONDS = 5.0  # a verified key (and "are keys configured") is trusted this long: revocation takes <= 5 s


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


# --- request bodies -------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatRequest(_Strict):
    """OpenAI's chat-completions body (the fields a stock client sends) plus `tenant` (admin keys only)."""

    model: str = Field(description="rag, tuned or hybrid (GET /v1/models)")
    messages: list[Message] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    n: int | None = Field(None, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    metadata: dict[str, str] | None = None
    tenant: str | None = Field(None, max_length=200, description="pgfresh: the tenant asking (a tenant key implies its own)")
    cache: bool | None = Field(None, description="pgfresh: false skips the answer cache for this request")


class SearchRequest(_Strict):
    """`pgfresh search TEXT [--tenant T] [--k N] [--mode M]`."""

    text: str = Field(min_length=1, max_length=4000)
    tenant: str | None = Field(None, max_length=200)
    k: int | None = Field(None, ge=1, le=100)
    mode: Literal["dense", "lexical", "hybrid"] | None = None


class RollbackRequest(_Strict):
    version: int = Field(ge=0)


# --- the app --------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes is a 413 before any of it is parsed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _send_error(send, 413, f"request body over {self.limit} bytes (serve.max_body_bytes)")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes (serve.max_body_bytes)")
            return message

        return await self.app(scope, limited, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(config, registry: Registry | None = None) -> FastAPI:
    """The FastAPI app serving `config` (one registry for every request)."""
    from pgfresh.serve import dashboard, metrics

    reg = registry or Registry()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Requests are answered in a pool of `serve.threads` threads; the others wait on the event
        # loop. Answers are CPU work (embedding, generation): more threads than that only contend
        # for the cores and the GIL (docs/SERVE.md, "Serving threads").
        anyio.to_thread.current_default_thread_limiter().total_tokens = _threads_of(config)
        yield

    app = FastAPI(title="pgfresh", version="1", description="Answers from live PostgreSQL data (docs/SERVE.md).",
                  lifespan=lifespan)
    app.state.config, app.state.registry = config, reg
    app.state.metrics = metrics.Metrics(config, reg)
    auth = _Auth(config, reg)
    app.add_middleware(_BodyLimit, limit=int(serve.setting(config, "max_body_bytes")))

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the body is not valid JSON (UTF-8)")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, _one_line(f"{where or 'body'}: {first.get('msg', 'invalid')}"
                                     + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else "")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, _one_line(exc.detail or "error"))

    @app.exception_handler(PgfreshError)
    async def _pgfresh(request, exc: PgfreshError):
        return _error(_status_of(exc), _one_line(exc))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug: one line, no traceback in the body (the log has it)
        import logging

        logging.getLogger("pgfresh.serve").exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    # -- liveness, readiness, metrics -------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop: liveness never waits for a busy thread pool
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready"}})
    def readyz():
        ok, detail = _ready(config, reg)
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus(p: apikeys.Principal = Depends(auth)):
        data, ctype = app.state.metrics.render()
        return Response(data, media_type=ctype)

    # -- the OpenAI-compatible API ----------------------------------------------------------------
    @app.get("/v1/models")
    def models(p: apikeys.Principal = Depends(auth)) -> dict:
        slices = _visible_slices(config, p)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "pgfresh",
             "pgfresh": {"slices": slices if m != "rag" else []}} for m in MODES]}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, p: apikeys.Principal = Depends(auth)) -> Response:
        if body.model not in MODES:
            raise ApiError(404, f"unknown model {body.model!r}: use one of {', '.join(MODES)} (GET /v1/models)",
                           "model_not_found")
        tenant = _tenant(p, body.tenant)
        question = _question(body.messages)
        limit = body.max_completion_tokens or body.max_tokens
        t0 = time.perf_counter()
        out = serve.answer(config, question, tenant, body.model, registry=reg,
                           options=Options(cache=body.cache, max_new_tokens=limit))
        app.state.metrics.observe_answer(body.model, time.perf_counter() - t0)
        return _json(_completion(out, body)) if not body.stream else _stream(out, body)

    @app.post("/v1/search")
    def search(body: SearchRequest, p: apikeys.Principal = Depends(auth)) -> Response:
        hits = serve.search(config, body.text, _tenant(p, body.tenant), body.k, body.mode, registry=reg)
        return _json([h.as_dict() for h in hits])

    @app.get("/v1/status")
    def status(p: apikeys.Principal = Depends(auth)) -> dict:
        from pgfresh import status as st

        report = st.collect(config)
        report["serve"] = {"loaded": reg.loaded(), "auth": "keys" if auth.configured() else "none (localhost only)"}
        return report if p.admin else _tenant_status(config, reg, report, p.tenant)

    # -- admin ------------------------------------------------------------------------------------
    @app.get("/v1/quarantine")
    def quarantine(limit: int = 100, released: bool = False, p: apikeys.Principal = Depends(auth)) -> list[dict]:
        from pgfresh.gate import quarantine as q

        _admin(p)
        return _jsonable(q.entries(config, include_released=released, limit=max(1, min(limit, 1000))))

    @app.post("/v1/quarantine/{qid}/release")
    def release(qid: int, p: apikeys.Principal = Depends(auth)) -> dict:
        from pgfresh.gate import quarantine as q

        _admin(p)
        return _jsonable(q.release_entry(config, qid))

    @app.get("/v1/slices")
    def slice_list(p: apikeys.Principal = Depends(auth)) -> list[dict]:
        _admin(p)
        from pgfresh import train

        return _jsonable(train.list_slices(config))

    @app.post("/v1/slices/{name}/rollback")
    def rollback(name: str, body: RollbackRequest, p: apikeys.Principal = Depends(auth)) -> dict:
        _admin(p)
        from pgfresh import train

        return _jsonable(train.rollback(config, name, body.version))

    @app.get("/v1/reports")
    def reports(p: apikeys.Principal = Depends(auth)) -> list[dict]:
        _admin(p)
        return dashboard.reports(config)

    dashboard.mount(app, config)
    return app


def _threads_of(config) -> int:
    """`serve.threads`, by default twice the cores (a request also waits on the store, not only on CPU)."""
    return int(serve.setting(config, "threads") or max(4, 2 * (os.cpu_count() or 1)))


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _status_of(exc: PgfreshError) -> int:
    """The HTTP status of an error a client caused: 409 where the request is fine but the data it
    needs is not there yet (nothing indexed, no slice), 404 for an unknown quarantine entry, else 400."""
    from pgfresh.gate.quarantine import QuarantineError
    from pgfresh.rag.retrieval import NotIndexed

    try:
        from pgfresh.train.slices import SliceError
    except ImportError:  # an installation without the training stage
        SliceError = ()
    if isinstance(exc, (NotIndexed, SliceError)):
        return 409
    if isinstance(exc, QuarantineError):
        return 404
    return 400


def _jsonable(data):
    return json.loads(json.dumps(data, default=str))


def _json(data) -> Response:
    """`data` as a JSON response, encoded once (the answer paths: FastAPI's own encoding walks every
    value of a return annotation's model first, a share of the HTTP layer's cost; docs/SERVE.md)."""
    return Response(json.dumps(data, default=str), media_type="application/json")


class _Auth:
    """The FastAPI dependency that turns `Authorization: Bearer KEY` into a Principal."""

    def __init__(self, config, reg: Registry):
        self.config, self.reg = config, reg
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, apikeys.Principal | None]] = {}
        self._configured: tuple[float, bool] = (0.0, False)

    def configured(self) -> bool:
        at, value = self._configured
        if time.monotonic() - at > KEY_TTL_SECONDS:
            with self.reg.connection(self.config, "serve") as conn:
                value = apikeys.any_configured(conn)
            self._configured = (time.monotonic(), value)
        return value

    async def __call__(self, request: Request) -> apikeys.Principal:
        # On the event loop when everything is cached (the common case: no thread hop per request);
        # in the threadpool when the store must be asked (a key not seen within KEY_TTL_SECONDS).
        header = request.headers.get("authorization", "")
        if self._cached(header):
            return self.resolve(header)
        return await run_in_threadpool(self.resolve, header)

    def _cached(self, header: str) -> bool:
        """True when resolving `header` needs no store query (what it needs was read within the TTL)."""
        now = time.monotonic()
        configured_fresh = now - self._configured[0] <= KEY_TTL_SECONDS
        if not header:
            return configured_fresh
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return True  # a 401 without asking the store
        with self._lock:
            hit = self._seen.get(apikeys.digest(key.strip()))
        return hit is not None and now - hit[0] <= KEY_TTL_SECONDS and (hit[1] is not None or configured_fresh)

    def resolve(self, header: str) -> apikeys.Principal:
        """The principal of an `Authorization` header value (may query the store)."""
        if not header:
            if not self.configured():
                return apikeys.LOCAL
            raise ApiError(401, "missing API key: send Authorization: Bearer <key> (pgfresh keys create)",
                           "authentication_error")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "Authorization must be 'Bearer <key>'", "authentication_error")
        key = key.strip()
        digest = apikeys.digest(key)
        with self._lock:
            hit = self._seen.get(digest)
        if hit is None or time.monotonic() - hit[0] > KEY_TTL_SECONDS:
            with self.reg.connection(self.config, "serve") as conn:
                principal = apikeys.verify(conn, key)
            with self._lock:
                if len(self._seen) > 10000:
                    self._seen.clear()
                self._seen[digest] = hit = (time.monotonic(), principal)
        if hit[1] is None:
            if not self.configured():
                return apikeys.LOCAL  # no keys at all: a stray header does not lock a local user out
            raise ApiError(401, "invalid or revoked API key", "authentication_error")
        return hit[1]


def _tenant(p: apikeys.Principal, requested: str | None) -> str | None:
    """The tenant a request reads: a tenant key's own (asking for another is a 403), or what admin asks."""
    if p.admin:
        return requested
    if requested is not None and requested != p.tenant:
        raise ApiError(403, "this API key reads its own tenant only", "permission_error")
    return p.tenant


def _admin(p: apikeys.Principal) -> None:
    if not p.admin:
        raise ApiError(403, "this endpoint needs an admin key (pgfresh keys create --admin)", "permission_error")


def _question(messages: list[Message]) -> str:
    """The last user message's text (text parts of a list joined)."""
    for m in reversed(messages):
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            text = m.content
        else:
            text = " ".join(str(part.get("text", "")) for part in (m.content or []) if part.get("type") == "text")
        if text.strip():
            if len(text) > 4000:
                raise ApiError(400, "the question is over 4000 characters")
            return text
    raise ApiError(400, "no user message with text: the last user message is the question")


def _content(out: dict) -> str:
    if out.get("answer") is not None:
        return str(out["answer"])
    rows = "\n".join(f"[{i}] {s['text']}" for i, s in enumerate(out.get("sources", []), start=1))
    return f"{out.get('note') or 'no answer'}\n{rows}".strip()


def _extra(out: dict) -> dict:
    """The documented extra field `pgfresh` of a completion (docs/SERVE.md)."""
    return {k: out.get(k) for k in ("mode", "tenant", "route", "sources", "slice", "cache", "reader", "note", "timings")}


def _completion(out: dict, body: ChatRequest) -> dict:
    text = _content(out)
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": len(text.split())},
            "pgfresh": _extra(out)}


def _stream(out: dict, body: ChatRequest) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format: role, the text word by word, then stop with `pgfresh`."""
    cid, created, text = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), _content(out)

    def chunk(delta: dict, finish=None, extra=None) -> str:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if extra is not None:
            c["pgfresh"] = extra
        return f"data: {json.dumps(c, default=str)}\n\n"

    def events():
        yield chunk({"role": "assistant", "content": ""})
        words = text.split(" ")
        for i, w in enumerate(words):
            yield chunk({"content": w if i == 0 else " " + w})
        yield chunk({}, "stop", _jsonable(_extra(out)))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _visible_slices(config, p: apikeys.Principal) -> list[dict]:
    """Published slices this principal may see (its tenant's, or all for admin)."""
    try:
        from pgfresh import train
    except ImportError:
        return []
    from psycopg import errors as pgerr

    try:
        rows = train.list_slices(config)
    except pgerr.UndefinedTable:
        return []
    rows = [r for r in rows if r["current"] and (p.admin or r["tenant"] == p.tenant)]
    return [{"slice": r["slice"], "version": r["version"], "lsn": r["lsn"]} for r in rows]


def _tenant_status(config, reg: Registry, report: dict, tenant: str | None) -> dict:
    """What a tenant key sees of `status`: pipeline health, and counts of its own rows only."""
    cap = report.get("capture", {})
    with reg.connection(config, "status") as conn:
        docs = conn.execute("select count(*) from pgfresh.documents d join pgfresh.rag_indexes i on i.id = d.index_id"
                            " and i.state = 'active' where d.tenant is not distinct from %s", (tenant,)).fetchone()[0]
    return {"tenant": tenant, "capture": {k: cap.get(k) for k in ("lsn", "lag_bytes", "lag_seconds")},
            "rag": {"documents": docs}, "serve": {"auth": report.get("serve", {}).get("auth")}}


def _ready(config, reg: Registry) -> tuple[bool, dict]:
    """Store reachable and capture lag under `serve.ready_max_lag_seconds`."""
    limit = float(serve.setting(config, "ready_max_lag_seconds"))
    try:
        with reg.connection(config, "serve") as conn:
            row = conn.execute("select info from pgfresh.workers where name = 'capture'").fetchone()
    except PgfreshError as exc:
        return False, {"reason": _one_line(exc)}
    if reg.warm_state == "loading":
        return False, {"reason": "loading models (the active index's embedder, the reader): see /v1/status serve.loaded"}
    if row is None:
        return False, {"reason": "capture has not run yet: start `pgfresh sync`"}
    lag = float((row[0] or {}).get("lag_seconds", 0.0))
    if lag > limit:
        return False, {"reason": f"capture lags {lag:.1f} s (serve.ready_max_lag_seconds = {limit:g})", "lag_seconds": lag}
    return True, {"lag_seconds": lag}


def run(config, host: str | None = None, port: int | None = None, console=None) -> None:
    """`pgfresh serve`: uvicorn on `host:port`; localhost only while no API key exists."""
    import uvicorn

    reg = Registry()
    with reg.connection(config, "serve") as conn:
        configured = apikeys.any_configured(conn)
    host = host or serve.setting(config, "host")
    port = serve.setting(config, "port") if port is None else port
    if not configured and host not in ("127.0.0.1", "localhost", "::1"):
        if console is not None:
            console.print(f"no API key exists: listening on 127.0.0.1 only, not {host} "
                          "(create one with `pgfresh keys create --admin`)")
        host = "127.0.0.1"
    elif not configured and console is not None:
        console.print("no API key exists: every local request acts as admin (create keys with `pgfresh keys create`)")
    import threading

    reg.warm_state = "loading"  # before the server answers: /readyz must not say ready in between
    # the first search no longer pays for loading the embedder (/readyz is 503 until this is done)
    threading.Thread(target=reg.warm, args=(config,), name="pgfresh-warm", daemon=True).start()
    uvicorn.run(create_app(config, reg), host=host, port=port, log_level="warning")
