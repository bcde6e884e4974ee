"""Server settings, errors (OpenAI's shape, or Anthropic's on /v1/messages), API keys, rate limits, the Host check
(DNS rebinding), the request-body cap and the refusal, anywhere in a body, of what JSON parses but nothing can
hold: NaN, Infinity, numbers past a double (1e999) and lone UTF-16 surrogates.

Keys are hashed (sha256) as soon as they are loaded, so the plain key never sits in memory after start-up
and a conversation's owner is stored as the key's hash, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

LOCAL_OWNER = "local"  # the single owner when no API key is configured


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "seekling")


@dataclass
class Settings:
    """Every flag of `seekling serve`; each also reads `SEEKLING_<NAME>` from the environment."""

    model: str | None = None
    model_name: str | None = None  # the id shown by /v1/models (default: the model directory's name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: list[str] = field(default_factory=list)
    api_key_file: str | None = None
    rate_limit: float = 0.0  # requests per minute per key; 0 = unlimited
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_prompt_tokens: int = 8192
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_queue: int = 256  # requests admitted but not yet producing tokens
    max_num_seqs: int | None = None  # passed to the engine when the server loads the model itself
    keepalive_s: float = 5.0  # SSE keep-alive comment interval while a stream has nothing to send
    grammar_timeout_s: float = 10.0  # a new grammar (tools, response_format) compiles within this, or 400
    shutdown_timeout_s: float = 3.0  # on SIGTERM, requests still running after this are cut off
    cors_origin: list[str] = field(default_factory=list)
    # Host names answered besides the loopback ones ("*": any). Bound to loopback, the server refuses every other
    # Host (a DNS-rebinding page names its own); bound elsewhere with none listed, it answers any.
    allowed_hosts: list[str] = field(default_factory=list)
    log_requests: bool = False
    data_dir: str = field(default_factory=default_data_dir)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Defaults, then `SEEKLING_*` environment variables, then explicit overrides (flags)."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get("SEEKLING_" + f.name.upper())
            if raw is None:
                continue
            kind = str(f.type)
            if kind.startswith("list"):
                values[f.name] = [v.strip() for v in raw.split(",") if v.strip()]
            elif kind == "bool":
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind.startswith("int"):
                values[f.name] = int(raw)
            elif kind.startswith("float"):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ---------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    529: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}


def error_json(path: str, status: int, message: str, type: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape the route's clients expect: Anthropic's on /v1/messages (where a request of the
    wrong shape is a 400 too), OpenAI's elsewhere."""
    if not is_anthropic(path):
        return JSONResponse(error_body(message, type, param, code), status, headers=headers)
    status = 400 if status == 422 else status
    return JSONResponse(anthropic_error_body(status, message), status, headers=headers)


def error_response(err: APIError, path: str = "") -> JSONResponse:
    return error_json(path, err.status, err.message, err.type, err.param, err.code, err.headers)


# ---------------------------------------------------------------------------------------------- API keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(settings: Settings) -> list[bytes]:
    """Hashes of the keys given by --api-key and --api-key-file (one key a line, '#' comments)."""
    keys = list(settings.api_key)
    if settings.api_key_file:
        text = Path(settings.api_key_file).read_text()
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for k in keys:
        if len(k) < 8:
            raise ValueError("an API key must be at least 8 characters long")
    return [hash_key(k).encode() for k in keys]


class Authenticator:
    def __init__(self, key_hashes: list[bytes]):
        self.key_hashes = key_hashes

    def owner(self, request: Request) -> str:
        """The caller's owner id (its key's hash), or LOCAL_OWNER when no keys are set; raises 401. The key
        comes as `Authorization: Bearer <key>` (OpenAI) or `x-api-key: <key>` (Anthropic), on every route."""
        if not self.key_hashes:
            return LOCAL_OWNER
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        token = token or request.headers.get("x-api-key", "").strip()
        if not token:
            raise APIError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                "authentication_error",
                code="invalid_api_key",
            )
        digest = hash_key(token).encode()
        # Compare against every key without stopping early, so timing says nothing about which matched.
        match = None
        for h in self.key_hashes:
            if hmac.compare_digest(digest, h):
                match = h
        if match is None:
            raise APIError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")
        return match.decode()


# ---------------------------------------------------------------------------------------------- rate limit


class RateLimiter:
    """A token bucket per owner: `rate` requests per minute, bursts up to `rate`."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, last refill time)
        self.lock = threading.Lock()

    def check(self, owner: str) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            tokens, last = self.buckets.get(owner, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self.buckets[owner] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise APIError(
                    429,
                    f"Rate limit reached: {self.capacity:g} requests per minute. Retry in {wait} s.",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
            self.buckets[owner] = (tokens - 1.0, now)


# ---------------------------------------------------------------------------------------------- Host check


def is_loopback(host: str) -> bool:
    """A loopback name or address: localhost, *.localhost, 127.0.0.0/8, ::1."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """Refuse (403) a request whose Host is not allowed, before any route sees it. A web page the user visits
    can make its own name resolve to 127.0.0.1 (DNS rebinding) and then read a keyless local server as if it
    were its own origin; its requests carry its own name as Host. So a server bound to loopback answers loopback
    names only, plus `allowed` (Ollama's fix for CVE-2024-28224 is the same rule); "*" turns the check off."""

    def __init__(self, app, bind_host: str, allowed: list[str]):
        self.app = app
        self.allowed = {h.lower().rstrip(".") for h in allowed}
        self.active = "*" not in self.allowed and (is_loopback(bind_host) or bool(self.allowed))

    def permits(self, header: str | None) -> bool:
        if not self.active or not header:  # (no Host: HTTP/1.0; a browser always sends one)
            return True
        name = host_name(header).lower().rstrip(".")
        return is_loopback(name) or name in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.permits(header):
            return await self.app(scope, receive, send)
        refused = error_json(scope["path"], 403, f"Host {header!r} is not allowed: this server answers loopback names "
                             "(localhost, 127.0.0.1, [::1]) and the names given with --allowed-hosts.",
                             "permission_error", code="host_not_allowed")
        return await refused(scope, receive, send)


# ---------------------------------------------------------------------------------------------- body cap


class _NotJSON(ValueError):
    """What Python's json module reads but JSON (RFC 8259) and the server cannot hold: NaN, Infinity, a number
    past a double's range (1e999 reads as infinity) and a lone UTF-16 surrogate (not a character)."""


def _refuse_constant(name: str) -> None:
    raise _NotJSON(f"{name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"the number {text[:40]}, which is past the range of a double")
    return value


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Bytes that may hold one of those: only then is the body parsed here (FastAPI parses it anyway).
SUSPECT = re.compile(rb"NaN|Infinity|[eE][+-]?\d{3}|\d{300}|\\u[dD][89a-fA-F]")


def _lone_surrogate(value) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if LONE_SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def non_json_value(body: bytes) -> str | None:
    """What a JSON body holds that is not JSON (see _NotJSON), or None (also when the body is not JSON at all:
    the app says so)."""
    if not SUSPECT.search(body):
        return None
    try:
        value = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotJSON as e:
        return str(e)
    except (ValueError, RecursionError):
        return None
    if _lone_surrogate(value):
        return "a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), which is not text"
    return None


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuse (413) a request body over `max_bytes`, with or without Content-Length,
    and (400) a JSON body holding, anywhere, a value that is not JSON (`non_json_value`).

    The body is read up front and replayed to the app, so chunked uploads are bounded too.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        too_large = error_json(scope["path"], 413, f"Request body exceeds {self.max_bytes} bytes.",
                               "invalid_request_error", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        problem = non_json_value(body)
        if problem is not None:
            refused = error_json(scope["path"], 400, f"The request body holds {problem} (numbers must be finite, "
                                 "text must be Unicode).", "invalid_request_error", code="invalid_json")
            return await refused(scope, receive, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say

        await self.app(scope, replay, send)
