"""The server: create_app wires the OpenAI routes (/v1, openai_api.py), Anthropic's Messages API
(/v1/messages, anthropic_api.py), the web app's history (/api, history.py), /metrics, /openapi.json and the
chat web app (/), and `seekling serve` runs it.

Request flow: validate (schemas.py: 422 for a wrong shape, 400 for a value out of bounds) -> render the chat
template and count prompt tokens (pipeline.py) -> admit into the engine worker (429 when the queue is full)
-> stream deltas as SSE or collect them (streaming.py). Every error has OpenAI's shape, or Anthropic's on
/v1/messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from seekling.serve.anthropic_api import anthropic_router
from seekling.serve.history import history_router
from seekling.serve.metrics import Metrics, MetricsMiddleware
from seekling.serve.openai_api import openai_router
from seekling.serve.pipeline import Context
from seekling.serve.responses import OPENAI_ERRORS, Health, answer
from seekling.serve.schemas import build_schemas
from seekling.serve.security import (
    APIError,
    Authenticator,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    RateLimiter,
    Settings,
    error_json,
    error_response,
    load_key_hashes,
)
from seekling.serve.store import Store
from seekling.serve.worker import EngineWorker

log = logging.getLogger("seekling.serve")
STATIC_DIR = Path(__file__).parent / "static"
# pydantic errors that mean "a value out of the documented bounds" (400, as OpenAI answers) rather than
# "not the right shape" (422).
VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "string_too_short", "string_too_long", "literal_error", "enum", "finite_number",
                "string_pattern_mismatch", "union_tag_invalid"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def validation_error(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """Status, a readable message and the offending parameter of a request the schema refused."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "The request body is not valid JSON.", None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "union_tag_invalid":  # name the field that selects the variant (e.g. `role`)
            loc.append(str(e.get("ctx", {}).get("discriminator", "")).strip("'"))
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    status = 400 if all(e.get("type") in VALUE_ERRORS for e in errors) else 422
    return status, "Invalid request: " + "; ".join(parts), param


def openapi_document(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document plus the limits no field can carry."""
    doc = app.openapi()
    doc["info"]["description"] = (
        f"Limits: request body at most {settings.max_body_bytes} bytes (413 above); at most "
        f"{settings.max_messages} messages and {settings.max_prompt_tokens} prompt tokens; max_tokens at most "
        f"{settings.max_tokens_cap}; n at most {settings.max_n}; "
        + (f"{settings.rate_limit:g} requests per minute per key (429 above); " if settings.rate_limit else "")
        + f"{settings.max_queue} requests queued (429 above). Numbers must be finite (NaN, Infinity: 400).")
    doc["info"]["x-limits"] = {"max_body_bytes": settings.max_body_bytes, "max_messages": settings.max_messages,
                               "max_prompt_tokens": settings.max_prompt_tokens,
                               "max_tokens": settings.max_tokens_cap, "max_n": settings.max_n,
                               "rate_limit_per_minute": settings.rate_limit, "max_queue": settings.max_queue}
    doc["paths"]["/v1/messages"]["post"]["responses"].pop("422", None)  # (a wrong shape is a 400 there)
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"}, "x-api-key": {"type": "apiKey", "in": "header",
                                                                      "name": "x-api-key"}}
    return doc


def create_app(engine, settings: Settings) -> FastAPI:
    model_name = settings.model_name or (
        os.path.basename(os.path.normpath(settings.model)) if settings.model else "seekling"
    )
    context = getattr(engine, "max_model_len", None)
    if context is not None:  # the prompt cap never exceeds the model's context (one token is left to answer)
        settings = dataclasses.replace(settings, max_prompt_tokens=min(settings.max_prompt_tokens, context - 1))
    grammars = getattr(engine, "grammars", None)
    if grammars is not None:  # new grammars compile bounded in time (engine/grammar.py)
        grammars.timeout_s = settings.grammar_timeout_s
    auth = Authenticator(load_key_hashes(settings))
    settings = dataclasses.replace(settings, api_key=[])  # from here on only the hashes are kept
    limiter = RateLimiter(settings.rate_limit)
    worker = EngineWorker(engine, settings.max_queue)
    metrics = Metrics(engine, worker)
    ctx = Context(engine, settings, worker, model_name, metrics)  # (refuses an engine without a tokenizer)
    schemas = build_schemas(settings, model_name)
    store = Store(settings.data_dir)  # the last thing made: a server that cannot start creates no database

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()
        store.close()

    app = FastAPI(title="seekling", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.store, app.state.metrics = worker, store, metrics
    app.state.key_hashes = auth.key_hashes
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origin:  # closed unless origins are named
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(HostCheckMiddleware, bind_host=settings.host, allowed=settings.allowed_hosts)  # outermost

    # ------------------------------------------------------------------ errors: OpenAI's shape, Anthropic's there
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, message, param = validation_error(exc)
        return error_json(request.url.path, status, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = (
            f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail)
        )
        return error_json(request.url.path, exc.status_code, message, "invalid_request_error",
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(request.url.path, 500, "The server had an error while processing your request.",
                          "server_error")

    def guard(request: Request) -> str:
        """Every route but /health and the static app shell: authenticate, then rate-limit per key."""
        owner = auth.owner(request)
        limiter.check(owner)
        return owner

    app.include_router(openai_router(ctx, schemas, guard))
    app.include_router(anthropic_router(ctx, schemas, guard))
    cap = min(settings.max_tokens_cap, context - 1) if context else settings.max_tokens_cap
    app.include_router(history_router(store, schemas, guard, {"model": model_name, "max_tokens_cap": cap,
                                                              "context": context}))

    @app.get("/health", responses={**answer(Health), 403: OPENAI_ERRORS[403]})
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(owner: str = Depends(guard)):
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(owner: str = Depends(guard)):
        return openapi_document(app, settings)

    # ------------------------------------------------------------------ the web app shell (no data in it)
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CSP,
                                                                "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------------------------------------- CLI


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The `seekling serve` flags; each also reads SEEKLING_<NAME> (e.g. SEEKLING_API_KEY=k1,k2)."""
    d = Settings.from_env()
    a = parser.add_argument
    a("--model", default=d.model, required=d.model is None, help="model directory (Hugging Face layout)")
    a("--model-name", default=d.model_name, help="model id shown by /v1/models (default: directory name)")
    a("--host", default=d.host, help="bind address (default 127.0.0.1: local only)")
    a("--port", type=int, default=d.port)
    a("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    a("--api-key-file", default=d.api_key_file, help="file with one API key a line")
    a("--rate-limit", type=float, default=d.rate_limit, help="requests per minute per key (0 = no limit)")
    a("--max-body-bytes", type=int, default=d.max_body_bytes)
    a("--max-messages", type=int, default=d.max_messages)
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    a("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="upper bound (and default) for max_tokens")
    a("--max-queue", type=int, default=d.max_queue, help="requests waiting to start before 429s")
    a(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="engine batch size (1 = one request at a time)",
    )
    a(
        "--cors-origin",
        action="append",
        default=None,
        help="allowed CORS origin (repeatable; none by default)",
    )
    a("--allowed-hosts", action="append", default=None, metavar="NAME",
      help="a Host name to answer besides the loopback ones (repeatable; '*': any). Bound to loopback the server "
           "refuses every other Host, which stops DNS-rebinding pages from reading it")
    a("--grammar-timeout-s", type=float, default=d.grammar_timeout_s,
      help="a new grammar (tools, response_format) must compile within this many seconds, or the request gets 400")
    a("--shutdown-timeout-s", type=float, default=d.shutdown_timeout_s,
      help="on SIGTERM, requests still running after this many seconds are cut off")
    a("--log-requests", action="store_true", default=d.log_requests, help="log prompts and outputs")
    a("--data-dir", default=d.data_dir, help="where the chat history database lives")
    # load options (not Settings fields: they only matter when the server loads the model itself)
    a("--dtype", choices=("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), default=None,
      help="weights dtype (default: fp32 on CPU when it fits, else the checkpoint's)")
    a("--quantize", choices=("int8", "int4"), default=None,
      help="int8 (Q8_0's format) or int4 (4.6 bits a weight, the output head at 8) weights, quantised as a model "
           "directory is read and run by seekling's CPU kernels (a GGUF keeps its own bits)")
    a("--compile", action="store_true", default=False,
      help="compile the Python decode step of models the C++ step does not run (dense families, int8, bf16): "
           "decode steps of up to 16 requests as one graph; compiles at start, ~30 s the first time")


def run_serve(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    serve(Settings.from_env(**overrides), dtype=getattr(args, "dtype", None), quantize=getattr(args, "quantize", None),
          compile=getattr(args, "compile", False))


def load_engine(settings: Settings, dtype: str | None = None, quantize: str | None = None, compile: bool = False):
    from seekling.engine import Engine

    kwargs = {"max_num_seqs": settings.max_num_seqs} if settings.max_num_seqs else {}
    return Engine(settings.model, dtype=dtype, quantize=quantize, compile=compile, **kwargs)


def serve(settings: Settings, dtype: str | None = None, quantize: str | None = None, compile: bool = False) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model is None:
        raise ValueError("serve needs --model (or SEEKLING_MODEL)")
    model_dir = Path(settings.model)
    if model_dir.is_dir() and not (model_dir / "tokenizer.json").is_file():  # (before the weights are read)
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}: the server needs the model's tokenizer")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_key or settings.api_key_file):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", settings.host)
    app = create_app(load_engine(settings, dtype, quantize, compile), settings)
    log.info("seekling serve: http://%s:%d (history in %s)", settings.host, settings.port, settings.data_dir)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=settings.shutdown_timeout_s)
