"""The routes of `flexinfer serve` (FastAPI): OpenAI chat and completions, models, health, metrics and
the live budget. HTTP workers do JSON, templates and tokenization; the engine runs on the scheduler's
one thread. The model loads in the background once the server listens (/health answers 503 until then).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from flexinfer.errors import FlexInferError
from flexinfer.server import metrics
from flexinfer.server.bridge import Job
from flexinfer.server.errors import ApiError, bad
from flexinfer.server.responses import Shape, finish
from flexinfer.server.schemas import Parsed, parse_chat, parse_completion

log = logging.getLogger("flexinfer.server")
RETRY_AFTER_S = "1"


@dataclass
class ServeConfig:
    model_path: str
    model_name: str
    options: dict  # flexinfer.model.Options fields
    parallel: int = 4
    max_queue: int = 64
    api_key: str | None = None
    timeout: float | None = None  # seconds per request; None: no limit
    max_body: int = 1 << 20  # bytes of request body; more is a 413


@dataclass
class State:
    cfg: ServeConfig
    model: object = None
    scheduler: object = None
    error: str | None = None  # the load failed: the server exits with this line
    server: object = None  # the uvicorn.Server, told to exit when the load fails
    responses: dict = field(default_factory=dict)  # status -> count
    counts: dict = field(default_factory=lambda: {"cancelled": 0, "timed_out": 0})
    close_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


def create_app(cfg: ServeConfig) -> FastAPI:
    state = State(cfg)
    app = FastAPI(title="flexinfer", lifespan=_lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.flex = state
    app.state.registry = metrics.make_registry(state)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(_CountStatus, state=state)
    _routes(app, state)
    return app


class _CountStatus:
    """Pure ASGI middleware: counts responses by status for /metrics."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                r = self.state.responses
                r[message["status"]] = r.get(message["status"], 0) + 1
            await send(message)
        await self.app(scope, receive, counting_send)


async def _api_error(req, e: ApiError) -> JSONResponse:
    if req.url.path != "/health":
        log.info("%s %s: %d %s", req.method, req.url.path, e.status, e.message)
    return e.response()


async def _http_error(req, e: HTTPException) -> JSONResponse:
    msg = "no such endpoint" if e.status_code == 404 else str(e.detail)
    return ApiError(e.status_code, f"{req.method} {req.url.path}: {msg}").response()


async def _unexpected(req, e: Exception) -> JSONResponse:
    log.exception("%s %s: unexpected error", req.method, req.url.path)
    line = (str(e).splitlines() or [""])[0]
    return ApiError(500, f"internal error: {type(e).__name__}: {line}").response()


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: State = app.state.flex
    task = asyncio.create_task(_load(state))
    yield
    await asyncio.gather(task, return_exceptions=True)  # a load under way finishes first
    await run_in_threadpool(close_engine, state)
    if state.model is not None:
        state.model.close()


async def _load(state: State) -> None:
    """Load in a worker thread while the server already answers (/health is 503 meanwhile)."""
    from flexinfer.model import load
    from flexinfer.scheduler import Scheduler
    cfg = state.cfg
    t0 = time.perf_counter()
    try:
        model = await run_in_threadpool(load, cfg.model_path, **cfg.options)
        sched = Scheduler(model, n_parallel=cfg.parallel, max_queue=cfg.max_queue)
        sched.start()
    except FlexInferError as e:
        state.error = str(e)
        log.error("flexinfer: %s", e)
        if state.server is not None:
            state.server.should_exit = True
        return
    state.model, state.scheduler = model, sched
    s = model.stats
    log.info("model %s ready in %.1f s: context %d, budget %.2f GB (%s), %s, resident %.2f GB",
             cfg.model_name, time.perf_counter() - t0, model.n_ctx, s.budget_bytes / 1e9,
             s.budget_source, s.offload_mode, s.resident_bytes / 1e9)


def close_engine(state: State) -> None:
    """Cancel every sequence and stop the engine thread, once (on SIGTERM, then at the end). Open
    streams then end at the next step with finish_reason "length", so the shutdown is prompt."""
    with state.close_lock:
        if state.scheduler is not None and not state.closed:
            state.closed = True
            state.scheduler.close()


def _check_key(state: State, req: HttpRequest) -> None:
    key = state.cfg.api_key
    if key is None:
        return
    got = req.headers.get("authorization", "")
    token = got[7:] if got[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "missing API key (Authorization: Bearer KEY)" if not got else
                       "invalid API key", code="invalid_api_key")


def _ready(state: State):
    if state.scheduler is None:
        raise ApiError(503, state.error or "the model is loading; retry shortly",
                       code="model_loading", headers={"Retry-After": RETRY_AFTER_S})
    return state.scheduler


async def read_json(req: HttpRequest, limit: int):
    """The body as JSON, refusing more than `limit` bytes by Content-Length or as it streams."""
    cl = req.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > limit):
        raise ApiError(413, f"the request body is {cl} bytes; the limit is {limit}",
                       code="request_too_large")
    buf = bytearray()
    async for chunk in req.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(bytes(buf), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {(str(e).splitlines() or [''])[0]}",
                  code="invalid_json") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _routes(app: FastAPI, state: State) -> None:
    @app.get("/health")
    async def health():
        _ready(state)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(req: HttpRequest):
        _check_key(state, req)
        created = int(os.path.getmtime(state.cfg.model_path))
        return {"object": "list", "data": [{"id": state.cfg.model_name, "object": "model",
                                            "created": created, "owned_by": "flexinfer"}]}

    @app.get("/metrics")
    async def get_metrics(req: HttpRequest):
        _check_key(state, req)
        data, ctype = metrics.render(app.state.registry)
        return Response(data, media_type=ctype)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: HttpRequest):
        return await _complete(state, req, "chat")

    @app.post("/v1/completions")
    async def completions(req: HttpRequest):
        return await _complete(state, req, "completion")

    @app.post("/admin/budget")
    async def admin_budget(req: HttpRequest):
        return await _set_budget(state, req)


async def _set_budget(state: State, req: HttpRequest):
    """{"memory_budget": "2GiB" | bytes | "auto"}: re-plan the running model at that budget (or
    hand it back to the environment, follow.py). A bad size or one below the minimum working set
    is a 400 naming it; the server goes on serving either way."""
    from flexinfer.budget import parse_size
    from flexinfer.follow import is_auto
    _check_key(state, req)
    sched = _ready(state)
    body = await read_json(req, state.cfg.max_body)
    value = body.get("memory_budget") if isinstance(body, dict) else None
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise bad("'memory_budget' is required: a size such as \"2GiB\", a number of bytes or "
                  "\"auto\"", "memory_budget")
    try:
        size = "auto" if is_auto(value) else parse_size(str(value), "memory_budget")
        change = await run_in_threadpool(sched.set_memory_budget, size)
    except FlexInferError as e:
        raise bad(str(e), "memory_budget") from None
    s = sched.stats()
    log.info("memory budget %.2f GB (%s)", s["budget_bytes"] / 1e9, s["budget_source"])
    out = {"memory_budget_bytes": s["budget_bytes"], "source": s["budget_source"], "stats": s}
    if change is not None:
        out["change"] = {"old_bytes": change.old, "new_bytes": change.new,
                         "seconds": round(change.seconds, 4),
                         "released_bytes": change.released_bytes,
                         "read_bytes": change.read_bytes}
    return out


def _prompt_ids(model, p: Parsed) -> list[int]:
    """Template and tokenizer, on a worker thread; the result is checked against the context."""
    from flexinfer.generate import chat_prompt
    param = "messages" if p.kind == "chat" else "prompt"
    try:
        if p.kind == "chat":
            ids = chat_prompt(model, p.messages)
        elif isinstance(p.prompt, str):
            ids = model.tokenize(p.prompt)
        else:
            ids = list(p.prompt)
            n_vocab = model.cfg.n_vocab
            if max(ids) >= n_vocab:
                raise bad(f"'prompt' holds token id {max(ids)}, outside the vocabulary of "
                          f"{n_vocab}", "prompt")
    except FlexInferError as e:
        raise bad(str(e), param) from None
    if not ids:
        raise bad(f"'{param}' is empty once tokenized", param)
    if len(ids) > model.n_ctx - 1:
        raise bad(f"the prompt is {len(ids)} tokens; the context holds {model.n_ctx} and must "
                  "leave room for one generated token", param, code="context_length_exceeded")
    return ids


async def _complete(state: State, req: HttpRequest, kind: str):
    from flexinfer.generate import SamplingOptions
    from flexinfer.sampler import make_sampler
    from flexinfer.scheduler import QueueFull, Request
    _check_key(state, req)
    sched = _ready(state)
    model = state.model
    body = await read_json(req, state.cfg.max_body)
    p = (parse_chat if kind == "chat" else parse_completion)(body, model.n_ctx)
    ids = await run_in_threadpool(_prompt_ids, model, p)
    opts = SamplingOptions(max_tokens=p.max_tokens or model.n_ctx - len(ids), **p.sampling)
    try:  # the ranges were checked above; this is the sampler's own word on them
        make_sampler(opts.temperature, opts.top_k, opts.top_p, opts.min_p, opts.repeat_penalty,
                     opts.repeat_last_n, opts.seed, opts.presence_penalty, opts.frequency_penalty)
    except FlexInferError as e:
        raise bad(str(e)) from None
    shape = Shape(kind, state.cfg.model_name)
    try:
        job = Job(sched, Request(ids, opts, p.stop, shape.id), state.cfg.timeout)
    except QueueFull as e:
        raise ApiError(503, str(e), code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_S}) from None
    if p.stream:
        # on SIGTERM the engine closes and every stream ends at its next step: let it (8 s)
        return EventSourceResponse(_sse(state, job, shape, p), ping=15, shutdown_grace_period=8)
    return await _whole(state, req, job, shape)


async def _whole(state: State, req: HttpRequest, job: Job, shape: Shape):
    text, last = [], None
    async for ev in job.events(req.is_disconnected):
        if ev.kind == "piece":
            text.append(ev.text)
        last = ev
    _log_end(state, job, last)
    if last is None:  # the client left: nobody reads this
        return Response(status_code=499)
    if last.kind == "error":
        raise ApiError(500, f"generation failed: {last.message}", code="generation_failed")
    return shape.whole("".join(text), last.finish_reason, last.usage or job.local_usage())


async def _sse(state: State, job: Job, shape: Shape, p: Parsed):
    """The SSE body. sse-starlette cancels this generator when the client disconnects; the finally
    then cancels the sequence, which leaves the scheduler at its next step."""
    last = None
    try:
        yield json.dumps(shape.chunk("", first=True, with_usage=p.include_usage))
        async for ev in job.events():
            last = ev
            if ev.kind == "piece":
                if ev.text:
                    yield json.dumps(shape.chunk(ev.text, with_usage=p.include_usage))
            elif ev.kind == "error":
                err = ApiError(500, f"generation failed: {ev.message}", code="generation_failed")
                yield json.dumps(err.body())
            else:
                yield json.dumps(shape.chunk(None, ev.finish_reason, with_usage=p.include_usage))
                if p.include_usage:
                    yield json.dumps(shape.usage_chunk(ev.usage or job.local_usage()))
        yield "[DONE]"
    finally:
        if job.ended not in ("done", "error", "timeout"):
            job.handle.cancel()
            job.ended = "disconnected"
        _log_end(state, job, last)


def _log_end(state: State, job: Job, last) -> None:
    """The one log line of a request: id, tokens in/out, cached, time to first token, tok/s."""
    if job.ended == "disconnected":
        state.counts["cancelled"] += 1
    elif job.ended == "timeout":
        state.counts["timed_out"] += 1
    u = (last.usage if last is not None and last.usage else None) or job.local_usage()
    total = time.perf_counter() - job.t0
    decode_s = u.get("decode_s") or 0.0
    tps = u["completion_tokens"] / decode_s if decode_s else 0.0
    ttft = u.get("ttft_s") if u.get("ttft_s") is not None else job.ttft_s
    end = {"done": finish(last.finish_reason) if last is not None else "?", "error": "error",
           "timeout": "timeout", "disconnected": "client gone"}.get(job.ended, job.ended)
    log.info("%s: %d tokens in (%d cached), %d out, ttft %s, %.1f tok/s, %.2f s, %s",
             job.req.id, u["prompt_tokens"], u.get("cached_tokens") or 0, u["completion_tokens"],
             f"{ttft:.3f} s" if ttft is not None else "-", tps, total, end)
