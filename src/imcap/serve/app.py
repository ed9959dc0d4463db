"""The web demo: one static page and a JSON API over an `Engine`, as a FastAPI app (uvicorn).

    GET  /               the page (no build step, no CDN: works offline)
    POST /api/caption    multipart file(s) or JSON base64 -> caption, beams, attention, model, ms
    GET  /api/health     liveness, for scripts and load balancers
    GET  /api/model      the model card
    GET  /api/examples   example images the page offers (GET /api/examples/<i> for the bytes)

Errors are JSON `{"error": "..."}` with a 4xx status; a bad upload never stops the server.
FastAPI is imported inside the functions, so a missing `[demo]` extra is one line, not a
traceback (and no `from __future__ import annotations`: FastAPI resolves the route functions'
annotations, such as `Request`, where they are defined).

Hostile clients get budgets, not the machine (every limit is a key of conf/serve.yaml, see
`Limits`): a body limit and a body deadline; a pixel budget per request read from the image
headers before anything is decoded; a bounded number of caption requests in the server (more:
503 with Retry-After at once); images decoded on max_decoding threads of their own, each made
into the model's small input at once, before the request waits (at most queue_timeout_s) for the
model; health, card and page never wait behind captioning (they run on the event loop, not in
the thread pool). uvicorn gets a connection limit, a keep-alive timeout and a header deadline.
The Host header must name this server (a DNS-rebinding page cannot read it) and a POST from
another web origin is refused (another page cannot drive it). No reply carries a server file path.
"""

import asyncio
import ipaddress
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imcap.errors import UserError
from imcap.serve.engine import (
    Busy,
    Engine,
    Limits,
    Prepared,
    example_images,
    newest_checkpoint,
)
from imcap.serve.uploads import (
    MEDIA_TYPE,
    BadUpload,
    check_request_pixels,
    check_upload,
    decode_checked,
    from_base64,
    sniff,
)

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
MAX_HEADER_BYTES = 16 << 10  # request line + headers (h11's incomplete-event limit)
MAX_NAME = 255  # characters of an upload's name kept (it is echoed in answers)


# -- small helpers --------------------------------------------------------------------------------
_ABS_PATH = re.compile(r"(?<![\w:/.\\])(?:[A-Za-z]:[\\/]|~?/)[^\s'\"<>,;)]+")


def scrub_paths(text: str) -> str:
    """`text` with every absolute file path cut to its file name: replies never tell a client
    where the server keeps its files (or whose home folder it runs in). URLs are left alone."""
    return _ABS_PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], text)


def public(value: Any) -> Any:
    """A JSON-able value (the model card) with server paths scrubbed from every string."""
    if isinstance(value, Mapping):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public(v) for v in value]
    return scrub_paths(value) if isinstance(value, str) else value


def _show(value: Any, n: int = 40) -> str:
    """A client's value for a message: repr, cut short (a reply must not echo megabytes)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    return _json(status, {"error": scrub_paths(message)}, headers)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


async def _send_json(send: Any, status: int, message: str, close: bool = False) -> None:
    """A JSON error sent from ASGI middleware (outside FastAPI's handlers)."""
    response = _error(status, message, {"Connection": "close"} if close else None)
    await response({"type": "http"}, _no_receive, send)


# -- ASGI middleware: the body, the Host and the Origin ------------------------------------------
class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 as soon as it is
    declared (Content-Length) or, for a chunked upload, as soon as that many bytes arrived; it is
    never buffered or spooled to disk whole. A body that has not arrived `timeout_s` after the
    request began is refused with 408 (a client dripping bytes holds no slot for long)."""

    def __init__(self, app: Any, max_bytes: int, image_mb: float, timeout_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.image_mb = app, max_bytes, image_mb
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await self._refuse(send, f"{declared / 2**20:.1f} MB")
        seen, started, done = 0, False, False
        deadline = time.monotonic() + self.timeout_s

        async def limited() -> dict:
            nonlocal seen, done
            if done:  # the whole body is in: what follows is a wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
                done = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, f"over {self.max_bytes / 2**20:.0f} MB")
        except _TooSlow:
            log.info("refused a request whose body took over %g s", self.timeout_s)
            if not started:
                await _send_json(
                    send,
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(body_timeout_s): send it again over a faster connection",
                    close=True,
                )

    async def _refuse(self, send: Any, size: str) -> None:
        msg = (
            f"the request is {size}, over this server's upload limit (max_upload_mb="
            f"{self.image_mb:g}: that many MB of images per request, "
            f"{self.max_bytes / 2**20:.0f} MB with encoding): send a smaller image or fewer images"
        )
        await _send_json(send, 413, msg, close=True)


_HOST = re.compile(r"^(?:(\[[0-9A-Fa-f:.]+\])|([A-Za-z0-9._-]+))(?::(\d{1,5}))?$")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(host name or IP, port) of a Host header; None when it is no plain host[:port]."""
    m = _HOST.match(value.strip())
    if not m:
        return None
    name = (m.group(1)[1:-1] if m.group(1) else m.group(2)).lower().rstrip(".")
    return name, int(m.group(3)) if m.group(3) else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostRule:
    """Which Host headers and web origins this server answers.

    A DNS-rebinding page reaches a loopback (or LAN) server under the attacker's own host name,
    so the Host header is checked: an IP address (never a rebinding: the page's origin is then
    the server itself), `localhost` and `*.localhost`, the address the server is bound to, this
    machine's name when it serves the network, and `allowed_hosts` (`*.example.org` patterns;
    `*` turns the check off). A POST (anything but GET/HEAD/OPTIONS) carrying an Origin must come
    from the page's own origin (same host and port) or one of `allowed_origins`, so another web
    page cannot make the server work for it."""

    def __init__(
        self, bound: str, allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = ()
    ) -> None:
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()]
        self.any_host = "*" in hosts
        self.names = {"localhost", bound.strip("[]").lower()} | {
            h for h in hosts if not h.startswith("*.")
        }
        self.suffixes = (".localhost", *(h[1:] for h in hosts if h.startswith("*.")))
        if bound.strip("[]") not in LOOPBACK:  # serving the network: the machine's own name
            name = socket.gethostname().lower()
            self.names |= {name, name.split(".")[0], f"{name.split('.')[0]}.local"}
        origins = [o.strip().lower().rstrip("/") for o in allowed_origins if o.strip()]
        self.any_origin, self.origins = "*" in origins, set(origins)

    def host_ok(self, host: str) -> bool:
        parts = _split_host(host)
        if parts is None:
            return False
        name = parts[0]
        return self.any_host or _is_ip(name) or name in self.names or name.endswith(self.suffixes)

    def origin_ok(self, origin: str, host: str | None) -> bool:
        o = origin.strip().lower().rstrip("/")
        if self.any_origin or o in self.origins:
            return True
        parts = _split_host(host or "")
        if o == "null" or parts is None:
            return False
        try:
            u = urlsplit(o)
            o_host, o_port = (u.hostname or "").rstrip("."), u.port
        except ValueError:
            return False
        if u.scheme not in ("http", "https") or not o_host:
            return False
        default = 443 if u.scheme == "https" else 80
        return o_host == parts[0] and (o_port or default) == (parts[1] or default)


class HostGuard:
    """ASGI middleware enforcing a `HostRule`: a foreign Host is a 400, a foreign Origin on a
    POST a 403, both JSON, before the app (or the body) is touched."""

    def __init__(self, app: Any, rule: HostRule) -> None:
        self.app, self.rule = app, rule

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        raw_host = headers.get(b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        if host is not None and not self.rule.host_ok(host):
            log.warning("refused a request for host %s", _show(host, 80))
            return await _send_json(
                send,
                400,
                f"this demo does not answer to the host name {_show(host, 80)} (the Host "
                "header): open it by its address (http://127.0.0.1:<port> on this machine), or "
                "if that name is yours, start the server with allowed_hosts=[<name>]",
                close=True,
            )
        origin = headers.get(b"origin")
        if origin is not None and scope.get("method", "GET") not in SAFE_METHODS:
            text = origin.decode("latin-1")
            if not self.rule.origin_ok(text, host):
                log.warning("refused a %s from origin %s", scope.get("method"), _show(text, 80))
                return await _send_json(
                    send,
                    403,
                    f"a page from {_show(text, 80)} may not use this demo (the Origin header "
                    "names another site): use the demo's own page, call the API without a "
                    "browser, or start the server with allowed_origins=[<that origin>]",
                    close=True,
                )
        return await self.app(scope, receive, send)


# -- turns: admission, decoding threads, the model -----------------------------------------------
class Gate:
    """How many caption requests the server holds and how many images it decodes at once.

    Admission is decided at once, before the body is read: beyond `max_pending` a request gets
    503 with Retry-After instead of a place in an unbounded queue. Images are decoded on
    `max_decoding` threads of their own, so decoded images in memory are bounded whatever the
    number of requests, and so is what the allocator keeps after them (glibc keeps a freed large
    image in the malloc arena of the thread that decoded it: decoded on 8 waiting request
    threads, 8 images' worth would stay). Thread-safe, with no event-loop primitives (a
    TestClient runs a loop per request)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.decoder = ThreadPoolExecutor(max(1, limits.max_decoding), "imcap-decode")
        self._lock = threading.Lock()
        self.pending = 0
        self.seconds = 1.0  # a moving average of one request's time in the server

    def admit(self) -> bool:
        with self._lock:
            if self.pending >= self.limits.max_pending:
                return False
            self.pending += 1
            return True

    def leave(self, seconds: float | None = None) -> None:
        with self._lock:
            self.pending -= 1
            if seconds is not None:
                self.seconds = 0.8 * self.seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the requests ahead times their usual time."""
        return max(1, min(60, math.ceil(self.seconds * max(1, self.pending))))


# -- request parameters ---------------------------------------------------------------------------
def _param(values: Mapping[str, Any], key: str, cast: type, default: Any, what: str) -> Any:
    """One request parameter as `cast`; missing or empty: `default`; anything that is not a
    finite `what` (a bool, 1e999, NaN, 2.5 for a whole number, a list): a 400."""
    raw = values.get(key)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = default
    bad = BadUpload(400, f"{key} must be {what}, got {_show(raw)}")
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise bad
    try:
        value = cast(raw)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if cast is int and isinstance(raw, float) and raw != value:
        raise bad
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    return value


def decoding_params(values: Mapping[str, Any], engine: Engine, limits: Limits) -> tuple[int, float]:
    """(beam size, length penalty) of a request; missing: the checkpoint's defaults."""
    d = engine.model.decoding
    raw_mode = values.get("decoding")
    if raw_mode is not None and not isinstance(raw_mode, str):
        raise BadUpload(400, f"decoding must be 'greedy' or 'beam', got {_show(raw_mode)}")
    mode = (raw_mode or "").strip().lower()
    if mode not in ("", "greedy", "beam"):
        raise BadUpload(400, f"decoding must be 'greedy' or 'beam', got {_show(mode)}")
    given = values.get("beam_size") not in (None, "")
    beam = _param(values, "beam_size", int, d["beam_size"], "a whole number")
    if mode == "greedy":
        beam = 1
    elif mode == "beam" and not given and beam < 2:
        beam = 3
    if not 1 <= beam <= limits.max_beam_size:
        raise BadUpload(400, f"beam_size must be 1..{limits.max_beam_size}, got {_show(beam)}")
    lp = _param(values, "length_penalty", float, d["length_penalty"], "a number")
    if not 0.0 <= lp <= 5.0:
        raise BadUpload(400, f"length_penalty must be between 0 and 5, got {lp}")
    return beam, lp


def _name(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadUpload(400, f"{where} must be a string (a file name), got {_show(value)}")
    return value[:MAX_NAME]


async def read_uploads(request: Any, limits: Limits) -> tuple[list[tuple], dict[str, Any]]:
    """[(name, media type, bytes)] and the form/JSON parameters of a caption request."""
    import json

    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    ctype = request.headers.get("content-type", "").lower()
    files: list[tuple[str, str | None, bytes]] = []
    params: dict[str, Any] = dict(request.query_params)
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limits.max_images, max_fields=20)
        except HTTPException as e:  # too many files or fields, a malformed body
            raise BadUpload(400, f"cannot read the upload: {e.detail}") from None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = (value.filename or "")[:MAX_NAME]
                files.append((name, value.content_type, await value.read()))
            else:
                params[key] = value
    elif ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past any sense
            raise BadUpload(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadUpload(400, 'send a JSON object: {"image": "<base64>"}')
        items = body.get("images") or ([body["image"]] if body.get("image") else [])
        if not isinstance(items, list):
            raise BadUpload(400, '"images" must be a list of base64 strings')
        if len(items) > limits.max_images:
            raise BadUpload(400, f"{len(items)} images in one request; at most {limits.max_images}")
        for i, item in enumerate(items):
            name = _name(body.get("name"), '"name"') if len(items) == 1 else ""
            if isinstance(item, dict):
                name, item = _name(item.get("name"), f"image {i + 1}'s name"), item.get("data")
            if not isinstance(item, str):
                raise BadUpload(400, f"image {i + 1} is not a base64 string")
            data, media = from_base64(item)
            files.append((name, media, data))
        params.update({k: v for k, v in body.items() if k not in ("image", "images", "name")})
    else:
        raise BadUpload(
            415,
            "send the image as multipart/form-data (a 'file' field: curl -F file=@photo.jpg) or "
            'as JSON {"image": "<base64>"}',
        )
    if not files:
        raise BadUpload(
            400, "no image in the request: add a 'file' field (curl -F file=@photo.jpg)"
        )
    return files, params


def caption_work(
    engine: Engine, gate: Gate, files: list[tuple], beam: int, lp: float
) -> list[dict[str, Any]]:
    """A caption request's blocking part, in a worker thread: every header checked and the
    request's pixels budgeted before anything is decoded; then, on a decoding thread, one image
    at a time decoded and made into the model's input (the decoded image freed at once); then a
    turn on the model. Waits at most queue_timeout_s in all, then raises Busy."""
    limits = gate.limits
    headers = [
        check_upload(data, name, media, limits.max_upload_bytes, limits.max_request_pixels)
        for name, media, data in files
    ]
    check_request_pixels(headers, limits.max_request_pixels)
    deadline = time.monotonic() + limits.queue_timeout_s

    def decode() -> list[Prepared]:
        prepared = []
        for (_, _, data), header in zip(files, headers, strict=True):
            image = decode_checked(data, header)
            prepared.append(engine.prepare(image))
            del image  # the decoded pixels go now, not when the request is answered
        return prepared

    job = gate.decoder.submit(decode)
    try:
        prepared = job.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        if job.cancel():  # still waiting for a decoding thread
            raise Busy(f"no decoding thread free within {limits.queue_timeout_s:g} s") from None
        prepared = job.result()  # already decoding: it finishes (its pixels are budgeted)
    return engine.caption(prepared, beam, lp, timeout=deadline - time.monotonic())


def create_app(
    engine: Engine, limits: Limits | None = None, examples: list[tuple[str, bytes]] | None = None
) -> Any:
    """The FastAPI app serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    import imcap

    limits = limits or Limits()
    gate = Gate(limits)
    examples = list(examples or [])
    page = (resources.files("imcap.serve") / "static" / "index.html").read_text(encoding="utf-8")
    started = time.time()
    app = FastAPI(
        title="imcap captioning demo",
        version=imcap.__version__,
        docs_url=None,  # the Swagger page loads from a CDN; the schema is served below
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.gate = gate  # for tests and operators: gate.pending is the queue

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, f"bad request: {exc.errors()[0].get('msg', exc)}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Any:
        ref = uuid.uuid4().hex[:8]
        log.error("error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return _error(500, f"the server failed (error {ref}; its log has the details)")

    # health, card, page and examples are async: they run on the event loop, so they answer
    # while every worker thread is busy captioning
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.name or engine.path.name,
            "device": engine.device,
            "uptime_s": round(time.time() - started, 1),
            "images_captioned": engine.served,
            "pending": gate.pending,
        }

    @app.get("/api/model")
    async def model() -> dict[str, Any]:
        return public(
            {
                **engine.card,
                "limits": {
                    "max_upload_mb": round(limits.max_upload_bytes / 2**20, 1),
                    "max_images": limits.max_images,
                    "max_beam_size": limits.max_beam_size,
                    "max_request_pixels": limits.max_request_pixels,
                    "max_pending": limits.max_pending,
                    "queue_timeout_s": limits.queue_timeout_s,
                    "formats": sorted(MEDIA_TYPE.values()),
                },
            }
        )

    @app.get("/api/examples")
    async def list_examples() -> list[dict[str, str]]:
        return [{"name": n, "url": f"/api/examples/{i}"} for i, (n, _) in enumerate(examples)]

    @app.get("/api/examples/{index}")
    async def example(index: int) -> Response:
        if not 0 <= index < len(examples):
            return _error(404, f"no example {index}; there are {len(examples)}")
        name, data = examples[index]
        media = MEDIA_TYPE.get(sniff(data) or "", "application/octet-stream")
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    def busy(message: str) -> Any:
        retry = gate.retry_after()
        return _error(503, f"{message}; try again in {retry} s", {"Retry-After": str(retry)})

    @app.post("/api/caption")
    async def caption(request: Request) -> Any:
        """Caption one image (flat answer) or several (one batch; `results`, one per image)."""
        t0 = time.perf_counter()
        if not gate.admit():  # before the body is read: a full server costs nothing more
            log.info("refused a caption request: %d in progress or waiting", gate.pending)
            return busy(
                f"the server is busy: {limits.max_pending} caption requests are already in "
                "progress or waiting (max_pending)"
            )
        took = None
        try:
            # the body (a body over the limit or too slow raises to BodyLimit: 413, 408)
            try:
                files, params = await read_uploads(request, limits)
                beam, lp = decoding_params(params, engine, limits)
                rows = await run_in_threadpool(caption_work, engine, gate, files, beam, lp)
            except BadUpload as e:
                log.info("refused an upload (%d): %s", e.status, e.message)
                return _error(e.status, e.message)
            except Busy as e:
                log.info("a caption request gave up waiting: %s", e)
                return busy(
                    f"the server is busy: the request waited {limits.queue_timeout_s:g} s "
                    "(queue_timeout_s) for its turn"
                )
            except (_TooLarge, _TooSlow, ClientDisconnect):
                raise  # BodyLimit answers these; a client that left needs no answer
            except Exception:  # noqa: BLE001 - a bug must not take the server down with it
                ref = uuid.uuid4().hex[:8]
                log.exception("captioning failed (error %s)", ref)
                return _error(500, f"captioning failed on the server (error {ref}; see its log)")
            took = time.perf_counter() - t0
        finally:
            gate.leave(took)
        meta = {
            "model": {
                "checkpoint": engine.name or engine.path.name,
                "encoder": engine.card["encoder"]["name"],
                "decoder": engine.card["decoder"]["type"],
            },
            "decoding": {"beam_size": beam, "length_penalty": lp},
            "ms": round(1000 * (time.perf_counter() - t0), 1),
        }
        for row, (name, _, _) in zip(rows, files, strict=True):
            row["name"] = name
        if len(rows) == 1:
            return {**rows[0], **meta}
        return {"results": rows, **meta}

    # base64 inflates by 4/3, multipart adds a little: room for both over the image bytes
    app.add_middleware(
        BodyLimit,
        max_bytes=int(limits.max_upload_bytes * 4 / 3) + (64 << 10),
        image_mb=round(limits.max_upload_bytes / 2**20, 1),
        timeout_s=limits.body_timeout_s,
    )
    # added last: the outermost, so a foreign Host or Origin is refused before anything else
    app.add_middleware(
        HostGuard, rule=HostRule(limits.host, limits.allowed_hosts, limits.allowed_origins)
    )
    return app


# -- uvicorn: connections, keep-alive, a header deadline ------------------------------------------
def header_timeout_protocol(timeout_s: float) -> Any:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived `timeout_s` after it opened (or after its previous answer). uvicorn has no such
    setting: a client sending a header line every few seconds would hold a connection forever.
    "auto" (uvicorn's own) where its h11 protocol is not what this was written against."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - uvicorn is pinned with the demo's extra
        return "auto"
    if not all(hasattr(H11Protocol, m) for m in ("handle_events", "on_response_complete")):
        return "auto"  # pragma: no cover

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in: its body has its own
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers (a pipelined one disarms it at once)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request in progress
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


def server_config(app: Any, limits: Limits, port: int) -> Any:
    """The uvicorn config of the demo: its limits on connections and slow clients set."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=limits.host,
        port=port,
        log_config=None,
        access_log=True,
        http=header_timeout_protocol(limits.header_timeout_s),
        ws="none",  # no websockets: an upgrade request is an ordinary request
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        server_header=False,
    )


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple):
        raise UserError(f"{key} must be a list of names, got {_show(value)} (conf/serve.yaml)")
    return tuple(str(v).strip() for v in value if str(v).strip())


def limits_from(cfg: Any) -> Limits:
    """The demo's Limits from its config (conf/serve.yaml); a nonsense value is a UserError
    naming the key."""
    from imcap.pipeline.runtime import plain

    d = Limits()

    def num(key: str, cast: type, least: float, default: Any) -> Any:
        raw = cfg.get(key, default)
        try:
            value = cast(raw)
            ok = math.isfinite(value) and value >= least
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UserError(
                f"{key}={_show(raw)} is not a number >= {least:g}: fix it in conf/serve.yaml "
                f"or on the command line (default {default})"
            )
        return value

    return Limits(
        max_upload_bytes=int(num("max_upload_mb", float, 0.001, 20) * 2**20),
        max_images=num("max_images", int, 1, d.max_images),
        max_beam_size=num("max_beam_size", int, 1, d.max_beam_size),
        max_request_pixels=num("max_request_pixels", int, 1, d.max_request_pixels),
        max_pending=num("max_pending", int, 1, d.max_pending),
        max_decoding=num("max_decoding", int, 1, d.max_decoding),
        queue_timeout_s=num("queue_timeout_s", float, 0, d.queue_timeout_s),
        body_timeout_s=num("body_timeout_s", float, 0.1, d.body_timeout_s),
        header_timeout_s=num("header_timeout_s", float, 0.1, d.header_timeout_s),
        keep_alive_s=num("keep_alive_s", int, 1, d.keep_alive_s),
        max_connections=num("max_connections", int, 2, d.max_connections),
        host=str(cfg.get("host", d.host)),
        allowed_hosts=_names(plain(cfg.get("allowed_hosts")), "allowed_hosts"),
        allowed_origins=_names(plain(cfg.get("allowed_origins")), "allowed_origins"),
    )


# -- python src/serve.py -------------------------------------------------------------------------
def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}): another server uses the port? "
                "Pass port=<another>, or host=127.0.0.1"
            ) from None


def serve(cfg: Any) -> None:
    """Load the checkpoint once and serve the page and the API until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: file uploads)
        import uvicorn
    except ImportError as e:
        raise UserError(
            f"the web demo needs its extra packages ({e.name} is missing): "
            "pip install -e '.[demo]' (make demo installs them)"
        ) from None
    import torch

    from imcap.pipeline.runtime import apply_decoding_overrides, plain, quiet_known_noise

    quiet_known_noise()
    host, port = str(cfg.host), int(cfg.port)
    limits = limits_from(cfg)  # a bad limit fails before the model loads
    from imcap.model import zoo

    if str(cfg.get("ckpt_path")) == "latest":
        ckpt = newest_checkpoint(Path(cfg.paths.log_dir))
        log.info("ckpt_path=latest: serving the newest checkpoint under %s: %s",
                 cfg.paths.log_dir, ckpt)  # fmt: skip
    elif cfg.get("ckpt_path"):
        ckpt = cfg.ckpt_path
    else:
        ckpt = zoo.default_checkpoint("serve")
    _check_port(host, port)
    device = "cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu"
    engine = Engine(ckpt, device=device, trust=bool(cfg.get("trust_checkpoint")))
    apply_decoding_overrides(engine.model, cfg)
    engine.card["decoding"] = dict(engine.model.decoding)
    examples = example_images(plain(cfg.get("examples")), engine.model)
    app = create_app(engine, limits, examples)
    if host not in LOOPBACK:
        names = ", ".join(sorted(HostRule(host, limits.allowed_hosts).names))
        log.warning("listening on %s: anyone who can reach this machine can use the demo "
                    "(there is no login); host=127.0.0.1 keeps it local. It answers to IP "
                    "addresses and %s (more: allowed_hosts=[...])", host, names)  # fmt: skip
    card = engine.card
    shown = "[::1]" if host == "::1" else host
    print(
        f"imcap demo: http://{shown}:{port}  ({engine.name or engine.path.name}: "
        f"{card['encoder']['name']} -> {card['decoder']['type']}, {card['vocab_size']} words, "
        f"on {device}; Ctrl-C stops it)",
        flush=True,
    )
    uvicorn.Server(server_config(app, limits, port)).run()
