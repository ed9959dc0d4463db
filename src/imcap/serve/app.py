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
"""

import logging
import socket
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from imcap.errors import UserError
from imcap.serve.engine import Engine, Limits, example_images, newest_checkpoint
from imcap.serve.uploads import MEDIA_TYPE, BadUpload, decode_upload, from_base64, sniff

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 as soon as it is
    declared (Content-Length) or, for a chunked upload, as soon as that many bytes arrived; it is
    never buffered or spooled to disk whole."""

    def __init__(self, app: Any, max_bytes: int, image_mb: float) -> None:
        self.app, self.max_bytes, self.image_mb = app, max_bytes, image_mb

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
        seen, started = 0, False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
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

    async def _refuse(self, send: Any, size: str) -> None:
        from starlette.responses import JSONResponse

        msg = (
            f"the request is {size}, over this server's upload limit (max_upload_mb="
            f"{self.image_mb:g}: that many MB of images per request, "
            f"{self.max_bytes / 2**20:.0f} MB with encoding): send a smaller image or fewer images"
        )
        response = JSONResponse({"error": msg}, status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _param(values: Mapping[str, Any], key: str, cast: type, default: Any, what: str) -> Any:
    """One request parameter as `cast`; missing or empty: `default`; unparsable: a 400."""
    raw = values.get(key)
    try:
        return cast(raw) if raw not in (None, "") else cast(default)
    except (TypeError, ValueError):
        raise BadUpload(400, f"{key} must be {what}, got {raw!r}") from None


def decoding_params(values: Mapping[str, Any], engine: Engine, limits: Limits) -> tuple[int, float]:
    """(beam size, length penalty) of a request; missing: the checkpoint's defaults."""
    d = engine.model.decoding
    mode = str(values.get("decoding") or "").strip().lower()
    if mode not in ("", "greedy", "beam"):
        raise BadUpload(400, f"decoding must be 'greedy' or 'beam', got {mode!r}")
    given = values.get("beam_size") not in (None, "")
    beam = _param(values, "beam_size", int, d["beam_size"], "a whole number")
    if mode == "greedy":
        beam = 1
    elif mode == "beam" and not given and beam < 2:
        beam = 3
    if not 1 <= beam <= limits.max_beam_size:
        raise BadUpload(400, f"beam_size must be 1..{limits.max_beam_size}, got {beam}")
    lp = _param(values, "length_penalty", float, d["length_penalty"], "a number")
    if not 0.0 <= lp <= 5.0:
        raise BadUpload(400, f"length_penalty must be between 0 and 5, got {lp}")
    return beam, lp


async def read_uploads(request: Any, limits: Limits) -> tuple[list[tuple], dict[str, Any]]:
    """[(name, media type, bytes)] and the form/JSON parameters of a caption request."""
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
                files.append((value.filename or "", value.content_type, await value.read()))
            else:
                params[key] = value
    elif ctype.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise BadUpload(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadUpload(400, 'send a JSON object: {"image": "<base64>"}')
        items = body.get("images") or ([body["image"]] if body.get("image") else [])
        if not isinstance(items, list):
            raise BadUpload(400, '"images" must be a list of base64 strings')
        if len(items) > limits.max_images:
            raise BadUpload(400, f"{len(items)} images in one request; at most {limits.max_images}")
        for i, item in enumerate(items):
            name = body.get("name", "") if len(items) == 1 else ""
            if isinstance(item, dict):
                name, item = str(item.get("name") or ""), item.get("data")
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


def create_app(
    engine: Engine, limits: Limits | None = None, examples: list[tuple[str, bytes]] | None = None
) -> Any:
    """The FastAPI app serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    import imcap

    limits = limits or Limits()
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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, f"bad request: {exc.errors()[0].get('msg', exc)}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.path.name,
            "device": engine.device,
            "uptime_s": round(time.time() - started, 1),
            "images_captioned": engine.served,
        }

    @app.get("/api/model")
    def model() -> dict[str, Any]:
        return {
            **engine.card,
            "limits": {
                "max_upload_mb": round(limits.max_upload_bytes / 2**20, 1),
                "max_images": limits.max_images,
                "max_beam_size": limits.max_beam_size,
                "formats": sorted(MEDIA_TYPE.values()),
            },
        }

    @app.get("/api/examples")
    def list_examples() -> list[dict[str, str]]:
        return [{"name": n, "url": f"/api/examples/{i}"} for i, (n, _) in enumerate(examples)]

    @app.get("/api/examples/{index}")
    def example(index: int) -> Response:
        if not 0 <= index < len(examples):
            return _error(404, f"no example {index}; there are {len(examples)}")
        name, data = examples[index]
        media = MEDIA_TYPE.get(sniff(data) or "", "application/octet-stream")
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/caption")
    async def caption(request: Request) -> Any:
        """Caption one image (flat answer) or several (one batch; `results`, one per image)."""
        t0 = time.perf_counter()
        try:
            files, params = await read_uploads(request, limits)  # a body over the limit: 413
            beam, lp = decoding_params(params, engine, limits)

            def work() -> list[dict[str, Any]]:  # image decoding and the model, off the loop
                images = [decode_upload(d, n, m, limits.max_upload_bytes) for n, m, d in files]
                return engine.caption(images, beam, lp)

            try:
                rows = await run_in_threadpool(work)
            except BadUpload:
                raise
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down with it
                log.exception("captioning failed")
                return _error(500, f"captioning failed on the server ({type(e).__name__}: {e})")
        except BadUpload as e:
            log.info("refused an upload (%d): %s", e.status, e.message)
            return _error(e.status, e.message)
        meta = {
            "model": {
                "checkpoint": engine.path.name,
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
    )
    return app


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

    from imcap.pipeline.run import apply_decoding_overrides, plain, quiet_known_noise

    quiet_known_noise()
    host, port = str(cfg.host), int(cfg.port)
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
    limits = Limits(
        max_upload_bytes=int(float(cfg.max_upload_mb) * 2**20),
        max_images=int(cfg.max_images),
        max_beam_size=int(cfg.max_beam_size),
    )
    examples = example_images(plain(cfg.get("examples")), engine.model)
    app = create_app(engine, limits, examples)
    if host not in LOOPBACK:
        log.warning("listening on %s: anyone who can reach this machine can use the demo "
                    "(there is no login); host=127.0.0.1 keeps it local", host)  # fmt: skip
    card = engine.card
    shown = "[::1]" if host == "::1" else host
    print(
        f"imcap demo: http://{shown}:{port}  ({engine.name or engine.path.name}: {card['encoder']['name']} -> "
        f"{card['decoder']['type']}, {card['vocab_size']} words, on {device}; Ctrl-C stops it)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=True)
