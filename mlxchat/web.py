"""`mlxchat serve`: a chat page and a streaming completion API, as nanochat's chat_web.

- `GET /`: the chat page (`mlxchat/static/ui.html`).
- `POST /chat/completions` with `{"messages": [...], "temperature", "top_k", "max_tokens"}`
  (the last three optional): server-sent events, `data: {"token": "..."}` per text piece and a
  final `data: {"done": true}`, nanochat's wire format, so either UI talks to either server.
  A generation that fails midway ends with `data: {"error": "..."}` before `done`.
- `GET /health`: liveness, the model served and how many requests wait.

Input is checked before anything is queued, with nanochat's limits: bad JSON, wrong roles or
order, empty or oversized messages and out-of-range sampling settings are answered 400 (a body
too large to be a valid request at all, 413, refused from its Content-Length or as soon as
that many bytes came, never read whole) with `{"detail": "..."}` saying what is wrong.

No one request, nor a handful, can exhaust the server:
- the prompt is cut to the model's context (the newest turns kept, `chat.fit_to_context`),
  the stream saying so first as `data: {"notice": "..."}`, and the reply to what is left of
  the context, so memory and prefill are bounded by the model, not by the request;
- at most `max_waiting` requests wait for the worker; past that, 503 with Retry-After (a
  waiting request whose client hangs up leaves the queue at once);
- a stream whose client does not read it for `write_timeout_s`, or that gets no event for
  `idle_timeout_s`, is dropped and its generation cancelled;
- a request whose Host is not this server's address or localhost, or that comes from a web
  page of another origin, is refused 403 (a cross-origin form POST needs no CORS preflight,
  and DNS rebinding lets a page read the replies): `allow_origins` adds origins ("*": any).

One generation worker. MLX evaluates lazily on per-thread streams, and one model's arrays and
the KV caches of two generations must not be driven from two threads at once; a replica per
request would multiply memory for a machine that is computing flat out on one reply anyway.
So a single thread owns the model (it also loads it, so every MLX call happens on it) and
serves requests one at a time in arrival order; each request gets its own queue of text
pieces, so concurrent streams never mix, and a later request simply starts after the earlier
one ends. A client that disconnects cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import threading
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from mlxchat.chat_session import ChatModel, fit_to_context, stream_reply
from mlxchat.common import MlxchatError, get_logger

log = get_logger()

# nanochat's chat_web abuse limits.
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
# A body beyond this cannot hold a valid request (a character is at most 12 bytes of JSON, an
# escaped surrogate pair; plus each message's framing), so it is refused before parsing.
MAX_BODY_BYTES = 12 * MAX_TOTAL_CONVERSATION_LENGTH + 64 * MAX_MESSAGES_PER_REQUEST
MAX_WAITING = 8
RETRY_AFTER_S = 10
WRITE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class RequestError(ValueError):
    """A request the server refuses: HTTP `status` and a message for the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


def _too_large(size: int | str) -> RequestError:
    return RequestError(f"request body is {size} bytes; at most {MAX_BODY_BYTES} accepted", 413)


async def read_body(request: Request) -> bytes:
    """The body, refused (413) from its Content-Length or as soon as more than
    MAX_BODY_BYTES arrived, so an oversized body is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise _too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(f"more than {MAX_BODY_BYTES}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, defaults: Sampling) -> tuple[list[dict], Sampling]:
    """The messages and sampling settings of a `/chat/completions` body, or a RequestError."""
    if len(body) > MAX_BODY_BYTES:
        raise _too_large(len(body))
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError("request body nests too deeply to be a chat request") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object with a 'messages' list")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise RequestError(f"too many messages ({len(messages)}); at most {MAX_MESSAGES_PER_REQUEST} per request")
    total = 0
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system") or (role == "system" and i > 0):
            raise RequestError(f"message {i} has role {role!r}; roles are 'user' and 'assistant' "
                               "('system' only as the first message)")
        if not isinstance(content, str) or not content:
            raise RequestError(f"message {i} must have non-empty string content")
        if len(content) > MAX_MESSAGE_LENGTH:
            raise RequestError(f"message {i} is {len(content)} characters; at most {MAX_MESSAGE_LENGTH} allowed")
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise RequestError(f"conversation is {total} characters; at most {MAX_TOTAL_CONVERSATION_LENGTH} allowed")
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RequestError(f"messages must alternate user, assistant, ... (after an optional system message); "
                               f"got {message['role']!r} where {expected!r} belongs")
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's, for the assistant to answer")
    sampling = Sampling(
        temperature=_number(request, "temperature", defaults.temperature, TEMPERATURE_RANGE, float),
        top_k=_number(request, "top_k", defaults.top_k, TOP_K_RANGE, int),
        max_tokens=_number(request, "max_tokens", defaults.max_tokens, MAX_TOKENS_RANGE, int),
    )
    return clean, sampling


def _number(request: dict, name: str, default, bounds: tuple, kind: type):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and value != int(value)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise RequestError(f"{name} must be between {bounds[0]} and {bounds[1]}, got {value}")
    return kind(value)


@dataclass(eq=False)  # compared by identity: two requests may ask the same
class _Job:
    messages: list[dict]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
            self.cancelled.set()


class GenerationWorker:
    """The one thread that loads the model and runs every generation (see the module doc);
    at most `max_waiting` requests wait for it. A waiting request whose client leaves gives
    up its place at once (`leave`), not when the worker reaches it: else clients that ask
    and hang up while a long reply runs would fill the queue and turn everyone away."""

    def __init__(self, load: Callable[[], ChatModel], max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self._waiting: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._closing = False
        ready: Future[ChatModel] = Future()
        self._thread = threading.Thread(target=self._run, args=(load, ready), name="mlxchat-generate", daemon=True)
        self._thread.start()
        self.chat = ready.result()  # a load error (no checkpoint) surfaces here, before serving

    def _run(self, load: Callable[[], ChatModel], ready: Future) -> None:
        try:
            chat = load()
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(chat)
        while (job := self._next()) is not None:
            self._serve(chat, job)

    def _next(self) -> _Job | None:
        """The oldest waiting job; None once closing and nothing waits."""
        with self._changed:
            self._changed.wait_for(lambda: self._waiting or self._closing)
            return self._waiting.popleft() if self._waiting else None

    def _serve(self, chat: ChatModel, job: _Job) -> None:
        try:
            if not job.cancelled.is_set():  # its client may leave between the queue and here
                s = job.sampling
                context = chat.model.config.sequence_len
                messages, prompt_len, note = fit_to_context(chat.tokenizer, job.messages,
                                                            context - min(s.max_tokens, context // 2))
                if note:
                    job.send({"notice": note})
                for piece in stream_reply(chat, messages, s.temperature, s.top_k,
                                          min(s.max_tokens, context - prompt_len), cancelled=job.cancelled.is_set):
                    job.send({"token": piece})
        except Exception as e:  # one failed generation must not take the worker down
            log.exception("generation failed")
            job.send({"error": f"generation failed: {e}"})
        finally:
            job.send({"done": True})

    def submit(self, messages: list[dict], sampling: Sampling) -> _Job:
        """Queue a generation; RequestError 503 when `max_waiting` already wait."""
        job = _Job(messages, sampling, asyncio.get_running_loop())
        with self._changed:
            if len(self._waiting) >= self.max_waiting:
                raise RequestError(f"the server is busy ({self.max_waiting} requests waiting); retry in a moment",
                                   503)
            self._waiting.append(job)
            self._changed.notify()
        return job

    def leave(self, job: _Job) -> None:
        """The job's client is gone: stop its generation, or take it out of the queue."""
        job.cancelled.set()
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop after the jobs already waiting are served."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout=60)


def _error(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else {}
    if e.status == 413:
        headers["Connection"] = "close"  # else the server would go on receiving the body, to discard it
    return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)


class _StalledStream(Exception):
    pass


class _TimedStream(StreamingResponse):
    """A streaming response whose every write must complete within `write_timeout_s`: a
    client that stops reading is dropped, not waited for (its generation is then cancelled
    as for a client that left)."""

    def __init__(self, content, write_timeout_s: float, **kwargs):
        super().__init__(content, **kwargs)
        self.write_timeout_s = write_timeout_s

    async def stream_response(self, send) -> None:
        async def timed(message):
            try:
                await asyncio.wait_for(send(message), self.write_timeout_s)
            except asyncio.TimeoutError:
                raise _StalledStream() from None

        await super().stream_response(timed)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _StalledStream:  # the server then closes the connection, the response unfinished
            log.warning("dropped a stream whose client read nothing for %.0f s", self.write_timeout_s)
            await self.body_iterator.aclose()


def allowed_hosts(host: str, allow_origins: tuple[str, ...] = ()) -> set[str] | None:
    """The Host names a request may carry: the bound address and localhost, this machine's
    names when bound to every address, and the hosts of `allow_origins`; None: any ("*")."""
    if "*" in allow_origins:
        return None
    hosts = {*LOOPBACK_NAMES, host.lower()}
    if host in ("0.0.0.0", "::"):
        hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    hosts |= {urlsplit(origin).hostname or "" for origin in allow_origins}
    return hosts


def _host_name(value: str) -> str:
    """The host part of a Host header or of an origin's netloc, brackets off an IPv6 one."""
    return (urlsplit("//" + value).hostname or "").lower()


def _foreign(request: Request, hosts: set[str] | None, allow_origins: tuple[str, ...]) -> str | None:
    """Why the request is refused, or None. Its Host must be one of `hosts` or an IP address
    (DNS rebinding needs a name); an Origin, which browsers send with cross-origin requests,
    must be this very server (the page it served) or one of `allow_origins`."""
    if hosts is None:
        return None
    netloc = request.headers.get("host", "")
    host = _host_name(netloc)
    if host not in hosts and not _is_ip(host):
        return f"Host {host or '(none)'!r} is not this server's; use http://localhost or pass --allow-origin"
    origin = request.headers.get("origin")
    if origin is not None and origin not in allow_origins and urlsplit(origin).netloc.lower() != netloc.lower():
        return f"requests from the web page at {origin} are not allowed; pass --allow-origin {origin} to allow them"
    return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def create_app(worker: GenerationWorker, defaults: Sampling = Sampling(), host: str = "127.0.0.1",
               allow_origins: tuple[str, ...] = (), write_timeout_s: float = WRITE_TIMEOUT_S,
               idle_timeout_s: float = IDLE_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `worker`'s model on `host`; the worker is closed when the app
    shuts down. See the module doc for `allow_origins` and the timeouts."""
    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = FastAPI(title="mlxchat", lifespan=lifespan)
    page = files("mlxchat").joinpath("static/ui.html").read_text(encoding="utf-8")
    hosts = allowed_hosts(host, allow_origins)

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next):
        why = _foreign(request, hosts, allow_origins)
        if why:
            return _error(RequestError(why, 403))
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        chat = worker.chat
        return {"status": "ok", "ready": True, "run": chat.run, "stage": chat.stage, "step": chat.step,
                "waiting": worker.waiting}

    @app.post("/chat/completions")
    async def completions(request: Request):
        try:
            messages, sampling = parse_request(await read_body(request), defaults)
            job = worker.submit(messages, sampling)
        except RequestError as e:
            return _error(e)

        async def events():
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(job.events.get(), idle_timeout_s)
                    except asyncio.TimeoutError:
                        event = {"error": f"no reply within {idle_timeout_s:.0f} s; try again later"}
                        yield f"data: {json.dumps(event)}\n\ndata: {json.dumps({'done': True})}\n\n"
                        return
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                    if event.get("done"):
                        return
            finally:
                worker.leave(job)

        return _TimedStream(events(), write_timeout_s, media_type="text/event-stream")

    return app


def serve(run: str, stage: str = "sft", host: str = "127.0.0.1", port: int = 8000, root=None,
          defaults: Sampling = Sampling(), allow_origins: tuple[str, ...] = ()) -> None:
    """Load the run's chat model and serve it until interrupted (a missing checkpoint or a
    default setting no request could ask for is a MlxchatError before anything listens)."""
    import uvicorn

    from mlxchat.chat_session import load_chat_model

    for name, bounds in (("temperature", TEMPERATURE_RANGE), ("top_k", TOP_K_RANGE), ("max_tokens", MAX_TOKENS_RANGE)):
        value = getattr(defaults, name)
        if not bounds[0] <= value <= bounds[1]:
            raise MlxchatError(f"--{name.replace('_', '-')} {value} is outside what requests may ask for "
                               f"({bounds[0]} to {bounds[1]}); pick a default in that range")
    for origin in allow_origins:
        if origin != "*" and (urlsplit(origin).scheme not in ("http", "https") or not urlsplit(origin).hostname):
            raise MlxchatError(f"--allow-origin {origin!r} is not an origin; give one like https://example.com, or *")
    worker = GenerationWorker(lambda: load_chat_model(run, stage, root))
    if host not in LOOPBACK_NAMES:
        log.warning("listening on %s: anyone who can reach this machine on port %d can use the model "
                    "(no authentication); use --host 127.0.0.1 to keep it to this machine", host, port)
    log.info("serving %s/%s (step %d) on http://%s:%d", run, stage, worker.chat.step, host, port)
    uvicorn.run(create_app(worker, defaults, host, tuple(allow_origins)), host=host, port=port)
