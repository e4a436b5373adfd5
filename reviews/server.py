"""`kmnist-batch review OUT`: the review app, a Starlette app on uvicorn, over a finished or running predict OUT.

Security, as Jupyter does it, and more (docs/review.md#security):
- The server binds 127.0.0.1 unless told otherwise. `Host` must name the server (its bound host; for a
  loopback bind any of 127.0.0.1, localhost, [::1]; for 0.0.0.0 or :: also this machine's name and the
  address the connection came in on) with its port, else 400: a page on a DNS-rebound name reaches nothing.
- A random token (secrets.token_urlsafe) is part of the URL it prints on stdout and is required on every
  request: as `?token=` on `GET /` only (the server answers with a cookie and sends the browser to the
  bare URL, so the token leaves the address bar; `?token=` on any other request is 403) or as that
  cookie; without it every path gets 403. The cookie is HttpOnly, SameSite=Strict, Secure under TLS,
  and named after the port (browsers share cookies between the ports of a host, and two servers may run
  side by side).
- A state-changing request (any method but GET, HEAD, OPTIONS) whose `Origin` is not this server's, or
  whose `Sec-Fetch-Site` is `cross-site`, is 403: another page (another site, or another port of this
  host) cannot post a decision. A POST must also carry JSON, which a cross-site form cannot send.
- Every answer forbids framing (`frame-ancestors 'none'`, `X-Frame-Options: DENY`), loads scripts and
  images from the server only, is not sniffed, sends no referrer and, unless it says otherwise, is not
  cached.
- A body is at most MAX_BODY bytes (413), JSON at most MAX_DEPTH deep (400). Rows are addressed by row
  id (a hash of their key) only: no route takes a path, so a traversal attempt is a 404.
- With --ssl-certfile/--ssl-keyfile uvicorn serves HTTPS; otherwise remote review goes through an SSH
  tunnel.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.storage import Location
from reviews import images, stats, store
from reviews.ledger import Ledger
from reviews.queue import AUDIT, PAGE_SIZE, TABS, Queue, StaleIndex, open_run, parse_row_id
from reviews.sheet import FONT

CLASS_KEYS = "1234567890"  # a key per class for the first ten classes (a KMNIST card has exactly ten)
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")
TAB_TITLES = {"error": "unreadable file", "blank": "no character", "unknown_character": "not one of the model's characters",
              "low_confidence": "the model is unsure", AUDIT: "audit: auto-accepted rows"}
MAX_DECISIONS = 1000  # per request: a page accepted in bulk is at most a few hundred
MAX_BODY = 1 << 20  # bytes a request may send: MAX_DECISIONS decisions are about 60 KiB
MAX_DEPTH = 32  # JSON nesting; decisions nest 3 deep, and json.loads recurses until RecursionError
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?")
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
JSON_BRACKET = re.compile(r"[\[\]{}]")
T = TypeVar("T")


class Review:
    """What the app serves: the queue of OUT, the decisions on it, and who is deciding."""

    def __init__(self, out: Location, reviewer: str, audit_size: int = 0, seed: int = 0):
        self.out, self.reviewer, self.audit_size = out, reviewer, audit_size
        self.card = open_run(out)
        self.classes = self.card.classes.chars
        self.queue = Queue(out, self.classes, audit_size, seed)
        self.ledger = Ledger(out)
        self.queue.reset_marks(self.ledger.settled_keys())
        self.audit_figure: tuple[int, dict | None] = (-1, None)

    def sync(self, force: bool = False) -> None:
        """Pick up new shards (a running predict) and decisions published by anyone since the last look."""
        if self.queue.refresh(force):
            self.queue.reset_marks(self.ledger.settled_keys())
        changed = self.ledger.refresh(force)
        if changed:
            self.queue.mark(np.array(list(changed), np.uint64), np.array(list(changed.values()), bool))

    def tabs(self) -> list[dict]:
        counts = self.queue.counts()
        shown = [*REVIEW_REASONS, *([AUDIT] if self.audit_size else [])]
        return [{"name": t, "title": TAB_TITLES[t], **counts[t]} for t in shown]

    def audit(self) -> dict | None:
        """The measured error rate of auto-accepted rows (recomputed only when decisions were added)."""
        seen = len(self.ledger.batches)
        if self.audit_figure[0] != seen:
            summary = stats.audit_summary(self.ledger.history(), self.card)
            self.audit_figure = (seen, summary and {**summary, "text": stats.audit_text(summary)})
        return self.audit_figure[1]

    def info(self) -> dict:
        self.sync()
        return {"out": self.out.uri, "reviewer": self.reviewer, "model_id": self.card.model_id,
                "classes": [{"char": c, "codepoint": cp, "key": CLASS_KEYS[i] if i < len(CLASS_KEYS) else None}
                            for i, (c, cp) in enumerate(zip(self.classes, self.card.classes.codepoints))],
                "special": list(store.SPECIAL_LABELS), "tabs": self.tabs(), "page_size": PAGE_SIZE,
                "audit": self.audit() if self.audit_size else None}

    def fresh(self, read: Callable[[], T]) -> T:
        """`read()` over the index, once more after listing predictions/ again when a shard was rewritten
        under it (`predict --resume` re-reading error rows) or went (`--overwrite`)."""
        try:
            return read()
        except (StaleIndex, FileNotFoundError):
            self.sync(force=True)
            return read()

    def rows_by_id(self, ids: list[str]) -> list[dict | None]:
        return self.fresh(lambda: self.queue.rows_by_id(ids))

    def page(self, tab: str, page: int, size: int) -> dict:
        self.sync()
        result = self.fresh(lambda: self.queue.page(tab, page, size))
        result["tiles"] = [self.tile(row) for row in result["tiles"]]
        result["tabs"] = self.tabs()
        return result

    def tile(self, row: dict) -> dict:
        standing = self.ledger.decision(parse_row_id(row["id"]))
        return {"id": row["id"], "tab": row["tab"], "group": row["group"], "path": row["path"],
                "rel_path": row["rel_path"], "reason": row["review_reason"], "pred_char": row["pred_char"],
                "confidence": row["confidence"], "top": list(zip(row["topk_chars"] or [], row["topk_confidences"] or [])),
                "ood_score": row["ood_score"], "error": row["error"], "error_kind": row["error_kind"],
                "on_page": images.BOX_KEY.match(row["path_bytes"]) is not None,
                "decision": None if standing is None else {"label": standing.label, "reviewer": standing.reviewer,
                                                           "kind": standing.kind}}

    def decide(self, items: list[dict]) -> dict:
        """Record decisions [{"id", "label"}] (label null withdraws); on disk when this returns."""
        ids = [item.get("id") for item in items]
        labels = [item.get("label") for item in items]
        if not all(isinstance(i, str) for i in ids) or not all(lab is None or isinstance(lab, str) for lab in labels):
            raise BadRequest(400, "each decision is {\"id\": row id, \"label\": text or null}")
        store.check_labels(labels, self.classes)
        rows = self.rows_by_id(ids)
        unknown = [i for i, row in zip(ids, rows) if row is None]
        if unknown:
            raise BadRequest(404, f"no queued row has id {unknown[0]!r}")
        table = store.decision_table([
            store.decision_row(row, label, self.reviewer, "audit" if row["review_reason"] is None else "review", "ui")
            for row, label in zip(rows, labels)], self.classes)
        name, changed = self.ledger.commit(table)
        self.queue.mark(np.array(list(changed), np.uint64), np.array(list(changed.values()), bool))
        return {"saved": len(items), "file": name}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Listen:
    """Where the server listens, hence the `Host` and `Origin` values that name it."""

    host: str  # as given to --host
    port: int
    tls: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def names(self) -> set[str]:
        """Host names of this server, besides the address each connection came in on."""
        host = self.host.lower()
        names = set() if host in WILDCARD else {host}
        if host in LOOPBACK or host in WILDCARD:
            names |= set(LOOPBACK)
        if host in WILDCARD:  # every interface: a browser on another machine names this one
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return names


def host_port(text: str, scheme: str) -> tuple[str, int] | None:
    """(name, port) of a `Host` value or an origin's authority (`[v6]:port` too); None if malformed."""
    m = HOST.fullmatch(text)
    if m is None or scheme not in ("http", "https"):
        return None
    return m.group(1).strip("[]").lower(), int(m.group(2)) if m.group(2) else (443 if scheme == "https" else 80)


async def read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The whole request body; None past MAX_BODY, by Content-Length or by the bytes that arrive (a chunked
    body declares none). ClientDisconnect if the client goes."""
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


class Guard:
    """Before the token: `Host` names this server (else 400: DNS rebinding), a state-changing request
    comes from this server's own pages (else 403: CSRF), the body fits MAX_BODY (else 413). On every
    answer, refusals included: the security headers, and no-store unless it sets its own Cache-Control."""

    def __init__(self, app: ASGIApp, listen: Listen):
        self.app, self.listen, self.names = app, listen, listen.names()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *SECURITY_HEADERS]
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is None:
            try:
                body = await read_body(scope, receive)
            except ClientDisconnect:
                return
            if body is None:
                refusal = PlainTextResponse(f"413: a request body is at most {MAX_BODY:,} bytes\n", status_code=413)
        if refusal is not None:
            return await refusal(scope, receive, send_secured)
        await self.app(scope, replay(body, receive), send_secured)

    def refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        scheme = self.listen.scheme
        own = {(name, self.listen.port) for name in {*self.names, scope["server"][0].lower()}}
        if host_port(headers.get("host", ""), scheme) not in own:
            return PlainTextResponse("400: this server does not answer to that Host: open the URL that "
                                     "`kmnist-batch review` printed\n", status_code=400)
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")  # absent from non-browser clients; "null" from sandboxed or file pages
        origin_scheme, _, authority = (origin or "").partition("://")
        foreign = origin is not None and (origin_scheme != scheme or host_port(authority, scheme) not in own)
        if foreign or headers.get("sec-fetch-site") == "cross-site":
            return PlainTextResponse("403: a page from another origin cannot change anything here\n", status_code=403)
        return None


class TokenGate:
    """403 for every request without the token: `?token=` on GET / (answered with the cookie) or this
    server's cookie. `?token=` anywhere else is refused, right or wrong: URLs with it end up in logs and
    histories."""

    def __init__(self, app: ASGIApp, token: str, secure: bool):
        self.app, self.token, self.secure = app, token.encode(), secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        cookie = f"kmnist_review_{scope['server'][1]}"
        if "token" in request.query_params:
            if request.method != "GET" or request.url.path != "/":
                response = PlainTextResponse("403: the token is taken only in the URL that `kmnist-batch review` "
                                             "printed\n", status_code=403)
                return await response(scope, receive, send)
            if secrets.compare_digest(request.query_params["token"].encode(), self.token):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(cookie, self.token.decode(), httponly=True, samesite="strict", secure=self.secure)
                return await response(scope, receive, send)
        held = request.cookies.get(cookie)
        if held is not None and secrets.compare_digest(held.encode(), self.token):
            return await self.app(scope, receive, send)
        response = PlainTextResponse("403: this review server needs its token: open the URL that "
                                     "`kmnist-batch review` printed\n", status_code=403)
        await response(scope, receive, send)


def parse_json(body: bytes) -> object:
    """The body as JSON; ValueError if it is not UTF-8 JSON or nests deeper than MAX_DEPTH (counted over
    the brackets outside strings, before json.loads would recurse)."""
    text = body.decode("utf-8")
    depth = 0
    for bracket in JSON_BRACKET.findall(JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH}")
    return json.loads(text)


def static_text(name: str) -> str:
    return resources.files("reviews").joinpath("static", name).read_text(encoding="utf-8")


def index(request: Request) -> Response:
    return Response(static_text("index.html"), media_type="text/html; charset=utf-8")


def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name == FONT.name:  # the kana drawn alike on every machine, Japanese fonts installed or not
        return FileResponse(FONT, media_type="font/ttf", headers={"Cache-Control": "private, max-age=86400"})
    if name not in STATIC:
        return PlainTextResponse("404: not found\n", status_code=404)
    return Response(static_text(name), media_type=STATIC[name])


def not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("404: not found\n", status_code=404)


class Api:
    """The app's JSON and image endpoints over one Review."""

    def __init__(self, review: Review):
        self.review = review

    def info(self, request: Request) -> Response:
        return JSONResponse(self.review.info())

    def queue(self, request: Request) -> Response:
        q = request.query_params
        tab = q.get("tab", REVIEW_REASONS[0])
        if tab not in TABS or (tab == AUDIT and not self.review.audit_size):
            return JSONResponse({"error": f"no tab {tab!r}"}, status_code=404)
        try:
            page, size = int(q.get("page", 0)), int(q.get("size", PAGE_SIZE))
        except ValueError:
            return JSONResponse({"error": "page and size are whole numbers"}, status_code=400)
        return JSONResponse(self.review.page(tab, page, size))

    def row_of(self, request: Request) -> dict | None:
        key = parse_row_id(request.path_params["row_id"].removesuffix(".png"))
        return self.review.rows_by_id([f"{key:016x}"])[0] if key is not None else None

    def crop(self, request: Request) -> Response:
        row = self.row_of(request)
        if row is None:
            return PlainTextResponse("404: no such row\n", status_code=404)
        return Response(images.crop_png(row), media_type="image/png")

    def page_view(self, request: Request) -> Response:
        row = self.row_of(request)
        data = images.page_png(row) if row is not None else None
        if data is None:
            return PlainTextResponse("404: no page for this row\n", status_code=404)
        return Response(data, media_type="image/png")

    async def decide(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send decisions as application/json"}, status_code=415)
        try:
            items = parse_json(await request.body())["decisions"]
            if not isinstance(items, list) or not 0 < len(items) <= MAX_DECISIONS:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": f"expected {{\"decisions\": [1 to {MAX_DECISIONS} decisions]}}"}, status_code=400)
        try:
            result = await run_in_threadpool(self.review.decide, [i if isinstance(i, dict) else {} for i in items])
        except KmnistError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except OSError as e:  # reviews/ not writable, disk full: the page shows the tiles as not saved
            return JSONResponse({"error": f"could not write {store.reviews_dir(self.review.out).uri}: {e}"},
                                status_code=503)
        return JSONResponse(result)


def build_app(review: Review, token: str, listen: Listen) -> ASGIApp:
    api = Api(review)
    app = Starlette(routes=[
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/info", api.info),
        Route("/api/queue", api.queue),
        Route("/api/crop/{row_id}", api.crop),
        Route("/api/page/{row_id}", api.page_view),
        Route("/api/decisions", api.decide, methods=["POST"]),
    ], exception_handlers={404: not_found})
    return Guard(TokenGate(app, token, listen.tls), listen)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the URL is printed so the URL works at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KmnistError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port, or 0 for any free one)") from None
    sock.listen(128)
    return sock


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def tls_checked(certfile: Path | None, keyfile: Path | None) -> bool:
    """Whether to serve HTTPS; a certificate and key that do not load are one error line, not a traceback."""
    if certfile is None:
        return False
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise KmnistError(f"cannot use --ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e}") from None
    return True


def serve(out: str, host: str, port: int, reviewer: str, audit_size: int = 0, seed: int = 0,
          echo: Callable[[str], None] = print, certfile: Path | None = None, keyfile: Path | None = None) -> None:
    """Serve the review app for OUT until Ctrl-C; prints the URL with its token on stdout first. With
    `certfile` and `keyfile` (PEM), over HTTPS."""
    import uvicorn

    tls = tls_checked(certfile, keyfile)
    location = storage.resolve(out)
    review = Review(location, reviewer, audit_size, seed)
    token = secrets.token_urlsafe(32)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if host not in LOOPBACK:
        exposure = (f"warning: --host {host} lets every machine that reaches this one on port {port} talk to the review "
                    f"app: anyone with its URL (the token) sees the crops and records decisions")
        print(exposure + ("" if tls else ", and over plain HTTP anyone on the network path reads the token; for "
                          f"remote review use an SSH tunnel (ssh -L {port}:127.0.0.1:{port} this-machine) or "
                          "--ssl-certfile/--ssl-keyfile"), file=sys.stderr)
    listen = Listen(host, port, tls)
    shown = "127.0.0.1" if host in WILDCARD else url_host(host)
    tabs = ", ".join(f"{t['name']} {t['left']:,}/{t['total']:,}" for t in review.tabs())
    echo(f"review queue of {location.uri} (left/total): {tabs}; decisions go to {store.reviews_dir(location).uri} "
         f"as {reviewer}")
    echo(f"open {listen.scheme}://{shown}:{port}/?token={token}")
    echo("Ctrl-C stops the server (every decision shown as saved is already on disk)")
    sys.stdout.flush()
    config = uvicorn.Config(build_app(review, token, listen), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, ssl_certfile=certfile, ssl_keyfile=keyfile)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the normal way to stop
        pass
    echo(f"stopped; decisions are in {store.reviews_dir(location).uri}")
